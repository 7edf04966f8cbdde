"""The Q-Former's identity warm-up (uniportrait.training.warmup): its loss and its refusals.

That it makes tokens tell held-out people apart is tested on world data in
``test_world_learning.py``."""

from __future__ import annotations

import pytest
import torch

from uniportrait.errors import ConfigError
from uniportrait.training.config import load_config
from uniportrait.training.warmup import identity_infonce, labelled_people


def test_infonce_rewards_matching_photos_and_punishes_swapped_ones():
    people = torch.nn.functional.one_hot(torch.arange(6), 8).float()  # (6, 8) orthogonal people
    tokens = people.repeat_interleave(2, 0).view(12, 2, 4)  # rows 2k, 2k+1: person k
    loss, accuracy = identity_infonce(tokens)
    assert accuracy == 1.0 and loss.item() < 1e-3
    swapped = tokens.view(6, 2, 2, 4).clone()
    swapped[:, 1] = swapped[torch.roll(torch.arange(6), 1), 1]  # second photos of the wrong people
    loss_swapped, accuracy_swapped = identity_infonce(swapped.view(12, 2, 4))
    assert accuracy_swapped == 0.0 and loss_swapped.item() > 5


def test_warmup_settings_are_checked(tmp_path):
    base = [f"data.path={tmp_path}", "model.preset=tiny"]
    with pytest.raises(ConfigError, match="id_warmup_steps must be at least 0"):
        load_config(None, [*base, "train.id_warmup_steps=-1"], stage=1)
    with pytest.raises(ConfigError, match="id_warmup_lr"):
        load_config(None, [*base, "train.id_warmup_steps=5", "train.id_warmup_lr=0"], stage=1)
    with pytest.raises(ConfigError, match="only stage I trains"):
        load_config(None, [*base, "train.id_warmup_steps=5", "model.init_adapter=x"], stage=2)
    assert load_config(None, [*base, "train.id_warmup_steps=5"], stage=1).train.id_warmup_steps == 5


class _Unlabelled:
    by_label = {"world-1": [(0, 0)]}  # one photo: nothing to pair


def test_warmup_needs_two_photos_of_two_people():
    with pytest.raises(ConfigError, match="identity labels"):
        labelled_people(_Unlabelled())


def test_zero_faceid_values_start_the_identity_attention_silent(tmp_path):
    from uniportrait.training.components import load_components

    def faceid(flag: bool):
        cfg = load_config(
            None, [f"data.path={tmp_path}", "model.preset=tiny", f"model.zero_faceid_values={flag}"], stage=1
        )
        c = load_components(cfg)
        procs = [p for p in c.adapter.processors if hasattr(p, "to_v_faceid")]
        return c, procs

    _, copied = faceid(False)
    c, silent = faceid(True)
    assert silent and all(p.to_v_faceid.weight.abs().sum() == 0 for p in silent)
    assert all(p.to_v_faceid.weight.abs().sum() > 0 for p in copied)
    # the keys are still the UNet's text keys: only the values start silent
    for a, b in zip(copied, silent):
        assert torch.equal(a.to_k_faceid.weight, b.to_k_faceid.weight)
