"""Where the automatic mask generator prompts: point grids and image crops.

Points are normalised (x, y) in [0, 1]: the generator scales them to each crop's size. Crops
are [x0, y0, x1, y1] in pixels (x1, y1 exclusive). Layer 0 is the whole image; layer i
tiles the image with 2**i x 2**i overlapping crops, each prompted with a grid
scale_per_layer**i times sparser per side, so small objects get denser prompts.
"""
from __future__ import annotations

from itertools import product

import numpy as np


def point_grid(n_per_side: int) -> np.ndarray:
    """(n_per_side**2) x 2 float64 (x, y): the centres of an n x n grid of cells over the
    unit square, row by row (x varies fastest)."""
    half_cell = 1 / (2 * n_per_side)
    centres = np.linspace(half_cell, 1 - half_cell, n_per_side)
    ys, xs = np.meshgrid(centres, centres, indexing="ij")
    return np.stack([xs.ravel(), ys.ravel()], axis=-1)


def point_grids(n_per_side: int, n_layers: int, scale_per_layer: int) -> list[np.ndarray]:
    """One point grid per crop layer 0..n_layers; layer i has
    int(n_per_side / scale_per_layer**i) points per side."""
    return [point_grid(int(n_per_side / scale_per_layer**i)) for i in range(n_layers + 1)]


def crop_boxes(
    im_size: tuple[int, int], n_layers: int, overlap_ratio: float
) -> tuple[list[list[int]], list[int]]:
    """Crop boxes of every layer and the layer of each.

    im_size: (h, w). Returns ([[x0, y0, x1, y1], ...], [layer, ...]): first the whole
    image (layer 0), then for layer i its 2**i x 2**i crops, column by column (x0 outer,
    y0 inner). Neighbouring crops of layer i overlap by int(overlap_ratio * short_side *
    2 / 2**i) pixels; crops at the right and bottom are clipped to the image.
    """
    im_h, im_w = im_size
    short_side = min(im_h, im_w)
    boxes, layers = [[0, 0, im_w, im_h]], [0]

    def crop_length(full_length: int, n_crops: int, overlap: int) -> int:
        # n crops of this length, each overlapping the previous one, cover full_length.
        return -(-(full_length + overlap * (n_crops - 1)) // n_crops)

    for layer in range(1, n_layers + 1):
        n_per_side = 2**layer
        overlap = int(overlap_ratio * short_side * (2 / n_per_side))
        crop_w = crop_length(im_w, n_per_side, overlap)
        crop_h = crop_length(im_h, n_per_side, overlap)
        x0s = [(crop_w - overlap) * i for i in range(n_per_side)]
        y0s = [(crop_h - overlap) * i for i in range(n_per_side)]
        for x0, y0 in product(x0s, y0s):
            boxes.append([x0, y0, min(x0 + crop_w, im_w), min(y0 + crop_h, im_h)])
            layers.append(layer)
    return boxes, layers
