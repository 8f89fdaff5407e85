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
blocks' pixels themselves (numba, parallel over candidates): the torch version takes a few
dozen passes, gathers and index lists over the batch, ~4x the time, and leaves ~7x more
candidates to the exact evaluation. Other devices run the torch version."""
from __future__ import annotations

import threading

import numpy as np
import torch

from .upsample import ThresholdUpsampler

# The ratio test's slack: float32 rounding of the exact score cannot lift a candidate ruled
# out with it back over the threshold.
SLACK = 1e-6
_KERNEL_LOCK = threading.Lock()


def may_pass(upsampler: ThresholdUpsampler, low_res: torch.Tensor, threshold: float, offset: float,
             thresh: float) -> torch.Tensor:
    """Indices (int64, on low_res' device) of the candidates (low-res logits B x l x l) whose
    stability score at threshold +- offset may reach thresh."""
    if low_res.device.type == "cpu" and offset >= 0:
        return _may_pass_cpu(upsampler, low_res, threshold, offset, thresh)
    return may_pass_torch(upsampler, low_res, threshold, offset, thresh)


def may_pass_torch(upsampler: ThresholdUpsampler, low_res: torch.Tensor, threshold: float, offset: float,
                   thresh: float) -> torch.Tensor:
    """may_pass in torch ops over the whole batch (any device)."""
    blocks = upsampler.classify(low_res, [threshold + offset, threshold - offset])
    lower, upper = blocks.count_bounds([0, 1])  # bounds from the blocks, ...
    maybe = ((upper[:, 1] > 0) & _ratio_may_pass(upper[:, 0], lower[:, 1], thresh)).nonzero().squeeze(1)
    upper_0 = blocks.cell_bound(maybe, 0, upper=True)  # ... then tighter ones from the frame cells
    keep = _ratio_may_pass(upper_0, lower[maybe, 1], thresh)
    maybe, upper_0 = maybe[keep], upper_0[keep]
    return maybe[_ratio_may_pass(upper_0, blocks.cell_bound(maybe, 1, upper=False), thresh)]


def _ratio_may_pass(upper_0: torch.Tensor, lower_1: torch.Tensor, thresh: float) -> torch.Tensor:
    # score = count_0 / count_1 <= upper_0 / lower_1 (NaN when both counts are 0)
    return upper_0.double() >= (thresh - SLACK) * lower_1.double()


def _may_pass_cpu(upsampler: ThresholdUpsampler, low_res: torch.Tensor, threshold: float, offset: float,
                  thresh: float) -> torch.Tensor:
    x = low_res.detach().float().contiguous().numpy()
    rows, cols = upsampler.rows, upsampler.cols
    import numba

    from .stability_kernel import stability_may_pass

    # As many threads as torch's (numba's own count is per calling thread); one call at a
    # time, since numba's fallback threading layer (workqueue) is not safe for concurrent ones.
    # Numba's OpenMP layer sets the OpenMP thread count that torch reads too: put it back.
    threads = torch.get_num_threads()
    with _KERNEL_LOCK:
        try:
            numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
            flags = stability_may_pass(x, threshold + offset, threshold - offset, thresh - SLACK,
                                       *_axis_arrays(rows), *_axis_arrays(cols))
        finally:
            torch.set_num_threads(threads)
    return torch.from_numpy(np.flatnonzero(flags))


def _axis_arrays(axis) -> tuple:
    return (int(axis.radius), axis.size.numpy(), axis.low_first.numpy(), axis.frame_i0.numpy(),
            axis.frame_i1.numpy(), axis.frame_w0.numpy(), axis.frame_w1.numpy(), axis.cells.numpy(),
            axis.out_f0.numpy(), axis.out_f1.numpy(), axis.out_w0.numpy(), axis.out_w1.numpy(), axis.valid.numpy())
