"""Storage cost of masks: our Delta table against SA-1B per-image JSON, same masks.

    python benchmarks/dataset_size.py [--images 50] [--masks 60] [--height 480] [--width 640]

Writes synthetic blob masks (dataset.synthetic) as one chunk commit, exports the same
version as SA-1B JSON, and prints bytes per image and per mask of: the Delta data files
(zstd Parquet), the Delta log, the SA-1B JSON files (raw, and gzip -6 as a tar.gz would
hold them), and the bare RLE counts strings (the floor any format pays uncompressed).
"""
from __future__ import annotations

import argparse
import gzip
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dataset import DatasetWriter  # noqa: E402
from dataset.lineage import new_lineage  # noqa: E402
from dataset.sa1b import export_sa1b  # noqa: E402
from dataset.synthetic import image_records  # noqa: E402


def folder_bytes(folder: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in folder.rglob(pattern))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=50)
    ap.add_argument("--masks", type=int, default=60)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=640)
    args = ap.parse_args()

    t0 = time.perf_counter()
    records = image_records(args.images, args.masks, args.height, args.width, seed=0)
    t1 = time.perf_counter()
    n_masks = args.images * args.masks
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "ds"
        DatasetWriter(str(root), new_lineage(round=0, stage="auto")).commit_images(records)
        t2 = time.perf_counter()
        export_sa1b(str(root), Path(tmp) / "sa1b")
        json_files = sorted((Path(tmp) / "sa1b").glob("*.json"))
        sizes = {
            "delta data (zstd parquet)": folder_bytes(root / "annotations", "*.parquet"),
            "delta log": folder_bytes(root / "annotations" / "_delta_log", "*"),
            "SA-1B JSON": sum(p.stat().st_size for p in json_files),
            "SA-1B JSON, gzip -6": sum(len(gzip.compress(p.read_bytes(), 6)) for p in json_files),
            "RLE counts strings only": sum(len(a["segmentation"]["counts"]) for r in records
                                           for a in r["annotations"]),
        }
    print(f"{args.images} images x {args.masks} masks of {args.height}x{args.width} "
          f"(generate {t1 - t0:.1f} s, commit {t2 - t1:.2f} s)")
    print(f"  {'':28s} {'total B':>10s} {'B/image':>10s} {'B/mask':>8s} {'vs JSON':>8s}")
    for name, total in sizes.items():
        print(f"  {name:28s} {total:10d} {total / args.images:10.0f} {total / n_masks:8.1f} "
              f"{total / sizes['SA-1B JSON']:8.2f}")


if __name__ == "__main__":
    main()
