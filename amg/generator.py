"""The whole-image automatic mask generator: encode -> decode -> post-process."""
from __future__ import annotations

import numpy as np

from model.predictor import check_precision
from model.sam import Sam

from .decode import decode_image
from .encode import encode_image
from .params import AmgParams
from .postprocessing import postprocess


class AutomaticMaskGenerator:
    """Drop-in for the official SamAutomaticMaskGenerator: same parameters (as keyword
    arguments or an AmgParams), same records; precision "bf16" for the fast path."""

    def __init__(self, model: Sam, params: AmgParams | None = None, *, precision: str = "fp32", **kwargs) -> None:
        check_precision(precision, model.device)
        self.model = model.eval()
        self.params = params if params is not None else AmgParams(**kwargs)
        self.precision = precision

    def generate(self, image: np.ndarray) -> list[dict]:
        """image: H x W x 3 uint8 RGB -> list of mask records."""
        encoded = encode_image(self.model, image, self.params, self.precision)
        crops = decode_image(self.model, encoded, self.params, self.precision)
        return postprocess(crops, encoded.orig_size, self.params)
