"""Two-way transformer of the mask decoder: prompt tokens attend to the image
embedding and the image embedding attends back to the tokens."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .common import MLPBlock


class TwoWayTransformer(nn.Module):
    def __init__(
        self,
        depth: int,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int,
        activation: type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(
                embedding_dim, num_heads, mlp_dim, activation, attention_downsample_rate,
                skip_first_layer_pe=(i == 0),
            )
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(
        self, image_embedding: torch.Tensor, image_pe: torch.Tensor, point_embedding: torch.Tensor,
        num_outputs: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """image_embedding, image_pe: B x C x h x w (image_pe may have batch 1);
        point_embedding: B x N x C. Returns tokens B x N x C and image keys B x hw x C.
        num_outputs: return only the first tokens (the decoder's output tokens); the final
        attention then skips the others, which each token's result does not depend on."""
        queries, keys, key_pe = self.blocks(image_embedding, image_pe, point_embedding)
        return self.final(queries[:, :num_outputs], point_embedding[:, :num_outputs], keys, key_pe), keys

    def blocks(self, image_embedding: torch.Tensor, image_pe: torch.Tensor, point_embedding: torch.Tensor,
               normalize_keys: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The attention blocks: tokens B x N x C, image keys B x hw x C and their positional
        encoding 1 x hw x C. normalize_keys=False leaves the last block's LayerNorm of the
        keys to the caller (final_from_unnormalized, norm_keys)."""
        # Tokens-major and contiguous: elementwise ops with the per-prompt B x hw x C
        # tensors of later layers would otherwise take this transposed layout (slow
        # strided loops, and a copy before every LayerNorm).
        keys = image_embedding.flatten(2).transpose(1, 2).contiguous()
        key_pe = image_pe.flatten(2).transpose(1, 2).contiguous()
        queries = point_embedding
        for i, layer in enumerate(self.layers):
            last = i == len(self.layers) - 1
            queries, keys = layer(queries, keys, point_embedding, key_pe, normalize_keys=normalize_keys or not last)
        return queries, keys, key_pe

    def final(self, queries: torch.Tensor, query_pe: torch.Tensor, keys: torch.Tensor, key_pe: torch.Tensor
              ) -> torch.Tensor:
        """The final token -> image attention and LayerNorm of the given tokens (each token's
        result depends on itself and the image keys only)."""
        attn_out = self.final_attn_token_to_image(queries + query_pe, keys + key_pe, keys)
        return self.norm_final_attn(queries + attn_out)

    def norm_keys(self, keys: torch.Tensor) -> torch.Tensor:
        """The last block's LayerNorm of keys that blocks(normalize_keys=False) left out."""
        return self.layers[-1].norm4(keys)

    @torch.no_grad()
    def final_from_unnormalized(self, queries: torch.Tensor, query_pe: torch.Tensor, raw_keys: torch.Tensor,
                                key_pe: torch.Tensor) -> torch.Tensor:
        """final() of a few tokens, from the keys before the last block's LayerNorm: the
        same function up to float rounding, without forming the normalized keys or keys +
        positional encoding (two passes less over B x hw x C, and a pass of LayerNorm's
        statistics instead of LayerNorm itself)."""
        attn_out = self.final_attn_token_to_image.few_queries_normalized(
            queries + query_pe, raw_keys, self.layers[-1].norm4, key_pe)
        return self.norm_final_attn(queries + attn_out)


class TwoWayAttentionBlock(nn.Module):
    """(1) self-attention of tokens, (2) tokens -> image cross-attention, (3) token MLP,
    (4) image -> tokens cross-attention; each followed by a residual and LayerNorm."""

    def __init__(
        self, embedding_dim: int, num_heads: int, mlp_dim: int,
        activation: type[nn.Module], attention_downsample_rate: int, skip_first_layer_pe: bool,
    ) -> None:
        super().__init__()
        self.self_attn = Attention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, activation)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(
        self, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor, key_pe: torch.Tensor,
        normalize_keys: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)

        k = keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(queries + query_pe, k, keys))
        queries = self.norm3(queries + self.mlp(queries))

        q = queries + query_pe
        keys = self.cross_attn_image_to_token(k, q, queries, residual=keys)
        return queries, self.norm4(keys) if normalize_keys else keys


class Attention(nn.Module):
    """Multi-head attention whose q/k/v projections may shrink the width by
    downsample_rate (cheaper attention over the 4096 image tokens).

    Without autograd, attention between a few prompt tokens and many image tokens
    takes a folded path (_few_queries, _few_keys): the per-head projections on the
    image side are multiplied into the few token vectors instead of being applied to
    every image token. Same function up to float rounding, fewer multiply-adds when
    tokens x heads < internal_dim; training keeps the plain path."""

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        self.internal_dim = embedding_dim // downsample_rate
        if self.internal_dim % num_heads:
            raise ValueError("num_heads must divide embedding_dim / downsample_rate")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape  # -> B x heads x N x C/heads
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def _folds(self, few: int) -> bool:
        """Folding costs tokens x heads x C per image token where the plain path costs
        internal_dim x C (one projection)."""
        return not torch.is_grad_enabled() and few * self.num_heads < self.internal_dim

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor:
        """q: Bq x Nq x C, k and v: Bk x Nk x C, where a batch of 1 on either side is
        shared by every item of the other (the image side of many prompts). residual
        (broadcastable to the output) is added to the output."""
        bq, nq, _ = q.shape
        bk, nk, _ = k.shape
        if nq < nk and bq == bk and self._folds(nq):
            out = self._few_queries(q, k, v)
            return out if residual is None else residual + out
        if nk < nq and bk >= bq and self._folds(nk):
            return self._few_keys(q, k, v, residual)
        q = self._heads(self.q_proj(q))
        k = self._heads(self.k_proj(k))
        v = self._heads(self.v_proj(v))
        if bk == 1 and bq > 1:
            # Shared keys: every query attends independently, so the batch folds into
            # the query length and one attention call serves all prompts.
            q = q.transpose(0, 1).reshape(1, self.num_heads, bq * nq, -1)
            out = _attention(q, k, v)
            out = out.reshape(self.num_heads, bq, nq, -1).permute(1, 2, 0, 3)
        else:
            if bq == 1 and bk > 1:
                q = q.expand(bk, -1, -1, -1)
            out = _attention(q, k, v).transpose(1, 2)
        out = self.out_proj(out.reshape(out.shape[0], nq, self.internal_dim))
        return out if residual is None else residual + out

    def _few_queries(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Tokens (B x T x C) attending to per-item image tokens (B x N x C), without
        k_proj/v_proj on the N image tokens. Per head h, with Wk_h the head's d x C
        slice of k_proj:
          scores = q_h (Wk_h K^T + bk_h) = (q_h Wk_h) K^T + a constant per query row,
                   which softmax ignores;
          out_h  = P (V Wv_h^T + bv_h) = (P V) Wv_h^T + bv_h, since P's rows sum to 1."""
        weights = _softmax(self._fold_queries(q) @ k.transpose(1, 2), dim=-1)
        return self._unfold_pooled(weights @ v, q.shape[1])

    def _fold_queries(self, q: torch.Tensor) -> torch.Tensor:
        """Tokens B x T x C -> their scaled per-head queries multiplied into k_proj's head
        slices, B x T*heads x C: one row per (token, head) to dot with image tokens."""
        b, nq, c = q.shape
        heads, d = self.num_heads, self.internal_dim // self.num_heads
        qh = self.q_proj(q).view(b, nq, heads, d) * d**-0.5
        return torch.einsum("bthd,hdc->bthc", qh, self.k_proj.weight.view(heads, d, c)).reshape(b, nq * heads, c)

    def _unfold_pooled(self, pooled: torch.Tensor, nq: int) -> torch.Tensor:
        """Image tokens pooled per (token, head), B x T*heads x C -> the attention's output
        B x T x C (v_proj's head slices, its bias, out_proj)."""
        b, _, c = pooled.shape
        heads, d = self.num_heads, self.internal_dim // self.num_heads
        out = torch.einsum("bthc,hdc->bthd", pooled.view(b, nq, heads, c), self.v_proj.weight.view(heads, d, c))
        return self.out_proj(out.reshape(b, nq, self.internal_dim) + self.v_proj.bias)

    def few_queries_normalized(self, q: torch.Tensor, raw: torch.Tensor, norm: nn.LayerNorm, pe: torch.Tensor
                               ) -> torch.Tensor:
        """The folded attention of a few tokens q (B x T x C) to keys norm(raw) + pe and values
        norm(raw) (raw: B x N x C, pe: 1 x N x C), without forming either. With mu, s the
        rows' mean and 1 / std, g, b the LayerNorm's weight and bias, and F a folded query row
        (see _few_queries):
          F . (norm(raw_n) + pe_n) = s_n (F g . raw_n - mu_n F . g) + F . pe_n + F . b, where
                                     the last term is the same for every n (softmax drops it);
          P norm(raw) = ((P s) raw - P (s mu)) g + b, since P's rows sum to 1."""
        c = raw.shape[-1]
        # Row statistics in two fast reductions (torch.var_mean's Welford loop is ~30x slower
        # on CPU); the residual stream's rows are near zero-mean, so E[x^2] - mean^2 loses
        # nothing that matters at LayerNorm's eps.
        mean = raw.mean(-1)  # B x N
        var = (torch.linalg.vector_norm(raw, dim=-1).square() / c - mean.square()).clamp_min(0)
        scale = torch.rsqrt(var + norm.eps)
        folded = self._fold_queries(q)
        gained = folded * norm.weight
        scores = gained @ raw.transpose(1, 2)  # B x T*heads x N
        scores = (scores - gained.sum(2, keepdim=True) * mean[:, None, :]) * scale[:, None, :]
        scores += (folded.reshape(-1, c) @ pe[0].T).view(scores.shape)
        weights = _softmax(scores, dim=-1)
        scaled = weights * scale[:, None, :]
        pooled = (scaled @ raw - (scaled @ mean[:, :, None])) * norm.weight + norm.bias  # B x T*heads x C
        return self._unfold_pooled(pooled, q.shape[1])

    def _few_keys(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, residual: torch.Tensor | None
    ) -> torch.Tensor:
        """Image tokens (B x N x C, or 1 x N x C shared) attending to a few tokens
        (B x T x C), without out_proj (nor, per item, q_proj) on the N image tokens.
        Per head h, with Wq_h, Wo_h the head's slices of q_proj and out_proj:
          scores = (Q Wq_h^T + bq_h) k_h^T = Q (Wq_h^T k_h^T) + bq_h k_h^T;
          out    = sum_h P_h (v_h Wo_h^T) + bo, where bo can ride on the values as
                   bo / heads per head, since each P_h's rows sum to 1.
        Scores are laid out B x heads x T x N so that softmax runs over T (a handful)
        with N contiguous: the short-last-dim softmax is several times slower."""
        bq, n, c = q.shape
        b, nk, _ = k.shape
        heads, d = self.num_heads, self.internal_dim // self.num_heads
        kh = self.k_proj(k).view(b, nk, heads, d) * d**-0.5
        if bq == 1 and b > 1:
            # Shared image side: project it once, as the plain path does.
            qh = self.q_proj(q[0]).view(n, heads, d)
            scores = torch.einsum("bthd,nhd->bhtn", kh, qh)
        else:
            folded = torch.einsum("bthd,hdc->bhtc", kh, self.q_proj.weight.view(heads, d, c))
            bias = torch.einsum("bthd,hd->bht", kh, self.q_proj.bias.view(heads, d))
            scores = torch.baddbmm(bias.reshape(b, heads * nk, 1), folded.reshape(b, heads * nk, c),
                                   q.transpose(1, 2))
        weights = _softmax(scores.reshape(b, heads, nk, n), dim=2)
        vh = self.v_proj(v).view(b, nk, heads, d)
        values = torch.einsum("bthd,chd->bhtc", vh, self.out_proj.weight.view(c, heads, d))
        values = values + self.out_proj.bias / heads
        weights = weights.view(b, heads * nk, n).transpose(1, 2)
        values = values.reshape(b, heads * nk, c)
        out = weights @ values
        if residual is None:
            return out
        if out.dtype != residual.dtype:  # autocast: add in the residual's precision
            return residual + out
        # In place on the fresh product: baddbmm with a residual broadcast over the batch
        # (the shared image side of the first layer) runs ~2x slower than both together.
        return out.add_(residual)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention. With only a few keys (the prompt tokens) two small matmuls beat
    the fused kernel, whose tiling is made for long key sequences."""
    if k.shape[-2] <= 32:
        weights = torch.softmax((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5, dim=-1)
        return weights @ v
    return F.scaled_dot_product_attention(q, k, v)


# The smallest normal float32. Below it, CPU multiplies take a microcode path many times
# slower (denormals), unless the thread flushes them (torch.set_flush_denormal, which
# reaches only the calling thread, not the matmul kernels' worker threads).
_FLT_MIN = torch.finfo(torch.float32).tiny


def _softmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Softmax for the folded (inference) attention paths, with weights below the smallest
    normal float set to zero. Attention over hundreds of image tokens is peaked: a few per
    cent of its weights were denormal, and the matmul that pools values with them ran ~10x
    slower (7.6 ms instead of 0.8 for 64 prompts). A weight under 1.2e-38 times a value adds
    nothing a float32 sum of the others can hold, so the outputs keep their bits."""
    weights = torch.softmax(x, dim=dim)
    if weights.dtype == torch.float32 and weights.device.type == "cpu":
        weights = torch.nn.functional.threshold_(weights, _FLT_MIN, 0.0)
    return weights
