"""Matching detected faces to reference identities, and the multi-ID failure flags.

Everything here works on a similarity matrix ``S`` of shape ``(F, N)``: ``F`` faces detected in
a generated image, ``N`` reference identities, higher = more alike. No model is involved, so the
rules can be read (and tested) on their own.

- **Assignment**: one-to-one, maximising the summed similarity (the Hungarian method; scipy's
  when installed, otherwise an exhaustive search for small problems). ``"greedy"`` is the paper's
  wording (DESIGN §8): take the most similar (face, reference) pair, remove both, repeat.
  Both give the same answer whenever each face's best reference is a different one.
- **Face Sim** per image: over the matched references, the lowest similarity (the paper's value)
  and the mean. References without a face are *not* counted there; they are flagged missing.
- **Flags**: see :class:`Thresholds` and :func:`match_faces`.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from uniportrait.errors import ConfigError

logger = logging.getLogger(__name__)

ASSIGNMENTS = ("hungarian", "greedy")
# Exhaustive assignment is exact; above this many candidate assignments it falls back to greedy.
MAX_EXHAUSTIVE = 50_000


@dataclass(frozen=True)
class Thresholds:
    """The similarity levels the flags use (their scale is the backend's).

    Attributes:
        match: same-person level. A face counts towards a *duplicated* identity only when its
            similarity to that identity reaches it (so a stranger in the background whose nearest
            reference happens to be A does not make A "duplicated").
        blend: a face less similar than this to its assigned reference is a weak match.
        margin: ambiguity margin: a face is *ambiguous* when its two most similar references are
            within ``margin`` of each other and it resembles both (the second is at least
            ``related``). A weak and ambiguous face is flagged as *blending*.
        related: the least similarity at which a face still resembles a person; below it, a
            face that is equally unlike two references is a stranger, not a blend.
    """

    match: float
    blend: float
    margin: float
    related: float

    def to_dict(self) -> dict[str, float]:
        return {"match": self.match, "blend": self.blend, "margin": self.margin, "related": self.related}


@dataclass
class MatchResult:
    """Faces matched to references in one image.

    Attributes:
        similarities: (F, N) similarity of every face to every reference.
        face_of_reference: per reference, the index of its assigned face or None (missing).
        closest_reference: per face, the index of its most similar reference.
        missing: references without a face.
        duplicated: references that are the confident closest match of two or more faces.
        blending: faces flagged as blending (weak and ambiguous), by face index.
    """

    similarities: np.ndarray
    face_of_reference: list[int | None]
    closest_reference: list[int]
    missing: list[int] = field(default_factory=list)
    duplicated: list[int] = field(default_factory=list)
    blending: list[int] = field(default_factory=list)

    @property
    def num_faces(self) -> int:
        return int(self.similarities.shape[0])

    @property
    def num_references(self) -> int:
        return int(self.similarities.shape[1])

    @property
    def reference_of_face(self) -> list[int | None]:
        out: list[int | None] = [None] * self.num_faces
        for ref, face in enumerate(self.face_of_reference):
            if face is not None:
                out[face] = ref
        return out

    @property
    def matched_similarities(self) -> list[float | None]:
        """Per reference: the similarity of its assigned face, or None."""
        return [
            None if face is None else float(self.similarities[face, ref])
            for ref, face in enumerate(self.face_of_reference)
        ]

    @property
    def face_sim_min(self) -> float | None:
        """The lowest matched similarity (the paper's multi-ID value); None if nothing matched."""
        values = [v for v in self.matched_similarities if v is not None]
        return min(values) if values else None

    @property
    def face_sim_mean(self) -> float | None:
        values = [v for v in self.matched_similarities if v is not None]
        return float(np.mean(values)) if values else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "face_of_reference": self.face_of_reference,
            "matched_similarities": _rounded(self.matched_similarities),
            "face_sim_min": _round(self.face_sim_min),
            "face_sim_mean": _round(self.face_sim_mean),
            "missing": self.missing,
            "duplicated": self.duplicated,
            "blending": self.blending,
        }


def assign(similarities: np.ndarray, method: str = "hungarian") -> list[int | None]:
    """One-to-one assignment of faces (rows) to references (columns) of an (F, N) matrix.

    Returns, per reference, the index of its face or None when there are fewer faces than
    references. ``"hungarian"`` maximises the summed similarity; ``"greedy"`` repeatedly takes
    the largest remaining entry.
    """
    sim = np.asarray(similarities, dtype=np.float64)
    if sim.ndim != 2:
        raise ValueError(f"similarities must be (faces, references), got shape {sim.shape}")
    if method not in ASSIGNMENTS:
        raise ConfigError(f"assignment must be one of {ASSIGNMENTS}, got {method!r}")
    faces, refs = sim.shape
    result: list[int | None] = [None] * refs
    if faces == 0 or refs == 0:
        return result
    if method == "greedy":
        return _greedy(sim)
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:
        linear_sum_assignment = None
    if linear_sum_assignment is not None:
        rows, cols = linear_sum_assignment(sim, maximize=True)
        for row, col in zip(rows, cols):
            result[int(col)] = int(row)
        return result
    return _exhaustive(sim)


def _greedy(sim: np.ndarray) -> list[int | None]:
    result: list[int | None] = [None] * sim.shape[1]
    work = sim.copy()
    for _ in range(min(sim.shape)):
        face, ref = np.unravel_index(int(np.argmax(work)), work.shape)
        result[int(ref)] = int(face)
        work[face, :] = -np.inf
        work[:, ref] = -np.inf
    return result


def _exhaustive(sim: np.ndarray) -> list[int | None]:
    """Exact maximum-sum assignment by trying every injection of the smaller side."""
    faces, refs = sim.shape
    k = min(faces, refs)
    count = math.perm(max(faces, refs), k)
    if count > MAX_EXHAUSTIVE:
        logger.warning(
            "%d faces x %d references: too many for an exhaustive assignment without scipy; using greedy "
            "(pip install scipy for the exact Hungarian assignment)",
            faces,
            refs,
        )
        return _greedy(sim)
    result: list[int | None] = [None] * refs
    best, best_pairs = -np.inf, []
    if faces >= refs:  # choose a distinct face for every reference
        for chosen in itertools.permutations(range(faces), refs):
            total = sim[list(chosen), range(refs)].sum()
            if total > best + 1e-12:
                best, best_pairs = total, list(zip(chosen, range(refs)))
    else:  # choose a distinct reference for every face
        for chosen in itertools.permutations(range(refs), faces):
            total = sim[range(faces), list(chosen)].sum()
            if total > best + 1e-12:
                best, best_pairs = total, list(zip(range(faces), chosen))
    for face, ref in best_pairs:
        result[int(ref)] = int(face)
    return result


def match_faces(similarities: np.ndarray, thresholds: Thresholds, method: str = "hungarian") -> MatchResult:
    """Assign faces to references and flag the image's failures.

    Flags:
        missing: a reference left without a face (fewer faces than references).
        duplicated: a reference that is the closest reference of two or more faces, each at least
            ``thresholds.match`` similar to it (one identity drawn twice).
        blending: with two or more references, an assigned face whose similarity to its reference
            is below ``thresholds.blend`` while it is ambiguous: its two most similar references
            differ by less than ``thresholds.margin`` and the second is at least
            ``thresholds.related`` (a face that looks like a mix of two people).
    """
    sim = np.asarray(similarities, dtype=np.float64).reshape(-1, np.shape(similarities)[-1])
    faces, refs = sim.shape
    face_of_reference = assign(sim, method)
    closest = [int(np.argmax(row)) for row in sim] if refs else []
    missing = [r for r, f in enumerate(face_of_reference) if f is None]
    duplicated = []
    for ref in range(refs):
        confident = [f for f in range(faces) if closest[f] == ref and sim[f, ref] >= thresholds.match]
        if len(confident) >= 2:
            duplicated.append(ref)
    blending = []
    if refs >= 2:
        for ref, face in enumerate(face_of_reference):
            if face is None:
                continue
            top_two = np.sort(sim[face])[::-1][:2]
            ambiguous = top_two[0] - top_two[1] < thresholds.margin and top_two[1] >= thresholds.related
            if sim[face, ref] < thresholds.blend and ambiguous:
                blending.append(face)
    return MatchResult(sim, face_of_reference, closest, missing, duplicated, sorted(blending))


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(float(value), digits)


def _rounded(values: list[float | None]) -> list[float | None]:
    return [_round(v) for v in values]
