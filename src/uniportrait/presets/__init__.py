"""Ready-made model presets: ``tiny`` (offline components for tests and the demo) and ``sd15``."""

from .pipelines import PRESETS, build_sd15_pipeline, build_tiny_pipeline, load_preset
from .tiny import (
    TINY_TOKENIZER_PATH,
    TinyBaseConfig,
    build_tiny_base,
    build_tiny_controlnet,
    load_tiny_tokenizer,
)

__all__ = [
    "PRESETS",
    "TINY_TOKENIZER_PATH",
    "TinyBaseConfig",
    "build_sd15_pipeline",
    "build_tiny_base",
    "build_tiny_controlnet",
    "build_tiny_pipeline",
    "load_preset",
    "load_tiny_tokenizer",
]
