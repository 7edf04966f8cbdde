"""``load_uniportrait`` / ``unload_uniportrait``: identities for any SD1.5-family pipeline.

In the style of diffusers' ``load_ip_adapter``: the pipeline's own UNet (a user's checkpoint,
with its LoRAs, scheduler and ControlNets) gets UniPortrait's attention processors, and the
adapter, face backbone and image encoder become pipeline components::

    pipe = UniPortraitPipeline.from_pipe(StableDiffusionPipeline.from_pretrained(...))
    pipe.load_uniportrait("Junjie96/UniPortrait", image_encoder="h94/IP-Adapter/models/image_encoder")
    ...
    pipe.unload_uniportrait()   # the UNet's processors are the ones it had before

The UNet's weights are never touched: the processors hold the adapter's weights, and the UNet's
``state_dict`` is its own before, during and after.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from uniportrait.errors import UniPortraitError

logger = logging.getLogger(__name__)


class UniPortraitLoaderMixin:
    """Adds :meth:`load_uniportrait` and :meth:`unload_uniportrait` to a pipeline with a ``unet``."""

    def load_uniportrait(
        self,
        uniportrait: Any,
        image_encoder: Any = None,
        face_backbone: Any = None,
        ip_adapter: Any = None,
        adapter_config: Any = None,
        face_backbone_config: Any = None,
    ) -> None:
        """Load UniPortrait's adapter and identity encoders and attach them to ``self.unet``.

        Args:
            uniportrait: our adapter folder, the published files (folder, Hub repo) or a dict
                mirroring either (see :func:`uniportrait.loading.load_pipeline`).
            image_encoder: CLIP vision model (module, folder, Hub spec); default: the
                pipeline's own ``image_encoder``.
            face_backbone: replaces the backbone shipped with the weights.
            ip_adapter: optional ``ip-adapter_sd15.bin`` (path, Hub spec or contents).
            adapter_config, face_backbone_config: sizes for reading the published layout when
                they differ from the published SD1.5 ones (tiny test models).
        """
        from transformers import CLIPVisionModelWithProjection

        from uniportrait.identity import encoder_fingerprint, intrinsic_source
        from uniportrait.loading import load_adapter_and_backbone, load_model

        if getattr(self, "adapter", None) is not None:
            raise UniPortraitError("UniPortrait is already loaded: call unload_uniportrait() first")
        if image_encoder is None:
            image_encoder = getattr(self, "image_encoder", None)
        if image_encoder is None:
            raise UniPortraitError("image_encoder=... is required (CLIP ViT-H/14 vision)")
        encoder = load_model(CLIPVisionModelWithProjection, image_encoder, f"image encoder {image_encoder}")
        adapter, backbone = load_adapter_and_backbone(
            uniportrait, self.unet, encoder, ip_adapter, face_backbone, adapter_config, face_backbone_config
        )
        device, dtype = self.unet.device, self.unet.dtype
        for module in (adapter, backbone, encoder):
            nn.Module.to(module.eval(), device, dtype)  # ModelMixin.to warns on every cast
        self._processors_before_uniportrait = self.unet.attn_processors
        adapter.attach(self.unet)
        self.register_modules(adapter=adapter, face_backbone=backbone, image_encoder=encoder)
        self.encoder_id = encoder_fingerprint(backbone, encoder, intrinsic_source(adapter))
        self.register_to_config(encoder_id=self.encoder_id)
        self._uncond_features = None
        logger.info("UniPortrait loaded (%d attention layers)", len(adapter.processors))

    def unload_uniportrait(self) -> None:
        """Detach UniPortrait: the UNet gets back the processors it had before, and the adapter
        and face backbone are dropped (the image encoder stays, as other adapters may use it)."""
        if getattr(self, "adapter", None) is None:
            raise UniPortraitError("UniPortrait is not loaded")
        before = getattr(self, "_processors_before_uniportrait", None)
        if before is not None:
            self.unet.set_attn_processor(before)
        else:  # loaded at construction: diffusers' defaults
            self.unet.set_default_attn_processor()
        self._processors_before_uniportrait = None
        self._lora_fusion.clear()
        self.register_modules(adapter=None, face_backbone=None)
        self._uncond_features = None
