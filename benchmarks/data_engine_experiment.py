"""Experiment (not CI): several data-engine rounds on synthetic scenes, held-out metrics per round.

    python benchmarks/data_engine_experiment.py --rounds 3 --images-per-round 16 --steps 200
    python benchmarks/data_engine_experiment.py --root out/engine_exp --results-json benchmarks/results/experiments/engine.json

Round 0 starts from --checkpoint (default: the bundled one), or, with --seed-images N, from a
weak checkpoint trained from scratch (--seed-steps) on the ground truth of N scenes of their
own seed: the small manual seed set the paper's engine starts from. A ground-truth annotator
outlines --manual-images scenes of each of the first --manual-rounds rounds (the manual
seed set); the automatic stage annotates the rest of every round's scenes. Each round
fine-tunes the incumbent on all annotations so far, and the gate keeps the better of the
two on the held-out scenes. It prints, per round, the incumbent's and the candidate's
held-out metrics (single-point mIoU, COCO AR@100/AR@1000/AP of automatic masks, automatic
masks per held-out image) and the automatic stage's masks per image. Rerunning the same
command resumes; a new --root starts over.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

from engine.round_stages import ground_truth_manual  # noqa: E402
from engine.rounds import RoundsConfig, run_rounds, write_json  # noqa: E402
from schemas.annotate import DEFAULT_CHECKPOINT  # noqa: E402

METRICS = ("miou", "AR100", "AR1000", "AP", "masks_per_image")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=str(ROOT / "out" / "data_engine_experiment"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    ap.add_argument("--seed-images", type=int, default=0,
                    help="train checkpoint 0 from scratch on the ground truth of this many scenes (0: use --checkpoint)")
    ap.add_argument("--seed-steps", type=int, default=600, help="training steps of the seed checkpoint")
    ap.add_argument("--images-per-round", type=int, default=16)
    ap.add_argument("--size", type=int, default=256, help="side of the synthetic scenes")
    ap.add_argument("--manual-images", type=int, default=4, help="ground-truth images per manual round")
    ap.add_argument("--manual-rounds", type=int, default=1, help="rounds with a manual stage (the first ones)")
    ap.add_argument("--steps", type=int, default=200, help="training steps per round")
    ap.add_argument("--images-per-step", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--synthetic-fraction", type=float, default=0.0,
                    help="share of synthetic ground truth in training (0: the engine's data only)")
    ap.add_argument("--held-out", type=int, default=16, help="held-out scenes")
    ap.add_argument("--points-per-side", type=int, default=8, help="automatic stage and automatic evaluation")
    ap.add_argument("--pred-iou-thresh", type=float, default=0.0, help="the automatic stage's filter")
    ap.add_argument("--stability-score-thresh", type=float, default=0.0, help="the automatic stage's filter")
    ap.add_argument("--auto-precision", type=float, default=None,
                    help="calibrate the automatic stage's two thresholds each round to this precision on the "
                         "round's ground-truth-annotated scenes (RoundsConfig.auto_precision)")
    ap.add_argument("--eval-pred-iou-thresh", type=float, default=0.0, help="the held-out automatic metrics' filter")
    ap.add_argument("--eval-stability-score-thresh", type=float, default=0.0,
                    help="the held-out automatic metrics' filter")
    ap.add_argument("--promote-metric", default="AR100")
    ap.add_argument("--promote-margin", type=float, default=0.0)
    ap.add_argument("--results-json", help="write the per-round table here too")
    ap.add_argument("--address", default="local", help="Ray address (default: a private local Ray)")
    return ap.parse_args(argv)


def experiment_config(args: argparse.Namespace) -> RoundsConfig:
    amg = {"points_per_side": args.points_per_side, "pred_iou_thresh": args.pred_iou_thresh,
           "stability_score_thresh": args.stability_score_thresh}
    eval_amg = amg | {"pred_iou_thresh": args.eval_pred_iou_thresh,
                      "stability_score_thresh": args.eval_stability_score_thresh}
    return RoundsConfig(
        root=args.root, rounds=args.rounds, initial_checkpoint=args.checkpoint,
        stages=["manual", "auto"] if args.manual_rounds and args.manual_images else ["auto"],
        synthetic_inputs={"images_per_round": args.images_per_round, "size": args.size},
        annotate_args=[f"--{k.replace('_', '-')}={v}" for k, v in amg.items()],
        train_steps=args.steps,
        train={"images_per_step": args.images_per_step, "masks_per_image": 8, "prompt_iterations": 2,
               "mask_only_iterations": 1, "lr": args.lr, "warmup_steps": max(1, args.steps // 10),
               "log_every": max(1, args.steps // 10), "checkpoint_every": max(1, args.steps // 2)},
        synthetic_fraction=args.synthetic_fraction,
        held_out={"count": args.held_out, "size": args.size, "amg": eval_amg},
        promote_metric=args.promote_metric, promote_margin=args.promote_margin, name="experiment",
        auto_precision=args.auto_precision,
    )


SEED_SET_SEED = 7002  # the manual seed set's scenes; rounds draw from SyntheticInputs.seed (7001)


def seed_checkpoint(args: argparse.Namespace) -> str:
    """Checkpoint 0 trained from scratch on the ground truth of --seed-images scenes, at
    <root>/seed/checkpoint.pt (kept: a rerun reuses it; an interrupted run resumes)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from PIL import Image

    from dataset.synthetic import encode_masks
    from training.loop import ParquetSource, TrainConfig, run_training
    from training.synthetic import make_scene, scene_seed

    folder = Path(args.root) / "seed"
    output = folder / "checkpoint.pt"
    if output.exists():
        return str(output)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(args.seed_images):
        scene = make_scene(scene_seed(SEED_SET_SEED, index), args.size)
        path = folder / "images" / f"scene_{SEED_SET_SEED}_{index:06d}.png"
        Image.fromarray(scene.image).save(path)
        rows.append({"uri": str(path), "annotations": [{"segmentation": rle, "area": int(m.sum())}
                                                       for rle, m in zip(encode_masks(scene.masks), scene.masks)]})
    pq.write_table(pa.Table.from_pylist(rows), folder / "seed_set.parquet")
    cfg = TrainConfig(steps=args.seed_steps, images_per_step=args.images_per_step, masks_per_image=8,
                      prompt_iterations=2, low_res_loss=True, lr=2e-3, warmup_steps=max(1, args.seed_steps // 10),
                      torch_threads=1, synthetic=None, log_every=max(1, args.seed_steps // 10),
                      checkpoint_every=max(1, args.seed_steps // 4),
                      parquet=ParquetSource(paths=[str(folder / "seed_set.parquet")], fraction=1.0))
    path, _ = run_training(cfg, str(folder / "runs"), name="seed", output=str(output))
    return path


def manual_seed(images: int, rounds: int):
    """The ground-truth annotator, in the first `rounds` rounds only."""
    annotate = ground_truth_manual(images)

    def hook(ctx):
        return annotate(ctx) if ctx.round < rounds else {"skipped": True}

    return hook


def table(records: list[dict]) -> list[dict]:
    rows = []
    for rec in records:
        calibration = rec["stages"]["auto"].get("calibration") or {}
        row = {"round": rec["round"], "promoted": rec["promoted"], "images": rec["images"],
               "auto_masks_per_image": _ratio(rec["stages"]["auto"]["masks"], rec["stages"]["auto"]["images"]),
               "auto_pred_iou_thresh": calibration.get("pred_iou_thresh"),
               "auto_stability_score_thresh": calibration.get("stability_score_thresh"),
               "calibration_precision": calibration.get("precision"),
               "train_seconds": rec["stage_seconds"]["train"], "seconds": rec["seconds"]}
        row |= {f"{k}": rec["metrics"].get(k) for k in METRICS}
        row |= {f"candidate_{k}": rec["candidate_metrics"].get(k) for k in METRICS}
        rows.append(row)
    return rows


def _ratio(a: float, b: float) -> float:
    return a / b if b else 0.0


def _fmt(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def main(argv=None) -> int:
    args = parse_args(argv)
    config = experiment_config(args)
    import ray

    if not ray.is_initialized():
        ray.init(address=args.address, log_to_driver=False, include_dashboard=False)
    started = time.perf_counter()
    if args.seed_images:
        args.checkpoint = config.initial_checkpoint = seed_checkpoint(args)
    hooks = {"manual": manual_seed(args.manual_images, args.manual_rounds)} if "manual" in config.stages else {}
    records = run_rounds(config, hooks)
    rows = table(records)
    columns = list(rows[0]) if rows else []
    print("\n" + " | ".join(columns))
    for row in rows:
        print(" | ".join(_fmt(row[c]) for c in columns))
    print(f"held-out: {args.held_out} synthetic scenes of seed {config.held_out.seed}, {args.size} px; "
          f"metrics = incumbent checkpoint of each round; wall {time.perf_counter() - started:.0f} s this invocation")
    if args.results_json:
        write_json(Path(args.results_json), {"args": vars(args), "rounds": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
