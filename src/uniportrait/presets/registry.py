"""The presets and their generation defaults: the one place each preset is defined.

Adding a preset is one :class:`Preset` entry here (its builder is a function that takes
``device`` and ``torch_dtype`` plus its own keyword arguments and returns a
:class:`~uniportrait.pipeline.UniPortraitPipeline`). The command line, the server, the demo,
the evaluation grid and the pipeline's own call defaults all read :class:`PresetDefaults` from
here. This module imports nothing heavy, so the command line can list the presets cheaply.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from uniportrait.errors import UniPortraitError
from uniportrait.settings import STEPS

__all__ = ["PRESETS", "Preset", "PresetDefaults", "get_preset", "preset_defaults"]


@dataclass(frozen=True)
class PresetDefaults:
    """What a call uses when it does not say: image side (pixels) and denoising steps."""

    side: int
    steps: int


@dataclass(frozen=True)
class Preset:
    """A named pipeline: ``builder`` is ``"module:function"``, imported when the preset is built."""

    name: str
    builder: str
    defaults: PresetDefaults
    summary: str
    needs_weights: bool = True  # False: builds offline (random or shipped weights)
    face_analyzer: str = "mtcnn"  # what finds and aligns faces in its photos (uniportrait.faces)

    def build_function(self) -> Callable:
        module, func = self.builder.split(":")
        return getattr(importlib.import_module(module), func)


#: Every preset, by name.
PRESETS: Mapping[str, Preset] = MappingProxyType(
    {
        p.name: p
        for p in (
            Preset(
                "tiny",
                "uniportrait.presets.pipelines:build_tiny_pipeline",
                # The UNet's native 32x32 latents; few steps, since the random weights make noise.
                PresetDefaults(side=256, steps=10),
                "offline, random weights (tests and the demo)",
                needs_weights=False,
            ),
            Preset(
                "sd15",
                "uniportrait.presets.pipelines:build_sd15_pipeline",
                PresetDefaults(side=512, steps=STEPS.default),  # as published: 512 px, 25 DDIM steps
                "the published weights (Realistic Vision 5.1 + UniPortrait)",
            ),
            Preset(
                "world",
                "uniportrait.presets.pipelines:build_world_pipeline",
                PresetDefaults(side=64, steps=STEPS.default),  # 64 px portraits, 25 DDIM steps
                "offline, the identity world's trained models (docs/world.md); pictures of world people",
                needs_weights=False,
                face_analyzer="world",
            ),
        )
    }
)


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise UniPortraitError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}") from None


def preset_defaults(name: str) -> PresetDefaults:
    return get_preset(name).defaults
