"""Measured peak memory of one generator worker against the estimate its pipeline actor
reserves (model.footprint), model by model. Each measurement runs in a fresh process (its peak
RSS, VmHWM, as a worker keeps it: model.memory.retain_freed_memory) at one thread, with every
candidate kept (thresholds 0 / 0, the worst case), coco_rle output, as the actors run.

    python benchmarks/footprint.py                               # the bundled checkpoint
    python benchmarks/footprint.py --models bundled vit_b --size 768x1024
    python benchmarks/footprint.py --models vit_h --encoder-only  # the encoder's peak alone

Prints measured and estimated GiB and their ratio; an estimate under the measurement (ratio
below 1) means actors can be packed past what a node holds: fix model.footprint.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PHOTO = ROOT / "examples" / "images" / "astronaut.jpg"

WORKER = r"""
import json, resource, sys
import numpy as np, torch
from PIL import Image
from amg import AutomaticMaskGenerator
from model import Sam, get_config, load_checkpoint
from model.memory import retain_freed_memory
from schemas.annotate import DEFAULT_CHECKPOINT
name, width, height, points, encoder_only = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), \
    sys.argv[5] == "1"
torch.set_num_threads(1)
retain_freed_memory()
model = (load_checkpoint(DEFAULT_CHECKPOINT)[0] if name == "bundled" else Sam(get_config(name))).eval()
image = np.asarray(Image.open(sys.argv[6]).convert("RGB").resize((width, height)))
with torch.inference_mode():
    if encoder_only:
        n = model.image_encoder.img_size
        model.image_encoder(torch.zeros(1, 3, n, n))
        masks = 0
    else:
        masks = len(AutomaticMaskGenerator(model, points_per_side=points, pred_iou_thresh=0.0,
                                           stability_score_thresh=0.0, output_mode="coco_rle").generate(image))
try:  # this process's own peak: Linux's ru_maxrss also counts the parent's RSS at the fork
    peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
except (OSError, StopIteration):
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
print(json.dumps({"peak": peak, "masks": masks,
                  "config": model.config.model_dump(mode="json")}))
"""


def measure(name: str, width: int, height: int, points: int, encoder_only: bool) -> dict:
    out = subprocess.run([sys.executable, "-c", WORKER, name, str(width), str(height), str(points),
                          "1" if encoder_only else "0", str(PHOTO)],
                         cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    from model.config import SamConfig
    from model.footprint import GIB, worker_bytes

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["bundled"], help="bundled, or a config name (random weights)")
    ap.add_argument("--size", default="1024x768", help="WIDTHxHEIGHT of the photo")
    ap.add_argument("--points-per-side", type=int, default=32)
    ap.add_argument("--encoder-only", action="store_true", help="the image encoder's peak alone (fast for vit_h)")
    args = ap.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))
    role = "encoder" if args.encoder_only else "fused"
    print(f"{'model':<12} {'masks':>6} {'measured GiB':>13} {'estimate GiB':>13} {'ratio':>6}")
    for name in args.models:
        got = measure(name, width, height, args.points_per_side, args.encoder_only)
        estimate = worker_bytes(SamConfig(**got["config"]), role, args.points_per_side ** 2)
        print(f"{name:<12} {got['masks']:>6} {got['peak'] / GIB:>13.2f} {estimate / GIB:>13.2f} "
              f"{estimate / got['peak']:>6.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
