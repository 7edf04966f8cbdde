"""StyleAligned (issue 14): shared self-attention with a DDIM-inverted style image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_differ, random_crop, random_pil, run_pipe
from diffusers import EulerDiscreteScheduler

from uniportrait.models.attention import StyleSharing
from uniportrait.presets import build_tiny_pipeline
from uniportrait.settings import SettingError


def _plain(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def test_shared_attention_leaves_the_reference_and_its_copies_unchanged():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(6, 2, 16, 8, generator=gen) for _ in range(3))  # two blocks of three rows
    sharing = StyleSharing(groups=2, scale=0.7)
    q2, k2, v2, bias = sharing.share(q, k, v)
    out = torch.nn.functional.scaled_dot_product_attention(q2, k2, v2, attn_mask=bias)
    plain = _plain(q, k, v)
    for ref in (2, 5):  # the last row of each block attends to itself only
        torch.testing.assert_close(out[ref], plain[ref], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out[0], plain[0], atol=1e-3)  # the others share the reference
    # a row identical to its reference is unchanged too (AdaIN to itself, duplicated keys)
    same = torch.cat([q[2:3]] * 3), torch.cat([k[2:3]] * 3), torch.cat([v[2:3]] * 3)
    out = torch.nn.functional.scaled_dot_product_attention(*StyleSharing(1).share(*same)[:3])
    torch.testing.assert_close(out, _plain(*same), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="equal blocks"):
        StyleSharing(groups=4).share(q, k, v)


def test_style_image_changes_the_images_deterministically_and_keeps_the_call_contract(tiny_pipe, idents):
    style = random_pil(3)
    plain = run_pipe(tiny_pipe, identities=idents[:2], return_routing_maps=True, num_images_per_prompt=2)
    styled = run_pipe(
        tiny_pipe, identities=idents[:2], return_routing_maps=True, num_images_per_prompt=2, style_image=style
    )
    again = run_pipe(
        tiny_pipe, identities=idents[:2], return_routing_maps=True, num_images_per_prompt=2, style_image=style
    )
    assert styled.images.shape == plain.images.shape == (2, 64, 64, 3)
    assert len(styled.routing_maps) == 2 and styled.routing_maps[0].shape == (2, 64, 64)
    assert_differ(styled.images, plain.images)
    np.testing.assert_array_equal(styled.images, again.images)
    other = run_pipe(tiny_pipe, identities=idents[:2], num_images_per_prompt=2, style_image=random_pil(4))
    assert_differ(styled.images, other.images)  # the style image matters
    weaker = run_pipe(
        tiny_pipe, identities=idents[:2], num_images_per_prompt=2, style_image=style, style_scale=0.2
    )
    assert_differ(styled.images, weaker.images)


def test_style_image_without_guidance_or_identities(tiny_pipe):
    out = run_pipe(tiny_pipe, guidance_scale=1.0, style_image=random_pil(3))
    assert out.images.shape == (1, 64, 64, 3) and np.isfinite(out.images).all()


def test_style_inversion_follows_the_call_size_and_steps(tiny_pipe):
    scheduler = tiny_pipe.scheduler.__class__.from_config(tiny_pipe.scheduler.config)
    scheduler.set_timesteps(3)
    embeds, _ = tiny_pipe.encode_prompt("", "cpu", 1, False)
    path = tiny_pipe.invert_style_image(
        random_pil(3, 96), embeds, scheduler, scheduler.timesteps, (64, 96), embeds.dtype
    )
    assert len(path) == 3 and all(z.shape == (1, 4, 64 // 8, 96 // 8) for z in path)
    assert path[0].std() > path[-1].std() * 0.5  # noisiest first


def test_style_image_refusals(tiny_pipe):
    with pytest.raises(SettingError, match="control_image"):
        run_pipe(tiny_pipe, style_image=random_pil(3), control_image=random_pil(5))
    with pytest.raises(SettingError, match="style_scale"):
        run_pipe(tiny_pipe, style_image=random_pil(3), style_scale=5.0)
    with pytest.raises(SettingError, match="PIL image"):
        run_pipe(tiny_pipe, style_image=random_crop(1))
    pipe = build_tiny_pipeline(0)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(SettingError, match="DDIM-family"):
        run_pipe(pipe, style_image=random_pil(3))
