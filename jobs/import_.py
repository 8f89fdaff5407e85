"""Import SA-1B JSON (folders or tar shards) or COCO instances JSON into a dataset.

    python jobs/import_.py ROOT --from sa1b sa_000000.tar sa_000001.tar ...
    python jobs/import_.py ROOT --from coco labels.json --images-dir images/ --stage manual --round 0

Each source is committed in chunks as one run, with the stage and round given here; images
already in the dataset are skipped, so an interrupted import can simply be rerun. A record
that cannot be used (its image file missing, unreadable JSON) goes to the quarantine table
with the reason and the import goes on; a source that is missing or not in the format
stops it with exit status 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dataset.coco import import_coco  # noqa: E402
from dataset.lineage import new_lineage  # noqa: E402
from dataset.sa1b import import_sa1b  # noqa: E402
from dataset.writer import DatasetWriter  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", help="dataset root: a folder or an s3:// prefix")
    ap.add_argument("sources", nargs="+", help="SA-1B folders / tar shards, or COCO JSON files")
    ap.add_argument("--from", dest="fmt", required=True, choices=["sa1b", "coco"])
    ap.add_argument("--images-dir", help="COCO: folder of the images, to hash those without a sha256 field")
    ap.add_argument("--stage", default="imported", choices=["manual", "semi_auto", "auto", "imported"])
    ap.add_argument("--round", type=int, default=0)
    ap.add_argument("--run-id", help="default: a new one")
    ap.add_argument("--chunk-images", type=int, default=1000)
    ap.add_argument("--endpoint-url", help="S3 endpoint (default: AWS_ENDPOINT_URL)")
    args = ap.parse_args(argv)
    absent = [s for s in args.sources if not Path(s).exists()]
    if absent:
        print(f"error: no such source: {', '.join(absent)}", file=sys.stderr)
        return 2
    lineage = new_lineage(round=args.round, stage=args.stage, run_id=args.run_id,
                          params={"import": args.fmt, "sources": args.sources})
    writer = DatasetWriter(args.root, lineage, endpoint_url=args.endpoint_url)
    writer.start_run()
    try:
        if args.fmt == "sa1b":
            versions = import_sa1b(args.sources, writer, args.chunk_images)
        else:
            versions = [v for s in args.sources for v in import_coco(s, writer, args.images_dir, args.chunk_images)]
    except ValueError as e:  # a source that is not the format (what came before it is committed)
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"run {lineage.run_id}: {len(versions)} commits" + (f", now at version {versions[-1]}" if versions else "")
          + (f"; {writer.skipped} records skipped (their reasons are in the quarantine table)"
             if writer.skipped else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
