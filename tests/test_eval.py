"""Evaluation harness: face similarity, assignment, failure flags, manifests, reports.

Offline: the dlib backend on the bundled sample photos, and images composed here (two sample
faces pasted side by side, a pixel blend of two faces).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from uniportrait.cli import main
from uniportrait.errors import UniPortraitError, WeightsNotFoundError
from uniportrait.evaluation import (
    DlibBackend,
    ManifestError,
    Thresholds,
    assign,
    evaluate_image,
    match_faces,
    read_manifest,
    reference_from_crops,
    reference_from_photos,
)
from uniportrait.evaluation.references import similarity_to_references
from uniportrait.faces import align_face, load_image, sample_photo

A, B, C = "ffhq-0100.jpg", "ffhq-0293.jpg", "ffhq-0381.jpg"
THRESHOLDS = Thresholds(match=0.5, blend=0.6, margin=0.1, related=0.4)


@pytest.fixture(scope="module")
def backend() -> DlibBackend:
    return DlibBackend()


@pytest.fixture(scope="module")
def refs(backend):
    return {name: reference_from_photos(backend, [sample_photo(name)]) for name in (A, B, C, "newton.jpg")}


def _eval(manifest: Path, out: Path, *options: str) -> int:
    return main(["-q", "eval", "--manifest", str(manifest), "--out", str(out), *options])


def _photo(name: str) -> Image.Image:
    return load_image(sample_photo(name))


def _side_by_side(left: Image.Image, right: Image.Image) -> Image.Image:
    canvas = Image.new("RGB", (left.width + right.width, max(left.height, right.height)), (128, 128, 128))
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width, 0))
    return canvas


@pytest.fixture(scope="module")
def composed(tmp_path_factory) -> dict[str, Path]:
    """Test images on disk: pairs, a duplicate, a blend, a single face, a picture without a face."""
    folder = tmp_path_factory.mktemp("composed")
    a, b, c = _photo(A), _photo(B), _photo(C)
    images = {
        "ab.png": _side_by_side(a, b),
        "ba.png": _side_by_side(b, a),
        "aa.png": _side_by_side(a, a),
        "blend.png": _side_by_side(Image.blend(a, b, 0.6), c),
        "a_copy.png": ImageOps.mirror(a).crop((20, 10, 300, 310)).resize((230, 246)),
        "noface.png": Image.new("RGB", (96, 96), (40, 160, 60)),
    }
    for name, image in images.items():
        image.save(folder / name)
    return {name: folder / name for name in images}


# -- similarity ------------------------------------------------------------------------------------


def test_same_person_scores_higher_than_different_people(backend, refs):
    # A flipped, cropped and re-scaled copy of A.
    copy = ImageOps.mirror(_photo(A)).crop((20, 10, 300, 310)).resize((230, 246))
    faces = backend.detect(copy)
    assert len(faces) == 1
    sims = similarity_to_references(backend, backend.embed_faces(copy, faces), list(refs.values()))[0]
    same, others = sims[0], sims[1:]
    assert same > others.max() + 0.3
    assert same >= THRESHOLDS.match > others.max()  # dlib's 0.6-distance rule, as a similarity
    # The same, with the reference given as a stored identity's aligned crop.
    face = backend.detect(_photo(A))[0]
    stored = reference_from_crops(backend, [align_face(_photo(A), face.landmarks)], "anna")
    from_crop = similarity_to_references(backend, backend.embed_faces(copy, faces), [stored])[0, 0]
    assert from_crop > others.max() + 0.3


def test_dlib_similarity_is_linear_in_distance(backend):
    a = np.zeros((1, 128))
    b = np.zeros((3, 128))
    b[:, 0] = [0.0, 0.6, 1.2]
    np.testing.assert_allclose(backend.similarity(a, b)[0], [1.0, 0.5, 0.0])


def test_two_person_assignment_follows_the_faces(backend, refs, composed):
    def faces_by_side(image_name, order):
        image = load_image(composed[image_name])
        faces, match = evaluate_image(image, [refs[n] for n in order], backend)
        assert len(faces) == 2 and not (match.missing or match.duplicated or match.blending)
        return ["left" if faces[f].box[0] < image.width / 2 else "right" for f in match.face_of_reference]

    assert faces_by_side("ab.png", (A, B)) == ["left", "right"]
    assert faces_by_side("ba.png", (A, B)) == ["right", "left"]
    assert faces_by_side("ab.png", (B, A)) == ["right", "left"]  # swapping references swaps the match


def test_duplicated_identity_is_flagged(backend, refs, composed):
    faces, match = evaluate_image(load_image(composed["aa.png"]), [refs[A], refs[B]], backend)
    assert len(faces) == 2
    assert match.duplicated == [0] and match.missing == []
    assert match.face_sim_min < THRESHOLDS.match  # the face given to B is A's


def test_blended_face_is_flagged_but_a_stranger_is_not(backend, refs, composed):
    image = load_image(composed["blend.png"])
    faces, match = evaluate_image(image, [refs[A], refs[B]], backend)
    assert len(faces) == 2
    blend_face = next(f for f, face in enumerate(faces) if face.box[0] < image.width / 2)
    assert match.blending == [blend_face]  # the other face (a third person) is not a blend


def test_missing_identity_and_no_face(backend, refs, composed):
    _, match = evaluate_image(load_image(composed["a_copy.png"]), [refs[A], refs[B]], backend)
    assert match.missing == [1] and match.face_sim_min is not None
    faces, match = evaluate_image(load_image(composed["noface.png"]), [refs[A]], backend)
    assert faces == [] and match.missing == [0] and match.face_sim_min is None


# -- assignment rules ------------------------------------------------------------------------------


def test_hungarian_maximises_the_total_and_greedy_takes_the_best_pair_first():
    sim = np.array([[0.9, 0.8], [0.85, 0.1]])
    assert assign(sim, "hungarian") == [1, 0]  # 0.85 + 0.8 beats 0.9 + 0.1
    assert assign(sim, "greedy") == [0, 1]
    assert assign(np.zeros((0, 2))) == [None, None]
    assert assign(np.array([[0.2, 0.7]])) == [None, 0]  # one face, two references
    three = np.array([[0.1, 0.2], [0.9, 0.3], [0.2, 0.8]])
    assert assign(three) == [1, 2]


def test_exhaustive_assignment_is_optimal_on_random_problems(monkeypatch):
    import itertools

    from uniportrait.evaluation import matching

    rng = np.random.default_rng(0)
    for faces, refs in ((3, 2), (2, 3), (4, 4)):
        sim = rng.random((faces, refs))
        result = matching._exhaustive(sim)
        total = sum(sim[f, r] for r, f in enumerate(result) if f is not None)
        best = max(
            sum(sim[f, r] for f, r in zip(perm, range(refs)) if f is not None)
            for perm in itertools.permutations(list(range(faces)) + [None] * max(0, refs - faces), refs)
        )
        assert total == pytest.approx(best)


def test_duplicate_needs_confident_faces():
    # Two faces closest to reference 0, but only one of them is the same person.
    match = match_faces(np.array([[0.9, 0.1], [0.3, 0.2]]), THRESHOLDS)
    assert match.duplicated == []
    match = match_faces(np.array([[0.9, 0.1], [0.8, 0.2]]), THRESHOLDS)
    assert match.duplicated == [0]


# -- manifests -------------------------------------------------------------------------------------


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def _rows(composed) -> list[dict]:
    a, b = str(sample_photo(A)), str(sample_photo(B))
    return [
        {"image": str(composed["ab.png"]), "prompt": "two people", "identities": [a, b]},
        {
            "image": str(composed["aa.png"]),
            "prompt": "two",
            "identities": [{"photos": [a], "label": "anna"}, [b]],
        },
        {"image": str(composed["a_copy.png"]), "prompt": "a person", "identities": [a]},
        {"image": str(composed["noface.png"]), "prompt": "a person", "identities": [a], "seed": 3},
    ]


def test_eval_command_writes_json_markdown_and_contact_sheet(tmp_path, composed, capsys):
    manifest = _write_jsonl(tmp_path / "m.jsonl", _rows(composed))
    out = tmp_path / "out"
    assert _eval(manifest, out) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["backend"]["name"] == "dlib" and "1 - euclidean_distance" in result["backend"]["similarity"]
    assert result["clip_t"]["status"].startswith("not computed")
    summary = result["summary"]
    assert summary["all"]["images"] == 4 and summary["multi-id"]["images"] == 2
    assert summary["multi-id"]["duplicated_rate"] == 0.5
    assert summary["single-id"]["detection_rate"] == 0.5  # the picture without a face
    assert summary["all"]["face_sim_min"]["count"] == 3
    assert "prompt_following" not in summary["all"]  # dlib reads no attributes
    assert result["backend"]["prompt_following"] is None and "similarity" in result["backend"]["blending"]
    images = result["images"]
    assert images[1]["identities"] == ["anna", "ffhq-0293"] and images[1]["flags"]["duplicated"]
    assert images[3]["extra"] == {"seed": 3} and images[3]["num_faces"] == 0
    markdown = (out / "results.md").read_text()
    assert "**dlib**" in markdown and "| multi-id | 2 |" in markdown and "duplicated anna" in markdown
    assert "## Prompt following" not in markdown and "prompt_following" not in images[0]
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.width > 400 and sheet.height > 4 * 160
    assert "| all | 4 |" in capsys.readouterr().out


def test_csv_manifest_matches_jsonl(tmp_path, composed):
    a, b = sample_photo(A), sample_photo(B)
    (tmp_path / "m.csv").write_text(
        "image,prompt,identities,seed\n"
        f'{composed["ab.png"]},"two people, smiling",{a};{b}|{b},7\n'
        f"{composed['a_copy.png']},a person,{a},8\n"
    )
    rows = read_manifest(tmp_path / "m.csv")
    assert [r.line for r in rows] == [2, 3]
    assert rows[0].prompt == "two people, smiling" and len(rows[0].identities) == 2
    assert len(rows[0].identities[1].photos) == 2 and rows[0].extra == {"seed": "7"}


def _bad_rows(photo: str, image: str, folder: Path, noface: str) -> dict[str, tuple]:
    """Case → (the bad third row, what the error must say)."""
    return {
        "missing image": (
            {"image": "nowhere.png", "prompt": "p", "identities": [photo]},
            f"line 3: image {folder}/nowhere.png not found",
        ),
        "bad json": ('{"image": "x.png", "prompt": ', "line 3: not valid JSON"),
        "no identities": ({"image": image, "prompt": "p"}, "line 3: missing 'identities'"),
        "missing photo": (
            {"image": image, "prompt": "p", "identities": [f"{folder}/gone.jpg"]},
            f"line 3: reference photo {folder}/gone.jpg not found",
        ),
        "unknown stored": (
            {"image": image, "prompt": "p", "identities": ["id:nobody"]},
            "line 3: unknown stored identity 'nobody'",
        ),
        "faceless photo": (
            {"image": image, "prompt": "p", "identities": [noface]},
            "line 3: no face found in reference photo",
        ),
    }


BAD_ROWS = ("missing image", "bad json", "no identities", "missing photo", "unknown stored", "faceless photo")


@pytest.mark.parametrize("case", BAD_ROWS)
def test_bad_manifest_row_is_named_and_nothing_is_written(tmp_path, composed, capsys, case):
    cases = _bad_rows(str(sample_photo(A)), str(composed["ab.png"]), tmp_path, str(composed["noface.png"]))
    bad_row, message = cases[case]
    manifest = _write_jsonl(tmp_path / "m.jsonl", _rows(composed)[:1] + ["# a comment"] + [bad_row])
    out = tmp_path / "out"
    assert _eval(manifest, out, "--home", str(tmp_path / "bank")) == 2
    err = capsys.readouterr().err
    assert "m.jsonl" in err and message in err
    assert not out.exists() or not any(out.iterdir())


def test_stored_identity_reference_uses_its_crops(tmp_path, tiny_pipe, backend, composed):
    from uniportrait.bank import IdentityBank
    from uniportrait.photos import identity_from_photos

    bank = IdentityBank(tmp_path)
    bank.add("anna", identity_from_photos(tiny_pipe, [sample_photo(A)], backend.analyzer))
    _write_jsonl(
        tmp_path / "m.jsonl",
        [{"image": str(composed["a_copy.png"]), "prompt": "p", "identities": ["id:anna"]}],
    )
    out = tmp_path / "out"
    assert _eval(tmp_path / "m.jsonl", out, "--home", str(tmp_path)) == 0
    image = json.loads((out / "results.json").read_text())["images"][0]
    assert image["identities"] == ["anna"] and image["face_sim_min"] >= THRESHOLDS.match


# -- CLIP-T and the other backends -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    """A random 1-layer CLIP with the repo's tokenizer fixture, saved like a Hub folder."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from uniportrait.presets import TINY_TOKENIZER_PATH

    tokenizer = CLIPTokenizer.from_pretrained(str(TINY_TOKENIZER_PATH))
    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), max_position_embeddings=77, **small),
        vision_config=dict(image_size=32, patch_size=8, **small),
        projection_dim=8,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CLIPModel(config)
    folder = tmp_path_factory.mktemp("clip")
    model.save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def test_clip_t_is_reported_when_weights_are_there_and_explained_when_not(tmp_path, composed, tiny_clip):
    manifest = _write_jsonl(tmp_path / "m.jsonl", _rows(composed)[2:3])
    assert _eval(manifest, tmp_path / "a", "--clip", str(tiny_clip)) == 0
    result = json.loads((tmp_path / "a" / "results.json").read_text())
    assert -1.0 <= result["images"][0]["clip_t"] <= 1.0 and result["summary"]["all"]["clip_t"]["count"] == 1
    missing = str(tmp_path / "no-clip-here")
    assert _eval(manifest, tmp_path / "b", "--clip", missing) == 0
    result = json.loads((tmp_path / "b" / "results.json").read_text())
    assert result["clip_t"]["status"] == f"not computed: CLIP model folder {missing} not found"
    assert result["images"][0]["clip_t"] is None
    assert "CLIP-T: not computed" in (tmp_path / "b" / "results.md").read_text()


def test_curricular_backend_on_a_given_backbone(composed, monkeypatch):
    from uniportrait.evaluation import CurricularBackend, get_backend
    from uniportrait.models.face_backbone import IRBackbone
    from uniportrait.presets.pipelines import tiny_backbone_config

    backbone = IRBackbone.from_sizes(tiny_backbone_config()).eval()
    curricular = CurricularBackend(backbone=backbone)
    image = load_image(composed["ab.png"])
    faces = curricular.detect(image)
    embeddings = curricular.embed_faces(image, faces)
    assert embeddings.shape == (2, backbone.config.embedding_dim)
    np.testing.assert_allclose(np.diag(curricular.similarity(embeddings, embeddings)), 1.0, atol=1e-5)
    assert curricular.info.similarity == "cosine"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError, match="glint360k_curricular_face_r101_backbone.bin"):
        get_backend("curricular", backbone="someone/not-downloaded")


@pytest.mark.skipif(importlib.util.find_spec("insightface") is not None, reason="insightface is installed")
def test_insightface_backend_says_what_to_install():
    from uniportrait.evaluation import get_backend

    with pytest.raises(UniPortraitError, match="pip install"):
        get_backend("insightface")


def test_manifest_reader_rejects_unknown_formats(tmp_path):
    (tmp_path / "m.txt").write_text("x")
    with pytest.raises(ManifestError, match=r"\.jsonl or \.csv"):
        read_manifest(tmp_path / "m.txt")
    (tmp_path / "m.csv").write_text("image,prompt\nx.png,p\n")
    with pytest.raises(ManifestError, match="line 1: the CSV header must name"):
        read_manifest(tmp_path / "m.csv")
