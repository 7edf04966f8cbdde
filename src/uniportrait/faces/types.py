"""What a face detector returns, and the interface every detector backend implements."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image

# Landmark order (ArcFace template order; left/right as seen in the image, not the person's).
LANDMARK_NAMES: tuple[str, ...] = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")


@dataclass(frozen=True, eq=False)
class Face:
    """One detected face, in pixel coordinates of the upright (EXIF-oriented) image.

    Attributes:
        box: ``(x0, y0, x1, y1)``; ``x1``/``y1`` are exclusive. It may extend past the image.
        score: the detector's confidence (its scale depends on the backend: HOG margins are
            roughly 0–3, CNN and insightface scores are 0–1).
        landmarks: ``(5, 2)`` float32 ``(x, y)`` points in :data:`LANDMARK_NAMES` order: left eye
            centre, right eye centre, nose tip, left mouth corner, right mouth corner.
    """

    box: tuple[float, float, float, float]
    score: float
    landmarks: np.ndarray = field(repr=False)

    def __post_init__(self) -> None:
        box = tuple(float(v) for v in self.box)
        if len(box) != 4:
            raise ValueError(f"box must have 4 numbers (x0, y0, x1, y1), got {len(box)}")
        points = np.array(self.landmarks, dtype=np.float32).reshape(-1, 2)
        if points.shape != (5, 2):
            raise ValueError(f"landmarks must have shape (5, 2), got {np.shape(self.landmarks)}")
        points.setflags(write=False)
        object.__setattr__(self, "box", box)
        object.__setattr__(self, "score", float(self.score))
        object.__setattr__(self, "landmarks", points)

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> float:
        return self.box[3] - self.box[1]

    @property
    def area(self) -> float:
        return max(self.width, 0.0) * max(self.height, 0.0)

    @property
    def eye_distance(self) -> float:
        """Distance between the two eye centres, in pixels."""
        return float(np.linalg.norm(self.landmarks[1] - self.landmarks[0]))

    def translated(self, dx: float, dy: float) -> Face:
        """The same face with its box and landmarks shifted by ``(dx, dy)``."""
        x0, y0, x1, y1 = self.box
        return Face((x0 + dx, y0 + dy, x1 + dx, y1 + dy), self.score, self.landmarks + np.float32([dx, dy]))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: ``{"box": [4], "score": float, "landmarks": {name: [x, y]}}``."""
        return {
            "box": [round(v, 2) for v in self.box],
            "score": round(self.score, 4),
            "landmarks": {
                name: [round(float(x), 2), round(float(y), 2)]
                for name, (x, y) in zip(LANDMARK_NAMES, self.landmarks)
            },
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Face:
        """Inverse of :meth:`to_dict`."""
        points = data["landmarks"]
        if isinstance(points, dict):
            points = [points[name] for name in LANDMARK_NAMES]
        return cls(tuple(data["box"]), data["score"], np.asarray(points, dtype=np.float32))


@runtime_checkable
class FaceAnalyzer(Protocol):
    """A face detector with 5-point landmarks.

    ``detect`` takes an RGB image and returns every face found, largest box area first.
    """

    name: str

    def detect(self, image: Image.Image) -> list[Face]: ...


@runtime_checkable
class FaceEmbedder(FaceAnalyzer, Protocol):
    """A :class:`FaceAnalyzer` that also computes face-recognition embeddings (for evaluation)."""

    def embed(self, image: Image.Image, face: Face) -> np.ndarray:
        """The identity embedding of ``face`` in ``image``: a 1-D float32 vector."""
        ...


def sort_faces(faces: list[Face]) -> list[Face]:
    """Largest box area first; ties broken by higher score."""
    return sorted(faces, key=lambda face: (-face.area, -face.score))
