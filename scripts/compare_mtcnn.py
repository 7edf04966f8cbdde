"""Compare our MTCNN with the original facenet-pytorch package, on the sample photos and the
composed multi-face pictures; print the differences and the expected values kept in the tests.

facenet-pytorch pins torch<2.3 and torchvision, so it is not installed: unpack its wheel and
point ``--facenet`` at the folder holding ``facenet_pytorch/``::

    pip download --no-deps facenet-pytorch==2.6.0 -d /tmp/fnp && cd /tmp/fnp && unzip -q facenet_pytorch-2.6.0-py3-none-any.whl
    python scripts/compare_mtcnn.py --facenet /tmp/fnp

The package's code runs unchanged. It imports two things from torchvision: ``batched_nms`` and
(unused by detection) ``transforms.functional``. When torchvision with a working ``nms`` kernel is
not importable (the PyPI build needs CUDA torch libraries), a stand-in module is put on the path
that implements ``batched_nms`` from torchvision's documented semantics in plain numpy (written
separately from our torch NMS); the script says which one ran.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import torch

from uniportrait.faces import load_image, sample_photo
from uniportrait.faces.composed import composed_pictures, match_faces
from uniportrait.faces.mtcnn import MTCNNFaceAnalyzer

PHOTOS = ("ffhq-0100.jpg", "ffhq-0293.jpg", "ffhq-0381.jpg", "newton.jpg", "style-2.jpg")

NMS_STAND_IN = '''
import numpy as np
import torch


def batched_nms(boxes, scores, idxs, iou_threshold):
    """torchvision semantics: per group, visit boxes by descending score (stable), keep a box
    unless its IoU (areas (x2-x1)*(y2-y1)) with a kept box is > threshold; keep by score."""
    b = boxes.detach().cpu().numpy().astype(np.float32)
    s = scores.detach().cpu().numpy()
    g = idxs.detach().cpu().numpy()
    areas = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    keep = []
    for group in np.unique(g):
        order = np.nonzero(g == group)[0]
        order = order[np.argsort(-s[order], kind="stable")]
        alive = np.ones(len(order), bool)
        for pos, i in enumerate(order):
            if not alive[pos]:
                continue
            keep.append(i)
            later = order[pos + 1:]
            w = np.maximum(np.minimum(b[i, 2], b[later, 2]) - np.maximum(b[i, 0], b[later, 0]), 0)
            h = np.maximum(np.minimum(b[i, 3], b[later, 3]) - np.maximum(b[i, 1], b[later, 1]), 0)
            inter = w * h
            alive[pos + 1:] &= ~(inter / (areas[i] + areas[later] - inter) > iou_threshold)
    keep = np.array(keep, dtype=np.int64)
    keep = keep[np.argsort(-s[keep], kind="stable")]
    return torch.as_tensor(keep, dtype=torch.long, device=boxes.device)
'''


def _real_torchvision_works() -> bool:
    try:
        from torchvision.ops import nms

        nms(torch.zeros(1, 4), torch.ones(1), 0.5)
        return True
    except Exception:  # noqa: BLE001 - any failure means: use the stand-in
        return False


def _install_stand_in(folder: Path) -> None:
    package = folder / "torchvision"
    (package / "ops").mkdir(parents=True)
    (package / "transforms").mkdir()
    (package / "__init__.py").write_text("")
    (package / "ops" / "__init__.py").write_text("")
    (package / "ops" / "boxes.py").write_text(textwrap.dedent(NMS_STAND_IN))
    (package / "transforms" / "__init__.py").write_text("")
    (package / "transforms" / "functional.py").write_text(
        # imported by facenet_pytorch at import time, never called by MTCNN.detect
        'def to_tensor(pic):\n    raise RuntimeError("torchvision stand-in: to_tensor is not available")\n'
    )
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    sys.path.insert(0, str(folder))


def _original(image, mtcnn):
    boxes, probs, points = mtcnn.detect(image, landmarks=True)
    if boxes is None:
        return np.zeros((0, 4)), np.zeros(0), np.zeros((0, 5, 2))
    return np.asarray(boxes, float), np.asarray(probs, float), np.asarray(points, float)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--facenet", type=Path, required=True, help="folder holding facenet_pytorch/")
    args = parser.parse_args()
    torch.set_num_threads(2)
    stand_in = not _real_torchvision_works()
    if stand_in:
        _install_stand_in(Path(tempfile.mkdtemp()))
    sys.path.insert(0, str(args.facenet))
    from facenet_pytorch import MTCNN

    print(
        f"original: facenet-pytorch from {args.facenet}; NMS: {'numpy stand-in' if stand_in else 'torchvision'}"
    )
    original = MTCNN(keep_all=True, device="cpu")
    ours = MTCNNFaceAnalyzer()

    expected, worst_box, worst_point = {}, 0.0, 0.0
    sources = {}
    for name in PHOTOS:
        image = load_image(sample_photo(name))
        boxes, probs, points = _original(image, original)
        faces = ours.detect(image)
        assert len(faces) == len(boxes), f"{name}: original {len(boxes)} faces, ours {len(faces)}"
        ours_boxes = np.array([np.array(f.box) + [1, 1, 0, 0] for f in faces]).reshape(-1, 4)
        ours_points = np.array([f.landmarks for f in faces]).reshape(-1, 5, 2)
        box_diff = float(np.abs(ours_boxes - boxes).max()) if len(boxes) else 0.0
        point_diff = float(np.abs(ours_points - points).max()) if len(boxes) else 0.0
        worst_box, worst_point = max(worst_box, box_diff), max(worst_point, point_diff)
        print(f"{name}: {len(boxes)} face(s); max |Δbox| {box_diff:.2e} px, max |Δpoint| {point_diff:.2e} px")
        expected[name] = [
            {"box": np.round(b, 2).tolist(), "score": round(float(p), 4), "points": np.round(q, 2).tolist()}
            for b, p, q in zip(boxes, probs, points)
        ]
        if name != "style-2.jpg":
            sources[name] = faces[0]

    for picture in composed_pictures(sources):
        boxes, probs, points = _original(picture.image, original)
        faces = ours.detect(picture.image)
        matched, false_positives = match_faces(faces, picture.landmarks)
        ours_points = np.array([f.landmarks for f in faces]).reshape(-1, 5, 2)
        diff = (
            float(np.abs(ours_points - points).max())
            if len(faces) == len(boxes) and len(boxes)
            else float("nan")
        )
        worst_point = max(worst_point, diff)
        print(
            f"composed {picture.name}: original {len(boxes)} face(s), ours {len(faces)}; "
            f"true faces found {sum(m >= 0 for m in matched)}/{len(matched)}, false positives {false_positives}; "
            f"max |Δpoint| vs original {diff:.2e} px"
        )
    print(f"largest difference: boxes {worst_box:.2e} px, points {worst_point:.2e} px")
    print("expected values (tests/test_mtcnn.py):")
    print(json.dumps(expected))


if __name__ == "__main__":
    main()
