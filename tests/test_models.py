"""Behavioural tests of the ID Q-Former, the IR face backbone and the IP-Adapter image projection."""

from __future__ import annotations

import json

import pytest
import torch

from uniportrait.errors import CheckpointError, WeightsNotFoundError
from uniportrait.models import (
    IR_VARIANTS,
    IDQFormer,
    ImageProjection,
    ImageProjectionConfig,
    IRBackbone,
    IRBackboneConfig,
    QFormerConfig,
    drop_structure_tokens,
    intrinsic_tokens,
    load_state_dict_strict,
    load_tface_state_dict,
    structure_backbone_tokens,
)

SMALL_Q = {"dim": 32, "id_dim": 64, "structure_dim": 40, "depth": 2, "heads": 2, "dim_head": 16}
SMALL_IR = {"blocks": (1, 1, 1, 1), "channels": (4, 8, 8, 16), "embedding_dim": 16}


def _qformer(seed: int = 0, **overrides) -> IDQFormer:
    torch.manual_seed(seed)
    return IDQFormer.from_sizes(QFormerConfig(**{**SMALL_Q, **overrides})).eval()


def _qinputs(b: int = 3, ti: int = 49, ts: int = 20, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, ti, 64, generator=g), torch.randn(b, ts, 40, generator=g)


def _ir(seed: int = 0, **overrides) -> IRBackbone:
    torch.manual_seed(seed)
    model = IRBackbone.from_sizes(IRBackboneConfig(**{**SMALL_IR, **overrides}))
    # Non-trivial BatchNorm statistics so that eval-mode outputs exercise the buffers.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _faces(b: int = 2, size: int = 112, seed: int = 2) -> torch.Tensor:
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# --------------------------------------------------------------------------- Q-Former


def test_qformer_shapes_and_finite():
    model = _qformer()
    intrinsic, structure = _qinputs()
    out = model(intrinsic, structure, structure_scale=0.3)
    assert out.shape == (3, 16, 32)
    assert torch.isfinite(out).all()


def _expected_qformer_keys(depth: int) -> set[str]:
    keys = {"latents", "proj_out.weight", "proj_out.bias", "norm_out.weight", "norm_out.bias"}
    for proj in ("proj_id", "proj_clip"):
        keys |= {f"{proj}.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    for layer in range(depth):
        for block in (0, 1):
            prefix = f"layers.{layer}.{block}"
            keys |= {f"{prefix}.{n}.{p}" for n in ("norm1", "norm2") for p in ("weight", "bias")}
            keys |= {f"{prefix}.{n}.weight" for n in ("to_q", "to_kv", "to_out")}
        keys |= {f"layers.{layer}.2.0.weight", f"layers.{layer}.2.0.bias"}
        keys |= {f"layers.{layer}.2.1.weight", f"layers.{layer}.2.3.weight"}
    return keys


def test_qformer_published_key_layout():
    with torch.device("meta"):
        model = IDQFormer.from_sizes(QFormerConfig())
    state = model.state_dict()
    assert set(state) == _expected_qformer_keys(6)
    assert len(state) == 5 + 8 + 6 * (2 * 7 + 4)
    shapes = {
        "latents": (1, 16, 768),
        "proj_id.0.weight": (1024, 512),
        "proj_id.2.weight": (768, 1024),
        "proj_clip.0.weight": (3456, 1728),
        "proj_clip.2.weight": (768, 3456),
        "layers.5.0.to_q.weight": (768, 768),
        "layers.5.1.to_kv.weight": (1536, 768),
        "layers.0.1.to_out.weight": (768, 768),
        "layers.3.2.1.weight": (3072, 768),
        "layers.3.2.3.weight": (768, 3072),
        "proj_out.weight": (768, 768),
    }
    for key, shape in shapes.items():
        assert tuple(state[key].shape) == shape, key


def test_perceiver_attention_matches_reference_math():
    from uniportrait.models.qformer import PerceiverAttention

    torch.manual_seed(0)
    block = PerceiverAttention(dim=12, heads=3, dim_head=4)
    x, queries = torch.randn(2, 5, 12), torch.randn(2, 7, 12)
    # Reference: K is the first half of to_kv, heads are contiguous dim_head slices.
    xn = torch.nn.functional.layer_norm(x, (12,), block.norm1.weight, block.norm1.bias)
    qn = torch.nn.functional.layer_norm(queries, (12,), block.norm2.weight, block.norm2.bias)
    kv_in = torch.cat([xn, qn], dim=1)
    wk, wv = block.to_kv.weight[:12], block.to_kv.weight[12:]
    q = (qn @ block.to_q.weight.T).view(2, 7, 3, 4)
    k, v = (kv_in @ wk.T).view(2, 12, 3, 4), (kv_in @ wv.T).view(2, 12, 3, 4)
    weights = torch.einsum("bqhd,bkhd->bhqk", q, k).div(2.0).softmax(dim=-1)
    expected = torch.einsum("bhqk,bkhd->bqhd", weights, v).reshape(2, 7, 12) @ block.to_out.weight.T
    torch.testing.assert_close(block(x, queries), expected, atol=1e-5, rtol=1e-5)


def test_structure_scale_zero_removes_structure_influence():
    model = _qformer()
    intrinsic, structure = _qinputs()
    other_structure = torch.randn_like(structure)
    fast = model(intrinsic, structure, structure_scale=0.0)  # skips the branch
    computed = model(intrinsic, structure, structure_scale=torch.zeros(3))  # computes it × 0
    assert torch.equal(fast, computed)
    assert torch.equal(fast, model(intrinsic, other_structure, structure_scale=0.0))
    full = model(intrinsic, structure, structure_scale=1.0)
    assert not torch.allclose(full, fast, atol=1e-4)
    assert not torch.allclose(full, model(intrinsic, other_structure, structure_scale=1.0), atol=1e-4)


def test_per_sample_structure_scale():
    model = _qformer()
    intrinsic, structure = _qinputs()
    mixed = model(intrinsic, structure, structure_scale=torch.tensor([0.0, 1.0, 0.5]))
    torch.testing.assert_close(mixed[0], model(intrinsic, structure, structure_scale=0.0)[0])
    torch.testing.assert_close(mixed[1], model(intrinsic, structure, structure_scale=1.0)[1])
    torch.testing.assert_close(mixed[2], model(intrinsic, structure, structure_scale=0.5)[2])


def test_structure_keep_mask():
    model = _qformer()
    intrinsic, structure = _qinputs(ts=20)
    plain = model(intrinsic, structure)
    all_true = model(intrinsic, structure, structure_keep=torch.ones(3, 20, dtype=torch.bool))
    torch.testing.assert_close(all_true, plain, atol=1e-6, rtol=1e-5)
    keep = torch.zeros(3, 20, dtype=torch.bool)
    keep[:, :12] = True
    masked = model(intrinsic, structure, structure_keep=keep)
    assert not torch.allclose(masked, plain, atol=1e-4)
    # Masking tokens out is the same as not passing them at all.
    torch.testing.assert_close(masked, model(intrinsic, structure[:, :12]), atol=1e-6, rtol=1e-5)


def test_drop_structure_tokens():
    structure = torch.zeros(64, 30, 8)
    keep = drop_structure_tokens(structure, 0.5, torch.Generator().manual_seed(0))
    assert keep.shape == (64, 30) and keep.dtype == torch.bool
    assert 0.35 < keep.float().mean().item() < 0.65
    again = drop_structure_tokens(structure, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(keep, again)
    assert drop_structure_tokens(structure, 0.0).all()
    nearly_all = drop_structure_tokens(structure, 1.0, torch.Generator().manual_seed(1))
    assert torch.equal(nearly_all.sum(dim=1), torch.ones(64, dtype=torch.long))
    with pytest.raises(ValueError):
        drop_structure_tokens(structure, 1.5)


def test_drop_path_only_in_training():
    torch.manual_seed(0)
    model = IDQFormer.from_sizes(QFormerConfig(**{**SMALL_Q, "depth": 1, "drop_path_rate": 0.5}))
    intrinsic, structure = _qinputs(b=16)

    model.eval()
    eval_a = model(intrinsic, structure, generator=torch.Generator().manual_seed(0))
    eval_b = model(intrinsic, structure, generator=torch.Generator().manual_seed(1))
    assert torch.equal(eval_a, eval_b)
    dropped = model(intrinsic, structure, structure_scale=torch.zeros(16))
    doubled = model(intrinsic, structure, structure_scale=torch.full((16,), 2.0))

    model.train()  # the Q-Former has no dropout: only DropPath is random
    train = model(intrinsic, structure, generator=torch.Generator().manual_seed(0))
    assert torch.equal(train, model(intrinsic, structure, generator=torch.Generator().manual_seed(0)))
    # Each sample either lost the structure branch or kept it rescaled by 1 / (1 - 0.5).
    is_dropped = [torch.allclose(train[i], dropped[i], atol=1e-6) for i in range(16)]
    is_kept = [torch.allclose(train[i], doubled[i], atol=1e-5) for i in range(16)]
    assert all(d != k for d, k in zip(is_dropped, is_kept))
    assert any(is_dropped) and any(is_kept)


def test_qformer_input_checks():
    model = _qformer()
    intrinsic, structure = _qinputs()
    with pytest.raises(ValueError, match="intrinsic"):
        model(structure, structure)
    with pytest.raises(ValueError, match="structure_scale"):
        model(intrinsic, structure, structure_scale=torch.ones(2))


def test_qformer_config_dict_round_trip_and_unknown_keys():
    config = QFormerConfig(**SMALL_Q, drop_path_rate=0.1)
    assert QFormerConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="bogus_key"):
        QFormerConfig.from_dict({"dim": 32, "bogus_key": 1})
    with pytest.raises(ValueError, match="drop_path_rate"):
        QFormerConfig(drop_path_rate=1.0)


def test_qformer_save_load_round_trip(tmp_path):
    model = _qformer()
    model.save_pretrained(tmp_path / "qf")
    loaded = IDQFormer.from_pretrained(tmp_path / "qf").eval()
    assert loaded.sizes == model.sizes
    intrinsic, structure = _qinputs()
    assert torch.equal(loaded(intrinsic, structure), model(intrinsic, structure))


# --------------------------------------------------------------------------- IR backbone


def test_ir_backbone_shapes_and_finite():
    model = _ir()
    out = model(_faces())
    assert [tuple(s.shape) for s in out.stages] == [
        (2, 4, 56, 56),
        (2, 8, 28, 28),
        (2, 8, 14, 14),
        (2, 16, 7, 7),
    ]
    assert out.embedding.shape == (2, 16)
    assert all(torch.isfinite(t).all() for t in (*out.stages, out.embedding))
    assert model(_faces(), compute_embedding=False).embedding is None
    with pytest.raises(ValueError, match="112"):
        model(_faces(size=96))


def test_ir101_tface_layout():
    assert IR_VARIANTS["ir101"] == (3, 13, 30, 3)
    config = IRBackboneConfig.from_variant("ir101")
    assert config == IRBackboneConfig()
    assert config.stage_ends == (2, 15, 45, 48)
    with torch.device("meta"):
        model = IRBackbone.from_sizes(config)
    state = model.state_dict()
    bodies = {int(k.split(".")[1]) for k in state if k.startswith("body.")}
    assert bodies == set(range(49))
    shapes = {
        "input_layer.0.weight": (64, 3, 3, 3),
        "input_layer.2.weight": (64,),
        "body.0.res_layer.1.weight": (64, 64, 3, 3),
        "body.3.shortcut_layer.0.weight": (128, 64, 1, 1),
        "body.16.shortcut_layer.1.running_var": (256,),
        "body.46.res_layer.4.weight": (512, 512, 3, 3),
        "body.48.res_layer.3.weight": (512,),
        "output_layer.0.weight": (512,),
        "output_layer.3.weight": (512, 512 * 7 * 7),
        "output_layer.4.running_mean": (512,),
    }
    for key, shape in shapes.items():
        assert tuple(state[key].shape) == shape, key
    # Stage-opening units with equal channels shortcut through a parameter-free pooling.
    assert not any(k.startswith("body.0.shortcut_layer") for k in state)
    assert "output_layer.4.weight" not in state  # BatchNorm1d(affine=False)


def test_ir101_stage_shapes_small_channels():
    model = _ir(blocks=(3, 13, 30, 3), channels=(2, 4, 4, 8), embedding_dim=8)
    out = model(_faces(b=1))
    assert [tuple(s.shape) for s in out.stages] == [
        (1, 2, 56, 56),
        (1, 4, 28, 28),
        (1, 4, 14, 14),
        (1, 8, 7, 7),
    ]


def test_token_helpers():
    out = _ir()(_faces())
    tokens = intrinsic_tokens(out.stages)
    assert tokens.shape == (2, 49, 16)
    assert torch.equal(tokens[:, 3 * 7 + 5], out.stages[-1][:, :, 3, 5])  # row-major
    structure = structure_backbone_tokens(out.stages)
    assert structure.shape == (2, 256, 4 + 8 + 8)
    assert torch.isfinite(structure).all()
    # At the third stage's own size the resize is the identity for that stage.
    at_14 = structure_backbone_tokens(out.stages, size=14)
    assert torch.allclose(at_14[:, 2 * 14 + 9, 12:], out.stages[2][:, :, 2, 9], atol=1e-6)


def test_ir_save_load_round_trip(tmp_path):
    model = _ir()
    model.save_pretrained(tmp_path / "ir")
    loaded = IRBackbone.from_pretrained(tmp_path / "ir").eval()
    assert loaded.sizes == model.sizes
    assert json.loads((tmp_path / "ir" / "config.json").read_text())["_class_name"] == "IRBackbone"
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    faces = _faces()
    assert torch.equal(loaded(faces).embedding, model(faces).embedding)
    with pytest.raises(WeightsNotFoundError):
        IRBackbone.from_pretrained(tmp_path / "missing")


def save_config_and_weights(model, config: dict, folder) -> None:
    """The first round's folder: config.json (the dataclass's fields) + model.safetensors."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))


def test_ir_reads_the_first_round_folder_format(tmp_path):
    """config.json with the dataclass's fields + model.safetensors, as the first round wrote them."""
    model = _ir()
    save_config_and_weights(model, model.sizes.to_dict(), tmp_path / "old")
    loaded = IRBackbone.from_pretrained(tmp_path / "old").eval()
    faces = _faces()
    assert torch.equal(loaded(faces).embedding, model(faces).embedding)
    state = model.state_dict()
    state.pop(next(iter(state)))
    bad_folder = tmp_path / "bad"
    from safetensors.torch import save_file

    save_config_and_weights(model, model.sizes.to_dict(), bad_folder)
    save_file({k: v.contiguous() for k, v in state.items()}, str(bad_folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing"):
        IRBackbone.from_pretrained(bad_folder)


def test_ir_config_dict():
    config = IRBackboneConfig(**SMALL_IR)
    assert IRBackboneConfig.from_dict(config.to_dict()) == config  # lists in JSON → tuples
    with pytest.raises(ValueError, match="depth"):
        IRBackboneConfig.from_dict({"depth": 50})
    with pytest.raises(ValueError, match="ir999"):
        IRBackboneConfig.from_variant("ir999")


def test_load_tface_state_dict_strips_prefix_and_tolerates_num_batches_tracked():
    source, target = _ir(seed=0), _ir(seed=1)
    state = {
        f"module.{k}": v.clone()
        for k, v in source.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    load_tface_state_dict(target, state)
    faces = _faces()
    assert torch.equal(target(faces).embedding, source(faces).embedding)


def test_strict_loading_names_offending_keys():
    model = _ir()
    state = dict(model.state_dict())
    del state["body.1.res_layer.1.weight"]
    state["body.9.extra"] = torch.zeros(1)
    state["output_layer.3.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError) as info:
        load_tface_state_dict(model, state)
    message = str(info.value)
    assert "1 missing key: body.1.res_layer.1.weight" in message
    assert "1 unexpected key: body.9.extra" in message
    assert "output_layer.3.weight (checkpoint (3, 3) vs model (16, 784))" in message


def test_strict_loading_rejects_non_tensors_and_caps_names():
    model = ImageProjection.from_sizes(
        ImageProjectionConfig(clip_embed_dim=8, cross_attention_dim=6, num_tokens=2)
    )
    with pytest.raises(CheckpointError, match="not tensors"):
        load_state_dict_strict(model, {"proj.weight": [1.0]}, what="x")
    junk = {f"junk.{i}": torch.zeros(1) for i in range(9)}
    with pytest.raises(CheckpointError, match=r"9 unexpected keys: .*\+4 more"):
        load_state_dict_strict(model, {**model.state_dict(), **junk}, what="x")


# --------------------------------------------------------------------------- image projection


def test_image_projection():
    torch.manual_seed(0)
    model = ImageProjection.from_sizes(
        ImageProjectionConfig(clip_embed_dim=24, cross_attention_dim=12, num_tokens=4)
    )
    assert set(model.state_dict()) == {"proj.weight", "proj.bias", "norm.weight", "norm.bias"}
    out = model(torch.randn(3, 24))
    assert out.shape == (3, 4, 12)
    assert torch.isfinite(out).all()
    # Each token is layer-normalised on its own (default affine = identity).
    torch.testing.assert_close(out.mean(dim=-1), torch.zeros(3, 4), atol=1e-5, rtol=0)
    with torch.device("meta"):
        default = ImageProjection()
    assert tuple(default.state_dict()["proj.weight"].shape) == (4 * 768, 1024)
    with pytest.raises(ValueError, match="unknown_key"):
        ImageProjectionConfig.from_dict({"unknown_key": 1})
