"""UniPortrait: identity-preserving single- and multi-person image generation on diffusers.

Heavy modules are imported on first use, so ``import uniportrait`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "UniPortraitPipeline": "uniportrait.pipeline",
    "UniPortraitPipelineOutput": "uniportrait.pipeline",
    "UniPortraitXLPipeline": "uniportrait.pipeline_xl",
    "Identity": "uniportrait.identity",
    "load_preset": "uniportrait.presets",
    "UniPortraitError": "uniportrait.errors",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'uniportrait' has no attribute {name!r}")
