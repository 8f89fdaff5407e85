"""Scheduled dataset rebuild: incremental (only objects new or changed at the source) or
full (re-annotate everything with a new checkpoint or parameters). Idempotent: run it as
often as you like; a run with nothing to do writes nothing.

    python jobs/rebuild.py --input s3://bucket/images --output s3://bucket/dataset
    python jobs/rebuild.py --full --checkpoint new.pt --input ... --output ...
    ray job submit --working-dir . -- python jobs/rebuild.py --input ... --output ...

Every other flag is that of jobs/auto_annotate.py (generator, actors, --config, ...).
From cron:  0 3 * * *  cd /srv/samengine && RAY_AUTH_MODE=token ray job submit \\
                --address http://127.0.0.1:8265 --working-dir . -- python jobs/rebuild.py ...
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jobs.arg_types import hours  # noqa: E402
from jobs.auto_annotate import job_copy_paths, load_config  # noqa: E402
from schemas.settings_file import SETTINGS_ERRORS, settings_error_message  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 add_help=False)
    ap.add_argument("--full", action="store_true", help="re-annotate every input (new checkpoint or parameters)")
    ap.add_argument("--prune-deleted", action="store_true", help="drop records of objects gone from the source")
    ap.add_argument("--retention-hours", type=hours, help="afterwards, vacuum files older versions no longer need")
    ap.add_argument("-h", "--help", action="store_true")
    args, rest = ap.parse_known_args(argv)
    if args.help:
        ap.print_help()
        print("\nand every flag of jobs/auto_annotate.py (python jobs/auto_annotate.py --help)")
        return 0
    try:
        config = load_config(rest)
    except SETTINGS_ERRORS as e:
        print(settings_error_message(e), file=sys.stderr)
        return 2
    from pipeline.cluster import check_device, connect, refuse_job_copy_paths
    from pipeline.lease import check_free
    from pipeline.rebuild import rebuild
    from pipeline.sources import InputError, check_output

    try:
        # Under ray job submit a rebuild from the copy's sample images would, on the next
        # submission of changed code (another copy), see every image as deleted and new.
        refuse_job_copy_paths([("--input" if "input" in config.model_fields_set else "the default --input",
                                config.input), *job_copy_paths(config).items()], ROOT)
        check_output(config.output, config.endpoint_url)
        check_free(config.output, config.endpoint_url)  # before starting Ray; rebuild takes the lease
        check_device(config.device, connect(config.ray_address))
        report = rebuild(config, full=args.full, prune_deleted=args.prune_deleted,
                         retention_hours=args.retention_hours)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
