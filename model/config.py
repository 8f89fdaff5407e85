"""Model configurations: the three official sizes and small ones for CPU.

A config is plain data (pydantic) so it can be stored inside a checkpoint and read back."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


class SamConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "custom"
    image_size: int = Field(1024, gt=0)
    patch_size: int = Field(16, gt=0)
    encoder_embed_dim: int = Field(768, gt=0)
    encoder_depth: int = Field(12, gt=0)
    encoder_num_heads: int = Field(12, gt=0)
    encoder_global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    window_size: int = Field(14, ge=0)
    mlp_ratio: float = Field(4.0, gt=0)
    prompt_embed_dim: int = Field(256, gt=0)
    mask_in_chans: int = Field(16, gt=0)
    decoder_depth: int = Field(2, gt=0)
    decoder_num_heads: int = Field(8, gt=0)
    decoder_mlp_dim: int = Field(2048, gt=0)
    num_multimask_outputs: int = Field(3, gt=0)
    iou_head_depth: int = Field(3, gt=0)
    iou_head_hidden_dim: int = Field(256, gt=0)
    text_embed_dim: int = Field(0, ge=0, description="0 disables the text prompt input")
    text_embedder: str = Field("", description="the embedder (model.text.load_embedder name) the text input "
                                               "was trained with")
    pixel_mean: tuple[float, float, float] = PIXEL_MEAN
    pixel_std: tuple[float, float, float] = PIXEL_STD

    @model_validator(mode="after")
    def _check(self) -> "SamConfig":
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} must be divisible by patch_size {self.patch_size}")
        if self.encoder_embed_dim % self.encoder_num_heads:
            raise ValueError("encoder_num_heads must divide encoder_embed_dim")
        if any(not 0 <= i < self.encoder_depth for i in self.encoder_global_attn_indexes):
            raise ValueError("encoder_global_attn_indexes must lie in [0, encoder_depth)")
        if self.text_embedder and not self.text_embed_dim:
            raise ValueError("text_embedder is set but text_embed_dim is 0")
        if self.prompt_embed_dim % 8 or (self.prompt_embed_dim // 2) % self.decoder_num_heads:
            raise ValueError("prompt_embed_dim must be a multiple of 8 and of 2 * decoder_num_heads")
        return self

    @property
    def takes_text(self) -> bool:
        """The model has a text input and names the embedder it was trained with."""
        return self.text_embed_dim > 0 and bool(self.text_embedder)

    @property
    def embedding_size(self) -> int:
        """Side of the square image embedding grid."""
        return self.image_size // self.patch_size


_OFFICIAL = dict(image_size=1024, patch_size=16, window_size=14, prompt_embed_dim=256)

CONFIGS: dict[str, SamConfig] = {
    "vit_b": SamConfig(name="vit_b", encoder_embed_dim=768, encoder_depth=12, encoder_num_heads=12,
                       encoder_global_attn_indexes=(2, 5, 8, 11), **_OFFICIAL),
    "vit_l": SamConfig(name="vit_l", encoder_embed_dim=1024, encoder_depth=24, encoder_num_heads=16,
                       encoder_global_attn_indexes=(5, 11, 17, 23), **_OFFICIAL),
    "vit_h": SamConfig(name="vit_h", encoder_embed_dim=1280, encoder_depth=32, encoder_num_heads=16,
                       encoder_global_attn_indexes=(7, 15, 23, 31), **_OFFICIAL),
    # Small models for CPU training and shipping. The decoder keeps the official
    # structure at a narrower width; the encoder is a few million parameters.
    "vit_t": SamConfig(name="vit_t", image_size=512, patch_size=16, encoder_embed_dim=192,
                       encoder_depth=6, encoder_num_heads=3, encoder_global_attn_indexes=(2, 5),
                       window_size=8, prompt_embed_dim=128, decoder_mlp_dim=512,
                       decoder_num_heads=4, iou_head_hidden_dim=128),
    "vit_tiny256": SamConfig(name="vit_tiny256", image_size=256, patch_size=16, encoder_embed_dim=128,
                             encoder_depth=4, encoder_num_heads=4, encoder_global_attn_indexes=(1, 3),
                             window_size=8, prompt_embed_dim=128, decoder_mlp_dim=512,
                             decoder_num_heads=4, iou_head_hidden_dim=128),
}


def get_config(name: str) -> SamConfig:
    try:
        return CONFIGS[name]
    except KeyError:
        raise ValueError(f"unknown model type {name!r}; choose one of {sorted(CONFIGS)}") from None
