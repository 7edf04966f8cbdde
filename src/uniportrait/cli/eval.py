"""``uniportrait eval``: Face Sim, CLIP-T and multi-ID failure rates over generated images."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from uniportrait.cli._common import add_model_args
from uniportrait.evaluation.backends import BACKENDS

logger = logging.getLogger(__name__)

DESCRIPTION = """\
Evaluate generated images the way the UniPortrait paper does (Face Sim, CLIP-T), plus the
multi-ID failure rates (missing, duplicated, blended identities) and the face detection rate.

  uniportrait eval --manifest images.jsonl --out eval/           # images you already have
  uniportrait eval --generate bench.yaml --out bench/ --preset sd15   # generate a grid, then evaluate

Writes DIR/results.json, DIR/results.md and DIR/contact_sheet.png (with --generate also
DIR/images/ and DIR/manifest.jsonl). A grid is split over processes with --shard I/N (each
process generates its part; then the same command without --shard evaluates, generating only
what is missing) or under `accelerate launch` (the processes split the grid, the main one
evaluates). Images already made for the same job and model are kept, so a grid also resumes. The manifest is checked completely before anything is
evaluated; a bad row is an error naming its line, and nothing is written.
Numbers from different --backend values are not comparable. With --backend world (pictures of
the identity world, e.g. a `uniportrait world bench` grid) the oracles also read prompt following
from the prompt's words and find blends by facial traits. See docs/evaluation.md.
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate generated images (Face Sim, CLIP-T, multi-ID failures)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--manifest", metavar="FILE", help="JSONL or CSV: image, prompt, identities per row")
    source.add_argument(
        "--generate", metavar="SPEC", help="YAML/JSON benchmark spec: generate the grid, then evaluate"
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--backend", choices=BACKENDS, default="dlib",
                        help="face-similarity backend (default: dlib, offline; world: the identity world's "
                        "oracles, for world pictures, with prompt following and blending by traits)")  # fmt: skip
    parser.add_argument("--backbone", metavar="PATH|HUB_ID", default=None,
                        help="curricular backend: the CurricularFace IR-101 file or its folder / Hub repo "
                        "(default: the published UniPortrait repo)")  # fmt: skip
    parser.add_argument("--insightface-model", default="antelopev2", choices=("antelopev2", "buffalo_l"),
                        help="insightface model pack for --backend insightface (default antelopev2)")  # fmt: skip
    parser.add_argument("--clip", metavar="MODEL", default=None,
                        help="CLIP model for CLIP-T: a local folder or Hub id (the paper: openai/clip-vit-large-patch14)")  # fmt: skip
    parser.add_argument("--assignment", choices=("hungarian", "greedy"), default="hungarian",
                        help="face-to-identity matching (default: hungarian, the optimal one-to-one match)")  # fmt: skip
    parser.add_argument("--threshold", type=float, default=None, help="same-person similarity (duplicates)")
    parser.add_argument(
        "--blend-threshold", type=float, default=None, help="weak-match similarity (blending)"
    )
    parser.add_argument("--blend-margin", type=float, default=None, help="ambiguity margin (blending)")
    parser.add_argument(
        "--related", type=float, default=None, help="least similarity of a resemblance (blending)"
    )
    parser.add_argument(
        "--sheet-rows", type=int, default=50, help="images shown on the contact sheet (default 50)"
    )
    parser.add_argument("--home", default=None, help="identity bank location (default: $UNIPORTRAIT_HOME)")
    parser.add_argument(
        "--shard",
        metavar="I/N",
        default=None,
        help="with --generate: generate only part I of N of the grid (jobs I, I+N, ...), do not evaluate",
    )
    add_model_args(parser)
    parser.set_defaults(func=run)


def _backend(args: argparse.Namespace):
    from uniportrait.evaluation import DEFAULT_THRESHOLDS, get_backend
    from uniportrait.evaluation.matching import Thresholds

    base = DEFAULT_THRESHOLDS[args.backend]
    thresholds = Thresholds(
        match=base.match if args.threshold is None else args.threshold,
        blend=base.blend if args.blend_threshold is None else args.blend_threshold,
        margin=base.margin if args.blend_margin is None else args.blend_margin,
        related=base.related if args.related is None else args.related,
    )
    kwargs = {}
    if args.backend == "curricular":
        kwargs["backbone"] = args.backbone
        if args.device:
            kwargs["device"] = args.device
    elif args.backend == "insightface":
        kwargs["model"] = args.insightface_model
    backend = get_backend(args.backend, thresholds=thresholds, **kwargs)
    given = [o for o, v in (("--blend-threshold", args.blend_threshold), ("--blend-margin", args.blend_margin),
                            ("--related", args.related)) if v is not None]  # fmt: skip
    if given and not backend.info.blends_by_similarity:
        from uniportrait.errors import UniPortraitError

        raise UniPortraitError(
            f"{', '.join(given)}: the {backend.name} backend finds blends by {backend.info.blending}, "
            "not by similarity thresholds; leave them out"
        )
    return backend


def _shard(args: argparse.Namespace):
    """``(i, n)`` from --shard or from the launcher (accelerate launch/torchrun), and the
    accelerate state when launched; ``(None, None)`` for one plain process."""
    import os

    from uniportrait.errors import UniPortraitError

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if args.shard is not None:
            raise UniPortraitError("--shard and a multi-process launch both split the grid: use one")
        import torch

        try:
            from accelerate import PartialState
        except ImportError:
            raise UniPortraitError(
                "a multi-process launch splits the grid with accelerate: pip install 'uniportrait[train]'"
            ) from None

        state = PartialState(cpu=not torch.cuda.is_available())
        return (state.process_index, state.num_processes), state
    if args.shard is None:
        return None, None
    from uniportrait.training.shards import parse_shard

    return parse_shard(args.shard), None


def run(args: argparse.Namespace) -> int:
    from uniportrait.bank import IdentityBank
    from uniportrait.cli._common import check_output_folder
    from uniportrait.errors import UniPortraitError
    from uniportrait.evaluation import (
        evaluate_rows,
        load_clip_scorer,
        read_manifest,
        read_spec,
        run_grid,
        to_markdown,
        write_report,
    )

    if args.sheet_rows < 0:
        raise UniPortraitError("--sheet-rows must be 0 or more")
    if args.shard is not None and not args.generate:
        raise UniPortraitError("--shard splits a --generate grid; it does nothing with --manifest")
    bank = IdentityBank(args.home)
    quiet = bool(getattr(args, "quiet", False))
    # 1. Check the inputs completely before anything is loaded or written.
    spec = read_spec(args.generate, bank) if args.generate else None
    rows = read_manifest(args.manifest, bank) if args.manifest else None
    backend = _backend(args)
    clip, clip_status = load_clip_scorer(args.clip)
    shard, state = _shard(args)
    out = check_output_folder(args.out)

    # 2. With --generate: the grid of images and its manifest.
    context = {}
    if spec is not None:
        from uniportrait.cli._common import load_pipeline_from_args

        if state is not None and args.device is None:
            args.device = str(state.device)
        pipe = load_pipeline_from_args(args)
        from uniportrait.presets.registry import preset_defaults

        default_size = preset_defaults(args.preset).side
        model = {k: getattr(args, k, None) for k in ("preset", "adapter", "dtype", "seed_model")}
        from uniportrait.cli._common import preset_face_analyzer

        analyzer = preset_face_analyzer(args.preset)  # what reads the identities' photos
        if shard is not None:
            mine = run_grid(
                pipe, spec, out, bank, default_size=default_size, progress=not quiet, shard=shard,
                model=model, analyzer=analyzer,
            )  # fmt: skip
            if state is None:
                print(f"part {shard[0]}/{shard[1]}: {len(mine)} image(s) in {out / 'images'}")
                print("evaluate when every part is done: the same command without --shard")
                return 0
            state.wait_for_everyone()
            if not state.is_main_process:
                return 0
        rows = run_grid(
            pipe,
            spec,
            out,
            bank,
            default_size=default_size,
            progress=not quiet,
            model=model,
            analyzer=analyzer,
        )
        context = {
            "benchmark": spec.name,
            "spec": str(args.generate),
            "preset": args.preset,
            "settings": spec.settings,
        }
        logger.info("generated %d image(s) into %s", len(rows), out / "images")
        del pipe

    # 3. Evaluate and write.
    manifest = str(args.manifest) if args.manifest else str(Path(out) / "manifest.jsonl")
    report = evaluate_rows(
        rows, backend, bank, clip, clip_status, args.assignment, manifest=manifest, progress=not quiet
    )
    report.context = context
    written = write_report(report, out, sheet_rows=args.sheet_rows)
    print(to_markdown(report, per_image=False).rstrip())
    print()
    for path in written:
        print(path)
    return 0
