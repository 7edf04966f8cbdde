"""Can a base UNet learn to draw one attribute when it is the only thing its captions change?::

    python scripts/world_single_factor.py BASE OUT --attribute tilt [--steps 500] [--count 2000]

A controlled fine-tune (docs/world.md, "Which caption words the base model uses"). Portraits of
random training identities at random places and sizes, with every other attribute pinned (the
first value of each: neutral, no hat, no sunglasses, the first shirt colour, background, lighting
and style) and ``--attribute`` drawn uniformly; every caption says all of them, so only that
attribute's words change between captions. ``BASE``'s UNet is fine-tuned on them (AdamW, plain
ε-MSE, batch 32, no EMA), and before and after it is asked, on 300 held-out people in the same
setting: the word probe (the denoising error with the attribute's phrase swapped for the next
value's, against the right one; ``word_probe.word_gains``), and what it draws (60 pictures per
value, DDIM 25, CFG 7.5, the oracle's balanced accuracy on the attribute). Writes
``OUT/single_factor.json``; with ``--save DIR``, also the fine-tuned base (``BASE`` with the new
UNet, fp32), e.g. for ``scripts/world_word_probe.py`` on the world's own captions.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import numpy as np

from uniportrait.cli._common import world_base_arg


def controlled_specs(attribute: str, count: int, held_out: bool, seed: int):
    """``count`` one-person specs, every attribute pinned but ``attribute`` (uniform); captions say all."""
    from uniportrait.world.scenes import caption, identity_number, sample_spec
    from uniportrait.world.traits import PERSON_ATTRIBUTES, SCENE_ATTRIBUTES

    rng = np.random.default_rng([seed, int(held_out)])
    pool = 200 if held_out else 4000
    specs, captions = [], []
    for k in range(count):
        look = {name: 0 for name in PERSON_ATTRIBUTES}
        scene = {name: 0 for name in SCENE_ATTRIBUTES}
        values = {**PERSON_ATTRIBUTES, **SCENE_ATTRIBUTES}[attribute]
        (look if attribute in PERSON_ATTRIBUTES else scene)[attribute] = k % len(values)
        ident = identity_number(int(rng.integers(pool)), held_out)
        spec = sample_spec(rng, [ident], seed=int(rng.integers(1 << 31)), look=look, scene=scene)
        specs.append(spec)
        captions.append(caption(spec, rng))
    return specs, captions


def fine_tune_parser(
    doc: str, result: str, steps: int, count_help: str, lr: float
) -> argparse.ArgumentParser:
    """The arguments a base fine-tuning script shares (this one's and world_curriculum.py's)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument(
        "base", type=world_base_arg, help="a world base folder (a diffusers SD pipeline folder)"
    )
    parser.add_argument("out", help=f"folder to write {result} to")
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--count", type=int, default=2000, help=f"{count_help} (default 2000)")
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--save", default=None, metavar="DIR", help="keep the fine-tuned base folder here")
    return parser


def check_fine_tune_args(parser, args, min_steps: int = 1, min_count: int = 1) -> tuple[Path, Path]:
    """(base, out) of :func:`fine_tune_parser`'s arguments, checked before anything is loaded."""
    base, out = Path(args.base), Path(args.out)
    if args.save and Path(args.save).exists():
        parser.error(f"{args.save} exists; give a new folder for the fine-tuned base")
    if out.exists() and not out.is_dir():
        parser.error(f"{out} is a file; give a folder to write to")
    if args.steps < min_steps or args.count < min_count or not 0 < args.lr <= 1:
        parser.error(f"--steps must be at least {min_steps}, --count at least {min_count}, --lr in (0, 1]")
    return base, out


def encode_portraits(pipe, specs, captions):
    """Rendered ``specs``' latents (the VAE's mean, scaled) and their captions' text states."""
    import torch

    from uniportrait.world.train_base import to_pixels, tokenize

    with torch.no_grad():
        images = np.stack([s.render().image for s in specs])
        z0 = (
            pipe.vae.encode_portraits(pipe, to_pixels(images)).latent_dist.mean
            * pipe.vae.config.scaling_factor
        )
        return z0, pipe.text_encoder(tokenize(pipe.tokenizer, captions))[0]


def main(argv=None) -> int:
    parser = fine_tune_parser(__doc__, "single_factor.json", 500, "training portraits", 2e-4)
    parser.add_argument("--attribute", default="tilt")
    args = parser.parse_args(argv)
    base, out = check_fine_tune_args(parser, args)
    from uniportrait.world.scenes import PHRASED_ATTRIBUTES

    if args.attribute not in PHRASED_ATTRIBUTES:
        parser.error(f"--attribute must be one of {list(PHRASED_ATTRIBUTES)}")

    import torch
    from diffusers import DDPMScheduler
    from tqdm import tqdm

    from uniportrait.atomic import write_text_atomic
    from uniportrait.evaluation.prompt_following import balanced_accuracy, confusion_counts
    from uniportrait.world.oracles import WorldOracles
    from uniportrait.world.report import attribute_reads, base_pipeline, generate, save_base
    from uniportrait.world.train_base import denoising_step, tokenize
    from uniportrait.world.word_probe import swapped_caption, word_gains

    pipe, oracles = base_pipeline(base), WorldOracles()
    schedule = DDPMScheduler.from_config(pipe.scheduler.config)

    train_specs, train_captions = controlled_specs(args.attribute, args.count, held_out=False, seed=1)
    z_train, c_train = encode_portraits(pipe, train_specs, train_captions)
    with torch.no_grad():
        null = pipe.text_encoder(tokenize(pipe.tokenizer, [""]))[0]
    probe_specs, probe_captions = controlled_specs(args.attribute, 300, held_out=True, seed=2)
    asked = [{**s.requested()["scene"], **s.requested()["people"][0]}[args.attribute] for s in probe_specs]
    wrong_captions = [swapped_caption(c, args.attribute, v) for c, v in zip(probe_captions, asked)]
    z_probe, right = encode_portraits(pipe, probe_specs, probe_captions)
    with torch.no_grad():
        wrong = pipe.text_encoder(tokenize(pipe.tokenizer, wrong_captions))[0]
    draw_specs, draw_captions = controlled_specs(args.attribute, 180, held_out=True, seed=3)

    def measure(unet) -> dict:
        pipe.unet = unet.eval()
        gains = word_gains(unet, schedule, z_probe, right, wrong)
        images = generate(pipe, draw_captions, seed=0)
        detections = [oracles.detect(image) for image in images]
        counts = confusion_counts(attribute_reads(oracles, images, draw_specs, detections))
        return {
            "word_probe": gains,
            "one_face": float(np.mean([len(d) == 1 for d in detections])),
            "balanced_accuracy": balanced_accuracy(counts[args.attribute]),
            "counts": {
                str(a): {str(r): n for r, n in reads.items()} for a, reads in counts[args.attribute].items()
            },
        }

    result = {"attribute": args.attribute, "steps": args.steps, "example_caption": train_captions[0]}
    result["before"] = measure(pipe.unet)
    print("before", json.dumps(result["before"]), flush=True)
    unet = copy.deepcopy(pipe.unet).train().requires_grad_(True)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)
    for _ in tqdm(range(args.steps), desc="fine-tune"):
        idx = torch.randint(len(z_train), (32,), generator=gen)
        cond = c_train[idx]
        drop = torch.rand(32, generator=gen) < 0.1
        cond = torch.where(drop[:, None, None], null.expand_as(cond), cond)
        denoising_step(unet, schedule, z_train[idx], cond, gen)
        opt.step()
        opt.zero_grad(set_to_none=True)
    result["after"] = measure(unet)
    print("after", json.dumps(result["after"]), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "single_factor.json", json.dumps(result, indent=2))
    if args.save:
        save_base(base, unet, Path(args.save))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
