"""Check a dataset version and print a report; exit status 1 on any fault, 2 when there is
no such dataset or version.

    python jobs/validate.py ROOT                    # latest version
    python jobs/validate.py ROOT --version 3        # or --run-id ID, or --round R
    python jobs/validate.py s3://bucket/ds --decode # also decode every mask with pycocotools

The checks and fault kinds are listed in dataset/validation.py.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dataset.reader import DatasetNotFound  # noqa: E402
from dataset.storage import storage_options  # noqa: E402
from dataset.validation import validate  # noqa: E402
from jobs.arg_types import add_version_pin, count, version_pin  # noqa: E402
from pipeline.cluster import refuse_job_copy_paths  # noqa: E402
from pipeline.sources import InputError  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", help="dataset root: a folder or an s3:// prefix")
    add_version_pin(ap)
    ap.add_argument("--decode", action="store_true", help="decode every mask with pycocotools too (slow)")
    ap.add_argument("--endpoint-url", help="S3 endpoint (default: AWS_ENDPOINT_URL)")
    ap.add_argument("--examples", type=count, default=5, help="faults listed per kind")
    args = ap.parse_args(argv)
    try:  # ray job submit --working-dir: a relative root names a dataset in Ray's temporary copy
        refuse_job_copy_paths([("ROOT", args.root)], ROOT)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        report = validate(args.root, decode=args.decode, **version_pin(args),
                          options=storage_options(args.root, args.endpoint_url))
    except DatasetNotFound as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.text(args.examples))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
