"""Does a base model's denoiser use a caption's words for an attribute? (docs/world.md, "Which
caption words the base model uses")

For held-out portraits whose caption mentions the attribute, the denoising error (ε-prediction
MSE) is measured twice at the same noise and timestep: with the caption as written, and with that
attribute's phrase swapped for the next value's ("smiling" → "with an open mouth"). A denoiser that
reads the words predicts worse with the wrong ones; one that ignores them predicts the same. The
*gain* is the mean of (MSE with the wrong words − MSE with the right ones) over pictures, as a
share of the mean right-words MSE, per timestep, with its standard error and z.

This asks the base model what the identity probe (``uniportrait.training.probe.identity_probe``)
asks the adapter: whether a condition lowers the loss, apart from whether the pictures show it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

#: Timesteps probed by default: from nearly clean (50) to nearly pure noise (900) of 1,000.
PROBE_TIMESTEPS = (50, 150, 300, 500, 700, 900)


def swapped_caption(caption: str, name: str, value: int) -> str | None:
    """``caption`` with the phrase of ``name`` at ``value`` replaced by the next value's phrase; None
    when the caption does not say that phrase."""
    from uniportrait.world.scenes import PHRASES, phrase

    said = phrase(name, value)
    if said not in caption:
        return None
    return caption.replace(said, phrase(name, (value + 1) % len(PHRASES[name])), 1)


def probe_cases(name: str, count: int, seed: int = 11) -> list[tuple]:
    """Up to ``count`` held-out portraits whose caption says ``name``: (spec, caption, swapped)."""
    from uniportrait.world.report import held_out_specs

    specs, captions = held_out_specs(max(4 * count, 100), 1, seed=seed)
    cases = []
    for spec, text in zip(specs, captions):
        asked = spec.requested()
        asked = {**asked["scene"], **asked["people"][0]}  # what the caption says: {name: value}
        other = swapped_caption(text, name, asked[name]) if name in asked else None
        if other is not None:
            cases.append((spec, text, other))
        if len(cases) == count:
            break
    return cases


@torch.no_grad()
def word_probe(
    base: str | Path,
    attributes=("tilt", "expression", "background", "clothing"),
    count: int = 300,
    timesteps=PROBE_TIMESTEPS,
    seed: int = 0,
    batch: int = 100,
) -> dict[str, dict]:
    """The word probe of the base folder ``base`` (a diffusers SD pipeline folder), per attribute:
    ``{"pictures": n, "timesteps": {t: {"gain", "se", "z"}}}``; see the module docstring."""
    from diffusers import DDPMScheduler

    from uniportrait.errors import UniPortraitError
    from uniportrait.presets.pipelines import world_base_folder
    from uniportrait.world.report import base_pipeline
    from uniportrait.world.scenes import PHRASED_ATTRIBUTES
    from uniportrait.world.train_base import to_pixels, tokenize

    base = world_base_folder(base)  # a WeightsNotFoundError (a UniPortraitError) if it is none
    unknown = [a for a in attributes if a not in PHRASED_ATTRIBUTES]
    if not attributes:
        raise UniPortraitError(f"no attribute to probe; give some of {list(PHRASED_ATTRIBUTES)}")
    if unknown:
        raise UniPortraitError(f"no phrase to swap for {unknown}; one of {list(PHRASED_ATTRIBUTES)}")
    pipe = base_pipeline(base)
    vae, unet, text_encoder, tokenizer = pipe.vae, pipe.unet, pipe.text_encoder, pipe.tokenizer
    schedule = DDPMScheduler.from_config(pipe.scheduler.config)  # the base's betas, for add_noise
    result = {}
    for name in attributes:
        cases = probe_cases(name, count)
        images = np.stack([spec.render().image for spec, _, _ in cases])
        z0 = vae.encode(to_pixels(images)).latent_dist.mean * vae.config.scaling_factor  # (n, 4, h, w)
        right = text_encoder(tokenize(tokenizer, [c for _, c, _ in cases]))[0]  # (n, 77, D)
        wrong = text_encoder(tokenize(tokenizer, [w for _, _, w in cases]))[0]
        rows = word_gains(unet, schedule, z0, right, wrong, timesteps, seed, batch)
        result[name] = {"pictures": len(cases), "timesteps": rows}
    return result


@torch.no_grad()
def word_gains(unet, schedule, z0, right, wrong, timesteps=PROBE_TIMESTEPS, seed: int = 0, batch: int = 100):
    """Per timestep, ``{"gain", "se", "z"}`` of denoising latents ``z0`` (n, C, h, w) with text
    states ``wrong`` against ``right`` (n, L, D), at the same noise (from ``seed``) and timestep."""
    gen = torch.Generator().manual_seed(seed)
    rows = {}
    for t in timesteps:
        noise = torch.randn(z0.shape, generator=gen)
        tt = torch.full((len(z0),), int(t))
        noisy = schedule.add_noise(z0, noise, tt)
        errors = [_errors(unet, noisy, tt, states, noise, batch) for states in (right, wrong)]  # 2 × (n,)
        diff = (errors[1] - errors[0]) / errors[0].mean()  # (n,)
        se = float(diff.std() / len(diff) ** 0.5)
        rows[int(t)] = {"gain": float(diff.mean()), "se": se, "z": float(diff.mean()) / max(se, 1e-12)}
    return rows


@torch.no_grad()
def held_out_error(base: str | Path, count: int = 600, seed: int = 0, batch: int = 100) -> torch.Tensor:
    """Per picture, the base's ε-prediction MSE on ``count`` held-out portraits with their own
    captions, at uniform random timesteps: (count,). The noise and timesteps depend only on
    ``seed`` and ``count``, so two bases' errors are paired picture by picture (docs/world.md,
    "A base trained twice as long")."""
    from diffusers import DDPMScheduler

    from uniportrait.presets.pipelines import world_base_folder
    from uniportrait.world.report import base_pipeline, held_out_specs
    from uniportrait.world.train_base import to_pixels, tokenize

    base = world_base_folder(base)  # a WeightsNotFoundError (a UniPortraitError) if it is none
    pipe = base_pipeline(base)
    specs, captions = held_out_specs(count, 1, seed=11)
    images = np.stack([spec.render().image for spec in specs])
    z0 = pipe.vae.encode(to_pixels(images)).latent_dist.mean * pipe.vae.config.scaling_factor  # (n, 4, h, w)
    states = pipe.text_encoder(tokenize(pipe.tokenizer, captions))[0]  # (n, 77, D)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(z0.shape, generator=gen)
    t = torch.randint(0, pipe.scheduler.config.num_train_timesteps, (len(z0),), generator=gen)
    noisy = DDPMScheduler.from_config(pipe.scheduler.config).add_noise(z0, noise, t)
    return _errors(pipe.unet, noisy, t, states, noise, batch)


def _errors(unet, noisy, t, states, noise, batch: int) -> torch.Tensor:
    """Per picture, the ε-prediction MSE of ``unet`` on ``noisy`` (n, C, h, w) with text ``states``."""
    parts = []
    for k in range(0, len(noisy), batch):
        part = slice(k, k + batch)
        pred = unet(noisy[part], t[part], encoder_hidden_states=states[part]).sample
        parts.append((pred - noise[part]).pow(2).mean((1, 2, 3)))
    return torch.cat(parts)
