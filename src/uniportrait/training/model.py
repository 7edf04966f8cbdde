"""The module one training forward pass runs (and DDP wraps): Q-Former → UNet → losses.

The frozen encoders (VAE, text, face backbone, CLIP) run outside, in the trainer, without
gradients. What remains here is everything the trained parameters touch, so that one
``accelerator.prepare``-d module covers them for DDP/FSDP.

Randomness inside the forward pass (DropPath in the Q-Former, the Gumbel noise of the router;
in eval mode neither: DropPath is off and routing is the inference's hard arg-max) comes from the global RNG, forked and seeded from ``rng_seed`` for the duration of the call:
gradient checkpointing restores the global RNG state when it recomputes a block, so the
recomputed routing equals the original one (an explicit generator would have moved on).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from uniportrait.models.adapter import UniPortraitAdapter
from uniportrait.models.attention import AttentionCall
from uniportrait.training.losses import face_share, routing_loss, weighted_mse


class TrainingModel(nn.Module):
    """UNet (frozen, adapter attached) + adapter; computes the stage's losses.

    Args:
        unet: the UNet with ``adapter`` attached.
        adapter: the adapter; its Q-Former is trained in stage I only.
        stage: 1 or 2.
        gumbel_tau: temperature of the straight-through Gumbel routing (N >= 2).
        routing_loss_weight: λ of the routing loss.
        face_loss_weight: weight of face pixels in the diffusion loss (1.0: plain MSE).
        single_loss_weight: weight of the loss of a single-ID batch passed with ``single``.
    """

    def __init__(
        self,
        unet: nn.Module,
        adapter: UniPortraitAdapter,
        stage: int,
        gumbel_tau: float = 1.0,
        routing_loss_weight: float = 0.1,
        face_loss_weight: float = 1.0,
        single_loss_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.unet = unet
        self.adapter = adapter
        self.stage = stage
        self.gumbel_tau = gumbel_tau
        self.routing_loss_weight = routing_loss_weight
        self.face_loss_weight = face_loss_weight
        self.single_loss_weight = single_loss_weight
        # weight of identity attention; training uses 1.0 (the inference default), evaluation
        # probes may set another (scripts/world_identity_probe.py --faceid-scale)
        self.faceid_scale = 1.0

    def train(self, mode: bool = True) -> TrainingModel:
        """Only the trained parts change mode; the frozen UNet (and in stage II the Q-Former)
        stay in eval mode."""
        self.training = mode
        self.adapter.train(mode)
        self.adapter.qformer.train(mode and self.stage == 1)
        self.unet.eval()
        return self

    def identity_tokens(
        self,
        intrinsic: torch.Tensor,
        structure: torch.Tensor,
        structure_scale: torch.Tensor,
        structure_keep: torch.Tensor | None,
    ) -> torch.Tensor:
        """(B, N, Ti, C), (B, N, Ts, C'), scale (B, N), keep (B, N, Ts) → tokens (B, N, Q, D)."""
        b, n = intrinsic.shape[:2]
        qformer = self.adapter.qformer
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.stage == 1):
            tokens = qformer(
                intrinsic.flatten(0, 1),
                structure.flatten(0, 1),
                structure_scale=structure_scale.flatten(),
                structure_keep=None if structure_keep is None else structure_keep.flatten(0, 1),
            )  # (B*N, Q, D)
        return tokens.view(b, n, *tokens.shape[1:])

    def forward(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        text_states: torch.Tensor,
        intrinsic: torch.Tensor,
        structure: torch.Tensor,
        structure_scale: torch.Tensor,
        target: torch.Tensor,
        rng_seed: int,
        structure_keep: torch.Tensor | None = None,
        masks: torch.Tensor | None = None,
        route_valid: torch.Tensor | None = None,
        added_cond: dict[str, torch.Tensor] | None = None,
        faceid_masks: torch.Tensor | None = None,
        keep_prediction: bool = False,
        single: dict[str, Any] | None = None,
    ) -> dict[str, torch.Tensor]:
        """One forward pass.

        Args:
            noisy_latents: (B, C, h, w); timesteps: (B,); text_states: (B, S, D).
            intrinsic, structure: (B, N, Ti, C_id), (B, N, Ts, C_st) face features.
            structure_scale: (B, N) weight of each identity's structure branch (0 = dropped).
            structure_keep: (B, N, Ts) bool DropToken mask, or None.
            target: (B, C, h, w) what the UNet should predict (ε or v).
            rng_seed: seeds DropPath and the routing noise of this call.
            masks: (B, N, H, W) bool face masks (stage II routing loss; the face-weighted loss).
            route_valid: (B,) bool samples whose identities were not dropped.
            added_cond: SDXL's ``added_cond_kwargs``.
            faceid_masks: (B, N, h, w) masks that replace the router, as inference's user masks
                (probes; pass ``masks=None`` with them: there is no routing to supervise).
            keep_prediction: also return the UNet's ``prediction`` (B, C, h, w), detached.
            single: the arguments of a second pass on a single-ID batch (``data.single_path``),
                in this same call so that DDP sees one forward; its loss is added with
                ``single_loss_weight``.

        Returns:
            ``loss`` (to minimise), ``diffusion``, and with N >= 2 ``routing``,
            ``route_mass``, ``route_accuracy`` (all scalars); ``diffusion_per_sample`` (B,);
            with ``single``, ``single_diffusion``.
        """
        n = intrinsic.shape[1]
        devices = [noisy_latents.device] if noisy_latents.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(rng_seed)
            tokens = self.identity_tokens(intrinsic, structure, structure_scale, structure_keep)
            call = AttentionCall(
                id_tokens=tokens,
                faceid_scale=self.faceid_scale,
                lora="single" if n == 1 else "multi",
                latent_hw=tuple(noisy_latents.shape[-2:]),
                gumbel_tau=self.gumbel_tau if n >= 2 and self.training else None,
                router_logits=[] if n >= 2 else None,
                faceid_masks=faceid_masks,
            )
            kwargs: dict[str, Any] = {"cross_attention_kwargs": {"uniportrait": call}, "return_dict": False}
            if added_cond is not None:
                kwargs["added_cond_kwargs"] = added_cond
            pred = self.unet(noisy_latents, timesteps, encoder_hidden_states=text_states, **kwargs)[0]
        per_sample = (pred.float() - target.float()).square().mean((1, 2, 3))  # (B,)
        diffusion = per_sample.mean()
        out = {"diffusion": diffusion.detach(), "diffusion_per_sample": per_sample.detach()}
        if keep_prediction:
            out["prediction"] = pred.detach()
        loss = diffusion
        if self.face_loss_weight != 1.0 and masks is not None:
            loss = face_weighted_mse(pred.float(), target.float(), masks, self.face_loss_weight)
        if n >= 2 and masks is not None:
            stats = routing_loss(call.router_logits, masks, route_valid)
            loss = loss + self.routing_loss_weight * stats.loss
            out.update(routing=stats.loss.detach(), route_mass=stats.mass, route_accuracy=stats.accuracy)
        if single is not None:
            if intrinsic.shape[1] < 2 or single["intrinsic"].shape[1] != 1:
                raise ValueError("single is a single-ID batch passed beside a multi-ID one")
            portraits = self.forward(**single)
            loss = loss + self.single_loss_weight * portraits["loss"]
            out["single_diffusion"] = portraits["diffusion"]
        out["loss"] = loss
        return out


def sample_timesteps(
    count: int, num_train_timesteps: int, sampling: str, generator: torch.Generator, device
) -> torch.Tensor:
    """(count,) int64 training timesteps in [0, T): uniform, or ``"cubic"``: t = ⌊(1 − u³)·T⌋ with
    u uniform, which puts 79% of them in the noisier half (``train.timestep_sampling``)."""
    if sampling == "uniform":
        return torch.randint(0, num_train_timesteps, (count,), generator=generator, device=device)
    if sampling == "cubic":
        u = torch.rand(count, generator=generator, device=device)
        return ((1 - u**3) * num_train_timesteps).long().clamp_(0, num_train_timesteps - 1)
    raise ValueError(f"unknown timestep sampling {sampling!r}")


def face_weighted_mse(
    pred: torch.Tensor, target: torch.Tensor, masks: torch.Tensor, weight: float
) -> torch.Tensor:
    """MSE with face pixels weighing ``weight`` and the rest 1, normalised by the mean weight.

    pred, target: (B, C, h, w); masks: (B, N, H, W) face masks at image size."""
    w = 1.0 + (weight - 1.0) * face_share(masks, pred.shape[-2:])  # (B, 1, h, w)
    return weighted_mse(pred, target, w)
