"""Mask overlays for looking at results: each mask in its own colour over the image."""
from __future__ import annotations

import numpy as np
from pycocotools import mask as coco_mask

from .rle import to_coco_rle


def overlay(image: np.ndarray, masks: list[np.ndarray], alpha: float = 0.5, seed: int = 0) -> np.ndarray:
    """H x W x 3 uint8 image with H x W bool masks blended on top, largest first so
    that small masks stay visible, and their outlines drawn."""
    rng = np.random.default_rng(seed)
    out = image.astype(np.float32)
    for mask in sorted(masks, key=lambda m: -int(m.sum())):
        colour = rng.integers(40, 256, 3).astype(np.float32)
        out[mask] = (1 - alpha) * out[mask] + alpha * colour
        edge = mask & ~(np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1) & np.roll(mask, -1, 1))
        out[edge] = colour
    return out.clip(0, 255).astype(np.uint8)


def record_masks(records: list[dict]) -> list[np.ndarray]:
    """Binary masks of generator records in any output mode."""
    return [coco_mask.decode(to_coco_rle(r["segmentation"])).astype(bool) for r in records]
