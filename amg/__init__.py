"""Automatic mask generation in three stages (encode, decode, post-process), no Ray.

The names below load their modules on first use (PEP 562), so that importing one light
module of the package (`amg.rle`, `amg.overlay`: the report's RLE decoding and overlays)
does not import torch and the model (~1 GB resident and seconds of start-up). No module
may share a name listed here: importing it would bind the package attribute to the module
(hence amg.postprocessing for the function postprocess)."""
from importlib import import_module

_EXPORTS = {
    "AmgParams": "params", "checkpoint_defaults": "params", "AutomaticMaskGenerator": "generator",
    "Candidates": "decode", "decode_crop": "decode", "decode_image": "decode",
    "EncodedImage": "encode", "encode_image": "encode", "postprocess": "postprocessing",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
