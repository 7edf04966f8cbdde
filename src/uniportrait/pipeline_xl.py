"""UniPortrait on SDXL-layout models: :class:`UniPortraitXLPipeline`.

Everything of :class:`~uniportrait.pipeline.UniPortraitPipeline` (identities, routing, IP-Adapter,
ControlNet, StyleAligned, LoRAs) with SDXL's text conditioning: two text encoders (penultimate
hidden states concatenated), the second one's pooled embedding and the size "time ids", as
diffusers' ``StableDiffusionXLPipeline`` computes them. The adapter must have been made for an
SDXL-layout UNet (e.g. ``uniportrait train --preset tiny-sdxl`` or an SDXL base model).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers import AutoencoderKL, ControlNetModel, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders import StableDiffusionXLLoraLoaderMixin
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from diffusers.schedulers import KarrasDiffusionSchedulers
from transformers import (
    CLIPImageProcessor,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
)

from uniportrait.errors import UniPortraitError
from uniportrait.models.adapter import UniPortraitAdapter
from uniportrait.models.face_backbone import IRBackbone
from uniportrait.pipeline import UniPortraitPipeline
from uniportrait.settings import SettingError

#: diffusers' ``StableDiffusionXLPipeline`` default guidance (SD1.5's is 7.5).
SDXL_GUIDANCE_SCALE = 5.0


@dataclass(frozen=True)
class XLConditioning:
    """SDXL's own call arguments (diffusers' names), for one call."""

    prompt_2: str | list[str] | None = None
    negative_prompt_2: str | list[str] | None = None
    pooled_prompt_embeds: torch.Tensor | None = None
    negative_pooled_prompt_embeds: torch.Tensor | None = None
    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None


class UniPortraitXLPipeline(UniPortraitPipeline, StableDiffusionXLLoraLoaderMixin):
    """Stable Diffusion XL with UniPortrait identity conditioning.

    Components: SDXL's (``vae``, ``text_encoder``, ``text_encoder_2``, ``tokenizer``,
    ``tokenizer_2``, ``unet``, ``scheduler``) and UniPortrait's (``image_encoder``,
    ``face_backbone``, ``adapter``; optional ``controlnet``).
    """

    sdxl = True
    model_cpu_offload_seq = "text_encoder->text_encoder_2->image_encoder->face_backbone->unet->vae"
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        tokenizer_2: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        image_encoder: CLIPVisionModelWithProjection | None = None,
        face_backbone: IRBackbone | None = None,
        adapter: UniPortraitAdapter | None = None,
        controlnet: ControlNetModel | MultiControlNetModel | None = None,
        safety_checker: StableDiffusionSafetyChecker | None = None,
        feature_extractor: CLIPImageProcessor | None = None,
        encoder_id: str | None = None,
        force_zeros_for_empty_prompt: bool = True,
    ) -> None:
        if unet.config.addition_embed_type != "text_time":
            raise UniPortraitError(
                "UniPortraitXLPipeline needs an SDXL-layout UNet (addition_embed_type='text_time'); "
                "use UniPortraitPipeline for SD1.5"
            )
        super().__init__(
            vae, text_encoder, tokenizer, unet, scheduler, image_encoder, face_backbone, adapter,
            controlnet, safety_checker, feature_extractor, encoder_id,
        )  # fmt: skip
        self.register_modules(text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)
        self.register_to_config(force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        *,
        negative_prompt_2: str | list[str] | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        **kwargs: Any,
    ):
        """Generate: diffusers' ``StableDiffusionXLPipeline`` text arguments (``prompt_2``,
        ``negative_prompt_2``, pooled embeddings, ``original_size``, ``crops_coords_top_left``,
        ``target_size``), and every keyword of :meth:`UniPortraitPipeline.__call__`
        (``identities``, ``faceid_scale``, ``return_routing_maps``, ...). ``guidance_scale``
        defaults to SDXL's 5.0."""
        kwargs.setdefault("guidance_scale", SDXL_GUIDANCE_SCALE)
        if kwargs.get("prompt_embeds") is not None and pooled_prompt_embeds is None:
            raise SettingError("with prompt_embeds, give pooled_prompt_embeds too (SDXL)")
        xl = XLConditioning(
            prompt_2, negative_prompt_2, pooled_prompt_embeds, negative_pooled_prompt_embeds,
            original_size, tuple(crops_coords_top_left), target_size,
        )  # fmt: skip
        return self._generate(prompt=prompt, **kwargs, xl=xl)

    def _encode_text(
        self,
        prompt,
        device,
        num_images_per_prompt,
        do_cfg,
        negative_prompt,
        prompt_embeds,
        negative_prompt_embeds,
        lora_scale,
        clip_skip,
        xl,
    ):
        """diffusers' SDXL ``encode_prompt``: (embeds, negative embeds, pooled, negative pooled)."""
        xl = xl or XLConditioning()
        return StableDiffusionXLPipeline.encode_prompt(
            self,
            prompt,
            xl.prompt_2,
            device,
            num_images_per_prompt,
            do_cfg,
            negative_prompt,
            xl.negative_prompt_2,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=xl.pooled_prompt_embeds,
            negative_pooled_prompt_embeds=xl.negative_pooled_prompt_embeds,
            lora_scale=lora_scale,
            clip_skip=clip_skip,
        )

    def _added_cond(self, pooled, size, xl, dtype):
        """SDXL's ``added_cond_kwargs``: the pooled text (rows, P) and the time ids (rows, 6)."""
        xl = xl or XLConditioning()
        time_ids = StableDiffusionXLPipeline._get_add_time_ids(
            self,
            tuple(xl.original_size or size),
            xl.crops_coords_top_left,
            tuple(xl.target_size or size),
            dtype=dtype,
            text_encoder_projection_dim=int(pooled.shape[-1]),
        )
        return {
            "text_embeds": pooled.to(dtype),
            "time_ids": time_ids.to(pooled.device).repeat(len(pooled), 1),
        }
