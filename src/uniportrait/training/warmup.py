"""Identity warm-up of the ID Q-Former before stage I (ours; not in the paper).

A freshly initialised Q-Former's tokens are mostly its learned queries: in the identity world
(docs/world.md) the part of the tokens that differs between people is a tenth of their norm
even after 2,000 steps of stage I, and nearest-neighbour identification of held-out people from
their tokens is 20% where the raw intrinsic features give 70%. The denoising loss then has
little identity to learn from, and identity use emerges slowly.

The warm-up trains the Q-Former alone, for a few hundred steps, to give two photos of one
person the same tokens and other people other tokens: a symmetric InfoNCE loss on the
flattened, normalised tokens of pairs of photos of ``batch`` people, with the structure branch
dropped, thinned and DropPath'ed exactly as stage I drops it. The identity tokens then carry
who the person is from the first stage-I step; stage I trains on from there unchanged. Needs a
dataset whose faces carry identity labels with at least two photos per person (the
``identities`` field of ``prepare-data``; every world render has them).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from uniportrait.errors import ConfigError

logger = logging.getLogger(__name__)

#: Temperature of the warm-up's InfoNCE loss (ours).
TEMPERATURE = 0.1


def labelled_people(dataset) -> list[list[tuple[int, int]]]:
    """Per identity label with at least two photos, its (row, face) entries in ``dataset``
    (:attr:`~uniportrait.training.data.PortraitDataset.by_label`)."""
    by_label = getattr(dataset, "by_label", None)
    people = [entries for entries in (by_label or {}).values() if len(entries) >= 2]
    if len(people) < 2:
        raise ConfigError(
            "train.id_warmup_steps needs a prepare-data folder whose faces carry identity labels, "
            f"at least two photos each for at least two people ({len(people)} found)"
        )
    return people


def photo_pairs(dataset, people: list, batch: int, rng: np.random.Generator) -> torch.Tensor:
    """Two different photos of each of ``batch`` different people: (2·batch, 224, 224, 3) uint8,
    the two photos of person k at rows 2k and 2k + 1."""
    crops = []
    for k in rng.choice(len(people), min(batch, len(people)), replace=False):
        entries = people[k]
        for e in rng.choice(len(entries), 2, replace=False):
            row, face = entries[e]
            crops.append(dataset.face_crop(row, face))
    return torch.from_numpy(np.stack(crops))


def identity_infonce(tokens: torch.Tensor, temperature: float = TEMPERATURE) -> tuple[torch.Tensor, float]:
    """Symmetric InfoNCE of (2P, Q, D) tokens whose rows 2k and 2k + 1 are one person.

    Returns (loss, accuracy of picking the other photo of each person among the P)."""
    z = F.normalize(tokens.flatten(1).float(), dim=1).view(-1, 2, tokens[0].numel())  # (P, 2, Q·D)
    logits = z[:, 0] @ z[:, 1].T / temperature  # (P, P)
    target = torch.arange(len(z), device=z.device)
    loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    accuracy = (logits.argmax(1) == target).float().mean().item()
    return loss, accuracy


def warm_up_identity(trainer: Any) -> list[dict[str, float]]:
    """Run the warm-up on ``trainer``'s Q-Former (in place); returns the logged rows.

    Deterministic from ``train.seed``: every process of a multi-process run computes the same
    update, so the replicas stay equal without communication.
    """
    from tqdm.auto import tqdm

    from uniportrait.identity import encode_face_features
    from uniportrait.models.qformer import drop_structure_tokens

    cfg, c = trainer.cfg, trainer.components
    t, data = cfg.train, cfg.data
    people = labelled_people(trainer.dataset)
    qformer = c.adapter.qformer
    optimizer = torch.optim.AdamW(qformer.parameters(), lr=t.id_warmup_lr, weight_decay=t.weight_decay)
    rng = np.random.default_rng([t.seed, 7919])
    cpu = torch.Generator().manual_seed(t.seed + 7919)
    rows, was_training = [], qformer.training
    qformer.train()
    # the main process shows it while INFO is logged (not under `uniportrait -q`)
    shown = trainer.accelerator.is_main_process and logger.isEnabledFor(logging.INFO)
    bar = tqdm(range(t.id_warmup_steps), desc="identity warm-up", disable=not shown)
    for step in bar:
        crops = photo_pairs(trainer.dataset, people, t.batch_size, rng)  # (2P, 224, 224, 3)
        pixels = crops.permute(0, 3, 1, 2).float() / 255.0
        with torch.no_grad():
            intrinsic, structure = encode_face_features(
                c.face_backbone, c.image_encoder, pixels, qformer.sizes.intrinsic
            )
        intrinsic, structure = intrinsic.to(trainer.device), structure.to(trainer.device)
        # the structure branch as stage I sees it: dropped, thinned or whole
        u = torch.rand(len(crops), generator=cpu)
        scale = (u >= data.structure_drop_all).float().to(trainer.device)  # (2P,)
        keep = drop_structure_tokens(structure, data.token_drop_ratio, generator=cpu)  # (2P, Ts)
        keep |= (u >= data.structure_drop_all + data.structure_drop_tokens).to(keep.device)[:, None]
        tokens = qformer(
            intrinsic, structure, structure_scale=scale, structure_keep=keep, generator=cpu
        )  # (2P, Q, D)
        loss, accuracy = identity_infonce(tokens)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % cfg.logging.every == 0 or step + 1 == t.id_warmup_steps:
            rows.append({"warmup_step": step + 1, "warmup_loss": loss.item(), "warmup_accuracy": accuracy})
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{accuracy:.2f}")
            logger.info("identity warm-up %d/%d loss=%.4g accuracy=%.3g", step + 1, t.id_warmup_steps,
                        loss.item(), accuracy)  # fmt: skip
    qformer.train(was_training)
    return rows


@torch.no_grad()
def token_identification(
    qformer,
    face_backbone,
    image_encoder,
    dataset,
    people: int = 48,
    structure_scale: float = 1.0,
    seed: int = 0,
) -> float:
    """How well identity tokens tell people apart: for ``people`` people of ``dataset`` (two
    photos each), the share whose second photo's tokens are the nearest (cosine, flattened) to
    their first photo's among all of them. Chance: 1 / ``people``."""
    from uniportrait.identity import encode_face_features, module_device_dtype

    crops = photo_pairs(dataset, labelled_people(dataset), people, np.random.default_rng(seed))
    intrinsic, structure = encode_face_features(
        face_backbone, image_encoder, crops.permute(0, 3, 1, 2) / 255.0, qformer.sizes.intrinsic
    )
    device, dtype = module_device_dtype(qformer)
    was_training = qformer.training
    qformer.eval()
    tokens = qformer(
        intrinsic.to(device, dtype), structure.to(device, dtype), structure_scale=structure_scale
    )
    qformer.train(was_training)
    return identity_infonce(tokens)[1]
