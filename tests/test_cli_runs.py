"""`uniportrait generate`: bad photos fail before the model loads, ambiguity is reported, and runs
never overwrite or mix with each other."""

from __future__ import annotations

import logging
import threading

import pytest
from PIL import Image

import uniportrait.cli.generate as generate
from uniportrait.cli import main
from uniportrait.faces import sample_photo

FAST = ["--preset", "tiny", "--steps", "1", "--width", "64", "--height", "64"]


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("UNIPORTRAIT_HOME", str(tmp_path / "home"))


@pytest.fixture
def no_model(monkeypatch):
    def refuse(_args):
        raise AssertionError("the model must not load for a bad photo")

    monkeypatch.setattr(generate, "load_pipeline_from_args", refuse)


def _photos(tmp_path) -> dict[str, str]:
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    tiny = tmp_path / "one_pixel.png"
    Image.new("RGB", (1, 1)).save(tiny)
    flat = tmp_path / "flat.png"
    Image.new("RGB", (300, 300), (120, 160, 200)).save(flat)
    folder = tmp_path / "a_folder"
    folder.mkdir()
    return {"empty": str(empty), "corrupt": str(corrupt), "1x1": str(tiny), "faceless": str(flat),
            "folder": str(folder)}  # fmt: skip


@pytest.mark.parametrize("kind, words", [("empty", "empty.jpg"), ("corrupt", "corrupt.jpg"),
                                         ("1x1", "one_pixel.png"), ("faceless", "no face"),
                                         ("folder", "is a folder")])  # fmt: skip
def test_bad_photos_fail_before_the_model_loads(tmp_path, capsys, no_model, kind, words):
    out = tmp_path / "out"
    code = main(["generate", "--prompt", "p", "--id", _photos(tmp_path)[kind], "--out", str(out)] + FAST)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and words in err and err.count("\n") == 1, err
    assert not out.exists()  # a failed run leaves no folder behind


def test_several_faces_and_a_shared_photo_are_reported(tmp_path, caplog):
    a, b = Image.open(sample_photo("ffhq-0100")), Image.open(sample_photo("ffhq-0293"))
    group = Image.new("RGB", (a.width + b.width, max(a.height, b.height)))
    group.paste(a, (0, 0))
    group.paste(b, (a.width, 0))
    group_path = tmp_path / "group.png"
    group.save(group_path)
    with caplog.at_level(logging.WARNING):
        code = main(["generate", "--prompt", "p", "--id", str(group_path), "--id", str(group_path),
                     "--out", str(tmp_path / "o")] + FAST)  # fmt: skip
    assert code == 0
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "shows 2 faces; using the largest" in messages
    assert "is given for people [1, 2]" in messages


def test_reruns_and_parallel_runs_get_their_own_folders(tmp_path, capsys):
    out = tmp_path / "out"
    photo = str(sample_photo("ffhq-0100"))
    args = ["generate", "--prompt", "p", "--id", photo, "--out", str(out)] + FAST
    assert main(args) == 0
    first = capsys.readouterr().out
    assert str(out / "run-001" / "image_00.png") in first  # it says where
    before = (out / "run-001" / "image_00.png").read_bytes()
    codes = []
    threads = [threading.Thread(target=lambda: codes.append(main(args + ["--seed", "5"]))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert codes == [0, 0]
    assert sorted(p.name for p in out.iterdir()) == ["run-001", "run-002", "run-003"]
    assert (out / "run-001" / "image_00.png").read_bytes() == before  # the first run is untouched
    for run in ("run-002", "run-003"):
        assert sorted(p.name for p in (out / run).iterdir()) == ["image_00.png", "reference_1_0.png"]


def test_save_routing_with_one_person_is_refused(tmp_path, capsys, no_model):
    code = main(["generate", "--prompt", "p", "--id", str(sample_photo("ffhq-0100")), "--save-routing",
                 "--out", str(tmp_path / "o")] + FAST)  # fmt: skip
    assert code == 2 and "--save-routing needs two or more people" in capsys.readouterr().err
