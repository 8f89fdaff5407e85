"""ViT image encoder: patch embedding, windowed + global attention with decomposed
relative position bias, and a conv neck down to the prompt embedding width."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .common import LayerNorm2d, MLPBlock


class ImageEncoderViT(nn.Module):
    def __init__(
        self,
        *,
        img_size: int = 1024,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 256,
        qkv_bias: bool = True,
        window_size: int = 14,
        global_attn_indexes: tuple[int, ...] = (),
    ) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
        self.img_size = img_size
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        # 1 x H/p x W/p x C, learned absolute position embedding
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dim))
        self.blocks = nn.ModuleList(
            Block(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                window_size=0 if i in global_attn_indexes else window_size,
                input_size=(grid, grid),
            )
            for i in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """B x 3 x S x S normalized image -> B x out_chans x S/p x S/p embedding."""
        x = self.patch_embed(x) + self.pos_embed  # B x H x W x C
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 3, 1, 2))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)  # B x H x W x C


class Block(nn.Module):
    """Pre-norm transformer block; attention is windowed when window_size > 0."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool,
        window_size: int, input_size: tuple[int, int],
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        attn_size = (window_size, window_size) if window_size > 0 else input_size
        self.attn = Attention(dim, num_heads, qkv_bias, attn_size)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), nn.GELU)
        self.window_size = window_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            h, w = x.shape[1:3]
            windows, padded = window_partition(x, self.window_size)
            x = window_unpartition(self.attn(windows), self.window_size, padded, (h, w))
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class Attention(nn.Module):
    """Multi-head self-attention over a B x H x W x C grid with decomposed relative
    position bias (separate height and width tables), computed with SDPA."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, input_size: tuple[int, int]) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        # 3 x B x heads x HW x head_dim
        q, k, v = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        bias = rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, (h, w))
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(x.transpose(1, 2).reshape(b, h, w, c))


def rel_pos_bias(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """Decomposed relative position bias (MViTv2): B x heads x HW x HW, from the
    unscaled queries and one table per axis. Query and key grids have the same size."""
    h, w = size
    b, heads, _, d = q.shape
    table_h = rel_pos_table(h, rel_pos_h)  # h x h x d
    table_w = rel_pos_table(w, rel_pos_w)  # w x w x d
    r_q = q.reshape(b, heads, h, w, d)
    bias_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, table_h)
    bias_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, table_w)
    bias = bias_h[..., :, None] + bias_w[..., None, :]  # B x n x h x w x h x w
    return bias.reshape(b, heads, h * w, h * w)


def rel_pos_table(size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """size x size x d table of embeddings for offsets q - k, resampled linearly when
    the stored table was trained for another grid size."""
    length = 2 * size - 1
    if rel_pos.shape[0] != length:
        rel_pos = resample_rel_pos(rel_pos, length)
    coords = torch.arange(size, device=rel_pos.device)
    return rel_pos[coords[:, None] - coords[None, :] + (size - 1)]


def resample_rel_pos(rel_pos: torch.Tensor, length: int) -> torch.Tensor:
    """A relative-position table (offsets x d) resampled linearly to `length` offsets."""
    return F.interpolate(rel_pos.t()[None], size=length, mode="linear")[0].t()


def window_partition(x: torch.Tensor, window: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """B x H x W x C -> (B * nW) x window x window x C, zero-padding H and W up to a
    multiple of the window. Returns the windows and the padded size."""
    b, h, w, c = x.shape
    pad_h, pad_w = (window - h % window) % window, (window - w % window) % window
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // window, window, wp // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window, window, c), (hp, wp)


def window_unpartition(
    windows: torch.Tensor, window: int, padded: tuple[int, int], size: tuple[int, int]
) -> torch.Tensor:
    """Inverse of window_partition, cropping the padding away."""
    hp, wp = padded
    h, w = size
    b = windows.shape[0] // ((hp // window) * (wp // window))
    x = windows.view(b, hp // window, wp // window, window, window, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
    return x[:, :h, :w, :].contiguous()
