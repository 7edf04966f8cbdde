"""CLIP-T: image–text cosine similarity with a CLIP model (the paper used CLIP ViT-L/14).

Weights are looked up only when asked for (a local folder or a Hub id, e.g.
``openai/clip-vit-large-patch14``). When they cannot be found, :func:`load_clip_scorer`
returns no scorer and a message for the report instead of failing the evaluation.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from PIL import Image

from uniportrait.errors import UniPortraitError

logger = logging.getLogger(__name__)

PAPER_CLIP_MODEL = "openai/clip-vit-large-patch14"


class ClipScorer:
    """Cosine similarity between CLIP's projected image and text embeddings (in [-1, 1]; the
    paper reports it ×100)."""

    def __init__(self, model: Any, processor: Any, name: str) -> None:
        self.model = model.eval()
        self.processor = processor
        self.name = name

    @classmethod
    def from_pretrained(cls, spec: str) -> ClipScorer:
        """Load ``CLIPModel`` + ``CLIPProcessor`` from a local folder or a Hub id.

        Raises:
            WeightsNotFoundError: neither on disk, nor in the cache, nor (when online) on the Hub.
        """
        from transformers import CLIPModel, CLIPProcessor

        from uniportrait.loading import load_model

        model = load_model(CLIPModel, spec, "CLIP-T model")
        processor = load_model(CLIPProcessor, spec, "CLIP-T processor")
        return cls(model, processor, str(spec))

    def score(self, image: Image.Image, prompt: str) -> float:
        import torch

        inputs = self.processor(
            text=[prompt],
            images=[image.convert("RGB")],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=getattr(self.model.config.text_config, "max_position_embeddings", 77),
        )
        param = next(self.model.parameters())
        inputs = {k: v.to(param.device) for k, v in inputs.items()}
        with torch.no_grad():
            image_embeds = self.model.get_image_features(pixel_values=inputs["pixel_values"].to(param.dtype))
            text_embeds = self.model.get_text_features(
                input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask")
            )
        image_embeds = _as_tensor(image_embeds)
        text_embeds = _as_tensor(text_embeds)
        cosine = torch.nn.functional.cosine_similarity(image_embeds.float(), text_embeds.float(), dim=-1)
        return float(cosine[0])


def _as_tensor(output: Any):
    """``get_*_features`` returns a tensor (or, in some transformers versions, an output object)."""
    if hasattr(output, "pooler_output") and not hasattr(output, "shape"):
        return output.pooler_output
    return output


def load_clip_scorer(spec: str | None) -> tuple[ClipScorer | None, str]:
    """``(scorer, status)``; ``scorer`` is None when no model was asked for or it cannot be loaded."""
    if not spec:
        return None, f"not computed: no CLIP model given (e.g. --clip {PAPER_CLIP_MODEL}, or a local folder)"
    if str(spec).startswith(("/", ".", "~")) and not Path(spec).expanduser().exists():
        message = f"not computed: CLIP model folder {spec} not found"
        logger.warning("CLIP-T skipped: %s", message)
        return None, message
    try:
        scorer = ClipScorer.from_pretrained(
            str(Path(spec).expanduser()) if Path(spec).expanduser().exists() else spec
        )
    except UniPortraitError as err:
        logger.warning("CLIP-T skipped: %s", err)
        return None, f"not computed: {err}"
    return scorer, f"computed with {spec}"
