"""LoRA fusion for inference: ``W' = W + s · up @ down`` as separate tensors, never written back.

Adding a rank-r LoRA as two extra matrix products on every projection of every attention layer
costs ``r · (in + out)`` multiply-adds per row; folding it into the weight makes it free. The
UNet's own weights are never modified: the fused tensors are new tensors that the processors use
for one pipeline call (``AttentionCall.fused``), so the loaded weights stay bit-identical, a call
that raises leaves nothing to undo, and concurrent calls never see each other's weights.

:class:`LoRAFusion` (one per pipeline) keeps the fused weights of one LoRA set for one scale,
rebuilt when the set, the scale, or any weight involved changes (a tensor's identity, storage
or in-place version). Concurrent calls of the same set share it; a call that needs another set
waits until the calls using the current one have finished, so memory holds at most one set
(for SD1.5 the attention projections: about 11% of the UNet's weights).
"""

from __future__ import annotations

import threading
import weakref
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from uniportrait.models.adapter import PROCESSOR_SUFFIX
from uniportrait.models.attention import LoRASetName, UniPortraitAttnProcessor

PROJECTIONS = ("q", "k", "v", "out")
FusedWeights = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True, eq=False)
class FusedLoRA:
    """Fused (q, k, v, out) weights of one LoRA set, for the processors that could be fused.

    Attributes:
        which: the LoRA set ("single" or "multi").
        scale: the LoRA scale folded in.
        weights: processor → (W_q, W_k, W_v, W_out), each shaped like the base weight.
    """

    which: LoRASetName
    scale: float
    weights: Mapping[nn.Module, FusedWeights]

    def get(self, processor: nn.Module) -> FusedWeights | None:
        return self.weights.get(processor)

    @property
    def nbytes(self) -> int:
        """Memory held by the fused tensors."""
        return sum(w.numel() * w.element_size() for ws in self.weights.values() for w in ws)


def _linears(attn: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module]:
    return attn.to_q, attn.to_k, attn.to_v, attn.to_out[0]


def fusable_layers(unet: nn.Module, adapter: nn.Module) -> list[tuple[UniPortraitAttnProcessor, nn.Module]]:
    """(processor, attention module) pairs whose projections can take fused weights.

    A layer qualifies when the adapter's processor is the one installed and all four projections
    are plain ``nn.Linear`` with real weights and no accelerate hooks (offloaded modules keep
    their weights elsewhere until called, so they run unfused).
    """
    if hasattr(unet, "_hf_hook"):
        return []
    layers = []
    for spec, processor in zip(adapter.layers, adapter.processors):
        attn = unet.get_submodule(spec.name.removesuffix(PROCESSOR_SUFFIX))
        if getattr(getattr(attn, "processor", None), "processor", None) is not processor:
            continue
        linears = _linears(attn)
        if all(type(m) is nn.Linear and not hasattr(m, "_hf_hook") and not m.weight.is_meta for m in linears):
            layers.append((processor, attn))
    return layers


def _sources(
    layers: Sequence[tuple[UniPortraitAttnProcessor, nn.Module]], which: LoRASetName
) -> list[torch.Tensor]:
    """Every tensor the fused weights of ``which`` are computed from, in a fixed order."""
    tensors = []
    for processor, attn in layers:
        lora = processor.lora_modules(which)
        for name, linear in zip(PROJECTIONS, _linears(attn)):
            tensors += [linear.weight, lora[name].up.weight, lora[name].down.weight]
    return tensors


@torch.no_grad()
def fuse_lora(
    layers: Sequence[tuple[UniPortraitAttnProcessor, nn.Module]], which: LoRASetName, scale: float
) -> FusedLoRA:
    """Compute ``W + scale · up @ down`` for q, k, v and out of each layer.

    Half-precision weights are combined in float32 and rounded once.
    """
    weights = {}
    for processor, attn in layers:
        lora = processor.lora_modules(which)
        fused = []
        for name, linear in zip(PROJECTIONS, _linears(attn)):
            base = linear.weight
            compute = torch.float32 if base.dtype in (torch.float16, torch.bfloat16) else base.dtype
            up = lora[name].up.weight.to(base.device, compute)
            down = lora[name].down.weight.to(base.device, compute)
            fused.append(torch.addmm(base.to(compute), up, down, alpha=scale).to(base.dtype))
        weights[processor] = tuple(fused)
    return FusedLoRA(which, float(scale), weights)


class WeightsSignature:
    """Which tensors (by identity, storage and in-place version) a cache entry was built from."""

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        self._refs = [weakref.ref(t) for t in tensors]
        self._state = [self._state_of(t) for t in tensors]

    @staticmethod
    def _state_of(t: torch.Tensor) -> tuple:
        return t.data_ptr(), t._version, t.dtype, t.device

    def matches(self, tensors: Sequence[torch.Tensor]) -> bool:
        return len(tensors) == len(self._refs) and all(
            ref() is t and state == self._state_of(t)
            for ref, state, t in zip(self._refs, self._state, tensors)
        )


class LoRAFusion:
    """The fused weights of one LoRA set at a time, shared by the concurrent calls of a pipeline.

    Use :meth:`use` around the denoising loop. It gives ``None`` (run unfused) when there is no
    LoRA to fuse, when gradients are enabled or the UNet is training, and when no layer can be
    fused.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._fused: FusedLoRA | None = None
        self._signature: WeightsSignature | None = None
        self._users = 0  # calls running with self._fused
        self._queue: deque[object] = deque()  # calls waiting to start, in arrival order

    @property
    def cached(self) -> FusedLoRA | None:
        """The fused set kept for the next call (None when none)."""
        return self._fused

    @contextmanager
    def use(
        self, unet: nn.Module, adapter: nn.Module, which: LoRASetName, scale: float
    ) -> Iterator[FusedLoRA | None]:
        if which == "none" or scale == 0.0 or torch.is_grad_enabled() or unet.training:
            yield None
            return
        layers = fusable_layers(unet, adapter)
        if not layers:
            yield None
            return
        sources = _sources(layers, which)
        with self._cond:
            # First come, first served; consecutive calls of the same set run together.
            ticket = object()
            self._queue.append(ticket)
            try:
                self._cond.wait_for(
                    lambda: (
                        self._queue[0] is ticket and (self._users == 0 or self._usable(which, scale, sources))
                    )
                )
                if not self._usable(which, scale, sources):
                    self._fused = self._signature = None  # free the old set before building the new one
                    self._fused = fuse_lora(layers, which, scale)
                    self._signature = WeightsSignature(sources)
                fused = self._fused
                self._users += 1
            finally:
                self._queue.remove(ticket)
                self._cond.notify_all()  # the next in line may share the set
        try:
            yield fused
        finally:
            with self._cond:
                self._users -= 1
                self._cond.notify_all()

    def clear(self) -> None:
        """Drop the cached fused weights (waits for the calls using them)."""
        with self._cond:
            self._cond.wait_for(lambda: self._users == 0)
            self._fused = self._signature = None

    def _usable(self, which: LoRASetName, scale: float, sources: Sequence[torch.Tensor]) -> bool:
        fused, signature = self._fused, self._signature
        return (
            fused is not None
            and signature is not None
            and fused.which == which
            and fused.scale == float(scale)
            and signature.matches(sources)
        )
