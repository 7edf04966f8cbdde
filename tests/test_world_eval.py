"""`uniportrait eval --backend world`: prompt following read by the world's attribute oracles from
prompts in the world's phrases, and blending by trait attribution (docs/evaluation.md)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from uniportrait.evaluation.prompt_following import summarize_reads
from uniportrait.world.build import WORLD_ASSETS
from uniportrait.world.scenes import caption, identity_number, read_caption, sample_spec
from uniportrait.world.traits import CONTINUOUS_TRAITS, DISCRETE_TRAITS, Traits

shipped = pytest.mark.skipif(
    not (WORLD_ASSETS / "oracles" / "detector" / "config.json").is_file(),
    reason="the world's trained weights are not in this checkout (uniportrait world build)",
)


def test_read_caption_reads_back_what_every_caption_asks():
    rng = np.random.default_rng(0)
    for k in range(1500):
        n = 1 + k % 4
        spec = sample_spec(rng, [identity_number(i, True) for i in range(n)], seed=k)
        read = read_caption(caption(spec, rng))
        assert read["count"] == n
        assert {"scene": read["scene"], "people": read["people"]} == spec.requested()


def test_read_caption_on_prompts_written_by_hand():
    read = read_caption("A person wearing a red hat and no sunglasses, smiling, on a beach")
    assert read == {
        "count": 1,
        "scene": {"background": 0},
        "people": [{"hat": 1, "sunglasses": 0, "expression": 1}],
    }
    # a shared expression before the positions is everyone's; after one, it is that person's
    read = read_caption("two people smiling in a city, the one on the right with the head tilted to the left")
    assert read["people"] == [{"expression": 1}, {"expression": 1, "tilt": 0}]
    # without count words the caller's number of people is used; person words need a position then
    assert read_caption("in a forest, wearing a blue hat", num_people=2)["people"] == [{}, {}]
    assert read_caption("wearing a blue hat")["people"] == [{"hat": 2}]
    assert read_caption("wearing an orange shirt")["people"] == [{"clothing": 7}]  # as a person writes it
    # an attribute named with two values is not asked; words that are not the world's ask nothing
    assert read_caption("a person on a beach in a forest")["scene"] == {}
    assert read_caption("an astronaut riding a horse") == {"count": None, "scene": {}, "people": [{}]}


def test_prompt_following_summary_plain_and_balanced():
    reads = [("sunglasses", 0, 0)] * 9 + [("sunglasses", 1, 0)] + [("hat", 2, 2), ("hat", 3, 2)]
    s = summarize_reads(reads)
    assert s["asks"] == 12 and s["prompt_following"] == pytest.approx(10 / 12)
    assert s["prompt_following_by_attribute"] == pytest.approx({"hat": 0.5, "sunglasses": 0.9})
    # never drawing sunglasses scores chance, however rarely they are asked for
    assert s["prompt_following_balanced_by_attribute"] == pytest.approx({"hat": 0.5, "sunglasses": 0.5})
    assert summarize_reads([])["prompt_following"] is None


def _world_manifests(folder, count: int = 10) -> None:
    """Held-out renders with their own captions (plain), with the next picture's caption
    (swapped), and two-person renders whose left person mixes both people's traits (mixed)."""
    from uniportrait.world.report import held_out_specs

    rng = np.random.default_rng(5)
    rows: dict[str, list] = {"plain": [], "swapped": [], "mixed": []}
    for n in (1, 2):
        specs, captions = held_out_specs(count, n, seed=3)
        for k, (spec, text) in enumerate(zip(specs, captions)):
            Image.fromarray(spec.render().image).save(folder / f"p{n}_{k}.png")
            photos = []
            for j, person in enumerate(spec.people):
                photo = sample_spec(rng, [person.identity], seed=int(rng.integers(1 << 30))).render()
                Image.fromarray(photo.image).save(folder / f"r{n}_{k}_{j}.png")
                photos.append([f"r{n}_{k}_{j}.png"])
            rows["plain"].append({"image": f"p{n}_{k}.png", "prompt": text, "identities": photos})
            swapped = captions[(k + 1) % len(captions)]
            rows["swapped"].append({"image": f"p{n}_{k}.png", "prompt": swapped, "identities": photos})
            if n == 2:
                a, b = (Traits.of(p.identity) for p in spec.people)
                take = rng.random(len(CONTINUOUS_TRAITS) + len(DISCRETE_TRAITS)) < 0.5
                cont = tuple(y if t else x for x, y, t in zip(a.cont, b.cont, take))
                disc = {
                    name: getattr(b if take[len(CONTINUOUS_TRAITS) + i] else a, name)
                    for i, name in enumerate(DISCRETE_TRAITS)
                }
                people = (
                    dataclasses.replace(spec.people[0], traits=Traits(cont=cont, **disc)),
                    spec.people[1],
                )
                blend = dataclasses.replace(spec, people=people).render()
                Image.fromarray(blend.image).save(folder / f"m_{k}.png")
                rows["mixed"].append({"image": f"m_{k}.png", "prompt": text, "identities": photos})
    for name, manifest in rows.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in manifest))


@shipped
def test_world_eval_reads_prompt_following_and_blends_by_traits(tmp_path, capsys):
    from uniportrait.cli import main

    _world_manifests(tmp_path)
    results = {}
    for name in ("plain", "swapped", "mixed"):
        out = tmp_path / f"eval-{name}"
        assert main(["-q", "eval", "--manifest", str(tmp_path / f"{name}.jsonl"), "--out", str(out),
                     "--backend", "world"]) == 0  # fmt: skip
        results[name] = json.loads((out / "results.json").read_text())
    plain, swapped, mixed = (results[k]["summary"] for k in ("plain", "swapped", "mixed"))
    # renders show what their captions ask (the report's ceiling, ~90%), not another caption's
    following = plain["all"]["prompt_following"]
    assert following["asks"] > 100 and following["prompt_following"] > 0.8
    assert following["prompt_following_balanced"] > 0.75
    assert swapped["all"]["prompt_following"]["prompt_following"] < 0.5
    assert set(following["prompt_following_by_attribute"]) >= {"background", "style", "hat", "expression"}
    # a face drawn with half of each person's traits is a blend; the people themselves rarely are
    assert mixed["multi-id"]["blending_rate"] >= plain["multi-id"]["blending_rate"] + 0.3
    assert plain["single-id"]["blending_rate"] == 0  # one reference: nothing to blend
    image = results["plain"]["images"][0]
    reads = image["prompt_following"]["reads"]
    assert reads and set(reads[0]) == {"attribute", "asked", "read"}
    first = json.loads((tmp_path / "plain.jsonl").read_text().splitlines()[0])
    assert image["prompt"] == first["prompt"]  # the row's words stay; what was read sits beside them
    assert results["plain"]["backend"]["blending"].startswith("trait attribution")
    markdown = (tmp_path / "eval-plain" / "results.md").read_text()
    assert "## Prompt following" in markdown and "| single-id |" in markdown
    assert "thresholds: match 0.5." in markdown  # the similarity blend thresholds play no part
    # ... so setting them is refused, before anything is written
    refused = tmp_path / "refused"
    args = [
        "-q",
        "eval",
        "--manifest",
        str(tmp_path / "plain.jsonl"),
        "--out",
        str(refused),
        "--backend",
        "world",
    ]
    assert main([*args, "--blend-threshold", "0.5"]) == 2 and not refused.exists()
    assert "trait attribution" in capsys.readouterr().err
    # a real photo is no world picture: refused, naming the manifest's line
    from uniportrait.faces import sample_photo

    rows = (tmp_path / "plain.jsonl").read_text().splitlines()
    real = json.loads(rows[1]) | {"image": str(sample_photo("ffhq-0100"))}
    (tmp_path / "real.jsonl").write_text("\n".join([rows[0], json.dumps(real)]) + "\n")
    args[3] = str(tmp_path / "real.jsonl")
    assert main(args) == 2 and not any(refused.iterdir())  # no results written
    assert "line 2" in (err := capsys.readouterr().err) and "not a world picture" in err


@shipped
def test_world_bench_writes_specs_that_eval_generate_runs(tmp_path, capsys):
    """``world bench``: held-out people's photos and specs whose grid the world preset generates
    and the world backend measures; a folder in use is refused before anything is written."""
    from uniportrait.cli import main
    from uniportrait.evaluation import read_spec

    bench = tmp_path / "bench"
    args = ["-q", "world", "bench", "--out", str(bench), "--people", "6", "--prompts", "1", "--group-prompts", "1",
            "--seeds", "1"]  # fmt: skip
    assert main(args) == 0
    files = ["multi.json", "multi3.json", "photos", "renders-multi", "renders-multi.jsonl", "renders-multi3",
             "renders-multi3.jsonl", "renders-single", "renders-single.jsonl", "single.json"]  # fmt: skip
    assert sorted(p.name for p in bench.iterdir()) == files
    single, multi, triples = (read_spec(bench / f) for f in ("single.json", "multi.json", "multi3.json"))
    assert len(single.jobs) == 6 and single.settings["width"] == 64
    assert [len(j.identities) for j in multi.jobs] == [2] * 3 and multi.settings["width"] == 128
    assert [len(j.identities) for j in triples.jobs] == [3] * 2
    people = {n for job in multi.jobs for n in job.identities}
    assert people == set(single.identities)
    assert {read_caption(j.prompt)["count"] for j in triples.jobs} == {3}  # captions of the group's size
    assert main(args) == 2 and "not an empty folder" in capsys.readouterr().err  # refused, nothing replaced
    assert (bench / "single.json").is_file()
    out = tmp_path / "eval"
    assert main(["-q", "eval", "--generate", str(bench / "multi.json"), "--out", str(out), "--preset", "world",
                 "--backend", "world"]) == 0  # fmt: skip
    result = json.loads((out / "results.json").read_text())
    summary = result["summary"]["multi-id"]
    assert summary["images"] == 3 and summary["detection_rate"] > 0  # the shipped adapter draws people
    assert summary["prompt_following"]["asks"] > 0
    # the renders of the same people and captions: the ceiling, read by the same command
    ceiling = tmp_path / "ceiling"
    assert main(["-q", "eval", "--manifest", str(bench / "renders-multi.jsonl"), "--out", str(ceiling),
                 "--backend", "world"]) == 0  # fmt: skip
    rendered = json.loads((ceiling / "results.json").read_text())
    assert [r["prompt"] for r in rendered["images"]] == [r["prompt"] for r in result["images"]]
    assert rendered["summary"]["multi-id"]["detection_rate"] == 1
    assert rendered["summary"]["multi-id"]["face_sim_min"]["mean"] > 0.7  # the people themselves
    assert main(["-q", "world", "bench", "--out", str(tmp_path / "b2"), "--people", "1"]) == 2
    assert main(["-q", "world", "bench", "--out", str(tmp_path / "b2"), "--seed", "-1"]) == 2
    assert main(["-q", "world", "bench", "--out", str(bench / "single.json" / "b3")]) == 2
    assert "cannot write" in capsys.readouterr().err and not (tmp_path / "b2").exists()
