"""The data-engine loop (engine.rounds, jobs/data_engine.py) on a real local Ray: two tiny
rounds of ground-truth manual + automatic annotation, Ray Train fine-tuning and held-out
evaluation, run stage by stage and through an interrupted round; round records, lineage
of every commit, resume without redoing a stage, and the quality gate both ways."""
from __future__ import annotations

import json
import math
import os
import shutil
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

import engine.round_stages as round_stages
from dataset import history, read_images
from amg import checkpoint_defaults
from dataset.storage import (
    CHECKPOINTS_DIR, INPUTS_DIR, OTHER_ROOT_ENTRIES, REPORTS_DIR, ROUNDS_DIR, RUNS_DIR, TABLE_NAMES, TRAIN_DATA_DIR,
    TRAIN_RUNS_DIR,
)
from engine.round_stages import evaluate, ground_truth_manual, held_out_params
from engine.rounds import ROUND_KEYS, HeldOut, RoundsConfig, promote, record_path, run_rounds, stage_path
from jobs.data_engine import main as cli_main
from model import load_checkpoint, read_checkpoint_meta, save_checkpoint
from schemas.annotate import DEFAULT_CHECKPOINT

ROOT = Path(__file__).resolve().parents[1]
# Small grid, filters off, so that the weak bundled checkpoint still keeps masks.
AMG = {"points_per_side": 4, "pred_iou_thresh": 0, "stability_score_thresh": 0}
HELD_OUT = HeldOut(count=2, size=128, amg=AMG)


def engine_config(root: Path, **overrides) -> RoundsConfig:
    return RoundsConfig(**{
        "root": str(root), "rounds": 2, "stages": ["manual", "auto"],
        "synthetic_inputs": {"images_per_round": 3, "size": 128},
        "annotate_args": ["--points-per-side", "4", "--pred-iou-thresh", "0", "--stability-score-thresh", "0"],
        "train_steps": 2,
        "train": {"images_per_step": 1, "masks_per_image": 4, "prompt_iterations": 2, "mask_only_iterations": 1,
                  "warmup_steps": 1, "lr": 1e-4, "log_every": 1},
        "held_out": HELD_OUT, "promote_metric": "miou", "promote_margin": -math.inf, **overrides,
    })


class Interrupted(RuntimeError):
    pass


@pytest.fixture(scope="module")
def ray_session():
    import ray

    old = os.environ.get("PYTHONPATH")
    # Ray Train's workers import our packages through the environment they inherit.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), old]))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
    if old is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = old


@pytest.fixture(scope="module")
def engine_run(ray_session, tmp_path_factory):
    """Two rounds, run the hard way: round 0 stopped after its automatic stage, then a
    run that dies in round 1's manual stage, then a rerun that finishes. Every call of a
    stage is counted."""
    root = tmp_path_factory.mktemp("engine")
    config = engine_config(root)
    calls: Counter = Counter()
    manual = ground_truth_manual(images_per_round=1)
    failed = []

    def manual_hook(ctx):
        calls[ctx.round, "manual"] += 1
        if ctx.round == 1 and not failed:
            failed.append(ctx.round)
            raise Interrupted("annotator walked away")
        return manual(ctx)

    def counted(name, fn):
        def wrapper(*args):
            calls[args[0].round, name] += 1
            return fn(*args)
        return wrapper

    logs = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(round_stages, "annotate_auto", counted("auto", round_stages.annotate_auto))
        mp.setattr(round_stages, "train", counted("train", round_stages.train))
        first = run_rounds(config, {"manual": manual_hook}, until=(0, "auto"), log=logs.append)
        after_first = {name: stage_path(str(root), 0, name).exists() for name in ("manual", "auto", "train")}
        with pytest.raises(Interrupted):
            run_rounds(config, {"manual": manual_hook}, log=logs.append)
        after_crash = {"round0": record_path(str(root), 0).exists(), "round1": record_path(str(root), 1).exists()}
        records = run_rounds(config, {"manual": manual_hook}, log=logs.append)
    return dict(root=root, config=config, calls=calls, first=first, after_first=after_first,
                after_crash=after_crash, records=records, logs=logs)


def test_rounds_run_stage_by_stage_and_resume_without_redoing_a_stage(engine_run):
    assert engine_run["first"] == []  # stopped inside round 0: no record yet
    assert engine_run["after_first"] == {"manual": True, "auto": True, "train": False}
    assert engine_run["after_crash"] == {"round0": True, "round1": False}
    # Each stage ran once per round; only the manual stage that raised ran again.
    assert engine_run["calls"] == {(0, "manual"): 1, (0, "auto"): 1, (0, "train"): 1,
                                   (1, "manual"): 2, (1, "auto"): 1, (1, "train"): 1}
    logs = engine_run["logs"]
    assert "round 0: manual already done" in logs and "round 0: auto already done" in logs
    assert "round 0: done (promoted=True)" in logs


def test_round_records(engine_run):
    root, records = engine_run["root"], engine_run["records"]
    assert [rec["round"] for rec in records] == [0, 1]
    for r, rec in enumerate(records):
        text = record_path(str(root), r).read_text()
        on_disk = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c} in round {r}"))
        assert on_disk == rec and set(ROUND_KEYS) <= set(rec)
        assert rec["parent_round"] == (None if r == 0 else r - 1)
        assert Path(rec["checkpoint"]).exists() and Path(rec["candidate_checkpoint"]).exists()
        assert rec["checkpoint_sha256"] == round_stages.file_sha256(rec["checkpoint"])
        assert rec["candidate_sha256"] == round_stages.file_sha256(rec["candidate_checkpoint"])
        assert rec["candidate_sha256"] != rec["checkpoint_sha256"]  # training changed the weights
        for metrics in (rec["metrics"], rec["candidate_metrics"]):
            assert metrics["instances"] > 0 and 0 <= metrics["miou"] <= metrics["oracle_miou"] <= 1
            assert {"AR100", "AP", "masks_per_image"} <= set(metrics)
        # 3 inputs: 1 outlined by the manual stage, 2 annotated automatically.
        assert rec["stages"]["manual"]["images"] == 1 and rec["stages"]["auto"]["images"] == 2
        assert rec["images"] == 3 and rec["masks"] == rec["stages"]["manual"]["masks"] + rec["stages"]["auto"]["masks"]
        assert rec["masks_per_image"] == pytest.approx(rec["masks"] / 3) and rec["stages"]["auto"]["masks"] > 0
        assert rec["seconds"] > 0 and rec["train"]["metrics"]["steps"] == 2
        # Trained on the images of rounds <= r that have a mask of 16 px or more.
        data = rec["train"]["train_data"]
        assert 1 <= data["images"] <= 3 * (r + 1) == data["images"] + data["dropped_images"] and data["masks"] > 0
        assert rec["promoted"] and rec["next_checkpoint"] == rec["candidate_checkpoint"]  # margin -inf
    # Checkpoint 0 is a copy of the initial one under the root (the source may be rewritten later).
    assert records[0]["checkpoint"] == str(engine_run["root"] / "checkpoints" / "round_0.pt")
    assert records[0]["initial_checkpoint"] == DEFAULT_CHECKPOINT and records[1]["initial_checkpoint"] is None
    # Round 1 annotates and trains from the checkpoint round 0 promoted.
    assert records[1]["checkpoint"] == records[0]["candidate_checkpoint"]
    assert load_checkpoint(records[1]["candidate_checkpoint"])[1]["train_config"]["init_checkpoint"] == records[1]["checkpoint"]


def test_lineage_of_the_rounds_commits(engine_run):
    root, records = str(engine_run["root"]), engine_run["records"]
    commits = [c for c in history(root) if c.get("table") == "annotations"]
    assert {(c["round"], c["stage"]) for c in commits} == {(0, "manual"), (0, "auto"), (1, "manual"), (1, "auto")}
    for c in commits:
        rec = records[c["round"]]
        assert c["run_id"] == f"engine-r{c['round']}-{c['stage']}"
        if c["stage"] == "auto":  # annotated with that round's checkpoint
            assert c["checkpoint_hash"] == rec["checkpoint_sha256"]
    # Each round trains on the last version of rounds <= r: round 0 never sees round 1's images.
    by_round = {r: max(c["version"] for c in commits if c["round"] <= r) for r in (0, 1)}
    assert [rec["dataset_version"] for rec in records] == [by_round[0], by_round[1]]
    assert by_round[0] < min(c["version"] for c in commits if c["round"] == 1)
    rows = read_images(root, version=records[0]["dataset_version"]).to_pylist()
    assert len(rows) == 3 and {a["round"] for row in rows for a in row["annotations"]} == {0}
    latest = read_images(root).to_pylist()
    assert len(latest) == 6
    stages = Counter((a["round"], a["stage"]) for row in latest for a in row["annotations"])
    assert set(stages) == {(0, "manual"), (0, "auto"), (1, "manual"), (1, "auto")}


def test_training_snapshot_keeps_only_masks_worth_training_on(engine_run, tmp_path):
    root, records = str(engine_run["root"]), engine_run["records"]
    version = records[1]["dataset_version"]
    files, kept = round_stages.training_snapshot(root, version, tmp_path, 16)
    snapshot = [a["area"] for f in files for row in pq.read_table(f).to_pylist() for a in row["annotations"]]
    source = [a["area"] for row in read_images(root, version=version).to_pylist() for a in row["annotations"]]
    assert sorted(snapshot) == sorted(a for a in source if a >= 16) and len(snapshot) == kept["masks"]
    assert kept["dropped_masks"] == len(source) - len(snapshot)


def test_the_report_after_the_last_round_shows_every_rounds_held_out_metrics(engine_run):
    root, records = engine_run["root"], engine_run["records"]
    version = records[-1]["dataset_version"]
    html = (root / "reports" / f"version-{version}.html").read_text()
    data = json.loads(html.split('id="report-data">', 1)[1].split("</script>", 1)[0])
    shown = {r["round"]: r for r in data["rounds"]}
    for rec in records:
        assert shown[rec["round"]]["held_out"] == pytest.approx(rec["held_out"])
        assert shown[rec["round"]]["promoted"] is True and shown[rec["round"]]["engine_masks_per_image"] == rec["masks_per_image"]
        assert rec["held_out"]["miou"] == rec["metrics"]["miou"] and "instances" not in rec["held_out"]


def test_a_rerun_of_a_finished_engine_does_nothing(engine_run):
    calls, logs = Counter(), []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(round_stages, "annotate_auto", lambda ctx: calls.update(["auto"]))
        mp.setattr(round_stages, "train", lambda ctx, v: calls.update(["train"]))
        again = run_rounds(engine_run["config"], {"manual": lambda ctx: calls.update(["manual"])}, log=logs.append)
    assert not calls and again == engine_run["records"]
    assert logs == ["round 0: done (promoted=True)", "round 1: done (promoted=True)"]


def test_the_gate_can_be_redecided_from_stored_evaluations(engine_run):
    """A round without its record decides its gate again from the stored stages: with an
    infinite margin round 1's candidate is kept out, and nothing is annotated or trained."""
    root, first = engine_run["root"], engine_run["records"][1]
    record_path(str(root), 1).unlink()
    strict = engine_config(root, promote_margin=math.inf)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(round_stages, "annotate_auto", lambda ctx: pytest.fail("auto stage redone"))
        mp.setattr(round_stages, "train", lambda ctx, v: pytest.fail("training redone"))
        records = run_rounds(strict, {"manual": lambda ctx: pytest.fail("manual stage redone")}, log=lambda m: None)
    kept = records[1]
    assert not kept["promoted"] and kept["next_checkpoint"] == kept["checkpoint"] == first["checkpoint"]
    assert kept["metrics"] == first["metrics"] and kept["candidate_metrics"] == first["candidate_metrics"]
    assert kept["gate"] == {"metric": "miou", "margin": "inf"}


def test_the_gate_promotes_a_better_checkpoint_and_keeps_out_a_worse_or_equal_one(tmp_path):
    """Real held-out evaluations of the bundled checkpoint and of a broken copy of it (its
    mask hypernetworks zeroed: every mask empty, mIoU 0)."""
    bundled = tmp_path / "bundled.pt"  # a copy: the bundled file may be replaced while tests run
    shutil.copyfile(DEFAULT_CHECKPOINT, bundled)
    model, meta = load_checkpoint(bundled)
    with torch.no_grad():
        for p in model.mask_decoder.output_hypernetworks_mlps.parameters():
            p.zero_()
    broken = tmp_path / "broken.pt"
    save_checkpoint(model, broken, meta)
    config = RoundsConfig(root=str(tmp_path), rounds=1, inputs=["unused"], held_out=HELD_OUT.model_copy(
        update={"automatic": False}), promote_metric="miou")
    good, bad = evaluate(config, str(bundled)), evaluate(config, str(broken))
    assert bad["miou"] == 0 < good["miou"] and bad["instances"] == good["instances"] > 0
    assert promote(bad, good, "miou", 0.0)  # better: promoted
    assert not promote(good, bad, "miou", 0.0)  # worse: kept out
    assert not promote(good, dict(good), "miou", 0.0)  # equal: kept out
    assert not promote(bad, good, "miou", good["miou"])  # better, but not by the margin
    assert promote(good, bad, "miou", -math.inf) and not promote(bad, good, "miou", math.inf)
    assert not promote(good, {**good, "miou": math.nan}, "miou", -math.inf)
    assert not promote(good, {**good, "miou": None}, "miou", -math.inf)  # NaN as stored in JSON
    assert promote({**good, "miou": None}, good, "miou", 0.0)
    with pytest.raises(KeyError, match="AR100"):
        promote(good, bad, "AR100", 0.0)
    # Evaluations are stored by checkpoint hash and held-out set: a second call reads them.
    assert len(list((tmp_path / "rounds" / "evaluations").glob("*.json"))) == 2
    assert evaluate(config, str(bundled)) == good


def test_held_out_automatic_metrics_use_the_checkpoints_recommended_settings(tmp_path):
    """Generator settings that HeldOut.amg leaves out come from the evaluated checkpoint's
    recommendation, as in jobs/auto_annotate.py: with the official 0.88 / 0.95 the bundled
    checkpoint keeps no mask, every AR/AP is 0 and no candidate could ever be promoted.
    Settings given in HeldOut.amg win over the recommendation."""
    bundled = tmp_path / "bundled.pt"  # a copy: the bundled file may be replaced while tests run
    shutil.copyfile(DEFAULT_CHECKPOINT, bundled)
    recommended = checkpoint_defaults(read_checkpoint_meta(bundled))
    grid = {"points_per_side": 4}
    config = RoundsConfig(root=str(tmp_path), rounds=1, inputs=["unused"],
                          held_out=HeldOut(count=2, size=128, amg=grid))
    metrics = evaluate(config, str(bundled))
    assert metrics["masks_per_image"] > 0 and metrics["AR100"] > 0 and metrics["AP"] > 0
    used = held_out_params(config, str(bundled))
    assert {k: used[k] for k in recommended} == recommended and used["points_per_side"] == 4
    (stored,) = [json.loads(p.read_text()) for p in (tmp_path / "rounds" / "evaluations").glob("*.json")]
    assert stored["amg"] == used and stored["metrics"] == metrics
    official = {"pred_iou_thresh": 0.88, "stability_score_thresh": 0.95}
    strict = config.model_copy(update={"held_out": HeldOut(count=2, size=128, amg=grid | official)})
    assert {k: held_out_params(strict, str(bundled))[k] for k in official} == official
    assert evaluate(strict, str(bundled))["masks_per_image"] < metrics["masks_per_image"]
    off = config.model_copy(update={"held_out": HeldOut(count=2, size=128, automatic=False)})
    assert held_out_params(off, str(bundled)) is None and "AR100" not in evaluate(off, str(bundled))


def test_round_records_name_the_held_out_generator_settings(engine_run):
    for rec in engine_run["records"]:
        for side in ("incumbent", "candidate"):
            used = rec["held_out_amg"][side]
            assert {k: used[k] for k in AMG} == AMG and used["output_mode"] == "coco_rle"


def test_everything_the_engine_writes_beside_the_tables_is_a_named_root_entry(engine_run):
    """The folders beside the tables are named once (dataset.storage), and those names are
    what the output check accepts in a dataset root."""
    assert OTHER_ROOT_ENTRIES == (RUNS_DIR, REPORTS_DIR, ROUNDS_DIR, CHECKPOINTS_DIR, INPUTS_DIR, TRAIN_DATA_DIR,
                                  TRAIN_RUNS_DIR)
    beside = {p.name for p in engine_run["root"].iterdir() if not p.name.startswith(".")} - set(TABLE_NAMES)
    assert beside == set(OTHER_ROOT_ENTRIES)


def test_manual_stage_through_the_serve_service_and_its_simulated_annotator(ray_session, tmp_path):
    """The manual-stage hook over HTTP: the assisted-manual service on Ray Serve, clicked by
    engine.annotator's simulated annotator; its commits carry the round, stage and run id,
    and a rerun skips the image already committed."""
    from engine.round_stages import round_input, simulated_annotator
    from engine.rounds import RoundContext

    config = engine_config(tmp_path, rounds=1, synthetic_inputs={"images_per_round": 2, "size": 128})
    ctx = RoundContext(0, str(tmp_path), DEFAULT_CHECKPOINT, round_input(config, 0), "engine-r0-manual", config, print)
    hook = simulated_annotator("manual", images_per_round=1, max_clicks=2, max_objects=2)
    first = hook(ctx)
    assert first["committed"] == 1 and first["skipped"] == 0 and first["clicks"] >= 1
    commits = [c for c in history(str(tmp_path)) if c.get("table") == "annotations"]
    assert [(c["round"], c["stage"], c["run_id"]) for c in commits] == [(0, "manual", "engine-r0-manual")]
    (row,) = read_images(str(tmp_path)).to_pylist()
    assert row["uri"].endswith("scene_7001_000000.png") and 1 <= len(row["annotations"]) <= 2
    assert {(a["round"], a["stage"]) for a in row["annotations"]} == {(0, "manual")}
    assert hook(ctx) | {"clicks": 0} == {"run_id": "engine-r0-manual", "committed": 0, "skipped": 1, "clicks": 0}


def test_cli_refuses_bad_settings_before_starting_anything(tmp_path, capsys):
    assert cli_main(["--root", str(tmp_path), "--rounds", "2", "--input", "only-one"]) == 2
    assert "2 rounds need 2 inputs" in capsys.readouterr().err
    assert cli_main(["--root", str(tmp_path), "--synthetic-inputs", "4", "--stages", "manual"]) == 2
    assert "automatic stage" in capsys.readouterr().err
    assert cli_main(["--root", str(tmp_path), "--synthetic-inputs", "4", "--auto-precision", "0.8"]) == 2
    assert "auto_precision calibrates on the round's human masks" in capsys.readouterr().err
    assert cli_main(["--root", str(tmp_path), "--synthetic-inputs", "4", "--manual-ground-truth", "1",
                     "--auto-precision", "1.5"]) == 2
    assert "auto_precision" in capsys.readouterr().err
    assert not (tmp_path / "rounds").exists()
    (tmp_path / "taken").write_text("a file")
    assert cli_main(["--root", str(tmp_path / "taken"), "--synthetic-inputs", "4"]) == 2
    assert "is a file; the output is a dataset folder" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert cli_main(["--root", str(tmp_path / "ds"), "--synthetic-inputs", "4",
                     "--checkpoint", str(tmp_path / "junk.pt")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'junk.pt'}: ")  # the file given, not a copy
    assert not (tmp_path / "ds").exists()


def test_what_the_job_prints_has_rounded_numbers():
    """The gate's log line and the final summary showed float noise (AR100 0.2800000000000001)."""
    from engine.rounds import gate_line
    from jobs.data_engine import round_summaries

    rec = {"round": 0, "promoted": False, "images": 6, "masks": 122, "masks_per_image": 122 / 6,
           "metrics": {"AR100": 0.1 + 0.18, "miou": 0.5}, "candidate_metrics": {"AR100": 0.0, "miou": 0.4},
           "candidate_checkpoint": "/r/checkpoints/round_1.pt"}
    assert gate_line(rec, "AR100", "/r/checkpoints/round_0.pt") == "round 0: AR100 0.28 -> candidate 0.0: kept round_0.pt"
    assert gate_line({**rec, "promoted": True}, "miou", "x") == "round 0: miou 0.5 -> candidate 0.4: promoted round_1.pt"
    assert json.dumps(round_summaries([rec], "AR100")) == (
        '[{"round": 0, "promoted": false, "images": 6, "masks": 122, "masks_per_image": 20.3333, "metric": 0.28, '
        '"candidate_metric": 0.0}]')


def test_cli_refuses_bad_train_and_held_out_sections_before_round_0(tmp_path, capsys):
    """Sections read only by later stages are checked before anything starts: a typo there
    used to surface after round 0's annotation."""
    cases = (("train:\n  lr: -1\n  warmup: 5\n",
              "error: invalid settings: train.lr: Input should be greater than 0 (got -1); "
              "train.warmup: Extra inputs are not permitted"),
             ("train:\n  mask_only_iterations: 4\n  prompt_iterations: 4\n",
              "error: invalid settings: train: mask_only_iterations must be smaller than prompt_iterations"),
             ("held_out:\n  amg:\n    pred_iou_thresh: 2\n",
              "error: invalid settings: held_out.amg.pred_iou_thresh: Input should be less than or equal to 1 (got 2)"))
    for i, (text, expected) in enumerate(cases):
        (tmp_path / f"engine{i}.yaml").write_text(f"root: {tmp_path / 'ds'}\nsynthetic_inputs: {{}}\n" + text)
        assert cli_main(["--config", str(tmp_path / f"engine{i}.yaml")]) == 2
        assert capsys.readouterr().err.strip() == expected
    assert not (tmp_path / "ds").exists()


# ---- calibrated automatic stage (engine.calibrate) ---------------------------------------------


def _square(size: int, x0: int, y0: int, side: int) -> dict:
    from pycocotools import mask as coco_mask
    import numpy as np

    mask = np.zeros((size, size), dtype=np.uint8, order="F")
    mask[y0:y0 + side, x0:x0 + side] = 1
    rle = coco_mask.encode(mask)
    return {"size": list(rle["size"]), "counts": rle["counts"].decode()}


def _candidate(segmentation: dict, iou: float, stability: float) -> dict:
    from pycocotools import mask as coco_mask

    bbox = [int(v) for v in coco_mask.toBbox({**segmentation, "counts": segmentation["counts"].encode()})]
    return {"segmentation": segmentation, "predicted_iou": iou, "stability_score": stability, "bbox": bbox}


def test_calibration_keeps_the_most_masks_at_the_target_precision():
    from engine.calibrate import choose_thresholds

    truth = [_square(64, 2, 2, 20), _square(64, 40, 40, 20), _square(64, 28, 4, 8)]
    records = [
        _candidate(truth[0], 0.9, 0.96),  # right
        _candidate(truth[1], 0.8, 0.92),  # right
        _candidate(_square(64, 2, 40, 16), 0.85, 0.5),  # wrong, unstable
        _candidate(_square(64, 40, 2, 16), 0.5, 0.97),  # wrong, low predicted IoU
        _candidate(truth[2], 0.7, 0.9),  # right
        _candidate(truth[1], 0.75, 0.99),  # a duplicate that NMS removes
    ]
    exact = choose_thresholds([records], [truth], 1.0, box_nms_thresh=0.7)
    # The pairs that keep all three right masks and nothing else: pred IoU in [0.5, 0.7),
    # stability in (0.5, 0.9]; ties go to the highest thresholds.
    assert (exact["pred_iou_thresh"], exact["stability_score_thresh"]) == (0.65, 0.9)
    assert exact["reached"] and exact["precision"] == 1.0 and exact["recall"] == 1.0
    assert exact["masks_per_image"] == 3 and exact["human_masks"] == 3 and exact["images"] == 1
    looser = choose_thresholds([records], [truth], 0.7, box_nms_thresh=0.7)
    assert looser["masks_per_image"] == 4 and looser["precision"] == 0.75 and looser["reached"]
    assert (looser["pred_iou_thresh"], looser["stability_score_thresh"]) == (0.65, 0.5)
    wrong_only = choose_thresholds([records[2:4]], [truth], 0.9, box_nms_thresh=0.7)
    assert not wrong_only["reached"] and wrong_only["precision"] == 0.0


def test_the_automatic_stage_runs_with_thresholds_calibrated_on_the_rounds_human_masks(engine_run):
    """Round 0's manual image (its ground truth in the table) calibrates checkpoint 0; the
    pipeline is then started with those thresholds (captured here instead of run)."""
    from engine.calibrate import human_masks
    from engine.rounds import RoundContext

    root, records = str(engine_run["root"]), engine_run["records"]
    labelled = human_masks(root, 0)
    assert len(labelled) == 1 and len(labelled[0][1]) == records[0]["stages"]["manual"]["masks"]
    assert human_masks(root, 5) == []
    started = []
    config = engine_config(engine_run["root"], auto_precision=0.5)
    ctx = RoundContext(round=0, root=root, checkpoint=records[0]["checkpoint"], input="unused", run_id="calibrated",
                       config=config, log=lambda _: None)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("pipeline.graph.run", lambda cfg, log: started.append(cfg) or {"run_id": "calibrated"})
        summary = round_stages.annotate_auto(ctx)
    calibration = summary["calibration"]
    assert calibration["images"] == 1 and calibration["human_masks"] == len(labelled[0][1])
    assert calibration["target_precision"] == 0.5 and 0 <= calibration["precision"] <= 1
    amg = started[0].amg
    assert (amg.pred_iou_thresh, amg.stability_score_thresh) == (
        calibration["pred_iou_thresh"], calibration["stability_score_thresh"])
    assert amg.points_per_side == 4  # the other settings as configured
