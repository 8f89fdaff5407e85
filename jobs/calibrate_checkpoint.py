"""Fit a checkpoint's scores to automatic mode: optionally refit its IoU head to rank grid
candidates, then record the generator settings that suit it, chosen on synthetic scenes with
ground truth, and measure them on held-out scenes.

    python jobs/calibrate_checkpoint.py --checkpoint checkpoints/samengine_tiny256.pt \\
        --iou-head-scenes 200 --target-precision 0.5 --eval-scenes 30

The official generator's defaults (pred_iou_thresh 0.88, stability_score_thresh 0.95) suit
the official SAM checkpoints. A small model trained here scores its masks on another scale
(lower predicted IoUs, softer logits, so lower stability), and at those defaults keeps
almost nothing. This job picks the thresholds the way the data engine calibrates its
automatic stage (engine.calibrate: the pair keeping the most masks at precision >=
--target-precision against ground truth, after box NMS) on --scenes synthetic scenes of
--seed (never the training or held-out seeds), whole images at the generator's other
defaults, and writes them into the checkpoint's metadata (amg.CHECKPOINT_DEFAULTS) with
how they were chosen. jobs/auto_annotate.py then uses them
unless a flag or the settings file gives a threshold. Only the thresholds are recorded:
they calibrate the model's score scale; what to spend on crops stays the user's choice.
With --eval-scenes N, held-out automatic metrics at those settings (seed --eval-seed) are
recorded too (eval_automatic_recommended), and the ceiling the model's candidates set on
recall whatever the thresholds or ranking (eval_candidate_ceiling: each instance's best IoU
among every grid candidate, training.automatic_eval.candidate_ceiling).

With --iou-head-scenes N, before choosing thresholds the IoU head (and nothing else) is
regressed on the best mask IoU with any ground-truth instance of every grid candidate of N
scenes of --iou-head-seed (training.iou_head): a head trained on interactive prompts ranks
the candidates of a point grid poorly. Its fit on held-back scenes is recorded (iou_head_fit),
the held-out single-point and default-threshold automatic metrics (eval_single_point,
eval_automatic) move to iou_head_fit.before, and with --eval-scenes are measured again for
the new head. Without it the weights are unchanged.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from amg import AmgParams  # noqa: E402
from amg.params import CHECKPOINT_DEFAULTS  # noqa: E402
from engine.calibrate import calibrate_on_scenes  # noqa: E402
from model import CheckpointError, load_checkpoint, save_checkpoint  # noqa: E402
from jobs.arg_types import count, positive  # noqa: E402
from model.checkpoint import check_checkpoint_path  # noqa: E402
from training.automatic_eval import automatic_metrics, candidate_ceiling, held_out_scenes  # noqa: E402
from training.evaluate import single_point_miou  # noqa: E402
from training.iou_head import fit_iou_head, grid_targets, ranking_quality, split_scenes  # noqa: E402
from dataset.lineage import code_version  # noqa: E402
from pipeline.cluster import refuse_job_copy_paths  # noqa: E402
from pipeline.sources import InputError  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True,
                    help="our checkpoint file (local or s3://), rewritten in place (or --output)")
    ap.add_argument("--output", help="write the calibrated checkpoint here instead (local or s3://)")
    ap.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint (default: AWS_ENDPOINT_URL)")
    ap.add_argument("--target-precision", type=float, default=0.5,
                    help="share of kept masks that must match a ground-truth instance at mask IoU >= 0.5")
    ap.add_argument("--scenes", type=positive, default=30, help="calibration scenes")
    ap.add_argument("--seed", type=count, default=2000003, help="scene stream of the calibration scenes")
    ap.add_argument("--size", type=positive, help="scene side in pixels (default: the model's input size)")
    ap.add_argument("--eval-scenes", type=count, default=0, help="held-out scenes to measure the result on")
    ap.add_argument("--eval-seed", type=count, default=1000003, help="scene stream of the held-out scenes")
    ap.add_argument("--iou-head-scenes", type=count, default=0,
                    help="refit the IoU head on the grid candidates of this many scenes first (0: keep it)")
    ap.add_argument("--iou-head-seed", type=count, default=3000003, help="scene stream of the IoU head's scenes")
    ap.add_argument("--iou-head-steps", type=positive, default=3000, help="optimizer steps of the IoU head fit")
    ap.add_argument("--torch-threads", type=count, default=0, help="0: torch's default")
    args = ap.parse_args(argv)
    if not 0.0 < args.target_precision <= 1.0:
        ap.error("--target-precision must be in (0, 1]")
    if args.seed == args.eval_seed:
        ap.error("--seed must differ from --eval-seed: the held-out scenes must not choose the settings")
    if args.iou_head_scenes and args.iou_head_seed == args.eval_seed:
        ap.error("--iou-head-seed must differ from --eval-seed: the held-out scenes must not train the IoU head")
    if args.iou_head_scenes < 0 or args.iou_head_steps <= 0:
        ap.error("--iou-head-scenes must be >= 0 and --iou-head-steps > 0")
    return args


def refit_iou_head(model, meta: dict, args: argparse.Namespace, size: int, command: str) -> dict:
    """Refit the IoU head in place (training.iou_head); returns what to record."""
    started = time.time()
    data = grid_targets(model, held_out_scenes(args.iou_head_seed, args.iou_head_scenes, size))
    fit, back = split_scenes(data)
    head = model.mask_decoder.iou_prediction_head
    before = ranking_quality(head, back)
    fit_iou_head(head, fit, steps=args.iou_head_steps)
    record = {"scenes": args.iou_head_scenes, "seed": args.iou_head_seed, "size": size, "steps": args.iou_head_steps,
              "prompts": len(data.tokens), "held_back_prompts": len(back.tokens),
              "held_back_before": before, "held_back_after": ranking_quality(head, back),
              "seconds": round(time.time() - started, 1), "command": command, "code_version": code_version()}
    # The head ranks the single-point and automatic candidates: the old metrics no longer
    # describe the file; they are kept here, and measured again with --eval-scenes.
    record["before"] = {k: meta.pop(k) for k in ("eval_single_point", "eval_automatic") if k in meta}
    if args.eval_scenes:
        scenes = list(held_out_scenes(args.eval_seed, args.eval_scenes, size))
        common = {"seed": args.eval_seed, "images": args.eval_scenes, "size": size}
        meta["eval_single_point"] = single_point_miou(model, scenes) | common
        meta["eval_automatic"] = automatic_metrics(model, scenes) | common | {"amg_params": "AmgParams defaults"}
    return record


def main(argv=None) -> int:
    args = parse_args(argv)
    # ray job submit --working-dir: the file written must not lie in Ray's temporary copy;
    # the checkpoint read may (the bundled one) when --output goes elsewhere.
    written = ("--output", args.output) if args.output else ("--checkpoint (rewritten in place)", args.checkpoint)
    try:
        refuse_job_copy_paths([written], ROOT)
        check_checkpoint_path(written[1])
    except (InputError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    from model.checkpoint import checkpoint_problem, local_checkpoint

    try:
        model, meta = load_checkpoint(local_checkpoint(args.checkpoint, args.endpoint_url))
    except (CheckpointError, OSError) as e:
        print(f"error: {checkpoint_problem(args.checkpoint, e)}", file=sys.stderr)
        return 2
    size = args.size or model.image_size
    command = " ".join(["python", "jobs/calibrate_checkpoint.py", *(argv if argv is not None else sys.argv[1:])])
    report = {}
    if args.iou_head_scenes:
        report["iou_head_fit"] = meta["iou_head_fit"] = refit_iou_head(model, meta, args, size, command)
    started = time.time()
    chosen = calibrate_on_scenes(model, held_out_scenes(args.seed, args.scenes, size), AmgParams(),
                                 args.target_precision)
    recommended = {k: chosen[k] for k in ("pred_iou_thresh", "stability_score_thresh")}
    meta[CHECKPOINT_DEFAULTS] = {
        "params": recommended,
        "calibration": chosen | {"seed": args.seed, "scenes": args.scenes, "size": size,
                                 "seconds": round(time.time() - started, 1)},
        "command": command,
        "code_version": code_version(),
    }
    report |= {"recommended": recommended, "calibration": meta[CHECKPOINT_DEFAULTS]["calibration"]}
    if args.eval_scenes:
        metrics = automatic_metrics(model, held_out_scenes(args.eval_seed, args.eval_scenes, size),
                                    AmgParams(output_mode="coco_rle", **recommended))
        meta["eval_automatic_recommended"] = report["eval_automatic_recommended"] = metrics | {
            "seed": args.eval_seed, "images": args.eval_scenes, "size": size, "amg_params": recommended}
        # What any thresholds or ranking could reach with these masks (the IoU head plays no part).
        ceiling = candidate_ceiling(model, held_out_scenes(args.eval_seed, args.eval_scenes, size))
        meta["eval_candidate_ceiling"] = report["eval_candidate_ceiling"] = ceiling | {
            "seed": args.eval_seed, "images": args.eval_scenes, "size": size}
    save_checkpoint(model, args.output or args.checkpoint, meta, args.endpoint_url)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
