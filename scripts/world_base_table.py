"""The base-model table of one base folder, one seed, keeping the pictures::

    python scripts/world_base_table.py BASE OUT [--seed 0] [--framing close --oracles ORACLES]

Generates the base-model section's held-out captions (200 portraits, 60 two-person pictures) with
diffusers' own ``StableDiffusionPipeline`` on ``BASE``, reads them with the oracles as
``world report`` does, and adds the *colour spread*: the standard deviation over pictures of
each picture's mean colour (per channel, averaged), next to the renders' own, the measure of
pictures washed toward one tint, and the renders' own row after a round trip through the base's
VAE (``through_vae``: what a base on those latents could show at most). Writes
``OUT/table.json``, the pictures (``pictures_{1,2}.npz``) and the two contact sheets; prints one
JSON line per picture kind.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from uniportrait.cli._common import world_base_arg


def colour_spread(images: np.ndarray) -> float:
    """(N, H, W, 3) uint8 → the mean over channels of the std over pictures of their mean colour."""
    means = (images.astype(np.float64) / 255).reshape(len(images), -1, 3).mean(1)  # (N, 3)
    return float(means.std(0).mean())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "base", type=world_base_arg, help="a world base folder (a diffusers SD pipeline folder)"
    )
    parser.add_argument("out", help="folder to write the table, pictures and sheets to")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--framing", default="wide", help="faces of the held-out pictures: wide or close")
    parser.add_argument("--oracles", default=None, help="oracles folder (default: the shipped world oracles)")
    args = parser.parse_args(argv)
    base, out = Path(args.base), Path(args.out)
    if out.exists() and not out.is_dir():
        parser.error(f"{out} is a file; give a folder to write to")

    from uniportrait.atomic import write_text_atomic
    from uniportrait.world.scenes import FRAMINGS

    if args.framing not in FRAMINGS:
        parser.error(f"--framing must be one of {', '.join(FRAMINGS)}, got {args.framing!r}")
    from uniportrait.world.oracles import WorldOracles
    from uniportrait.world.report import (
        base_contact_sheets,
        base_pipeline,
        generate,
        held_out_specs,
        measure_pictures,
        reference_embeddings,
        vae_round_trip,
    )

    out.mkdir(parents=True, exist_ok=True)
    oracles, pipe = WorldOracles(args.oracles), base_pipeline(base)
    result = {}
    for people, count in ((1, 200), (2, 60)):
        specs, captions = held_out_specs(count, people, seed=5, framing=args.framing)
        renders = np.stack([s.render().image for s in specs])
        size = (specs[0].width, specs[0].height)
        images = generate(pipe, captions, args.seed, guidance=7.5, size=size)
        np.savez_compressed(out / f"pictures_{people}.npz", images=images, renders=renders)
        refs = reference_embeddings(oracles, specs, framing=args.framing)
        row = measure_pictures(oracles, images, specs, refs)
        row["through_vae"] = measure_pictures(oracles, vae_round_trip(pipe.vae, renders), specs, refs)
        row["colour_spread"], row["renders_colour_spread"] = colour_spread(images), colour_spread(renders)
        result[people] = row
        print(people, json.dumps(row), flush=True)
    base_contact_sheets(pipe, out, seed=args.seed)
    write_text_atomic(out / "table.json", json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
