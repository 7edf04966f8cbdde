"""Does a curriculum teach a base UNet the face's words while it keeps the world's?::

    python scripts/world_curriculum.py BASE OUT [--steps 1500] [--count 2000] [--lr 1e-4] [--save DIR]

The experiment docs/world.md ("Which caption words the base model uses") left untried. Fine-tunes
``BASE``'s UNet on batches that are half *face-focused* portraits and half the world's own
training portraits and captions (as ``world build`` draws them). In the face-focused half, the
face's attributes (expression, tilt, hat, sunglasses) are drawn evenly and every caption says
every attribute; the rest (shirt, background, lighting, style) starts pinned to one value and is
let go in three stages: pinned, each attribute free half the time, all free (a free attribute is
drawn as the world draws it, and still said). AdamW, plain ε-MSE, batch 32, 10% empty captions,
a 50-step warm-up and a cosine decay, no EMA.

Before and after, on 200 held-out world captions (seed 0, DDIM 25, CFG 7.5): one face, plain and
balanced prompt following per attribute (``report.measure_pictures``); after, the word probe on
the world's held-out captions (``word_probe.word_probe``, 300 portraits per attribute, of the
fine-tuned base saved in fp32). Writes ``OUT/curriculum.json``; ``--save DIR`` keeps the base.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

# the arguments and encoding a base fine-tune shares, from the script beside this one
from world_single_factor import check_fine_tune_args, encode_portraits, fine_tune_parser

FACE = ("expression", "tilt", "hat", "sunglasses")
REST = {"look": ("clothing",), "scene": ("background", "lighting", "style")}
STAGES = 3
PROBED = ("tilt", "expression", "sunglasses", "hat", "background")


def face_focused_specs(count: int, freedom: float, seed: int):
    """``count`` one-person training specs: the face's attributes even, the rest pinned to their
    first value or, each with probability ``freedom``, drawn as the world draws it; every
    attribute said."""
    from uniportrait.world.scenes import caption, identity_number, sample_spec
    from uniportrait.world.traits import PERSON_ATTRIBUTES

    rng = np.random.default_rng([seed, int(freedom * 100)])
    specs, captions = [], []
    for _ in range(count):
        look = {name: int(rng.integers(len(PERSON_ATTRIBUTES[name]))) for name in FACE}
        look |= {name: 0 for name in REST["look"] if rng.random() >= freedom}
        scene = {name: 0 for name in REST["scene"] if rng.random() >= freedom}
        ident = identity_number(int(rng.integers(4000)), False)
        spec = sample_spec(
            rng, [ident], seed=int(rng.integers(1 << 31)), mention_p=1.0, look=look, scene=scene
        )
        specs.append(spec)
        captions.append(caption(spec, rng))
    return specs, captions


def world_specs(count: int, seed: int):
    """``count`` ordinary training portraits with their captions, as the build draws them."""
    from uniportrait.world.scenes import caption, identity_number, sample_spec

    rng = np.random.default_rng([seed, 99])
    specs, captions = [], []
    for _ in range(count):
        spec = sample_spec(
            rng, [identity_number(int(rng.integers(4000)), False)], seed=int(rng.integers(1 << 31))
        )
        specs.append(spec)
        captions.append(caption(spec, rng))
    return specs, captions


def main(argv=None) -> int:
    parser = fine_tune_parser(__doc__, "curriculum.json", 1500, "portraits per pool", 1e-4)
    args = parser.parse_args(argv)
    base, out = check_fine_tune_args(parser, args, min_steps=STAGES, min_count=16)

    import torch
    from diffusers import DDPMScheduler
    from tqdm import tqdm

    from uniportrait.atomic import write_text_atomic
    from uniportrait.world.oracles import WorldOracles
    from uniportrait.world.report import base_pipeline, generate, held_out_specs, measure_pictures, save_base
    from uniportrait.world.train_base import denoising_step, tokenize
    from uniportrait.world.word_probe import word_probe

    torch.manual_seed(0)
    pipe, oracles = base_pipeline(base), WorldOracles()
    schedule = DDPMScheduler.from_config(pipe.scheduler.config)

    pools = [
        encode_portraits(pipe, *face_focused_specs(args.count, k / (STAGES - 1), seed=1))
        for k in range(STAGES)
    ]
    z_world, c_world = encode_portraits(pipe, *world_specs(args.count, seed=2))
    with torch.no_grad():
        null = pipe.text_encoder(tokenize(pipe.tokenizer, [""]))[0]
    example = face_focused_specs(1, 0.0, seed=1)[1][0], face_focused_specs(1, 1.0, seed=1)[1][0]
    test_specs, test_captions = held_out_specs(200, 1, seed=5)
    refs = [np.zeros((1, oracles.models["face"].config.embedding_dim), np.float32)] * len(test_specs)

    def measure(unet) -> dict:
        pipe.unet = unet.eval()
        images = generate(pipe, test_captions, seed=0)
        m = measure_pictures(oracles, images, test_specs, refs)
        keys = ("exact_face_count_rate", "prompt_following", "prompt_following_balanced")
        return {k: m[k] for k in keys} | {
            "by_attribute": m["prompt_following_by_attribute"],
            "balanced_by_attribute": m["prompt_following_balanced_by_attribute"],
        }

    result = {"steps": args.steps, "count": args.count, "lr": args.lr, "examples": example}
    result["before"] = measure(pipe.unet)
    print("before", json.dumps(result["before"]), flush=True)
    unet = pipe.unet.train().requires_grad_(True)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.01)
    warmup = min(50, args.steps // 10)
    decay = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda i: (
            (i + 1) / warmup
            if i < warmup
            else 0.5 * (1 + np.cos(np.pi * (i - warmup) / (args.steps - warmup)))
        ),
    )
    gen = torch.Generator().manual_seed(0)
    losses = []
    for step in tqdm(range(args.steps), desc="curriculum"):
        z_face, c_face = pools[min(STAGES - 1, step * STAGES // args.steps)]
        a = torch.randint(len(z_face), (16,), generator=gen)
        b = torch.randint(len(z_world), (16,), generator=gen)
        z0, cond = torch.cat([z_face[a], z_world[b]]), torch.cat([c_face[a], c_world[b]])
        drop = torch.rand(32, generator=gen) < 0.1
        cond = torch.where(drop[:, None, None], null.expand_as(cond), cond)
        losses.append(float(denoising_step(unet, schedule, z0, cond, gen)))
        opt.step()
        decay.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % 100 == 0:
            print(f"step {step + 1} loss {np.mean(losses[-100:]):.4f}", flush=True)
    result["loss_by_stage"] = [float(np.mean(part)) for part in np.array_split(losses, STAGES)]
    result["after"] = measure(unet)
    print("after", json.dumps(result["after"]), flush=True)
    saved = save_base(base, unet, Path(args.save) if args.save else out / "base")
    result["word_probe_after"] = word_probe(saved, list(PROBED), count=300)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "curriculum.json", json.dumps(result, indent=2))
    if not args.save:
        shutil.rmtree(saved)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
