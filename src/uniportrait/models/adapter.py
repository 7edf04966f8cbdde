"""The UniPortrait adapter: Q-Former, per-layer attention processors and IP-Adapter projection.

Everything trainable that UniPortrait adds to a frozen UNet lives in one
:class:`UniPortraitAdapter`. Its configuration is derived from the UNet it serves
(:meth:`AdapterConfig.from_unet`), so SD1.5, SD2 and SDXL-style UNets get adapters of the
right sizes. It is a diffusers model (``ModelMixin`` + ``ConfigMixin``): its folder is
diffusers' ``config.json`` + ``diffusion_pytorch_model.safetensors`` (processor keys by index
in ``config.layers``, which names each layer), with the face backbone, when saved with it, in
``face_backbone/``. The first round's folder (``config.json`` with ``"format":
"uniportrait-adapter"`` + ``adapter.safetensors`` with *named* keys
``attn_processors.<layer>.<param>``) is still read; the index-based published layout is
handled in :mod:`uniportrait.convert`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers.configuration_utils import register_to_config

# DiffusionPipeline.from_pretrained looks up the base class in the component's module by name.
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401, E402
from safetensors.torch import load_file
from torch import nn

from uniportrait.errors import CheckpointError, ConfigError, WeightsNotFoundError
from uniportrait.models._loading import config_from_dict, load_state_dict_strict
from uniportrait.models._mixins import SizedModelMixin, load_sized_model
from uniportrait.models.attention import AttachedProcessor, UniPortraitAttnProcessor
from uniportrait.models.face_backbone import IRBackbone, IRBackboneConfig
from uniportrait.models.image_proj import ImageProjection, ImageProjectionConfig
from uniportrait.models.qformer import IDQFormer, QFormerConfig

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "config.json"
#: The diffusers weights file of the adapter (and of the backbone in ``face_backbone/``).
MODEL_WEIGHTS = "diffusion_pytorch_model.safetensors"
BACKBONE_FOLDER = "face_backbone"
# The first round's format (read only).
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
            raise ConfigError("UNets with per-block cross-attention widths are not supported")
        qformer = qformer or QFormerConfig(dim=dim)
        if qformer.dim != dim:
            raise ConfigError(f"Q-Former width {qformer.dim} != UNet cross-attention dim {dim}")
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


class UniPortraitAdapter(SizedModelMixin):
    """Q-Former + one :class:`UniPortraitAttnProcessor` per UNet attention layer (+ image projection).

    Sizes: :class:`AdapterConfig` (``self.sizes``); build with ``UniPortraitAdapter.from_sizes(config)``.
    """

    sizes_class = AdapterConfig
    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        cross_attention_dim: int,
        layers: list[dict[str, Any]],
        qformer_config: dict[str, Any],
        lora_rank: int = 128,
        multi_id: bool = True,
        ip_adapter: bool = False,
        image_proj_config: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self._init_sizes()
        config = self.sizes
        self.qformer = IDQFormer.from_sizes(config.qformer)
        self.image_proj = ImageProjection.from_sizes(config.image_proj) if config.ip_adapter else None
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

    # The config names the Q-Former's and the image projection's sizes ``*_config``: a config key
    # equal to a submodule's name would shadow it (diffusers' ModelMixin.__getattr__).
    def _init_sizes(self) -> None:
        fields = {k: v for k, v in self.config.items() if not k.startswith("_")}
        fields["qformer"] = fields.pop("qformer_config")
        fields["image_proj"] = fields.pop("image_proj_config")
        self.sizes = AdapterConfig.from_dict({**fields, "extra": fields.get("extra") or {}})

    @classmethod
    def from_sizes(cls, sizes: AdapterConfig) -> UniPortraitAdapter:
        fields = sizes.to_dict()
        fields["qformer_config"] = fields.pop("qformer")
        fields["image_proj_config"] = fields.pop("image_proj")
        return cls(**fields)

    @property
    def layers(self) -> list[LayerSpec]:
        """The UNet attention layers this adapter serves, in ``unet.attn_processors`` order."""
        return self.sizes.layers

    def check_unet(self, unet: nn.Module) -> None:
        names = list(unet.attn_processors)
        expected = [layer.name for layer in self.layers]
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
        names = [layer.name for layer in self.layers]
        unet.set_attn_processor({n: AttachedProcessor(p) for n, p in zip(names, self.processors)})

    def is_attached(self, unet: nn.Module) -> bool:
        """Whether every attention layer of ``unet`` runs this adapter's processor."""
        installed = list(unet.attn_processors.values())
        return len(installed) == len(self.processors) and all(
            isinstance(h, AttachedProcessor) and h.processor is p for h, p in zip(installed, self.processors)
        )

    # -- named state dict (our format) ---------------------------------------------------------

    def _index_to_name(self) -> dict[str, str]:
        return {str(i): layer.name.removesuffix(PROCESSOR_SUFFIX) for i, layer in enumerate(self.layers)}

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
        try:
            load_state_dict_strict(self, self.named_to_internal(named), what)
        except CheckpointError as err:  # report keys in the names the user sees
            raise CheckpointError(self._with_layer_names(str(err), "attn_processors.{name}.")) from None

    def load_checkpoint_state(self, state: Mapping[str, torch.Tensor], what: str) -> None:
        """Load our diffusers-format state dict strictly; errors also name each key's layer."""
        try:
            load_state_dict_strict(self, state, what)
        except CheckpointError as err:
            names = self._index_to_name()
            mentioned = dict.fromkeys(re.findall(r"processors\.(\d+)\.", str(err)))
            layers = ", ".join(f"processors.{i} = {names[i]}" for i in mentioned if i in names)
            raise CheckpointError(f"{err} ({layers})" if layers else str(err)) from None

    def _with_layer_names(self, message: str, template: str) -> str:
        names = self._index_to_name()
        for index, name in sorted(names.items(), key=lambda kv: -len(kv[0])):
            message = message.replace(f"processors.{index}.", template.format(index=index, name=name))
        return message

    # -- files ---------------------------------------------------------------------------------

    def save_pretrained(
        self, save_directory: str | os.PathLike, face_backbone: nn.Module | None = None, **kwargs: Any
    ) -> Path:
        """diffusers' ``save_pretrained`` (+ the face backbone in ``face_backbone/``), atomically.

        Written into a temporary folder first and moved into place, so a failure leaves
        nothing half-written. ``kwargs`` go to diffusers' ``ModelMixin.save_pretrained``.
        """
        from uniportrait.atomic import atomic_directory

        directory = Path(save_directory)
        with atomic_directory(directory) as tmp:
            super().save_pretrained(tmp, **kwargs)
            if face_backbone is not None:
                face_backbone.save_pretrained(tmp / BACKBONE_FOLDER)
        return directory

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args: Any, **kwargs: Any) -> UniPortraitAdapter:
        """diffusers' loader; also reads the first round's folder (``adapter.safetensors``)."""
        folder = Path(str(pretrained_model_name_or_path)) / (kwargs.get("subfolder") or "")
        if (folder / ADAPTER_WEIGHTS).is_file():
            adapter, _ = read_adapter_files(folder)
            return adapter.to(kwargs["torch_dtype"]) if kwargs.get("torch_dtype") else adapter
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)


def is_adapter_folder(path: Path) -> bool:
    """A folder written by :meth:`UniPortraitAdapter.save_pretrained` (this round's or the first's)."""
    if not (path / ADAPTER_CONFIG).is_file():
        return False
    return (path / ADAPTER_WEIGHTS).is_file() or (path / MODEL_WEIGHTS).is_file()


def read_adapter_files(
    files: Mapping[str, Any] | str | Path,
) -> tuple[UniPortraitAdapter, IRBackbone | None]:
    """Load our format from a folder, or from a dict mirroring it (file name → content).

    The dict form mirrors the folder: ``{"config.json": dict, "diffusion_pytorch_model.safetensors":
    state dict, "face_backbone": {"config.json": dict, "diffusion_pytorch_model.safetensors": state
    dict} (optional)}``, or the first round's ``{"config.json": dict, "adapter.safetensors": state
    dict, "face_backbone.safetensors": state dict (optional)}``.
    """
    if isinstance(files, (str, Path)):
        folder = Path(files)
        if not is_adapter_folder(folder):
            raise WeightsNotFoundError(f"{folder} has no {ADAPTER_CONFIG} + {MODEL_WEIGHTS}")
        config = _read_json(folder / ADAPTER_CONFIG)
        if config.get("format") != FORMAT_NAME:  # this round's (diffusers) folder
            adapter = UniPortraitAdapter.from_pretrained(folder)
            backbone = None
            if (folder / BACKBONE_FOLDER).is_dir():
                backbone = IRBackbone.from_pretrained(folder / BACKBONE_FOLDER).eval()
            return adapter.eval(), backbone
        content = {ADAPTER_CONFIG: config, ADAPTER_WEIGHTS: load_file(str(folder / ADAPTER_WEIGHTS))}
        if (folder / BACKBONE_WEIGHTS).is_file():
            content[BACKBONE_WEIGHTS] = load_file(str(folder / BACKBONE_WEIGHTS))
        where = str(folder)
    else:
        content, where = dict(files), "in-memory adapter"
    config = content.get(ADAPTER_CONFIG)
    if isinstance(config, Mapping) and config.get("_class_name") == UniPortraitAdapter.__name__:
        adapter = load_sized_model(UniPortraitAdapter, config, content.get(MODEL_WEIGHTS), where)
        backbone = None
        if BACKBONE_FOLDER in content:
            sub = content[BACKBONE_FOLDER]
            backbone = load_sized_model(
                IRBackbone, sub.get(ADAPTER_CONFIG), sub.get(MODEL_WEIGHTS), f"{where}/{BACKBONE_FOLDER}"
            )
        return adapter.eval(), backbone
    if not isinstance(config, Mapping) or config.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{where}: {ADAPTER_CONFIG} is not a UniPortraitAdapter config")
    if config.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{where}: format version {config.get('version')} is not {FORMAT_VERSION}")
    unknown = sorted(set(config) - {"format", "version", "adapter", "face_backbone"})
    if unknown:
        raise ConfigError(f"{where}: unknown {ADAPTER_CONFIG} keys: {', '.join(unknown)}")
    if not isinstance(config.get("adapter"), Mapping):
        raise ConfigError(f"{where}: {ADAPTER_CONFIG} has no 'adapter' object")
    adapter = UniPortraitAdapter.from_sizes(AdapterConfig.from_dict(config["adapter"]))
    adapter.load_named_state_dict(content[ADAPTER_WEIGHTS], f"{where}/{ADAPTER_WEIGHTS}")
    backbone = None
    if config.get("face_backbone") is not None:
        if BACKBONE_WEIGHTS not in content:
            raise CheckpointError(f"{where}: config names a face backbone but {BACKBONE_WEIGHTS} is missing")
        backbone = IRBackbone.from_sizes(IRBackboneConfig.from_dict(config["face_backbone"]))
        load_state_dict_strict(backbone, content[BACKBONE_WEIGHTS], f"{where}/{BACKBONE_WEIGHTS}")
        backbone.eval()
    return adapter.eval(), backbone


def _read_json(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return config
