"""The SAM network: image encoder + prompt encoder + mask decoder, with the image
pre-processing (normalize, pad) and mask post-processing (upscale, crop) around them."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .config import SamConfig
from .image_encoder import ImageEncoderViT
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder
from .text_grounding import TextGrounding
from .transformer import TwoWayTransformer


class Sam(nn.Module):
    mask_threshold: float = 0.0
    image_format: str = "RGB"

    def __init__(self, config: SamConfig) -> None:
        super().__init__()
        self.config = config
        e = config.embedding_size
        self.image_encoder = ImageEncoderViT(
            img_size=config.image_size,
            patch_size=config.patch_size,
            embed_dim=config.encoder_embed_dim,
            depth=config.encoder_depth,
            num_heads=config.encoder_num_heads,
            mlp_ratio=config.mlp_ratio,
            out_chans=config.prompt_embed_dim,
            window_size=config.window_size,
            global_attn_indexes=config.encoder_global_attn_indexes,
        )
        self.prompt_encoder = PromptEncoder(
            embed_dim=config.prompt_embed_dim,
            image_embedding_size=(e, e),
            input_image_size=(config.image_size, config.image_size),
            mask_in_chans=config.mask_in_chans,
        )
        # Only models with a text input have it, so official checkpoints load strictly.
        self.text_grounding = (TextGrounding(config.text_embed_dim, config.prompt_embed_dim)
                               if config.text_embed_dim > 0 else None)
        self.mask_decoder = MaskDecoder(
            transformer_dim=config.prompt_embed_dim,
            transformer=TwoWayTransformer(
                depth=config.decoder_depth,
                embedding_dim=config.prompt_embed_dim,
                num_heads=config.decoder_num_heads,
                mlp_dim=config.decoder_mlp_dim,
            ),
            num_multimask_outputs=config.num_multimask_outputs,
            iou_head_depth=config.iou_head_depth,
            iou_head_hidden_dim=config.iou_head_hidden_dim,
        )
        self.register_buffer("pixel_mean", torch.tensor(config.pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(config.pixel_std).view(-1, 1, 1), False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def image_size(self) -> int:
        return self.config.image_size

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """B x 3 x h x w RGB (0-255, longest side already resized) -> normalized and
        zero-padded bottom/right to B x 3 x S x S."""
        x = (x - self.pixel_mean) / self.pixel_std
        h, w = x.shape[-2:]
        return F.pad(x, (0, self.image_size - w, 0, self.image_size - h))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Resized RGB images B x 3 x h x w -> image embeddings B x C x e x e."""
        return self.image_encoder(self.preprocess(images))

    def decode(
        self,
        image_embeddings: torch.Tensor,
        point_coords: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        text_embedding: torch.Tensor | None = None,
        multimask_output: bool = True,
        input_size: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts in input-frame pixel coordinates for one image embedding (1 x C x e x e)
        or one per prompt (B x C x e x e) -> low-res logits B x M x 4e x 4e, IoU B x M.
        A text embedding (B x D) adds the click its grounding heatmap points at, inside
        input_size (h, w: the resized image within the padded frame; default the frame)."""
        if text_embedding is not None:
            point_coords, point_labels = self.text_click(image_embeddings, text_embedding, point_coords, point_labels,
                                                         input_size)
        points = (point_coords, point_labels) if point_coords is not None else None
        sparse, dense = self.prompt_encoder(points, boxes, mask_input)
        return self.mask_decoder(
            image_embeddings, self.prompt_encoder.get_dense_pe(), sparse, dense, multimask_output
        )

    def text_click(self, image_embeddings: torch.Tensor, text_embedding: torch.Tensor,
                   point_coords: torch.Tensor | None = None, point_labels: torch.Tensor | None = None,
                   input_size: tuple[int, int] | None = None):
        """The point prompts with, for each text, a positive click at the centre of the
        grounding heatmap's hottest cell on the image (never in the padding) appended."""
        if self.text_grounding is None:
            raise ValueError("this model has no text prompt input (text_embed_dim = 0)")
        heat = self.text_grounding(image_embeddings, text_embedding)
        click = TextGrounding.peak_points(heat, self.image_size, input_size)[:, None].to(image_embeddings.device)
        label = torch.ones(click.shape[0], 1, dtype=torch.int64, device=click.device)
        if point_coords is None:
            return click, label
        return torch.cat([point_coords.to(click.dtype), click], 1), torch.cat([point_labels, label], 1)

    def postprocess_masks(
        self, masks: torch.Tensor, input_size: tuple[int, int], original_size: tuple[int, int]
    ) -> torch.Tensor:
        """Low-res logits B x M x 4e x 4e -> logits at the original image size: upscale to
        the padded input frame, crop the padding, resize to the original size."""
        masks = F.interpolate(masks, (self.image_size, self.image_size), mode="bilinear", align_corners=False)
        masks = masks[..., : input_size[0], : input_size[1]]
        return F.interpolate(masks, tuple(original_size), mode="bilinear", align_corners=False)
