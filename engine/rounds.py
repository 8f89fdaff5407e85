"""The data-engine loop: rounds of annotate -> train -> evaluate -> promote.

    round r:  annotate the round's inputs with checkpoint r       (manual*, semi_auto*, auto)
                -> dataset version v_r (the last commit of a round <= r)
              train checkpoint r+1 from checkpoint r on version v_r (Ray Train)
              evaluate r and r+1 on the held-out set
              promote r+1 only if it beats r by the margin, else keep r
              write <root>/rounds/<r>.json                      (*optional hooks)

Everything lives under the dataset root:

    <root>/annotations, quarantine, ...   the Delta tables; every commit carries its round and stage
    <root>/rounds/<r>.json                the round record, written last: the round is done
    <root>/rounds/<r>/<stage>.json        a finished stage (manual, semi_auto, auto, train, evaluate)
    <root>/rounds/evaluations/*.json      held-out metrics per checkpoint sha256, held-out set and generator
                                          settings (HeldOut.amg over the checkpoint's recommended ones)
    <root>/checkpoints/round_<r>.pt       checkpoint r (trained in round r-1; round_0: a copy of the initial one)
    <root>/train_runs/round_<r>/          the Ray Train run of round r (resumes by name)

Rerunning the same command resumes: rounds with a record are skipped, and so are stages
with a result file; a stage cut short resumes in its own way (the pipeline skips committed
inputs, Ray Train restarts from its last checkpoint). Round records are plain JSON for the
dashboards (`ROUND_KEYS` first, then a few extras).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from dataset.lineage import file_sha256
from dataset.storage import CHECKPOINTS_DIR, ROUNDS_DIR
from schemas.annotate import DEFAULT_CHECKPOINT

Stage = Literal["manual", "semi_auto", "auto"]
ANNOTATION_STAGES: tuple[str, ...] = ("manual", "semi_auto", "auto")
ROUND_KEYS = ("round", "parent_round", "checkpoint", "checkpoint_sha256", "candidate_checkpoint", "promoted",
              "metrics", "candidate_metrics", "dataset_version", "images", "masks", "masks_per_image", "seconds")


class SyntheticInputs(BaseModel):
    """Each round's inputs drawn from the synthetic scene stream: round r gets scenes
    [r * images_per_round, (r + 1) * images_per_round) of `seed`, as PNGs in
    <folder or root/inputs>/round_<r>."""
    model_config = ConfigDict(extra="forbid")
    images_per_round: int = Field(8, gt=0)
    size: int = Field(256, gt=0)
    seed: int = 7001
    folder: str | None = None


class HeldOut(BaseModel):
    """The held-out set: synthetic scenes of `seed` (never an input or training seed), or
    the images of a dataset with ground truth (`dataset`, pinned at `version`)."""
    model_config = ConfigDict(extra="forbid")
    seed: int = 1_000_003
    count: int = Field(16, gt=0, description="images")
    size: int = Field(256, gt=0)
    dataset: str | None = None
    version: int | None = None
    automatic: bool = Field(True, description="also score automatic masks (COCO AR/AP); else single-point mIoU only")
    amg: dict[str, Any] = Field(default_factory=dict, description=(
        "AmgParams for the automatic metrics; those not given come from the evaluated checkpoint's "
        "recommendation (amg.checkpoint_defaults), as in jobs/auto_annotate.py"))


class RoundsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    root: str = Field(description="dataset root (local folder): tables, round records, checkpoints")
    rounds: int = Field(3, gt=0)
    initial_checkpoint: str = Field(DEFAULT_CHECKPOINT, description="checkpoint 0")
    stages: list[Stage] = Field(["auto"], description="annotation stages per round, run in this order")
    inputs: list[str] = Field(default_factory=list, description="round r's input URI (folder, glob, s3://, manifest)")
    synthetic_inputs: SyntheticInputs | None = None
    annotate_args: list[str] = Field(default_factory=list, description="extra jobs/auto_annotate.py flags")
    auto_precision: float | None = Field(
        None, gt=0, le=1, description="choose the automatic stage's pred_iou_thresh and stability_score_thresh "
                                      "each round: the pair that keeps the most masks at this precision on the "
                                      "round's human-annotated images (engine.calibrate); None: annotate_args as given")
    train_steps: int = Field(200, gt=0, description="Ray Train steps per round")
    train: dict[str, Any] = Field(default_factory=dict, description="other training.loop.TrainConfig fields")
    min_train_mask_area: int = Field(16, ge=1, description="px; smaller masks (and images left without any) are not trained on")
    synthetic_fraction: float = Field(0.0, ge=0, lt=1, description="share of synthetic ground-truth images in training")
    train_workers: int = Field(1, gt=0)
    train_gpu: bool = False
    held_out: HeldOut = Field(default_factory=HeldOut)
    promote_metric: str = Field("AR100", description="a key of the held-out metrics: miou, AR100, AP, ...")
    promote_margin: float = Field(0.0, description="promote when candidate > incumbent + margin (-inf: always)")
    name: str = Field("engine", description="prefix of the run ids of the rounds' commits")
    report: bool = Field(True, description="write the data-quality report (dashboards/) after each round")

    @model_validator(mode="after")
    def _check(self) -> "RoundsConfig":
        if "://" in self.root:
            raise ValueError("root must be a local folder (checkpoints and Ray Train runs live there)")
        if self.synthetic_inputs is None and len(self.inputs) < self.rounds:
            raise ValueError(f"{self.rounds} rounds need {self.rounds} inputs (or synthetic_inputs), got {len(self.inputs)}")
        if "auto" not in self.stages:
            raise ValueError("every round runs the automatic stage")
        if self.auto_precision is not None and self.stages == ["auto"]:
            raise ValueError("auto_precision calibrates on the round's human masks: add a manual or semi_auto stage")
        if self.stages != sorted(set(self.stages), key=ANNOTATION_STAGES.index):
            raise ValueError(f"stages run once each, in the order {ANNOTATION_STAGES}")
        seeds = {self.synthetic_inputs.seed if self.synthetic_inputs else None, self.train.get("seed", 0)}
        if self.held_out.dataset is None and self.held_out.seed in seeds:
            raise ValueError("the held-out seed must differ from the input and training seeds")
        return self


@dataclass
class RoundContext:
    """What a stage of round r works with."""
    round: int
    root: str
    checkpoint: str  # checkpoint r, the one that annotates
    input: str  # the round's input URI
    run_id: str  # the run id its commits carry
    config: RoundsConfig
    log: Callable[[str], None]


# A manual or semi-automatic stage: commits the round's annotations (stage and round in
# their lineage, run id ctx.run_id) and returns a small JSON summary. engine/ provides
# simulated annotators; anything with this signature works.
StageHook = Callable[[RoundContext], dict]


# ---- files --------------------------------------------------------------------------------


def rounds_dir(root: str) -> Path:
    return Path(root) / ROUNDS_DIR


def record_path(root: str, r: int) -> Path:
    return rounds_dir(root) / f"{r}.json"


def stage_path(root: str, r: int, stage: str) -> Path:
    return rounds_dir(root) / str(r) / f"{stage}.json"


def checkpoint_path(root: str, r: int) -> Path:
    return Path(root) / CHECKPOINTS_DIR / f"round_{r}.pt"


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def write_json(path: Path, value: dict) -> None:
    """Whole or not at all: a reader (or a resumed run) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(_plain(value), indent=2, sort_keys=False))
    os.replace(tmp, path)


def _plain(value: Any) -> Any:
    """Strict JSON: NaN and infinities become null (browsers' JSON.parse refuses them)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def load_records(root: str) -> list[dict]:
    """The finished rounds' records, by round."""
    folder = rounds_dir(root)
    paths = [p for p in folder.glob("*.json") if p.stem.isdigit()] if folder.is_dir() else []
    return sorted((json.loads(p.read_text()) for p in paths), key=lambda rec: rec["round"])


# ---- the loop -------------------------------------------------------------------------------


def run_rounds(config: RoundsConfig, hooks: dict[str, StageHook] | None = None, *,
               until: tuple[int, str] | None = None, log: Callable[[str], None] = print) -> list[dict]:
    """Run (or resume) every round; returns the round records. Needs a connected Ray.

    hooks: stage name -> StageHook, for "manual" and "semi_auto" (a configured stage without
    one is an error). until=(r, stage) returns right after that stage of round r (one of
    the annotation stages, "train" or "evaluate"): a stage-by-stage run."""
    from .round_stages import (
        annotate_auto, dataset_counts, evaluate, held_out_params, pinned_version, round_input, train,
    )

    hooks = dict(hooks or {})
    missing = [s for s in config.stages if s != "auto" and s not in hooks]
    if missing:
        raise ValueError(f"stages {missing} are configured but have no hook")
    hooks["auto"] = annotate_auto
    records = {rec["round"]: rec for rec in load_records(config.root)}
    first = snapshot_initial_checkpoint(config)
    for r in range(config.rounds):
        if r in records:
            log(f"round {r}: done (promoted={records[r]['promoted']})")
            continue
        started = time.perf_counter()
        incumbent = first if r == 0 else records[r - 1]["next_checkpoint"]
        if r > 0 and not Path(incumbent).exists():
            raise FileNotFoundError(f"round {r}: checkpoint {incumbent} of round {r - 1} is gone")
        ctx = RoundContext(r, config.root, incumbent, round_input(config, r), "", config, log)

        def stage(name: str, fn: Callable[[], dict]) -> dict:
            path = stage_path(config.root, r, name)
            done = read_json(path)
            if done is not None:
                log(f"round {r}: {name} already done")
                return done
            t0 = time.perf_counter()
            log(f"round {r}: {name} ...")
            result = fn() | {"seconds": round(time.perf_counter() - t0, 3)}
            write_json(path, result)
            return result

        results: dict[str, dict] = {}
        for name in (*config.stages, "train", "evaluate"):
            if name in ANNOTATION_STAGES:
                ctx.run_id = f"{config.name}-r{r}-{name}"
                results[name] = stage(name, lambda: (hooks[name](ctx) or {}) | dataset_counts(config.root, r, name))
            elif name == "train":
                version = pinned_version(config.root, r)
                results[name] = stage(name, lambda: train(ctx, version))
            else:
                candidate = results["train"]["checkpoint"]
                results[name] = stage(name, lambda: {
                    "incumbent": evaluate(config, incumbent), "candidate": evaluate(config, candidate),
                    "amg": {"incumbent": held_out_params(config, incumbent),
                            "candidate": held_out_params(config, candidate)}})
            if until == (r, name):
                log(f"round {r}: stopping after {name} as asked")
                return list(records.values())
        records[r] = write_record(config, r, incumbent, results, time.perf_counter() - started)
        rec = records[r]
        if config.report:
            write_report(config.root, log)
        log(gate_line(rec, config.promote_metric, incumbent))
    return [records[r] for r in sorted(records)]


def shown(value: Any) -> Any:
    """A value as printed: a float rounded to 4 decimals (0.28, not 0.2800000000000001)."""
    return round(value, 4) if isinstance(value, float) else value


def gate_line(rec: dict, metric: str, incumbent: str) -> str:
    """What the quality gate of a round decided, as logged."""
    outcome = f"promoted {Path(rec['candidate_checkpoint']).name}" if rec["promoted"] else f"kept {Path(incumbent).name}"
    return (f"round {rec['round']}: {metric} {shown(rec['metrics'].get(metric))} -> candidate "
            f"{shown(rec['candidate_metrics'].get(metric))}: {outcome}")


def snapshot_initial_checkpoint(config: RoundsConfig) -> str:
    """Checkpoint 0 is a copy of initial_checkpoint under the root, made once: the rounds'
    records and commits then name a file that nothing else rewrites."""
    path = checkpoint_path(config.root, 0)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        shutil.copyfile(config.initial_checkpoint, tmp)
        os.replace(tmp, path)
    return str(path)


def promote(incumbent: dict, candidate: dict, metric: str, margin: float) -> bool:
    """The quality gate: the candidate is promoted only if its metric beats the incumbent's
    by more than margin. A NaN (null) candidate never wins, a NaN incumbent loses to any
    number; margin -inf promotes any number, +inf nothing. An unknown metric is an error."""
    if metric not in incumbent or metric not in candidate:
        raise KeyError(f"promotion metric {metric!r} not among the held-out metrics {sorted(candidate)}")
    # Stored results hold null where a value was NaN (strict JSON).
    new, old = (math.nan if d[metric] is None else float(d[metric]) for d in (candidate, incumbent))
    if math.isnan(new):
        return False
    if math.isnan(old):
        return True
    return new > old + margin


def write_record(config: RoundsConfig, r: int, incumbent: str, results: dict[str, dict], seconds: float) -> dict:
    trained, evaluation = results["train"], results["evaluate"]
    promoted = promote(evaluation["incumbent"], evaluation["candidate"], config.promote_metric, config.promote_margin)
    images = sum(results[s].get("images", 0) for s in config.stages)
    masks = sum(results[s].get("masks", 0) for s in config.stages)
    stage_seconds = {s: results[s]["seconds"] for s in (*config.stages, "train", "evaluate")}
    record = {
        "round": r,
        "parent_round": r - 1 if r else None,
        "checkpoint": incumbent,
        "checkpoint_sha256": file_sha256(incumbent),
        "candidate_checkpoint": trained["checkpoint"],
        "promoted": promoted,
        "metrics": evaluation["incumbent"],
        "candidate_metrics": evaluation["candidate"],
        "dataset_version": trained["dataset_version"],
        "images": images,
        "masks": masks,
        "masks_per_image": masks / images if images else 0.0,
        # The round's work, summed over invocations if it was resumed (stage seconds).
        "seconds": round(sum(stage_seconds.values()), 3),
        # extras; "held_out" and "checkpoint_hash" are the names the report (dashboards/) reads
        "held_out": _numbers(evaluation["incumbent"]),
        # the generator settings of the automatic metrics (None: turned off) of each checkpoint
        "held_out_amg": evaluation.get("amg"),
        "checkpoint_hash": file_sha256(incumbent),
        "candidate_sha256": trained["checkpoint_sha256"],
        "initial_checkpoint": config.initial_checkpoint if r == 0 else None,
        "next_checkpoint": trained["checkpoint"] if promoted else incumbent,
        "gate": {"metric": config.promote_metric, "margin": _margin_text(config.promote_margin)},
        "stages": {s: {k: v for k, v in results[s].items() if k != "seconds"} for s in config.stages},
        "stage_seconds": stage_seconds,
        "train": {k: v for k, v in trained.items() if k not in ("checkpoint", "checkpoint_sha256")},
        "wall_seconds_this_invocation": round(seconds, 3),
    }
    write_json(record_path(config.root, r), record)
    return record


def _numbers(metrics: dict) -> dict[str, float]:
    """The metrics a chart can show: finite scores, without counts and COCO's -1 (undefined)."""
    return {k: float(v) for k, v in metrics.items()
            if k != "instances" and isinstance(v, (int, float)) and math.isfinite(v) and v >= 0}


def write_report(root: str, log: Callable[[str], None]) -> str | None:
    """The data-quality report of the latest version, now with this round's record; a
    failure only warns (a report is a view, the round is done)."""
    try:
        from dashboards import write_report as write

        return write(root)
    except Exception as e:  # noqa: BLE001
        log(f"warning: report not written: {type(e).__name__}: {e}")
        return None


def _margin_text(margin: float) -> float | str:
    return margin if math.isfinite(margin) else str(margin)


def spec_hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:12]
