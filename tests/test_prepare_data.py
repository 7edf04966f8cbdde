"""`uniportrait prepare-data`: a folder of photos → a training dataset (offline, dlib)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from uniportrait.cli import main
from uniportrait.faces import load_image, sample_photo
from uniportrait.training.prepare import (
    INDEX_FILE,
    NO_FACE,
    SKIPPED_FILE,
    TOO_SMALL,
    UNREADABLE,
    DatasetError,
    PrepareOptions,
    prepare_dataset,
    read_jsonl,
    scan_source,
)
from uniportrait.training.samples import PEOPLE, make_sample_source


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """The sample source (6 single-person photos, 6 two-person photos) + 3 unusable images."""
    src = make_sample_source(tmp_path_factory.mktemp("prepare") / "src")
    bad = src / "junk"
    bad.mkdir()
    (bad / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    gradient = np.tile(np.linspace(0, 255, 128, dtype=np.uint8), (128, 1))
    Image.fromarray(np.stack([gradient] * 3, axis=-1)).save(bad / "no-face.png")
    load_image(sample_photo("newton")).resize((133, 160)).save(bad / "small-face.jpg")  # a 37 px face
    return src


def test_prepare_data_writes_dataset_and_reports_skips(source, tmp_path, capsys):
    data = tmp_path / "data"
    code = main(
        ["-q", "prepare-data", str(source), "--out", str(data), "--workers", "2", "--identity-from-folder"]
    )
    assert code == 0
    report = capsys.readouterr().out
    assert "15 images found: 12 added, 3 skipped" in report
    for reason in (UNREADABLE, NO_FACE, TOO_SMALL):
        assert f"× {reason}" in report
    assert "junk/broken.jpg" in report

    rows = read_jsonl(data / INDEX_FILE)
    skipped = {s["source"]: s["reason"] for s in read_jsonl(data / SKIPPED_FILE)}
    assert skipped == {
        "junk/broken.jpg": UNREADABLE,
        "junk/no-face.png": NO_FACE,
        "junk/small-face.jpg": TOO_SMALL,
    }
    assert sorted(r["num_faces"] for r in rows) == [1] * 6 + [2] * 6

    for row in rows:
        image = Image.open(data / row["image"])
        assert image.size == (row["width"], row["height"])
        faces = np.load(data / row["faces"])
        n = row["num_faces"]
        assert row["multi_id"] == (n >= 2)
        assert faces["crops"].shape == (n, 224, 224, 3) and faces["crops"].dtype == np.uint8
        assert faces["boxes"].shape == (n, 4) and faces["landmarks"].shape == (n, 5, 2)
        assert faces["masks"].shape == (n, row["height"], row["width"]) and faces["masks"].dtype == bool
        for box, mask in zip(faces["boxes"], faces["masks"]):  # the mask covers its face box
            x0, y0, x1, y1 = (int(round(v)) for v in box)
            assert mask[max(y0, 0) : y1, max(x0, 0) : x1].all()
        if n == 1:
            person = row["source"].split("/")[0]
            assert row["identities"] == [person] and row["caption"].endswith(person[-4:])
        else:  # pairs/<left>+<right>.jpg: labels follow the faces, given left to right
            left, right = row["source"].removeprefix("pairs/").removesuffix(".jpg").split("+")
            order = np.argsort(faces["boxes"][:, 0])
            assert [row["identities"][i] for i in order] == [left, right]
            assert set(row["identities"]) <= set(PEOPLE)


def test_prepare_data_resumes_and_retries(source, tmp_path):
    data = tmp_path / "data"
    options = PrepareOptions(identity_from_folder=True)
    first = prepare_dataset(source, data, workers=1, options=options, progress=False)
    assert (first.written, sum(first.skipped.values())) == (12, 3)

    again = prepare_dataset(source, data, workers=1, options=options, progress=False)
    assert (again.written, again.already_done, again.rows) == (0, 15, 12)

    # An interrupted run: the last row was half written. Only that image is done again.
    index = data / INDEX_FILE
    lines = index.read_text().splitlines()
    index.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:25])
    resumed = prepare_dataset(source, data, workers=1, options=options, progress=False)
    assert (resumed.written, resumed.already_done, resumed.rows) == (1, 14, 12)
    assert len(read_jsonl(index)) == 12 and len({r["key"] for r in read_jsonl(index)}) == 12

    retried = prepare_dataset(source, data, workers=1, options=options, retry_skipped=True, progress=False)
    assert retried.written == 0 and sum(retried.skipped.values()) == 3
    assert len(read_jsonl(data / SKIPPED_FILE)) == 3


def test_manifest_captions_and_labels(tmp_path):
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    for name in ("x.jpg", "y.jpg", "z.jpg"):
        Image.new("RGB", (8, 8)).save(src / "a" / name)
    (src / "a" / "y.txt").write_text("from the sidecar\n")
    (src / "a" / "z.txt").write_text("the manifest wins")
    (src / "metadata.csv").write_text(
        'file,caption,identity,identities\na/x.jpg,from the manifest,bob,\na/z.jpg,manifest caption,,"ann,bob"\n'
    )
    items = {i.source: i for i in scan_source(src, identity_from_folder=True)}
    assert (items["a/x.jpg"].caption, items["a/x.jpg"].identity) == ("from the manifest", "bob")
    assert (items["a/y.jpg"].caption, items["a/y.jpg"].identity) == ("from the sidecar", "a")
    assert items["a/z.jpg"].caption == "manifest caption" and items["a/z.jpg"].identities == ["ann", "bob"]
    assert len({i.key for i in items.values()}) == 3

    (src / "metadata.jsonl").write_text('{"caption": "no file column"}\n')
    with pytest.raises(DatasetError, match="no 'file' column"):
        scan_source(src)


def test_label_count_mismatch_drops_labels(tmp_path):
    src = make_sample_source(tmp_path / "src", pairs=False)
    (src / "metadata.jsonl").write_text(
        json.dumps({"file": f"{PEOPLE[0]}/1.jpg", "identities": ["a", "b"]}) + "\n"
    )
    summary = prepare_dataset(src, tmp_path / "data", workers=1, progress=False)
    assert summary.label_mismatch == 1 and "did not match" in summary.format()
    row = next(r for r in read_jsonl(tmp_path / "data" / INDEX_FILE) if r["source"] == f"{PEOPLE[0]}/1.jpg")
    assert row["identities"] == [None]


def test_prepare_data_cli_errors(tmp_path, capsys):
    assert main(["prepare-data", str(tmp_path / "missing"), "--out", str(tmp_path / "d")]) == 2
    assert "not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["-q", "prepare-data", str(tmp_path / "empty"), "--out", str(tmp_path / "d")]) == 2
    assert "no images found" in capsys.readouterr().err
