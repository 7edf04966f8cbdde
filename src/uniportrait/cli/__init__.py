"""The ``uniportrait`` command.

Each sub-command lives in its own module of this package and exposes
``register(subparsers)``, which adds its parser and sets ``func`` (a callable taking the parsed
``argparse.Namespace`` and returning an exit code). Heavy imports happen inside ``func``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from uniportrait.errors import UniPortraitError

# Sub-command modules, in the order `--help` lists them.
COMMAND_MODULES: tuple[str, ...] = (
    "generate",
    "demo",
    "faces",
    "identity",
    "convert",
    "eval",
    "prepare_data",
    "data",
    "train",
    "serve",
    "world",
    "download",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="uniportrait",
        description="Identity-preserving single- and multi-person image generation (UniPortrait).",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="only print errors and results")
    parser.add_argument("-v", "--verbose", action="store_true", help="print debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"uniportrait.cli.{name}")
        except ModuleNotFoundError as err:  # a command module that this build does not ship
            if err.name == f"uniportrait.cli.{name}":
                continue
            raise
        module.register(subparsers)
    _add_quiet(subparsers)
    return parser


def _add_quiet(subparsers: argparse._SubParsersAction) -> None:
    """Accept -q/--quiet after the sub-command too (``uniportrait generate ... --quiet``)."""
    for sub in subparsers.choices.values():
        try:
            sub.add_argument(
                "-q",
                "--quiet",
                action="store_true",
                default=argparse.SUPPRESS,
                help="only print errors and results",
            )
        except argparse.ArgumentError:
            pass  # the command defines its own
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction):
                _add_quiet(action)


def _quiet_libraries() -> None:
    """No progress bars or warnings from diffusers, transformers and huggingface_hub (``-q``).

    ``TQDM_DISABLE`` cannot do it here: tqdm reads it when it is imported, before ``main`` runs.
    """
    import huggingface_hub.utils
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    huggingface_hub.utils.disable_progress_bars()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    level = logging.WARNING if args.quiet else (logging.DEBUG if args.verbose else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if args.quiet:  # the libraries' own bars (weights loading, downloads); ours follow the level
        _quiet_libraries()
    try:
        return int(args.func(args) or 0)
    except UniPortraitError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
