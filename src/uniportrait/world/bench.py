"""Benchmark specs of held-out world people for ``uniportrait eval --generate`` (docs/world.md).

``uniportrait world bench --out DIR`` renders one reference photo of each of a few held-out
identities (never trained on; a photo in front light, without hat or sunglasses, so it shows the face)
and writes two specs in the format of ``docs/evaluation.md``, with captions drawn fresh from the
world's templates:

- ``DIR/single.json``: every person × every one-person caption × every seed, 64×64;
- ``DIR/multi.json``: disjoint pairs (and, from six people, ``DIR/multi3.json``: disjoint
  triples) × group captions of that size, 128×64 as the world's group pictures;
- ``DIR/renders-X.jsonl`` beside each: the same people and captions *rendered*, as an
  ``eval --manifest``: the ceiling the generated grid is read against.

Then ``uniportrait eval --generate DIR/single.json --preset world --backend world --out …``
generates the grid and measures Face Sim, blending by trait attribution and prompt following
with the world's oracles.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from uniportrait.errors import UniPortraitError

#: Held-out identities the references are drawn from (those of the reports, docs/world.md).
BENCH_IDENTITIES = 200
#: A reference photo's pinned attributes: the face uncovered, a photo in front light.
PHOTO_LOOK = {"hat": 0, "sunglasses": 0}
PHOTO_SCENE = {"style": 0, "lighting": 0}


def _with_people(spec, identities: list[int]):
    """``spec`` (a caption's scene) drawn with these people in its people's places and looks."""
    from uniportrait.world.traits import Traits

    people = tuple(
        dataclasses.replace(p, identity=ident, traits=Traits.of(ident))
        for p, ident in zip(spec.people, identities)
    )
    return dataclasses.replace(spec, people=people)


def write_bench(
    out: str | Path, people: int = 8, prompts: int = 10, group_prompts: int = 4, seeds: int = 2, seed: int = 0
) -> list[Path]:
    """Write the reference photos, the specs and the renders' manifests into the new folder
    ``out`` (all or nothing); returns the specs' paths. ``out`` must not exist or be empty.

    For each spec ``X.json`` the folder also holds ``renders-X.jsonl``: an ``eval --manifest``
    of the same people and captions *rendered* (one picture per person or group and caption),
    the ceiling a generated grid is read against.
    """
    from PIL import Image

    from uniportrait.atomic import atomic_directory
    from uniportrait.world.report import held_out_specs
    from uniportrait.world.scenes import identity_number, sample_spec

    if not 2 <= people <= BENCH_IDENTITIES:
        raise UniPortraitError(f"--people must be 2 to {BENCH_IDENTITIES}, got {people}")
    if prompts < 1 or group_prompts < 1 or seeds < 1:
        raise UniPortraitError("--prompts, --group-prompts and --seeds must be at least 1")
    if seed < 0:
        raise UniPortraitError(f"--seed must be 0 or more, got {seed}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UniPortraitError(f"{out} exists and is not an empty folder; choose a new one")
    rng = np.random.default_rng([seed, 17])
    chosen = [identity_number(int(i), True) for i in rng.choice(BENCH_IDENTITIES, people, replace=False)]
    number = dict(zip((f"person-{ident - identity_number(0, True):03d}" for ident in chosen), chosen))
    names = list(number)
    identities = {name: [f"photos/{name}.png"] for name in names}
    grids = {  # spec file → (its name, groups of people, the caption scenes, picture size)
        "single": ("world-single", [[n] for n in names], held_out_specs(prompts, 1, seed), (64, 64)),
        "multi": (
            "world-multi",
            [names[k : k + 2] for k in range(0, people - 1, 2)],
            held_out_specs(group_prompts, 2, seed),
            (128, 64),
        ),
    }
    if people >= 6:
        triples = [names[k : k + 3] for k in range(0, people - 2, 3)]
        grids["multi3"] = ("world-multi3", triples, held_out_specs(group_prompts, 3, seed), (128, 64))
    with atomic_directory(out) as tmp:
        (tmp / "photos").mkdir()
        for name, ident in number.items():
            photo = sample_spec(
                rng, [ident], seed=int(rng.integers(1 << 31)), look=PHOTO_LOOK, scene=PHOTO_SCENE
            )
            Image.fromarray(photo.render().image).save(tmp / "photos" / f"{name}.png")
        for file, (title, groups, (scenes, captions), (width, height)) in grids.items():
            section = "single" if file == "single" else "multi"
            body = {"prompts": captions} if section == "single" else {"groups": groups, "prompts": captions}
            spec = {"name": title, "identities": identities, section: body, "seeds": list(range(seeds)),
                    "settings": {"width": width, "height": height}}  # fmt: skip
            (tmp / f"{file}.json").write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")
            (tmp / f"renders-{file}").mkdir()
            rows = []
            for g, group in enumerate(groups):
                for c, (scene, text) in enumerate(zip(scenes, captions)):
                    image = f"renders-{file}/{g:03d}-{c:03d}.png"
                    picture = _with_people(scene, [number[n] for n in group]).render()
                    Image.fromarray(picture.image).save(tmp / image)
                    rows.append(
                        {"image": image, "prompt": text, "identities": [identities[n] for n in group]}
                    )
            manifest = "".join(json.dumps(row) + "\n" for row in rows)
            (tmp / f"renders-{file}.jsonl").write_text(manifest, encoding="utf-8")
    return [out / f"{file}.json" for file in grids]
