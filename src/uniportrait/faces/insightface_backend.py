"""Optional insightface detector (SCRFD + ArcFace), as used by the published UniPortrait.

Install with ``pip install uniportrait[insightface]``. The model packs (``antelopev2``,
``buffalo_l``) are licensed for non-commercial research only and are **never downloaded** here:
unpack them yourself into ``<root>/models/<model>/`` (``root`` defaults to ``$INSIGHTFACE_HOME``
or ``~/.insightface``). insightface's landmarks are already in ArcFace order.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from uniportrait.errors import ConfigError, UniPortraitError
from uniportrait.faces.types import Face, sort_faces

MODELS = ("antelopev2", "buffalo_l")


class InsightFaceUnavailableError(UniPortraitError):
    """insightface, onnxruntime or the model pack is missing."""


def default_root() -> Path:
    return Path(os.environ.get("INSIGHTFACE_HOME", "~/.insightface")).expanduser()


class InsightFaceAnalyzer:
    """Detection (SCRFD), 5 landmarks and 512-D ArcFace embeddings with insightface.

    Args:
        model: ``"antelopev2"`` or ``"buffalo_l"``.
        root: folder holding ``models/<model>/*.onnx`` (default: :func:`default_root`).
        det_size: the detector's input side in pixels.
        providers: onnxruntime execution providers (default: all available).
    """

    def __init__(
        self,
        model: str = "antelopev2",
        root: str | os.PathLike | None = None,
        det_size: int = 640,
        providers: list[str] | None = None,
    ):
        if model not in MODELS:
            raise ConfigError(f"model must be one of {MODELS}, got {model!r}")
        for package in ("insightface", "onnxruntime"):
            if importlib.util.find_spec(package) is None:
                raise InsightFaceUnavailableError(
                    f"the insightface face analyzer needs {package}: pip install uniportrait[insightface]"
                )
        self.model, self.root, self.det_size, self.providers = (
            model,
            Path(root) if root else default_root(),
            det_size,
            providers,
        )
        self.name = f"insightface-{model}"
        self._app: Any = None
        self._lock = threading.Lock()

    @property
    def model_dir(self) -> Path:
        return self.root / "models" / self.model

    def _check_models(self) -> None:
        folder = self.model_dir
        if any(folder.glob("*.onnx")):
            return
        if any(folder.glob(f"{self.model}/*.onnx")):  # a zip unpacked one level too deep
            raise InsightFaceUnavailableError(
                f"insightface model files are in {folder / self.model}; move them up into {folder}"
            )
        raise InsightFaceUnavailableError(
            f"insightface model pack {self.model!r} not found: put its .onnx files in {folder} "
            "(uniportrait never downloads it; its license is non-commercial research only)"
        )

    def _get_app(self) -> Any:
        """Create the insightface app once (lock held). Its folder is checked first, so
        insightface never reaches for the network."""
        if self._app is None:
            self._check_models()
            import onnxruntime
            from insightface.app import FaceAnalysis

            providers = self.providers or onnxruntime.get_available_providers()
            app = FaceAnalysis(
                name=self.model,
                root=str(self.root),
                providers=providers,
                allowed_modules=["detection", "recognition"],
            )
            ctx_id = 0 if "CUDAExecutionProvider" in providers else -1
            app.prepare(ctx_id=ctx_id, det_size=(self.det_size, self.det_size))
            self._app = app
        return self._app

    def detect(self, image: Image.Image) -> list[Face]:
        bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
        with self._lock:
            found = self._get_app().get(bgr)
        return sort_faces([Face(tuple(f.bbox), float(f.det_score), np.asarray(f.kps)) for f in found])

    def embed(self, image: Image.Image, face: Face) -> np.ndarray:
        """The ArcFace embedding ``(512,)`` float32, L2-normalised."""
        from insightface.app.common import Face as InsightFace

        bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
        target = InsightFace(
            bbox=np.asarray(face.box), kps=face.landmarks.astype(np.float32), det_score=face.score
        )
        with self._lock:
            embedding = self._get_app().models["recognition"].get(bgr, target)
        embedding = np.asarray(embedding, dtype=np.float32)
        return embedding / max(float(np.linalg.norm(embedding)), 1e-12)
