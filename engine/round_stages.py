"""The stages of a data-engine round (see engine.rounds): the round's inputs, the automatic
stage on the Ray Data pipeline, training on a pinned dataset version with Ray Train, and
the held-out evaluation; plus a ground-truth manual stage for synthetic inputs.

Each stage returns a small JSON-able dict, which engine.rounds stores as the stage's result.
"""
from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import numpy as np

from dataset.lineage import file_sha256
from dataset.storage import INPUTS_DIR, TRAIN_DATA_DIR, TRAIN_RUNS_DIR

from .rounds import RoundContext, RoundsConfig, checkpoint_path, read_json, rounds_dir, spec_hash, write_json

SCENE_NAME = re.compile(r"scene_(\d+)_(\d+)\.png$")


# ---- inputs -----------------------------------------------------------------------------------


def round_input(config: RoundsConfig, r: int) -> str:
    """Round r's input URI; synthetic inputs are written on first use (idempotent)."""
    spec = config.synthetic_inputs
    if spec is None:
        return config.inputs[r]
    folder = Path(spec.folder or Path(config.root) / INPUTS_DIR) / f"round_{r}"
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(r * spec.images_per_round, (r + 1) * spec.images_per_round):
        path = folder / f"scene_{spec.seed}_{index:06d}.png"
        if not path.exists():
            _write_png(path, _scene(spec.seed, index, spec.size).image)
    return str(folder)


def _scene(seed: int, index: int, size: int):
    from training.synthetic import make_scene, scene_seed

    return make_scene(scene_seed(seed, index), size)


def _write_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    tmp = path.with_name("." + path.name + ".tmp")  # a dot name: listings skip it
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)


def scene_truth(path: str | Path) -> np.ndarray | None:
    """The ground-truth instance masks (N x H x W bool) of a synthetic input written by
    round_input, from its name and size; None for any other file."""
    from PIL import Image

    match = SCENE_NAME.search(Path(path).name)
    if match is None:
        return None
    with Image.open(path) as im:
        width, height = im.size
    if width != height:
        return None
    return _scene(int(match[1]), int(match[2]), width).masks


# ---- annotation stages --------------------------------------------------------------------------


def annotate_auto(ctx: RoundContext) -> dict:
    """The fully automatic stage: the Ray Data pipeline over the round's inputs with
    checkpoint r, its commits tagged with the round (stage auto) and run id ctx.run_id, so a
    rerun after a crash resumes the same run. With config.auto_precision, its filter
    thresholds are first calibrated on the round's human masks (engine.calibrate; the
    same data and checkpoint give the same thresholds when a run resumes)."""
    from jobs.auto_annotate import load_config
    from pipeline.graph import run

    argv = ["--input", ctx.input, "--output", ctx.root, "--checkpoint", ctx.checkpoint,
            "--round", str(ctx.round), "--run-id", ctx.run_id, *ctx.config.annotate_args]
    calibration = None
    if ctx.config.auto_precision is not None:
        from .calibrate import calibrate

        calibration = calibrate(ctx.checkpoint, ctx.root, ctx.round, load_config(argv).amg, ctx.config.auto_precision)
        if calibration is None:
            ctx.log(f"round {ctx.round}: no human masks to calibrate the automatic stage on; thresholds as given")
        else:
            ctx.log(f"round {ctx.round}: automatic stage calibrated: {calibration}")
            argv += [f"--pred-iou-thresh={calibration['pred_iou_thresh']}",
                     f"--stability-score-thresh={calibration['stability_score_thresh']}"]
    summary = run(load_config(argv), log=ctx.log)
    keep = ("run_id", "listed", "processed", "annotated", "duplicate", "quarantined", "already_done", "funnel")
    return {k: summary[k] for k in keep if k in summary} | ({"calibration": calibration} if calibration else {})


def ground_truth_manual(images_per_round: int | None = None):
    """A manual-stage hook for synthetic inputs: a perfect annotator who outlines every
    instance of the first `images_per_round` scenes of the round's input folder (all when
    None) and commits them with stage "manual". It stands in for the assisted-manual
    service's simulated annotator where a round needs exact masks fast."""

    def hook(ctx: RoundContext) -> dict:
        import torch

        from amg.rle import masks_to_rle_counts, rle_area, rle_bbox, rle_to_coco
        from dataset import DatasetWriter
        from dataset.identity import image_identity
        from dataset.lineage import new_lineage

        paths = sorted(p for p in Path(ctx.input).glob("scene_*.png") if SCENE_NAME.search(p.name))
        records = []
        for path in paths[:images_per_round]:
            truth = scene_truth(path)
            if truth is None:
                continue
            image_id, phash = image_identity(path.read_bytes())
            size = truth.shape[1:]
            counts = masks_to_rle_counts(torch.from_numpy(truth))
            annotations = [{
                "segmentation": segmentation, "area": rle_area(c), "bbox": rle_bbox(c, size),
                "predicted_iou": None, "point_coords": [], "stability_score": None,
                "crop_box": [0, 0, size[1], size[0]],
            } for c, segmentation in zip(counts, rle_to_coco(counts, size))]
            records.append({"image_id": image_id, "uri": str(path), "width": truth.shape[2],
                            "height": truth.shape[1], "phash": phash, "annotations": annotations})
        writer = DatasetWriter(ctx.root, new_lineage(round=ctx.round, stage="manual", run_id=ctx.run_id,
                                                     checkpoint_hash="ground truth"))
        writer.start_run()
        writer.commit_images(records)  # merge on image_id: a retry adds nothing
        return {"run_id": ctx.run_id, "offered": len(records)}

    return hook


def simulated_annotator(stage: str = "manual", images_per_round: int | None = None, **annotator_options):
    """A manual or semi-automatic stage done the way a person would do it: the
    assisted-manual service (engine.service, on Ray Serve in the connected cluster) is
    started on the round's inputs with checkpoint r, and engine.annotator's simulated
    annotator clicks each of the first `images_per_round` synthetic scenes' objects (ground
    truth from scene_truth) and commits them through it, with the round, this stage and
    ctx.run_id. semi_auto pre-fills the generator's confident masks first. Images the
    dataset already holds are skipped, so a rerun after a crash goes on where it stopped."""
    if stage not in ("manual", "semi_auto"):
        raise ValueError(f"stage must be manual or semi_auto, not {stage!r}")

    def hook(ctx: RoundContext) -> dict:
        from ray import serve

        from dataset.identity import sha256_hex
        from dataset.writer import committed_image_ids

        from .annotator import EngineClient, SimulatedAnnotator
        from .service import free_port, start

        url = start({"images": ctx.input, "output": ctx.root, "stage": stage, "round": ctx.round,
                     "run_id": ctx.run_id, "checkpoint": ctx.checkpoint, "torch_threads": 1,
                     "prefill": "generator" if stage == "semi_auto" else "none"},
                    port=free_port(), name=f"{stage}-r{ctx.round}")
        try:
            client = EngineClient(url)
            annotator = SimulatedAnnotator(client, **annotator_options)
            done = committed_image_ids(ctx.root)
            entries = [e for e in client.images()["images"] if scene_truth(e["uri"]) is not None][:images_per_round]
            committed = skipped = 0
            for entry in entries:
                if sha256_hex(Path(entry["uri"]).read_bytes()) in done:
                    skipped += 1
                    continue
                annotator.annotate(entry["index"], scene_truth(entry["uri"]))
                committed += 1
            return {"run_id": ctx.run_id, "committed": committed, "skipped": skipped,
                    "clicks": len(client.clicks)}
        finally:
            serve.shutdown()

    return hook


def _annotation_commits(root: str) -> list[dict]:
    from dataset import history
    from dataset.storage import is_delta_table, table_uri

    if not is_delta_table(table_uri(root, "annotations")):
        return []
    return [c for c in history(root) if c.get("table") == "annotations" and c.get("round") is not None]


def dataset_counts(root: str, r: int, stage: str) -> dict:
    """Images and masks that round r's stage committed, from the commits' metadata (so a
    stage resumed across invocations is counted whole), and its versions."""
    commits = [c for c in _annotation_commits(root) if int(c["round"]) == r and c.get("stage") == stage]
    return {"images": sum(int(c.get("images") or 0) for c in commits),
            "masks": sum(int(c.get("masks") or 0) for c in commits),
            "versions": [c["version"] for c in commits]}


def pinned_version(root: str, r: int) -> int:
    """The dataset version that round r trains on: the last commit of a round <= r."""
    versions = [c["version"] for c in _annotation_commits(root) if int(c["round"]) <= r]
    if not versions:
        raise ValueError(f"round {r}: the dataset at {root} has no annotated images of rounds <= {r}")
    return max(versions)


# ---- training -------------------------------------------------------------------------------------


def train(ctx: RoundContext, version: int) -> dict:
    """Checkpoint r+1: fine-tune checkpoint r with Ray Train on the dataset pinned at
    version (see training_snapshot), mixed with synthetic ground truth if the config asks.
    The run is named after the round, so an interrupted one resumes from its last Ray
    Train checkpoint."""
    from training.loop import run_training

    config = ctx.config
    files, kept = training_snapshot(ctx.root, version, Path(ctx.root) / TRAIN_DATA_DIR / f"round_{ctx.round}",
                                    config.min_train_mask_area)
    cfg = round_train_config(config, ctx.checkpoint, files)
    output = checkpoint_path(ctx.root, ctx.round + 1)
    output.parent.mkdir(parents=True, exist_ok=True)
    path, metrics = run_training(cfg, str(Path(ctx.root) / TRAIN_RUNS_DIR), num_workers=config.train_workers,
                                 use_gpu=config.train_gpu, resume=True, name=f"round_{ctx.round}", output=str(output))
    return {"checkpoint": path, "checkpoint_sha256": file_sha256(path), "dataset_version": version,
            "train_data": kept, "init_checkpoint": ctx.checkpoint,
            "metrics": {k: v for k, v in metrics.items() if k != "history"}}


def round_train_config(config: RoundsConfig, init_checkpoint: str, files: list[str]):
    """The training.loop.TrainConfig of a round: the config's train section, its steps and
    synthetic share, fine-tuning init_checkpoint on the Parquet files."""
    from training.loop import ParquetSource, SyntheticSource, TrainConfig

    extra = dict(config.train)
    synthetic = None
    if config.synthetic_fraction > 0:
        synthetic = SyntheticSource(**(extra.pop("synthetic", None) or {}))
    return TrainConfig(**{
        **extra, "steps": config.train_steps, "init_checkpoint": init_checkpoint, "synthetic": synthetic,
        "parquet": ParquetSource(paths=files, fraction=1 - config.synthetic_fraction),
    })


def check_stage_settings(config: RoundsConfig) -> None:
    """Validate now the sections that stages read only when they run (train, held_out.amg),
    so that a mistake there is refused before round 0 instead of after hours of annotation.
    Raises SettingsFileError naming the section's fields (train.lr: ...)."""
    from pydantic import ValidationError

    from amg import AmgParams
    from schemas.settings_file import SettingsFileError, validation_problems

    for section, check in (("train", lambda: round_train_config(config, config.initial_checkpoint, [])),
                           ("held_out.amg", lambda: AmgParams(**{**config.held_out.amg, "output_mode": "coco_rle"}))):
        try:
            check()
        except ValidationError as e:
            raise SettingsFileError(f"invalid settings: {validation_problems(e, section)}") from None


def training_snapshot(root: str, version: int, folder: Path, min_area: int) -> tuple[list[str], dict]:
    """The images of a dataset version that can teach something, as plain Parquet in folder
    (uri + annotations): masks smaller than min_area px dropped, then images left without a
    mask. The automatic stage with its filters off keeps empty masks, and a training step
    that draws only such images has nothing to learn from. Derived from the pinned version
    alone, so rewriting it on a resumed round gives the same rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dataset.reader import open_dataset

    dataset = open_dataset(root, version=version)
    schema = pa.schema([dataset.schema.field("uri"), dataset.schema.field("annotations")])
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "part-0.parquet"
    tmp = folder / ".part-0.parquet.tmp"
    kept = {"images": 0, "masks": 0, "dropped_images": 0, "dropped_masks": 0}
    with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
        for batch in dataset.to_batches(columns=["uri", "annotations"], batch_size=256):
            rows = []
            for row in batch.to_pylist():
                masks = [a for a in row["annotations"] or () if (a.get("area") or 0) >= max(min_area, 1)]
                kept["dropped_masks"] += len(row["annotations"] or ()) - len(masks)
                if masks:
                    rows.append({"uri": row["uri"], "annotations": masks})
                    kept["masks"] += len(masks)
                else:
                    kept["dropped_images"] += 1
            kept["images"] += len(rows)
            if rows:
                writer.write_table(pa.Table.from_pylist(rows, schema=schema))
    tmp.replace(path)
    if not kept["images"]:
        raise ValueError(f"version {version} of {root} has no image with a mask of {min_area} px or more to train on")
    return [str(path)], kept


# ---- evaluation -----------------------------------------------------------------------------------


def evaluate(config: RoundsConfig, checkpoint: str) -> dict[str, float]:
    """Held-out metrics of a checkpoint: single-point mIoU (miou, oracle_miou) and, unless
    turned off, COCO AR/AP of its automatic masks (AR100, AR1000, AP, ...) and their
    masks_per_image, generated with held_out_params. Stored per (checkpoint sha256,
    held-out set and those settings), so a checkpoint kept from one round to the next is
    measured once."""
    spec = config.held_out.model_dump(mode="json")
    params = held_out_params(config, checkpoint)
    key = spec_hash({"held_out": spec, "amg": params})
    path = rounds_dir(config.root) / "evaluations" / f"{file_sha256(checkpoint)[:16]}-{key}.json"
    stored = read_json(path)
    if stored is not None:
        return stored["metrics"]
    from amg import AmgParams
    from model import load_checkpoint
    from training.automatic_eval import automatic_metrics
    from training.evaluate import single_point_miou

    model, _ = load_checkpoint(checkpoint)
    examples = held_out_examples(config)
    metrics = single_point_miou(model, examples)
    if params is not None:
        metrics |= automatic_metrics(model, examples, AmgParams(**params))
    write_json(path, {"checkpoint": checkpoint, "held_out": spec, "amg": params, "metrics": metrics})
    return metrics


def held_out_params(config: RoundsConfig, checkpoint: str) -> dict | None:
    """The generator settings of a checkpoint's automatic held-out metrics (None when they
    are turned off), chosen as jobs/auto_annotate.py chooses them: HeldOut.amg, then the
    checkpoint's recommendation (amg.checkpoint_defaults), then the official defaults. The
    official thresholds suit the official checkpoints only; with them a small model keeps
    no mask at all and every AR/AP is 0."""
    if not config.held_out.automatic:
        return None
    from amg import AmgParams, checkpoint_defaults
    from model import read_checkpoint_meta

    given = AmgParams(**{**config.held_out.amg, "output_mode": "coco_rle"})
    return given.over(checkpoint_defaults(read_checkpoint_meta(checkpoint))).model_dump(mode="json")


def held_out_examples(config: RoundsConfig) -> list[Any]:
    """The held-out images with their ground-truth masks (.image, .masks)."""
    spec = config.held_out
    if spec.dataset is None:
        from training.automatic_eval import held_out_scenes

        return list(held_out_scenes(spec.seed, spec.count, spec.size))
    from dataset import iter_images
    from training.data import parquet_example

    examples = []
    for row in iter_images(spec.dataset, version=spec.version):
        examples.append(parquet_example(row["uri"], row["annotations"]))
        if len(examples) == spec.count:
            break
    return examples
