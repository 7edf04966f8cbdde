"""The routing loss of stage II (DESIGN §5) and how well routing matches the faces; the
face-weighted diffusion loss's pieces (:func:`face_share`, :func:`weighted_mse`).

For every cross-attention layer with ``N >= 2`` identities the router gives logits
``(B, L, N)`` over the layer's ``L = h·w`` positions. The targets are the N face masks at that
resolution: a position belongs to face ``n`` when at least half of its area lies inside the
mask (area interpolation), and the loss only counts positions inside the union of the masks::

    L_route = (1/N) · Σ_{positions in W} Σ_n (softmax(logits) − M)²  /  |W|

averaged over samples and layers. Dividing by ``|W|`` (the number of masked positions) makes
the loss independent of the layer's resolution, so λ = 0.1 weighs all layers alike; the paper's
``‖·‖²`` leaves that normalisation open.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class RoutingStats:
    """Routing loss and agreement with the true face masks, averaged over layers.

    Attributes:
        loss: the routing loss (scalar tensor with gradient).
        mass: mean probability (softmax of the logits) given to the right identity inside the
            face masks: 1/N for a router that ignores position, 1 for a perfect one.
        accuracy: fraction of masked positions whose arg-max identity is the right one (the
            routing used at inference).
    """

    loss: torch.Tensor
    mass: torch.Tensor
    accuracy: torch.Tensor


def routing_targets(masks: torch.Tensor, hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Face masks (B, N, H, W) bool at a layer's grid: M (B, N, L) float {0, 1}, union W (B, L) bool."""
    area = F.interpolate(masks.float(), size=hw, mode="area")  # (B, N, h, w) covered fraction
    target = (area >= 0.5).flatten(2)  # (B, N, L)
    return target.float(), target.any(dim=1)


def routing_loss(
    router_logits: list[tuple[torch.Tensor, tuple[int, int]]],
    masks: torch.Tensor,
    valid: torch.Tensor | None = None,
) -> RoutingStats:
    """Routing loss and agreement over the layers' recorded logits.

    Args:
        router_logits: what the processors appended to ``AttentionCall.router_logits``:
            ``(logits (B, L, N), (h, w))`` per cross-attention layer.
        masks: (B, N, H, W) bool face masks of the training image (any resolution).
        valid: (B,) bool, samples whose identities are real (not dropped for CFG); others are
            left out (their N identities are identical, so routing them is meaningless).
    """
    if not router_logits:
        raise ValueError("no router logits were recorded (fewer than two identities?)")
    losses, masses, accs = [], [], []
    for logits, hw in router_logits:
        target, union = routing_targets(masks.to(logits.device), hw)  # (B, N, L), (B, L)
        if valid is not None:
            union = union & valid.to(union.device)[:, None]
        weight = union[:, None].float()  # (B, 1, L)
        probs = logits.float().softmax(dim=-1).transpose(1, 2)  # (B, N, L)
        n = probs.shape[1]
        per_sample = ((probs - target) ** 2 * weight).sum(dim=(1, 2)) / n  # (B,)
        count = union.sum(dim=1)  # (B,)
        has = count > 0
        denom = has.sum().clamp(min=1)
        losses.append((per_sample / count.clamp(min=1))[has].sum() / denom)
        total = union.sum().clamp(min=1)
        masses.append(((probs * target).sum(dim=1) * union).sum() / total)
        hard = F.one_hot(probs.argmax(dim=1), n).transpose(1, 2).float()  # (B, N, L)
        accs.append(((hard * target).sum(dim=1).clamp(max=1) * union).sum() / total)
    return RoutingStats(
        torch.stack(losses).mean(), torch.stack(masses).mean().detach(), torch.stack(accs).mean()
    )


def face_share(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Face masks (B, N, H, W) at image size → (B, 1, h, w) ``size``: the share of each latent
    pixel inside any face (area interpolation)."""
    face = masks.float().amax(1, keepdim=True)  # (B, 1, H, W): any face
    return F.interpolate(face, size=size, mode="area")


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """MSE with per-pixel weights (broadcast to ``pred``, e.g. (B, 1, h, w)), normalised by their
    mean so the loss keeps its scale."""
    return ((pred - target).square() * weight).mean() / weight.mean()


def min_snr_weights(schedule, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ loss weights for ε-prediction (Hang et al., 2023): ``min(SNR(t), γ) / SNR(t)``
    per sample, (B,). Steps with little noise (SNR above γ) count less, so the loss is not spent
    on the finest detail at the expense of what the noisier steps decide."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(schedule, timesteps)
    return snr.clamp(max=gamma) / snr
