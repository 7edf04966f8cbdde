"""Aligning faces to the ArcFace 5-point template, and face-box masks.

:func:`align_face` is insightface's ``norm_crop`` (what the published UniPortrait demo uses): a
least-squares similarity transform (Umeyama) from the five landmarks to the ArcFace template
scaled by ``size / 112``, applied with OpenCV's ``warpAffine`` (bilinear, black outside the
photo). Coordinates follow OpenCV's "pixel centre at integer" convention (pixel ``(0, 0)`` covers
``[-0.5, 0.5)``), which is also the landmark detectors' and the template's, so no half-pixel
correction is needed anywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from uniportrait.faces.types import Face

# insightface's `arcface_dst`: left eye, right eye, nose tip, left / right mouth corner, 112×112.
ARCFACE_TEMPLATE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)
ALIGNED_SIZE = 224

# Faces smaller than this are not worth aligning: the 224 crop would be a >4× upscale (>2× at the
# 112 px the recognition backbone sees) and carry little identity. A box side of 48 px puts the
# eyes ~20 px apart, against 70.5 px in the 224 template. The eye-distance limit catches
# near-profile faces whose box is large but whose eyes are almost on top of each other.
MIN_FACE_SIZE = 48
MIN_EYE_DISTANCE = 12.0


def arcface_template(size: int = ALIGNED_SIZE) -> np.ndarray:
    """The 5-point template for a ``size``×``size`` crop: ``(5, 2)`` float32 (×2 for 224)."""
    return ARCFACE_TEMPLATE_112 * np.float32(size / 112.0)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation; no reflection).

    Umeyama (1991): the ``(2, 3)`` matrix ``M = [s·R | t]`` minimising ``Σ‖s·R·srcᵢ + t − dstᵢ‖²``.

    Args:
        src, dst: ``(N, 2)`` matching points, N ≥ 2.
    """
    src = np.asarray(src, dtype=np.float64).reshape(-1, 2)
    dst = np.asarray(dst, dtype=np.float64).reshape(-1, 2)
    if src.shape != dst.shape or len(src) < 2:
        raise ValueError(f"need two (N, 2) arrays with N >= 2, got {src.shape} and {dst.shape}")
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    src_var = (src_c**2).sum(1).mean()
    if src_var < 1e-12:
        raise ValueError("source points are all identical; cannot estimate a transform")
    cov = dst_c.T @ src_c / len(src)  # (2, 2)
    u, sing, vt = np.linalg.svd(cov)
    signs = np.array([1.0, np.sign(np.linalg.det(u) * np.linalg.det(vt)) or 1.0])
    rotation = u @ np.diag(signs) @ vt
    scale = (sing * signs).sum() / src_var
    translation = dst_mean - scale * rotation @ src_mean
    return np.hstack([scale * rotation, translation[:, None]])


def alignment_matrix(landmarks: np.ndarray, size: int = ALIGNED_SIZE) -> np.ndarray:
    """``(2, 3)`` matrix mapping image pixels to the aligned ``size``×``size`` crop."""
    return similarity_transform(landmarks, arcface_template(size))


def align_face(image: Image.Image, landmarks: np.ndarray, size: int = ALIGNED_SIZE) -> Image.Image:
    """Warp the face with these ``(5, 2)`` landmarks onto the ArcFace template (``norm_crop``).

    Returns a ``size``×``size`` RGB crop: bilinear, area outside the photo black.
    """
    import cv2

    matrix = alignment_matrix(landmarks, size)  # (2, 3) float64, image → crop
    pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
    warped = cv2.warpAffine(
        pixels, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0
    )
    return Image.fromarray(warped, "RGB")


def face_problem(face: Face, min_size: int = MIN_FACE_SIZE) -> str | None:
    """Why ``face`` is too small to align usefully, or ``None`` when it is fine."""
    side = min(face.width, face.height)
    if side < min_size:
        return f"face too small ({face.width:.0f}x{face.height:.0f} px box; at least {min_size} px needed)"
    min_eyes = MIN_EYE_DISTANCE * min_size / MIN_FACE_SIZE
    if face.eye_distance < min_eyes:
        return f"face too small or turned away (eyes {face.eye_distance:.1f} px apart; at least {min_eyes:.0f} needed)"
    return None


def face_masks(faces_or_boxes: Sequence[Face | Sequence[float]], height: int, width: int) -> np.ndarray:
    """Rectangular masks of face boxes: ``(N, height, width)`` bool, boxes clipped to the image.

    A pixel is inside when it overlaps the box (box edges rounded outwards).
    """
    masks = np.zeros((len(faces_or_boxes), height, width), dtype=bool)
    for index, item in enumerate(faces_or_boxes):
        x0, y0, x1, y1 = item.box if isinstance(item, Face) else (float(v) for v in item)
        left, right = np.clip([np.floor(x0), np.ceil(x1)], 0, width).astype(int)
        top, bottom = np.clip([np.floor(y0), np.ceil(y1)], 0, height).astype(int)
        masks[index, top:bottom, left:right] = True
    return masks
