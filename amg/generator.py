"""The whole-image automatic mask generator: encode -> decode -> post-process."""
from __future__ import annotations

import numpy as np

from model.predictor import resolve_precision
from model.sam import Sam

from .decode import decode_image
from .encode import encode_image
from .params import AmgParams
from .postprocessing import postprocess


class AutomaticMaskGenerator:
    """Drop-in for the official SamAutomaticMaskGenerator: same parameters (as keyword
    arguments or an AmgParams), same records.

    precision: of the grid prompts' decoding, the bulk of the work ("bf16" for the fast path;
    fp32 runs instead on a CPU without native bf16, see model.predictor.resolve_precision).
    encoder_precision: of the image encoder, fp32 unless asked: a bf16 encoder moves masks
    (with the bundled checkpoint, multi-crop: official masks matched down to IoU 0.63, against
    >= 0.996 with the encoder in fp32; benchmarks/amg.py), while it saves little where the
    encoder is small. On a GPU with a ViT-H encoder, bf16 there is most of the time saved."""

    def __init__(self, model: Sam, params: AmgParams | None = None, *, precision: str = "fp32",
                 encoder_precision: str = "fp32", **kwargs) -> None:
        self.precision = resolve_precision(precision, model.device)
        self.encoder_precision = resolve_precision(encoder_precision, model.device, "encoder_precision")
        self.model = model.eval()
        self.params = params if params is not None else AmgParams(**kwargs)

    def generate(self, image: np.ndarray) -> list[dict]:
        """image: H x W x 3 uint8 RGB -> list of mask records."""
        encoded = encode_image(self.model, image, self.params, self.encoder_precision)
        crops = decode_image(self.model, encoded, self.params, self.precision)
        return postprocess(crops, encoded.orig_size, self.params)
