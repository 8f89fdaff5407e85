"""Training examples and batches.

An example is an image with its instance masks, from the synthetic generator or from Parquet
rows (encoded image bytes + COCO RLE annotations, the layout of our annotation tables). A
batch resizes examples to the model's input frame and keeps a few masks of each.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from pycocotools import mask as coco_mask
from torch.nn import functional as F

from amg.rle import to_coco_rle
from model.transforms import input_shape, resize_image

from .synthetic import make_scene, scene_seed


@dataclass
class Example:
    """image: H x W x 3 uint8 RGB; masks: N x H x W bool instances."""

    image: np.ndarray
    masks: np.ndarray


@dataclass
class Batch:
    """images: B resized float images 3 x h x w (0-255, longest side = image_size);
    masks: M x S x S bool ground truth in the padded S x S input frame;
    image_index: M int64, the image each mask belongs to."""

    images: list[torch.Tensor]
    masks: torch.Tensor
    image_index: torch.Tensor


def synthetic_example(seed: int, index: int, size: int) -> Example:
    """Scene `index` of the synthetic stream `seed` (the same as `make_scenes(seed, ...)`)."""
    scene = make_scene(scene_seed(seed, index), size)
    return Example(scene.image, scene.masks)


class ParquetExamples:
    """Random access to examples stored one image per row in Parquet files.

    paths: Parquet files, folders of them, Delta tables (a folder with _delta_log: only
    the files of its current version are read) or our dataset roots (their annotations
    table), on local disk or s3:// (credentials from
    the AWS environment; endpoint_url or AWS_ENDPOINT_URL for MinIO, Ceph, moto). Each row
    holds the image in image_column, as encoded bytes (PNG/JPEG) or as a URI to read (local
    path or s3://; the defaults fit our annotations table, schemas.IMAGES), and a list of
    annotations in annotations_column, each a struct with a COCO RLE "segmentation"
    {"size", "counts"}. ValueError naming the path when one is missing or lacks a column.
    """

    def __init__(self, paths: Sequence[str], image_column: str = "uri", annotations_column: str = "annotations",
                 endpoint_url: str | None = None):
        import pyarrow.dataset as ds

        self.endpoint_url = endpoint_url
        parts = [_parquet_dataset(str(path), endpoint_url) for path in paths]
        for path, part in zip(paths, parts):
            absent = [c for c in (image_column, annotations_column) if c not in part.schema.names]
            if absent:
                raise ValueError(f"training data {path}: no column {', '.join(map(repr, absent))} "
                                 f"(it has {', '.join(part.schema.names)})")
        self.dataset = parts[0] if len(parts) == 1 else ds.dataset(parts)
        self.columns = [image_column, annotations_column]
        from dataset.reader import reading

        with reading(", ".join(map(str, paths))):  # reads every file's footer: a lost one is named
            self.length = self.dataset.count_rows()
        if self.length == 0:
            raise ValueError(f"no rows in {list(paths)}")

    def __len__(self) -> int:
        return self.length

    def take(self, indices: Sequence[int]) -> list[Example]:
        table = self.dataset.take(list(indices), columns=self.columns)
        image_column, annotations_column = self.columns
        return [
            parquet_example(image, annotations, self.endpoint_url)
            for image, annotations in zip(
                table.column(image_column).to_pylist(), table.column(annotations_column).to_pylist()
            )
        ]


def _parquet_dataset(path: str, endpoint_url: str | None):
    """One path as a pyarrow dataset: a Delta table at its current version (a dataset root:
    its annotations table), else the Parquet files under it (names starting with . or _
    skipped)."""
    import pyarrow.dataset as ds
    from deltalake import DeltaTable

    from dataset.storage import arrow_dataset, arrow_filesystem, is_delta_table, is_s3, storage_options, table_uri

    options = storage_options(path, endpoint_url)
    delta = is_delta_table(path, options)
    if not delta and is_delta_table(table_uri(path, "annotations"), options):
        path, delta = table_uri(path, "annotations"), True
    if delta:
        return arrow_dataset(DeltaTable(path, storage_options=options or None), path, options)
    try:
        if is_s3(path):
            filesystem = arrow_filesystem(path, options).base_fs
            return ds.dataset(path.split("://", 1)[1], filesystem=filesystem, format="parquet")
        return ds.dataset(path, format="parquet")
    except FileNotFoundError:
        raise ValueError(f"training data {path}: no such file, folder or table") from None


def parquet_example(image: bytes | str, annotations: list[dict], endpoint_url: str | None = None) -> Example:
    """Decode one row: image bytes or URI (local or s3://), and annotations with COCO RLE
    segmentations.

    Bytes are read and decoded the way the annotation pipeline does it (pipeline.sources,
    pipeline.images: retries on flaky storage, image limits, EXIF orientation, 16-bit and
    alpha handling), so the pixels line up with the masks it stored. A row that cannot be
    used raises ValueError naming the image."""
    from pipeline.images import BadImage, ImageLimits, decode_image
    from pipeline.sources import ReadError, read_bytes

    name = image if isinstance(image, str) else f"<{len(image)} bytes>"
    try:
        if isinstance(image, str):  # the store the pipeline read it from (endpoint, credentials)
            image = read_bytes(image, max_bytes=ImageLimits().max_bytes, endpoint_url=endpoint_url)
        image = decode_image(image)
    except (ReadError, BadImage) as e:
        raise ValueError(f"training image {name}: {e}") from e
    h, w = image.shape[:2]
    rles = [to_coco_rle(annotation["segmentation"]) for annotation in annotations or []]
    wrong = [rle["size"] for rle in rles if list(rle["size"]) != [h, w]]
    if wrong:
        raise ValueError(f"training image {name} is {h} x {w} but a mask is {wrong[0][0]} x {wrong[0][1]}")
    masks = coco_mask.decode(rles).transpose(2, 0, 1).astype(bool) if rles else np.zeros((0, h, w), bool)
    return Example(image, masks)


def make_batch(examples: Sequence[Example], image_size: int, masks_per_image: int, rng: np.random.Generator) -> Batch:
    """Resize examples to the input frame and keep up to masks_per_image random masks of
    each (masks that vanish in the resize are dropped first)."""
    images, masks, image_index = [], [], []
    for example in examples:
        h, w = input_shape(*example.image.shape[:2], image_size)
        image = example.image if (h, w) == example.image.shape[:2] else resize_image(example.image, image_size)
        instance_masks = torch.from_numpy(example.masks)
        if (h, w) != tuple(instance_masks.shape[-2:]):
            instance_masks = F.interpolate(instance_masks[None].float(), (h, w), mode="nearest")[0] > 0.5
        instance_masks = instance_masks[instance_masks.flatten(1).any(1)]
        if len(instance_masks) > masks_per_image:
            # Sample in proportion to area^0.75: scenes are full of objects of a patch or
            # less, and a small model learns localisation far faster from larger ones first.
            weight = instance_masks.flatten(1).sum(1).double().pow(0.75).numpy()
            pick = rng.choice(len(instance_masks), masks_per_image, replace=False, p=weight / weight.sum())
            instance_masks = instance_masks[torch.from_numpy(pick)]
        # Ground truth lives in the padded square frame the decoder predicts; the padding is
        # background, which the model learns to predict there as well.
        padded = torch.zeros((len(instance_masks), image_size, image_size), dtype=torch.bool)
        padded[:, :h, :w] = instance_masks
        image_index += [len(images)] * len(instance_masks)
        images.append(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float())
        masks.append(padded)
    return Batch(images, torch.cat(masks), torch.tensor(image_index, dtype=torch.long))
