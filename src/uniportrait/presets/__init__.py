"""Ready-made model presets: ``tiny`` (offline components for tests and the demo) and ``sd15``.

Each preset and its generation defaults are defined once, in :mod:`uniportrait.presets.registry`.
The builders are imported on first use, so reading the registry stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

from .registry import PRESETS, Preset, PresetDefaults, get_preset, preset_defaults

_LAZY = {
    "build_sd15_pipeline": "uniportrait.presets.pipelines",
    "build_tiny_pipeline": "uniportrait.presets.pipelines",
    "load_preset": "uniportrait.presets.pipelines",
    "TINY_TOKENIZER_PATH": "uniportrait.presets.tiny",
    "TinyBaseConfig": "uniportrait.presets.tiny",
    "build_tiny_base": "uniportrait.presets.tiny",
    "build_tiny_controlnet": "uniportrait.presets.tiny",
    "load_tiny_tokenizer": "uniportrait.presets.tiny",
}

__all__ = [  # noqa: PLE0604
    "PRESETS",
    "Preset",
    "PresetDefaults",
    "get_preset",
    "preset_defaults",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'uniportrait.presets' has no attribute {name!r}")
