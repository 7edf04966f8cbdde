"""``uniportrait prepare-data``: detect, align and store the faces of a photo folder for training."""

from __future__ import annotations

import argparse
import os


def register(subparsers) -> None:
    from uniportrait.training.prepare import PrepareOptions

    d = PrepareOptions()
    parser = subparsers.add_parser(
        "prepare-data",
        help="turn a folder of captioned photos into a training dataset",
        description="Detect and align every face of the images of SRC and write a dataset folder "
        "(index.jsonl + images/ + faces/). SRC: a folder of images (captions from SRC/metadata.jsonl|csv "
        "or <image>.txt sidecars), a manifest .jsonl/.csv, or WebDataset .tar shards (a file or a folder "
        "of them, as img2dataset writes them). Re-running resumes. With --shard I/N, N workers or nodes "
        "each prepare one disjoint part; `uniportrait data merge DATA` joins them. "
        "See docs/training.md and docs/scale.md.",
    )
    parser.add_argument("src", metavar="SRC", help="folder of images, manifest file, or .tar shard(s)")
    parser.add_argument("--out", required=True, metavar="DATA", help="dataset folder to write (or resume)")
    parser.add_argument(
        "--workers", type=int, default=min(4, os.cpu_count() or 1), help="worker processes (default: up to 4)"
    )
    parser.add_argument("--manifest", default=None, help="JSONL/CSV with file, caption, identity/identities")
    parser.add_argument(
        "--identity-from-folder",
        action="store_true",
        help="label the largest face of SRC/<name>/... images with <name>",
    )
    parser.add_argument("--analyzer", default=d.analyzer, help=f"face analyzer (default {d.analyzer})")
    parser.add_argument(
        "--max-side",
        type=int,
        default=d.max_side,
        help=f"downscale long sides to this (default {d.max_side})",
    )
    parser.add_argument(
        "--min-face-size",
        type=int,
        default=d.min_face_size,
        help=f"ignore smaller faces (default {d.min_face_size} px)",
    )
    parser.add_argument(
        "--max-faces",
        type=int,
        default=d.max_faces,
        help=f"skip images with more faces (default {d.max_faces})",
    )
    parser.add_argument(
        "--mask-scale",
        type=float,
        default=d.mask_scale,
        help=f"face mask = box × this (default {d.mask_scale})",
    )
    parser.add_argument(
        "--retry-skipped", action="store_true", help="process again the images skipped before"
    )
    parser.add_argument(
        "--shard",
        metavar="I/N",
        default=None,
        help="prepare only part I of N disjoint parts of SRC, into DATA/parts/ (merge with `uniportrait data merge`)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from uniportrait.errors import UniPortraitError
    from uniportrait.training.prepare import PrepareOptions, prepare_dataset
    from uniportrait.training.shards import parse_shard

    if args.workers < 1:
        raise UniPortraitError("--workers must be at least 1")
    shard = parse_shard(args.shard) if args.shard is not None else None
    options = PrepareOptions(
        analyzer=args.analyzer,
        max_side=args.max_side,
        min_face_size=args.min_face_size,
        max_faces=args.max_faces,
        mask_scale=args.mask_scale,
        identity_from_folder=args.identity_from_folder,
    )
    summary = prepare_dataset(
        args.src,
        args.out,
        workers=args.workers,
        options=options,
        manifest=args.manifest,
        retry_skipped=args.retry_skipped,
        progress=not args.quiet,
        shard=shard,
    )
    if summary.total == 0 and shard is None:
        raise UniPortraitError(f"no images found in {args.src}")
    print(summary.format())
    if shard is None:
        print(f"dataset: {args.out}")
    else:
        from uniportrait.training.shards import part_folder

        print(
            f"part {shard[0]}/{shard[1]}: {part_folder(args.out, *shard)} (then: uniportrait data merge {args.out})"
        )
    return 0
