"""One damaged identity file never breaks the bank: it is listed as damaged, removable, never used."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from uniportrait.bank import IdentityBank
from uniportrait.cli import main
from uniportrait.errors import IdentityError
from uniportrait.identity import Identity


def _identity(encoder="enc") -> Identity:
    g = torch.Generator().manual_seed(0)
    return Identity(torch.randn(1, 49, 8, generator=g), torch.randn(1, 256, 12, generator=g), encoder)


def _damage(path, how: str) -> None:
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:100])
        return
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(path))
    if how == "bad-metadata":
        meta["mix_scales"] = "{not json"
    elif how == "nan":
        tensors["intrinsic"][0, 0, 0] = float("nan")
    elif how == "missing-mix":
        meta["mix_scales"] = json.dumps([0.3])
    save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize("how", ["truncated", "bad-metadata", "nan", "missing-mix"])
def test_a_damaged_entry_is_listed_removable_and_never_used(tmp_path, capsys, how):
    bank = IdentityBank(tmp_path)
    bank.add("good", _identity())
    bank.add("bad", _identity())
    _damage(bank.path("bad"), how)

    infos = {i.name: i for i in bank.list()}
    assert set(infos) == {"good", "bad"}  # listed, and it does not hide the good one
    assert infos["good"].problem is None and infos["bad"].problem
    assert bank.info("bad").problem  # `add` and `info` agree that it exists
    with pytest.raises(IdentityError, match="damaged"):
        bank.get("bad")
    assert bank.get("good").num_references == 1

    assert main(["id", "--home", str(tmp_path), "list"]) == 0
    listing = capsys.readouterr().out
    assert "bad" in listing and "DAMAGED" in listing and "good" in listing
    assert main(["generate", "--prompt", "p", "--id-name", "bad", "--out", str(tmp_path / "o"), "--home",
                 str(tmp_path), "--preset", "tiny", "--steps", "1", "--width", "64", "--height", "64"]) == 2  # fmt: skip
    assert "damaged" in capsys.readouterr().err
    assert main(["id", "--home", str(tmp_path), "rm", "bad"]) == 0
    assert [i.name for i in bank.list()] == ["good"]


def test_temp_files_of_killed_adds_are_cleaned(tmp_path):
    bank = IdentityBank(tmp_path)
    bank.add("good", _identity())
    stale = bank.folder / ".alice.safetensors.abc123"
    fresh = bank.folder / ".bob.safetensors.def456"
    stale.write_bytes(b"half")
    fresh.write_bytes(b"being written")
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    assert [i.name for i in bank.list()] == ["good"]
    assert not stale.exists() and fresh.exists()  # a write in progress is left alone


def test_printing_an_identity_shows_no_tensors():
    text = repr(_identity())
    assert "tensor(" not in text and "references=1" in text and len(text) < 200


def test_an_old_alignment_file_is_listed_as_old_not_damaged(tmp_path, capsys):
    from safetensors import safe_open

    bank = IdentityBank(tmp_path)
    ident = _identity()
    ident.aligner = "mtcnn+norm_crop"
    for name in ("new", "old", "bad"):
        bank.add(name, ident)
    path = bank.path("old")  # as the previous default wrote it: version 1, no aligner
    with safe_open(str(path), framework="pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k != "aligner"} | {"version": "1"}
    save_file(load_file(str(path)), str(path), metadata=meta)
    _damage(bank.path("bad"), "nan")

    rows = {i.name: i.to_dict() for i in bank.list()}
    assert (
        rows["new"]["current"]
        and rows["new"]["damaged"] is None
        and rows["new"]["aligner"] == "mtcnn+norm_crop"
    )
    assert not rows["old"]["current"] and rows["old"]["damaged"] is None
    assert rows["old"]["aligner"] == "dlib-5pt+pil-bicubic"
    assert not rows["bad"]["current"] and "finite" in rows["bad"]["damaged"]
    with pytest.raises(IdentityError, match="old face alignment"):
        bank.get("old")
    with pytest.raises(IdentityError, match="damaged"):
        bank.get("bad")
    loaded = bank.get("new")
    assert loaded.aligner == "mtcnn+norm_crop" and "aligner='mtcnn+norm_crop'" in repr(loaded)
    assert "tensor" not in repr(loaded)
