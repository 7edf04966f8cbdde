"""Does the sampler change what a world base draws? One held-out portrait set per sampler::

    python scripts/world_sampler_sweep.py BASE OUT [--portraits 100] [--seed 0] [--samplers ddim25,euler-a25]

Generates the base-model section's held-out portrait captions (``held_out_specs(N, 1, seed=5)``,
the first ``N`` of the 200 the base table uses) with diffusers' own ``StableDiffusionPipeline`` on
``BASE``, once per sampler (diffusers' schedulers, made from the folder's own scheduler config, CFG
7.5), reads them with the oracles as ``world report`` does, and prints one JSON line per sampler
(one-face rate, prompt following overall and per attribute, Face Sim). Writes ``OUT/samplers.json``
and a contact sheet of the first 24 pictures per sampler (``OUT/<sampler>.png``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from uniportrait.cli._common import world_base_arg

#: name -> (diffusers scheduler class, config overrides, inference steps)
SAMPLERS = {
    "ddim25": ("DDIMScheduler", {}, 25),  # the pipelines' default
    "ddim50-trailing": ("DDIMScheduler", {"timestep_spacing": "trailing"}, 50),
    "euler-a25": ("EulerAncestralDiscreteScheduler", {}, 25),
    "euler-a50": ("EulerAncestralDiscreteScheduler", {}, 50),
    "ddpm50": ("DDPMScheduler", {}, 50),
    "dpm2m25": ("DPMSolverMultistepScheduler", {}, 25),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "base", type=world_base_arg, help="a world base folder (a diffusers SD pipeline folder)"
    )
    parser.add_argument("out", help="folder to write the results and sheets to")
    parser.add_argument("--portraits", type=int, default=100, help="held-out captions (1 to 200)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samplers", default=",".join(SAMPLERS), help="comma-separated subset")
    args = parser.parse_args(argv)
    base, out = Path(args.base), Path(args.out)
    names = [s for s in args.samplers.split(",") if s]
    if unknown := [s for s in names if s not in SAMPLERS]:
        parser.error(f"unknown sampler(s) {', '.join(unknown)}; known: {', '.join(SAMPLERS)}")
    if not 1 <= args.portraits <= 200:
        parser.error(f"--portraits must be 1 to 200, got {args.portraits}")
    if out.exists() and not out.is_dir():
        parser.error(f"{out} is a file; give a folder to write to")

    import diffusers

    from uniportrait.atomic import write_text_atomic
    from uniportrait.world.oracles import WorldOracles
    from uniportrait.world.report import (
        base_pipeline,
        contact_sheet,
        generate,
        held_out_specs,
        measure_pictures,
        reference_embeddings,
    )

    out.mkdir(parents=True, exist_ok=True)
    oracles, pipe = WorldOracles(), base_pipeline(base)
    config = pipe.scheduler.config
    specs, captions = held_out_specs(args.portraits, 1, seed=5)
    refs = reference_embeddings(oracles, specs)
    rows = []
    for name in names:
        cls, overrides, steps = SAMPLERS[name]
        pipe.scheduler = getattr(diffusers, cls).from_config(config, **overrides)
        start = time.perf_counter()
        images = generate(pipe, captions, args.seed, steps=steps)
        seconds = time.perf_counter() - start
        m = measure_pictures(oracles, images, specs, refs)
        keep = ("exact_face_count_rate", "prompt_following", "prompt_following_by_attribute")
        rows.append({"sampler": name, "seconds": round(seconds, 1), **{k: m[k] for k in keep}})
        rows[-1]["face_sim_own_reference"] = m["face_sim_own_reference"]
        print(json.dumps(rows[-1]), flush=True)
        contact_sheet(images[:24], captions[:24], out / f"{name}.png")
    write_text_atomic(out / "samplers.json", json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
