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


def add_preset_arg(parser, default: str | None = None) -> None:
    """``--preset``: the names and summaries come from :mod:`uniportrait.presets.registry`."""
    from uniportrait.presets.registry import PRESETS

    summaries = "; ".join(f"{p.name}: {p.summary}" for p in PRESETS.values())
    parser.add_argument(
        "--preset",
        choices=tuple(PRESETS),
        default=default or os.environ.get(DEFAULT_PRESET_ENV, "sd15"),
        help=f"{summaries} (default: {default or f'${DEFAULT_PRESET_ENV} or sd15'})",
    )


def add_limit_args(parser: argparse.ArgumentParser, identities: bool = True) -> None:
    """``--max-steps`` etc.: raise the limits of :class:`uniportrait.settings.GenerationLimits`."""
    from dataclasses import fields

    from uniportrait.settings import LIMIT_FLAGS, GenerationLimits

    group = parser.add_argument_group("limits (raise them explicitly to ask for more)")
    for f in fields(GenerationLimits):
        if f.name == "max_identities" and not identities:
            continue
        group.add_argument(
            LIMIT_FLAGS[f.name],
            type=int,
            default=f.default,
            metavar="N",
            help=f"{f.name.removeprefix('max_').replace('_', ' ')} at most (default {f.default})",
        )


def limits_from_args(args: argparse.Namespace):
    """The :class:`~uniportrait.settings.GenerationLimits` named on the command line."""
    from dataclasses import fields

    from uniportrait.settings import GenerationLimits

    given = {f.name: getattr(args, f.name) for f in fields(GenerationLimits) if hasattr(args, f.name)}
    return GenerationLimits(**given)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    add_preset_arg(group)
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
    for flag, what in SD15_PARTS.items():
        group.add_argument(
            f"--{flag}",
            default=None,
            metavar="PATH_OR_ID",
            help=f"sd15: {what} (a local folder/file or a Hub id; default: the published one)"
            + (WORLD_BASE_HELP if flag == "base-model" else ""),
        )
    group.add_argument("--seed-model", type=int, default=0, help=argparse.SUPPRESS)  # tiny preset weights


WORLD_BASE_HELP = (
    "; world: a world base folder, e.g. <output_dir>/base of a run with train.unet_learning_rate"
)

#: --option → what it replaces in the sd15 preset (the argument of build_sd15_pipeline: dashes → _).
SD15_PARTS = {
    "base-model": "the base model (a diffusers folder with unet/, text_encoder/, tokenizer/)",
    "vae": "the VAE folder",
    "image-encoder": "the CLIP image encoder folder",
    "uniportrait": "the UniPortrait files (a folder with the published .bin files, or our adapter folder)",
    "ip-adapter": "the IP-Adapter file (ip-adapter_sd15.bin)",
}


def preset_face_analyzer(preset: str):
    """The face analyzer a preset's photos are read with (``Preset.face_analyzer``)."""
    from uniportrait.faces import get_face_analyzer
    from uniportrait.presets.registry import get_preset

    return get_face_analyzer(get_preset(preset).face_analyzer)


def load_pipeline_from_args(args: argparse.Namespace):
    import torch

    from uniportrait.presets import load_preset

    kwargs = {}
    adapter = getattr(args, "adapter", None)
    if adapter is not None and not Path(adapter).is_dir():
        raise UniPortraitError(f"--adapter {adapter}: not a folder")
    given = [f"--{f}" for f in SD15_PARTS if getattr(args, f.replace("-", "_"), None) is not None]
    if args.preset == "world" and "--base-model" in given:  # a world base an adapter was trained on
        given.remove("--base-model")
        kwargs["base"] = args.base_model
    if given and args.preset != "sd15":
        raise UniPortraitError(
            f"{', '.join(given)} replace parts of the sd15 preset: use them with --preset sd15"
        )
    if given and adapter is not None and "--uniportrait" in given:
        raise UniPortraitError("give the UniPortrait weights once: --adapter or --uniportrait")
    if getattr(args, "safety_checker", False) and args.preset != "sd15":
        raise UniPortraitError("--safety-checker needs real weights: use it with --preset sd15")
    if args.preset == "world":
        kwargs["adapter"] = adapter
        kwargs["device"] = args.device
        kwargs["torch_dtype"] = getattr(torch, args.dtype) if args.dtype else None
    elif args.preset == "tiny":
        kwargs["seed"] = args.seed_model
        kwargs["adapter"] = adapter
        kwargs["device"] = args.device
        kwargs["torch_dtype"] = getattr(torch, args.dtype) if args.dtype else None
    else:
        if getattr(args, "safety_checker", False):
            from uniportrait.presets.pipelines import SAFETY_CHECKER

            kwargs["safety_checker"] = SAFETY_CHECKER
        if adapter is not None:
            kwargs["uniportrait"] = adapter
        for flag in SD15_PARTS:
            value = getattr(args, flag.replace("-", "_"), None)
            if value is not None:
                kwargs[flag.replace("-", "_")] = value
        kwargs["device"] = args.device
        kwargs["torch_dtype"] = getattr(torch, args.dtype) if args.dtype else None
    pipe = load_preset(args.preset, **kwargs)
    pipe.set_progress_bar_config(disable=bool(getattr(args, "quiet", False)), leave=False)
    pipe.generation_limits = limits_from_args(args)
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


def world_base_arg(text: str) -> Path:
    """argparse ``type`` of a world base folder (scripts' ``base`` and ``--base``): the path,
    checked by :func:`~uniportrait.presets.pipelines.world_base_folder`; argparse turns a folder
    that is none into a one-line error and exit 2."""
    from uniportrait.errors import WeightsNotFoundError
    from uniportrait.presets.pipelines import world_base_folder

    try:
        return world_base_folder(text)
    except WeightsNotFoundError:
        raise argparse.ArgumentTypeError(f"{text} is not a base folder (no model_index.json)") from None


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
        if Path(p).is_dir():
            raise UniPortraitError(f"photo {p} is a folder; give the photo files (a,b,c) instead")
        if not Path(p).is_file():
            raise UniPortraitError(f"photo {p} not found")


def new_run_folder(out: Path) -> Path:
    """A new ``run-NNN`` folder in ``out``: one run never writes into another's, even when two
    runs share ``--out`` at the same time (``mkdir`` either creates the folder or fails)."""
    import re

    taken = [int(m.group(1)) for p in out.glob("run-*") if (m := re.fullmatch(r"run-(\d+)", p.name))]
    number = max(taken, default=0) + 1
    while True:
        folder = out / f"run-{number:03d}"
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            number += 1


def remove_empty_folders(*folders: Path | None) -> None:
    """Remove each folder that exists and is empty (what a failed run created)."""
    for folder in folders:
        if folder is not None and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
