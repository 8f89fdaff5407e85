"""Automatic annotation of a folder of images.

Until the Ray Data pipeline lands this runs the automatic mask generator in-process:
for every image it writes an SA-1B-style JSON file (COCO RLE masks) and an overlay PNG.

    python jobs/auto_annotate.py                      # bundled photos and checkpoint
    python jobs/auto_annotate.py --input DIR --output DIR --checkpoint sam_vit_b.pth --model-type vit_b
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

from amg import AmgParams, AutomaticMaskGenerator  # noqa: E402
from amg.overlay import overlay, record_masks  # noqa: E402
from model import load_checkpoint  # noqa: E402

DEFAULT_INPUT = ROOT / "examples" / "images"
DEFAULT_OUTPUT = ROOT / "out" / "auto_annotate"
DEFAULT_CHECKPOINT = ROOT / "checkpoints" / "samengine_tiny256.pt"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", default=str(DEFAULT_INPUT), help="an image file or a folder of images")
    ap.add_argument("--output", default=str(DEFAULT_OUTPUT), help="output folder")
    ap.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    ap.add_argument("--model-type", default=None, help="config of an official checkpoint (vit_b, vit_l, vit_h)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--convert-to-rle", action="store_true", help="accepted for compatibility: masks are always RLE")
    defaults = AmgParams()
    for name, field in AmgParams.model_fields.items():
        if name in ("point_grids", "output_mode"):
            continue
        kind = int if field.annotation in (int, int | None) else float
        ap.add_argument("--" + name.replace("_", "-"), type=kind, default=getattr(defaults, name),
                        help=field.description)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    fields = {k: getattr(args, k) for k in AmgParams.model_fields if k not in ("point_grids", "output_mode")}
    params = AmgParams(**fields, output_mode="coco_rle")
    model, meta = load_checkpoint(args.checkpoint, model_type=args.model_type, device=args.device)
    generator = AutomaticMaskGenerator(model, params, precision=args.precision)
    src, out = Path(args.input), Path(args.output)
    paths = [src] if src.is_file() else sorted(p for p in src.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    out.mkdir(parents=True, exist_ok=True)
    print(f"annotating {len(paths)} images from {src} into {out} with {args.checkpoint}")
    for path in paths:
        data = path.read_bytes()
        try:
            image = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
        except Exception as e:  # a broken file is reported and skipped, never fatal
            print(f"  {path.name}: skipped, cannot decode ({e})")
            continue
        t = time.perf_counter()
        records = generator.generate(image)
        dt = time.perf_counter() - t
        image_id = hashlib.sha256(data).hexdigest()
        doc = {"image": {"image_id": image_id, "file_name": path.name, "height": image.shape[0],
                         "width": image.shape[1]},
               "annotations": [{"id": i, **r} for i, r in enumerate(records)]}
        (out / f"{path.stem}.json").write_text(json.dumps(doc))
        masks = record_masks(records)
        Image.fromarray(overlay(image, masks)).save(out / f"{path.stem}_overlay.png")
        print(f"  {path.name}: {len(records)} masks in {dt:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
