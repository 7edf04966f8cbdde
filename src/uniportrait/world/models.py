"""Shapes of the world's pretrained parts, each the architecture of its real counterpart.

SD1.5 stands on a KL VAE, a CLIP text encoder + tokenizer, a text-conditioned UNet and DDIM;
UniPortrait adds a CLIP vision tower and an IR face-recognition backbone. The world's versions
are the same classes (diffusers ``AutoencoderKL``/``UNet2DConditionModel``, transformers
``CLIPTextModel``/``CLIPVisionModelWithProjection``, our ``IRBackbone``), small enough to train on
two CPU cores, and saved in the same formats, so they load through exactly the code paths real
weights use.
"""

from __future__ import annotations

from dataclasses import dataclass

from uniportrait.world.scenes import SIZES


@dataclass(frozen=True)
class WorldSizes:
    """Sizes of the world's base components."""

    # VAE: 3 levels → 4× downsampling: a 64 px picture is a 16×16×4 latent
    vae_block_out_channels: tuple[int, ...] = (16, 32, 64)
    vae_norm_num_groups: int = 8
    latent_channels: int = 4
    # text encoder (CLIP) and vision tower (CLIP ViT: 64 px, 4 px patches → 16×16 = 256 patch
    # tokens, the face-structure grid UniPortrait expects)
    text_hidden_size: int = 128
    text_layers: int = 3
    text_heads: int = 4
    vision_image_size: int = 64
    vision_patch_size: int = 4
    vision_hidden_size: int = 96
    vision_layers: int = 3
    vision_heads: int = 4
    projection_dim: int = 128
    # UNet on 16×16 latents (64 px), 32×16 for 128×64 groups
    unet_block_out_channels: tuple[int, ...] = (64, 96, 128)
    unet_layers_per_block: int = 1
    unet_head_dim: int = 32
    # the first levels can go without attention (as SDXL's first level does): on a larger latent
    # they add detail at the cost of convolutions only
    unet_levels_without_attention: int = 0
    # face-recognition backbone (IR layout, 64 px aligned faces → 4×4 intrinsic tokens)
    backbone_blocks: tuple[int, ...] = (1, 2, 2, 1)
    backbone_channels: tuple[int, ...] = (32, 48, 64, 128)
    backbone_input_size: int = 64
    backbone_embedding_dim: int = 128


#: Named sizes of the world's base (``uniportrait world build --layout``). "4x": the shipped base
#: (a 3-level VAE, 16×16×4 latents for a 64 px portrait). "2x": a 2-level VAE (32×32×4 latents, so a
#: face is about 11 × 14 latent pixels instead of 5.5 × 7) and a UNet with a 48-channel first level
#: without attention in front of the shipped UNet's three (docs/world.md).
WORLD_LAYOUTS: dict[str, WorldSizes] = {
    "4x": WorldSizes(),
    "2x": WorldSizes(
        vae_block_out_channels=(32, 64),
        unet_block_out_channels=(48, 64, 96, 128),
        unet_levels_without_attention=1,
    ),
}


def latent_side(sizes: WorldSizes = WorldSizes()) -> int:
    """The latent side of a portrait under the VAE of ``sizes`` (each level past the first halves it)."""
    return SIZES[1][1] // 2 ** (len(sizes.vae_block_out_channels) - 1)


def make_vae(sizes: WorldSizes = WorldSizes()):
    from diffusers import AutoencoderKL

    levels = len(sizes.vae_block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=sizes.vae_block_out_channels,
        layers_per_block=1,
        latent_channels=sizes.latent_channels,
        norm_num_groups=sizes.vae_norm_num_groups,
        sample_size=SIZES[1][1],
    )


def clip_configs(vocab_size: int, sizes: WorldSizes = WorldSizes()):
    """(CLIPTextConfig, CLIPVisionConfig) of the world's CLIP."""
    from transformers import CLIPTextConfig, CLIPVisionConfig

    from uniportrait.world.tokenizer import MAX_LENGTH

    text = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=sizes.text_hidden_size,
        intermediate_size=4 * sizes.text_hidden_size,
        num_hidden_layers=sizes.text_layers,
        num_attention_heads=sizes.text_heads,
        max_position_embeddings=MAX_LENGTH,
        projection_dim=sizes.projection_dim,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    vision = CLIPVisionConfig(
        image_size=sizes.vision_image_size,
        patch_size=sizes.vision_patch_size,
        hidden_size=sizes.vision_hidden_size,
        intermediate_size=4 * sizes.vision_hidden_size,
        num_hidden_layers=sizes.vision_layers,
        num_attention_heads=sizes.vision_heads,
        projection_dim=sizes.projection_dim,
    )
    return text, vision


def make_unet(sizes: WorldSizes = WorldSizes()):
    from diffusers import UNet2DConditionModel

    levels = len(sizes.unet_block_out_channels)
    plain = sizes.unet_levels_without_attention
    if not 0 <= plain < levels:
        raise ValueError(f"unet_levels_without_attention must be in [0, {levels - 1}], got {plain}")
    down = ("DownBlock2D",) * plain + ("CrossAttnDownBlock2D",) * (levels - plain)
    return UNet2DConditionModel(
        sample_size=latent_side(sizes),
        in_channels=sizes.latent_channels,
        out_channels=sizes.latent_channels,
        down_block_types=down,
        up_block_types=tuple(d.replace("Down", "Up") for d in reversed(down)),
        block_out_channels=sizes.unet_block_out_channels,
        layers_per_block=sizes.unet_layers_per_block,
        norm_num_groups=16,
        cross_attention_dim=sizes.text_hidden_size,
        attention_head_dim=tuple(c // sizes.unet_head_dim for c in sizes.unet_block_out_channels),
        flip_sin_to_cos=True,
        freq_shift=0,
        act_fn="silu",
    )


def make_backbone(sizes: WorldSizes = WorldSizes()):
    from uniportrait.models.face_backbone import IRBackbone, IRBackboneConfig

    return IRBackbone.from_sizes(
        IRBackboneConfig(
            blocks=sizes.backbone_blocks,
            channels=sizes.backbone_channels,
            input_size=sizes.backbone_input_size,
            embedding_dim=sizes.backbone_embedding_dim,
        )
    )
