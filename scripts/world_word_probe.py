"""Which caption words a world base model's denoiser uses, per attribute and timestep::

    python scripts/world_word_probe.py BASE [--count 300] [--attributes tilt,expression,...] [--out FILE]

For held-out portraits whose caption mentions the attribute, the denoising error with the caption as
written against the same caption with that attribute's phrase swapped for another value's, at the
same noise and timestep (``uniportrait.world.word_probe``). Prints one line per attribute: the gain
(how much worse the wrong words denoise, as a share of the error) and its z, per timestep; ``--out``
writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", help="a world base folder (a diffusers SD pipeline folder)")
    parser.add_argument("--count", type=int, default=300, help="portraits per attribute")
    parser.add_argument("--attributes", default="tilt,expression,background,clothing")
    parser.add_argument("--out", help="a JSON file to write the result to")
    args = parser.parse_args(argv)
    if args.count < 2:
        parser.error("--count must be at least 2")

    from uniportrait.atomic import write_text_atomic
    from uniportrait.cli._common import check_output_folder
    from uniportrait.errors import UniPortraitError
    from uniportrait.world.word_probe import word_probe

    try:
        if args.out:  # refused before the probe's minutes, not after
            if Path(args.out).is_dir():
                raise UniPortraitError(f"--out {args.out} is a folder; give a JSON file to write")
            check_output_folder(Path(args.out).parent)
        result = word_probe(args.base, [a for a in args.attributes.split(",") if a], count=args.count)
    except UniPortraitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for name, row in result.items():
        cells = " | ".join(
            f"t={t}: {100 * r['gain']:+.2f}% (z {r['z']:.1f})" for t, r in row["timesteps"].items()
        )
        print(f"{name} ({row['pictures']} pictures): {cells}")
    if args.out:
        write_text_atomic(Path(args.out), json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
