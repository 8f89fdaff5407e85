"""The pipeline against a plain in-process loop over the same images, side by side, and the
pipeline's peak memory at N and 10N images (it streams, so memory must stay flat).

    python benchmarks/pipeline.py --images 8 --points-per-side 8

Memory is sampled every 0.2 s: the driver's RSS, and the summed RSS of every process of the
local Ray cluster (raylet, workers, actors). Timings on a shared 2-core machine are noisy;
compare the ratios of one run.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from PIL import Image  # noqa: E402


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _descendants(root: int) -> list[int]:
    """Process ids under root (from /proc/*/stat parent links)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    found, frontier = [], [root]
    while frontier:
        kids = [p for p, pp in parents.items() if pp in frontier]
        found += kids
        frontier = kids
    return found


class PeakMemory:
    """Peak RSS of this process and of all its descendants (the embedded Ray cluster)."""

    def __init__(self, interval: float = 0.2):
        self.interval, self.driver, self.cluster = interval, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        me = os.getpid()
        while not self._stop.is_set():
            mine = _rss(me)
            self.driver = max(self.driver, mine)
            self.cluster = max(self.cluster, mine + sum(_rss(p) for p in _descendants(me)))
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def make_images(folder: Path, n: int, size: tuple[int, int]) -> list[Path]:
    from training.synthetic import make_scene

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"scene{i:05d}.jpg"
        Image.fromarray(make_scene(seed=1000 + i, size=size).image).save(p, quality=92)
        paths.append(p)
    return paths


def in_process(paths: list[Path], amg_args: list[str]) -> float:
    """Seconds for a plain loop: read, decode, generate, one image at a time."""
    import torch

    from amg import AutomaticMaskGenerator
    from jobs.auto_annotate import load_config
    from model import load_checkpoint
    from pipeline.images import decode_image

    torch.set_num_threads(2)
    config = load_config(amg_args)
    model, _ = load_checkpoint(config.checkpoint)
    generator = AutomaticMaskGenerator(model, config.amg)
    t = time.perf_counter()
    for p in paths:
        generator.generate(decode_image(p.read_bytes()))
    return time.perf_counter() - t


def pipeline(folder: Path, out: Path, amg_args: list[str], extra: list[str]) -> tuple[float, dict, PeakMemory]:
    from jobs.auto_annotate import load_config
    from pipeline.graph import run

    config = load_config(["--input", str(folder), "--output", str(out), *amg_args, *extra])
    with PeakMemory() as mem:
        t = time.perf_counter()
        summary = run(config, log=lambda *a: None)
        seconds = time.perf_counter() - t
    return seconds, summary, mem


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=8, help="N (the memory check also runs 10N)")
    ap.add_argument("--size", type=int, nargs=2, default=(384, 512), metavar=("H", "W"))
    ap.add_argument("--points-per-side", default="8")
    ap.add_argument("--no-10n", action="store_true", help="skip the 10N memory run")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    import ray

    amg_args = ["--points-per-side", args.points_per_side, "--pred-iou-thresh", "0", "--stability-score-thresh", "0"]
    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    try:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        small = make_images(work / "n", args.images, tuple(args.size))
        loop_s = in_process(small, amg_args)
        results = {"images": args.images, "size": args.size, "points_per_side": int(args.points_per_side),
                   "loop_images_per_s": args.images / loop_s}
        for mode, extra in (("fused", ["--fuse-stages"]),
                            ("split", ["--split-stages", "--cpus-per-actor", "0.5"])):
            s, summary, mem = pipeline(work / "n", work / f"out-{mode}", amg_args, extra)
            assert summary["annotated"] == args.images, summary
            results[mode] = {"seconds": s, "images_per_s": args.images / s, "ratio_vs_loop": loop_s / s,
                             "driver_peak_rss_mb": mem.driver / 2**20, "cluster_peak_rss_mb": mem.cluster / 2**20,
                             "stage_images_per_s": summary["stage_images_per_s"]}
        if not args.no_10n:
            make_images(work / "n10", 10 * args.images, tuple(args.size))
            s, summary, mem = pipeline(work / "n10", work / "out-10n", amg_args, ["--fuse-stages"])
            results["fused_10n"] = {"seconds": s, "images_per_s": 10 * args.images / s,
                                    "driver_peak_rss_mb": mem.driver / 2**20, "cluster_peak_rss_mb": mem.cluster / 2**20}
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"{args.images} images {args.size[0]}x{args.size[1]}, {args.points_per_side}x{args.points_per_side} points")
    print(f"  in-process loop : {results['loop_images_per_s']:.3f} images/s")
    for mode in ("fused", "split"):
        r = results[mode]
        print(f"  pipeline {mode:6s}: {r['images_per_s']:.3f} images/s ({r['ratio_vs_loop']:.2f}x the loop), "
              f"peak RSS driver {r['driver_peak_rss_mb']:.0f} MB, cluster {r['cluster_peak_rss_mb']:.0f} MB")
    if "fused_10n" in results:
        r, r1 = results["fused_10n"], results["fused"]
        print(f"  pipeline fused at 10N: {r['images_per_s']:.3f} images/s, peak RSS driver {r['driver_peak_rss_mb']:.0f} MB "
              f"({r['driver_peak_rss_mb'] / r1['driver_peak_rss_mb']:.2f}x N), cluster {r['cluster_peak_rss_mb']:.0f} MB "
              f"({r['cluster_peak_rss_mb'] / r1['cluster_peak_rss_mb']:.2f}x N)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
