"""Training checkpoints: nothing unpickled at resume, atomic files with a verified manifest, fall
back to the newest intact checkpoint, and no duplicate metrics rows after a resume."""

from __future__ import annotations

import json

import pytest

from uniportrait.errors import CheckpointError
from uniportrait.training.checkpoints import MANIFEST, trim_metrics, verify
from uniportrait.training.config import TINY_BASE, load_config
from uniportrait.training.prepare import PrepareOptions, prepare_dataset
from uniportrait.training.samples import make_sample_source
from uniportrait.training.trainer import Trainer, find_checkpoint

COMMON = ("train.max_steps=4", "checkpoint.every=1", "train.ema_decay=0.9", "validation.every=null",
          "logging.every=1")  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 3-step stage-I run with a checkpoint at every step (tiny preset, CPU)."""
    root = tmp_path_factory.mktemp("ckpt")
    make_sample_source(root / "src")
    prepare_dataset(root / "src", root / "data", workers=1, options=PrepareOptions(identity_from_folder=True),
                    progress=False)  # fmt: skip
    out = root / "out"
    cfg = load_config(None, [f"data.path={root / 'data'}", f"output_dir={out}", *COMMON, "train.stop_after_steps=3"],
                      stage=1, base=TINY_BASE)  # fmt: skip
    Trainer(cfg).train()
    return root, out


def _config(root, out):
    return load_config(
        None, [f"data.path={root / 'data'}", f"output_dir={out}", *COMMON], stage=1, base=TINY_BASE
    )


def _copy(out, tmp_path):
    import shutil

    target = tmp_path / "out"
    shutil.copytree(out, target)
    return target


def test_checkpoints_hold_no_pickled_objects_and_verify(run):
    _, out = run
    for folder in sorted((out / "checkpoints").iterdir()):
        manifest = verify(folder)
        assert "state/custom_state.json" in manifest["files"] and "state/ema.safetensors" in manifest["files"]
        assert not list(folder.rglob("custom_checkpoint_*.pkl"))


@pytest.mark.parametrize(
    "damage", ["empty-state", "truncated-weights", "flipped-byte", "no-manifest", "pickle"]
)
def test_a_damaged_latest_checkpoint_is_skipped_for_the_previous_one(run, tmp_path, caplog, damage):
    root, out = run
    out = _copy(out, tmp_path)
    latest = out / "checkpoints" / "checkpoint-00000003"
    weights = latest / "state" / "trainable.safetensors"
    if damage == "empty-state":
        (latest / "trainer_state.json").write_text("")
    elif damage == "truncated-weights":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "flipped-byte":
        data = bytearray(weights.read_bytes())
        data[-5] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "no-manifest":
        (latest / MANIFEST).unlink()
    else:
        (latest / "state" / "custom_checkpoint_0.pkl").write_bytes(b"\x80\x04crafted")
    with pytest.raises(CheckpointError):
        verify(latest)
    assert find_checkpoint(out) == out / "checkpoints" / "checkpoint-00000002"
    assert "skipping a damaged checkpoint" in caplog.text
    resumed = Trainer(_config(root, out), resume="latest")
    assert resumed.global_step == 2
    with pytest.raises(CheckpointError):
        find_checkpoint(out, str(latest))  # asked for by name: refused, not used


def test_resume_leaves_no_duplicate_metrics_rows(run, tmp_path):
    root, out = run
    out = _copy(out, tmp_path)
    (out / "checkpoints" / "checkpoint-00000003" / MANIFEST).unlink()  # resume from step 2
    Trainer(_config(root, out), resume="latest").train()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_trim_metrics_drops_rows_after_the_checkpoint_and_cut_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"ste')
    assert trim_metrics(path, 2) == 2
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
