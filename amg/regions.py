"""Small-region cleanup of one mask (the generator's min_mask_region_area), worked inside
the mask's box instead of the whole image.

The official generator decodes every mask to full size and labels the connected regions of
the whole image twice (holes, then islands). On a 12-megapixel photo that is ~12 MB and two
full-image labelings per mask, and it holds every cleaned mask at full size at once. Here
only the mask's bounding box and a one-pixel margin around it (where the image has room)
are decoded and labelled: every set pixel lies in the box, so the islands are the same, and
every unset pixel outside the box is connected to the margin, so the holes are too, once the
region that reaches the margin is credited with the pixels beyond it. The few cases where
that region itself would be filled (a mask covering almost all of a small image) or where
the margin falls apart into several regions are done on the whole image, as before. Results
are exactly `remove_small_regions` on the full mask, holes then islands (tested)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .masks import remove_small_regions
from .rle import counts_to_crop, crop_to_counts, rle_bbox

_EIGHT_NEIGHBOURS = np.ones((3, 3), dtype=bool)


@dataclass
class CleanedMask:
    """A mask changed by the cleanup: its pixels in rows y0.. and columns x0.. of the
    image (nothing set outside them)."""

    pixels: np.ndarray
    y0: int
    x0: int

    def box(self) -> list[int]:
        """Tight XYXY box (inclusive) in image coordinates; [0, 0, 0, 0] when empty."""
        rows, cols = np.flatnonzero(self.pixels.any(1)), np.flatnonzero(self.pixels.any(0))
        if len(rows) == 0:
            return [0, 0, 0, 0]
        return [self.x0 + int(cols[0]), self.y0 + int(rows[0]), self.x0 + int(cols[-1]), self.y0 + int(rows[-1])]

    def counts(self, size: tuple[int, int]) -> np.ndarray:
        """Uncompressed COCO counts of the whole-image mask."""
        return crop_to_counts(self.pixels, size, self.y0, self.x0)


def clean_small_regions(counts: np.ndarray, size: tuple[int, int], area_thresh: float) -> CleanedMask | None:
    """Fill the holes and then drop the islands smaller than area_thresh of the mask given
    by its counts (image size H x W), as remove_small_regions does on the full mask.
    Returns None when nothing changes."""
    h, w = size
    x, y, bw, bh = rle_bbox(counts, size)
    if bw == 0:  # empty: its one hole is the whole image
        return _on_whole_image(counts, size, area_thresh)
    y0, x0 = max(y - 1, 0), max(x - 1, 0)
    y1, x1 = min(y + bh + 1, h), min(x + bw + 1, w)  # exclusive
    pixels = counts_to_crop(counts, size, (y0, y1), (x0, x1))
    labels, n = ndimage.label(~pixels, structure=_EIGHT_NEIGHBOURS)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    beyond = h * w - pixels.size  # image pixels outside the crop: all unset
    margin_label = None
    if beyond:
        margin = np.ones(pixels.shape, dtype=bool)
        margin[y - y0:y - y0 + bh, x - x0:x - x0 + bw] = False
        margin_labels = np.unique(labels[margin])
        if len(margin_labels) != 1:
            return _on_whole_image(counts, size, area_thresh)
        margin_label = int(margin_labels[0])
        sizes[margin_label - 1] += beyond
    small = sizes < area_thresh
    filled = bool(small.any())
    if filled:
        if margin_label is not None and small[margin_label - 1]:
            return _on_whole_image(counts, size, area_thresh)  # the fill would reach beyond the crop
        pixels = np.concatenate([[True], small])[labels]
    pixels, dropped = remove_small_regions(pixels, area_thresh, "islands")  # every island lies in the crop
    if not (filled or dropped):
        return None
    return CleanedMask(pixels, y0, x0)


def _on_whole_image(counts: np.ndarray, size: tuple[int, int], area_thresh: float) -> CleanedMask | None:
    mask = counts_to_crop(counts, size, (0, size[0]), (0, size[1]))
    mask, filled = remove_small_regions(mask, area_thresh, "holes")
    mask, dropped = remove_small_regions(mask, area_thresh, "islands")
    return CleanedMask(mask, 0, 0) if filled or dropped else None
