"""IP-Adapter (SD1.5) image projection: a CLIP image embedding → a few image-prompt tokens.

Parameter names match the ``image_proj`` part of the published ``ip-adapter_sd15.bin``
(``proj.{weight,bias}``, ``norm.{weight,bias}``).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.configuration_utils import register_to_config
from torch import nn

from uniportrait.errors import ConfigError
from uniportrait.models._loading import config_from_dict
from uniportrait.models._mixins import SizedModelMixin

logger = logging.getLogger(__name__)


@dataclass
class ImageProjectionConfig:
    """Sizes of the image projection; defaults match ``ip-adapter_sd15`` (CLIP ViT-H/14 → SD1.5).

    Attributes:
        clip_embed_dim: size of the CLIP image embedding (projection output).
        cross_attention_dim: width of the UNet cross-attention tokens.
        num_tokens: image-prompt tokens produced per image.
    """

    clip_embed_dim: int = 1024
    cross_attention_dim: int = 768
    num_tokens: int = 4

    def __post_init__(self) -> None:
        bad = [k for k, v in self.to_dict().items() if not isinstance(v, int) or v < 1]
        if bad:
            raise ConfigError(f"ImageProjectionConfig: {', '.join(bad)} must be positive integers")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImageProjectionConfig:
        """Build from a dict; unknown keys raise ``ValueError`` naming them."""
        return config_from_dict(cls, d)


class ImageProjection(SizedModelMixin):
    """Linear map of a CLIP image embedding to ``num_tokens`` tokens, then LayerNorm per token."""

    sizes_class = ImageProjectionConfig

    @register_to_config
    def __init__(
        self,
        clip_embed_dim: int = ImageProjectionConfig.clip_embed_dim,
        cross_attention_dim: int = ImageProjectionConfig.cross_attention_dim,
        num_tokens: int = ImageProjectionConfig.num_tokens,
    ) -> None:
        super().__init__()
        self._init_sizes()
        config = self.sizes
        self.proj = nn.Linear(config.clip_embed_dim, config.num_tokens * config.cross_attention_dim)
        self.norm = nn.LayerNorm(config.cross_attention_dim)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """(B, clip_embed_dim) CLIP image embeddings → (B, num_tokens, cross_attention_dim) tokens."""
        cfg = self.sizes
        if image_embeds.ndim != 2 or image_embeds.shape[-1] != cfg.clip_embed_dim:
            raise ConfigError(
                f"image_embeds must be (B, {cfg.clip_embed_dim}), got {tuple(image_embeds.shape)}"
            )
        tokens = self.proj(image_embeds.to(self.proj.weight.dtype))  # (B, N*D)
        tokens = tokens.view(-1, cfg.num_tokens, cfg.cross_attention_dim)  # (B, N, D)
        return self.norm(tokens)  # (B, N, D)
