"""The data-quality report and the live metrics, on a dataset made by the real pipeline.

One local Ray cluster with a Prometheus endpoint runs the pipeline once on the mixed input
folder of test_pipeline (photos, scenes, copies, broken files). Then:
- every number on the page is recomputed here from the Parquet files and side tables,
  another way than dashboards/ computes it (whole-table reads, per-mask Python loops,
  brute-force convex hulls);
- the page is opened in headless Chromium (when installed) through the DevTools protocol:
  no console error or failed load, every figure present and drawn, a screenshot;
- the samengine metrics the writer actor recorded are read from the Prometheus endpoint
  and compared with the run summary.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
from deltalake import DeltaTable
from PIL import Image as PILImage
from pycocotools import mask as coco_mask
from scipy.spatial import ConvexHull

from dashboards import build_report, write_round_metrics
from dashboards.page import FIGURE_IDS
from dataset import DatasetWriter
from dataset.lineage import new_lineage
from dataset.storage import RUNS_DIR
from dataset.synthetic import image_records
from jobs.auto_annotate import load_config
from jobs.report import main as report_main
from pipeline.graph import run
from tests.s3server import free_port
from tests.test_pipeline import make_inputs

BINS = np.linspace(0.0, 1.0, 41)
# A small grid with low thresholds: the bundled (weak) checkpoint then keeps some masks and
# the IoU and stability filters both drop some, so the funnel has steps to show.
AMG_FLAGS = ["--points-per-side", "4", "--pred-iou-thresh", "0.1", "--stability-score-thresh", "0.05"]
SAMPLE = 4  # --sample-images: fewer than the 5 annotated images, so the page must say it sampled


# -- the dataset, made once ------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster():
    port = free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, _metrics_export_port=port)
    yield port
    ray.shutdown()


@pytest.fixture(scope="module")
def made(cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    make_inputs(tmp / "in")
    root = str(tmp / "dataset")
    t0 = time.monotonic()
    summary = run(load_config(["--input", str(tmp / "in"), "--output", root, *AMG_FLAGS, "--chunk-images", "3"]))
    print(f"pipeline run: {time.monotonic() - t0:.1f} s")
    return {"root": root, "summary": summary, "tmp": tmp, "finished": time.monotonic()}


# -- independent computation from the Parquet files --------------------------------------------
def version_rows(root: str, version: int | None = None) -> list[dict]:
    """Every image row of a version, from the Parquet files the Delta log lists."""
    dt = DeltaTable(f"{root}/annotations", version=version)
    files = dt.file_uris()
    if not files:
        return []
    return pq.read_table(files, columns=["image_id", "uri", "width", "height", "annotations"]).to_pylist()


def side_rows(root: str, name: str) -> list[dict]:
    files = DeltaTable(f"{root}/{name}").file_uris()
    return pq.read_table(files).to_pylist() if files else []


def hull_concavity(mask: np.ndarray) -> float:
    """1 - area / area of the convex hull of every pixel's four corners (brute force)."""
    ys, xs = np.nonzero(mask)
    corners = np.concatenate([np.stack([xs + dx, ys + dy], 1) for dx in (0, 1) for dy in (0, 1)]).astype(float)
    return 1.0 - mask.sum() / ConvexHull(corners).volume


def expected_numbers(rows: list[dict]) -> dict:
    masks = [(r, m) for r in rows for m in r["annotations"]]
    rel = [np.sqrt(m["area"] / (r["width"] * r["height"])) for r, m in masks]
    centres = np.zeros((24, 24), np.int64)
    edges = np.linspace(0, 1, 25)
    for r, m in masks:
        if m["area"] == 0:
            continue
        x, y, w, h = m["bbox"]
        cx, cy = (x + w / 2) / r["width"], (y + h / 2) / r["height"]
        col = min(int(np.searchsorted(edges, cx, side="right")) - 1, 23)
        row = min(int(np.searchsorted(edges, cy, side="right")) - 1, 23)
        centres[row, col] += 1

    def hist(values):
        values = np.array([v for v in values if v is not None and not np.isnan(v)], float)
        return np.histogram(np.clip(values, 0, 1), bins=BINS)[0].tolist()

    per_image = Counter(len(r["annotations"]) for r in rows)
    return {
        "images": len(rows), "masks": len(masks), "empty_masks": sum(m["area"] == 0 for _, m in masks),
        "masks_per_image": {str(k): v for k, v in sorted(per_image.items())},
        "relative_size": hist(rel), "centres": centres.tolist(),
        "predicted_iou": hist([m["predicted_iou"] for _, m in masks]),
        "stability_score": hist([m["stability_score"] for _, m in masks]),
    }


class PageParser(HTMLParser):
    """Ids, data-value attributes, tiles and the embedded JSON of a report page."""

    def __init__(self):
        super().__init__()
        self.ids, self.values, self.tiles, self.svgs_in, self._json, self.data = set(), {}, [], Counter(), False, ""
        self._figure = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if "data-value" in a:
            self.values[a["id"]] = a["data-value"]
        if tag == "figure":
            self._figure.append(a.get("id"))
            if "data-image-id" in a:
                self.tiles.append(a["data-image-id"])
        if tag in ("svg", "img"):
            for f in self._figure:
                if f:
                    self.svgs_in[f] += 1
        self._json = tag == "script" and a.get("id") == "report-data"

    def handle_endtag(self, tag):
        if tag == "figure" and self._figure:
            self._figure.pop()
        if tag == "script":
            self._json = False

    def handle_data(self, data):
        if self._json:
            self.data += data


def parse(html: str) -> PageParser:
    p = PageParser()
    p.feed(html)
    p.data = json.loads(p.data)
    return p


@pytest.fixture(scope="module")
def report(made):
    """The report of the latest version through the CLI, after the engine wrote two rounds."""
    root = made["root"]
    calibration = {"pred_iou_thresh": 0.35, "stability_score_thresh": 0.8, "precision": 0.71, "target_precision": 0.7}
    write_round_metrics(root, 0, {"miou": 0.42, "boundary_f": 0.31}, promoted=True, checkpoint="round0.pt",
                        stages={"auto": {"calibration": calibration}})
    write_round_metrics(root, 1, {"miou": 0.55, "boundary_f": 0.38}, promoted=False)
    out = made["tmp"] / "report.html"
    t0 = time.monotonic()
    assert report_main([root, "--out", str(out), "--sample-images", str(SAMPLE), "--gallery", "3"]) == 0
    print(f"report: {time.monotonic() - t0:.1f} s")
    html = out.read_text()
    return {"path": out, "html": html, "page": parse(html)}


# -- (a) the numbers ---------------------------------------------------------------------------
def test_pipeline_writes_a_report_at_the_end_of_its_run(made):
    root, summary = made["root"], made["summary"]
    latest = DeltaTable(f"{root}/annotations").version()
    assert summary["report"] == f"{root}/reports/version-{latest}.html"
    page = parse(Path(summary["report"]).read_text())
    assert page.data["version"] == latest and page.data["images"] == summary["annotated"] == 5
    assert page.data["funnel"] == summary["funnel"]


def test_report_numbers_match_the_parquet_files(made, report):
    root, summary = made["root"], made["summary"]
    page, data = report["page"], report["page"].data
    rows = version_rows(root)
    want = expected_numbers(rows)
    assert want["masks"] == summary["masks"] > 0
    for key, value in want.items():
        assert data[key] == value, key
    # Headline numbers as shown.
    assert int(page.values["kpi-images"]) == len(rows) and int(page.values["kpi-masks"]) == want["masks"]
    assert float(page.values["kpi-masks-per-image"]) == pytest.approx(want["masks"] / len(rows))
    assert int(page.values["version"]) == DeltaTable(f"{root}/annotations").version()

    # The sample: the SAMPLE images with the smallest sha256 of their id, in that order.
    order = sorted(rows, key=lambda r: hashlib.sha256(r["image_id"].encode()).digest())
    assert data["sample"]["image_ids"] == [r["image_id"] for r in order[:SAMPLE]]
    assert page.tiles == data["gallery"] == [r["image_id"] for r in order[:3]]  # all readable here
    assert f"the {SAMPLE} images with the smallest" in report["html"]

    # Concavity: every non-empty mask of the sampled images, recomputed by brute force.
    sampled = [m for r in order[:SAMPLE] for m in r["annotations"]]
    ids = [m["id"] for m in sampled if m["area"] > 0]
    assert data["concavity"]["mask_ids"] == ids and data["concavity"]["images"] == SAMPLE
    values = [hull_concavity(coco_mask.decode({"size": m["segmentation"]["size"],
                                               "counts": m["segmentation"]["counts"].encode()}))
              for m in sampled if m["area"] > 0]
    assert data["concavity"]["counts"] == np.histogram(np.clip(values, 0, 1), bins=BINS)[0].tolist()

    # Funnel: the run summaries on disk.
    stored = [json.loads(p.read_text()) for p in (Path(root) / "runs").glob("*.json")]
    assert data["funnel"] == {k: sum(s["funnel"][k] for s in stored) for k in summary["funnel"]}
    assert data["funnel"]["kept"] == want["masks"] and data["funnel"]["candidates"] == 5 * 3 * 16
    assert data["funnel"]["iou"] < data["funnel"]["candidates"]  # the filters did filter
    assert data["thresholds"] == {"pred_iou_thresh": [0.1], "stability_score_thresh": [0.05]}  # drawn on fig-scores
    assert [r["run_id"] for r in data["runs"]] == [summary["run_id"]]

    # Side tables by reason / kind.
    assert data["duplicates"] == dict(Counter(d["kind"] for d in side_rows(root, "duplicates"))) == \
        {"exact": 1, "near": 1}
    assert data["quarantine"] == dict(Counter(q["reason"].split(":")[0] for q in side_rows(root, "quarantine"))) == \
        {"empty_file": 1, "not_an_image": 1, "truncated": 1}

    # Rounds: masks per image of round 0 from the masks, held-out metrics from rounds/*.json.
    by_round = {r["round"]: r for r in data["rounds"]}
    assert sorted(by_round) == [0, 1]
    assert by_round[0]["masks"] == want["masks"] and by_round[0]["images"] == sum(bool(r["annotations"]) for r in rows)
    assert by_round[0]["masks_per_image"] == pytest.approx(want["masks"] / by_round[0]["images"])
    assert by_round[0]["held_out"] == {"miou": 0.42, "boundary_f": 0.31} and by_round[0]["promoted"] is True
    assert by_round[1]["held_out"] == {"miou": 0.55, "boundary_f": 0.38} and by_round[1]["masks"] == 0
    assert "0.550" in report["html"] and "0.310" in report["html"]
    # Round 0's automatic stage ran with calibrated filters (engine.calibrate); round 1's had none.
    assert by_round[0]["auto_calibration"]["pred_iou_thresh"] == 0.35 and by_round[1]["auto_calibration"] is None
    assert "IoU &gt; 0.35, stability ≥ 0.80 (precision 0.71 of target 0.70)" in report["html"]

    # Every figure is on the page, each with a drawing in it.
    for fig in FIGURE_IDS:
        assert fig in page.ids and page.svgs_in[fig] >= 1, fig


def test_report_of_an_older_version(made, tmp_path):
    """Pinned to the first commit: only the images of that commit, only this run's rejects."""
    root = made["root"]
    first = min(c for c in range(DeltaTable(f"{root}/annotations").version() + 1)
                if DeltaTable(f"{root}/annotations", version=c).file_uris())
    out = tmp_path / "v.html"
    assert report_main([root, "--version", str(first), "--out", str(out), "--sample-images", "2", "--gallery", "0"]) == 0
    data = parse(out.read_text()).data
    rows = version_rows(root, first)
    assert data["version"] == first and 0 < data["images"] == len(rows) < 5
    assert data["masks"] == sum(len(r["annotations"]) for r in rows)
    assert data["side_scope"] == "the 1 run(s) of this version" and sum(data["quarantine"].values()) == 3


def test_report_out_in_missing_folders_or_where_it_cannot_be_written(made, tmp_path, capsys):
    """Missing folders of --out are made; an --out under a file or at a folder is one line, exit 2."""
    root = made["root"]
    out = tmp_path / "missing" / "dir" / "sub" / "r.html"
    assert report_main([root, "--out", str(out), "--sample-images", "2", "--gallery", "0"]) == 0
    assert parse(out.read_text()).data["root"] == root
    capsys.readouterr()
    (tmp_path / "file.txt").write_text("a file")
    for bad in (tmp_path / "file.txt" / "x.html", tmp_path / "file.txt" / "sub" / "x.html", tmp_path / "missing"):
        assert report_main([root, "--out", str(bad), "--sample-images", "2", "--gallery", "0"]) == 2, bad
        err = capsys.readouterr().err
        assert err.startswith(f"error: {bad}: ") and len(err.splitlines()) == 1, err
    assert (tmp_path / "file.txt").read_text() == "a file"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["dir", "file.txt", "missing", "r.html", "sub"]


def test_report_of_a_dataset_on_s3(made, report, tmp_path, capsys):
    """The same version copied to an S3 server: same numbers; the page is written beside it.
    A missing bucket is an error of the dataset, not of the --out it would be written to."""
    from tests.s3server import moto_server

    with moto_server("data") as endpoint:
        import boto3

        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        local = Path(made["root"])
        for path in local.rglob("*"):
            if path.is_file() and path.relative_to(local).parts[0] != "reports":
                client.put_object(Bucket="data", Key=f"ds/{path.relative_to(local)}", Body=path.read_bytes())
        written = report_main(["s3://data/ds", "--sample-images", str(SAMPLE), "--gallery", "3"]) == 0
        version = report["page"].data["version"]
        key = f"ds/reports/version-{version}.html"
        data = parse(client.get_object(Bucket="data", Key=key)["Body"].read().decode()).data
        capsys.readouterr()
        assert report_main(["s3://nobucket/ds", "--out", str(tmp_path / "x.html")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: cannot read the dataset at s3://nobucket/ds: NoSuchBucket")
        assert "x.html" not in err
        assert len(err.splitlines()) == 1, err
    assert written
    mine = report["page"].data
    for name in ("images", "masks", "masks_per_image", "relative_size", "centres", "predicted_iou",
                 "stability_score", "concavity", "sample", "funnel", "duplicates", "quarantine", "rounds",
                 "gallery", "thresholds"):
        assert data[name] == mine[name], name
    assert data["root"] == "s3://data/ds"


# -- (a) in a browser --------------------------------------------------------------------------
def _chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


class DevTools:
    """A headless Chromium driven over the DevTools protocol (one page, flat sessions)."""

    def __init__(self, binary: str, profile: str):
        self.proc = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--no-first-run", "--hide-scrollbars", f"--user-data-dir={profile}",
             "--remote-debugging-port=0", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        url = None
        while url is None and time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line and self.proc.poll() is not None:
                raise RuntimeError("chromium exited before DevTools came up")
            m = re.search(r"DevTools listening on (ws://\S+)", line)
            url = m and m.group(1)
        assert url, "no DevTools endpoint from chromium"
        from websockets.sync.client import connect

        self._stack = contextlib.ExitStack()
        self.ws = self._stack.enter_context(connect(url, max_size=None, open_timeout=30))
        self.next_id, self.events = 0, []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable", session=True)

    def call(self, method: str, session: bool = False, timeout: float = 60, **params):
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params}
        if session:
            msg["sessionId"] = self.session
        self.ws.send(json.dumps(msg))
        deadline = time.monotonic() + timeout
        while True:
            reply = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def open(self, url: str, timeout: float = 60) -> None:
        self.events.clear()
        self.call("Page.navigate", session=True, url=url)
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events):
            self.events.append(json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic()))))

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", session=True, expression=expression, returnByValue=True,
                           awaitPromise=True)
        return result["result"].get("value")

    def errors(self) -> list[str]:
        out = []
        for e in self.events:
            p = e.get("params", {})
            if e.get("method") == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in p["args"]))
            elif e.get("method") == "Runtime.exceptionThrown":
                out.append("exception: " + p["exceptionDetails"].get("text", ""))
            elif e.get("method") == "Log.entryAdded" and p["entry"]["level"] == "error":
                out.append("log: " + p["entry"].get("text", ""))
            elif e.get("method") == "Network.loadingFailed":
                out.append("load failed: " + p.get("errorText", ""))
        return out

    def close(self) -> None:
        try:
            self._stack.close()
        finally:
            self.proc.terminate()
            self.proc.wait(timeout=20)


def test_report_in_headless_chromium(report, tmp_path):
    binary = _chromium()
    if binary is None:
        pytest.skip("chromium is not installed (.ci/run installs Debian's chromium where apt works); "
                    "the page's numbers are checked by test_report_numbers_match_the_parquet_files")
    t0 = time.monotonic()
    browser = DevTools(binary, tempfile.mkdtemp(prefix="chromium-", dir=tmp_path))
    try:
        # The harness sees errors: a page that logs one and fails a load is caught.
        browser.open("data:text/html,<script>console.error('probe')</script><img src='file:///nonexistent.png'>")
        time.sleep(0.3)
        browser.call("Runtime.evaluate", session=True, expression="1")  # drain pending events
        seen = browser.errors()
        assert any("probe" in e for e in seen) and any(e.startswith(("load failed", "log")) for e in seen), seen

        browser.call("Emulation.setDeviceMetricsOverride", session=True, width=1280, height=900,
                     deviceScaleFactor=1, mobile=False)
        browser.open(report["path"].resolve().as_uri())
        time.sleep(0.3)
        figures = browser.evaluate(
            "JSON.stringify(" + json.dumps(list(FIGURE_IDS)) + ".map(id => { const e = document.getElementById(id);"
            " if (!e) return [id, 0, 0]; const r = e.getBoundingClientRect();"
            " const drawn = [...e.querySelectorAll('svg, img')].filter(s => { const b = s.getBoundingClientRect();"
            " return b.width > 50 && b.height > 50 && (s.tagName !== 'IMG' || (s.complete && s.naturalWidth > 0)); });"
            " return [id, Math.round(r.width * r.height), drawn.length]; }))")
        for fig, area, drawn in json.loads(figures):
            assert area > 0 and drawn >= 1, (fig, area, drawn)
        assert browser.evaluate("JSON.parse(document.getElementById('report-data').textContent).images") == 5
        assert browser.errors() == []
        shot = browser.call("Page.captureScreenshot", session=True, format="png", captureBeyondViewport=True)
    finally:
        browser.close()
    import base64

    png = base64.b64decode(shot["data"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 50_000
    (tmp_path / "report.png").write_bytes(png)
    if os.environ.get("SAMENGINE_REPORT_SCREENSHOT"):
        Path(os.environ["SAMENGINE_REPORT_SCREENSHOT"]).write_bytes(png)
    print(f"chromium: {time.monotonic() - t0:.1f} s, screenshot {tmp_path / 'report.png'}")


# -- (a) on tiny datasets written with the DatasetWriter (no pipeline, no Ray) -------------------
def write_run(root: str, chunks: list[list[dict]], round: int = 0, summary: dict | None = None) -> tuple[str, list]:
    """One run committing each chunk of image records; with `summary`, its runs/<run_id>.json
    as the pipeline writes it. Returns its run id and its versions."""
    writer = DatasetWriter(root, new_lineage(round=round, stage="auto"))
    writer.start_run()
    versions = [writer.commit_images(chunk) for chunk in chunks]
    run_id = writer.lineage.run_id
    if summary is not None:
        (Path(root) / RUNS_DIR).mkdir(parents=True, exist_ok=True)
        (Path(root) / RUNS_DIR / f"{run_id}.json").write_text(json.dumps({"run_id": run_id, **summary}))
    return run_id, versions


def test_runs_show_the_versions_own_images_and_mark_a_run_only_partly_in_it(tmp_path):
    """A version pinned mid-run, and the latest after rows of the run were removed: each run's
    images and masks are the rows the version holds; the summary's numbers (funnel, annotated,
    masks, ...) are whole-run totals and say so; the run is marked as only partly there."""
    root = str(tmp_path / "ds")
    records = image_records(5, 3)
    summary = {"processed": 6, "annotated": 5, "duplicate": 0, "quarantined": 1, "masks": 15, "seconds": 2.5,
               "funnel": {"candidates": 100, "iou": 60, "stability": 40, "crop_edge": 40, "kept": 15}}
    run_id, (first, last) = write_run(root, [records[:2], records[2:]], summary=summary)

    html, data = build_report(root, version=first, gallery_images=0)
    (run,) = data["runs"]
    assert (run["run_id"], run["images"], run["masks"]) == (run_id, 2, 6) == (run_id, data["images"], data["masks"])
    assert (run["annotated"], run["run_masks"], run["later_version"]) == (5, 15, last)
    assert run["part"] == f"its commits after this version (up to version {last}) are not in it"
    assert data["partial_runs"] == [run_id] and data["funnel"]["kept"] == 15
    assert f"<td><code>{run_id}</code></td><td>0</td><td>auto</td><td>2</td><td>6</td><td>6</td><td>5</td>" in html
    assert f"only part of this run is in version {first}: its commits after this version" in html
    assert "<b>Whole-run totals</b>" in html and "1 of them only partly in this version" in html
    assert "this version does not hold (it holds 6)" in html
    assert f'data-value="{first}">{first}</code>\n· generated' in html  # not "version 1 (version 1)"

    DeltaTable(f"{root}/annotations").delete(f"image_id = '{records[4]['image_id']}'")
    html, data = build_report(root, gallery_images=0)
    (run,) = data["runs"]
    assert (run["images"], run["masks"], run["later_version"]) == (4, 12, None) == (4, data["masks"], None)
    assert run["part"] == "1 of the 5 images it annotated are not in it"
    assert f'data-value="{data["version"]}">{data["version"]}</code> (latest)' in html

    _, (other,) = write_run(root, [image_records(7, 2)[5:]], summary={**summary, "annotated": 2, "masks": 4})
    data = build_report(root, gallery_images=0)[1]
    assert [(r["images"], r["masks"], r["part"] is None) for r in data["runs"]] == [(4, 12, False), (2, 4, True)]


def test_rounds_count_their_images_without_masks_and_a_version_without_masks(tmp_path):
    """A round's images are also those it committed without a mask, as the headline and the
    engine's rounds/<round>.json count them; a version with no mask shows no mean size."""
    root = str(tmp_path / "ds")
    records = image_records(5, 2)
    for r in (records[0], records[1], records[4]):
        r["annotations"] = []
    _, (empty,) = write_run(root, [records[:2]], round=0)
    write_run(root, [records[2:]], round=1)

    html, data = build_report(root, version=empty, gallery_images=0)
    assert (data["images"], data["masks"], data["mean_relative_size"]) == (2, 0, None)
    assert "mean –. Share of masks per bin" in html
    assert [(r["round"], r["images"], r["masks"], r["masks_per_image"]) for r in data["rounds"]] == [(0, 2, 0, 0.0)]

    html, data = build_report(root, gallery_images=0)
    assert [(r["round"], r["images"], r["masks"], r["masks_per_image"]) for r in data["rounds"]] == \
        [(0, 2, 0, 0.0), (1, 3, 4, 4 / 3)]
    assert sum(r["images"] for r in data["rounds"]) == data["images"] == 5
    assert data["mean_relative_size"] > 0 and "Images of a round = those holding a mask" in html


def test_gallery_skips_an_image_changed_since_it_was_annotated_and_names_a_missing_one(tmp_path):
    """Only the size used to be compared: same-size new bytes got the old masks drawn on them."""
    from dashboards.gallery import tile
    from dataset.synthetic import encode_masks

    path = tmp_path / "img.png"
    rng = np.random.default_rng(0)
    PILImage.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(path)
    mask = np.zeros((1, 30, 40), bool)
    mask[0, 5:20, 10:30] = True
    row = {"image_id": hashlib.sha256(path.read_bytes()).hexdigest(), "uri": str(path), "width": 40, "height": 30,
           "annotations": [{"segmentation": encode_masks(mask)[0]}]}
    assert tile(row)["src"].startswith("data:image/jpeg;base64,")
    PILImage.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(path)  # same size, other pixels
    assert tile(row)["skipped"] == "image changed since it was annotated" and "src" not in tile(row)
    path.unlink()
    assert tile(row)["skipped"] == "missing"  # the reason quarantine gives


# -- (b) live metrics --------------------------------------------------------------------------
def scrape(port: int) -> dict[str, list[tuple[dict, float]]]:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if "samengine" in s.name:
                out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def by_tag(samples: dict, name: str, tag: str) -> dict[str, float]:
    out: Counter = Counter()
    for labels, value in samples.get(name, []):
        out[labels.get(tag, "")] += value
    return dict(out)


def test_live_metrics_on_the_prometheus_endpoint(cluster, made):
    summary = made["summary"]
    want = {"ray_samengine_images_total", "ray_samengine_masks_kept_total", "ray_samengine_funnel_masks_total",
            "ray_samengine_filter_dropped_total", "ray_samengine_stage_seconds_count",
            "ray_samengine_masks_per_image_count", "ray_samengine_quarantined_total"}
    deadline, samples = made["finished"] + 60, {}
    while time.monotonic() < deadline:
        try:
            samples = scrape(cluster)
        except OSError:
            samples = {}
        images = by_tag(samples, "ray_samengine_images_total", "status")
        if want <= set(samples) and sum(images.values()) >= summary["processed"]:
            break
        time.sleep(1)
    assert want <= set(samples), sorted(samples)
    assert by_tag(samples, "ray_samengine_images_total", "status") == \
        {"annotated": summary["annotated"], "duplicate": summary["duplicate"], "quarantined": summary["quarantined"]}
    assert by_tag(samples, "ray_samengine_quarantined_total", "reason") == summary["quarantine_reasons"]
    assert sum(v for _, v in samples["ray_samengine_masks_kept_total"]) == summary["masks"]
    funnel = by_tag(samples, "ray_samengine_funnel_masks_total", "step")
    assert {k: v for k, v in funnel.items()} == {k: v for k, v in summary["funnel"].items() if v}
    f = summary["funnel"]
    drops = {"iou": f["candidates"] - f["iou"], "stability": f["iou"] - f["stability"],
             "crop_edge": f["stability"] - f["crop_edge"], "nms_cleanup": f["crop_edge"] - f["kept"]}
    assert by_tag(samples, "ray_samengine_filter_dropped_total", "filter") == {k: v for k, v in drops.items() if v}
    # Every input was read; every one not quarantined went through dedup; the annotated ones
    # through the model.
    seconds = by_tag(samples, "ray_samengine_stage_seconds_count", "stage")
    assert seconds["read"] == summary["processed"] == seconds["write"]
    assert seconds["dedup"] == summary["processed"] - summary["quarantined"]
    assert seconds["encode"] == summary["annotated"]
    assert by_tag(samples, "ray_samengine_masks_per_image_count", "")[""] == summary["annotated"]


class FakeMetric:
    def __init__(self):
        self.calls: list[tuple[float, dict]] = []

    def inc(self, value, tags=None):
        assert value > 0  # Ray's Counter refuses non-positive increments
        self.calls.append((value, tags or {}))

    def observe(self, value, tags=None):
        self.calls.append((value, tags or {}))

    def by(self, tag: str) -> dict:
        out: Counter = Counter()
        for value, tags in self.calls:
            out[tags.get(tag, "")] += value
        return dict(out)


def test_metrics_record_a_writer_batch_without_ray():
    """Every filter drops something here (the pipeline run above has no crop-edge drops)."""
    from actors import metrics

    m = {k: FakeMetric() for k in ("images", "quarantined", "masks", "funnel", "dropped", "seconds", "masks_per_image")}
    funnel = [{"candidates": 48, "iou": 30, "stability": 20, "crop_edge": 12, "kept": 7},
              {"candidates": 48, "iou": 10, "stability": 9, "crop_edge": 9, "kept": 0}]
    batch = {
        "status": np.array(["annotated", "duplicate", "quarantined", "annotated", "quarantined"], object),
        "reason": np.array(["", "", "truncated: 300 bytes", "", "encode_error: boom"], object),
        "masks": np.array([7, 0, 0, 0, 0]),
        "funnel": np.array([json.dumps(funnel[0]), "", "", json.dumps(funnel[1]), ""], object),
        "t_read": np.array([0.1, 0.2, 0.3, 0.1, 0.1]), "t_encode": np.array([1.5, 0.0, 0.0, 1.2, 0.4]),
        "t_write": np.full(5, 0.01),
    }
    metrics._record(batch, m)
    assert m["images"].by("status") == {"annotated": 2, "duplicate": 1, "quarantined": 2}
    assert m["quarantined"].by("reason") == {"truncated": 1, "encode_error": 1}
    assert m["masks"].by("") == {"": 7} and sorted(v for v, _ in m["masks_per_image"].calls) == [0, 7]
    assert m["funnel"].by("step") == {"candidates": 96, "iou": 40, "stability": 29, "crop_edge": 21, "kept": 7}
    assert m["dropped"].by("filter") == {"iou": 56, "stability": 11, "crop_edge": 8, "nms_cleanup": 14}
    seconds = m["seconds"].by("stage")
    assert seconds == pytest.approx({"read": 0.8, "encode": 3.1, "write": 0.05})
    assert len([1 for _, t in m["seconds"].calls if t["stage"] == "encode"]) == 3


def test_report_of_a_run_that_only_quarantined(cluster, tmp_path):
    """A run whose inputs were all quarantined makes no annotations commit: its round and
    stage in "Runs in this version" come from its lineage row, not a dash. Last in this
    module: its pipeline run adds to the cluster's metrics, which
    test_live_metrics_on_the_prometheus_endpoint compares with the made run's alone."""
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (tmp_path / "in").mkdir(exist_ok=True)
        (tmp_path / "in" / name).write_text("x\n")
    root = str(tmp_path / "ds")
    summary = run(load_config(["--input", str(tmp_path / "in"), "--output", root, "--round", "2"]))
    assert summary["quarantined"] == 3 and summary["annotated"] == 0
    out = tmp_path / "r.html"
    assert report_main([root, "--out", str(out), "--gallery", "0"]) == 0
    html = out.read_text()
    runs = parse(html).data["runs"]
    assert [(r["run_id"], r["round"], r["stage"], r["quarantined"]) for r in runs] == \
        [(summary["run_id"], 2, "auto", 3)]
    assert f"<td><code>{summary['run_id']}</code></td><td>2</td><td>auto</td>" in html


def test_the_report_job_does_not_import_torch():
    """The report decodes RLE and draws overlays with numpy and pycocotools: importing torch
    and the model (through the amg package) cost it ~1 GB resident and ~5 s of start-up, on
    machines that only read a dataset."""
    import sys

    repo = Path(__file__).resolve().parents[1]
    code = "import sys, jobs.report, dashboards.gallery; print(sorted(m for m in ('torch', 'ray') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
