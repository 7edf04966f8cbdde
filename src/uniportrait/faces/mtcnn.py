"""MTCNN (Zhang et al., 2016): the default face detector, with real 5-point landmarks.

Three small networks in a cascade:

1. **P-Net** runs fully convolutionally on an image pyramid (scales ``12/min_face_size · factor^k``
   while the short side stays ≥ 12 px); every 12×12 window (stride 2) scoring ≥ ``thresholds[0]``
   is a candidate. NMS per scale (IoU 0.5), then over all scales (0.7), box regression, squaring.
2. **R-Net** re-scores 24×24 crops of the candidates (> ``thresholds[1]``), NMS 0.7, regression,
   squaring.
3. **O-Net** re-scores 48×48 crops (> ``thresholds[2]``) and outputs the five landmarks (ArcFace
   order: left eye, right eye, nose tip, left / right mouth corner), regression, then NMS with
   the intersection over the *smaller* box (0.7).

Numbers follow the PyPI package ``facenet-pytorch`` (v2.6.0), whose weights we ship (converted by
``scripts/convert_mtcnn_weights.py``; origin and MIT licence in ``assets/mtcnn/README.md``): the
same pyramid, area resampling, crop clipping, thresholds and box arithmetic, so the boxes and
points agree with that package (``scripts/compare_mtcnn.py``; expected values in
``tests/test_mtcnn.py``).

Coordinates. Internally boxes are in MTCNN's inclusive, 1-based convention (a box ``(x1, y1, x2,
y2)`` covers pixels ``x1..x2``, width ``x2 − x1 + 1``). :class:`~uniportrait.faces.types.Face`
boxes are 0-based with exclusive ends, ``(x1 − 1, y1 − 1, x2, y2)``; landmarks are 0-based pixel
coordinates (pixel centre at integer), as the original returns them.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from uniportrait.errors import CheckpointError
from uniportrait.faces.types import Face, sort_faces

WEIGHTS_FILE = "mtcnn.safetensors"


def weights_path() -> Path:
    """The shipped MTCNN weights (``uniportrait/assets/mtcnn/mtcnn.safetensors``)."""
    return Path(str(resources.files("uniportrait") / "assets" / "mtcnn" / WEIGHTS_FILE))


# -- the three networks (state-dict keys as in facenet-pytorch) ------------------------------------


class PNet(nn.Module):
    """Proposal network, fully convolutional: ``(B, 3, H, W)`` in [-1, 1] → box offsets
    ``(B, 4, H', W')`` and face probabilities ``(B, 2, H', W')`` (H' = ceil((H − 2) / 2) − 4)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 10, 3), nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(10, 16, 3), nn.PReLU(16)
        self.conv3, self.prelu3 = nn.Conv2d(16, 32, 3), nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, 1)  # face / not face
        self.conv4_2 = nn.Conv2d(32, 4, 1)  # box offsets

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))  # (B, 32, H', W')
        return self.conv4_2(x), self.conv4_1(x).softmax(dim=1)


def _flatten_whc(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` → ``(B, W·H·C)`` in (W, H, C) order: the dense layers were trained on
    that layout (the weights come from Caffe/TensorFlow)."""
    return x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)


class RNet(nn.Module):
    """Refinement network: ``(B, 3, 24, 24)`` → offsets ``(B, 4)``, probabilities ``(B, 2)``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)  # (B, 64, 3, 3)
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu4(self.dense4(_flatten_whc(self.prelu3(self.conv3(x)))))  # (B, 128)
        return self.dense5_2(x), self.dense5_1(x).softmax(dim=1)


class ONet(nn.Module):
    """Output network: ``(B, 3, 48, 48)`` → offsets ``(B, 4)``, landmarks ``(B, 10)`` (five x
    then five y, as fractions of the box), probabilities ``(B, 2)``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)  # (B, 128, 3, 3)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu5(self.dense5(_flatten_whc(self.prelu4(self.conv4(x)))))  # (B, 256)
        return self.dense6_2(x), self.dense6_3(x), self.dense6_1(x).softmax(dim=1)


class MTCNNNets(nn.Module):
    """The three networks; state-dict keys ``pnet.*``, ``rnet.*``, ``onet.*``."""

    def __init__(self) -> None:
        super().__init__()
        self.pnet, self.rnet, self.onet = PNet(), RNet(), ONet()

    @classmethod
    def from_file(cls, path: str | Path | None = None) -> MTCNNNets:
        """Load the weights (default: the shipped file) with strict keys and shapes."""
        path = Path(path) if path is not None else weights_path()
        if not path.is_file():
            raise CheckpointError(f"MTCNN weights {path} are missing (reinstall uniportrait)")
        nets = cls()
        state = load_file(str(path))
        expected = nets.state_dict()
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or unexpected:
            raise CheckpointError(
                f"MTCNN weights {path}: missing keys {missing}, unexpected keys {unexpected}"
            )
        for key, tensor in state.items():
            if tensor.shape != expected[key].shape:
                raise CheckpointError(
                    f"MTCNN weights {path}: {key} has shape {tuple(tensor.shape)}, "
                    f"expected {tuple(expected[key].shape)}"
                )
        nets.load_state_dict(state, strict=True)
        return nets.eval().requires_grad_(False)


# -- the cascade -------------------------------------------------------------------------------


@dataclass(frozen=True)
class MTCNNConfig:
    """Detection settings (defaults: facenet-pytorch's).

    Attributes:
        min_face_size: smallest face searched for, in pixels (sets the pyramid's first scale).
        thresholds: P-, R- and O-Net face-probability thresholds.
        factor: scale step of the image pyramid.
    """

    min_face_size: float = 20.0
    thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7)
    factor: float = 0.709

    def __post_init__(self) -> None:
        if self.min_face_size < 12:
            raise ValueError(f"min_face_size must be >= 12 px, got {self.min_face_size}")
        if not 0 < self.factor < 1:
            raise ValueError(f"factor must be in (0, 1), got {self.factor}")
        if len(self.thresholds) != 3 or not all(0 <= t <= 1 for t in self.thresholds):
            raise ValueError(f"thresholds must be three probabilities, got {self.thresholds}")


def pyramid_scales(height: int, width: int, config: MTCNNConfig) -> list[float]:
    """Scales of the image pyramid: ``12/min_face_size · factor^k`` while ``short side · scale ≥ 12``."""
    scale = 12.0 / config.min_face_size
    short = min(height, width) * scale
    scales = []
    while short >= 12:
        scales.append(scale)
        scale *= config.factor
        short *= config.factor
    return scales


def box_overlap(box: torch.Tensor, others: torch.Tensor, mode: str, inclusive: bool) -> torch.Tensor:
    """Overlap of ``box`` (4,) with ``others`` (N, 4): IoU (``"union"``) or intersection over the
    smaller area (``"min"``). ``inclusive``: widths are ``x2 − x1 + 1`` (MTCNN's convention)."""
    one = 1.0 if inclusive else 0.0
    width = (torch.minimum(box[2], others[:, 2]) - torch.maximum(box[0], others[:, 0]) + one).clamp(min=0)
    height = (torch.minimum(box[3], others[:, 3]) - torch.maximum(box[1], others[:, 1]) + one).clamp(min=0)
    inter = width * height
    area = (box[2] - box[0] + one) * (box[3] - box[1] + one)
    areas = (others[:, 2] - others[:, 0] + one) * (others[:, 3] - others[:, 1] + one)
    if mode == "min":
        return inter / torch.minimum(area, areas)
    return inter / (area + areas - inter)


def nms(
    boxes: torch.Tensor, scores: torch.Tensor, threshold: float, mode: str = "union", inclusive: bool = False
) -> torch.Tensor:
    """Greedy non-maximum suppression: indices of the kept boxes, highest score first.

    A box is dropped when its overlap with a kept, higher-scoring box is above ``threshold``.
    The P/R stages use IoU with ``x2 − x1`` widths, the last stage the "min" overlap with
    ``x2 − x1 + 1`` widths (as in the original).
    """
    order = torch.argsort(scores, descending=True, stable=True)
    keep = []
    while order.numel():
        best = order[0]
        keep.append(best)
        rest = order[1:]
        overlap = box_overlap(boxes[best], boxes[rest], mode, inclusive)
        order = rest[overlap <= threshold]
    return torch.stack(keep) if keep else torch.zeros(0, dtype=torch.long)


def regress(boxes: torch.Tensor, offsets: torch.Tensor, inclusive: bool = True) -> torch.Tensor:
    """Apply box regression: ``(N, 4)`` boxes moved by ``offsets`` ``(N, 4)`` × box size."""
    one = 1.0 if inclusive else 0.0
    width = boxes[:, 2] - boxes[:, 0] + one
    height = boxes[:, 3] - boxes[:, 1] + one
    return torch.stack(
        [
            boxes[:, 0] + offsets[:, 0] * width,
            boxes[:, 1] + offsets[:, 1] * height,
            boxes[:, 2] + offsets[:, 2] * width,
            boxes[:, 3] + offsets[:, 3] * height,
        ],
        dim=1,
    )


def square(boxes: torch.Tensor) -> torch.Tensor:
    """Boxes ``(N, 4)`` made square (side = the longer side), keeping their centres."""
    width, height = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    side = torch.maximum(width, height)
    x1 = boxes[:, 0] + width * 0.5 - side * 0.5
    y1 = boxes[:, 1] + height * 0.5 - side * 0.5
    return torch.stack([x1, y1, x1 + side, y1 + side], dim=1)


def _area_resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``(B, 3, h, w)`` → ``(B, 3, height, width)`` by area averaging (adaptive average pool)."""
    return F.interpolate(image, size=(height, width), mode="area")


def _normalise(pixels: torch.Tensor) -> torch.Tensor:
    """0–255 → about [-1, 1], as the networks were trained."""
    return (pixels - 127.5) * 0.0078125


def _crops(image: torch.Tensor, boxes: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The part of each box inside the image, resized to ``size``×``size``: ``(M, 3, size, size)``
    and the indices (into ``boxes``) of the M non-empty ones. Box corners are truncated to
    integers and clipped to the image (1-based, inclusive), as in the original."""
    height, width = image.shape[-2:]
    corners = boxes.trunc().to(torch.int64)
    x1, y1 = corners[:, 0].clamp(min=1), corners[:, 1].clamp(min=1)
    x2, y2 = corners[:, 2].clamp(max=width), corners[:, 3].clamp(max=height)
    kept, crops = [], []
    for k in range(len(boxes)):
        if x2[k] >= x1[k] and y2[k] >= y1[k]:
            patch = image[:, :, y1[k] - 1 : y2[k], x1[k] - 1 : x2[k]]
            crops.append(_area_resize(patch, size, size))
            kept.append(k)
    if not crops:
        return image.new_zeros(0, 3, size, size), torch.zeros(0, dtype=torch.long)
    return _normalise(torch.cat(crops)), torch.tensor(kept, dtype=torch.long)


@torch.no_grad()
def run_cascade(
    nets: MTCNNNets, pixels: np.ndarray, config: MTCNNConfig = MTCNNConfig()
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Detect faces in one RGB ``(H, W, 3)`` uint8 image.

    Returns:
        boxes ``(N, 4)`` (MTCNN's 1-based inclusive convention), scores ``(N,)`` and landmarks
        ``(N, 5, 2)`` (0-based pixel coordinates), all float32, in the cascade's final order.
    """
    device, dtype = next(nets.parameters()).device, next(nets.parameters()).dtype
    image = torch.from_numpy(np.array(pixels, dtype=np.uint8)).to(device).permute(2, 0, 1)[None].to(dtype)
    height, width = image.shape[-2:]
    empty = (np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros((0, 5, 2), np.float32))

    # 1. P-Net on the pyramid: 12×12 windows, stride 2, in each scaled image.
    candidates = []  # per scale: (N, 9) = box (4), score, offsets (4)
    for scale in pyramid_scales(height, width, config):
        scaled = _area_resize(image, int(height * scale + 1), int(width * scale + 1))
        offsets, probs = nets.pnet(_normalise(scaled))  # (1, 4, h, w), (1, 2, h, w)
        hit = probs[0, 1] >= config.thresholds[0]
        rows, cols = hit.nonzero(as_tuple=True)
        corner = torch.stack([cols, rows], dim=1).to(dtype)  # (N, 2) window position (x, y)
        top_left = ((2 * corner + 1) / scale).floor()
        bottom_right = ((2 * corner + 12) / scale).floor()
        found = torch.cat([top_left, bottom_right, probs[0, 1][hit][:, None], offsets[0][:, hit].T], dim=1)
        candidates.append(found[nms(found[:, :4], found[:, 4], 0.5)])
    if not candidates:
        return empty
    found = torch.cat(candidates)
    found = found[nms(found[:, :4], found[:, 4], 0.7)]
    if not len(found):
        return empty
    boxes = square(regress(found[:, :4], found[:, 5:9], inclusive=False))

    # 2. R-Net on 24×24 crops.
    crops, kept = _crops(image, boxes, 24)
    if not len(kept):
        return empty
    offsets, probs = nets.rnet(crops)
    boxes, scores = boxes[kept], probs[:, 1]
    passed = scores > config.thresholds[1]
    boxes, scores, offsets = boxes[passed], scores[passed], offsets[passed]
    keep = nms(boxes, scores, 0.7)
    boxes = square(regress(boxes[keep], offsets[keep]))
    if not len(boxes):
        return empty

    # 3. O-Net on 48×48 crops: final scores, box regression and the five landmarks.
    crops, kept = _crops(image, boxes, 48)
    if not len(kept):
        return empty
    offsets, points, probs = nets.onet(crops)
    boxes, scores = boxes[kept], probs[:, 1]
    passed = scores > config.thresholds[2]
    boxes, scores, offsets, points = boxes[passed], scores[passed], offsets[passed], points[passed]
    box_w = boxes[:, 2:3] - boxes[:, 0:1] + 1  # (N, 1)
    box_h = boxes[:, 3:4] - boxes[:, 1:2] + 1
    xs = box_w * points[:, :5] + boxes[:, 0:1] - 1  # (N, 5), 0-based
    ys = box_h * points[:, 5:] + boxes[:, 1:2] - 1
    landmarks = torch.stack([xs, ys], dim=-1)  # (N, 5, 2)
    boxes = regress(boxes, offsets)
    keep = nms(boxes, scores, 0.7, mode="min", inclusive=True)
    return (
        boxes[keep].float().cpu().numpy(),
        scores[keep].float().cpu().numpy(),
        landmarks[keep].float().cpu().numpy(),
    )


class MTCNNFaceAnalyzer:
    """The default face analyzer: MTCNN boxes and its five landmarks (no embeddings).

    Args:
        config: detection settings (:class:`MTCNNConfig`); keyword arguments build one instead.
        weights: weights file (default: the shipped one).
        device: where the networks run (default CPU; they are small).

    Networks load on first use and stay on this instance; a lock serialises calls, so one
    instance can be shared between threads.
    """

    name = "mtcnn"

    def __init__(
        self,
        config: MTCNNConfig | None = None,
        weights: str | Path | None = None,
        device: str | torch.device = "cpu",
        **settings,
    ) -> None:
        if config is not None and settings:
            raise ValueError("pass either config or its settings, not both")
        self.config = config or MTCNNConfig(**settings)
        self.weights, self.device = weights, torch.device(device)
        self._nets: MTCNNNets | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"MTCNNFaceAnalyzer({self.config})"

    @property
    def min_face_px(self) -> float:
        """The smallest face searched for (``config.min_face_size``)."""
        return float(self.config.min_face_size)

    def nets(self) -> MTCNNNets:
        """The networks (loaded once)."""
        with self._lock:
            if self._nets is None:
                self._nets = MTCNNNets.from_file(self.weights).to(self.device)
            return self._nets

    def detect(self, image: Image.Image) -> list[Face]:
        """All faces in an RGB image, largest box first."""
        pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
        nets = self.nets()
        with self._lock:
            boxes, scores, landmarks = run_cascade(nets, pixels, self.config)
        faces = [
            Face((x1 - 1, y1 - 1, x2, y2), score, points)
            for (x1, y1, x2, y2), score, points in zip(boxes.tolist(), scores.tolist(), landmarks)
        ]
        return sort_faces(faces)
