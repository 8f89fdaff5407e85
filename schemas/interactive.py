"""The interactive annotation service (`engine/`): its configuration and the JSON messages of
its HTTP protocol, which the browser page and the simulated annotator both speak.

Coordinates are pixels of the upright decoded image, x right, y down. Masks travel as
compressed COCO RLE ({"size": [h, w], "counts": str}), the form the dataset stores. The
previous low-res logits of a prompt travel as base64 of little-endian float16
(1 x 4e x 4e, e the embedding side), so the server keeps no per-click state and any
replica can answer any click.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from amg.params import AmgParams

from .records import ROUND_MAX, Rle

ROOT = Path(__file__).resolve().parents[1]
# The bundled checkpoint with a text input: clicks give the same masks as with the plain one,
# and the page's Find box works out of the box.
DEFAULT_CHECKPOINT = str(ROOT / "checkpoints" / "samengine_tiny256_text.pt")


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- configuration ----------------------------------------------------------------------------
class EngineConfig(_Message):
    """One annotation service: which images, which model, where accepted masks go."""

    images: str | None = Field(None, description="input spec of the images: folder, file, glob, s3:// prefix "
                                                  "or .txt manifest (as jobs/auto_annotate.py --input)")
    images_from: str | None = Field(None, description="or a dataset root: annotate the images it lists")
    output: str = Field(description="dataset root the accepted masks are committed to")
    stage: Literal["manual", "semi_auto"] = "manual"
    round: int = Field(0, ge=0, le=ROUND_MAX, description="data-engine round recorded with every mask")
    run_id: str | None = Field(None, description="lineage run id; default: <stage>-r<round>-<start time>")

    checkpoint: str = DEFAULT_CHECKPOINT
    model_type: str | None = None
    device: Literal["cpu", "cuda", "auto"] = "auto"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    torch_threads: int = Field(1, ge=1, description="intra-op threads of a CPU replica")

    cache_bytes: int = Field(512 << 20, gt=0, description="embedding cache size per replica")
    max_image_bytes: int = Field(64 << 20, gt=0, description="largest image file accepted")
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint of s3:// images, datasets and "
                                                       "checkpoint (MinIO, Ceph, moto; default: AWS_ENDPOINT_URL)")

    prefill: Literal["none", "generator", "dataset"] = Field(
        "none", description="semi-automatic pre-fill: the automatic generator on the service's "
                            "model, or the masks of a dataset version (an automatic run)")
    prefill_from: str | None = Field(None, description="dataset root of prefill='dataset'")
    prefill_run_id: str | None = Field(None, description="pin the prefill dataset to this run's last version")
    prefill_min_iou: float = Field(0.92, description="predicted IoU a mask needs to be pre-filled")
    amg: AmgParams = Field(default_factory=lambda: AmgParams(points_per_side=16, output_mode="coco_rle"),
                           description="generator of prefill='generator' (its pred_iou_thresh is raised "
                                       "to prefill_min_iou)")

    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(1.0, ge=0.0, description="CPUs per replica")
    num_gpus: float = Field(0.0, ge=0.0, description="GPUs per replica")

    @model_validator(mode="after")
    def _consistent(self) -> "EngineConfig":
        if (self.images is None) == (self.images_from is None):
            raise ValueError("give exactly one of images (an input spec) or images_from (a dataset root)")
        if self.prefill != "none" and self.stage != "semi_auto":
            raise ValueError("pre-filled masks belong to the semi_auto stage")
        if self.prefill == "dataset" and not (self.prefill_from or self.images_from):
            raise ValueError("prefill='dataset' needs prefill_from (or images_from) naming the dataset")
        if self.output in (self.prefill_from, self.images_from):
            # One row per image: a table that already holds an image cannot take it again.
            raise ValueError("output must be a different dataset root from the one images or pre-fill come from")
        return self


# -- protocol ---------------------------------------------------------------------------------
class ImageEntry(_Message):
    index: int
    uri: str


class ImageList(_Message):
    stage: str
    round: int
    output: str
    images: list[ImageEntry]
    text_prompts: bool = Field(False, description="the model takes text prompts (PredictRequest.text)")


class PrefillMask(_Message):
    segmentation: Rle
    area: int
    bbox: tuple[int, int, int, int]
    predicted_iou: float | None = None
    stability_score: float | None = None
    point_coords: list[tuple[float, float]] = Field(default_factory=list)


class OpenResponse(_Message):
    index: int
    uri: str
    image_id: str
    width: int
    height: int
    encoded: bool = Field(description="this call ran the image encoder (the embedding was not cached)")
    encode_ms: float
    committed: bool = Field(description="the output dataset already holds this image")
    prefill: list[PrefillMask] = Field(default_factory=list)


class PredictRequest(_Message):
    index: int = Field(description="the image's index in the list: any replica can re-read it")
    image_id: str
    points: list[tuple[float, float]] = Field(default_factory=list, description="(x, y) clicks")
    labels: list[Literal[0, 1]] = Field(default_factory=list, description="1 foreground, 0 background")
    box: tuple[float, float, float, float] | None = Field(None, description="XYXY")
    mask_input: str | None = Field(None, description="low_res of the previous response")
    text: str | None = Field(None, max_length=1000, description="words naming the object, e.g. 'red ellipse' "
                                                                "(models with a text input)")
    multimask: bool | None = Field(None, description="None: three candidates for a lone click, else one")

    @model_validator(mode="after")
    def _prompt(self) -> "PredictRequest":
        if len(self.points) != len(self.labels):
            raise ValueError(f"{len(self.points)} points but {len(self.labels)} labels")
        if self.text is not None and not self.text.strip():
            raise ValueError("text is empty")
        if not self.points and self.box is None and self.mask_input is None and self.text is None:
            raise ValueError("give points, a box, a mask_input or text")
        return self


class PredictResponse(_Message):
    image_id: str
    segmentation: Rle
    area: int
    bbox: tuple[int, int, int, int]
    score: float = Field(description="the model's predicted IoU of the returned mask")
    low_res: str = Field(description="base64 float16 low-res logits: send back as mask_input")
    low_res_shape: tuple[int, int]
    encoded: bool = Field(description="the embedding was not cached and this call ran the encoder")
    server_ms: float = Field(description="time spent in the replica on this request")


class AcceptedMask(_Message):
    segmentation: Rle
    point_coords: list[tuple[float, float]] = Field(default_factory=list)
    predicted_iou: float | None = None
    stability_score: float | None = None
    text_prompt: str | None = Field(None, max_length=1000, description="the text that found the mask, if any")


class CommitRequest(_Message):
    index: int
    image_id: str
    masks: list[AcceptedMask]


class CommitResponse(_Message):
    image_id: str
    version: int
    masks: int
    stage: str
    round: int


class EngineStats(_Message):
    encodes: int = Field(description="image encoder runs since the replica started")
    predicts: int
    cache_hits: int
    cache_misses: int
    cache_items: int
    cache_bytes: int
    cache_limit_bytes: int
    commits: int
