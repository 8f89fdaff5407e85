"""Export a dataset version as SA-1B JSON, COCO instances JSON, or plain Parquet.

    python jobs/export.py ROOT --to sa1b --dest DIR             # <image_key>.json + image_keys.parquet
    python jobs/export.py ROOT --to coco --dest FILE.json       # class-agnostic instances
    python jobs/export.py ROOT --to parquet --dest DIR --round 2  # for Hugging Face datasets

The version is the latest unless --version, --run-id or --round pins it. dest is local;
missing folders are made. A folder dest (sa1b, parquet) is replaced whole by the new export
once it is complete, and refused when it holds files that are not an earlier export of the
same kind. A COCO dest names the JSON file (a folder is refused). A failed export leaves
dest as it was. A version without images exports to Parquet as one zero-row file that
carries the schema.

Ids in the JSON exports are safe in any JSON reader (all below 2**53, which a double holds
exactly): an image's id is its 48-bit image_key; annotation ids are 1, 2, 3, ... in the order
the version stores its masks (unique in the export, the same for every export of that version,
and shared by its COCO and SA-1B exports), each with the dataset's own int64 id beside it as
the string "samengine_id". A re-import gives back the dataset's ids.

Width, height and masks are those of the image as shown, after its EXIF orientation is
applied (as PIL's ImageOps.exif_transpose does), while file_name names the file as stored:
a loader that ignores EXIF orientation pairs a rotated photo with masks of the wrong shape.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dataset.coco import export_coco  # noqa: E402
from dataset.exports import export_parquet  # noqa: E402
from dataset.reader import DataFileMissing, DatasetNotFound, open_version  # noqa: E402
from dataset.sa1b import export_sa1b  # noqa: E402
from dataset.storage import storage_options  # noqa: E402
from jobs.arg_types import add_version_pin, local_output, version_pin  # noqa: E402
from pipeline.cluster import refuse_job_copy_paths  # noqa: E402
from pipeline.sources import InputError  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", help="dataset root: a folder or an s3:// prefix")
    ap.add_argument("--to", required=True, choices=["sa1b", "coco", "parquet"])
    ap.add_argument("--dest", required=True, type=local_output)
    add_version_pin(ap)
    ap.add_argument("--endpoint-url", help="S3 endpoint (default: AWS_ENDPOINT_URL)")
    args = ap.parse_args(argv)
    try:
        refuse_job_copy_paths([("--dest", args.dest)], ROOT, s3=False)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    options = storage_options(args.root, args.endpoint_url)
    try:
        version = open_version(args.root, **version_pin(args),
                               options=options).version()  # resolved, and it exists
    except DatasetNotFound as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        if args.to == "sa1b":
            n = f"{export_sa1b(args.root, args.dest, version=version, options=options)} images"
        elif args.to == "coco":
            n = f"{export_coco(args.root, args.dest, version=version, options=options)} images"
        else:
            n = f"{len(export_parquet(args.root, args.dest, version=version, options=options))} files"
    except DataFileMissing as e:  # before OSError, of which it is one: the source lost a file
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a destination that cannot be written
        print(f"error: {args.dest}: {e}", file=sys.stderr)
        return 2
    print(f"exported version {version} of {args.root} to {args.dest}: {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
