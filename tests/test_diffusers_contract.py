"""UniPortraitPipeline keeps diffusers' pipeline contracts (issue 14).

Each test is one thing a diffusers user does on day one: memory features, offloading,
``from_pipe``, the call arguments of ``StableDiffusionPipeline``, ControlNets, ``torch.compile``.
The reference is diffusers' own ``StableDiffusionPipeline`` wherever identities are off.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import PROMPT, assert_differ, assert_same, plain_sd_pipeline, random_crop, run_pipe
from diffusers import ControlNetModel, EulerDiscreteScheduler
from diffusers.models.attention_processor import AttnProcessor2_0

from uniportrait.errors import UniPortraitError
from uniportrait.pipeline import ProcessorsReplacedError, UniPortraitPipeline
from uniportrait.presets import build_tiny_pipeline
from uniportrait.presets.tiny import build_tiny_base, build_tiny_controlnet


@pytest.fixture
def fresh_pipe():
    """A tiny pipeline this test may modify (the session one must stay as it is)."""
    pipe = build_tiny_pipeline(0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _ids(pipe, n=2):
    return [pipe.encode_identity(random_crop(10 + i)) for i in range(n)]


# -- processors: kept, or a clear refusal ----------------------------------------------------------


def test_attention_slicing_and_xformers_refuse_instead_of_dropping_identities(fresh_pipe):
    ids = _ids(fresh_pipe, 1)
    before = run_pipe(fresh_pipe, identities=ids).images
    with pytest.raises(ProcessorsReplacedError, match="attention slicing"):
        fresh_pipe.enable_attention_slicing()
    with pytest.raises(ProcessorsReplacedError, match="xFormers"):
        fresh_pipe.enable_xformers_memory_efficient_attention()
    fresh_pipe.disable_attention_slicing()  # nothing to undo
    fresh_pipe.disable_xformers_memory_efficient_attention()
    assert fresh_pipe.adapter.is_attached(fresh_pipe.unet)
    assert_same(before, run_pipe(fresh_pipe, identities=ids).images)


def test_replaced_processors_are_reported_not_ignored(fresh_pipe):
    ids = _ids(fresh_pipe, 1)
    want = run_pipe(fresh_pipe, identities=ids).images
    fresh_pipe.unet.set_attn_processor(AttnProcessor2_0())  # any diffusers method that swaps them
    run_pipe(fresh_pipe)  # without identities the UNet is plain SD: fine
    with pytest.raises(ProcessorsReplacedError, match="adapter.attach"):
        run_pipe(fresh_pipe, identities=ids)
    fresh_pipe.adapter.attach(fresh_pipe.unet)
    assert_same(want, run_pipe(fresh_pipe, identities=ids).images)


def test_unet_state_dict_is_the_base_one_and_controlnet_from_unet_works(tiny_pipe):
    base = build_tiny_base(0)["unet"].state_dict()
    state = tiny_pipe.unet.state_dict()
    assert state.keys() == base.keys()
    assert all(torch.equal(state[k], v) for k, v in base.items())
    controlnet = ControlNetModel.from_unet(tiny_pipe.unet)
    assert torch.equal(controlnet.conv_in.weight, tiny_pipe.unet.conv_in.weight)


# -- offloading and VAE memory features --------------------------------------------------------------


def _offload_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"  # without an accelerator: the CPU itself


def test_model_cpu_offload_keeps_identities():
    want_pipe = build_tiny_pipeline(0)
    want_pipe.set_progress_bar_config(disable=True)
    want = run_pipe(want_pipe, identities=_ids(want_pipe)).images
    pipe = build_tiny_pipeline(0)
    pipe.set_progress_bar_config(disable=True)
    pipe.enable_model_cpu_offload(device=_offload_device())
    assert_same(want, run_pipe(pipe, identities=_ids(pipe)).images, atol=1e-4)


def test_sequential_cpu_offload_keeps_identities():
    want_pipe = build_tiny_pipeline(0)
    want_pipe.set_progress_bar_config(disable=True)
    want = run_pipe(want_pipe, identities=_ids(want_pipe)).images
    pipe = build_tiny_pipeline(0)
    pipe.set_progress_bar_config(disable=True)
    pipe.enable_sequential_cpu_offload(
        device=_offload_device()
    )  # used to fail: "Cannot copy out of meta tensor"
    assert pipe.unet.conv_in.weight.is_meta  # offloaded, loaded layer by layer
    assert not any(p.is_meta for p in pipe.adapter.parameters())  # kept on the execution device
    sd = plain_sd_pipeline(build_tiny_base(0))
    sd.enable_sequential_cpu_offload(device=_offload_device())
    try:
        run_pipe(sd)
    except (
        TypeError
    ) as err:  # accelerate's offload hooks fail on some torch versions when executing on the CPU
        reason = str(err).splitlines()[0]
        pytest.skip(
            f"diffusers' own StableDiffusionPipeline cannot run sequentially offloaded here: {reason}"
        )
    assert_same(want, run_pipe(pipe, identities=_ids(pipe)).images, atol=1e-4)


def test_vae_slicing_and_tiling(fresh_pipe):
    ids = _ids(fresh_pipe, 1)
    want = run_pipe(fresh_pipe, identities=ids, num_images_per_prompt=2).images
    fresh_pipe.enable_vae_slicing()
    assert fresh_pipe.vae.use_slicing
    assert_same(want, run_pipe(fresh_pipe, identities=ids, num_images_per_prompt=2).images, atol=1e-5)
    fresh_pipe.disable_vae_slicing()
    fresh_pipe.enable_vae_tiling()
    assert fresh_pipe.vae.use_tiling
    fresh_pipe.vae.tile_sample_min_size, fresh_pipe.vae.tile_latent_min_size = 32, 4  # tiles at 64 px
    tiled = run_pipe(fresh_pipe, identities=ids, num_images_per_prompt=2).images
    assert tiled.shape == want.shape and np.isfinite(tiled).all()
    fresh_pipe.disable_vae_tiling()
    assert_same(want, run_pipe(fresh_pipe, identities=ids, num_images_per_prompt=2).images, atol=1e-5)


# -- from_pipe ---------------------------------------------------------------------------------------


def test_from_pipe_adds_identities_to_a_stable_diffusion_pipeline(tiny_pipe):
    base = build_tiny_base(0)
    sd = plain_sd_pipeline(base)
    plain = run_pipe(sd, seed=3).images
    pipe = UniPortraitPipeline.from_pipe(
        sd,
        image_encoder=tiny_pipe.image_encoder,
        face_backbone=tiny_pipe.face_backbone,
        adapter=build_tiny_pipeline(0).adapter,
    )
    assert isinstance(pipe, UniPortraitPipeline) and pipe.unet is sd.unet and pipe.vae is sd.vae
    pipe.set_progress_bar_config(disable=True)
    assert_same(plain, run_pipe(pipe, seed=3).images)  # no identity: the SD pipeline's images
    assert_differ(plain, run_pipe(pipe, seed=3, identities=_ids(pipe, 1)).images)


# -- the call contract ---------------------------------------------------------------------------------


def test_return_dict_false_is_images_and_nsfw_flags(tiny_pipe, idents):
    out = run_pipe(tiny_pipe, identities=idents[:2], return_dict=False)
    assert isinstance(out, tuple) and len(out) == 2
    images, nsfw = out
    assert images.shape == (1, 64, 64, 3) and nsfw is None  # no safety checker
    assert_same(images, run_pipe(tiny_pipe, identities=idents[:2]).images)


def test_encode_prompt_is_diffusers_and_prompt_embeds_give_the_same_images(tiny_pipe, idents):
    sd = plain_sd_pipeline(tiny_pipe.components)
    ours = tiny_pipe.encode_prompt(PROMPT, "cpu", 2, True, "blurry")
    theirs = sd.encode_prompt(PROMPT, "cpu", 2, True, "blurry")
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    positive, negative = tiny_pipe.encode_prompt(PROMPT, "cpu", 1, True, "blurry")
    want = run_pipe(tiny_pipe, identities=idents[:1], negative_prompt="blurry").images
    got = run_pipe(
        tiny_pipe, prompt=None, identities=idents[:1], prompt_embeds=positive, negative_prompt_embeds=negative
    ).images
    assert_same(want, got)
    with pytest.raises(UniPortraitError, match="not both"):
        run_pipe(tiny_pipe, prompt_embeds=positive)


def _clip_skip_reference(pipe, clip_skip: int) -> torch.Tensor:
    """CLIP's penultimate-layer states, final-normed, computed by hand: (1, 77, D)."""
    tokens = pipe.tokenizer(PROMPT, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    hidden = pipe.text_encoder(tokens.input_ids, output_hidden_states=True).hidden_states
    return pipe.text_encoder.final_layer_norm(hidden[-(clip_skip + 1)])


@pytest.mark.parametrize(
    "kwargs",
    [{"clip_skip": 1}, {"guidance_rescale": 0.7}, {"cross_attention_kwargs": {"scale": 1.0}}],
    ids=["clip_skip", "guidance_rescale", "cross_attention_kwargs"],
)
def test_call_arguments_match_stable_diffusion(tiny_pipe, idents, kwargs):
    """Without identities the pipeline is diffusers' SD pipeline for each argument; with them the
    argument still applies on top of the identity conditioning."""
    sd = plain_sd_pipeline(build_tiny_base(0))
    if "clip_skip" in kwargs:  # diffusers' own clip_skip needs transformers < 5: the states by hand
        with torch.no_grad():
            embeds = _clip_skip_reference(sd, kwargs["clip_skip"])
        want = run_pipe(sd, prompt=None, seed=4, prompt_embeds=embeds).images
    else:
        want = run_pipe(sd, seed=4, **kwargs).images
    assert_same(want, run_pipe(tiny_pipe, seed=4, **kwargs).images)
    with_ids = run_pipe(tiny_pipe, seed=4, identities=idents[:1], **kwargs).images
    assert_differ(with_ids, want)
    if "cross_attention_kwargs" not in kwargs:  # the argument changes images with identities too
        assert_differ(with_ids, run_pipe(tiny_pipe, seed=4, identities=idents[:1]).images)
    else:  # merged with ours: identity conditioning is still applied, unchanged
        assert_same(with_ids, run_pipe(tiny_pipe, seed=4, identities=idents[:1]).images)


def test_custom_timesteps_and_sigmas(fresh_pipe):
    """As in diffusers' SD pipeline (scale 0), and with identities; refused where the scheduler cannot."""
    ids = _ids(fresh_pipe, 1)
    with pytest.raises(UniPortraitError, match="DDIMScheduler does not take custom timesteps"):
        run_pipe(fresh_pipe, identities=ids, timesteps=[501, 1])
    fresh_pipe.scheduler = EulerDiscreteScheduler.from_config(fresh_pipe.scheduler.config)
    base = build_tiny_base(0)
    base["scheduler"] = fresh_pipe.scheduler
    sd = plain_sd_pipeline(base)
    steps = []

    def count(pipe, step, t, kwargs):
        steps.append(step)
        return {}

    for schedule in ({"timesteps": [999, 600, 250, 0]}, {"sigmas": [14.6, 3.0, 0.5, 0.03]}):
        assert_same(run_pipe(sd, **schedule).images, run_pipe(fresh_pipe, **schedule).images)
        steps.clear()
        run_pipe(fresh_pipe, identities=ids, callback_on_step_end=count, **schedule)
        assert steps == list(range(fresh_pipe.num_timesteps)) and len(steps) >= 3
    with pytest.raises(UniPortraitError, match="not both"):
        run_pipe(fresh_pipe, timesteps=[999, 0], sigmas=[14.6, 0.03])


def test_callback_tensor_inputs_and_interrupt(tiny_pipe, idents):
    seen = []

    def callback(pipe, step, t, kwargs):
        seen.append((step, sorted(kwargs)))
        assert kwargs["prompt_embeds"].shape == kwargs["negative_prompt_embeds"].shape
        return {"latents": kwargs["latents"] * 0.0}

    inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]
    zeroed = run_pipe(
        tiny_pipe,
        identities=idents[:1],
        output_type="latent",
        callback_on_step_end=callback,
        callback_on_step_end_tensor_inputs=inputs,
    ).images
    assert seen == [(0, sorted(inputs)), (1, sorted(inputs))]
    assert torch.count_nonzero(zeroed) == 0
    with pytest.raises(UniPortraitError, match="callback_on_step_end_tensor_inputs"):
        run_pipe(tiny_pipe, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["noise"])

    steps = []

    def stop(pipe, step, t, kwargs):
        steps.append(step)
        pipe._interrupt = True
        return {}

    run_pipe(tiny_pipe, identities=idents[:1], steps=3, callback_on_step_end=stop)
    assert steps == [0] and tiny_pipe.interrupt
    assert tiny_pipe.num_timesteps == 3


# -- ControlNets -----------------------------------------------------------------------------------------


def test_multi_controlnet(tiny_pipe, idents):
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    base = build_tiny_pipeline(0)
    second = build_tiny_controlnet(base.unet, seed=9)
    components = {**tiny_pipe.components, "controlnet": [tiny_pipe.controlnet, second]}
    pipe = UniPortraitPipeline(**components, encoder_id=tiny_pipe.encoder_id)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.controlnet, MultiControlNetModel)
    control = [np.full((64, 64, 3), 255, np.uint8), np.zeros((64, 64, 3), np.uint8)]
    ids = idents[:2]
    single = run_pipe(tiny_pipe, identities=ids, control_image=control[0]).images
    # The second net at scale 0 adds nothing: the result is the first net's alone.
    both = run_pipe(pipe, identities=ids, control_image=control, controlnet_conditioning_scale=[1.0, 0.0])
    assert_same(single, both.images, atol=1e-5)
    assert_differ(single, run_pipe(pipe, identities=ids, control_image=control).images)
    with pytest.raises(UniPortraitError, match="2 ControlNets"):
        run_pipe(pipe, identities=ids, control_image=control[0])
    tiny_pipe.adapter.attach(tiny_pipe.unet)  # the shared UNet gets the session pipeline's processors back


# -- torch.compile ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_attention_path_compiles_without_graph_breaks(tiny_pipe, idents):
    """One transformer block (self- and cross-attention with two routed identities), traced by
    dynamo with ``fullgraph=True``: any host sync in our code would be a graph break (an error)."""
    from uniportrait.models.attention import AttentionCall

    tokens = torch.stack([tiny_pipe.identity_tokens(i, 0.3) for i in idents[:2]])[None]
    uncond = tiny_pipe.unconditional_identity_tokens(0.3)[None, None].expand(1, 2, -1, -1)
    tokens = torch.cat([uncond, tokens])  # (2, N, T, D): CFG's negative half first

    def call():  # as the pipeline makes it: the unconditional rows are known
        return AttentionCall(
            id_tokens=tokens, faceid_scale=0.7, lora="multi", latent_hw=(32, 32), shared_rows=1
        )

    block = tiny_pipe.unet.down_blocks[0].attentions[0]
    hidden = torch.randn(2, 32, 32, 32, generator=torch.Generator().manual_seed(0))
    text = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            eager = block(hidden, text, cross_attention_kwargs={"uniportrait": call()}, return_dict=False)[0]
            compiled = torch.compile(block, backend="eager", fullgraph=True)
            traced = compiled(
                hidden, text, cross_attention_kwargs={"uniportrait": call()}, return_dict=False
            )[0]
    finally:
        torch._dynamo.reset()
    assert torch.equal(eager, traced)


# -- load_uniportrait / unload_uniportrait on any SD pipeline, LoRAs ------------------------------------------


def _published_files(pipe) -> dict:
    """The tiny pipeline's adapter as the published files (in memory)."""
    from uniportrait.convert import BACKBONE_FILE, named_to_published

    files = named_to_published(pipe.adapter)
    files[BACKBONE_FILE] = pipe.face_backbone.state_dict()
    return files


def test_load_and_unload_uniportrait_on_a_stable_diffusion_pipeline(tiny_pipe):
    from uniportrait.presets.pipelines import tiny_adapter_config, tiny_backbone_config

    base = build_tiny_base(0)
    sd = plain_sd_pipeline(base)
    plain = run_pipe(sd, seed=2).images
    processors = sd.unet.attn_processors
    state = {k: v.clone() for k, v in sd.unet.state_dict().items()}

    pipe = UniPortraitPipeline.from_pipe(sd)  # no adapter yet: a plain SD pipeline
    pipe.set_progress_bar_config(disable=True)
    assert_same(plain, run_pipe(pipe, seed=2).images)
    with pytest.raises(UniPortraitError, match="load_uniportrait"):
        pipe.encode_identity(random_crop(1))
    pipe.load_uniportrait(
        _published_files(tiny_pipe),
        image_encoder=base["image_encoder"],
        adapter_config=tiny_adapter_config(base["unet"], base["image_encoder"], ip_adapter=False),
        face_backbone_config=tiny_backbone_config(),
    )
    ids = [pipe.encode_identity(random_crop(1)), pipe.encode_identity(random_crop(2))]
    # The same adapter weights as the session pipeline: the same images.
    want = run_pipe(tiny_pipe, seed=2, identities=[tiny_pipe.encode_identity(random_crop(i)) for i in (1, 2)])
    assert_same(want.images, run_pipe(pipe, seed=2, identities=ids).images, atol=1e-5)
    with pytest.raises(UniPortraitError, match="already loaded"):
        pipe.load_uniportrait(_published_files(tiny_pipe))

    pipe.unload_uniportrait()
    after = sd.unet.attn_processors
    assert all(after[name] is proc for name, proc in processors.items())  # the very same processors
    unet_state = sd.unet.state_dict()
    assert unet_state.keys() == state.keys() and all(torch.equal(unet_state[k], v) for k, v in state.items())
    assert_same(plain, run_pipe(sd, seed=2).images)
    with pytest.raises(UniPortraitError, match="load_uniportrait"):
        run_pipe(pipe, identities=ids)


def _random_lora(unet, seed: int) -> dict[str, torch.Tensor]:
    """A random rank-4 LoRA on every attention projection, as diffusers' loaders read it."""
    from peft import LoraConfig, get_peft_model_state_dict

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        copy = build_tiny_base(0)["unet"]
        copy.add_adapter(
            LoraConfig(
                r=4,
                lora_alpha=4,
                target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                init_lora_weights=False,
            )
        )
    return {f"unet.{k}": v * 0.5 for k, v in get_peft_model_state_dict(copy).items()}


def test_style_lora_composes_with_identities(fresh_pipe):
    pytest.importorskip("peft")
    ids = _ids(fresh_pipe, 2)
    without = run_pipe(fresh_pipe, identities=ids).images
    fresh_pipe.load_lora_weights(_random_lora(fresh_pipe.unet, 1), adapter_name="style")
    assert fresh_pipe.adapter.is_attached(fresh_pipe.unet)  # our processors are kept
    styled = run_pipe(fresh_pipe, identities=ids).images
    assert_differ(without, styled)
    assert_differ(
        styled, run_pipe(fresh_pipe, identities=ids, faceid_scale=0.0).images
    )  # identities still act
    # the LoRA's scale travels in cross_attention_kwargs, merged with ours
    off = run_pipe(fresh_pipe, identities=ids, cross_attention_kwargs={"scale": 0.0}).images
    assert_same(without, off, atol=1e-5)
    fresh_pipe.unload_lora_weights()
    assert_same(without, run_pipe(fresh_pipe, identities=ids).images, atol=1e-5)


def test_lcm_lora_with_lcm_scheduler_at_four_steps(fresh_pipe):
    pytest.importorskip("peft")
    from diffusers import LCMScheduler

    lora = _random_lora(fresh_pipe.unet, 2)
    base = build_tiny_base(0)
    base["scheduler"] = LCMScheduler.from_config(base["scheduler"].config)
    sd = plain_sd_pipeline(base)
    sd.load_lora_weights(dict(lora))
    fresh_pipe.scheduler = LCMScheduler.from_config(fresh_pipe.scheduler.config)
    fresh_pipe.load_lora_weights(dict(lora))
    lcm = {"steps": 4, "guidance_scale": 1.0}  # LCM: no classifier-free guidance
    assert_same(run_pipe(sd, **lcm).images, run_pipe(fresh_pipe, **lcm).images, atol=1e-5)
    ids = _ids(fresh_pipe, 2)
    out = run_pipe(fresh_pipe, identities=ids, return_routing_maps=True, **lcm)
    assert np.isfinite(out.images).all()
    assert_differ(out.images, run_pipe(fresh_pipe, **lcm).images)
    maps = out.routing_maps[0]  # (N, H, W), one-hot over the identities at each pixel
    assert maps.shape[0] == 2 and torch.allclose(maps.sum(0), torch.ones_like(maps[0]))
