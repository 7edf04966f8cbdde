"""Pieces shared by the sub-commands: model options, scales, output folders."""

from __future__ import annotations

import argparse
import logging
import os
import secrets
from pathlib import Path

from uniportrait.errors import UniPortraitError

logger = logging.getLogger(__name__)

DEFAULT_PRESET_ENV = "UNIPORTRAIT_PRESET"


def add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--preset",
        choices=("tiny", "sd15"),
        default=os.environ.get(DEFAULT_PRESET_ENV, "sd15"),
        help="tiny: offline random weights (tests/demo); sd15: the published weights "
        f"(default: ${DEFAULT_PRESET_ENV} or sd15)",
    )
    group.add_argument("--device", default=None, help="torch device, e.g. cuda or cpu (default: cpu)")
    group.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16"),
        default=None,
        help="weights dtype (default float32)",
    )
    group.add_argument(
        "--adapter",
        default=None,
        metavar="DIR",
        help="use this adapter (our format, e.g. from `uniportrait train`, or a folder of the published files)",
    )
    group.add_argument(
        "--safety-checker",
        action="store_true",
        help="run diffusers' NSFW safety checker (CompVis/stable-diffusion-safety-checker) on the images; "
        "flagged images come back black (sd15 preset)",
    )
    group.add_argument("--seed-model", type=int, default=0, help=argparse.SUPPRESS)  # tiny preset weights


def load_pipeline_from_args(args: argparse.Namespace):
    import torch

    from uniportrait.presets import load_preset

    kwargs = {}
    adapter = getattr(args, "adapter", None)
    if adapter is not None and not Path(adapter).is_dir():
        raise UniPortraitError(f"--adapter {adapter}: not a folder")
    if getattr(args, "safety_checker", False) and args.preset == "tiny":
        raise UniPortraitError("--safety-checker needs real weights: use it with --preset sd15")
    if args.preset == "tiny":
        kwargs["seed"] = args.seed_model
        kwargs["adapter"] = adapter
    else:
        if getattr(args, "safety_checker", False):
            from uniportrait.presets.pipelines import SAFETY_CHECKER

            kwargs["safety_checker"] = SAFETY_CHECKER
        if adapter is not None:
            kwargs["uniportrait"] = adapter
        kwargs["device"] = args.device
        kwargs["torch_dtype"] = getattr(torch, args.dtype) if args.dtype else None
    pipe = load_preset(args.preset, **kwargs)
    if args.preset == "tiny" and (args.device or args.dtype):
        pipe.to(device=args.device, dtype=getattr(torch, args.dtype) if args.dtype else None)
    pipe.set_progress_bar_config(disable=bool(getattr(args, "quiet", False)), leave=False)
    return pipe


def parse_scale(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UniPortraitError(f"{what} must be a number, got {text!r}") from None
    return value


def parse_mix(spec: str) -> tuple[int, list[str], float]:
    """``[K=]PHOTO[,PHOTO...]:SCALE`` → (identity index K (1-based, default 1), photos, scale)."""
    target = 1
    if "=" in spec.split(":", 1)[0]:
        head, spec = spec.split("=", 1)
        if not head.isdigit() or int(head) < 1:
            raise UniPortraitError(f"--mix target must be an identity number >= 1, got {head!r}")
        target = int(head)
    photos, sep, scale = spec.rpartition(":")
    if not sep or not photos:
        raise UniPortraitError(f"--mix expects PHOTO:SCALE, got {spec!r}")
    value = parse_scale(scale, "--mix scale")
    if not 0.0 <= value <= 1.0:
        raise UniPortraitError(f"--mix scale {value} is outside [0, 1]")
    return target, [p for p in photos.split(",") if p], value


def check_output_folder(folder: str | os.PathLike) -> Path:
    """Create ``folder`` if needed and make sure we can write there, before any work is done."""
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{secrets.token_hex(4)}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UniPortraitError(f"cannot write to output folder {path}: {exc.strerror or exc}") from None
    return path


def check_photos_exist(paths: list[str]) -> None:
    for p in paths:
        if not Path(p).is_file():
            raise UniPortraitError(f"photo {p} not found")
