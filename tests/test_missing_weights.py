"""Without the published weights, `sd15` fails at once with one message and working commands."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from uniportrait.errors import WeightsNotFoundError


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


@pytest.mark.parametrize("offline", [True, False])
def test_missing_weights_fail_fast_with_exact_commands(empty_cache, monkeypatch, offline):
    import uniportrait.loading as loading
    from uniportrait.presets import load_preset

    attempts = []

    def unreachable(timeout_s=3.0):
        attempts.append(timeout_s)
        return False

    monkeypatch.setattr(loading, "hub_reachable", unreachable)
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    start = time.monotonic()
    with pytest.raises(WeightsNotFoundError) as err:
        load_preset("sd15")
    assert time.monotonic() - start < 10
    message = str(err.value)
    assert "\n" not in message and "huggingface-cli" not in message
    assert "hf download Junjie96/UniPortrait glint360k_curricular_face_r101_backbone.bin " \
           "uniportrait-faceid_sd15.bin uniportrait-router_sd15.bin" in message  # fmt: skip
    assert "hf download h94/IP-Adapter models/ip-adapter_sd15.bin" in message
    assert "hf download SG161222/Realistic_Vision_V5.1_noVAE --include" in message
    assert "hf download stabilityai/sd-vae-ft-mse" in message
    if offline:
        assert "HF_HUB_OFFLINE is set" in message and "set HF_HUB_OFFLINE=1" not in message
        assert attempts == []  # offline: not even one attempt
    else:
        assert "cannot be reached" in message and len(attempts) == 1  # one bounded attempt


def test_cli_takes_local_paths_for_every_sd15_part(tmp_path, capsys, empty_cache, monkeypatch):
    from uniportrait.cli import main
    from uniportrait.faces import sample_photo

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    parts = {
        f: tmp_path / "local" / f for f in ("base-model", "vae", "image-encoder", "uniportrait", "ip-adapter")
    }
    args = ["generate", "--prompt", "p", "--id", str(sample_photo("ffhq-0100")), "--out", str(tmp_path / "o"),
            "--preset", "sd15"]  # fmt: skip
    for flag, path in parts.items():
        args += [f"--{flag}", str(path)]
    assert main(args) == 2
    err = capsys.readouterr().err
    for path in parts.values():
        assert str(path) in err  # each local path was used (and reported missing), not the Hub id
    assert "SG161222" not in err and "Junjie96" not in err
    assert (
        main(["generate", "--prompt", "p", "--out", str(tmp_path / "o"), "--preset", "tiny", "--vae", "x"])
        == 2
    )
    assert "use them with --preset sd15" in capsys.readouterr().err


def _fake_snapshot_download(calls):
    """A stand-in for huggingface_hub.snapshot_download that writes into the Hub cache layout
    (refs/main → snapshots/<rev>/...), so the loaders' own cache lookup then finds the files."""
    import huggingface_hub.constants

    def fetch(repo_id, allow_patterns=None, **kwargs):
        calls.append((repo_id, allow_patterns))
        root = Path(huggingface_hub.constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
        rev = "0" * 40
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / "main").write_text(rev)
        for pattern in allow_patterns or ["*"]:
            folder = pattern.removesuffix("*").rstrip("/")
            name = pattern if not pattern.endswith("*") else f"{folder}/config.json".lstrip("/")
            for file in {name, name.replace("config.json", "vocab.json")}:
                (root / "snapshots" / rev / file).parent.mkdir(parents=True, exist_ok=True)
                (root / "snapshots" / rev / file).write_text("{}")
        return str(root / "snapshots" / rev)

    return fetch


def test_download_fetches_exactly_what_is_missing_then_nothing(empty_cache, monkeypatch, capsys, tmp_path):
    import huggingface_hub

    from uniportrait.cli import main

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _fake_snapshot_download(calls))
    local_vae = tmp_path / "my-vae"
    local_vae.mkdir()
    (local_vae / "config.json").write_text("{}")
    assert main(["download", "--dry-run", "--vae", str(local_vae)]) == 0
    dry = capsys.readouterr().out
    assert "hf download Junjie96/UniPortrait" in dry and "sd-vae-ft-mse" not in dry and calls == []

    assert main(["download", "--vae", str(local_vae)]) == 0
    assert "downloaded" in capsys.readouterr().out
    fetched = dict(calls)
    assert set(fetched) == {"SG161222/Realistic_Vision_V5.1_noVAE", "h94/IP-Adapter", "Junjie96/UniPortrait"}
    assert fetched["SG161222/Realistic_Vision_V5.1_noVAE"] == ["text_encoder/*", "tokenizer/*", "unet/*"]
    assert sorted(fetched["Junjie96/UniPortrait"]) == [
        "glint360k_curricular_face_r101_backbone.bin",
        "uniportrait-faceid_sd15.bin",
        "uniportrait-router_sd15.bin",
    ]
    calls.clear()
    assert main(["download", "--vae", str(local_vae)]) == 0  # all cached now: nothing fetched
    assert "nothing to download" in capsys.readouterr().out and calls == []


def test_download_offline_or_failing_is_one_clear_error(empty_cache, monkeypatch, capsys):
    import huggingface_hub

    from uniportrait.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["download"]) == 2
    err = capsys.readouterr().err.strip()
    assert "HF_HUB_OFFLINE is set" in err and "hf download Junjie96/UniPortrait" in err and "\n" not in err
    monkeypatch.delenv("HF_HUB_OFFLINE")

    def refuse(repo_id, **kwargs):
        raise OSError(f"401 Client Error for {repo_id}\nmore detail")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    assert main(["download"]) == 2
    err = capsys.readouterr().err.strip()
    assert "could not download" in err and "401 Client Error" in err and "\n" not in err
