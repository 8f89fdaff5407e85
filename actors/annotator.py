"""The model stages: encoder, grid-prompt decoder and post-processing, split across actors
or fused in one (`Annotator`: no embedding transfer, the better choice on CPU)."""
from __future__ import annotations

import json

import numpy as np
import torch

from amg import AmgParams, EncodedImage, decode_image, encode_image, postprocess
from amg.text import decode_texts
from model import load_checkpoint
from model.checkpoint import local_checkpoint
from model.memory import retain_freed_memory
from model.predictor import resolve_precision
from model.sam import Sam

from .batch import drop, map_ok, objects

FUNNEL = ("candidates", "iou", "stability", "crop_edge")


class _ModelStage:
    """precision: the decoder's; encoder_precision: the image encoder's (AnnotateConfig).
    texts / text_embeddings: phrases (and their vectors, embedded once by the driver) that
    prompt every image instead of the point grid (amg.text)."""

    def __init__(self, checkpoint: str, model_type: str | None, device: str, precision: str, amg: dict,
                 num_threads: int = 1, endpoint_url: str | None = None, texts: list[str] | None = None,
                 text_embeddings: list[list[float]] | None = None, encoder_precision: str = "fp32"):
        if device == "cpu":
            torch.set_num_threads(max(1, num_threads))
            retain_freed_memory()  # the decoder's per-batch tensors are reused, not page-faulted afresh
        self.model: Sam
        self.model, _ = load_checkpoint(local_checkpoint(checkpoint, endpoint_url), model_type=model_type, device=device)
        self.precision = resolve_precision(precision, self.model.device)
        self.encoder_precision = resolve_precision(encoder_precision, self.model.device, "encoder_precision")
        self.params = AmgParams(**amg)
        self.texts = list(texts or [])
        self.text_embeddings = np.asarray(text_embeddings if self.texts else [], np.float32)

    def _encode(self, image: np.ndarray) -> EncodedImage:
        return split_on_oom(lambda b: encode_image(self.model, image, self.params, self.encoder_precision, batch_size=b), 4)

    def _candidates(self, encoded: EncodedImage) -> list:
        if self.texts:
            return decode_texts(self.model, encoded, self.texts, self.text_embeddings, self.params, self.precision)
        return split_on_oom(lambda b: decode_image(self.model, encoded, self.params.model_copy(
            update={"points_per_batch": b}), self.precision), self.params.points_per_batch)


def split_on_oom(fn, batch: int):
    """fn(batch), and on a GPU out-of-memory error again with half the batch (down to 1):
    a big image or crop stack costs time, never the image."""
    while True:
        try:
            return fn(batch)
        except torch.OutOfMemoryError:
            if batch <= 1:
                raise
            batch //= 2
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def _post(crops: list, orig_size: tuple[int, int], params: AmgParams) -> tuple[list[dict], dict]:
    records = postprocess(crops, orig_size, params)
    funnel = {k: sum(c.funnel.get(k, 0) for c in crops) for k in FUNNEL}
    funnel["kept"] = len(records)
    return records, funnel


def _finish(batch: dict, records: list, funnels: list) -> dict:
    # JSON text: Ray Data would otherwise infer Arrow types for these nested records.
    batch["annotations"] = objects([json.dumps(r) if r is not None else "" for r in records])
    batch["funnel"] = objects([json.dumps(f) if f is not None else "" for f in funnels])
    batch["masks"] = np.array([len(r) if r is not None else 0 for r in records], np.int64)
    return batch


class Encoder(_ModelStage):
    """image -> embeddings of the image and its crops (plus crop geometry)."""

    def __init__(self, *args, embedding_dtype: str = "float32", **kwargs):
        super().__init__(*args, **kwargs)
        self.dtype = np.dtype(embedding_dtype)

    def __call__(self, batch: dict) -> dict:
        encoded = [None] * len(batch["uri"])

        def run(i: int) -> None:
            e = self._encode(batch["image"][i])
            encoded[i] = dict(embeddings=e.embeddings.float().cpu().numpy().astype(self.dtype),
                              crop_boxes=e.crop_boxes, crop_layers=e.crop_layers,
                              input_sizes=e.input_sizes, orig_size=e.orig_size)

        batch = map_ok(batch, "encode", run)
        batch["encoded"] = objects(encoded)
        return drop(batch, "image")


class Decoder(_ModelStage):
    """embeddings -> candidate masks of every crop (IoU-filtered, stability-filtered, RLE)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.model.image_encoder = torch.nn.Identity()  # never used here: free its memory

    def __call__(self, batch: dict) -> dict:
        crops = [None] * len(batch["uri"])

        def run(i: int) -> None:
            e = dict(batch["encoded"][i])
            e["embeddings"] = torch.from_numpy(np.asarray(e["embeddings"], np.float32)).to(self.model.device)
            crops[i] = self._candidates(EncodedImage(**e))

        batch = map_ok(batch, "decode", run)
        batch["crops"] = objects(crops)
        return drop(batch, "encoded")


def postprocess_batch(batch: dict, *, amg: dict) -> dict:
    """candidates -> the image's mask records (NMS within and across crops, cleanup, COCO RLE)."""
    params = AmgParams(**amg)
    n = len(batch["uri"])
    records, funnels = [None] * n, [None] * n

    def run(i: int) -> None:
        records[i], funnels[i] = _post(batch["crops"][i], encoded_size(batch, i), params)

    batch = map_ok(batch, "postprocess", run)
    return _finish(drop(batch, "crops"), records, funnels)


class Annotator(_ModelStage):
    """All three model stages in one actor: image -> mask records."""

    def __call__(self, batch: dict) -> dict:
        n = len(batch["uri"])
        encoded, crops, records, funnels = [None] * n, [None] * n, [None] * n, [None] * n

        def enc(i: int) -> None:
            encoded[i] = self._encode(batch["image"][i])

        def dec(i: int) -> None:
            crops[i], encoded[i] = self._candidates(encoded[i]), None

        def post(i: int) -> None:
            records[i], funnels[i] = _post(crops[i], encoded_size(batch, i), self.params)
            crops[i] = None

        for stage, fn in (("encode", enc), ("decode", dec), ("postprocess", post)):
            batch = map_ok(batch, stage, fn)
        return _finish(drop(batch, "image"), records, funnels)


def encoded_size(batch: dict, i: int) -> tuple[int, int]:
    return int(batch["height"][i]), int(batch["width"][i])
