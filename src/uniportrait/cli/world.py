"""``uniportrait world``: the identity world (``docs/world.md``): build it, render datasets, report."""

from __future__ import annotations

import argparse
import dataclasses


def register(subparsers) -> None:
    from uniportrait.world.build import (  # standard library only
        STAGES,
        UNET_FACE_WEIGHT_RANGE,
        UNET_LR,
        UNET_LR_RANGE,
        UNET_SNR_GAMMA_RANGE,
        BuildPlan,
    )

    parser = subparsers.add_parser(
        "world",
        help="the identity world: build its models, render datasets, measure",
        description="A procedurally drawn world of people where UniPortrait is trained and measured on a CPU. "
        "See docs/world.md.",
    )
    sub = parser.add_subparsers(dest="world_command", metavar="ACTION", required=True)

    build = sub.add_parser("build", help="render the data and train every world model (resumable)")
    build.add_argument(
        "--work", default="runs/world", help="working folder: data, checkpoints, logs (default runs/world)"
    )
    build.add_argument(
        "--out", default=None, help="where to export the weights (default: the shipped assets folder)"
    )
    build.add_argument(
        "--stages",
        default=None,
        help=f"comma-separated subset of {','.join(STAGES)}",
    )
    build.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="scale every set size and step count (e.g. 0.01 for a smoke run)",
    )
    build.add_argument(
        "--unet-steps",
        type=int,
        default=None,
        help="train the UNet this long instead of the plan's steps (the shipped UNet trained longer "
        "than fits in the build's time; see docs/world.md)",
    )
    build.add_argument(
        "--unet-offset-noise",
        type=float,
        default=0.0,
        help="train the UNet with offset noise of this size (0 to 1; default 0, off; docs/world.md)",
    )
    build.add_argument(
        "--unet-face-weight",
        type=float,
        default=BuildPlan.unet_face_weight,
        help="weight the UNet's denoising loss inside head masks 1 + this many times "
        f"({UNET_FACE_WEIGHT_RANGE[0]:g} to {UNET_FACE_WEIGHT_RANGE[1]:g}; default "
        f"{BuildPlan.unet_face_weight:g}, off; docs/world.md)",
    )
    build.add_argument(
        "--unet-snr-gamma",
        type=float,
        default=BuildPlan.unet_snr_gamma,
        help="weight the UNet's denoising loss per picture min-SNR-γ with this γ "
        f"({UNET_SNR_GAMMA_RANGE[0]:g} to {UNET_SNR_GAMMA_RANGE[1]:g}; default "
        f"{BuildPlan.unet_snr_gamma:g}, off; docs/world.md)",
    )
    build.add_argument(
        "--unet-init",
        default="",
        metavar="FOLDER",
        help="continue the UNet from this trained UNet folder of the same layout (e.g. BASE/unet), "
        "with a fresh optimizer and schedule (default: from scratch)",
    )
    build.add_argument(
        "--unet-lr",
        type=float,
        default=UNET_LR,
        help=f"the UNet's peak learning rate ({UNET_LR_RANGE[0]:g} to {UNET_LR_RANGE[1]:g}; default {UNET_LR:g})",
    )
    build.add_argument(
        "--unet-seed",
        type=int,
        default=BuildPlan.unet_seed,
        help=f"the UNet's training seed (default {BuildPlan.unet_seed})",
    )
    build.add_argument(
        "--unet-bf16",
        action="store_true",
        help="train the UNet under CPU bf16 autocast (weights, optimizer and EMA stay fp32; faster on "
        "CPUs with bf16 instructions; docs/world.md)",
    )
    build.add_argument(
        "--layout",
        default="4x",
        help="the base's sizes: 4x (the shipped: 16x16x4 latents for 64 px) or 2x (32x32x4 latents, "
        "a UNet with a first level without attention; docs/world.md)",
    )
    build.add_argument(
        "--framing",
        default="wide",
        help="how large faces are drawn: wide (the shipped world's) or close (each face about 1.6 "
        "times as large; docs/world.md)",
    )
    build.set_defaults(func=_build)

    render = sub.add_parser("render", help="write world pictures as a prepare-data dataset folder")
    render.add_argument("--out", required=True, metavar="DATA", help="dataset folder to write (or complete)")
    render.add_argument("--count", type=int, default=1000, help="number of pictures (default 1000)")
    render.add_argument("--people", default="1", help="people per picture, cycled, e.g. 1 or 2,3 (default 1)")
    render.add_argument("--identities", type=int, default=4000, help="identities to draw from (default 4000)")
    render.add_argument("--held-out", action="store_true", help="use held-out identities (never trained on)")
    render.add_argument(
        "--renders-per-identity", type=int, default=6, help="single-person pictures per identity (default 6)"
    )
    render.add_argument("--seed", type=int, default=0, help="seed (different seeds give different pictures)")
    render.add_argument(
        "--framing", default="wide", help="how large faces are drawn: wide (default) or close (docs/world.md)"
    )
    render.set_defaults(func=_render)

    bench = sub.add_parser(
        "bench",
        help="write benchmark specs of held-out world people for `uniportrait eval --generate`",
        description="Render a reference photo of each of a few held-out world people and write "
        "single.json (portraits), multi.json (pairs, 128x64) and, from six people, multi3.json "
        "(triples) with world captions, for `uniportrait eval --generate SPEC --preset world "
        "--backend world` (Face Sim, blending by trait attribution, prompt following; docs/world.md).",
    )
    bench.add_argument("--out", required=True, metavar="DIR", help="new folder for the photos and specs")
    bench.add_argument("--people", type=int, default=8, help="held-out people (default 8)")
    bench.add_argument("--prompts", type=int, default=10, help="one-person captions (default 10)")
    bench.add_argument("--group-prompts", type=int, default=4, help="captions per group size (default 4)")
    bench.add_argument("--seeds", type=int, default=2, help="seeds per picture (default 2)")
    bench.add_argument("--seed", type=int, default=0, help="draws the people and captions (default 0)")
    bench.set_defaults(func=_bench)

    report = sub.add_parser("report", help="measure the oracles, the VAE and the base model on held-out data")
    report.add_argument("--work", default="runs/world", help="the build's working folder (held-out data)")
    report.add_argument(
        "--assets", default=None, help="the exported world weights (default: the shipped ones)"
    )
    report.add_argument(
        "--out", default="outputs/world-report", help="report folder (default outputs/world-report)"
    )
    report.add_argument("--quick", action="store_true", help="fewer pictures and one seed")
    report.add_argument(
        "--sections",
        default="oracles,vae,backbone,base",
        help="comma-separated parts to measure: oracles, vae, backbone, base (default all)",
    )
    report.add_argument(
        "--base",
        default=None,
        help="base model folder to measure (its VAE and generations; default: the exported one), "
        "e.g. <output_dir>/base of a training run with train.unet_learning_rate",
    )
    _add_guidance(report, " of the base-model measurements")
    report.set_defaults(func=_report)

    export = sub.add_parser(
        "export-adapter", help="ship a trained adapter as the world preset's (float16, assets/world/adapter)"
    )
    export.add_argument(
        "src", help="adapter folder or training checkpoint (uniportrait train --config configs/world/...)"
    )
    export.add_argument("--out", default=None, help="destination folder (default: the shipped world adapter)")
    export.set_defaults(func=_export_adapter)

    ident = sub.add_parser(
        "identity-report",
        help="measure a world UniPortrait adapter: single-ID, fidelity/editability, multi-ID tables",
    )
    ident.add_argument("--adapter", default=None, help="adapter folder (default: the shipped world adapter)")
    ident.add_argument(
        "--base",
        default=None,
        help="base model folder the adapter was trained on (default: the shipped world base)",
    )
    ident.add_argument(
        "--out", default="outputs/world-identity", help="report folder (default outputs/world-identity)"
    )
    ident.add_argument(
        "--sections",
        default="single,curve,multi,controls",
        help="comma-separated parts to measure: single, curve, multi, router (the router's multi-ID rows "
        "only), controls (default single,curve,multi,controls)",
    )
    ident.add_argument("--singles", type=int, default=100, help="held-out portrait captions (default 100)")
    ident.add_argument("--groups", type=int, default=40, help="held-out group captions per size (default 40)")
    ident.add_argument("--seeds", type=int, default=3, help="seeds per caption (default 3)")
    ident.add_argument(
        "--framing",
        default="wide",
        help="faces of the held-out pictures: wide (default) or close (docs/world.md)",
    )
    ident.add_argument("--oracles", default=None, help="oracles folder (default: the shipped world oracles)")
    _add_guidance(ident)
    ident.set_defaults(func=_identity_report)


def _add_guidance(parser: argparse.ArgumentParser, what: str = "") -> None:
    """The CFG scale option, with the setting's own name and default (checked when the command runs)."""
    from uniportrait.settings import GUIDANCE_SCALE

    parser.add_argument(
        GUIDANCE_SCALE.option,
        type=float,
        default=GUIDANCE_SCALE.default,
        help=f"{GUIDANCE_SCALE.help}{what} (default {GUIDANCE_SCALE.default})",
    )


def _build(args: argparse.Namespace) -> int:
    from uniportrait.errors import UniPortraitError
    from uniportrait.world.build import STAGES, WORLD_ASSETS, BuildPlan, run_build

    stages = args.stages.split(",") if args.stages else None
    known = set(STAGES)
    if stages and not set(stages) <= known:
        raise UniPortraitError(
            f"unknown stage(s) {', '.join(sorted(set(stages) - known))}; known: {', '.join(sorted(known))}"
        )
    if not 0 < args.scale <= 1:
        raise UniPortraitError("--scale must be in (0, 1]")
    plan = dataclasses.replace(BuildPlan().scaled(args.scale), layout=args.layout, framing=args.framing)
    if args.unet_steps is not None:
        if args.unet_steps < 1:
            raise UniPortraitError("--unet-steps must be at least 1")
        plan = dataclasses.replace(plan, unet_steps=args.unet_steps)
    plan = dataclasses.replace(  # all checked by run_build
        plan,
        unet_lr=args.unet_lr,
        unet_offset_noise=args.unet_offset_noise,
        unet_init=args.unet_init,
        unet_face_weight=args.unet_face_weight,
        unet_seed=args.unet_seed,
        unet_bf16=args.unet_bf16,
        unet_snr_gamma=args.unet_snr_gamma,
    )
    out = run_build(args.work, args.out or WORLD_ASSETS, plan, stages)
    print(out)
    return 0


def _check_framing(framing: str) -> None:
    from uniportrait.errors import UniPortraitError
    from uniportrait.world.scenes import FRAMINGS

    if framing not in FRAMINGS:
        raise UniPortraitError(f"--framing must be one of {', '.join(FRAMINGS)}, got {framing!r}")


def _render(args: argparse.Namespace) -> int:
    from uniportrait.errors import UniPortraitError
    from uniportrait.world.dataset import RenderOptions, write_dataset

    try:
        people = tuple(int(p) for p in args.people.split(","))
    except ValueError:
        raise UniPortraitError(
            f"--people must be numbers from 1 to 4, e.g. 1 or 2,3; got {args.people!r}"
        ) from None
    if not people or any(p not in (1, 2, 3, 4) for p in people):
        raise UniPortraitError(f"--people must be numbers from 1 to 4, got {args.people!r}")
    if args.seed < 0:
        raise UniPortraitError(f"--seed must be 0 or more, got {args.seed}")
    _check_framing(args.framing)
    if args.count < 1 or args.identities < max(people) or args.renders_per_identity < 1:
        raise UniPortraitError(
            "--count and --renders-per-identity must be positive and --identities at least --people"
        )
    from uniportrait.cli._common import check_output_folder

    sizes = {(64, 64) if p == 1 else (128, 64) for p in people}
    if len(sizes) > 1:
        raise UniPortraitError(
            "--people mixes 1 (64x64 pictures) with groups (128x64): render them separately"
        )
    options = RenderOptions(
        count=args.count, people=people, identities=args.identities, held_out=args.held_out,
        renders_per_identity=args.renders_per_identity, seed=args.seed, framing=args.framing,
    )  # fmt: skip
    check_output_folder(args.out)
    rows = write_dataset(args.out, options, progress=not args.quiet)
    print(f"{args.out}: {rows} pictures")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from uniportrait.cli._common import check_output_folder
    from uniportrait.world.bench import write_bench

    check_output_folder(Path(args.out).parent)  # a folder inside a file is refused in one line
    specs = write_bench(args.out, args.people, args.prompts, args.group_prompts, args.seeds, args.seed)
    for spec in specs:
        print(spec)
    return 0


def _report(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from uniportrait.cli._common import check_output_folder
    from uniportrait.errors import UniPortraitError
    from uniportrait.presets.pipelines import world_base_folder
    from uniportrait.world.build import WORLD_ASSETS
    from uniportrait.world.report import REPORT_INPUTS, REPORT_SECTIONS, run_report

    sections = _sections(args.sections, REPORT_SECTIONS)
    missing = [
        str(Path(args.work) / "data" / name)
        for name in REPORT_INPUTS
        if not (Path(args.work) / "data" / name).is_file()
    ]
    if missing and set(sections) & {"oracles", "vae", "backbone"}:  # the base model's captions are drawn
        raise UniPortraitError(
            f"world report needs the build's held-out data; missing: {', '.join(missing)} (run `uniportrait world build --work {args.work} --stages render,crops`)"
        )
    assets = Path(args.assets or WORLD_ASSETS)
    if not (assets / "base" / "model_index.json").is_file():
        raise UniPortraitError(
            f"world report: {assets} holds no world weights (base/model_index.json is missing)"
        )
    base = world_base_folder(args.base) if args.base is not None else None
    from uniportrait.settings import GUIDANCE_SCALE

    guidance = GUIDANCE_SCALE.check(args.guidance_scale, style="cli")
    check_output_folder(args.out)
    report = run_report(
        Path(args.work),
        assets,
        Path(args.out),
        quick=args.quick,
        guidance=guidance,
        sections=sections,
        base=base,
    )
    print(json.dumps(report, indent=2))
    return 0


IDENTITY_SECTIONS = ("single", "curve", "multi", "router", "controls")


def _sections(text: str, known: tuple[str, ...]) -> tuple[str, ...]:
    """``--sections a,b`` → ("a", "b"), refusing an unknown or empty list with one line."""
    from uniportrait.errors import UniPortraitError

    sections = tuple(s for s in text.split(",") if s)
    unknown = sorted(set(sections) - set(known))
    if unknown or not sections:
        raise UniPortraitError(
            f"--sections: unknown part(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(known)}"
        )
    return sections


def _identity_report(args: argparse.Namespace) -> int:

    from uniportrait.cli._common import check_output_folder
    from uniportrait.errors import UniPortraitError
    from uniportrait.presets.pipelines import build_world_pipeline, world_base_folder
    from uniportrait.settings import GUIDANCE_SCALE
    from uniportrait.world.identity_report import run_identity_report
    from uniportrait.world.oracles import WorldOracles

    sections = _sections(args.sections, IDENTITY_SECTIONS)
    if args.singles < 2 or args.groups < 2 or args.seeds < 1:
        raise UniPortraitError("--singles and --groups must be at least 2 and --seeds at least 1")
    guidance = GUIDANCE_SCALE.check(args.guidance_scale, style="cli")
    _check_framing(args.framing)
    base = world_base_folder(args.base)
    oracles = WorldOracles(args.oracles)
    check_output_folder(args.out)
    pipe = build_world_pipeline(args.adapter, base=base)
    pipe.set_progress_bar_config(disable=True)
    report = run_identity_report(
        pipe, oracles, args.out, singles=args.singles, groups=args.groups,
        seeds=tuple(range(args.seeds)), guidance=guidance, sections=sections, framing=args.framing,
    )  # fmt: skip
    from uniportrait.world.identity_report import markdown_tables

    print(markdown_tables(report))
    print(f"{args.out}/identity_report.json, identity_report.md and contact sheets written")
    return 0


def _export_adapter(args: argparse.Namespace) -> int:
    from uniportrait.world.build import export_adapter

    print(export_adapter(args.src, args.out))
    return 0
