"""Semi-automatic stage through Label Studio: tasks out with pre-annotations, finished tasks in.

    python jobs/label_studio.py export AUTO_ROOT DIR [--min-iou 0.92] [--run-id RUN]
        [--local-files-root FOLDER]     # tasks.json + label_config.xml for a Label Studio project
    python jobs/label_studio.py import EXPORT.json ROOT --round R [--run-id RUN]
        # a Label Studio JSON export (local or s3://) -> dataset ROOT, stage semi_auto

A dataset root, and the export read by import, may be s3:// URIs; --endpoint-url (default:
AWS_ENDPOINT_URL) names an S3-compatible store (MinIO, Ceph, moto), as for the other jobs.

Pre-annotations are the masks of the dataset version (an automatic run) whose predicted
IoU is at least --min-iou, as brush labels in Label Studio's RLE. Images are referenced by
their uri, or under Label Studio's local file serving with --local-files-root (the folder
Label Studio's LOCAL_FILES_DOCUMENT_ROOT points at).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dataset import DataFileMissing, DatasetNotFound, iter_images, storage_options  # noqa: E402
from dataset.lineage import new_lineage  # noqa: E402
from dataset.storage import store_error  # noqa: E402
from jobs.arg_types import local_output, round_number  # noqa: E402
from pipeline.cluster import refuse_job_copy_paths  # noqa: E402
from pipeline.sources import InputError, read_bytes  # noqa: E402
from engine.semi_auto import confident, export_tasks, import_tasks, local_files_url, write_project  # noqa: E402

# The export is parsed whole in memory; a larger file is refused (ReadError too_large_file).
EXPORT_MAX_BYTES = 8 << 30


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    out = sub.add_parser("export")
    out.add_argument("root", help="dataset root holding the automatic run")
    out.add_argument("dest", type=local_output, help="local folder for tasks.json and label_config.xml")
    out.add_argument("--min-iou", type=float, default=0.92)
    out.add_argument("--run-id", help="pin the dataset to this run's last version")
    out.add_argument("--local-files-root")
    out.add_argument("--endpoint-url", help="S3 endpoint (default: AWS_ENDPOINT_URL)")
    back = sub.add_parser("import")
    back.add_argument("export", help="Label Studio JSON export of the finished tasks (local or s3://)")
    back.add_argument("root", help="dataset root to commit into (stage semi_auto)")
    back.add_argument("--round", type=round_number, required=True)
    back.add_argument("--run-id")
    back.add_argument("--endpoint-url", help="S3 endpoint (default: AWS_ENDPOINT_URL)")
    args = ap.parse_args(argv)
    try:
        refuse_job_copy_paths([("DEST", args.dest) if args.command == "export" else ("ROOT", args.root)], ROOT,
                              s3=args.command != "export")
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    options = storage_options(args.root, args.endpoint_url)

    if args.command == "export":
        try:
            images = [{**im, "annotations": confident(im["annotations"], args.min_iou)}
                      for im in iter_images(args.root, run_id=args.run_id, options=options)]
        except (DatasetNotFound, DataFileMissing) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        url = local_files_url(args.local_files_root) if args.local_files_root else (lambda uri: uri)
        tasks = export_tasks(images, model_version=args.run_id or "", image_url=url)
        tasks_path, config_path = write_project(args.dest, tasks)
        n = sum(len(im["annotations"]) for im in images)
        print(f"{len(tasks)} tasks, {n} pre-annotations: {tasks_path}, labeling config {config_path}")
    else:
        lineage = new_lineage(round=args.round, stage="semi_auto", run_id=args.run_id,
                              params={"source": "label_studio", "export": str(args.export)})
        try:
            tasks = json.loads(read_bytes(args.export, max_bytes=EXPORT_MAX_BYTES, endpoint_url=args.endpoint_url))
        except (OSError, ValueError) as e:  # unreadable (ReadError), or not UTF-8 JSON (a ValueError)
            print(f"error: {args.export}: {e}", file=sys.stderr)
            return 2
        try:
            summary = import_tasks(tasks, args.root, lineage, options=options)
        except OSError as e:  # the dataset's store: a missing bucket, an unreachable endpoint
            print(f"error: cannot write the dataset at {args.root}: {store_error(e)}", file=sys.stderr)
            return 2
        except ValueError as e:  # results we cannot read
            print(f"error: {args.export}: {e}", file=sys.stderr)
            return 2
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
