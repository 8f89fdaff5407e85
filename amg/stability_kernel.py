"""The CPU kernel of amg.stability_bounds: one compiled pass per candidate (numba, parallel
over candidates). Imported on first use; numba caches the compiled code beside this file
(or in its user-wide cache where this folder is read-only)."""
from __future__ import annotations

import numba
import numpy as np


@numba.njit(nogil=True, cache=True)
def _window_extrema(v, ry, rx, col_max, col_min, hi, neg_lo):
    """Max and -min of v (l x l) over each position's (2ry+1) x (2rx+1) window, clipped at
    the borders, into hi and neg_lo (l x l); col_max, col_min (l) are scratch. Per output
    row: the extrema over its window's rows, then over shifts along the row, in loops over
    contiguous rows with comparisons and selects only (which the compiler vectorizes)."""
    l = v.shape[0]
    for i in range(l):
        first, last = max(i - ry, 0), min(i + ry, l - 1)
        for j in range(l):
            col_max[j] = v[first, j]
            col_min[j] = v[first, j]
        for r in range(first + 1, last + 1):
            for j in range(l):
                a = v[r, j]
                col_max[j] = a if a > col_max[j] else col_max[j]
                col_min[j] = a if a < col_min[j] else col_min[j]
        row_hi, row_lo = hi[i], neg_lo[i]
        for j in range(l):
            row_hi[j] = col_max[j]
            row_lo[j] = col_min[j]
        for e in range(1, rx + 1):
            for j in range(l - e):  # the neighbour e to the right, then to the left
                row_hi[j] = col_max[j + e] if col_max[j + e] > row_hi[j] else row_hi[j]
                row_lo[j] = col_min[j + e] if col_min[j + e] < row_lo[j] else row_lo[j]
            for j in range(e, l):
                row_hi[j] = col_max[j - e] if col_max[j - e] > row_hi[j] else row_hi[j]
                row_lo[j] = col_min[j - e] if col_min[j - e] < row_lo[j] else row_lo[j]
        for j in range(l):
            row_lo[j] = -row_lo[j]


@numba.njit(nogil=True, cache=True)
def _frame(v, i, j, first_r, i0_r, i1_r, w0_r, w1_r, first_c, i0_c, i1_c, w0_c, w1_c, lerped, out):
    """The square frame's values that block (i, j) reads (fr x fc, into out): along rows,
    then between two rows; lerped (low-res rows x fc) is scratch."""
    l = v.shape[0]
    fr, fc = out.shape
    r_first = first_r[i]
    n_rows = min(lerped.shape[0], l - r_first)
    for rr in range(n_rows):
        row = r_first + rr
        for c in range(fc):
            c0 = min(first_c[j] + i0_c[j, c], l - 1)
            c1 = min(first_c[j] + i1_c[j, c], l - 1)
            lerped[rr, c] = v[row, c0] * w0_c[j, c] + v[row, c1] * w1_c[j, c]
    for a in range(fr):
        r0 = min(i0_r[i, a], n_rows - 1)
        r1 = min(i1_r[i, a], n_rows - 1)
        for c in range(fc):
            out[a, c] = lerped[r0, c] * w0_r[i, a] + lerped[r1, c] * w1_r[i, a]


@numba.njit(nogil=True, cache=True)
def _cell_pixels(frame, cells_r_i, cells_c_j, t, upper):
    """Pixels of one mixed block bounded by its frame cells: upper=True, those of the cells
    any of whose 2 x 2 frame values is above t; else those whose every value is."""
    fr, fc = frame.shape
    total = 0
    for a in range(fr):
        if cells_r_i[a] == 0:
            continue
        a1 = min(a + 1, fr - 1)
        for c in range(fc):
            if cells_c_j[c] == 0:
                continue
            c1 = min(c + 1, fc - 1)
            p, q, r, s = frame[a, c], frame[a, c1], frame[a1, c], frame[a1, c1]
            if upper:
                hit = p > t or q > t or r > t or s > t
            else:
                hit = p > t and q > t and r > t and s > t
            if hit:
                total += cells_r_i[a] * cells_c_j[c]
    return total


@numba.njit(nogil=True, cache=True)
def _block_pixels(frame, f0_r, f1_r, w0_r, w1_r, valid_r, f0_c, f1_c, w0_c, w1_c, valid_c, t, lerped):
    """Pixels of one mixed block above t, evaluated from its frame values (along rows, then
    between two rows, as the exact evaluation does); lerped (fr x m_c) is scratch."""
    fr = frame.shape[0]
    mc = f0_c.shape[0]
    for a in range(fr):
        for c in range(mc):
            lerped[a, c] = frame[a, f0_c[c]] * w0_c[c] + frame[a, f1_c[c]] * w1_c[c]
    total = 0
    for y in range(f0_r.shape[0]):
        if not valid_r[y]:
            continue
        r0, r1, u0, u1 = f0_r[y], f1_r[y], w0_r[y], w1_r[y]
        for c in range(mc):
            if valid_c[c] and lerped[r0, c] * u0 + lerped[r1, c] * u1 > t:
                total += 1
    return total


@numba.njit(nogil=True, cache=True)
def _ceil32(d):
    """The least float32 >= d (float64): for a float32 x, x >= d and x < d compare the same
    against it, in float32 arithmetic, which vectorizes twice as wide."""
    f = np.float32(d)
    if np.float64(f) < d:
        f = np.float32(np.nextafter(f, np.float32(np.inf)))
    return np.float32(f)


@numba.njit(nogil=True, cache=True)
def _margin(v, top, nans):
    """amg.upsample._margin of one candidate, in the same float32 arithmetic: 1e-4 (1 + max |v|),
    NaN where v has a NaN. top (float32) and nans (int32), v's row length, are scratch:
    column-wise maxima and counts first (elementwise, vectorized), one short reduction last."""
    for j in range(v.shape[1]):
        top[j] = 0
        nans[j] = 0
    for i in range(v.shape[0]):
        for j in range(v.shape[1]):
            a = abs(v[i, j])
            nans[j] += a != a
            top[j] = a if a > top[j] else top[j]
    if nans.sum():
        return np.nan
    return np.float64(np.float32(1e-4) * (np.float32(1.0) + top.max()))


@numba.njit(parallel=True, nogil=True, cache=True)
def stability_may_pass(x, t0, t1, ratio,
                       ry, size_r, first_r, i0_r, i1_r, w0_r, w1_r, cells_r, of0_r, of1_r, ow0_r, ow1_r, valid_r,
                       rx, size_c, first_c, i0_c, i1_c, w0_c, w1_c, cells_c, of0_c, of1_c, ow0_c, ow1_c, valid_c):
    """x: B x l x l float32 low-res logits. Per candidate: may count(> t0) / count(> t1)
    over its full-size pixels reach ratio? (bounds as in amg.stability_bounds, with t0 >= t1;
    the axis tables are amg.upsample._Axis'.) A candidate with NaN logits may (its exact
    evaluation decides)."""
    n, l = x.shape[0], x.shape[1]
    fr, fc = i0_r.shape[1], i0_c.shape[1]
    low_rows = int(i1_r.max()) + 1
    out = np.zeros(n, dtype=np.bool_)
    for b in numba.prange(n):
        v = x[b]
        col_max = np.empty(l, dtype=np.float32)
        col_min = np.empty(l, dtype=np.float32)
        nans = np.empty(l, dtype=np.int32)
        m = _margin(v, col_max, nans)
        if m != m:
            out[b] = True
            continue
        hi = np.empty((l, l), dtype=np.float32)
        neg_lo = np.empty((l, l), dtype=np.float32)
        _window_extrema(v, ry, rx, col_max, col_min, hi, neg_lo)
        # Bounds at three levels, each an upper bound of count(> t0), then a lower bound of
        # count(> t1): whole blocks alone (both in one pass), then also the frame cells of
        # the mixed blocks, then their pixels. Each level's bounds are tighter than the
        # last's; the earlier ones only save work. The score needs count(> t0) > 0
        # (thresholds are positive).
        below0 = _ceil32(t0 - m)  # float32 limits, the same outcomes for float32 values
        above0 = _ceil32(-(t0 + m))
        above1 = _ceil32(-(t1 + m))
        upper0 = 0  # pixels of the blocks not wholly below t0
        lower1 = 0  # ... wholly above t1
        whole0 = 0  # ... wholly above t0
        for i in range(l):
            row_hi, row_lo = hi[i], neg_lo[i]
            cols0 = 0
            cols1 = 0
            cols2 = 0
            for j in range(l):
                cols0 += size_c[j] if row_hi[j] >= below0 else 0
                cols1 += size_c[j] if row_lo[j] < above1 else 0
                cols2 += size_c[j] if row_lo[j] < above0 else 0
            upper0 += size_r[i] * cols0
            lower1 += size_r[i] * cols1
            whole0 += size_r[i] * cols2
        if not (upper0 > 0 and upper0 >= ratio * lower1):
            continue
        whole1 = lower1
        # The blocks mixed for each threshold (neither wholly above nor wholly below it),
        # listed once: the levels below visit only these.
        below1 = _ceil32(t1 - m)
        mixed = np.empty((2, l * l), dtype=np.int32)
        n_mixed = np.zeros(2, dtype=np.int64)
        for i in range(l):
            if size_r[i] == 0:
                continue
            for j in range(l):
                if size_c[j] == 0:
                    continue
                if hi[i, j] >= below0 and not neg_lo[i, j] < above0:
                    mixed[0, n_mixed[0]] = i * l + j
                    n_mixed[0] += 1
                if hi[i, j] >= below1 and not neg_lo[i, j] < above1:
                    mixed[1, n_mixed[1]] = i * l + j
                    n_mixed[1] += 1
        frame = np.empty((fr, fc), dtype=np.float32)
        lerped = np.empty((low_rows, fc), dtype=np.float32)
        lerped_pixels = np.empty((fr, of0_c.shape[1]), dtype=np.float32)
        may = True
        for level in range(1, 3):
            for k in range(2):  # the count above t0, then above t1: often the first rules it out
                bound = t0 - m if k == 0 else t1 + m
                total = whole0 if k == 0 else whole1
                for q in range(n_mixed[k]):
                    i, j = divmod(mixed[k, q], l)
                    _frame(v, i, j, first_r, i0_r, i1_r, w0_r, w1_r, first_c, i0_c, i1_c, w0_c, w1_c, lerped, frame)
                    if level == 1:
                        total += _cell_pixels(frame, cells_r[i], cells_c[j], bound, k == 0)
                    else:
                        total += _block_pixels(frame, of0_r[i], of1_r[i], ow0_r[i], ow1_r[i], valid_r[i],
                                               of0_c[j], of1_c[j], ow0_c[j], ow1_c[j], valid_c[j], bound,
                                               lerped_pixels)
                if k == 0:
                    upper0 = total
                else:
                    lower1 = total
                if not (upper0 > 0 and upper0 >= ratio * lower1):
                    may = False
                    break
            if not may:
                break
        out[b] = may
    return out
