"""``uniportrait download``: fetch the published sd15 weights into the Hub cache the loaders read.

    uniportrait download              # everything the sd15 preset needs that is not cached yet
    uniportrait download --dry-run    # print the equivalent `hf download` commands instead

huggingface_hub does the transfer (progress bars; an interrupted download resumes when run
again). Parts given as local paths (``--base-model DIR`` …) are not downloaded.
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    from uniportrait.cli._common import SD15_PARTS

    parser = subparsers.add_parser(
        "download",
        help="fetch the published sd15 weights into the Hugging Face cache (resumable)",
        description="Download exactly the files the sd15 preset reads that are not in the Hugging Face "
        "cache yet (base model, VAE, CLIP image encoder, UniPortrait, IP-Adapter; the safety checker "
        "with --safety-checker). Run it again to resume an interrupted download.",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the `hf download` commands; fetch nothing"
    )
    parser.add_argument(
        "--safety-checker", action="store_true", help="also fetch diffusers' NSFW safety checker"
    )
    parser.add_argument("--no-ip-adapter", action="store_true", help="skip the IP-Adapter file")
    for flag, what in SD15_PARTS.items():
        parser.add_argument(
            f"--{flag}",
            default=None,
            metavar="PATH_OR_ID",
            help=f"{what} (a Hub id, or a local path: then nothing is fetched for it; default: the published one)",
        )
    parser.set_defaults(func=_download)


def _download(args: argparse.Namespace) -> int:
    from uniportrait.cli._common import SD15_PARTS
    from uniportrait.presets.pipelines import (
        SAFETY_CHECKER,
        download_commands,
        download_sd15,
        missing_files,
        sd15_files,
    )

    parts = {
        flag.replace("-", "_"): getattr(args, flag.replace("-", "_"))
        for flag in SD15_PARTS
        if getattr(args, flag.replace("-", "_")) is not None
    }
    if args.no_ip_adapter:
        parts["ip_adapter"] = None
    if args.safety_checker:
        parts["safety_checker"] = SAFETY_CHECKER
    wanted = sd15_files(**parts)
    if args.dry_run:
        commands = download_commands(missing_files(wanted))
        print("\n".join(commands) if commands else "nothing to download: every file is at hand")
        return 0
    fetched = download_sd15(wanted)
    print(f"downloaded {', '.join(fetched)}" if fetched else "nothing to download: every file is at hand")
    return 0
