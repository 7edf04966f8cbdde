"""The evaluation itself: per image, faces → matches → Face Sim and flags (+ CLIP-T); then totals.

Example::

    report = evaluate_rows(read_manifest("manifest.jsonl"), get_backend("dlib"))
    report.summary["multi-id"]["face_sim_min"]  # {"mean": ..., "std": ..., "count": ...}
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from uniportrait.errors import InvalidImageError, UniPortraitError
from uniportrait.evaluation.backends import BackendInfo, FaceSimilarityBackend
from uniportrait.evaluation.manifest import ManifestError, ManifestRow
from uniportrait.evaluation.matching import MatchResult, match_faces
from uniportrait.evaluation.references import Reference, ReferenceCache, similarity_to_references
from uniportrait.faces.types import Face

logger = logging.getLogger(__name__)

EVAL_FORMAT = "uniportrait-eval"
EVAL_VERSION = 1
GROUPS = ("all", "single-id", "multi-id")


@dataclass
class ImageResult:
    """One evaluated image.

    Attributes:
        row: its manifest row.
        references: the reference people, in the row's order.
        faces: every face detected in the image, largest first.
        match: faces matched to references, with the flags.
        clip_t: CLIP image–text similarity, or None when not computed.
        prompt_reads: ``(attribute, asked value, read value)`` per attribute the prompt asks
            for, where the backend reads attributes (the world's), else None.
    """

    row: ManifestRow
    references: list[Reference]
    faces: list[Face]
    match: MatchResult
    clip_t: float | None = None
    prompt_reads: list[tuple[str, int, int]] | None = None

    @property
    def prompt_counts(self) -> tuple[int, int] | None:
        """(asks read as asked, asks) of the prompt; None when nothing was read."""
        if not self.prompt_reads:
            return None
        return sum(asked == read for _, asked, read in self.prompt_reads), len(self.prompt_reads)

    @property
    def prompt_following(self) -> float | None:
        """The share of the prompt's asks read as asked; None when nothing was read."""
        counts = self.prompt_counts
        return None if counts is None else counts[0] / counts[1]

    @property
    def group(self) -> str:
        return "single-id" if len(self.references) == 1 else "multi-id"

    @property
    def detected(self) -> bool:
        """The expected number of faces (one per reference) was found, no more, no fewer."""
        return len(self.faces) == len(self.references)

    def to_dict(self) -> dict[str, Any]:
        match = self.match
        reference_of_face = match.reference_of_face
        return {
            "line": self.row.line,
            "image": str(self.row.image),
            "prompt": self.row.prompt,
            "group": self.group,
            "identities": [ref.label for ref in self.references],
            "num_faces": len(self.faces),
            "detected": self.detected,
            "faces": [
                {
                    "box": [round(v, 1) for v in face.box],
                    "score": round(face.score, 3),
                    "similarities": [round(float(s), 4) for s in match.similarities[f]],
                    "assigned": reference_of_face[f],
                    "closest": match.closest_reference[f],
                }
                for f, face in enumerate(self.faces)
            ],
            **match.to_dict(),
            "flags": {
                "missing": bool(match.missing),
                "duplicated": bool(match.duplicated),
                "blending": bool(match.blending),
            },
            "clip_t": None if self.clip_t is None else round(self.clip_t, 4),
            **({"prompt_following": self._prompt_dict()} if self.prompt_reads is not None else {}),
            **({"extra": self.row.extra} if self.row.extra else {}),
        }

    def _prompt_dict(self) -> dict[str, Any]:
        from uniportrait.evaluation.prompt_following import value_name

        following = self.prompt_following
        return {
            "following": None if following is None else round(following, 4),
            "reads": [
                {"attribute": name, "asked": value_name(name, asked), "read": value_name(name, read)}
                for name, asked, read in self.prompt_reads or []
            ],
        }


@dataclass
class EvaluationReport:
    """All results of one run, and their totals (see :func:`summarize`)."""

    backend: BackendInfo
    assignment: str
    images: list[ImageResult]
    clip_status: str
    clip_model: str | None = None
    manifest: str | None = None
    seconds: float = 0.0
    summary: dict[str, Any] = field(default_factory=dict)
    context: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.summary:
            self.summary = summarize(self.images)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": EVAL_FORMAT,
            "version": EVAL_VERSION,
            "manifest": self.manifest,
            "backend": self.backend.to_dict(),
            "assignment": self.assignment,
            "clip_t": {"model": self.clip_model, "status": self.clip_status},
            "seconds": round(self.seconds, 2),
            **({"context": self.context} if self.context else {}),
            "summary": self.summary,
            "images": [r.to_dict() for r in self.images],
        }


def evaluate_image(
    image: Image.Image,
    references: list[Reference],
    backend: FaceSimilarityBackend,
    assignment: str = "hungarian",
) -> tuple[list[Face], MatchResult]:
    """Detect every face in ``image``, embed them and match them to ``references``; blends are
    the backend's (:meth:`~uniportrait.evaluation.backends.FaceSimilarityBackend.find_blends`)."""
    image = image.convert("RGB")
    faces = backend.detect(image)
    embeddings = backend.embed_faces(image, faces)  # (F, E)
    similarities = similarity_to_references(backend, embeddings, references)  # (F, N)
    match = match_faces(similarities, backend.thresholds, assignment)
    match.blending = backend.find_blends(image, faces, references, match)
    return faces, match


def evaluate_rows(
    rows: list[ManifestRow],
    backend: FaceSimilarityBackend,
    bank=None,
    clip=None,
    clip_status: str = "not computed",
    assignment: str = "hungarian",
    manifest: str | None = None,
    progress: bool = True,
) -> EvaluationReport:
    """Evaluate every row; problems with a row's files raise :class:`ManifestError` naming it.

    Args:
        rows: from :func:`~uniportrait.evaluation.manifest.read_manifest`.
        backend: from :func:`~uniportrait.evaluation.backends.get_backend`.
        bank: identity bank for stored identities (default: the user's).
        clip: a :class:`~uniportrait.evaluation.clip_score.ClipScorer`, or None.
        clip_status: what the report says about CLIP-T.
    """
    from uniportrait.faces import load_image

    started = time.perf_counter()
    cache = ReferenceCache(backend, bank)
    # 1. Every reference first: a bad reference photo fails before any image is evaluated.
    references = []
    for row in rows:
        try:
            references.append([cache.get(spec) for spec in row.identities])
        except UniPortraitError as err:
            raise ManifestError(f"{row.where}: {err}") from None
    # 2. The images.
    results = []
    for row, refs in zip(tqdm(rows, desc="evaluating", disable=not progress, leave=False), references):
        try:
            image = load_image(row.image)
        except UniPortraitError as err:
            raise ManifestError(f"{row.where}: {err}") from None
        try:
            faces, match = evaluate_image(image, refs, backend, assignment)
        except InvalidImageError as err:  # e.g. a picture the backend cannot read
            raise ManifestError(f"{row.where}: {err}") from None
        clip_t = clip.score(image, row.prompt) if clip is not None else None
        reads = backend.read_prompt(image.convert("RGB"), row.prompt, faces, len(refs))
        results.append(ImageResult(row, refs, faces, match, clip_t, reads))
        logger.debug("%s: %d face(s), face sim min %s", row.image, len(faces), match.face_sim_min)
    return EvaluationReport(
        backend=backend.info,
        assignment=assignment,
        images=results,
        clip_status=clip_status,
        clip_model=getattr(clip, "name", None),
        manifest=manifest,
        seconds=time.perf_counter() - started,
    )


def stats(values: list[float | None]) -> dict[str, float | int | None]:
    """Mean, (population) standard deviation and count of the values that are not None."""
    present = np.array([v for v in values if v is not None], dtype=np.float64)
    if present.size == 0:
        return {"mean": None, "std": None, "count": 0}
    return {
        "mean": round(float(present.mean()), 4),
        "std": round(float(present.std()), 4),
        "count": int(present.size),
    }


def _rate(flags: list[bool]) -> float | None:
    return round(float(np.mean(flags)), 4) if flags else None


def summarize(results: list[ImageResult]) -> dict[str, Any]:
    """Totals for all images, and separately for single-ID and multi-ID images.

    Per group: ``images``; ``face_sim_min`` / ``face_sim_mean`` / ``clip_t`` as
    ``{mean, std, count}`` (count = images with a value: images where no face matched have no
    Face Sim); ``detection_rate`` (share of images with exactly one face per reference);
    ``missing_rate``, ``duplicated_rate``, ``blending_rate`` (share of images flagged); where the
    backend reads prompts (the world's), ``prompt_following`` (plain, balanced, per attribute,
    and the number of asks: :func:`~uniportrait.evaluation.prompt_following.summarize_reads`).
    """
    from uniportrait.evaluation.prompt_following import summarize_reads

    out: dict[str, Any] = {}
    for group in GROUPS:
        chosen = [r for r in results if group == "all" or r.group == group]
        if not chosen and group != "all":
            continue
        out[group] = {
            "images": len(chosen),
            "face_sim_min": stats([r.match.face_sim_min for r in chosen]),
            "face_sim_mean": stats([r.match.face_sim_mean for r in chosen]),
            "clip_t": stats([r.clip_t for r in chosen]),
            "detection_rate": _rate([r.detected for r in chosen]),
            "missing_rate": _rate([bool(r.match.missing) for r in chosen]),
            "duplicated_rate": _rate([bool(r.match.duplicated) for r in chosen]),
            "blending_rate": _rate([bool(r.match.blending) for r in chosen]),
        }
        if any(r.prompt_reads is not None for r in chosen):
            reads = [read for r in chosen for read in r.prompt_reads or []]
            out[group]["prompt_following"] = _rounded(summarize_reads(reads))
    return out


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return value


def image_path_label(row: ManifestRow, width: int = 40) -> str:
    name = Path(row.image).name
    return name if len(name) <= width else "…" + name[-(width - 1) :]
