"""Assisted-manual stage: the annotation service on a real Ray Serve app over HTTP on
127.0.0.1, driven by the simulated annotator over synthetic scenes with ground truth.

Asserts protocol and data correctness (one encoder run per image, every click answered
from the cache, accepted masks committed as stage "manual" and decoding to what the
service returned), not model quality: the bundled checkpoint is an early, weak one."""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image
from pycocotools import mask as coco_mask

from amg.rle import to_coco_rle
from engine.annotator import EngineClient, EngineError, SimulatedAnnotator, next_click
from engine.cache import EmbeddingCache
from training.synthetic import make_scene

ROOT = Path(__file__).resolve().parents[1]
ROUND = 1


def write_scenes(folder: Path, seeds: list[int], size=(200, 272)) -> dict[str, np.ndarray]:
    """Synthetic scenes as PNG files; returns ground-truth masks by file path."""
    folder.mkdir(parents=True)
    truth = {}
    for seed in seeds:
        scene = make_scene(seed, size)
        path = folder / f"scene_{seed}.png"
        Image.fromarray(scene.image).save(path)
        truth[str(path)] = scene.masks
    return truth


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    import ray
    from ray import serve

    from engine.service import free_port, start

    tmp = tmp_path_factory.mktemp("manual")
    truth = write_scenes(tmp / "images", [11, 12, 13])
    output = str(tmp / "dataset")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        url = start({"images": str(tmp / "images"), "output": output, "stage": "manual", "round": ROUND,
                     "run_id": "manual-test", "torch_threads": 1}, port=free_port())
        yield {"url": url, "truth": truth, "output": output}
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def session(service):
    """The simulated annotator's pass over every image: what the other tests inspect."""
    client = EngineClient(service["url"])
    listing = client.images()
    annotator = SimulatedAnnotator(client, max_clicks=3, target_iou=0.9, max_objects=3)
    results = [annotator.annotate(e["index"], service["truth"][e["uri"]]) for e in listing["images"]]
    return {"client": client, "listing": listing, "results": results}


def test_page_is_served(service):
    page = requests.get(service["url"] + "/", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script src="app.js"></script>' in page.text and 'id="overlay"' in page.text
    script = requests.get(service["url"] + "/app.js", timeout=30)
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    for endpoint in ("/api/images", "/api/predict", "/api/commit"):
        assert endpoint in script.text
    png = requests.get(service["url"] + "/api/images/0/image.png", timeout=30)
    decoded = np.asarray(Image.open(io.BytesIO(png.content)))
    first = sorted(service["truth"])[0]
    assert np.array_equal(decoded, np.asarray(Image.open(first).convert("RGB")))


def test_clicks_are_answered_from_the_cached_embedding(session):
    client, results = session["client"], session["results"]
    stats = client.stats()
    n_images = len(session["listing"]["images"])
    assert n_images == 3 and all(r["opened"]["encoded"] for r in results)
    # One encoder run per image, at open; every click after it came from the cache.
    assert stats["encodes"] == n_images
    assert stats["predicts"] == len(client.clicks) > n_images
    assert not any(c["encoded"] for c in client.clicks)
    assert stats["cache_items"] == n_images and stats["cache_hits"] >= len(client.clicks)
    again = client.open(0)
    assert not again["encoded"] and again["committed"]
    assert client.stats()["encodes"] == n_images

    round_trip = np.array([c["round_trip_ms"] for c in client.clicks])
    server = np.array([c["server_ms"] for c in client.clicks])
    report = {"clicks": len(round_trip), "round_trip_ms_median": float(np.median(round_trip)),
              "round_trip_ms_p90": float(np.percentile(round_trip, 90)),
              "server_ms_median": float(np.median(server)),
              "encode_ms_median": float(np.median([r["opened"]["encode_ms"] for r in results]))}
    print("\nper-click latency from the cached embedding:", json.dumps(report))


def test_accepted_masks_land_in_the_dataset_as_manual(service, session):
    from dataset import history, read_images, read_table
    from schemas import annotation_id

    results = session["results"]
    rows = {r["image_id"]: r for r in read_images(service["output"]).to_pylist()}
    assert len(rows) == len(results)
    total = 0
    for result in results:
        opened, outcomes = result["opened"], result["outcomes"]
        assert outcomes, "the annotator accepted no mask on an image"
        row = rows[opened["image_id"]]
        assert opened["image_id"] == hashlib.sha256(Path(opened["uri"]).read_bytes()).hexdigest()
        assert (row["uri"], row["width"], row["height"]) == (opened["uri"], opened["width"], opened["height"])
        assert result["commit"] == {"image_id": opened["image_id"], "version": result["commit"]["version"],
                                    "masks": len(outcomes), "stage": "manual", "round": ROUND}
        assert len(row["annotations"]) == len(outcomes)
        for i, (ann, outcome) in enumerate(zip(row["annotations"], outcomes.values())):
            sent = outcome.response
            assert ann["stage"] == "manual" and ann["round"] == ROUND
            assert ann["id"] == annotation_id(row["image_key"], i)
            # Stored exactly as the service returned it, and it decodes to that mask.
            assert ann["segmentation"]["counts"] == sent["segmentation"]["counts"]
            stored = coco_mask.decode(to_coco_rle(ann["segmentation"]))
            returned = coco_mask.decode(to_coco_rle(sent["segmentation"]))
            assert stored.shape == (opened["height"], opened["width"]) and np.array_equal(stored, returned)
            assert ann["area"] == int(stored.sum()) == sent["area"]
            assert list(ann["bbox"]) == [int(v) for v in coco_mask.toBbox(to_coco_rle(ann["segmentation"]))]
            assert ann["predicted_iou"] == pytest.approx(sent["score"])
            assert [tuple(p) for p in ann["point_coords"]] == outcome.points
            total += 1
    lineage = read_table(service["output"], "lineage").to_pylist()
    assert [(r["run_id"], r["stage"], r["round"]) for r in lineage] == [("manual-test", "manual", ROUND)]
    commits = [c for c in history(service["output"]) if c.get("table") == "annotations"]
    assert len(commits) == len(results) and {c["stage"] for c in commits} == {"manual"}
    assert total == sum(c["masks"] for c in commits)


def test_protocol_refuses_bad_requests(service, session):
    client = session["client"]
    opened = session["results"][0]["opened"]
    ref = {"index": 0, "image_id": opened["image_id"]}
    mask = session["results"][0]["masks"][0]

    with pytest.raises(EngineError) as e:  # an image is committed once
        client.commit(0, opened["image_id"], [mask])
    assert e.value.status == 409
    with pytest.raises(EngineError) as e:
        client.predict(**ref, points=[[5, 5]], labels=[1], mask_input="AAAA")
    assert e.value.status == 422 and "float16" in e.value.detail
    with pytest.raises(EngineError) as e:
        client.predict(**ref)  # no prompt at all
    assert e.value.status == 422
    w, h = opened["width"], opened["height"]
    for bad_prompt, says in ((dict(points=[[5, 5], [w + 40, 5]], labels=[1, 1]), "clicks outside"),
                             (dict(points=[[5, -1]], labels=[1]), "clicks outside"),
                             (dict(box=[w + 1, 0, w + 50, 20]), "box")):
        with pytest.raises(EngineError) as e:
            client.predict(**ref, **bad_prompt)
        assert e.value.status == 422 and says in e.value.detail and f"{w} x {h}" in e.value.detail
    client.predict(**ref, points=[[w, h]], labels=[1])  # the far corner is inside
    with pytest.raises(EngineError) as e:
        client.commit(1, opened["image_id"], [mask])
    assert e.value.status == 409  # index 1 is another image
    with pytest.raises(EngineError) as e:
        client.open(99)
    assert e.value.status == 404
    bad = {**mask, "segmentation": {"size": mask["segmentation"]["size"], "counts": "0" + mask["segmentation"]["counts"]}}
    other = session["results"][1]["opened"]
    with pytest.raises(EngineError) as e:
        client.commit(1, other["image_id"], [bad])
    assert e.value.status == 422
    # A box with the previous mask as prompt is answered too, at the model's low-res size.
    first = client.predict(**ref, box=[10, 10, 120, 90])
    out = client.predict(**ref, box=[10, 10, 120, 90], points=[[60, 50]], labels=[0], mask_input=first["low_res"])
    assert out["low_res_shape"] == [64, 64] and not out["encoded"]
    assert out["segmentation"]["size"] == [opened["height"], opened["width"]]


def test_a_click_on_a_cached_embedding_is_checked_against_its_index(service, session):
    """The embedding cache is keyed by image_id: a click naming an index that is not that
    image (out of range, or another image) is refused, not answered from the cache."""
    client = session["client"]
    opened = session["results"][0]["opened"]
    assert client.open(0)["encoded"] is False  # image 0's embedding is cached
    click = {"image_id": opened["image_id"], "points": [[5, 5]], "labels": [1]}
    with pytest.raises(EngineError) as e:
        client.predict(index=99, **click)
    assert e.value.status == 404 and "out of range" in e.value.detail
    with pytest.raises(EngineError) as e:
        client.predict(index=1, **click)
    assert e.value.status == 409 and "is not" in e.value.detail
    assert client.predict(index=0, **click)["encoded"] is False


def test_catalog_check_reads_an_image_once(tmp_path):
    from engine.images import ImageCatalog

    write_scenes(tmp_path / "images", [11, 12])
    catalog = ImageCatalog.from_spec(str(tmp_path / "images"), max_bytes=1 << 24)
    ids = [hashlib.sha256(Path(u).read_bytes()).hexdigest() for u in catalog.uris]
    assert catalog.check(0, ids[0]).image_id == ids[0]  # read once...
    assert catalog.check(0, ids[0]) is None  # ...then known without a read
    with pytest.raises(KeyError, match="is not"):
        catalog.check(1, ids[0])
    with pytest.raises(KeyError, match="is not"):
        catalog.check(0, ids[1])
    with pytest.raises(IndexError, match="out of range"):
        catalog.check(2, ids[0])


def test_service_without_images_is_refused_in_one_line(tmp_path, capsys):
    """The service lists its images once, at start (an index must name the same image on
    every replica): started on an empty folder or dataset, or a wrong path, it says so in one
    line and exits 2 before starting Ray, instead of a failed Serve deployment."""
    from dataset import DatasetWriter
    from dataset.lineage import new_lineage
    from jobs import annotate_service

    (tmp_path / "empty").mkdir()
    DatasetWriter(str(tmp_path / "nothing_yet"), new_lineage(round=0, stage="auto")).start_run()
    for argv, says in ((["--images", str(tmp_path / "empty")], "lists no inputs"),
                       (["--images", str(tmp_path / "typo")], "is not a folder, file, glob"),
                       (["--images-from", str(tmp_path / "nothing_yet")], "lists no images"),
                       (["--images-from", str(tmp_path / "typo")], "no dataset at")):
        assert annotate_service.main([*argv, "--output", str(tmp_path / "out")]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and says in err and "lists its images once, at start" in err, err
        assert len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_service_with_invalid_settings_is_refused_in_one_line(tmp_path, capsys):
    """Settings the service's model refuses are one line and exit 2, as in the other jobs,
    not a pydantic traceback: the output named as the images' own dataset, and two bad
    values at once (each field named)."""
    from jobs import annotate_service

    root = str(tmp_path / "ds")
    for argv, says in (
            (["--images-from", root, "--output", root],
             "error: invalid settings: output must be a different dataset root from the one images or pre-fill "
             "come from"),
            (["--images", str(tmp_path), "--output", str(tmp_path / "out"), "--replicas", "0", "--cache-mb", "0"],
             "error: invalid settings: cache_bytes: Input should be greater than 0 (got 0); num_replicas: "
             "Input should be greater than or equal to 1 (got 0)")):
        assert annotate_service.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err == says + "\n", err
    # A round out of range is refused by the flag itself (jobs/arg_types.round_number).
    with pytest.raises(SystemExit) as e:
        annotate_service.main(["--images", str(tmp_path), "--output", str(tmp_path / "out"), "--round", "-1"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("argument --round: must be >= 0, got -1")
    assert not (tmp_path / "out").exists()


def chromium() -> str | None:
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


def browser_command(tmp_path: Path) -> list[str]:
    return [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=60000",
            f"--user-data-dir={tmp_path / 'profile'}"]


def page_mask(url: str, tmp_path: Path, expected: dict) -> str:
    """Load the page headless and check the mask it drew on its canvas is, pixel for pixel,
    the service's `expected` response; returns the page's DOM."""
    flat = np.flatnonzero(coco_mask.decode(to_coco_rle(expected["segmentation"])).astype(bool).ravel())  # row-major
    dom = subprocess.run([*browser_command(tmp_path), "--dump-dom", url], capture_output=True, text=True,
                         timeout=180).stdout
    canvas = re.search(r'<canvas id="overlay"[^>]*>', dom)
    assert canvas, dom[-2000:]
    drawn = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', canvas.group(0)))
    assert int(drawn["mask-pixels"]) == len(flat) == expected["area"]
    assert int(drawn["mask-index-sum"]) == int(flat.sum())
    return dom


@pytest.mark.skipif(chromium() is None, reason="no Chromium on this machine")
def test_page_draws_a_click_mask_in_headless_chromium(service, session, tmp_path):
    """The real page in a real browser: ?image=0&click=x,y opens image 0 and clicks once;
    the mask it draws on the canvas is pixel for pixel the service's mask for that click."""
    client = session["client"]
    opened = client.open(0)
    x, y, _ = next_click(None, service["truth"][opened["uri"]][0])
    expected = client.predict(index=0, image_id=opened["image_id"], points=[[x, y]], labels=[1])
    url = f"{service['url']}/?image=0&click={int(x)},{int(y)}"
    dom = page_mask(url, tmp_path, expected)
    assert "predicted IoU" in dom  # the status line of a click
    shot = tmp_path / "page.png"
    subprocess.run([*browser_command(tmp_path), f"--screenshot={shot}", "--window-size=900,600", url], capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape == (600, 900, 3) and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100
    if os.environ.get("SAMENGINE_SCREENSHOTS"):
        shutil.copy(shot, Path(os.environ["SAMENGINE_SCREENSHOTS"]) / "annotation_page.png")


def _text_phrase(truth_masks: np.ndarray, scene_seed_: int) -> str:
    scene = make_scene(scene_seed_, (200, 272))
    assert np.array_equal(scene.masks, truth_masks)
    return scene.names[int(np.argmax(scene.masks.reshape(len(scene.masks), -1).sum(1)))]


def test_text_prompt_over_http_is_the_predictors_answer(service, session):
    """The service's model takes text (the default checkpoint has a text input); a phrase's
    mask over HTTP is what the in-process predictor gives for the same phrase."""
    from model import SamPredictor, load_checkpoint
    from schemas.interactive import DEFAULT_CHECKPOINT

    client = session["client"]
    assert session["listing"]["text_prompts"] is True
    opened = client.open(0)
    phrase = _text_phrase(service["truth"][opened["uri"]], int(Path(opened["uri"]).stem.split("_")[1]))
    got = client.predict(index=0, image_id=opened["image_id"], text=f"  {phrase} ")
    assert not got["encoded"]  # from the cached embedding, like a click

    model, _ = load_checkpoint(DEFAULT_CHECKPOINT)
    predictor = SamPredictor(model)
    predictor.set_image(np.asarray(Image.open(opened["uri"]).convert("RGB")))
    masks, scores, _ = predictor.predict(text=phrase)
    best = int(np.argmax(scores))
    assert np.array_equal(coco_mask.decode(to_coco_rle(got["segmentation"])).astype(bool), masks[best])
    assert got["score"] == pytest.approx(float(scores[best]), abs=1e-5)
    with pytest.raises(EngineError) as err:
        client.predict(index=0, image_id=opened["image_id"], text="   ")
    assert err.value.status == 422


@pytest.mark.skipif(chromium() is None, reason="no Chromium on this machine")
def test_page_finds_by_words_in_headless_chromium(service, session, tmp_path):
    """?text=words fills the page's Find box and runs it: the mask drawn is the service's
    mask for those words."""
    client = session["client"]
    opened = client.open(1)
    phrase = _text_phrase(service["truth"][opened["uri"]], int(Path(opened["uri"]).stem.split("_")[1]))
    expected = client.predict(index=1, image_id=opened["image_id"], text=phrase)
    dom = page_mask(f"{service['url']}/?image=1&text={requests.utils.quote(phrase)}", tmp_path, expected)
    form = re.search(r'<form id="textform"[^>]*>', dom).group(0)
    assert "hidden" not in form  # the Find box is shown for a text model


def test_next_click_follows_the_error_region():
    truth = np.zeros((20, 30), bool)
    truth[5:15, 5:15] = True
    x, y, label = next_click(None, truth)
    assert label == 1 and truth[int(y), int(x)] and (int(x), int(y)) in {(9, 9), (9, 10), (10, 9), (10, 10)}
    spill = truth.copy()
    spill[0:20, 18:30] = True  # a large false positive on the right
    x, y, label = next_click(spill, truth)
    assert label == 0 and x >= 18 and not truth[int(y), int(x)]
    miss = truth.copy()
    miss[5:15, 5:12] = False  # most of the object missed
    x, y, label = next_click(miss, truth)
    assert label == 1 and 5 <= x < 12


def test_embedding_cache_is_lru_bounded_by_bytes():
    cache = EmbeddingCache(max_bytes=3 * 4096)
    item = lambda: (torch.zeros(1, 4, 16, 16), (16, 16))  # noqa: E731  4096 bytes
    for key in "abc":
        assert cache.put(key, item())
    assert cache.get("a") is not None  # a is now the most recently used
    cache.put("d", item())  # evicts b, the least recently used
    assert "b" not in cache and all(k in cache for k in "acd") and cache.nbytes == 3 * 4096
    assert not cache.put("huge", (torch.zeros(4096),))  # 16 KiB: larger than the cache
    assert "huge" not in cache and len(cache) == 3
    assert (cache.hits, cache.misses) == (1, 0)
    assert cache.get("b") is None and cache.misses == 1


def test_engine_config_refuses_inconsistent_settings():
    from pydantic import ValidationError

    from schemas.interactive import EngineConfig

    EngineConfig(images="imgs", output="out", stage="semi_auto", prefill="generator")
    for bad, message in [
        ({"output": "out"}, "exactly one of images"),
        ({"images": "imgs", "images_from": "ds", "output": "out"}, "exactly one of images"),
        ({"images": "imgs", "output": "out", "prefill": "generator"}, "semi_auto stage"),
        ({"images_from": "ds", "output": "ds"}, "different dataset root"),
        ({"images": "imgs", "output": "out", "stage": "auto"}, "stage"),
    ]:
        with pytest.raises(ValidationError, match=message):
            EngineConfig(**bad)
