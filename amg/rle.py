"""COCO run-length encoding of whole batches of masks.

COCO RLE walks a mask in column-major (Fortran) order and stores alternating run lengths,
starting with a run of zeros (which is 0 when the first pixel is set). Here a batch is
encoded with one pass on the masks' own device and a single copy to the host, so a batch
of GPU masks costs one device-to-host transfer instead of one per mask.

"Counts" below always means uncompressed run lengths: a 1-D integer numpy array per mask.
pycocotools turns those into the compressed string form stored in the dataset.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from pycocotools import mask as coco_mask

if TYPE_CHECKING:  # torch is imported where it is used: readers of RLE (the report) do not need it
    import torch


def masks_to_rle_counts(masks: torch.Tensor) -> list[np.ndarray]:
    """Uncompressed COCO run lengths of every mask in a batch.

    masks: B x H x W bool, on any device.
    Returns B int64 arrays; the counts of each mask sum to H * W.
    """
    b, h, w = masks.shape
    n_pixels = h * w
    if b == 0:
        return []
    if n_pixels == 0:
        return [np.zeros(1, np.int64) for _ in range(b)]
    starts = _run_starts(masks.bool())

    # Interleave the mask boundaries 0, HW, 2HW, ... with the run starts; differences of
    # the merged sequence are then the counts of all masks back to back. A boundary closes
    # one mask's last run and opens the next mask's first run.
    boundaries = np.arange(b + 1, dtype=np.int64) * n_pixels
    starts_per_mask = np.searchsorted(starts, boundaries)
    edges = np.insert(starts, starts_per_mask, boundaries)
    counts = np.diff(edges)
    # Mask i owns (its number of starts + 1) counts, beginning at starts_per_mask[i] + i.
    first_count = starts_per_mask + np.arange(b + 1)
    return np.split(counts, first_count[1:-1])


def _run_starts(masks: torch.Tensor) -> np.ndarray:
    """Sorted column-major flat indices (mask * H*W + x * H + y) of the pixels that start
    a run, i.e. differ from the pixel before them in column-major order.

    masks: B x H x W bool. Runs on the masks' device and copies only the indices (a few
    per cent of the pixels) to the host, once. The masks are scanned in their own
    row-major layout and the indices reordered by a sort afterwards: transposing a whole
    batch costs more than sorting its run starts. CPU masks go through numpy, whose
    kernels on bool data beat torch's here (200 masks of 768 x 1024 on 2 threads: 120 ms,
    against 350 ms for a torch transpose + xor + nonzero).
    """
    if masks.device.type == "cpu":
        return _run_starts_numpy(masks.numpy())
    return _run_starts_torch(masks)


def _run_starts_numpy(pixels: np.ndarray) -> np.ndarray:
    _, h, w = pixels.shape
    is_start = np.empty_like(pixels)
    _mark_run_starts(pixels, is_start, np.not_equal)
    return np.sort(_row_to_column_major(np.flatnonzero(is_start), h, w))


def _run_starts_torch(masks: torch.Tensor) -> np.ndarray:
    import torch

    _, h, w = masks.shape
    is_start = torch.empty_like(masks)
    _mark_run_starts(masks, is_start, torch.ne)
    flat = torch.flatten(is_start).nonzero().squeeze(1)
    return torch.sort(_row_to_column_major(flat, h, w)).values.cpu().numpy()


def _mark_run_starts(pixels, is_start, not_equal) -> None:
    """Fill B x H x W is_start (numpy or torch, with its not_equal) for B x H x W pixels.

    In column-major order the pixel before (y, x) is (y - 1, x), or the bottom of the
    previous column when y = 0. The very first pixel is compared with an unset one, so a
    mask that starts set opens with an empty run of zeros, as COCO wants.
    """
    not_equal(pixels[:, 1:], pixels[:, :-1], out=is_start[:, 1:])
    not_equal(pixels[:, 0, 1:], pixels[:, -1, :-1], out=is_start[:, 0, 1:])
    is_start[:, 0, 0] = pixels[:, 0, 0]


def _row_to_column_major(flat, h: int, w: int):
    """Flat row-major indices into B x H x W -> flat indices into B x W x H (same type)."""
    mask_index, pixel = flat // (h * w), flat % (h * w)
    y, x = pixel // w, pixel % w
    return mask_index * (h * w) + x * h + y


def counts_to_crop(counts: np.ndarray, size: Sequence[int], rows: tuple[int, int], cols: tuple[int, int]
                   ) -> np.ndarray:
    """The pixels of a mask given by its counts (image H x W) in rows [r0, r1) and columns
    [c0, c1): (r1 - r0) x (c1 - c0) bool, decoding only those columns."""
    h = int(size[0])
    (r0, r1), (c0, c1) = rows, cols
    counts = np.asarray(counts, dtype=np.int64)
    ends = np.cumsum(counts)
    lo, hi = c0 * h, c1 * h  # the columns' span in column-major order
    lengths = np.clip(ends, lo, hi) - np.clip(ends - counts, lo, hi)
    values = np.arange(len(counts)) % 2 == 1  # runs alternate unset, set
    return np.repeat(values, lengths).reshape(c1 - c0, h)[:, r0:r1].T


def crop_to_counts(pixels: np.ndarray, size: Sequence[int], y0: int, x0: int) -> np.ndarray:
    """Uncompressed counts of an H x W image mask whose set pixels all lie in `pixels`
    (a bool crop placed at row y0, column x0)."""
    h, w = int(size[0]), int(size[1])
    ch, cw = pixels.shape
    columns = np.zeros((1, h, cw), dtype=bool)  # the crop's columns, full height
    columns[0, y0:y0 + ch] = pixels
    import torch

    counts = masks_to_rle_counts(torch.from_numpy(columns))[0]
    counts[0] += x0 * h  # the columns before the crop: unset
    after = (w - x0 - cw) * h
    if after and len(counts) % 2:  # the last run is unset: it goes on
        counts[-1] += after
    elif after:
        counts = np.append(counts, after)
    return counts


def rle_to_coco(counts_list: Sequence[np.ndarray], size: Sequence[int]) -> list[dict[str, Any]]:
    """Compressed COCO RLE dicts {"size": [h, w], "counts": str}, one per counts array.

    size: (h, w) shared by all masks. The counts string is decoded to str so that the
    records serialise to JSON / Arrow as they are.
    """
    if len(counts_list) == 0:
        return []
    h, w = int(size[0]), int(size[1])
    # pycocotools copies the counts into uint32 itself; handing it uint32 already skips a
    # conversion per mask. One call encodes the whole batch.
    uncompressed = [
        {"size": [h, w], "counts": np.asarray(c, dtype=np.uint32)} for c in counts_list
    ]
    encoded = coco_mask.frPyObjects(uncompressed, h, w)
    return [{"size": [h, w], "counts": r["counts"].decode("ascii")} for r in encoded]


def coco_to_mask(rle: dict[str, Any]) -> np.ndarray:
    """H x W bool mask of one compressed (str or bytes counts) COCO RLE dict."""
    counts = rle["counts"]
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    return coco_mask.decode({"size": list(rle["size"]), "counts": counts}).astype(bool)


def rle_area(counts: np.ndarray) -> int:
    """Number of set pixels: the sum of every second run, starting with the second."""
    return int(np.asarray(counts, dtype=np.int64)[1::2].sum())


def rle_bbox(counts: np.ndarray, size: Sequence[int]) -> list[int]:
    """Bounding box [x, y, w, h] of a mask given by its counts, without decoding it.

    Matches `pycocotools.mask.toBbox`: a trailing odd run is a run of zeros and is
    ignored; an empty mask gives zeros. Width and height count pixels (x1 - x0 + 1).
    """
    h = int(size[0])
    counts = np.asarray(counts, dtype=np.int64)
    counts = counts[: len(counts) // 2 * 2]
    if len(counts) == 0:
        return [0, 0, 0, 0]
    ends = np.cumsum(counts)
    first = ends[0::2]  # index of each foreground run's first pixel
    last = ends[1::2] - 1  # ... and of its last pixel
    first_x, first_y = np.divmod(first, h)
    last_x, last_y = np.divmod(last, h)
    x0, x1 = int(first_x.min()), int(last_x.max())
    if np.any(last_x > first_x):
        # A run that continues into the next column touches the bottom row of one column
        # and the top row of the next: the box spans the full height.
        y0, y1 = 0, h - 1
    else:
        y0, y1 = int(first_y.min()), int(last_y.max())
    return [x0, y0, x1 - x0 + 1, y1 - y0 + 1]


def to_coco_rle(segmentation) -> dict[str, Any]:
    """A generator segmentation in any output mode (H x W bool array, uncompressed or
    compressed RLE dict) -> pycocotools' compressed RLE with bytes counts."""
    if isinstance(segmentation, np.ndarray):
        return coco_mask.encode(np.asfortranarray(segmentation.astype(np.uint8)))
    counts = segmentation["counts"]
    if isinstance(counts, list):
        return coco_mask.frPyObjects(segmentation, *segmentation["size"])
    return {"size": segmentation["size"], "counts": counts.encode() if isinstance(counts, str) else counts}
