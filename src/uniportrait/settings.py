"""One definition of each generation setting: its default, its valid range, and the limits.

Every entry point checks a request with the same :class:`Setting` objects: the command line
(``uniportrait generate``), the server (REST API and web UI) and the pipeline's
``check_inputs``. A setting has

* a *valid range* that no entry point accepts a value outside of (``faceid_scale`` in [0, 2],
  ``width`` a positive multiple of 8, every number finite, ...), and
* for the settings that cost time or memory (steps, image side, images, people, prompt
  length), a *limit* from :class:`GenerationLimits` that the user raises explicitly: on the
  command line with ``--max-steps``/``--max-side``/``--max-images`` (``generate`` and
  ``serve``), in Python with ``pipe.generation_limits = GenerationLimits(max_side=2048)``
  (the pipeline applies its ``generation_limits`` too, so a typo cannot start a generation
  that never ends).

Defaults that depend on the model (image side, steps) belong to the preset, see
:mod:`uniportrait.presets.registry`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import Any, Literal

from uniportrait.errors import UniPortraitError

__all__ = [
    "FACEID_SCALE",
    "GUIDANCE_SCALE",
    "IDENTITY_GUIDANCE",
    "MULTI_ID_STRUCTURE_SCALE",
    "SETTINGS",
    "SINGLE_ID_STRUCTURE_SCALE",
    "GenerationLimits",
    "Setting",
    "SettingError",
    "check_prompt",
    "check_settings",
    "default_structure_scale",
    "widest_limits",
]

Style = Literal["cli", "api", "python"]


class SettingError(UniPortraitError):
    """A generation setting is outside its range or over a limit."""


@dataclass(frozen=True)
class GenerationLimits:
    """Caps on what one generation may cost; raise them explicitly when you mean to.

    The command line and the server use these defaults unless told otherwise
    (``--max-steps``, ``--max-images``, ``--max-side``; the server's ``--max-identities``).
    """

    max_steps: int = 50
    max_images: int = 4  # images per call
    max_identities: int = 4  # people per call
    max_side: int = 1024  # width and height, pixels
    max_prompt_chars: int = 1000  # prompt and negative prompt, each

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SettingError(f"limit {f.name} must be a positive integer, got {value!r}")


def widest_limits(a: GenerationLimits, b: GenerationLimits) -> GenerationLimits:
    """Each limit the larger of ``a``'s and ``b``'s (the pipeline under a server with raised limits)."""
    return GenerationLimits(
        **{f.name: max(getattr(a, f.name), getattr(b, f.name)) for f in fields(GenerationLimits)}
    )


#: Limit name → the command-line option that raises it.
LIMIT_FLAGS = MappingProxyType(
    {
        "max_steps": "--max-steps",
        "max_images": "--max-images",
        "max_identities": "--max-identities",
        "max_side": "--max-side",
        "max_prompt_chars": "--max-prompt-chars",
    }
)


@dataclass(frozen=True)
class Setting:
    """One generation setting.

    Attributes:
        name: the pipeline's argument (``num_inference_steps``).
        field: the REST API's form field (``steps``); the CLI option is ``--`` + field with
            dashes (``--steps``), unless ``flag`` says otherwise.
        low, high: the valid range (inclusive); ``high=None``: no upper bound of its own.
        default: the default (None: it depends on the preset or on the call, see ``help``).
        integer: whole numbers only.
        multiple_of: e.g. 8 for image sides (the VAE's downsampling).
        limit: the :class:`GenerationLimits` field that caps it, if any.
    """

    name: str
    field: str
    low: float
    high: float | None
    default: Any
    help: str
    integer: bool = False
    multiple_of: int | None = None
    limit: str | None = None
    flag: str | None = None

    @property
    def option(self) -> str:
        return self.flag or "--" + self.field.replace("_", "-")

    def label(self, style: Style) -> str:
        return {"cli": self.option, "api": self.field, "python": self.name}[style]

    def check(self, value: Any, limits: GenerationLimits | None = None, style: Style = "python") -> Any:
        """``value`` if it is valid (and within ``limits`` when given), else :class:`SettingError`."""
        label = self.label(style)
        kind = int if self.integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kind):
            what = "an integer" if self.integer else "a number"
            raise SettingError(f"{label} must be {what}, got {value!r}")
        if not math.isfinite(value):
            raise SettingError(f"{label} must be a finite number, got {value!r}")
        high, limit_note = self.high, ""
        if self.limit is not None and limits is not None:
            cap = getattr(limits, self.limit)
            if high is None or cap < high:
                high = cap
                limit_note = f" (limit {self.limit}{_raise_hint(self.limit, style)})"
        if value < self.low or (high is not None and value > high):
            bound = (
                f"between {_num(self.low)} and {_num(high)}"
                if high is not None
                else f"at least {_num(self.low)}"
            )
            note = limit_note if value > self.low else ""  # the limit only matters above
            raise SettingError(f"{label} must be {bound}, got {_num(value)}{note}")
        if self.multiple_of and value % self.multiple_of:
            raise SettingError(f"{label} must be a multiple of {self.multiple_of}, got {value}")
        return value


def _raise_hint(limit: str, style: Style) -> str:
    if style == "cli":
        return f"; raise it with {LIMIT_FLAGS[limit]}"
    if style == "python":
        return f"; raise it with pipe.generation_limits = GenerationLimits({limit}=...)"
    return ""  # the server's: only its operator raises it


def _num(x: float) -> str:
    return str(x)


SINGLE_ID_STRUCTURE_SCALE = 0.1
MULTI_ID_STRUCTURE_SCALE = 0.3

STEPS = Setting("num_inference_steps", "steps", 1, None, 25, "denoising steps (default: the preset's)",
                integer=True, limit="max_steps")  # fmt: skip
GUIDANCE_SCALE = Setting("guidance_scale", "guidance_scale", 0.0, 30.0, 7.5,
                         "classifier-free guidance scale (1 or less: no guidance)")  # fmt: skip
IDENTITY_GUIDANCE = Setting(
    "identity_guidance_scale", "identity_guidance", 0.0, 30.0, None,
    "guidance scale of the identities alone, apart from the text's (a value other than the "
    "guidance scale costs a third UNet pass per step)",
)  # fmt: skip
FACEID_SCALE = Setting(
    "faceid_scale", "faceid_scale", 0.0, 2.0, 0.7, "weight of the identities (0 ignores them)"
)
STRUCTURE_SCALE = Setting(
    "face_structure_scale", "structure_scale", 0.0, 1.0, None,
    f"face-structure scale (default {SINGLE_ID_STRUCTURE_SCALE} for one person, "
    f"{MULTI_ID_STRUCTURE_SCALE} for several)",
)  # fmt: skip
IP_SCALE = Setting("ip_scale", "ip_scale", 0.0, 2.0, 0.0, "weight of the IP-Adapter image prompt")
LORA_SCALE = Setting("lora_scale", "lora_scale", 0.0, 2.0, 1.0, "scale of the identity LoRA")
CONTROLNET_SCALE = Setting(
    "controlnet_conditioning_scale", "controlnet_scale", 0.0, 2.0, 1.0, "ControlNet strength"
)
ETA = Setting("eta", "eta", 0.0, 1.0, 0.0, "DDIM eta")
WIDTH = Setting("width", "width", 64, None, None, "image width, a multiple of 8 (default: the preset's)",
                integer=True, multiple_of=8, limit="max_side")  # fmt: skip
HEIGHT = Setting("height", "height", 64, None, None, "image height, a multiple of 8 (default: the preset's)",
                 integer=True, multiple_of=8, limit="max_side")  # fmt: skip
NUM_IMAGES = Setting("num_images_per_prompt", "num_images", 1, None, 1, "images per prompt",
                     integer=True, limit="max_images")  # fmt: skip
SEED = Setting("seed", "seed", 0, 2**63 - 1, None, "random seed", integer=True)
MIX_SCALE = Setting("mix_scale", "mix_scale", 0.0, 1.0, 0.0, "weight of a face blended into an identity")
STYLE_SCALE = Setting(
    "style_scale",
    "style_scale",
    0.0,
    2.0,
    1.0,
    "weight of the style image in shared attention (StyleAligned)",
)

#: Every setting, by its pipeline argument name.
SETTINGS: Mapping[str, Setting] = MappingProxyType(
    {
        s.name: s
        for s in (
            STEPS,
            GUIDANCE_SCALE,
            IDENTITY_GUIDANCE,
            FACEID_SCALE,
            STRUCTURE_SCALE,
            IP_SCALE,
            LORA_SCALE,
            CONTROLNET_SCALE,
            ETA,
            WIDTH,
            HEIGHT,
            NUM_IMAGES,
            SEED,
            MIX_SCALE,
            STYLE_SCALE,
        )  # fmt: skip
    }
)


def default_structure_scale(num_identities: int) -> float:
    return SINGLE_ID_STRUCTURE_SCALE if num_identities <= 1 else MULTI_ID_STRUCTURE_SCALE


def check_prompt(
    text: Any,
    label: str,
    limits: GenerationLimits | None = None,
    required: bool = True,
    style: Style = "python",
) -> None:
    """A prompt (or negative prompt): a string, non-empty when ``required``, within the length limit."""
    if not isinstance(text, str):
        raise SettingError(f"{label} must be a string, got {type(text).__name__}")
    if required and not text.strip():
        raise SettingError(f"{label} must not be empty")
    if limits is not None and len(text) > limits.max_prompt_chars:
        raise SettingError(
            f"{label} is {len(text)} characters; the limit is {limits.max_prompt_chars} "
            f"(max_prompt_chars{_raise_hint('max_prompt_chars', style)})"
        )


def check_settings(
    values: Mapping[str, Any],
    limits: GenerationLimits | None = None,
    style: Style = "python",
    num_identities: int | None = None,
) -> None:
    """Check every setting in ``values`` (pipeline argument names; None values are skipped).

    ``num_identities`` is checked against ``limits.max_identities``.
    """
    for name, value in values.items():
        if value is None:
            continue
        SETTINGS[name].check(value, limits, style)
    if num_identities is not None and limits is not None and num_identities > limits.max_identities:
        hint = _raise_hint("max_identities", style)
        raise SettingError(
            f"{num_identities} identities given; the limit is {limits.max_identities} per request{hint}"
        )
