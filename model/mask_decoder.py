"""Mask decoder: a two-way transformer over prompt tokens and the image embedding,
then transposed-conv upscaling and per-mask-token hypernetwork MLPs."""
from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from . import score_kernel
from .common import MLP, LayerNorm2d
from .transformer import TwoWayTransformer


class MaskDecoder(nn.Module):
    def __init__(
        self,
        *,
        transformer_dim: int,
        transformer: TwoWayTransformer,
        num_multimask_outputs: int = 3,
        activation: type[nn.Module] = nn.GELU,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
    ) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.num_mask_tokens = num_multimask_outputs + 1
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            Upsample2x(transformer_dim, transformer_dim // 4),
            LayerNorm2d(transformer_dim // 4),
            activation(),
            Upsample2x(transformer_dim // 4, transformer_dim // 8),
            activation(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3)
            for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(
            transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth
        )

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """image_embeddings: 1 or B x C x h x w; image_pe: 1 x C x h x w; sparse: B x N x C;
        dense: B x C x h x w. Returns low-res mask logits B x M x 4h x 4w and IoU
        predictions B x M, with M = 3 (multimask) or 1 (the single-mask token)."""
        masks, iou_pred = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings
        )
        keep = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, keep], iou_pred[:, keep]

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All mask tokens: B x (1 + num_multimask_outputs) masks and IoU predictions."""
        tokens, image, iou_pred = self.attend(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings
        )
        return self.masks_from(tokens, image), iou_pred

    def attend(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The two-way transformer and the IoU head, without mask upscaling: returns mask
        tokens B x T x C, image features B x h x w x C and IoU predictions B x T. Callers
        that filter by predicted IoU upscale only the survivors (masks_from)."""
        tokens, src = self._inputs(image_embeddings, sparse_prompt_embeddings, dense_prompt_embeddings)
        b, (c, h, w) = len(tokens), src.shape[1:]
        hs, src = self.transformer(src, image_pe, tokens, num_outputs=1 + self.num_mask_tokens)
        iou_pred = self.iou_prediction_head(hs[:, 0])
        return hs[:, 1 : 1 + self.num_mask_tokens], src.view(b, h, w, c), iou_pred

    @torch.no_grad()
    def score(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        native_bf16: bool = False,
    ) -> tuple[torch.Tensor, "Scored"]:
        """attend() for callers that keep few prompts (the automatic generator's IoU filter):
        IoU predictions B x T of every prompt, the final attention run for the IoU token
        alone and from the keys before the last block's LayerNorm (same values up to float
        rounding), and what finish() needs for the mask tokens and image features of the
        prompts kept. In float32 on the CPU, for prompts on one shared image side of a size
        the native kernels take, it runs as one (model/score_kernel.py); native_bf16 (where
        native_bf16_for(pixels)): its matmuls, and mask_logits' after it, in bf16."""
        tokens, src = self._inputs(image_embeddings, sparse_prompt_embeddings, dense_prompt_embeddings)
        if (_native(tokens, src, image_pe) and src.shape[0] == 1 and image_pe.shape[0] == 1
                and score_kernel.supports(self, src.shape[-2] * src.shape[-1])):
            iou, queries, raw_keys, key_pe, weights = score_kernel.score(self, tokens, src, image_pe, bf16=native_bf16)
            return iou, Scored(queries, tokens, raw_keys, key_pe, src.shape[-2:], native_bf16, weights)
        if native_bf16:
            raise ValueError("native_bf16 needs float32 inputs on a CPU where native_bf16_for() holds")
        t = self.transformer
        queries, raw_keys, key_pe = t.blocks(src, image_pe, tokens, normalize_keys=False)
        iou_token = t.final_from_unnormalized(queries[:, :1], tokens[:, :1], raw_keys, key_pe)
        return self.iou_prediction_head(iou_token[:, 0]), Scored(queries, tokens, raw_keys, key_pe, src.shape[-2:])

    @torch.no_grad()
    def finish(self, scored: "Scored", rows: torch.Tensor, token_index: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """attend()'s mask tokens len(rows) x T x C and image features len(rows) x h x w x C
        of the prompts `rows` of a score() call; token_index (T' values): only those mask
        tokens (the final attention of each token depends on itself and the keys alone)."""
        t = self.transformer
        raw = scored.raw_keys
        if len(rows) < len(raw):  # all kept (a low IoU threshold): no copy of the keys
            raw = raw.index_select(0, rows)
        keys = t.norm_keys(raw)
        columns = 1 + (torch.arange(self.num_mask_tokens) if token_index is None else token_index)
        columns = columns.to(rows.device)
        queries, query_pe = (x.index_select(0, rows).index_select(1, columns) for x in (scored.queries, scored.tokens))
        hs = t.final(queries, query_pe, keys, scored.key_pe)
        return hs, keys.view(len(rows), *scored.size, keys.shape[-1])

    @torch.no_grad()
    def mask_logits(self, scored: "Scored", rows: torch.Tensor, token_index: torch.Tensor) -> torch.Tensor:
        """masks_from(*finish(scored, rows, token_index), token_index): low-res logits
        len(rows) x T' x 4h x 4w of the prompts `rows` of a score() call; in float32 on the
        CPU, where the native kernels take the image size, as one (model/score_kernel.py)."""
        if _native(scored.raw_keys) and (scored.kernel_weights is not None
                                         or score_kernel.supports(self, scored.raw_keys.shape[1])):
            return score_kernel.mask_logits(self, *scored[:5], rows, token_index, bf16=scored.native_bf16,
                                            weights=scored.kernel_weights)
        return self.masks_from(*self.finish(scored, rows, token_index), token_index)

    def native_for(self, pixels: int) -> bool:
        """Whether this decoder runs as the native kernels on image embeddings of `pixels`
        (h x w), given float32 inputs: float32 weights on the CPU, kernels built, a decoder and
        size they take."""
        weight = self.iou_token.weight
        return (weight.device.type == "cpu" and weight.dtype == torch.float32 and score_kernel.available()
                and score_kernel.supports(self, pixels))

    def native_bf16_for(self, pixels: int) -> bool:
        """Whether score() on image embeddings of `pixels` can multiply in bf16 in the native
        kernels: native_for(pixels) on a CPU with AVX512-BF16."""
        return self.native_for(pixels) and score_kernel.bf16_available()

    def _inputs(self, image_embeddings, sparse_prompt_embeddings, dense_prompt_embeddings):
        """The tokens B x (1 + T + prompts) x C and the image side (1 or B x C x h x w)."""
        b = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight])
        tokens = torch.cat([output_tokens.expand(b, -1, -1), sparse_prompt_embeddings], dim=1)
        if dense_prompt_embeddings.shape[0] > 1 and dense_prompt_embeddings.stride(0) == 0:
            # The no-mask embedding is one vector expanded over the batch: keep the image
            # side at batch 1 so the first layer projects it once for all prompts.
            dense_prompt_embeddings = dense_prompt_embeddings[:1]
        return tokens, image_embeddings + dense_prompt_embeddings

    def masks_from(
        self, mask_tokens: torch.Tensor, image: torch.Tensor, token_index: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Low-res mask logits B x T x 4h x 4w from mask tokens B x T x C and image
        features B x h x w x C. token_index (T' values): the mask tokens given are only
        those (B x T' x C, as finish() returns them), and so are the masks."""
        upscaled = self.upscale(image)  # B x h x w x 16 x C/8, see upscale
        index = range(self.num_mask_tokens) if token_index is None else token_index.tolist()
        mlps = self.output_hypernetworks_mlps
        hyper_in = torch.stack([mlps[i](mask_tokens[:, k]) for k, i in enumerate(index)], dim=1)
        b, h, w, _, c2 = upscaled.shape
        masks = hyper_in @ upscaled.view(b, h * w * 16, c2).transpose(1, 2)  # B x T x (h w ky1 kx1 ky2 kx2)
        # Only the T mask channels are put in image order, not the C/8 features; one
        # index_select is several times faster than the 8-d permute with 2-element runs.
        order = _image_order(h, w, str(masks.device))
        return masks.view(-1, h * w * 16).index_select(1, order).view(b, -1, 4 * h, 4 * w)

    def upscale(self, x: torch.Tensor) -> torch.Tensor:
        """The output_upscaling layers on image features B x h x w x C -> B x h x w x 16 x
        C/8: the 4 x 4 output pixels of each feature pixel, ordered (ky1, kx1, ky2, kx2),
        i.e. output pixel (4y + 2 ky1 + ky2, 4x + 2 kx1 + kx2). LayerNorm, GELU and the
        per-pixel matmuls do not care where a pixel sits, so the features are never
        shuffled into image order (a copy of every upscaled feature)."""
        up1, norm, act1, up2, act2 = self.output_upscaling
        x = _activate(act1, F.layer_norm(up1.per_pixel(x[..., None, :]), (norm.weight.shape[0],), norm.weight,
                                         norm.bias, norm.eps))
        b, h, w = x.shape[:3]
        return _activate(act2, up2.per_pixel(x)).view(b, h, w, 16, -1)


def _native(*tensors: torch.Tensor) -> bool:
    """Whether the native kernels (model/score_kernel.py) can take these tensors: float32 on
    the CPU, outside autocast and autograd, with the kernels built."""
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and not torch.is_autocast_enabled("cpu") and not torch.is_grad_enabled()
            and score_kernel.available())


def _activate(activation: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """activation(x), in place on x (a fresh intermediate) where the activation is GELU and
    autograd does not need x: no second per-prompt feature tensor."""
    if type(activation) is nn.GELU and not (torch.is_grad_enabled() and x.requires_grad):
        return torch.ops.aten.gelu_(x, approximate=activation.approximate)
    return activation(x)


@lru_cache(maxsize=16)
def _image_order(h: int, w: int, device: str) -> torch.Tensor:
    """For each pixel of a 4h x 4w mask in row-major order, its index in
    MaskDecoder.upscale's layout (h, w, ky1, kx1, ky2, kx2)."""
    with torch.inference_mode(False):  # cached: usable by autograd even when first made in inference mode
        y, ky1, ky2, x, kx1, kx2 = torch.meshgrid(*(torch.arange(n) for n in (h, 2, 2, w, 2, 2)), indexing="ij")
        return (((y * w + x) * 16 + ky1 * 8 + kx1 * 4 + ky2 * 2 + kx2).reshape(-1)).to(device)


class Scored(NamedTuple):
    """MaskDecoder.score's state of B prompts: tokens after the attention blocks and their
    positional encodings (B x N x C), image keys before the last LayerNorm (B x hw x C),
    the keys' positional encoding (1 x hw x C), the embedding size (h, w), whether the
    native kernels multiplied in bf16 (mask_logits does the same) and the kernels' weights
    where they ran the pass (mask_logits runs on the same, unchecked)."""

    queries: torch.Tensor
    tokens: torch.Tensor
    raw_keys: torch.Tensor
    key_pe: torch.Tensor
    size: tuple[int, int]
    native_bf16: bool = False
    kernel_weights: object = None


class Upsample2x(nn.ConvTranspose2d):
    """A 2x2, stride-2 transposed convolution (same parameters and key names), run as
    one matmul per pixel plus a pixel shuffle: the output windows do not overlap, and
    matmul kernels are many times faster than ConvTranspose2d on CPU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """B x C x h x w -> B x C' x 2h x 2w."""
        b, _, h, w = x.shape
        y = self.per_pixel(x.permute(0, 2, 3, 1)[..., None, :])  # B x h x w x (ky kx) x C'
        return y.view(b, h, w, 2, 2, -1).permute(0, 5, 1, 3, 2, 4).reshape(b, -1, 2 * h, 2 * w)

    def per_pixel(self, x: torch.Tensor) -> torch.Tensor:
        """... x S x C -> ... x 4S x C': each of the S input pixels yields its 2 x 2 output
        block, ordered (ky, kx) after the input's own sub-pixel index."""
        *lead, s, c = x.shape
        out = self.out_channels
        # (in, out, ky, kx) -> in x (ky kx out)
        weight = self.weight.permute(0, 2, 3, 1).reshape(c, 4 * out)
        x, bias = x.reshape(-1, c), self.bias.repeat(4)
        if x.device.type == "cpu" and x.dtype == torch.float32:
            # The bias added in place after the matmul: addmm first copies it, broadcast, into
            # every output row, a slow pass on CPU (~25% of this layer's time). Not in lower
            # precision, where adding it to the rounded product would round twice.
            y = torch.mm(x, weight).add_(bias)
        else:
            y = torch.addmm(bias, x, weight)
        return y.view(*lead, 4 * s, out)
