"""Behaviour of UniPortraitPipeline on the tiny random preset (offline, CPU, a few seconds)."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import torch
from conftest import (
    PROMPT,
    SIZE,
    assert_differ,
    assert_same,
    plain_sd_pipeline,
    random_crop,
    random_pil,
    run_pipe,
)

from uniportrait.errors import IdentityError, UniPortraitError, WeightsNotFoundError
from uniportrait.models.attention import AttentionCall, UniPortraitAttnProcessor
from uniportrait.presets import build_tiny_base, build_tiny_pipeline, load_preset

# -- 1. no identities: plain Stable Diffusion --------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"num_images_per_prompt": 2, "negative_prompt": "blurry, dark"}],
    ids=["single", "two-images-negative"],
)
def test_no_identity_equals_stable_diffusion(tiny_pipe, kwargs):
    ours = run_pipe(tiny_pipe, seed=7, ip_scale=0.0, **kwargs).images

    # The same component objects: diffusers then runs our processors with no per-call settings.
    shared = run_pipe(plain_sd_pipeline(tiny_pipe.components), seed=7, **kwargs).images
    # A second base with the same seed whose UNet keeps diffusers' own attention processors.
    plain_base = build_tiny_base(0)
    assert not any(
        isinstance(p, UniPortraitAttnProcessor) for p in plain_base["unet"].attn_processors.values()
    )
    plain = run_pipe(plain_sd_pipeline(plain_base), seed=7, **kwargs).images

    assert ours.shape == (kwargs.get("num_images_per_prompt", 1), SIZE, SIZE, 3)
    assert_same(ours, shared)
    assert_same(ours, plain)
    if "num_images_per_prompt" in kwargs:
        assert_differ(ours[0], ours[1])  # two different samples, not one repeated


# -- 2. identities and their scales -------------------------------------------------------------------


def test_identity_changes_image_and_faceid_scale_zero_does_not(generate, idents):
    none = generate(seed=1)
    one = generate(seed=1, identities=idents[:1])
    assert_differ(one, none)
    assert_differ(one, generate(seed=1, identities=idents[1:2]))  # another person, another image
    assert_same(generate(seed=1, identities=idents[:1], faceid_scale=0.0), none)
    assert_same(generate(seed=1, identities=idents[:2], faceid_scale=0.0), none)


@pytest.mark.parametrize(("n_ids", "default", "other"), [(1, 0.1, 0.3), (2, 0.3, 0.1)])
def test_face_structure_scale_defaults(generate, idents, n_ids, default, other):
    ids = idents[:n_ids]
    implicit = generate(seed=2, identities=ids)
    assert_same(generate(seed=2, identities=ids, face_structure_scale=default), implicit, atol=0)
    assert_differ(generate(seed=2, identities=ids, face_structure_scale=other), implicit)


def _unet_batches(pipe, monkeypatch) -> list[tuple[int, torch.Tensor | None]]:
    """Record each UNet call's batch size and its identity tokens (B, N, T, D)."""
    calls = []
    forward = pipe.unet.forward

    def spy(sample, *args, **kwargs):
        call = (kwargs.get("cross_attention_kwargs") or {}).get("uniportrait")
        calls.append((len(sample), None if call is None else call.id_tokens))
        return forward(sample, *args, **kwargs)

    monkeypatch.setattr(pipe.unet, "forward", spy)
    return calls


@pytest.mark.parametrize("n_ids", [1, 2])
def test_identity_guidance(tiny_pipe, generate, idents, monkeypatch, n_ids):
    ids = idents[:n_ids]
    one = generate(seed=3, identities=ids, guidance_scale=5.0)
    calls = _unet_batches(tiny_pipe, monkeypatch)
    # the same scale as the text's is one guidance: the usual two groups, the same images
    assert_same(
        generate(seed=3, identities=ids, guidance_scale=5.0, identity_guidance_scale=5.0), one, atol=0
    )
    assert {b for b, _ in calls} == {2}
    # a scale a hair away takes the three-group path; its formula reduces to the one guidance
    calls.clear()
    near = generate(seed=3, identities=ids, guidance_scale=5.0, identity_guidance_scale=5.0 + 1e-6)
    assert {b for b, _ in calls} == {3}
    assert_same(near, one, atol=1e-4)
    # the groups: [∅ text, ∅ ids], [text, ∅ ids], [text, ids]: only the last carries the people
    tokens = calls[0][1]
    assert torch.equal(tokens[0], tokens[1]) and not torch.equal(tokens[1], tokens[2])
    more = generate(seed=3, identities=ids, guidance_scale=5.0, identity_guidance_scale=12.0)
    assert_differ(more, one)
    # guidance_rescale acts on the three-group path as on the two-group one
    rescaled = generate(seed=3, identities=ids, guidance_scale=5.0, guidance_rescale=0.7)
    assert_differ(rescaled, one)
    assert_same(generate(seed=3, identities=ids, guidance_scale=5.0, guidance_rescale=0.7,
                         identity_guidance_scale=5.0 + 1e-6), rescaled, atol=1e-4)  # fmt: skip
    # without guidance, or without identities, there is nothing to guide apart
    calls.clear()
    assert_same(generate(seed=3, identities=ids, guidance_scale=1.0, identity_guidance_scale=12.0),
                generate(seed=3, identities=ids, guidance_scale=1.0), atol=0)  # fmt: skip
    assert_same(generate(seed=3, guidance_scale=5.0, identity_guidance_scale=12.0),
                generate(seed=3, guidance_scale=5.0), atol=0)  # fmt: skip
    assert {b for b, _ in calls} <= {1, 2}


def test_identity_guidance_with_the_other_inputs(tiny_pipe, generate, idents):
    """Three groups of rows with StyleAligned, ControlNet + IP-Adapter, masks, routing maps, a callback."""
    photo = random_pil(5)
    kw = {"identities": idents[:2], "guidance_scale": 5.0, "identity_guidance_scale": 9.0}
    assert generate(style_image=photo, style_prompt="a sketch", **kw).shape == (1, SIZE, SIZE, 3)
    images = generate(control_image=photo, ip_image=photo, ip_scale=0.5, num_images_per_prompt=2, **kw)
    assert images.shape == (2, SIZE, SIZE, 3)
    masked = run_pipe(tiny_pipe, faceid_masks=_masks(2), return_routing_maps=True, **kw)
    assert masked.routing_maps[0].shape == (2, SIZE, SIZE)
    seen = []

    def record(pipe, step, t, tensors):
        seen.append({k: tuple(v.shape) for k, v in tensors.items()})

    names = ["latents", "prompt_embeds", "negative_prompt_embeds"]
    run_pipe(tiny_pipe, callback_on_step_end=record, callback_on_step_end_tensor_inputs=names, **kw)
    assert seen and all(v[0] == 1 for step in seen for v in step.values())  # one row each, by name


# -- 3. routing -----------------------------------------------------------------------------------


def _cross_processor(pipe) -> UniPortraitAttnProcessor:
    return next(p for p in pipe.adapter.processors if p.cross)


@pytest.mark.parametrize("n_ids", [2, 3])
def test_route_is_one_hot(tiny_pipe, n_ids):
    proc = _cross_processor(tiny_pipe)
    gen = torch.Generator().manual_seed(n_ids)
    query_dim = proc.to_q_router[0].in_features
    dim = proc.to_k_faceid.in_features
    hidden = torch.randn(3, 40, query_dim, generator=gen)  # (B, L, C)
    tokens = torch.randn(3, n_ids, 16, dim, generator=gen)  # (B, N, T, D)
    with torch.no_grad():
        weights, logits = proc.route(hidden, tokens, AttentionCall())
    assert weights.shape == (3, n_ids, 40) and logits.shape == (3, 40, n_ids)
    assert set(weights.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(weights.sum(1), torch.ones(3, 40))
    assert torch.equal(weights.argmax(1), logits.argmax(-1))


@pytest.mark.parametrize("n_ids", [2, 3])
def test_routing_maps_in_pipeline(tiny_pipe, idents, n_ids, monkeypatch):
    # Record every layer's routing map on the way, to check each one is one-hot.
    seen: list[torch.Tensor] = []
    for proc in tiny_pipe.adapter.processors:
        if proc.cross:

            def recording(hidden, tokens, call, _route=proc.route):
                weights, logits = _route(hidden, tokens, call)
                seen.append(weights)
                return weights, logits

            monkeypatch.setattr(proc, "route", recording)
    out = run_pipe(tiny_pipe, seed=3, identities=idents[:n_ids], return_routing_maps=True)
    monkeypatch.undo()

    assert seen
    for weights in seen:
        assert set(weights.unique().tolist()) <= {0.0, 1.0}
        assert torch.equal(weights.sum(1), torch.ones_like(weights[:, 0]))
    assert len(out.routing_maps) == 1
    maps = out.routing_maps[0]
    assert maps.shape == (n_ids, SIZE, SIZE)
    assert maps.min() >= 0.0 and maps.max() <= 1.0
    torch.testing.assert_close(maps.sum(0), torch.ones(SIZE, SIZE), atol=1e-5, rtol=0)


def _masks(n_ids: int, size: int = SIZE) -> np.ndarray:
    """Vertical bands, one per identity, overlapping by a few columns (so some pixels are shared)."""
    masks = np.zeros((n_ids, size, size), dtype=np.float32)
    edges = np.linspace(0, size, n_ids + 1).astype(int)
    for i in range(n_ids):
        masks[i, :, max(0, edges[i] - 4) : min(size, edges[i + 1] + 4)] = 1.0
    return masks


@pytest.mark.parametrize("n_ids", [2, 3])
def test_faceid_masks_replace_routing(generate, tiny_pipe, idents, n_ids):
    masks = _masks(n_ids)
    out = run_pipe(tiny_pipe, seed=4, identities=idents[:n_ids], faceid_masks=masks, return_routing_maps=True)
    expected = torch.from_numpy(masks / masks.sum(0, keepdims=True).clip(min=1e-3))
    torch.testing.assert_close(out.routing_maps[0], expected, atol=1e-6, rtol=0)
    assert torch.any((expected > 0) & (expected < 1))  # the overlap is shared softly

    swapped = generate(seed=4, identities=idents[:n_ids], faceid_masks=masks[::-1].copy())
    assert_differ(swapped, out.images)
    routed = generate(seed=4, identities=idents[:n_ids])
    assert_differ(routed, out.images)


# -- 4. mixing and several references ---------------------------------------------------------------


def test_identity_mixing(tiny_pipe, crops):
    beta = 0.2
    main = tiny_pipe.encode_identity(crops[0])
    other = tiny_pipe.encode_identity(crops[1])
    third = tiny_pipe.encode_identity(crops[2])
    tokens = {
        k: tiny_pipe.identity_tokens(v, beta)
        for k, v in {"main": main, "other": other, "third": third}.items()
    }
    mixed = tiny_pipe.encode_identity(crops[0], mix=[(crops[1], 0.3)])
    torch.testing.assert_close(
        tiny_pipe.identity_tokens(mixed, beta), 0.7 * tokens["main"] + 0.3 * tokens["other"]
    )
    double = tiny_pipe.encode_identity(crops[0], mix=[(other, 0.25), ([crops[2]], 0.5)])
    torch.testing.assert_close(
        tiny_pipe.identity_tokens(double, beta),
        0.25 * tokens["main"] + 0.25 * tokens["other"] + 0.5 * tokens["third"],
    )
    assert not torch.allclose(tokens["main"], tokens["other"], atol=1e-4)


@pytest.mark.parametrize("mix", [[1.5], [-0.1], [0.6, 0.6]], ids=["above-1", "negative", "sum-above-1"])
def test_bad_mix_scales(tiny_pipe, crops, mix):
    with pytest.raises(IdentityError, match="mix scale"):
        tiny_pipe.encode_identity(crops[0], mix=[(crops[1 + i], s) for i, s in enumerate(mix)])


def test_several_references_concatenate(tiny_pipe, crops):
    beta = 0.3
    first = tiny_pipe.encode_identity(crops[0])
    second = tiny_pipe.encode_identity(crops[1])
    both = tiny_pipe.encode_identity(torch.stack(crops[:2]))
    assert both.num_references == 2
    torch.testing.assert_close(both.intrinsic, torch.cat([first.intrinsic, second.intrinsic]))

    tokens = tiny_pipe.identity_tokens(both, beta)
    qformer = tiny_pipe.adapter.qformer
    with torch.no_grad():
        expected = qformer(
            torch.cat([first.intrinsic, second.intrinsic], dim=1),  # (1, 2·T_id, C_id)
            torch.cat([first.structure, second.structure], dim=1),  # (1, 2·T_st, C_st)
            structure_scale=beta,
        )[0]
    assert tokens.shape == (qformer.config.num_queries, qformer.config.dim)
    torch.testing.assert_close(tokens, expected)
    for single in (first, second):
        assert not torch.allclose(tokens, tiny_pipe.identity_tokens(single, beta), atol=1e-4)


# -- 7. ControlNet and IP-Adapter ----------------------------------------------------------------------


def test_controlnet_and_ip_adapter(generate, idents):
    base = generate(seed=5, identities=idents[:1])
    control, style = random_pil(11), random_pil(12)
    assert_differ(generate(seed=5, identities=idents[:1], control_image=control), base)
    assert_differ(generate(seed=5, identities=idents[:1], ip_image=style, ip_scale=0.6), base)
    off = generate(
        seed=5,
        identities=idents[:1],
        control_image=control,
        controlnet_conditioning_scale=0.0,
        ip_image=style,
        ip_scale=0.0,
    )
    assert_same(off, base)


def test_ip_adapter_unconditional_side_is_zero_embedding(tiny_pipe):
    """CFG's unconditional side sees the projection of a zero CLIP embedding, not the image."""
    cond, uncond = tiny_pipe.encode_ip_image(random_pil(12), torch.device("cpu"))
    proj = tiny_pipe.adapter.image_proj
    with torch.no_grad():
        zeros = proj(torch.zeros(1, proj.config.clip_embed_dim))
    assert cond.shape == uncond.shape == (1, proj.config.num_tokens, proj.config.cross_attention_dim)
    torch.testing.assert_close(uncond, zeros)
    assert not torch.allclose(cond, uncond, atol=1e-4)


# -- 9. input checks -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"height": 100}, "multiple of 8"),
        ({"steps": 0}, "num_inference_steps"),
        ({"n_ids": 2, "faceid_masks": np.ones((3, 8, 8))}, r"faceid_masks must be \(num_identities=2"),
        ({"n_ids": 2, "faceid_masks": np.ones((2, 8))}, "faceid_masks must be"),
        ({"n_ids": 1, "faceid_masks": np.ones((1, 8, 8))}, "two or more identities"),
        ({"face_structure_scale": 1.5}, "face_structure_scale"),
        ({"faceid_scale": float("nan")}, "faceid_scale"),
        ({"identity_guidance_scale": -1.0}, r"identity_guidance_scale must be between 0.0 and 30.0"),
        ({"output_type": "jpeg"}, "output_type"),
        ({"negative_prompt": ["a", "b"]}, "negative_prompt"),
    ],
    ids=[
        "height",
        "steps",
        "masks-count",
        "masks-ndim",
        "masks-one-id",
        "structure",
        "nan",
        "id-guidance",
        "output",
        "neg",
    ],
)
def test_check_inputs(tiny_pipe, idents, kwargs, message):
    kwargs = dict(kwargs)
    ids = idents[: kwargs.pop("n_ids", 1)]
    size = kwargs.pop("height", SIZE)
    steps = kwargs.pop("steps", 2)
    with pytest.raises(UniPortraitError, match=message):
        tiny_pipe(PROMPT, identities=ids, height=size, width=SIZE, num_inference_steps=steps, **kwargs)


def test_multi_id_needs_router():
    from uniportrait.models.adapter import UniPortraitAdapter
    from uniportrait.models.face_backbone import IRBackbone
    from uniportrait.pipeline import UniPortraitPipeline
    from uniportrait.presets.pipelines import tiny_adapter_config, tiny_backbone_config

    base = build_tiny_base(0)
    config = dataclasses.replace(tiny_adapter_config(base["unet"], base["image_encoder"]), multi_id=False)
    pipe = UniPortraitPipeline(
        **base,
        face_backbone=IRBackbone.from_sizes(tiny_backbone_config()).eval(),
        adapter=UniPortraitAdapter.from_sizes(config).eval(),
    )
    pipe.set_progress_bar_config(disable=True)
    ids = [pipe.encode_identity(random_crop(i)) for i in range(2)]
    with pytest.raises(UniPortraitError, match="router"):
        run_pipe(pipe, identities=ids)
    assert run_pipe(pipe, identities=ids[:1]).images.shape == (1, SIZE, SIZE, 3)


def test_control_image_without_controlnet(idents):
    pipe = build_tiny_pipeline(0, ip_adapter=False, controlnet=False)
    with pytest.raises(UniPortraitError, match="no controlnet"):
        run_pipe(pipe, identities=idents[:1], control_image=random_pil(1))
    with pytest.raises(UniPortraitError, match="IP-Adapter"):
        run_pipe(pipe, identities=idents[:1], ip_image=random_pil(1), ip_scale=0.5)


# -- 10. the sd15 preset offline ---------------------------------------------------------------------


def test_sd15_preset_offline_reports_what_to_download(tmp_path, monkeypatch):
    import huggingface_hub.constants

    empty = tmp_path / "hf"
    empty.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(empty))
    # huggingface_hub reads its cache location at import; point the live value at the empty folder.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(empty / "hub"))

    start = time.monotonic()
    with pytest.raises(WeightsNotFoundError) as err:
        load_preset("sd15")
    assert time.monotonic() - start < 10
    message = str(err.value)
    for needed in (
        "SG161222/Realistic_Vision_V5.1_noVAE",
        "stabilityai/sd-vae-ft-mse",
        "h94/IP-Adapter/models/image_encoder",
        "uniportrait-faceid_sd15.bin",
        "uniportrait-router_sd15.bin",
        "glint360k_curricular_face_r101_backbone.bin",
        "ip-adapter_sd15.bin",
    ):
        assert needed in message
    assert str(empty / "hub") in message  # says where it looked

    # Explicit local paths that do not exist: the same single error, naming them.
    missing = tmp_path / "nowhere"
    with pytest.raises(WeightsNotFoundError, match="nowhere"):
        load_preset("sd15", base_model=str(missing / "base"), uniportrait=str(missing / "up"))


# -- 11. no drift ---------------------------------------------------------------------------------------


def test_base_weights_unchanged_by_generation(tiny_pipe, idents, generate):
    modules = {"unet": tiny_pipe.unet, "vae": tiny_pipe.vae, "text_encoder": tiny_pipe.text_encoder}
    before = {
        f"{m}.{k}": v.detach().clone() for m, mod in modules.items() for k, v in mod.state_dict().items()
    }
    first = generate(seed=6, identities=idents[:2], ip_image=random_pil(3), ip_scale=0.5)
    generate(seed=7, identities=idents[:1], faceid_scale=1.0)
    generate(seed=8, identities=idents[:3], faceid_masks=_masks(3))
    generate(seed=9)
    after = {f"{m}.{k}": v for m, mod in modules.items() for k, v in mod.state_dict().items()}
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"generation modified base weights: {changed[:5]}"
    # ... and the same request still gives the same image.
    assert_same(generate(seed=6, identities=idents[:2], ip_image=random_pil(3), ip_scale=0.5), first, atol=0)


def test_step_callback_sees_every_step_and_can_replace_or_stop(tiny_pipe):
    seen = []

    def record(pipe, step, t, tensors):
        seen.append((step, int(t), tuple(tensors["latents"].shape)))

    base = run_pipe(tiny_pipe, steps=3, callback_on_step_end=record).images
    assert [s for s, _, _ in seen] == [0, 1, 2]
    assert_same(base, run_pipe(tiny_pipe, steps=3).images)  # observing changes nothing

    zeroed = run_pipe(
        tiny_pipe, steps=3, callback_on_step_end=lambda p, s, t, k: {"latents": k["latents"] * 0}
    )
    assert_differ(base, zeroed.images)

    class Stop(Exception):
        pass

    def stop(pipe, step, t, tensors):
        if step == 1:
            raise Stop

    with pytest.raises(Stop):
        run_pipe(
            tiny_pipe,
            steps=3,
            identities=[tiny_pipe.encode_identity(random_crop(0))],
            callback_on_step_end=stop,
        )
    assert_same(base, run_pipe(tiny_pipe, steps=3).images)  # the pipeline is usable afterwards


def test_routing_maps_sum_to_one_when_nothing_is_routed(tiny_pipe):
    twin = tiny_pipe.encode_identity(random_crop(0))
    for kwargs in ({"identities": [twin, twin]}, {"identities": [twin, twin], "faceid_scale": 0.0}):
        out = run_pipe(tiny_pipe, return_routing_maps=True, **kwargs)
        maps = out.routing_maps[0]
        assert maps.shape[0] == 2
        torch.testing.assert_close(maps.sum(0), torch.ones(maps.shape[1:]), atol=1e-5, rtol=0)


def _tiny_safety_checker(threshold: float):
    """diffusers' safety checker with tiny random weights; ``threshold`` decides what it flags."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig

    config = CLIPConfig(
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 224, "patch_size": 32},
        projection_dim=8,
    )  # fmt: skip
    with torch.random.fork_rng():
        torch.manual_seed(0)
        checker = StableDiffusionSafetyChecker(config).eval()
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(threshold)  # cosine − threshold > 0 → flagged
        checker.special_care_embeds_weights.fill_(10.0)
    return checker


def test_safety_checker_blacks_out_flagged_images():
    from uniportrait import UniPortraitPipeline
    from uniportrait.presets import build_tiny_pipeline

    ref = build_tiny_pipeline()
    plain = run_pipe(ref).images
    for threshold, flagged in ((10.0, False), (-10.0, True)):
        pipe = UniPortraitPipeline(
            vae=ref.vae, text_encoder=ref.text_encoder, tokenizer=ref.tokenizer, unet=ref.unet,
            scheduler=ref.scheduler, image_encoder=ref.image_encoder, face_backbone=ref.face_backbone,
            adapter=ref.adapter, encoder_id=ref.encoder_id, safety_checker=_tiny_safety_checker(threshold),
        )  # fmt: skip
        out = run_pipe(pipe, num_images_per_prompt=2)
        assert out.nsfw_content_detected == [flagged, flagged]
        if flagged:
            assert np.all(out.images == 0)
        else:
            assert_same(out.images[:1], plain)
    assert (
        ref(PROMPT, num_inference_steps=1, height=64, width=64, output_type="np").nsfw_content_detected
        is None
    )
