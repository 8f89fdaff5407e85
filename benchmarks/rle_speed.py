"""Micro-benchmark: COCO RLE of a batch of masks, ours against the official generator's.

    python benchmarks/rle_speed.py [--n 200] [--height 768] [--width 1024] [--device cuda]

Ours: `masks_to_rle_counts` (one device pass, one copy to the host) + `rle_to_coco` (one
pycocotools call). Official: `mask_to_rle_pytorch` (one host copy per mask) +
`coco_encode_rle` per mask. Prints the median wall time of each and their ratio.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from amg.rle import masks_to_rle_counts, rle_to_coco  # noqa: E402


def blob_masks(n: int, h: int, w: int, device: str) -> torch.Tensor:
    """n x h x w bool masks with blobs of varied coverage, like SAM candidates."""
    gen = torch.Generator().manual_seed(0)
    coarse = torch.randn(n, 1, h // 32 + 2, w // 32 + 2, generator=gen)
    noise = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[:, 0]
    levels = torch.linspace(-1.5, 1.5, n)[:, None, None]
    return (noise > levels).to(device)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_seconds(fn, device: str, repeats: int) -> float:
    fn()  # warm-up: allocator, CUDA kernels
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--height", type=int, default=768)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from segment_anything.utils.amg import coco_encode_rle, mask_to_rle_pytorch

    masks = blob_masks(args.n, args.height, args.width, args.device)
    size = (args.height, args.width)

    def ours():
        return rle_to_coco(masks_to_rle_counts(masks), size)

    def official():
        return [coco_encode_rle(r) for r in mask_to_rle_pytorch(masks)]

    assert ours() == official(), "encodings differ"
    ours_s = median_seconds(ours, args.device, args.repeats)
    official_s = median_seconds(official, args.device, args.repeats)
    print(f"{args.n} masks of {args.height}x{args.width} on {args.device} "
          f"({torch.get_num_threads()} CPU threads)")
    print(f"  ours     {ours_s * 1e3:9.1f} ms")
    print(f"  official {official_s * 1e3:9.1f} ms")
    print(f"  official / ours = {official_s / ours_s:.1f}x")


if __name__ == "__main__":
    main()
