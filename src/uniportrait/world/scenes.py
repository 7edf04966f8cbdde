"""Scenes of one to four people, their captions, and the picture sizes of the world.

A :class:`SceneSpec` is everything needed to draw one picture: the people (identity + look), the
scene style, and which attributes the caption mentions. :func:`caption` writes it as free
natural language from templates ("two people smiling on a beach, the one on the left wearing a
red hat"); attributes the caption does not mention were drawn at random and are not asked for.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from uniportrait.world.render import Person, Rendered, render
from uniportrait.world.traits import (
    BACKGROUNDS,
    COLOURS,
    EXPRESSIONS,
    EYE_COLOURS,
    HAIR_COLOURS,
    HATS,
    HELD_OUT_START,
    LIGHTING,
    PERSON_ATTRIBUTES,
    SCENE_ATTRIBUTES,
    STYLES,
    SceneStyle,
    Traits,
    sample_look,
    sample_scene_style,
)

#: Picture size (width, height) by number of people: 64 px portraits, 128×64 groups.
SIZES: dict[int, tuple[int, int]] = {1: (64, 64), 2: (128, 64), 3: (128, 64), 4: (128, 64)}
#: Face size unit (picture px) range by number of people, per framing. ``"wide"`` is the world's
#: framing (a portrait's head about 20 × 28 px); ``"close"`` frames each face about 1.6 times as
#: large (a portrait's head about 36 × 46 px), so a face covers about 2.6 times the latent pixels
#: (docs/world.md, "Closer framing"). Heads never overlap in either.
FRAMINGS: dict[str, dict[int, tuple[float, float]]] = {
    "wide": {1: (10.0, 12.5), 2: (9.0, 11.0), 3: (8.0, 9.5), 4: (6.5, 7.5)},
    "close": {1: (17.0, 20.0), 2: (14.0, 16.0), 3: (12.0, 13.5), 4: (9.0, 10.0)},
}
_COUNT_WORDS = {1: "a person", 2: "two people", 3: "three people", 4: "four people"}
_POSITION_WORDS = {
    2: ("the one on the left", "the one on the right"),
    3: ("the one on the left", "the one in the middle", "the one on the right"),
    4: (
        "the first from the left",
        "the second from the left",
        "the third from the left",
        "the one on the right",
    ),
}
_EXPRESSION_PHRASES = ("with a neutral face", "smiling", "with an open mouth", "with closed eyes")
_GROUP_EXPRESSION = ("with neutral faces", "smiling", "with open mouths", "with closed eyes")
_BACKGROUND_PHRASES = (
    "on a beach",
    "in a forest",
    "in a city",
    "against a blue background",
    "against a pink background",
    "against a grey background",
)
_LIGHTING_PHRASES = ("in soft front light", "lit from the left", "lit from the right", "lit from above")
_STYLE_PHRASES = ("a photo of", "a pencil sketch of", "a painting of")
_TILT_PHRASES = (
    "with the head tilted to the left",
    "with the head upright",
    "with the head tilted to the right",
)
_HAT_PHRASES = ("no hat", *(f"a {colour} hat" for colour in HATS[1:]))
_SUNGLASSES_PHRASES = ("no sunglasses", "sunglasses")

#: Attribute → its phrases by value (index = value), for the attributes whose phrase names one
#: value alone in a one-person caption.
PHRASES: dict[str, tuple[str, ...]] = {
    "background": _BACKGROUND_PHRASES,
    "lighting": _LIGHTING_PHRASES,
    "style": _STYLE_PHRASES,
    "expression": _EXPRESSION_PHRASES,
    "tilt": _TILT_PHRASES,
    "clothing": tuple(f"a {c} shirt" for c in COLOURS),
    "hat": _HAT_PHRASES,
    "sunglasses": _SUNGLASSES_PHRASES,
}
#: The attributes :func:`phrase` words.
PHRASED_ATTRIBUTES = tuple(PHRASES)


def phrase(name: str, value: int) -> str:
    """The words a one-person caption uses for attribute ``name`` at ``value`` ("smiling", "a red
    shirt", "in a forest"), for the attributes in :data:`PHRASED_ATTRIBUTES`."""
    return PHRASES[name][value]


@dataclass(frozen=True)
class SceneSpec:
    """One picture to draw: people left to right, the scene, and what the caption mentions.

    ``mentions`` holds scene attribute names and ``(person index, attribute name)`` pairs.
    """

    people: tuple[Person, ...]
    scene: SceneStyle
    width: int
    height: int
    seed: int
    mentions: frozenset = field(default_factory=frozenset)

    def render(self) -> Rendered:
        # draw smaller (farther) people first so nearer ones are in front
        order = sorted(range(len(self.people)), key=lambda i: self.people[i].look.size)
        out = render([self.people[i] for i in order], self.scene, self.width, self.height, self.seed)
        inverse = np.argsort(order)  # back to left-to-right order
        out.boxes, out.landmarks, out.masks = out.boxes[inverse], out.landmarks[inverse], out.masks[inverse]
        out.people = list(self.people)
        return out

    def requested(self) -> dict:
        """What the caption asks for: ``{"scene": {name: value}, "people": [{name: value}, …]}``."""
        scene = {name: self.scene.attribute(name) for name in SCENE_ATTRIBUTES if name in self.mentions}
        people = [
            {name: p.look.attribute(name) for name in PERSON_ATTRIBUTES if (i, name) in self.mentions}
            for i, p in enumerate(self.people)
        ]
        return {"scene": scene, "people": people}


def identity_number(index: int, held_out: bool) -> int:
    """The identity number of the ``index``-th training (or held-out) identity."""
    return index + (HELD_OUT_START if held_out else 0)


def layout(
    num_people: int, rng: np.random.Generator, framing: str = "wide"
) -> list[tuple[float, float, float]]:
    """(cx, cy, unit) of each face, left to right, so that heads do not overlap."""
    width, height = SIZES[num_people]
    lo, hi = FRAMINGS[framing][num_people]
    slot = width / num_people
    places = []
    for k in range(num_people):
        unit = float(rng.uniform(lo, hi))
        jitter = max(0.0, slot / 2 - 1.45 * unit) * 0.6
        cx = slot * (k + 0.5) + float(rng.uniform(-jitter, jitter))
        cy = height * 0.42 + float(rng.uniform(-0.06, 0.06)) * height
        places.append((cx, cy, unit))
    return places


def sample_spec(
    rng: np.random.Generator,
    identities: list[int],
    seed: int,
    mention_p: float = 0.7,
    look: dict | None = None,
    scene: dict | None = None,
    framing: str = "wide",
) -> SceneSpec:
    """A random scene of these identities (left to right).

    ``look``/``scene`` pin attributes (by name) for every person / the scene; pinned attributes
    are always mentioned. Other attributes are mentioned with probability ``mention_p``.
    ``framing``: a :data:`FRAMINGS` name, how large the faces are drawn.
    """
    n = len(identities)
    if n not in SIZES:
        raise ValueError(f"a world scene has 1 to 4 people, got {n}")
    if framing not in FRAMINGS:
        raise ValueError(f"unknown framing {framing!r}: one of {', '.join(FRAMINGS)}")
    look, scene = dict(look or {}), dict(scene or {})
    style = sample_scene_style(rng, **scene)
    people = tuple(
        Person(identity=ident, traits=Traits.of(ident), look=sample_look(rng, cx, cy, unit, **look))
        for ident, (cx, cy, unit) in zip(identities, layout(n, rng, framing))
    )
    mentions = set()
    for name in SCENE_ATTRIBUTES:
        if name in scene or rng.random() < mention_p:
            mentions.add(name)
    for i in range(n):
        for name in PERSON_ATTRIBUTES:
            p = mention_p if n == 1 else mention_p * 0.6
            if name == "tilt":
                p *= 0.5
            if name in look or rng.random() < p:
                mentions.add((i, name))
    width, height = SIZES[n]
    return SceneSpec(people, style, width, height, seed, frozenset(mentions))


def _person_phrases(spec: SceneSpec, i: int, skip: set[str]) -> list[str]:
    look = spec.people[i].look
    phrases = []
    wear = []
    if (i, "clothing") in spec.mentions and "clothing" not in skip:
        wear.append(phrase("clothing", look.clothing))
    if (i, "hat") in spec.mentions and "hat" not in skip:
        wear.append(phrase("hat", look.hat))
    if (i, "sunglasses") in spec.mentions and "sunglasses" not in skip:
        wear.append(phrase("sunglasses", look.sunglasses))
    if wear:
        phrases.append(
            "wearing " + (" and ".join(wear) if len(wear) < 3 else ", ".join(wear[:-1]) + " and " + wear[-1])
        )
    if (i, "expression") in spec.mentions and "expression" not in skip:
        phrases.append(phrase("expression", look.expression))
    if (i, "tilt") in spec.mentions and "tilt" not in skip:
        phrases.append(phrase("tilt", look.tilt))
    return phrases


def caption(spec: SceneSpec, rng: np.random.Generator | None = None) -> str:
    """The caption of ``spec`` in natural language (clause order varies with ``rng``)."""
    rng = rng or np.random.default_rng(spec.seed)
    n = len(spec.people)
    head = f"{phrase('style', spec.scene.style)} " if "style" in spec.mentions else ""
    subject = _COUNT_WORDS[n]
    if not head and rng.random() < 0.5:
        subject = subject.replace("a person", "one person") if n == 1 else subject
    clauses: list[str] = []
    shared: set[str] = set()
    if n > 1:  # an expression all share is said once for the group
        exprs = {p.look.expression for p in spec.people}
        if len(exprs) == 1 and all((i, "expression") in spec.mentions for i in range(n)):
            clauses.append(_GROUP_EXPRESSION[exprs.pop()])
            shared.add("expression")
    if "background" in spec.mentions:
        clauses.append(phrase("background", spec.scene.background))
    if "lighting" in spec.mentions:
        clauses.append(phrase("lighting", spec.scene.lighting))
    if n == 1:
        clauses.extend(_person_phrases(spec, 0, shared))
        order = rng.permutation(len(clauses))
        body = ", ".join(clauses[k] for k in order)
        return f"{head}{subject}" + (f" {body}" if body else "")
    scene_part = " ".join(clauses[:1]) + (", " + ", ".join(clauses[1:]) if len(clauses) > 1 else "")
    per_person = []
    for i in range(n):
        phrases = _person_phrases(spec, i, shared)
        if phrases:
            per_person.append(f"{_POSITION_WORDS[n][i]} {' and '.join(phrases)}")
    text = f"{head}{subject}" + (f" {scene_part}" if scene_part else "")
    if per_person:
        text += ", " + ", ".join(per_person)
    return text


_COUNT_BY_WORDS = {**{words: n for n, words in _COUNT_WORDS.items()}, "one person": 1}
_SCENE_READ = {"style": _STYLE_PHRASES, "background": _BACKGROUND_PHRASES, "lighting": _LIGHTING_PHRASES}
_PERSON_READ = {name: PHRASES[name] for name in ("expression", "tilt", "clothing", "hat", "sunglasses")}


def _find(text: str, phrases: tuple[str, ...]) -> list[tuple[int, int, int]]:
    """(start, end, index) of every whole-word occurrence of ``phrases`` in ``text``."""
    out = []
    for index, words in enumerate(phrases):
        if words:
            pattern = r"(?<![a-z])" + re.escape(words) + r"(?![a-z])"
            out.extend((m.start(), m.end(), index) for m in re.finditer(pattern, text))
    return out


def _read(text: str, table: dict[str, tuple[str, ...]]) -> tuple[dict[str, int], str]:
    """The attributes of ``table`` that ``text`` names one value of, and ``text`` with their
    words blanked out. Longer phrases win ("no sunglasses" before "sunglasses"); an attribute
    named with two different values is left out (not asked)."""
    hits = []
    for name, phrases in table.items():
        hits.extend((start, end, name, index) for start, end, index in _find(text, phrases))
    hits.sort(key=lambda h: (h[0] - h[1], h[0]))  # longest first
    taken = np.zeros(len(text), bool)
    values: dict[str, set[int]] = {}
    for start, end, name, index in hits:
        if taken[start:end].any():
            continue
        taken[start:end] = True
        values.setdefault(name, set()).add(index)
    blanked = "".join(" " if t else c for c, t in zip(text, taken))
    return {name: v.pop() for name, v in values.items() if len(v) == 1}, blanked


def read_caption(text: str, num_people: int | None = None) -> dict:
    """What a caption asks for, read back from its words: ``{"count": n or None, "scene": {name:
    value}, "people": [{name: value}, …]}``, the layout of :meth:`SceneSpec.requested`.

    The inverse of :func:`caption` (``read_caption(caption(spec))`` gives ``spec.requested()``),
    and a reading of any prompt written in the world's phrases ("a person wearing a red hat on a
    beach"). The number of people comes from the count words ("two people"), else
    ``num_people``, else one. With several people, a person's attributes count only where a
    position phrase says whose they are ("the one on the left smiling"); before the first one,
    only a shared expression ("two people smiling") is read, for everyone.
    """
    text = " ".join(text.lower().split())
    # the templates say "a orange shirt"; a person writes "an orange shirt"
    text = re.sub(r"(?<![a-z])an (?=orange\b)", "a ", text)
    count_words = tuple(_COUNT_BY_WORDS)
    counts = {_COUNT_BY_WORDS[count_words[i]] for _, _, i in _find(text, count_words)}
    said = counts.pop() if len(counts) == 1 else None
    n = said or num_people or 1
    scene, rest = _read(text, _SCENE_READ)
    if n == 1:
        return {"count": said, "scene": scene, "people": [_read(rest, _PERSON_READ)[0]]}
    positions = sorted((start, i) for start, _, i in _find(rest, _POSITION_WORDS.get(n, ())))
    first = positions[0][0] if positions else len(rest)
    shared, _ = _read(rest[:first], {"expression": _GROUP_EXPRESSION})
    people: list[dict[str, int]] = [dict(shared) for _ in range(n)]
    whose: dict[int, list[str]] = {}
    for k, (start, i) in enumerate(positions):
        end = positions[k + 1][0] if k + 1 < len(positions) else len(rest)
        whose.setdefault(i, []).append(rest[start:end])
    for i, parts in whose.items():
        own, _ = _read(" | ".join(parts), _PERSON_READ)
        people[i].update(own)
    return {"count": said, "scene": scene, "people": people}


_HAIR_STYLE_PHRASES = ("bald", "short", "long", "bob", "spiky", "bun", "curly")
_FACIAL_HAIR_PHRASES = ("no beard", "a moustache", "a beard", "a goatee")
_MOLE_PHRASES = ("", "a mole on the left cheek", "a mole on the right cheek", "a mole on the chin")


def _third(value: float, low: str, mid: str, high: str) -> str:
    return low if value < 1 / 3 else high if value > 2 / 3 else mid


def identity_phrase(traits: Traits, rng: np.random.Generator, p: float = 0.5) -> str:
    """Words for some of a person's identity traits ("with curly red hair, a beard and blue eyes").

    World captions never describe identity; these phrases are for experiments that teach the base
    model to steer identity traits through its text cross-attention, as SD learnt from captions
    like "a bearded man with red hair" (docs/world.md). Each trait is said with probability ``p``;
    the phrase is empty when none is.
    """
    parts: list[str] = []
    if rng.random() < p:
        style, colour = traits.hair_style, HAIR_COLOURS[traits.hair_colour]
        if style == 0:
            parts.append("a bald head")
        elif style in (3, 5):
            parts.append(f"{colour} hair in a {_HAIR_STYLE_PHRASES[style]}")
        else:
            parts.append(f"{_HAIR_STYLE_PHRASES[style]} {colour} hair")
    if rng.random() < p:
        parts.append(f"{EYE_COLOURS[traits.eye_colour]} eyes")
    if rng.random() < p:
        parts.append(_FACIAL_HAIR_PHRASES[traits.facial_hair])
    if rng.random() < p:
        parts.append(_third(traits.skin, "light skin", "medium skin", "dark skin"))
    if rng.random() < p:
        parts.append(_third(traits.head_width, "a narrow face", "an oval face", "a wide face"))
    if rng.random() < p:
        parts.append(_third(traits.jaw, "a pointed chin", "a round chin", "a square jaw"))
    if traits.mole and rng.random() < p:
        parts.append(_MOLE_PHRASES[traits.mole])
    if not parts:
        return ""
    order = rng.permutation(len(parts))
    parts = [parts[k] for k in order]
    return "with " + (parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1])


def identity_vocabulary() -> list[str]:
    """Every word :func:`identity_phrase` can use."""
    words = {"with", "and", "a", "an", "hair", "in", "eyes", "head", "skin", "face", "chin", "jaw"}
    phrases = [
        *_HAIR_STYLE_PHRASES,
        *HAIR_COLOURS,
        *EYE_COLOURS,
        *_FACIAL_HAIR_PHRASES,
        *_MOLE_PHRASES,
        "light medium dark narrow oval wide pointed round square",
    ]
    for phrase in phrases:
        words.update(phrase.split())
    return sorted(words)


def vocabulary() -> list[str]:
    """Every word a caption can use (for the world's tokenizer)."""
    words: set[str] = set()
    phrases = [
        *_COUNT_WORDS.values(),
        "one person",
        *(w for ws in _POSITION_WORDS.values() for w in ws),
        *_EXPRESSION_PHRASES,
        *_GROUP_EXPRESSION,
        *_BACKGROUND_PHRASES,
        *_LIGHTING_PHRASES,
        *_STYLE_PHRASES,
        *_TILT_PHRASES,
        "wearing a shirt and hat no sunglasses",
        *COLOURS,
        *HATS,
    ]
    for phrase in phrases:
        words.update(phrase.replace(",", " ").split())
    return sorted(words)


__all__ = [
    "BACKGROUNDS",
    "EXPRESSIONS",
    "FRAMINGS",
    "LIGHTING",
    "SIZES",
    "STYLES",
    "SceneSpec",
    "caption",
    "identity_number",
    "identity_phrase",
    "identity_vocabulary",
    "layout",
    "read_caption",
    "sample_spec",
    "vocabulary",
]
