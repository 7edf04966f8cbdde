"""Rendered sets of the identity world, as arrays (for training the world's models and oracles).

A set is a dict of numpy arrays, saved as one ``.npz``:

- ``images`` (N, H, W, 3) uint8 (all pictures of a set have one size);
- ``captions`` (N,) str;
- ``num_people`` (N,) int; per person, padded to ``MAX_PEOPLE`` (left to right):
  ``identities`` (N, P) int64 (-1 = none), ``traits`` (N, P, T) float32, ``boxes`` (N, P, 4),
  ``landmarks`` (N, P, 5, 2) float32, ``person_attrs`` (N, P, A) int64 (one column per
  :data:`~uniportrait.world.traits.PERSON_ATTRIBUTES` entry), ``mentioned`` (N, P, A) bool;
- ``scene_attrs`` (N, S) int64 and ``scene_mentioned`` (N, S) bool;
- ``masks`` (N, P, H, W) bool head masks.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from uniportrait.atomic import atomic_path
from uniportrait.world.scenes import SIZES, caption, identity_number, sample_spec
from uniportrait.world.traits import PERSON_ATTRIBUTES, SCENE_ATTRIBUTES, trait_vector_size

logger = logging.getLogger(__name__)

MAX_PEOPLE = 4


def _spec(args: tuple[int, int, int, int, bool, int, str]):
    """The ``index``-th scene of a set: deterministic from (seed, index)."""
    seed, index, num_people, num_identities, held_out, renders_per_identity, framing = args
    rng = np.random.default_rng([seed, index])
    if num_people == 1:  # consecutive renders of the same identity
        idents = [identity_number((index // renders_per_identity) % num_identities, held_out)]
    else:
        picks = rng.choice(num_identities, size=num_people, replace=False)
        idents = [identity_number(int(k), held_out) for k in picks]
    spec = sample_spec(rng, idents, seed=int(rng.integers(1 << 31)), framing=framing)
    return spec, caption(spec, rng)


def _render_one(args):
    spec, text = _spec(args)
    out = spec.render()
    n = len(spec.people)
    a_names, s_names = list(PERSON_ATTRIBUTES), list(SCENE_ATTRIBUTES)
    row = {
        "image": out.image,
        "caption": text,
        "num_people": n,
        "identities": np.full(MAX_PEOPLE, -1, np.int64),
        "traits": np.zeros((MAX_PEOPLE, trait_vector_size()), np.float32),
        "boxes": np.zeros((MAX_PEOPLE, 4), np.float32),
        "landmarks": np.zeros((MAX_PEOPLE, 5, 2), np.float32),
        "person_attrs": np.full((MAX_PEOPLE, len(a_names)), -1, np.int64),
        "mentioned": np.zeros((MAX_PEOPLE, len(a_names)), bool),
        "scene_attrs": np.array([spec.scene.attribute(s) for s in s_names], np.int64),
        "scene_mentioned": np.array([s in spec.mentions for s in s_names], bool),
        "masks": np.zeros((MAX_PEOPLE, *out.image.shape[:2]), bool),
    }
    for i, person in enumerate(spec.people):
        row["identities"][i] = person.identity
        row["traits"][i] = person.traits.vector()
        row["person_attrs"][i] = [person.look.attribute(a) for a in a_names]
        row["mentioned"][i] = [(i, a) in spec.mentions for a in a_names]
    row["boxes"][:n], row["landmarks"][:n], row["masks"][:n] = out.boxes, out.landmarks, out.masks
    return row


def render_set(
    count: int,
    num_people: int | tuple[int, ...] = 1,
    seed: int = 0,
    num_identities: int = 4000,
    held_out: bool = False,
    renders_per_identity: int = 6,
    workers: int | None = None,
    progress: bool = True,
    framing: str = "wide",
) -> dict[str, np.ndarray]:
    """Render ``count`` pictures; with several ``num_people`` values, they cycle (same picture size).

    ``framing``: how large faces are drawn (:data:`~uniportrait.world.scenes.FRAMINGS`)."""
    counts = (num_people,) if isinstance(num_people, int) else tuple(num_people)
    if len({SIZES[n] for n in counts}) != 1:
        raise ValueError(f"people counts {counts} give pictures of different sizes")
    jobs = [
        (seed, i, counts[i % len(counts)], num_identities, held_out, renders_per_identity, framing)
        for i in range(count)
    ]
    workers = workers or min(2, os.cpu_count() or 1)
    rows = []
    bar = tqdm(total=count, desc=f"render {counts} people", disable=not progress, leave=False)
    if workers > 1:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            for row in pool.imap(_render_one, jobs, chunksize=64):
                rows.append(row)
                bar.update()
    else:
        for job in jobs:
            rows.append(_render_one(job))
            bar.update()
    bar.close()
    out = {key: np.stack([r[key] for r in rows]) for key in rows[0] if key not in ("image", "caption")}
    out["images"] = np.stack([r["image"] for r in rows])
    out["captions"] = np.array([r["caption"] for r in rows])
    return out


def save_set(data: dict[str, np.ndarray], path: str | Path) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:  # a handle: np.savez adds no suffix
        np.savez(handle, **data)


def load_set(path: str | Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}
