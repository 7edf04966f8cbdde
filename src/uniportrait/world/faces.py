"""Aligned face crops of world pictures, made the way the pipeline makes them for real photos:
the 5 landmarks → the ArcFace-template 224 crop (``uniportrait.faces.align``) → the size a
network reads (bilinear, as ``identity.backbone_pixels`` does)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from uniportrait.atomic import atomic_path
from uniportrait.faces.align import ALIGNED_SIZE, align_face


def aligned_crops(
    images: np.ndarray,
    landmarks: np.ndarray,
    size: int = 64,
    jitter: float = 0.0,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """(N, H, W, 3) uint8 pictures + (N, 5, 2) landmarks → (N, size, size, 3) uint8 aligned crops.

    ``jitter``: std (pixels) of noise added to the landmarks, as a detector's error.
    """
    out = np.zeros((len(images), size, size, 3), dtype=np.uint8)
    for k, (image, points) in enumerate(zip(images, landmarks)):
        if jitter and rng is not None:
            points = points + rng.normal(0.0, jitter, points.shape)
        crop = np.asarray(align_face(Image.fromarray(image), points), dtype=np.float32)  # (224, 224, 3)
        if size != ALIGNED_SIZE:
            t = torch.from_numpy(crop).permute(2, 0, 1)[None]
            t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
            crop = t[0].permute(1, 2, 0).numpy()
        out[k] = np.clip(crop + 0.5, 0, 255).astype(np.uint8)
    return out


def faces_of_set(data: dict[str, np.ndarray]):
    """Every face of a rendered set: (picture index, person index) pairs, left to right."""
    pairs = [(i, p) for i in range(len(data["num_people"])) for p in range(int(data["num_people"][i]))]
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)


def build_crops(
    sets: list[dict[str, np.ndarray]], out: Path, size: int = 64, jitter: float = 0.7, seed: int = 0
):
    """Aligned crops of every face of ``sets`` with their identity labels, saved to ``out`` (.npz)."""
    rng = np.random.default_rng(seed)
    crops, labels, traits, attrs = [], [], [], []
    for data in sets:
        pairs = faces_of_set(data)
        images = data["images"][pairs[:, 0]]
        points = data["landmarks"][pairs[:, 0], pairs[:, 1]]
        crops.append(aligned_crops(images, points, size, jitter, rng))
        labels.append(data["identities"][pairs[:, 0], pairs[:, 1]])
        traits.append(data["traits"][pairs[:, 0], pairs[:, 1]])
        attrs.append(data["person_attrs"][pairs[:, 0], pairs[:, 1]])
    arrays = {
        "crops": np.concatenate(crops),
        "labels": np.concatenate(labels),
        "traits": np.concatenate(traits),
        "person_attrs": np.concatenate(attrs),
    }
    with atomic_path(out) as tmp, open(tmp, "wb") as handle:  # a handle: np.savez adds no suffix
        np.savez(handle, **arrays)
    return arrays


def load_crops(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Crops and their identities as class indices 0..K-1."""
    with np.load(path) as f:
        return f["crops"], np.unique(f["labels"], return_inverse=True)[1].astype(np.int64)


class WorldFaceAnalyzer:
    """The face analyzer of world pictures (``get_face_analyzer("world")``): boxes and the five
    landmarks from the world's own face detector (``assets/world/face_detector``), the part that
    plays MTCNN for the world preset. It is trained like the detector oracle but separately (other
    seed, shorter), so the oracle that measures generations is never part of making them."""

    name = "world"
    min_face_px = 8
    min_usable_px = 12  # world faces are 16-40 px: the world works at 64 px

    def __init__(self, folder: str | Path | None = None, threshold: float = 0.35) -> None:
        from uniportrait.errors import WeightsNotFoundError
        from uniportrait.world.build import WORLD_ASSETS
        from uniportrait.world.oracles import FaceDetector

        folder = Path(folder or WORLD_ASSETS / "face_detector")
        if not (folder / "config.json").is_file():
            raise WeightsNotFoundError(
                f"world face detector: {folder} holds no trained detector (run `uniportrait world build`)"
            )
        self.detector = FaceDetector.from_pretrained(folder).float().eval()
        self.threshold = threshold

    def detect(self, image) -> list:
        """Faces of one picture (PIL image or (H, W, 3) uint8 array), largest first.

        Raises:
            InvalidImageError: the picture is larger than any world picture (a real photo: the
                world's detector has never seen one, and would find nothing or a false face).
        """
        from uniportrait.world.oracles import detect_faces

        check_world_picture(image, "the world preset", "--preset sd15")
        return detect_faces(self.detector, image, self.threshold)


def check_world_picture(image, reader: str, instead: str) -> None:
    """Refuse a picture larger than any world picture (a real photo): the world's detectors have
    never seen one, and would find nothing or a false face. ``reader`` names what refuses it,
    ``instead`` what to use for real photos.

    Raises:
        InvalidImageError: naming the picture's size, the largest world picture and ``instead``.
    """
    from uniportrait.errors import InvalidImageError
    from uniportrait.world.scenes import SIZES

    width, height = image.size if isinstance(image, Image.Image) else (image.shape[1], image.shape[0])
    most_w, most_h = (max(s[k] for s in SIZES.values()) for k in (0, 1))
    if width > most_w or height > most_h:
        raise InvalidImageError(
            f"a {width}x{height} picture is not a world picture (at most {most_w}x{most_h}): {reader} "
            f"reads pictures of world people (`uniportrait world render`); for real photos use {instead}"
        )
