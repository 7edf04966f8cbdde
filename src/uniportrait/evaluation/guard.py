"""The generation guard: re-sample when an identity is missing or drawn twice.

The published system sometimes draws one identity twice (DESIGN §9). The guard checks each
result with a face matcher and, when an identity is missing or duplicated, samples again with
the next seed (``seed + 1``, ``seed + 2``, …), at most ``retries`` more times::

    from uniportrait.evaluation import generate_with_face_check

    out, report = generate_with_face_check(pipe, "two friends at a cafe", [anna, ben], seed=0, retries=3)
    print(report.summary())       # what it did; report.seed is the seed of the images returned

With several images per call the images are checked together: an attempt passes when every
image passes. When no attempt passes, the attempt with the fewest failing images is kept (the
earliest on a tie) and the report says so.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from PIL import Image

from uniportrait.errors import UniPortraitError
from uniportrait.evaluation.backends import FaceSimilarityBackend, get_backend
from uniportrait.evaluation.matching import match_faces
from uniportrait.evaluation.references import (
    Reference,
    identity_crops,
    reference_from_crops,
    similarity_to_references,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class FaceCheck:
    """The check of one image: which identities are missing or duplicated."""

    faces: int
    missing: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.missing and not self.duplicated

    def describe(self) -> str:
        parts = []
        if self.missing:
            parts.append("missing " + ", ".join(self.missing))
        if self.duplicated:
            parts.append("duplicated " + ", ".join(self.duplicated))
        return f"{'; '.join(parts) or 'ok'} ({self.faces} face{'s' if self.faces != 1 else ''})"

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "faces": self.faces, "missing": self.missing, "duplicated": self.duplicated}


class FaceChecker:
    """Checks that every reference identity appears once in an image (see :func:`match_faces`).

    Args:
        backend: the face-similarity backend (its thresholds decide duplicates).
        references: the identities to look for.
    """

    def __init__(
        self, backend: FaceSimilarityBackend, references: list[Reference], assignment: str = "hungarian"
    ):
        if not references:
            raise UniPortraitError("the face check needs at least one identity")
        self.backend, self.references, self.assignment = backend, references, assignment

    @classmethod
    def for_identities(
        cls, identities: Sequence, backend: FaceSimilarityBackend | str = "dlib", bank=None
    ) -> FaceChecker:
        """References from :class:`~uniportrait.identity.Identity` objects' aligned crops (read
        from ``bank`` for stored identities whose crops were not loaded)."""
        backend = get_backend(backend) if isinstance(backend, str) else backend
        references = []
        for k, identity in enumerate(identities, start=1):
            label = identity.name or f"identity {k}"
            crops = identity_crops(identity, bank, identity.name)
            references.append(reference_from_crops(backend, crops, label))
        return cls(backend, references)

    def __call__(self, image: Image.Image) -> FaceCheck:
        image = image.convert("RGB")
        faces = self.backend.detect(image)
        similarities = similarity_to_references(
            self.backend, self.backend.embed_faces(image, faces), self.references
        )
        match = match_faces(similarities, self.backend.thresholds, self.assignment)
        labels = [ref.label for ref in self.references]
        return FaceCheck(
            len(faces), [labels[i] for i in match.missing], [labels[i] for i in match.duplicated]
        )


@dataclass
class Attempt:
    seed: int
    checks: list[FaceCheck]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def failing(self) -> int:
        return sum(not c.ok for c in self.checks)

    def describe(self) -> str:
        if len(self.checks) == 1:
            return self.checks[0].describe()
        return (
            "; ".join(f"image {i}: {c.describe()}" for i, c in enumerate(self.checks) if not c.ok) or "all ok"
        )

    def to_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "ok": self.ok, "images": [c.to_dict() for c in self.checks]}


@dataclass
class FaceCheckReport:
    """What the guard did: every attempt, and which one was kept."""

    attempts: list[Attempt]
    kept: int
    retries: int

    @property
    def passed(self) -> bool:
        return self.attempts[self.kept].ok

    @property
    def seed(self) -> int:
        """The seed of the images returned."""
        return self.attempts[self.kept].seed

    def summary(self) -> str:
        n = len(self.attempts)
        history = "; ".join(f"seed {a.seed}: {a.describe()}" for a in self.attempts)
        if self.passed:
            head = f"face check passed with seed {self.seed} (attempt {self.kept + 1} of at most {self.retries + 1})"
        else:
            head = (
                f"face check failed in all {n} attempt(s); kept seed {self.seed} "
                f"({self.attempts[self.kept].failing} of {len(self.attempts[self.kept].checks)} image(s) failing)"
            )
        return f"{head}. {history}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "seed": self.seed,
            "retries": self.retries,
            "attempts": [a.to_dict() for a in self.attempts],
        }


def sample_with_face_check(
    sample: Callable[[int], T],
    check: Callable[[Image.Image], FaceCheck],
    seed: int,
    retries: int,
    images: Callable[[T], Sequence[Image.Image]] = lambda out: out.images,  # type: ignore[attr-defined]
) -> tuple[T, FaceCheckReport]:
    """Call ``sample(seed)``, check its images, and try ``seed + 1``, … until they pass or
    ``retries`` re-samples were made. Returns the kept output and the report."""
    if retries < 0:
        raise UniPortraitError("retries must be 0 or more")
    attempts: list[Attempt] = []
    best_output, best_index = None, -1
    for k in range(retries + 1):
        current = seed + k
        output = sample(current)
        pictures = list(images(output))
        if not all(isinstance(p, Image.Image) for p in pictures):
            raise UniPortraitError('the face check needs PIL images (output_type="pil")')
        attempt = Attempt(current, [check(p) for p in pictures])
        attempts.append(attempt)
        if best_index < 0 or attempt.failing < attempts[best_index].failing:
            best_output, best_index = output, k
        if attempt.ok:
            logger.info("face check: seed %d ok", current)
            break
        logger.info(
            "face check: seed %d: %s%s",
            current,
            attempt.describe(),
            f"; re-sampling with seed {current + 1}" if k < retries else "; no retries left",
        )
    report = FaceCheckReport(attempts, best_index, retries)
    if not report.passed:
        logger.warning(
            "face check: no attempt passed in %d; kept seed %d (%d image(s) failing)",
            len(attempts),
            report.seed,
            attempts[best_index].failing,
        )
    return best_output, report  # type: ignore[return-value]


def generate_with_face_check(
    pipe,
    prompt: str | list[str],
    identities: Sequence,
    *,
    seed: int = 0,
    retries: int = 2,
    checker: Callable[[Image.Image], FaceCheck] | None = None,
    backend: FaceSimilarityBackend | str = "dlib",
    bank=None,
    **pipe_kwargs: Any,
):
    """Run ``pipe`` with the face check: ``(pipeline output, FaceCheckReport)``.

    Args:
        pipe: a :class:`~uniportrait.pipeline.UniPortraitPipeline`.
        seed: the first seed; attempt ``k`` uses a ``torch.Generator`` seeded with ``seed + k``.
        retries: how many times to re-sample at most.
        checker: a callable image → :class:`FaceCheck`; default: a :class:`FaceChecker` on the
            identities' aligned crops with ``backend``.
        pipe_kwargs: passed to the pipeline (not ``generator``).
    """
    import torch

    if "generator" in pipe_kwargs:
        raise UniPortraitError(
            "generate_with_face_check makes its own generators: pass seed=, not generator="
        )
    if pipe_kwargs.get("output_type", "pil") != "pil":
        raise UniPortraitError('the face check needs output_type="pil"')
    identities = list(identities)
    check = checker or FaceChecker.for_identities(identities, backend, bank)

    def sample(current: int):
        generator = torch.Generator().manual_seed(current)
        return pipe(prompt, identities=identities, generator=generator, **pipe_kwargs)

    return sample_with_face_check(sample, check, seed, retries)
