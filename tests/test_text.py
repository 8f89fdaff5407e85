"""Text prompts: the offline text embedder, phrases of named synthetic objects, the
predictor's text input, a short fine-tune whose loss falls, and the bundled text
checkpoint against baselines that ignore the text (held-out scenes)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from model import Sam, SamPredictor, get_config, load_checkpoint
from model.text import MiniLMEmbedder, embed_texts, load_embedder
from schemas.annotate import DEFAULT_TEXT_CHECKPOINT
from training.synthetic import make_scene, scene_seed
from training.text import (
    TextTrainConfig, dataset_items, low_res_targets, prepare_examples, read_captions, scene_stream, synthetic_items,
    text_miou, train_text, unique_phrases, vocabulary,
)

ROOT = Path(__file__).resolve().parents[1]


class WordHashEmbedder:
    """A tiny deterministic embedder for tests of the plug-in path: a bag of hashed words."""

    name = "tests.test_text:WordHashEmbedder"
    dim = 16

    def embed(self, texts):
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, t in enumerate(texts):
            for w in t.lower().split():
                out[i, sum(map(ord, w)) % self.dim] += 1
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.where(norms > 0, norms, 1)


@pytest.fixture(scope="module")
def minilm() -> MiniLMEmbedder:
    return load_embedder("minilm")


def test_unique_phrases_name_exactly_one_instance():
    names = ["red solid circle", "red striped circle", "blue solid star"]
    pairs = unique_phrases(names)
    by = {}
    for i, p in pairs:
        by.setdefault(i, []).append(p)
    assert by[0][0] == "red solid circle" and "red circle" not in by[0] and "circle" not in by[0]
    assert "striped" in by[1] and "red striped" in by[1]
    assert {"blue", "star", "blue star", "blue solid star"} <= set(by[2]) and "solid" not in by[2]
    # Every phrase matches its own instance's words and no other instance's.
    for i, p in pairs:
        words = p.split()
        hits = [j for j, n in enumerate(names) if all(w in n.split() for w in words)]
        assert hits == [i], (p, hits)
    assert unique_phrases(["red solid circle", "red solid circle"]) == []
    assert len(vocabulary()) == len(set(vocabulary()))


def test_low_res_targets_majority_cover():
    m = np.zeros((1, 8, 8), bool)
    m[0, :4, :4] = True  # one full 4x4 block
    m[0, 4:6, 4:8] = True  # half of another
    m[0, 0, 7] = True  # a sixteenth of a third
    t = low_res_targets(m, 2)
    assert t.tolist() == [[[True, False], [False, True]]]


def test_minilm_loads_offline_and_means_what_words_mean(minilm, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    e = minilm.embed(["red ellipse", "a red ellipse", "blue star", ""])
    assert e.shape == (4, 384) and e.dtype == np.float32
    assert np.allclose(np.linalg.norm(e[:3], axis=1), 1, atol=1e-5)
    assert e[0] @ e[1] > e[0] @ e[2] + 0.2
    assert np.allclose(minilm.embed(["red ellipse"])[0], e[0], atol=1e-5)  # deterministic
    with pytest.raises(ValueError, match="not one string"):
        minilm.embed("red ellipse")


def test_embedder_plugin_path_and_errors():
    plugin = load_embedder("tests.test_text:WordHashEmbedder")
    assert plugin.dim == 16 and plugin.embed(["a b"]).shape == (1, 16)
    with pytest.raises(ValueError, match="unknown text embedder"):
        load_embedder("nope")
    with pytest.raises(ValueError, match="cannot be imported"):
        load_embedder("no_such_module_xyz:thing")
    with pytest.raises(ValueError, match="no text embedder"):
        load_embedder("")
    with pytest.raises(ValueError, match="gave shape"):
        embed_texts(plugin, ["a"], 384)


def test_predictor_text_prompts(photo):
    plugin = WordHashEmbedder()
    config = get_config("vit_tiny256").model_copy(update={"text_embed_dim": 16, "text_embedder": plugin.name})
    torch.manual_seed(0)
    predictor = SamPredictor(Sam(config))
    predictor.set_image(photo)
    masks, iou, low = predictor.predict(text="red ellipse", multimask_output=False)
    assert masks.shape == (1, *photo.shape[:2]) and iou.shape == (1,) and low.shape == (1, 64, 64)
    direct = predictor.predict(text_embedding=plugin.embed(["red ellipse"])[0], multimask_output=False)
    assert np.array_equal(direct[0], masks)
    batched, iou_b, _ = predictor.predict(text=["red ellipse", "blue star"], multimask_output=False)
    assert batched.shape == (2, 1, *photo.shape[:2]) and np.array_equal(batched[0], masks)
    with pytest.raises(ValueError, match="text or text_embedding"):
        predictor.predict(text="x", text_embedding=np.zeros(16, np.float32))
    with pytest.raises(ValueError, match="string or a list of strings"):
        predictor.predict(text=3)

    no_text = SamPredictor(Sam(get_config("vit_tiny256")))
    no_text.set_image(photo)
    with pytest.raises(ValueError, match="no text prompt input"):
        no_text.predict(text="red ellipse")


def test_short_text_training_loss_falls(minilm):
    model, _ = load_checkpoint(ROOT / "checkpoints" / "samengine_tiny256.pt")
    from jobs.train_text import with_text_input

    model = with_text_input(model, "minilm", minilm.dim)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = prepare_examples(model, synthetic_items(scene_stream(0, 24, 256)))
    assert len(data.cells) == len(data.phrases) == len(data.scene_of) > 50
    assert data.cells.shape[1:] == (16, 16) and data.cells.flatten(1).any(1).all()
    history = train_text(model, data, lambda t: torch.as_tensor(minilm.embed(t)),
                         TextTrainConfig(steps=60, scenes=8, warmup=5))
    first = np.mean([h["loss"] for h in history[:10]])
    last = np.mean([h["loss"] for h in history[-10:]])
    assert last < 0.85 * first, (first, last)
    # Only the grounding head learned: every other weight is the checkpoint's.
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("text_grounding.") for k in changed), changed


def test_bundled_text_checkpoint_beats_text_blind_baselines(minilm):
    """Held-out scenes (a stream training never sees): with its name, the named object is
    found about twice as often, and segmented with about twice the mIoU, as when the same
    model is given no words or another object's name."""
    model, meta = load_checkpoint(DEFAULT_TEXT_CHECKPOINT)
    assert model.config.text_embedder == "minilm" and model.config.text_embed_dim == 384
    m = text_miou(model, minilm, scene_stream(1_000_003, 40, 256))
    assert m["instances"] > 300
    for baseline in ("empty_text", "other_object"):
        assert m["hit_rate_full_name"] > 1.8 * m[f"hit_rate_{baseline}"], m
        assert m["miou_full_name"] > max(1.5 * m[f"miou_{baseline}"], m[f"miou_{baseline}"] + 0.03), m
    # The decoder is the bundled checkpoint's: a click gives the same masks with or without text.
    plain, _ = load_checkpoint(ROOT / "checkpoints" / "samengine_tiny256.pt")
    text_state = model.state_dict()
    assert all(torch.equal(v, text_state[k]) for k, v in plain.state_dict().items())
    # What the checkpoint says it measured (on 200 scenes) tells the same story.
    reported = meta["text_metrics"]
    assert reported["eval_scenes"] == 200 and reported["miou_full_name"] > 1.5 * reported["miou_empty_text"]


def test_text_run_settings_are_checked():
    from pydantic import ValidationError

    from jobs.auto_annotate import load_config
    from schemas.annotate import DEFAULT_CHECKPOINT

    c = load_config(["--text", " red   ellipse ", "--text", "red ellipse", "--text", "blue star"])
    assert c.text == ["red ellipse", "blue star"] and c.checkpoint == DEFAULT_TEXT_CHECKPOINT
    assert load_config([]).checkpoint == DEFAULT_CHECKPOINT  # no text: the plain checkpoint
    mine = load_config(["--text", "x", "--checkpoint", "/some/where.pt"])
    assert mine.checkpoint == "/some/where.pt"  # a named checkpoint is never swapped
    assert load_config(["--text", "x", "--checkpoint", DEFAULT_CHECKPOINT]).checkpoint == DEFAULT_CHECKPOINT
    with pytest.raises(ValidationError, match="crop_n_layers"):
        load_config(["--text", "red ellipse", "--crop-n-layers", "1"])
    with pytest.raises(ValidationError, match="empty"):
        load_config(["--text", "   "])


def test_accepted_mask_keeps_its_words():
    from engine.segmenter import annotation_record
    from schemas.interactive import AcceptedMask

    from pycocotools import mask as coco_mask

    m = np.zeros((4, 5), np.uint8, order="F")
    m[1:3, 1:4] = 1
    enc = coco_mask.encode(m)
    rle = {"size": [4, 5], "counts": enc["counts"].decode()}
    rec = annotation_record(AcceptedMask(segmentation=rle, text_prompt="red ellipse"), 4, 5)
    assert rec["text_prompt"] == "red ellipse" and rec["area"] == 6 and rec["point_coords"] == []
    assert annotation_record(AcceptedMask(segmentation=rle), 4, 5)["text_prompt"] is None


def test_coco_class_names_name_masks_and_train_the_text_path(tmp_path, minilm):
    """A COCO file with named categories: the import keeps each mask's class name as its
    text_prompt (not our class-agnostic "object"), the dataset turns into text-training
    targets (one per name and image: the union of its masks), and a short fit of the
    grounding head on them lowers its loss."""
    import json

    from PIL import Image
    from pycocotools import mask as coco_mask

    from dataset import DatasetWriter, read_images
    from dataset.coco import import_coco
    from dataset.lineage import new_lineage
    from dataset.storage import table_uri
    from jobs.train_text import with_text_input

    images_dir = tmp_path / "images"
    images_dir.mkdir()
    categories = {"object": 1}
    coco = {"images": [], "annotations": [], "categories": []}
    truth = {}
    for i in range(6):
        scene = make_scene(scene_seed(7, i), (200, 272))
        Image.fromarray(scene.image).save(images_dir / f"im{i}.png")
        coco["images"].append({"id": i + 1, "file_name": f"im{i}.png", "height": 200, "width": 272})
        for k, (name, mask) in enumerate(zip(scene.names, scene.masks)):
            label = "object" if k == 0 else " ".join(name.split()[::2])  # "<colour> <shape>"
            cid = categories.setdefault(label, len(categories) + 1)
            rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": i + 1, "category_id": cid,
                                        "iscrowd": 0, "segmentation": {"size": [200, 272],
                                                                       "counts": rle["counts"].decode()}})
            if label != "object":
                truth.setdefault(f"im{i}.png", {}).setdefault(label, np.zeros_like(mask))
                truth[f"im{i}.png"][label] |= mask
    coco["categories"] = [{"id": v, "name": k} for k, v in categories.items()]
    (tmp_path / "labels.json").write_text(json.dumps(coco))

    root = str(tmp_path / "dataset")
    writer = DatasetWriter(root, new_lineage(round=0, stage="imported"))
    import_coco(tmp_path / "labels.json", writer, images_dir)
    for row in read_images(root).to_pylist():
        prompts = [a["text_prompt"] for a in row["annotations"]]
        assert prompts[0] is None and all(p and p != "object" for p in prompts[1:])

    items = list(dataset_items([table_uri(root, "annotations")]))
    assert len(items) == 6 and all(image.shape == (200, 272, 3) for image, _ in items)
    got = sorted(sorted((p[0], int(m.sum())) for p, m in targets) for _, targets in items)
    assert got == sorted(sorted((k, int(m.sum())) for k, m in t.items()) for t in truth.values())

    # Captions (a COCO captions file, matched by file name): one that names exactly one of
    # the image's phrases trains as one more phrase of it; others are left out.
    labels = sorted(truth["im0.png"])
    sentences = [f"Two {labels[0]}s on a plain background.", f"A {labels[0]} and a {labels[-1]}.", "Nothing here."]
    if len(labels) == 1:
        sentences[1] = "Another unrelated sentence."
    (tmp_path / "captions.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "im0.png"}, {"id": 2, "file_name": "gone.png"}],
        "annotations": [{"id": k, "image_id": 1, "caption": c} for k, c in enumerate(sentences)]
        + [{"id": 9, "image_id": 2, "caption": "an image that is not in the table"}]}))
    captions = read_captions(tmp_path / "captions.json")
    assert captions == {"im0.png": sentences, "gone.png": ["an image that is not in the table"]}
    with_captions = list(dataset_items([table_uri(root, "annotations")], captions=captions))
    extra = {p[0]: p[1:] for _, targets in with_captions for p, _ in targets if len(p) > 1}
    assert extra == {labels[0]: [sentences[0]]}
    assert [len(t) for _, t in with_captions] == [len(t) for _, t in items]

    model, _ = load_checkpoint(ROOT / "checkpoints" / "samengine_tiny256.pt")
    model = with_text_input(model, "minilm", minilm.dim)
    data = prepare_examples(model, items)
    assert len(data.embeddings) == 6 and len(data.cells) == sum(len(t) for t in truth.values())
    history = train_text(model, data, lambda t: torch.as_tensor(minilm.embed(t)),
                         TextTrainConfig(steps=60, scenes=3, warmup=5))
    first = np.mean([h["loss"] for h in history[:10]])
    last = np.mean([h["loss"] for h in history[-10:]])
    assert last < 0.85 * first, (first, last)

    # The job trains on the dataset alone and records what it trained on.
    from jobs.train_text import main

    out = tmp_path / "text.pt"
    assert main(["--scenes", "0", "--dataset", table_uri(root, "annotations"), "--steps", "5",
                 "--batch-scenes", "3", "--eval-scenes", "2", "--output", str(out)]) == 0
    trained, meta = load_checkpoint(out)
    assert trained.config.text_embedder == "minilm" and meta["text_training"]["dataset"] == [table_uri(root, "annotations")]
    assert meta["text_training"]["instances"] == len(data.cells)


def test_dataset_targets_from_tables_on_s3(tmp_path):
    """dataset_items and ParquetExamples read a Delta table and plain Parquet files on an S3
    server, with the images themselves on S3 (moto_server in its own process)."""
    import io
    import json

    import boto3
    from PIL import Image
    from pycocotools import mask as coco_mask

    from dataset import DatasetWriter
    from dataset.coco import import_coco
    from dataset.identity import image_identity
    from dataset.lineage import new_lineage
    from dataset.exports import export_parquet
    from dataset.storage import table_uri
    from tests.s3server import moto_server
    from training.data import ParquetExamples

    with moto_server("data") as endpoint:
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        coco = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "object"}]}
        truth, names = {}, {}
        for i in range(3):
            scene = make_scene(scene_seed(11, i), (96, 128))
            buf = io.BytesIO()
            Image.fromarray(scene.image).save(buf, format="PNG")
            s3.put_object(Bucket="data", Key=f"images/im{i}.png", Body=buf.getvalue())
            sha, phash = image_identity(buf.getvalue())
            coco["images"].append({"id": i + 1, "file_name": f"im{i}.png", "height": 96, "width": 128,
                                   "sha256": sha, "phash": phash, "coco_url": f"s3://data/images/im{i}.png"})
            for name, mask in zip(scene.names, scene.masks):
                cid = names.setdefault(name, len(names) + 2)
                rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
                coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": i + 1,
                                            "category_id": cid, "iscrowd": 0,
                                            "segmentation": {"size": [96, 128], "counts": rle["counts"].decode()}})
                truth.setdefault(sha, {}).setdefault(name, np.zeros_like(mask))
                truth[sha][name] |= mask
        coco["categories"] += [{"id": v, "name": k} for k, v in names.items()]
        (tmp_path / "labels.json").write_text(json.dumps(coco))
        root = "s3://data/ds"
        import_coco(tmp_path / "labels.json", DatasetWriter(root, new_lineage(round=0, stage="imported")))

        items = list(dataset_items([table_uri(root, "annotations")], endpoint_url=endpoint))
        expect = sorted(sorted((k, int(m.sum())) for k, m in t.items() if m.any()) for t in truth.values())
        assert sorted(sorted((p[0], int(m.sum())) for p, m in targets) for _, targets in items) == expect

        # Plain Parquet files (an export) under an S3 prefix read the same rows.
        for k, path in enumerate(export_parquet(root, str(tmp_path / "flat"))):
            s3.upload_file(path, "data", f"flat/part-{k}.parquet")
        delta, flat = ParquetExamples([table_uri(root, "annotations")]), ParquetExamples(["s3://data/flat"])
        assert len(delta) == len(flat) == 3
        by_image = {ex.image.tobytes(): ex.masks.sum() for ex in delta.take(range(3))}
        assert {ex.image.tobytes(): ex.masks.sum() for ex in flat.take(range(3))} == by_image
