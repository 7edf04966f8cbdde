"""The networks a training run needs, from a preset or from real weights, and the text side.

Everything the adapter's shape depends on is read from the loaded networks: the UNet's
attention layers and cross-attention width, the face backbone's stage widths and the CLIP
hidden size. SD1.5, SD2 and SDXL-layout models therefore train through the same code; SDXL's
extra conditioning (a second text encoder, pooled text embeddings and size/crop "time ids") is
handled by :class:`TextConditioner`.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from uniportrait.models.adapter import AdapterConfig, UniPortraitAdapter
from uniportrait.models.face_backbone import IRBackbone
from uniportrait.models.qformer import QFormerConfig
from uniportrait.training.config import ConfigError, TrainConfig

logger = logging.getLogger(__name__)

PRESETS = ("tiny", "tiny-sdxl")

# Names of the adapter's parameters, by role.
_SINGLE_LORA = re.compile(r"\.to_(q|k|v|out)_lora\.")
_MULTI_LORA = re.compile(r"\.to_(q|k|v|out)_multi_id_lora\.")
_FACEID = re.compile(r"\.to_(k|v)_faceid\.")
_ROUTER = re.compile(r"\.(to_q_router|to_k_router|aggr_router)\.")


@dataclass
class Components:
    """The networks of a run. All but the adapter are frozen."""

    unet: nn.Module
    vae: nn.Module
    text_encoders: list[nn.Module]
    tokenizers: list[Any]
    scheduler: Any  # the base model's (inference) scheduler, for validation
    image_encoder: nn.Module
    face_backbone: IRBackbone
    adapter: UniPortraitAdapter

    def frozen_modules(self) -> list[nn.Module]:
        return [self.unet, self.vae, *self.text_encoders, self.image_encoder, self.face_backbone]


# -- which parameters each stage trains ---------------------------------------------------------


def parameter_role(name: str) -> str | None:
    """ "qformer", "faceid", "single_lora", "multi_lora", "router" or None (e.g. IP-Adapter)."""
    if name.startswith("qformer."):
        return "qformer"
    for role, pattern in (
        ("multi_lora", _MULTI_LORA),
        ("single_lora", _SINGLE_LORA),
        ("faceid", _FACEID),
        ("router", _ROUTER),
    ):
        if pattern.search("." + name):
            return role
    return None


STAGE_ROLES = {1: ("qformer", "faceid", "single_lora"), 2: ("router", "multi_lora")}


def set_trainable(adapter: UniPortraitAdapter, stage: int) -> dict[str, nn.Parameter]:
    """Freeze everything but what ``stage`` trains; returns those parameters by name."""
    trained = {}
    for name, param in adapter.named_parameters():
        role = parameter_role(name)
        train = role in STAGE_ROLES[stage]
        param.requires_grad_(train)
        if train:
            trained[name] = param
    if not trained:
        raise ConfigError(f"the adapter has nothing to train in stage {stage} (no router / multi-ID LoRA?)")
    return trained


# -- building -----------------------------------------------------------------------------------


def load_components(cfg: TrainConfig) -> Components:
    """Build or load every network of the run (float32, CPU; the trainer moves and casts them)."""
    m = cfg.model
    if m.preset is not None:
        if m.preset not in PRESETS:
            raise ConfigError(f"unknown model.preset {m.preset!r}; choose from {', '.join(PRESETS)}")
        base, backbone = _tiny_components(m.preset)
    else:
        base, backbone = _pretrained_components(cfg)
    unet, image_encoder = base["unet"], base["image_encoder"]
    if m.init_adapter is not None:
        adapter, saved_backbone = _load_adapter(m.init_adapter, unet, image_encoder, backbone)
        backbone = backbone if backbone is not None else saved_backbone
    else:
        adapter = new_adapter(cfg, unet, image_encoder, backbone)
    if backbone is None:
        raise ConfigError("no face backbone: set model.face_backbone (or use an init_adapter that has one)")
    adapter.qformer.sizes.drop_path_rate = cfg.data.drop_path_rate
    if cfg.stage == 2:
        adapter = _with_multi_id(adapter)
        if m.init_multi_lora_from_single:
            copy_single_lora_to_multi(adapter)
    for module in (unet, base["vae"], *base["text_encoders"], image_encoder, backbone):
        module.requires_grad_(False)
        module.eval()
    return Components(
        unet=unet,
        vae=base["vae"],
        text_encoders=base["text_encoders"],
        tokenizers=base["tokenizers"],
        scheduler=base["scheduler"],
        image_encoder=image_encoder,
        face_backbone=backbone,
        adapter=adapter.train(),
    )


def new_adapter(cfg: TrainConfig, unet: nn.Module, image_encoder: nn.Module, backbone: IRBackbone | None):
    """A freshly initialised adapter sized for these networks.

    LoRA ``up`` weights start at zero (the UNet is unchanged at step 0); with
    ``init_faceid_from_unet`` the identity projections start as copies of each layer's text
    ``to_k``/``to_v`` (as IP-Adapter initialises its image projections); with
    ``zero_faceid_values`` the value projections start at zero.
    """
    if backbone is None:
        raise ConfigError("a new adapter needs the face backbone (model.face_backbone) for its sizes")
    dim = unet.config.cross_attention_dim
    channels = backbone.config.channels
    overrides = dict(cfg.model.qformer)
    global_embedding = overrides.get("intrinsic") == "embedding"  # one token: the recognition embedding
    sizes = {
        "dim": dim,
        "id_dim": backbone.config.embedding_dim if global_embedding else channels[-1],
        "structure_dim": sum(channels[:3]) + image_encoder.config.hidden_size,
    }
    clash = sorted(set(overrides) & set(sizes))
    if clash:
        raise ConfigError(f"model.qformer cannot set {', '.join(clash)}: they follow the networks")
    defaults = _TINY_QFORMER if cfg.model.preset is not None else {}
    try:
        qformer = QFormerConfig(
            **{**defaults, **overrides, **sizes, "drop_path_rate": cfg.data.drop_path_rate}
        )
    except TypeError as exc:
        raise ConfigError(f"model.qformer: {exc}") from None
    config = AdapterConfig.from_unet(
        unet, qformer=qformer, lora_rank=cfg.model.lora_rank, multi_id=True, ip_adapter=False
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        adapter = UniPortraitAdapter.from_sizes(config)
    if cfg.model.init_faceid_from_unet:
        with torch.no_grad():
            for layer, proc in zip(config.layers, adapter.processors):
                if layer.cross:
                    attn = unet.get_submodule(layer.name.removesuffix(".processor"))
                    proc.to_k_faceid.weight.copy_(attn.to_k.weight)
                    proc.to_v_faceid.weight.copy_(attn.to_v.weight)
    if cfg.model.zero_faceid_values:
        with torch.no_grad():
            for layer, proc in zip(config.layers, adapter.processors):
                if layer.cross:
                    proc.to_v_faceid.weight.zero_()
    return adapter


# The tiny presets' Q-Former (see uniportrait.presets.pipelines.TinyAdapterSizes).
_TINY_QFORMER = {"depth": 2, "heads": 2, "dim_head": 16}


def _with_multi_id(adapter: UniPortraitAdapter) -> UniPortraitAdapter:
    """The same adapter with the multi-ID LoRA set and router added if it lacks them."""
    if adapter.config.multi_id:
        return adapter
    logger.info("adding the router and the multi-ID LoRA set to the stage-I adapter")
    config = dataclasses.replace(adapter.sizes, multi_id=True)
    new = UniPortraitAdapter.from_sizes(config)
    named = new.named_state_dict()
    named.update(adapter.named_state_dict())
    new.load_named_state_dict(named, "stage-I adapter")
    return new


def copy_single_lora_to_multi(adapter: UniPortraitAdapter) -> bool:
    """Start the multi-ID LoRA as the single-ID one when it is untrained (all ``up`` zero)."""
    multi_up = [p for n, p in adapter.named_parameters() if parameter_role(n) == "multi_lora" and ".up." in n]
    if not multi_up or any(p.abs().sum() > 0 for p in multi_up):
        return False
    with torch.no_grad():
        for proc in adapter.processors:
            for key in ("q", "k", "v", "out"):
                single = getattr(proc, f"to_{key}_lora", None)
                multi = getattr(proc, f"to_{key}_multi_id_lora", None)
                if single is not None and multi is not None:
                    multi.load_state_dict(single.state_dict())
    logger.info("multi-ID LoRA initialised from the single-ID LoRA")
    return True


def _load_adapter(spec: Any, unet, image_encoder, backbone):
    from uniportrait.loading import load_adapter_and_backbone

    if isinstance(spec, str) and Path(spec).is_dir() and (Path(spec) / "adapter").is_dir():
        spec = str(Path(spec) / "adapter")  # a training checkpoint folder
    adapter, saved = load_adapter_and_backbone(
        spec, unet, image_encoder, face_backbone=backbone, face_backbone_config=None
    )
    return adapter.float(), saved.float()


def load_face_backbone(spec: str) -> IRBackbone:
    """Our backbone folder, or the published TFace ``.bin`` (a file, folder or Hub spec)."""
    from uniportrait.convert import BACKBONE_FILE, load_published_backbone, read_bin
    from uniportrait.loading import resolve_file

    path = Path(spec)
    if path.is_dir() and (path / "config.json").is_file():
        return IRBackbone.from_pretrained(path)
    return load_published_backbone(read_bin(resolve_file(spec, BACKBONE_FILE, "face backbone")))


def _pretrained_components(cfg: TrainConfig) -> tuple[dict[str, Any], IRBackbone | None]:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import (
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        CLIPVisionModelWithProjection,
    )

    from uniportrait.loading import load_model

    m = cfg.model
    base = m.pretrained_model
    what = f"base model {base}"
    unet = load_model(UNet2DConditionModel, base, what, "unet")
    text_encoders = [load_model(CLIPTextModel, base, what, "text_encoder")]
    tokenizers = [load_model(CLIPTokenizer, base, what, "tokenizer")]
    if unet.config.addition_embed_type == "text_time":  # SDXL: a second, projecting text encoder
        text_encoders.append(load_model(CLIPTextModelWithProjection, base, what, "text_encoder_2"))
        tokenizers.append(load_model(CLIPTokenizer, base, what, "tokenizer_2"))
    vae = load_model(AutoencoderKL, m.vae or base, what, None if m.vae else "vae")
    scheduler = load_model(DDIMScheduler, base, what, "scheduler")
    if m.image_encoder is None:
        raise ConfigError(
            "set model.image_encoder (CLIP ViT-H/14 vision, e.g. h94/IP-Adapter/models/image_encoder)"
        )
    image_encoder = load_model(
        CLIPVisionModelWithProjection, m.image_encoder, f"image encoder {m.image_encoder}"
    )
    backbone = load_face_backbone(m.face_backbone) if m.face_backbone else None
    base_parts = {
        "unet": unet.float(),
        "vae": vae.float(),
        "text_encoders": [t.float() for t in text_encoders],
        "tokenizers": tokenizers,
        "scheduler": scheduler,
        "image_encoder": image_encoder.float(),
    }
    return base_parts, None if backbone is None else backbone.float()


def _tiny_components(preset: str) -> tuple[dict[str, Any], IRBackbone]:
    from uniportrait.presets.pipelines import TinyAdapterSizes, _randomise_batchnorm, tiny_backbone_config
    from uniportrait.presets.tiny import build_tiny_base

    base = build_tiny_base(0)
    parts = {
        "unet": base["unet"],
        "vae": base["vae"],
        "text_encoders": [base["text_encoder"]],
        "tokenizers": [base["tokenizer"]],
        "scheduler": base["scheduler"],
        "image_encoder": base["image_encoder"],
    }
    if preset == "tiny-sdxl":
        parts.update(build_tiny_sdxl_parts(base["tokenizer"]))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)  # the tiny pipeline preset's backbone for seed 0
        backbone = IRBackbone.from_sizes(tiny_backbone_config(TinyAdapterSizes())).eval()
        _randomise_batchnorm(backbone)
    return parts, backbone


def build_tiny_sdxl_parts(tokenizer, seed: int = 0) -> dict[str, Any]:
    """A tiny SDXL-style UNet and its two text encoders (random weights, offline).

    The UNet has ``addition_embed_type="text_time"``, two attention levels with 1 and 2
    transformer layers and linear projections, like SDXL; the two text encoders (hidden 32
    each, the second with a 32-wide projection) are concatenated to the 64-wide
    cross-attention input, and ``projection_class_embeddings_input_dim = 32 + 6 × 8``.
    """
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def text_config() -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=32,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=1,
            norm_num_groups=32,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            transformer_layers_per_block=(1, 2),
            cross_attention_dim=64,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=80,
        )
        text_1 = CLIPTextModel(text_config())
        text_2 = CLIPTextModelWithProjection(text_config())
    return {
        "unet": unet.float().eval(),
        "text_encoders": [text_1.float().eval(), text_2.float().eval()],
        "tokenizers": [tokenizer, tokenizer],
    }


# -- text conditioning --------------------------------------------------------------------------


class TextConditioner:
    """Captions → the UNet's text conditioning, for SD1.5/SD2 (one encoder) and SDXL (two).

    One encoder: its last hidden state (as the SD pipelines use it). Two encoders (SDXL): the
    penultimate hidden states of both, concatenated on the feature axis, and the second
    encoder's projected pooled embedding as ``text_embeds``. For ``text_time`` UNets the
    ``time_ids`` are SDXL's micro-conditioning: (original height, original width, crop top,
    crop left, target height, target width), from the dataset's resize-and-crop.
    """

    def __init__(self, tokenizers: list[Any], text_encoders: list[nn.Module], unet_config: Any) -> None:
        if len(tokenizers) != len(text_encoders) or len(text_encoders) not in (1, 2):
            raise ConfigError("expected one or two (tokenizer, text encoder) pairs")
        self.tokenizers, self.text_encoders = tokenizers, text_encoders
        self.text_time = unet_config.addition_embed_type == "text_time"
        if unet_config.addition_embed_type not in (None, "text_time"):
            raise ConfigError(
                f"UNets with addition_embed_type={unet_config.addition_embed_type!r} are not supported"
            )
        if self.text_time:
            pooled = getattr(text_encoders[-1].config, "projection_dim", None)
            if not hasattr(text_encoders[-1], "text_projection"):
                pooled = text_encoders[-1].config.hidden_size
            expected = (
                unet_config.projection_class_embeddings_input_dim - 6 * unet_config.addition_time_embed_dim
            )
            if pooled != expected:
                raise ConfigError(
                    f"the UNet expects pooled text embeddings of width {expected}, the last text encoder gives {pooled}"
                )

    @torch.no_grad()
    def __call__(self, captions: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, S, D) hidden states and, for SDXL, (B, P) pooled embeddings."""
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            ids = tokenizer(
                captions,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(device)
            out = encoder(ids, output_hidden_states=len(self.text_encoders) == 2)
            hidden.append(out.hidden_states[-2] if len(self.text_encoders) == 2 else out[0])
            pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
        return torch.cat(hidden, dim=-1), pooled if self.text_time else None

    def added_cond(
        self,
        pooled: torch.Tensor | None,
        original_sizes: list[tuple[int, int]],
        crops_top_left: list[tuple[int, int]],
        size: tuple[int, int],
    ) -> dict[str, torch.Tensor] | None:
        """SDXL's ``added_cond_kwargs`` (``text_embeds``, ``time_ids`` (B, 6): original (h, w),
        crop (top, left), target (h, w) = the training ``size`` (width, height)), or None."""
        if not self.text_time:
            return None
        time_ids = torch.tensor(
            [[*o, *c, size[1], size[0]] for o, c in zip(original_sizes, crops_top_left)],
            dtype=pooled.dtype,
            device=pooled.device,
        )
        return {"text_embeds": pooled, "time_ids": time_ids}
