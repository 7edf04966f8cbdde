"""Can the world's base UNet draw a given person's face at all? A memorisation probe::

    python scripts/world_memorise_probe.py --work runs/world/memorise [--pictures 64] [--steps 1500]
        [--base DIR] [--seeds 0,1]

Renders ``--pictures`` held-out portraits (one per person, every caption different), continues
the base's UNet on just those pictures and their captions (``train_unet``: lr 2e-4, batch 32,
bf16, resumable in ``--work``), then generates each caption again and lets the oracle read the
face: Face Sim to that very render and identification among all of them (chance 1 / pictures).
Rows: the renders themselves, the renders through the VAE (the ceiling of any latent picture),
the base as it is, the continued UNet's raw weights and its EMA. Prints one JSON line per row.

Where the caption names one picture, the UNet has only to memorise it; if even then the faces
were not recognisable, no identity conditioning on this VAE and UNet could make them so.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from uniportrait.errors import UniPortraitError


def _data(work: Path, count: int) -> dict[str, np.ndarray]:
    """``count`` held-out portraits with distinct captions (and the few group pictures
    ``train_unet`` loads, never drawn from here), written once into ``work/data``."""
    from uniportrait.world.data import load_set, render_set, save_set

    data = work / "data"
    singles = data / "singles_train.npz"
    if not singles.is_file():
        s = render_set(4 * count, 1, seed=77, num_identities=4 * count, held_out=True,
                       renders_per_identity=1, progress=False)  # fmt: skip
        _, first = np.unique(s["captions"], return_index=True)
        keep = np.sort(first)[:count]
        if len(keep) < count:
            raise UniPortraitError(f"only {len(keep)} distinct captions among {4 * count} renders")
        data.mkdir(parents=True, exist_ok=True)
        save_set(render_set(2, 2, seed=78, held_out=True, progress=False), data / "groups_train.npz")
        save_set({k: v[keep] for k, v in s.items()}, singles)  # last: its presence marks the data done
    out = load_set(singles)
    if len(out["captions"]) != count:
        raise UniPortraitError(f"{work} holds a run on {len(out['captions'])} pictures, not {count}")
    return out


def _score(oracles, images: np.ndarray, references: np.ndarray) -> dict[str, float]:
    """Picture k should show the person of reference k: the largest face's Face Sim to it, and
    whether it is nearer to it than to every other reference."""
    sims, hits, found = [], 0, 0
    for k, image in enumerate(images):
        faces = oracles.detect(image)
        if faces:
            found += 1
            s = references @ oracles.describe(image, faces[:1])["embedding"][0]
            sims.append(float(s[k]))
            hits += int(np.argmax(s) == k)
    return {
        "face_found": found / len(images),
        "face_sim": float(np.mean(sims)) if sims else None,
        "identification": hits / len(images),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the data and the run")
    parser.add_argument("--pictures", type=int, default=64)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--base", type=Path, default=None, help="a world base folder (default: shipped)")
    parser.add_argument("--seeds", default="0,1")
    args = parser.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        parser.error("--seeds must be comma-separated integers")
    if args.pictures < 2 or args.steps < 1:
        parser.error("--pictures must be at least 2 and --steps at least 1")
    if args.work.exists() and not args.work.is_dir():
        parser.error(f"--work {args.work} is a file")

    from diffusers import UNet2DConditionModel

    from uniportrait.presets.pipelines import world_base_folder
    from uniportrait.world.faces import aligned_crops
    from uniportrait.world.oracles import WorldOracles
    from uniportrait.world.report import base_pipeline, generate, vae_round_trip
    from uniportrait.world.train_base import train_unet

    try:
        base = world_base_folder(args.base)
        data = _data(args.work, args.pictures)
    except UniPortraitError as err:
        parser.error(str(err))
    captions = [str(c) for c in data["captions"]]
    train_unet(args.work / "data", base, base, args.work, steps=args.steps, lr=2e-4, seed=3,
               group_every=1 << 30, init=base / "unet", bf16=True)  # fmt: skip
    oracles = WorldOracles()
    references = oracles.describe_crops(aligned_crops(data["images"], data["landmarks"][:, 0]))["embedding"]
    pipe = base_pipeline(base)
    rows = {
        "renders": data["images"],
        "through the VAE": vae_round_trip(pipe.vae, data["images"]),
    }
    for name, row in rows.items():
        print(json.dumps({"row": name, **_score(oracles, row, references)}), flush=True)
    raw = UNet2DConditionModel.from_config(pipe.unet.config)  # float32; the weights come next
    raw.load_state_dict(torch.load(args.work / "run" / "state.pt", weights_only=True)["modules"]["unet"])
    unets = {
        "base": pipe.unet,  # base_pipeline's own, in float32
        "memorised (raw weights)": raw,
        "memorised (EMA 0.999)": UNet2DConditionModel.from_pretrained(args.work / "unet"),
    }
    for name, unet in unets.items():
        pipe.unet = unet.eval()
        for seed in seeds:
            row = _score(oracles, generate(pipe, captions, seed), references)
            print(json.dumps({"row": name, "seed": seed, **row}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
