"""The per-step levers change nothing but speed: fused LoRA = unfused LoRA, no weight drift,
identities encoded once. (Timings are measured by ``benchmarks/bench.py``, never asserted here.)"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from conftest import random_crop, run_pipe
from diffusers import UNet2DConditionModel

from uniportrait.models.attention import LoRALinear
from uniportrait.models.fusion import LoRAFusion, fusable_layers

SD15_UNET = {
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "layers_per_block": 2,
    "sample_size": 64,
}


@pytest.fixture(scope="module")
def pipe():
    """A private tiny pipeline: these tests switch fusion on and off and patch its modules."""
    from uniportrait.presets import build_tiny_pipeline

    pipe = build_tiny_pipeline(0, ip_adapter=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def ids(pipe):
    return [pipe.encode_identity(random_crop(200 + i)) for i in range(2)]


def _snapshot(module: torch.nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every parameter and buffer: (the tensor object, a copy of its values)."""
    return {k: (v, v.detach().clone()) for k, v in module.state_dict(keep_vars=True).items()}


def _assert_unchanged(module: torch.nn.Module, snapshot) -> None:
    now = module.state_dict(keep_vars=True)
    assert now.keys() == snapshot.keys()
    for key, (tensor, values) in snapshot.items():
        assert now[key] is tensor, f"{key} was replaced"
        assert torch.equal(now[key].detach(), values), f"{key} changed"


def _count_lora_forwards(monkeypatch) -> list[int]:
    count = [0]
    forward = LoRALinear.forward

    def counting(self, x):
        count[0] += 1
        return forward(self, x)

    monkeypatch.setattr(LoRALinear, "forward", counting)
    return count


@pytest.mark.parametrize("n_ids", [0, 1, 2])
def test_fused_equals_unfused(pipe, ids, n_ids, monkeypatch):
    lora_calls = _count_lora_forwards(monkeypatch)
    kwargs = {"identities": ids[:n_ids], "seed": 5, "lora_scale": 0.8}
    pipe.disable_lora_fusion()
    try:
        unfused = run_pipe(pipe, **kwargs).images
        assert (lora_calls[0] > 0) == (n_ids > 0)
    finally:
        pipe.enable_lora_fusion()
    lora_calls[0] = 0
    fused = run_pipe(pipe, **kwargs).images
    assert lora_calls[0] == 0  # every layer took the fused weights
    np.testing.assert_allclose(fused, unfused, atol=1e-5, rtol=0)
    if n_ids:
        cached = pipe._lora_fusion.cached
        assert cached is not None and cached.scale == 0.8
        assert cached.which == ("single" if n_ids == 1 else "multi")


def test_no_drift_after_calls_and_a_failing_call(pipe, ids, monkeypatch):
    before = _snapshot(pipe.unet)  # includes the adapter's processors (UNet submodules)
    reference = run_pipe(pipe, identities=ids[:1], seed=6).images
    for n_ids, scale in [(1, 1.0), (2, 1.0), (2, 0.5), (1, 0.3)]:
        run_pipe(pipe, identities=ids[:n_ids], lora_scale=scale, seed=7)
    _assert_unchanged(pipe.unet, before)

    # A call that raises in the middle of denoising, holding the fused multi-ID set.
    scheduler_cls = type(pipe.scheduler)
    step = scheduler_cls.step
    calls = [0]

    def failing_step(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:
            raise RuntimeError("boom")
        return step(self, *args, **kwargs)

    monkeypatch.setattr(scheduler_cls, "step", failing_step)
    with pytest.raises(RuntimeError, match="boom"):
        run_pipe(pipe, identities=ids[:2], seed=8, steps=3)
    monkeypatch.undo()
    _assert_unchanged(pipe.unet, before)

    # The failed call released the fused set: a call needing the other set neither waits nor differs.
    result: dict[str, np.ndarray] = {}
    worker = threading.Thread(
        target=lambda: result.update(out=run_pipe(pipe, identities=ids[:1], seed=6).images)
    )
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "the next call waited for a set the failed call should have released"
    np.testing.assert_array_equal(result["out"], reference)
    _assert_unchanged(pipe.unet, before)


def test_fused_set_follows_weight_changes(pipe, ids):
    kwargs = {"identities": ids[:1], "seed": 9}
    first = run_pipe(pipe, **kwargs).images
    lora = pipe.adapter.processors[0].to_q_lora.up.weight
    original = lora.detach().clone()
    try:
        with torch.no_grad():
            lora.add_(0.5)  # in place, as load_state_dict or an optimiser step would
        changed = run_pipe(pipe, **kwargs).images
        pipe.disable_lora_fusion()
        unfused = run_pipe(pipe, **kwargs).images
    finally:
        pipe.enable_lora_fusion()
        with torch.no_grad():
            lora.copy_(original)
    assert np.abs(changed - first).max() > 1e-4
    np.testing.assert_allclose(changed, unfused, atol=1e-5, rtol=0)


def test_identity_encoded_once(pipe, monkeypatch):
    counts = {"face_backbone": 0, "image_encoder": 0}
    for name in counts:
        module = getattr(pipe, name)
        forward = module.forward

        def counting(*args, _name=name, _forward=forward, **kwargs):
            counts[_name] += 1
            return _forward(*args, **kwargs)

        monkeypatch.setattr(module, "forward", counting)
    pipe._uncond_features = None  # as in a fresh pipeline
    ident = pipe.encode_identity(random_crop(300))
    assert counts == {"face_backbone": 1, "image_encoder": 1}
    run_pipe(pipe, identities=[ident], seed=1)  # computes the blank-image CLIP features once
    after_first = dict(counts)
    for seed in (2, 3):
        run_pipe(pipe, identities=[ident], seed=seed)
    run_pipe(pipe, identities=[ident, ident], seed=4)
    assert counts == after_first
    assert counts["face_backbone"] == 1


def test_fusion_waits_for_other_set_and_shares_same_set(pipe):
    fusion = LoRAFusion()
    with torch.no_grad(), fusion.use(pipe.unet, pipe.adapter, "single", 1.0) as single:
        assert single is not None and single.which == "single"
        # The same set is shared at once by a concurrent call.
        shared: list = []
        same = threading.Thread(target=lambda: _use(fusion, pipe, "single", shared))
        same.start()
        same.join(timeout=30)
        assert shared and shared[0] is single
        # Another set waits until the first call is done.
        other: list = []
        waiting = threading.Thread(target=lambda: _use(fusion, pipe, "multi", other))
        waiting.start()
        waiting.join(timeout=0.5)
        assert waiting.is_alive() and not other
    waiting.join(timeout=30)
    assert other and other[0].which == "multi"
    assert fusion.cached.which == "multi"  # one set kept at a time


def _use(fusion: LoRAFusion, pipe, which: str, out: list) -> None:
    with torch.no_grad(), fusion.use(pipe.unet, pipe.adapter, which, 1.0) as fused:
        out.append(fused)


def test_no_fusion_for_training(pipe):
    fusion = LoRAFusion()
    with torch.enable_grad(), fusion.use(pipe.unet, pipe.adapter, "single", 1.0) as fused:
        assert fused is None  # gradients must reach the LoRA weights
    pipe.unet.train()
    try:
        with torch.no_grad(), fusion.use(pipe.unet, pipe.adapter, "single", 1.0) as fused:
            assert fused is None
    finally:
        pipe.unet.eval()
    with torch.no_grad(), fusion.use(pipe.unet, pipe.adapter, "none", 1.0) as fused:
        assert fused is None
    assert fusion.cached is None


def test_fused_memory_bound_sd15():
    """One fused set = the attention projections: ≤ 15% of the SD1.5 UNet's weights."""
    from uniportrait.models.adapter import AdapterConfig, UniPortraitAdapter
    from uniportrait.models.qformer import QFormerConfig

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
        unet_bytes = sum(p.numel() * p.element_size() for p in unet.parameters())
        adapter = UniPortraitAdapter.from_sizes(AdapterConfig.from_unet(unet, QFormerConfig(dim=768)))
        adapter.attach(unet)
    layers = [(proc, attn) for proc, attn in _all_layers(unet, adapter)]
    assert len(layers) == 32
    fused_bytes = sum(
        m.weight.numel() * m.weight.element_size()
        for _, attn in layers
        for m in (attn.to_q, attn.to_k, attn.to_v, attn.to_out[0])
    )
    assert fused_bytes <= 0.15 * unet_bytes
    assert fusable_layers(unet, adapter) == []  # weights not materialised: nothing to fuse


def _all_layers(unet, adapter):
    for spec, proc in zip(adapter.layers, adapter.processors):
        yield proc, unet.get_submodule(spec.name.removesuffix(".processor"))
