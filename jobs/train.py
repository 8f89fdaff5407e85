"""Train a SAM checkpoint with Ray Train, then measure it on held-out synthetic scenes.

    python jobs/train.py --steps 3000 --output checkpoints/vit_tiny256.pt
    python jobs/train.py --config train.yaml --workers 4 --gpu
    python jobs/train.py --init-checkpoint old.pt --parquet data/annotations --steps 500
    python jobs/train.py --init-checkpoint p16.pt --patch-size 8 --steps 1700   # finer patches
    python jobs/train.py --init-checkpoint s3://models/old.pt --endpoint-url http://minio:9000 \
        --storage s3://runs/train --steps 500

Settings come from TrainConfig's defaults, then --config (YAML or JSON of TrainConfig),
then the flags given. It joins the cluster that RAY_ADDRESS or a `ray start` on this
machine names, else starts an embedded local one (pipeline/cluster.py). Running the same
command again with the same --storage and --name resumes from the run's latest checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# A local Ray cluster started below inherits this, so its workers import our packages too.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))


from pipeline.cluster import connect, refuse_job_copy_paths  # noqa: E402
from pipeline.sources import InputError  # noqa: E402
from model import (  # noqa: E402
    CheckpointError, load_checkpoint, read_checkpoint_config, read_checkpoint_meta, save_checkpoint,
)
from model.checkpoint import check_checkpoint_path, checkpoint_problem, local_checkpoint  # noqa: E402
from training.data import synthetic_example  # noqa: E402
from training.automatic_eval import automatic_metrics, held_out_scenes  # noqa: E402
from training.evaluate import single_point_miou  # noqa: E402
from schemas.settings_file import (  # noqa: E402
    SETTINGS_ERRORS, read_settings_file, settings_error_message, update_section,
)
from training.loop import TrainConfig, parquet_examples, run_training  # noqa: E402

# flag -> TrainConfig field, for the flags that set a field directly.
FIELD_FLAGS = {
    "model_type": str, "init_checkpoint": str, "patch_size": int, "steps": int, "images_per_step": int,
    "masks_per_image": int, "prompt_iterations": int, "mask_only_iterations": int, "lr": float,
    "weight_decay": float, "warmup_steps": int, "decay": str, "seed": int,
    "checkpoint_every": int, "eval_every": int, "log_every": int, "box_probability": float,
    "torch_threads": int,
}
# flag -> TrainConfig field, for on/off switches (--x / --no-x).
SWITCH_FLAGS = ("bf16", "low_res_loss", "vit_init")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML or JSON file of TrainConfig fields")
    for field, kind in FIELD_FLAGS.items():
        parser.add_argument("--" + field.replace("_", "-"), type=kind, default=None)
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast (GPU)")
    parser.add_argument("--low-res-loss", action=argparse.BooleanOptionalAction, default=None,
                        help="focal + dice on the decoder's low-res logits (soft targets); much cheaper on CPU")
    parser.add_argument("--vit-init", action=argparse.BooleanOptionalAction, default=None,
                        help="from scratch: ViT-style encoder init with a sin-cos position embedding")
    parser.add_argument("--synthetic-size", type=int, help="side of the synthetic scenes, px")
    parser.add_argument("--no-synthetic", action="store_true", help="train on --parquet data only")
    parser.add_argument("--parquet", action="append",
                        help="dataset root, Delta table or Parquet file/folder (repeatable)")
    parser.add_argument("--output",
                        help="checkpoint file to write, local or s3:// (default: <storage>/<name>/final.pt)")
    parser.add_argument("--storage", default="runs", help="Ray Train storage path (local folder or s3://; "
                        "S3 credentials from the AWS environment, for Ray Train and the output alike)")
    parser.add_argument("--endpoint-url", help="S3-compatible endpoint of every s3:// path of the run: "
                        "--init-checkpoint, --parquet, --storage, --output (default: AWS_ENDPOINT_URL)")
    parser.add_argument("--name", help="run name under --storage; the same name resumes")
    parser.add_argument("--no-resume", action="store_true", help="start a new run even if one exists")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker")
    parser.add_argument("--eval-images", type=int, default=50, help="held-out scenes for the final evaluation")
    parser.add_argument("--eval-seed", type=int, help="seed of the held-out scenes (must differ from the data seed)")
    parser.add_argument("--amg-eval-images", type=int, default=0,
                        help="held-out scenes for the automatic-mode COCO metrics (AR@100, AR@1000, AP); 0: skip")
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace) -> TrainConfig:
    fields: dict = {}
    if args.config:
        fields = read_settings_file(args.config)
    fields |= {field: getattr(args, field) for field in FIELD_FLAGS if getattr(args, field) is not None}
    fields |= {field: getattr(args, field) for field in SWITCH_FLAGS if getattr(args, field) is not None}
    if fields.get("init_checkpoint") and "://" not in fields["init_checkpoint"]:
        # Ray Train workers run in their own directory: a relative path would not be found.
        fields["init_checkpoint"] = os.path.abspath(fields["init_checkpoint"])
    if args.endpoint_url is not None:
        fields["endpoint_url"] = args.endpoint_url
    if args.eval_seed is not None:
        fields["eval_seed"] = args.eval_seed
    if args.no_synthetic:
        fields["synthetic"] = None
    elif args.synthetic_size is not None:
        update_section(fields, "synthetic", {"size": args.synthetic_size})
    if args.parquet:
        update_section(fields, "parquet", {"paths": args.parquet})
    return TrainConfig(**fields)


def init_lineage(path: str, endpoint_url: str | None = None) -> dict:
    """Where a fine-tuned model's starting weights came from: the starting file's own
    command, steps, training time and code version (and its starting file's, if any), so
    that the whole chain of runs can be repeated and its total cost is known."""
    parent = read_checkpoint_meta(local_checkpoint(path, endpoint_url))
    keys = ("command", "steps", "train_seconds", "train_seconds_total", "code_version", "init_checkpoint")
    return {"path": path} | {key: parent[key] for key in keys if key in parent}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = build_config(args)
    except SETTINGS_ERRORS as e:
        print(settings_error_message(e), file=sys.stderr)
        return 2
    try:  # ray job submit --working-dir: the runs would be written into Ray's temporary copy
        refuse_job_copy_paths([("--storage", args.storage), ("--output", args.output)], ROOT)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:  # refuse unusable inputs here, not in every worker after Ray Train started
        # The default output lies under --storage, which Ray Train may also take as gs:// etc.
        check_checkpoint_path(args.output or f"{args.storage.rstrip('/')}/run/final.pt")
        parquet_examples(cfg)
        if cfg.init_checkpoint:  # as the workers load it (an s3:// file is fetched once a node)
            try:
                read_checkpoint_config(local_checkpoint(cfg.init_checkpoint, cfg.endpoint_url))
            except CheckpointError as e:
                raise CheckpointError(checkpoint_problem(cfg.init_checkpoint, e)) from e
    except (ValueError, OSError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        connect(None)
    except InputError as e:  # RAY_ADDRESS names a cluster that does not answer
        print(f"error: {e}", file=sys.stderr)
        return 2
    started = time.time()
    path, metrics = run_training(
        cfg, args.storage, num_workers=args.workers, use_gpu=args.gpu, resume=not args.no_resume,
        name=args.name, output=args.output,
    )
    wall_seconds = time.time() - started
    if cfg.torch_threads:  # the evaluation below runs in this process
        import torch

        torch.set_num_threads(cfg.torch_threads)
    model, meta = load_checkpoint(local_checkpoint(path, cfg.endpoint_url))
    size = cfg.synthetic.size if cfg.synthetic else model.image_size
    scenes = (synthetic_example(cfg.eval_seed, i, size) for i in range(args.eval_images))
    evaluation = single_point_miou(model, scenes) | {"seed": cfg.eval_seed, "images": args.eval_images, "size": size}
    meta["eval_single_point"] = evaluation
    report = {"checkpoint": path, "train": {k: v for k, v in metrics.items() if k != "history"},
              "eval_single_point": evaluation}
    if args.amg_eval_images:
        automatic = automatic_metrics(model, held_out_scenes(cfg.eval_seed, args.amg_eval_images, size))
        meta["eval_automatic"] = report["eval_automatic"] = automatic | {
            "seed": cfg.eval_seed, "images": args.amg_eval_images, "size": size, "amg_params": "AmgParams defaults",
        }
    # How the file was made: the command line as given, and the training wall time.
    meta["command"] = " ".join(["python", "jobs/train.py", *(argv if argv is not None else sys.argv[1:])])
    history = metrics.get("history", [])
    meta["train_seconds"] = report["train_seconds"] = float(sum(row["seconds"] for row in history))
    meta["wall_seconds_this_invocation"] = report["wall_seconds_this_invocation"] = wall_seconds
    if cfg.init_checkpoint:
        meta["init_checkpoint"] = parent = init_lineage(cfg.init_checkpoint, cfg.endpoint_url)
        meta["train_seconds_total"] = report["train_seconds_total"] = meta["train_seconds"] + (
            parent.get("train_seconds_total") or parent.get("train_seconds") or 0.0)
    save_checkpoint(model, path, meta, cfg.endpoint_url)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
