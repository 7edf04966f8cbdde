"""Identities: the cached, expensive part of identity conditioning.

An :class:`Identity` holds the face-backbone and CLIP features of one person's reference
photos (and of any identities mixed into it, with their scales). The Q-Former is *not*
applied here: it runs per generation, because ``face_structure_scale`` acts inside it.

Feature shapes (per reference face, ``R`` references):
    intrinsic: (R, 49, C_id)     last backbone stage, 7×7 tokens
    structure: (R, 256, C_st)    first three backbone stages at 16×16 ‖ CLIP penultimate patches
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from uniportrait.atomic import atomic_path
from uniportrait.errors import IdentityError

IDENTITY_FORMAT = "uniportrait-identity"
# Version 2: crops from MTCNN landmarks + insightface's norm_crop, and the "aligner" field. Version 1
# files were made by the earlier default (dlib 5-point landmarks with derived mouth corners, PIL
# bicubic warp with grey fill): their features come from other crops, so they are refused.
IDENTITY_VERSION = 2
LEGACY_ALIGNER = "dlib-5pt+pil-bicubic"
FACE_CROP_SIZE = 224
STRUCTURE_GRID = 16
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

FaceInput = PIL.Image.Image | torch.Tensor | np.ndarray


@dataclass
class Identity:
    """One person's cached reference features, plus optional mixed-in identities.

    Attributes:
        intrinsic: (R, T_id, C_id) float32 intrinsic-ID tokens of R reference faces.
        structure: (R, T_st, C_st) float32 face-structure tokens of the same faces.
        encoder: fingerprint of the face backbone + CLIP encoder that made the features;
            features are only valid with that encoder.
        mix: identities blended in, with their scales: F = (1 − Σ s)·F_self + Σ s·F_mix.
        name: optional label.
        crops: optional (R, 224, 224, 3) uint8 aligned reference crops, kept for display.
        aligner: which detector and warp made the crops (``uniportrait.faces.aligner_id``, e.g.
            ``"mtcnn+norm_crop"``); empty when the crops were given ready-made.
    """

    intrinsic: torch.Tensor
    structure: torch.Tensor
    encoder: str
    mix: list[tuple[Identity, float]] = field(default_factory=list)
    name: str | None = None
    crops: torch.Tensor | None = field(default=None, repr=False)
    aligner: str = ""

    def __post_init__(self) -> None:
        if self.intrinsic.ndim != 3 or self.structure.ndim != 3:
            raise IdentityError("identity features must be (references, tokens, channels) tensors")
        if self.intrinsic.shape[0] != self.structure.shape[0] or self.intrinsic.shape[0] == 0:
            raise IdentityError("identity features must hold the same, non-zero number of references")
        check_mix_scales([s for _, s in self.mix])
        for other, _ in self.mix:
            if other.mix:
                raise IdentityError("a mixed-in identity cannot itself be a mix")
            if other.encoder != self.encoder:
                raise IdentityError("a mixed-in identity was made by another encoder")

    @property
    def num_references(self) -> int:
        return self.intrinsic.shape[0]

    def __repr__(self) -> str:  # not the tensors
        mixes = ", ".join(f"{o.name or 'unnamed'}×{s:g}" for o, s in self.mix)
        return (
            f"Identity(name={self.name!r}, references={self.num_references}, "
            f"features={tuple(self.intrinsic.shape)}+{tuple(self.structure.shape)}, encoder={self.encoder!r}"
            + (f", aligner={self.aligner!r}" if self.aligner else "")
            + (f", mix=[{mixes}]" if mixes else "")
            + ")"
        )

    # -- files ---------------------------------------------------------------------------------

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        tensors = {"intrinsic": self.intrinsic.contiguous(), "structure": self.structure.contiguous()}
        for k, (other, _) in enumerate(self.mix):
            tensors[f"mix.{k}.intrinsic"] = other.intrinsic.contiguous()
            tensors[f"mix.{k}.structure"] = other.structure.contiguous()
        if self.crops is not None:
            tensors["crops"] = self.crops.contiguous()
        meta = {
            "format": IDENTITY_FORMAT,
            "version": str(IDENTITY_VERSION),
            "encoder": self.encoder,
            "name": self.name or "",
            "mix_scales": json.dumps([s for _, s in self.mix]),
            "aligner": self.aligner,
        }
        return tensors, meta

    def save(self, path: str | os.PathLike, extra_metadata: dict[str, str] | None = None) -> Path:
        """Write a ``.safetensors`` file atomically (temp file + rename)."""
        path = Path(path)
        tensors, meta = self.to_tensors()
        meta.update(extra_metadata or {})
        with atomic_path(path) as tmp:
            save_file({k: v.cpu() for k, v in tensors.items()}, tmp, metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Identity:
        path = Path(path)
        if not path.is_file():
            raise IdentityError(f"identity file {path} not found")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open API
        except Exception as exc:  # safetensors raises several types for bad files
            raise IdentityError(f"{path} is not a readable identity file: {exc}") from exc
        if meta.get("format") == IDENTITY_FORMAT and meta.get("version") == "1":
            raise IdentityError(
                f"identity {path.stem!r} ({path}) was made with the old face alignment ({LEGACY_ALIGNER}), "
                "not the crops the published weights expect; make it again from its photos "
                f"(`uniportrait id add {path.stem} PHOTO... --overwrite`)"
            )
        if meta.get("format") != IDENTITY_FORMAT or meta.get("version") != str(IDENTITY_VERSION):
            raise IdentityError(f"{path} is not a {IDENTITY_FORMAT} v{IDENTITY_VERSION} file")
        try:
            scales = [float(s) for s in json.loads(meta.get("mix_scales", "[]"))]
            mix = [
                (cls(tensors[f"mix.{k}.intrinsic"], tensors[f"mix.{k}.structure"], meta["encoder"]), s)
                for k, s in enumerate(scales)
            ]
            name = meta.get("name") or None
            crops = tensors.get("crops")
            for key in ("intrinsic", "structure"):
                if not torch.isfinite(tensors[key]).all():
                    raise ValueError(f"{key} features are not finite numbers")
            aligner = meta.get("aligner", "")
            return cls(tensors["intrinsic"], tensors["structure"], meta["encoder"], mix, name, crops, aligner)
        except (KeyError, ValueError) as exc:
            raise IdentityError(f"{path} is a malformed identity file: {exc}") from exc


def check_mix_scales(scales: Sequence[float]) -> None:
    """Mix scales must each lie in [0, 1] and sum to at most 1."""
    for s in scales:
        if not isinstance(s, (int, float)) or not 0.0 <= float(s) <= 1.0:
            raise IdentityError(f"mix scale {s!r} is outside [0, 1]")
    if sum(scales) > 1.0 + 1e-6:
        raise IdentityError(f"mix scales sum to {sum(scales):.3g}, more than 1")


# -- encoding -------------------------------------------------------------------------------------


def faces_to_tensor(faces: FaceInput | Sequence[FaceInput]) -> torch.Tensor:
    """Aligned face crops → (R, 3, 224, 224) float32 in [0, 1].

    Accepts PIL images, uint8 HWC arrays, or float CHW/BCHW tensors in [0, 1]. Crops of another
    size are resized (bilinear) to 224.
    """
    if isinstance(faces, torch.Tensor) and faces.ndim == 4:
        items: list[FaceInput] = list(faces)
    elif isinstance(faces, (PIL.Image.Image, torch.Tensor, np.ndarray)):
        items = [faces]
    else:
        items = list(faces)
    if not items:
        raise IdentityError("no face crops given")
    out = []
    for item in items:
        if isinstance(item, PIL.Image.Image):
            item = np.asarray(item.convert("RGB"))
        if isinstance(item, np.ndarray):
            if item.ndim != 3 or item.shape[2] != 3:
                raise IdentityError(f"face crop arrays must be (H, W, 3), got {item.shape}")
            item = torch.from_numpy(item.astype(np.float32) / 255.0).permute(2, 0, 1)
        if not isinstance(item, torch.Tensor) or item.ndim != 3 or item.shape[0] != 3:
            raise IdentityError("face crops must be PIL images, (H, W, 3) arrays or (3, H, W) tensors")
        item = item.float()
        if item.shape[-2:] != (FACE_CROP_SIZE, FACE_CROP_SIZE):
            item = F.interpolate(
                item[None], size=(FACE_CROP_SIZE,) * 2, mode="bilinear", align_corners=False
            )[0]
        out.append(item.clamp(0.0, 1.0))
    return torch.stack(out)


def clip_pixels(crops: torch.Tensor, image_size: int) -> torch.Tensor:
    """(R, 3, 224, 224) in [0, 1] → CLIP-normalised pixels at ``image_size`` (no centre crop)."""
    if crops.shape[-1] != image_size:
        crops = F.interpolate(crops, size=(image_size, image_size), mode="bicubic", align_corners=False)
    mean = crops.new_tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    std = crops.new_tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    return (crops - mean) / std


def backbone_pixels(crops: torch.Tensor, input_size: int) -> torch.Tensor:
    """(R, 3, 224, 224) in [0, 1] → [-1, 1] at the backbone's input size (bilinear)."""
    x = (crops * 2.0 - 1.0).clamp(-1.0, 1.0)
    return F.interpolate(x, size=(input_size, input_size), mode="bilinear", align_corners=False)


def module_device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where ``module`` computes and in which dtype.

    Under accelerate's offloading the weights sit on ``meta``/CPU between calls; the device is
    then the hooks' execution device (as diffusers' ``_execution_device`` finds it).
    """
    param = next(module.parameters())
    if param.device.type == "meta" or hasattr(module, "_hf_hook"):
        for sub in module.modules():
            device = getattr(getattr(sub, "_hf_hook", None), "execution_device", None)
            if device is not None:
                return torch.device(device), param.dtype
    return param.device, param.dtype


def clip_patch_features(image_encoder: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """Penultimate CLIP hidden state without CLS: (R, P, C_clip)."""
    device, dtype = module_device_dtype(image_encoder)
    hidden = image_encoder(pixels.to(device, dtype), output_hidden_states=True).hidden_states
    return hidden[-2][:, 1:]


def intrinsic_source(adapter: nn.Module | None) -> str:
    """What feeds ``adapter``'s intrinsic branch (``QFormerConfig.intrinsic``); ``"stage"`` without one."""
    return adapter.qformer.sizes.intrinsic if adapter is not None else "stage"


@torch.no_grad()
def encode_face_features(
    face_backbone: nn.Module, image_encoder: nn.Module, crops: torch.Tensor, intrinsic: str = "stage"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, 3, 224, 224) crops in [0, 1] → intrinsic (R, 49, C_id), structure (R, 256, C_st), float32 CPU.

    ``intrinsic`` is the adapter's ``QFormerConfig.intrinsic``: ``"stage"`` gives the last
    backbone stage as tokens; ``"embedding"`` the recognition embedding as one token (R, 1, E).
    """
    from uniportrait.models.face_backbone import intrinsic_tokens, structure_backbone_tokens

    device, dtype = module_device_dtype(face_backbone)
    size = face_backbone.config.input_size
    out = face_backbone(
        backbone_pixels(crops, size).to(device, dtype), compute_embedding=intrinsic == "embedding"
    )
    if intrinsic == "embedding":
        id_tokens = out.embedding[:, None, :]  # (R, 1, E)
    else:
        id_tokens = intrinsic_tokens(out.stages)  # (R, 49, C_id)
    backbone_part = structure_backbone_tokens(out.stages, size=STRUCTURE_GRID)  # (R, 256, 448)
    clip = clip_patch_features(image_encoder, clip_pixels(crops, image_encoder.config.image_size))
    if clip.shape[1] != backbone_part.shape[1]:
        raise IdentityError(
            f"CLIP gives {clip.shape[1]} patch tokens but the structure grid has {backbone_part.shape[1]}"
        )
    structure = torch.cat([backbone_part.to(clip.dtype), clip], dim=-1)  # (R, 256, C_st)
    return id_tokens.float().cpu(), structure.float().cpu()


@torch.no_grad()
def unconditional_features(
    face_backbone: nn.Module, image_encoder: nn.Module, intrinsic: str = "stage"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The classifier-free-guidance 'no identity' features: (1, 49, C_id), (1, 256, C_st).

    Intrinsic tokens are zero (one token of the embedding's width with ``intrinsic="embedding"``);
    the structure tokens are zero for the backbone part and the CLIP features of an all-zero
    (normalised) image for the CLIP part.
    """
    channels = face_backbone.config.channels
    if intrinsic == "embedding":
        grid, width = 1, face_backbone.config.embedding_dim
    else:
        grid, width = (face_backbone.config.input_size // 16) ** 2, channels[-1]
    size = image_encoder.config.image_size
    device, dtype = module_device_dtype(image_encoder)
    clip = clip_patch_features(image_encoder, torch.zeros(1, 3, size, size, device=device, dtype=dtype))
    id_tokens = torch.zeros(1, grid, width)
    backbone_part = torch.zeros(1, clip.shape[1], sum(channels[:3]))
    return id_tokens, torch.cat([backbone_part, clip.float().cpu()], dim=-1)


def encoder_fingerprint(face_backbone: nn.Module, image_encoder: nn.Module, intrinsic: str = "stage") -> str:
    """A short hash of the encoders' architecture, a sample of their weights and the intrinsic source.

    Identities made with one encoder are refused by another (their features differ), and so are
    identities made for an adapter whose intrinsic branch reads another backbone output
    (``QFormerConfig.intrinsic``; the default ``"stage"`` leaves the hash as it always was).
    The pipeline computes it once, when the encoders are loaded and still in float32.
    """
    digest = hashlib.sha256()
    if intrinsic != "stage":
        digest.update(f"intrinsic={intrinsic}".encode())
    for module in (face_backbone, image_encoder):
        digest.update(type(module).__name__.encode())
        for name, tensor in sorted(module.state_dict().items()):
            flat = tensor.detach().reshape(-1)
            step = max(1, flat.numel() // 16)
            sample = flat[::step][:16].float().cpu().numpy()
            digest.update(name.encode())
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(sample.tobytes())
    return digest.hexdigest()[:16]
