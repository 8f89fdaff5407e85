"""The mask decoder for the automatic generator's grids on the CPU, as native kernels that take
one prompt at a time through all of its steps (model/score_kernel.c): `score` is
MaskDecoder.score, `mask_logits` its finish + masks_from for the prompts kept.

torch runs the decoder op by op over a whole batch: every op is a pass over the batch's
per-prompt image tensors (hw x C each, 8 MB per 64 prompts for the bundled model), and its
matmuls already run near the core's peak, so those passes are what costs. The kernels keep a
prompt's tensors in the core's cache instead. Same function (float32 throughout; sums run in
another order, so the last bits may differ).

The C source is compiled on first use for this CPU and cached (model/native.py). Without a
compiler, or with SAMENGINE_NATIVE=0, `available()` is False and the decoder keeps its torch
path."""
from __future__ import annotations

import ctypes
import logging
import weakref
from pathlib import Path

import torch
from torch import nn

from . import native
from .precision import weights_signature

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("score_kernel.c")
# The largest per-prompt image tensor (hw x C floats) the kernels take: 4 MB, the official
# ViT-B/L/H decoders' (64 x 64 x 256). Those no longer stay in a core's cache, but the kernels
# still win: per prompt (64 per batch, idle 2-core AMD EPYC), one thread: torch 18.6 + 23.5 ms
# (score + masks), native 17.3 + 18.3, native bf16 11.5 + 10.2; two threads: 9.6 + 12.1,
# 8.8 + 9.5, 6.0 + 5.3. (Before their LayerNorm over channels swept rows, a 64 x 64 side's
# power-of-two stride thrashed the cache and they lost: 981 vs 671 ms score per 64 prompts.)
# Larger sides would need per-thread scratch of hundreds of MB: torch's path.
MAX_IMAGE_FLOATS = 1 << 20
MAX_DEPTH = 16  # two-way transformer blocks (score_kernel.c's MAX_DEPTH; SAM's decoder has 2)


def available() -> bool:
    """Whether the kernels are built (or can be) and not disabled by SAMENGINE_NATIVE=0."""
    return _load() is not None


def _load() -> ctypes.CDLL | None:
    return LIBRARY.get()


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    p = ctypes.c_void_p
    lib.score_scratch_floats.argtypes = [p]
    lib.score_scratch_floats.restype = ctypes.c_long
    i, n = ctypes.c_int, ctypes.c_long
    lib.score_prompts.argtypes = [i, p, p, i, p, p, p, p, p, n]
    lib.score_prompts.restype = None
    lib.mask_scratch_floats.argtypes = [p, p]
    lib.mask_scratch_floats.restype = ctypes.c_long
    lib.mask_prompts.argtypes = [i, p, p, p, i, p, p, p, p, p, p, p, n]
    lib.mask_prompts.restype = None
    lib.kernel_gelu.argtypes = [n, p]
    lib.kernel_gelu.restype = None
    for flag in ("kernel_bf16", "kernel_openmp", "kernel_lanes"):
        getattr(lib, flag).argtypes = []
        getattr(lib, flag).restype = ctypes.c_int
    return lib


LIBRARY = native.Library(SOURCE, _bind, "native decoder kernels", log)


def bf16_available() -> bool:
    """Whether the kernels can multiply in bf16 (built for a CPU with AVX512-BF16)."""
    return available() and bool(_load().kernel_bf16())


def build_summary() -> str:
    """How the kernels were built, for logs and benchmark headers: vector width, OpenMP, bf16
    (e.g. "8-float vectors, OpenMP"); "" where they are unavailable."""
    if not available():
        return ""
    lib = _load()
    parts = [f"{lib.kernel_lanes()}-float vectors", "OpenMP" if lib.kernel_openmp() else "one thread"]
    return ", ".join(parts + (["bf16 products"] if lib.kernel_bf16() else []))


def supports(decoder: nn.Module, pixels: int) -> bool:
    """Whether the kernels compute this decoder on image embeddings of `pixels` (h x w): SAM's
    layout (ReLU transformer MLPs, 3-layer IoU head and hypernetwork MLPs, LayerNorms with eps
    1e-5, exact-GELU upscaling, a width that is a multiple of 4, as every SamConfig's), with
    per-prompt image tensors within MAX_IMAGE_FLOATS."""
    if pixels * decoder.transformer_dim > MAX_IMAGE_FLOATS or decoder.transformer_dim % 4:
        return False
    t = decoder.transformer
    norms = [getattr(layer, f"norm{i}") for layer in t.layers for i in range(1, 5)] + [t.norm_final_attn]
    return (all(type(layer.mlp.act) is nn.ReLU for layer in t.layers)
            and len(decoder.iou_prediction_head.layers) == 3 and not decoder.iou_prediction_head.sigmoid_output
            and all(type(n) is nn.LayerNorm and n.eps == 1e-5 and n.weight is not None for n in norms)
            and t.layers[0].self_attn.num_heads <= 64 and len(t.layers) <= MAX_DEPTH
            and _upscaling_supported(decoder))


def _upscaling_supported(decoder: nn.Module) -> bool:
    from .common import LayerNorm2d
    from .mask_decoder import Upsample2x

    layers = list(decoder.output_upscaling)
    kinds = [Upsample2x, LayerNorm2d, nn.GELU, Upsample2x, nn.GELU]
    return (len(layers) == 5 and all(type(m) is k for m, k in zip(layers, kinds))
            and all(m.approximate == "none" for m in (layers[2], layers[4]))
            and layers[0].out_channels <= 256
            and all(len(m.layers) == 3 and not m.sigmoid_output for m in decoder.output_hypernetworks_mlps))


class _Packed:
    """A decoder's weights in the kernel's order and layout (see score_kernel.c's enums)."""

    def __init__(self, decoder: nn.Module) -> None:
        t = decoder.transformer
        tensors: list[torch.Tensor] = []
        c = lambda x: x.detach().float().contiguous()  # noqa: E731
        tr = lambda x: c(x.detach().t())  # noqa: E731
        for layer in t.layers:
            sa, ti, it = layer.self_attn, layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
            tensors += [tr(sa.q_proj.weight), c(sa.q_proj.bias), tr(sa.k_proj.weight), c(sa.k_proj.bias),
                        tr(sa.v_proj.weight), c(sa.v_proj.bias), tr(sa.out_proj.weight), c(sa.out_proj.bias),
                        c(layer.norm1.weight), c(layer.norm1.bias),
                        tr(ti.q_proj.weight), c(ti.q_proj.bias), c(ti.k_proj.weight), tr(ti.v_proj.weight),
                        c(ti.v_proj.bias), tr(ti.out_proj.weight), c(ti.out_proj.bias),
                        c(layer.norm2.weight), c(layer.norm2.bias),
                        tr(layer.mlp.lin1.weight), c(layer.mlp.lin1.bias), tr(layer.mlp.lin2.weight),
                        c(layer.mlp.lin2.bias), c(layer.norm3.weight), c(layer.norm3.bias),
                        tr(it.k_proj.weight), c(it.k_proj.bias), c(it.q_proj.weight), c(it.q_proj.bias),
                        tr(it.v_proj.weight), c(it.v_proj.bias), tr(it.out_proj.weight), c(it.out_proj.bias),
                        c(layer.norm4.weight), c(layer.norm4.bias)]
        fa, head = t.final_attn_token_to_image, decoder.iou_prediction_head.layers
        final = [tr(fa.q_proj.weight), c(fa.q_proj.bias), c(fa.k_proj.weight), tr(fa.v_proj.weight),
                 c(fa.v_proj.bias), tr(fa.out_proj.weight), c(fa.out_proj.bias),
                 c(t.norm_final_attn.weight), c(t.norm_final_attn.bias)]
        tensors += final
        for lin in head:
            tensors += [tr(lin.weight), c(lin.bias)]
        self.tensors = tensors
        last = t.layers[-1]
        up1, norm, _, up2, _ = decoder.output_upscaling
        per_pixel = lambda up: c(up.weight.permute(0, 2, 3, 1).reshape(up.in_channels, 4 * up.out_channels))  # noqa: E731
        # mask_prompts' order (score_kernel.c's M_* enum); None: the keys' positional encoding,
        # given per call
        self.mask_tensors = [c(last.norm4.weight), c(last.norm4.bias), *final, None, per_pixel(up1), c(up1.bias),
                             c(norm.weight), c(norm.bias), per_pixel(up2), c(up2.bias)]
        for mlp in decoder.output_hypernetworks_mlps:
            for lin in mlp.layers:
                self.mask_tensors += [tr(lin.weight), c(lin.bias)]
        self.upscale_channels = (up1.out_channels, up2.out_channels)
        first = t.layers[0]
        self.heads = first.self_attn.num_heads
        self.internal = first.cross_attn_token_to_image.internal_dim
        self.mlp = first.mlp.lin1.out_features
        self.iou_hidden = head[0].out_features
        self.depth = len(t.layers)
        self.signature = weights_signature(decoder)
        self.image_side: list[torch.Tensor] | None = None  # see _image_side


_packed: "weakref.WeakKeyDictionary[nn.Module, _Packed]" = weakref.WeakKeyDictionary()


def _packed_for(decoder: nn.Module) -> _Packed:
    """The decoder's packed weights, packed again when its weights changed."""
    packed = _packed.get(decoder)
    if packed is None or packed.signature != weights_signature(decoder):
        packed = _packed[decoder] = _Packed(decoder)
    return packed


@torch.no_grad()
def score(decoder: nn.Module, tokens: torch.Tensor, src: torch.Tensor, image_pe: torch.Tensor, bf16: bool = False
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, _Packed]:
    """MaskDecoder.score's pass for tokens B x T x C (also their positional encoding) on one
    shared image side (src, image_pe: 1 x C x h x w): IoU predictions B x M, tokens after
    the blocks B x T x C, image keys before the last LayerNorm B x hw x C (a view of a
    channel-major B x C x hw tensor, the kernel's layout), the keys' positional encoding
    1 x hw x C and the weights as the kernels took them (for mask_logits). bf16: the matmuls
    take bf16 operands (float32 sums), where bf16_available()."""
    lib = _load()
    packed = _packed_for(decoder)
    b, n_tok, c = tokens.shape
    src_t = src.reshape(c, -1).float().contiguous()  # C x hw, channel-major as the kernel keeps it
    pe_t = image_pe.reshape(c, -1).float().contiguous()
    shared = _image_side(decoder, packed, src_t, pe_t)
    pointers = (ctypes.c_void_p * (len(packed.tensors) + len(shared)))(
        *[x.data_ptr() for x in packed.tensors + shared])
    n = src_t.shape[1]
    dims = _dims(decoder, packed, c, n_tok, n, bf16)
    tokens = tokens.float().contiguous()
    queries = torch.empty_like(tokens)
    raw = torch.empty(b, c, n)
    iou = torch.empty(b, decoder.num_mask_tokens)
    threads = _threads(b)
    scratch = torch.empty(threads, lib.score_scratch_floats(dims))
    lib.score_prompts(threads, dims, pointers, b, tokens.data_ptr(), queries.data_ptr(), raw.data_ptr(),
                      iou.data_ptr(), scratch.data_ptr(), scratch.shape[1])
    return iou, queries, raw.transpose(1, 2), pe_t.t()[None], packed


def _image_side(decoder: nn.Module, packed: _Packed, src_t: torch.Tensor, pe_t: torch.Tensor) -> list[torch.Tensor]:
    """The image side every prompt shares: src and pe (C x hw), the first block's token ->
    image keys and values and its image -> token queries. The generator scores an image's
    grid in batches on the same image side, so the last one is kept with the packed weights
    and reused while src and pe are equal to it (kept as copies: a caller that refills its
    tensors in place must not find them equal to themselves)."""
    last = packed.image_side
    if last is not None and torch.equal(last[0], src_t) and torch.equal(last[1], pe_t):
        return last
    src_t, pe_t = src_t.clone(), pe_t.clone()
    first = decoder.transformer.layers[0]
    ti, it = first.cross_attn_token_to_image, first.cross_attn_image_to_token
    keys, with_pe = src_t.t(), (src_t + pe_t).t()
    side = [src_t, pe_t, ti.k_proj(with_pe).t().contiguous(), ti.v_proj(keys).contiguous(),
            it.q_proj(with_pe).t().contiguous()]
    packed.image_side = side
    return side


def _dims(decoder: nn.Module, packed: _Packed, c: int, n_tok: int, n: int, bf16: bool):
    if bf16 and not bf16_available():
        raise ValueError("bf16 matmuls need kernels built for a CPU with AVX512-BF16 (see bf16_available)")
    return (ctypes.c_int * 10)(c, n_tok, n, packed.heads, packed.internal, packed.mlp, packed.iou_hidden,
                               decoder.num_mask_tokens, packed.depth, int(bf16))


def _threads(n: int) -> int:
    """How many threads the kernels split n prompts over: torch's (the kernels run on the same
    OpenMP team), one per prompt at most; one where they were built without OpenMP."""
    return max(1, min(torch.get_num_threads(), n)) if _load().kernel_openmp() else 1


@torch.no_grad()
def mask_logits(decoder: nn.Module, queries: torch.Tensor, tokens: torch.Tensor, raw_keys: torch.Tensor,
                key_pe: torch.Tensor, size: tuple[int, int], rows: torch.Tensor, token_index: torch.Tensor,
                bf16: bool = False, weights: _Packed | None = None) -> torch.Tensor:
    """MaskDecoder.masks_from(*finish(...)) of a score() pass (its queries, tokens, raw keys,
    key_pe and size): low-res logits len(rows) x len(token_index) x 4h x 4w of the mask tokens
    token_index (indices among the mask tokens, as finish and masks_from take them). bf16: as
    for score. weights: score's, as it returned them (else the decoder's, checked)."""
    lib = _load()
    packed = weights if weights is not None else _packed_for(decoder)
    b, n_tok, c = tokens.shape
    h, w = size
    n = h * w
    rows = rows.to(torch.int64).contiguous()
    chosen = token_index.to(torch.int64).contiguous()
    pe_t = key_pe.reshape(n, c).t().float().contiguous()
    weights = [pe_t if x is None else x for x in packed.mask_tensors]
    pointers = (ctypes.c_void_p * len(weights))(*[x.data_ptr() for x in weights])
    dims = _dims(decoder, packed, c, n_tok, n, bf16)
    mdims = (ctypes.c_int * 5)(*packed.upscale_channels, h, w, len(chosen))
    queries, tokens = (x.float().contiguous() for x in (queries, tokens))
    raw_t = raw_keys.transpose(1, 2).float().contiguous()  # B x C x hw: no copy of score()'s output
    out = torch.empty(len(rows), len(chosen), 4 * h, 4 * w)
    threads = _threads(len(rows))
    scratch = torch.empty(threads, lib.mask_scratch_floats(dims, mdims))
    lib.mask_prompts(threads, dims, mdims, pointers, len(rows), rows.data_ptr(), chosen.data_ptr(),
                     queries.data_ptr(), tokens.data_ptr(), raw_t.data_ptr(), out.data_ptr(), scratch.data_ptr(),
                     scratch.shape[1])
    return out
