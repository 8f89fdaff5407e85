"""The CPU kernel of amg.stability_bounds: one compiled pass per candidate (numba, parallel
over candidates). Imported on first use; numba caches the compiled code beside this file
(or in its user-wide cache where this folder is read-only)."""
from __future__ import annotations

import numba
import numpy as np


@numba.njit(nogil=True, cache=True)
def _window_extrema(v, ry, rx, padded, rows, hi, neg_lo):
    """Max and -min of v (l x l) over each position's (2ry+1) x (2rx+1) window, clipped at
    the borders, into hi and neg_lo (l x l): padded ((l+2ry) x (l+2rx), padding -inf),
    rows (l x (l+2rx)) are scratch. Rows, then columns, in loops over contiguous rows."""
    l = v.shape[0]
    cols = l + 2 * rx
    for sign in (1.0, -1.0):
        out = hi if sign > 0 else neg_lo
        for i in range(l):
            for j in range(l):
                padded[i + ry, j + rx] = sign * v[i, j]
        for i in range(l):
            for j in range(cols):
                rows[i, j] = padded[i, j]
            for d in range(1, 2 * ry + 1):
                for j in range(cols):
                    rows[i, j] = max(rows[i, j], padded[i + d, j])
        for i in range(l):
            for j in range(l):
                out[i, j] = rows[i, j]
            for e in range(1, 2 * rx + 1):
                for j in range(l):
                    out[i, j] = max(out[i, j], rows[i, j + e])


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


@numba.njit(parallel=True, nogil=True, cache=True)
def stability_may_pass(x, margins, t0, t1, ratio,
                       ry, size_r, first_r, i0_r, i1_r, w0_r, w1_r, cells_r, of0_r, of1_r, ow0_r, ow1_r, valid_r,
                       rx, size_c, first_c, i0_c, i1_c, w0_c, w1_c, cells_c, of0_c, of1_c, ow0_c, ow1_c, valid_c):
    """x: B x l x l float32 low-res logits, margins: B. Per candidate: may count(> t0) /
    count(> t1) over its full-size pixels reach ratio? (bounds as in amg.stability_bounds;
    the axis tables are amg.upsample._Axis'.) A candidate with NaN logits may (its exact
    evaluation decides)."""
    n, l = x.shape[0], x.shape[1]
    fr, fc = i0_r.shape[1], i0_c.shape[1]
    low_rows = int(i1_r.max()) + 1
    out = np.zeros(n, dtype=np.bool_)
    for b in numba.prange(n):
        m = margins[b]
        if m != m:
            out[b] = True
            continue
        v = x[b]
        padded = np.full((l + 2 * ry, l + 2 * rx), -np.inf, dtype=np.float32)
        rows = np.empty((l, l + 2 * rx), dtype=np.float32)
        hi = np.empty((l, l), dtype=np.float32)
        neg_lo = np.empty((l, l), dtype=np.float32)
        _window_extrema(v, ry, rx, padded, rows, hi, neg_lo)
        # Bounds at three levels, each an upper bound of count(> t0), then a lower bound of
        # count(> t1): whole blocks alone, then also the frame cells of the mixed blocks, then
        # their pixels. The score needs count(> t0) > 0 (thresholds are positive).
        frame = np.empty((fr, fc), dtype=np.float32)
        lerped = np.empty((low_rows, fc), dtype=np.float32)
        lerped_pixels = np.empty((fr, of0_c.shape[1]), dtype=np.float32)
        upper0 = 0
        lower1 = 0
        may = True
        for level in range(3):
            for k in range(2):
                t = t0 if k == 0 else t1
                bound = t - m if k == 0 else t + m
                total = 0
                for i in range(l):
                    if size_r[i] == 0:
                        continue
                    for j in range(l):
                        area = size_r[i] * size_c[j]
                        if area == 0 or hi[i, j] < t - m:  # none, or wholly below
                            continue
                        if -neg_lo[i, j] > t + m:  # wholly above
                            total += area
                        elif level == 0:  # mixed: all of it may be above, none surely is
                            total += area if k == 0 else 0
                        else:
                            _frame(v, i, j, first_r, i0_r, i1_r, w0_r, w1_r, first_c, i0_c, i1_c, w0_c, w1_c,
                                   lerped, frame)
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
