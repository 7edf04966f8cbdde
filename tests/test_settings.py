"""One definition of each generation setting (range, default, limits) and of each preset's
defaults, used alike by the command line, the server and the pipeline."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from uniportrait.cli import main
from uniportrait.presets.registry import PRESETS, preset_defaults
from uniportrait.settings import FACEID_SCALE, GUIDANCE_SCALE, SETTINGS, GenerationLimits, SettingError

SRC = Path(__file__).resolve().parents[1] / "src" / "uniportrait"

# What a typo or a hostile caller may ask for; every entry point must refuse each of these.
BAD = [
    ("width", 100_000, "max_side"),
    ("num_images_per_prompt", 1000, "max_images"),
    ("num_inference_steps", 100_000, "max_steps"),
    ("faceid_scale", -5.0, "between 0.0 and 2.0"),
    ("guidance_scale", float("nan"), "finite"),
    ("width", 0, "between 64"),
    ("num_inference_steps", 0, "between 1"),
    ("width", 100, "multiple of 8"),
]


@pytest.mark.parametrize("name, value, words", BAD)
def test_every_setting_refuses_out_of_range(name, value, words):
    with pytest.raises(SettingError, match=words):
        SETTINGS[name].check(value, GenerationLimits())


def test_limits_are_raised_explicitly():
    with pytest.raises(SettingError, match="raise it with --max-side"):
        SETTINGS["width"].check(2048, GenerationLimits(), style="cli")
    assert SETTINGS["width"].check(2048, GenerationLimits(max_side=2048)) == 2048
    with pytest.raises(SettingError, match="positive integer"):
        GenerationLimits(max_steps=0)


@pytest.mark.parametrize(
    "flag, value, words",
    [
        ("--width", "100000", "--width must be between 64 and 1024, got 100000 (limit max_side; raise it with --max-side)"),
        ("--num-images", "1000", "--num-images must be between 1 and 4"),
        ("--faceid-scale", "-5", "--faceid-scale must be between 0.0 and 2.0"),
        ("--guidance-scale", "nan", "--guidance-scale must be a finite number"),
        ("--steps", "100000", "--steps must be between 1 and 50"),
        ("--negative-prompt", "x" * 1001, "--negative-prompt is 1001 characters"),
    ],
)  # fmt: skip
def test_cli_refuses_before_loading(tmp_path, capsys, monkeypatch, flag, value, words):
    import uniportrait.cli.generate as generate

    def no_model(_args):
        raise AssertionError("the model must not load for a bad setting")

    monkeypatch.setattr(generate, "load_pipeline_from_args", no_model)
    out = tmp_path / "out"
    code = main(["generate", "--prompt", "p", "--out", str(out), "--preset", "tiny", flag, value])
    err = capsys.readouterr().err
    assert code == 2 and words in err and err.count("\n") == 1, err
    assert not out.exists()


def test_cli_limit_flag_raises_the_limit(tmp_path):
    from uniportrait.cli import build_parser
    from uniportrait.cli._common import limits_from_args
    from uniportrait.cli.generate import request_from_args

    args = build_parser().parse_args(
        ["generate", "--prompt", "p", "--out", str(tmp_path), "--preset", "tiny", "--width", "2048",
         "--max-side", "2048", "--steps", "80", "--max-steps", "80"]
    )  # fmt: skip
    request_from_args(args).validate(limits_from_args(args))  # no error


@pytest.mark.parametrize("name, value, words", BAD)
def test_pipeline_refuses_before_work(tiny_pipe, name, value, words):
    kwargs = {"num_inference_steps": 1, "width": 64, "height": 64, name: value}
    with pytest.raises(SettingError, match=words):
        tiny_pipe("a photo", output_type="latent", **kwargs)


class _Started(Exception):
    """Raised by the step callback: the call passed its checks and started denoising."""


def _stop(*_args):
    raise _Started


def test_pipeline_limits_can_be_raised(tiny_pipe, monkeypatch):
    with pytest.raises(SettingError, match="max_steps"):
        tiny_pipe("a", num_inference_steps=55, width=64, height=64, output_type="latent")
    monkeypatch.setattr(tiny_pipe, "generation_limits", GenerationLimits(max_steps=60))
    with pytest.raises(_Started):
        tiny_pipe(
            "a", num_inference_steps=55, width=64, height=64, output_type="latent", callback_on_step_end=_stop
        )
    monkeypatch.setattr(tiny_pipe, "generation_limits", GenerationLimits(max_steps=5000))
    with pytest.raises(SettingError, match="training steps"):  # beyond the scheduler: never valid
        tiny_pipe("a", num_inference_steps=1001, output_type="latent")


def test_preset_defaults_reach_every_entry_point(tiny_pipe):
    from uniportrait.cli import build_parser
    from uniportrait.cli.generate import request_from_args
    from uniportrait.server.config import ServerConfig

    tiny = preset_defaults("tiny")
    assert tiny_pipe.generation_defaults == tiny
    args = build_parser().parse_args(["generate", "--prompt", "p", "--out", "x", "--preset", "tiny"])
    request = request_from_args(args)
    assert (request.width, request.height, request.steps) == (tiny.side, tiny.side, tiny.steps)
    config = ServerConfig(preset="tiny")
    assert (config.default_side, config.default_steps) == (tiny.side, tiny.steps)
    sd15 = ServerConfig(preset="sd15")
    assert (sd15.default_side, sd15.default_steps) == (512, 25)
    assert set(build_parser()._subparsers._group_actions[0].choices["generate"]._option_string_actions[
        "--preset"].choices) == set(PRESETS)  # fmt: skip


def test_from_preset_tiny_takes_device_and_dtype():
    from uniportrait import UniPortraitPipeline

    pipe = UniPortraitPipeline.from_preset("tiny", device="cpu", torch_dtype=torch.float32)
    assert pipe.device.type == "cpu" and pipe.unet.dtype == torch.float32
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a photo", num_inference_steps=1, output_type="np")  # the preset's 256 px
    assert out.images.shape == (1, 256, 256, 3)


def test_no_second_definition_of_a_default():
    """The defaults 0.7 (faceid_scale) and 7.5 (guidance_scale) are written once, in settings.py."""
    assert FACEID_SCALE.default == 0.7 and GUIDANCE_SCALE.default == 7.5
    pattern = re.compile(r"(faceid_scale|guidance_scale)\b[^\n]*?[=:(,]\s*(0\.7|7\.5)\b")
    offenders = [
        f"{path.relative_to(SRC)}:{n}"
        for path in SRC.rglob("*.py")
        if path.name != "settings.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not offenders, offenders


def test_every_option_has_help_text():
    import argparse

    from uniportrait.cli import build_parser

    missing = []

    def walk(parser, prefix):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{prefix} {name}")
            elif action.option_strings and not action.help:
                missing.append(f"{prefix} {action.option_strings[0]}")

    walk(build_parser(), "uniportrait")
    assert not missing, missing
