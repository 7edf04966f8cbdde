"""MTCNN, the default face detector: networks, cascade pieces, agreement with the original
facenet-pytorch package, and detection on composed multi-face pictures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from uniportrait.errors import CheckpointError
from uniportrait.faces import Face, detect_faces, extract_faces, get_face_analyzer, load_image, sample_photo
from uniportrait.faces.composed import PICTURES, composed_pictures, match_faces
from uniportrait.faces.mtcnn import (
    MTCNNConfig,
    MTCNNFaceAnalyzer,
    MTCNNNets,
    ONet,
    PNet,
    RNet,
    nms,
    pyramid_scales,
    square,
    weights_path,
)

REAL_FACES = ("ffhq-0100.jpg", "ffhq-0293.jpg", "ffhq-0381.jpg", "newton.jpg")

# The original package (facenet-pytorch 2.6.0) on the sample photos, from
# `python scripts/compare_mtcnn.py --facenet DIR`: boxes in its (1-based, inclusive) convention.
ORIGINAL = {
    "ffhq-0100.jpg": [
        {
            "box": [84.0, 54.36, 266.38, 302.29],
            "score": 1.0,
            "points": [
                [119.74, 151.28],
                [200.91, 152.17],
                [146.72, 198.69],
                [119.26, 226.55],
                [203.95, 229.97],
            ],
        }
    ],
    "ffhq-0293.jpg": [
        {
            "box": [76.42, 55.81, 250.87, 280.96],
            "score": 1.0,
            "points": [
                [117.69, 151.14],
                [198.28, 150.33],
                [150.29, 202.25],
                [123.61, 232.15],
                [194.8, 228.11],
            ],
        }
    ],
    "ffhq-0381.jpg": [
        {
            "box": [76.2, 56.77, 243.94, 290.49],
            "score": 0.9999,
            "points": [
                [119.91, 151.42],
                [199.42, 149.96],
                [162.84, 198.65],
                [129.71, 238.1],
                [196.05, 237.35],
            ],
        }
    ],
    "newton.jpg": [
        {
            "box": [120.94, 34.46, 178.0, 110.68],
            "score": 1.0,
            "points": [[141.19, 64.11], [167.89, 66.44], [155.2, 83.26], [141.23, 94.04], [161.68, 95.81]],
        }
    ],
    # The illustration: its cartoon face, and a small second detection the original also makes.
    "style-2.jpg": [
        {
            "box": [171.46, 80.3, 214.16, 136.34],
            "score": 0.999,
            "points": [
                [180.94, 104.1],
                [201.89, 104.01],
                [190.64, 117.68],
                [182.03, 123.85],
                [200.5, 123.91],
            ],
        },
        {
            "box": [305.16, 248.75, 330.99, 278.96],
            "score": 0.8332,
            "points": [
                [314.68, 260.21],
                [325.15, 260.75],
                [320.51, 268.3],
                [314.32, 272.16],
                [323.24, 273.1],
            ],
        },
    ],
}


@pytest.fixture(scope="module")
def mtcnn() -> MTCNNFaceAnalyzer:
    return MTCNNFaceAnalyzer()


# --- networks and weights -----------------------------------------------------------------------


def test_networks_run_on_random_input_with_the_documented_shapes():
    torch.manual_seed(0)
    offsets, probs = PNet()(torch.randn(2, 3, 30, 40))
    assert offsets.shape == (2, 4, 10, 15) and probs.shape == (2, 2, 10, 15)
    assert torch.allclose(probs.sum(1), torch.ones(2, 10, 15))
    offsets, probs = RNet()(torch.randn(3, 3, 24, 24))
    assert offsets.shape == (3, 4) and probs.shape == (3, 2)
    offsets, points, probs = ONet()(torch.randn(3, 3, 48, 48))
    assert offsets.shape == (3, 4) and points.shape == (3, 10) and probs.shape == (3, 2)
    assert not any(t.isnan().any() for t in (offsets, points, probs))


def test_shipped_weights_load_strictly_and_bad_files_are_named(tmp_path):
    nets = MTCNNNets.from_file()
    assert not any(p.requires_grad for p in nets.parameters())
    state = load_file(str(weights_path()))
    assert len(state) == 50 and all(t.dtype == torch.float32 for t in state.values())
    del state["onet.dense6_3.bias"]
    state["onet.extra"] = torch.zeros(1)
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing keys \['onet.dense6_3.bias'\].*'onet.extra'"):
        MTCNNNets.from_file(tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match="are missing"):
        MTCNNNets.from_file(tmp_path / "nothing.safetensors")


# --- cascade pieces ---------------------------------------------------------------------------


def test_pyramid_scales_stop_at_12_pixels():
    scales = pyramid_scales(320, 266, MTCNNConfig())
    assert scales[0] == pytest.approx(0.6) and all(
        b / a == pytest.approx(0.709) for a, b in zip(scales, scales[1:])
    )
    assert 266 * scales[-1] >= 12 > 266 * scales[-1] * 0.709
    assert pyramid_scales(100, 100, MTCNNConfig(min_face_size=120)) == []
    with pytest.raises(ValueError, match="min_face_size"):
        MTCNNConfig(min_face_size=5)


def test_nms_keeps_the_best_of_overlapping_boxes():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 4, 4.0]])
    scores = torch.tensor([0.8, 0.9, 0.7, 0.95])
    # Boxes 0 and 1 overlap with IoU 81 / 119 = 0.68; box 3 inside box 0 has IoU 0.16 with it.
    assert nms(boxes, scores, 0.5).tolist() == [3, 1, 2]
    assert nms(boxes, scores, 0.7).tolist() == [3, 1, 0, 2]
    # "min" overlap (intersection over the smaller box): box 3 lies inside box 0, which goes.
    assert nms(boxes, scores, 0.7, mode="min", inclusive=True).tolist() == [3, 1, 2]
    assert nms(boxes[:0], scores[:0], 0.5).tolist() == []


def test_square_keeps_the_centre():
    squared = square(torch.tensor([[10.0, 20.0, 50.0, 40.0]]))
    assert squared.tolist() == [[10.0, 10.0, 50.0, 50.0]]


# --- agreement with the original package ------------------------------------------------------


@pytest.mark.parametrize("name", list(ORIGINAL))
def test_boxes_and_points_match_the_original_package(mtcnn, name):
    faces = mtcnn.detect(load_image(sample_photo(name)))
    expected = sorted(
        ORIGINAL[name], key=lambda f: -(f["box"][2] - f["box"][0]) * (f["box"][3] - f["box"][1])
    )
    assert len(faces) == len(expected)
    for face, original in zip(faces, expected):
        x0, y0, x1, y1 = original["box"]
        assert np.allclose(face.box, (x0 - 1, y0 - 1, x1, y1), atol=0.01)  # 0-based, exclusive end
        assert face.score == pytest.approx(original["score"], abs=1e-4)
        assert np.abs(face.landmarks - np.asarray(original["points"])).max() < 0.01  # brief: within 2 px


@pytest.mark.parametrize("name", REAL_FACES)
def test_exactly_one_face_per_sample_photo_with_points_in_order(mtcnn, name):
    [face] = detect_faces(load_image(sample_photo(name)), mtcnn)
    left_eye, right_eye, nose, mouth_left, mouth_right = face.landmarks
    assert left_eye[0] < nose[0] < right_eye[0] and mouth_left[0] < mouth_right[0]
    assert max(left_eye[1], right_eye[1]) < nose[1] < min(mouth_left[1], mouth_right[1])


# --- composed multi-face pictures ---------------------------------------------------------------


@pytest.fixture(scope="module")
def pictures():
    sources = {name: MTCNNFaceAnalyzer().detect(load_image(sample_photo(name)))[0] for name in REAL_FACES}
    return composed_pictures(sources)


def test_composed_pictures_cover_small_rotated_and_cropped_faces(pictures):
    placements = [p for _, items in PICTURES.values() for p in items]
    assert min(p.size for p in placements) <= 40 and {-30, 30} <= {p.angle for p in placements}
    assert any(p.context <= 1.05 for p in placements)
    assert all(len(picture.landmarks) == 4 for picture in pictures)


@pytest.mark.parametrize("index", range(len(PICTURES)))
def test_every_face_of_the_composed_pictures_is_found(mtcnn, pictures, index):
    picture = pictures[index]
    found = mtcnn.detect(picture.image)
    matched, false_positives = match_faces(found, picture.landmarks)
    assert all(k >= 0 for k in matched) and false_positives == 0, (picture.name, matched, false_positives)
    for true_points, k, placement in zip(picture.landmarks, matched, picture.placements):
        error = np.linalg.norm(found[k].landmarks - true_points, axis=1)
        assert error.max() < 0.1 * placement.size  # the mapped source points, within 10% of the box


def test_match_faces_counts_misses_and_false_positives():
    truth = np.array([[[10, 10], [20, 10], [15, 15], [11, 20], [19, 20]]], dtype=np.float32)
    hit = Face((5, 5, 25, 25), 1.0, truth[0] + 1)
    stray = Face((50, 50, 70, 70), 1.0, truth[0] + 50)
    assert match_faces([stray, hit], truth) == ([1], 1)
    assert match_faces([stray], truth) == ([-1], 1)


# --- the default --------------------------------------------------------------------------------


def test_mtcnn_is_the_default_and_feeds_extract_faces():
    analyzer = get_face_analyzer()
    assert isinstance(analyzer, MTCNNFaceAnalyzer) and analyzer.name == "mtcnn"
    [(face, crop)] = extract_faces(sample_photo("ffhq-0293"), analyzer)
    assert crop.size == (224, 224) and face.score > 0.99
