"""``uniportrait id``: the local identity bank (add, list, show, rm)."""

from __future__ import annotations

import argparse
import json

from uniportrait.cli._common import add_model_args, check_photos_exist, load_pipeline_from_args, parse_mix


def register(subparsers) -> None:
    parser = subparsers.add_parser("id", help="manage stored identities (add, list, show, rm)")
    parser.add_argument(
        "--home", default=None, help="bank location (default: $UNIPORTRAIT_HOME or ~/.cache/uniportrait)"
    )
    sub = parser.add_subparsers(dest="id_command", metavar="ACTION", required=True)

    add = sub.add_parser("add", help="encode photos of one person and store them under NAME")
    add.add_argument("name")
    add.add_argument("photos", nargs="+", metavar="PHOTO")
    add.add_argument(
        "--mix", action="append", default=[], metavar="PHOTO[,PHOTO]:SCALE", help="blend another face in"
    )
    add.add_argument("--overwrite", action="store_true", help="replace an existing identity")
    add_model_args(add)
    add.set_defaults(func=run_add)

    lst = sub.add_parser("list", help="list stored identities")
    lst.add_argument("--json", action="store_true", help="print JSON instead of a table")
    lst.set_defaults(func=run_list)

    show = sub.add_parser("show", help="show one identity")
    show.add_argument("name")
    show.add_argument("--json", action="store_true", help="print JSON instead of text")
    show.add_argument("--crops", default=None, metavar="DIR", help="write its aligned reference crops here")
    show.set_defaults(func=run_show)

    rm = sub.add_parser("rm", help="delete a stored identity")
    rm.add_argument("name")
    rm.set_defaults(func=run_rm)


def _bank(args: argparse.Namespace):
    from uniportrait.bank import IdentityBank

    return IdentityBank(args.home)


def run_add(args: argparse.Namespace) -> int:
    from uniportrait.bank import check_name
    from uniportrait.errors import IdentityError
    from uniportrait.identity import check_mix_scales
    from uniportrait.photos import identity_from_photos

    check_name(args.name)
    bank = _bank(args)
    if bank.exists(args.name) and not args.overwrite:
        raise IdentityError(f"identity {args.name!r} already exists (use --overwrite to replace it)")
    mixes = [parse_mix(m) for m in args.mix]
    if any(target != 1 for target, _, _ in mixes):
        raise IdentityError("`id add` stores one identity: --mix takes PHOTO:SCALE without a target")
    check_mix_scales([s for _, _, s in mixes])
    check_photos_exist(list(args.photos) + [p for _, photos, _ in mixes for p in photos])
    from uniportrait.cli._common import preset_face_analyzer

    analyzer = preset_face_analyzer(args.preset)  # e.g. the world's detector for world photos
    pipe = load_pipeline_from_args(args)
    identity = identity_from_photos(pipe, args.photos, analyzer, mix=[(photos, s) for _, photos, s in mixes])
    path = bank.add(args.name, identity, overwrite=args.overwrite)
    print(
        f"stored identity {args.name!r} ({identity.num_references} photo(s), encoder {identity.encoder}) in {path}"
    )
    return 0


def run_list(args: argparse.Namespace) -> int:
    infos = _bank(args).list()
    if args.json:
        print(json.dumps([i.to_dict() for i in infos], indent=2))
    elif not infos:
        print("no stored identities")
    else:
        print(f"{'NAME':24} {'PHOTOS':>6} {'MIXES':>5}  {'ENCODER':16}  {'ALIGNER':20}  CREATED")
        for i in infos:
            if i.problem is not None:
                print(f"{i.name:24} DAMAGED: {i.problem} (remove it: uniportrait id rm {i.name})")
                continue
            aligner = i.aligner if i.current else f"{i.aligner} (old: add again)"
            print(f"{i.name:24} {i.references:>6} {i.mixes:>5}  {i.encoder:16}  {aligner:20}  {i.created}")
    return 0


def run_show(args: argparse.Namespace) -> int:
    bank = _bank(args)
    info = bank.info(args.name)
    if args.crops:
        from PIL import Image

        from uniportrait.cli._common import check_output_folder
        from uniportrait.faces.image_io import save_png_atomic

        folder = check_output_folder(args.crops)
        identity = bank.get(args.name)
        for k, crop in enumerate(identity.crops if identity.crops is not None else []):
            save_png_atomic(Image.fromarray(crop.numpy()), folder / f"{args.name}_ref{k}.png")
    if args.json:
        print(json.dumps(info.to_dict(), indent=2))
    else:
        for key, value in info.to_dict().items():
            print(f"{key:11} {value}")
    return 0


def run_rm(args: argparse.Namespace) -> int:
    _bank(args).remove(args.name)
    print(f"removed identity {args.name!r}")
    return 0
