"""Attention processors that inject identity tokens into a diffusers UNet.

One processor class serves every attention layer of the UNet. Self-attention layers carry only
the two LoRA sets; cross-attention layers also carry the identity projections
(``to_k_faceid``/``to_v_faceid``), the optional IP-Adapter projections and the ID router.
Parameter names match the published checkpoints (DESIGN §7), so conversion is a renaming of
layer indices only.

Nothing here is module-level state. A request's settings travel as a :class:`AttentionCall`
passed in ``cross_attention_kwargs={"uniportrait": call}``; with no call (or ``None``) a
processor computes plain attention, which is what the ControlNet sees.

Cost per denoising step (see ``docs/performance.md``): the LoRA set can be *fused* into the
projection weights for a call (:mod:`uniportrait.models.fusion`, ``AttentionCall.fused``);
everything that depends only on the call (identity and image-prompt keys/values, resized masks)
is computed at the first step and reused (inference only); all identities share one SDPA call;
branches whose scale is 0 are skipped.

Shapes: ``B`` batch (CFG halves included), ``L`` query positions, ``N`` identities,
``T`` tokens per identity, ``D`` cross-attention width, ``h`` the layer's inner width,
``H`` heads, ``d = h / H``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from uniportrait.models.fusion import FusedLoRA

LoRASetName = Literal["none", "single", "multi"]


class LoRALinear(nn.Module):
    """Low-rank residual ``up(down(x))``: ``down`` (r, in), ``up`` (out, r), both bias-free."""

    def __init__(self, in_features: int, out_features: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=False)
        nn.init.normal_(self.down.weight, std=1.0 / rank)
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x.to(self.down.weight.dtype))).to(x.dtype)

    def delta_weight(self) -> torch.Tensor:
        """The dense (out, in) update this LoRA adds to a Linear's weight."""
        return self.up.weight @ self.down.weight


class RoutingRecorder:
    """Accumulates routing maps of one call, resized to the latent grid.

    ``maps`` is (B, N, h_lat, w_lat): the sum over layers and steps; ``count`` the number of
    maps added. Owned by one call, so concurrent calls never share it.
    """

    def __init__(self, latent_hw: tuple[int, int]) -> None:
        self.latent_hw = latent_hw
        self.maps: torch.Tensor | None = None
        self.count = 0

    def add(self, weights: torch.Tensor, hw: tuple[int, int]) -> None:
        """weights: (B, N, L) with L = hw[0] * hw[1]."""
        b, n, _ = weights.shape
        grid = weights.detach().float().reshape(b, n, *hw)
        grid = F.interpolate(grid, size=self.latent_hw, mode="nearest")
        self.maps = grid if self.maps is None else self.maps + grid
        self.count += 1

    def mean(self) -> torch.Tensor | None:
        return None if self.maps is None else self.maps / self.count


@dataclass(frozen=True)
class StyleSharing:
    """StyleAligned's shared self-attention, for one call (Hertz et al., 2024).

    The batch is ``groups`` equal blocks of consecutive rows (the halves of classifier-free
    guidance); the last row of each block is the style reference. In every self-attention layer
    each row's queries and keys are AdaIN-normalised to the reference's statistics (per head and
    channel, over positions), and each row attends to its own positions and to the reference's;
    ``scale`` weighs the reference's keys (``log scale`` added to their logits). The reference
    row's own output is unchanged.
    """

    groups: int
    scale: float = 1.0

    def share(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(B, H, L, d) each → query, keys (B, H, 2L, d), values (B, H, 2L, d), logit bias or None."""
        b, _, length, _ = key.shape
        if b % self.groups:
            raise ValueError(f"StyleSharing: batch {b} is not {self.groups} equal blocks")
        block = b // self.groups
        ref = (
            torch.arange(self.groups, device=key.device).repeat_interleave(block) * block + block - 1
        )  # (B,)
        query = _adain(query, query[ref])
        key = _adain(key, key[ref])
        keys = torch.cat([key, key[ref]], dim=2)
        values = torch.cat([value, value[ref]], dim=2)
        bias = None
        if self.scale != 1.0:
            bias = torch.zeros(1, 1, 1, 2 * length, device=key.device, dtype=query.dtype)
            bias[..., length:] = math.log(self.scale) if self.scale > 0 else float("-inf")
        return query, keys, values, bias


def _adain(x: torch.Tensor, ref: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``x`` with the mean and standard deviation of ``ref`` over positions: (B, H, L, d)."""
    mean, std = x.mean(2, keepdim=True), x.std(2, keepdim=True) + eps
    return (x - mean) / std * (ref.std(2, keepdim=True) + eps) + ref.mean(2, keepdim=True)


@dataclass
class AttentionCall:
    """Per-call settings for every processor, passed through ``cross_attention_kwargs``.

    Attributes:
        id_tokens: (B, N, T, D) identity tokens (Q-Former outputs), or None.
        faceid_scale: weight of the identity attention.
        ip_tokens: (B, T_ip, D) IP-Adapter image tokens, or None.
        ip_scale: weight of the image-prompt attention.
        ip_mask: (1 or B, 1, h, w) where the image prompt applies, or None.
        faceid_masks: (1 or B, N, h, w) soft masks that replace the router, or None.
        lora: which LoRA set is active ("none", "single" or "multi").
        lora_scale: weight of the active LoRA set.
        latent_hw: the latent grid (h, w) of this call, to recover each layer's 2-D size.
        routing_recorder: collects routing maps when the caller asks for them.
        gumbel_tau: when set, routing samples hard Gumbel-softmax with a straight-through
            gradient (training); when None, routing is the hard arg-max (inference).
        generator: RNG for the Gumbel noise.
        router_logits: when a list, each router appends (logits (B, L, N), (h, w)) to it
            (for the routing loss in training).
        fused: the active LoRA set already fused into the projection weights
            (:class:`~uniportrait.models.fusion.FusedLoRA`, inference only); processors it
            covers use those weights instead of adding the LoRA, the others add it as usual.
        shared_rows: how many leading rows of ``id_tokens`` give every identity the same tokens
            (the unconditional half of CFG), when the caller knows it; None → found from the
            tokens (a host sync per call). Such rows skip the router.
        style: StyleAligned's shared self-attention (:class:`StyleSharing`), or None.

    Under ``torch.no_grad`` the call also keeps what every step would recompute identically
    (identity keys/values, resized masks); it belongs to one call, so do not change its
    tensors in place between UNet evaluations.
    """

    id_tokens: torch.Tensor | None = None
    faceid_scale: float = 1.0
    ip_tokens: torch.Tensor | None = None
    ip_scale: float = 0.0
    ip_mask: torch.Tensor | None = None
    faceid_masks: torch.Tensor | None = None
    lora: LoRASetName = "none"
    lora_scale: float = 1.0
    latent_hw: tuple[int, int] | None = None
    routing_recorder: RoutingRecorder | None = None
    gumbel_tau: float | None = None
    generator: torch.Generator | None = None
    router_logits: list | None = field(default=None, repr=False)
    fused: FusedLoRA | None = field(default=None, repr=False)
    shared_rows: int | None = None
    style: StyleSharing | None = None
    _memo: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def num_ids(self) -> int:
        return 0 if self.id_tokens is None else self.id_tokens.shape[1]

    def memo(self, key: Any, sources: tuple, build: Callable[[], Any]) -> Any:
        """``build()``, computed once per call for ``key`` while ``sources`` are the same objects.

        Only under ``torch.no_grad`` (a cached tensor must not carry one step's graph into the
        next); with gradients enabled ``build()`` runs every time.
        """
        if torch.is_grad_enabled():
            return build()
        hit = self._memo.get(key)
        if hit is not None and len(hit[0]) == len(sources) and all(a is b for a, b in zip(hit[0], sources)):
            return hit[1]
        value = build()
        self._memo[key] = (sources, value)
        return value


def layer_grid(num_positions: int, latent_hw: tuple[int, int] | None) -> tuple[int, int]:
    """The (h, w) of a layer with ``num_positions`` tokens inside a UNet run on ``latent_hw``.

    UNet downsampling halves each side rounding up, so we halve the latent grid until the
    number of positions matches. Without a latent size, a square grid is assumed.
    """
    if latent_hw is not None:
        h, w = latent_hw
        while h * w > num_positions and (h > 1 or w > 1):
            h, w = (h + 1) // 2, (w + 1) // 2
        if h * w == num_positions:
            return h, w
    side = math.isqrt(num_positions)
    if side * side != num_positions:
        raise ValueError(f"cannot infer the 2-D grid of {num_positions} positions; pass latent_hw")
    return side, side


def resize_masks(masks: torch.Tensor, hw: tuple[int, int], batch: int) -> torch.Tensor:
    """(1 or B, C, h0, w0) masks → (B, C, L) at the layer's grid (bilinear)."""
    resized = F.interpolate(masks.float(), size=hw, mode="bilinear", align_corners=False)
    return resized.flatten(2).expand(batch, -1, -1)


def _accumulate(total: torch.Tensor, extra: torch.Tensor, scale: float) -> torch.Tensor:
    """``total + scale * extra``; in place when no graph is being recorded."""
    if torch.is_grad_enabled():
        return total + scale * extra
    return total.add_(extra, alpha=scale)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, S, h) → (B, H, S, d)."""
    batch, length, inner = x.shape
    return x.view(batch, length, heads, inner // heads).transpose(1, 2)


class UniPortraitAttnProcessor(nn.Module):
    """Attention with LoRA sets, and (cross-attention only) identity / IP-Adapter / router paths.

    Args:
        query_dim: width of the layer's hidden states (= inner width for SD UNets).
        inner_dim: width of q/k/v (``attn.to_q.out_features``).
        context_dim: width of the encoder states (cross) or ``query_dim`` (self).
        cross: whether this is a cross-attention layer (``attn2``).
        rank: LoRA rank; 0 disables the LoRA sets.
        multi_id: add the multi-ID LoRA set and, for cross layers, the router.
        ip_adapter: add the IP-Adapter projections (cross layers).
        num_id_tokens: tokens per identity (the router aggregates over them).
    """

    def __init__(
        self,
        query_dim: int,
        inner_dim: int,
        context_dim: int,
        cross: bool,
        rank: int = 128,
        multi_id: bool = True,
        ip_adapter: bool = False,
        num_id_tokens: int = 16,
        ignore_call: bool = False,
    ) -> None:
        super().__init__()
        self.cross = cross
        self.ignore_call = ignore_call
        if rank > 0:
            for prefix in ("", "multi_id_") if multi_id else ("",):
                setattr(self, f"to_q_{prefix}lora", LoRALinear(query_dim, inner_dim, rank))
                setattr(self, f"to_k_{prefix}lora", LoRALinear(context_dim, inner_dim, rank))
                setattr(self, f"to_v_{prefix}lora", LoRALinear(context_dim, inner_dim, rank))
                setattr(self, f"to_out_{prefix}lora", LoRALinear(inner_dim, query_dim, rank))
        if not cross:
            return
        if ip_adapter:
            self.to_k_ip = nn.Linear(context_dim, inner_dim, bias=False)
            self.to_v_ip = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_k_faceid = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v_faceid = nn.Linear(context_dim, inner_dim, bias=False)
        if multi_id:
            self.to_q_router = nn.Sequential(
                nn.Linear(query_dim, 2 * query_dim),
                nn.GELU(),
                nn.Linear(2 * query_dim, inner_dim, bias=False),
            )
            self.to_k_router = nn.Sequential(
                nn.Linear(context_dim, 2 * context_dim),
                nn.GELU(),
                nn.Linear(2 * context_dim, inner_dim, bias=False),
            )
            self.aggr_router = nn.Linear(num_id_tokens, 1)

    @classmethod
    def text_only(cls) -> UniPortraitAttnProcessor:
        """Plain attention over the text only, ignoring any per-call settings (for ControlNet)."""
        return cls(
            query_dim=1, inner_dim=1, context_dim=1, cross=False, rank=0, multi_id=False, ignore_call=True
        )

    # -- helpers -------------------------------------------------------------------------------

    def lora_modules(self, which: LoRASetName) -> dict[str, LoRALinear] | None:
        """The LoRA layers of set ``which`` keyed by projection ("q", "k", "v", "out")."""
        if which == "none":
            return None
        prefix = "" if which == "single" else "multi_id_"
        mods = {p: getattr(self, f"to_{p}_{prefix}lora", None) for p in ("q", "k", "v", "out")}
        if mods["q"] is None:
            raise ValueError(f"this adapter has no {which}-ID LoRA set")
        return mods

    @staticmethod
    def _project(
        linear: nn.Linear,
        fused_weight: torch.Tensor | None,
        lora: dict[str, LoRALinear] | None,
        key: str,
        x: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """``linear(x) + scale · lora[key](x)``, or ``x @ fused_weightᵀ + bias`` when fused."""
        if fused_weight is not None:
            return F.linear(x, fused_weight, linear.bias)
        out = linear(x)
        if lora is not None and scale != 0.0:
            out = out + scale * lora[key](x)
        return out

    def _fused_weights(self, call: AttentionCall | None) -> tuple[torch.Tensor, ...] | None:
        """This layer's (W_q, W_k, W_v, W_out) with the call's LoRA set folded in, if it has them."""
        if call is None or call.fused is None:
            return None
        if call.fused.which != call.lora or call.fused.scale != call.lora_scale:
            raise ValueError(
                f"AttentionCall.fused holds the {call.fused.which!r} LoRA set at scale {call.fused.scale}, "
                f"but the call asks for {call.lora!r} at {call.lora_scale}"
            )
        return call.fused.get(self)

    # -- the call ------------------------------------------------------------------------------

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        uniportrait: AttentionCall | None = None,
    ) -> torch.Tensor:
        call = None if self.ignore_call else uniportrait
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, num_keys, _ = context.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, num_keys, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)

        # The active LoRA set: fused into the weights for this call, or added as low-rank terms.
        fused = self._fused_weights(call)
        lora = self.lora_modules(call.lora) if call is not None and fused is None else None
        lora_scale = call.lora_scale if call is not None else 0.0
        w_q, w_k, w_v, w_out = fused if fused is not None else (None, None, None, None)

        heads = attn.heads
        query = _heads(self._project(attn.to_q, w_q, lora, "q", hidden_states, lora_scale), heads)
        key = _heads(self._project(attn.to_k, w_k, lora, "k", context, lora_scale), heads)
        value = _heads(self._project(attn.to_v, w_v, lora, "v", context, lora_scale), heads)
        if attn.norm_q is not None:  # query, key, value: (B, H, L or S, d)
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if not self.cross and call is not None and call.style is not None and attention_mask is None:
            query, key, value, attention_mask = call.style.share(query, key, value)

        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=attn.scale)
        if self.cross and call is not None:
            out = self._add_conditioning(out, attn, hidden_states, query, call)
        out = out.transpose(1, 2).flatten(2).to(query.dtype)  # (B, L, h)

        out = self._project(attn.to_out[0], w_out, lora, "out", out, lora_scale)
        out = attn.to_out[1](out)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _add_conditioning(
        self, out: torch.Tensor, attn, hidden_states: torch.Tensor, query: torch.Tensor, call: AttentionCall
    ) -> torch.Tensor:
        """``out`` + IP-Adapter and identity attention, all (B, H, L, d)."""
        batch, heads, num_q, _ = query.shape
        hw = None
        if call.ip_tokens is not None and call.ip_scale != 0.0:
            if not hasattr(self, "to_k_ip"):
                raise ValueError("an image prompt was given but no IP-Adapter weights are loaded")
            k_ip, v_ip = call.memo(
                (self, "ip_kv", query.dtype),
                (call.ip_tokens,),
                lambda: self._keys_values(
                    call.ip_tokens[:, None], self.to_k_ip, self.to_v_ip, heads, query.dtype
                ),
            )
            ip_out = F.scaled_dot_product_attention(query, k_ip, v_ip, scale=attn.scale)  # (B, H, L, d)
            if call.ip_mask is not None:
                hw = layer_grid(num_q, call.latent_hw)
                mask = call.memo(
                    ("ip_mask", hw, batch, query.dtype),
                    (call.ip_mask,),
                    lambda: resize_masks(call.ip_mask, hw, batch)[:, :, :, None].to(query.dtype),
                )  # (B, 1, L, 1)
                ip_out = ip_out * mask
            out = _accumulate(out, ip_out, call.ip_scale)

        if call.id_tokens is not None and call.faceid_scale != 0.0:
            out = _accumulate(out, self._identity(attn, hidden_states, query, call, hw), call.faceid_scale)
        return out

    @staticmethod
    def _keys_values(
        tokens: torch.Tensor, to_k: nn.Linear, to_v: nn.Linear, heads: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N, T, D) tokens → keys and values (B, H, N·T, d), identity-major along the tokens."""
        batch, n_ids, n_tok, _ = tokens.shape
        tokens = tokens.to(dtype)

        def project(linear: nn.Linear) -> torch.Tensor:
            x = linear(tokens)  # (B, N, T, h)
            x = x.view(batch, n_ids, n_tok, heads, -1).permute(0, 3, 1, 2, 4)  # (B, H, N, T, d)
            return x.reshape(batch, heads, n_ids * n_tok, -1)

        return project(to_k), project(to_v)

    def _identity(
        self,
        attn,
        hidden_states: torch.Tensor,
        query: torch.Tensor,
        call: AttentionCall,
        hw: tuple[int, int] | None,
    ) -> torch.Tensor:
        """Σₙ routingₙ ⊙ Attn(q, K_idₙ, V_idₙ): (B, H, L, d)."""
        batch, heads, num_q, _ = query.shape
        tokens = call.id_tokens  # (B, N, T, D)
        n_ids, n_tok = tokens.shape[1], tokens.shape[2]
        k_id, v_id = call.memo(
            (self, "faceid_kv", query.dtype),
            (tokens,),
            lambda: self._keys_values(tokens, self.to_k_faceid, self.to_v_faceid, heads, query.dtype),
        )  # (B, H, N·T, d)
        if n_ids == 1:
            return F.scaled_dot_product_attention(query, k_id, v_id, scale=attn.scale)

        hw = hw or layer_grid(num_q, call.latent_hw)
        if call.faceid_masks is not None:  # soft user masks replace the router
            weights = call.memo(
                ("faceid_masks", hw, batch), (call.faceid_masks,), lambda: _normalised(call, hw, batch)
            )
            return self._weighted(query, k_id, v_id, weights, n_ids, attn.scale)
        if call.gumbel_tau is not None:  # training: straight-through Gumbel routing
            weights, logits = self.route(hidden_states, tokens.to(query.dtype), call)
            self._report(call, weights, logits, hw)
            return self._weighted(query, k_id, v_id, weights, n_ids, attn.scale)

        # Hard routing: each position attends to its identity's T tokens only. That is one SDPA
        # call over all N·T tokens with a mask keeping, per position, its identity's block.
        # Rows whose identities all carry the same tokens (the unconditional half of CFG) get the
        # same output whatever the routing, so the router runs on the other rows only.
        if call.router_logits is not None:
            shared = 0
        elif call.shared_rows is not None:
            shared = call.shared_rows
        else:
            shared = call.memo("shared_rows", (tokens,), lambda: _shared_rows(tokens))
        index = torch.zeros(batch, num_q, dtype=torch.long, device=query.device)  # (B, L)
        if shared < batch:
            routed = call.memo(
                ("routed_tokens", shared, query.dtype), (tokens,), lambda: tokens[shared:].to(query.dtype)
            )
            weights, logits = self.route(hidden_states[shared:], routed, call)
            index[shared:] = weights.argmax(1)
            if call.routing_recorder is not None or call.router_logits is not None:
                full = weights.new_full((batch, n_ids, num_q), 1.0 / n_ids)
                full[shared:] = weights
                self._report(call, full, logits, hw)
        owner = call.memo(
            ("token_owner", n_ids, n_tok, query.device),
            (),
            lambda: torch.arange(n_ids, device=query.device).repeat_interleave(n_tok),
        )  # (N·T,)
        mask = index[:, None, :, None] == owner  # (B, 1, L, N·T)
        return F.scaled_dot_product_attention(query, k_id, v_id, attn_mask=mask, scale=attn.scale)

    @staticmethod
    def _weighted(
        query: torch.Tensor,
        k_id: torch.Tensor,
        v_id: torch.Tensor,
        weights: torch.Tensor,
        n_ids: int,
        scale: float | None,
    ) -> torch.Tensor:
        """Σₙ weightsₙ ⊙ Attn(q, K_idₙ, V_idₙ) for soft weights (B, N, L): (B, H, L, d)."""
        n_tok = k_id.shape[2] // n_ids
        weights = weights.to(query.dtype)[:, :, None, :, None]  # (B, N, 1, L, 1)
        out = 0.0
        for n in range(n_ids):
            block = slice(n * n_tok, (n + 1) * n_tok)
            attended = F.scaled_dot_product_attention(
                query, k_id[:, :, block], v_id[:, :, block], scale=scale
            )
            out = out + weights[:, n] * attended
        return out

    @staticmethod
    def _report(
        call: AttentionCall, weights: torch.Tensor, logits: torch.Tensor, hw: tuple[int, int]
    ) -> None:
        if call.routing_recorder is not None:
            call.routing_recorder.add(weights, hw)
        if call.router_logits is not None:
            call.router_logits.append((logits, hw))

    def _router_keys(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """ϕ(W_aggr F) mapped through θ's last layer: (B, N, 2C), and its bias term (B, N) or None."""
        aggregated = self.aggr_router(tokens.transpose(-1, -2)).squeeze(-1)  # (B, N, D)
        r_key = self.to_k_router(aggregated)  # (B, N, h)
        last = self.to_q_router[2]
        bias = None if last.bias is None else r_key @ last.bias
        return r_key @ last.weight, bias

    def route(
        self, hidden_states: torch.Tensor, tokens: torch.Tensor, call: AttentionCall
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Routing map (B, N, L), one-hot over identities at each position, and the logits (B, L, N).

        hidden_states: (B, L, C) the layer's input; tokens: (B, N, T, D).
        """
        if not hasattr(self, "to_q_router"):
            raise ValueError("several identities need the router weights, which are not loaded")
        # θ(Z)·ϕ(F) with θ = W₂·GELU(W₁Z + b₁) equals GELU(W₁Z + b₁)·(W₂ᵀϕ(F)): the last layer of
        # θ moves to the identity side (N vectors per call instead of a matrix product per position).
        first, act, last = self.to_q_router
        r_key, r_bias = call.memo((self, "router_keys"), (tokens,), lambda: self._router_keys(tokens))
        r_query = act(first(hidden_states))  # (B, L, 2C)
        logits = torch.bmm(r_query, r_key.transpose(1, 2))  # (B, L, N)
        if r_bias is not None:
            logits = logits + r_bias[:, None, :]
        if call.gumbel_tau is None:
            index = logits.argmax(dim=-1, keepdim=True)
            hard = torch.zeros_like(logits).scatter_(-1, index, 1.0)
            return hard.transpose(1, 2), logits
        uniform = torch.rand(logits.shape, generator=call.generator, device=logits.device, dtype=logits.dtype)
        gumbel = -torch.log(-torch.log(uniform.clamp(1e-10, 1.0 - 1e-7)))
        soft = torch.softmax((logits + gumbel) / call.gumbel_tau, dim=-1)
        hard = torch.zeros_like(soft).scatter_(-1, soft.argmax(dim=-1, keepdim=True), 1.0)
        return (hard - soft.detach() + soft).transpose(1, 2), logits  # straight-through


class AttachedProcessor:
    """What :meth:`UniPortraitAdapter.attach` installs on a UNet attention layer.

    A plain callable holding a reference to the adapter's processor, so that the processor is
    *not* registered as a submodule of the UNet: the UNet's ``state_dict`` stays exactly its own
    (``ControlNetModel.from_unet``, ``save_pretrained`` and offloading see the base model), and
    the adapter's weights live in the adapter only. The signature names ``uniportrait`` so
    diffusers' ``Attention`` passes the per-call settings through ``cross_attention_kwargs``.
    """

    def __init__(self, processor: UniPortraitAttnProcessor) -> None:
        self.processor = processor

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        uniportrait: AttentionCall | None = None,
    ) -> torch.Tensor:
        return self.processor(attn, hidden_states, encoder_hidden_states, attention_mask, temb, uniportrait)

    def __repr__(self) -> str:
        return f"AttachedProcessor({type(self.processor).__name__})"


def _normalised(call: AttentionCall, hw: tuple[int, int], batch: int) -> torch.Tensor:
    """User masks at the layer's grid, normalised across identities: (B, N, L)."""
    weights = resize_masks(call.faceid_masks, hw, batch)
    return weights / weights.sum(1, keepdim=True).clamp(min=1e-3)


def _shared_rows(tokens: torch.Tensor) -> int:
    """How many leading rows of ``tokens`` (B, N, T, D) give every identity the same tokens."""
    same = (tokens == tokens[:, :1]).flatten(1).all(dim=1).tolist()  # (B,)
    return next((i for i, s in enumerate(same) if not s), len(same))
