"""Thresholded full-size masks of low-res logits, without the full-size logits.

The model's `postprocess_masks` takes low-res logits (l x l) through two bilinear resizes
(to the square input frame, crop the padding, to the output size), and the generator only
ever compares the result with a few thresholds: the binary mask (> mask_threshold) and the
two stability counts (> threshold +- offset). Full-size logits of a 768 x 1024 image cost
~1.4 ms per candidate to compute and as much again to compare three times.

Both resizes are linear and separable, so along each axis every output position is a fixed
convex combination of a few low-res positions. Group the output pixels by their nearest
low-res pixel (a "block", ~16 x 16 pixels for the bundled model on a 768 x 1024 image):
each one's value lies between the min and max of the low-res values in the (2r+1)^2 window
around its block (r = 1 for the usual 4x first resize), so where the window's minimum is
above a threshold the whole block is above it, and where its maximum is below it the whole
block is below. Only the blocks in between, along the mask's edges (a few per cent), are
evaluated pixel by pixel, through the same two resizes with the arithmetic of torch's
bilinear kernel (float32 taps and fused multiply-adds, `_fma`), so those pixels have the
same bits as the full-size logits (tested). The stability filter needs only whether a
count ratio reaches a threshold, so candidates are first ruled out by bounds on the counts:
from the blocks, then from the square frame's cells (every full-size pixel lies between
its 2 x 2 frame neighbours, so a mixed block's few frame values bound its pixels in
~4 x 4 groups); only candidates that may pass are evaluated pixel by pixel. (torch itself takes another kernel, rounding
differently in the last bit, for 3-channel inputs on one thread.)"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.nn import functional as F

from .masks import boxes_from_lines


def _fma(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """a * b + c as torch's bilinear kernel computes it: a fused multiply-add where its
    vectorized kernels use them (AVX2 / AVX-512 builds, CUDA), as torch's own addcmul does
    on the same build."""
    return torch.addcmul(c, a, b)


def _taps(n_src: int, n_dst: int) -> tuple[torch.Tensor, ...]:
    """Source indices i0, i1 and float32 weights w0, w1 of each of n_dst positions of a
    1-D bilinear resize with align_corners=False, computed as torch's kernel does."""
    scale = torch.tensor(n_src, dtype=torch.float32) / n_dst
    src = _fma(scale.expand(n_dst), torch.arange(n_dst, dtype=torch.float32) + 0.5,
               torch.full((n_dst,), -0.5)).clamp_min(0)  # the kernel's source positions
    i0 = src.floor().long().clamp_max(n_src - 1)
    w1 = (src - i0).clamp(0, 1)
    return i0, i0 + (i0 < n_src - 1).long(), 1 - w1, w1


@dataclass(frozen=True)
class _Axis:
    """One axis of the two resizes (n_low -> n_frame, keep n_in, -> n_out), its output
    positions grouped into blocks by nearest low-res position.

    nearest: n_out, the block of each output position; start, size: n_low, each block's
    first output position and number of positions (0 for a low-res position nearest to
    none); radius: how far from its block's low-res position an output position reaches.
    Per block i, the taps of both resizes restricted to what it reads: its positions
    (n_low x m, m = the largest block; padding is invalid, with zero weights) read frame
    positions frame_first[i] + out_f0 / out_f1 with weights out_w0 / out_w1; those f frame
    positions (n_low x f) read low-res positions low_first[i] + frame_i0 / frame_i1 with
    weights frame_w0 / frame_w1, at most n low-res positions from low_first[i].
    cells: n_low x f, how many of a block's positions read frame positions c and c + 1
    (c = out_f0; see Blocks.cell_bound)."""

    nearest: torch.Tensor
    start: torch.Tensor
    size: torch.Tensor
    radius: int
    valid: torch.Tensor
    out_f0: torch.Tensor
    out_f1: torch.Tensor
    out_w0: torch.Tensor
    out_w1: torch.Tensor
    low_first: torch.Tensor
    frame_i0: torch.Tensor
    frame_i1: torch.Tensor
    frame_w0: torch.Tensor
    frame_w1: torch.Tensor
    cells: torch.Tensor

    def frame_taps(self, blocks: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """frame_i0, frame_i1, frame_w0, frame_w1 of the blocks `blocks` (K x f each)."""
        return tuple(t.index_select(0, blocks) for t in (self.frame_i0, self.frame_i1, self.frame_w0, self.frame_w1))

    def out_taps(self, blocks: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """out_f0, out_f1, out_w0, out_w1 of the blocks `blocks` (K x m each)."""
        return tuple(t.index_select(0, blocks) for t in (self.out_f0, self.out_f1, self.out_w0, self.out_w1))

    def to(self, device) -> "_Axis":
        return _Axis(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vars(self).items()})


def _bilinear_matrix(n_src: int, n_dst: int) -> np.ndarray:
    """n_dst x n_src weights of a 1-D bilinear resize (align_corners=False)."""
    i0, i1, w0, w1 = _taps(n_src, n_dst)
    m = np.zeros((n_dst, n_src))
    np.add.at(m, (np.arange(n_dst), i0.numpy()), w0.double().numpy())
    np.add.at(m, (np.arange(n_dst), i1.numpy()), w1.double().numpy())
    return m


@lru_cache(maxsize=64)
def _axis(n_low: int, n_frame: int, n_in: int, n_out: int, device: str = "cpu") -> _Axis:
    """The tables of one axis (built once per geometry on the CPU, copied per device)."""
    if device != "cpu":
        return _axis(n_low, n_frame, n_in, n_out).to(device)
    composed = _bilinear_matrix(n_in, n_out) @ _bilinear_matrix(n_low, n_frame)[:n_in]  # n_out x n_low
    # The nearest low-res position: the weight-weighted mean source position, rounded.
    nearest = np.clip(np.rint(composed @ np.arange(n_low, dtype=np.float64)).astype(np.int64), 0, n_low - 1)
    reach = np.where(composed > 0, np.arange(n_low)[None, :] - nearest[:, None], 0)
    size = np.bincount(nearest, minlength=n_low)
    start = np.searchsorted(nearest, np.arange(n_low))  # nearest is non-decreasing
    m = max(int(size.max()), 1)
    offset = np.arange(n_out) - start[nearest]  # position inside its block
    valid = np.zeros((n_low, m), dtype=bool)
    valid[nearest, offset] = True

    # Second resize: each block's positions read frame positions first[i] .. first[i] + f - 1.
    f0, f1, w0, w1 = (t.numpy() for t in _taps(n_in, n_out))
    first = np.full(n_low, n_in, dtype=np.int64)
    np.minimum.at(first, nearest, f0)
    last = np.zeros(n_low, dtype=np.int64)
    np.maximum.at(last, nearest, f1)
    first = np.minimum(first, last)  # empty blocks: an empty range at 0
    f = int((last - first).max()) + 1
    out = {k: np.zeros((n_low, m), dtype=a.dtype) for k, a in (("f0", f0), ("f1", f1), ("w0", w0), ("w1", w1))}
    out["f0"][nearest, offset] = f0 - first[nearest]
    out["f1"][nearest, offset] = f1 - first[nearest]
    out["w0"][nearest, offset] = w0
    out["w1"][nearest, offset] = w1
    # First resize, at those frame positions (clamped into the frame for short blocks).
    i0, i1, v0, v1 = (t.numpy() for t in _taps(n_low, n_frame))
    frame_pos = np.minimum(first[:, None] + np.arange(f)[None, :], n_in - 1)
    low_first = i0[frame_pos].min(1)
    cells = np.zeros((n_low, f), dtype=np.int64)
    np.add.at(cells, (nearest, f0 - first[nearest]), 1)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    return _Axis(
        t(nearest), t(start), t(size), int(np.abs(reach).max()), t(valid),
        t(out["f0"]), t(out["f1"]), t(out["w0"]), t(out["w1"]), t(low_first),
        t(i0[frame_pos] - low_first[:, None]), t(i1[frame_pos] - low_first[:, None]),
        t(v0[frame_pos]), t(v1[frame_pos]), t(cells),
    )


class ThresholdUpsampler:
    """For one geometry: low-res logits B x l x l (the decoder's), the model's square
    input frame, the resized image's size inside it (input_size, h x w) and the output
    size (h x w), on a device."""

    def __init__(self, low_res_size: int, frame: int, input_size: Sequence[int], out_size: Sequence[int],
                 device: torch.device | str = "cpu"):
        device = str(torch.device(device))
        self.rows = _axis(low_res_size, frame, int(input_size[0]), int(out_size[0]), device)
        self.cols = _axis(low_res_size, frame, int(input_size[1]), int(out_size[1]), device)
        self.out_size = (int(out_size[0]), int(out_size[1]))
        self.area = self.rows.size[:, None] * self.cols.size[None, :]  # pixels per block
        # The same as a vector for summing by matmul; float32 sums are exact below 2^24 pixels.
        exact = torch.float32 if self.area.sum() < 2**24 else torch.float64
        self.block_areas = self.area.flatten().to(exact)

    @torch.no_grad()
    def classify(self, low_res: torch.Tensor, thresholds: Sequence[float]) -> "Blocks":
        """low_res: B x l x l logits -> which blocks are wholly above / below each
        threshold, from the low-res values alone."""
        x = low_res.float()
        ry, rx = self.rows.radius, self.cols.radius
        hi, lo = _window_max(x, ry, rx), -_window_max(-x, ry, rx)
        margin = _margin(x)[:, None, None]
        above = torch.stack([lo > t + margin for t in thresholds])  # T x B x l x l: every pixel > t
        below = torch.stack([hi < t - margin for t in thresholds])  # every pixel <= t
        return Blocks(self, x, list(thresholds), above, below)


def _cells(points: torch.Tensor, every: bool) -> torch.Tensor:
    """K x r x c flags of frame positions -> flags of the cells they span: cell (y, x) covers
    positions y..y+1, x..x+1 (the last row / column only itself); every=True: all of
    them set, else any."""
    out = points.clone()
    op = torch.Tensor.logical_and_ if every else torch.Tensor.logical_or_
    op(out[:, :-1], points[:, 1:])
    rows = out.clone()
    op(out[:, :, :-1], rows[:, :, 1:])
    return out


def _margin(x: torch.Tensor) -> torch.Tensor:
    """B: per candidate (low-res logits B x l x l), a margin far outside the rounding of
    the full-size computation, for deciding from bounds which side of a threshold the
    pixels are on."""
    return 1e-4 * (1 + x.abs().flatten(1).amax(1)) if len(x) else x.new_zeros(0)


def _block_frames(x: torch.Tensor, b, i, j, rows: _Axis, cols: _Axis) -> torch.Tensor:
    """The first resize's values (the square frame's) that K blocks (b, i, j) of low-res
    logits x (B x l x l) read: K x f_rows x f_cols, with torch's arithmetic (columns
    first: the kernel interpolates along a row, then between two rows)."""
    l = x.shape[-1]
    n_rows = int(rows.frame_i1.max()) + 1
    n_cols = int(cols.frame_i1.max()) + 1
    ly = (rows.low_first.index_select(0, i)[:, None] + torch.arange(n_rows, device=x.device)).clamp_max(l - 1)
    lx = (cols.low_first.index_select(0, j)[:, None] + torch.arange(n_cols, device=x.device)).clamp_max(l - 1)
    flat = (b * l * l)[:, None, None] + ly[:, :, None] * l + lx[:, None, :]
    patch = x.reshape(-1).index_select(0, flat.view(-1)).view(flat.shape)  # K x ly x lx
    return _lerp_rows(_lerp_cols(patch, *cols.frame_taps(j)), *rows.frame_taps(i))


def _block_values(x: torch.Tensor, b, i, j, rows: _Axis, cols: _Axis) -> torch.Tensor:
    """The full-size values of K blocks (b, i, j) of low-res logits x (B x l x l):
    K x m_rows x m_cols, through both resizes with torch's arithmetic, one axis at a time."""
    frame = _block_frames(x, b, i, j, rows, cols)
    return _lerp_rows(_lerp_cols(frame, *cols.out_taps(j)), *rows.out_taps(i))


def _lerp_cols(v: torch.Tensor, i0, i1, w0, w1) -> torch.Tensor:
    """K x r x c values, K x n taps into c -> K x r x n."""
    shape = (v.shape[0], v.shape[1], i0.shape[1])
    at = lambda index: v.gather(2, index[:, None, :].expand(shape))  # noqa: E731
    return _fma(at(i0), w0[:, None, :], at(i1) * w1[:, None, :])


def _lerp_rows(v: torch.Tensor, i0, i1, w0, w1) -> torch.Tensor:
    """K x r x c values, K x n taps into r -> K x n x c (whole rows picked by index_select:
    several times faster than an element-wise gather)."""
    k, r, c = v.shape
    rows = v.reshape(k * r, c)
    base = (torch.arange(k, device=v.device) * r)[:, None]

    def at(index):
        return rows.index_select(0, (base + index).view(-1)).view(k, index.shape[1], c)

    return _fma(at(i0), w0[:, :, None], at(i1) * w1[:, :, None])


def _window_max(x: torch.Tensor, ry: int, rx: int) -> torch.Tensor:
    """B x h x w -> the max over each position's (2ry+1) x (2rx+1) window, clipped at the
    borders (shifted views: several times faster than max_pool2d on CPU)."""
    x = F.pad(x, (rx, rx, ry, ry), value=float("-inf"))
    h, w = x.shape[1] - 2 * ry, x.shape[2] - 2 * rx
    rows = x[:, :h]
    for d in range(1, 2 * ry + 1):
        rows = torch.maximum(rows, x[:, d:d + h])
    out = rows[:, :, :w]
    for d in range(1, 2 * rx + 1):
        out = torch.maximum(out, rows[:, :, d:d + w])
    return out


# Full-size pixels of mixed blocks evaluated at once (Blocks.groups): Blocks.exact and
# cell_bound hold ~80 bytes per such pixel. Smooth logits leave a few per cent of the blocks
# mixed, so a filter chunk of the bundled model's candidates is one group; logits as rough as
# noise (untrained weights; the ViT decoders' 256 x 256 low-res masks have ~3 x 3 pixels per
# block at 768 x 1024) leave every block mixed: 36 MB per candidate, and the decode of one
# photo with random ViT-B weights at thresholds 0 / 0 peaked at +15 GB before this bound.
MIXED_PIXELS = 4 * 768 * 1024


@dataclass
class Blocks:
    """ThresholdUpsampler.classify's result for B candidates and T thresholds: above,
    below: T x B x l x l, blocks whose every pixel is above / not above each threshold."""

    upsampler: ThresholdUpsampler
    low_res: torch.Tensor
    thresholds: list[float]
    above: torch.Tensor
    below: torch.Tensor

    def count_bounds(self, which: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """B x len(which) lower and upper bounds of the full-size pixels above the
        thresholds `which` (indices), from the blocks alone."""
        lower = torch.stack([self._pixels(self.above[k]) for k in which], 1)
        upper = torch.stack([self._pixels(~self.below[k]) for k in which], 1)
        return lower.long(), upper.long()

    def groups(self, rows: torch.Tensor, budget: int | None = None) -> list[torch.Tensor]:
        """rows (candidate indices) split in order into groups whose blocks mixed for some
        threshold hold at most `budget` (default MIXED_PIXELS) full-size pixels together (a
        candidate over it on its own), to evaluate with exact() or cell_bound() a group at a
        time."""
        budget = MIXED_PIXELS if budget is None else budget
        mixed = (~(self.above | self.below)).view(torch.uint8).amax(0)  # B x l x l
        pixels = self._pixels(mixed.index_select(0, rows)).tolist()
        out, first, total = [], 0, 0
        for n, count in enumerate(pixels):
            if n > first and total + count > budget:
                out.append(rows[first:n])
                first, total = n, 0
            total += count
        if first < len(pixels) or not out:
            out.append(rows[first:])
        return out

    def exact_groups(self) -> Iterator[tuple[torch.Tensor, "Thresholded"]]:
        """exact() of every candidate, a group (see groups) at a time: (the group's candidate
        indices, its Thresholded)."""
        groups = self.groups(torch.arange(len(self.low_res), device=self.low_res.device))
        for rows in groups:
            yield rows, self.exact(rows if len(groups) > 1 else None)

    def _pixels(self, flags: torch.Tensor) -> torch.Tensor:
        """B x l x l block flags -> B: the full-size pixels of the flagged blocks (summed by
        a matmul in block_areas' dtype, exact)."""
        area = self.upsampler.block_areas
        # bool -> float through uint8: torch's direct bool conversion is ~6x slower on CPU
        return flags.view(torch.uint8).flatten(1).to(area.dtype) @ area

    @torch.no_grad()
    def cell_bound(self, rows: torch.Tensor, k: int, upper: bool) -> torch.Tensor:
        """A tighter bound than count_bounds' on the full-size pixels above thresholds[k] of
        the candidates `rows` (an upper bound, or a lower one), at the resolution of the
        square frame: every full-size pixel is a bilinear interpolation of its 2 x 2 frame
        neighbours, so it lies between their min and max. The blocks mixed for the threshold
        are split into these frame cells (~4 x 4 pixels on a 768 x 1024 image); only their
        few frame values are computed, not the blocks' pixels."""
        up = self.upsampler
        x, above = self.low_res.index_select(0, rows), self.above[k][rows]
        whole = self._pixels(above)
        b, i, j = (~(above | self.below[k][rows]) & (up.area > 0)).nonzero().unbind(1)  # K mixed blocks
        frame = _block_frames(x, b, i, j, up.rows, up.cols)  # K x fr x fc
        t = self.thresholds[k]
        margin = _margin(x)[b][:, None, None]
        cells = _cells(frame > t - margin, every=False) if upper else _cells(frame > t + margin, every=True)
        area = (up.rows.cells.index_select(0, i)[:, :, None].to(whole.dtype)
                * up.cols.cells.index_select(0, j)[:, None, :])  # pixels per cell
        return whole.index_add_(0, b, (cells * area).flatten(1).sum(1)).long()

    @torch.no_grad()
    def exact(self, rows: torch.Tensor | None = None) -> "Thresholded":
        """Evaluate the pixels of the blocks that are neither, for the candidates `rows`
        (default: all); the result is indexed by position in rows."""
        up = self.upsampler
        above, below, x = self.above, self.below, self.low_res
        if rows is not None:
            above, below, x = above[:, rows], below[:, rows], x.index_select(0, rows)
        mixed = ~(above | below)  # T x B x l x l
        b, i, j = (mixed.any(0) & (up.area > 0)).nonzero().unbind(1)  # K blocks
        valid = up.rows.valid.index_select(0, i)[:, :, None] & up.cols.valid.index_select(0, j)[:, None, :]
        values = _block_values(x, b, i, j, up.rows, up.cols).masked_fill_(~valid, float("-inf"))  # padding: never above
        return Thresholded(up, self.thresholds, above, mixed[:, b, i, j], torch.stack([b, i, j]), values, valid)


@dataclass
class Thresholded:
    """Blocks.exact's result for B candidates: above (T x B x l x l) marks blocks wholly
    above each threshold; K blocks (b, i, j), mixed for at least one threshold (mixed:
    T x K, for which), carry their pixels' values (K x my x mx; -inf where padding, valid
    where real)."""

    upsampler: ThresholdUpsampler
    thresholds: list[float]
    above: torch.Tensor
    mixed: torch.Tensor
    blocks: torch.Tensor
    values: torch.Tensor
    valid: torch.Tensor

    def counts(self, which: Sequence[int]) -> torch.Tensor:
        """B x len(which) int64: full-size pixels above the thresholds `which` (indices)."""
        b, i, j = self.blocks
        out = []
        for k in which:
            whole = self.above[k].clone()
            whole[b, i, j] &= ~self.mixed[k]  # blocks mixed for this threshold: pixel by pixel
            counts = (whole * self.upsampler.area).flatten(1).sum(1)
            per_block = (self.values > self.thresholds[k]).flatten(1).sum(1, dtype=torch.int32) * self.mixed[k]
            out.append(counts.index_add_(0, b, per_block.to(counts.dtype)))
        return torch.stack(out, 1)

    def boxes(self, threshold_index: int, rows: torch.Tensor | None = None) -> torch.Tensor:
        """len(rows) x 4 int64 tight XYXY boxes of the full-size masks at
        thresholds[threshold_index] of the candidates `rows` (default: all), as
        amg.masks.masks_to_boxes_xyxy of those masks, without the masks: a pixel row is set
        where a block of its row of blocks is wholly above, or where a mixed block's pixel
        in that row is."""
        up, k = self.upsampler, threshold_index
        b, i, j = self.blocks
        values, mixed, above = self.values, self.mixed[k], self.above[k]
        if rows is not None:
            b, sel = self._select(rows)
            i, j, values, mixed, above = i[sel], j[sel], values[sel], mixed[sel], above[rows]
        whole = (above & (up.area > 0)).view(torch.uint8)  # B x l x l
        # uint8 amax: torch's any() on bool is many times slower on CPU
        set_pixels = ((values > self.thresholds[k]) & mixed[:, None, None]).view(torch.uint8)
        lines = []
        for axis, block, along in ((up.rows, i, 2), (up.cols, j, 1)):
            n = int(axis.nearest.shape[0])
            lines_set = whole.amax(along)[:, axis.nearest].to(torch.int32)  # B x n, from whole blocks
            hits = set_pixels.amax(along).to(torch.int32)  # K x m: which of a block's lines have a set pixel
            pos = axis.start.index_select(0, block)[:, None] + torch.arange(hits.shape[1], device=hits.device)
            flat = (b[:, None] * n + pos).masked_fill_(~axis.valid.index_select(0, block), len(lines_set.view(-1)))
            spare = torch.cat([lines_set.view(-1), lines_set.new_zeros(1)])
            spare.index_put_((flat.view(-1),), hits.view(-1), accumulate=True)
            lines.append(spare[:-1].view(-1, n) > 0)
        return boxes_from_lines(*lines)

    def _select(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The evaluated blocks of the candidates `rows`: their candidates' positions in
        rows, and their indices among the K blocks."""
        b = self.blocks[0]
        remap = torch.full((len(self.above[0]),), -1, dtype=torch.int64, device=b.device)
        remap[rows] = torch.arange(len(rows), device=b.device)
        sel = (remap[b] >= 0).nonzero().squeeze(1)
        return remap[b[sel]], sel

    def masks(self, threshold_index: int, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Full-size masks (len(rows) x H x W bool) at thresholds[threshold_index] of the
        candidates `rows` (default: all)."""
        up = self.upsampler
        above = self.above[threshold_index]
        dev = above.device
        if rows is None:
            rows = torch.arange(len(above), device=dev)
        h, w = up.out_size
        # Whole blocks first: widen the small tensor's rows, then copy whole rows. One spare
        # element at the end takes the writes of the mixed blocks' padding below.
        buffer = torch.empty(len(rows) * h * w + 1, dtype=torch.uint8, device=dev)
        widened = above[rows].view(torch.uint8).index_select(2, up.cols.nearest)
        torch.index_select(widened, 1, up.rows.nearest, out=buffer[:-1].view(len(rows), h, w))
        # Then the pixels of the blocks that are mixed for this threshold.
        b, sel = self._select(rows)
        mixed = self.mixed[threshold_index][sel]
        b, sel = b[mixed], sel[mixed]
        if len(sel):
            i, j = self.blocks[1, sel], self.blocks[2, sel]
            values, valid = self.values[sel], self.valid[sel]
            my, mx = values.shape[1:]
            y = up.rows.start.index_select(0, i)[:, None] + torch.arange(my, device=dev)
            x = up.cols.start.index_select(0, j)[:, None] + torch.arange(mx, device=dev)
            flat = ((b[:, None, None] * h + y[:, :, None]) * w + x[:, None, :]).masked_fill_(~valid, len(buffer) - 1)
            buffer[flat] = (values > self.thresholds[threshold_index]).view(torch.uint8)
        return buffer[:-1].view(len(rows), h, w).view(torch.bool)
