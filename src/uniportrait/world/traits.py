"""What a person of the identity world *is* (identity traits) and what a picture *shows* (the rest).

An identity is a :class:`Traits` value: continuous proportions in ``[0, 1]`` and discrete
choices (hair style, hair colour, eye colour, facial hair, mole). It is drawn deterministically
from an integer identity number, so "identity 1234" means the same person everywhere. Everything
else a picture shows (expression, head pose and size, hat, sunglasses, clothing, background,
lighting, style) is a :class:`Look` per person or a :class:`SceneStyle` per picture: these are
what captions control. See ``docs/world.md``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

# -- identity traits -----------------------------------------------------------------------------

#: Continuous traits, each a proportion in [0, 1] mapped to a drawing range by the renderer.
CONTINUOUS_TRAITS: tuple[str, ...] = (
    "head_width",  # face ellipse width
    "head_length",  # face ellipse height
    "jaw",  # narrow (pointed chin) → wide (square jaw)
    "skin",  # light → dark skin tone
    "skin_hue",  # cooler → warmer skin
    "eye_size",
    "eye_spacing",
    "brow",  # brow thickness
    "brow_tilt",  # brows sloping down → up towards the temples
    "nose_length",
    "nose_width",
    "mouth_width",
    "lips",  # lip thickness
    "ear_size",
    "hairline",  # low → high hairline
)

#: Discrete traits and their values (names are used in docs and reports).
HAIR_STYLES: tuple[str, ...] = ("bald", "short", "long", "bob", "spiky", "bun", "curly")
HAIR_COLOURS: tuple[str, ...] = ("black", "dark brown", "brown", "auburn", "blonde", "red", "grey", "white")
EYE_COLOURS: tuple[str, ...] = ("brown", "blue", "green", "grey", "amber")
FACIAL_HAIR: tuple[str, ...] = ("none", "moustache", "beard", "goatee")
MOLES: tuple[str, ...] = ("none", "left cheek", "right cheek", "chin")

DISCRETE_TRAITS: dict[str, tuple[str, ...]] = {
    "hair_style": HAIR_STYLES,
    "hair_colour": HAIR_COLOURS,
    "eye_colour": EYE_COLOURS,
    "facial_hair": FACIAL_HAIR,
    "mole": MOLES,
}
# Facial hair is rarer than none; the others are uniform.
_FACIAL_HAIR_P = (0.55, 0.15, 0.15, 0.15)

#: Seed offset of held-out identities: identity numbers at or above it are never trained on.
HELD_OUT_START = 1_000_000


@dataclass(frozen=True)
class Traits:
    """One person's identity: continuous proportions (``cont``, in [0, 1]) + discrete choices."""

    cont: tuple[float, ...]
    hair_style: int
    hair_colour: int
    eye_colour: int
    facial_hair: int
    mole: int

    def __post_init__(self) -> None:
        if len(self.cont) != len(CONTINUOUS_TRAITS):
            raise ValueError(
                f"Traits: {len(CONTINUOUS_TRAITS)} continuous values needed, got {len(self.cont)}"
            )

    def __getattr__(self, name: str) -> float:  # continuous traits by name: traits.jaw
        try:
            return self.cont[CONTINUOUS_TRAITS.index(name)]
        except ValueError:
            raise AttributeError(name) from None

    @classmethod
    def sample(cls, rng: np.random.Generator) -> Traits:
        cont = tuple(float(v) for v in rng.random(len(CONTINUOUS_TRAITS)))
        return cls(
            cont=cont,
            hair_style=int(rng.integers(len(HAIR_STYLES))),
            hair_colour=int(rng.integers(len(HAIR_COLOURS))),
            eye_colour=int(rng.integers(len(EYE_COLOURS))),
            facial_hair=int(rng.choice(len(FACIAL_HAIR), p=_FACIAL_HAIR_P)),
            mole=int(rng.integers(len(MOLES))),
        )

    @classmethod
    def of(cls, identity: int) -> Traits:
        """The traits of identity number ``identity`` (the same everywhere, for ever)."""
        return cls.sample(np.random.default_rng([identity, 0x1D]))

    def discrete(self) -> tuple[int, ...]:
        return tuple(getattr(self, name) for name in DISCRETE_TRAITS)

    def vector(self) -> np.ndarray:
        """(T,) float32: continuous values, then a one-hot per discrete trait (see :func:`trait_vector_size`)."""
        parts = [np.asarray(self.cont, dtype=np.float32)]
        for name, values in DISCRETE_TRAITS.items():
            one_hot = np.zeros(len(values), dtype=np.float32)
            one_hot[getattr(self, name)] = 1.0
            parts.append(one_hot)
        return np.concatenate(parts)

    def nudged(self, rng: np.random.Generator, amount: float) -> Traits:
        """A close identity: continuous traits moved by ``amount`` (std), discrete ones kept."""
        cont = np.clip(np.asarray(self.cont) + rng.normal(0.0, amount, len(self.cont)), 0.0, 1.0)
        return dataclasses.replace(self, cont=tuple(float(v) for v in cont))


def trait_vector_size() -> int:
    return len(CONTINUOUS_TRAITS) + sum(len(v) for v in DISCRETE_TRAITS.values())


# -- what captions control -----------------------------------------------------------------------

EXPRESSIONS: tuple[str, ...] = ("neutral", "smiling", "mouth open", "eyes closed")
COLOURS: tuple[str, ...] = ("red", "blue", "green", "yellow", "black", "white", "purple", "orange")
HATS: tuple[str, ...] = ("none", *COLOURS[:5])  # no hat, or a hat of one of five colours
BACKGROUNDS: tuple[str, ...] = ("beach", "forest", "city", "blue", "pink", "grey")
LIGHTING: tuple[str, ...] = ("front", "left", "right", "above")
STYLES: tuple[str, ...] = ("photo", "sketch", "painting")
#: Head roll (degrees) of the three tilt bins: left, upright, right (ground truth keeps the exact angle).
TILT_BINS: tuple[str, ...] = ("tilted left", "upright", "tilted right")

#: Per-person attributes a caption can mention, and their values.
PERSON_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "expression": EXPRESSIONS,
    "hat": HATS,
    "sunglasses": ("no", "yes"),
    "clothing": COLOURS,
    "tilt": TILT_BINS,
}
#: Picture-wide attributes a caption can mention.
SCENE_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "background": BACKGROUNDS,
    "lighting": LIGHTING,
    "style": STYLES,
}


@dataclass(frozen=True)
class Look:
    """How one person appears in a picture (not who they are).

    ``cx``, ``cy``: centre of the face in picture pixels; ``size``: half-width of the face
    ellipse's base unit in picture pixels; ``roll``: head tilt in degrees (positive = the head
    leans to the picture's right, i.e. clockwise).
    """

    expression: int
    hat: int
    sunglasses: int
    clothing: int
    roll: float
    cx: float
    cy: float
    size: float

    @property
    def tilt(self) -> int:
        """The tilt bin (index into :data:`TILT_BINS`)."""
        return 0 if self.roll < -6.0 else (2 if self.roll > 6.0 else 1)

    def attribute(self, name: str) -> int:
        return self.tilt if name == "tilt" else getattr(self, name)


@dataclass(frozen=True)
class SceneStyle:
    """Picture-wide attributes: background, lighting direction, style filter."""

    background: int
    lighting: int
    style: int

    def attribute(self, name: str) -> int:
        return getattr(self, name)


def sample_look(rng: np.random.Generator, cx: float, cy: float, size: float, **fixed: int) -> Look:
    """A random look at the given place; ``fixed`` pins attributes by name (e.g. ``hat=0``)."""
    values = {
        "expression": int(rng.integers(len(EXPRESSIONS))),
        "hat": int(rng.choice(len(HATS), p=[0.5] + [0.1] * 5)),
        "sunglasses": int(rng.random() < 0.2),
        "clothing": int(rng.integers(len(COLOURS))),
    }
    tilt = fixed.pop("tilt", None)
    values.update(fixed)
    if tilt is None:
        roll = float(rng.uniform(-18.0, 18.0))
    else:  # a roll inside the requested bin
        roll = float(
            {0: rng.uniform(-18.0, -8.0), 1: rng.uniform(-3.0, 3.0), 2: rng.uniform(8.0, 18.0)}[tilt]
        )
    return Look(roll=roll, cx=float(cx), cy=float(cy), size=float(size), **values)


def sample_scene_style(rng: np.random.Generator, **fixed: int) -> SceneStyle:
    values = {
        "background": int(rng.integers(len(BACKGROUNDS))),
        "lighting": int(rng.integers(len(LIGHTING))),
        "style": int(rng.choice(len(STYLES), p=(0.6, 0.2, 0.2))),
    }
    values.update(fixed)
    return SceneStyle(**values)
