"""``uniportrait train``: train stage I or II (single process, or under ``accelerate launch``)."""

from __future__ import annotations

import argparse
import logging
import os


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train the identity adapter (stage 1) or the router (stage 2)",
        description="Train UniPortrait. One process: `uniportrait train ...`; several GPUs or machines: "
        "`accelerate launch -m uniportrait.training ...` with the same arguments. See docs/training.md.",
    )
    parser.add_argument(
        "--stage",
        type=int,
        choices=(1, 2),
        required=True,
        help="1: ID embedding + single-ID LoRA; 2: router + multi-ID LoRA",
    )
    parser.add_argument(
        "--config", default=None, metavar="YAML", help="training configuration (see configs/)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.learning_rate=1e-4 (repeatable)",
    )
    parser.add_argument(
        "--preset",
        choices=("tiny", "tiny-sdxl"),
        default=None,
        help="start from the offline tiny setup (random networks, 64 px, a few steps): tests and CPU smoke runs",
    )
    parser.add_argument("--data", default=None, help="dataset folder (= --set data.path=...)")
    parser.add_argument("--output-dir", default=None, help="output folder (= --set output_dir=...)")
    parser.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        metavar="CHECKPOINT",
        help="resume from the newest checkpoint of the output folder (no value) or from CHECKPOINT",
    )
    parser.add_argument(
        "--export",
        default=None,
        metavar="DIR",
        help="with --resume: write the checkpoint's adapter (and base, with train.unet_learning_rate) "
        "to DIR/adapter (DIR/base) instead of training, e.g. to measure a run before it ends",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from uniportrait.cli._common import check_output_folder
    from uniportrait.errors import UniPortraitError
    from uniportrait.training.config import TINY_BASE, load_config

    if int(os.environ.get("RANK", "0")) != 0:  # under accelerate launch: one process logs
        logging.getLogger().setLevel(logging.WARNING)
    base = None
    if args.preset is not None:
        base = {**TINY_BASE, "model": {**TINY_BASE["model"], "preset": args.preset}}
    overrides = list(args.overrides)
    if args.data is not None:
        overrides.append(f"data.path={args.data}")
    if args.output_dir is not None:
        overrides.append(f"output_dir={args.output_dir}")
    cfg = load_config(args.config, overrides, stage=args.stage, base=base)

    from uniportrait.training.trainer import Trainer, find_checkpoint

    if args.export is not None:  # checked before the trainer writes anything into output_dir
        if args.resume is None:
            raise UniPortraitError("--export writes a checkpoint's weights: give --resume [CHECKPOINT] too")
        if find_checkpoint(cfg.output_dir, args.resume) is None:
            raise UniPortraitError(f"--export: no complete checkpoint in {cfg.output_dir} to export")
        check_output_folder(args.export)
    trainer = Trainer(cfg, resume=args.resume)
    if args.export is not None:
        trainer.export(args.export)
        if trainer.accelerator.is_main_process:
            print(f"step {trainer.global_step} of {trainer.resumed_from}: weights in {args.export}")
        return 0
    result = trainer.train()
    if trainer.accelerator.is_main_process:
        print(f"stage {cfg.stage}: step {trainer.global_step}/{cfg.train.max_steps}; weights in {result}")
    return 0
