"""IR ("improved ResNet") face-recognition backbones, TFace layout.

The parameter names match TFace's ``Backbone`` (``input_layer``, ``body.{i}``,
``output_layer``), so the published CurricularFace IR-101 file
(``glint360k_curricular_face_r101_backbone.bin``) loads with strict keys through
:func:`load_tface_state_dict`. UniPortrait uses the four stage outputs, not the embedding:
the last one gives the intrinsic-ID tokens (:func:`intrinsic_tokens`), the first three the
backbone half of the face-structure tokens (:func:`structure_backbone_tokens`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import register_to_config

# DiffusionPipeline.from_pretrained looks up the base class in the component's module by name.
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401, E402
from torch import nn

from uniportrait.errors import ConfigError
from uniportrait.models._loading import config_from_dict, load_state_dict_strict
from uniportrait.models._mixins import SizedModelMixin

logger = logging.getLogger(__name__)

#: Units per stage of the named IR variants (read-only).
IR_VARIANTS: Mapping[str, tuple[int, int, int, int]] = MappingProxyType(
    {
        "ir18": (2, 2, 2, 2),
        "ir34": (3, 4, 6, 3),
        "ir50": (3, 4, 14, 3),
        "ir101": (3, 13, 30, 3),
        "ir152": (3, 8, 36, 3),
    }
)


@dataclass
class IRBackboneConfig:
    """Shape of an IR backbone; the defaults are IR-101 as in the published CurricularFace file.

    Attributes:
        blocks: basic IR units in each of the 4 stages.
        channels: output channels of the 4 stages (the input layer has ``channels[0]``).
        input_size: side of the square input (a multiple of 16; 112 for the published file).
        embedding_dim: size of the output embedding.
    """

    blocks: tuple[int, ...] = (3, 13, 30, 3)
    channels: tuple[int, ...] = (64, 128, 256, 512)
    input_size: int = 112
    embedding_dim: int = 512

    def __post_init__(self) -> None:
        self.blocks, self.channels = tuple(self.blocks), tuple(self.channels)
        if len(self.blocks) != 4 or len(self.channels) != 4:
            raise ConfigError("IRBackboneConfig: blocks and channels need 4 entries (one per stage)")
        if min(self.blocks) < 1 or min(self.channels) < 1 or self.embedding_dim < 1:
            raise ConfigError("IRBackboneConfig: blocks, channels and embedding_dim must be positive")
        if self.input_size < 16 or self.input_size % 16:
            raise ConfigError(f"IRBackboneConfig: input_size must be a multiple of 16, got {self.input_size}")

    @classmethod
    def from_variant(cls, name: str, **overrides: Any) -> IRBackboneConfig:
        """Config of a named variant (``ir18``, ``ir34``, ``ir50``, ``ir101``, ``ir152``)."""
        if name not in IR_VARIANTS:
            raise ConfigError(f"unknown IR variant {name!r}; known: {', '.join(IR_VARIANTS)}")
        return cls(blocks=IR_VARIANTS[name], **overrides)

    @property
    def stage_ends(self) -> tuple[int, ...]:
        """Indices into ``body`` after which each stage's output is taken (IR-101: 2, 15, 45, 48)."""
        ends, total = [], 0
        for n in self.blocks:
            total += n
            ends.append(total - 1)
        return tuple(ends)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> IRBackboneConfig:
        """Build from a dict; unknown keys raise ``ValueError`` naming them."""
        return config_from_dict(cls, d)


@dataclass
class IRBackboneOutput:
    """Output of :class:`IRBackbone`.

    Attributes:
        embedding: (B, embedding_dim) face embedding (not L2-normalised), or None when not asked for.
        stages: the 4 stage outputs, (B, c_i, S/2^(i+1), S/2^(i+1)); for S=112 and IR-101:
            (B, 64, 56, 56), (B, 128, 28, 28), (B, 256, 14, 14), (B, 512, 7, 7).
    """

    embedding: torch.Tensor | None
    stages: tuple[torch.Tensor, ...]


class BasicBlockIR(nn.Module):
    """Basic IR unit: BN-Conv-BN-PReLU-Conv-BN residual plus a (pooling or 1×1 conv) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if in_channels == out_channels:
            self.shortcut_layer: nn.Module = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.Conv2d(in_channels, out_channels, 3, 1, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.PReLU(out_channels),
            nn.Conv2d(out_channels, out_channels, 3, stride, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in, H, W) → (B, out, H/stride, W/stride)."""
        return self.res_layer(x) + self.shortcut_layer(x)


class IRBackbone(SizedModelMixin):
    """IR face-recognition backbone (TFace ``Backbone`` layout); sizes: :class:`IRBackboneConfig`.

    Build with ``IRBackbone(blocks=..., channels=...)`` or ``IRBackbone.from_sizes(config)``.
    """

    sizes_class = IRBackboneConfig

    @register_to_config
    def __init__(
        self,
        blocks: tuple[int, ...] = IRBackboneConfig.blocks,
        channels: tuple[int, ...] = IRBackboneConfig.channels,
        input_size: int = IRBackboneConfig.input_size,
        embedding_dim: int = IRBackboneConfig.embedding_dim,
    ) -> None:
        super().__init__()
        self._init_sizes()
        config = self.sizes
        c0, c3 = config.channels[0], config.channels[-1]
        self.input_layer = nn.Sequential(
            nn.Conv2d(3, c0, 3, 1, 1, bias=False),
            nn.BatchNorm2d(c0),
            nn.PReLU(c0),
        )
        units: list[nn.Module] = []
        in_channels = c0
        for n_units, out_channels in zip(config.blocks, config.channels):
            units.append(BasicBlockIR(in_channels, out_channels, stride=2))
            units.extend(BasicBlockIR(out_channels, out_channels, stride=1) for _ in range(n_units - 1))
            in_channels = out_channels
        self.body = nn.Sequential(*units)
        side = config.input_size // 16
        self.output_layer = nn.Sequential(
            nn.BatchNorm2d(c3),
            nn.Dropout(0.4),
            nn.Flatten(),
            nn.Linear(c3 * side * side, config.embedding_dim),
            nn.BatchNorm1d(config.embedding_dim, affine=False),
        )

    def forward(self, x: torch.Tensor, compute_embedding: bool = True) -> IRBackboneOutput:
        """Run the backbone.

        Args:
            x: (B, 3, S, S) RGB faces in [-1, 1], S = ``config.input_size``.
            compute_embedding: also run the output layer (skip it when only stages are needed).

        Returns:
            :class:`IRBackboneOutput` with the embedding (B, E) and the 4 stage maps.
        """
        size = self.sizes.input_size
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[2:] != (size, size):
            raise ValueError(f"expected faces of shape (B, 3, {size}, {size}), got {tuple(x.shape)}")
        x = self.input_layer(x.to(self.input_layer[0].weight.dtype))  # (B, c0, S, S)
        ends = set(self.sizes.stage_ends)
        stages = []
        for i, unit in enumerate(self.body):
            x = unit(x)
            if i in ends:
                stages.append(x)  # (B, c_i, S/2^(i+1), S/2^(i+1))
        embedding = self.output_layer(x) if compute_embedding else None  # (B, E)
        return IRBackboneOutput(embedding=embedding, stages=tuple(stages))


def load_tface_state_dict(model: IRBackbone, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load a TFace-layout state dict (e.g. the published CurricularFace IR-101) strictly.

    A ``module.`` prefix on every key (saved from ``DataParallel``) is stripped.

    Raises:
        CheckpointError: naming missing, unexpected and shape-mismatched keys.
    """
    prefix = "module."
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        logger.debug("stripping %r prefix from TFace state dict", prefix)
        state_dict = {k[len(prefix) :]: v for k, v in state_dict.items()}
    load_state_dict_strict(model, state_dict, what="TFace IR backbone state dict")


def intrinsic_tokens(stages: Sequence[torch.Tensor]) -> torch.Tensor:
    """Intrinsic-ID tokens: the last stage map as tokens in row-major order.

    Args:
        stages: the 4 stage maps of :class:`IRBackboneOutput`; the last is (B, c3, h, w).

    Returns:
        (B, h*w, c3); 49 × 512 for IR-101 on 112×112 faces.
    """
    last = stages[-1]  # (B, c3, h, w)
    return last.flatten(2).transpose(1, 2)  # (B, h*w, c3)


def structure_backbone_tokens(stages: Sequence[torch.Tensor], size: int = 16) -> torch.Tensor:
    """Backbone part of the face-structure tokens.

    The first three stage maps are resized bilinearly (``align_corners=False``) to
    ``size × size``, concatenated on channels and flattened row-major.

    Args:
        stages: the 4 stage maps of :class:`IRBackboneOutput`.
        size: side of the token grid (16 → 256 tokens, matching CLIP ViT-H/14 patches at 224).

    Returns:
        (B, size*size, c0+c1+c2); 256 × 448 for IR-101.
    """
    resized = [
        F.interpolate(s, size=(size, size), mode="bilinear", align_corners=False)  # (B, c_i, size, size)
        for s in stages[:3]
    ]
    grid = torch.cat(resized, dim=1)  # (B, c0+c1+c2, size, size)
    return grid.flatten(2).transpose(1, 2)  # (B, size*size, c0+c1+c2)
