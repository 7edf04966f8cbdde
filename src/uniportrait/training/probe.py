"""Does an adapter use identity? The held-out identity probe (docs/world.md, issue 12's learning test).

For held-out pictures, the denoising MSE with each face's *own* identity features (taken from
another picture of the same person when the dataset has one, as the ID augmentation does) is
compared with the MSE with *another* person's features, at the same noise and timestep. The
mean paired difference (other − own), its standard error and z say whether identity is used:
zero when the identity tokens are ignored, positive when the adapter denoises a person better
with their own identity. Any dataset in the prepare-data format with identity labels works.

The routing probe asks whether a stage-II router sends face pixels to their own identity; the
leakage probe whether one person's identity changes another person's face (what blending is,
measured in the denoiser, where it does not depend on how recognisable generated faces are).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from uniportrait.training.data import collate

#: Config overrides for a probe's trainer: no condition dropout, and references always another
#: picture of the person (the ID augmentation at 1).
PROBE_OVERRIDES = (
    "data.id_drop=0", "data.text_drop=0", "data.structure_drop_all=0", "data.structure_drop_tokens=0",
    "data.id_augment=1.0",
)  # fmt: skip

#: The training model's inputs that carry identities (B, N, ...): what a probe swaps between people.
IDENTITY_INPUTS = ("intrinsic", "structure", "structure_scale", "structure_keep")


@torch.no_grad()
def identity_probe(
    trainer, count: int = 300, batch: int = 30, shift: int | None = None, seed: int = 0
) -> dict:
    """Paired own-vs-other identity MSE of ``trainer``'s model on ``trainer.dataset``.

    The trainer should be built with the dataset to probe and :data:`PROBE_OVERRIDES`. Each batch of ``batch`` consecutive
    pictures is paired with itself rolled by ``shift`` (default half the batch): the pictures must
    be ordered so that pictures ``shift`` apart show different people (``uniportrait world render``
    writes each identity's renders next to each other, fewer than ``batch // 2`` of them).

    Returns ``own_mse``, ``other_mse``, ``diff_mean``, ``diff_se``, ``relative`` and ``z``.
    """
    model = trainer.model.eval()
    shift = batch // 2 if shift is None else shift
    n = min(count, len(trainer.dataset)) // batch * batch
    if n < batch or not 0 < shift < batch:
        raise ValueError(f"identity probe: need at least {batch} pictures and 0 < shift < batch")
    own, other = [], []
    for start in range(0, n, batch):
        items = collate([trainer.dataset[(i, seed + i)] for i in range(start, start + batch)])
        inputs = trainer.prepare_inputs(items, seed=seed * 100_003 + start)
        own.append(model(**inputs)["diffusion_per_sample"].cpu())
        for key in IDENTITY_INPUTS:
            if inputs.get(key) is not None:
                inputs[key] = inputs[key].roll(shift, dims=0)
        other.append(model(**inputs)["diffusion_per_sample"].cpu())
    own_a, other_a = torch.cat(own).double().numpy(), torch.cat(other).double().numpy()
    diff = other_a - own_a
    se = float(diff.std(ddof=1) / math.sqrt(len(diff)))
    return {
        "pictures": int(len(diff)),
        "own_mse": float(own_a.mean()),
        "other_mse": float(other_a.mean()),
        "diff_mean": float(diff.mean()),
        "diff_se": se,
        "relative": float(diff.mean() / own_a.mean()),
        "z": float(diff.mean() / se) if se > 0 else float(np.sign(diff.mean()) * np.inf),
    }


def _group_batches(trainer, count: int, batch: int, seed: int, what: str):
    """The prepared inputs of ``trainer.dataset``'s first ``count`` pictures (whole batches) of two
    or more people, each batch's randomness seeded from ``seed`` and its position."""
    n = min(count, len(trainer.dataset)) // batch * batch
    if n < batch:
        raise ValueError(f"{what}: need at least {batch} pictures")
    for start in range(0, n, batch):
        items = collate([trainer.dataset[(i, seed + i)] for i in range(start, start + batch)])
        inputs = trainer.prepare_inputs(items, seed=seed * 100_003 + start)
        if inputs["masks"] is None:
            raise ValueError(f"{what}: the pictures need two or more people")
        yield inputs


@torch.no_grad()
def routing_probe(trainer, count: int = 120, batch: int = 20, seed: int = 0) -> dict:
    """How often the router sends face pixels to the right identity, on ``trainer.dataset``
    (pictures of two or more people with face masks): the share of face pixels whose hard routing
    is their own face's identity, averaged over cross-attention layers (``route_accuracy`` of the
    routing loss), per batch. Returns ``accuracy`` (mean over batches), ``se`` and ``chance``
    (1 / people per picture)."""
    model = trainer.model.eval()
    accs, people = [], []
    for inputs in _group_batches(trainer, count, batch, seed, "routing probe"):
        accs.append(float(model(**inputs)["route_accuracy"]))
        people.append(inputs["intrinsic"].shape[1])
    a = np.array(accs)
    return {
        "pictures": len(accs) * batch,
        "accuracy": float(a.mean()),
        "se": float(a.std(ddof=1) / math.sqrt(len(a))) if len(a) > 1 else 0.0,
        "chance": float(np.mean([1.0 / p for p in people])),
    }


#: What decides where each identity goes in :func:`leakage_probe`: the trained router, every
#: identity everywhere (no routing), or the ground-truth face masks (user masks).
LEAKAGE_ROUTINGS = ("router", "everywhere", "masks")


@torch.no_grad()
def leakage_probe(trainer, routing: str = "router", count: int = 120, batch: int = 20, seed: int = 0) -> dict:
    """How much of what one person's identity does lands on the *other* faces of the picture.

    For each picture of ``trainer.dataset`` (two or more people, face masks) and each person j,
    person j's identity features are replaced by another picture's person j (the batch rolled by
    one), everything else (noise, timestep, the other identities) the same, and the change Δ of
    the UNet's prediction is measured inside each face (face masks at latent size, area-weighted):
    ``own`` = mean Δ² inside face j, ``others`` = mean Δ² inside the other faces. ``leakage`` =
    Σ others / Σ own over the probe: 0 when identities stay in their own faces, about 1 or more
    when each identity spreads over every face (blending). ``routing``: one of
    :data:`LEAKAGE_ROUTINGS`. Returns ``leakage``, its ``se`` over batches, ``own`` and ``others``.
    """
    if routing not in LEAKAGE_ROUTINGS:
        raise ValueError(
            f"leakage probe: routing must be one of {', '.join(LEAKAGE_ROUTINGS)}, got {routing!r}"
        )
    model = trainer.model.eval()
    own_sums, other_sums = [], []
    for inputs in _group_batches(trainer, count, batch, seed, "leakage probe"):
        masks = inputs.pop("masks")  # (B, N, H, W); no routing loss here
        people = masks.shape[1]
        h, w = inputs["noisy_latents"].shape[-2:]
        face = F.interpolate(
            masks.float(), size=(h, w), mode="area"
        )  # (B, N, h, w) share of each latent pixel
        if routing == "everywhere":
            inputs["faceid_masks"] = torch.ones_like(face)
        elif routing == "masks":
            inputs["faceid_masks"] = face
        base = model(**inputs, keep_prediction=True)["prediction"]
        own, others = 0.0, 0.0
        for j in range(people):
            swapped = dict(inputs)
            for key in IDENTITY_INPUTS:
                if inputs.get(key) is not None:
                    value = inputs[key].clone()
                    value[:, j] = inputs[key][:, j].roll(1, dims=0)
                    swapped[key] = value
            delta = (
                (model(**swapped, keep_prediction=True)["prediction"] - base).square().mean(1)
            )  # (B, h, w)
            energy = (delta[:, None] * face).sum((2, 3)) / face.sum((2, 3)).clamp_min(1e-6)  # (B, N)
            own += float(energy[:, j].sum())
            others += float(torch.cat([energy[:, :j], energy[:, j + 1 :]], 1).mean(1).sum())
        own_sums.append(own)
        other_sums.append(others)
    o, t = np.array(own_sums), np.array(other_sums)
    ratios = t / np.maximum(o, 1e-30)
    n = len(own_sums) * batch
    return {
        "pictures": n,
        "routing": routing,
        "leakage": float(t.sum() / max(o.sum(), 1e-30)),
        "se": float(ratios.std(ddof=1) / math.sqrt(len(ratios))) if len(ratios) > 1 else 0.0,
        "own": float(o.sum() / (n * people)),
        "others": float(t.sum() / (n * people)),
    }
