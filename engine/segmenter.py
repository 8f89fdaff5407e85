"""Interactive segmentation from cached embeddings (no Ray): what a service replica does.

`Segmenter.embed` runs the image encoder at most once per image while the embedding stays
in the LRU cache; `Segmenter.predict` answers a click (points, a box, the previous low-res
logits as a mask prompt) with one decoder pass on the cached embedding. With the
automatic generator as pre-fill, the generator's own full-image embedding is the one
cached, so a semi-automatic image is still encoded once.
"""
from __future__ import annotations

import base64
import threading
import time
from typing import Callable

import numpy as np
import torch

from amg import AmgParams, decode_image, encode_image, postprocess
from amg.rle import masks_to_rle_counts, rle_area, rle_bbox, rle_to_coco
from dataset.validation import rle_counts
from model import SamPredictor
from model.sam import Sam
from model.text import normalize_phrase
from schemas.interactive import AcceptedMask, PredictRequest

from .cache import EmbeddingCache
from .images import LoadedImage


class Segmenter:
    def __init__(self, model: Sam, *, precision: str = "fp32", cache_bytes: int = 512 << 20,
                 generator: AmgParams | None = None):
        self.model = model.eval()
        self.predictor = SamPredictor(model, precision)
        self.precision = self.predictor.precision  # resolved: fp32 where bf16 would be emulated
        self.generator = generator
        self.generated: dict[str, list[dict]] = {}  # image_id -> the generator's records (small: RLE)
        self.cache: EmbeddingCache[tuple[torch.Tensor, tuple[int, int]]] = EmbeddingCache(cache_bytes)
        self.encodes = 0
        self.predicts = 0
        # One model, one predictor: requests from the replica's thread pool take turns.
        self._lock = threading.Lock()

    # -- embeddings ------------------------------------------------------------------------------
    def embed(self, image_id: str, load: Callable[[], LoadedImage]):
        """image_id's embedding, from the cache or encoded now (and cached). Returns
        ((features 1 x C x e x e, (h, w)), encoded now, encoder ms). With a generator set,
        its records for the image are in self.generated afterwards."""
        cached = self.cache.get(image_id)
        if cached is not None:
            return cached, False, 0.0
        image = load()
        start = time.perf_counter()
        with self._lock:
            if image_id in self.cache:  # encoded by a concurrent request while this one waited
                return self.cache.get(image_id), False, 0.0
            if self.generator is not None:
                # The generator encodes the whole image as its first crop: cache that one.
                encoded = encode_image(self.model, image.rgb, self.generator, self.precision)
                features = encoded.embeddings[:1].float()
                if image_id not in self.generated:
                    crops = decode_image(self.model, encoded, self.generator, self.precision)
                    self.generated[image_id] = postprocess(crops, encoded.orig_size, self.generator)
            else:
                self.predictor.set_image(image.rgb)
                features = self.predictor.features
            self.encodes += 1
            cached = (features, (image.height, image.width))
            self.cache.put(image_id, cached)  # not kept if larger than the whole cache
        return cached, True, (time.perf_counter() - start) * 1000

    # -- clicks ------------------------------------------------------------------------------------
    def predict(self, request: PredictRequest, load: Callable[[], LoadedImage]) -> dict:
        """One click: the best mask of the decoder for the request's prompts, as a
        PredictResponse dict. Raises ValueError on prompts the model cannot take."""
        start = time.perf_counter()
        (features, size), encoded, _ = self.embed(request.image_id, load)
        points = np.asarray(request.points, np.float32).reshape(-1, 2)
        labels = np.asarray(request.labels, np.int64)
        box = np.asarray(request.box, np.float32) if request.box is not None else None
        _check_inside(points, box, size)
        mask_input = self._mask_input(request.mask_input)
        text = normalize_phrase(request.text) if request.text is not None else None
        multimask = request.multimask
        if multimask is None:
            # A lone click is ambiguous (whole, part, subpart): pick the best of three. Words
            # alone become one click (model.text_grounding), as ambiguous.
            alone = box is None and mask_input is None
            multimask = alone and ((len(points) == 1 and text is None) or (not len(points) and text is not None))
        with self._lock:
            self.predictor.set_embedding(features, size)
            masks, scores, low_res = self.predictor.predict(
                point_coords=points if len(points) else None, point_labels=labels if len(points) else None,
                box=box, mask_input=mask_input, text=text, multimask_output=multimask)
            self.predicts += 1
        best = int(np.argmax(scores))
        counts = masks_to_rle_counts(torch.from_numpy(masks[best][None]))[0]
        logits = low_res[best].astype("<f2")
        return dict(
            image_id=request.image_id,
            segmentation=rle_to_coco([counts], size)[0],
            area=rle_area(counts),
            bbox=rle_bbox(counts, size),
            score=float(scores[best]),
            low_res=base64.b64encode(logits.tobytes()).decode("ascii"),
            low_res_shape=logits.shape,
            encoded=encoded,
            server_ms=(time.perf_counter() - start) * 1000,
        )

    @property
    def takes_text(self) -> bool:
        return self.model.config.takes_text

    def _mask_input(self, text: str | None) -> np.ndarray | None:
        if text is None:
            return None
        side_h, side_w = self.model.prompt_encoder.mask_input_size
        try:
            raw = base64.b64decode(text, validate=True)
        except ValueError as e:
            raise ValueError(f"mask_input is not base64: {e}") from None
        if len(raw) != side_h * side_w * 2:
            raise ValueError(f"mask_input holds {len(raw)} bytes; this model takes {side_h} x {side_w} float16 "
                             f"({side_h * side_w * 2} bytes)")
        return np.frombuffer(raw, "<f2").astype(np.float32).reshape(1, side_h, side_w)


# -- accepted masks -> dataset records -------------------------------------------------------------
def annotation_record(mask: AcceptedMask, height: int, width: int) -> dict:
    """A generator-style mask record (no id, stage, round: the writer adds them) of an
    accepted mask, after checking its RLE: the string is parsed by our own reader before
    pycocotools sees it (pycocotools has no bounds checks), and must be the canonical
    encoding of runs that cover exactly the image."""
    seg = mask.segmentation
    if list(seg.size) != [height, width]:
        raise ValueError(f"mask size {list(seg.size)} is not the image's [{height}, {width}]")
    counts = rle_counts(seg.counts)
    if counts is None or counts.sum() != height * width or (counts[1:] <= 0).any() or counts[0] < 0:
        raise ValueError("segmentation counts are not a COCO RLE of the image's size")
    canonical = rle_to_coco([counts], (height, width))[0]
    if canonical["counts"] != seg.counts:
        raise ValueError("segmentation counts are not the canonical pycocotools string of their runs")
    return dict(
        segmentation=canonical,
        area=rle_area(counts),
        bbox=rle_bbox(counts, (height, width)),
        predicted_iou=mask.predicted_iou,
        point_coords=[list(p) for p in mask.point_coords],
        stability_score=mask.stability_score,
        crop_box=[0, 0, width, height],
        text_prompt=mask.text_prompt,
    )


def _check_inside(points: np.ndarray, box: np.ndarray | None, size: tuple[int, int]) -> None:
    """A click outside the image, or a box that misses it, is a client's mistake (a stale
    image, swapped x and y): the model would still answer, with a mask of nothing asked for."""
    h, w = size
    outside = [(float(x), float(y)) for x, y in points if not (0 <= x <= w and 0 <= y <= h)]
    if outside:
        raise ValueError(f"clicks outside the {w} x {h} image (x, y): {outside[:3]}")
    if box is not None and (box[2] < 0 or box[3] < 0 or box[0] > w or box[1] > h):
        raise ValueError(f"box {box.tolist()} (XYXY) lies outside the {w} x {h} image")
