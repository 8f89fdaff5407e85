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
    def peak_points(heat: torch.Tensor, image_size: int, input_size: tuple[int, int] | None = None) -> torch.Tensor:
        """B x h x w heatmaps -> B x 2 (x, y): the centre of each map's hottest cell, in
        pixels of the model's input frame. input_size (h, w): the image's part of the padded
        frame; cells wholly in the padding are never chosen, and a click is kept on the image."""
        b, h, w = heat.shape
        cell_h, cell_w = image_size / h, image_size / w
        limit = (float(image_size), float(image_size)) if input_size is None else (float(input_size[0]),
                                                                                  float(input_size[1]))
        rows_on = int(math.ceil(limit[0] / cell_h))
        cols_on = int(math.ceil(limit[1] / cell_w))
        if rows_on < h or cols_on < w:
            heat = heat.clone()
            heat[:, rows_on:, :] = float("-inf")
            heat[:, :, cols_on:] = float("-inf")
        index = heat.reshape(b, -1).argmax(dim=1)
        rows, cols = index // w, index % w
        x = ((cols + 0.5) * cell_w).clamp(max=limit[1] - 0.5)
        y = ((rows + 0.5) * cell_h).clamp(max=limit[0] - 0.5)
        return torch.stack([x, y], dim=1).float()
