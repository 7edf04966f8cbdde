"""Reference identities for evaluation: embeddings and aligned crops of each person.

A reference is one person, from photos (the largest face of each photo is used) or from a
stored identity (its aligned 224×224 crops). With several photos, a face's similarity to the
person is the mean of its similarities to each photo.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from uniportrait.errors import IdentityError, NoFaceError
from uniportrait.evaluation.backends import FaceSimilarityBackend
from uniportrait.evaluation.manifest import IdentitySpec

logger = logging.getLogger(__name__)


@dataclass
class Reference:
    """One person to look for in generated images.

    Attributes:
        label: a short name for reports.
        embeddings: (R, E) one embedding per reference photo / crop.
        crops: the aligned 224×224 reference crops (for contact sheets).
        source: where it came from (photo paths or ``id:NAME``).
    """

    label: str
    embeddings: np.ndarray
    crops: list[Image.Image] = field(default_factory=list, repr=False)
    source: str = ""


def reference_from_photos(
    backend: FaceSimilarityBackend, photos: list, label: str | None = None
) -> Reference:
    """Embed the largest face of each photo (paths or PIL images).

    Raises:
        NoFaceError: a photo has no detectable face (the message names it).
    """
    from uniportrait.faces import align_face, load_image
    from uniportrait.faces.image_io import describe_source

    embeddings, crops = [], []
    for photo in photos:
        picture = load_image(photo)
        faces = backend.detect(picture)
        if not faces:
            raise NoFaceError(
                f"no face found in reference photo {describe_source(photo)} ({backend.name} detector)"
            )
        embeddings.append(backend.embed_faces(picture, faces[:1])[0])
        crops.append(align_face(picture, faces[0].landmarks))
    name = label or (Path(photos[0]).stem if isinstance(photos[0], (str, Path)) else "reference")
    source = ", ".join(str(p) for p in photos if isinstance(p, (str, Path)))
    return Reference(name, np.stack(embeddings), crops, source)


def reference_from_crops(
    backend: FaceSimilarityBackend, crops: list[Image.Image] | np.ndarray, label: str, source: str = ""
) -> Reference:
    """Embed aligned 224×224 crops (PIL images, or an (R, 224, 224, 3) uint8 array)."""
    images = [
        c if isinstance(c, Image.Image) else Image.fromarray(np.asarray(c, dtype=np.uint8)) for c in crops
    ]
    if not images:
        raise IdentityError(f"identity {label!r} has no reference crops")
    embeddings = np.stack([backend.embed_aligned(image) for image in images])
    return Reference(label, embeddings, images, source)


def identity_crops(identity, bank=None, name: str | None = None) -> np.ndarray:
    """The aligned crops (R, 224, 224, 3) uint8 of an :class:`~uniportrait.identity.Identity`.

    Identities made from photos carry them; for a stored identity they are read from its file in
    ``bank`` when the loaded object lacks them.
    """
    crops = getattr(identity, "crops", None)
    name = name or getattr(identity, "name", None)
    if crops is None and bank is not None and name:
        from safetensors import safe_open

        path = bank.path(name)
        with safe_open(str(path), framework="pt") as f:
            if "crops" in f.keys():  # noqa: SIM118 - safe_open API
                crops = f.get_tensor("crops")
    if crops is None:
        raise IdentityError(
            f"identity {name or '(unnamed)'!r} has no stored face crops, which the face check needs; "
            "add it again from photos (`uniportrait id add`) or give its photos"
        )
    return np.asarray(crops.numpy() if hasattr(crops, "numpy") else crops, dtype=np.uint8)


class ReferenceCache:
    """Embeds each distinct reference once per run (rows often share their references)."""

    def __init__(self, backend: FaceSimilarityBackend, bank=None) -> None:
        self.backend = backend
        self.bank = bank
        self._cache: dict[tuple, Reference] = {}

    def get(self, spec: IdentitySpec) -> Reference:
        if spec.key not in self._cache:
            if spec.name is not None:
                from uniportrait.bank import IdentityBank

                bank = self.bank or IdentityBank()
                crops = identity_crops(bank.get(spec.name), bank, spec.name)
                reference = reference_from_crops(self.backend, crops, spec.name, f"id:{spec.name}")
            else:
                reference = reference_from_photos(self.backend, list(spec.photos))
            self._cache[spec.key] = reference
        cached = self._cache[spec.key]
        if spec.label and spec.label != cached.label:
            return Reference(spec.label, cached.embeddings, cached.crops, cached.source)
        return cached


def similarity_to_references(
    backend: FaceSimilarityBackend, face_embeddings: np.ndarray, references: list[Reference]
) -> np.ndarray:
    """(F, E) face embeddings → (F, N) similarity to each reference (mean over its photos)."""
    faces = np.asarray(face_embeddings)
    out = np.zeros((faces.shape[0], len(references)), dtype=np.float64)
    if faces.shape[0] == 0:
        return out
    for n, ref in enumerate(references):
        out[:, n] = backend.similarity(faces, ref.embeddings).mean(axis=1)
    return out
