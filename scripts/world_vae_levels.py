"""Does a world VAE that keeps more latent pixels per face keep identity? Trains a VAE of other
levels (e.g. two: 64 px → 32×32 latents, a face about 11 × 14 latent pixels) exactly as
``world build`` trains the shipped one (``train_base.train_vae``), then measures it as the world
report measures the shipped one (``report.vae_report``)::

    python scripts/world_vae_levels.py runs/world/vae-2x --channels 32,64 --steps 1200

``--decoder-steps N`` then fine-tunes its decoder on faces as the build's ``vae_decoder`` stage
does, and measures again. Resumable (re-run the command). Prints one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DATA = Path("runs/world/data")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="run folder (resumable)")
    parser.add_argument(
        "--channels", default="32,64", help="channels per VAE level (default 32,64: 2 levels, 2×)"
    )
    parser.add_argument("--latent-channels", type=int, default=4)
    parser.add_argument(
        "--steps", type=int, default=1200, help="VAE steps of batch 16 (default 1200, as the build)"
    )
    parser.add_argument("--decoder-steps", type=int, default=0, help="then fine-tune the decoder this long")
    args = parser.parse_args(argv)
    try:
        channels = tuple(int(c) for c in args.channels.split(","))
    except ValueError:
        parser.error(f"--channels must be integers, got {args.channels!r}")
    if (
        not channels
        or min(channels) < 8
        or any(c % 8 for c in channels)
        or args.steps < 1
        or args.latent_channels < 1
    ):
        parser.error(
            "--channels must be multiples of 8 (at least one level), --steps and --latent-channels positive"
        )
    if not (DATA / "singles_train.npz").is_file():
        parser.error(f"{DATA} has no build data: run `uniportrait world build --stages render`")
    import torch
    from diffusers import AutoencoderKL

    from uniportrait.world.models import WorldSizes, latent_side
    from uniportrait.world.oracles import WorldOracles
    from uniportrait.world.report import vae_report
    from uniportrait.world.train_base import finetune_vae_decoder, train_vae

    torch.set_num_threads(2)
    sizes = WorldSizes(vae_block_out_channels=channels, latent_channels=args.latent_channels)
    if not (args.out / "vae" / "config.json").is_file():
        train_vae(DATA, args.out, steps=args.steps, batch=16, sizes=sizes)
    oracles = WorldOracles()
    runs = [("vae", args.out / "vae")]
    if args.decoder_steps:
        finetune_vae_decoder(DATA, args.out, args.out / "decoder", steps=args.decoder_steps)
        runs.append(("decoder", args.out / "decoder" / "vae"))
    for name, folder in runs:
        vae = AutoencoderKL.from_pretrained(folder).float().eval()
        with torch.no_grad():
            report = vae_report(vae, oracles, DATA)
        latent = latent_side(sizes)
        print(
            json.dumps(
                {
                    "vae": name,
                    "channels": channels,
                    "latent": [args.latent_channels, latent, latent],
                    **report,
                }
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
