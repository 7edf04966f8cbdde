"""Face stack: robust image loading, dlib detection with ArcFace landmarks, alignment, the CLI.

Everything runs offline on the bundled sample photos (dlib's HOG detector; one CNN check).
"""

from __future__ import annotations

import importlib.util
import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from uniportrait.cli import main
from uniportrait.errors import InvalidImageError, NoFaceError, UniPortraitError
from uniportrait.faces import (
    SAMPLE_PHOTOS,
    Face,
    ImageWriteError,
    align_face,
    alignment_matrix,
    arcface_template,
    detect_faces,
    extract_faces,
    face_masks,
    get_face_analyzer,
    load_image,
    sample_photo,
    save_png_atomic,
    similarity_transform,
)
from uniportrait.faces.dlib_backend import DlibFaceAnalyzer

REAL_FACES = ("ffhq-0100.jpg", "ffhq-0293.jpg", "ffhq-0381.jpg", "newton.jpg")


@pytest.fixture(scope="module")
def analyzer() -> DlibFaceAnalyzer:
    return DlibFaceAnalyzer()


def _face(name: str = "ffhq-0381.jpg") -> Image.Image:
    return load_image(sample_photo(name))


def _encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _png_header(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width × height (its pixel data is not there)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


def _canvas(left: Image.Image, right: Image.Image, size=(900, 480)) -> Image.Image:
    canvas = Image.new("RGB", size, (190, 190, 190))
    canvas.paste(left, (20, (size[1] - left.height) // 2))
    canvas.paste(right, (size[0] - right.width - 20, (size[1] - right.height) // 2))
    return canvas


def _centre_x(face: Face) -> float:
    return (face.box[0] + face.box[2]) / 2


# --- detection and landmarks ------------------------------------------------------------------


@pytest.mark.parametrize("name", REAL_FACES)
def test_each_sample_gives_one_face_with_sane_landmarks(analyzer, name):
    faces = detect_faces(_face(name), analyzer)
    assert len(faces) == 1
    face = faces[0]
    x0, y0, x1, y1 = face.box
    assert face.landmarks.shape == (5, 2) and face.landmarks.dtype == np.float32
    assert np.all((face.landmarks >= [x0, y0]) & (face.landmarks <= [x1, y1]))
    left_eye, right_eye, nose, mouth_left, mouth_right = face.landmarks
    assert left_eye[0] < nose[0] < right_eye[0] and mouth_left[0] < mouth_right[0]
    assert max(left_eye[1], right_eye[1]) < nose[1] < min(mouth_left[1], mouth_right[1])


def test_two_people_largest_first_and_positions_follow_the_faces(analyzer):
    big = _face("ffhq-0100.jpg")
    small = _face("ffhq-0381.jpg").resize((200, 200), Image.Resampling.LANCZOS)
    faces = detect_faces(_canvas(big, small), analyzer)
    assert len(faces) == 2
    assert faces[0].area > faces[1].area
    assert _centre_x(faces[0]) < 450 < _centre_x(faces[1])

    swapped = detect_faces(_canvas(small, big), analyzer)
    assert len(swapped) == 2 and swapped[0].area > swapped[1].area
    assert _centre_x(swapped[1]) < 450 < _centre_x(swapped[0])
    assert swapped[0].width == pytest.approx(faces[0].width, abs=2)


def test_five_point_landmarks_agree_with_the_68_point_model(analyzer):
    image = _face("ffhq-0293.jpg")
    five = analyzer.detect(image)[0]
    sixty_eight = DlibFaceAnalyzer(landmarks="68").detect(image)[0]
    error = np.linalg.norm(five.landmarks - sixty_eight.landmarks, axis=1) / sixty_eight.eye_distance
    assert error.max() < 0.15  # calibration residual: ~0.05 nose, ~0.09 mouth on average


def test_cnn_detector_finds_the_face():
    faces = DlibFaceAnalyzer(detector="cnn", upsample=0).detect(_face("ffhq-0381.jpg"))
    assert len(faces) == 1 and 0 < faces[0].score


def test_embeddings_separate_identities(analyzer):
    a = _face("ffhq-0100.jpg")
    a_small = a.resize((240, 240), Image.Resampling.LANCZOS)
    b = _face("ffhq-0381.jpg")
    emb = [analyzer.embed(img, detect_faces(img, analyzer)[0]) for img in (a, a_small, b)]
    assert emb[0].shape == (128,) and emb[0].dtype == np.float32
    same, other = np.linalg.norm(emb[0] - emb[1]), np.linalg.norm(emb[0] - emb[2])
    assert same < 0.3 < other


# --- alignment --------------------------------------------------------------------------------


def test_aligned_crop_puts_the_eyes_on_the_template(analyzer):
    template = arcface_template(224)
    for name in REAL_FACES:
        [(face, crop)] = extract_faces(sample_photo(name), analyzer)
        assert crop.size == (224, 224) and crop.mode == "RGB"
        matrix = alignment_matrix(face.landmarks)
        mapped = face.landmarks @ matrix[:, :2].T + matrix[:, 2]
        assert np.linalg.norm(mapped[:2] - template[:2], axis=1).max() < 8
        # The crop itself: the detector finds the eyes where the template puts them.
        [again] = detect_faces(crop, analyzer)
        assert np.linalg.norm(again.landmarks[:2] - template[:2], axis=1).max() < 10


def test_similarity_transform_recovers_a_known_transform_without_reflection():
    template = arcface_template(112).astype(np.float64)
    angle, scale, shift = 0.3, 1.7, np.array([12.0, -5.0])
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    moved = scale * template @ rotation.T + shift
    assert np.allclose(similarity_transform(template, moved), np.hstack([scale * rotation, shift[:, None]]))
    mirrored = similarity_transform(template, template * [-1, 1])
    assert np.linalg.det(mirrored[:, :2]) > 0  # a mirror image is not matched by reflecting


def test_align_face_maps_pixels_like_the_matrix():
    image = Image.new("RGB", (224, 224))
    image.putpixel((30, 40), (255, 255, 255))
    template = arcface_template(224)
    crop = np.asarray(align_face(image, template / 2))[..., 0].astype(float)  # scale ×2 about the origin
    ys, xs = np.mgrid[:224, :224]
    assert (crop * xs).sum() / crop.sum() == pytest.approx(60, abs=0.05)
    assert (crop * ys).sum() / crop.sum() == pytest.approx(80, abs=0.05)
    assert np.asarray(align_face(image, template + 150))[-1, -1].tolist() == [0, 0, 0]  # outside: black


def test_face_masks_are_clipped_rectangles():
    face = Face((-5, 2.5, 3, 20), 1.0, np.zeros((5, 2)))
    masks = face_masks([face, (1, 1, 2, 2)], height=8, width=6)
    assert masks.shape == (2, 8, 6) and masks.dtype == bool
    assert masks[0].sum() == 3 * 6 and masks[0][2:, :3].all()
    assert masks[1].sum() == 1 and masks[1, 1, 1]


# --- no face, tiny faces, padding --------------------------------------------------------------


@pytest.mark.parametrize("colour", [(128, 128, 128), (250, 240, 230)])
def test_no_face_raises(analyzer, colour):
    with pytest.raises(NoFaceError, match="no face found in flat.png"):
        extract_faces(Image.new("RGB", (300, 200), colour), analyzer, name="flat.png")


def test_tiny_faces_are_reported_as_too_small(analyzer):
    source = _face("ffhq-0100.jpg")
    canvas = Image.new("RGB", (400, 300), (200, 200, 200))
    canvas.paste(source.resize((43, 43), Image.Resampling.LANCZOS), (150, 100))  # ~30 px face
    with pytest.raises(NoFaceError, match=r"1 found, but face too small \(\d+x\d+ px box; at least 48"):
        extract_faces(canvas, analyzer, name="tiny.png")

    canvas.paste(Image.new("RGB", (60, 60), (200, 200, 200)), (140, 90))
    canvas.paste(source.resize((29, 29), Image.Resampling.LANCZOS), (150, 100))  # ~20 px face
    with pytest.raises(NoFaceError, match="smaller than about 40 px are not detected"):
        extract_faces(canvas, analyzer, name="tiny.png")
    with pytest.raises(NoFaceError, match="too small"):
        extract_faces(canvas, DlibFaceAnalyzer(upsample=2), name="tiny.png")


def test_pad_retry_finds_a_tightly_cropped_face_in_original_coordinates(analyzer):
    image = _face("ffhq-0381.jpg")
    full = analyzer.detect(image)[0]
    left, top = 87, 129
    tight = image.crop((left, top, 212, 254))
    assert analyzer.detect(tight) == []  # the plain detector needs the padding
    assert detect_faces(tight, analyzer, pad_retry=False) == []
    [face] = detect_faces(tight, analyzer)
    moved_back = np.linalg.norm(face.landmarks + [left, top] - full.landmarks, axis=1)
    assert moved_back.max() < 0.1 * full.eye_distance


def test_pad_retry_maps_coordinates_back_exactly():
    class PadOnly:
        name = "stub"
        sizes: list[tuple[int, int]] = []

        def detect(self, image):
            self.sizes.append(image.size)
            if image.size == (100, 60):
                return []
            points = np.array([[50, 40], [70, 40], [60, 50], [52, 60], [68, 60]], dtype=np.float32)
            return [Face((40, 30, 80, 70), 1.0, points)]

    stub = PadOnly()
    [face] = detect_faces(Image.new("RGB", (100, 60)), stub)
    assert stub.sizes == [(100, 60), (150, 90)]  # 25% of width / height on each side
    assert face.box == (15.0, 15.0, 55.0, 55.0)
    assert face.landmarks[0].tolist() == [25.0, 25.0]


# --- image loading ----------------------------------------------------------------------------


def test_bad_files_raise_invalid_image(tmp_path):
    good = _encode(_face(), "JPEG", quality=90)
    png = _encode(_face())
    cases = {
        "missing.jpg": None,
        "text.jpg": b"this is not an image\n" * 10,
        "empty.png": b"",
        "truncated.jpg": good[: len(good) // 2],
        "truncated.png": png[: len(png) // 2],
    }
    for name, data in cases.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
        with pytest.raises(InvalidImageError, match=name):
            load_image(tmp_path / name)
    with pytest.raises(InvalidImageError, match="is a folder"):
        load_image(tmp_path)


@pytest.mark.parametrize("side", [8000, 10_000, 100_000])
def test_decompression_bombs_are_refused_from_the_header(tmp_path, side):
    limit = Image.MAX_IMAGE_PIXELS
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header(side, side))
    with pytest.raises(InvalidImageError, match="bomb.png is too large"):
        load_image(path)
    assert Image.MAX_IMAGE_PIXELS == limit  # PIL's global limit is left alone


def test_max_pixels_applies_to_bytes_and_images():
    data = _encode(_face())
    assert load_image(data).size == (320, 320)
    with pytest.raises(InvalidImageError, match="too large"):
        load_image(data, max_pixels=320 * 319)
    with pytest.raises(InvalidImageError, match="too large"):
        load_image(_face(), max_pixels=1000)


def _modes(face: Image.Image) -> dict[str, Image.Image]:
    grey16 = Image.fromarray(np.asarray(face.convert("L")).astype(np.uint16) * 257)
    rgba = face.convert("RGBA")
    rgba.putalpha(Image.new("L", face.size, 255))
    return {
        "RGBA": rgba,
        "LA": face.convert("LA"),
        "L": face.convert("L"),
        "P": face.convert("P", palette=Image.Palette.ADAPTIVE),
        "I;16": grey16,
        "CMYK": face.convert("CMYK"),
    }


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "I;16", "CMYK"])
def test_every_mode_loads_as_rgb_with_the_face(analyzer, tmp_path, mode):
    original = _face()
    converted = _modes(original)[mode]
    path = tmp_path / ("face.jpg" if mode == "CMYK" else "face.png")
    converted.save(path, quality=95) if mode == "CMYK" else converted.save(path)
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == original.size
    assert len(detect_faces(loaded, analyzer)) == 1
    if mode == "I;16":
        assert Image.open(path).mode.startswith("I")
        grey = np.asarray(original.convert("L")).astype(int)
        assert np.abs(np.asarray(loaded)[..., 0].astype(int) - grey).max() <= 1  # scaled, not clipped


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    palette = rgba.convert("P")
    palette.info["transparency"] = palette.getpixel((0, 0))
    for image in (rgba, rgba.convert("LA"), palette):
        loaded = load_image(image)
        assert loaded.mode == "RGB" and loaded.getpixel((0, 0)) == (255, 255, 255)


def test_high_bit_depth_and_float_greyscale_are_rescaled():
    ramp = np.linspace(0, 65535, 256, dtype=np.float64).reshape(16, 16)
    big_endian = Image.fromarray(ramp.astype(">u2"))
    assert big_endian.mode == "I;16B"
    as_int = Image.fromarray(ramp.astype(np.int32), mode="I")
    as_float = Image.fromarray((ramp / 65535).astype(np.float32), mode="F")
    for image in (big_endian, as_int, as_float):
        values = np.asarray(load_image(image))[..., 0]
        assert values.min() == 0 and values.max() == 255 and len(np.unique(values)) > 200


def test_exif_orientation_is_applied(analyzer, tmp_path):
    upright = _face()
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # sideways in the file
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    path = tmp_path / "rotated.jpg"
    stored.save(path, quality=95, exif=exif)
    assert analyzer.detect(Image.open(path).convert("RGB")) == []  # only exif_transpose makes it upright
    loaded = load_image(path)
    assert loaded.size == upright.size
    assert len(detect_faces(loaded, analyzer)) == 1


# --- writing ------------------------------------------------------------------------------------


def test_save_png_atomic_writes_metadata_and_leaves_no_temp_files(tmp_path):
    path = save_png_atomic(_face(), tmp_path / "out" / "crop.png", {"source": "ffhq-0381.jpg"})
    with Image.open(path) as written:
        assert written.size == (320, 320) and written.text["source"] == "ffhq-0381.jpg"
    assert sorted(p.name for p in path.parent.iterdir()) == ["crop.png"]


def test_save_png_atomic_failures_leave_nothing(tmp_path):
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ImageWriteError, match="cannot create output folder"):
        save_png_atomic(_face(), tmp_path / "a-file" / "crop.png")
    with pytest.raises(ImageWriteError, match="cannot write"):
        save_png_atomic(Image.new("CMYK", (4, 4)), tmp_path / "cmyk.png")  # PNG has no CMYK
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
    assert issubclass(ImageWriteError, UniPortraitError)


# --- small API bits ---------------------------------------------------------------------------


def test_face_round_trips_through_json():
    face = Face((1, 2, 30, 40), 0.5, np.arange(10).reshape(5, 2))
    again = Face.from_dict(json.loads(json.dumps(face.to_dict())))
    assert again.box == face.box and again.score == face.score
    assert np.array_equal(again.landmarks, face.landmarks)
    assert list(face.to_dict()["landmarks"]) == ["left_eye", "right_eye", "nose", "mouth_left", "mouth_right"]
    with pytest.raises(ValueError, match="shape"):
        Face((0, 0, 1, 1), 1.0, np.zeros((4, 2)))


def test_analyzer_and_sample_lookup_errors():
    assert get_face_analyzer("dlib").name == "dlib"
    assert get_face_analyzer("dlib-cnn", landmarks="68").name == "dlib-cnn-68"
    with pytest.raises(UniPortraitError, match="unknown face analyzer"):
        get_face_analyzer("opencv")
    with pytest.raises(UniPortraitError, match="available: ffhq-0100.jpg"):
        sample_photo("lena.jpg")
    assert sample_photo("newton") == sample_photo("newton.jpg")
    assert all(sample_photo(name).is_file() for name in SAMPLE_PHOTOS)


@pytest.mark.skipif(importlib.util.find_spec("insightface") is not None, reason="insightface is installed")
def test_insightface_missing_names_the_extra():
    with pytest.raises(UniPortraitError, match=r"pip install uniportrait\[insightface\]"):
        get_face_analyzer("insightface")


# --- command line -------------------------------------------------------------------------------


def test_cli_prints_json(capsys):
    assert main(["faces", str(sample_photo("newton")), "--json"]) == 0
    [report] = json.loads(capsys.readouterr().out)
    assert len(report["faces"]) == 1 and report["faces"][0]["problem"] is None


def test_cli_table_and_crops(tmp_path, capsys):
    photos = [str(sample_photo("ffhq-0100")), str(sample_photo("ffhq-0293"))]
    assert main(["faces", *photos, "--crops", str(tmp_path / "crops")]) == 0
    out = capsys.readouterr().out
    assert "ffhq-0100.jpg (320x320): 1 face(s)" in out and "left eye" in out
    written = sorted(p.name for p in (tmp_path / "crops").iterdir())
    assert written == ["ffhq-0100_face0.png", "ffhq-0293_face0.png"]
    with Image.open(tmp_path / "crops" / written[0]) as crop:
        assert crop.size == (224, 224) and "face" in crop.text


def test_cli_bad_file_fails_and_writes_nothing(tmp_path, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    crops = tmp_path / "crops"
    assert main(["faces", str(sample_photo("ffhq-0100")), str(bad), "--crops", str(crops)]) == 2
    assert "bad.jpg" in capsys.readouterr().err
    assert not crops.exists() or not any(crops.iterdir())
    flat = tmp_path / "flat.png"
    Image.new("RGB", (200, 200), (90, 90, 90)).save(flat)
    assert main(["faces", str(sample_photo("ffhq-0100")), str(flat), "--crops", str(crops)]) == 2
    assert "no usable face in" in capsys.readouterr().err
    assert not crops.exists() or not any(crops.iterdir())


def test_cli_lists_a_photo_without_faces(tmp_path, capsys):
    flat = tmp_path / "flat.png"
    Image.new("RGB", (200, 200), (90, 90, 90)).save(flat)
    assert main(["faces", str(flat)]) == 0
    assert "flat.png (200x200): 0 face(s)" in capsys.readouterr().out


def test_sample_assets_are_small():
    for name in SAMPLE_PHOTOS:
        with Image.open(sample_photo(name)) as image:
            assert max(image.size) <= 384
    assert (Path(sample_photo("newton")).parent / "README.md").is_file()
