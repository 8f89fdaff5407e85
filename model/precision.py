"""The prompt side of a model held in bf16, for decoding many prompts at once.

Under autocast the mask decoder keeps its weights and its residual stream in fp32 and
casts at every matmul. Decoding a point grid is bound by memory passes over per-prompt
image features (B x hw x C), not by the matmuls, so autocast gains little and its casts
can cost more than they save (benchmarks/amg.py). A twin of the model whose prompt
encoder and mask decoder hold bf16 weights keeps those features in bf16: half the bytes
per pass, and matmuls without casts. The image encoder is shared, not copied.

The twin is made once per model and made again when the model's weights change (a new
checkpoint loaded in place, a training step), so callers can ask for it on every call.

On a CPU with AVX512-BF16 the automatic generator decodes bf16 without the twin: the native
kernels take the float32 model and multiply bf16 operands themselves
(MaskDecoder.native_bf16_for, amg.decode)."""
from __future__ import annotations

import copy
import weakref
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # model.sam imports the decoder, whose native kernels use weights_signature
    from .sam import Sam

_TWIN_MODULES = ("prompt_encoder", "mask_decoder")
_twins: "weakref.WeakKeyDictionary[Sam, tuple[tuple, Sam]]" = weakref.WeakKeyDictionary()


def decoding_model(model: Sam, dtype: torch.dtype | None) -> Sam:
    """The model to decode prompts with at `dtype` (None: fp32): for bf16, a twin whose
    prompt encoder and mask decoder hold bf16 weights (run it under bf16 autocast, which
    casts fp32 inputs such as point coordinates); otherwise the model itself. fp16 stays
    with autocast: without fp32 LayerNorm statistics its range is too small."""
    if dtype != torch.bfloat16:
        return model
    signature = _signature(model)
    cached = _twins.get(model)
    if cached is not None and cached[0] == signature:
        return cached[1]
    twin = copy.copy(model)  # shares the image encoder, buffers and config
    twin._modules = dict(model._modules)
    with torch.inference_mode(False), torch.no_grad():
        for name in _TWIN_MODULES:
            twin._modules[name] = copy.deepcopy(model._modules[name]).to(dtype).requires_grad_(False)
    _twins[model] = (signature, twin)
    return twin


def _signature(model: Sam) -> tuple:
    """Where the prompt side's weights live and how often they were written in place."""
    return weights_signature(*(model._modules[name] for name in _TWIN_MODULES))


def weights_signature(*modules: torch.nn.Module) -> tuple:
    """Where the modules' weights live (their data pointers) and how often they were written
    in place: it changes when a checkpoint is loaded into them, a training step updates them
    or they move. A plain walk of the module tree, as the native kernels ask on every call
    (nn.Module.parameters() with its generators costs several times more)."""
    out = []
    stack = list(reversed(modules))
    while stack:
        module = stack.pop()
        for group in (module._parameters, module._buffers):
            for t in group.values():
                if t is not None:
                    try:
                        out.append((t.data_ptr(), t._version))
                    except RuntimeError:  # weights made under inference mode have no version counter
                        out.append((t.data_ptr(), -1))
        stack.extend(m for m in reversed(module._modules.values()) if m is not None)
    return tuple(out)
