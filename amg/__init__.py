"""Automatic mask generation in three stages (encode, decode, post-process), no Ray."""
from .decode import Candidates, decode_crop, decode_image
from .encode import EncodedImage, encode_image
from .generator import AutomaticMaskGenerator
from .params import AmgParams, checkpoint_defaults
from .postprocess import postprocess

__all__ = [
    "AmgParams", "AutomaticMaskGenerator", "Candidates", "EncodedImage", "checkpoint_defaults",
    "decode_crop", "decode_image", "encode_image", "postprocess",
]
