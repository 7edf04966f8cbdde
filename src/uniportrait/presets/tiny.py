"""Offline "tiny" base components shaped like Stable Diffusion 1.5, with random weights.

Every test and the offline demo build their pipelines from :func:`build_tiny_base`. The pieces
have the same structure as SD-1.5 + a CLIP ViT-H/14 image encoder (cross-attention UNet with 4
latent channels, an 8x-downsampling KL VAE, a CLIP text encoder with 77 positions, a CLIP
vision tower with 16x16 patch tokens + CLS at 224 px, the published DDIM schedule) but only a
few thousand parameters per layer, so everything builds in well under a second on a CPU and a
256x256 generation takes a fraction of a second per step.

Weights are deterministic for a seed and building never touches the caller's global RNG.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, UNet2DConditionModel
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

__all__ = [
    "TINY_TOKENIZER_PATH",
    "TinyBaseConfig",
    "build_tiny_base",
    "build_tiny_controlnet",
    "load_tiny_tokenizer",
]

#: The CLIP BPE tokenizer fixture (see ``assets/tiny_tokenizer/README.md``).
TINY_TOKENIZER_PATH = Path(__file__).resolve().parent.parent / "assets" / "tiny_tokenizer"


@dataclass
class TinyBaseConfig:
    """Sizes of the tiny SD-1.5-shaped components."""

    # UNet (sample_size 32 latents -> 256x256 images through the 8x VAE)
    unet_block_out_channels: tuple[int, ...] = (32, 64)
    unet_down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    unet_up_block_types: tuple[str, ...] = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    unet_layers_per_block: int = 1
    unet_attention_head_dim: int = 8  # diffusers' legacy name: number of heads, as in SD-1.5's config
    unet_norm_num_groups: int = 32
    sample_size: int = 32
    cross_attention_dim: int = 32  # == text_hidden_size
    # VAE: 4 levels -> vae_scale_factor 8
    vae_block_out_channels: tuple[int, ...] = (8, 16, 32, 32)
    vae_layers_per_block: int = 1
    vae_norm_num_groups: int = 8
    latent_channels: int = 4
    vae_scaling_factor: float = 0.18215
    # CLIP text encoder
    text_hidden_size: int = 32
    text_intermediate_size: int = 64
    text_num_hidden_layers: int = 2
    text_num_attention_heads: int = 4
    text_max_position_embeddings: int = 77
    # CLIP vision tower (ViT-H/14 geometry at 224 px: 16x16 patches + CLS)
    image_size: int = 224
    patch_size: int = 14
    vision_hidden_size: int = 32
    vision_intermediate_size: int = 64
    vision_num_hidden_layers: int = 2
    vision_num_attention_heads: int = 4
    vision_projection_dim: int = 16
    # ControlNet: 4 levels (3 stride-2 convs) so that the 256 px condition lands on 32x32 latents
    controlnet_conditioning_embedding_out_channels: tuple[int, ...] = (8, 8, 16, 16)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae_block_out_channels) - 1)

    @property
    def image_resolution(self) -> int:
        """Default generated image size (pixels)."""
        return self.sample_size * self.vae_scale_factor


def load_tiny_tokenizer() -> CLIPTokenizer:
    """The fixture tokenizer, loaded from local files only."""
    return CLIPTokenizer.from_pretrained(str(TINY_TOKENIZER_PATH), local_files_only=True)


def published_ddim_scheduler() -> DDIMScheduler:
    """DDIM as published with SD1.5 and UniPortrait: scaled-linear betas 0.00085–0.012, no clipping, steps_offset 1."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def _make_unet(cfg: TinyBaseConfig) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=cfg.sample_size,
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        down_block_types=tuple(cfg.unet_down_block_types),
        up_block_types=tuple(cfg.unet_up_block_types),
        block_out_channels=tuple(cfg.unet_block_out_channels),
        layers_per_block=cfg.unet_layers_per_block,
        norm_num_groups=cfg.unet_norm_num_groups,
        cross_attention_dim=cfg.cross_attention_dim,
        attention_head_dim=cfg.unet_attention_head_dim,
        flip_sin_to_cos=True,
        freq_shift=0,
        act_fn="silu",
    )


def _make_vae(cfg: TinyBaseConfig) -> AutoencoderKL:
    n = len(cfg.vae_block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.vae_block_out_channels),
        layers_per_block=cfg.vae_layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.vae_norm_num_groups,
        sample_size=cfg.image_resolution,
        scaling_factor=cfg.vae_scaling_factor,
    )


def _make_text_encoder(cfg: TinyBaseConfig, tokenizer: CLIPTokenizer) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.text_hidden_size,
        intermediate_size=cfg.text_intermediate_size,
        num_hidden_layers=cfg.text_num_hidden_layers,
        num_attention_heads=cfg.text_num_attention_heads,
        max_position_embeddings=cfg.text_max_position_embeddings,
        hidden_act="quick_gelu",
        projection_dim=cfg.text_hidden_size,
        # Pooling takes the first eos position (eos id != 2), consistent with the fixture.
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def _make_image_encoder(cfg: TinyBaseConfig) -> CLIPVisionModelWithProjection:
    config = CLIPVisionConfig(
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        hidden_size=cfg.vision_hidden_size,
        intermediate_size=cfg.vision_intermediate_size,
        num_hidden_layers=cfg.vision_num_hidden_layers,
        num_attention_heads=cfg.vision_num_attention_heads,
        projection_dim=cfg.vision_projection_dim,
        hidden_act="gelu",
    )
    return CLIPVisionModelWithProjection(config)


def _finalize(module: torch.nn.Module) -> torch.nn.Module:
    # .float() rather than .to(dtype): diffusers warns on dtype casts through ModelMixin.to().
    return module.float().eval()


def build_tiny_base(seed: int = 0, config: TinyBaseConfig | None = None) -> dict:
    """Build the tiny SD-1.5-shaped components with random weights determined by ``seed``.

    Returns a dict with keys ``unet``, ``vae``, ``text_encoder``, ``tokenizer``, ``scheduler`` and
    ``image_encoder``; all models are fp32 on CPU in eval mode. The global torch RNG state of the
    caller is left unchanged.
    """
    cfg = config if config is not None else TinyBaseConfig()
    tokenizer = load_tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = _make_unet(cfg)
        vae = _make_vae(cfg)
        text_encoder = _make_text_encoder(cfg, tokenizer)
        image_encoder = _make_image_encoder(cfg)
    return {
        "unet": _finalize(unet),
        "vae": _finalize(vae),
        "text_encoder": _finalize(text_encoder),
        "tokenizer": tokenizer,
        "scheduler": published_ddim_scheduler(),
        "image_encoder": _finalize(image_encoder),
    }


def build_tiny_controlnet(
    unet: UNet2DConditionModel,
    seed: int = 0,
    conditioning_embedding_out_channels: tuple[
        int, ...
    ] = TinyBaseConfig.controlnet_conditioning_embedding_out_channels,
    zero_conv_std: float = 0.05,
) -> ControlNetModel:
    """A small random :class:`~diffusers.ControlNetModel` matching ``unet``.

    The encoder copies the UNet's weights (``ControlNetModel.from_unet``); the zero-initialised
    convolutions (conditioning-embedding output, per-block and mid-block residual convs) are then
    filled with small Gaussian values so the ControlNet actually changes the UNet's output. The
    global torch RNG state is left unchanged.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        controlnet = ControlNetModel.from_unet(
            unet,
            conditioning_embedding_out_channels=tuple(conditioning_embedding_out_channels),
            load_weights_from_unet=True,
        )
        zero_convs = [
            controlnet.controlnet_cond_embedding.conv_out,
            *controlnet.controlnet_down_blocks,
            controlnet.controlnet_mid_block,
        ]
        with torch.no_grad():
            for conv in zero_convs:
                conv.weight.normal_(0.0, zero_conv_std)
                if conv.bias is not None:
                    conv.bias.normal_(0.0, zero_conv_std)
    return _finalize(controlnet)
