"""The identity world: renderer ground truth, tokenizer, datasets, and the shipped models."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from conftest import load_script

from uniportrait.world.build import WORLD_ASSETS
from uniportrait.world.scenes import caption, sample_spec, vocabulary
from uniportrait.world.traits import HELD_OUT_START, PERSON_ATTRIBUTES, Traits

shipped = pytest.mark.skipif(
    not (WORLD_ASSETS / "oracles" / "detector" / "config.json").is_file(),
    reason="the world's trained weights are not in this checkout (uniportrait world build)",
)


def _batch(count: int, people: int, seed: int = 0, framing: str = "wide"):
    rng = np.random.default_rng(seed)
    specs = [
        sample_spec(
            rng,
            [int(i) + HELD_OUT_START for i in rng.choice(500, people, replace=False)],
            seed=k,
            framing=framing,
        )
        for k in range(count)
    ]
    return specs, [s.render() for s in specs]


@pytest.mark.parametrize("framing", ["wide", "close"])
@pytest.mark.parametrize("people", [1, 2, 3, 4])
def test_render_ground_truth_is_consistent(people, framing):
    specs, pictures = _batch(6, people, framing=framing)
    for spec, pic in zip(specs, pictures):
        h, w = pic.image.shape[:2]
        assert pic.image.dtype == np.uint8 and (w, h) == (spec.width, spec.height)
        assert pic.boxes.shape == (people, 4) and pic.landmarks.shape == (people, 5, 2)
        for box, points, mask in zip(pic.boxes, pic.landmarks, pic.masks):
            x0, y0, x1, y1 = box
            # every landmark lies inside its face box, eyes above the nose above the mouth
            assert (points[:, 0] >= x0).all() and (points[:, 0] <= x1).all()
            assert (points[:, 1] >= y0).all() and (points[:, 1] <= y1).all()
            assert points[0, 0] < points[1, 0] and points[3, 0] < points[4, 0]
            assert points[:2, 1].max() < points[2, 1] < points[3:, 1].min()
            # the head mask covers the face: the nose tip and most of the box's inner half
            nx, ny = np.round(points[2]).astype(int)
            assert mask[ny, nx]
            inner = mask[
                int(y0 + (y1 - y0) / 4) : int(y1 - (y1 - y0) / 4),
                int(x0 + (x1 - x0) / 4) : int(x1 - (x1 - x0) / 4),
            ]
            assert inner.mean() > 0.9
        # heads of different people do not share pixels
        assert (pic.masks.sum(0) <= 1).all()
        # people are listed left to right
        assert (np.diff(pic.boxes[:, 0]) > 0).all()


def test_close_framing_draws_the_same_scenes_with_larger_faces():
    """The framing changes the faces' size and nothing drawn from the seed: the same people, looks
    and captions as the wide framing, each face about 1.6 times as tall, inside the picture."""
    from uniportrait.world.scenes import FRAMINGS

    for people in (1, 2, 3, 4):
        wide, wide_pics = _batch(8, people)
        close, close_pics = _batch(8, people, framing="close")
        for a, b, pa, pb in zip(wide, close, wide_pics, close_pics):
            assert [p.identity for p in a.people] == [p.identity for p in b.people]
            assert a.scene == b.scene and a.mentions == b.mentions
            assert [p.look.expression for p in a.people] == [p.look.expression for p in b.people]
            ratio = (pb.boxes[:, 3] - pb.boxes[:, 1]) / (pa.boxes[:, 3] - pa.boxes[:, 1])
            assert (ratio > 1.2).all() and (ratio < 2.2).all()
            assert (pb.landmarks >= 0).all() and (pb.landmarks[..., 0] < b.width).all()
            assert (pb.landmarks[..., 1] < b.height).all()
    with pytest.raises(ValueError, match="framing"):
        sample_spec(np.random.default_rng(0), [HELD_OUT_START], seed=0, framing="far")
    assert set(FRAMINGS["wide"]) == set(FRAMINGS["close"]) == {1, 2, 3, 4}


def test_render_is_deterministic_and_identities_differ():
    spec = sample_spec(np.random.default_rng(3), [HELD_OUT_START + 7], seed=11)
    a, b = spec.render(), spec.render()
    assert np.array_equal(a.image, b.image) and np.array_equal(a.landmarks, b.landmarks)
    assert Traits.of(5) == Traits.of(5)
    vectors = np.stack([Traits.of(i).vector() for i in range(200)])
    distances = np.linalg.norm(vectors[:, None] - vectors[None], axis=-1)[np.triu_indices(200, 1)]
    assert distances.min() > 0.3  # no two of 200 random identities coincide


def test_caption_mentions_what_is_requested():
    rng = np.random.default_rng(0)
    spec = sample_spec(rng, [1, 2], seed=0, look={"hat": 2}, scene={"background": 0})
    text = caption(spec, rng)
    assert text.startswith(("two people", "a photo of two", "a pencil sketch of two", "a painting of two"))
    assert "on a beach" in text and "blue hat" in text
    requested = spec.requested()
    assert requested["scene"]["background"] == 0
    assert all(p["hat"] == 2 for p in requested["people"])


def test_identity_phrase_says_the_persons_traits_in_known_words():
    from uniportrait.world.scenes import identity_phrase, identity_vocabulary
    from uniportrait.world.traits import EYE_COLOURS, FACIAL_HAIR, HAIR_COLOURS

    rng = np.random.default_rng(0)
    words = set(identity_vocabulary())
    for identity in range(40):
        traits = Traits.of(identity)
        full = identity_phrase(traits, rng, p=1.0)
        assert set(full.replace(",", " ").split()) <= words
        assert f"{EYE_COLOURS[traits.eye_colour]} eyes" in full
        assert traits.hair_style == 0 or HAIR_COLOURS[traits.hair_colour] in full
        assert traits.facial_hair == 0 or FACIAL_HAIR[traits.facial_hair] in full
        assert identity_phrase(traits, rng, p=0.0) == ""
    some = [identity_phrase(Traits.of(i), rng, p=0.5) for i in range(200)]
    assert sum(s == "" for s in some) < 20 and len(set(some)) > 150  # traits said at random


def test_tokenizer_spells_every_caption_word_as_one_token(tmp_path):
    from transformers import CLIPTokenizer

    from uniportrait.world.tokenizer import write_tokenizer

    tok = CLIPTokenizer.from_pretrained(str(write_tokenizer(tmp_path, vocabulary())))
    assert all(len(tok.tokenize(w)) == 1 for w in vocabulary())
    assert tok("two people smiling on a beach").input_ids[1:-1] == [
        tok.convert_tokens_to_ids(w + "</w>") for w in "two people smiling on a beach".split()
    ]


def test_world_render_writes_a_dataset_the_trainer_reads(tmp_path):
    from uniportrait.cli import main
    from uniportrait.training.data import PortraitDataset

    out = tmp_path / "data"
    assert (
        main(
            [
                "-q",
                "world",
                "render",
                "--out",
                str(out),
                "--count",
                "6",
                "--people",
                "2,3",
                "--identities",
                "10",
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert [r["num_faces"] for r in rows] == [2, 3, 2, 3, 2, 3]
    assert all(len(r["identities"]) == r["num_faces"] for r in rows)
    # a rerun completes instead of duplicating
    assert (
        main(
            [
                "-q",
                "world",
                "render",
                "--out",
                str(out),
                "--count",
                "8",
                "--people",
                "2,3",
                "--identities",
                "10",
            ]
        )
        == 0
    )
    assert len((out / "index.jsonl").read_text().splitlines()) == 8
    dataset = PortraitDataset(out, resolution=64, min_faces=2, max_faces=3, id_augment=1.0)
    item = dataset[0]
    assert item["crops"].shape[1:] == (224, 224, 3) and item["pixels"].shape == (3, 64, 64)
    assert main(["world", "render", "--out", str(out), "--people", "5"]) == 2
    close = tmp_path / "close"
    for framing, folder in (("close", close), ("wide", tmp_path / "wide")):
        args = ["-q", "world", "render", "--out", str(folder), "--count", "2", "--identities", "4"]
        assert main([*args, "--framing", framing]) == 0
        assert json.loads((folder / "world.json").read_text())["framing"] == framing

    def heights(folder):
        rows = [json.loads(line) for line in (folder / "index.jsonl").read_text().splitlines()]
        return [b[3] - b[1] for r in rows for b in r["boxes"]]

    assert all(c > 1.2 * w for c, w in zip(heights(close), heights(tmp_path / "wide")))


@shipped
def test_shipped_oracles_measure_renders():
    from uniportrait.world.oracles import WorldOracles
    from uniportrait.world.report import match_faces

    oracles = WorldOracles()
    specs, pictures = _batch(8, 2, seed=5)
    found = 0
    for pic in pictures:
        faces = oracles.detect(pic.image)
        pairs = match_faces(pic.boxes, np.array([f.box for f in faces]).reshape(-1, 4))
        found += len(pairs)
        for i, j in pairs:
            assert np.abs(faces[j].landmarks - pic.landmarks[i]).max() < 4.0
    assert found >= 15  # of 16 faces
    # the same person in two pictures is closer than two different people
    rng = np.random.default_rng(1)
    a = sample_spec(rng, [HELD_OUT_START + 1], seed=1).render()
    b = sample_spec(rng, [HELD_OUT_START + 1], seed=2).render()
    c = sample_spec(rng, [HELD_OUT_START + 2], seed=3).render()
    emb = [oracles.describe(p.image, oracles.detect(p.image)[:1])["embedding"][0] for p in (a, b, c)]
    assert emb[0] @ emb[1] > emb[0] @ emb[2]
    attrs = oracles.person_attributes(pictures[0].image[None].repeat(2, 0), pictures[0].boxes)
    assert set(attrs) == set(PERSON_ATTRIBUTES)
    # the base table's face counts: two blank pictures show no face, the renders their two
    from uniportrait.world.report import measure_pictures, reference_embeddings

    images = np.stack([pic.image for pic in pictures])
    images[:2] = 0
    shares = measure_pictures(oracles, images, specs, reference_embeddings(oracles, specs))[
        "face_count_shares"
    ]
    assert shares["0"] == 0.25 and shares["2"] >= 0.625 and sum(shares.values()) == pytest.approx(1.0)


def _random_world_adapter(folder, unet=None):
    """An untrained adapter for ``unet`` (default: the shipped world base's), with the world's
    face backbone."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPVisionModelWithProjection

    from uniportrait.models.adapter import AdapterConfig, UniPortraitAdapter
    from uniportrait.models.face_backbone import IRBackbone
    from uniportrait.models.qformer import QFormerConfig

    unet = unet or UNet2DConditionModel.from_pretrained(WORLD_ASSETS / "base" / "unet")
    encoder = CLIPVisionModelWithProjection.from_pretrained(WORLD_ASSETS / "image_encoder")
    backbone = IRBackbone.from_pretrained(WORLD_ASSETS / "face_backbone")
    channels = backbone.config.channels
    qformer = QFormerConfig(
        dim=unet.config.cross_attention_dim,
        id_dim=channels[-1],
        structure_dim=sum(channels[:3]) + encoder.config.hidden_size,
        depth=1,
        heads=2,
        dim_head=16,
    )
    adapter = UniPortraitAdapter.from_sizes(
        AdapterConfig.from_unet(unet, qformer=qformer, lora_rank=4, multi_id=True)
    )
    adapter.save_pretrained(folder, face_backbone=backbone)
    return folder


@shipped
def test_shipped_base_model_generates_through_uniportrait_pipeline(tmp_path):
    from uniportrait import UniPortraitPipeline

    adapter = _random_world_adapter(tmp_path / "adapter")
    pipe = UniPortraitPipeline.from_pretrained(
        WORLD_ASSETS / "base", uniportrait=adapter, image_encoder=WORLD_ASSETS / "image_encoder",
        torch_dtype=torch.float32,
    )  # fmt: skip
    out = pipe(
        "a photo of a person smiling on a beach",
        num_inference_steps=4,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    image = np.asarray(out.images[0])
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()


@shipped
def test_a_world_base_on_a_2x_vae_and_a_first_level_without_attention_generates_with_identity(tmp_path):
    """Another world base (``WorldSizes``: a 2-level VAE → 32×32 latents for 64 px, a UNet whose
    first level has no attention, as SDXL's): saved as a diffusers pipeline folder, it loads
    through ``build_world_pipeline(base=)`` and an adapter sized from its UNet sets identity."""
    from diffusers import StableDiffusionPipeline

    from uniportrait.presets.pipelines import build_world_pipeline
    from uniportrait.world.faces import aligned_crops
    from uniportrait.world.models import WorldSizes, make_unet, make_vae

    sizes = WorldSizes(vae_block_out_channels=(16, 32), unet_block_out_channels=(32, 64, 96),
                       unet_levels_without_attention=1)  # fmt: skip
    unet = make_unet(sizes)
    assert unet.config.sample_size == 32 and unet.config.down_block_types[0] == "DownBlock2D"
    shipped_base = StableDiffusionPipeline.from_pretrained(WORLD_ASSETS / "base", safety_checker=None)
    base = StableDiffusionPipeline(
        vae=make_vae(sizes), text_encoder=shipped_base.text_encoder, tokenizer=shipped_base.tokenizer,
        unet=unet, scheduler=shipped_base.scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip
    base.save_pretrained(tmp_path / "base")
    adapter = _random_world_adapter(tmp_path / "adapter", unet=unet)
    pipe = build_world_pipeline(adapter, base=tmp_path / "base")
    assert pipe.vae_scale_factor == 2
    render = sample_spec(np.random.default_rng(0), [HELD_OUT_START], seed=1).render()
    person = pipe.encode_identity(aligned_crops(render.image[None], render.landmarks[:1], size=224)[0])
    images = [
        pipe(
            "a person on a beach",
            num_inference_steps=3,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
            **kw,
        ).images[0]  # fmt: skip
        for kw in ({}, {"identities": [person]})
    ]
    assert images[0].shape == (64, 64, 3) and np.isfinite(images[1]).all()
    assert np.abs(images[0] - images[1]).max() > 1e-3  # the identity reaches the UNet
    with pytest.raises(ValueError, match="unet_levels_without_attention"):
        make_unet(WorldSizes(unet_levels_without_attention=3))


@shipped
def test_world_face_analyzer_finds_world_faces():
    """The generator side's detector (get_face_analyzer("world")), not the oracle."""
    from uniportrait.faces import get_face_analyzer

    analyzer = get_face_analyzer("world")
    _, pictures = _batch(12, 2, seed=4)
    found = 0
    for picture in pictures:
        faces = analyzer.detect(picture.image)
        for points in picture.landmarks:
            near = [f for f in faces if np.abs(np.asarray(f.landmarks) - points).mean() < 2.0]
            found += bool(near)
    assert found >= 0.95 * 24  # both people in (nearly) every picture, landmarks within 2 px


@shipped
def test_world_preset_generates_a_world_person_from_a_render(tmp_path, capsys):
    from PIL import Image

    from uniportrait.cli import main

    adapter = _random_world_adapter(tmp_path / "adapter")
    _, pictures = _batch(1, 1, seed=6)
    photo = tmp_path / "person.png"
    Image.fromarray(pictures[0].image).save(photo)
    args = ["-q", "generate", "--preset", "world", "--adapter", str(adapter), "--prompt", "a person on a beach",
            "--id", str(photo), "--steps", "2", "--out", str(tmp_path / "out")]  # fmt: skip
    capsys.readouterr()  # making the adapter above loaded models with their bars
    assert main(args) == 0
    err = capsys.readouterr().err  # -q: no progress bars or warnings, the libraries' included
    assert "%|" not in err and "kept in float32" not in err
    image = Image.open(sorted((tmp_path / "out").glob("run-*/image_00.png"))[0])
    assert image.size == (64, 64)  # the preset's side
    # a stored identity, read with the same detector
    home = str(tmp_path / "home")
    model = ["--preset", "world", "--adapter", str(adapter)]
    assert main(["-q", "id", "--home", home, "add", "bob", str(photo), *model]) == 0
    assert main(["-q", "generate", *model, "--prompt", "bob in a city", "--id-name", "bob", "--home", home,
                 "--steps", "2", "--out", str(tmp_path / "named")]) == 0  # fmt: skip
    # a real photo is refused with one line, not searched for a false face, and nothing is written
    real = tmp_path / "real.png"
    Image.fromarray(np.kron(pictures[0].image, np.ones((4, 4, 1), np.uint8))).save(real)  # 256x256
    capsys.readouterr()
    args[args.index(str(photo))] = str(real)
    args[args.index(str(tmp_path / "out"))] = str(tmp_path / "refused")
    assert main(args) != 0
    assert "not a world picture" in capsys.readouterr().err and not (tmp_path / "refused").exists()
    assert main(["-q", "id", "--home", home, "add", "carol", str(real), *model]) != 0
    assert "not a world picture" in capsys.readouterr().err
    # another world base (one the adapter was trained on), and a folder that is not one
    based = [*model, "--prompt", "a person", "--id", str(photo), "--steps", "2"]
    assert (
        main(
            [
                "-q",
                "generate",
                *based,
                "--base-model",
                str(WORLD_ASSETS / "base"),
                "--out",
                str(tmp_path / "b"),
            ]
        )
        == 0
    )
    assert len(list((tmp_path / "b").glob("run-*/image_00.png"))) == 1
    capsys.readouterr()
    assert main(["-q", "generate", *based, "--base-model", str(tmp_path), "--out", str(tmp_path / "nb")]) == 2
    assert "not a base model folder" in capsys.readouterr().err and not (tmp_path / "nb").exists()
    assert main(["-q", "generate", *based, "--vae", str(tmp_path), "--out", str(tmp_path / "nv")]) == 2
    assert "use them with --preset sd15" in capsys.readouterr().err


@shipped
def test_world_preset_uses_the_shipped_adapter_and_says_when_it_is_missing(tmp_path, capsys, monkeypatch):
    from PIL import Image

    import uniportrait.world.build as build
    from uniportrait.cli import main

    _, pictures = _batch(1, 1, seed=8)
    photo = tmp_path / "person.png"
    Image.fromarray(pictures[0].image).save(photo)
    args = ["-q", "generate", "--preset", "world", "--prompt", "a person on a beach", "--id", str(photo),
            "--steps", "2"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "out")]) == 0  # no --adapter: the shipped one
    assert len(list((tmp_path / "out").glob("run-*/image_00.png"))) == 1
    # a checkout without the shipped adapter: a clear error, nothing written
    fake = tmp_path / "assets"
    fake.mkdir()
    for part in ("base", "image_encoder", "face_backbone", "face_detector"):
        (fake / part).symlink_to(WORLD_ASSETS / part)
    monkeypatch.setattr(build, "WORLD_ASSETS", fake)
    assert main([*args, "--out", str(tmp_path / "o")]) == 2
    assert "no trained adapter" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@shipped
def test_world_backend_matches_people_in_a_group_picture():
    from PIL import Image

    from uniportrait.evaluation import evaluate_image, get_backend, reference_from_photos

    backend = get_backend("world")
    rng = np.random.default_rng(4)
    a, b = HELD_OUT_START + 11, HELD_OUT_START + 12
    group = sample_spec(rng, [a, b], seed=3, look={"sunglasses": 0}).render()
    refs = [
        reference_from_photos(backend, [Image.fromarray(sample_spec(rng, [ident], seed=s).render().image)])
        for ident, s in ((a, 4), (b, 5))
    ]
    faces, match = evaluate_image(Image.fromarray(group.image), refs, backend)
    assert len(faces) == 2 and not match.missing and not match.duplicated
    # the face matched to each reference is the one drawn at that person's place
    for ref_index, face_index in enumerate(match.face_of_reference):
        assert abs(faces[face_index].box[0] - group.boxes[ref_index][0]) < 4


def test_world_commands_refuse_bad_input_before_writing(tmp_path, capsys):
    from uniportrait.cli import main

    out = tmp_path / "report"
    assert main(["-q", "world", "report", "--work", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert main(["-q", "world", "report", "--sections", "base,nope", "--out", str(out)]) == 2
    assert (
        main(["-q", "world", "report", "--sections", "base", "--base", str(tmp_path), "--out", str(out)]) == 2
    )
    assert not out.exists()
    (tmp_path / "file.txt").write_text("x")
    assert main(["-q", "world", "render", "--out", str(tmp_path / "file.txt" / "data"), "--count", "1"]) == 2
    assert (
        main(["-q", "world", "render", "--out", str(tmp_path / "neg"), "--count", "1", "--seed", "-1"]) == 2
    )
    assert not (tmp_path / "neg").exists()
    assert main(["-q", "world", "build", "--work", str(tmp_path / "w"), "--stages", "nope"]) == 2
    assert main(["-q", "world", "build", "--work", str(tmp_path / "w"), "--layout", "3x"]) == 2
    for offset in ("-0.1", "2", "nan"):
        assert (
            main(["-q", "world", "build", "--work", str(tmp_path / "w"), "--unet-offset-noise", offset]) == 2
        )
    for option in ("--unet-face-weight", "--unet-snr-gamma"):
        for value in ("-1", "101", "nan"):
            assert main(["-q", "world", "build", "--work", str(tmp_path / "w"), option, value]) == 2
    assert "--unet-snr-gamma" in capsys.readouterr().err
    for lr in ("0", "0.5", "nan"):
        assert main(["-q", "world", "build", "--work", str(tmp_path / "w"), "--unet-lr", lr]) == 2
    assert "--unet-lr" in capsys.readouterr().err
    assert main(["-q", "world", "build", "--work", str(tmp_path / "w"), "--unet-seed", "-1"]) == 2
    shipped_unet = str(WORLD_ASSETS / "base" / "unet")  # the 4x layout
    for init in ([str(tmp_path / "nowhere")], [shipped_unet, "--layout", "2x"]):
        assert main(["-q", "world", "build", "--work", str(tmp_path / "w"), "--unet-init", *init]) == 2
    assert "another layout" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()
    (tmp_path / "w4" / "vae").mkdir(parents=True)  # a 4x build under way (plans before layouts: 4x)
    (tmp_path / "w4" / "plan.json").write_text("{}")
    assert main(["-q", "world", "build", "--work", str(tmp_path / "w4"), "--layout", "2x"]) == 2
    assert "holds a 4x build" in capsys.readouterr().err
    assert (tmp_path / "w4" / "plan.json").read_text() == "{}"
    assert main(["-q", "world", "build", "--work", str(tmp_path / "wf"), "--framing", "far"]) == 2
    assert (
        main(["-q", "world", "render", "--out", str(tmp_path / "f"), "--count", "1", "--framing", "far"]) == 2
    )
    assert "--framing must be one of wide, close" in capsys.readouterr().err
    assert not (tmp_path / "wf").exists() and not (tmp_path / "f").exists()
    (tmp_path / "w4" / "data").mkdir()  # wide pictures rendered (plans before framings: wide)
    (tmp_path / "w4" / "data" / "singles_val.npz").write_text("")
    assert main(["-q", "world", "build", "--work", str(tmp_path / "w4"), "--framing", "close"]) == 2
    assert "holds wide-framed pictures" in capsys.readouterr().err
    assert (tmp_path / "w4" / "plan.json").read_text() == "{}"


def test_world_build_trains_the_2x_layout(tmp_path, monkeypatch):
    """``world build --layout 2x`` (a smoke run): the VAE has two levels, the UNet works on 32×32
    latents with a first level without attention, and the plan records the layout; the plan's
    offset noise reaches every UNet training step, and its face weight weights every step's loss
    up on the pictures' heads; a second run continues from the first's UNet (``unet_init``), with
    the plan's learning rate and seed, every step under CPU bf16 autocast (``unet_bf16``)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from uniportrait.world import train_base
    from uniportrait.world.build import UNET_LR, BuildPlan, run_build

    offsets, first_weights, loss_weights, autocast, peak_lrs, gammas = [], [], [], [], [], []

    def recording_step(*args):
        offsets.append(args[5])
        gammas.append(args[7])
        loss_weights.append(args[6])
        autocast.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"))
        if not first_weights:
            first_weights.append({k: v.clone() for k, v in args[0].state_dict().items()})
        return denoising_step(*args)

    def recording_loop(*args, **kwargs):  # (folder, modules, optimizer, step, steps, lr, desc)
        if args[6] == "UNet":
            peak_lrs.append(args[5])
        return run_loop(*args, **kwargs)

    denoising_step, run_loop = train_base.denoising_step, train_base.run_loop
    monkeypatch.setattr(train_base, "denoising_step", recording_step)
    monkeypatch.setattr(train_base, "run_loop", recording_loop)
    plan = dataclasses.replace(
        BuildPlan().scaled(0.0001), layout="2x", unet_offset_noise=0.1, unet_face_weight=4.0
    )
    run_build(tmp_path / "w", tmp_path / "out", plan, stages=("render", "vae", "clip", "unet"))
    vae = AutoencoderKL.from_pretrained(tmp_path / "w" / "vae" / "vae")
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "w" / "unet" / "unet")
    assert len(vae.config.block_out_channels) == 2 and unet.config.sample_size == 32
    assert unet.config.down_block_types[0] == "DownBlock2D"
    recorded = json.loads((tmp_path / "w" / "plan.json").read_text())
    assert recorded["layout"] == "2x" and recorded["unet_offset_noise"] == 0.1
    assert offsets == [0.1] * plan.unet_steps and gammas == [0.0] * plan.unet_steps
    assert autocast == [False] * plan.unet_steps and peak_lrs == [UNET_LR]  # fp32, the plan's lr
    for weight in loss_weights:  # (batch, 1, 32, 32 or 32 × 64 for groups): 1 outside heads, 5 inside
        assert weight.shape[1:3] == (1, 32) and weight.min() == 1.0 and weight.max() == 5.0

    init = tmp_path / "init"
    shutil.move(tmp_path / "w" / "unet" / "unet", init)
    shutil.rmtree(tmp_path / "w" / "unet")
    first_weights.clear()
    autocast.clear()
    gammas.clear()
    again = dataclasses.replace(
        plan, unet_init=str(init), unet_lr=2e-4, unet_seed=11, unet_bf16=True, unet_snr_gamma=5.0
    )
    run_build(tmp_path / "w", tmp_path / "out", again, stages=("unet",))
    assert autocast == [torch.bfloat16] * plan.unet_steps and peak_lrs[-1] == 2e-4
    assert gammas == [5.0] * plan.unet_steps
    start = UNet2DConditionModel.from_pretrained(init).state_dict()
    assert first_weights[0].keys() == start.keys()
    assert all(torch.equal(first_weights[0][k], start[k]) for k in start)
    recorded = json.loads((tmp_path / "w" / "plan.json").read_text())
    assert recorded["unet_init"] == str(init) and recorded["unet_seed"] == 11 and recorded["unet_bf16"]
    assert recorded["unet_snr_gamma"] == 5.0
    scaled = BuildPlan(unet_seed=5, unet_bf16=True).scaled(0.5)  # seeds and switches are not lengths
    assert (scaled.unet_seed, scaled.unet_bf16, scaled.unet_steps) == (5, True, 1000)


@shipped
def test_world_preset_serves_world_people(tmp_path):
    """The server reads photos with the preset's face analyzer (the world's detector here)."""
    pytest.importorskip("fastapi")
    import base64
    import io

    from fastapi.testclient import TestClient
    from PIL import Image

    from uniportrait.presets.pipelines import build_world_pipeline
    from uniportrait.server import ServerConfig, create_app

    pipe = build_world_pipeline(adapter=_random_world_adapter(tmp_path / "adapter"))
    pipe.set_progress_bar_config(disable=True)
    app = create_app(pipe, ServerConfig(preset="world", ui=False, home=str(tmp_path / "home")))
    _, pictures = _batch(1, 1, seed=8)
    photo = io.BytesIO()
    Image.fromarray(pictures[0].image).save(photo, format="PNG")
    with TestClient(app, base_url="http://127.0.0.1") as client:
        answer = client.post(
            "/v1/generate",
            data={"prompt": "a person on a beach", "steps": "2"},
            files=[("id1", ("person.png", photo.getvalue(), "image/png"))],
        )
    assert answer.status_code == 200, answer.text
    image = Image.open(io.BytesIO(base64.b64decode(answer.json()["images"][0])))
    assert image.size == (64, 64)  # the world preset's side


@shipped
def test_eval_generate_with_the_world_preset_and_oracles(tmp_path):
    """``eval --generate --preset world --backend world``: world photos read by the world's
    detector, generated, and measured by the oracles."""
    from PIL import Image

    from uniportrait.cli import main

    adapter = _random_world_adapter(tmp_path / "adapter")
    _, pictures = _batch(2, 1, seed=9)
    photos = []
    for k, picture in enumerate(pictures):
        photos.append(tmp_path / f"person-{k}.png")
        Image.fromarray(picture.image).save(photos[-1])
    spec = {
        "name": "world-grid",
        "identities": {"anna": [str(photos[0])], "bea": [str(photos[1])]},
        "single": {"prompts": ["a photo of a person on a beach"]},
        "seeds": [0],
        "settings": {"steps": 2},
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    out = tmp_path / "bench"
    args = ["-q", "eval", "--generate", str(tmp_path / "spec.json"), "--out", str(out), "--preset", "world",
            "--adapter", str(adapter), "--backend", "world"]  # fmt: skip
    assert main(args) == 0
    assert sorted(p.name for p in (out / "images").iterdir()) == ["single-00000.png", "single-00001.png"]
    with Image.open(out / "images" / "single-00000.png") as image:
        assert image.size == (64, 64)
    result = json.loads((out / "results.json").read_text())
    assert result["summary"]["all"]["images"] == 2 and result["context"]["preset"] == "world"
    assert result["summary"]["all"]["prompt_following"]["asks"] == 4  # "a photo of", "on a beach": 2 pictures


@shipped
def test_world_export_writes_the_shipped_layout_and_says_it_drops_the_old_adapter(tmp_path, caplog):
    """``world build``'s export (fed the shipped parts as a finished build's work folder): a
    loadable pipeline folder; an adapter trained on the replaced base model is removed, saying so."""
    import logging
    import shutil

    from uniportrait.world.build import export

    work, out = tmp_path / "work", tmp_path / "assets"
    for part, src in {"unet/unet": "base/unet", "vae/vae": "base/vae", "clip/text_encoder": "base/text_encoder",
                      "clip/tokenizer": "base/tokenizer", "clip/image_encoder": "image_encoder",
                      "backbone/face_backbone": "face_backbone"}.items():  # fmt: skip
        shutil.copytree(WORLD_ASSETS / src, work / part)
    shutil.copytree(WORLD_ASSETS / "adapter", out / "adapter")
    with caplog.at_level(logging.WARNING, logger="uniportrait.world.build"):
        export(work, out)
    assert "trained on the previous base model" in caplog.text
    assert not (out / "adapter").exists()
    assert sorted(p.name for p in out.iterdir()) == ["base", "face_backbone", "image_encoder"]
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(out / "base", torch_dtype=torch.float32)  # diffusers' own
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a person on a beach", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()


@shipped
def test_decoder_identity_loss_reads_the_aligned_faces_and_reaches_the_decoder():
    """The VAE decoder's identity loss (``finetune_vae_decoder(identity_weight=...)``): its
    differentiable crops are the pipeline's aligned crops, the backbone calls a picture itself,
    a blurred copy less, and the gradient reaches the reconstruction."""
    import torch.nn.functional as F

    from uniportrait.models.face_backbone import IRBackbone
    from uniportrait.world.faces import aligned_crops
    from uniportrait.world.train_base import aligned_face_grid, face_identity_cosine, to_pixels

    _, pictures = _batch(4, 2, seed=8)
    images = np.stack([p.image for p in pictures])
    landmarks = np.stack([p.landmarks[k % 2] for k, p in enumerate(pictures)])  # one face each
    x = to_pixels(images)
    grid = aligned_face_grid(landmarks, x.shape[-2:], 64)
    ours = F.grid_sample(x + 1, grid, align_corners=False) - 1
    pipeline = to_pixels(aligned_crops(images, landmarks))
    assert (ours - pipeline).abs().mean() < 0.05  # about 3 of 255 (bilinear straight to 64 px)
    backbone = IRBackbone.from_pretrained(WORLD_ASSETS / "face_backbone").float().eval().requires_grad_(False)
    assert torch.allclose(face_identity_cosine(backbone, x, x, grid), torch.ones(4), atol=1e-4)
    blurred = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False).requires_grad_(True)
    cos = face_identity_cosine(backbone, blurred, x, grid)
    assert (cos < 0.99).all()
    (1 - cos).mean().backward()
    assert blurred.grad is not None and blurred.grad.abs().sum() > 0


def test_identity_words_are_added_without_changing_old_captions():
    """scripts/world_trait_captions.py: new trait words become single learnt tokens, and every
    caption without them tokenizes and encodes exactly as before."""

    from transformers import CLIPTextModel, CLIPTokenizer

    script = load_script("world_trait_captions")
    tokenizer = CLIPTokenizer.from_pretrained(WORLD_ASSETS / "base" / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(WORLD_ASSETS / "base" / "text_encoder", torch_dtype=torch.float32)
    rng = np.random.default_rng(0)
    old = [caption(sample_spec(rng, [n], seed=k), rng) for k, n in enumerate([1, 2, 3, 1, 2, 4])]
    old.append("a person against a grey background")  # a new word ("round") inside an old one
    ids = tokenizer(old, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        before = encoder(ids)[0]
    new_ids = script.add_identity_words(tokenizer, encoder)
    assert len(new_ids) > 10 and len(tokenizer) == encoder.get_input_embeddings().weight.shape[0]
    after_ids = tokenizer(old, padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert torch.equal(ids, after_ids)
    with torch.no_grad():
        assert torch.equal(encoder(after_ids)[0], before)
    pieces = tokenizer.tokenize("with curly auburn hair and a goatee")
    assert len(pieces) == 7 and tokenizer.convert_tokens_to_ids("auburn") in new_ids


def test_offset_noise_adds_one_value_per_picture_and_channel():
    """``train_base.denoising_step(offset_noise=)``: the noise the UNet sees (and must predict) gets
    a per-picture, per-channel constant; without it, its spatial means are near zero."""
    from types import SimpleNamespace

    from diffusers import DDPMScheduler

    from uniportrait.presets.tiny import published_ddim_scheduler
    from uniportrait.world.train_base import denoising_step

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bias = torch.nn.Parameter(torch.zeros(()))
            self.seen = []

        def forward(self, x, t, encoder_hidden_states):
            self.seen.append((x, t))
            return SimpleNamespace(sample=x * 0 + self.bias)

    schedule = DDPMScheduler.from_config(published_ddim_scheduler().config)
    z0, cond = torch.zeros(8, 4, 32, 32), torch.zeros(8, 77, 128)
    spreads = []
    for offset in (0.0, 0.5):
        unet = Recorder()
        denoising_step(unet, schedule, z0, cond, torch.Generator().manual_seed(0), offset_noise=offset)
        x, t = unet.seen[0]
        noise = x / (1 - schedule.alphas_cumprod[t]).sqrt()[:, None, None, None]  # z0 = 0
        spreads.append(noise.mean(dim=(2, 3)).std().item())
        assert unet.bias.grad is not None
    assert spreads[0] < 0.1 and spreads[1] > 0.25, spreads


def test_face_weighted_denoising_loss_counts_head_pixels_more():
    """``latent_head_masks`` gives each latent pixel's share inside a head; ``denoising_step`` with
    ``face_weights`` of it weights the MSE there ``1 + face_weight`` times, normalised so that a
    uniform weight gives the plain MSE."""
    from types import SimpleNamespace

    from diffusers import DDPMScheduler

    from uniportrait.presets.tiny import published_ddim_scheduler
    from uniportrait.world.train_base import denoising_step, face_weights, latent_head_masks

    masks = np.zeros((1, 2, 16, 32), bool)  # one picture, two people, 16 × 32 pixels
    masks[0, 0, 0:8, 0:8] = True
    masks[0, 1, 8:10, 16:18] = True  # half of one 4 × 4 latent pixel
    share = latent_head_masks(masks, 4)  # 4× smaller: (1, 1, 4, 8)
    assert share.shape == (1, 1, 4, 8)
    assert share[0, 0, :2, :2].eq(1).all() and share[0, 0, 2, 4] == 0.25 and share.sum() == 4.25
    weight = face_weights(share, 4.0)
    assert weight[0, 0, 0, 0] == 5.0 and weight[0, 0, 3, 7] == 1.0 and weight[0, 0, 2, 4] == 2.0

    class Constant(torch.nn.Module):  # predicts one learnable value per latent pixel
        def __init__(self):
            super().__init__()
            self.pred = torch.nn.Parameter(torch.zeros(1, 4, 4, 8))

        def forward(self, x, t, encoder_hidden_states):
            return SimpleNamespace(sample=self.pred.expand_as(x))

    schedule = DDPMScheduler.from_config(published_ddim_scheduler().config)
    z0, cond = torch.zeros(1, 4, 4, 8), torch.zeros(1, 8, 16)
    losses, grads = [], []
    for w in (None, torch.ones(1, 1, 4, 8), weight):
        unet = Constant()
        losses.append(denoising_step(unet, schedule, z0, cond, torch.Generator().manual_seed(0), weight=w))
        grads.append(unet.pred.grad.abs().mean(1)[0])  # (4, 8): how much each latent pixel moves
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    assert torch.allclose(grads[0], grads[1])
    ratio = grads[2] / grads[0]  # inside a head 5 / mean weight, outside 1 / mean weight
    assert ratio[0, 0].item() == pytest.approx(5 * ratio[3, 7].item(), rel=1e-4)


def test_min_snr_weighted_denoising_loss_counts_low_noise_steps_less():
    """``denoising_step(snr_gamma=)``: each picture's MSE times ``min(SNR(t), γ) / SNR(t)``; steps
    noisier than SNR γ keep weight 1, quieter ones count less (their gradient shrinks with it)."""
    from types import SimpleNamespace

    from diffusers import DDPMScheduler

    from uniportrait.presets.tiny import published_ddim_scheduler
    from uniportrait.training.losses import min_snr_weights
    from uniportrait.world.train_base import denoising_step

    schedule = DDPMScheduler.from_config(published_ddim_scheduler().config)
    weights = min_snr_weights(schedule, torch.tensor([0, 100, 500, 999]), 5.0)
    snr = schedule.alphas_cumprod / (1 - schedule.alphas_cumprod)
    assert weights[0] == pytest.approx(5.0 / snr[0].item(), rel=1e-5) and weights[0] < 0.01
    assert weights[2:].eq(1).all()  # SNR(500) < 5

    class Constant(torch.nn.Module):  # one learnable value per picture
        def __init__(self):
            super().__init__()
            self.pred = torch.nn.Parameter(torch.zeros(16, 1, 1, 1))

        def forward(self, x, t, encoder_hidden_states):
            self.t = t
            return SimpleNamespace(sample=self.pred.expand_as(x))

    z0, cond = torch.zeros(16, 4, 4, 4), torch.zeros(16, 8, 16)
    runs = []
    for gamma in (0.0, 5.0):
        unet = Constant()
        loss = denoising_step(unet, schedule, z0, cond, torch.Generator().manual_seed(0), snr_gamma=gamma)
        runs.append((loss, unet.pred.grad.flatten().abs(), unet.t))
    (plain, g_plain, t), (weighted, g_weighted, t_again) = runs
    assert torch.equal(t, t_again)  # the same noise and timesteps
    w = min_snr_weights(schedule, t, 5.0)
    assert (w < 1).any() and (w == 1).any()
    assert torch.allclose(g_weighted, g_plain * w, rtol=1e-4, atol=1e-8)
    assert weighted < plain


@shipped
def test_vae_report_reads_traits_of_renders_and_their_round_trips(tmp_path):
    """``vae_report``: per attribution trait, the share of faces the trait regressor reads as
    their person's, on held-out renders and on their VAE round trips (the ceiling of any picture
    through that VAE); the renders read well, and the round trips no better than the renders."""
    from diffusers import AutoencoderKL

    from uniportrait.world.data import render_set, save_set
    from uniportrait.world.identity_report import ATTRIBUTION_TRAITS
    from uniportrait.world.oracles import WorldOracles
    from uniportrait.world.report import vae_report

    save_set(render_set(24, 1, seed=3, num_identities=4, held_out=True, workers=1, progress=False),
             tmp_path / "singles_val.npz")  # fmt: skip
    vae = AutoencoderKL.from_pretrained(WORLD_ASSETS / "base" / "vae")
    with torch.no_grad():
        report = vae_report(vae.float(), WorldOracles(), tmp_path)
    render, trip = report["trait_agreement_render"], report["trait_agreement_reconstruction"]
    assert set(render) == set(trip) == set(ATTRIBUTION_TRAITS)
    assert np.mean(list(render.values())) >= 0.6  # 0.80 on 600 held-out renders
    assert np.mean(list(trip.values())) <= np.mean(list(render.values())) + 0.05  # 0.60 on those
    assert report["pictures"] == 24 and 0.5 < report["face_sim_ratio"] < 1.1


@shipped
def test_vae_round_trip_gives_back_the_pictures_a_base_could_draw():
    """``vae_round_trip`` (the base table's "through the VAE" row): held-out renders encoded and
    decoded by the shipped VAE come back as uint8 pictures of the same size, close to the renders
    and with their one face each; ``from_pixels`` inverts ``to_pixels`` exactly."""
    from diffusers import AutoencoderKL

    from uniportrait.world.oracles import WorldOracles
    from uniportrait.world.report import vae_round_trip
    from uniportrait.world.train_base import from_pixels, to_pixels

    _, pictures = _batch(6, 1, seed=4)
    images = np.stack([p.image for p in pictures])
    assert np.array_equal(from_pixels(to_pixels(images)), images)
    vae = AutoencoderKL.from_pretrained(WORLD_ASSETS / "base" / "vae").float()
    trips = vae_round_trip(vae, images, batch=4)  # two batches
    assert trips.shape == images.shape and trips.dtype == np.uint8
    mse = (((trips.astype(np.float64) - images) / 127.5) ** 2).mean(axis=(1, 2, 3))
    assert (10 * np.log10(4.0 / mse) > 20).all()  # 26.6 dB mean on 600 held-out portraits
    oracles = WorldOracles()
    assert [len(oracles.detect(t)) for t in trips] == [1] * 6


def test_phrases_are_the_words_one_person_captions_use_and_swapping_changes_only_them():
    from uniportrait.world.scenes import PHRASED_ATTRIBUTES, PHRASES, phrase
    from uniportrait.world.word_probe import swapped_caption

    rng = np.random.default_rng(3)
    said = dict.fromkeys(PHRASED_ATTRIBUTES, 0)
    for k in range(300):
        spec = sample_spec(rng, [HELD_OUT_START + k], seed=k)
        text = caption(spec, np.random.default_rng(k))
        asked = spec.requested()
        asked = {**asked["scene"], **asked["people"][0]}  # {name: value} the caption says
        for name in PHRASED_ATTRIBUTES:
            if name not in asked:
                continue
            value = asked[name]
            assert phrase(name, value) in text, (name, text)
            other = swapped_caption(text, name, value)
            after = phrase(name, (value + 1) % len(PHRASES[name]))
            assert other == text.replace(phrase(name, value), after, 1) and other != text
            said[name] += 1
    assert min(said.values()) > 20, said  # every attribute was checked
    assert swapped_caption("a photo of a person in a city", "tilt", 0) is None  # not said: nothing to swap


@shipped
def test_held_out_error_pairs_pictures_and_tells_a_trained_denoiser(tmp_path, capsys):
    """``held_out_error`` (scripts/world_heldout_loss.py): the same noise and timesteps for every
    base, so a base against itself differs by exactly zero; an untrained UNet in the shipped
    base's place denoises far worse; bad input is refused."""
    import shutil

    from uniportrait.errors import UniPortraitError
    from uniportrait.world.models import make_unet
    from uniportrait.world.word_probe import held_out_error

    shipped = held_out_error(WORLD_ASSETS / "base", count=12)
    assert shipped.shape == (12,) and torch.equal(shipped, held_out_error(WORLD_ASSETS / "base", count=12))
    untrained = tmp_path / "base"
    shutil.copytree(WORLD_ASSETS / "base", untrained, ignore=shutil.ignore_patterns("unet"))
    torch.manual_seed(0)
    make_unet().save_pretrained(untrained / "unet")
    assert held_out_error(untrained, count=12).mean() > 5 * shipped.mean()
    with pytest.raises(UniPortraitError, match="not a base model folder"):
        held_out_error(tmp_path)
    script = load_script("world_heldout_loss")
    assert script.main([str(WORLD_ASSETS / "base"), str(tmp_path), "--count", "4"]) == 2
    assert "not a base model folder" in capsys.readouterr().err


@shipped
def test_word_probe_finds_the_shipped_base_reading_background_words(tmp_path, capsys):
    """The word probe (docs/world.md, "Which caption words the base model uses"): the shipped base
    denoises a held-out portrait worse when its background's words are swapped for another
    background's (measured on 300: +23% at t = 700, z 15); bad input is refused."""

    from uniportrait.errors import UniPortraitError
    from uniportrait.world.word_probe import word_probe

    result = word_probe(WORLD_ASSETS / "base", ("background",), count=40, timesteps=(700,))
    row = result["background"]["timesteps"][700]
    assert result["background"]["pictures"] == 40
    assert row["gain"] > 0.05 and row["z"] > 3, row
    with pytest.raises(UniPortraitError, match="not a base model folder"):
        word_probe(tmp_path, ("background",))
    with pytest.raises(UniPortraitError, match="no phrase to swap"):
        word_probe(WORLD_ASSETS / "base", ("hair",))
    script = load_script("world_word_probe")
    assert script.main([str(tmp_path), "--out", str(tmp_path / "probe.json")]) == 2
    assert "not a base model folder" in capsys.readouterr().err and not (tmp_path / "probe.json").exists()
    base = str(WORLD_ASSETS / "base")
    assert script.main([base, "--out", str(tmp_path)]) == 2  # a folder, refused before the probe runs
    assert "is a folder" in capsys.readouterr().err
    assert script.main([base, "--attributes", ","]) == 2
    assert "no attribute to probe" in capsys.readouterr().err


@shipped
def test_save_base_swaps_the_unet_and_leaves_nothing_when_it_fails(tmp_path):
    """report.save_base, which the fine-tuning scripts keep their bases with."""
    from diffusers import UNet2DConditionModel

    from uniportrait.world.report import save_base

    unet = UNet2DConditionModel.from_pretrained(WORLD_ASSETS / "base" / "unet")
    with torch.no_grad():
        unet.conv_out.bias.add_(1.0)
    out = save_base(WORLD_ASSETS / "base", unet, tmp_path / "base")
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (WORLD_ASSETS / "base").iterdir())
    saved = UNet2DConditionModel.from_pretrained(out / "unet")
    assert torch.equal(saved.conv_out.bias, unet.conv_out.bias)
    assert (out / "vae" / "config.json").read_text() == (
        WORLD_ASSETS / "base" / "vae" / "config.json"
    ).read_text()

    def fail(folder):
        raise OSError("disk full")

    unet.save_pretrained = fail
    with pytest.raises(OSError):
        save_base(WORLD_ASSETS / "base", unet, tmp_path / "other")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]  # no half-written base, no leftovers
