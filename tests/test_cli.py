"""The `uniportrait` command end to end on the tiny preset: generate, id, demo, bad input."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from uniportrait.cli import main
from uniportrait.faces import sample_photo

FAST = ["--preset", "tiny", "--steps", "2", "--width", "64", "--height", "64"]


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("UNIPORTRAIT_HOME", str(tmp_path / "home"))


def _images(folder: Path) -> list[Path]:
    """The images of every run written into ``--out folder`` (each run has its run-NNN folder)."""
    return sorted(folder.glob("run-*/image_*.png"))


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_generate_writes_images_references_routing_and_metadata(tmp_path):
    out = tmp_path / "out"
    a, b = str(sample_photo("ffhq-0100")), str(sample_photo("ffhq-0293"))
    code = main(
        ["generate", "--prompt", "two people", "--id", a, "--id", b, "--save-routing", "--out", str(out)]
        + FAST
    )
    assert code == 0
    images = _images(out)
    assert len(images) == 1
    meta = Image.open(images[0]).text
    assert meta["prompt"] == "two people"
    assert json.loads(meta["uniportrait"])["steps"] == 2
    run = out / "run-001"
    assert images[0].parent == run
    assert (run / "routing_00.png").is_file()
    assert (run / "reference_1_0.png").is_file() and (run / "reference_2_0.png").is_file()
    assert Image.open(run / "reference_1_0.png").size == (224, 224)


def test_stored_identity_gives_same_image_without_encoding(tmp_path, monkeypatch):
    photo = str(sample_photo("ffhq-0381"))
    assert main(["id", "add", "lena", photo, "--preset", "tiny"]) == 0
    direct, stored = tmp_path / "direct", tmp_path / "stored"
    assert main(["generate", "--prompt", "a person", "--id", photo, "--out", str(direct)] + FAST) == 0

    import uniportrait.faces as faces
    import uniportrait.identity as identity_mod
    import uniportrait.pipeline as pipeline_mod

    calls = {"encode": 0, "detect": 0}

    def counting_encode(*args, **kwargs):
        calls["encode"] += 1
        return real_encode(*args, **kwargs)

    def counting_extract(*args, **kwargs):
        calls["detect"] += 1
        return real_extract(*args, **kwargs)

    real_encode, real_extract = identity_mod.encode_face_features, faces.extract_faces
    monkeypatch.setattr(pipeline_mod, "encode_face_features", counting_encode)
    monkeypatch.setattr(faces, "extract_faces", counting_extract)
    assert main(["generate", "--prompt", "a person", "--id-name", "lena", "--out", str(stored)] + FAST) == 0
    assert calls == {"encode": 0, "detect": 0}
    np.testing.assert_array_equal(_pixels(_images(direct)[0]), _pixels(_images(stored)[0]))
    # the counters do count: encoding from a photo goes through them
    assert (
        main(["generate", "--prompt", "a person", "--id", photo, "--out", str(tmp_path / "again")] + FAST)
        == 0
    )
    assert calls["encode"] == 1 and calls["detect"] == 1


def test_id_list_show_rm(tmp_path, capsys):
    assert main(["id", "add", "ann", str(sample_photo("ffhq-0100")), "--preset", "tiny"]) == 0
    capsys.readouterr()
    assert main(["id", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [i["name"] for i in listed] == ["ann"] and listed[0]["references"] == 1
    assert main(["id", "show", "ann", "--crops", str(tmp_path / "crops")]) == 0
    assert (tmp_path / "crops" / "ann_ref0.png").is_file()
    assert main(["id", "add", "ann", str(sample_photo("ffhq-0100")), "--preset", "tiny"]) == 2  # exists
    assert main(["id", "rm", "ann"]) == 0
    assert main(["id", "show", "ann"]) == 2


def test_identity_from_another_encoder_is_refused(capsys):
    assert (
        main(["id", "add", "ann", str(sample_photo("ffhq-0100")), "--preset", "tiny", "--seed-model", "1"])
        == 0
    )
    capsys.readouterr()
    code = main(["generate", "--prompt", "p", "--id-name", "ann", "--out", "unused"] + FAST)
    assert code == 2
    assert "another face encoder" in capsys.readouterr().err


def test_identity_from_the_old_alignment_is_recognised_and_refused(tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import save_file

    assert main(["id", "add", "ann", str(sample_photo("ffhq-0100")), "--preset", "tiny"]) == 0
    capsys.readouterr()
    path = tmp_path / "home" / "identities" / "ann.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    assert meta["aligner"] == "mtcnn+norm_crop" and meta["version"] == "2"
    assert main(["id", "list", "--json"]) == 0
    [info] = json.loads(capsys.readouterr().out)
    assert info["aligner"] == "mtcnn+norm_crop" and info["current"] is True

    # A file written by the previous default (dlib 5-point + PIL bicubic): version 1, no aligner.
    old = {k: v for k, v in meta.items() if k != "aligner"} | {"version": "1"}
    save_file(tensors, str(path), metadata=old)
    assert main(["id", "list"]) == 0
    assert "dlib-5pt+pil-bicubic (old: add again)" in capsys.readouterr().out
    code = main(["generate", "--prompt", "p", "--id-name", "ann", "--out", str(tmp_path / "o")] + FAST)
    err = capsys.readouterr().err
    assert code == 2 and not list((tmp_path / "o").glob("*"))
    assert "'ann'" in err and "old face alignment (dlib-5pt+pil-bicubic)" in err and "id add ann" in err
    assert main(["id", "add", "ann", str(sample_photo("ffhq-0100")), "--preset", "tiny", "--overwrite"]) == 0
    assert main(["generate", "--prompt", "p", "--id-name", "ann", "--out", str(tmp_path / "o")] + FAST) == 0


def _bad_generate(tmp_path, capsys, extra: list[str]) -> str:
    out = tmp_path / "bad_out"
    code = main(["generate", "--prompt", "p", "--out", str(out)] + FAST + extra)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert not _images(out) if out.exists() else True
    return err


def test_photo_without_face(tmp_path, capsys):
    flat = tmp_path / "flat.png"
    Image.new("RGB", (200, 200), (120, 160, 200)).save(flat)
    assert "no face" in _bad_generate(tmp_path, capsys, ["--id", str(flat)])


def test_not_an_image_and_truncated(tmp_path, capsys):
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    assert "notes.jpg" in _bad_generate(tmp_path, capsys, ["--id", str(text)])
    data = sample_photo("ffhq-0100").read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) // 2])
    assert "cut.jpg" in _bad_generate(tmp_path, capsys, ["--id", str(cut)])


def test_decompression_bomb(tmp_path, capsys):
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    assert "bomb.png" in _bad_generate(tmp_path, capsys, ["--id", str(bomb)])


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "I;16", "CMYK"])
def test_unusual_modes_generate(tmp_path, mode):
    src = Image.open(sample_photo("ffhq-0293")).convert("RGB")
    if mode == "I;16":
        img = Image.fromarray(np.asarray(src.convert("L")).astype(np.uint16) * 257)
        assert img.mode == "I;16"
    else:
        img = src.convert(mode)
    path = tmp_path / f"face_{mode.replace(';', '')}.{'jpg' if mode == 'CMYK' else 'png'}"
    img.save(path)
    assert main(["generate", "--prompt", "p", "--id", str(path), "--out", str(tmp_path / "o")] + FAST) == 0


def test_exif_rotated_photo(tmp_path):
    upright = Image.open(sample_photo("ffhq-0100")).convert("RGB")
    stored = upright.rotate(90, expand=True)  # what the camera stored (turned left)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: turn right to view
    path = tmp_path / "rotated.jpg"
    stored.save(path, exif=exif)
    assert main(["generate", "--prompt", "p", "--id", str(path), "--out", str(tmp_path / "o")] + FAST) == 0


def test_face_too_small(tmp_path, capsys):
    canvas = Image.new("RGB", (600, 600), (200, 200, 200))
    canvas.paste(Image.open(sample_photo("ffhq-0100")).resize((24, 24)), (300, 300))
    path = tmp_path / "tiny_face.png"
    canvas.save(path)
    err = _bad_generate(tmp_path, capsys, ["--id", str(path)])
    assert "no face" in err or "small" in err


def test_unknown_identity_name(tmp_path, capsys):
    assert "unknown identity 'nobody'" in _bad_generate(tmp_path, capsys, ["--id-name", "nobody"])
    assert "invalid identity name" in _bad_generate(tmp_path, capsys, ["--id-name", "../etc"])


@pytest.mark.parametrize(
    ("mixes", "message"),
    [(["{m}:1.5"], "outside [0, 1]"), (["{m}:-0.1"], "outside [0, 1]"), (["{m}:0.6", "{m}:0.6"], "sum to")],
)
def test_mix_scales(tmp_path, capsys, mixes, message):
    photo, other = str(sample_photo("ffhq-0100")), str(sample_photo("ffhq-0293"))
    args = ["--id", photo]
    for m in mixes:
        args += ["--mix", m.format(m=other)]
    assert message in _bad_generate(tmp_path, capsys, args)


def test_mix_changes_image(tmp_path):
    photo, other = str(sample_photo("ffhq-0100")), str(sample_photo("ffhq-0293"))
    plain, mixed = tmp_path / "plain", tmp_path / "mixed"
    assert main(["generate", "--prompt", "p", "--id", photo, "--out", str(plain)] + FAST) == 0
    assert (
        main(
            ["generate", "--prompt", "p", "--id", photo, "--mix", f"{other}:0.5", "--out", str(mixed)] + FAST
        )
        == 0
    )
    assert not np.array_equal(_pixels(_images(plain)[0]), _pixels(_images(mixed)[0]))


def test_unwritable_output_folder(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code = main(["generate", "--prompt", "p", "--out", str(blocker / "sub")] + FAST)
    assert code == 2
    assert "cannot write to output folder" in capsys.readouterr().err


def test_failure_while_writing_leaves_no_partial_files(tmp_path, monkeypatch, capsys):
    import uniportrait.faces.image_io as image_io
    from uniportrait.errors import UniPortraitError

    real = image_io.save_png_atomic
    written = []

    def failing(image, path, metadata=None):
        if written:
            raise UniPortraitError("disk full (simulated)")
        written.append(path)
        return real(image, path, metadata)

    monkeypatch.setattr(image_io, "save_png_atomic", failing)
    out = tmp_path / "out"
    code = main(["generate", "--prompt", "p", "--id", str(sample_photo("ffhq-0100")), "--num-images", "2",
                 "--out", str(out)] + FAST)  # fmt: skip
    assert code == 2 and "disk full" in capsys.readouterr().err
    assert written and not out.exists()  # nothing half-written, not even the empty folders


def test_bad_numbers(tmp_path, capsys):
    assert "--steps" in _bad_generate(tmp_path, capsys, ["--steps", "0"])
    assert "multiple of 8" in _bad_generate(tmp_path, capsys, ["--width", "100"])
    assert "--identity-guidance must be between 0.0 and 30.0" in _bad_generate(
        tmp_path, capsys, ["--identity-guidance", "-2"]
    )


def test_demo_writes_real_files(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--preset", "tiny", "--out", str(out), "--steps", "2"]) == 0
    printed = capsys.readouterr().out
    sheet = out / "contact_sheet.png"
    assert str(sheet) in printed
    with Image.open(sheet) as img:
        assert img.width > 300 and img.height > 300
    assert (out / "pair" / "routing_00.png").is_file()
    assert Image.open(io.BytesIO((out / "single" / "image_00.png").read_bytes())).size == (256, 256)


def test_help_everywhere(capsys):
    for cmd in (["generate"], ["id"], ["id", "add"], ["demo"], ["faces"]):
        with pytest.raises(SystemExit) as exc:
            main(cmd + ["--help"])
        assert exc.value.code == 0
    assert "usage" in capsys.readouterr().out


def test_generate_with_a_saved_adapter(tmp_path):
    import torch

    from uniportrait.presets import build_tiny_pipeline

    other = build_tiny_pipeline(seed=3)
    folder = other.adapter.save_pretrained(tmp_path / "adapter", face_backbone=other.face_backbone)
    photo = str(sample_photo("ffhq-0100"))
    default, custom = tmp_path / "default", tmp_path / "custom"
    assert main(["generate", "--prompt", "p", "--id", photo, "--out", str(default)] + FAST) == 0
    args = ["generate", "--prompt", "p", "--id", photo, "--out", str(custom), "--adapter", str(folder)]
    assert main(args + FAST) == 0
    got = _pixels(_images(custom)[0])
    assert not np.array_equal(_pixels(_images(default)[0]), got)

    # the same as the Python API with that adapter
    from uniportrait.photos import identity_from_photos

    pipe = build_tiny_pipeline(adapter=folder)
    ident = identity_from_photos(pipe, [photo])
    image = pipe("p", identities=[ident], num_inference_steps=2, height=64, width=64,
                 generator=torch.Generator().manual_seed(0)).images[0]  # fmt: skip
    np.testing.assert_array_equal(np.asarray(image), got)

    # the same adapter as a folder of the published .bin files (as its --help says)
    published, again = tmp_path / "published", tmp_path / "again"
    assert main(["-q", "convert", "--export", str(folder), str(published), "--preset", "tiny"]) == 0
    args = ["generate", "--prompt", "p", "--id", photo, "--out", str(again), "--adapter", str(published)]
    assert main(args + FAST) == 0
    np.testing.assert_allclose(_pixels(_images(again)[0]), got, atol=2)


def test_sd15_with_own_adapter_reports_missing_base(tmp_path, capsys, monkeypatch):
    from uniportrait.presets import build_tiny_pipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = build_tiny_pipeline().adapter.save_pretrained(tmp_path / "adapter")
    code = main(["generate", "--prompt", "p", "--out", str(tmp_path / "o"), "--preset", "sd15",
                 "--adapter", str(folder)])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    assert "Realistic_Vision" in err and "glint360k" in err and str(folder) not in err
    assert (
        main(["generate", "--prompt", "p", "--out", str(tmp_path / "o"), "--adapter", str(tmp_path / "no")])
        == 2
    )


def test_safety_checker_flag_needs_real_weights(tmp_path, capsys):
    assert "--safety-checker needs real weights" in _bad_generate(tmp_path, capsys, ["--safety-checker"])
