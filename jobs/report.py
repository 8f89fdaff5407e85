"""Write the data-quality report of a dataset version: one self-contained HTML page.

    python jobs/report.py ROOT                       # latest version -> ROOT/reports/version-N.html
    python jobs/report.py ROOT --version 3           # or --run-id ID, or --round R
    python jobs/report.py s3://bucket/ds --out report.html

What the page shows and how each figure is computed (and sampled) is written on the page;
the code is in dashboards/.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dashboards import write_report  # noqa: E402
from dashboards.report import DestinationError  # noqa: E402
from dataset.reader import DataFileMissing, DatasetNotFound  # noqa: E402
from jobs.arg_types import add_version_pin, count, local_output, version_pin  # noqa: E402
from pipeline.cluster import refuse_job_copy_paths  # noqa: E402
from pipeline.sources import InputError  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", help="dataset root: a folder or an s3:// prefix")
    add_version_pin(ap)
    ap.add_argument("--out", type=local_output, help="local HTML file to write, missing folders made "
                                   "(default: <root>/reports/version-<N>.html)")
    ap.add_argument("--endpoint-url", help="S3 endpoint (default: AWS_ENDPOINT_URL)")
    ap.add_argument("--sample-images", type=count, default=64, help="random images for concavity and the gallery")
    ap.add_argument("--concavity-masks", type=count, default=1000, help="most masks decoded for concavity")
    ap.add_argument("--gallery", type=count, default=8, help="images shown in the gallery")
    args = ap.parse_args(argv)
    destination = ("--out", args.out) if args.out else ("the dataset root (where its report goes)", args.root)
    try:
        refuse_job_copy_paths([destination], ROOT, s3=args.out is None)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        path = write_report(args.root, out=args.out, **version_pin(args),
                            endpoint_url=args.endpoint_url, sample_images=args.sample_images,
                            max_concavity_masks=args.concavity_masks, gallery_images=args.gallery)
    except (DatasetNotFound, DataFileMissing) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except DestinationError as e:
        print(f"error: {args.out}: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the dataset's storage (missing bucket, unreachable endpoint, ...)
        print(f"error: {args.root}: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
