"""``uniportrait eval --generate`` split over processes: ``--shard I/N`` parts, or ``accelerate launch``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from uniportrait.cli import main
from uniportrait.faces import sample_photo

ACCELERATE = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
COMMAND = ["eval", "--preset", "tiny", "--sheet-rows", "0"]


def _spec(folder: Path) -> Path:
    spec = {
        "name": "split-grid",
        "identities": {
            "anna": [str(sample_photo("ffhq-0100.jpg"))],
            "bea": [str(sample_photo("ffhq-0293.jpg"))],
            "carl": [str(sample_photo("ffhq-0381.jpg"))],
        },
        "single": {"prompts": ["a photo of a person"]},
        "multi": {"groups": [["anna", "bea"], ["bea", "carl"]], "prompts": ["two people at a cafe"]},
        "seeds": [0],
        "settings": {"steps": 1, "width": 64, "height": 64},
    }  # 3 single + 2 multi = 5 jobs
    path = folder / "spec.json"
    path.write_text(json.dumps(spec))
    return path


def _outcome(out: Path) -> tuple[dict, list, dict]:
    here = str(out.resolve())  # runs differ only by their folder and the time they took
    result = json.loads((out / "results.json").read_text().replace(here, "OUT"))
    result.pop("seconds", None)
    manifest = (out / "manifest.jsonl").read_text().replace(here, "OUT").splitlines()
    images = {p.name: np.asarray(Image.open(p)) for p in sorted((out / "images").glob("*.png"))}
    return result, manifest, images


def _same(a: tuple, b: tuple) -> None:
    assert a[0] == b[0] and a[1] == b[1]
    assert a[2].keys() == b[2].keys() and len(a[2]) == 5
    for name in a[2]:
        np.testing.assert_array_equal(a[2][name], b[2][name], err_msg=name)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    root = tmp_path_factory.mktemp("grid")
    spec = _spec(root)
    assert main(["-q", *COMMAND, "--generate", str(spec), "--out", str(root / "one")]) == 0
    return spec, _outcome(root / "one")


def test_parts_then_the_whole_command_equal_one_process(one_process, tmp_path, capsys):
    spec, expected = one_process
    out = tmp_path / "parts"
    for part in ("0/2", "1/2"):
        assert main(["-q", *COMMAND, "--generate", str(spec), "--out", str(out), "--shard", part]) == 0
    assert "evaluate when every part is done" in capsys.readouterr().out
    assert not (out / "results.json").exists()
    names = sorted(p.name for p in (out / "images").glob("*.png"))
    assert len(names) == 5  # no job missing, none twice
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "images").glob("*.png")}
    assert main(["-q", *COMMAND, "--generate", str(spec), "--out", str(out)]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (out / "images").glob("*.png")} == stamps  # none redone
    _same(_outcome(out), expected)


def test_a_stale_or_missing_image_is_generated_again(one_process, tmp_path):
    spec, expected = one_process
    out = tmp_path / "resume"
    assert main(["-q", *COMMAND, "--generate", str(spec), "--out", str(out), "--shard", "0/3"]) == 0
    made = sorted((out / "images").glob("*.png"))
    assert len(made) == 2
    Image.new("RGB", (64, 64)).save(made[0])  # not made for this job: no record
    assert main(["-q", *COMMAND, "--generate", str(spec), "--out", str(out)]) == 0
    _same(_outcome(out), expected)


def test_bad_shard_arguments(tmp_path, capsys):
    spec = _spec(tmp_path)
    out = tmp_path / "bad"
    assert main([*COMMAND, "--generate", str(spec), "--out", str(out), "--shard", "2/2"]) == 2
    assert "need 0 <= I < N" in capsys.readouterr().err and not out.exists()
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("")
    assert main([*COMMAND, "--manifest", str(manifest), "--out", str(out), "--shard", "0/2"]) == 2
    assert "--shard splits a --generate grid" in capsys.readouterr().err


@pytest.mark.slow
def test_accelerate_launch_splits_the_grid_and_the_main_process_evaluates(one_process, tmp_path):
    spec, expected = one_process
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which(
        "accelerate"
    )
    assert accelerate, "accelerate is not installed"
    out = tmp_path / "launched"
    cmd = [
        accelerate, "launch", "--config_file", str(ACCELERATE / "cpu2.yaml"), "-m", "uniportrait",
        *COMMAND, "--generate", str(spec), "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "grid part 0/2: 3 of 5 job(s)" in log and "grid part 1/2: 2 of 5 job(s)" in log
    assert "grid part 0/1: 5 of 5 job(s), 5 already generated" in log  # the main process evaluates
    assert log.count("| all | 5 |") == 1  # one report
    _same(_outcome(out), expected)
