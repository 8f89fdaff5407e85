"""Parameters of automatic mask generation: the official generator's, same names,
defaults and meaning, validated so that a bad value names its field."""
from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .grid import point_grids


# The key of a checkpoint's metadata (model.checkpoint) under which its makers recommend
# generator settings for it: {"params": {field: value}, "calibration": {how they were chosen}}.
# The official defaults suit the official SAM checkpoints; a small model's scores are
# scaled differently (see jobs/calibrate_checkpoint.py).
CHECKPOINT_DEFAULTS = "amg_defaults"


def checkpoint_defaults(meta: dict) -> dict:
    """The generator settings a checkpoint's metadata recommends ({} when none)."""
    return dict((meta.get(CHECKPOINT_DEFAULTS) or {}).get("params") or {})


class AmgParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    points_per_side: int | None = Field(32, gt=0, description="grid of n x n points per crop layer 0")
    points_per_batch: int = Field(64, gt=0, description="prompts decoded together")
    # Both lie in [0, 1] as in the official docstring: a predicted IoU and a stability score
    # (an IoU of two thresholded masks) do too, so a value above 1 keeps nothing. 0 keeps
    # every mask (the official generator skips the IoU filter at 0).
    pred_iou_thresh: float = Field(0.88, ge=0.0, le=1.0, description="keep masks whose predicted IoU is above this")
    stability_score_thresh: float = Field(0.95, ge=0.0, le=1.0, description="keep masks at least this stable")
    stability_score_offset: float = Field(1.0, ge=0.0, description="logit offset of the stability score")
    box_nms_thresh: float = Field(0.7, ge=0.0, le=1.0, description="box IoU cut-off of NMS within a crop")
    crop_n_layers: int = Field(0, ge=0, description="layers of ever smaller crops")
    crop_nms_thresh: float = Field(0.7, ge=0.0, le=1.0, description="box IoU cut-off of NMS across crops")
    crop_overlap_ratio: float = Field(512 / 1500, ge=0.0, lt=1.0,
                                      description="share of the image side by which crops of layer 1 overlap")
    crop_n_points_downscale_factor: int = Field(1, gt=0)
    point_grids: tuple[tuple[tuple[float, float], ...], ...] | None = Field(
        None, description="explicit normalized (x, y) grids, one per crop layer"
    )
    min_mask_region_area: int = Field(0, ge=0, description="fill holes / drop islands smaller than this")
    output_mode: Literal["binary_mask", "uncompressed_rle", "coco_rle"] = "binary_mask"

    @model_validator(mode="before")
    @classmethod
    def _grids_replace_the_default_side(cls, data):
        """point_grids given without points_per_side: the user gave exactly one grid source,
        not the default 32 as well (the official generator would want points_per_side=None)."""
        if isinstance(data, dict) and data.get("point_grids") is not None and "points_per_side" not in data:
            data = {**data, "points_per_side": None}
        return data

    @model_validator(mode="after")
    def _one_grid_source(self) -> "AmgParams":
        if self.points_per_side is not None and self.point_grids is not None:
            raise ValueError("points_per_side and point_grids are both given: give one of them")
        if self.points_per_side is None and self.point_grids is None:
            raise ValueError("one of points_per_side or point_grids must be given (points_per_side is null)")
        if self.point_grids is not None:
            if len(self.point_grids) != self.crop_n_layers + 1:
                raise ValueError(
                    f"point_grids has {len(self.point_grids)} grids; crop_n_layers={self.crop_n_layers} needs "
                    f"{self.crop_n_layers + 1}"
                )
            for grid in self.point_grids:
                if any(not (0.0 <= c <= 1.0) for p in grid for c in p):
                    raise ValueError("point_grids coordinates must be normalized to [0, 1]")
        return self

    def over(self, defaults: dict) -> "AmgParams":
        """These parameters on top of other defaults (a checkpoint's recommended settings,
        amg.checkpoint_defaults): every field given explicitly here keeps its value, the
        others take the value in `defaults` where it has one. Validated like any input."""
        explicit = self.model_dump(include=self.model_fields_set)
        return AmgParams.model_validate({**{k: v for k, v in defaults.items() if k not in explicit}, **explicit})

    def grids(self) -> list[np.ndarray]:
        """One n x 2 normalized (x, y) grid per crop layer."""
        if self.point_grids is not None:
            return [np.asarray(g, dtype=np.float64).reshape(-1, 2) for g in self.point_grids]
        return point_grids(self.points_per_side, self.crop_n_layers, self.crop_n_points_downscale_factor)
