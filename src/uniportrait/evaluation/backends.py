"""Face-similarity backends: detect faces, embed them, compare embeddings.

Three backends, one interface (:class:`FaceSimilarityBackend`):

``dlib`` (offline default)
    Faces found by the default detector (MTCNN), embedded by dlib's 128-D face-recognition
    ResNet (``face_recognition_models``; dlib places its own 5 points inside each box).
    dlib compares descriptors by Euclidean distance ``d``; ``d < 0.6`` means "same person" by
    dlib's convention. We report a similarity linear in the distance::

        sim = 1 - d / (2 * 0.6)        # d = 0 → 1,  d = 0.6 (dlib's threshold) → 0.5,  d = 1.2 → 0

    It is not clipped (``d > 1.2`` gives a negative value). Cosine similarity of dlib descriptors
    is not used: the descriptors are not centred, so unrelated faces still get cosines around
    0.8 and the scale says little.
``curricular``
    The CurricularFace IR-101 backbone of the published UniPortrait files
    (``glint360k_curricular_face_r101_backbone.bin``): faces found by MTCNN, aligned to the 112×112
    ArcFace template, embedded (512-D), compared by cosine similarity, like the paper's Face Sim
    (a cosine of face-recognition embeddings).
``insightface``
    insightface's SCRFD detector and ArcFace recognition (optional extra; model packs are
    never downloaded), compared by cosine similarity.

Numbers from different backends are not comparable: each has its own embedding space and scale.
Every report names the backend and its thresholds.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from uniportrait.errors import UniPortraitError, WeightsNotFoundError
from uniportrait.evaluation.matching import Thresholds
from uniportrait.faces.types import Face

logger = logging.getLogger(__name__)

BACKENDS = ("dlib", "curricular", "insightface", "world")
DLIB_SAME_PERSON_DISTANCE = 0.6

# Default thresholds, in each backend's similarity scale (see matching.Thresholds).
# dlib: match = dlib's own 0.6-distance rule; blend / margin / related chosen from pixel blends of
# pairs of the sample faces against unrelated pairs (measurements in docs/evaluation.md).
# Cosine backends: conventional ArcFace-family levels, not calibrated here (no weights offline);
# override them with the CLI's --threshold options.
DEFAULT_THRESHOLDS = {
    "dlib": Thresholds(match=0.5, blend=0.6, margin=0.1, related=0.4),
    "curricular": Thresholds(match=0.3, blend=0.4, margin=0.1, related=0.2),
    "insightface": Thresholds(match=0.3, blend=0.4, margin=0.1, related=0.2),
    # world: the oracle recogniser's cosine; match = its threshold at FAR 1e-3 on held-out
    # identities (uniportrait world report, docs/world.md)
    "world": Thresholds(match=0.5, blend=0.6, margin=0.1, related=0.35),
}


#: The default blending rule's description (:func:`~uniportrait.evaluation.matching.match_faces`).
SIMILARITY_BLENDING = "similarity: weak and ambiguous (thresholds blend, margin, related)"


@dataclass(frozen=True)
class BackendInfo:
    """What a report says about the backend."""

    name: str
    detector: str
    embedding: str
    similarity: str
    thresholds: Thresholds
    #: how a face is found to blend two references
    blending: str = SIMILARITY_BLENDING
    #: how prompt following is read, or None when the backend cannot read it
    prompt_following: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "detector": self.detector,
            "embedding": self.embedding,
            "similarity": self.similarity,
            "thresholds": self.thresholds.to_dict(),
            "blending": self.blending,
            "prompt_following": self.prompt_following,
        }

    @property
    def blends_by_similarity(self) -> bool:
        """Whether the blend, margin and related thresholds decide blending (the default rule)."""
        return self.blending == SIMILARITY_BLENDING


class FaceSimilarityBackend(ABC):
    """Detect faces, embed them, and compare embeddings.

    Subclasses implement :meth:`detect`, :meth:`embed_faces`, :meth:`embed_aligned` and
    :meth:`similarity`, and set :attr:`info`. A backend that knows more about its pictures may
    also find blends its own way (:meth:`find_blends`) and read prompt following
    (:meth:`read_prompt`).
    """

    info: BackendInfo
    analyzer: Any  # the face analyzer that finds faces (see uniportrait.faces)

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def thresholds(self) -> Thresholds:
        return self.info.thresholds

    def with_thresholds(self, thresholds: Thresholds) -> FaceSimilarityBackend:
        """Use other thresholds (e.g. from the command line)."""
        self.info = dataclasses.replace(self.info, thresholds=thresholds)
        return self

    def detect(self, image: Image.Image) -> list[Face]:
        """Every face in an RGB image, largest first (with the backend's ``analyzer``)."""
        from uniportrait.faces import detect_faces

        return detect_faces(image.convert("RGB"), self.analyzer)

    @abstractmethod
    def embed_faces(self, image: Image.Image, faces: list[Face]) -> np.ndarray:
        """(F, E) float32 embeddings of ``faces`` in ``image``."""

    @abstractmethod
    def embed_aligned(self, crop: Image.Image) -> np.ndarray:
        """(E,) embedding of a 224×224 crop already aligned to the ArcFace template (as stored
        in identities)."""

    @abstractmethod
    def similarity(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """(A, E) × (B, E) → (A, B) similarities, higher = more alike."""

    def find_blends(self, image: Image.Image, faces: list[Face], references: list, match) -> list[int]:
        """Indices of the ``faces`` that blend two of the ``references`` (:class:`~uniportrait.
        evaluation.references.Reference`). By default the similarity rule ``match`` already
        applied (:func:`~uniportrait.evaluation.matching.match_faces`: weak and ambiguous)."""
        return list(match.blending)

    def read_prompt(
        self, image: Image.Image, prompt: str, faces: list[Face], num_people: int
    ) -> list[tuple[str, int, int]] | None:
        """``(attribute, asked value, read value)`` for each attribute ``prompt`` asks for, read
        in ``image`` (see :mod:`uniportrait.evaluation.prompt_following`); None where the backend
        cannot read attributes (the default)."""
        return None


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64).reshape(-1, np.shape(a)[-1])
    b = np.asarray(b, dtype=np.float64).reshape(-1, np.shape(b)[-1])
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return a @ b.T


def _template_face(size: int) -> Face:
    from uniportrait.faces import arcface_template

    return Face((0.0, 0.0, float(size), float(size)), 1.0, arcface_template(size))


class DlibBackend(FaceSimilarityBackend):
    """Faces found by the default detector (MTCNN), 128-D dlib descriptors (dlib places its own
    5 points inside each box); ``sim = 1 - d / 1.2`` (see the module docstring).

    Args:
        analyzer: the face detector (default: :func:`~uniportrait.faces.get_face_analyzer`'s).
        thresholds: default :data:`DEFAULT_THRESHOLDS` ``["dlib"]``.
        embedder: the :class:`~uniportrait.faces.dlib_backend.DlibFaceAnalyzer` whose ``embed``
            computes the descriptors (default: a new one).
    """

    def __init__(self, analyzer=None, thresholds: Thresholds | None = None, embedder=None) -> None:
        from uniportrait.faces import get_face_analyzer

        self.analyzer = analyzer or get_face_analyzer()
        self.embedder = embedder or (analyzer if hasattr(analyzer, "embed") else get_face_analyzer("dlib"))
        scale = 2 * DLIB_SAME_PERSON_DISTANCE
        self.info = BackendInfo(
            name="dlib",
            detector=self.analyzer.name,
            embedding="dlib_face_recognition_resnet_model_v1 (128-D)",
            similarity=f"1 - euclidean_distance / {scale:g} (dlib's same-person distance 0.6 -> 0.5)",
            thresholds=thresholds or DEFAULT_THRESHOLDS["dlib"],
        )

    def embed_faces(self, image: Image.Image, faces: list[Face]) -> np.ndarray:
        image = image.convert("RGB")
        if not faces:
            return np.zeros((0, 128), dtype=np.float32)
        return np.stack([self.embedder.embed(image, face) for face in faces]).astype(np.float32)

    def embed_aligned(self, crop: Image.Image) -> np.ndarray:
        # dlib re-aligns from a box; detect it on the crop, or use the whole crop when none is found.
        crop = crop.convert("RGB")
        faces = self.analyzer.detect(crop)
        face = faces[0] if faces else _template_face(crop.width)
        return self.embedder.embed(crop, face).astype(np.float32)

    def similarity(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        a = np.asarray(a, dtype=np.float64).reshape(-1, 128)
        b = np.asarray(b, dtype=np.float64).reshape(-1, 128)
        distance = np.linalg.norm(a[:, None, :] - b[None, :, :], axis=-1)  # (A, B)
        return 1.0 - distance / (2 * DLIB_SAME_PERSON_DISTANCE)


class CurricularBackend(FaceSimilarityBackend):
    """CurricularFace IR-101 embeddings (cosine) on faces aligned to 112×112 (``norm_crop``).

    Args:
        backbone: an :class:`~uniportrait.models.face_backbone.IRBackbone`, a path (the
            published ``.bin``, a folder holding it, or a folder written by
            ``IRBackbone.save_pretrained``), or a Hub id. Default: the published UniPortrait repo.
        analyzer: the face detector (default: :func:`~uniportrait.faces.get_face_analyzer`'s).
        device: torch device for the backbone (default: CPU).
    """

    def __init__(
        self, backbone: Any = None, analyzer=None, device=None, thresholds: Thresholds | None = None
    ):
        import torch

        from uniportrait.faces import get_face_analyzer

        self.analyzer = analyzer or get_face_analyzer()
        self.backbone, source = _load_backbone(backbone)
        self.backbone = self.backbone.to(device or torch.device("cpu")).eval()
        self.input_size = int(self.backbone.config.input_size)
        self.info = BackendInfo(
            name="curricular",
            detector=self.analyzer.name,
            embedding=f"CurricularFace IR backbone ({source}), {self.backbone.config.embedding_dim}-D",
            similarity="cosine",
            thresholds=thresholds or DEFAULT_THRESHOLDS["curricular"],
        )

    def _embed_crops(self, crops: list[Image.Image]) -> np.ndarray:
        import torch

        if not crops:
            return np.zeros((0, self.backbone.config.embedding_dim), dtype=np.float32)
        size = self.input_size
        arrays = [np.asarray(c.convert("RGB").resize((size, size), Image.BILINEAR)) for c in crops]
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (F, 3, S, S)
        param = next(self.backbone.parameters())
        with torch.no_grad():
            embedding = self.backbone(x.to(param.device, param.dtype)).embedding  # (F, E)
        embedding = torch.nn.functional.normalize(embedding.float(), dim=-1)
        return embedding.cpu().numpy().astype(np.float32)

    def embed_faces(self, image: Image.Image, faces: list[Face]) -> np.ndarray:
        from uniportrait.faces import align_face

        return self._embed_crops([align_face(image, face.landmarks, self.input_size) for face in faces])

    def embed_aligned(self, crop: Image.Image) -> np.ndarray:
        # A 224 crop on the ×2 template, resized, is a crop on the 112 template.
        return self._embed_crops([crop])[0]

    def similarity(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return _cosine(a, b)


def _load_backbone(spec: Any):
    """(IRBackbone, a short description of where it came from)."""
    from torch import nn

    from uniportrait.convert import BACKBONE_FILE, load_published_backbone, read_bin
    from uniportrait.loading import resolve_file
    from uniportrait.models.face_backbone import IRBackbone

    if isinstance(spec, nn.Module):
        return spec, "given module"
    if spec is None:
        from uniportrait.presets.pipelines import SD15_UNIPORTRAIT

        spec = SD15_UNIPORTRAIT
    path = Path(spec)
    if path.is_dir() and (path / "config.json").is_file():
        return IRBackbone.from_pretrained(path), str(path)
    try:
        file = resolve_file(spec, BACKBONE_FILE, "curricular face-similarity backend")
    except WeightsNotFoundError as err:
        raise WeightsNotFoundError(
            f"{err}. The curricular backend needs {BACKBONE_FILE} (published with UniPortrait): pass "
            "--backbone PATH, or use --backend dlib (offline)"
        ) from None
    return load_published_backbone(read_bin(file)), str(file)


class InsightFaceBackend(FaceSimilarityBackend):
    """insightface SCRFD detection + ArcFace embeddings (cosine). Needs the ``insightface`` extra
    and a model pack on disk (see :mod:`uniportrait.faces.insightface_backend`)."""

    def __init__(
        self,
        model: str = "antelopev2",
        root: str | os.PathLike | None = None,
        analyzer=None,
        thresholds: Thresholds | None = None,
    ) -> None:
        from uniportrait.faces import get_face_analyzer

        self.analyzer = analyzer or get_face_analyzer("insightface", model=model, root=root)
        self.info = BackendInfo(
            name="insightface",
            detector=self.analyzer.name,
            embedding=f"insightface {model} ArcFace (512-D)",
            similarity="cosine",
            thresholds=thresholds or DEFAULT_THRESHOLDS["insightface"],
        )

    def embed_faces(self, image: Image.Image, faces: list[Face]) -> np.ndarray:
        if not faces:
            return np.zeros((0, 512), dtype=np.float32)
        return np.stack([self.analyzer.embed(image.convert("RGB"), face) for face in faces])

    def embed_aligned(self, crop: Image.Image) -> np.ndarray:
        return self.analyzer.embed(crop.convert("RGB"), _template_face(crop.width))

    def similarity(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return _cosine(a, b)


class WorldBackend(FaceSimilarityBackend):
    """The identity world's oracles (``docs/world.md``): their detector finds faces in world
    pictures and their recogniser embeds aligned faces (cosine). Only meaningful on world pictures.

    Beyond Face Sim it measures what the world's oracles can: **blending by trait attribution**
    (a face blends two references when each explains a good share of the facial traits that tell
    them apart, read by the trait regressor; the rule of ``world identity-report``), and **prompt
    following** (the attributes a prompt in the world's phrases asks for, read back by the
    attribute classifiers).

    Args:
        oracles: a :class:`~uniportrait.world.oracles.WorldOracles` or a folder of oracles
            (default: the shipped ones).
    """

    def __init__(self, oracles: Any = None, thresholds: Thresholds | None = None) -> None:
        from uniportrait.world.oracles import WorldOracles

        self.analyzer = oracles if isinstance(oracles, WorldOracles) else WorldOracles(oracles)
        self._traits: dict[int, tuple[list, np.ndarray]] = {}  # id(crops) → (crops, trait vector)
        self.info = BackendInfo(
            name="world",
            detector="world oracle detector",
            embedding=f"world oracle recogniser ({self.analyzer.models['face'].config.embedding_dim}-D)",
            similarity="cosine",
            thresholds=thresholds or DEFAULT_THRESHOLDS["world"],
            blending="trait attribution by the world's trait regressor (docs/world.md)",
            prompt_following="the world's attribute oracles on prompts in the world's phrases (docs/world.md)",
        )

    @staticmethod
    def _small(crop: Image.Image) -> np.ndarray:
        """A 224 crop on the ArcFace template → the oracles' (1, 64, 64, 3) aligned crop."""
        from uniportrait.faces import arcface_template
        from uniportrait.world.faces import aligned_crops

        template = arcface_template(crop.width)
        return aligned_crops(np.asarray(crop.convert("RGB"))[None], template[None])

    def detect(self, image: Image.Image) -> list[Face]:
        """Every face, largest first; a picture larger than any world picture is refused
        (:class:`~uniportrait.errors.InvalidImageError`)."""
        from uniportrait.world.faces import check_world_picture

        check_world_picture(image, "the world backend", "--backend dlib or curricular")
        return super().detect(image)

    def embed_faces(self, image: Image.Image, faces: list[Face]) -> np.ndarray:
        return self.analyzer.describe(np.asarray(image.convert("RGB")), faces)["embedding"]

    def embed_aligned(self, crop: Image.Image) -> np.ndarray:
        return self.analyzer.describe_crops(self._small(crop))["embedding"][0]

    def similarity(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return _cosine(a, b)

    def reference_traits(self, reference) -> np.ndarray:
        """(T,) a reference's trait vector: the regressor's reads of its crops, averaged; read once
        per reference (the entry keeps the crops alive, so their id is not reused)."""
        if not reference.crops:
            raise UniPortraitError(f"reference {reference.label!r} has no face crops to read traits from")
        cached = self._traits.get(id(reference.crops))
        if cached is None or cached[0] is not reference.crops:
            crops = np.concatenate([self._small(crop) for crop in reference.crops])
            cached = (reference.crops, self.analyzer.describe_crops(crops)["traits"].mean(0))
            self._traits[id(reference.crops)] = cached
        return cached[1]

    def find_blends(self, image: Image.Image, faces: list[Face], references: list, match) -> list[int]:
        from uniportrait.world.identity_report import blends

        if len(references) < 2 or not faces:
            return []
        traits = self.analyzer.describe(np.asarray(image.convert("RGB")), faces)["traits"]  # (F, T)
        people = np.stack([self.reference_traits(ref) for ref in references])  # (N, T)
        closest = np.argsort(-match.similarities, axis=1)[:, :2]  # (F, 2) by the recogniser
        return [f for f in range(len(faces)) if blends(traits[f], people, list(closest[f]))]

    def read_prompt(
        self, image: Image.Image, prompt: str, faces: list[Face], num_people: int
    ) -> list[tuple[str, int, int]]:
        from uniportrait.world.report import read_asked
        from uniportrait.world.scenes import read_caption

        asked = read_caption(prompt, num_people)
        return read_asked(self.analyzer, np.asarray(image.convert("RGB")), asked, faces)


def get_backend(
    name: str = "dlib", thresholds: Thresholds | None = None, **kwargs: Any
) -> FaceSimilarityBackend:
    """A backend by name: ``"dlib"`` (offline default), ``"curricular"``, ``"insightface"``, ``"world"``.

    Keyword arguments go to the backend's class (e.g. ``backbone=`` for ``curricular``).
    """
    if name == "dlib":
        return DlibBackend(thresholds=thresholds, **kwargs)
    if name == "curricular":
        return CurricularBackend(thresholds=thresholds, **kwargs)
    if name == "insightface":
        return InsightFaceBackend(thresholds=thresholds, **kwargs)
    if name == "world":
        return WorldBackend(thresholds=thresholds, **kwargs)
    raise UniPortraitError(f"unknown face-similarity backend {name!r}; choose one of {', '.join(BACKENDS)}")
