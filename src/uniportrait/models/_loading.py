"""Shared helpers for model configs and weights: strict state-dict loading and config dicts.

The first round's single-model folder (``config.json`` with the dataclass's fields +
``model.safetensors``) is read by :class:`~uniportrait.models._mixins.SizedModelMixin`.

Nothing here loads silently: every mismatch between a checkpoint and a module is reported
by name as a :class:`~uniportrait.errors.CheckpointError`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any, TypeVar

import torch
from torch import nn

from uniportrait.errors import CheckpointError, ConfigError

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
