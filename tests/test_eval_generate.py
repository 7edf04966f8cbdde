"""The generation guard (re-sampling on missing / duplicated identities) and ``eval --generate``.

The tiny preset's random weights draw no faces, so the real check always fails there: the tests
use that to see the guard give up after K retries, and a fake check to see it stop on success.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from uniportrait.cli import main
from uniportrait.evaluation import FaceCheck, FaceChecker, generate_with_face_check, sample_with_face_check
from uniportrait.faces import sample_photo

SIZE, STEPS = 64, 2


class FakeCheck:
    """Fails the first ``failures`` images it sees, then passes; records how often it was called."""

    def __init__(self, failures: int) -> None:
        self.failures, self.calls = failures, 0

    def __call__(self, image: Image.Image) -> FaceCheck:
        self.calls += 1
        if self.calls <= self.failures:
            return FaceCheck(faces=2, duplicated=["person-0"])
        return FaceCheck(faces=2)


@pytest.fixture(scope="module")
def people(tiny_pipe):
    from uniportrait.photos import identity_from_photos

    return [
        identity_from_photos(tiny_pipe, [sample_photo(n)], name=n[:-4])
        for n in ("ffhq-0100.jpg", "ffhq-0293.jpg")
    ]


def _eval_generate(spec, out) -> int:
    return main(["-q", "eval", "--generate", str(spec), "--out", str(out), "--preset", "tiny"])


def _kwargs():
    return dict(num_inference_steps=STEPS, height=SIZE, width=SIZE)


def test_guard_resamples_with_the_next_seed_until_the_check_passes(tiny_pipe, people):
    check = FakeCheck(failures=1)
    out, report = generate_with_face_check(
        tiny_pipe, "two people", people, seed=5, retries=3, checker=check, **_kwargs()
    )
    assert [a.seed for a in report.attempts] == [5, 6] and check.calls == 2
    assert report.passed and report.seed == 6
    assert "duplicated person-0" in report.summary() and "passed with seed 6" in report.summary()
    expected = tiny_pipe(
        "two people", identities=people, generator=torch.Generator().manual_seed(6), **_kwargs()
    )
    np.testing.assert_array_equal(np.asarray(out.images[0]), np.asarray(expected.images[0]))


def test_guard_stops_after_k_retries_with_the_real_check(tiny_pipe, people):
    checker = FaceChecker.for_identities(people)  # random weights: no faces, so always "missing"
    out, report = generate_with_face_check(
        tiny_pipe, "two people", people, seed=0, retries=2, checker=checker, **_kwargs()
    )
    assert [a.seed for a in report.attempts] == [0, 1, 2]
    assert not report.passed and report.seed == 0  # all equally bad: the first is kept
    assert report.attempts[0].checks[0].missing == ["ffhq-0100", "ffhq-0293"]
    assert report.to_dict()["attempts"][2]["images"][0]["faces"] == 0
    assert len(out.images) == 1


def test_guard_keeps_the_attempt_with_fewest_failing_images():
    outcomes = {0: [False, False], 1: [True, False], 2: [False, False]}

    class Out:
        def __init__(self, seed):
            self.images = [Image.new("RGB", (8, 8), (seed, ok, 0)) for ok in outcomes[seed]]

    def check(image):
        return FaceCheck(faces=1) if image.getpixel((0, 0))[1] else FaceCheck(faces=0, missing=["a"])

    out, report = sample_with_face_check(Out, check, seed=0, retries=2)
    assert [a.failing for a in report.attempts] == [2, 1, 2]
    assert report.seed == 1 and out.images[0].getpixel((0, 0))[0] == 1 and not report.passed


def test_generate_command_check_faces_reports_and_records_what_it_did(tmp_path, capsys):
    out = tmp_path / "out"
    photo = str(sample_photo("ffhq-0100.jpg"))
    args = f"generate --preset tiny --prompt person --id {photo} --out {out} --width 64 --height 64 --steps 2"
    assert (
        main(["-q", *args.split(), "--check-faces", "--retries", "1"]) == 3
    )  # a failed check is not success
    captured = capsys.readouterr()
    printed = captured.out
    assert "face check failed in all 2 attempt(s)" in printed and "seed 1: missing" in printed
    assert "error: face check failed" in captured.err and "run-001" in captured.err
    text = Image.open(out / "run-001" / "image_00.png").text
    record = json.loads(text["face_check"])
    assert [a["seed"] for a in record["attempts"]] == [0, 1] and record["seed"] == 0
    assert json.loads(text["uniportrait"])["seed"] == 0


def test_eval_generate_runs_a_tiny_benchmark_end_to_end(tmp_path, capsys):
    spec = {
        "name": "tiny-grid",
        "identities": {
            "anna": [str(sample_photo("ffhq-0100.jpg"))],
            "bea": {"photos": [str(sample_photo("ffhq-0293.jpg"))]},
        },
        "single": {"prompts": ["a photo of a person"]},
        "multi": {"groups": "pairs", "prompts": ["two people at a cafe"]},
        "seeds": [0],
        "settings": {"steps": STEPS, "width": SIZE, "height": SIZE, "identity_guidance": 3.0},
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    out = tmp_path / "bench"
    assert _eval_generate(tmp_path / "spec.json", out) == 0
    names = sorted(p.name for p in (out / "images").iterdir())
    assert names == ["multi-00002.png", "single-00000.png", "single-00001.png"]
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert rows[2]["identities"][1]["label"] == "bea" and rows[2]["image"] == "images/multi-00002.png"
    result = json.loads((out / "results.json").read_text())
    assert result["context"]["benchmark"] == "tiny-grid"
    summary = result["summary"]
    assert summary["all"]["images"] == 3 and summary["multi-id"]["images"] == 1
    assert summary["all"]["detection_rate"] == 0.0 and summary["all"]["missing_rate"] == 1.0
    assert summary["all"]["face_sim_min"] == {"mean": None, "std": None, "count": 0}
    assert (out / "contact_sheet.png").is_file() and "| all | 3 |" in (out / "results.md").read_text()
    assert "| all | 3 |" in capsys.readouterr().out


def test_bad_benchmark_spec_fails_before_generating(tmp_path, capsys):
    (tmp_path / "spec.yaml").write_text(
        "identities:\n  anna: [missing.jpg]\nsingle:\n  prompts: [a person]\n"
    )
    out = tmp_path / "bench"
    assert _eval_generate(tmp_path / "spec.yaml", out) == 2
    assert f"spec.yaml: identity 'anna': photo {tmp_path}/missing.jpg not found" in capsys.readouterr().err
    assert not out.exists()


def test_bad_benchmark_setting_fails_before_generating(tmp_path, capsys):
    spec = {
        "identities": {"anna": [str(sample_photo("ffhq-0100.jpg"))]},
        "single": {"prompts": ["a person"]},
        "settings": {"identity_guidance": 31},
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    out = tmp_path / "bench"
    assert _eval_generate(tmp_path / "spec.json", out) == 2
    assert "settings: identity_guidance must be between 0.0 and 30.0" in capsys.readouterr().err
    assert not out.exists()
