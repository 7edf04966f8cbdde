"""At which noise level does a world adapter fail to set identity? A partial-denoising (SDEdit)
probe on held-out portraits::

    python scripts/world_sdedit_probe.py [--adapter DIR | --no-adapter] [--base DIR] [--cases 60]
        [--starts 0,6,12,18] [--conditions none,own,other] [--framing close --oracles ORACLES]

For each held-out caption (the identity report's single-ID cases), the caption's own render of
the person is encoded, noised to the timestep where the 25-step DDIM schedule is at step
``start``, and denoised from there with the caption and: no identity, the person's own identity
(another photo of them), or another held-out person's. The oracle then reads the pictures as
the identity report does (Face Sim to a third render of the person, and identification among
all cases). ``start`` 0 is almost a plain generation (the render survives only as a faint
trace); larger starts keep more of the render's layout and colours. Prints one JSON line per
start and condition, and for "other" also the Face Sim to the other person. ``--no-adapter``
measures the base alone, through diffusers' own ``StableDiffusionPipeline`` (condition "none"
only): for a base no adapter has been trained on yet.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np
import torch

from uniportrait.errors import UniPortraitError

CONDITIONS = ("none", "own", "other")


@torch.no_grad()
def _render_latents(pipe, cases) -> list[torch.Tensor]:
    """Each case's own render as the VAE's posterior mean × scaling factor: (1, C, h, w) each."""
    from uniportrait.world.train_base import encode_latents

    images = np.stack([case.spec.render().image for case in cases])
    return list(encode_latents(pipe.vae, images).split(1))


def _pictures(pipe, cases, latents, identities, start, seed, guidance, steps=25) -> np.ndarray:
    """(N, H, W, 3) uint8: each case's render latents noised to step ``start`` and denoised from
    there, with ``identities[k]`` (a list of identities, or None)."""
    scheduler = pipe.scheduler
    scheduler.set_timesteps(steps)
    t_start = scheduler.timesteps[start]
    out = []
    for index, (case, z0) in enumerate(zip(cases, latents)):
        noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(seed + index))
        noised = scheduler.add_noise(z0, noise, t_start.reshape(1))

        def restart(pipe, step, timestep, kwargs, noised=noised):  # after step start-1: x_{t_start}
            if step == start - 1:
                kwargs["latents"] = noised
            return kwargs

        call = {} if identities[index] is None else {"identities": identities[index]}
        image = pipe(
            case.caption,
            height=case.spec.height,
            width=case.spec.width,
            num_inference_steps=steps,
            guidance_scale=guidance,
            latents=noised if start == 0 else None,
            generator=torch.Generator().manual_seed(seed + index),
            callback_on_step_end=restart if start > 0 else None,
            output_type="np",
            **call,
        ).images[0]
        out.append((np.asarray(image) * 255).round().clip(0, 255).astype(np.uint8))
    return np.stack(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", default=None, help="adapter folder (default: the shipped world adapter)")
    parser.add_argument(
        "--no-adapter",
        action="store_true",
        help="the base alone, in diffusers' StableDiffusionPipeline (condition none only)",
    )
    parser.add_argument(
        "--base", default=None, help="base folder the adapter was trained on (default: shipped)"
    )
    parser.add_argument("--cases", type=int, default=60, help="held-out captions (default 60)")
    parser.add_argument(
        "--starts", default="0,6,12,18", help="DDIM steps (of 25) to start from (default 0,6,12,18)"
    )
    parser.add_argument(
        "--conditions",
        default=",".join(CONDITIONS),
        help="comma-separated, of none, own, other (default all)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--framing", default="wide", help="faces of the held-out pictures: wide or close")
    parser.add_argument("--oracles", default=None, help="oracles folder (default: the shipped world oracles)")
    args = parser.parse_args(argv)
    try:
        starts = [int(s) for s in args.starts.split(",")]
    except ValueError:
        parser.error(f"--starts must be integers, got {args.starts!r}")
    if not starts or not all(0 <= s < 25 for s in starts) or args.cases < 2:
        parser.error("--starts must be steps in [0, 25) and --cases at least 2")
    conditions = [c for c in args.conditions.split(",") if c]
    if not conditions or not set(conditions) <= set(CONDITIONS):
        parser.error(f"--conditions must be among {', '.join(CONDITIONS)}, got {args.conditions!r}")
    if args.no_adapter and (args.adapter is not None or conditions != ["none"]):
        parser.error("--no-adapter takes no --adapter and only --conditions none")
    from uniportrait.presets.pipelines import build_world_pipeline, world_base_folder
    from uniportrait.world.identity_report import (
        conditioning_crops,
        identity_cases,
        measure_identity_pictures,
    )
    from uniportrait.world.oracles import WorldOracles
    from uniportrait.world.scenes import FRAMINGS

    if args.framing not in FRAMINGS:
        parser.error(f"--framing must be one of {', '.join(FRAMINGS)}, got {args.framing!r}")
    try:
        base = world_base_folder(args.base)
        if args.no_adapter:
            from diffusers import StableDiffusionPipeline

            pipe = StableDiffusionPipeline.from_pretrained(
                base, safety_checker=None, torch_dtype=torch.float32
            )
        else:
            pipe = build_world_pipeline(args.adapter, base=base)
    except UniPortraitError as error:
        parser.error(str(error))
    pipe.set_progress_bar_config(disable=True)
    oracles = WorldOracles(args.oracles)
    cases = identity_cases(oracles, args.cases, 1, framing=args.framing)
    latents = _render_latents(pipe, cases)
    own = (
        []
        if args.no_adapter
        else [[pipe.encode_identity(crop) for crop in conditioning_crops(c)] for c in cases]
    )
    shift = [(k + 1) % len(cases) for k in range(len(cases))]  # "other": the next case's person
    identities = {"none": [None] * len(cases), "own": own, "other": [own[j] for j in shift] if own else []}
    as_other = [dataclasses.replace(c, reference=cases[j].reference) for c, j in zip(cases, shift)]
    for start in starts:
        for condition in conditions:
            images = _pictures(pipe, cases, latents, identities[condition], start, args.seed, args.guidance)
            m = measure_identity_pictures(oracles, images, cases)
            row = {"start": start, "timestep": int(pipe.scheduler.timesteps[start]), "condition": condition}
            row |= {k: m[k] for k in ("face_sim", "identification", "pairwise_identification") if k in m}
            row["one_face"] = m["exact_face_count_rate"]
            if condition == "other":
                row["face_sim_to_other"] = measure_identity_pictures(oracles, images, as_other)["face_sim"]
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
