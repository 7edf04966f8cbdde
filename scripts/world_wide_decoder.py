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
from uniportrait.world.data import load_set
from uniportrait.world.loop import run_loop
from uniportrait.world.train_base import aligned_face_grid, face_identity_cosine, to_pixels


def main() -> None:
    from diffusers import AsymmetricAutoencoderKL, AutoencoderKL

    from uniportrait.models.face_backbone import IRBackbone
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
    logging.basicConfig(level=logging.INFO)

    small = AutoencoderKL.from_pretrained(args.work / "vae_decoder" / "vae").eval().requires_grad_(False)
    levels = len(small.config.block_out_channels)
    wide = AsymmetricAutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * levels,
        down_block_out_channels=tuple(small.config.block_out_channels),
        layers_per_down_block=small.config.layers_per_block,
        up_block_types=("UpDecoderBlock2D",) * levels,
        up_block_out_channels=tuple(int(w) for w in args.widths.split(",")),
        layers_per_up_block=args.layers,
        latent_channels=small.config.latent_channels,
        norm_num_groups=small.config.norm_num_groups,
        sample_size=small.config.sample_size,
        scaling_factor=small.config.scaling_factor,
    )
    wide.encoder.load_state_dict(small.encoder.state_dict())  # the same encoder: the same latents
    wide.quant_conv.load_state_dict(small.quant_conv.state_dict())
    wide.encoder.requires_grad_(False)
    wide.quant_conv.requires_grad_(False)
    params = [p for p in wide.parameters() if p.requires_grad]
    logging.info("decoder parameters: %d", sum(p.numel() for p in params))

    data = args.work / "data"
    s, g = load_set(data / "singles_train.npz"), load_set(data / "groups_train.npz")
    sets = [(s["images"], s["masks"].any(1), s["landmarks"], s["num_people"])]
    sets += [(g["images"], g["masks"].any(1), g["landmarks"], g["num_people"])]
    backbone = IRBackbone.from_pretrained(WORLD_ASSETS / "face_backbone").float().eval().requires_grad_(False)
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)

    def step(i: int) -> dict[str, float]:
        images, masks, landmarks, people = sets[i % 2]
        n = 16 if i % 2 == 0 else 8  # group pictures are twice as wide
        idx = torch.randint(len(images), (n,), generator=gen).numpy()
        x = to_pixels(images[idx])
        weight = 1.0 + 4.0 * torch.from_numpy(masks[idx]).float()[:, None]  # heads 5×
        with torch.no_grad():
            z = small.encode(x).latent_dist.sample(generator=gen)
        rec = wide.decode(z).sample
        err = rec - x
        loss = ((err.abs() + err.pow(2)) * weight).mean() / weight.mean()
        who = (torch.rand(n, generator=gen) * torch.from_numpy(people[idx])).long().numpy()
        grid = aligned_face_grid(landmarks[idx, who], x.shape[-2:], backbone.config.input_size)
        cos = face_identity_cosine(backbone, rec, x, grid)
        loss = loss + args.identity_weight * (1 - cos).mean()
        loss.backward()
        psnr = 10 * torch.log10(4.0 / err.detach().pow(2).mean())
        return {"loss": loss.item(), "psnr": psnr.item(), "face_cos": cos.mean().item()}

    run_loop(args.out / "run", {"vae": wide}, opt, step, args.steps, 1e-3, "wide decoder", warmup=100)
    wide.eval().save_pretrained(args.out / "vae")
    with torch.no_grad():
        report = vae_report(wide, WorldOracles(WORLD_ASSETS / "oracles"), data)
    print(json.dumps({k: round(v, 4) for k, v in report.items()}), flush=True)


if __name__ == "__main__":
    main()
