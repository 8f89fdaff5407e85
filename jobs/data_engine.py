"""The data engine: rounds of annotate -> train -> evaluate -> promote (engine.rounds).

    python jobs/data_engine.py --root out/engine --rounds 3 --synthetic-inputs 16 --steps 200
    python jobs/data_engine.py --root out/engine --input imgs/r0 --input imgs/r1 --rounds 2 \\
        --promote-metric miou --promote-margin 0.01 -- --points-per-side 16 --pred-iou-thresh 0.8
    python jobs/data_engine.py --config engine.yaml --until 0:train    # stop after a stage

Settings: RoundsConfig's defaults, then --config (YAML or JSON), then flags. Flags after
`--` go to the automatic stage (jobs/auto_annotate.py's flags). Rerunning the same command
resumes: finished rounds and stages are skipped. Round records: <root>/rounds/<r>.json.
Under `ray job submit --working-dir`, --root and --input must not lie in Ray's temporary
copy of the working dir (relative paths do): give absolute paths on shared storage.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# A local Ray cluster started below inherits this, so its workers import our packages too.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))


from engine.round_stages import check_stage_settings  # noqa: E402
from engine.rounds import RoundsConfig, shown  # noqa: E402
from jobs.auto_annotate import load_config  # noqa: E402
from schemas.settings_file import (  # noqa: E402
    SETTINGS_ERRORS, read_settings_file, settings_error_message, update_section,
)


def parse_args(argv: list[str] | None):
    argv = list(sys.argv[1:] if argv is None else argv)
    annotate_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="YAML or JSON file of RoundsConfig fields")
    ap.add_argument("--root", help="dataset root (local folder)")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--stages", help="comma-separated annotation stages per round (default: auto)")
    ap.add_argument("--input", action="append", help="round r's inputs, one --input per round")
    ap.add_argument("--synthetic-inputs", type=int, metavar="N", help="N synthetic scenes per round as the inputs")
    ap.add_argument("--checkpoint", dest="initial_checkpoint", help="checkpoint 0")
    ap.add_argument("--steps", dest="train_steps", type=int, help="training steps per round")
    ap.add_argument("--synthetic-fraction", type=float, help="share of synthetic ground truth in training")
    ap.add_argument("--held-out", type=int, metavar="N", help="held-out synthetic scenes")
    ap.add_argument("--promote-metric")
    ap.add_argument("--promote-margin", type=float)
    ap.add_argument("--auto-precision", type=float, metavar="P",
                    help="calibrate the automatic stage's filter thresholds each round to precision P on the "
                         "round's human masks (needs a manual or semi_auto stage)")
    ap.add_argument("--manual-ground-truth", type=int, metavar="N",
                    help="manual stage: a ground-truth annotator outlines N synthetic scenes per round")
    ap.add_argument("--simulated-manual", type=int, metavar="N",
                    help="manual stage: the simulated annotator clicks N synthetic scenes per round through the "
                         "assisted-manual Serve service")
    ap.add_argument("--simulated-semi-auto", type=int, metavar="N",
                    help="semi_auto stage: the same, with the generator's confident masks pre-filled")
    ap.add_argument("--until", help="R:STAGE: stop after that stage of round R (stage-by-stage runs)")
    ap.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or embedded)")
    return ap.parse_args(argv), annotate_args


def build_config(args: argparse.Namespace, annotate_args: list[str]) -> RoundsConfig:
    fields: dict = {}
    if args.config:
        fields = read_settings_file(args.config)
    for name in ("root", "rounds", "initial_checkpoint", "train_steps", "synthetic_fraction", "promote_metric",
                 "promote_margin", "auto_precision"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    if args.stages:
        fields["stages"] = args.stages.split(",")
    elif args.manual_ground_truth or args.simulated_manual or args.simulated_semi_auto:
        fields["stages"] = [*(["manual"] if args.manual_ground_truth or args.simulated_manual else []),
                            *(["semi_auto"] if args.simulated_semi_auto else []), "auto"]
    if args.input:
        fields["inputs"] = args.input
    if args.synthetic_inputs is not None:
        update_section(fields, "synthetic_inputs", {"images_per_round": args.synthetic_inputs})
    if args.held_out is not None:
        update_section(fields, "held_out", {"count": args.held_out})
    if annotate_args:
        fields["annotate_args"] = [*fields.get("annotate_args", []), *annotate_args]
    return RoundsConfig(**fields)


def main(argv: list[str] | None = None) -> int:
    args, annotate_args = parse_args(argv)
    try:
        config = build_config(args, annotate_args)
        check_stage_settings(config)  # train:, held_out.amg:, read by stages later
        # The automatic stage's flags, as it will read them: a bad one is refused now, not mid-round.
        load_config(["--output", config.root, "--checkpoint", config.initial_checkpoint, *config.annotate_args])
    except SETTINGS_ERRORS as e:
        print(settings_error_message(e), file=sys.stderr)
        return 2
    from model import CheckpointError, read_checkpoint_config
    from pipeline.cluster import refuse_job_copy_paths
    from pipeline.sources import InputError, check_output

    try:
        refuse_job_copy_paths([("--root", config.root), *(("--input", spec) for spec in config.inputs)], ROOT)
        check_output(config.root)
        read_checkpoint_config(config.initial_checkpoint)  # before round 0 copies it under the root
    except (InputError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    until = None
    if args.until:
        r, _, stage = args.until.partition(":")
        until = (int(r), stage)
    hooks = {}
    if args.manual_ground_truth:
        from engine.round_stages import ground_truth_manual

        hooks["manual"] = ground_truth_manual(args.manual_ground_truth)
    for stage, n in (("manual", args.simulated_manual), ("semi_auto", args.simulated_semi_auto)):
        if n:
            from engine.round_stages import simulated_annotator

            hooks[stage] = simulated_annotator(stage, images_per_round=n)
    from engine.rounds import run_rounds
    from pipeline.cluster import connect

    try:
        connect(args.address)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        records = run_rounds(config, hooks, until=until)
    except SETTINGS_ERRORS as e:  # checked up front; kept one line should a stage still find one
        print(settings_error_message(e), file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(round_summaries(records, config.promote_metric), indent=2))
    return 0


def round_summaries(records: list[dict], metric: str) -> list[dict]:
    """What the job prints of each round record, floats rounded (engine.rounds.shown)."""
    return [{k: shown(v) for k, v in ({k: rec[k] for k in ("round", "promoted", "images", "masks", "masks_per_image")}
                                      | {"metric": rec["metrics"].get(metric),
                                         "candidate_metric": rec["candidate_metrics"].get(metric)}).items()}
            for rec in records]


if __name__ == "__main__":
    sys.exit(main())
