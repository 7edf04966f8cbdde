"""Is it the decoder or the latent? A wider VAE decoder on the shipped encoder's frozen latents
(docs/world.md, VAE), trained from scratch with the decoder fine-tuning's losses (heads weighted
5×, the face backbone's identity loss), then measured by the oracle as ``world report`` does::

    python scripts/world_wide_decoder.py runs/world/bigdec --steps 3000 --widths 32,64,128 --layers 2

Reads the build's ``runs/world/data`` and ``runs/world/vae_decoder/vae`` (run from the repository
root after ``make world``); resumable; prints the VAE report as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from uniportrait.world.build import WORLD_ASSETS
from uniportrait.world.train_base import finetune_vae_decoder


def main() -> None:
    from diffusers import AsymmetricAutoencoderKL, AutoencoderKL

    from uniportrait.world.oracles import WorldOracles
    from uniportrait.world.report import vae_report

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--widths", default="32,64,128", help="decoder widths per level")
    parser.add_argument("--layers", type=int, default=2, help="decoder blocks per level")
    parser.add_argument("--work", type=Path, default=Path("runs/world"), help="the build's folder")
    parser.add_argument("--identity-weight", type=float, default=0.1)
    args = parser.parse_args()
    try:
        widths = tuple(int(w) for w in args.widths.split(","))
    except ValueError:
        parser.error(f"--widths: comma-separated integers, got {args.widths!r}")
    small_dir = args.work / "vae_decoder"
    if not (small_dir / "vae" / "config.json").is_file():
        parser.error(f"{small_dir / 'vae'} holds no VAE (run `make world` first, or pass --work)")
    if args.steps < 1 or args.layers < 1 or len(widths) < 1 or min(widths) < 1:
        parser.error("--steps, --layers and --widths must be positive")
    logging.basicConfig(level=logging.INFO)

    small = AutoencoderKL.from_pretrained(small_dir / "vae").eval()
    levels = len(small.config.block_out_channels)
    torch.manual_seed(0)  # the wide decoder's initialisation
    wide = AsymmetricAutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * levels,
        down_block_out_channels=tuple(small.config.block_out_channels),
        layers_per_down_block=small.config.layers_per_block,
        up_block_types=("UpDecoderBlock2D",) * len(widths),
        up_block_out_channels=widths,
        layers_per_up_block=args.layers,
        latent_channels=small.config.latent_channels,
        norm_num_groups=small.config.norm_num_groups,
        sample_size=small.config.sample_size,
        scaling_factor=small.config.scaling_factor,
    )
    wide.encoder.load_state_dict(small.encoder.state_dict())  # the same encoder: the same latents
    wide.quant_conv.load_state_dict(small.quant_conv.state_dict())
    # the decoder fine-tuning's losses and loop, on the wide decoder, from scratch
    finetune_vae_decoder(args.work / "data", small_dir, args.out, steps=args.steps, lr=1e-3, warmup=100,
                         identity_weight=args.identity_weight, backbone_dir=WORLD_ASSETS / "face_backbone",
                         vae=wide)  # fmt: skip
    with torch.no_grad():
        report = vae_report(wide.eval(), WorldOracles(WORLD_ASSETS / "oracles"), args.work / "data")
    print(json.dumps({k: round(v, 4) for k, v in report.items()}), flush=True)


if __name__ == "__main__":
    main()
