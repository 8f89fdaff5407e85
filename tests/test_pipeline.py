"""The auto-annotation pipeline end to end on a real local Ray: local folder and S3 (moto
server) in and out, every input accounted for exactly once, resume, and masks equal to
those of the in-process generator."""
from __future__ import annotations

import io
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
import ray
import torch
from PIL import Image
from pycocotools import mask as coco_mask

from amg import AutomaticMaskGenerator
from dataset import history, read_images, read_table
from jobs.auto_annotate import load_config
from model import load_checkpoint
from model.footprint import GIB, worker_bytes
from pipeline.graph import run
from pipeline.images import decode_image
from schemas.annotate import DEFAULT_CHECKPOINT
from tests.s3server import SECRET, free_port, moto_server
from training.synthetic import make_scene

ROOT = Path(__file__).resolve().parents[1]
# Small grid, filters off, so that even a weak checkpoint leaves masks to compare.
AMG_FLAGS = ["--points-per-side", "4", "--pred-iou-thresh", "0", "--stability-score-thresh", "0"]


@pytest.fixture(scope="module")
def s3():
    """An S3 server, its endpoint in the standard AWS environment (AWS_ENDPOINT_URL) before
    Ray starts, so that Ray's workers reach it the way they would reach any S3 store."""
    with moto_server("data") as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def ray_session(s3):
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _jpeg(array: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def make_inputs(folder: Path) -> dict[str, str]:
    """A mixed folder: photos and synthetic scenes, an exact copy, a re-encoded near copy,
    and broken files. Returns file name -> the table each must end in."""
    folder.mkdir(parents=True, exist_ok=True)
    expected = {}
    for name in ("chelsea", "coffee", "rocket"):
        im = Image.open(ROOT / "examples" / "images" / f"{name}.jpg").convert("RGB")
        im.thumbnail((160, 160))
        (folder / f"{name}.jpg").write_bytes(_jpeg(np.asarray(im)))
        expected[f"{name}.jpg"] = "annotations"
    for seed in (1, 2):
        (folder / f"scene{seed}.png").write_bytes(_png(make_scene(seed=seed, size=(120, 150)).image))
        expected[f"scene{seed}.png"] = "annotations"
    shutil.copy(folder / "chelsea.jpg", folder / "sub_copy_of_chelsea.jpg")
    expected["sub_copy_of_chelsea.jpg"] = "duplicates"
    near = np.asarray(Image.open(folder / "scene1.png").convert("RGB"))
    (folder / "scene1_recompressed.jpg").write_bytes(_jpeg(near, quality=85))
    expected["scene1_recompressed.jpg"] = "duplicates"
    (folder / "notes.jpg").write_bytes(b"<html><body>not an image</body></html>")
    expected["notes.jpg"] = "quarantine"
    (folder / "empty.png").write_bytes(b"")
    expected["empty.png"] = "quarantine"
    (folder / "truncated.jpg").write_bytes((folder / "coffee.jpg").read_bytes()[:300])
    expected["truncated.jpg"] = "quarantine"
    return expected


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


# Copies of one image: whichever reaches the deduplicator first is kept, the other recorded.
PAIRS = (("chelsea.jpg", "sub_copy_of_chelsea.jpg"), ("scene1.png", "scene1_recompressed.jpg"))


def assert_each_input_once(root: str, expected: dict[str, str]) -> dict[str, str]:
    """Every input is in exactly one table, the one expected (up to which copy of a pair is
    kept). Returns name -> table."""
    went = where_each_input_went(root)
    assert sorted(went) == sorted(expected) and all(len(t) == 1 for t in went.values()), went
    got = {name: tables[0] for name, tables in went.items()}
    for a, b in PAIRS:
        assert sorted([got[a], got[b]]) == ["annotations", "duplicates"], (a, b, got)
    assert {n: t for n, t in got.items() if n not in sum(PAIRS, ())} == \
        {n: t for n, t in expected.items() if n not in sum(PAIRS, ())}
    return got


def where_each_input_went(root: str) -> dict[str, list[str]]:
    seen: dict[str, list[str]] = {}
    for table in ("annotations", "duplicates", "quarantine"):
        uris = read_images(root, columns=["uri"])["uri"] if table == "annotations" else read_table(root, table)["uri"]
        for uri in uris.to_pylist():
            seen.setdefault(Path(uri).name, []).append(table)
    return seen


def test_local_folder_in_and_out_every_input_once_and_resume(ray_session, tmp_path):
    expected = make_inputs(tmp_path / "in")
    out = str(tmp_path / "dataset")
    config = load_config(["--input", str(tmp_path / "in"), "--output", out, *AMG_FLAGS, "--chunk-images", "3"])
    summary = run(config)

    got = assert_each_input_once(out, expected)
    assert summary["listed"] == len(expected) and summary["processed"] == len(expected)
    assert summary["annotated"] == 5 and summary["duplicate"] == 2 and summary["quarantined"] == 3
    dups = read_table(out, "duplicates").to_pylist()
    kinds = {Path(d["uri"]).name: d["kind"] for d in dups}
    assert kinds == {(a if got[a] == "duplicates" else b): kind for (a, b), kind in zip(PAIRS, ("exact", "near"))}
    reasons = {Path(q["uri"]).name: q["reason"] for q in read_table(out, "quarantine").to_pylist()}
    assert reasons["empty.png"].startswith("empty_file") and reasons["notes.jpg"].startswith("not_an_image")
    assert reasons["truncated.jpg"].startswith("truncated")
    # The run summary is stored beside the tables.
    stored = json.loads((Path(out) / "runs" / f"{summary['run_id']}.json").read_text())
    assert stored["annotated"] == 5 and stored["masks"] == summary["masks"] > 0
    # Chunks of at most 3 inputs: the 5 annotated images take several commits, each tagged
    # with the run.
    commits = [c for c in history(out) if c.get("run_id") == summary["run_id"] and c.get("table") == "annotations"]
    assert len(commits) >= 2 and all(c["images"] <= 3 for c in commits) and sum(c["images"] for c in commits) == 5

    # Rerunning the same command resumes: nothing left to do, nothing written twice.
    versions = {t: len(history(out, t)) for t in ("annotations", "duplicates", "quarantine")}
    again = run(load_config(["--input", str(tmp_path / "in"), "--output", out, *AMG_FLAGS]))
    assert again["already_done"] == len(expected) and again["processed"] == 0
    assert {t: len(history(out, t)) for t in versions} == versions

    # New files in the folder: only they are processed; a renamed copy of a committed image
    # is a duplicate of it, not a second row.
    (tmp_path / "in" / "scene3.png").write_bytes(_png(make_scene(seed=3, size=(120, 150)).image))
    shutil.copy(tmp_path / "in" / "rocket.jpg", tmp_path / "in" / "rocket_again.jpg")
    third = run(load_config(["--input", str(tmp_path / "in"), "--output", out, *AMG_FLAGS]))
    assert (third["processed"], third["annotated"], third["duplicate"]) == (2, 1, 1)
    ids = read_images(out, columns=["image_id"])["image_id"]
    assert len(ids) == 6 == len(pc.unique(ids))


def test_pipeline_masks_equal_the_in_process_generator(ray_session, tmp_path):
    folder = tmp_path / "in"
    make_inputs(folder)
    out = str(tmp_path / "dataset")
    # The weights as an official-style file: a bare state dict, its config named by --model-type.
    model, _ = load_checkpoint(DEFAULT_CHECKPOINT)
    torch.save(model.state_dict(), tmp_path / "sam_vit_tiny256.pth")
    config = load_config(["--input", str(folder), "--output", out, *AMG_FLAGS, "--split-stages",
                          "--cpus-per-actor", "0.5", "--encoder-batch-size", "2",
                          "--checkpoint", str(tmp_path / "sam_vit_tiny256.pth"), "--model-type", "vit_tiny256"])
    assert not config.fused("cpu")
    log = []
    summary = run(config, log=log.append)
    assert summary["annotated"] == 5
    # "auto" pools sized to the 2-CPU cluster, one CPU left to I/O: up to two half-CPU actors
    # per stage, each reserving the estimate of model.footprint with Ray
    sizes = [line for line in log if line.startswith("model actors: ")]
    assert len(sizes) == 1 and "1 to 2 encoder actors (0.5 CPU, " in sizes[0], log
    assert "; 1 to 2 decoder actors (0.5 CPU, " in sizes[0] and " GiB each)" in sizes[0]
    pools = summary["model_pools"]
    assert sorted(pools) == ["decoder", "encoder"] and pools["encoder"]["max"] == pools["decoder"]["max"] == 2
    for name in pools:  # each role's estimate: a decoder actor holds no image encoder
        estimate = worker_bytes(model.config, name, config.amg.points_per_side ** 2, config.amg.points_per_batch)
        assert pools[name]["memory_gb"] == round(estimate / GIB, 2)

    generator = AutomaticMaskGenerator(model, config.amg)
    total = 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the actors ran (--cpus-per-actor 0.5): the same float sums
    try:
        expected_rows = [generator.generate(decode_image(Path(row["uri"]).read_bytes()))
                         for row in read_images(out).to_pylist()]
    finally:
        torch.set_num_threads(threads)
    for row, expected in zip(read_images(out).to_pylist(), expected_rows):
        got = row["annotations"]
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            mine = coco_mask.decode({"size": g["segmentation"]["size"], "counts": g["segmentation"]["counts"].encode()})
            assert np.array_equal(mine, coco_mask.decode(e["segmentation"]))
            assert g["area"] == e["area"] == int(mine.sum())
            assert list(g["bbox"]) == [int(round(v)) for v in coco_mask.toBbox(e["segmentation"])]
            assert g["predicted_iou"] == pytest.approx(e["predicted_iou"])
            assert g["stage"] == "auto" and g["round"] == 0
        total += len(got)
    assert total == summary["masks"] and total >= 10


def test_s3_in_and_out(ray_session, s3, tmp_path):
    import boto3

    expected = make_inputs(tmp_path / "in")
    client = boto3.client("s3", endpoint_url=s3, region_name="us-east-1")
    for path in (tmp_path / "in").iterdir():
        client.put_object(Bucket="data", Key=f"images/{path.name}", Body=path.read_bytes())
    client.put_object(Bucket="data", Key="images/README.md", Body=b"not listed: not an image suffix")
    root = "s3://data/datasets/auto"
    summary = run(load_config(["--input", "s3://data/images", "--output", root, *AMG_FLAGS]))

    assert (summary["annotated"], summary["duplicate"], summary["quarantined"]) == (5, 2, 3)
    assert_each_input_once(root, expected)
    rows = read_images(root).to_pylist()
    assert all(r["uri"].startswith("s3://data/images/") for r in rows)
    listing = read_table(root, "listing").to_pylist()
    assert len(listing) == len(expected) and all(e["etag"] and e["size"] > 0 for e in listing if "empty" not in e["uri"])
    masks = [coco_mask.decode({"size": a["segmentation"]["size"], "counts": a["segmentation"]["counts"].encode()})
             for r in rows for a in r["annotations"]]
    assert len(masks) == summary["masks"] > 0 and all(m.sum() == a["area"] for m, a in
                                                        zip(masks, [a for r in rows for a in r["annotations"]]))
    summary_key = f"datasets/auto/runs/{summary['run_id']}.json"
    assert json.loads(client.get_object(Bucket="data", Key=summary_key)["Body"].read())["masks"] == summary["masks"]
    # No credential is written anywhere: not in commit logs, tables, the summary or the report.
    for obj in client.list_objects_v2(Bucket="data", Prefix="datasets/auto/")["Contents"]:
        assert SECRET.encode() not in client.get_object(Bucket="data", Key=obj["Key"])["Body"].read(), obj["Key"]
    assert SECRET not in json.dumps(summary)
    # Resume on S3 too.
    again = run(load_config(["--input", "s3://data/images", "--output", root, *AMG_FLAGS]))
    assert again["processed"] == 0 and again["already_done"] == len(expected)


def test_flaky_storage_every_input_once(ray_session, s3, tmp_path):
    """Input and output through a proxy that fails every 4th request (503 SlowDown, dropped
    connections, slow 500s): retries absorb it, and every input still ends up once."""
    import boto3

    expected = make_inputs(tmp_path / "in")
    client = boto3.client("s3", endpoint_url=s3, region_name="us-east-1")
    for path in (tmp_path / "in").iterdir():
        client.put_object(Bucket="data", Key=f"flaky/{path.name}", Body=path.read_bytes())
    port = free_port()
    proxy = subprocess.Popen([sys.executable, str(ROOT / "tests" / "faulty_proxy.py"), "--target", s3,
                              "--port", str(port), "--fail-every", "4"], stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        root = "s3://data/datasets/flaky"
        flags = ["--input", "s3://data/flaky", "--output", root, "--endpoint-url", f"http://127.0.0.1:{port}",
                 *AMG_FLAGS, "--chunk-images", "2"]
        summary = run(load_config(flags))
    finally:
        proxy.terminate()
        stats = json.loads(proxy.communicate(timeout=30)[0].strip().splitlines()[-1])
    assert sum(stats["faults"].values()) >= 10 and all(v > 0 for v in stats["faults"].values()), stats
    assert (summary["annotated"], summary["duplicate"], summary["quarantined"]) == (5, 2, 3)
    assert_each_input_once(root, expected)  # read back directly, not through the proxy
    # The same output as a clean run of the same inputs (local, no faults).
    clean = str(tmp_path / "clean")
    run(load_config(["--input", str(tmp_path / "in"), "--output", clean, *AMG_FLAGS]))
    masks = lambda r: {x["image_id"]: json.dumps(x["annotations"]) for x in read_images(r).to_pylist()}  # noqa: E731
    assert masks(root) == masks(clean)
    reasons = {Path(q["uri"]).name: q["reason"] for q in read_table(root, "quarantine").to_pylist()}
    assert not any(r.startswith("read_error") for r in reasons.values()), reasons


def test_text_prompts_one_mask_per_phrase_recorded_in_the_dataset(ray_session, tmp_path):
    """--text: every image prompted with each phrase (filters off: one mask per phrase),
    the phrase stored with its mask, masks equal to the in-process text decoder's. (How
    good the masks are is measured on held-out scenes in tests/test_text.py.)"""
    from amg import encode_image, postprocess
    from amg.text import decode_texts
    from model.text import load_embedder
    from pipeline.sources import InputError
    from schemas.annotate import DEFAULT_TEXT_CHECKPOINT
    from training.synthetic import scene_seed

    folder = tmp_path / "in"
    folder.mkdir()
    scenes = [make_scene(scene_seed(1_000_003, i), 256) for i in range(2)]
    for i, scene in enumerate(scenes):
        (folder / f"named{i}.png").write_bytes(_png(scene.image))
    phrases = [scenes[0].names[0], "the " + scenes[1].names[-1]]
    out = str(tmp_path / "dataset")
    flags = ["--input", str(folder), "--output", out, "--pred-iou-thresh", "0", "--stability-score-thresh", "0"]
    config = load_config([*flags, "--text", phrases[0], "--text", phrases[1], "--text", phrases[0]])
    assert config.text == phrases and config.checkpoint == DEFAULT_TEXT_CHECKPOINT
    summary = run(config)
    assert summary["annotated"] == 2 and summary["masks"] == 4

    model, _ = load_checkpoint(DEFAULT_TEXT_CHECKPOINT)
    vectors = load_embedder(model.config.text_embedder).embed(phrases)
    for row in read_images(out).to_pylist():
        image = decode_image(Path(row["uri"]).read_bytes())
        encoded = encode_image(model, image, config.amg)
        expected = postprocess(decode_texts(model, encoded, phrases, vectors, config.amg), encoded.orig_size,
                               config.amg)
        got = row["annotations"]
        assert [g["text_prompt"] for g in got] == [e["text_prompt"] for e in expected] == phrases
        for g, e in zip(got, expected):
            mine = coco_mask.decode({"size": g["segmentation"]["size"], "counts": g["segmentation"]["counts"].encode()})
            assert np.array_equal(mine, coco_mask.decode(e["segmentation"]))
            assert g["area"] == int(mine.sum()) and g["point_coords"] == [] and g["stage"] == "auto"
    # A checkpoint without a text input: a clear error before anything runs.
    with pytest.raises(InputError, match="no text prompt input"):
        run(load_config([*flags, "--text", "red ellipse", "--checkpoint", DEFAULT_CHECKPOINT,
                         "--output", str(tmp_path / "other")]))
