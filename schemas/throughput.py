"""Benchmark results file: per-stage throughput of one actor on one kind of machine.

`benchmarks/amg.py --results-json PATH` writes it, `jobs/plan.py` reads it. One JSON object:

    {
      "format": "samengine-throughput/1",
      "name": "cpu-2core",                      # short label of the run
      "device": "cpu",                          # priced accelerator: "cpu", "H100", "L4", ...
      "machine": "AMD EPYC, 2 cores shared",    # free text: what ran it
      "source": "measured",                     # default for stages: "measured" | "estimate"
      "config": {"model_type": "vit_b", "points_per_side": 32, "image_size": [1500, 2250]},
      "notes": "...",
      "stages": [
        {"stage": "encode", "items_per_s": 3.1, "resources": {"CPU": 4, "GPU": 1}},
        {"stage": "read", "items_per_s": 40.0, "resources": {"CPU": 1}, "source": "measured"}
      ]
    }

Items are images for every stage: `items_per_s` is images per second of one actor holding
`resources`. Stages are `read` (bytes -> decoded RGB), `encode` (image encoder),
`decode_prompts` (point grid through the mask decoder and the per-crop filters),
`postprocess` (NMS, cleanup, COCO RLE records) and `write` (records -> Parquet). A stage
without its own `source` takes the file's; anything derived from FLOP counts or datasheets
is "estimate".
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .settings_file import validation_problems

FORMAT = "samengine-throughput/1"
STAGES = ("read", "encode", "decode_prompts", "postprocess", "write")
Source = Literal["measured", "estimate"]


class StageResources(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    cpus: float = Field(0.0, ge=0, alias="CPU")
    gpus: float = Field(0.0, ge=0, alias="GPU")

    @model_validator(mode="after")
    def _something(self) -> "StageResources":
        if self.cpus == 0 and self.gpus == 0:
            raise ValueError("an actor needs CPU or GPU (both are 0)")
        return self


class StageThroughput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    stage: Literal[STAGES]
    items_per_s: float = Field(gt=0, description="images per second of one actor")
    resources: StageResources
    source: Source | None = None


class ThroughputResults(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: Literal[FORMAT]
    name: str = Field(min_length=1)
    device: str = Field(min_length=1, description="'cpu' or the GPU type that prices it")
    machine: str = ""
    source: Source
    config: dict = Field(default_factory=dict)
    notes: str = ""
    stages: list[StageThroughput] = Field(min_length=1)

    @model_validator(mode="after")
    def _one_entry_per_stage(self) -> "ThroughputResults":
        names = [s.stage for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"a stage is listed twice: {names}")
        for s in self.stages:
            if s.source is None:
                s.source = self.source
        return self


class ResultsFileError(ValueError):
    """A results file that cannot be read or does not follow the format."""


def load_results(path: str | Path) -> ThroughputResults:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise ResultsFileError(f"{path}: cannot read: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise ResultsFileError(f"{path}: not JSON: {e}") from None
    try:
        return ThroughputResults.model_validate(data)
    except ValidationError as e:
        raise ResultsFileError(f"{path}: not a {FORMAT} results file: {validation_problems(e)}") from None


def write_results(path: str | Path, results: ThroughputResults) -> None:
    Path(path).write_text(json.dumps(results.model_dump(by_alias=True, exclude_none=True), indent=2) + "\n")
