"""The offline default face stack: dlib's detectors and landmark models.

The model files come from the ``face_recognition_models`` package (HOG needs none). That
package's ``__init__`` imports ``pkg_resources``, which modern environments lack, so its folder is
found with :func:`importlib.util.find_spec`, which does not run the ``__init__``.

Landmarks. ``landmarks="5"`` (the default) uses dlib's 5-point model, which gives both corners of
each eye and the base of the nose, but no mouth corners. The ArcFace points are derived from it:

- eye centres: the mean of each eye's two corners;
- nose tip and mouth corners: predicted from the nose base in a face frame (origin between the
  eye centres, u along the eye line, v perpendicular pointing down, unit = eye distance) with
  the constants of :class:`FivePointCalibration`. They come from
  ``scripts/calibrate_dlib_5pt.py``, which fits them to the 68-point model's nose tip (30) and
  mouth corners (48, 54) on the bundled sample photos (with flips, rescales and rotations).
  Held-out error against the 68-point positions: nose 0.05, mouth 0.09 eye distances (3.5 and
  6.6 px in the 224 crop); the aligned crop moves 3.6 px on average against aligning on the
  68-point positions (4.7 px with fixed constants that ignore the nose base).

``landmarks="68"`` uses the 68-point model directly (eye centres = means of points 36–41 and
42–47, nose tip 30, mouth corners 48 and 54). Its training data, iBUG 300-W, is licensed for
non-commercial use only, which is why the 5-point model is the default.
"""

from __future__ import annotations

import importlib.util
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from uniportrait.errors import ConfigError, UniPortraitError
from uniportrait.faces.types import Face, sort_faces

MODEL_FILES = {
    "cnn": "mmod_human_face_detector.dat",
    "5": "shape_predictor_5_face_landmarks.dat",
    "68": "shape_predictor_68_face_landmarks.dat",
    "recognition": "dlib_face_recognition_resnet_model_v1.dat",
}


@dataclass(frozen=True)
class FivePointCalibration:
    """How the nose tip and mouth corners follow the nose base, in face-frame units.

    With ``(u_b, v_b)`` the 5-point nose base in the face frame (u along the eye line, v down,
    unit = eye distance, origin between the eye centres):

    - nose tip: ``(nose_u_ratio · u_b, v_b + nose_v_offset)``: the tip sticks out further than
      the base, so it moves more when the head turns;
    - mouth corners: ``(mouth_u_ratio · u_b ∓ mouth_half_width, v_b + mouth_v_offset)``.

    Defaults: fitted by ``scripts/calibrate_dlib_5pt.py`` on the bundled sample photos.
    """

    nose_u_ratio: float = 1.618
    nose_v_offset: float = -0.201
    mouth_u_ratio: float = 0.060
    mouth_half_width: float = 0.450
    mouth_v_offset: float = 0.252


DLIB_5PT_CALIBRATION = FivePointCalibration()


class DlibModelsNotFoundError(UniPortraitError):
    """dlib or the ``face_recognition_models`` model files are not installed."""


def dlib_models_dir() -> Path:
    """The folder with dlib's model files, shipped by the ``face_recognition_models`` package."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise DlibModelsNotFoundError(
            "dlib's model files are missing: pip install face_recognition_models (or pip install uniportrait)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "models"


def _model_path(key: str) -> str:
    path = dlib_models_dir() / MODEL_FILES[key]
    if not path.is_file():
        raise DlibModelsNotFoundError(
            f"dlib model file {path} is missing: pip install --force-reinstall face_recognition_models"
        )
    return str(path)


def _import_dlib() -> Any:
    try:
        import dlib
    except ImportError as err:
        raise DlibModelsNotFoundError("dlib is not installed: pip install dlib-bin") from err
    return dlib


def face_frame(left_eye: np.ndarray, right_eye: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The face frame ``(origin (2,), axes (2, 2))``; ``axes`` rows are x and y scaled by the eye
    distance, so a frame point ``(u, v)`` is at ``origin + u·axes[0] + v·axes[1]`` in the image."""
    origin = (left_eye + right_eye) / 2
    x_axis = right_eye - left_eye
    y_axis = np.array([-x_axis[1], x_axis[0]])  # x rotated by +90°: points down in image coordinates
    return origin, np.stack([x_axis, y_axis])


def to_frame(points: np.ndarray, origin: np.ndarray, axes: np.ndarray) -> np.ndarray:
    """Image points ``(N, 2)`` → face-frame ``(u, v)`` coordinates ``(N, 2)``."""
    return (points - origin) @ np.linalg.inv(axes)


def calibrated_frame_points(nose_base: np.ndarray, calibration: FivePointCalibration) -> np.ndarray:
    """ArcFace points ``(5, 2)`` in the face frame, predicted from the nose base ``(u_b, v_b)``."""
    u, v = (float(x) for x in nose_base)
    c = calibration
    mouth_u, mouth_v = c.mouth_u_ratio * u, v + c.mouth_v_offset
    return np.array(
        [
            [-0.5, 0.0],
            [0.5, 0.0],
            [c.nose_u_ratio * u, v + c.nose_v_offset],
            [mouth_u - c.mouth_half_width, mouth_v],
            [mouth_u + c.mouth_half_width, mouth_v],
        ]
    )


def five_point_to_arcface(
    points: np.ndarray, calibration: FivePointCalibration = DLIB_5PT_CALIBRATION
) -> np.ndarray:
    """dlib 5-point landmarks ``(5, 2)`` → ArcFace 5 points ``(5, 2)`` float32.

    dlib's order: right eye outer/inner corner, left eye outer/inner corner, nose base (left and
    right as seen in the image; 68-point indices 45, 42, 36, 39, 33).
    """
    points = np.asarray(points, dtype=np.float64)
    origin, axes = face_frame(points[2:4].mean(0), points[0:2].mean(0))
    nose_base = to_frame(points[4:5], origin, axes)[0]
    return (origin + calibrated_frame_points(nose_base, calibration) @ axes).astype(np.float32)


def sixty_eight_to_arcface(points: np.ndarray) -> np.ndarray:
    """dlib/iBUG 68-point landmarks ``(68, 2)`` → ArcFace 5 points ``(5, 2)`` float32."""
    points = np.asarray(points, dtype=np.float64)
    return np.stack(
        [points[36:42].mean(0), points[42:48].mean(0), points[30], points[48], points[54]]
    ).astype(np.float32)


class DlibFaceAnalyzer:
    """Face detection, 5 landmarks and 128-D embeddings with dlib, fully offline.

    Args:
        detector: ``"hog"`` (fast, frontal faces, finds faces ≥ ~80 px / 2**upsample) or
            ``"cnn"`` (MMOD CNN; more poses, slower on CPU).
        upsample: how many times to double the image before detecting (finds smaller faces).
        landmarks: ``"5"`` (default; derived ArcFace points, see the module docstring) or
            ``"68"`` (iBUG 300-W model: non-commercial use only).
        threshold: detections scoring below this are dropped (HOG's adjust_threshold).

    Models load on first use and are kept on this instance; a lock serialises calls, so one
    instance can be shared between threads.
    """

    def __init__(
        self, detector: str = "hog", upsample: int = 1, landmarks: str = "5", threshold: float = 0.0
    ):
        if detector not in ("hog", "cnn"):
            raise ConfigError(f"detector must be 'hog' or 'cnn', got {detector!r}")
        landmarks = str(landmarks)
        if landmarks not in ("5", "68"):
            raise ConfigError(f"landmarks must be '5' or '68', got {landmarks!r}")
        if upsample < 0:
            raise ConfigError(f"upsample must be >= 0, got {upsample}")
        self.detector, self.upsample, self.landmarks, self.threshold = (
            detector,
            int(upsample),
            landmarks,
            float(threshold),
        )
        self.name = ("dlib" if detector == "hog" else "dlib-cnn") + ("-68" if landmarks == "68" else "")
        self._models: dict[str, Any] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"DlibFaceAnalyzer(detector={self.detector!r}, upsample={self.upsample}, landmarks={self.landmarks!r})"

    @property
    def min_face_px(self) -> float:
        """Roughly the smallest face box found: both detectors scan an 80×80 px window."""
        return 80.0 / 2**self.upsample

    def _model(self, key: str) -> Any:
        """Load (once) and return a dlib model; call with the lock held."""
        if key not in self._models:
            dlib = _import_dlib()
            if key == "hog":
                self._models[key] = dlib.get_frontal_face_detector()
            elif key == "cnn":
                self._models[key] = dlib.cnn_face_detection_model_v1(_model_path("cnn"))
            elif key == "recognition":
                self._models[key] = dlib.face_recognition_model_v1(_model_path("recognition"))
            else:
                self._models[key] = dlib.shape_predictor(_model_path(key))
        return self._models[key]

    def _rectangles(self, pixels: np.ndarray) -> list[tuple[Any, float]]:
        if self.detector == "hog":
            rects, scores, _ = self._model("hog").run(pixels, self.upsample, self.threshold)
            return list(zip(rects, scores))
        found = self._model("cnn")(pixels, self.upsample)
        return [(d.rect, d.confidence) for d in found if d.confidence >= self.threshold]

    def shape(self, pixels: np.ndarray, rect: Any, model: str) -> np.ndarray:
        """Raw dlib landmarks ``(5, 2)`` or ``(68, 2)`` for a dlib rectangle (with the lock held)."""
        parts = self._model(model)(pixels, rect).parts()
        return np.array([(p.x, p.y) for p in parts], dtype=np.float64)

    def detect(self, image: Image.Image) -> list[Face]:
        """All faces in an RGB image, largest box first."""
        pixels = np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
        faces = []
        with self._lock:
            for rect, score in self._rectangles(pixels):
                points = self.shape(pixels, rect, self.landmarks)
                arcface = (
                    five_point_to_arcface(points) if self.landmarks == "5" else sixty_eight_to_arcface(points)
                )
                box = (rect.left(), rect.top(), rect.right() + 1, rect.bottom() + 1)
                faces.append(Face(box, score, arcface))
        return sort_faces(faces)

    def embed(self, image: Image.Image, face: Face) -> np.ndarray:
        """dlib's 128-D face-recognition embedding ``(128,)`` float32 (unit-free; compare with
        Euclidean distance, < 0.6 = same person by dlib's convention)."""
        dlib = _import_dlib()
        pixels = np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
        x0, y0, x1, y1 = (int(round(v)) for v in face.box)
        rect = dlib.rectangle(x0, y0, x1 - 1, y1 - 1)
        with self._lock:
            shape = self._model("5")(pixels, rect)
            descriptor = self._model("recognition").compute_face_descriptor(pixels, shape)
        return np.asarray(descriptor, dtype=np.float32)
