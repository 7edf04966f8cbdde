"""The UniPortrait adapter: Q-Former, per-layer attention processors and IP-Adapter projection.

Everything trainable that UniPortrait adds to a frozen UNet lives in one
:class:`UniPortraitAdapter`. Its configuration is derived from the UNet it serves
(:meth:`AdapterConfig.from_unet`), so SD1.5, SD2 and SDXL-style UNets get adapters of the
right sizes. Our own file format is ``config.json`` + ``adapter.safetensors`` with *named*
keys (``attn_processors.<layer>.<param>``); the index-based published layout is handled in
:mod:`uniportrait.convert`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from uniportrait.errors import CheckpointError, WeightsNotFoundError
from uniportrait.models._loading import config_from_dict, load_state_dict_strict
from uniportrait.models._mixins import DeviceDtypeMixin
from uniportrait.models.attention import AttachedProcessor, UniPortraitAttnProcessor
from uniportrait.models.face_backbone import IRBackbone, IRBackboneConfig
from uniportrait.models.image_proj import ImageProjection, ImageProjectionConfig
from uniportrait.models.qformer import IDQFormer, QFormerConfig

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "config.json"
ADAPTER_WEIGHTS = "adapter.safetensors"
BACKBONE_WEIGHTS = "face_backbone.safetensors"
FORMAT_NAME = "uniportrait-adapter"
FORMAT_VERSION = 1
PROCESSOR_SUFFIX = ".processor"


@dataclass
class LayerSpec:
    """One attention layer of the UNet, in ``unet.attn_processors`` order."""

    name: str  # e.g. "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor"
    query_dim: int
    inner_dim: int
    context_dim: int
    cross: bool


@dataclass
class AdapterConfig:
    """Sizes of a UniPortrait adapter.

    Attributes:
        cross_attention_dim: D, the UNet's cross-attention width (= Q-Former output width).
        layers: the UNet's attention layers, in ``unet.attn_processors`` order.
        qformer: the ID Q-Former's sizes.
        lora_rank: rank of both LoRA sets (published: 128); 0 means no LoRA.
        multi_id: whether the multi-ID LoRA set and the router exist.
        ip_adapter: whether IP-Adapter image-prompt weights exist.
        image_proj: sizes of the IP-Adapter image projection (when ``ip_adapter``).
    """

    cross_attention_dim: int
    layers: list[LayerSpec]
    qformer: QFormerConfig
    lora_rank: int = 128
    multi_id: bool = True
    ip_adapter: bool = False
    image_proj: ImageProjectionConfig | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_id_tokens(self) -> int:
        return self.qformer.num_queries

    @classmethod
    def from_unet(
        cls,
        unet: nn.Module,
        qformer: QFormerConfig | None = None,
        lora_rank: int = 128,
        multi_id: bool = True,
        ip_adapter: bool = False,
        clip_embed_dim: int = 1024,
        num_ip_tokens: int = 4,
    ) -> AdapterConfig:
        """Derive the layer list from ``unet`` (any diffusers ``UNet2DConditionModel``)."""
        layers = []
        for name in unet.attn_processors:
            attn = unet.get_submodule(name.removesuffix(PROCESSOR_SUFFIX))
            layers.append(
                LayerSpec(
                    name=name,
                    query_dim=attn.to_q.in_features,
                    inner_dim=attn.to_q.out_features,
                    context_dim=attn.to_k.in_features,
                    cross=bool(attn.is_cross_attention),
                )
            )
        dim = unet.config.cross_attention_dim
        if isinstance(dim, (list, tuple)):
            raise ValueError("UNets with per-block cross-attention widths are not supported")
        qformer = qformer or QFormerConfig(dim=dim)
        if qformer.dim != dim:
            raise ValueError(f"Q-Former width {qformer.dim} != UNet cross-attention dim {dim}")
        image_proj = (
            ImageProjectionConfig(
                clip_embed_dim=clip_embed_dim, cross_attention_dim=dim, num_tokens=num_ip_tokens
            )
            if ip_adapter
            else None
        )
        return cls(dim, layers, qformer, lora_rank, multi_id, ip_adapter, image_proj)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["qformer"] = self.qformer.to_dict()
        d["image_proj"] = self.image_proj.to_dict() if self.image_proj else None
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AdapterConfig:
        d = dict(d)
        try:
            d["layers"] = [LayerSpec(**layer) for layer in d["layers"]]
            d["qformer"] = QFormerConfig.from_dict(d["qformer"])
            if d.get("image_proj") is not None:
                d["image_proj"] = ImageProjectionConfig.from_dict(d["image_proj"])
        except (KeyError, TypeError) as exc:
            raise CheckpointError(f"malformed adapter config: {exc}") from exc
        return config_from_dict(cls, d)


class UniPortraitAdapter(DeviceDtypeMixin, nn.Module):
    """Q-Former + one :class:`UniPortraitAttnProcessor` per UNet attention layer (+ image projection)."""

    def __init__(self, config: AdapterConfig) -> None:
        super().__init__()
        self.config = config
        self.qformer = IDQFormer(config.qformer)
        self.image_proj = ImageProjection(config.image_proj) if config.ip_adapter else None
        self.processors = nn.ModuleList(
            UniPortraitAttnProcessor(
                query_dim=layer.query_dim,
                inner_dim=layer.inner_dim,
                context_dim=layer.context_dim,
                cross=layer.cross,
                rank=config.lora_rank,
                multi_id=config.multi_id,
                ip_adapter=config.ip_adapter,
                num_id_tokens=config.num_id_tokens,
            )
            for layer in config.layers
        )

    # -- UNet wiring ---------------------------------------------------------------------------

    def check_unet(self, unet: nn.Module) -> None:
        names = list(unet.attn_processors)
        expected = [layer.name for layer in self.config.layers]
        if names != expected:
            extra = sorted(set(names) - set(expected))[:3]
            missing = sorted(set(expected) - set(names))[:3]
            raise CheckpointError(
                f"the adapter was made for another UNet ({len(expected)} attention layers, this one has "
                f"{len(names)}; e.g. unknown {extra}, absent {missing})"
            )

    def attach(self, unet: nn.Module) -> None:
        """Install this adapter's processors on ``unet`` (the UNet's own weights are untouched).

        The UNet gets :class:`~uniportrait.models.attention.AttachedProcessor` handles, not the
        processor modules, so its ``state_dict`` keeps only its own weights.
        """
        self.check_unet(unet)
        names = [layer.name for layer in self.config.layers]
        unet.set_attn_processor({n: AttachedProcessor(p) for n, p in zip(names, self.processors)})

    def is_attached(self, unet: nn.Module) -> bool:
        """Whether every attention layer of ``unet`` runs this adapter's processor."""
        installed = list(unet.attn_processors.values())
        return len(installed) == len(self.processors) and all(
            isinstance(h, AttachedProcessor) and h.processor is p for h, p in zip(installed, self.processors)
        )

    # -- named state dict (our format) ---------------------------------------------------------

    def _index_to_name(self) -> dict[str, str]:
        return {
            str(i): layer.name.removesuffix(PROCESSOR_SUFFIX) for i, layer in enumerate(self.config.layers)
        }

    def named_state_dict(self) -> dict[str, torch.Tensor]:
        """State dict with layer names instead of indices: ``attn_processors.<layer>.<param>``."""
        names = self._index_to_name()
        out = {}
        for key, value in self.state_dict().items():
            if key.startswith("processors."):
                index, rest = key[len("processors.") :].split(".", 1)
                key = f"attn_processors.{names[index]}.{rest}"
            out[key] = value
        return out

    def named_to_internal(self, named: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Inverse of :meth:`named_state_dict`; keys of unknown layers pass through unchanged."""
        prefixes = sorted(
            ((f"attn_processors.{name}.", index) for index, name in self._index_to_name().items()),
            key=lambda item: -len(item[0]),
        )
        out = {}
        for key, value in named.items():
            for prefix, index in prefixes if key.startswith("attn_processors.") else ():
                if key.startswith(prefix):
                    key = f"processors.{index}.{key[len(prefix) :]}"
                    break
            out[key] = value
        return out

    def load_named_state_dict(self, named: Mapping[str, torch.Tensor], what: str = "adapter weights") -> None:
        """Load a named state dict strictly (missing/unexpected/mis-shaped keys raise)."""
        internal = self.named_to_internal(named)
        try:
            load_state_dict_strict(self, internal, what)
        except CheckpointError as err:  # report keys in the names the user sees
            names = self._index_to_name()
            msg = str(err)
            for index, name in sorted(names.items(), key=lambda kv: -len(kv[0])):
                msg = msg.replace(f"processors.{index}.", f"attn_processors.{name}.")
            raise CheckpointError(msg) from None

    # -- files ---------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path, face_backbone: IRBackbone | None = None) -> Path:
        """Write ``config.json`` + ``adapter.safetensors`` (+ ``face_backbone.safetensors``).

        Written into a temporary folder first and moved into place, so a failure leaves
        nothing half-written.
        """
        directory = Path(directory)
        config = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "adapter": self.config.to_dict(),
            "face_backbone": face_backbone.config.to_dict() if face_backbone is not None else None,
        }
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
            tensors = {k: v.detach().contiguous().cpu() for k, v in self.named_state_dict().items()}
            save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
            if face_backbone is not None:
                backbone = {k: v.detach().contiguous().cpu() for k, v in face_backbone.state_dict().items()}
                save_file(backbone, str(tmp / BACKBONE_WEIGHTS), metadata={"format": "pt"})
            if directory.exists():
                shutil.rmtree(directory)
            os.replace(tmp, directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info("saved UniPortrait adapter to %s", directory)
        return directory


def is_adapter_folder(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).is_file() and (path / ADAPTER_WEIGHTS).is_file()


def read_adapter_files(
    files: Mapping[str, Any] | str | Path,
) -> tuple[UniPortraitAdapter, IRBackbone | None]:
    """Load our format from a folder, or from a dict mirroring it (file name → content).

    The dict form: ``{"config.json": dict, "adapter.safetensors": state dict,
    "face_backbone.safetensors": state dict (optional)}``.
    """
    if isinstance(files, (str, Path)):
        folder = Path(files)
        if not is_adapter_folder(folder):
            raise WeightsNotFoundError(f"{folder} has no {ADAPTER_CONFIG} + {ADAPTER_WEIGHTS}")
        try:
            config = json.loads((folder / ADAPTER_CONFIG).read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{folder / ADAPTER_CONFIG} is not valid JSON: {exc}") from exc
        content = {ADAPTER_CONFIG: config, ADAPTER_WEIGHTS: load_file(str(folder / ADAPTER_WEIGHTS))}
        if (folder / BACKBONE_WEIGHTS).is_file():
            content[BACKBONE_WEIGHTS] = load_file(str(folder / BACKBONE_WEIGHTS))
        where = str(folder)
    else:
        content, where = dict(files), "in-memory adapter"
    config = content.get(ADAPTER_CONFIG)
    if not isinstance(config, Mapping) or config.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{where}: {ADAPTER_CONFIG} is not a {FORMAT_NAME} config")
    if config.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{where}: format version {config.get('version')} is not {FORMAT_VERSION}")
    adapter = UniPortraitAdapter(AdapterConfig.from_dict(config["adapter"]))
    adapter.load_named_state_dict(content[ADAPTER_WEIGHTS], f"{where}/{ADAPTER_WEIGHTS}")
    backbone = None
    if config.get("face_backbone") is not None:
        if BACKBONE_WEIGHTS not in content:
            raise CheckpointError(f"{where}: config names a face backbone but {BACKBONE_WEIGHTS} is missing")
        backbone = IRBackbone(IRBackboneConfig.from_dict(config["face_backbone"]))
        load_state_dict_strict(backbone, content[BACKBONE_WEIGHTS], f"{where}/{BACKBONE_WEIGHTS}")
        backbone.eval()
    return adapter.eval(), backbone
