"""The offline tiny SD-1.5-shaped base components (uniportrait.presets.tiny)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import plain_sd_pipeline
from transformers import CLIPTokenizer

from uniportrait.presets import (
    TINY_TOKENIZER_PATH,
    TinyBaseConfig,
    build_tiny_base,
    build_tiny_controlnet,
    load_tiny_tokenizer,
)

PROMPT = "a photo of a man and a woman at the beach"


@pytest.fixture(scope="module")
def base():
    return build_tiny_base(seed=0)


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_tokenizer_fixture_loads_offline_and_tokenizes(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        assert (TINY_TOKENIZER_PATH / name).is_file()
    tok = CLIPTokenizer.from_pretrained(str(TINY_TOKENIZER_PATH), local_files_only=True)
    assert tok.model_max_length == 77
    assert 2000 <= len(tok) <= 3000
    assert tok.pad_token_id == tok.eos_token_id != tok.bos_token_id

    ids = tok(PROMPT, padding="max_length", max_length=77).input_ids
    assert len(ids) == 77
    assert ids[0] == tok.bos_token_id
    assert ids[-1] == tok.eos_token_id
    words = tok.convert_ids_to_tokens(ids[1:12])
    # Common English words are single tokens, as with the real CLIP tokenizer (same ids too).
    assert words == [w + "</w>" for w in PROMPT.split()]
    assert ids[1:4] == [320, 1125, 539]  # "a", "photo", "of" in OpenAI CLIP's vocabulary
    assert ids[12] == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == PROMPT

    long = tok("word " * 200, truncation=True, max_length=tok.model_max_length).input_ids
    assert len(long) == 77 and long[-1] == tok.eos_token_id
    assert len(load_tiny_tokenizer()) == len(tok)


def test_components_shapes(base):
    cfg = TinyBaseConfig()
    assert set(base) == {"unet", "vae", "text_encoder", "tokenizer", "scheduler", "image_encoder"}
    for key in ("unet", "vae", "text_encoder", "image_encoder"):
        model = base[key]
        assert not model.training
        assert all(p.dtype == torch.float32 for p in model.parameters())
    assert 2 ** (len(base["vae"].config.block_out_channels) - 1) == cfg.vae_scale_factor == 8
    assert base["unet"].config.cross_attention_dim == base["text_encoder"].config.hidden_size
    assert base["text_encoder"].config.vocab_size == len(base["tokenizer"])
    assert base["text_encoder"].config.eos_token_id == base["tokenizer"].eos_token_id
    cross_attn = [n for n in base["unet"].attn_processors if "attn2" in n]
    assert len(cross_attn) >= 4
    assert {n.split(".")[0] for n in cross_attn} == {"down_blocks", "mid_block", "up_blocks"}

    sched = base["scheduler"].config
    assert (sched.beta_start, sched.beta_end, sched.beta_schedule) == (0.00085, 0.012, "scaled_linear")
    assert not sched.clip_sample and not sched.set_alpha_to_one and sched.steps_offset == 1

    with torch.no_grad():
        out = base["image_encoder"](pixel_values=torch.zeros(1, 3, 224, 224), output_hidden_states=True)
    assert out.last_hidden_state.shape == (1, 16 * 16 + 1, 32)
    assert out.image_embeds.shape == (1, 16)

    tok = base["tokenizer"]
    ids = tok([PROMPT, "a man"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        text = base["text_encoder"](ids)
    assert text.last_hidden_state.shape == (2, 77, 32)
    # Pooling picks the first eos position (ids 12 and 3), not a pad position.
    torch.testing.assert_close(text.pooler_output[0], text.last_hidden_state[0, 12])
    torch.testing.assert_close(text.pooler_output[1], text.last_hidden_state[1, 3])


def test_seed_determinism_and_global_rng_untouched(base):
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    same = build_tiny_base(seed=0)
    other = build_tiny_base(seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    build_tiny_controlnet(same["unet"], seed=3)
    assert torch.equal(torch.get_rng_state(), state)

    for key in ("unet", "vae", "text_encoder", "image_encoder"):
        assert _same_state(base[key], same[key]), key
        assert not _same_state(base[key], other[key]), key


def test_plain_sd_pipeline_generates_deterministically(base):
    pipe = plain_sd_pipeline(base)
    assert pipe.vae_scale_factor == 8

    def run(seed):
        return pipe(
            PROMPT,
            num_inference_steps=2,
            output_type="np",
            generator=torch.Generator().manual_seed(seed),
        ).images

    a, b, c = run(0), run(0), run(1)
    assert a.shape == (1, 256, 256, 3)
    assert np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_controlnet_changes_unet_output(base):
    unet = base["unet"]
    controlnet = build_tiny_controlnet(unet, seed=0)
    assert not controlnet.training
    again = build_tiny_controlnet(unet, seed=0)
    assert _same_state(controlnet, again)

    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 32, 32, generator=g)
    cond_image = torch.rand(1, 3, 256, 256, generator=g)
    ids = base["tokenizer"](PROMPT, padding="max_length", max_length=77, return_tensors="pt").input_ids
    t = torch.tensor([500])
    with torch.no_grad():
        text = base["text_encoder"](ids).last_hidden_state
        down, mid = controlnet(latents, t, text, controlnet_cond=cond_image, return_dict=False)
        assert all(torch.isfinite(r).all() for r in (*down, mid))
        plain = unet(latents, t, text).sample
        controlled = unet(
            latents, t, text, down_block_additional_residuals=down, mid_block_additional_residual=mid
        ).sample
    assert controlled.shape == plain.shape == latents.shape
    assert torch.isfinite(controlled).all()
    assert (controlled - plain).abs().max() > 1e-3
