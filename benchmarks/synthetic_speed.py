"""Throughput of the synthetic scene generator on one CPU core.

    python benchmarks/synthetic_speed.py [--count 300] [--size 256]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from training.synthetic import make_scenes  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()

    next(make_scenes(0, 1, args.size))  # warm up imports and caches
    start = time.perf_counter()
    instances = [len(scene.names) for scene in make_scenes(1, args.count, args.size)]
    seconds = time.perf_counter() - start
    print(
        f"{args.count} scenes of {args.size}x{args.size} in {seconds:.2f} s: "
        f"{args.count / seconds:.0f} scenes/s, "
        f"instances per scene mean {np.mean(instances):.1f} (min {min(instances)}, max {max(instances)})"
    )


if __name__ == "__main__":
    main()
