"""UniPortrait in the identity world: the measures of the identity report (trait attribution,
copy rate, layout masks), the face-weighted loss, the identity-report command and the world demo."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import load_script

from uniportrait.world.build import WORLD_ASSETS
from uniportrait.world.identity_report import ATTRIBUTION_TRAITS, _is_blend, layout_masks, trait_shares
from uniportrait.world.traits import CONTINUOUS_TRAITS, DISCRETE_TRAITS, HELD_OUT_START, Traits

shipped_adapter = pytest.mark.skipif(
    not (WORLD_ASSETS / "adapter" / "config.json").is_file(),
    reason="no world adapter in this checkout (train one: configs/world/stage1.yaml)",
)


def _pair_differing_everywhere() -> tuple[Traits, Traits]:
    """Two identities whose attribution traits all tell them apart."""
    for k in range(10_000):
        a, b = Traits.of(HELD_OUT_START + 2 * k), Traits.of(HELD_OUT_START + 2 * k + 1)
        cont = all(
            abs(getattr(a, n) - getattr(b, n)) >= 0.3 for n in ATTRIBUTION_TRAITS if n in CONTINUOUS_TRAITS
        )
        disc = all(getattr(a, n) != getattr(b, n) for n in ATTRIBUTION_TRAITS if n in DISCRETE_TRAITS)
        if cont and disc:
            return a, b
    raise AssertionError("no such pair")


def test_trait_attribution_tells_a_person_from_a_blend():
    a, b = _pair_differing_everywhere()
    va, vb = a.vector(), b.vector()
    assert trait_shares(va, va, vb) == (1.0, 0.0)
    assert trait_shares(vb, va, vb) == (0.0, 1.0)
    assert not _is_blend(*trait_shares(va, va, vb))
    # half of the attribution traits from each person: a blend
    names = list(ATTRIBUTION_TRAITS)
    from_b = set(names[::2])
    cont = tuple(getattr(b if n in from_b else a, n) for n in CONTINUOUS_TRAITS)
    disc = {n: getattr(b if n in from_b else a, n) for n in DISCRETE_TRAITS}
    mixed = Traits(cont=cont, **disc).vector()
    share_a, share_b = trait_shares(mixed, va, vb)
    assert share_a == pytest.approx(0.5) and share_b == pytest.approx(0.5)
    assert _is_blend(share_a, share_b)
    # traits outside the attribution set do not count
    other = Traits(cont=tuple(1 - v if n not in names else v for n, v in zip(CONTINUOUS_TRAITS, a.cont)),
                   **{n: getattr(a, n) for n in DISCRETE_TRAITS}).vector()  # fmt: skip
    assert trait_shares(other, va, vb) == (1.0, 0.0)
    # two identical people: nothing tells them apart
    assert trait_shares(va, va, va) == (0.0, 0.0)


def test_layout_masks_cover_each_persons_face():
    from uniportrait.world.scenes import sample_spec

    spec = sample_spec(np.random.default_rng(0), [HELD_OUT_START + 1, HELD_OUT_START + 2], seed=3)
    masks = layout_masks(spec)
    boxes = spec.render().boxes
    assert masks.shape == (2, spec.height, spec.width)
    for k, (x0, y0, x1, y1) in enumerate(boxes):
        cx, cy = int((x0 + x1) / 2), int((y0 + y1) / 2)
        assert masks[k, cy, cx] == 1 and masks[1 - k, cy, cx] == 0  # each face in its own mask only
    assert 0 < masks.mean() < 0.5


def test_face_weighted_loss():
    from uniportrait.training.model import face_weighted_mse

    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    masks = torch.zeros(2, 1, 32, 32, dtype=torch.bool)
    masks[:, :, 8:16, 8:16] = True  # a face: latent pixels (2..3, 2..3)
    plain = torch.nn.functional.mse_loss(pred, target)
    assert face_weighted_mse(pred, target, masks, 1.0) == pytest.approx(float(plain))
    # the same error everywhere: the weighting changes nothing (normalised by the mean weight)
    assert face_weighted_mse(target + 0.5, target, masks, 5.0) == pytest.approx(0.25)
    # error only on the face weighs more, only off the face less
    on_face = target.clone()
    on_face[:, :, 2:4, 2:4] += 1.0
    off_face = target.clone()
    off_face[:, :, 5:7, 5:7] += 1.0
    assert face_weighted_mse(on_face, target, masks, 5.0) > face_weighted_mse(on_face, target, masks, 1.0)
    assert face_weighted_mse(off_face, target, masks, 5.0) < face_weighted_mse(off_face, target, masks, 1.0)


def test_face_loss_weight_must_be_positive():
    from uniportrait.errors import ConfigError
    from uniportrait.training.config import load_config

    with pytest.raises(ConfigError, match="face_loss_weight"):
        load_config(None, ["train.face_loss_weight=0", "model.preset=tiny", "data.path=x"], stage=1)


def test_cubic_timestep_sampling_favours_the_noisy_steps_and_uniform_is_unchanged():
    """``train.timestep_sampling``: "cubic" puts ~79% of the steps in the noisier half and spans
    [0, T); "uniform" draws exactly what torch.randint drew before the option (runs reproduce);
    anything else is refused by the config."""
    import torch

    from uniportrait.errors import ConfigError
    from uniportrait.training.config import load_config
    from uniportrait.training.model import sample_timesteps

    t = sample_timesteps(20_000, 1000, "cubic", torch.Generator().manual_seed(0), "cpu")
    assert t.dtype == torch.int64 and t.min() >= 0 and t.max() <= 999
    assert 0.77 < (t >= 500).float().mean() < 0.81  # 1 - 0.5 ** (1 / 3) = 0.794
    uniform = sample_timesteps(64, 1000, "uniform", torch.Generator().manual_seed(3), "cpu")
    assert torch.equal(uniform, torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(3)))
    assert (
        0.45
        < (sample_timesteps(20_000, 1000, "uniform", torch.Generator(), "cpu") >= 500).float().mean()
        < 0.55
    )
    with pytest.raises(ConfigError, match="timestep_sampling"):
        load_config(None, ["train.timestep_sampling=late", "model.preset=tiny", "data.path=x"], stage=1)


@shipped_adapter
def test_identity_report_measures_a_world_adapter(tmp_path):
    from uniportrait.cli import main

    out = tmp_path / "report"
    args = ["-q", "world", "identity-report", "--out", str(out), "--singles", "2", "--groups", "2",
            "--seeds", "1", "--sections", "single,multi"]  # fmt: skip
    assert main(args) == 0
    report = json.loads((out / "identity_report.json").read_text())
    rows = report["single"]
    assert set(rows) == {"base model (no identity)", "UniPortrait stage I",
                         "structure branch off (face_structure_scale 0)",
                         "UniPortrait stage I, identity guidance 10"}  # fmt: skip
    for row in rows.values():
        assert 0 <= row["prompt_following"]["mean"] <= 1
        assert -1 <= row["face_sim"]["mean"] <= 1
        assert 0 <= row["identification"]["mean"] <= 1 and row["identification_chance"]["mean"] == 0.5
    assert set(report["multi_2"]) == set(report["multi_3"]) == {
        "no routing (every identity everywhere)", "user masks (layout boxes)", "router",
        "router, identity guidance 10"}  # fmt: skip
    assert "routing_accuracy" in report["multi_2"]["router, identity guidance 10"]
    assert (out / "single_stage1.png").is_file() and (out / "multi_2_router.png").is_file()
    # a second run resumes: rows already measured are kept, not measured again
    before = (out / "identity_report.json").read_text()
    assert main(args) == 0
    assert (out / "identity_report.json").read_text() == before


def test_identity_report_refuses_bad_input(tmp_path, capsys):
    from uniportrait.cli import main

    out = tmp_path / "r"
    assert main(["world", "identity-report", "--out", str(out), "--sections", "single,tables"]) == 2
    assert "unknown part(s) tables" in capsys.readouterr().err
    assert main(["world", "identity-report", "--out", str(out), "--seeds", "0"]) == 2
    assert not out.exists()
    assert main(["world", "identity-report", "--out", str(out), "--base", str(tmp_path)]) == 2
    assert "is not a base model folder" in capsys.readouterr().err
    assert not out.exists()
    assert main(["world", "export-adapter", str(tmp_path), "--out", str(out)]) == 2  # not an adapter
    assert "not an adapter folder or a training checkpoint" in capsys.readouterr().err
    assert main(["demo", "--preset", "world", "--adapter", str(tmp_path / "none"), "--out", str(out)]) == 2
    assert not out.exists()


@shipped_adapter
def test_world_demo_shows_held_out_people_with_oracle_scores(tmp_path, capsys):
    from PIL import Image

    from uniportrait.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--preset", "world", "--out", str(out), "--steps", "3"]) == 0
    printed = capsys.readouterr().out
    assert "Face Sim" in printed
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.width > 600 and sheet.height > 800  # 3 people x 5 pictures, then 2 groups
    for name in ("ada-0", "ben-3", "cleo-1", "group-2", "group-2-routing", "group-3-routing"):
        assert (out / f"{name}.png").is_file(), name
    assert Image.open(out / "group-3.png").size == (128, 64)


@pytest.mark.skipif(
    not (WORLD_ASSETS / "oracles" / "detector" / "config.json").is_file(), reason="no oracles"
)
def test_identification_picks_out_the_person_among_the_rows_people():
    """The report's identification and trait agreement on renders: the caption's own person is
    picked out among the row's people and their traits read back; the same pictures credited to
    the wrong people are not."""
    from uniportrait.world.identity_report import (
        ATTRIBUTION_TRAITS,
        identity_cases,
        markdown_tables,
        measure_identity_pictures,
    )
    from uniportrait.world.oracles import WorldOracles, default_oracles_dir
    from uniportrait.world.report import summarise_runs

    oracles = WorldOracles(default_oracles_dir())
    cases = identity_cases(oracles, 12, 1)
    images = np.stack([c.spec.render().image for c in cases])
    right = measure_identity_pictures(oracles, images, cases)
    assert right["identification_chance"] == pytest.approx(1 / 12)
    assert right["identification"] >= 0.9  # measured 1.0 (the recogniser's ROC AUC is 0.999)
    assert right["pairwise_identification"] >= 0.95
    wrong = measure_identity_pictures(oracles, np.roll(images, 1, axis=0), cases)
    assert wrong["identification"] <= 0.2 and wrong["pairwise_identification"] <= 0.7
    # trait agreement: the renders show their own person's traits, the rolled pictures another's
    assert set(right["trait_agreement"]) == set(ATTRIBUTION_TRAITS)
    assert np.mean(list(right["trait_agreement"].values())) >= 0.7  # measured 0.80
    assert np.mean(list(wrong["trait_agreement"].values())) <= 0.4  # measured 0.20
    assert "Trait agreement" in markdown_tables({"single": {"renders": summarise_runs([right])}})
    # a person captioned more than once is one person: chance is one over the people, and a face
    # nearest to any reference of its own person is identified
    repeated = identity_cases(oracles, 12, 1, identities=4)
    people = {c.spec.people[0].identity for c in repeated}
    again = measure_identity_pictures(oracles, np.stack([c.spec.render().image for c in repeated]), repeated)
    assert len(people) < 12 and again["identification_chance"] == pytest.approx(1 / len(people))
    assert again["identification"] >= 0.9 and again["pairwise_identification"] >= 0.95
    # training people: the same captions and scenes, people the world's training data draws from
    trained = identity_cases(oracles, 12, 1, held_out=False)
    assert [c.caption for c in trained] == [c.caption for c in cases]
    assert all(
        c.spec.people[0].identity == a.spec.people[0].identity - HELD_OUT_START
        for c, a in zip(trained, cases)
    )
    assert all(c.conditioning[0].people[0].identity == c.spec.people[0].identity for c in trained)
    # close framing: the same people, captions and photos' scenes, every face drawn larger
    close = identity_cases(oracles, 12, 1, framing="close")
    assert [c.caption for c in close] == [c.caption for c in cases]
    for a, b in zip(cases, close):
        assert a.spec.people[0].identity == b.spec.people[0].identity
        for x, y in ((a.spec, b.spec), (a.conditioning[0], b.conditioning[0])):
            assert y.people[0].look.size > 1.3 * x.people[0].look.size


@shipped_adapter
def test_sdedit_probe_denoises_the_persons_own_render_from_the_asked_step(capsys):
    """scripts/world_sdedit_probe.py: started one step before the end, the picture is the
    person's render through the VAE (the oracle knows them); started at the first step, it is a
    new picture. This fails if the restart does not feed the render's noised latents."""

    script = load_script("world_sdedit_probe")
    capsys.readouterr()
    assert script.main(["--cases", "3", "--starts", "24,0", "--conditions", "none"]) == 0
    late, early = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert (late["start"], early["start"]) == (24, 0)
    assert late["face_sim"] > 0.5 and late["identification"] == 1.0, late  # VAE round trip: ~0.76
    assert early["face_sim"] < late["face_sim"] - 0.3, (early, late)
    # the base alone, in diffusers' own pipeline, reads the same late start the same way
    assert script.main(["--no-adapter", "--cases", "3", "--starts", "24", "--conditions", "none"]) == 0
    alone = json.loads(capsys.readouterr().out)
    assert alone["identification"] == 1.0 and abs(alone["face_sim"] - late["face_sim"]) < 0.05, (alone, late)
    for bad in (
        ["--starts", "25"],
        ["--no-adapter", "--conditions", "own"],
        ["--no-adapter", "--adapter", "x"],
        ["--framing", "far"],
    ):
        with pytest.raises(SystemExit):
            script.main(bad)


def test_memorise_probe_reads_each_render_as_its_own_person_and_resumes(tmp_path, capsys):
    """scripts/world_memorise_probe.py: the renders row is the oracle's ceiling (every picture
    identified as its own person); the base, the raw and the EMA rows are read for every seed; run
    again, it neither re-renders nor retrains (the run is resumed at its last step); bad arguments
    exit 2 before writing."""

    script = load_script("world_memorise_probe")
    work = tmp_path / "mem"
    args = ["--work", str(work), "--pictures", "3", "--steps", "2", "--seeds", "0"]
    capsys.readouterr()
    assert script.main(args) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["row"] for r in rows] == [
        "renders",
        "through the VAE",
        "base",
        "memorised (raw weights)",
        "memorised (EMA 0.999)",
    ]
    assert rows[0]["identification"] == 1.0 and rows[0]["face_sim"] > 0.9, rows[0]
    assert rows[1]["face_sim"] > 0.4, rows[1]  # the VAE keeps ~0.76 of a render's Face Sim
    data = work / "data" / "singles_train.npz"
    assert len(np.load(data)["captions"]) == len(set(np.load(data)["captions"])) == 3
    stamp = data.stat().st_mtime_ns
    assert torch.load(work / "run" / "state.pt", weights_only=True)["step"] == 2
    assert script.main(args) == 0
    assert data.stat().st_mtime_ns == stamp
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == rows  # same weights
    for bad in (
        ["--work", str(tmp_path / "x"), "--pictures", "1"],
        ["--work", str(tmp_path / "x"), "--seeds", "a"],
        ["--work", str(tmp_path / "x"), "--base", str(tmp_path)],
        ["--work", str(data)],
        ["--work", str(work), "--pictures", "4"],  # the folder holds a run on 3 pictures
    ):
        with pytest.raises(SystemExit) as exit_:
            script.main(bad)
        assert exit_.value.code == 2
    assert not (tmp_path / "x").exists()


def test_routing_probe_script_refuses_a_base_that_is_no_base_folder(tmp_path, capsys):
    """scripts/world_routing_probe.py --base: a folder without a pipeline's model_index.json is
    refused (exit 2) before any model loads, as is an unknown way of placing identities."""

    script = load_script("world_routing_probe")
    with pytest.raises(SystemExit) as exit_info:
        script.main([str(tmp_path), str(tmp_path), "--base", str(tmp_path)])
    assert exit_info.value.code == 2 and "is not a base folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        script.main([str(tmp_path), str(tmp_path), "--leakage", "router,somewhere"])
    assert exit_info.value.code == 2 and "somewhere not among" in capsys.readouterr().err


def test_base_table_script_measures_tint_and_refuses_a_folder_without_a_base(tmp_path, capsys):
    """scripts/world_base_table.py: the colour spread is zero for pictures of one mean colour and
    grows with their differences; a folder that is no base, or an output that is a file, is refused
    (exit 2) before writing."""

    script = load_script("world_base_table")
    flat = np.full((4, 8, 8, 3), 128, np.uint8)
    assert script.colour_spread(flat) == 0.0
    varied = flat.copy()
    varied[:2] = 0  # half the pictures black: each channel's mean colour is 0 or 128/255
    assert script.colour_spread(varied) == pytest.approx(64 / 255)
    with pytest.raises(SystemExit) as exit_info:
        script.main([str(tmp_path), str(tmp_path / "out")])
    assert exit_info.value.code == 2 and "not a base folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    (tmp_path / "model_index.json").write_text("{}")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(SystemExit) as exit_info:
        script.main([str(tmp_path), str(tmp_path / "file.txt")])
    assert exit_info.value.code == 2 and "is a file" in capsys.readouterr().err
    assert (tmp_path / "file.txt").read_text() == "x"
    with pytest.raises(SystemExit) as exit_info:
        script.main([str(tmp_path), str(tmp_path / "out"), "--framing", "far"])
    assert exit_info.value.code == 2 and "--framing must be one of wide, close" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(
    not (WORLD_ASSETS / "oracles" / "detector" / "config.json").is_file(), reason="no oracles"
)
def test_attribute_confusion_counts_what_was_asked_against_what_the_oracles_read(tmp_path, capsys):
    """scripts/world_attribute_confusion.py: on renders its per-attribute accuracy is the base
    table's prompt following by attribute (the same faces, the same rule); balanced accuracy
    weighs every asked value alike, so always drawing the common value scores chance; counts of
    several tables add up; a folder without the base table's pictures is refused (exit 2)."""
    import dataclasses

    from uniportrait.world.oracles import WorldOracles
    from uniportrait.world.report import held_out_specs, measure_pictures, reference_embeddings

    script = load_script("world_attribute_confusion")
    oracles = WorldOracles()
    specs, _ = held_out_specs(24, 1, seed=5)
    renders = np.stack([s.render().image for s in specs])
    counts = script.confusion(oracles, renders, specs)
    summary = script.summarise(counts)
    table = measure_pictures(oracles, renders, specs, reference_embeddings(oracles, specs))
    assert set(summary) == set(table["prompt_following_by_attribute"])
    for name, row in summary.items():
        assert row["accuracy"] == pytest.approx(table["prompt_following_by_attribute"][name]), name
    assert summary["style"]["balanced_accuracy"] > 0.8  # renders show what their captions say
    balanced = table["prompt_following_balanced_by_attribute"]  # one rule: prompt_following.balanced_accuracy
    assert balanced == pytest.approx({name: row["balanced_accuracy"] for name, row in summary.items()})
    assert table["prompt_following_balanced"] == pytest.approx(np.mean(list(balanced.values())))

    # pictures that never show sunglasses, whatever the caption asks: plain following counts the
    # common "no sunglasses" asks as followed, balanced following reads it as chance
    specs, _ = held_out_specs(60, 1, seed=5)
    bare = [
        dataclasses.replace(
            s,
            people=tuple(
                dataclasses.replace(p, look=dataclasses.replace(p.look, sunglasses=0)) for p in s.people
            ),
        )
        for s in specs
    ]
    asked = [s.requested()["people"][0].get("sunglasses") for s in specs]
    assert asked.count(1) >= 2 and asked.count(0) > asked.count(1)
    drawn = measure_pictures(
        oracles, np.stack([s.render().image for s in bare]), specs, reference_embeddings(oracles, specs)
    )
    assert (
        drawn["prompt_following_by_attribute"]["sunglasses"]
        >= asked.count(0) / (len(asked) - asked.count(None)) - 0.1
    )
    assert drawn["prompt_following_balanced_by_attribute"]["sunglasses"] == pytest.approx(0.5, abs=0.1)

    common = {"sunglasses": {"no": {"no": 90}, "yes": {"no": 10}}}  # never draws sunglasses
    row = script.summarise(common)["sunglasses"]
    assert row["accuracy"] == 0.9 and row["balanced_accuracy"] == 0.5
    assert row["right_by_asked_value"] == {"no": 1.0, "yes": 0.0} and row["asked"] == {"no": 90, "yes": 10}
    both = script.merge(script.merge({}, common), {"sunglasses": {"yes": {"yes": 10, "no": 5}}})
    assert both == {"sunglasses": {"no": {"no": 90}, "yes": {"no": 15, "yes": 10}}}

    with pytest.raises(SystemExit) as exit_info:
        script.main([str(tmp_path)])
    assert exit_info.value.code == 2 and "no pictures_1.npz" in capsys.readouterr().err


def test_trait_probe_reads_a_trait_a_stage_carries_and_not_one_it_lacks():
    """scripts/world_trait_probe.py: the ridge read-out recovers a trait written linearly into the
    features and stays near chance on features without it; its stages have one row per crop."""

    import torch

    from uniportrait.presets.pipelines import build_world_pipeline

    script = load_script("world_trait_probe")
    crops, traits = script.render_crops(400, clean=False, seed=0)
    assert crops.shape == (400, 224, 224, 3) and len(traits) == 400
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(400, 32, generator=gen)
    colour = torch.nn.functional.one_hot(torch.tensor([t["hair_colour"] for t in traits]), 8).float()
    skin = torch.tensor([[t["skin"]] for t in traits])
    test, val = torch.zeros(400, dtype=torch.bool), torch.zeros(400, dtype=torch.bool)
    test[:80], val[80:120] = True, True
    carried = script.probe(torch.cat([noise, colour, skin], 1), traits, test, val)
    assert carried["hair_colour"] >= 0.95 and carried["skin"] >= 0.95, carried
    lacking = script.probe(noise, traits, test, val)
    chance = script.chance(traits, test)
    assert lacking["hair_colour"] <= chance["hair_colour"] + 0.15, (lacking, chance)
    features = script.stage_features(build_world_pipeline(), crops[:6], batch=4)
    assert set(features) == {"pixels", "intrinsic", "structure_backbone", "structure_clip", "tokens",
                             "tokens_structure_off"}  # fmt: skip
    assert all(x.shape[0] == 6 and x.ndim == 2 for x in features.values())


def test_single_factor_specs_change_only_the_tested_attribute():
    """scripts/world_single_factor.py's portraits: every attribute pinned and said but the tested
    one, which cycles through its values; training people are not held-out ones and vice versa."""

    from uniportrait.world.traits import PERSON_ATTRIBUTES, SCENE_ATTRIBUTES

    script = load_script("world_single_factor")
    for name, held_out in (("tilt", True), ("background", False)):
        specs, captions = script.controlled_specs(name, 12, held_out=held_out, seed=0)
        asked = [{**s.requested()["scene"], **s.requested()["people"][0]} for s in specs]
        assert all(set(a) == set(PERSON_ATTRIBUTES) | set(SCENE_ATTRIBUTES) for a in asked)  # all said
        values = {**PERSON_ATTRIBUTES, **SCENE_ATTRIBUTES}[name]
        assert [a[name] for a in asked] == [k % len(values) for k in range(12)]
        assert all(a[other] == 0 for a in asked for other in a if other != name)
        assert all((s.people[0].identity >= HELD_OUT_START) == held_out for s in specs)
        assert len(set(captions)) > 1 and all(c.startswith("a ") for c in captions)
