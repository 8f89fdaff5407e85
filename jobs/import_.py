"""Import SA-1B JSON (folders or tar shards) or COCO instances JSON into a dataset.

    python jobs/import_.py ROOT --from sa1b sa_000000.tar sa_000001.tar ...
    python jobs/import_.py ROOT --from coco labels.json --images-dir images/ --stage manual --round 0

Each source is committed in chunks as one run; images already in the dataset are skipped,
and so are quarantine rows already recorded (same source item, same reason), so an
interrupted import can simply be rerun, and a rerun that writes nothing adds no lineage
row. Stage and round of the masks: --stage / --round, when given, set them for every mask;
without the flag a COCO mask keeps its own `stage` / `round` field (our COCO exports carry
them), and masks without one (SA-1B has none) take "imported" and round 0. A record
that cannot be used (its image file missing, unreadable JSON, an empty polygon) goes to the
quarantine table with the reason and the import goes on; COCO annotations whose image_id
names no image of their file are counted in a warning and the summary, not imported. A
source that is missing or not in the format stops the import with exit status 2: every
SA-1B source is checked (it must hold an SA-1B JSON document) before anything is created;
each COCO file is read and checked whole before anything of it is written (files before it
stay committed).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dataset.coco import read_coco  # noqa: E402
from dataset.lineage import new_lineage  # noqa: E402
from dataset.sa1b import read_sa1b_sources  # noqa: E402
from dataset.writer import DatasetWriter  # noqa: E402
from jobs.arg_types import round_number  # noqa: E402
from pipeline.cluster import refuse_job_copy_paths  # noqa: E402
from pipeline.sources import InputError  # noqa: E402

RUN_FIELDS = ("stage", "round")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", help="dataset root: a folder or an s3:// prefix")
    ap.add_argument("sources", nargs="+", help="SA-1B folders / tar shards, or COCO JSON files")
    ap.add_argument("--from", dest="fmt", required=True, choices=["sa1b", "coco"])
    ap.add_argument("--images-dir", help="COCO: folder of the images, to hash those without a sha256 field")
    ap.add_argument("--stage", choices=["manual", "semi_auto", "auto", "imported"],
                    help="stage of every mask (default: a COCO mask's own stage field, else imported)")
    ap.add_argument("--round", type=round_number, help="round of every mask (default: a COCO mask's own round field, else 0)")
    ap.add_argument("--run-id", help="default: a new one")
    ap.add_argument("--chunk-images", type=int, default=1000)
    ap.add_argument("--endpoint-url", help="S3 endpoint (default: AWS_ENDPOINT_URL)")
    args = ap.parse_args(argv)
    try:
        refuse_job_copy_paths([("ROOT", args.root)], ROOT)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    absent = [s for s in args.sources if not Path(s).exists()]
    if absent:
        print(f"error: no such source: {', '.join(absent)}", file=sys.stderr)
        return 2
    lineage = new_lineage(round=0 if args.round is None else args.round, stage=args.stage or "imported",
                          run_id=args.run_id, params={"import": args.fmt, "sources": args.sources})
    from_file = tuple(k for k in RUN_FIELDS if getattr(args, k) is None)  # a flag given wins over the file
    writer, versions, orphans = None, [], 0
    try:
        if args.fmt == "sa1b":
            records = read_sa1b_sources(args.sources)  # every source checked: a bad one, nothing created
            writer = _writer(args.root, lineage, args.endpoint_url)
            versions = writer.commit_all(records, args.chunk_images)
        else:
            for source in args.sources:
                coco = read_coco(source, args.images_dir, from_file=from_file)  # a bad file: nothing created
                if coco.orphans:
                    print(f"warning: {source}: {coco.orphans} annotation(s) name no image of the file: not imported",
                          file=sys.stderr)
                    orphans += coco.orphans
                writer = writer or _writer(args.root, lineage, args.endpoint_url)
                versions += writer.commit_all(coco, args.chunk_images)
    except ValueError as e:  # a source that is not the format (what came before it is committed)
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"run {lineage.run_id}: {len(versions)} commits" + (f", now at version {versions[-1]}" if versions else "")
          + (f"; {writer.skipped} records skipped (their reasons are in the quarantine table)"
             if writer.skipped else "")
          + (f"; {orphans} annotation(s) naming no image of their file not imported" if orphans else ""))
    return 0


def _writer(root: str, lineage, endpoint_url: str | None) -> DatasetWriter:
    """The run's writer; its lineage is recorded with its first write, so a rerun that
    finds every image already in the dataset leaves no trace."""
    writer = DatasetWriter(root, lineage, endpoint_url=endpoint_url)
    writer.start_run(deferred=True)
    return writer


if __name__ == "__main__":
    sys.exit(main())
