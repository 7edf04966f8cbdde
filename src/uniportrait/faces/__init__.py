"""Face preprocessing: loading photos, detecting faces, aligning them to 224×224 crops.

Typical use::

    from uniportrait.faces import extract_faces, get_face_analyzer

    analyzer = get_face_analyzer()  # MTCNN (offline default); "dlib", "dlib-cnn", "insightface"
    (face, crop), *others = extract_faces("me.jpg", analyzer)  # largest face first

The detector runs on the photo shrunk to at most ``DETECT_MAX_SIDE`` pixels on its longest side
(alignment uses the full-resolution photo); if it finds nothing, it runs again on a copy padded by
25% of the width / height on every side with grey 128 (the published fallback, which helps faces
cut by the photo's edge), and the results are mapped back to the photo's coordinates.
"""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path
from typing import Any

from PIL import Image

from uniportrait.errors import NoFaceError, UniPortraitError
from uniportrait.faces.align import (
    ALIGNED_SIZE,
    MIN_FACE_SIZE,
    align_face,
    alignment_matrix,
    arcface_template,
    face_masks,
    face_problem,
    similarity_transform,
)
from uniportrait.faces.image_io import (
    ImageSource,
    ImageWriteError,
    describe_source,
    load_image,
    save_png_atomic,
)
from uniportrait.faces.types import LANDMARK_NAMES, Face, FaceAnalyzer, FaceEmbedder, sort_faces

__all__ = [
    "ALIGNED_SIZE",
    "ANALYZER_NAMES",
    "DEFAULT_ANALYZER",
    "LANDMARK_NAMES",
    "MIN_FACE_SIZE",
    "PAD_FRACTION",
    "SAMPLE_PHOTOS",
    "Face",
    "FaceAnalyzer",
    "FaceEmbedder",
    "ImageWriteError",
    "align_face",
    "aligner_id",
    "alignment_matrix",
    "arcface_template",
    "detect_faces",
    "extract_faces",
    "face_masks",
    "face_problem",
    "get_face_analyzer",
    "load_image",
    "sample_photo",
    "save_png_atomic",
    "similarity_transform",
]

logger = logging.getLogger(__name__)

ANALYZER_NAMES: tuple[str, ...] = ("mtcnn", "dlib", "dlib-cnn", "insightface", "world")
DEFAULT_ANALYZER = "mtcnn"
ALIGNMENT = "norm_crop"  # align_face: insightface's norm_crop
PAD_FRACTION = 0.25
PAD_GREY = (128, 128, 128)
#: Detection runs on a copy of the photo at most this many pixels on its longest side (faces are
#: found at this size; time and memory of detection grow with the pixels); alignment uses the
#: full-resolution photo.
DETECT_MAX_SIDE = 1024
SAMPLE_PHOTOS: tuple[str, ...] = (
    "ffhq-0100.jpg",
    "ffhq-0293.jpg",
    "ffhq-0381.jpg",
    "newton.jpg",
    "style-2.jpg",
)


def get_face_analyzer(name: str = DEFAULT_ANALYZER, **kwargs: Any) -> FaceAnalyzer:
    """A face analyzer by name: ``"mtcnn"`` (the default: MTCNN with its real five points, weights
    shipped), ``"dlib"`` (HOG detector, derived mouth corners), ``"dlib-cnn"`` (dlib's CNN detector),
    ``"insightface"`` (optional extra; models never downloaded), or ``"world"`` (the identity
    world's face detector, for world pictures: ``docs/world.md``).

    Keyword arguments go to :class:`~uniportrait.faces.mtcnn.MTCNNFaceAnalyzer`,
    :class:`~uniportrait.faces.dlib_backend.DlibFaceAnalyzer` or
    :class:`~uniportrait.faces.insightface_backend.InsightFaceAnalyzer`.
    """
    if name == "mtcnn":
        from uniportrait.faces.mtcnn import MTCNNFaceAnalyzer

        return MTCNNFaceAnalyzer(**kwargs)
    if name in ("dlib", "dlib-hog", "dlib-cnn"):
        from uniportrait.faces.dlib_backend import DlibFaceAnalyzer

        kwargs.setdefault("detector", "cnn" if name == "dlib-cnn" else "hog")
        return DlibFaceAnalyzer(**kwargs)
    if name == "insightface":
        from uniportrait.faces.insightface_backend import InsightFaceAnalyzer

        return InsightFaceAnalyzer(**kwargs)
    if name == "world":
        from uniportrait.world.faces import WorldFaceAnalyzer

        return WorldFaceAnalyzer(**kwargs)
    raise UniPortraitError(f"unknown face analyzer {name!r}; choose one of {', '.join(ANALYZER_NAMES)}")


def aligner_id(analyzer: FaceAnalyzer | str) -> str:
    """What made a crop: the detector's name (an analyzer or its name) and the warp, e.g.
    ``"mtcnn+norm_crop"`` (stored with identities, so crops from another detector or warp are
    recognised)."""
    name = analyzer if isinstance(analyzer, str) else analyzer.name
    return f"{name}+{ALIGNMENT}"


def detect_faces(
    image: Image.Image, analyzer: FaceAnalyzer, pad_retry: bool = True, max_side: int | None = DETECT_MAX_SIDE
) -> list[Face]:
    """All faces in an RGB image, largest first, with the padded retry when none is found.

    The detector sees at most ``max_side`` pixels on the longest side (the padded retry too), so
    a large photo costs no more time or memory than one of that size; the faces are in the
    photo's own pixel coordinates either way.
    """
    work, scale = _fit(image, max_side)
    faces = analyzer.detect(work)
    if not faces and pad_retry:
        pad_x, pad_y = round(PAD_FRACTION * work.width), round(PAD_FRACTION * work.height)
        padded = Image.new("RGB", (work.width + 2 * pad_x, work.height + 2 * pad_y), PAD_GREY)
        padded.paste(work.convert("RGB"), (pad_x, pad_y))
        padded, shrink = _fit(padded, max_side)
        faces = [_scaled(f, shrink).translated(-pad_x, -pad_y) for f in analyzer.detect(padded)]
        if faces:
            logger.debug("found %d face(s) only after padding the image", len(faces))
    return sort_faces([_scaled(f, scale) for f in faces])


def _fit(image: Image.Image, max_side: int | None) -> tuple[Image.Image, float]:
    """``image`` shrunk to at most ``max_side`` on its longest side, and the factor used."""
    scale = 1.0 if max_side is None else min(1.0, max_side / max(image.size))
    if scale == 1.0:
        return image, 1.0
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BILINEAR), scale


def _scaled(face: Face, scale: float) -> Face:
    """A face found on an image shrunk by ``scale``, in the original image's coordinates."""
    if scale == 1.0:
        return face
    box = tuple(v / scale for v in face.box)
    return Face(box, face.score, face.landmarks / scale)  # type: ignore[arg-type]


def extract_faces(
    image: ImageSource,
    analyzer: FaceAnalyzer,
    max_faces: int | None = None,
    name: str | None = None,
    min_size: int | None = None,
    size: int = ALIGNED_SIZE,
) -> list[tuple[Face, Image.Image]]:
    """Detect and align the faces of a photo: ``[(face, size×size RGB crop), ...]``, largest first.

    Faces too small to align usefully are skipped: under ``min_size`` px, by default the
    analyzer's ``min_usable_px`` (the identity world's faces are small by design) or
    :data:`~uniportrait.faces.align.MIN_FACE_SIZE`. ``name`` names the photo in errors
    (default: its path).

    Raises:
        InvalidImageError: the photo cannot be read.
        NoFaceError: no face found, or only faces that are too small (the message says which).
    """
    name = name or describe_source(image)
    if min_size is None:
        min_size = getattr(analyzer, "min_usable_px", MIN_FACE_SIZE)
    picture = load_image(image)
    faces = detect_faces(picture, analyzer)
    usable = [face for face in faces if face_problem(face, min_size) is None]
    if not usable:
        if faces:
            raise NoFaceError(
                f"no usable face in {name}: {len(faces)} found, but {face_problem(faces[0], min_size)}"
            )
        smallest = getattr(analyzer, "min_face_px", None)
        hint = f"; faces smaller than about {smallest:.0f} px are not detected" if smallest else ""
        raise NoFaceError(f"no face found in {name} (is a face visible and facing the camera?{hint})")
    if len(usable) < len(faces):
        logger.info("%s: skipped %d face(s) too small to align", name, len(faces) - len(usable))
    if max_faces is not None:
        usable = usable[:max_faces]
    return [(face, align_face(picture, face.landmarks, size)) for face in usable]


def sample_photo(name: str) -> Path:
    """Path of a bundled sample photo (see ``uniportrait/assets/faces/README.md``).

    Names: :data:`SAMPLE_PHOTOS` (the ``.jpg`` may be left out).
    """
    filename = name if name.endswith(".jpg") else f"{name}.jpg"
    if filename not in SAMPLE_PHOTOS:
        raise UniPortraitError(f"unknown sample photo {name!r}; available: {', '.join(SAMPLE_PHOTOS)}")
    resource = resources.files("uniportrait") / "assets" / "faces" / filename
    path = Path(str(resource))
    if not path.is_file():
        raise UniPortraitError(f"bundled sample photo {filename} is missing from this installation ({path})")
    return path
