"""Data: generated shapes with masks (the built-in CPU benchmark)."""

from relreg.data.synthetic import SHAPES, ShapesBatch, make_shapes

__all__ = ["SHAPES", "ShapesBatch", "make_shapes"]
