"""Run the annotation service (assisted-manual or semi-automatic stage) and its page.

    python jobs/annotate_service.py --images examples/images --output out/manual
    python jobs/annotate_service.py --images-from out/auto_annotate --output out/semi \\
        --stage semi_auto --prefill dataset --prefill-min-iou 0.92
    python jobs/annotate_service.py --images DIR --output ROOT --stage semi_auto --prefill generator
    python jobs/annotate_service.py --images s3://bucket/images --output s3://bucket/manual \\
        --endpoint-url http://127.0.0.1:9000     # MinIO, Ceph, moto (default: AWS_ENDPOINT_URL)

Serve listens on 127.0.0.1 only (open http://127.0.0.1:PORT/; reach it from elsewhere
through an SSH tunnel). It runs on the Ray cluster that --address, RAY_ADDRESS or a `ray
start` here names, else on an embedded local one (pipeline/cluster.py), until Ctrl-C.
Every "Save & next" commits one image to the output dataset. The images are listed once, at
start, so that an index names the same image on every replica: a source with none (an
empty folder, a wrong path) is refused in one line, exit 2; start it when they are there.
"""
from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jobs.arg_types import round_number  # noqa: E402
from pipeline.cluster import refuse_job_copy_paths  # noqa: E402
from pipeline.sources import InputError  # noqa: E402
from schemas.interactive import EngineConfig  # noqa: E402
from schemas.settings_file import SETTINGS_ERRORS, settings_error_message  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="folder, file, glob, s3:// prefix or .txt manifest of images")
    src.add_argument("--images-from", help="a dataset root: annotate the images it lists")
    ap.add_argument("--output", required=True, help="dataset root the accepted masks go to")
    ap.add_argument("--stage", choices=["manual", "semi_auto"], default="manual")
    ap.add_argument("--round", type=round_number, default=0)
    ap.add_argument("--run-id")
    ap.add_argument("--checkpoint", default=EngineConfig.model_fields["checkpoint"].default)
    ap.add_argument("--model-type")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    ap.add_argument("--prefill", choices=["none", "generator", "dataset"], default="none")
    ap.add_argument("--prefill-from", help="dataset root of --prefill dataset (default: --images-from)")
    ap.add_argument("--prefill-run-id", help="pin the pre-fill dataset to this run")
    ap.add_argument("--prefill-min-iou", type=float, default=0.92)
    ap.add_argument("--cache-mb", type=int, default=512, help="embedding cache per replica")
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--address", help="Ray cluster to use (default: RAY_ADDRESS, a running local cluster, or embedded)")
    ap.add_argument("--endpoint-url", help="S3 endpoint of s3:// images, datasets and checkpoint "
                                           "(default: AWS_ENDPOINT_URL)")
    args = ap.parse_args(argv)
    try:
        refuse_job_copy_paths([("--output", args.output), ("--images", args.images)], ROOT)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        config = EngineConfig(
            images=args.images, images_from=args.images_from, output=args.output, stage=args.stage,
            round=args.round, run_id=args.run_id, checkpoint=args.checkpoint, model_type=args.model_type,
            device=args.device, precision=args.precision, prefill=args.prefill, prefill_from=args.prefill_from,
            prefill_run_id=args.prefill_run_id, prefill_min_iou=args.prefill_min_iou,
            cache_bytes=args.cache_mb << 20, num_replicas=args.replicas, endpoint_url=args.endpoint_url)
    except SETTINGS_ERRORS as e:
        print(settings_error_message(e), file=sys.stderr)
        return 2

    import ray
    from ray import serve

    from engine.images import ImageCatalog
    from engine.service import start
    from pipeline.cluster import connect

    try:
        ImageCatalog.of(config)  # here first: a wrong or empty source is one line, not a failed deployment
    except InputError as e:
        print(f"error: {e} (the service lists its images once, at start: start it when they are there)",
              file=sys.stderr)
        return 2
    # SIGTERM (and SIGINT, which a background shell may ignore) end the service cleanly.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sys.exit(0))
    try:
        connect(args.address, log_to_driver=True)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        url = start(config, port=args.port)
        print(f"annotation page: {url}/  (stage {config.stage}, round {config.round}, output {config.output})",
              flush=True)
        while True:
            time.sleep(3600)
    finally:
        serve.delete("annotate")
        ray.shutdown()


if __name__ == "__main__":
    raise SystemExit(main())
