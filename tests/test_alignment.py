"""Alignment equals the published path (insightface ``norm_crop``) given the same landmarks.

The reference below is written from norm_crop's documented algorithm, independently of
``uniportrait.faces.align``: scikit-image's ``SimilarityTransform.estimate`` (Umeyama 1991, with
its rank and reflection handling) from the landmarks to the ArcFace template × (size / 112), then
``cv2.warpAffine(img, M, (size, size), borderValue=0.0)`` (bilinear, constant black border).
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image

from uniportrait.faces import align_face, arcface_template, load_image, sample_photo

REAL_FACES = ("ffhq-0100.jpg", "ffhq-0293.jpg", "ffhq-0381.jpg", "newton.jpg")

# insightface's arcface_dst (112 px), written out again here on purpose.
ARCFACE_DST = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)

# MTCNN (facenet-pytorch) landmarks on the sample photos, from scripts/compare_mtcnn.py.
SAMPLE_LANDMARKS = {
    "ffhq-0100.jpg": [
        [119.74, 151.28],
        [200.91, 152.17],
        [146.72, 198.69],
        [119.26, 226.55],
        [203.95, 229.97],
    ],
    "ffhq-0293.jpg": [
        [117.69, 151.14],
        [198.28, 150.33],
        [150.29, 202.25],
        [123.61, 232.15],
        [194.8, 228.11],
    ],
    "ffhq-0381.jpg": [
        [119.91, 151.42],
        [199.42, 149.96],
        [162.84, 198.65],
        [129.71, 238.1],
        [196.05, 237.35],
    ],
    "newton.jpg": [[141.19, 64.11], [167.89, 66.44], [155.2, 83.26], [141.23, 94.04], [161.68, 95.81]],
}


def umeyama(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """scikit-image's ``_umeyama(src, dst, estimate_scale=True)``: the (3, 3) similarity matrix."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    num, dim = src.shape
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_demean, dst_demean = src - src_mean, dst - dst_mean
    a = dst_demean.T @ src_demean / num
    d = np.ones(dim)
    if np.linalg.det(a) < 0:
        d[dim - 1] = -1
    t = np.eye(dim + 1)
    u, s, v = np.linalg.svd(a)
    rank = np.linalg.matrix_rank(a)
    if rank == dim - 1:
        if np.linalg.det(u) * np.linalg.det(v) > 0:
            t[:dim, :dim] = u @ v
        else:
            saved, d[dim - 1] = d[dim - 1], -1
            t[:dim, :dim] = u @ np.diag(d) @ v
            d[dim - 1] = saved
    else:
        t[:dim, :dim] = u @ np.diag(d) @ v
    scale = 1.0 / src_demean.var(axis=0).sum() * (s @ d)
    t[:dim, dim] = dst_mean - scale * (t[:dim, :dim] @ src_mean.T)
    t[:dim, :dim] *= scale
    return t


def norm_crop(pixels: np.ndarray, landmarks: np.ndarray, size: int = 224) -> np.ndarray:
    """insightface ``face_align.norm_crop`` for sizes that are multiples of 112."""
    assert size % 112 == 0
    dst = ARCFACE_DST * (float(size) / 112.0)
    matrix = umeyama(landmarks, dst)[0:2, :]
    return cv2.warpAffine(pixels, matrix, (size, size), borderValue=0.0)


def _difference(ours: Image.Image, reference: np.ndarray) -> np.ndarray:
    return np.abs(np.asarray(ours).astype(np.int16) - reference.astype(np.int16))


@pytest.mark.parametrize("name", REAL_FACES)
def test_crop_equals_norm_crop_on_the_same_landmarks(name):
    image = load_image(sample_photo(name))
    pixels = np.asarray(image)
    base = np.asarray(SAMPLE_LANDMARKS[name], dtype=np.float32)
    rng = np.random.default_rng(0)
    for trial in range(4):  # the detector's points and jittered ones (other poses, sub-pixel positions)
        landmarks = base if trial == 0 else base + rng.normal(0, 3, base.shape).astype(np.float32)
        difference = _difference(align_face(image, landmarks), norm_crop(pixels, landmarks))
        assert difference.mean() < 1.0 and difference.max() <= 1
    for size in (112, 224):
        assert np.asarray(align_face(image, base, size)).shape == (size, size, 3)
        assert _difference(align_face(image, base, size), norm_crop(pixels, base, size)).max() <= 1


def test_half_a_pixel_off_would_be_caught():
    """The comparison is sensitive: a half-pixel shift of the landmarks (the PIL vs OpenCV pixel
    centre mix-up) moves the crop by far more than the tolerance."""
    image = load_image(sample_photo("ffhq-0100.jpg"))
    landmarks = np.asarray(SAMPLE_LANDMARKS["ffhq-0100.jpg"], dtype=np.float32)
    shifted = _difference(align_face(image, landmarks + 0.5), norm_crop(np.asarray(image), landmarks))
    assert shifted.mean() > 1.0


def test_pixel_centres_are_at_integers_and_the_border_is_black():
    image = np.zeros((224, 224, 3), np.uint8)
    image[40, 30] = 255
    template = arcface_template(224)
    # Landmarks at half the template: the crop is the image scaled ×2 about pixel (0, 0)'s centre,
    # so image pixel (30, 40) lands exactly on crop pixel (60, 80) and its neighbours get half.
    crop = np.asarray(align_face(Image.fromarray(image), template / 2))[..., 0].astype(int)
    assert crop[80, 60] == 255
    assert crop[80, 59] == crop[80, 61] == crop[79, 60] == crop[81, 60] == 128
    assert crop[80, 58] == crop[80, 62] == 0
    # A whole-pixel translation copies pixels exactly.
    moved = np.asarray(align_face(Image.fromarray(image), template - np.float32([10, 20])))[..., 0]
    assert moved[60, 40] == 255 and moved.sum() == 255
    # Outside the photo: black, as norm_crop (not the grey of the detector's padded retry).
    far = np.asarray(align_face(Image.fromarray(image + 200), template + 150))
    assert far[-1, -1].tolist() == [0, 0, 0] and far[0, 0].tolist() == [200, 200, 200]
