"""Training: simulated prompts, losses, evaluation metrics, data, and one short real Ray
Train run that must learn and resume."""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as coco_mask

from model import build_sam, load_checkpoint
from training.data import ParquetExamples, make_batch, synthetic_example
from training.evaluate import coco_metrics, interior_points, single_point_miou
from training.losses import mask_iou, segmentation_loss
from training.prompts import BOX_NOISE_MAX, error_points, first_points, noisy_boxes, sample_pixels
from training.synthetic import make_scenes

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def scene_masks() -> torch.Tensor:
    """About 40 instance masks of 128 x 128 synthetic scenes."""
    return torch.from_numpy(np.concatenate([scene.masks for scene in make_scenes(3, 5, 128)]))


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- prompts -------------------------------------------------------------------------


def test_first_points_lie_inside_their_masks(scene_masks):
    prompts = first_points(scene_masks, generator())
    x, y = prompts.point_coords[:, 0].long().unbind(1)
    assert prompts.point_coords.shape == (len(scene_masks), 1, 2)
    assert (prompts.point_labels == 1).all()
    assert scene_masks[torch.arange(len(scene_masks)), y, x].all()


def test_sampled_pixels_are_uniform_over_the_region():
    region = torch.zeros(4000, 4, 4, dtype=torch.bool)
    region[:, 1, 2] = region[:, 3, 0] = region[:, 0, 3] = True
    coords, found = sample_pixels(region, generator(1))
    assert found.all()
    _, counts = torch.unique(coords, dim=0, return_counts=True)
    assert len(counts) == 3 and counts.min() > 4000 / 3 * 0.85


def test_error_points_lie_in_the_error_region_with_the_right_label(scene_masks):
    # A prediction shifted by 3 px has false negatives on one side, false positives on the other.
    predicted = torch.roll(scene_masks, shifts=(3, -2), dims=(1, 2))
    coords, labels = error_points(predicted, scene_masks, generator(2))
    rows = torch.arange(len(scene_masks))
    x, y = coords.long().unbind(1)
    assert (predicted ^ scene_masks)[rows, y, x].all()
    assert torch.equal(labels, scene_masks[rows, y, x].long())
    assert set(labels.tolist()) == {0, 1}


def test_a_perfect_prediction_gets_a_positive_click_inside_the_object(scene_masks):
    coords, labels = error_points(scene_masks.clone(), scene_masks, generator(3))
    x, y = coords.long().unbind(1)
    assert (labels == 1).all()
    assert scene_masks[torch.arange(len(scene_masks)), y, x].all()


def test_box_noise_is_bounded_and_proportional(scene_masks):
    from torchvision.ops import masks_to_boxes

    tight = masks_to_boxes(scene_masks)
    boxes = torch.stack([noisy_boxes(scene_masks, generator(seed)) for seed in range(50)])  # 50 x B x 4
    shift = (boxes - tight).abs()
    assert shift.max() <= BOX_NOISE_MAX + 1e-4
    assert shift.max() > 0
    assert (boxes[..., 2:] >= boxes[..., :2]).all() and boxes.min() >= 0 and boxes.max() <= 127
    # std 10% of the side: on average an edge moves ~8% of its side (the mean of |N(0, 0.1)|).
    sides = (tight[:, 2:] - tight[:, :2]).repeat(1, 2)
    relative = (shift / sides.clamp(min=1)).mean()
    assert 0.03 < relative < 0.12


# ---- losses --------------------------------------------------------------------------


def test_a_perfect_prediction_has_almost_no_loss(scene_masks):
    targets = scene_masks[:6]
    logits = (targets.float() * 2 - 1)[:, None] * 30  # 6 x 1 x H x W, confident and right
    loss = segmentation_loss(logits, targets, iou_predictions=torch.ones(6, 1))
    assert loss.total < 1e-3 and loss.focal < 1e-6 and loss.dice < 1e-3 and loss.iou_mse < 1e-6
    assert torch.allclose(loss.iou, torch.ones(6))


def test_the_best_candidate_alone_carries_the_mask_loss(scene_masks):
    targets = scene_masks[:4]
    right = (targets.float() * 2 - 1) * 30
    candidates = torch.stack([-right, right, torch.zeros_like(right)], dim=1)  # wrong, right, unsure
    candidates[3] = candidates[3, [2, 0, 1]]  # mask 3 has the right one last
    loss = segmentation_loss(candidates, targets, iou_predictions=torch.zeros(4, 3))
    assert loss.best.tolist() == [1, 1, 1, 2]
    assert loss.focal < 1e-6 and loss.dice < 1e-3
    # Every candidate trains the IoU head: the right ones have IoU 1, the others 0.
    assert torch.isclose(loss.iou_mse, torch.tensor(1 / 3), atol=1e-3)


def test_soft_targets_need_measured_ious_and_score_a_right_mask_well(scene_masks):
    from torch.nn import functional as F

    targets = scene_masks[:6]
    coverage = F.adaptive_avg_pool2d(targets[:, None].float(), (32, 32))[:, 0]  # 128 -> 32, soft
    with pytest.raises(ValueError, match="actual_iou"):
        segmentation_loss(torch.zeros(6, 1, 32, 32), coverage, torch.zeros(6, 1))
    # Logits that say "covered more than half" agree with the coverage far better than the
    # opposite; the IoU head's target is the IoU given.
    right = (coverage[:, None] - 0.5) * 40
    good = segmentation_loss(right, coverage, torch.ones(6, 1), actual_iou=torch.ones(6, 1))
    bad = segmentation_loss(-right, coverage, torch.ones(6, 1), actual_iou=torch.ones(6, 1))
    assert good.dice < 0.3 < bad.dice and good.focal < bad.focal and good.iou_mse == 0


def test_low_res_loss_step_trains_every_part_and_measures_full_resolution_iou():
    from training.interactive import SimulatedInteraction
    from training.loop import sincos_2d, vit_init_

    torch.manual_seed(0)
    model = build_sam("vit_tiny256")
    vit_init_(model)
    pos = model.image_encoder.pos_embed[0]
    assert torch.equal(pos, sincos_2d(16, 128)) and not torch.equal(pos[0, 0], pos[5, 9])
    batch = make_batch([synthetic_example(0, i, 256) for i in range(2)], 256, 3, np.random.default_rng(0))
    step = SimulatedInteraction(model, iterations=2, mask_only_iterations=1, low_res_loss=True)
    stats = step(batch.images, batch.masks, batch.image_index, generator(4))
    stats["loss"].backward()
    assert torch.isfinite(stats["loss"]) and 0 <= stats["miou"] <= 1
    assert model.image_encoder.patch_embed.proj.weight.grad.abs().sum() > 0
    assert model.mask_decoder.iou_prediction_head.layers[-1].weight.grad.abs().sum() > 0


def test_mask_iou():
    a = torch.zeros(1, 4, 4, dtype=torch.bool)
    b = a.clone()
    a[0, :2] = True  # 8 pixels
    b[0, 1:3] = True  # 8 pixels, 4 shared
    assert mask_iou(a, b).item() == pytest.approx(4 / 12)
    assert mask_iou(a & False, b & False).item() == 1.0


# ---- evaluation ----------------------------------------------------------------------


def rle(mask: np.ndarray) -> dict:
    encoded = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": encoded["size"], "counts": encoded["counts"].decode()}


@pytest.fixture(scope="module")
def coco_scenes():
    return list(make_scenes(11, 3, 128))


def test_coco_metrics_of_perfect_predictions(coco_scenes):
    gts = [scene.masks for scene in coco_scenes]
    predictions = [[{"segmentation": rle(m), "predicted_iou": 0.9} for m in gt] for gt in gts]
    metrics = coco_metrics(range(len(gts)), gts, predictions)
    assert metrics["AP"] == pytest.approx(1.0) and metrics["AP50"] == pytest.approx(1.0)
    assert metrics["AR100"] == pytest.approx(1.0) and metrics["AR1000"] == pytest.approx(1.0)
    assert metrics["AR1"] < 1.0  # one detection per image cannot find every object


def test_coco_metrics_of_half_the_objects(coco_scenes):
    gts = [scene.masks for scene in coco_scenes]
    predictions = [[{"segmentation": rle(m), "predicted_iou": 0.9} for m in gt[::2]] for gt in gts]
    found = sum(len(gt[::2]) for gt in gts) / sum(len(gt) for gt in gts)
    metrics = coco_metrics(range(len(gts)), gts, predictions)
    assert metrics["AR100"] == pytest.approx(found, abs=1e-6)
    assert metrics["AP"] == pytest.approx(found, abs=0.03)  # precision 1 up to recall `found`


def test_coco_metrics_fall_for_shifted_masks_and_rank_by_score(coco_scenes):
    gts = [scene.masks for scene in coco_scenes]
    shifted = [[{"segmentation": rle(np.roll(m, 3, axis=1)), "predicted_iou": 0.9} for m in gt] for gt in gts]
    metrics = coco_metrics(range(len(gts)), gts, shifted)
    assert 0.0 < metrics["AP"] < 0.9 and metrics["AR100"] < 0.9
    # Wrong masks scored above the right ones cost precision, not recall.
    decoys = [[{"segmentation": rle(np.roll(m, 40, axis=0)), "predicted_iou": 0.99} for m in gt] for gt in gts]
    right = [[{"segmentation": rle(m), "predicted_iou": 0.5} for m in gt] for gt in gts]
    ranked_wrong = coco_metrics(range(len(gts)), gts, [d + r for d, r in zip(decoys, right)])
    assert ranked_wrong["AR100"] == pytest.approx(1.0) and ranked_wrong["AP"] < 0.9
    empty = coco_metrics(range(len(gts)), gts, [[] for _ in gts])
    assert empty["AP"] <= 0 and empty["AR100"] <= 0


def test_interior_points_are_deep_inside():
    mask = np.zeros((1, 40, 60), bool)
    mask[0, 10:30, 5:45] = True  # 20 rows: the deepest pixels are 10 px from the boundary
    (x, y), = interior_points(mask)
    assert y in (19, 20) and 14 <= x <= 35
    edge = np.zeros((1, 20, 20), bool)
    edge[0, :, :6] = True  # touches the image border: the border is a boundary too
    assert interior_points(edge)[0, 0] in (2, 3)


def test_single_point_miou_runs_on_an_untrained_model():
    model = build_sam("vit_tiny256")
    metrics = single_point_miou(model, make_scenes(5, 1, 160))
    assert metrics["instances"] > 0 and 0.0 <= metrics["miou"] <= metrics["oracle_miou"] <= 1.0


# ---- data ------------------------------------------------------------------------------


def test_batches_resize_pad_and_subsample():
    examples = [synthetic_example(0, i, 128) for i in range(2)]
    wide = synthetic_example(0, 2, 128)
    wide.image, wide.masks = wide.image[:64], wide.masks[:, :64]  # 64 x 128 -> 128 x 256
    batch = make_batch(examples + [wide], 256, 3, np.random.default_rng(0))
    assert [tuple(image.shape) for image in batch.images] == [(3, 256, 256)] * 2 + [(3, 128, 256)]
    assert batch.masks.shape[1:] == (256, 256) and batch.masks.flatten(1).any(1).all()
    assert np.bincount(batch.image_index.numpy()).max() <= 3
    assert not batch.masks[batch.image_index == 2][:, 128:].any()  # padding is background


def test_parquet_rows_read_back_as_examples(tmp_path):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    scenes = list(make_scenes(21, 3, 96))
    (tmp_path / "images").mkdir()
    (tmp_path / "table").mkdir()
    rows = []
    for scene in scenes:
        png = io.BytesIO()
        Image.fromarray(scene.image).save(png, format="PNG")
        rows.append({"image": png.getvalue(), "annotations": [{"segmentation": rle(m), "area": int(m.sum())} for m in scene.masks]})
        rows[-1]["uri"] = str(tmp_path / "images" / f"{len(rows)}.png")
        Path(rows[-1]["uri"]).write_bytes(png.getvalue())
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "table" / "part-0.parquet")
    for image_column in ("image", "uri"):  # encoded bytes in the row, or where to read them
        examples = ParquetExamples([str(tmp_path / "table")], image_column=image_column)
        assert len(examples) == 3
        first, last = examples.take([0, 2])
        np.testing.assert_array_equal(last.image, scenes[2].image)
        np.testing.assert_array_equal(first.masks, scenes[0].masks)
    single_file = ParquetExamples([str(tmp_path / "table" / "part-0.parquet")])  # a file, not a folder
    assert len(single_file) == 3
    np.testing.assert_array_equal(single_file.take([1])[0].image, scenes[1].image)
    with pytest.raises(ValueError, match="training data .*nowhere: no such file, folder or table"):
        ParquetExamples([str(tmp_path / "nowhere")])
    with pytest.raises(ValueError, match="no column 'pixels' \\(it has image, annotations, uri\\)"):
        ParquetExamples([str(tmp_path / "table")], image_column="pixels")


def test_a_dataset_root_trains_on_its_annotations_table(tmp_path):
    """Given the root of one of our datasets (several Delta tables), training reads its
    annotations table, not every Parquet file under the root."""
    from PIL import Image

    from dataset import DatasetWriter
    from dataset.lineage import new_lineage

    root = tmp_path / "ds"
    scene = next(make_scenes(22, 1, 64))
    path = tmp_path / "scene.png"
    Image.fromarray(scene.image).save(path)
    writer = DatasetWriter(str(root), new_lineage(round=0, stage="manual"))
    writer.start_run([{"uri": str(path), "size": path.stat().st_size, "etag": "x", "listing_hash": "h", "run_id": "r"}])
    writer.commit_images([{"image_id": "0" * 64, "uri": str(path), "width": 64, "height": 64, "phash": None,
                           "annotations": [{"segmentation": rle(m), "area": int(m.sum()), "bbox": [0, 0, 1, 1],
                                            "predicted_iou": None, "point_coords": [], "stability_score": None,
                                            "crop_box": [0, 0, 64, 64]} for m in scene.masks]}])
    examples = ParquetExamples([str(root)])
    assert len(examples) == 1
    np.testing.assert_array_equal(examples.take([0])[0].masks, scene.masks)
    # A data file lost from the store is named, with the fix, before any training starts.
    from dataset import DataFileMissing

    lost = next((root / "annotations").glob("*.parquet"))
    lost.unlink()
    with pytest.raises(DataFileMissing, match=re.escape(lost.name) + ".*maintain.py .* repair"):
        ParquetExamples([str(root)])


def test_parquet_rows_decode_like_the_pipeline(tmp_path):
    """Training reads a stored row's image as the annotation pipeline did (pipeline.images):
    an EXIF-rotated JPEG comes upright, so the masks made on it line up; an unusable row is a
    ValueError that names the image, not a silent misalignment."""
    import io

    from PIL import Image

    from pipeline.images import decode_image
    from training.data import parquet_example

    scene = next(make_scenes(22, 1, 96))
    sideways = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: viewers rotate 90 degrees clockwise
    Image.fromarray(scene.image[:, :64]).transpose(Image.Transpose.ROTATE_90).save(sideways, format="JPEG", exif=exif)
    data = sideways.getvalue()
    upright = decode_image(data)
    assert upright.shape[:2] == (96, 64)  # stored 64 x 96, shown 96 x 64
    mask = np.zeros(upright.shape[:2], bool)
    mask[10:40, 5:30] = True
    example = parquet_example(data, [{"segmentation": rle(mask)}])
    np.testing.assert_array_equal(example.image, upright)
    np.testing.assert_array_equal(example.masks[0], mask)

    with pytest.raises(ValueError, match=r"is 96 x 64 but a mask is 64 x 96"):
        parquet_example(data, [{"segmentation": rle(mask.T.copy())}])
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut.png: truncated"):
        parquet_example(str(tmp_path / "cut.png"), [])
    with pytest.raises(ValueError, match=r"gone.png: missing"):
        parquet_example(str(tmp_path / "gone.png"), [])


# ---- a real Ray Train run ----------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_training_learns_and_resumes(ray_cluster, tmp_path):
    from training.loop import MODEL_FILE, STATE_FILE, SyntheticSource, TrainConfig, run_training

    cfg = TrainConfig(
        model_type="vit_tiny256", steps=80, images_per_step=2, masks_per_image=4, prompt_iterations=2,
        mask_only_iterations=1, lr=1e-3, warmup_steps=10, synthetic=SyntheticSource(seed=0, size=128),
        log_every=10, checkpoint_every=40, seed=0,
    )
    path, metrics = run_training(cfg, str(tmp_path / "runs"), name="test-run")
    history = metrics["history"]
    assert [row["step"] for row in history] == list(range(1, 81)) and metrics["start_step"] == 0

    def mean(rows, name):
        return float(np.mean([row[name] for row in rows]))

    assert mean(history[-10:], "loss") < 0.7 * mean(history[:10], "loss")
    assert mean(history[-10:], "iou_mse") < 0.5 * mean(history[:10], "iou_mse")

    model, meta = load_checkpoint(path)
    assert model.config.name == "vit_tiny256" and meta["steps"] == 80
    assert meta["training_data_seed"] == 0 and meta["metrics"]["loss"] == pytest.approx(mean(history[-10:], "loss"))
    # Ray keeps the checkpoints: model plus optimizer state loadable without pickles.
    checkpoints = sorted(p for p in (tmp_path / "runs" / "test-run").glob("checkpoint_*") if p.is_dir())
    assert checkpoints and all((c / MODEL_FILE).exists() and (c / STATE_FILE).exists() for c in checkpoints)
    state = torch.load(checkpoints[-1] / STATE_FILE, weights_only=True)
    assert state["step"] == 80 and len(state["history"]) == 80

    # Running the same run name again for more steps continues from step 80.
    longer = cfg.model_copy(update={"steps": 90})
    _, resumed = run_training(longer, str(tmp_path / "runs"), name="test-run")
    assert resumed["start_step"] == 80
    assert [row["step"] for row in resumed["history"]] == list(range(1, 91))
    assert resumed["history"][:80] == history


def test_decoder_trains_after_inference_mode_use():
    """Tensors the decoder caches (mask upscaling's pixel order) are made outside inference
    mode, so generating masks first (amg runs in inference mode) does not break training
    in the same process."""
    model = build_sam("vit_tiny256")
    decoder = model.mask_decoder
    features, tokens = torch.randn(2, 16, 16, 128), torch.randn(2, 4, 128)
    with torch.inference_mode():
        decoder.masks_from(tokens, features)
    features.requires_grad_()
    decoder.masks_from(tokens, features).square().sum().backward()
    assert features.grad is not None and features.grad.abs().sum() > 0


def test_train_job_refuses_unusable_inputs_before_starting_ray(tmp_path, capsys):
    from jobs.train import main

    assert main(["--init-checkpoint", str(tmp_path / "none.pt"), "--steps", "1", "--storage", str(tmp_path)]) == 2
    assert "none.pt: checkpoint file not found" in capsys.readouterr().err
    assert main(["--parquet", str(tmp_path / "nowhere"), "--steps", "1", "--storage", str(tmp_path)]) == 2
    assert "nowhere: no such file, folder or table" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # no run was started
