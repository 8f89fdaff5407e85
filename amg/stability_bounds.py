"""Which candidates may pass the stability filter, decided from bounds on their pixel counts
before the exact evaluation (see amg.upsample for the blocks and frame cells).

The stability score is count(> t + offset) / count(> t - offset) over the full-size pixels.
A candidate is ruled out when an upper bound of the first count is below thresh times a
lower bound of the second: first from whole blocks (each block's pixels lie between the min
and max of the low-res window around it), then from the square frame's cells of the blocks
that are mixed (each pixel lies between its 2 x 2 frame neighbours). The bounds carry a
margin far outside float rounding, so they hold whatever order the arithmetic takes, and the
candidates that remain are evaluated exactly (Blocks.exact).

On the CPU one compiled pass per candidate does all of it and one level more, the mixed
blocks' pixels themselves (amg/stability_kernel.c, parallel over candidates on torch's
threads): the torch version takes a few dozen passes, gathers and index lists over the batch,
~4x the time, and leaves ~7x more candidates to the exact evaluation. Other devices, and CPUs
where native kernels are off or no C compiler is found (model/native.py), run the torch
version."""
from __future__ import annotations

import ctypes
import logging
from pathlib import Path

import torch

from model import native

from .upsample import ThresholdUpsampler

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("stability_kernel.c")

# The ratio test's slack: float32 rounding of the exact score cannot lift a candidate ruled
# out with it back over the threshold.
SLACK = 1e-6


def may_pass(upsampler: ThresholdUpsampler, low_res: torch.Tensor, threshold: float, offset: float,
             thresh: float) -> torch.Tensor:
    """Indices (int64, on low_res' device) of the candidates (low-res logits B x l x l) whose
    stability score at threshold +- offset may reach thresh."""
    lib = kernel() if low_res.device.type == "cpu" and offset >= 0 else None
    if lib is not None:
        return _may_pass_cpu(lib, upsampler, low_res, threshold, offset, thresh)
    return may_pass_torch(upsampler, low_res, threshold, offset, thresh)


def may_pass_torch(upsampler: ThresholdUpsampler, low_res: torch.Tensor, threshold: float, offset: float,
                   thresh: float) -> torch.Tensor:
    """may_pass in torch ops over the whole batch (any device)."""
    blocks = upsampler.classify(low_res, [threshold + offset, threshold - offset])
    lower, upper = blocks.count_bounds([0, 1])  # bounds from the blocks, ...
    maybe = ((upper[:, 1] > 0) & _ratio_may_pass(upper[:, 0], lower[:, 1], thresh)).nonzero().squeeze(1)
    kept = []
    for group in blocks.groups(maybe):  # ... then tighter ones from the frame cells
        upper_0 = blocks.cell_bound(group, 0, upper=True)
        keep = _ratio_may_pass(upper_0, lower[group, 1], thresh)
        group, upper_0 = group[keep], upper_0[keep]
        kept.append(group[_ratio_may_pass(upper_0, blocks.cell_bound(group, 1, upper=False), thresh)])
    return torch.cat(kept)


def _ratio_may_pass(upper_0: torch.Tensor, lower_1: torch.Tensor, thresh: float) -> torch.Tensor:
    # score = count_0 / count_1 <= upper_0 / lower_1 (NaN when both counts are 0)
    return upper_0.double() >= (thresh - SLACK) * lower_1.double()


# amg.upsample._Axis' tables in the order of stability_kernel.c's axis_t
_TABLES = ("size", "low_first", "frame_i0", "frame_i1", "cells", "out_f0", "out_f1", "frame_w0", "frame_w1",
           "out_w0", "out_w1", "valid")


class _AxisTables(ctypes.Structure):
    """One axis as stability_kernel.c's axis_t reads it: radius, frame positions f and output
    positions m per block, then pointers to the tables."""
    _fields_ = [(name, ctypes.c_int64) for name in ("radius", "f", "m")] + [(name, ctypes.c_void_p) for name in _TABLES]


def _axis_tables(axis) -> tuple[_AxisTables, list[torch.Tensor]]:
    """The axis' tables for the kernel, and the tensors they point into (keep them alive)."""
    tensors = [getattr(axis, name).contiguous() for name in _TABLES]
    kinds = [t.dtype for t in tensors]
    if kinds != [torch.int64] * 7 + [torch.float32] * 4 + [torch.bool]:
        raise TypeError(f"unexpected axis table types {kinds}")
    tables = _AxisTables(axis.radius, axis.frame_i0.shape[1], axis.out_f0.shape[1], *(t.data_ptr() for t in tensors))
    return tables, tensors


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    p = ctypes.c_void_p
    lib.stability_may_pass.argtypes = [ctypes.c_int, p, ctypes.c_long, ctypes.c_int, ctypes.c_double,
                                       ctypes.c_double, ctypes.c_double, p, p, p]
    lib.stability_may_pass.restype = ctypes.c_int
    lib.window_extrema.argtypes = [p, ctypes.c_int, ctypes.c_int, ctypes.c_int, p, p, p, p]
    lib.window_extrema.restype = None
    return lib


def kernel() -> ctypes.CDLL | None:
    """The compiled kernel (amg/stability_kernel.c), or None where native kernels are off or
    cannot be built."""
    return LIBRARY.get()


LIBRARY = native.Library(SOURCE, _bind, "the stability bounds' kernel", log)


def _may_pass_cpu(lib: ctypes.CDLL, upsampler: ThresholdUpsampler, low_res: torch.Tensor, threshold: float,
                  offset: float, thresh: float) -> torch.Tensor:
    x = low_res.detach().float().contiguous()
    blocks = (len(upsampler.rows.size), len(upsampler.cols.size))
    if x.dim() != 3 or tuple(x.shape[1:]) != blocks or blocks[0] != blocks[1]:  # the kernel reads l x l
        raise ValueError(f"low-res logits {tuple(x.shape)} do not fit the upsampler's {blocks[0]} x {blocks[1]} blocks")
    n, l = x.shape[0], x.shape[1]
    rows, keep_rows = _axis_tables(upsampler.rows)
    cols, keep_cols = _axis_tables(upsampler.cols)
    out = torch.zeros(n, dtype=torch.uint8)
    threads = max(1, min(torch.get_num_threads(), n))  # a build without OpenMP runs on one
    failed = lib.stability_may_pass(threads, x.data_ptr(), n, l, threshold + offset, threshold - offset,
                                    thresh - SLACK, ctypes.byref(rows), ctypes.byref(cols), out.data_ptr())
    if failed:
        raise MemoryError("the stability bounds' kernel could not allocate its scratch")
    return out.nonzero().squeeze(1)
