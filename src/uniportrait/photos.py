"""From ordinary photos to identities: detection, alignment, encoding."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np
import PIL.Image
import torch

from uniportrait.errors import NoFaceError
from uniportrait.identity import Identity, check_mix_scales

logger = logging.getLogger(__name__)

PhotoSource = str | os.PathLike | bytes | PIL.Image.Image


def aligned_face(photo: PhotoSource, analyzer) -> PIL.Image.Image:
    """The largest face of ``photo``, aligned to a 224×224 crop (DESIGN §2); a photo with several
    faces is used, with a warning saying so."""
    from uniportrait.faces import extract_faces, load_image

    image = load_image(photo)
    faces = extract_faces(image, analyzer, name=_describe(photo))
    if not faces:  # extract_faces raises for no face; guard anyway
        raise NoFaceError(f"no face found in {photo}")
    if len(faces) > 1:
        logger.warning(
            "%s shows %d faces; using the largest (crop the photo to choose another)",
            _describe(photo),
            len(faces),
        )
    return faces[0][1]


def _describe(photo: PhotoSource) -> str:
    if isinstance(photo, (str, os.PathLike)):
        return os.fspath(photo)
    return getattr(photo, "filename", "") or "the photo"


def identity_from_photos(
    pipe,
    photos: Sequence[PhotoSource],
    analyzer=None,
    mix: Sequence[tuple[Sequence[PhotoSource] | Identity, float]] | None = None,
    name: str | None = None,
) -> Identity:
    """Detect, align and encode one person's photos (several photos → several references).

    Args:
        pipe: a :class:`~uniportrait.pipeline.UniPortraitPipeline` (its encoders are used).
        photos: paths, bytes or PIL images of the same person.
        analyzer: a face analyzer (default: :func:`~uniportrait.faces.get_face_analyzer`'s, MTCNN).
        mix: identities to blend in, ``[(photos_or_identity, scale), ...]``.
    """
    from uniportrait.faces import aligner_id, get_face_analyzer

    if not photos:
        raise NoFaceError("no photos given for the identity")
    check_mix_scales([s for _, s in mix or []])
    analyzer = analyzer or get_face_analyzer()
    crops = [aligned_face(p, analyzer) for p in photos]
    mixed = []
    for item, scale in mix or []:
        other = item if isinstance(item, Identity) else identity_from_photos(pipe, item, analyzer)
        mixed.append((other, float(scale)))
    return identity_from_crops(pipe, crops, mixed, name, aligner=aligner_id(analyzer))


def identity_from_crops(
    pipe,
    crops: Sequence[PIL.Image.Image],
    mix: Sequence[tuple[Identity, float]] = (),
    name: str | None = None,
    aligner: str = "",
) -> Identity:
    """Encode aligned 224×224 crops (from :func:`aligned_face`) of one person; keeps the crops and
    ``aligner`` (:func:`~uniportrait.faces.aligner_id` of the analyzer that made them)."""
    identity = pipe.encode_identity(list(crops), mix=list(mix), name=name)
    identity.crops = torch.from_numpy(np.stack([np.asarray(c.convert("RGB")) for c in crops]))
    identity.aligner = aligner
    return identity
