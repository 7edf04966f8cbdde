"""Prompt following from attribute reads: how often a picture shows what its prompt asked for.

A *read* is one ``(attribute, asked value, read value)`` triple: an attribute the prompt asks for
(a hat's colour, the background) and the value an attribute classifier reads in the picture.
The identity world's oracles make them (``docs/world.md``); any classifier could.

- **Plain** prompt following: the share of reads where the value read is the one asked (every
  ask counts once).
- **Balanced**: per attribute, the mean over the values asked of the share read as asked, then
  the mean over attributes. Drawing an attribute's most common value every time (e.g. "no
  sunglasses", asked four times as often as "sunglasses") scores chance here, however common
  that value is.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

Read = tuple[str, int, int]  # (attribute, asked value, read value)


def value_name(attribute: str, value: int) -> str:
    """The name of an attribute's value ("hat", 1 → "red") where the attribute is the world's,
    else the number as text."""
    from uniportrait.world.traits import PERSON_ATTRIBUTES, SCENE_ATTRIBUTES

    names = {**PERSON_ATTRIBUTES, **SCENE_ATTRIBUTES}.get(attribute)
    return names[value] if names is not None and 0 <= value < len(names) else str(value)


def confusion_counts(reads: Iterable[Read]) -> dict[str, dict[int, dict[int, int]]]:
    """``{attribute: {asked value: {read value: count}}}`` of the reads, attributes sorted."""
    counts: dict[str, dict[int, dict[int, int]]] = {}
    for name, asked, read in reads:
        row = counts.setdefault(name, {}).setdefault(asked, {})
        row[read] = row.get(read, 0) + 1
    return dict(sorted(counts.items()))


def right_by_asked_value(rows: dict) -> dict:
    """One attribute's ``{asked value: {read value: count}}`` → ``{asked value: share read as asked}``."""
    return {asked: reads.get(asked, 0) / sum(reads.values()) for asked, reads in rows.items()}


def balanced_accuracy(rows: dict) -> float:
    """One attribute's ``{asked value: {read value: count}}`` → the mean over the values asked of
    the share read as asked (chance: 1 / the number of values asked)."""
    return float(np.mean(list(right_by_asked_value(rows).values())))


def summarize_reads(reads: Iterable[Read]) -> dict:
    """Plain and balanced prompt following of the reads, overall and per attribute.

    Returns ``{"asks", "prompt_following", "prompt_following_by_attribute",
    "prompt_following_balanced", "prompt_following_balanced_by_attribute"}``; the shares are
    None when nothing was asked.
    """
    counts = confusion_counts(reads)
    hits = {name: sum(r.get(asked, 0) for asked, r in rows.items()) for name, rows in counts.items()}
    asks = {name: sum(sum(r.values()) for r in rows.values()) for name, rows in counts.items()}
    balanced = {name: balanced_accuracy(rows) for name, rows in counts.items()}
    total = sum(asks.values())
    return {
        "asks": total,
        "prompt_following": sum(hits.values()) / total if total else None,
        "prompt_following_by_attribute": {name: hits[name] / asks[name] for name in counts},
        "prompt_following_balanced": float(np.mean(list(balanced.values()))) if balanced else None,
        "prompt_following_balanced_by_attribute": balanced,
    }
