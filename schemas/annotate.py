"""The configuration of an auto-annotation run (`jobs/auto_annotate.py`), validated.

One pydantic model, read from a YAML/JSON file and/or flags. Flags keep the names of the
official `scripts/amg.py` (`--points-per-side`, `--pred-iou-thresh`, ...); they fill the
nested `amg` section. A bad value raises a ValidationError that names the field.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from amg.params import AmgParams
from model.config import CONFIGS
from model.text import normalize_phrase
from pipeline.images import ImageLimits
from schemas.records import ROUND_MAX

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_INPUT = str(ROOT / "examples" / "images")
DEFAULT_OUTPUT = str(ROOT / "out" / "auto_annotate")
DEFAULT_CHECKPOINT = str(ROOT / "checkpoints" / "samengine_tiny256.pt")
# The bundled checkpoint with a text prompt input (jobs/train_text.py): taken by --text runs
# that name no checkpoint of their own.
DEFAULT_TEXT_CHECKPOINT = str(ROOT / "checkpoints" / "samengine_tiny256_text.pt")


class ActorPool(BaseModel):
    """Size bounds of an autoscaling actor pool and what each actor asks of the cluster."""
    model_config = ConfigDict(extra="forbid")

    min: int = Field(1, ge=1)
    max: int | Literal["auto"] = Field(
        "auto", description='most actors; "auto": as many as the cluster\'s live nodes hold (pipeline.pools)')
    num_cpus: float = Field(1.0, ge=0.0, description="CPUs per actor (also its torch threads)")
    num_gpus: float | None = Field(None, ge=0.0, description="GPUs per actor; None: 1 on CUDA, 0 on CPU")
    batch_size: int = Field(1, ge=1, description="images per call")
    resources: dict[str, float] = Field(default_factory=dict, description="custom resources, e.g. a node group")
    memory_gb: float | None = Field(None, ge=0.0, description="memory each actor reserves with Ray, GiB; None: "
                                    "estimated from the model (model.footprint); 0: none")

    @model_validator(mode="after")
    def _ordered(self) -> "ActorPool":
        if self.max != "auto" and self.max < self.min:
            raise ValueError(f"max ({self.max}) must be >= min ({self.min})")
        return self


class AnnotateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input: str = Field(DEFAULT_INPUT, description="folder, file, glob, s3://bucket/prefix, or a .txt manifest of URIs")
    output: str = Field(DEFAULT_OUTPUT, description="dataset root: local folder or s3://bucket/prefix")
    checkpoint: str = Field(DEFAULT_CHECKPOINT, description="ours or an official sam_vit_*.pth (local or s3://)")
    model_type: str | None = Field(None, description="config of an official checkpoint: vit_b, vit_l, vit_h")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="of the grid prompts' decoding, most of the work; bf16: the fast path")
    encoder_precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="of the image encoder; bf16 moves masks more than the decoder's bf16 does, "
                            "but is most of the time saved with ViT-H on a GPU")
    embedding_dtype: Literal["float32", "float16"] = Field(
        "float32", description="embeddings between encoder and decoder actors; float16 halves the transfer")
    amg: AmgParams = Field(default_factory=lambda: AmgParams(output_mode="coco_rle"))
    text: list[str] = Field(default_factory=list, description="phrases that prompt every image instead of the "
                                                              "point grid, one mask each; needs a text-input checkpoint")
    endpoint_url: str | None = Field(None, description="S3 endpoint (MinIO, Ceph, moto); default AWS_ENDPOINT_URL")
    limits: ImageLimits = Field(default_factory=ImageLimits, description="bounds on input files; past them an input is quarantined")
    near_duplicate_distance: int = Field(
        4, ge=-1, le=32, description="pHash Hamming distance counted as a near duplicate; -1 turns it off")

    fuse_stages: bool | None = Field(
        None, description="encode, decode and post-process in one actor (no embedding transfer); "
                          "None: fused on CPU, split on GPU")
    read_batch_size: int = Field(8, ge=1, description="files per read/decode task")
    read_num_cpus: float = Field(0.5, gt=0.0)
    read_resources: dict[str, float] = Field(default_factory=dict, description="custom resources of read tasks")
    encoder: ActorPool = Field(default_factory=ActorPool)
    decoder: ActorPool = Field(default_factory=ActorPool)
    postprocess_num_cpus: float = Field(0.5, gt=0.0)
    postprocess_resources: dict[str, float] = Field(default_factory=dict,
                                                    description="custom resources of post-process tasks")
    chunk_images: int = Field(64, ge=1, description="images per Delta commit (one transaction each)")
    writers: int = Field(1, ge=1, description="writer actors committing chunks in parallel")

    replace: bool = Field(False, description="re-annotate images the dataset already holds, replacing their rows "
                                             "(a full rebuild); resume then skips only what this run_id wrote")
    round: int = Field(0, ge=0, le=ROUND_MAX, description="data-engine round whose checkpoint is used")
    run_id: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$",
                               description="default: a fresh id per invocation (letters, digits, . _ -)")
    ray_address: str | None = Field(None, description="Ray cluster address (default: RAY_ADDRESS, a running local "
                                                      "cluster, or an embedded local Ray)")

    @field_validator("output")
    @classmethod
    def _named_output(cls, v: str) -> str:
        # An unset shell variable (--output "$OUT") would put the tables at the filesystem's root.
        if not v.strip():
            raise ValueError("the output is empty: name a local folder or s3://bucket/prefix")
        return v

    @field_validator("model_type")
    @classmethod
    def _known_model_type(cls, v: str | None) -> str | None:
        # A known config, or one resampled to another patch size (model.resample names it
        # vit_tiny256-p8), which only a checkpoint of ours holds.
        if v is not None and re.sub(r"(-p\d+)+$", "", v) not in CONFIGS:
            raise ValueError(f"unknown model type {v!r}; choose one of {sorted(CONFIGS)} (or, for a checkpoint of "
                             "ours resampled to another patch size, its name such as vit_tiny256-p8)")
        return v

    @field_validator("amg")
    @classmethod
    def _rle_output(cls, v: AmgParams) -> AmgParams:
        # The dataset stores COCO RLE whatever mode was asked for (`--convert-to-rle` is implied).
        return v if v.output_mode == "coco_rle" else v.model_copy(update={"output_mode": "coco_rle"})

    @field_validator("text")
    @classmethod
    def _phrases(cls, v: list[str]) -> list[str]:
        out = []
        for phrase in v:
            phrase = normalize_phrase(phrase)
            if not phrase:
                raise ValueError("a text prompt is empty")
            if len(phrase) > 1000:
                raise ValueError(f"a text prompt is {len(phrase)} characters long (at most 1000)")
            if phrase not in out:
                out.append(phrase)
        return out

    @model_validator(mode="after")
    def _text_mode(self) -> "AnnotateConfig":
        if self.text:
            if self.amg.crop_n_layers:
                raise ValueError("text prompts apply to the whole image: crop_n_layers must be 0 with text")
            if "checkpoint" not in self.model_fields_set:  # no checkpoint named: the bundled text one
                self.checkpoint = DEFAULT_TEXT_CHECKPOINT
        return self

    def resolved_device(self, cluster_gpus: float) -> str:
        """"auto" is CUDA when the cluster has GPUs (the driver itself may have none)."""
        if self.device != "auto":
            return self.device
        return "cuda" if cluster_gpus > 0 else "cpu"

    def fused(self, device: str) -> bool:
        return self.fuse_stages if self.fuse_stages is not None else device == "cpu"
