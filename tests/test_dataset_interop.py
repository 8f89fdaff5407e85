"""SA-1B and COCO interchange: round trips with byte-identical RLE, imports of foreign files."""
import gc
import hashlib
import io
import json
import tarfile
import tempfile
from pathlib import Path
from urllib.parse import unquote_to_bytes

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pycocotools import mask as coco_mask
from pycocotools.coco import COCO

import dataset.coco
from dataset import DatasetWriter, export_parquet, history, read_images
from dataset.coco import export_coco, import_coco, read_coco
from dataset.lineage import new_lineage
from dataset.sa1b import KEY_TABLE, export_sa1b, import_sa1b, read_sa1b
from dataset.synthetic import blob_masks, encode_masks, image_records
from dataset.validation import validate

SA1B_IMAGE_KEYS = ["image_id", "width", "height", "file_name"]
SA1B_MASK_KEYS = ["id", "segmentation", "area", "bbox", "predicted_iou", "point_coords", "stability_score",
                  "crop_box"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A dataset of 5 images x 8 masks, written as the pipeline would."""
    root = str(tmp_path_factory.mktemp("src"))
    DatasetWriter(root, new_lineage(round=0, stage="auto")).commit_images(image_records(5, 8))
    return root


def _sorted_rows(root):
    """The images of a dataset, without run_id: a re-import is a run of its own."""
    rows = [{k: v for k, v in r.items() if k != "run_id"} for r in read_images(root).to_pylist()]
    return sorted(rows, key=lambda r: r["image_id"])


def test_sa1b_round_trip_is_identical(source, tmp_path):
    assert export_sa1b(source, tmp_path / "sa1b") == 5
    doc = json.loads(next((tmp_path / "sa1b").glob("*.json")).read_text())
    assert list(doc) == ["image", "annotations"]
    assert list(doc["image"]) == SA1B_IMAGE_KEYS and isinstance(doc["image"]["image_id"], int)
    assert list(doc["annotations"][0]) == SA1B_MASK_KEYS + ["samengine_id"]
    assert list(doc["annotations"][0]["segmentation"]) == ["size", "counts"]
    assert (tmp_path / "sa1b" / KEY_TABLE).exists()
    back = str(tmp_path / "back")
    import_sa1b([tmp_path / "sa1b"], DatasetWriter(back, new_lineage(round=0, stage="auto")))
    assert _sorted_rows(back) == _sorted_rows(source)  # ids, RLE strings, scores: everything
    assert validate(back).ok


def test_coco_export_loads_in_pycocotools_with_identical_rle(source, tmp_path):
    path = tmp_path / "exports" / "v1" / "instances.json"  # folders that do not exist yet
    assert export_coco(source, path) == 5
    assert sorted(p.name for p in path.parent.iterdir()) == ["instances.json"]  # no partial file left
    coco = COCO(str(path))
    rows = read_images(source).to_pylist()
    assert sorted(coco.getImgIds()) == sorted(r["image_key"] for r in rows)
    assert coco.getCatIds() == [1]
    for row in rows:
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[row["image_key"]]))
        assert [int(a["samengine_id"]) for a in anns] == [m["id"] for m in row["annotations"]]
        for ann, mask in zip(anns, row["annotations"]):
            rle = coco.annToRLE(ann)
            counts = rle["counts"].decode() if isinstance(rle["counts"], bytes) else rle["counts"]
            assert counts == mask["segmentation"]["counts"]
            assert coco.annToMask(ann).sum() == mask["area"]
    back = str(tmp_path / "back")
    import_coco(path, DatasetWriter(back, new_lineage(round=5, stage="manual")))
    assert _sorted_rows(back) == _sorted_rows(source)  # stage and round come from the file


def _jpeg(rng, h, w):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _sa1b_mask(ann_id, rle):
    """An annotation as SA-1B files have it (float area and bbox)."""
    encoded = {"size": rle["size"], "counts": rle["counts"].encode()}
    return {"id": ann_id, "segmentation": rle, "area": float(coco_mask.area(encoded)),
            "bbox": [float(v) for v in coco_mask.toBbox(encoded)], "predicted_iou": 0.9,
            "point_coords": [[1.5, 2.5]], "stability_score": 0.97, "crop_box": [0, 0, 64, 48]}


def test_import_of_sa1b_tar_shard_hashes_the_images(tmp_path):
    rng = np.random.default_rng(3)
    shard = tmp_path / "sa_000000.tar"
    hashes = []
    with tarfile.open(shard, "w") as tar:
        for i in (1, 2):
            jpg = _jpeg(rng, 48, 64)
            rles = encode_masks(blob_masks(48, 64, 3, rng))
            doc = {"image": {"image_id": i, "width": 64, "height": 48, "file_name": f"sa_{i}.jpg"},
                   "annotations": [_sa1b_mask(100 * i + k, r) for k, r in enumerate(rles)]}
            for name, data in ((f"sa_{i}.jpg", jpg), (f"sa_{i}.json", json.dumps(doc).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            hashes.append(hashlib.sha256(jpg).hexdigest())
    records = list(read_sa1b(shard))
    assert [r["image_id"] for r in records] == hashes
    assert all(r["phash"] for r in records) and records[0]["uri"].endswith("#sa_1.jpg")
    root = str(tmp_path / "ds")
    import_sa1b([shard], DatasetWriter(root, new_lineage(round=0, stage="imported")))
    assert validate(root).ok and read_images(root).num_rows == 2


def test_import_of_foreign_coco_polygons_and_rle(tmp_path):
    rng = np.random.default_rng(4)
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.jpg").write_bytes(_jpeg(rng, 40, 50))
    mask = blob_masks(40, 50, 1, rng)[0]
    uncompressed = {"size": [40, 50], "counts": [int(c) for c in _runs(mask)]}
    coco = {"images": [{"id": 7, "width": 50, "height": 40, "file_name": "a.jpg"}],
            "categories": [{"id": 3, "name": "cat"}],
            "annotations": [
                {"id": 1, "image_id": 7, "category_id": 3, "iscrowd": 0, "area": 99.5, "bbox": [0, 0, 1, 1],
                 "segmentation": [[5.0, 5.0, 30.0, 5.0, 30.0, 20.0, 5.0, 20.0]]},
                {"id": 2, "image_id": 7, "category_id": 3, "iscrowd": 1, "area": 1, "bbox": [0, 0, 1, 1],
                 "segmentation": uncompressed, "score": 0.5}]}
    path = tmp_path / "labels.json"
    path.write_text(json.dumps(coco))
    with pytest.raises(ValueError, match="images_dir"):
        next(read_coco(path))
    root = str(tmp_path / "ds")
    import_coco(path, DatasetWriter(root, new_lineage(round=0, stage="manual")), images_dir=tmp_path / "img")
    (row,) = read_images(root).to_pylist()
    square, blob = row["annotations"]
    assert square["bbox"] == [5, 5, 25, 15] and square["predicted_iou"] is None and square["stage"] == "manual"
    assert blob["area"] == mask.sum() and blob["predicted_iou"] == 0.5
    assert validate(root, decode=True).ok


def test_coco_reader_streams_annotations_in_any_order_and_refuses_malformed_files(own_export, tmp_path):
    """read_coco keeps the annotations out of memory (a temporary SQLite file, removed with
    the reader or when the file is refused): annotations listed before the images and
    interleaved across images come back per image in file order; image ids 7 and "7" stay
    apart, 7 and 7.0 do not; malformed files are refused in one line naming what is wrong."""
    coco = json.loads(own_export.read_text())
    images, anns = coco["images"], coco["annotations"]
    key_a, key_b = images[0]["id"], images[1]["id"]
    mixed = [anns[3], anns[0], anns[4], anns[1], anns[5], anns[2]]
    mixed[1] = dict(mixed[1], image_id=float(mixed[1]["image_id"]))  # 7.0 names image 7
    stray = dict(anns[0], id=99, image_id=str(key_a))  # "7" names no image
    reordered = {"annotations": mixed + [stray], "categories": coco["categories"], "images": images}
    path = tmp_path / "reordered.json"
    path.write_text(json.dumps(reordered))
    before = set(Path(tempfile.gettempdir()).glob("samengine-coco-*"))
    read = read_coco(path)
    spill = set(Path(tempfile.gettempdir()).glob("samengine-coco-*")) - before
    assert len(spill) == 1 and read.orphans == 1
    for key in (key_a, key_b):
        expected = [a["id"] for a in mixed if int(a["image_id"]) == key]
        assert [a["id"] for a in read.annotations.get(key)] == expected and len(expected) == 3
    assert read.annotations.get(str(key_a))[0]["id"] == 99 and read.annotations.get(12345) == []
    imported = {r["image_key"]: [m["segmentation"]["counts"] for m in r["annotations"]] for r in read}
    direct = {r["image_key"]: [m["segmentation"]["counts"] for m in r["annotations"]] for r in read_coco(own_export)}
    assert sorted(imported[key_a]) == sorted(direct[key_a]) and len(imported[key_b]) == 3
    del read
    gc.collect()
    assert not any(p.exists() for p in spill)
    bad = {
        "a list": ([], "KeyError: 'images'"),
        "no images": ({"annotations": []}, "KeyError: 'images'"),
        "images an object": ({"images": {}}, "images must be a list of objects"),
        "an image a number": ({"images": [1]}, "images must be a list of objects"),
        "categories of strings": ({"images": images, "categories": ["cat"]}, "categories must be a list of objects"),
        "an annotation a list": ({"images": images, "annotations": [[1]]}, "annotations must be a list of objects"),
        "annotations an object": ({"images": images, "annotations": {"a": 1}}, "annotations must be a list of objects"),
    }
    for name, (doc, why) in bad.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(doc))
        with pytest.raises(ValueError) as e:
            read_coco(path)
        assert str(e.value).startswith(f"{path}: not a COCO instances JSON file (") and why in str(e.value), name
        assert "\n" not in str(e.value)
    truncated = tmp_path / "truncated.json"
    truncated.write_text(json.dumps(reordered)[:-40])  # the images come after the cut annotations
    with pytest.raises(ValueError, match="not a COCO instances JSON file \\(invalid JSON: "):
        read_coco(truncated)
    assert set(Path(tempfile.gettempdir()).glob("samengine-coco-*")) == before


def test_coco_import_quarantines_an_image_of_another_size_than_declared(tmp_path):
    """Masks drawn for a declared size that is not the file's would not fit the image: the
    image is quarantined with both sizes, as is one whose RLE has another size than it."""
    from dataset import read_table

    rng = np.random.default_rng(6)
    (tmp_path / "img").mkdir()
    for name in ("true.jpg", "lies.jpg", "rle.jpg"):
        (tmp_path / "img" / name).write_bytes(_jpeg(rng, 40, 50))
    square = [[5.0, 5.0, 30.0, 5.0, 30.0, 20.0, 5.0, 20.0]]
    wrong_rle = {"size": [96, 128], "counts": [0, 96 * 128]}
    coco = {"images": [{"id": 1, "width": 50, "height": 40, "file_name": "true.jpg"},
                       {"id": 2, "width": 640, "height": 480, "file_name": "lies.jpg"},
                       {"id": 3, "width": 50, "height": 40, "file_name": "rle.jpg"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": square},
                            {"id": 2, "image_id": 2, "category_id": 1, "segmentation": square},
                            {"id": 3, "image_id": 3, "category_id": 1, "segmentation": wrong_rle}]}
    path = tmp_path / "labels.json"
    path.write_text(json.dumps(coco))
    root = str(tmp_path / "ds")
    import_coco(path, DatasetWriter(root, new_lineage(round=0, stage="manual")), images_dir=tmp_path / "img")
    assert [r["uri"] for r in read_images(root).to_pylist()] == [str(tmp_path / "img" / "true.jpg")]
    reasons = {Path(q["uri"]).name: q["reason"] for q in read_table(root, "quarantine").to_pylist()}
    assert reasons["lies.jpg"] == "size_mismatch: the image is 50x40, its COCO entry says 640x480"
    assert reasons["labels.json#rle.jpg"].startswith("bad_record: ValueError: annotation 3: segmentation size "
                                                     "[96, 128] is not the image's [40, 50]")


def _runs(mask):
    """Uncompressed COCO runs of an H x W mask (column-major, starting with zeros)."""
    flat = mask.T.ravel()
    change = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    edges = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(edges)
    return np.concatenate([[0], runs]) if flat[0] else runs


def test_export_job_to_a_destination_it_cannot_write(source, tmp_path):
    import subprocess
    import sys

    taken = tmp_path / "taken"
    taken.write_text("a file")
    job = [sys.executable, str(Path(__file__).resolve().parents[1] / "jobs" / "export.py"), source]
    for args in (["--to", "coco", "--dest", str(taken / "instances.json")], ["--to", "sa1b", "--dest", str(taken)]):
        r = subprocess.run(job + args, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and r.stderr.startswith(f"error: {args[-1]}: ") and "Traceback" not in r.stderr
    assert taken.read_text() == "a file"


def _coco_with_bad_records(tmp_path, seed: int, bad_name: str, bad_segmentation) -> Path:
    """A COCO file of three images under tmp_path/img: good.jpg with a square, gone.jpg
    (missing) and bad_name, whose one mask is bad_segmentation."""
    rng = np.random.default_rng(seed)
    (tmp_path / "img").mkdir()
    for name in ("good.jpg", bad_name):
        (tmp_path / "img" / name).write_bytes(_jpeg(rng, 40, 50))
    square = [[5.0, 5.0, 30.0, 5.0, 30.0, 20.0, 5.0, 20.0]]
    coco = {"images": [{"id": 1, "width": 50, "height": 40, "file_name": "good.jpg"},
                       {"id": 2, "width": 50, "height": 40, "file_name": "gone.jpg"},
                       {"id": 3, "width": 50, "height": 40, "file_name": bad_name}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": square},
                            {"id": 2, "image_id": 2, "category_id": 1, "segmentation": square},
                            {"id": 3, "image_id": 3, "category_id": 1, "segmentation": bad_segmentation}]}
    path = tmp_path / "labels.json"
    path.write_text(json.dumps(coco))
    return path


def test_unusable_import_records_are_quarantined_and_the_rest_committed(tmp_path):
    from dataset import read_table

    path = _coco_with_bad_records(tmp_path, 5, "bad_segm.jpg", {"size": [40, 50]})
    root = str(tmp_path / "ds")
    writer = DatasetWriter(root, new_lineage(round=0, stage="manual", run_id="imp"))
    assert len(import_coco(path, writer, images_dir=tmp_path / "img")) == 1
    assert writer.skipped == 2
    assert [r["uri"] for r in read_images(root).to_pylist()] == [str(tmp_path / "img" / "good.jpg")]
    reasons = {q["uri"]: q["reason"] for q in read_table(root, "quarantine").to_pylist()}
    assert reasons == {str(tmp_path / "img" / "gone.jpg"): "missing: no such image file",
                       f"{path}#bad_segm.jpg": "bad_record: KeyError: 'counts'"}
    # An SA-1B shard whose record has no image, and one record that is not JSON.
    shard = tmp_path / "shard.tar"
    with tarfile.open(shard, "w") as tar:
        for name, data in (("sa_1.json", json.dumps({"image": {"image_id": 1, "width": 8, "height": 8,
                                                               "file_name": "sa_1.jpg"}, "annotations": []})),
                           ("sa_2.json", "{not json")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data.encode()))
    skipped = list(read_sa1b(shard))
    assert [(s.uri, s.reason.split(":")[0]) for s in skipped] == [(f"{shard}#sa_2.json", "bad_record"),
                                                                  (f"{shard}#sa_1.jpg", "missing")]
    with pytest.raises(ValueError, match="not a COCO instances JSON file"):
        next(read_coco(shard))


def _dataset_at(root, uris, batches=1):
    """A dataset whose images lie at uris, committed in `batches` versions."""
    records = image_records(len(uris), 1, h=32, w=32)
    for record, uri in zip(records, uris):
        record["uri"] = uri
    w = DatasetWriter(str(root), new_lineage(round=0, stage="auto"))
    step = -(-len(records) // batches)
    return [w.commit_images(records[i:i + step]) for i in range(0, len(records), step)]


def _exported_names(root, tmp_path):
    """{file_name} of the COCO export, checked equal to the SA-1B export's, one JSON file per image."""
    export_coco(root, tmp_path / "coco.json")
    coco = {i["file_name"] for i in json.loads((tmp_path / "coco.json").read_text())["images"]}
    assert export_sa1b(root, tmp_path / "sa1b") == len(coco)
    docs = sorted((tmp_path / "sa1b").glob("*.json"))
    assert len(docs) == len(coco)
    assert {json.loads(d.read_text())["image"]["file_name"] for d in docs} == coco
    return coco


def test_exports_name_images_by_their_path_below_the_common_folder(source, tmp_path):
    assert _exported_names(source, tmp_path / "flat") == {f"img_{i:05d}.jpg" for i in range(5)}  # base names
    root = tmp_path / "nested"
    _dataset_at(root, ["/data/set/a/img.png", "/data/set/b/img.png", "/data/set/b/deep/c.png",
                       "file:///data/set/a/caf%E9.png"])  # a name that is not UTF-8, as pipeline/sources stores it
    names = _exported_names(str(root), tmp_path / "nested-out")
    assert names == {"a/img.png", "b/img.png", "b/deep/c.png", "a/caf%E9.png"}
    assert unquote_to_bytes("a/caf%E9.png") == b"a/caf\xe9.png"
    on_s3 = tmp_path / "s3"
    _dataset_at(on_s3, ["s3://bucket/photos/2024/a/img.png", "s3://bucket/photos/2024/b/img.png"])
    assert _exported_names(str(on_s3), tmp_path / "s3-out") == {"a/img.png", "b/img.png"}


def test_a_failed_coco_export_leaves_nothing_behind(source, tmp_path, monkeypatch):
    import subprocess
    import sys

    folder = tmp_path / "exports"
    folder.mkdir()
    job = [sys.executable, str(Path(__file__).resolve().parents[1] / "jobs" / "export.py"), source]
    r = subprocess.run(job + ["--to", "coco", "--dest", str(folder)], capture_output=True, text=True, timeout=120)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exports"] and not any(folder.iterdir())
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.splitlines()) == 1
    assert r.stderr.startswith(f"error: {folder}: a folder; name the JSON file to write"), r.stderr

    def no_rename(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(dataset.coco.os, "replace", no_rename)
    with pytest.raises(OSError, match="rename failed"):
        export_coco(source, folder / "instances.json")
    assert not any(folder.iterdir())


def test_folder_exports_replace_an_earlier_export(tmp_path):
    root = str(tmp_path / "ds")
    first, _ = _dataset_at(root, [f"/img/{i}.png" for i in range(40)], batches=2)
    assert read_images(root, version=first).num_rows == 20
    parquet, sa1b = tmp_path / "parquet", tmp_path / "sa1b"
    assert len(export_parquet(root, str(parquet), max_rows_per_file=5)) == 8 and export_sa1b(root, sa1b) == 40
    files = export_parquet(root, str(parquet), max_rows_per_file=5, version=first)  # fewer rows, same folder
    assert len(files) == 4 and sorted(map(str, parquet.iterdir())) == files
    assert pq.read_table(parquet).num_rows == 20
    assert export_sa1b(root, sa1b, version=first) == 20
    assert len(list(sa1b.glob("*.json"))) == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "parquet", "sa1b"]  # no temporary folder left
    assert parquet.stat().st_mode == sa1b.stat().st_mode == (tmp_path / "ds").stat().st_mode  # not private
    # A folder that holds anything else is refused before any work, and kept as it was.
    (parquet / "README.md").write_text("dataset card")
    (sa1b / "img.png").write_bytes(b"an image")
    for export, dest in ((export_parquet, parquet), (export_sa1b, sa1b)):
        before = sorted(p.name for p in dest.iterdir())
        with pytest.raises(FileExistsError, match="not an earlier export"):
            export(root, str(dest))
        assert sorted(p.name for p in dest.iterdir()) == before
    assert (parquet / "README.md").read_text() == "dataset card"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "parquet", "sa1b"]


def _import_job(capsys, *argv):
    """jobs/import_.py in this process: (exit code, stdout, stderr)."""
    from jobs import import_ as job

    code = job.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _stages(root):
    return {(a["stage"], a["round"]) for row in read_images(root).to_pylist() for a in row["annotations"]}


@pytest.fixture(scope="module")
def own_export(tmp_path_factory):
    """Our COCO export of 2 images x 3 masks annotated in round 4, stage semi_auto."""
    folder = tmp_path_factory.mktemp("own")
    DatasetWriter(str(folder / "ds"), new_lineage(round=4, stage="semi_auto")).commit_images(image_records(2, 3))
    export_coco(str(folder / "ds"), folder / "instances.json")
    return folder / "instances.json"


def test_import_job_keeps_the_files_stage_and_round_unless_a_flag_sets_them(own_export, tmp_path, capsys):
    """Our exports carry each mask's stage and round: kept without flags; a flag given wins
    over the file for every mask (the run's commit carries the flags or the defaults)."""
    cases = [((), {("semi_auto", 4)}, ("imported", 0)),
             (("--stage", "manual", "--round", "2"), {("manual", 2)}, ("manual", 2)),
             (("--round", "7"), {("semi_auto", 7)}, ("imported", 7)),
             (("--stage", "auto"), {("auto", 4)}, ("auto", 0))]
    for i, (flags, masks, run) in enumerate(cases):
        root = str(tmp_path / f"ds{i}")
        assert _import_job(capsys, root, own_export, "--from", "coco", *flags)[0] == 0
        assert _stages(root) == masks, flags
        (commit,) = [c for c in history(root) if c.get("table") == "annotations"]
        assert (commit["stage"], commit["round"]) == run, flags
    # A file without the fields: the defaults.
    foreign = json.loads(own_export.read_text())
    for ann in foreign["annotations"]:
        del ann["stage"], ann["round"]
    path = tmp_path / "foreign.json"
    path.write_text(json.dumps(foreign))
    assert _import_job(capsys, tmp_path / "plain", path, "--from", "coco")[0] == 0
    assert _stages(str(tmp_path / "plain")) == {("imported", 0)}
    with pytest.raises(SystemExit):
        _import_job(capsys, "--help")
    help_text = " ".join(capsys.readouterr().out.split())
    assert "default: a COCO mask's own stage field, else imported" in help_text
    assert "default: a COCO mask's own round field, else 0" in help_text


def test_import_job_reports_annotations_that_name_no_image_of_the_file(own_export, tmp_path, capsys):
    coco = json.loads(own_export.read_text())
    stray = dict(coco["annotations"][0], id=10**12, image_id=123456789)
    coco["annotations"] += [stray, dict(stray, id=10**12 + 1)]
    path = tmp_path / "stray.json"
    path.write_text(json.dumps(coco))
    assert read_coco(path).orphans == 2 and read_coco(own_export).orphans == 0
    code, out, err = _import_job(capsys, tmp_path / "ds", path, "--from", "coco")
    assert code == 0
    assert err == f"warning: {path}: 2 annotation(s) name no image of the file: not imported\n"
    assert out.rstrip().endswith("; 2 annotation(s) naming no image of their file not imported")
    assert sum(len(r["annotations"]) for r in read_images(str(tmp_path / "ds")).to_pylist()) == 6


def test_coco_polygons_that_cannot_be_drawn_quarantine_their_image_with_a_clear_reason(tmp_path):
    from dataset import read_table

    rng = np.random.default_rng(8)
    (tmp_path / "img").mkdir()
    polygons = {"good": [[5.0, 5.0, 30.0, 5.0, 30.0, 20.0]], "no_ring": [], "empty_ring": [[]],
                "box_like": [[5, 5, 30, 20]], "odd": [[5, 5, 30, 5, 30]], "words": [["a", "b", "c", "d", "e", "f"]]}
    images, annotations = [], []
    for i, (name, segm) in enumerate(polygons.items(), 1):
        (tmp_path / "img" / f"{name}.jpg").write_bytes(_jpeg(rng, 40, 50))
        images.append({"id": i, "width": 50, "height": 40, "file_name": f"{name}.jpg"})
        annotations.append({"id": i, "image_id": i, "category_id": 1, "segmentation": segm})
    path = tmp_path / "labels.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    root = str(tmp_path / "ds")
    import_coco(path, DatasetWriter(root, new_lineage(round=0, stage="manual")), images_dir=tmp_path / "img")
    assert [Path(r["uri"]).name for r in read_images(root).to_pylist()] == ["good.jpg"]
    reasons = {q["uri"].split("#")[1]: q["reason"] for q in read_table(root, "quarantine").to_pylist()}
    need = "coordinates; a polygon needs 3 or more x, y pairs"
    assert reasons == {
        "no_ring.jpg": "bad_record: ValueError: annotation 2: empty segmentation (no polygon)",
        "empty_ring.jpg": f"bad_record: ValueError: annotation 3: polygon 0 has 0 {need}",
        "box_like.jpg": f"bad_record: ValueError: annotation 4: polygon 0 has 4 {need}",
        "odd.jpg": f"bad_record: ValueError: annotation 5: polygon 0 has 5 {need}",
        "words.jpg": "bad_record: ValueError: annotation 6: polygon 0 is not a list of numbers",
    }


def test_import_job_refuses_a_bad_coco_file_before_creating_anything(own_export, tmp_path, capsys):
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [')
    unnamed = tmp_path / "unnamed.json"
    unnamed.write_text(json.dumps({"images": [{"id": 1, "width": 8, "height": 8, "file_name": "a.jpg"}]}))
    for path, reason in ((broken, "not a COCO instances JSON file (invalid JSON: parse error: premature EOF)"), (unnamed, "has no sha256")):
        root = tmp_path / f"ds-{path.stem}"
        code, out, err = _import_job(capsys, root, path, "--from", "coco")
        assert code == 2 and out == "" and err.startswith(f"error: {path}: ") and reason in err
        assert len(err.splitlines()) == 1 and "Traceback" not in err
        assert not root.exists()  # no empty tables left behind


def test_import_job_rerun_that_writes_nothing_adds_no_lineage_row(own_export, tmp_path, capsys):
    from dataset import read_table

    root = str(tmp_path / "ds")
    tables = ("annotations", "quarantine", "duplicates", "lineage")
    code, out, _ = _import_job(capsys, root, own_export, "--from", "coco", "--run-id", "first")
    assert code == 0 and out.startswith("run first: 1 commits")
    assert read_table(root, "lineage")["run_id"].to_pylist() == ["first"]
    commits = {name: history(root, name) for name in tables}
    code, out, _ = _import_job(capsys, root, own_export, "--from", "coco", "--run-id", "again")
    assert code == 0 and out == "run again: 0 commits\n"
    assert {name: history(root, name) for name in tables} == commits  # no commit to any table
    assert read_table(root, "lineage")["run_id"].to_pylist() == ["first"]


def test_import_job_rerun_records_each_quarantined_item_once(tmp_path, capsys):
    """A rerun of an import whose file has a missing image and an undrawable polygon: the
    quarantine rows are not appended again, and a rerun that writes nothing adds no lineage
    row (neither as a new run nor resumed under the same run id)."""
    from dataset import read_table

    path = _coco_with_bad_records(tmp_path, 11, "bad_polygon.jpg", [[5, 5, 30, 20]])
    root = str(tmp_path / "ds")
    argv = (root, path, "--from", "coco", "--images-dir", tmp_path / "img")
    tables = ("annotations", "quarantine", "duplicates", "lineage")

    def state():
        rows = {name: sorted(map(str, read_table(root, name).to_pylist())) for name in ("quarantine", "lineage")}
        return rows, {name: history(root, name) for name in tables}

    code, out, _ = _import_job(capsys, *argv, "--run-id", "first")
    assert code == 0 and out.startswith("run first: 1 commits") and "2 records skipped" in out
    first = state()
    assert len(first[0]["quarantine"]) == 2 and read_table(root, "lineage")["run_id"].to_pylist() == ["first"]
    for rerun in ((), ("--run-id", "first")):  # a new run, then the first one resumed
        code, out, _ = _import_job(capsys, *argv, *rerun)
        assert code == 0 and " 0 commits; 2 records skipped" in out, rerun
        assert state() == first, rerun  # the same rows, and no commit to any table


def _sa1b_sources(tmp_path):
    """Sources that are not SA-1B: what each one is, and the reason the refusal gives."""
    rng = np.random.default_rng(12)
    jpegs, other_json, empty = tmp_path / "jpegs", tmp_path / "other_json", tmp_path / "empty"
    for folder in (jpegs, other_json, empty):
        folder.mkdir()
    (jpegs / "sa_1.jpg").write_bytes(_jpeg(rng, 16, 16))
    (other_json / "labels.json").write_text(json.dumps({"images": [], "annotations": []}))
    (other_json / "sa_1.json").write_text(json.dumps({"image": {"image_id": 1}, "annotations": []}))
    shard, coco = tmp_path / "jpegs.tar", tmp_path / "labels.json"
    with tarfile.open(shard, "w") as tar:
        tar.add(jpegs / "sa_1.jpg", "sa_1.jpg")
    coco.write_text(json.dumps({"images": [], "annotations": []}))
    return [(jpegs, "it has no .json file"), (other_json, "none of its 2 JSON files is one"),
            (empty, "it has no .json file"), (shard, "it has no .json file"),
            (coco, "it is a file that is not a tar archive")]


def test_import_job_refuses_a_source_not_in_sa1b_format_before_creating_anything(source, tmp_path, capsys):
    cases = _sa1b_sources(tmp_path)
    good = tmp_path / "good"
    export_sa1b(source, good)
    for i, (src, reason) in enumerate(cases):
        root = tmp_path / f"ds{i}" / "nested"
        code, out, err = _import_job(capsys, root, good, src, "--from", "sa1b")  # a good source before it
        assert code == 2 and out == "", src
        assert err.startswith(f"error: {src}: not an SA-1B folder or tar shard: expected per-image JSON files")
        assert err.rstrip().endswith(reason) and len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert not (tmp_path / f"ds{i}").exists()  # nothing created, not even the root's parent
        with pytest.raises(ValueError, match="not an SA-1B folder"):
            read_sa1b(src)  # refused when called, before a record is asked for
    assert _import_job(capsys, tmp_path / "ok", good, "--from", "sa1b")[0] == 0
    assert read_images(str(tmp_path / "ok")).num_rows == 5


def test_a_commit_records_the_rounds_its_masks_have_and_round_pins_follow_them(own_export, tmp_path, capsys):
    """An import that keeps the file's round (4) under a run of round 0: --round 4 finds its
    commit, --round 0 does not; a flag given pins both the masks and the commit."""
    from dataset.reader import DatasetNotFound, resolve_version

    root = str(tmp_path / "ds")
    base_images = image_records(2, 2)
    for i, record in enumerate(base_images):  # other images than the export's
        record["image_id"] = hashlib.sha256(f"round 0 image {i}".encode()).hexdigest()
    DatasetWriter(root, new_lineage(round=0, stage="auto")).commit_images(base_images)
    base = resolve_version(root)
    assert _import_job(capsys, root, own_export, "--from", "coco")[0] == 0
    (commit,) = [c for c in history(root) if c.get("table") == "annotations" and c["version"] > base]
    assert (commit["round"], commit["rounds"], commit["stages"]) == (0, [4], ["semi_auto"])
    assert resolve_version(root, round=4) == commit["version"] and resolve_version(root, round=0) == base
    with pytest.raises(DatasetNotFound):
        resolve_version(str(tmp_path / "ds"), round=7)
    pinned = str(tmp_path / "pinned")
    assert _import_job(capsys, pinned, own_export, "--from", "coco", "--round", "7")[0] == 0
    (commit,) = [c for c in history(pinned) if c.get("table") == "annotations"]
    assert (commit["round"], commit["rounds"], commit["stages"]) == (7, [7], ["semi_auto"])
    assert resolve_version(pinned, round=7) == commit["version"]
    with pytest.raises(DatasetNotFound):
        resolve_version(pinned, round=4)


def _json_ids(path):
    """(image ids, annotation ids, samengine_ids) of a COCO file or SA-1B folder, in file
    order, read as JavaScript reads JSON: every number a double (parse_int=float)."""
    if path.is_file():
        doc = json.loads(path.read_text(), parse_int=float)
        images, anns = [i["id"] for i in doc["images"]], doc["annotations"]
    else:
        docs = [json.loads(f.read_text(), parse_int=float) for f in sorted(path.glob("*.json"))]
        images, anns = [d["image"]["image_id"] for d in docs], [a for d in docs for a in d["annotations"]]
    return images, [a["id"] for a in anns], [a["samengine_id"] for a in anns]


def test_json_export_ids_stay_exact_in_readers_that_hold_numbers_as_doubles(source, tmp_path, capsys):
    """Stored annotation ids are above 2**53: a double-based reader (node, jq, CVAT) rounded
    them into collisions. Exports number masks 1..n instead, keep the stored id as a string,
    give the same ids on every export of the version (COCO and SA-1B alike), and re-import
    through the import job to the same rows, stored ids included."""
    stored = [m["id"] for r in read_images(source).to_pylist() for m in r["annotations"]]
    assert max(stored) > 2**53 - 1  # the ids that a double cannot hold
    coco, sa1b = tmp_path / "coco.json", tmp_path / "sa1b"
    export_coco(source, coco)
    export_sa1b(source, sa1b)
    by_stored = {}
    for path in (coco, sa1b):
        image_ids, ann_ids, own = _json_ids(path)
        assert len(ann_ids) == len(stored) == 40 and len(image_ids) == 5
        for ids in (image_ids, ann_ids):
            assert all(v == int(v) and 1 <= v <= 2**53 - 1 for v in ids) and len(set(ids)) == len(ids)
        assert sorted(int(i) for i in own) == sorted(stored) and all(isinstance(i, str) for i in own)
        by_stored[path.name] = dict(zip(own, ann_ids))
    assert by_stored["coco.json"] == by_stored["sa1b"]  # one numbering for the version
    first = coco.read_bytes()
    export_coco(source, coco)
    assert coco.read_bytes() == first
    assert sorted(by_stored["coco.json"].values()) == list(map(float, range(1, 41)))
    # Our own exports re-imported by the job: the same rows (ids, areas, bboxes, stage, round).
    for fmt, path, flags in (("coco", coco, ()), ("sa1b", sa1b, ("--stage", "auto", "--round", "0"))):
        back = tmp_path / f"back-{fmt}"
        assert _import_job(capsys, back, path, "--from", fmt, *flags)[0] == 0
        assert _sorted_rows(str(back)) == _sorted_rows(source), fmt


def test_parquet_export_of_a_version_without_images_is_one_file_with_the_schema(tmp_path):
    """An empty folder is no dataset: pyarrow reads no columns from it, Hugging Face
    load_dataset fails. A version without rows is one zero-row file carrying the schema."""
    root = str(tmp_path / "ds")
    DatasetWriter(root, new_lineage(round=0, stage="auto")).commit_images([])
    assert read_images(root).num_rows == 0
    dest = tmp_path / "parquet"
    assert export_parquet(root, str(dest)) == [str(dest / "part-0.parquet")]
    table = pq.read_table(dest)
    assert table.num_rows == 0 and table.schema.names == read_images(root).schema.names
    assert "annotations" in table.schema.names
