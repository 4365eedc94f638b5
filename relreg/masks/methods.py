"""The mask methods ``relreg masks --method`` accepts: a :class:`~relreg.registry.Registry` of
factories, each called with the method's options and returning a callable
``(images, prompts) -> masks`` (lists of ``(3, H, W)`` uint8 images, strings and ``(H, W)`` bool
masks). Register your own with ``MASK_METHODS.register("name", factory)``.
"""

from __future__ import annotations

from relreg.registry import Registry

__all__ = ["MASK_METHODS", "list_mask_methods"]

MASK_METHODS: Registry = Registry("mask method")


@MASK_METHODS.register("tokencut")
def _tokencut(**options: object):  # noqa: ANN202
    from relreg.masks.tokencut import TokenCut

    return TokenCut(**options)


@MASK_METHODS.register("clipseg")
def _clipseg(**options: object):  # noqa: ANN202
    from relreg.masks.text import CLIPSegMasks

    return CLIPSegMasks(**options)


@MASK_METHODS.register("sam3")
def _sam3(**options: object):  # noqa: ANN202
    from relreg.masks.text import SAM3Masks

    return SAM3Masks(**options)


def list_mask_methods() -> list[str]:
    """The registered mask methods' names."""
    return MASK_METHODS.list()
