"""Images per second of the whole machine: our automatic mask generator against the
official one, same weights and images, each side in the process layouts a data engine
would run it in: one process using every core, and one single-threaded process per core.
benchmarks/amg.py times one image in one process and compares the masks; this measures
what a machine's CPUs deliver, which is what annotating millions of images costs.

    python benchmarks/amg_throughput.py                     # bundled checkpoint, one photo
    python benchmarks/amg_throughput.py --images 2 --processes 2

Every process loads the model, warms both generators' one-off set-up up on a small image,
waits at a barrier, then generates every image once; a layout's time runs from the barrier
to the last process's end. The ratio is taken between each side's best layout.
"""
from __future__ import annotations

import argparse
import importlib.util
import multiprocessing as mp
import os
import queue
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from amg import AmgParams, AutomaticMaskGenerator  # noqa: E402
from amg.params import checkpoint_defaults  # noqa: E402
from model import load_checkpoint, read_checkpoint_meta  # noqa: E402
from model.memory import retain_freed_memory  # noqa: E402
from schemas.annotate import DEFAULT_CHECKPOINT  # noqa: E402


def _single_image_benchmark():
    """benchmarks/amg.py as a module (its name is the package's, so by path)."""
    spec = importlib.util.spec_from_file_location("amg_benchmark", ROOT / "benchmarks" / "amg.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _worker(side: str, precision: str, threads: int, args: argparse.Namespace, barrier, results) -> None:
    torch.set_num_threads(threads)
    retain_freed_memory()  # as our workers run; both sides alike
    bench = _single_image_benchmark()
    model, _ = load_checkpoint(args.checkpoint)
    model.eval()
    params = AmgParams(points_per_side=args.points_per_side, output_mode="coco_rle").over(
        checkpoint_defaults(read_checkpoint_meta(args.checkpoint, None)))
    generator = (bench.official_generator(model, params) if side == "official"
                 else AutomaticMaskGenerator(model, params, precision=precision))
    images = [image for _, image in bench.load_images(args.size)[: args.images]]
    warm = np.ascontiguousarray(images[0][::8, ::8])  # one-off set-up (seconds on first calls), cheaply
    generator.generate(warm)
    barrier.wait()
    start = time.perf_counter()  # CLOCK_MONOTONIC: comparable across processes
    masks = sum(len(generator.generate(image)) for image in images)
    results.put((start, time.perf_counter(), masks))


def run_layout(side: str, precision: str, processes: int, threads: int, args: argparse.Namespace
               ) -> tuple[float, float]:
    """Seconds from the barrier to the last process's end, and masks per image."""
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(processes), ctx.Queue()
    workers = [ctx.Process(target=_worker, args=(side, precision, threads, args, barrier, results))
               for _ in range(processes)]
    for w in workers:
        w.start()
    done = []
    while len(done) < processes:
        try:
            done.append(results.get(timeout=5))
        except queue.Empty:
            if any(w.exitcode for w in workers):  # one died: the others would wait at the barrier for ever
                for w in workers:
                    w.terminate()
                raise SystemExit(f"a {side} worker failed (exit codes {[w.exitcode for w in workers]})")
    for w in workers:
        w.join()
    seconds = max(end for _, end, _ in done) - min(start for start, _, _ in done)
    return seconds, done[0][2] / args.images


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    ap.add_argument("--size", default="768x1024", help="HxW every image is resized to ('' keeps them)")
    ap.add_argument("--images", type=int, default=1, help="images each process generates")
    ap.add_argument("--points-per-side", type=int, default=32)
    ap.add_argument("--processes", type=int, default=os.cpu_count() or 1,
                    help="single-threaded processes of the second layout (default: one per CPU)")
    ap.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16"],
                    help="our generator's precision(s); the official one runs in fp32")
    args = ap.parse_args()
    cores = args.processes
    layouts = [(1, cores), (cores, 1)] if cores > 1 else [(1, 1)]
    print(f"{args.images} image(s) of {args.size} per process, {args.points_per_side}x{args.points_per_side} points, "
          f"checkpoint {Path(args.checkpoint).name} with its recommended thresholds, {cores} CPUs")
    best = {}
    for side, precision in [("official", "fp32")] + [("ours", p) for p in args.precision]:
        for processes, threads in layouts:
            seconds, masks = run_layout(side, precision, processes, threads, args)
            rate = processes * args.images / seconds
            print(f"  {side:8s} {precision} {processes} process(es) x {threads} thread(s): {seconds:7.2f} s for "
                  f"{processes * args.images} image(s), {rate:.3f} images/s ({masks:.1f} masks per image)", flush=True)
            best[side, precision] = max(best.get((side, precision), 0.0), rate)
    official = best["official", "fp32"]
    for precision in args.precision:
        ours = best["ours", precision]
        print(f"best layouts: ours {precision} {ours:.3f} images/s, official {official:.3f} images/s: "
              f"x{ours / official:.1f} per machine")


if __name__ == "__main__":
    main()
