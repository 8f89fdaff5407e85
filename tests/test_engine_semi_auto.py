"""Semi-automatic stage: Label Studio brush RLE both ways, Label Studio tasks out and back
into the dataset, and pre-filled masks completed by the simulated annotator over HTTP."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
from pycocotools import mask as coco_mask

from dataset.synthetic import blob_masks
from engine.labelstudio import (
    BrushRleError, brush_to_coco, brush_to_mask, coco_to_brush, decode_values, encode_runs, mask_to_brush,
)

CHECKPOINT = str(Path(__file__).resolve().parents[1] / "checkpoints" / "samengine_tiny256.pt")


# -- an independent, bit-by-bit reading of the format (the module docstring's grammar) -------
def reference_decode(rle: list[int]) -> np.ndarray:
    bits = "".join(f"{b:08b}" for b in rle)
    pos = 0

    def take(n: int) -> int:
        nonlocal pos
        pos += n
        return int(bits[pos - n: pos], 2)

    total, word = take(32), take(5) + 1
    widths = [take(4) + 1 for _ in range(4)]
    out: list[int] = []
    while len(out) < total:
        repeat = take(1)
        count = take(widths[take(2)]) + 1
        out.extend([take(word)] * count if repeat else [take(word) for _ in range(count)])
    assert len(out) == total
    return np.asarray(out, np.uint8)


def reference_encode_literals(values: np.ndarray, group: int = 5) -> list[int]:
    """Another valid encoding of the same stream: only literal chunks of up to `group`
    values, as the browser's encoder writes runs of distinct values. Never produced by
    engine.labelstudio, so it checks that the decoder reads what others write."""
    parts = [f"{len(values):032b}", f"{8 - 1:05b}", *(f"{w - 1:04b}" for w in (3, 4, 8, 16))]
    for start in range(0, len(values), group):
        chunk = values[start:start + group]
        parts += ["0", "00", f"{len(chunk) - 1:03b}", *(f"{v:08b}" for v in chunk.tolist())]
    bits = "".join(parts)
    bits += "0" * (-len(bits) % 8)
    return [int(bits[i:i + 8], 2) for i in range(0, len(bits), 8)]


def as_ls_values(mask: np.ndarray) -> np.ndarray:
    """What Label Studio's converter feeds its encoder: every pixel as 4 equal RGBA bytes."""
    return np.repeat(mask.astype(np.uint8).ravel() * 255, 4)


def edge_masks() -> list[np.ndarray]:
    full = np.ones((128, 128), bool)  # 65536 values: exactly one longest chunk
    checker = (np.indices((9, 11)).sum(0) % 2).astype(bool)
    corners = np.zeros((17, 23), bool)
    corners[0, 0] = corners[-1, -1] = corners[0, -1] = corners[-1, 0] = True
    return [
        np.zeros((1, 1), bool), np.ones((1, 1), bool), np.zeros((40, 30), bool), np.ones((40, 30), bool),
        full, np.ones((200, 400), bool),  # one run split over several chunks
        np.ones((1, 97), bool), np.zeros((97, 1), bool), checker, corners,
        np.eye(31, 47, dtype=bool),
    ]


def random_masks(rng: np.random.Generator) -> list[np.ndarray]:
    masks = [rng.random((int(rng.integers(1, 60)), int(rng.integers(1, 60)))) < rng.uniform(0.05, 0.95)
             for _ in range(25)]
    masks += list(blob_masks(150, 210, 8, rng))
    return masks


def test_brush_rle_golden_bytes():
    # 2 x 2 mask, top-left pixel set: 4 x 255 then 12 x 0, written out field by field.
    bits = ("00000000000000000000000000010000" "00111" "0010" "0011" "0111" "1111"  # 16 values, 8-bit words
            "1" "00" "011" "11111111"  # repeat, 3-bit length field, length 4, value 255
            "1" "01" "1011" "00000000")  # repeat, 4-bit length field, length 12, value 0
    bits += "0" * (-len(bits) % 8)
    expected = [int(bits[i:i + 8], 2) for i in range(0, len(bits), 8)]
    mask = np.array([[True, False], [False, False]])
    assert mask_to_brush(mask) == expected
    assert (brush_to_mask(expected, 2, 2) == mask).all()


def test_brush_rle_round_trip_random_and_edge_masks():
    rng = np.random.default_rng(8)
    for mask in edge_masks() + random_masks(rng):
        h, w = mask.shape
        rle = mask_to_brush(mask)
        assert all(0 <= b <= 255 for b in rle)
        # Our bytes read back exactly, by us and by the independent reader ...
        assert np.array_equal(reference_decode(rle), as_ls_values(mask))
        assert np.array_equal(brush_to_mask(rle, h, w), mask)
        # ... and a stream written differently (literal chunks) reads back the same.
        if mask.size <= 20_000:  # (the pure-Python writer is slow on big masks)
            assert np.array_equal(brush_to_mask(reference_encode_literals(as_ls_values(mask)), h, w), mask)
        # COCO -> brush -> COCO gives pycocotools' own string back, byte for byte.
        coco = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
        coco = {"size": [h, w], "counts": coco["counts"].decode()}
        assert coco_to_brush(coco) == rle
        assert brush_to_coco(rle, h, w) == coco


def test_encode_runs_any_values_and_lengths():
    rng = np.random.default_rng(1)
    lengths = np.array([1, 1, 2, 8, 9, 16, 17, 256, 257, 65535, 65536, 65537, 131072, 200001, 1, 3])
    values = rng.integers(0, 256, len(lengths))
    rle = encode_runs(lengths, values)
    expected = np.repeat(values.astype(np.uint8), lengths)
    assert np.array_equal(decode_values(rle), expected)
    assert np.array_equal(reference_decode(rle), expected)
    assert encode_runs(np.zeros(0, int), np.zeros(0, int)) == reference_encode_literals(np.zeros(0, np.uint8))


def test_brush_alpha_threshold_reads_antialiased_edges():
    # A browser-painted stroke: colour in RGB, partial alpha on its edge pixels.
    alpha = np.array([[0, 60, 127, 128, 200, 255]], np.uint8)
    rgba = np.stack([np.full_like(alpha, 30), np.full_like(alpha, 200), np.zeros_like(alpha), alpha], axis=-1)
    rle = reference_encode_literals(rgba.ravel())
    assert brush_to_mask(rle, 1, 6).tolist() == [[False, False, False, True, True, True]]


def test_malformed_brush_rle_is_refused():
    rle = mask_to_brush(np.ones((10, 10), bool) ^ np.eye(10, dtype=bool))
    with pytest.raises(BrushRleError, match="ends after"):
        brush_to_mask(rle[:-3], 10, 10)
    with pytest.raises(BrushRleError, match="RGBA image has"):
        brush_to_mask(rle, 10, 11)
    with pytest.raises(BrushRleError, match="header"):
        brush_to_mask([0, 0, 1], 1, 1)
    with pytest.raises(BrushRleError, match="byte values"):
        brush_to_mask([*rle[:-1], 256], 10, 10)


# -- Label Studio tasks out and back ---------------------------------------------------------------
def test_local_files_url_names_a_symlinked_image_by_its_own_name(tmp_path):
    """A symlink kept under its own name (DVC / git-annex layouts) is served by that name, not
    by its target outside the document root; a root given through a symlink still works."""
    from engine.semi_auto import local_files_url

    store, root = tmp_path / "store", tmp_path / "root"
    (root / "cats").mkdir(parents=True)
    store.mkdir()
    (store / "5f2a9c").write_bytes(b"image")
    (root / "cats" / "cat.png").symlink_to(store / "5f2a9c")
    (root / "dog.png").write_bytes(b"image")
    (tmp_path / "link_to_root").symlink_to(root)
    assert local_files_url(str(root))(str(root / "cats" / "cat.png")) == "/data/local-files/?d=cats/cat.png"
    assert local_files_url(str(tmp_path / "link_to_root"))(str(root / "dog.png")) == "/data/local-files/?d=dog.png"


def test_label_studio_tasks_round_trip(tmp_path):
    import json

    from dataset import read_images
    from dataset.lineage import new_lineage
    from dataset.synthetic import image_records
    from engine.semi_auto import export_tasks, import_tasks, local_files_url, task_to_record, write_project

    records = image_records(3, 4, h=60, w=80, seed=3)
    for r in records:
        r["uri"] = str(tmp_path / "images" / Path(r["uri"]).name)
    tasks = json.loads(json.dumps(export_tasks(records, model_version="r0", image_url=local_files_url(tmp_path))))
    assert tasks[0]["data"]["image"] == "/data/local-files/?d=images/img_00000.jpg"
    for task, record in zip(tasks, records):
        (prediction,) = task["predictions"]
        assert prediction["model_version"] == "r0"
        assert [brush_to_coco(r["value"]["rle"], 60, 80) for r in prediction["result"]] == \
            [a["segmentation"] for a in record["annotations"]]
        assert [r["score"] for r in prediction["result"]] == [a["predicted_iou"] for a in record["annotations"]]
    tasks_path, config_path = write_project(tmp_path / "ls", tasks)
    assert json.loads(tasks_path.read_text()) == tasks and "<BrushLabels" in config_path.read_text()

    # What a Label Studio export gives back after annotators worked on the tasks:
    # task 0: two pre-annotations kept, one dropped, one edited (a pixel added), one mask drawn;
    # task 1: only a cancelled annotation (unfinished); task 2: a ground-truth annotation wins.
    results = tasks[0]["predictions"][0]["result"]
    edited_mask = brush_to_mask(results[3]["value"]["rle"], 60, 80)
    edited_mask[0, 0] = True
    drawn_mask = np.zeros((60, 80), bool)
    drawn_mask[10:20, 30:65] = True
    edited = {**results[3], "value": {**results[3]["value"], "rle": mask_to_brush(edited_mask)}}
    drawn = {**results[0], "id": "new-1", "value": {**results[0]["value"], "rle": mask_to_brush(drawn_mask)}}
    drawn.pop("score")
    # The browser re-encodes a kept mask its own way: the label colour in RGB, literal chunks.
    kept_mask = brush_to_mask(results[1]["value"]["rle"], 60, 80)
    rgba = np.zeros((60, 80, 4), np.uint8)
    rgba[kept_mask] = (255, 77, 77, 255)
    reencoded = {**results[1], "value": {**results[1]["value"], "rle": reference_encode_literals(rgba.ravel())}}
    assert reencoded["value"]["rle"] != results[1]["value"]["rle"]
    tasks[0]["annotations"] = [{"id": 7, "result": [results[0], reencoded, edited, drawn], "was_cancelled": False}]
    tasks[1]["annotations"] = [{"id": 8, "result": [], "was_cancelled": True}]
    other = tasks[2]["predictions"][0]["result"]
    tasks[2]["annotations"] = [{"id": 9, "result": other[:1], "ground_truth": True},
                               {"id": 10, "result": other, "ground_truth": False}]
    tasks = json.loads(json.dumps(tasks))

    record = task_to_record(tasks[0])
    expected = [records[0]["annotations"][0]["segmentation"], records[0]["annotations"][1]["segmentation"],
                brush_to_coco(mask_to_brush(edited_mask), 60, 80), brush_to_coco(mask_to_brush(drawn_mask), 60, 80)]
    assert [a["segmentation"] for a in record["annotations"]] == expected
    assert coco_mask.decode(as_coco(expected[3])).astype(bool).tolist() == drawn_mask.tolist()
    # Kept pre-annotations keep their predicted IoU; edited and new masks are the annotator's.
    assert [a["predicted_iou"] for a in record["annotations"]] == \
        [records[0]["annotations"][0]["predicted_iou"], records[0]["annotations"][1]["predicted_iou"], None, None]
    assert record["annotations"][3]["area"] == 350 and record["annotations"][3]["bbox"] == [30, 10, 35, 10]
    assert task_to_record(tasks[1]) is None
    assert len(task_to_record(tasks[2])["annotations"]) == 1

    summary = import_tasks(tasks, str(tmp_path / "semi"), new_lineage(round=2, stage="semi_auto", run_id="ls"))
    assert summary == {"version": summary["version"], "images": 2, "masks": 5, "unfinished": 1}
    rows = {r["image_id"]: r for r in read_images(str(tmp_path / "semi")).to_pylist()}
    assert set(rows) == {records[0]["image_id"], records[2]["image_id"]}
    stored = rows[records[0]["image_id"]]
    assert [a["segmentation"]["counts"] for a in stored["annotations"]] == [e["counts"] for e in expected]
    assert {(a["stage"], a["round"]) for r in rows.values() for a in r["annotations"]} == {("semi_auto", 2)}

    bad = json.loads(json.dumps(tasks[0]))
    bad["annotations"][0]["result"].append({"type": "rectanglelabels", "value": {"x": 1}})
    with pytest.raises(ValueError, match="rectanglelabels"):
        task_to_record(bad)


def test_label_studio_jobs_export_and_import(tmp_path):
    """jobs/label_studio.py: confident masks of a dataset out as tasks, the finished export
    (pre-annotations accepted as they are) back in as semi_auto."""
    import json

    from dataset import DatasetWriter, read_images
    from dataset.lineage import new_lineage
    from dataset.synthetic import image_records
    from jobs import label_studio as job

    records = image_records(2, 5, h=48, w=64, seed=9)
    writer = DatasetWriter(str(tmp_path / "auto"), new_lineage(round=0, stage="auto", run_id="auto"))
    writer.commit_images(records)
    assert job.main(["export", str(tmp_path / "auto"), str(tmp_path / "ls"), "--min-iou", "0.94"]) == 0
    tasks = json.loads((tmp_path / "ls" / "tasks.json").read_text())
    for task in tasks:  # the annotator accepts every pre-annotation
        task["annotations"] = [{"id": 1, "result": task.get("predictions", [{"result": []}])[0]["result"]}]
    (tmp_path / "export.json").write_text(json.dumps(tasks))
    assert job.main(["import", str(tmp_path / "export.json"), str(tmp_path / "semi"), "--round", "1"]) == 0
    rows = {r["image_id"]: r for r in read_images(str(tmp_path / "semi")).to_pylist()}
    for record in records:
        kept = [a for a in record["annotations"] if a["predicted_iou"] >= 0.94]
        stored = rows[record["image_id"]]["annotations"]
        assert [a["segmentation"] for a in stored] == [a["segmentation"] for a in kept]
        assert [a["predicted_iou"] for a in stored] == pytest.approx([a["predicted_iou"] for a in kept])
        assert {a["stage"] for a in stored} <= {"semi_auto"}
    assert sum(len(r["annotations"]) for r in rows.values()) > 0


def test_label_studio_jobs_read_and_write_s3_through_endpoint_url(tmp_path, capsys):
    """--endpoint-url, as in the other jobs that take s3:// roots: with AWS_ENDPOINT_URL
    unset, the flag alone reaches the S3-compatible store (a moto server), for the dataset
    roots and for an export read from s3://."""
    from pipeline.sources import s3_filesystem
    from dataset import DatasetWriter, read_images, storage_options
    from dataset.lineage import new_lineage
    from dataset.synthetic import image_records
    from jobs import label_studio as job
    from tests.s3server import moto_server

    records = image_records(2, 5, h=48, w=64, seed=9)
    with moto_server("data") as endpoint:
        saved = os.environ.pop("AWS_ENDPOINT_URL")
        try:
            DatasetWriter("s3://data/auto", new_lineage(round=0, stage="auto", run_id="auto"),
                          endpoint_url=endpoint).commit_images(records)
            flag = ["--endpoint-url", endpoint]
            assert job.main(["export", "s3://data/auto", str(tmp_path / "ls"), "--min-iou", "0.94", *flag]) == 0
            tasks = json.loads((tmp_path / "ls" / "tasks.json").read_text())
            for task in tasks:  # the annotator accepts every pre-annotation
                task["annotations"] = [{"id": 1, "result": task.get("predictions", [{"result": []}])[0]["result"]}]
            (tmp_path / "export.json").write_text(json.dumps(tasks))
            s3_filesystem(endpoint).put_file(str(tmp_path / "export.json"), "data/ls/export.json")
            assert job.main(["import", "s3://data/ls/export.json", "s3://data/semi", "--round", "1", *flag]) == 0
            semi = read_images("s3://data/semi", options=storage_options("s3://data/semi", endpoint)).to_pylist()
            capsys.readouterr()
            # An export that is not there: one line naming it, nothing written.
            assert job.main(["import", "s3://data/ls/none.json", "s3://data/semi3", "--round", "1", *flag]) == 2
            err = capsys.readouterr().err
            assert err.startswith("error: s3://data/ls/none.json: missing") and len(err.splitlines()) == 1, err
            assert not s3_filesystem(endpoint).exists("data/semi3")
            # The store's fault is named as the store's, in one line, not blamed on the export.
            for root, argv, reason in (("s3://nobucket/semi", flag, "NoSuchBucket: The specified bucket"),
                                       ("s3://data/semi2", ["--endpoint-url", "http://127.0.0.1:9"],
                                        "Connection refused")):
                assert job.main(["import", str(tmp_path / "export.json"), root, "--round", "1", *argv]) == 2
                err = capsys.readouterr().err
                assert err.startswith(f"error: cannot write the dataset at {root}: ") and reason in err, err
                assert len(err.splitlines()) == 1, err
        finally:
            os.environ["AWS_ENDPOINT_URL"] = saved
    kept = {r["image_id"]: [a for a in r["annotations"] if a["predicted_iou"] >= 0.94] for r in records}
    assert {r["image_id"]: [a["segmentation"] for a in r["annotations"]] for r in semi} == \
        {i: [a["segmentation"] for a in masks] for i, masks in kept.items()}
    assert {a["stage"] for r in semi for a in r["annotations"]} == {"semi_auto"}


def test_label_studio_export_of_a_missing_or_damaged_dataset_is_an_error(tmp_path, capsys):
    from dataset import DatasetWriter
    from dataset.lineage import new_lineage
    from dataset.synthetic import image_records
    from jobs import label_studio as job

    assert job.main(["export", str(tmp_path / "nothing"), str(tmp_path / "ls")]) == 2
    assert "no dataset at" in capsys.readouterr().err
    root = tmp_path / "auto"
    DatasetWriter(str(root), new_lineage(round=0, stage="auto", run_id="auto")).commit_images(image_records(2, 3))
    next((root / "annotations").glob("*.parquet")).unlink()  # a data file lost from the store
    assert job.main(["export", str(root), str(tmp_path / "ls")]) == 2
    assert "data file that is missing" in capsys.readouterr().err
    assert not (tmp_path / "ls").exists()


def test_label_studio_import_of_a_bad_export_is_an_error(tmp_path, capsys):
    """A missing, non-JSON or unsupported export is one line and exit 2, nothing written."""
    from jobs import label_studio as job

    (tmp_path / "broken.json").write_text('[{"id": 1,')
    polygon = [{"id": 1, "data": {"image": "/x.png", "image_id": "ab"}, "annotations": [{"result": [
        {"type": "polygonlabels", "original_width": 8, "original_height": 8,
         "value": {"points": [[0, 0], [50, 0], [50, 50]], "polygonlabels": ["object"]}}]}]}]
    (tmp_path / "polygon.json").write_text(json.dumps(polygon))
    for name in ("missing.json", "broken.json", "polygon.json"):
        assert job.main(["import", str(tmp_path / name), str(tmp_path / "ds"), "--round", "1"]) == 2, name
        err = capsys.readouterr().err
        assert err.startswith(f"error: {tmp_path / name}: ") and len(err.splitlines()) == 1, err
    assert not (tmp_path / "ds").exists()


def as_coco(segmentation: dict) -> dict:
    return {"size": segmentation["size"], "counts": segmentation["counts"].encode()}


# -- pre-fill from the generator, on the cached embedding --------------------------------------------
def test_generator_prefill_reuses_the_cached_embedding():
    import torch

    from amg import AmgParams, AutomaticMaskGenerator
    from engine.images import LoadedImage
    from engine.segmenter import Segmenter
    from model import SamPredictor, load_checkpoint
    from schemas.interactive import PredictRequest
    from training.synthetic import make_scene

    torch.set_num_threads(1)
    model, _ = load_checkpoint(CHECKPOINT)
    # Thresholds low enough that the early bundled checkpoint keeps some masks.
    params = AmgParams(points_per_side=8, pred_iou_thresh=0.0, stability_score_thresh=0.3, output_mode="coco_rle")
    image = LoadedImage(0, "scene.png", "0" * 64, make_scene(5, (180, 240)).image)
    segmenter = Segmenter(model, generator=params)
    (features, size), encoded, _ = segmenter.embed(image.image_id, lambda: image)
    assert encoded and segmenter.encodes == 1 and size == (180, 240)
    generated = segmenter.generated[image.image_id]
    assert generated and generated == AutomaticMaskGenerator(model, params).generate(image.rgb)
    predictor = SamPredictor(model)
    predictor.set_image(image.rgb)
    assert torch.allclose(features, predictor.features, atol=1e-5)
    out = segmenter.predict(PredictRequest(index=0, image_id=image.image_id, points=[(120, 90)], labels=[1]),
                            lambda: pytest.fail("the embedding should be cached"))
    assert not out["encoded"] and segmenter.encodes == 1


# -- the semi-automatic stage over HTTP: pre-fill from an automatic run, annotators add the rest ------
@pytest.fixture(scope="module")
def semi_auto(tmp_path_factory):
    """An automatic run of the bundled checkpoint over synthetic scenes (generator thresholds
    lowered so the early checkpoint keeps some masks), and a semi_auto service pre-filling
    from it the masks at or above the run's median predicted IoU."""
    import hashlib
    import os

    import ray
    import torch
    from PIL import Image
    from ray import serve

    from amg import AutomaticMaskGenerator
    from dataset import DatasetWriter
    from dataset.lineage import new_lineage
    from engine.service import free_port, start
    from model import load_checkpoint
    from training.synthetic import make_scene

    tmp = tmp_path_factory.mktemp("semi")
    (tmp / "images").mkdir()
    torch.set_num_threads(1)
    model, _ = load_checkpoint(CHECKPOINT)
    generator = AutomaticMaskGenerator(model, points_per_side=8, pred_iou_thresh=0.0, stability_score_thresh=0.3,
                                       output_mode="coco_rle")
    truth, records = {}, []
    for seed in (21, 22, 23):
        scene = make_scene(seed, (192, 256))
        path = tmp / "images" / f"scene_{seed}.png"
        Image.fromarray(scene.image).save(path)
        truth[str(path)] = scene.masks
        records.append({"image_id": hashlib.sha256(path.read_bytes()).hexdigest(), "uri": str(path),
                        "width": 256, "height": 192, "annotations": generator.generate(scene.image)})
    auto_root = str(tmp / "auto")
    writer = DatasetWriter(auto_root, new_lineage(round=0, stage="auto", run_id="auto-test"))
    writer.start_run()
    writer.commit_images(records)
    scores = [a["predicted_iou"] for r in records for a in r["annotations"]]
    assert scores, "the automatic run kept no mask at all"
    threshold = float(np.median(scores))

    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(CHECKPOINT).parents[1]),
                                                             os.environ.get("PYTHONPATH")]))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        url = start({"images_from": auto_root, "prefill": "dataset", "prefill_min_iou": threshold,
                     "output": str(tmp / "semi"), "stage": "semi_auto", "round": 1, "run_id": "semi-test"},
                    port=free_port())
        yield {"url": url, "truth": truth, "auto": records, "threshold": threshold, "tmp": tmp}
    finally:
        serve.shutdown()
        ray.shutdown()


def test_semi_auto_page_protocol_prefills_and_annotator_adds_the_rest(semi_auto):
    from dataset import read_images
    from engine.annotator import EngineClient, SimulatedAnnotator, coverage, missing_objects

    client = EngineClient(semi_auto["url"])
    listing = client.images()
    assert listing["stage"] == "semi_auto" and len(listing["images"]) == 3
    auto = {r["uri"]: r for r in semi_auto["auto"]}
    annotator = SimulatedAnnotator(client, max_clicks=2, covered_iou=0.5, max_objects=4)
    before, after = [], []
    for entry in listing["images"]:
        truth = semi_auto["truth"][entry["uri"]]
        result = annotator.annotate(entry["index"], truth)
        # Pre-fill is exactly the confident part of the automatic run.
        confident = [a["segmentation"] for a in auto[entry["uri"]]["annotations"]
                     if a["predicted_iou"] >= semi_auto["threshold"]]
        prefill = [p["segmentation"] for p in result["opened"]["prefill"]]
        assert prefill == confident
        # Annotators are handed only the objects the pre-fill misses.
        assert set(result["outcomes"]) <= set(missing_objects(truth, prefill, 0.5))
        added = [o.response["segmentation"] for o in result["outcomes"].values()]
        before.append(coverage(truth, prefill))
        after.append(coverage(truth, prefill + added))
        assert result["commit"]["stage"] == "semi_auto" and result["commit"]["masks"] == len(prefill) + len(added)

        (row,) = read_images(str(semi_auto["tmp"] / "semi"),
                             filter=pc.field("image_id") == result["opened"]["image_id"]).to_pylist()
        assert [a["segmentation"] for a in row["annotations"]] == prefill + added
        assert {(a["stage"], a["round"]) for a in row["annotations"]} == {("semi_auto", 1)}
        assert [a["predicted_iou"] for a in row["annotations"][:len(prefill)]] == \
            pytest.approx([p["predicted_iou"] for p in result["opened"]["prefill"]])
    print(f"\nsemi-auto (page protocol): GT coverage {np.mean(before):.3f} pre-filled -> {np.mean(after):.3f} with "
          f"the annotator's masks")
    assert np.mean(after) > np.mean(before)
    assert client.stats()["encodes"] == 3


def test_semi_auto_label_studio_round_trip_through_the_service(semi_auto):
    import json

    from dataset import read_images
    from dataset.lineage import new_lineage
    from engine.annotator import EngineClient, SimulatedAnnotator, coverage
    from engine.semi_auto import dataset_prefill, export_tasks, import_tasks

    prefill = dataset_prefill(str(semi_auto["tmp"] / "auto"), min_iou=semi_auto["threshold"])
    images = [{**r, "annotations": prefill[r["image_id"]]} for r in semi_auto["auto"]]
    tasks = json.loads(json.dumps(export_tasks(images, model_version="auto-test")))
    client = EngineClient(semi_auto["url"])
    index = {e["uri"]: e["index"] for e in client.images()["images"]}
    annotator = SimulatedAnnotator(client, max_clicks=2, covered_iou=0.5, max_objects=4)
    finished = [annotator.complete_task(t, index[t["data"]["uri"]], semi_auto["truth"][t["data"]["uri"]])
                for t in tasks]
    finished = json.loads(json.dumps(finished))  # as exported by Label Studio

    root = str(semi_auto["tmp"] / "semi_ls")
    summary = import_tasks(finished, root, new_lineage(round=1, stage="semi_auto", run_id="semi-ls"))
    assert summary["images"] == 3 and summary["unfinished"] == 0
    rows = {r["uri"]: r for r in read_images(root).to_pylist()}
    before, after = [], []
    for image in images:
        row, truth = rows[image["uri"]], semi_auto["truth"][image["uri"]]
        kept = image["annotations"]
        stored = row["annotations"]
        assert {(a["stage"], a["round"]) for a in stored} == {("semi_auto", 1)}
        # Pre-annotations come back unchanged and keep their predicted IoU; the rest are new.
        assert [a["segmentation"] for a in stored[:len(kept)]] == [a["segmentation"] for a in kept]
        assert [a["predicted_iou"] for a in stored[:len(kept)]] == pytest.approx([a["predicted_iou"] for a in kept])
        assert all(a["predicted_iou"] is None for a in stored[len(kept):])
        before.append(coverage(truth, [a["segmentation"] for a in kept]))
        after.append(coverage(truth, [a["segmentation"] for a in stored]))
    print(f"\nsemi-auto (Label Studio): GT coverage {np.mean(before):.3f} pre-filled -> {np.mean(after):.3f}")
    assert np.mean(after) > np.mean(before)
    assert client.stats()["encodes"] == 3  # the page test opened them: every click came from the cache
