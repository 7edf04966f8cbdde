"""Data at scale: prepare-data over disjoint parts, merging, tar sources, WebDataset shards."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch

from uniportrait.cli import main
from uniportrait.training.data import PortraitDataset, ShardedPortraitDataset, open_portrait_dataset
from uniportrait.training.prepare import INDEX_FILE, DatasetError, PrepareOptions, prepare_dataset, read_jsonl
from uniportrait.training.samples import make_sample_source
from uniportrait.training.shards import in_shard, merge_parts, pack_webdataset, parse_shard, part_folder

KEEP = ("key", "source", "caption", "width", "height", "num_faces", "identities", "boxes")


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """The sample source, prepared once in one run and once as two parts merged."""
    root = tmp_path_factory.mktemp("scale")
    src = make_sample_source(root / "src")
    options = PrepareOptions(identity_from_folder=True)
    prepare_dataset(src, root / "single", options=options, progress=False)
    for i in range(2):
        prepare_dataset(src, root / "merged", options=options, progress=False, shard=(i, 2))
    merge_parts(root / "merged")
    return root


def _rows(folder) -> dict[str, dict]:
    return {r["key"]: {k: r[k] for k in KEEP} for r in read_jsonl(folder / INDEX_FILE)}


def test_shard_spec_and_split():
    assert parse_shard("3/8") == (3, 8)
    for bad in ("8/8", "1", "-1/2", "a/b", "0/0"):
        with pytest.raises(DatasetError, match="--shard"):
            parse_shard(bad)
    keys = [f"image-{k}" for k in range(400)]
    owners = [[i for i in range(3) if in_shard(key, i, 3)] for key in keys]
    assert all(len(o) == 1 for o in owners)  # every key in exactly one part
    sizes = np.bincount([o[0] for o in owners])
    assert sizes.min() > 100  # and the parts are balanced


def test_parts_merge_into_the_same_dataset_as_one_run(made):
    single, merged = _rows(made / "single"), _rows(made / "merged")
    assert merged == single and len(merged) == 12
    parts = [_rows(part_folder(made / "merged", i, 2)) for i in range(2)]
    assert parts[0] and parts[1] and not set(parts[0]) & set(parts[1])
    info = json.loads((made / "merged" / "dataset.json").read_text())
    assert info["merged"] == {"parts": 2} and info["images"] == 12
    # The trainer reads the merged folder like any dataset: the same items.
    a = PortraitDataset(made / "single", 64, 1, 4, id_augment=0.5)
    b = PortraitDataset(made / "merged", 64, 1, 4, id_augment=0.5)
    for index in (0, 5, 11):
        x, y = a[(index, 7)], b[(index, 7)]
        for name in ("pixels", "masks", "crops", "id_crops"):
            assert torch.equal(x[name], y[name])


def test_a_part_resumes_and_merge_checks_the_split(made, tmp_path, capsys):
    src, out = made / "src", tmp_path / "data"
    args = ["-q", "prepare-data", str(src), "--out", str(out), "--identity-from-folder", "--workers", "1"]
    assert main([*args, "--shard", "1/2"]) == 0
    again = main([*args, "--shard", "1/2"])
    printed = capsys.readouterr().out
    assert again == 0 and "0 added" in printed.splitlines()[-2] and "already done" in printed
    assert main(["data", "merge", str(out)]) == 2
    assert "1 of 2 parts missing (0/2)" in capsys.readouterr().err
    assert not (out / INDEX_FILE).exists()  # nothing half-written
    assert main([*args, "--shard", "0/3"]) == 0
    assert main(["data", "merge", str(out)]) == 2
    assert "different splits" in capsys.readouterr().err
    assert main([*args, "--shard", "2/2"]) == 2
    assert "need 0 <= I < N" in capsys.readouterr().err
    merged = made / "merged"
    before = sorted(p.name for p in merged.iterdir())
    with pytest.raises(DatasetError, match="was merged from parts"):
        prepare_dataset(src, merged, progress=False)
    assert sorted(p.name for p in merged.iterdir()) == before


def _img2dataset_tar(src, path) -> dict[str, str]:
    """An img2dataset-style shard: NNN.jpg + NNN.txt + NNN.json, the json carrying labels.
    Returns tar member key → the photo's path in ``src``."""
    people = sorted(p for p in src.iterdir() if p.is_dir() and p.name != "pairs")
    origin = {}
    with tarfile.open(path, "w") as tar:
        k = 0
        for person in people:
            for photo in sorted(person.glob("*.jpg")):
                caption = photo.with_suffix(".txt").read_text()
                meta = {"key": f"{k:09d}", "status": "success", "identity": person.name}
                for ext, data in (
                    ("jpg", photo.read_bytes()),
                    ("txt", caption.encode()),
                    ("json", json.dumps(meta).encode()),
                ):
                    info = tarfile.TarInfo(f"{k:09d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                origin[f"{k:09d}"] = photo.relative_to(src).as_posix()
                k += 1
    return origin


def test_tar_shards_and_manifest_files_are_sources(made, tmp_path):
    src = made / "src"
    (tmp_path / "tars").mkdir()
    origin = _img2dataset_tar(src, tmp_path / "tars" / "00000.tar")
    summary = prepare_dataset(tmp_path / "tars", tmp_path / "from-tar", progress=False)
    assert (summary.total, summary.written) == (6, 6)
    rows = sorted(read_jsonl(tmp_path / "from-tar" / INDEX_FILE), key=lambda r: r["source"])
    assert rows[0]["source"] == "00000.tar/000000000.jpg"
    single = {r["source"]: r for r in read_jsonl(made / "single" / INDEX_FILE)}
    for row in rows:  # the same captions, labels and faces as from the folder
        twin = single[origin[row["source"].split("/")[1].split(".")[0]]]
        assert [row[k] for k in ("caption", "identities", "boxes")] == [
            twin[k] for k in ("caption", "identities", "boxes")
        ]
    manifest = tmp_path / "list.jsonl"
    lines = [
        {"file": f"src/{p}", "caption": "x", "identity": "p"} for p in ("ffhq-0100/1.jpg", "ffhq-0293/2.jpg")
    ]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in lines))
    (tmp_path / "src").symlink_to(src)
    summary = prepare_dataset(manifest, tmp_path / "from-manifest", progress=False)
    assert summary.written == 2
    assert {r["source"] for r in read_jsonl(tmp_path / "from-manifest" / INDEX_FILE)} == {
        "src/ffhq-0100/1.jpg",
        "src/ffhq-0293/2.jpg",
    }
    (tmp_path / "bad.jsonl").write_text(json.dumps({"file": "nope.jpg"}) + "\n")
    with pytest.raises(DatasetError, match="image nope.jpg not found"):
        prepare_dataset(tmp_path / "bad.jsonl", tmp_path / "x", progress=False)


@pytest.fixture(scope="module")
def shards(made):
    return made, pack_webdataset(made / "merged", made / "shards", samples_per_shard=3, progress=False)


def test_packed_shards_hold_the_dataset_and_read_with_webdataset(shards):
    made, info = shards
    assert info["images"] == 12 and len(info["shards"]) == 4
    assert sum(s["faces"].get("1", 0) for s in info["shards"]) == 6
    wds = pytest.importorskip("webdataset")
    urls = [str(made / "shards" / s["file"]) for s in info["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert len(samples) == 12
    rows = _rows(made / "merged")
    folder = PortraitDataset(made / "merged", 64, 1, 4)

    def others(key, label):  # crops of the other photos of a person
        return [
            folder.faces(r)["crops"][f]
            for r in folder.rows
            for f, name in enumerate(r["identities"])
            if name == label and r["key"] != key
        ]

    for sample in samples:
        meta = json.loads(sample["json"])
        assert {k: meta[k] for k in KEEP} == rows[meta["key"]]
        faces = np.load(io.BytesIO(sample["npz"]))
        assert faces["crops"].shape == (meta["num_faces"], 224, 224, 3)
        if meta["num_faces"] == 1:  # another photo of the same person, for the ID augmentation
            alt = np.load(io.BytesIO(sample["alt.npz"]))
            assert alt["crops"].shape[1:] == (224, 224, 3) and (alt["face"] == 0).all()
            choices = others(meta["key"], meta["identities"][0])
            assert len(alt["crops"]) == min(4, len(choices))
            assert all(any((crop == c).all() for c in choices) for crop in alt["crops"])
    # The trainer's items from the shards equal those from the folder (no augmentation drawn).
    sharded = open_portrait_dataset(made / "shards", 64, 1, 4)
    assert isinstance(sharded, ShardedPortraitDataset) and len(sharded) == 12
    by_key = {r["key"]: i for i, r in enumerate(folder.rows)}
    for record in sharded.records(info["shards"][0]["file"]):
        x, y = sharded[(record, 3)], folder[(by_key[record["meta"]["key"]], 3)]
        for name in ("pixels", "masks", "crops", "id_crops"):
            assert torch.equal(x[name], y[name])


def test_shard_schedule_splits_processes_and_resumes_exactly(shards):
    made, _ = shards
    single = ShardedPortraitDataset(made / "shards", 64, 1, 1)
    pairs = ShardedPortraitDataset(made / "shards", 64, 2, 4)

    def keys(schedule, start, count):
        stream = schedule.stream(start)
        return [[(r["meta"]["key"], s) for r, s in next(stream)] for _ in range(count)]

    for dataset in (single, pairs):
        one = keys(dataset.schedule(1, seed=5), 0, 8)
        assert keys(dataset.schedule(1, seed=5), 3, 5) == one[3:]  # resume = the same stream
        assert keys(dataset.schedule(1, seed=6), 0, 8) != one
        # Two processes read disjoint shards within an epoch.
        epoch = [dataset.schedule(1, seed=5, rank=r, world=2)._shards(0) for r in range(2)]
        assert epoch[0] and epoch[1] and not set(epoch[0]) & set(epoch[1])
    batch = next(pairs.schedule(2, seed=0).stream())
    assert len({r["meta"]["num_faces"] for r, _ in batch}) == 1  # one face count per batch
    with pytest.raises(DatasetError, match="shard"):
        single.schedule(1, seed=0, rank=0, world=8)


def test_training_reads_webdataset_shards(shards, tmp_path):
    from uniportrait.training.config import TINY_BASE, load_config
    from uniportrait.training.trainer import Trainer

    made, _ = shards
    overrides = [f"data.path={made / 'shards'}", f"output_dir={tmp_path}", "train.max_steps=2"]
    cfg = load_config(None, [*overrides, "data.id_augment=1.0"], stage=1, base=TINY_BASE)
    trainer = Trainer(cfg)
    assert trainer.train() == tmp_path / "adapter"
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and all(np.isfinite(m["loss"]) for m in metrics)
    assert len(trainer.validation_samples()) == 1


def test_a_png_dataset_packs_and_reads_like_its_folder(made, tmp_path):
    """Datasets stored as PNG (``uniportrait world render`` writes them so) pack as ``<key>.png``."""
    import shutil

    from PIL import Image

    data = tmp_path / "png"
    shutil.copytree(made / "single", data)
    rows = read_jsonl(data / INDEX_FILE)
    for row in rows:
        png = row["image"].replace(".jpg", ".png")
        Image.open(data / row["image"]).save(data / png)
        (data / row["image"]).unlink()
        row["image"] = png
    (data / INDEX_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    info = pack_webdataset(data, tmp_path / "shards", samples_per_shard=5, progress=False)
    with tarfile.open(tmp_path / "shards" / info["shards"][0]["file"]) as tar:
        assert any(name.endswith(".png") for name in tar.getnames())
        assert not any(name.endswith(".jpg") for name in tar.getnames())
    folder, sharded = PortraitDataset(data, 64, 1, 4), ShardedPortraitDataset(tmp_path / "shards", 64, 1, 4)
    by_key = {r["key"]: i for i, r in enumerate(folder.rows)}
    for shard in info["shards"]:
        for record in sharded.records(shard["file"]):
            x, y = sharded[(record, 0)], folder[(by_key[record["meta"]["key"]], 0)]
            assert torch.equal(x["pixels"], y["pixels"]) and torch.equal(x["masks"], y["masks"])
