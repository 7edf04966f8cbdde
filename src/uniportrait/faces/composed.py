"""Multi-face test pictures composed from single-face photos, with the true landmark positions.

Each face is cut from its photo (with some context, or tightly), scaled so that its detector box
is ``size`` pixels wide, rotated by ``angle`` degrees about the face centre and pasted on a smooth
noisy background. The five true points are the source photo's points mapped by the same affine
transform. Used by the tests and by the detector measurements in ``docs/faces.md``.

Typical use::

    sources = {name: analyzer.detect(load_image(sample_photo(name)))[0] for name in names}
    for picture in composed_pictures(sources):
        found = analyzer.detect(picture.image)
        hits, false_positives = match_faces(found, picture.landmarks)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from uniportrait.faces.image_io import load_image
from uniportrait.faces.types import Face


@dataclass(frozen=True)
class Placement:
    """One face to paste: source photo, box width in the picture, rotation (degrees,
    counter-clockwise as seen), centre ``(x, y)`` in the picture, and the context kept around the
    face box (1.0 = the box only, a "tight crop"; 1.8 = hair, neck and background)."""

    photo: str
    size: float
    angle: float
    centre: tuple[float, float]
    context: float = 1.8


@dataclass(frozen=True)
class ComposedPicture:
    """A composed picture: ``image`` (RGB) and ``landmarks`` ``(N, 5, 2)`` of its N faces."""

    name: str
    image: Image.Image
    landmarks: np.ndarray
    placements: tuple[Placement, ...]


# The pictures: face sizes down to 40 px, rotations up to ±30°, tight crops.
PICTURES: dict[str, tuple[tuple[int, int], tuple[Placement, ...]]] = {
    "sizes": (
        (640, 300),
        (
            Placement("ffhq-0100.jpg", 140, 0, (110, 150)),
            Placement("ffhq-0293.jpg", 90, 0, (290, 150)),
            Placement("ffhq-0381.jpg", 60, 0, (420, 150)),
            Placement("newton.jpg", 40, 0, (540, 150)),
        ),
    ),
    "rotations": (
        (720, 260),
        (
            Placement("ffhq-0100.jpg", 100, -30, (100, 130)),
            Placement("ffhq-0293.jpg", 100, -15, (270, 130)),
            Placement("ffhq-0381.jpg", 100, 15, (440, 130)),
            Placement("newton.jpg", 100, 30, (620, 130)),
        ),
    ),
    "small-rotated": (
        (480, 200),
        (
            Placement("ffhq-0381.jpg", 50, 30, (80, 100)),
            Placement("ffhq-0100.jpg", 45, -30, (200, 100)),
            Placement("newton.jpg", 60, 20, (310, 100)),
            Placement("ffhq-0293.jpg", 40, -20, (420, 100)),
        ),
    ),
    "tight-crops": (
        (600, 240),
        (
            Placement("ffhq-0293.jpg", 120, 0, (110, 120), context=1.0),
            Placement("ffhq-0100.jpg", 80, 10, (260, 120), context=1.05),
            Placement("newton.jpg", 90, -10, (400, 120), context=1.1),
            Placement("ffhq-0381.jpg", 70, 0, (530, 120), context=1.0),
        ),
    ),
}


def _background(width: int, height: int, seed: int) -> np.ndarray:
    """A smooth two-colour gradient with mild noise: ``(height, width, 3)`` float32."""
    rng = np.random.default_rng(seed)
    low, high = rng.uniform(60, 200, 3), rng.uniform(60, 200, 3)
    ramp = np.linspace(0, 1, width, dtype=np.float32)[None, :, None]
    noise = rng.normal(0, 4, (height, width, 3))
    return (low + (high - low) * ramp + noise).astype(np.float32)


def _paste_matrix(face: Face, placement: Placement) -> np.ndarray:
    """``(2, 3)`` affine matrix: source photo → picture (scale about the face centre, rotate, move)."""
    centre = np.array([(face.box[0] + face.box[2]) / 2, (face.box[1] + face.box[3]) / 2])
    scale = placement.size / face.width
    theta = np.deg2rad(placement.angle)
    # Counter-clockwise on screen (y points down): x' = c·x + s·y, y' = −s·x + c·y.
    rotation = scale * np.array([[np.cos(theta), np.sin(theta)], [-np.sin(theta), np.cos(theta)]])
    shift = np.asarray(placement.centre, dtype=np.float64) - rotation @ centre
    return np.hstack([rotation, shift[:, None]])


def compose_picture(
    name: str,
    size: tuple[int, int],
    placements: Sequence[Placement],
    sources: Mapping[str, Face],
    photos: Mapping[str, Image.Image] | None = None,
    seed: int = 0,
) -> ComposedPicture:
    """Paste the placed faces onto a background of ``size`` ``(width, height)``.

    Args:
        sources: each source photo's face (its box and landmarks in that photo).
        photos: the source photos (default: the bundled sample photos, by name).
    """
    import cv2

    from uniportrait.faces import sample_photo

    width, height = size
    canvas = _background(width, height, seed)
    truth = []
    for placement in placements:
        face = sources[placement.photo]
        photo = photos[placement.photo] if photos else load_image(sample_photo(placement.photo))
        matrix = _paste_matrix(face, placement)
        scale = placement.size / face.width
        # Shrink first with a proper filter, then warp (rotation + the remaining small scale).
        shrink = min(1.0, scale * 1.5)
        small = photo.resize(
            (max(1, round(photo.width * shrink)), max(1, round(photo.height * shrink))),
            Image.Resampling.LANCZOS,
        )
        # Pixel centres at integers: source x = (small x + 0.5) / shrink − 0.5.
        to_source = np.array(
            [[1 / shrink, 0, 0.5 / shrink - 0.5], [0, 1 / shrink, 0.5 / shrink - 0.5], [0, 0, 1]]
        )
        warp = matrix @ to_source
        layer = cv2.warpAffine(
            np.asarray(small, dtype=np.float32), warp, (width, height), flags=cv2.INTER_LINEAR
        )
        # The kept region: the face box grown by `context`, clipped to the photo.
        cx, cy = (face.box[0] + face.box[2]) / 2, (face.box[1] + face.box[3]) / 2
        half_w, half_h = face.width * placement.context / 2, face.height * placement.context / 2
        region = np.zeros((photo.height, photo.width), np.float32)
        x0, x1 = max(0, round(cx - half_w)), min(photo.width, round(cx + half_w))
        y0, y1 = max(0, round(cy - half_h)), min(photo.height, round(cy + half_h))
        region[y0:y1, x0:x1] = 1.0
        alpha = cv2.warpAffine(region, matrix, (width, height), flags=cv2.INTER_LINEAR)[..., None]
        canvas = canvas * (1 - alpha) + layer * alpha
        points = face.landmarks.astype(np.float64) @ matrix[:, :2].T + matrix[:, 2]
        truth.append(points)
    image = Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8), "RGB")
    return ComposedPicture(name, image, np.asarray(truth, dtype=np.float32), tuple(placements))


def composed_pictures(
    sources: Mapping[str, Face], photos: Mapping[str, Image.Image] | None = None
) -> list[ComposedPicture]:
    """All :data:`PICTURES`, built from ``sources`` (see :func:`compose_picture`)."""
    return [
        compose_picture(name, size, placements, sources, photos, seed=index)
        for index, (name, (size, placements)) in enumerate(PICTURES.items())
    ]


def match_faces(found: Sequence[Face], truth: np.ndarray, tolerance: float = 0.3) -> tuple[list[int], int]:
    """Match detections to true faces.

    A detection matches a true face when its five points are on average within ``tolerance`` ×
    the true eye distance of the true points (each true face matches at most one detection).

    Returns:
        for each true face, the index of its detection (−1 when missed), and the number of
        detections that matched no true face (false positives).
    """
    matched = [-1] * len(truth)
    used = set()
    for t, points in enumerate(truth):
        eyes = float(np.linalg.norm(points[1] - points[0]))
        errors = [
            (float(np.linalg.norm(face.landmarks - points, axis=1).mean()), k)
            for k, face in enumerate(found)
            if k not in used
        ]
        if errors:
            error, k = min(errors)
            if error < tolerance * eyes:
                matched[t] = k
                used.add(k)
    return matched, len(found) - len(used)
