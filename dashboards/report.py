"""One dataset version -> one self-contained HTML page (see page.py for its structure).

    html, data = build_report(root, version=None, run_id=None, round=None)
    path = write_report(root)          # <root>/reports/version-<N>.html, local or s3://
"""
from __future__ import annotations

import datetime as dt
from collections import Counter
from pathlib import Path

import numpy as np

from dataset import open_dataset, resolve_version, storage_options
from dataset.reader import open_version, reading
from dataset.storage import REPORTS_DIR, RUNS_DIR

from . import figures, page, sources, stats
from .gallery import tile

FUNNEL_STEPS = (("candidates", "candidates"), ("iou", "after IoU filter"), ("stability", "after stability filter"),
                ("crop_edge", "after crop-edge filter"), ("kept", "kept (after NMS + cleanup)"))


def build_report(root: str, *, version: int | None = None, run_id: str | None = None, round: int | None = None,
                 endpoint_url: str | None = None, sample_images: int = 64, max_concavity_masks: int = 1000,
                 gallery_images: int = 8) -> tuple[str, dict]:
    """The page and the numbers on it, for the version pinned by version / run_id / round
    (none: the latest)."""
    options = storage_options(root, endpoint_url)
    latest = open_version(root, options=options).version()
    pinned_by = ("latest" if version is None and run_id is None and round is None else
                 f"version {version}" if version is not None else
                 f"last commit of run {run_id}" if run_id is not None else f"last commit of round {round}")
    v = resolve_version(root, version=version, run_id=run_id, round=round, options=options)
    dataset = open_dataset(root, options=options, version=v)

    st = stats.VersionStats()
    with reading(root):
        stats.scan(dataset, st, sample_images)
        rows = list(stats.read_sample(dataset, st))
    stats.measure_concavity(st, rows, max_concavity_masks)
    tiles = [tile(r, endpoint_url) for r in rows[:gallery_images]]

    fs = sources.root_filesystem(root, options)
    runs = sources.version_runs(root, v, options)
    # Side tables and run summaries carry run ids, not versions: the latest version takes
    # every run (also those that committed no image); an older one the runs it holds.
    run_ids = None if v == latest else {r["run_id"] for r in runs}
    summaries = {s["run_id"]: s for s in sources.read_json_dir(fs, RUNS_DIR) if "run_id" in s}
    funnel_runs = [s for rid, s in summaries.items() if run_ids is None or rid in run_ids]
    funnel = Counter()
    for s in funnel_runs:
        funnel.update({k: int(n) for k, n in (s.get("funnel") or {}).items()})
    lineage = sources.lineage(root, options)
    run_table = _run_table(st, runs, lineage, summaries, funnel_runs)

    round_files = sources.rounds(fs)
    data = {
        "root": root, "version": v, "latest_version": latest, "pinned_by": pinned_by,
        "generated_at": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "images": st.images, "masks": st.masks, "empty_masks": st.empty_masks,
        "mean_masks_per_image": st.masks / st.images if st.images else None,
        "images_without_masks": st.masks_per_image.get(0, 0),
        "masks_per_image": {str(k): n for k, n in sorted(st.masks_per_image.items())},
        "unit_bins": stats.UNIT_BINS.tolist(),
        "relative_size": st.relative_size.tolist(),
        "mean_relative_size": st.relative_size_sum / st.masks if st.masks else None,
        "centres_bins": stats.CENTRE_BINS, "centres": st.centres.tolist(),
        "predicted_iou": st.predicted_iou.tolist(), "stability_score": st.stability.tolist(),
        "scores_missing": dict(st.scores_missing),
        "concavity": {"counts": st.concavity.tolist(), "mask_ids": st.concavity_mask_ids,
                      "images": st.concavity_images},
        "sample": {"images": len(st.sample), "image_ids": [s.image_id for s in st.sample],
                   "max_concavity_masks": max_concavity_masks},
        "funnel": {k: funnel.get(k, 0) for k, _ in FUNNEL_STEPS},
        "funnel_steps": [(label, funnel.get(k, 0)) for k, label in FUNNEL_STEPS],
        "funnel_runs": [s["run_id"] for s in funnel_runs],
        "runs": run_table,
        "partial_runs": [r["run_id"] for r in run_table if r["part"]],
        "images_without_run": st.images_by_run.get(None, 0),
        "side_scope": "every run" if run_ids is None else f"the {len(run_ids)} run(s) of this version",
        "duplicates": dict(sources.side_counts(root, "duplicates", "kind", run_ids, options)),
        "quarantine": dict(sources.side_counts(root, "quarantine", "reason", run_ids, options)),
        "thresholds": sources.run_thresholds(lineage, run_ids),
        "rounds": _rounds(st, round_files, _round_of_runs(runs, lineage)),
        "gallery": [t["image_id"] for t in tiles if "src" in t],
        "gallery_skipped": {t["image_id"]: t["skipped"] for t in tiles if "skipped" in t},
    }
    data["held_out_metrics"] = sorted({m for r in data["rounds"] for m in r["held_out"]})
    edges = data["unit_bins"]
    svgs = {
        "masks_per_image": figures.masks_per_image(dict(st.masks_per_image)),
        "relative_size": figures.unit_histogram(edges, data["relative_size"], "√(mask area / image area)", "size"),
        "centres": figures.centres(data["centres"]),
        "concavity": figures.unit_histogram(edges, data["concavity"]["counts"], "concavity (1 − area / hull area)",
                                            "concavity", color=figures.ACCENT_2, empty="no masks in the sample"),
        "scores": figures.scores(edges, data["predicted_iou"], data["stability_score"], data["thresholds"]),
        "funnel": figures.funnel(data["funnel_steps"]),
        "rejects": figures.rejects(data["quarantine"], data["duplicates"]),
        "rounds": figures.rounds(data["rounds"], data["held_out_metrics"]),
    }
    return page.render(data, svgs, tiles), data


RUN_TOTALS = ("processed", "annotated", "duplicate", "quarantined", "masks", "seconds")


def _run_table(st: stats.VersionStats, runs: list[dict], lineage: dict[str, dict], summaries: dict[str, dict],
               summarized: list[dict]) -> list[dict]:
    """A row per run of the version (those with a summary or commits), oldest first:
    run_id, round and stage (its lineage row, which every run has, also one that made no
    annotations commit; else its commits), first/last/later_version (sources.version_runs);
    images and masks: the rows of this version the run wrote; processed, annotated,
    duplicate, quarantined, run_masks, seconds: whole-run totals from its summary (None
    without one); part: why the version holds only part of the run (None: all of it)."""
    commits = {r["run_id"]: r for r in runs}
    ids = [s["run_id"] for s in summarized] + [r["run_id"] for r in runs if r["run_id"] not in summaries]
    table = []
    for rid in ids:
        row = {"run_id": rid, "round": None, "stage": None, "first_version": None, "last_version": None,
               "later_version": None}
        if rid in lineage:
            row.update(round=lineage[rid]["round"], stage=lineage[rid]["stage"])
        row.update(commits.get(rid, {}))
        summary = summaries.get(rid, {})
        row.update({("run_masks" if k == "masks" else k): summary.get(k) for k in RUN_TOTALS})
        row.update(images=st.images_by_run.get(rid, 0), masks=st.masks_by_run.get(rid, 0))
        annotated = row["annotated"]
        row["part"] = (f"its commits after this version (up to version {row['later_version']}) are not in it"
                       if row["later_version"] is not None else
                       f"{annotated - row['images']:,} of the {annotated:,} images it annotated are not in it"
                       if isinstance(annotated, int) and row["images"] < annotated else None)
        table.append(row)
    # Oldest first; runs that committed no annotations (they only quarantined) last.
    return sorted(table, key=lambda r: (r["first_version"] is None, r["first_version"] or 0))


def _round_of_runs(runs: list[dict], lineage: dict[str, dict]) -> dict[str, int]:
    """run_id -> round, from the lineage rows, else from the runs' commits."""
    rounds = {r["run_id"]: r["round"] for r in runs} | {rid: row["round"] for rid, row in lineage.items()}
    return {rid: int(r) for rid, r in rounds.items() if r is not None}


def _rounds(st: stats.VersionStats, files: dict[int, dict], round_of: dict[str, int]) -> list[dict]:
    """A row per round: its images are those holding a mask of the round, plus those its runs
    committed without a mask, so that they add up to the version's images and agree with the
    data engine's rounds/<round>.json."""
    masks, by_stage = Counter(), {}
    for (r, stage), n in st.masks_by_round_stage.items():
        masks[int(r)] += n
        by_stage.setdefault(int(r), Counter())[stage] += n
    images = Counter(st.images_by_round)
    for rid, n in st.maskless_by_run.items():
        if n and rid in round_of:
            images[round_of[rid]] += n
    out = []
    for r in sorted(set(masks) | set(files) | {r for r, n in images.items() if n}):
        f = files.get(r, {})
        out.append({"round": r, "images": images[r], "masks": masks.get(r, 0),
                    "masks_by_stage": dict(sorted(by_stage.get(r, {}).items())),
                    "masks_per_image": masks.get(r, 0) / images[r] if images[r] else None,
                    "engine_masks_per_image": f.get("masks_per_image"),
                    "held_out": {k: float(v) for k, v in (f.get("held_out") or {}).items()
                                 if isinstance(v, (int, float)) and np.isfinite(v)},
                    "promoted": f.get("promoted"), "checkpoint": f.get("checkpoint"),
                    "auto_calibration": ((f.get("stages") or {}).get("auto") or {}).get("calibration")})
    return out


class DestinationError(OSError):
    """The local `out` of a report cannot be written (the dataset's own failures stay other
    OSErrors, so that callers blame the right path)."""


def write_report(root: str, *, out: str | None = None, **kwargs) -> str:
    """Build the report and write it to `out` (a local path; missing folders are made) or, by
    default, to <root>/reports/version-<N>.html; returns where it went. A local `out` that is
    a folder, or whose folder cannot be made, is a DestinationError before the report is built."""
    if out is not None:
        _prepare_local(Path(out))
    html, data = build_report(root, **kwargs)
    if out is not None:
        try:
            with open(out, "w", encoding="utf-8") as f:
                f.write(html)
        except OSError as e:
            raise DestinationError(str(e)) from e
        return out
    fs = sources.root_filesystem(root, storage_options(root, kwargs.get("endpoint_url")))
    fs.create_dir(REPORTS_DIR, recursive=True)
    path = f"{REPORTS_DIR}/version-{data['version']}.html"
    with fs.open_output_stream(path) as f:
        f.write(html.encode("utf-8"))
    return f"{root.rstrip('/')}/{path}"


def _prepare_local(out: Path) -> None:
    """Make out's missing folders and refuse a folder as out, so that these mistakes cost no
    build; nothing is created at out itself, so a failed build leaves no empty page."""
    if out.is_dir():
        raise DestinationError(f"a folder; name the HTML file to write, such as {out / 'report.html'}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # mkdir's word for a file where the folder should be
        raise DestinationError(f"{out.parent} is a file, not a folder") from None
    except OSError as e:
        raise DestinationError(str(e)) from e
