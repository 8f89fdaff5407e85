"""Our automatic mask generator against the official one, same weights, same images,
side by side in one run. Prints wall time per image, the speed-up ratio, peak memory
(RSS growth, sampled) and how the masks match.

    python benchmarks/amg.py                                # bundled checkpoint and photos
    python benchmarks/amg.py --size 768x1024 --points-per-side 32 --precision fp32 bf16
    python benchmarks/amg.py --model-type vit_b --random-weights --stages-only
"""
from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import numpy as np
import os
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amg import AmgParams, AutomaticMaskGenerator, decode_image, encode_image, postprocess  # noqa: E402
from amg.compare import match_records  # noqa: E402
from model import Sam, get_config, load_checkpoint  # noqa: E402

DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "samengine_tiny256.pt"
IMAGES = Path(__file__).resolve().parents[1] / "examples" / "images"


def _rss() -> int:
    with open("/proc/self/statm") as f:  # Linux: pages resident
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    """Peak resident memory growth of this process while the block runs (sampled)."""

    def __enter__(self):
        self.stop = False
        self.base = self.peak = _rss()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.stop:
            self.peak = max(self.peak, _rss())
            time.sleep(0.01)

    def __exit__(self, *exc):
        self.stop = True
        self.thread.join()
        self.mb = (self.peak - self.base) / 2**20


def official_generator(model: Sam, params: AmgParams):
    from segment_anything import SamAutomaticMaskGenerator
    from tests.official import build_official

    official = build_official(model.config)
    official.load_state_dict(model.state_dict())
    return SamAutomaticMaskGenerator(official, **params.model_dump(exclude={"point_grids"}))


def load_images(size: str | None) -> list[tuple[str, np.ndarray]]:
    out = []
    for path in sorted(IMAGES.glob("*.jpg")):
        im = Image.open(path).convert("RGB")
        if size:
            h, w = (int(v) for v in size.split("x"))
            im = im.resize((w, h), Image.BILINEAR)
        out.append((path.stem, np.asarray(im)))
    return out


def timed(fn, *args):
    with PeakRss() as mem:
        t = time.perf_counter()
        out = fn(*args)
        dt = time.perf_counter() - t
    return out, dt, mem.mb


def stage_times(model, image, params, precision):
    """Seconds spent in encode, decode and post-process."""
    t0 = time.perf_counter()
    enc = encode_image(model, image, params, precision)
    t1 = time.perf_counter()
    crops = decode_image(model, enc, params, precision)
    t2 = time.perf_counter()
    postprocess(crops, enc.orig_size, params)
    t3 = time.perf_counter()
    return t1 - t0, t2 - t1, t3 - t2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    ap.add_argument("--model-type", default=None, help="with --random-weights: a config name")
    ap.add_argument("--random-weights", action="store_true", help="no checkpoint (timing only)")
    ap.add_argument("--size", default="768x1024", help="HxW every image is resized to ('' keeps them)")
    ap.add_argument("--images", type=int, default=1)
    ap.add_argument("--points-per-side", type=int, default=32)
    ap.add_argument("--crop-n-layers", type=int, default=0)
    ap.add_argument("--min-mask-region-area", type=int, default=0)
    ap.add_argument("--pred-iou-thresh", type=float, default=0.88)
    ap.add_argument("--stability-score-thresh", type=float, default=0.95)
    ap.add_argument("--precision", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--skip-official", action="store_true")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.random_weights:
        torch.manual_seed(0)
        model = Sam(get_config(args.model_type or "vit_tiny256")).eval()
    else:
        model, _ = load_checkpoint(args.checkpoint, model_type=args.model_type)
    params = AmgParams(points_per_side=args.points_per_side, crop_n_layers=args.crop_n_layers,
                       min_mask_region_area=args.min_mask_region_area, pred_iou_thresh=args.pred_iou_thresh,
                       stability_score_thresh=args.stability_score_thresh, output_mode="coco_rle")
    print(f"model {model.config.name} ({model.image_size}px), {params.points_per_side}x{params.points_per_side} "
          f"points, crop_n_layers={params.crop_n_layers}, min_mask_region_area={params.min_mask_region_area}, "
          f"threads={torch.get_num_threads()}")
    official = None if args.skip_official else official_generator(model, params)
    for name, image in load_images(args.size)[: args.images]:
        print(f"\n{name} {image.shape[0]}x{image.shape[1]}")
        ref = None
        if official is not None:
            ref, t_ref, m_ref = timed(official.generate, image)
            print(f"  official       {t_ref:8.2f} s  peak +{m_ref:7.0f} MB  {len(ref)} masks")
        for precision in args.precision:
            gen = AutomaticMaskGenerator(model, params, precision=precision)
            gen.generate(image)  # warm-up
            out, t, m = timed(gen.generate, image)
            enc, dec, post = stage_times(model, image, params, precision)
            line = (f"  ours {precision:5s}     {t:8.2f} s  peak +{m:7.0f} MB  {len(out)} masks"
                    f"  [encode {enc:.2f} s, decode {dec:.2f} s, post {post:.2f} s]")
            if ref is not None:
                m = match_records(out, ref)
                line += (f"\n      speed-up x{t_ref / t:6.1f}; official masks matched {m['matched']}/{m['theirs']}"
                         f" (min IoU {m['min_iou']:.4f}), equal RLE {m['equal_rle']}, ours unmatched "
                         f"{m['ours'] - m['matched']}")
            print(line)


if __name__ == "__main__":
    main()
