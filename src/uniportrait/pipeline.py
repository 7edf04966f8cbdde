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
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DiffusionPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders import StableDiffusionLoraLoaderMixin, TextualInversionLoaderMixin
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
    rescale_noise_cfg,
    retrieve_timesteps,
)
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

from uniportrait.errors import IdentityError, UniPortraitError
from uniportrait.identity import (
    FaceInput,
    Identity,
    clip_pixels,
    encode_face_features,
    encoder_fingerprint,
    faces_to_tensor,
    intrinsic_source,
    module_device_dtype,
    unconditional_features,
)
from uniportrait.loaders import UniPortraitLoaderMixin
from uniportrait.models.adapter import UniPortraitAdapter
from uniportrait.models.attention import AttachedProcessor, AttentionCall, RoutingRecorder, StyleSharing
from uniportrait.models.face_backbone import IRBackbone
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
    STYLE_SCALE,
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
    it; None when the pipeline has no safety checker. With ``return_dict=False`` the pipeline
    returns ``(images, nsfw_content_detected)``, diffusers' convention.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    routing_maps: list[torch.Tensor] | None = None
    nsfw_content_detected: list[bool] | None = None


#: The module :meth:`UniPortraitPipeline.save_pretrained` writes beside ``model_index.json``.
PIPELINE_MODULE = "uniportrait_pipeline"
PIPELINE_MODULE_SOURCE = "from uniportrait.pipeline import UniPortraitPipeline  # noqa: F401\n"
#: ... for :class:`~uniportrait.pipeline_xl.UniPortraitXLPipeline`.
PIPELINE_XL_MODULE_SOURCE = "from uniportrait.pipeline_xl import UniPortraitXLPipeline  # noqa: F401\n"


def is_saved_pipeline(folder: Path) -> bool:
    """A folder written by :meth:`UniPortraitPipeline.save_pretrained`.

    Raises:
        UniPortraitError: the folder names our pipeline but its module is not the one we write
            (it would run arbitrary code).
    """
    module = folder / f"{PIPELINE_MODULE}.py"
    if not (folder / "model_index.json").is_file() or not module.is_file():
        return False
    if module.read_text() not in (PIPELINE_MODULE_SOURCE, PIPELINE_XL_MODULE_SOURCE):
        raise UniPortraitError(
            f"{module} is not the module UniPortraitPipeline.save_pretrained writes; refusing to run it"
        )
    return True


class ProcessorsReplacedError(UniPortraitError):
    """The UNet's attention processors are not UniPortrait's (identities cannot be applied)."""


class UniPortraitPipeline(
    DiffusionPipeline, StableDiffusionLoraLoaderMixin, TextualInversionLoaderMixin, UniPortraitLoaderMixin
):
    """Stable Diffusion with UniPortrait identity conditioning.

    Components: the usual SD ones (``vae``, ``text_encoder``, ``tokenizer``, ``unet``,
    ``scheduler``), the identity encoders (``face_backbone``: IR backbone, ``image_encoder``:
    CLIP vision), the ``adapter`` (:class:`~uniportrait.models.adapter.UniPortraitAdapter`)
    and the optional ``controlnet`` and ``safety_checker`` (diffusers'
    ``StableDiffusionSafetyChecker``, with its ``feature_extractor``).
    """

    model_cpu_offload_seq = "text_encoder->image_encoder->face_backbone->unet->vae"
    _optional_components = [
        "controlnet", "safety_checker", "feature_extractor", "adapter", "face_backbone", "image_encoder",
    ]  # fmt: skip
    # The adapter's processors run inside the UNet's layers and read their weights directly:
    # offloading keeps the adapter on the execution device (it is small next to the UNet).
    _exclude_from_cpu_offload = ["adapter"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    get_guidance_scale_embedding = StableDiffusionPipeline.get_guidance_scale_embedding
    sdxl = False  # the text conditioning this class computes (UniPortraitXLPipeline: True)

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        image_encoder: CLIPVisionModelWithProjection | None = None,
        face_backbone: IRBackbone | None = None,
        adapter: UniPortraitAdapter | None = None,
        controlnet: ControlNetModel | MultiControlNetModel | None = None,
        safety_checker: StableDiffusionSafetyChecker | None = None,
        feature_extractor: CLIPImageProcessor | None = None,
        encoder_id: str | None = None,
    ) -> None:
        super().__init__()
        xl = getattr(unet.config, "addition_embed_type", None) == "text_time"
        if xl and not getattr(self, "sdxl", False):
            raise UniPortraitError("this UNet is SDXL-layout (text_time): use UniPortraitXLPipeline")
        if safety_checker is not None and feature_extractor is None:
            feature_extractor = CLIPImageProcessor()  # SD's: 224 px, CLIP normalisation
        if adapter is not None:
            adapter.attach(unet)
        if isinstance(controlnet, (list, tuple)):
            controlnet = MultiControlNetModel(list(controlnet))
        for net in _controlnets(controlnet):
            if any(isinstance(p, AttachedProcessor) for p in net.attn_processors.values()):
                net.set_default_attn_processor()  # the ControlNet sees the text only
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
        if encoder_id is None and face_backbone is not None and image_encoder is not None:
            encoder_id = encoder_fingerprint(face_backbone, image_encoder, intrinsic_source(adapter))
        self.encoder_id = encoder_id
        self.register_to_config(encoder_id=self.encoder_id)  # saved in model_index.json
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

    @property
    def _text_lock(self) -> _GuardLock:
        """The lock prompt encoding holds. Fast tokenizers keep their padding/truncation settings on
        the tokenizer object, and diffusers' encode_prompt tokenizes twice with different ones
        ("max_length", then "longest"): concurrent calls must not interleave there, nor may calls
        of other pipelines holding the same tokenizer (``from_pipe`` shares components), so the
        lock lives on the tokenizer."""
        return _guard_lock(self.tokenizer if self.tokenizer is not None else self)

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls, base_model, uniportrait=None, image_encoder=None, **kwargs
    ) -> UniPortraitPipeline:
        """Load a pipeline.

        A folder written by :meth:`save_pretrained` (``model_index.json``) loads through
        diffusers' ``DiffusionPipeline.from_pretrained`` (``torch_dtype`` and its other options
        apply). Otherwise see :func:`uniportrait.loading.load_pipeline` for the arguments.
        """
        folder = Path(base_model) if isinstance(base_model, (str, os.PathLike)) else None
        if folder is not None and uniportrait is None and image_encoder is None and is_saved_pipeline(folder):
            device = kwargs.pop("device", None)
            # Only our own one-line module is trusted (see save_pretrained); anything else is refused.
            pipe = super().from_pretrained(folder, trust_remote_code=True, **kwargs)
            return pipe.to(device) if device is not None else pipe
        from uniportrait.loading import load_pipeline

        return load_pipeline(base_model, uniportrait=uniportrait, image_encoder=image_encoder, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Save the whole pipeline in diffusers' layout, with ``model_index.json``.

        Every component goes in its folder through its own ``save_pretrained`` (the UNet with its
        own weights only; the adapter and face backbone as diffusers models), plus
        ``uniportrait_pipeline.py``, a one-line module naming our pipeline class, so that
        ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` and
        ``UniPortraitPipeline.from_pretrained(folder)`` both reload it. Written to a temporary
        folder and moved into place: a failure leaves nothing behind.
        """
        import json
        import shutil
        import tempfile

        target = Path(save_directory)
        if target.exists() and any(target.iterdir()):
            raise UniPortraitError(f"{target} exists and is not empty")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            super().save_pretrained(tmp, **kwargs)
            source = PIPELINE_XL_MODULE_SOURCE if self.sdxl else PIPELINE_MODULE_SOURCE
            (tmp / f"{PIPELINE_MODULE}.py").write_text(source)
            index = json.loads((tmp / "model_index.json").read_text())
            index["_class_name"] = [PIPELINE_MODULE, type(self).__name__]
            (tmp / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            if target.exists():
                target.rmdir()
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

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
        if self.face_backbone is None or self.image_encoder is None:
            raise UniPortraitError("no identity encoders: call pipe.load_uniportrait(...) first")
        intrinsic, structure = encode_face_features(
            self.face_backbone, self.image_encoder, faces_to_tensor(faces), intrinsic_source(self.adapter)
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
            features = unconditional_features(
                self.face_backbone, self.image_encoder, intrinsic_source(self.adapter)
            )
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

    # -- text ------------------------------------------------------------------------------------

    def encode_prompt(
        self,
        prompt,
        device,
        num_images_per_prompt,
        do_classifier_free_guidance,
        negative_prompt=None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        lora_scale: float | None = None,
        clip_skip: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """diffusers' ``StableDiffusionPipeline.encode_prompt``: same arguments, same result.

        Returns ``(prompt_embeds, negative_prompt_embeds)``, each (B·num_images_per_prompt, S, D)
        (the negative one None without classifier-free guidance). LoRA scaling of the text
        encoder and textual inversion tokens are diffusers' own.
        """
        if clip_skip is not None and prompt_embeds is None and not hasattr(self.text_encoder, "text_model"):
            # transformers >= 5 flattened CLIPTextModel; diffusers' clip_skip path expects
            # `text_encoder.text_model`. Encode the prompt here, the rest stays diffusers'.
            prompt_embeds = self._clip_skip_embeds(prompt, device, clip_skip)
            clip_skip = None
        return StableDiffusionPipeline.encode_prompt(
            self,
            prompt,
            device,
            num_images_per_prompt,
            do_classifier_free_guidance,
            negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            lora_scale=lora_scale,
            clip_skip=clip_skip,
        )

    def _clip_skip_embeds(self, prompt, device, clip_skip: int) -> torch.Tensor:
        """The text encoder's hidden states ``clip_skip`` layers before the last, final-normed: (B, S, D)."""
        prompt = [prompt] if isinstance(prompt, str) else list(prompt)
        prompt = self.maybe_convert_prompt(prompt, self.tokenizer)  # textual inversion tokens
        ids = self.tokenizer(
            prompt,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        mask = (
            ids.attention_mask.to(device)
            if getattr(self.text_encoder.config, "use_attention_mask", False)
            else None
        )
        hidden = self.text_encoder(ids.input_ids.to(device), attention_mask=mask, output_hidden_states=True)
        return self.text_encoder.final_layer_norm(hidden.hidden_states[-(clip_skip + 1)])

    # -- diffusers' memory features ------------------------------------------------------------

    def set_attention_slice(self, slice_size: int | str | None) -> None:
        """Attention slicing is refused: it would replace UniPortrait's attention processors.

        Our processors already run on ``F.scaled_dot_product_attention`` (memory-efficient
        kernels); ``enable_attention_slicing`` would silently drop identity conditioning, so it
        raises instead. ``disable_attention_slicing`` is a no-op.
        """
        if slice_size is None:
            return
        raise ProcessorsReplacedError(
            "attention slicing would replace UniPortrait's attention processors and drop identity "
            "conditioning; they already use memory-efficient scaled_dot_product_attention. "
            "For less memory use enable_vae_slicing(), enable_vae_tiling() or enable_model_cpu_offload()"
        )

    def set_use_memory_efficient_attention_xformers(self, valid: bool, attention_op=None) -> None:
        """xFormers attention is refused (it would replace UniPortrait's processors); see
        :meth:`set_attention_slice`."""
        if valid:
            raise ProcessorsReplacedError(
                "xFormers attention would replace UniPortrait's attention processors and drop identity "
                "conditioning; they already use PyTorch's memory-efficient scaled_dot_product_attention"
            )

    def enable_vae_slicing(self) -> None:
        """Decode the batch one image at a time (less memory for large batches)."""
        self.vae.enable_slicing()

    def disable_vae_slicing(self) -> None:
        self.vae.disable_slicing()

    def enable_vae_tiling(self) -> None:
        """Decode large images tile by tile (less memory, seams blended)."""
        self.vae.enable_tiling()

    def disable_vae_tiling(self) -> None:
        self.vae.disable_tiling()

    def check_processors(self) -> None:
        """Raise :class:`ProcessorsReplacedError` unless the UNet runs the adapter's processors."""
        if self.adapter is None:
            raise UniPortraitError("no UniPortrait adapter: call pipe.load_uniportrait(...) first")
        if not self.adapter.is_attached(self.unet):
            raise ProcessorsReplacedError(
                "the UNet's attention processors are no longer UniPortrait's (replaced by "
                "set_attn_processor, fuse_qkv_projections, a LoRA loader or an attention backend?); "
                "call pipe.adapter.attach(pipe.unet) to restore them"
            )

    # -- images --------------------------------------------------------------------------------

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
        prompt_embeds=None,
        negative_prompt_embeds=None,
        callback_on_step_end_tensor_inputs=None,
        **settings: Any,
    ) -> None:
        """Refuse anything outside the ranges of :mod:`uniportrait.settings`; ``settings``: the
        other scales by their argument names (``guidance_scale``, ``lora_scale``, ...)."""
        if prompt is None and prompt_embeds is None:
            raise SettingError("give prompt or prompt_embeds")
        if prompt is not None and prompt_embeds is not None:
            raise SettingError("give prompt or prompt_embeds, not both")
        # The ranges of uniportrait.settings (the CLI and the server use the same ones).
        limits = self.generation_limits
        if prompt is not None:
            prompts = [prompt] if isinstance(prompt, str) else prompt
            if not isinstance(prompts, list) or not prompts:
                raise SettingError("prompt must be a non-empty string or list of strings")
            for p in prompts:
                check_prompt(p, "prompt", limits, required=False)
            n_prompts = len(prompts)
        else:
            if not isinstance(prompt_embeds, torch.Tensor) or prompt_embeds.ndim != 3:
                raise SettingError("prompt_embeds must be a (batch, tokens, dim) tensor")
            n_prompts = prompt_embeds.shape[0]
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise SettingError("give negative_prompt or negative_prompt_embeds, not both")
        if negative_prompt_embeds is not None and (
            prompt_embeds is None or negative_prompt_embeds.shape != prompt_embeds.shape
        ):
            raise SettingError("negative_prompt_embeds needs prompt_embeds of the same shape")
        if negative_prompt is not None:
            negs = [negative_prompt] if isinstance(negative_prompt, str) else negative_prompt
            if not isinstance(negs, list) or len(negs) != n_prompts:
                raise SettingError("negative_prompt must be a string or a list as long as prompt")
            for p in negs:
                check_prompt(p, "negative_prompt", limits, required=False)
        control_scale = settings.get("controlnet_conditioning_scale")
        if isinstance(control_scale, (list, tuple)):  # one per net of a MultiControlNetModel
            settings = {k: v for k, v in settings.items() if k != "controlnet_conditioning_scale"}
            for value in control_scale:
                CONTROLNET_SCALE.check(value, limits)
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
        if (identities or ip_image is not None) and self.adapter is None:
            raise UniPortraitError("no UniPortrait adapter: call pipe.load_uniportrait(...) first")
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
        if isinstance(self.controlnet, MultiControlNetModel) and control_image is not None:
            if not isinstance(control_image, (list, tuple)) or len(control_image) != len(
                self.controlnet.nets
            ):
                raise UniPortraitError(
                    f"with {len(self.controlnet.nets)} ControlNets, control_image must be a list of as many images"
                )
        if latents is not None:
            expected = (4, height // self.vae_scale_factor, width // self.vae_scale_factor)
            if tuple(latents.shape[-3:]) != (self.unet.config.in_channels,) + expected[1:]:
                raise UniPortraitError(f"latents must have shape (batch, C, {expected[1]}, {expected[2]})")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise UniPortraitError('output_type must be "pil", "np", "pt" or "latent"')
        unknown = [
            k for k in callback_on_step_end_tensor_inputs or () if k not in self._callback_tensor_inputs
        ]
        if unknown:
            raise UniPortraitError(
                f"callback_on_step_end_tensor_inputs must be among {self._callback_tensor_inputs}, got {unknown}"
            )

    def check_schedule(self, timesteps, sigmas) -> None:
        """Custom ``timesteps``/``sigmas``: one of them, and only for schedulers that take them."""
        if timesteps is not None and sigmas is not None:
            raise UniPortraitError("give timesteps or sigmas, not both")
        accepted = inspect.signature(self.scheduler.set_timesteps).parameters
        for name, value in (("timesteps", timesteps), ("sigmas", sigmas)):
            if value is not None and name not in accepted:
                raise UniPortraitError(
                    f"{type(self.scheduler).__name__} does not take custom {name}; "
                    "use a scheduler that does (e.g. EulerDiscreteScheduler)"
                )

    # -- diffusers' call-state properties (of the latest call) -----------------------------------

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def guidance_rescale(self) -> float:
        return self._guidance_rescale

    @property
    def clip_skip(self) -> int | None:
        return self._clip_skip

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1 and self.unet.config.time_cond_proj_dim is None

    @property
    def cross_attention_kwargs(self) -> dict | None:
        return self._cross_attention_kwargs

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        """Set ``pipe._interrupt = True`` (e.g. from ``callback_on_step_end``) to skip the
        remaining steps, as in diffusers. Like the other properties here it belongs to the
        pipeline object, so it also stops concurrent calls; a server stops one call by raising
        from its callback instead."""
        return getattr(self, "_interrupt", False)

    # -- generation ----------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = GUIDANCE_SCALE.default,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = NUM_IMAGES.default,
        eta: float = ETA.default,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        clip_skip: int | None = None,
        callback_on_step_end: Callable[[UniPortraitPipeline, int, torch.Tensor, dict], dict]
        | PipelineCallback
        | MultiPipelineCallbacks
        | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        *,
        identities: Sequence[Identity] | None = None,
        faceid_scale: float = FACEID_SCALE.default,
        face_structure_scale: float | None = None,
        identity_guidance_scale: float | None = None,
        ip_image: PIL.Image.Image | None = None,
        ip_scale: float = IP_SCALE.default,
        faceid_masks: Any = None,
        control_image: Any = None,
        controlnet_conditioning_scale: float | list[float] = CONTROLNET_SCALE.default,
        return_routing_maps: bool = False,
        lora_scale: float = LORA_SCALE.default,
        style_image: PIL.Image.Image | None = None,
        style_prompt: str = "",
        style_scale: float = STYLE_SCALE.default,
    ) -> UniPortraitPipelineOutput | tuple:
        """Generate images of the given identities.

        The arguments up to ``callback_on_step_end_tensor_inputs`` are diffusers'
        ``StableDiffusionPipeline`` ones, with the same names, order and meaning; UniPortrait's
        own follow, keyword-only.

        Args:
            prompt / prompt_embeds, negative_prompt / negative_prompt_embeds: the text, or
                its encoder states (B, S, D) as :meth:`encode_prompt` returns them.
            timesteps, sigmas: custom schedules (diffusers' ``retrieve_timesteps``).
            cross_attention_kwargs: passed to the UNet's attention, merged with ours (e.g.
                ``{"scale": 0.7}`` for a LoRA loaded with :meth:`load_lora_weights`).
            guidance_rescale, clip_skip: as in diffusers.
            callback_on_step_end: called as ``f(pipe, step, timestep, callback_kwargs)`` after
                every step with the tensors named in ``callback_on_step_end_tensor_inputs``
                (default ``["latents"]``); returned tensors replace them; an exception it raises
                stops the generation (e.g. a server's time limit); ``pipe._interrupt = True``
                skips the remaining steps.
            return_dict: False → ``(images, nsfw_content_detected)``, as diffusers.
            identities: :class:`Identity` objects (from :meth:`encode_identity`); one uses the
                single-ID LoRA, two or more the multi-ID LoRA and the router.
            faceid_scale: weight of identity attention (0 ignores the identities' tokens).
            face_structure_scale: structure-branch scale in the Q-Former; None → 0.1 for one
                identity, 0.3 for several.
            identity_guidance_scale: guide the identities apart from the text (InstructPix2Pix's
                two-scale guidance): ε = ε(∅) + g·(ε(text) − ε(∅)) + g_id·(ε(text, ids) −
                ε(text)), with g = ``guidance_scale``. None, or equal to ``guidance_scale``: one
                guidance for both (the usual two UNet passes, the same images); another value
                costs a third pass per step. Only with classifier-free guidance and identities.
            num_inference_steps, height, width: None → the preset's defaults
                (``pipe.generation_defaults``; the UNet's native size for other pipelines).
            ip_image, ip_scale: optional IP-Adapter image prompt (style/scene).
            faceid_masks: (N, H, W) masks that replace the router (soft, normalised per pixel).
            control_image, controlnet_conditioning_scale: optional ControlNet input (a list,
                one per net, with a ``MultiControlNetModel``); the ControlNets see only the text.
            return_routing_maps: also return each image's routing maps (N, H, W), averaged over
                layers and steps.
            lora_scale: weight of UniPortrait's identity LoRA.
            style_image, style_prompt, style_scale: StyleAligned — generate in the style of
                ``style_image`` (described by ``style_prompt``): it is DDIM-inverted and denoised
                alongside the images, which share its self-attention (AdaIN of queries and keys,
                its keys weighted by ``style_scale``). DDIM-family schedulers; not with
                ControlNet. A ``callback_on_step_end`` then also sees the reference's latents
                (the last row).
        """
        return self._generate(**{k: v for k, v in locals().items() if k != "self"})

    @torch.no_grad()
    def _generate(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = GUIDANCE_SCALE.default,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = NUM_IMAGES.default,
        eta: float = ETA.default,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        clip_skip: int | None = None,
        callback_on_step_end: Callable[[UniPortraitPipeline, int, torch.Tensor, dict], dict]
        | PipelineCallback
        | MultiPipelineCallbacks
        | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        *,
        identities: Sequence[Identity] | None = None,
        faceid_scale: float = FACEID_SCALE.default,
        face_structure_scale: float | None = None,
        identity_guidance_scale: float | None = None,
        ip_image: PIL.Image.Image | None = None,
        ip_scale: float = IP_SCALE.default,
        faceid_masks: Any = None,
        control_image: Any = None,
        controlnet_conditioning_scale: float | list[float] = CONTROLNET_SCALE.default,
        return_routing_maps: bool = False,
        lora_scale: float = LORA_SCALE.default,
        style_image: PIL.Image.Image | None = None,
        style_prompt: str = "",
        style_scale: float = STYLE_SCALE.default,
        xl: Any = None,
    ) -> UniPortraitPipelineOutput | tuple:
        """The body of :meth:`__call__` (``xl``: the SDXL pipeline's own text arguments)."""
        identities = list(identities or [])
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        tensor_inputs = list(callback_on_step_end_tensor_inputs or ["latents"])
        # 0. Default size and steps (the preset's)
        defaults = self.generation_defaults
        height = defaults.side if height is None else height
        width = defaults.side if width is None else width
        num_inference_steps = defaults.steps if num_inference_steps is None else num_inference_steps
        # 1. Check inputs
        self.check_inputs(
            prompt, identities, negative_prompt, faceid_scale, face_structure_scale, ip_image, ip_scale,
            faceid_masks, control_image, num_inference_steps, height, width, num_images_per_prompt,
            latents, output_type, prompt_embeds, negative_prompt_embeds, tensor_inputs,
            guidance_scale=guidance_scale, lora_scale=lora_scale, eta=eta,
            identity_guidance_scale=identity_guidance_scale,
            controlnet_conditioning_scale=controlnet_conditioning_scale,
        )  # fmt: skip
        self.check_schedule(timesteps, sigmas)
        if style_image is not None:
            self.check_style(style_image, style_prompt, style_scale, control_image)
        n_ids = len(identities)
        uses_adapter = (n_ids and faceid_scale != 0.0) or (ip_image is not None and ip_scale != 0.0)
        if uses_adapter:
            self.check_processors()
        if face_structure_scale is None:
            face_structure_scale = default_structure_scale(n_ids)
        self._guidance_scale = guidance_scale
        self._guidance_rescale = guidance_rescale
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = cross_attention_kwargs
        self._interrupt = False

        # 2. Define call parameters
        n_prompts = (
            (1 if isinstance(prompt, str) else len(prompt)) if prompt is not None else len(prompt_embeds)
        )
        device = self._execution_device
        batch = n_prompts * num_images_per_prompt
        # Local, not the property: concurrent calls share the pipeline's attributes.
        do_cfg = guidance_scale > 1.0 and self.unet.config.time_cond_proj_dim is None
        # The UNet batch's groups of rows: [∅ text, ∅ ids] (CFG), [text, ∅ ids] (identity guidance
        # apart from the text's), then [text, ids].
        id_guided = (
            do_cfg
            and n_ids > 0
            and faceid_scale != 0.0
            and identity_guidance_scale is not None
            and identity_guidance_scale != guidance_scale
        )
        groups = 1 + do_cfg + id_guided

        # 3. Encode the prompt (diffusers' own: each prompt repeated num_images_per_prompt times)
        text_lora_scale = (cross_attention_kwargs or {}).get("scale")
        with self._text_lock:
            prompt_embeds, negative_prompt_embeds, pooled, negative_pooled = self._encode_text(
                prompt,
                device,
                num_images_per_prompt,
                do_cfg,
                negative_prompt,
                prompt_embeds,
                negative_prompt_embeds,
                text_lora_scale,
                clip_skip,
                xl,
            )
        rows = batch  # the UNet's rows per CFG half: the images, then the style reference
        if style_image is not None:
            with self._text_lock:
                style_embeds, style_negative, style_pooled, style_neg_pooled = self._encode_text(
                    style_prompt, device, 1, do_cfg, "", None, None, None, None, xl
                )
            prompt_embeds = torch.cat([prompt_embeds, style_embeds.to(prompt_embeds.dtype)])
            if do_cfg:
                negative_prompt_embeds = torch.cat([negative_prompt_embeds, style_negative])
            if pooled is not None:
                pooled = torch.cat([pooled, style_pooled])
                negative_pooled = torch.cat([negative_pooled, style_neg_pooled]) if do_cfg else None
            rows = batch + 1
        if do_cfg:  # one UNet batch: the negative group first
            prompt_embeds = torch.cat([negative_prompt_embeds] + [prompt_embeds] * (groups - 1))
            pooled = None if pooled is None else torch.cat([negative_pooled] + [pooled] * (groups - 1))
        dtype = prompt_embeds.dtype
        # SDXL's pooled text and size conditioning for the UNet (None for SD1.5)
        added = self._added_cond(pooled, (height, width), xl, dtype)

        # 4. Identity tokens (B, N, T, D) and image-prompt tokens (B, 4, D)
        id_tokens = None
        if n_ids and faceid_scale != 0.0:
            cond = torch.stack(
                [self.identity_tokens(i, face_structure_scale) for i in identities]
            )  # (N, T, D)
            id_tokens = cond[None].expand(batch, -1, -1, -1)
            if do_cfg or rows > batch:
                uncond = self.unconditional_identity_tokens(face_structure_scale)[None, None]
                uncond = uncond.expand(-1, n_ids, -1, -1).to(id_tokens)
            if rows > batch:  # the style reference carries no identity
                id_tokens = torch.cat([id_tokens, uncond])
            if do_cfg:  # every group but the last without identity
                id_tokens = torch.cat([uncond.expand(rows * (groups - 1), -1, -1, -1), id_tokens])
            id_tokens = id_tokens.to(device, dtype)
        ip_tokens = None
        if ip_image is not None and ip_scale != 0.0:
            ip_cond, ip_uncond = self.encode_ip_image(ip_image, device)
            ip_tokens = ip_cond.expand(rows, -1, -1)
            if do_cfg:  # the image prompt goes with the text: in every group but the first
                ip_tokens = torch.cat([ip_uncond.expand(rows, -1, -1)] + [ip_tokens] * (groups - 1))
            ip_tokens = ip_tokens.to(device, dtype)

        # 5. Prepare timesteps (a private scheduler copy: calls may run concurrently)
        scheduler = self.scheduler.__class__.from_config(self.scheduler.config)
        timesteps, num_inference_steps = retrieve_timesteps(
            scheduler, num_inference_steps, device, timesteps, sigmas
        )

        # 6. Prepare latents
        latent_hw = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        shape = (batch, self.unet.config.in_channels, *latent_hw)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        else:
            latents = latents.to(device, dtype)
        latents = latents * scheduler.init_noise_sigma
        reference = None  # StyleAligned: the style image's latents at each timestep
        if style_image is not None:
            reference = self.invert_style_image(
                style_image,
                style_embeds,
                scheduler,
                timesteps,
                (height, width),
                dtype,
                added=None if added is None else {k: v[-1:] for k, v in added.items()},
            )
            latents = torch.cat([latents, reference[0]])
        control = self._prepare_control(control_image, height, width, batch, device, groups)
        control_scale = controlnet_conditioning_scale
        if isinstance(self.controlnet, MultiControlNetModel) and not isinstance(control_scale, (list, tuple)):
            control_scale = [control_scale] * len(self.controlnet.nets)
        timestep_cond = None
        if self.unet.config.time_cond_proj_dim is not None:  # guidance-distilled UNets (LCM)
            guidance = torch.tensor(guidance_scale - 1).repeat(batch)
            timestep_cond = self.get_guidance_scale_embedding(
                guidance, embedding_dim=self.unet.config.time_cond_proj_dim
            ).to(device=device, dtype=latents.dtype)

        # 7. The per-call attention settings, merged with the caller's cross_attention_kwargs
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
            # The groups without identity give every identity the same tokens.
            shared_rows=rows * (groups - 1),
            style=None if style_image is None else StyleSharing(groups, float(style_scale)),
        )
        attention_kwargs = {**(cross_attention_kwargs or {}), "uniportrait": call}
        extra_step_kwargs = self._extra_step_kwargs(scheduler, generator, eta)
        self._num_timesteps = len(timesteps)

        # 8. Denoising loop, with the LoRA set fused into the projections (read-only, shared)
        with self._fused_lora(call) as fused, self.progress_bar(total=len(timesteps)) as progress:
            call.fused = fused
            for step, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                if reference is not None:  # the reference follows its inverted trajectory
                    latents = torch.cat([latents[:batch], reference[step]])
                model_input = torch.cat([latents] * groups) if groups > 1 else latents
                model_input = scheduler.scale_model_input(model_input, t)
                residuals = {}
                if control is not None:
                    down, mid = self.controlnet(
                        model_input,
                        t,
                        encoder_hidden_states=prompt_embeds,
                        controlnet_cond=control,
                        conditioning_scale=control_scale,
                        added_cond_kwargs=added,
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
                    timestep_cond=timestep_cond,
                    cross_attention_kwargs=attention_kwargs,
                    added_cond_kwargs=added,
                    return_dict=False,
                    **residuals,
                )[0]
                if id_guided:
                    noise_uncond, noise_text, noise_ids = noise_pred.chunk(3)
                    noise_pred = (
                        noise_uncond
                        + guidance_scale * (noise_text - noise_uncond)
                        + identity_guidance_scale * (noise_ids - noise_text)
                    )
                    noise_cond = noise_ids  # the fully conditioned prediction
                elif do_cfg:
                    noise_uncond, noise_cond = noise_pred.chunk(2)
                    noise_pred = noise_uncond + guidance_scale * (noise_cond - noise_uncond)
                if do_cfg and guidance_rescale > 0.0:  # toward the conditioned prediction's statistics
                    noise_pred = rescale_noise_cfg(noise_pred, noise_cond, guidance_rescale=guidance_rescale)
                latents = scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]
                if callback_on_step_end is not None:
                    prompt_embeds, negative_prompt_embeds, latents = self._step_callback(
                        callback_on_step_end, tensor_inputs, step, t, groups,
                        prompt_embeds, negative_prompt_embeds, latents,
                    )  # fmt: skip
                progress.update()

        # 9. Decode (and the safety checker, when there is one)
        latents = latents[:batch]  # without the style reference
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

        if not return_dict:
            return images, flagged
        routing = None
        if return_routing_maps:
            routing = self._routing_maps(recorder, masks, rows, n_ids, (height, width), do_cfg)[:batch]
        return UniPortraitPipelineOutput(images=images, routing_maps=routing, nsfw_content_detected=flagged)

    def _encode_text(
        self,
        prompt,
        device,
        num_images_per_prompt: int,
        do_cfg: bool,
        negative_prompt,
        prompt_embeds,
        negative_prompt_embeds,
        lora_scale,
        clip_skip,
        xl,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """(prompt_embeds, negative_prompt_embeds, pooled, negative pooled): SD1.5 has no pooled
        text conditioning (the SDXL pipeline overrides this)."""
        embeds, negative = self.encode_prompt(
            prompt,
            device,
            num_images_per_prompt,
            do_cfg,
            negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            lora_scale=lora_scale,
            clip_skip=clip_skip,
        )
        return embeds, negative, None, None

    def _added_cond(self, pooled, size, xl, dtype) -> dict[str, torch.Tensor] | None:
        """The UNet's ``added_cond_kwargs`` (SDXL's pooled text and time ids); None for SD1.5."""
        return None

    def check_style(self, style_image, style_prompt, style_scale, control_image) -> None:
        """StyleAligned's arguments (see :meth:`__call__`)."""
        if not isinstance(style_image, PIL.Image.Image):
            raise SettingError(f"style_image must be a PIL image, got {type(style_image).__name__}")
        if not isinstance(style_prompt, str):
            raise SettingError("style_prompt must be a string")
        STYLE_SCALE.check(style_scale)
        if control_image is not None:
            raise SettingError("style_image and control_image cannot be combined")
        if not hasattr(self.scheduler, "alphas_cumprod") or self.scheduler.init_noise_sigma != 1.0:
            raise SettingError(
                f"style_image needs a DDIM-family scheduler (DDIM, DDPM, PNDM); this pipeline has "
                f"{type(self.scheduler).__name__}"
            )

    @torch.no_grad()
    def invert_style_image(
        self,
        image: PIL.Image.Image,
        prompt_embeds: torch.Tensor,
        scheduler,
        timesteps,
        size,
        dtype,
        added: dict[str, torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """DDIM inversion of ``image`` (resized to ``size`` = (height, width)) under
        ``prompt_embeds`` (1, S, D), no guidance and no identity: its latents (1, C, h, w) at
        each of ``timesteps`` (the call's, in their order)."""
        device = self._execution_device
        h, w = size
        pixels = self.image_processor.preprocess(image.convert("RGB"), height=h, width=w)
        pixels = pixels.to(device, self.vae.dtype)
        latent = self.vae.encode(pixels).latent_dist.mean * self.vae.config.scaling_factor
        latent = latent.to(dtype)
        alphas = scheduler.alphas_cumprod.to(device)
        step = scheduler.config.num_train_timesteps // len(timesteps)
        trajectory = []
        for t in reversed(timesteps):  # clean → noisy
            previous = int(t) - step
            a_prev = alphas[previous] if previous >= 0 else alphas.new_tensor(1.0)
            a_t = alphas[int(t)]
            eps = self.unet(
                latent, t, encoder_hidden_states=prompt_embeds.to(dtype), added_cond_kwargs=added
            ).sample
            clean = (latent - (1 - a_prev).sqrt() * eps) / a_prev.sqrt()
            latent = (a_t.sqrt() * clean + (1 - a_t).sqrt() * eps).to(dtype)
            trajectory.append(latent)
        return trajectory[::-1]  # in the call's order: noisiest first

    def _step_callback(
        self, callback, tensor_inputs, step, t, groups, prompt_embeds, negative_prompt_embeds, latents
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """diffusers' ``callback_on_step_end`` contract. With CFG, ``prompt_embeds`` holds the
        negative group first, then the prompt once per other group (as the UNet sees it); the
        callback gets the negative and the prompt by name."""
        n, do_cfg = len(latents), groups > 1
        positive = prompt_embeds[-n:] if do_cfg else prompt_embeds
        negative = prompt_embeds[:n] if do_cfg else negative_prompt_embeds
        available = {"latents": latents, "prompt_embeds": positive, "negative_prompt_embeds": negative}
        outputs = callback(self, step, t, {k: available[k] for k in tensor_inputs}) or {}
        latents = outputs.pop("latents", latents)
        positive = outputs.pop("prompt_embeds", positive)
        negative = outputs.pop("negative_prompt_embeds", negative)
        if do_cfg:
            prompt_embeds = torch.cat([negative] + [positive] * (groups - 1))
        else:
            prompt_embeds, negative_prompt_embeds = positive, negative
        return prompt_embeds, negative_prompt_embeds, latents

    def _prepare_control(self, control_image, height, width, batch, device, groups):
        """ControlNet condition(s) (B × groups, 3, H, W): one tensor, or a list for several nets."""
        if control_image is None:
            return None
        nets = _controlnets(self.controlnet)
        images = control_image if isinstance(self.controlnet, MultiControlNetModel) else [control_image]
        prepared = []
        for net, image in zip(nets, images):
            cond = self.control_image_processor.preprocess(image, height=height, width=width)
            cond = cond.to(device, net.dtype).repeat_interleave(
                batch // cond.shape[0] if batch % cond.shape[0] == 0 else batch, dim=0
            )
            prepared.append(torch.cat([cond] * groups))
        return prepared if isinstance(self.controlnet, MultiControlNetModel) else prepared[0]

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


def _controlnets(controlnet) -> list:
    """The ControlNets of ``controlnet`` (none, one, or a ``MultiControlNetModel``'s nets)."""
    if controlnet is None:
        return []
    return list(controlnet.nets) if isinstance(controlnet, MultiControlNetModel) else [controlnet]


class _GuardLock:
    """A lock kept on the object it guards; a copy or an unpickled object gets a fresh one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def __enter__(self) -> bool:
        return self._lock.acquire()

    def __exit__(self, *exc) -> None:
        self._lock.release()

    def __reduce__(self):
        return (_GuardLock, ())

    def __deepcopy__(self, memo) -> _GuardLock:
        return _GuardLock()


def _guard_lock(owner: Any) -> _GuardLock:
    """The :class:`_GuardLock` of ``owner``, created on first use (``dict.setdefault`` is atomic)."""
    lock = owner.__dict__.get("_uniportrait_guard_lock")
    return lock if lock is not None else owner.__dict__.setdefault("_uniportrait_guard_lock", _GuardLock())
