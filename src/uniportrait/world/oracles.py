"""The world's oracles: networks trained on ground-truth renders that *measure* pictures.

They are never used to generate. Each is a diffusers ``ModelMixin`` + ``ConfigMixin`` (``config.json``
+ safetensors):

- :class:`FaceDetector`: boxes + the five landmarks (a CenterNet-style heatmap at stride 2);
- :class:`FaceOracle`: on aligned 64 px crops, an identity embedding (the world's FaceNet) and the
  identity traits (the trait regressor that attributes a generated face to references);
- :class:`PersonOracle`: on a crop around a face box, the per-person attributes captions control
  (expression, hat, sunglasses, clothing, tilt);
- :class:`SceneOracle`: on the whole picture, background, lighting and style.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from uniportrait.world.traits import (
    CONTINUOUS_TRAITS,
    DISCRETE_TRAITS,
    PERSON_ATTRIBUTES,
    SCENE_ATTRIBUTES,
)

PERSON_CROP = 48  # side of the person crop the PersonOracle reads


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.SiLU())


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _conv(cin, cout, stride), nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        )
        self.skip = (
            nn.Identity() if cin == cout and stride == 1 else nn.Conv2d(cin, cout, 1, stride, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.body(x) + self.skip(x))


def _trunk(widths: tuple[int, ...]) -> nn.Sequential:
    """A stem + one stride-2 residual block per width after the first."""
    layers: list[nn.Module] = [_conv(3, widths[0])]
    for cin, cout in zip(widths[:-1], widths[1:]):
        layers.append(_ResBlock(cin, cout, 2))
    return nn.Sequential(*layers)


# -- detector -------------------------------------------------------------------------------------


class FaceDetector(ModelMixin, ConfigMixin):
    """Faces in world pictures. Output maps at stride 2: heatmap, centre offset, size, 5 landmarks.

    ``forward(x)``: (B, 3, H, W) in [-1, 1], H and W multiples of 16 → (B, 15, H/2, W/2).
    """

    @register_to_config
    def __init__(self, widths: tuple[int, ...] = (16, 32, 48, 64, 96), size_unit: float = 16.0) -> None:
        super().__init__()
        self.stem = _conv(3, widths[0])
        self.down = nn.ModuleList([_ResBlock(a, b, 2) for a, b in zip(widths[:-1], widths[1:])])
        ups = []
        for deep, skip in zip(reversed(widths[2:]), reversed(widths[1:-1])):
            ups.append(_conv(deep + skip, skip))
        self.up = nn.ModuleList(ups)
        self.head = nn.Sequential(_conv(widths[1], 64), nn.Conv2d(64, 15, 1))
        nn.init.constant_(self.head[-1].bias[:1], -4.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = []
        h = self.stem(x)
        for block in self.down:
            h = block(h)
            feats.append(h)  # strides 2, 4, 8, 16
        h = feats[-1]
        for block, skip in zip(self.up, reversed(feats[:-1])):
            h = block(torch.cat([F.interpolate(h, size=skip.shape[-2:], mode="nearest"), skip], dim=1))
        return self.head(h)  # (B, 15, H/2, W/2)

    @torch.no_grad()
    def detect(self, images: np.ndarray, threshold: float = 0.35, max_faces: int = 8):
        """(B, H, W, 3) uint8 → per picture (boxes (N, 4), landmarks (N, 5, 2), scores (N,)), best first."""
        from uniportrait.world.train_base import to_pixels

        device, dtype = self.device, self.dtype
        out = self(to_pixels(images).to(device, dtype)).float().cpu()
        heat = torch.sigmoid(out[:, 0])
        peaks = (heat == F.max_pool2d(heat[:, None], 3, 1, 1)[:, 0]) & (heat > threshold)
        unit = self.config.size_unit
        results = []
        for b in range(out.shape[0]):
            ys, xs = torch.nonzero(peaks[b], as_tuple=True)
            scores = heat[b, ys, xs]
            order = torch.argsort(scores, descending=True)[:max_faces]
            ys, xs, scores = ys[order], xs[order], scores[order]
            px, py = 2.0 * xs.float() + 0.5, 2.0 * ys.float() + 0.5
            cx = px + out[b, 1, ys, xs] * 2.0
            cy = py + out[b, 2, ys, xs] * 2.0
            w, h = out[b, 3, ys, xs].exp() * unit, out[b, 4, ys, xs].exp() * unit
            lm = out[b, 5:15, ys, xs].T.reshape(-1, 5, 2) * unit
            lm = lm + torch.stack([px, py], -1)[:, None]
            boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)
            results.append((boxes.numpy(), lm.numpy(), scores.numpy()))
        return results


def detector_targets(
    boxes: np.ndarray, landmarks: np.ndarray, counts: np.ndarray, height: int, width: int, unit: float
):
    """Training targets at stride 2 for pictures with ``counts[b]`` faces.

    Returns heat (B, h, w) Gaussian peaks, reg (B, 14, h, w) [offset 2, log size 2, landmarks 10]
    and a regression weight (B, h, w) on the 3×3 cells around each centre.
    """
    b_n = len(counts)
    h, w = height // 2, width // 2
    heat = np.zeros((b_n, h, w), np.float32)
    reg = np.zeros((b_n, 14, h, w), np.float32)
    weight = np.zeros((b_n, h, w), np.float32)
    ys, xs = np.mgrid[0:h, 0:w]
    py, px = 2.0 * ys + 0.5, 2.0 * xs + 0.5
    for b in range(b_n):
        for k in range(int(counts[b])):
            x0, y0, x1, y1 = boxes[b, k]
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            sigma = max(0.7, (x1 - x0) / 2 / 8)  # in cells
            g = np.exp(-(((px - cx) / 2) ** 2 + ((py - cy) / 2) ** 2) / (2 * sigma**2))
            heat[b] = np.maximum(heat[b], g)
            ci, cj = (
                int(np.clip(round((cy - 0.5) / 2), 0, h - 1)),
                int(np.clip(round((cx - 0.5) / 2), 0, w - 1)),
            )
            for di in (-1, 0, 1):
                for dj in (-1, 0, 1):
                    i, j = ci + di, cj + dj
                    if 0 <= i < h and 0 <= j < w:
                        qx, qy = 2.0 * j + 0.5, 2.0 * i + 0.5
                        reg[b, 0, i, j], reg[b, 1, i, j] = (cx - qx) / 2, (cy - qy) / 2
                        reg[b, 2, i, j], reg[b, 3, i, j] = np.log((x1 - x0) / unit), np.log((y1 - y0) / unit)
                        reg[b, 4:, i, j] = ((landmarks[b, k] - np.array([qx, qy])) / unit).reshape(-1)
                        weight[b, i, j] = 1.0 if (di, dj) == (0, 0) else 0.5
            heat[b, ci, cj] = 1.0
    return heat, reg, weight


# -- face oracle: identity embedding + traits ------------------------------------------------------


class FaceOracle(ModelMixin, ConfigMixin):
    """Aligned 64 px crops → identity embedding (L2-normalised) and identity traits."""

    @register_to_config
    def __init__(self, widths: tuple[int, ...] = (32, 48, 96, 128, 192), embedding_dim: int = 128) -> None:
        super().__init__()
        self.trunk = _trunk(widths)
        self.neck = nn.Sequential(
            nn.Flatten(), nn.Linear(widths[-1] * 16, 256), nn.BatchNorm1d(256), nn.SiLU()
        )
        self.embed = nn.Linear(256, embedding_dim)
        self.cont = nn.Linear(256, len(CONTINUOUS_TRAITS))
        self.discrete = nn.ModuleDict({name: nn.Linear(256, len(v)) for name, v in DISCRETE_TRAITS.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 3, 64, 64) in [-1, 1] → embedding (B, E), cont (B, C) logits, and one logit set per discrete trait."""
        h = self.neck(self.trunk(x))  # (B, 256)
        out = {"embedding": F.normalize(self.embed(h), dim=-1), "cont": self.cont(h)}
        out.update({name: head(h) for name, head in self.discrete.items()})
        return out

    @torch.no_grad()
    def describe(self, crops: np.ndarray, batch: int = 256) -> dict[str, np.ndarray]:
        """(N, 64, 64, 3) uint8 aligned crops → embedding (N, E), traits (N, T) in trait-vector layout."""
        from uniportrait.world.train_base import to_pixels

        embs, vecs = [], []
        for k in range(0, len(crops), batch):
            out = self(to_pixels(crops[k : k + batch]).to(self.device, self.dtype))
            parts = [torch.sigmoid(out["cont"].float())]
            parts += [torch.softmax(out[name].float(), -1) for name in DISCRETE_TRAITS]
            embs.append(out["embedding"].float().cpu())
            vecs.append(torch.cat(parts, -1).cpu())
        return {"embedding": torch.cat(embs).numpy(), "traits": torch.cat(vecs).numpy()}


# -- person and scene attributes -------------------------------------------------------------------


class PersonOracle(ModelMixin, ConfigMixin):
    """A crop around one face box (:func:`person_crops`) → one logit set per person attribute."""

    @register_to_config
    def __init__(self, widths: tuple[int, ...] = (24, 48, 64, 96)) -> None:
        super().__init__()
        self.trunk = _trunk(widths)
        self.heads = nn.ModuleDict(
            {name: nn.Linear(widths[-1], len(v)) for name, v in PERSON_ATTRIBUTES.items()}
        )

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk(x).mean(dim=(2, 3))  # (B, C)
        return {name: head(h) for name, head in self.heads.items()}


class SceneOracle(ModelMixin, ConfigMixin):
    """A whole picture (any size) → one logit set per scene attribute."""

    @register_to_config
    def __init__(self, widths: tuple[int, ...] = (16, 32, 48, 64)) -> None:
        super().__init__()
        self.trunk = _trunk(widths)
        self.heads = nn.ModuleDict(
            {name: nn.Linear(widths[-1], len(v)) for name, v in SCENE_ATTRIBUTES.items()}
        )

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk(x).mean(dim=(2, 3))
        return {name: head(h) for name, head in self.heads.items()}


def person_crops(images: np.ndarray, boxes: np.ndarray, size: int = PERSON_CROP) -> np.ndarray:
    """(N, H, W, 3) pictures + (N, 4) face boxes → (N, size, size, 3) crops around each person.

    The window is 2.4 face heights wide, centred on the face horizontally and a third of a face
    height below its centre, so it holds the hat above and the shirt below.
    """
    from PIL import Image

    out = np.zeros((len(images), size, size, 3), np.uint8)
    for k, (image, (x0, y0, x1, y1)) in enumerate(zip(images, boxes)):
        h = max(4.0, float(y1 - y0))
        cx, cy = (x0 + x1) / 2 + 0.5, (y0 + y1) / 2 + 0.5 + 0.35 * h  # continuous coordinates
        half = 1.2 * h
        scale = 2 * half / size  # picture pixels per crop pixel; outside the picture is black
        data = (scale, 0.0, cx - half, 0.0, scale, cy - half)
        crop = Image.fromarray(image).transform(
            (size, size), Image.Transform.AFFINE, data, Image.Resampling.BILINEAR
        )
        out[k] = np.asarray(crop)
    return out


# -- all four together ------------------------------------------------------------------------------


def default_oracles_dir():
    from uniportrait.world.build import WORLD_ASSETS

    return WORLD_ASSETS / "oracles"


class WorldOracles:
    """The four oracles, loaded from ``folder`` (default: the shipped ones), in float32 on the CPU.

    Also a face analyzer/embedder (``name``, ``detect``, ``embed``) in the face stack's sense, so
    evaluation code that takes an analyzer works on world pictures unchanged.
    """

    name = "world-oracle"
    min_face_px = 8

    def __init__(self, folder=None, threshold: float = 0.35) -> None:
        from pathlib import Path

        from uniportrait.errors import WeightsNotFoundError

        folder = Path(folder or default_oracles_dir())
        if not (folder / "detector" / "config.json").is_file():
            raise WeightsNotFoundError(
                f"world oracles: {folder} has no trained oracles (run `uniportrait world build`)"
            )
        load = {"detector": FaceDetector, "face": FaceOracle, "person": PersonOracle, "scene": SceneOracle}
        self.models = {k: cls.from_pretrained(folder / k).float().eval() for k, cls in load.items()}
        self.threshold = threshold

    # face analyzer interface
    def detect(self, image) -> list:
        """Faces of one picture (PIL image or (H, W, 3) uint8 array), largest first."""
        return detect_faces(self.models["detector"], image, self.threshold)

    def embed(self, image, face) -> np.ndarray:
        return self.describe(
            np.asarray(image.convert("RGB")) if hasattr(image, "convert") else image, [face]
        )["embedding"][0]

    # measurements
    def describe(self, image: np.ndarray, faces: list) -> dict[str, np.ndarray]:
        """Embeddings (F, E) and trait vectors (F, T) of ``faces`` in one picture."""
        from uniportrait.world.faces import aligned_crops

        if not faces:
            return {
                "embedding": np.zeros((0, self.models["face"].config.embedding_dim), np.float32),
                "traits": None,
            }
        points = np.stack([f.landmarks for f in faces])
        crops = aligned_crops(np.repeat(image[None], len(faces), 0), points)
        return self.models["face"].describe(crops)

    def describe_crops(self, crops: np.ndarray) -> dict[str, np.ndarray]:
        """The same for aligned 64 px crops."""
        return self.models["face"].describe(crops)

    @torch.no_grad()
    def person_attributes(self, images: np.ndarray, boxes: np.ndarray) -> dict[str, np.ndarray]:
        """(N, H, W, 3) pictures + one face box each → predicted class per person attribute, (N,) each."""
        from uniportrait.world.train_base import to_pixels

        if len(images) == 0:
            return {name: np.zeros(0, np.int64) for name in PERSON_ATTRIBUTES}
        out = self.models["person"](to_pixels(person_crops(images, boxes)))
        return {name: logits.argmax(1).numpy() for name, logits in out.items()}

    @torch.no_grad()
    def scene_attributes(self, images: np.ndarray) -> dict[str, np.ndarray]:
        from uniportrait.world.train_base import to_pixels

        out = self.models["scene"](to_pixels(images))
        return {name: logits.argmax(1).numpy() for name, logits in out.items()}


def detect_faces(detector: FaceDetector, image, threshold: float) -> list:
    """:class:`~uniportrait.faces.types.Face` objects of one picture (PIL or (H, W, 3) uint8),
    largest first."""
    from uniportrait.faces.types import Face, sort_faces

    array = np.asarray(image.convert("RGB")) if hasattr(image, "convert") else np.asarray(image)
    boxes, points, scores = detector.detect(_pad16(array)[None], threshold)[0]
    return sort_faces([Face(tuple(b), float(s), p) for b, p, s in zip(boxes, points, scores)])


def _pad16(array: np.ndarray) -> np.ndarray:
    """Pad a picture at the bottom/right to multiples of 16 (the detector's stride)."""
    h, w = array.shape[:2]
    ph, pw = (-h) % 16, (-w) % 16
    if ph or pw:
        array = np.pad(array, ((0, ph), (0, pw), (0, 0)), mode="edge")
    return array
