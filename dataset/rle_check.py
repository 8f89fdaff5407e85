"""The per-mask RLE checks of dataset.validation over a whole batch of masks in one compiled
pass (numba): each compressed counts string is parsed with the bounds of
validation.rle_counts, its runs checked, encoded again as pycocotools would and compared, and
its area and bbox computed as pycocotools' `area` and `toBbox` compute them. Imported on
first use; numba caches the compiled code beside this file (or in its user-wide cache)."""
from __future__ import annotations

import numba
import numpy as np


@numba.njit(nogil=True, cache=True)
def _parse(data, start, end, runs, max_groups, max_run):
    """Runs of the counts string data[start:end] into runs; their number, or -1 where the
    string is malformed (validation._rle_counts_loop's rules and bounds, byte by byte: a
    non-ASCII character is bytes outside the 64 allowed, as its character is)."""
    n = 0
    value = 0
    groups = 0
    for p in range(start, end):
        c = np.int64(data[p]) - 48
        if c < 0 or c >= 64:
            return -1
        value |= (c & 0x1F) << (5 * groups)
        groups += 1
        if c & 0x20:
            if groups == max_groups:
                return -1
            continue
        if c & 0x10:
            value -= np.int64(1) << (5 * groups)
        if abs(value) > max_run:
            return -1
        if n > 2:
            value += runs[n - 2]
        runs[n] = value
        n += 1
        value = 0
        groups = 0
    if groups:
        return -1  # the last count was cut off mid-way
    return n


@numba.njit(nogil=True, cache=True)
def _canonical(data, start, end, runs, n):
    """Whether data[start:end] is the string pycocotools writes for runs[:n] (rleToString)."""
    p = start
    for i in range(n):
        x = runs[i]
        if i > 2:
            x -= runs[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            if more:
                c |= 0x20
            if p >= end or data[p] != c + 48:
                return False
            p += 1
    return p == end


@numba.njit(nogil=True, cache=True)
def check_counts(data, offsets, heights, widths, area, bbox, max_groups, max_run):
    """data, offsets: a batch's counts strings as Arrow holds them (bytes, and M + 1 int64
    offsets); heights, widths: M int64 (the size each mask must have); max_groups, max_run:
    validation.rle_counts' bounds. Per mask, ok (M bool): the string parses within those
    bounds, its runs sum to height x width with every run after the
    first positive, and it is the canonical string of those runs; for those, area (M int64)
    and bbox (M x 4 int64 XYWH) as pycocotools computes them."""
    m = len(heights)
    ok = np.zeros(m, dtype=np.bool_)
    longest = 0
    for k in range(m):
        longest = max(longest, offsets[k + 1] - offsets[k])
    runs = np.empty(longest + 1, dtype=np.int64)
    for k in range(m):
        start, end = offsets[k], offsets[k + 1]
        h, w = heights[k], widths[k]
        n = _parse(data, start, end, runs, max_groups, max_run)
        if n < 0 or h < 0 or w < 0 or h * w >= 2**31:
            continue
        total = 0
        ones = 0
        positive = n == 0 or runs[0] >= 0
        for i in range(n):
            total += runs[i]
            if i % 2 == 1:
                ones += runs[i]
            if i > 0 and runs[i] <= 0:
                positive = False
        if not positive or total != h * w or not _canonical(data, start, end, runs, n):
            continue
        ok[k] = True
        area[k] = ones
        # pycocotools' rleToBbox: over the first 2 * (n // 2) runs, the first and last pixel of
        # each run of ones (column-major), a run that crosses a column spanning all rows.
        pairs = (n // 2) * 2
        if pairs == 0:
            bbox[k, 0] = bbox[k, 1] = bbox[k, 2] = bbox[k, 3] = 0
            continue
        xs, ys, xe, ye = w, h, 0, 0
        cc = 0
        xp = 0
        for j in range(pairs):
            cc += runs[j]
            t = cc - j % 2
            y = t % h
            x = (t - y) // h
            if j % 2 == 0:
                xp = x
            elif xp < x:
                ys = 0
                ye = h - 1
            xs = min(xs, x)
            xe = max(xe, x)
            ys = min(ys, y)
            ye = max(ye, y)
        bbox[k, 0] = xs
        bbox[k, 1] = ys
        bbox[k, 2] = xe - xs + 1
        bbox[k, 3] = ye - ys + 1
    return ok
