"""UniPortraitPipeline: text-to-image with one or several identities, on diffusers.

    pipe = UniPortraitPipeline.from_preset("tiny")               # offline, random weights
    ident = pipe.encode_identity(face_crop)                      # cached features
    out = pipe("a photo of a person", identities=[ident], generator=torch.Generator().manual_seed(0))
    out.images[0]

Every request's settings travel in one :class:`~uniportrait.models.attention.AttentionCall`
passed to the UNet's processors, so concurrent calls never see each other's settings.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor

from uniportrait.errors import IdentityError, UniPortraitError
from uniportrait.identity import (
    FaceInput,
    Identity,
    clip_pixels,
    encode_face_features,
    encoder_fingerprint,
    faces_to_tensor,
    module_device_dtype,
    unconditional_features,
)
from uniportrait.models.attention import AttentionCall, RoutingRecorder, UniPortraitAttnProcessor
from uniportrait.models.fusion import FusedLoRA, LoRAFusion, WeightsSignature
from uniportrait.presets.registry import PresetDefaults
from uniportrait.settings import (
    CONTROLNET_SCALE,
    ETA,
    FACEID_SCALE,
    GUIDANCE_SCALE,
    IP_SCALE,
    LORA_SCALE,
    MULTI_ID_STRUCTURE_SCALE,
    NUM_IMAGES,
    SINGLE_ID_STRUCTURE_SCALE,
    STEPS,
    GenerationLimits,
    SettingError,
    check_prompt,
    check_settings,
    default_structure_scale,
)

logger = logging.getLogger(__name__)

__all__ = [
    "MULTI_ID_STRUCTURE_SCALE",
    "SINGLE_ID_STRUCTURE_SCALE",
    "UniPortraitPipeline",
    "UniPortraitPipelineOutput",
]


@dataclass
class UniPortraitPipelineOutput:
    """Images, and (when asked) per-image routing maps (num_ids, H, W), float32 in [0, 1].

    ``nsfw_content_detected``: per image, whether the safety checker flagged (and blacked out)
    it; None when the pipeline has no safety checker.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    routing_maps: list[torch.Tensor] | None = None
    nsfw_content_detected: list[bool] | None = None


class UniPortraitPipeline(DiffusionPipeline):
    """Stable Diffusion with UniPortrait identity conditioning.

    Components: the usual SD ones (``vae``, ``text_encoder``, ``tokenizer``, ``unet``,
    ``scheduler``), the identity encoders (``face_backbone``: IR backbone, ``image_encoder``:
    CLIP vision), the ``adapter`` (:class:`~uniportrait.models.adapter.UniPortraitAdapter`)
    and the optional ``controlnet`` and ``safety_checker`` (diffusers'
    ``StableDiffusionSafetyChecker``, with its ``feature_extractor``).
    """

    model_cpu_offload_seq = "text_encoder->image_encoder->face_backbone->unet->vae"
    _optional_components = ["controlnet", "safety_checker", "feature_extractor"]

    def __init__(
        self,
        vae,
        text_encoder,
        tokenizer,
        unet,
        scheduler,
        image_encoder,
        face_backbone,
        adapter,
        controlnet=None,
        safety_checker=None,
        feature_extractor=None,
        encoder_id: str | None = None,
    ) -> None:
        super().__init__()
        if safety_checker is not None and feature_extractor is None:
            from transformers import CLIPImageProcessor

            feature_extractor = CLIPImageProcessor()  # SD's: 224 px, CLIP normalisation
        adapter.attach(unet)
        if controlnet is not None:
            controlnet.set_attn_processor(UniPortraitAttnProcessor.text_only())
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            image_encoder=image_encoder,
            face_backbone=face_backbone,
            adapter=adapter,
            controlnet=controlnet,
            safety_checker=safety_checker,
            feature_extractor=feature_extractor,
        )
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self.control_image_processor = VaeImageProcessor(
            vae_scale_factor=self.vae_scale_factor, do_convert_rgb=True, do_normalize=False
        )
        # Identities remember which encoder made them; computed while weights are float32.
        self.encoder_id = encoder_id or encoder_fingerprint(face_backbone, image_encoder)
        # Call defaults: the UNet's native size (as diffusers does); a preset sets its own.
        self.generation_defaults = PresetDefaults(
            side=int(unet.config.sample_size) * self.vae_scale_factor, steps=STEPS.default
        )
        # What one call may cost (see uniportrait.settings); raise explicitly when you mean to.
        self.generation_limits = GenerationLimits()
        # Per-instance caches, safe to share between concurrent calls (see models/fusion.py).
        self._lora_fusion = LoRAFusion()
        self._fuse_lora = True
        self._uncond_features: tuple | None = None  # (signature, (intrinsic, structure))

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls, base_model, uniportrait=None, image_encoder=None, **kwargs
    ) -> UniPortraitPipeline:
        """Load a pipeline; see :func:`uniportrait.loading.load_pipeline` for the arguments."""
        from uniportrait.loading import load_pipeline

        return load_pipeline(base_model, uniportrait=uniportrait, image_encoder=image_encoder, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Save the whole pipeline so that ``UniPortraitPipeline.from_pretrained(folder)`` reloads it.

        The SD components and the image encoder (and ControlNet) go in diffusers' layout; the
        adapter and face backbone in our format under ``uniportrait/``; the UNet is saved with
        diffusers' own attention processors (its weights only). Written to a temporary folder and moved into place: a failure leaves nothing behind.
        """
        import shutil
        import tempfile

        from uniportrait.loading import SAVED_ADAPTER

        target = Path(save_directory)
        if target.exists() and any(target.iterdir()):
            raise UniPortraitError(f"{target} exists and is not empty")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        processors = self.unet.attn_processors
        try:
            from diffusers.models.attention_processor import AttnProcessor2_0

            self.unet.set_attn_processor(AttnProcessor2_0())
            for name in (
                "vae",
                "text_encoder",
                "tokenizer",
                "unet",
                "scheduler",
                "image_encoder",
                "controlnet",
            ):
                component = getattr(self, name, None)
                if component is not None:
                    component.save_pretrained(tmp / name, **kwargs)
            self.adapter.save_pretrained(tmp / SAVED_ADAPTER, face_backbone=self.face_backbone)
            if target.exists():
                target.rmdir()
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            self.unet.set_attn_processor(processors)

    @classmethod
    def from_preset(cls, name: str = "tiny", **kwargs) -> UniPortraitPipeline:
        """``"tiny"`` (offline, random weights) or ``"sd15"`` (the published setup)."""
        from uniportrait.presets import load_preset

        return load_preset(name, **kwargs)

    # -- identities ----------------------------------------------------------------------------

    def encode_identity(
        self,
        faces: FaceInput | Sequence[FaceInput],
        mix: Sequence[tuple[FaceInput | Sequence[FaceInput] | Identity, float]] | None = None,
        name: str | None = None,
    ) -> Identity:
        """Encode aligned 224×224 face crops of one person into a reusable :class:`Identity`.

        Args:
            faces: one crop or several crops of the same person (PIL, uint8 HWC array, or
                float tensor (3, 224, 224) / (R, 3, 224, 224) in [0, 1]).
            mix: other identities blended in, as ``[(faces_or_identity, scale), ...]``; scales
                in [0, 1] summing to at most 1.
            name: optional label stored with the identity.
        """
        intrinsic, structure = encode_face_features(
            self.face_backbone, self.image_encoder, faces_to_tensor(faces)
        )
        mixed = []
        for item, scale in mix or []:
            other = item if isinstance(item, Identity) else self.encode_identity(item)
            mixed.append((other, float(scale)))
        return Identity(intrinsic, structure, self.encoder_id, mixed, name)

    @torch.no_grad()
    def identity_tokens(self, identity: Identity, face_structure_scale: float) -> torch.Tensor:
        """Run the Q-Former on an identity (mixing applied): (num_queries, D)."""
        self.check_identity(identity)
        tokens = self._qformer(identity.intrinsic, identity.structure, face_structure_scale)
        if identity.mix:
            main_weight = 1.0 - sum(s for _, s in identity.mix)
            tokens = main_weight * tokens
            for other, scale in identity.mix:
                tokens = tokens + scale * self._qformer(
                    other.intrinsic, other.structure, face_structure_scale
                )
        return tokens

    def _qformer(self, intrinsic: torch.Tensor, structure: torch.Tensor, scale: float) -> torch.Tensor:
        """References are concatenated along the token axis: (R, T, C) → (1, R·T, C) → (Q, D)."""
        device, dtype = module_device_dtype(self.adapter)
        qformer = self.adapter.qformer
        out = qformer(
            intrinsic.flatten(0, 1)[None].to(device, dtype),
            structure.flatten(0, 1)[None].to(device, dtype),
            structure_scale=float(scale),
        )
        return out[0]

    @torch.no_grad()
    def unconditional_identity_tokens(self, face_structure_scale: float) -> torch.Tensor:
        """The 'no identity' tokens used on the unconditional side of CFG: (num_queries, D).

        Their features (CLIP of a blank image) are computed once and reused until the encoders'
        weights change.
        """
        tensors = [*self.image_encoder.parameters(), *self.face_backbone.parameters()]
        cached = self._uncond_features
        if cached is None or not cached[0].matches(tensors):
            features = unconditional_features(self.face_backbone, self.image_encoder)
            cached = self._uncond_features = (WeightsSignature(tensors), features)
        intrinsic, structure = cached[1]
        return self._qformer(intrinsic, structure, face_structure_scale)

    def check_identity(self, identity: Identity) -> None:
        if not isinstance(identity, Identity):
            raise IdentityError(f"identities must be Identity objects, got {type(identity).__name__}")
        if identity.encoder != self.encoder_id:
            raise IdentityError(
                f"identity{f' {identity.name!r}' if identity.name else ''} was encoded by another face "
                f"encoder ({identity.encoder}); this pipeline's is {self.encoder_id}: encode it again"
            )

    # -- LoRA fusion -------------------------------------------------------------------------------

    def enable_lora_fusion(self) -> None:
        """Fold the active LoRA set into the attention projections during calls (the default).

        The fused weights are separate tensors (the UNet's weights are never modified), cached
        for the last set and scale used: about 11% of the UNet's weights for SD1.5.
        """
        self._fuse_lora = True

    def disable_lora_fusion(self) -> None:
        """Apply the LoRA as separate low-rank products (slower), and free the fused weights."""
        self._fuse_lora = False
        self._lora_fusion.clear()

    @contextmanager
    def _fused_lora(self, call: AttentionCall) -> Iterator[FusedLoRA | None]:
        """The call's LoRA set fused into the projections, for the duration of the ``with``."""
        if not self._fuse_lora:
            yield None
            return
        with self._lora_fusion.use(self.unet, self.adapter, call.lora, call.lora_scale) as fused:
            yield fused

    # -- text and images -----------------------------------------------------------------------

    def encode_prompt(self, prompt: list[str], device: torch.device) -> torch.Tensor:
        """(len(prompt), S, D) text-encoder hidden states, as diffusers' SD pipeline makes them."""
        tokens = self.tokenizer(
            prompt,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        use_mask = getattr(self.text_encoder.config, "use_attention_mask", False)
        mask = tokens.attention_mask.to(device) if use_mask else None
        embeds = self.text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]
        return embeds.to(dtype=self.text_encoder.dtype, device=device)

    @torch.no_grad()
    def encode_ip_image(self, image, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """IP-Adapter tokens for an image prompt and for the unconditional side: 2 × (1, 4, D)."""
        crops = faces_to_tensor(image if not isinstance(image, PIL.Image.Image) else image.convert("RGB"))
        pixels = clip_pixels(crops[:1], self.image_encoder.config.image_size)
        enc_device, enc_dtype = module_device_dtype(self.image_encoder)
        embeds = self.image_encoder(pixels.to(enc_device, enc_dtype)).image_embeds
        proj = self.adapter.image_proj
        _, dtype = module_device_dtype(self.adapter)
        embeds = embeds.to(device, dtype)
        return proj(embeds), proj(torch.zeros_like(embeds))

    # -- checks --------------------------------------------------------------------------------

    def check_inputs(
        self,
        prompt,
        identities,
        negative_prompt,
        faceid_scale,
        face_structure_scale,
        ip_image,
        ip_scale,
        faceid_masks,
        control_image,
        num_inference_steps,
        height,
        width,
        num_images_per_prompt,
        latents,
        output_type,
        **settings: Any,
    ) -> None:
        """Refuse anything outside the ranges of :mod:`uniportrait.settings`; ``settings``: the
        other scales by their argument names (``guidance_scale``, ``lora_scale``, ...)."""
        # The ranges of uniportrait.settings (the CLI and the server use the same ones).
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts:
            raise SettingError("prompt must be a non-empty string or list of strings")
        limits = self.generation_limits
        for p in prompts:
            check_prompt(p, "prompt", limits, required=False)
        if negative_prompt is not None:
            negs = [negative_prompt] if isinstance(negative_prompt, str) else negative_prompt
            if not isinstance(negs, list) or len(negs) != len(prompts):
                raise SettingError("negative_prompt must be a string or a list as long as prompt")
            for p in negs:
                check_prompt(p, "negative_prompt", limits, required=False)
        check_settings(
            {
                "num_inference_steps": num_inference_steps,
                "height": height,
                "width": width,
                "num_images_per_prompt": num_images_per_prompt,
                "faceid_scale": faceid_scale,
                "face_structure_scale": face_structure_scale,
                "ip_scale": ip_scale,
                **settings,
            },
            limits,
            num_identities=len(identities),
        )
        if height % self.vae_scale_factor or width % self.vae_scale_factor:
            raise SettingError(f"height and width must be multiples of {self.vae_scale_factor}")
        train_steps = getattr(self.scheduler.config, "num_train_timesteps", None)
        if train_steps is not None and num_inference_steps > train_steps:
            raise SettingError(
                f"num_inference_steps must be at most {train_steps} (the scheduler's training steps), "
                f"got {num_inference_steps}"
            )
        for ident in identities:
            self.check_identity(ident)
        n_ids = len(identities)
        if n_ids >= 2 and not self.adapter.config.multi_id:
            raise UniPortraitError("several identities need the router weights (uniportrait-router_sd15.bin)")
        if faceid_masks is not None:
            if n_ids < 2:
                raise UniPortraitError("faceid_masks need two or more identities")
            shape = tuple(torch.as_tensor(np.asarray(faceid_masks)).shape)
            if len(shape) != 3 or shape[0] != n_ids:
                raise UniPortraitError(f"faceid_masks must be (num_identities={n_ids}, H, W), got {shape}")
        if ip_image is not None and ip_scale != 0.0 and self.adapter.image_proj is None:
            raise UniPortraitError("an image prompt needs IP-Adapter weights (ip_adapter=...)")
        if control_image is not None and self.controlnet is None:
            raise UniPortraitError("control_image was given but the pipeline has no controlnet")
        if latents is not None:
            expected = (4, height // self.vae_scale_factor, width // self.vae_scale_factor)
            if tuple(latents.shape[-3:]) != (self.unet.config.in_channels,) + expected[1:]:
                raise UniPortraitError(f"latents must have shape (batch, C, {expected[1]}, {expected[2]})")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise UniPortraitError('output_type must be "pil", "np", "pt" or "latent"')

    # -- generation ----------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        identities: Sequence[Identity] | None = None,
        negative_prompt: str | list[str] | None = None,
        faceid_scale: float = FACEID_SCALE.default,
        face_structure_scale: float | None = None,
        ip_image: PIL.Image.Image | None = None,
        ip_scale: float = IP_SCALE.default,
        faceid_masks: Any = None,
        control_image: Any = None,
        controlnet_conditioning_scale: float = CONTROLNET_SCALE.default,
        num_inference_steps: int | None = None,
        guidance_scale: float = GUIDANCE_SCALE.default,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = NUM_IMAGES.default,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        eta: float = ETA.default,
        output_type: str = "pil",
        return_routing_maps: bool = False,
        lora_scale: float = LORA_SCALE.default,
        callback_on_step_end: Callable[[UniPortraitPipeline, int, torch.Tensor, dict], dict] | None = None,
        return_dict: bool = True,
    ) -> UniPortraitPipelineOutput | tuple:
        """Generate images of the given identities.

        Args:
            prompt: text prompt(s); free-form, no special tokens.
            identities: :class:`Identity` objects (from :meth:`encode_identity`); one uses the
                single-ID LoRA, two or more the multi-ID LoRA and the router.
            faceid_scale: weight of identity attention (0 ignores the identities' tokens).
            face_structure_scale: structure-branch scale in the Q-Former; None → 0.1 for one
                identity, 0.3 for several.
            num_inference_steps, height, width: None → the preset's defaults
                (``pipe.generation_defaults``; the UNet's native size for other pipelines).
            ip_image, ip_scale: optional IP-Adapter image prompt (style/scene).
            faceid_masks: (N, H, W) masks that replace the router (soft, normalised per pixel).
            control_image, controlnet_conditioning_scale: optional ControlNet input; the
                ControlNet sees only the text.
            return_routing_maps: also return each image's routing maps (N, H, W), averaged over
                layers and steps.
            callback_on_step_end: called as ``f(pipe, step, timestep, {"latents": latents})`` after
                every step; a returned ``"latents"`` replaces them, and an exception it raises
                stops the generation (e.g. a server's time limit).
            Others: as in diffusers' StableDiffusionPipeline.
        """
        identities = list(identities or [])
        # 0. Default size and steps (the preset's)
        defaults = self.generation_defaults
        height = defaults.side if height is None else height
        width = defaults.side if width is None else width
        num_inference_steps = defaults.steps if num_inference_steps is None else num_inference_steps
        # 1. Check inputs
        self.check_inputs(
            prompt, identities, negative_prompt, faceid_scale, face_structure_scale, ip_image, ip_scale,
            faceid_masks, control_image, num_inference_steps, height, width, num_images_per_prompt,
            latents, output_type, guidance_scale=guidance_scale, lora_scale=lora_scale, eta=eta,
            controlnet_conditioning_scale=controlnet_conditioning_scale,
        )  # fmt: skip
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        n_ids = len(identities)
        if face_structure_scale is None:
            face_structure_scale = default_structure_scale(n_ids)

        # 2. Define call parameters
        device = self._execution_device
        batch = len(prompts) * num_images_per_prompt
        do_cfg = guidance_scale > 1.0

        # 3. Encode the prompt (diffusers order: each prompt repeated num_images_per_prompt times)
        prompt_embeds = self.encode_prompt(prompts, device).repeat_interleave(num_images_per_prompt, dim=0)
        if do_cfg:
            negatives = [""] * len(prompts) if negative_prompt is None else negative_prompt
            negatives = [negatives] if isinstance(negatives, str) else list(negatives)
            negative_embeds = self.encode_prompt(negatives, device).repeat_interleave(
                num_images_per_prompt, 0
            )
            prompt_embeds = torch.cat([negative_embeds, prompt_embeds])
        dtype = prompt_embeds.dtype

        # 4. Identity tokens (B, N, T, D) and image-prompt tokens (B, 4, D)
        id_tokens = None
        if n_ids and faceid_scale != 0.0:
            cond = torch.stack(
                [self.identity_tokens(i, face_structure_scale) for i in identities]
            )  # (N, T, D)
            id_tokens = cond[None].expand(batch, -1, -1, -1)
            if do_cfg:
                uncond = self.unconditional_identity_tokens(face_structure_scale)[None, None]
                id_tokens = torch.cat([uncond.expand(batch, n_ids, -1, -1), id_tokens])
            id_tokens = id_tokens.to(device, dtype)
        ip_tokens = None
        if ip_image is not None and ip_scale != 0.0:
            ip_cond, ip_uncond = self.encode_ip_image(ip_image, device)
            ip_tokens = ip_cond.expand(batch, -1, -1)
            if do_cfg:
                ip_tokens = torch.cat([ip_uncond.expand(batch, -1, -1), ip_tokens])
            ip_tokens = ip_tokens.to(device, dtype)

        # 5. Prepare timesteps (a private scheduler copy: calls may run concurrently)
        scheduler = self.scheduler.__class__.from_config(self.scheduler.config)
        scheduler.set_timesteps(num_inference_steps, device=device)

        # 6. Prepare latents
        latent_hw = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        shape = (batch, self.unet.config.in_channels, *latent_hw)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        else:
            latents = latents.to(device, dtype)
        latents = latents * scheduler.init_noise_sigma

        control = None
        if control_image is not None:
            control = self.control_image_processor.preprocess(control_image, height=height, width=width)
            control = control.to(device, self.controlnet.dtype).repeat_interleave(
                batch // control.shape[0] if batch % control.shape[0] == 0 else batch, dim=0
            )
            if do_cfg:
                control = torch.cat([control] * 2)

        # 7. The per-call attention settings
        masks = None
        if faceid_masks is not None:
            masks = torch.as_tensor(np.asarray(faceid_masks), dtype=torch.float32)[None].to(device)
        recorder = (
            RoutingRecorder(latent_hw) if return_routing_maps and n_ids >= 2 and masks is None else None
        )
        call = AttentionCall(
            id_tokens=id_tokens,
            faceid_scale=float(faceid_scale),
            ip_tokens=ip_tokens,
            ip_scale=float(ip_scale),
            faceid_masks=masks,
            # faceid_scale=0 ignores the identities entirely: their LoRA set goes with them.
            lora="none" if id_tokens is None else ("single" if n_ids == 1 else "multi"),
            lora_scale=float(lora_scale),
            latent_hw=latent_hw,
            routing_recorder=recorder,
        )
        extra_step_kwargs = self._extra_step_kwargs(scheduler, generator, eta)

        # 8. Denoising loop, with the LoRA set fused into the projections (read-only, shared)
        with self._fused_lora(call) as fused, self.progress_bar(total=len(scheduler.timesteps)) as progress:
            call.fused = fused
            for step, t in enumerate(scheduler.timesteps):
                model_input = torch.cat([latents] * 2) if do_cfg else latents
                model_input = scheduler.scale_model_input(model_input, t)
                residuals = {}
                if control is not None:
                    down, mid = self.controlnet(
                        model_input,
                        t,
                        encoder_hidden_states=prompt_embeds,
                        controlnet_cond=control,
                        conditioning_scale=float(controlnet_conditioning_scale),
                        return_dict=False,
                    )
                    residuals = {
                        "down_block_additional_residuals": down,
                        "mid_block_additional_residual": mid,
                    }
                noise_pred = self.unet(
                    model_input,
                    t,
                    encoder_hidden_states=prompt_embeds,
                    cross_attention_kwargs={"uniportrait": call},
                    return_dict=False,
                    **residuals,
                )[0]
                if do_cfg:
                    noise_uncond, noise_text = noise_pred.chunk(2)
                    noise_pred = noise_uncond + guidance_scale * (noise_text - noise_uncond)
                latents = scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]
                if callback_on_step_end is not None:
                    outputs = callback_on_step_end(self, step, t, {"latents": latents}) or {}
                    latents = outputs.get("latents", latents)
                progress.update()

        # 9. Decode (and the safety checker, when there is one)
        flagged = None
        if output_type == "latent":
            images = latents
        else:
            decoded = self.vae.decode(
                latents / self.vae.config.scaling_factor, return_dict=False, generator=generator
            )[0]
            decoded, flagged = self.run_safety_checker(decoded, device)
            keep = None if flagged is None else [not f for f in flagged]  # flagged ones stay black
            images = self.image_processor.postprocess(decoded, output_type=output_type, do_denormalize=keep)
        self.maybe_free_model_hooks()

        routing = None
        if return_routing_maps:
            routing = self._routing_maps(recorder, masks, batch, n_ids, (height, width), do_cfg)
        if not return_dict:
            return images, routing
        return UniPortraitPipelineOutput(images=images, routing_maps=routing, nsfw_content_detected=flagged)

    def run_safety_checker(self, image: torch.Tensor, device) -> tuple[torch.Tensor, list[bool] | None]:
        """diffusers' safety checker on decoded images (B, 3, H, W) in [-1, 1]; flagged ones become 0."""
        if self.safety_checker is None:
            return image, None
        pil = self.image_processor.postprocess(image, output_type="pil")
        pixels = self.feature_extractor(pil, return_tensors="pt").pixel_values
        pixels = pixels.to(device, self.safety_checker.dtype)
        image, flagged = self.safety_checker(images=image, clip_input=pixels)
        return image, [bool(f) for f in flagged]

    # -- helpers -------------------------------------------------------------------------------

    @staticmethod
    def _extra_step_kwargs(scheduler, generator, eta: float) -> dict[str, Any]:
        params = set(inspect.signature(scheduler.step).parameters)
        kwargs: dict[str, Any] = {}
        if "eta" in params:
            kwargs["eta"] = eta
        if "generator" in params:
            kwargs["generator"] = generator
        return kwargs

    @staticmethod
    def _routing_maps(recorder, masks, batch, n_ids, size, do_cfg) -> list[torch.Tensor]:
        """Per image (N, H, W): the router's average, the given masks, or an even split when
        nothing was routed (one identity, ``faceid_scale=0``, or identical identities)."""
        if n_ids == 0:
            return [torch.zeros(0, *size) for _ in range(batch)]
        if recorder is not None and recorder.mean() is not None:
            maps = recorder.mean()[-batch:] if do_cfg else recorder.mean()  # conditional half
        elif masks is not None:
            maps = masks.expand(batch, -1, -1, -1).float()
            maps = maps / maps.sum(1, keepdim=True).clamp(min=1e-3)
        else:
            maps = torch.full((batch, n_ids, 1, 1), 1.0 / n_ids)
        maps = torch.nn.functional.interpolate(maps.float().cpu(), size=size, mode="nearest")
        return list(maps)
