"""A world base model's denoising error on held-out portraits, and two bases' paired difference::

    python scripts/world_heldout_loss.py BASE [OTHER_BASE] [--count 600]

The ε-prediction MSE of each base's UNet on ``--count`` held-out portraits with their own
captions, uniform timesteps, the same noise and timesteps for every base
(``uniportrait.world.word_probe.held_out_error``): its mean and standard error, and with two
bases the mean of their per-picture difference (second minus first) and its standard error.
A base still learning, not memorising, lowers it (docs/world.md, "A base trained twice as long").
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "bases", nargs="+", help="one or two world base folders (diffusers SD pipeline folders)"
    )
    parser.add_argument("--count", type=int, default=600, help="held-out portraits (default 600)")
    args = parser.parse_args(argv)
    if len(args.bases) > 2:
        parser.error("give one or two base folders")
    if args.count < 2:
        parser.error("--count must be at least 2")

    from uniportrait.errors import UniPortraitError
    from uniportrait.world.word_probe import held_out_error

    errors = []
    try:
        for base in args.bases:
            e = held_out_error(base, count=args.count)
            errors.append(e)
            print(f"{base}: held-out eps-MSE {float(e.mean()):.5f} (se {float(e.std()) / len(e) ** 0.5:.5f})")
    except UniPortraitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if len(errors) == 2:
        d = errors[1] - errors[0]
        print(
            f"paired difference (second - first): {float(d.mean()):+.5f} (se {float(d.std()) / len(d) ** 0.5:.5f})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
