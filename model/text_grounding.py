"""Text grounding: where in the image do the words point?

A text embedding (model.text) becomes a query vector; the image embedding, through a small
convolutional head (once per image), becomes a key per embedding cell; their scaled dot
product is a heatmap over the e x e grid. The hottest cell's centre is then an ordinary positive click for the
decoder, so a phrase is answered by the same point-prompted decoder that answers clicks
(the model's point behaviour is untouched by the text path).
"""
from __future__ import annotations

import math

import torch
from torch import nn


class TextGrounding(nn.Module):
    def __init__(self, text_dim: int, embed_dim: int) -> None:
        super().__init__()
        hidden = max(32, embed_dim // 2)
        self.query = nn.Sequential(nn.Linear(text_dim, embed_dim), nn.GELU(), nn.Linear(embed_dim, embed_dim))
        # 3x3 in the middle: a cell's key sees its neighbours (shape, not only colour).
        self.keys = nn.Sequential(
            nn.Conv2d(embed_dim, hidden, 1), nn.GELU(),
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.GELU(),
            nn.Conv2d(hidden, embed_dim, 1),
        )

    def forward(self, image_embeddings: torch.Tensor, text: torch.Tensor,
                image_index: torch.Tensor | None = None) -> torch.Tensor:
        """image_embeddings N x C x h x w, text B x D -> B x h x w logits of the phrase's
        object being at each cell. Text b looks at image image_index[b]; by default image 0
        when N = 1 (one image, many phrases), else image b."""
        keys = self.keys(image_embeddings)  # once per image, whatever the number of phrases
        query = self.query(text.to(keys.dtype))
        if image_index is None:
            image_index = torch.zeros(len(query), dtype=torch.int64) if len(keys) == 1 else torch.arange(len(query))
        scale = 1.0 / math.sqrt(keys.shape[1])
        return torch.einsum("bc,bchw->bhw", query, keys[image_index.to(keys.device)]) * scale

    @staticmethod
    def peak_points(heat: torch.Tensor, image_size: int) -> torch.Tensor:
        """B x h x w heatmaps -> B x 2 (x, y): the centre of each map's hottest cell, in
        pixels of the model's input frame."""
        b, h, w = heat.shape
        index = heat.reshape(b, -1).argmax(dim=1)
        rows, cols = index // w, index % w
        return torch.stack([(cols + 0.5) * (image_size / w), (rows + 0.5) * (image_size / h)], dim=1).float()
