"""What the report reads besides the annotations table: run summaries, round metrics, the
quarantine and duplicates tables, and the commit history that says which runs a version
holds. Every path is under the dataset root, local or s3://.

Round metrics (written by the data engine, one file per round, rendered when present):

    <root>/rounds/<round>.json
    {
      "round": 1,                                  # required, int
      "held_out": {"miou": 0.61, "ap": 0.40},      # held-out metrics, name -> number
      "checkpoint": "s3://.../round1.pt",          # optional
      "checkpoint_hash": "9f2c...",                # optional
      "promoted": true,                            # optional: did this round's checkpoint win
      "masks_per_image": 37.5,                     # optional: as measured by the engine
      "notes": "..."                               # optional, shown as text
    }
"""
from __future__ import annotations

import json
from collections import Counter

import pyarrow.fs as pafs

from dataset import history, read_table
from dataset.storage import ROUNDS_DIR, arrow_filesystem


def root_filesystem(root: str, options: dict[str, str]) -> pafs.FileSystem:
    """A filesystem whose paths are relative to the dataset root."""
    return arrow_filesystem(root, options)


def read_json_dir(fs: pafs.FileSystem, folder: str) -> list[dict]:
    """Every *.json in folder, parsed; unreadable files are skipped (a report is a view,
    not a validator)."""
    try:
        infos = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    except (OSError, ValueError):
        return []
    out = []
    for info in sorted(infos, key=lambda i: i.path):
        if info.type != pafs.FileType.File or not info.path.endswith(".json"):
            continue
        try:
            with fs.open_input_stream(info.path) as f:
                out.append(json.loads(f.read()))
        except (OSError, ValueError):
            continue
    return out


def write_round_metrics(root: str, round: int, held_out: dict[str, float], *, options: dict[str, str] | None = None,
                        **extra) -> str:
    """Write <root>/rounds/<round>.json (the convention above); returns its path."""
    from dataset import storage_options

    fs = root_filesystem(root, options if options is not None else storage_options(root))
    fs.create_dir(ROUNDS_DIR, recursive=True)
    path = f"{ROUNDS_DIR}/{int(round)}.json"
    body = {"round": int(round), "held_out": {k: float(v) for k, v in held_out.items()}, **extra}
    with fs.open_output_stream(path) as f:
        f.write(json.dumps(body, indent=2, sort_keys=True).encode())
    return f"{root.rstrip('/')}/{path}"


def rounds(fs: pafs.FileSystem) -> dict[int, dict]:
    return {int(r["round"]): r for r in read_json_dir(fs, ROUNDS_DIR) if isinstance(r.get("round"), int)}


def version_runs(root: str, version: int, options: dict[str, str]) -> list[dict]:
    """The runs with an annotations commit up to version, oldest first: run_id, round, stage,
    first_version and last_version (of their commits up to version), and later_version: the
    last of their commits after version (None when none is: the run ended by version)."""
    runs: dict[str, dict] = {}
    for c in history(root, options=options):
        if c.get("table") != "annotations" or not c.get("run_id"):
            continue
        if c["version"] > version:
            if c["run_id"] in runs:
                runs[c["run_id"]]["later_version"] = c["version"]
            continue
        r = runs.setdefault(c["run_id"], dict(run_id=c["run_id"], round=c.get("round"), stage=c.get("stage"),
                                              first_version=c["version"], later_version=None))
        r["last_version"] = c["version"]
    return list(runs.values())


def side_counts(root: str, name: str, column: str, run_ids: set[str] | None, options: dict[str, str]) -> Counter:
    """Rows of a side table (quarantine, duplicates) by a column (the reason's category:
    the text before its first ':'), for the given runs (None: all)."""
    try:
        table = read_table(root, name, options=options)
    except Exception:  # the table does not exist yet: nothing was quarantined / duplicated
        return Counter()
    out = Counter()
    for value, run_id in zip(table[column].to_pylist(), table["run_id"].to_pylist()):
        if run_ids is None or run_id in run_ids:
            out[str(value).split(":")[0]] += 1
    return out


def lineage(root: str, options: dict[str, str]) -> dict[str, dict]:
    """The lineage table's row of each run (round, stage, params_json, ...) by run_id: every
    run has one, also a run that committed no annotations (it only quarantined its inputs)."""
    try:
        table = read_table(root, "lineage", options=options)
    except Exception:  # no run finished starting yet
        return {}
    return {r["run_id"]: r for r in table.select(["run_id", "round", "stage", "params_json"]).to_pylist()}


def run_thresholds(runs: dict[str, dict], run_ids: set[str] | None) -> dict[str, list[float]]:
    """The generator's score thresholds (pred_iou_thresh, stability_score_thresh) each run
    used, from the lineage rows' params_json."""
    out: dict[str, list[float]] = {}
    for run_id, row in runs.items():
        params = row["params_json"]
        if run_ids is not None and run_id not in run_ids:
            continue
        try:
            amg = json.loads(params).get("amg") or {}
        except (ValueError, AttributeError):
            continue
        for key in ("pred_iou_thresh", "stability_score_thresh"):
            if isinstance(amg.get(key), (int, float)):
                out.setdefault(key, []).append(float(amg[key]))
    return out
