"""Shared helpers for model configs and weights: strict state-dict loading, config dicts,
and the ``config.json`` + ``model.safetensors`` directory format.

Nothing here loads silently: every mismatch between a checkpoint and a module is reported
by name as a :class:`~uniportrait.errors.CheckpointError`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from uniportrait.errors import CheckpointError, ConfigError, WeightsNotFoundError

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

# How many offending keys an error message names per category.
_MAX_NAMED = 5

ConfigT = TypeVar("ConfigT")


def _name_some(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_NAMED])
    more = len(items) - _MAX_NAMED
    return f"{shown}, … (+{more} more)" if more > 0 else shown


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def load_state_dict_strict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str) -> None:
    """Copy ``state_dict`` into ``module``, requiring an exact match of keys and shapes.

    BatchNorm ``num_batches_tracked`` buffers may be absent from the checkpoint (they do not
    affect inference); the module keeps its own value for them. Values are cast to the dtype
    of the module's tensors by :meth:`torch.nn.Module.load_state_dict`.

    Args:
        module: the module to fill.
        state_dict: parameter/buffer name → tensor.
        what: a human-readable name of the checkpoint for error messages (e.g. a file path).

    Raises:
        CheckpointError: with the counts and the first few names of missing keys, unexpected
            keys and shape mismatches.
    """
    expected = module.state_dict()
    non_tensor = sorted(k for k, v in state_dict.items() if not isinstance(v, torch.Tensor))
    if non_tensor:
        raise CheckpointError(f"{what}: values are not tensors for keys {_name_some(non_tensor)}")

    missing = sorted(k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in state_dict if k not in expected)
    mismatched = sorted(
        f"{k} (checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    )
    problems = []
    if missing:
        problems.append(f"{_plural(len(missing), 'missing key')}: {_name_some(missing)}")
    if unexpected:
        problems.append(f"{_plural(len(unexpected), 'unexpected key')}: {_name_some(unexpected)}")
    if mismatched:
        problems.append(f"{_plural(len(mismatched), 'shape mismatch')}: {_name_some(mismatched)}")
    if problems:
        raise CheckpointError(f"{what} does not match {type(module).__name__}: " + "; ".join(problems))

    full = dict(state_dict)
    for k, v in expected.items():
        full.setdefault(k, v)  # only absent num_batches_tracked buffers reach this
    module.load_state_dict(full, strict=True)
    logger.debug("loaded %d tensors from %s into %s", len(state_dict), what, type(module).__name__)


def config_from_dict(cls: type[ConfigT], d: Mapping[str, Any]) -> ConfigT:
    """Build the config dataclass ``cls`` from ``d``, rejecting keys it does not define.

    Lists are turned into tuples for fields whose default is a tuple (JSON has no tuples).

    Raises:
        ConfigError: naming every unknown key, or a value the config refuses.
    """
    if not isinstance(d, Mapping):
        raise ConfigError(f"{cls.__name__}: expected a JSON object, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} keys: {', '.join(unknown)} (known: {', '.join(fields)})")
    kwargs = {}
    for name, value in d.items():
        default = fields[name].default
        kwargs[name] = tuple(value) if isinstance(default, tuple) and isinstance(value, list) else value
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:  # a value of the wrong type or out of range
        raise ConfigError(f"{cls.__name__}: {exc}") from None


def save_config_and_weights(module: nn.Module, config: Mapping[str, Any], directory: str | Path) -> Path:
    """Write ``config.json`` and ``model.safetensors`` for ``module`` into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_NAME).write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
    tensors = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    logger.info("saved %s to %s", type(module).__name__, directory)
    return directory


def read_config_and_weights(directory: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read what :func:`save_config_and_weights` wrote: (config dict, CPU state dict).

    Raises:
        WeightsNotFoundError: the directory or one of its two files is missing.
        CheckpointError: ``config.json`` is not a JSON object.
    """
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise WeightsNotFoundError(f"{path} not found (expected {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path} must hold a JSON object")
    return config, load_file(str(weights_path))


class ConfigWeightsMixin:
    """``save_pretrained``/``from_pretrained`` in the ``config.json`` + ``model.safetensors`` format.

    For modules built as ``cls(config)`` from a config dataclass with ``to_dict``/``from_dict``;
    subclasses name that dataclass in ``config_class``.
    """

    config_class: type

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json`` + ``model.safetensors`` into ``directory``."""
        return save_config_and_weights(self, self.config.to_dict(), directory)  # type: ignore[attr-defined]

    @classmethod
    def from_pretrained(cls, directory: str | Path):
        """Load what :meth:`save_pretrained` wrote (strict keys and shapes)."""
        config, state = read_config_and_weights(directory)
        model = cls(cls.config_class.from_dict(config))  # type: ignore[call-arg]
        load_state_dict_strict(model, state, what=str(directory))
        return model
