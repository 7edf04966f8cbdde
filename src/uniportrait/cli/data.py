"""``uniportrait data``: join the parts of a sharded prepare-data run; pack a dataset into WebDataset shards."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "data",
        help="merge prepare-data parts; pack a dataset into WebDataset tar shards",
        description="Datasets at scale (docs/scale.md): `merge` joins the parts written by "
        "`prepare-data --shard I/N` (no image is copied); `pack` writes a dataset folder as WebDataset "
        "tar shards that the trainer reads with data.path=SHARDS.",
    )
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    merge = sub.add_parser("merge", help="index DATA/parts/* as one dataset in DATA")
    merge.add_argument("data", metavar="DATA", help="the --out folder of the sharded prepare-data runs")
    merge.set_defaults(func=run_merge)
    pack = sub.add_parser("pack", help="write a dataset folder as WebDataset tar shards")
    pack.add_argument("data", metavar="DATA", help="a dataset folder (prepare-data, or merged parts)")
    pack.add_argument("--out", required=True, metavar="SHARDS", help="folder for shard-*.tar + dataset.json")
    pack.add_argument("--samples-per-shard", type=int, default=1000, help="samples per tar (default 1000)")
    pack.add_argument(
        "--alternatives",
        type=int,
        default=4,
        help="other photos of a labelled person stored with each sample, for the ID augmentation (default 4)",
    )
    pack.add_argument("--seed", type=int, default=0, help="seed of the sample order (default 0)")
    pack.set_defaults(func=run_pack)


def run_merge(args: argparse.Namespace) -> int:
    from uniportrait.training.shards import merge_parts

    result = merge_parts(args.data)
    print(f"merged {result['parts']} part(s): {result['images']} images, {result['skipped']} skipped")
    if result["incomplete"]:
        print(f"warning: unfinished part(s) {', '.join(result['incomplete'])}: re-run them and merge again")
    print(f"dataset: {args.data}")
    return 0


def run_pack(args: argparse.Namespace) -> int:
    from uniportrait.training.shards import pack_webdataset

    info = pack_webdataset(
        args.data,
        args.out,
        samples_per_shard=args.samples_per_shard,
        alternatives=args.alternatives,
        seed=args.seed,
        progress=not args.quiet,
    )
    print(f"packed {info['images']} samples into {len(info['shards'])} shard(s): {args.out}")
    return 0
