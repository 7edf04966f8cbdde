"""Small shared pieces for our nn.Modules."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers import ConfigMixin, ModelMixin


class DeviceDtypeMixin:
    """``device``/``dtype`` read from the module's first parameter (as diffusers models have)."""

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device  # type: ignore[attr-defined]

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype  # type: ignore[attr-defined]


DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"


def load_sized_model(cls, config: Any, state: Any, where: str):
    """``cls`` built from ``config`` (diffusers' or a first-round dataclass dict), ``state`` loaded strictly."""
    from uniportrait.errors import CheckpointError, WeightsNotFoundError

    if not isinstance(config, dict):
        raise CheckpointError(f"{where}: config.json must hold a JSON object")
    if state is None:
        raise WeightsNotFoundError(f"{where}: the weights file is missing")
    try:
        if "_class_name" in config:
            if config["_class_name"] != cls.__name__:
                raise CheckpointError(f"{where} holds a {config['_class_name']}, not a {cls.__name__}")
            model = cls(**{k: v for k, v in config.items() if not k.startswith("_")})
        else:  # the first round's config.json: the dataclass's fields only
            model = cls.from_sizes(cls.sizes_class.from_dict(config))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: bad config: {exc}") from None
    model.load_checkpoint_state(state, where)
    return model


class SizedModelMixin(ModelMixin, ConfigMixin):
    """diffusers' ``ModelMixin`` + ``ConfigMixin`` for a module whose sizes are a config dataclass.

    The ``__init__`` takes the dataclass's fields as keyword arguments (``@register_to_config``),
    so ``save_pretrained``/``from_pretrained``, ``model_index.json``, dtype/device handling and
    offloading work as for any diffusers model. ``self.sizes`` is the typed view of the config
    (``sizes_class``); ``Model.from_sizes(sizes)`` builds from one.

    Folders of the first round (``config.json`` with the dataclass's fields only +
    ``model.safetensors``) are still read by :meth:`from_pretrained`.
    """

    config_name = "config.json"
    sizes_class: ClassVar[type]

    def _init_sizes(self) -> None:
        """Validate the registered config through the dataclass; keep it as ``self.sizes``.

        Config keys must not be submodule names (diffusers resolves attributes to the config first).
        """
        fields = {k: v for k, v in self.config.items() if not k.startswith("_")}
        self.sizes = self.sizes_class.from_dict(fields)

    def load_checkpoint_state(self, state: Any, what: str) -> None:
        """Load a state dict strictly (missing/unexpected/mis-shaped keys raise ``CheckpointError``)."""
        from uniportrait.models._loading import load_state_dict_strict

        load_state_dict_strict(self, state, what)

    @classmethod
    def from_sizes(cls, sizes: Any):
        return cls(**sizes.to_dict())

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args: Any, **kwargs: Any):
        """Load a saved model; strict keys and shapes for local folders.

        A local folder is read here (this round's diffusers layout, or the first round's
        ``config.json`` + ``model.safetensors``), honouring ``subfolder`` and ``torch_dtype``;
        anything else goes to diffusers' ``ModelMixin.from_pretrained``.
        """
        from safetensors.torch import load_file

        from uniportrait.models._loading import CONFIG_NAME, WEIGHTS_NAME

        folder = Path(str(pretrained_model_name_or_path)) / (kwargs.get("subfolder") or "")
        if (folder / CONFIG_NAME).is_file():
            config = json.loads((folder / CONFIG_NAME).read_text())
            weights = folder / (DIFFUSERS_WEIGHTS if "_class_name" in config else WEIGHTS_NAME)
            state = load_file(str(weights)) if weights.is_file() else None
            model = load_sized_model(cls, config, state, str(folder))
            dtype = kwargs.get("torch_dtype")
            return (model.to(dtype) if dtype is not None else model).eval()
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except OSError as exc:  # diffusers: not found locally, in the cache, nor on the Hub
            from uniportrait.errors import WeightsNotFoundError

            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise WeightsNotFoundError(
                f"{cls.__name__}: cannot load {pretrained_model_name_or_path}: {first}"
            ) from None
