"""UniPortraitXLPipeline (issue 14): identities on SDXL-layout models, with tiny components."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_differ, random_crop, random_pil
from diffusers import StableDiffusionXLPipeline

from uniportrait import UniPortraitPipeline, UniPortraitXLPipeline
from uniportrait.errors import UniPortraitError
from uniportrait.models.adapter import UniPortraitAdapter
from uniportrait.models.face_backbone import IRBackbone
from uniportrait.presets import build_tiny_pipeline
from uniportrait.presets.pipelines import tiny_adapter_config, tiny_backbone_config
from uniportrait.presets.tiny import build_tiny_base
from uniportrait.training.components import build_tiny_sdxl_parts


def _parts():
    """Fresh tiny SDXL components (a pipeline attaches its adapter to the UNet it is given)."""
    base = build_tiny_base(0)
    xl = build_tiny_sdxl_parts(base["tokenizer"])
    return {
        "vae": base["vae"],
        "text_encoder": xl["text_encoders"][0],
        "text_encoder_2": xl["text_encoders"][1],
        "tokenizer": base["tokenizer"],
        "tokenizer_2": base["tokenizer"],
        "unet": xl["unet"],
        "scheduler": base["scheduler"],
        "image_encoder": base["image_encoder"],
    }


@pytest.fixture
def parts():
    return _parts()


def _random_xl_adapter(parts):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        backbone = IRBackbone.from_sizes(tiny_backbone_config()).eval()
        adapter = UniPortraitAdapter.from_sizes(
            tiny_adapter_config(parts["unet"], parts["image_encoder"])
        ).eval()
        for name, param in adapter.named_parameters():
            if name.endswith("up.weight") or "router" in name:
                torch.nn.init.normal_(param, std=0.05)
    return adapter, backbone


def _run(pipe, prompt="two people at the beach", **kwargs):
    return pipe(
        prompt, height=64, width=64, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
        output_type="np", **kwargs,
    )  # fmt: skip


@pytest.fixture(scope="module")
def xl_pipe():
    parts = _parts()
    adapter, backbone = _random_xl_adapter(parts)
    pipe = UniPortraitXLPipeline(**parts, face_backbone=backbone, adapter=adapter)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_without_identities_it_is_diffusers_sdxl(parts, xl_pipe):
    sd = StableDiffusionXLPipeline(**{k: v for k, v in parts.items() if k != "image_encoder"})
    sd.set_progress_bar_config(disable=True)
    for kwargs in ({}, {"negative_prompt": "blurry", "prompt_2": "a beach", "guidance_scale": 3.0}):
        np.testing.assert_array_equal(_run(sd, **kwargs).images, _run(xl_pipe, **kwargs).images)


def test_identities_and_one_hot_routing(xl_pipe, monkeypatch):
    ids = [xl_pipe.encode_identity(random_crop(10 + i)) for i in range(2)]
    seen = []
    for proc in xl_pipe.adapter.processors:
        if proc.cross:

            def recording(hidden, tokens, call, _route=proc.route):
                weights, logits = _route(hidden, tokens, call)
                seen.append(weights)
                return weights, logits

            monkeypatch.setattr(proc, "route", recording)
    out = _run(xl_pipe, identities=ids, return_routing_maps=True)
    monkeypatch.undo()
    assert seen and all(set(w.unique().tolist()) <= {0.0, 1.0} for w in seen)  # every layer: one identity
    maps = out.routing_maps[0]
    assert maps.shape == (2, 64, 64)
    torch.testing.assert_close(maps.sum(0), torch.ones(64, 64), atol=1e-5, rtol=0)
    plain = _run(xl_pipe)
    assert_differ(out.images, plain.images)
    assert_differ(out.images, _run(xl_pipe, identities=ids[:1]).images)
    styled = _run(xl_pipe, identities=ids[:1], style_image=random_pil(3))
    assert styled.images.shape == (1, 64, 64, 3) and np.isfinite(styled.images).all()


def test_a_trained_tiny_sdxl_adapter_loads_and_generates(parts, tmp_path):
    from uniportrait.cli import main
    from uniportrait.models.adapter import read_adapter_files
    from uniportrait.training.prepare import PrepareOptions, prepare_dataset
    from uniportrait.training.samples import make_sample_source

    make_sample_source(tmp_path / "src")
    prepare_dataset(tmp_path / "src", tmp_path / "data", workers=1, options=PrepareOptions(identity_from_folder=True), progress=False)  # fmt: skip
    out = tmp_path / "run"
    code = main(
        ["-q", "train", "--stage", "1", "--preset", "tiny-sdxl", "--data", str(tmp_path / "data"),
         "--output-dir", str(out), "--set", "train.max_steps=2", "--set", "validation.every=null"]
    )  # fmt: skip
    assert code == 0
    adapter, backbone = read_adapter_files(out / "adapter")
    pipe = UniPortraitXLPipeline(**parts, face_backbone=backbone, adapter=adapter)
    pipe.set_progress_bar_config(disable=True)
    person = pipe.encode_identity(random_crop(3))
    image = _run(pipe, "a person", identities=[person]).images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()


def test_wrong_combinations_are_clear_errors(parts):
    sd15 = build_tiny_pipeline(0)
    with pytest.raises(UniPortraitError, match="another UNet"):
        UniPortraitXLPipeline(**parts, face_backbone=sd15.face_backbone, adapter=sd15.adapter)
    base = build_tiny_base(0)
    with pytest.raises(UniPortraitError, match="UniPortraitXLPipeline"):
        UniPortraitPipeline(
            base["vae"], base["text_encoder"], base["tokenizer"], parts["unet"], base["scheduler"]
        )
    with pytest.raises(UniPortraitError, match="SDXL-layout"):
        UniPortraitXLPipeline(**{**parts, "unet": base["unet"]})


def test_save_and_reload(xl_pipe, tmp_path):
    xl_pipe.save_pretrained(tmp_path / "saved")
    again = UniPortraitXLPipeline.from_pretrained(tmp_path / "saved")
    assert type(again) is UniPortraitXLPipeline
    again.set_progress_bar_config(disable=True)
    person = xl_pipe.encode_identity(random_crop(5))
    np.testing.assert_allclose(
        _run(xl_pipe, identities=[person]).images, _run(again, identities=[person]).images, atol=1e-5
    )


def test_controlnet_on_sdxl(parts, xl_pipe):
    from diffusers import ControlNetModel

    net = ControlNetModel.from_unet(parts["unet"], conditioning_channels=3)
    with torch.no_grad():  # its output convolutions start at zero: give them weights
        for param in [*net.controlnet_down_blocks.parameters(), *net.controlnet_mid_block.parameters()]:
            param.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(0))
    pipe = UniPortraitXLPipeline.from_pipe(xl_pipe, controlnet=net)
    pipe.set_progress_bar_config(disable=True)
    person = pipe.encode_identity(random_crop(7))
    edges = random_pil(8)
    out = _run(pipe, identities=[person], control_image=edges).images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()
    assert_differ(
        out, _run(pipe, identities=[person], control_image=edges, controlnet_conditioning_scale=0.0).images
    )
