"""``uniportrait demo``: identity-conditioned generations with their routing maps and a contact sheet.

``--preset world`` (what ``make demo`` runs): the identity world's trained models on held-out
world people (``uniportrait.world.demo``), scored by the world's oracles. Other presets: one
single-ID and one two-ID generation on the bundled sample faces (``tiny``: random weights, so
noise; ``sd15``: the published weights)."""

from __future__ import annotations

import argparse
import logging
import time

from uniportrait.cli._common import add_preset_arg, check_output_folder

logger = logging.getLogger(__name__)

SINGLE = ("ffhq-0100.jpg",)
PAIR = ("ffhq-0100.jpg", "ffhq-0293.jpg")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="offline demo on the bundled sample faces (single-ID, two-ID, routing overlay, contact sheet)",
    )
    parser.add_argument("--out", default="outputs/demo", help="output folder (default outputs/demo)")
    add_preset_arg(parser, default="world")
    parser.add_argument(
        "--steps", type=int, default=None, help="default: the preset's (25 world and sd15, 10 tiny)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--device", default=None, help="torch device, e.g. cuda or cpu (default: cpu)")
    parser.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"),
                        help="weights dtype (default float32)")  # fmt: skip
    parser.add_argument("--adapter", default=None, metavar="DIR",
                        help="use this adapter instead of the preset's (e.g. from `uniportrait train`)")  # fmt: skip
    parser.set_defaults(func=run, seed_model=0)


def run(args: argparse.Namespace) -> int:
    from PIL import Image

    from uniportrait.cli._common import load_pipeline_from_args
    from uniportrait.cli.generate import GenerationRequest, generate_and_write
    from uniportrait.faces import get_face_analyzer, sample_photo
    from uniportrait.faces.image_io import save_png_atomic
    from uniportrait.photos import identity_from_photos
    from uniportrait.visualize import contact_sheet

    started = time.perf_counter()
    from uniportrait.presets.registry import get_preset

    preset = get_preset(args.preset)
    tiny = preset.name == "tiny"
    steps = preset.defaults.steps if args.steps is None else args.steps
    size = preset.defaults.side
    pipe = load_pipeline_from_args(args)  # a bad --adapter or missing weights: before any folder is made
    out = check_output_folder(args.out)
    if preset.name == "world":
        from uniportrait.world.demo import run_world_demo

        pipe.set_progress_bar_config(disable=True)
        written = run_world_demo(pipe, out, seed=args.seed, steps=steps)
        _report(args.preset, steps, f"{size}x{size} portraits, 128x64 groups", started, written)
        print("the faces' numbers are the world oracle's Face Sim to another picture of that person "
              "(same person ~0.93, strangers ~0.03; docs/world.md)")  # fmt: skip
        return 0
    analyzer = get_face_analyzer()
    people = {name: identity_from_photos(pipe, [sample_photo(name)], analyzer, name=name) for name in PAIR}

    jobs = [
        ("single", "a portrait photo of a person in a garden, natural light", [people[SINGLE[0]]]),
        ("pair", "two people smiling at a cafe, photo", [people[n] for n in PAIR]),
    ]
    rows, labels, written = [], [], []
    for label, prompt, identities in jobs:
        request = GenerationRequest(prompt, [], steps=steps, seed=args.seed, width=size, height=size)
        files = generate_and_write(pipe, request, identities, out / label, save_routing=True)
        written += files
        images = [Image.open(p).convert("RGB") for p in files]
        rows.append(images)
        labels.append(f"{label}: {prompt}")
    sheet = save_png_atomic(contact_sheet(rows, labels), out / "contact_sheet.png")
    written.append(sheet)
    _report(args.preset, steps, f"{size}x{size}", started, written)
    if tiny:
        print("note: the tiny preset has random weights, so the pictures are noise; use --preset sd15 "
              "with the published weights for real portraits.")  # fmt: skip
    return 0


def _report(preset: str, steps: int, sizes: str, started: float, written: list) -> None:
    elapsed = time.perf_counter() - started
    print(f"demo ({preset} preset, {steps} steps, {sizes}) finished in {elapsed:.1f} s; wrote:")
    for path in written:
        print(f"  {path}")
