"""What a base draws when a caption asks for each value of an attribute (asked vs read)::

    python scripts/world_attribute_confusion.py TABLE [TABLE ...]

``TABLE``: a folder written by ``scripts/world_base_table.py`` (its ``pictures_1.npz``, the 200
held-out portraits and their renders). Reads each picture's attributes with the oracles, as the
base table does (``report.attribute_reads``: person attributes on the detector's best face,
where it finds any), and counts, per attribute and per value the caption asked for, how often
each value was read, for the generated pictures and for the renders. Prints one JSON line per kind and writes
``TABLE/confusion.json``; with several tables (e.g. three seeds) the counts are summed into the
first table's file. Also gives each attribute's *balanced* accuracy: the mean over asked values
of the share read right, which a model that always draws the most common value cannot raise
(plain prompt following can).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def confusion(oracles, images: np.ndarray, specs) -> dict[str, dict[str, dict[str, int]]]:
    """{attribute: {asked value: {read value: count}}} over ``images`` made for ``specs``."""
    from uniportrait.evaluation.prompt_following import confusion_counts
    from uniportrait.world.report import attribute_reads
    from uniportrait.world.traits import PERSON_ATTRIBUTES, SCENE_ATTRIBUTES

    names = {**SCENE_ATTRIBUTES, **PERSON_ATTRIBUTES}
    detections = [oracles.detect(image) for image in images]
    counts = confusion_counts(attribute_reads(oracles, images, specs, detections))
    return {
        name: {names[name][a]: {names[name][r]: n for r, n in reads.items()} for a, reads in rows.items()}
        for name, rows in counts.items()
    }


def summarise(counts: dict) -> dict:
    """Per attribute: plain accuracy, balanced accuracy, and per asked value its share read right."""
    from uniportrait.evaluation.prompt_following import balanced_accuracy, right_by_asked_value

    out = {}
    for name, rows in sorted(counts.items()):
        right = right_by_asked_value(rows)
        total = sum(sum(r.values()) for r in rows.values())
        out[name] = {
            "accuracy": sum(r.get(a, 0) for a, r in rows.items()) / total,
            "balanced_accuracy": balanced_accuracy(rows),
            "right_by_asked_value": {a: round(v, 3) for a, v in sorted(right.items())},
            "asked": {a: sum(r.values()) for a, r in sorted(rows.items())},
        }
    return out


def merge(a: dict, b: dict) -> dict:
    for name, rows in b.items():
        for asked, reads in rows.items():
            row = a.setdefault(name, {}).setdefault(asked, {})
            for read, n in reads.items():
                row[read] = row.get(read, 0) + n
    return a


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tables", nargs="+", help="folders written by scripts/world_base_table.py")
    args = parser.parse_args(argv)
    tables = [Path(t) for t in args.tables]
    for t in tables:
        if not (t / "pictures_1.npz").is_file():
            parser.error(f"{t} has no pictures_1.npz (run scripts/world_base_table.py first)")

    from uniportrait.atomic import write_text_atomic
    from uniportrait.world.oracles import WorldOracles
    from uniportrait.world.report import held_out_specs

    oracles = WorldOracles()
    specs, _ = held_out_specs(200, 1, seed=5)  # the base table's portraits
    result = {}
    for kind in ("images", "renders"):
        counts: dict = {}
        for t in tables if kind == "images" else tables[:1]:  # the renders are the same in every table
            try:
                pictures = np.load(t / "pictures_1.npz")[kind]
            except (OSError, ValueError, KeyError) as err:
                parser.error(f"{t}/pictures_1.npz is not a base table's pictures ({err})")
            if len(pictures) != len(specs):
                parser.error(
                    f"{t}/pictures_1.npz holds {len(pictures)} portraits, not the table's {len(specs)}"
                )
            merge(counts, confusion(oracles, pictures, specs))
        result[kind] = {"summary": summarise(counts), "counts": counts}
        print(kind, json.dumps(result[kind]["summary"]), flush=True)
    write_text_atomic(tables[0] / "confusion.json", json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
