"""Figures lay out their text without collisions."""

from __future__ import annotations

import itertools

import torch

from relreg.viz import explanation_grid


def _boxes(fig, texts):
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    return [t.get_window_extent(renderer) for t in texts]


def test_row_captions_of_a_heatmap_grid_do_not_run_into_each_other():
    torch.manual_seed(0)
    images = torch.rand(6, 3, 32, 32)
    maps = {"chefer (epoch 3)": torch.rand(6, 32, 32)}
    captions = [f"#{100 + i} pred {i % 4} label {(i + 1) % 4} mass 0.{i}5" for i in range(6)]
    fig = explanation_grid(images, maps, captions)
    labels = [ax.yaxis.label for ax in fig.axes[:: len(maps) + 1]]
    assert [lab.get_text().replace("\n", " ") for lab in labels] == captions
    boxes = _boxes(fig, labels)
    for a, b in itertools.combinations(boxes, 2):
        assert not a.overlaps(b), "row captions overlap"
    # and no caption is drawn over the image panels of its row
    panels = _boxes(fig, [ax for ax in fig.axes])
    for box in boxes:
        assert not any(box.overlaps(p) for p in panels)
