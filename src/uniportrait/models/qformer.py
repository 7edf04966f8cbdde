"""The ID Q-Former: turns face features into identity tokens for the UNet.

Sixteen learned queries attend, layer by layer, to the *intrinsic* identity tokens (last
stage of the face-recognition backbone) and to the *face-structure* tokens (earlier backbone
stages ‖ CLIP patch features), the latter scaled by ``structure_scale``. The parameter names
follow the published ``uniportrait-faceid_sd15.bin`` (``faceid_proj`` part), so that file
loads with strict keys.

Training-time regularisation of the structure branch is built in: DropPath on the structure
attention output (``drop_path_rate``) and DropToken through a key-padding mask
(:func:`drop_structure_tokens`).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import register_to_config
from torch import nn

from uniportrait.errors import ConfigError
from uniportrait.models._loading import config_from_dict
from uniportrait.models._mixins import SizedModelMixin

logger = logging.getLogger(__name__)


#: What can feed the intrinsic branch (see ``QFormerConfig.intrinsic``).
INTRINSIC_SOURCES = ("stage", "embedding")


@dataclass
class QFormerConfig:
    """Sizes of the ID Q-Former; the defaults match the published SD1.5 weights.

    Attributes:
        dim: width of queries and output tokens (the UNet cross-attention dim).
        id_dim: channels of the intrinsic tokens (face backbone last stage).
        structure_dim: channels of the structure tokens (448 backbone + 1280 CLIP).
        num_queries: number of learned queries = output tokens per identity.
        depth: number of layers.
        heads, dim_head: attention heads and width per head.
        ff_mult: feed-forward hidden width = ``ff_mult * dim``.
        id_hidden_mult: ``proj_id`` hidden width = ``id_hidden_mult * id_dim``.
        structure_hidden_mult: ``proj_clip`` hidden width = ``structure_hidden_mult * structure_dim``.
        drop_path_rate: per-sample probability of dropping the structure attention output
            in each layer during training (0 disables DropPath).
        intrinsic: what feeds the intrinsic branch: ``"stage"`` (the backbone's last-stage map
            as h×w tokens, the paper's and the published weights') or ``"embedding"`` (the
            backbone's recognition embedding as one token; the paper's global-embedding
            ablation, docs/world.md). ``id_dim`` must then be the embedding's width.
    """

    dim: int = 768
    id_dim: int = 512
    structure_dim: int = 1728
    num_queries: int = 16
    depth: int = 6
    heads: int = 12
    dim_head: int = 64
    ff_mult: int = 4
    id_hidden_mult: int = 2
    structure_hidden_mult: int = 2
    drop_path_rate: float = 0.0
    intrinsic: str = "stage"

    def __post_init__(self) -> None:
        sizes = {k: v for k, v in self.to_dict().items() if k not in ("drop_path_rate", "intrinsic")}
        bad = [k for k, v in sizes.items() if not isinstance(v, int) or v < 1]
        if bad:
            raise ConfigError(f"QFormerConfig: {', '.join(bad)} must be positive integers")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ConfigError(f"QFormerConfig: drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if self.intrinsic not in INTRINSIC_SOURCES:
            raise ConfigError(
                f"QFormerConfig: intrinsic must be one of {', '.join(INTRINSIC_SOURCES)}, got {self.intrinsic!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QFormerConfig:
        """Build from a dict; unknown keys raise ``ValueError`` naming them."""
        return config_from_dict(cls, d)


def drop_path(
    x: torch.Tensor, rate: float, training: bool, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Stochastic depth: zero whole samples of ``x`` (B, ...) with probability ``rate``.

    Kept samples are rescaled by ``1 / (1 - rate)`` so the expectation is unchanged. Identity
    when not training or ``rate == 0``.
    """
    if not training or rate == 0.0:
        return x
    keep_prob = 1.0 - rate
    draw_device = generator.device if generator is not None else x.device
    draws = torch.rand(x.shape[0], generator=generator, device=draw_device).to(x.device)  # (B,)
    keep = (draws < keep_prob).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))  # (B, 1, ...)
    return x * keep / keep_prob


def drop_structure_tokens(
    structure: torch.Tensor, ratio: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """DropToken keep mask for the structure branch (training only).

    Each token is kept independently with probability ``1 - ratio``; a sample that would lose
    every token keeps one at random.

    Args:
        structure: (B, Ts, C) structure tokens (only the shape and device are used).
        ratio: drop probability per token, in [0, 1].
        generator: source of randomness (its device is used for the draws).

    Returns:
        (B, Ts) bool mask, True = keep; pass it as ``structure_keep`` to :class:`IDQFormer`.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"token drop ratio must be in [0, 1], got {ratio}")
    b, t = structure.shape[0], structure.shape[1]
    draw_device = generator.device if generator is not None else structure.device
    draws = torch.rand(b, t, generator=generator, device=draw_device)  # (B, Ts)
    keep = draws >= ratio  # (B, Ts)
    # Rescue empty rows by keeping their token with the largest draw (a uniform pick).
    empty = ~keep.any(dim=1)  # (B,)
    rescue = F.one_hot(draws.argmax(dim=1), t).bool() & empty[:, None]  # (B, Ts)
    return (keep | rescue).to(structure.device)


class PerceiverAttention(nn.Module):
    """Queries attend to [features ‖ queries] (Perceiver-resampler style, no biases).

    Keys/values come from one ``to_kv`` projection of the concatenated, normalised tokens;
    the first half of its output is K, the second half V.
    """

    def __init__(self, dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        inner = heads * dim_head
        self.norm1 = nn.LayerNorm(dim)  # on the features
        self.norm2 = nn.LayerNorm(dim)  # on the queries
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(
        self, x: torch.Tensor, queries: torch.Tensor, keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Attend.

        Args:
            x: (B, T, dim) feature tokens.
            queries: (B, Q, dim) query tokens.
            keep: optional (B, T) bool key-padding mask for ``x`` (True = attend); the queries
                are always attended.

        Returns:
            (B, Q, dim) attention output (before any residual).
        """
        b, q_len, _ = queries.shape
        x = self.norm1(x)  # (B, T, dim)
        queries = self.norm2(queries)  # (B, Q, dim)
        q = self.to_q(queries)  # (B, Q, h*dh)
        k, v = self.to_kv(torch.cat([x, queries], dim=1)).chunk(2, dim=-1)  # 2 × (B, T+Q, h*dh)

        def split_heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, t.shape[1], self.heads, self.dim_head).transpose(1, 2)  # (B, h, L, dh)

        q, k, v = split_heads(q), split_heads(k), split_heads(v)
        attn_mask = None
        if keep is not None:
            if keep.shape != x.shape[:2]:
                raise ValueError(f"keep mask must have shape {tuple(x.shape[:2])}, got {tuple(keep.shape)}")
            keep_all = torch.cat([keep.bool(), keep.new_ones(b, q_len, dtype=torch.bool)], dim=1)  # (B, T+Q)
            attn_mask = keep_all[:, None, None, :]  # (B, 1, 1, T+Q)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, h, Q, dh)
        out = out.transpose(1, 2).reshape(b, q_len, self.heads * self.dim_head)  # (B, Q, h*dh)
        return self.to_out(out)  # (B, Q, dim)


def _feed_forward(dim: int, mult: int) -> nn.Sequential:
    # Indices matter: .0 LayerNorm, .1 Linear, .2 GELU, .3 Linear (published key layout).
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, mult * dim, bias=False),
        nn.GELU(),
        nn.Linear(mult * dim, dim, bias=False),
    )


def _mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))


class IDQFormer(SizedModelMixin):
    """ID embedding Q-Former: (intrinsic, structure) face features → ``num_queries`` tokens.

    Parameter names follow the published layout: ``latents``, ``proj_id.{0,2}``,
    ``proj_clip.{0,2}``, ``layers.{l}.{0: intrinsic attention, 1: structure attention,
    2: feed-forward}``, ``proj_out``, ``norm_out``.
    """

    sizes_class = QFormerConfig

    @register_to_config
    def __init__(
        self,
        dim: int = QFormerConfig.dim,
        id_dim: int = QFormerConfig.id_dim,
        structure_dim: int = QFormerConfig.structure_dim,
        num_queries: int = QFormerConfig.num_queries,
        depth: int = QFormerConfig.depth,
        heads: int = QFormerConfig.heads,
        dim_head: int = QFormerConfig.dim_head,
        ff_mult: int = QFormerConfig.ff_mult,
        id_hidden_mult: int = QFormerConfig.id_hidden_mult,
        structure_hidden_mult: int = QFormerConfig.structure_hidden_mult,
        drop_path_rate: float = QFormerConfig.drop_path_rate,
        intrinsic: str = QFormerConfig.intrinsic,
    ) -> None:
        super().__init__()
        self._init_sizes()  # self.sizes: the QFormerConfig (drop_path_rate may be changed for training)
        config = self.sizes
        dim = config.dim
        self.latents = nn.Parameter(torch.randn(1, config.num_queries, dim) * dim**-0.5)  # (1, Q, dim)
        self.proj_id = _mlp(config.id_dim, config.id_hidden_mult * config.id_dim, dim)
        self.proj_clip = _mlp(config.structure_dim, config.structure_hidden_mult * config.structure_dim, dim)
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    PerceiverAttention(dim, config.heads, config.dim_head),
                    PerceiverAttention(dim, config.heads, config.dim_head),
                    _feed_forward(dim, config.ff_mult),
                ]
            )
            for _ in range(config.depth)
        )
        self.proj_out = nn.Linear(dim, dim)
        self.norm_out = nn.LayerNorm(dim)

    def forward(
        self,
        intrinsic: torch.Tensor,
        structure: torch.Tensor,
        structure_scale: float | torch.Tensor = 1.0,
        structure_keep: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Compute identity tokens.

        Args:
            intrinsic: (B, Ti, id_dim) intrinsic-ID tokens (49 per reference photo; one with
                ``intrinsic="embedding"``).
            structure: (B, Ts, structure_dim) face-structure tokens (256 per reference photo).
            structure_scale: weight of the structure branch, a float or a (B,) tensor; 0 for a
                sample removes the branch's influence on it. A float 0.0 in eval mode skips the
                branch entirely (same result, less work).
            structure_keep: optional (B, Ts) bool mask of structure tokens to attend (DropToken).
            generator: randomness for DropPath (training only).

        Returns:
            (B, num_queries, dim) identity tokens.
        """
        cfg = self.sizes
        if intrinsic.ndim != 3 or intrinsic.shape[-1] != cfg.id_dim:
            raise ValueError(f"intrinsic must be (B, T, {cfg.id_dim}), got {tuple(intrinsic.shape)}")
        if structure.ndim != 3 or structure.shape[-1] != cfg.structure_dim:
            raise ValueError(f"structure must be (B, T, {cfg.structure_dim}), got {tuple(structure.shape)}")
        if structure.shape[0] != intrinsic.shape[0]:
            raise ValueError(
                f"batch sizes differ: intrinsic {intrinsic.shape[0]}, structure {structure.shape[0]}"
            )
        b = intrinsic.shape[0]
        dtype = self.latents.dtype

        skip_structure = (
            isinstance(structure_scale, (int, float)) and structure_scale == 0.0 and not self.training
        )
        if isinstance(structure_scale, torch.Tensor):
            if structure_scale.ndim not in (0, 1) or structure_scale.numel() not in (1, b):
                raise ValueError(f"structure_scale must be a float or a ({b},) tensor")
            scale: float | torch.Tensor = structure_scale.to(self.latents.device, dtype).reshape(-1, 1, 1)
        else:
            scale = float(structure_scale)

        id_tokens = self.proj_id(intrinsic.to(dtype))  # (B, Ti, dim)
        struct_tokens = None if skip_structure else self.proj_clip(structure.to(dtype))  # (B, Ts, dim)
        q = self.latents.expand(b, -1, -1)  # (B, Q, dim)
        for attn_id, attn_struct, ff in self.layers:
            q = q + attn_id(id_tokens, q)  # (B, Q, dim)
            if struct_tokens is not None:
                s = attn_struct(struct_tokens, q, keep=structure_keep)  # (B, Q, dim)
                q = q + scale * drop_path(s, cfg.drop_path_rate, self.training, generator)
            q = q + ff(q)  # (B, Q, dim)
        return self.norm_out(self.proj_out(q))  # (B, Q, dim)
