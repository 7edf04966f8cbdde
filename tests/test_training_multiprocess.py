"""Both stages under `accelerate launch` with two CPU processes (DDP over gloo).

accelerate's own ``--cpu`` launcher starts a single process unless it is given an MPI hostfile;
``--multi_gpu`` starts the processes with torchrun, and on a machine without CUDA the trainer
asks accelerate for CPU (gloo) DDP. Slow-ish (two launches of two processes) but part of the
default run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from uniportrait.training.prepare import PrepareOptions, prepare_dataset
from uniportrait.training.samples import make_sample_source

pytestmark = pytest.mark.slow


def _tool(name: str) -> str:
    path = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    assert path, f"{name} is not installed"
    return path


def _launch(
    entry: list[str],
    stage: int,
    data: Path,
    out: Path,
    *overrides: str,
    multi_gpu: bool = True,
    extra: list[str] = (),
) -> str:
    cmd = [
        _tool("accelerate"), "launch", *(["--multi_gpu"] if multi_gpu else []),
        "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
        *entry, "--stage", str(stage), "--preset", "tiny",
        "--data", str(data), "--output-dir", str(out),
        "--set", "train.max_steps=3", "--set", "checkpoint.every=2",
        *[arg for o in overrides for arg in ("--set", o)], *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    return log


def test_two_processes_train_both_stages_and_the_result_loads(tmp_path):
    from uniportrait.models.adapter import read_adapter_files
    from uniportrait.pipeline import UniPortraitPipeline
    from uniportrait.presets.tiny import build_tiny_base

    make_sample_source(tmp_path / "src")
    data = tmp_path / "data"
    prepare_dataset(
        tmp_path / "src", data, workers=1, options=PrepareOptions(identity_from_folder=True), progress=False
    )

    # The two documented entry points: the module, and the console script.
    log1 = _launch(["-m", "uniportrait.training"], 1, data, tmp_path / "s1")
    assert "2 process(es)" in log1
    s1 = tmp_path / "s1" / "adapter"
    log2 = _launch([_tool("uniportrait"), "train"], 2, data, tmp_path / "s2", f"model.init_adapter={s1}")
    assert "2 process(es)" in log2

    for out in (tmp_path / "s1", tmp_path / "s2"):
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in metrics] == [1, 2, 3]  # written once, by the main process
        assert all(np.isfinite(m["loss"]) for m in metrics)
        states = sorted(p.name for p in (out / "checkpoints" / "checkpoint-00000002" / "state").iterdir())
        assert "random_states_1.pkl" in states and "trainable.safetensors" in states  # both ranks' RNG
    assert "route_mass" in metrics[0]

    base = build_tiny_base(0)
    encoder = base.pop("image_encoder")
    pipe = UniPortraitPipeline.from_pretrained(
        base, uniportrait=tmp_path / "s2" / "adapter", image_encoder=encoder
    )
    adapter, _ = read_adapter_files(tmp_path / "s2" / "adapter")
    assert adapter.config.multi_id and pipe.adapter.config.multi_id
    face = np.zeros((224, 224, 3), dtype=np.uint8)
    ids = [pipe.encode_identity(face), pipe.encode_identity(face + 60)]
    image = pipe(
        "two people", identities=ids, num_inference_steps=2, height=64, width=64, output_type="np"
    ).images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()


# -- one process versus two, resuming across process counts ---------------------------------------

EQUAL = ["train.batch_size=1", "train.ema_decay=0.9", "data.id_augment=0.5", "checkpoint.keep_last=null"]


@pytest.fixture(scope="module")
def single_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("equal")
    make_sample_source(root / "src", pairs=False)
    prepare_dataset(
        root / "src", root / "data", options=PrepareOptions(identity_from_folder=True), progress=False
    )
    return root / "data"


def _in_process(data: Path, out: Path, accumulation: int, *overrides: str, resume: str | None = None):
    from uniportrait.training.config import TINY_BASE, load_config
    from uniportrait.training.trainer import Trainer

    sets = [f"data.path={data}", f"output_dir={out}", "train.max_steps=3", "checkpoint.every=2", *EQUAL]
    cfg = load_config(
        None,
        [*sets, f"train.gradient_accumulation_steps={accumulation}", *overrides],
        stage=1,
        base=TINY_BASE,
    )
    return Trainer(cfg, resume=resume).train()


def _weights(out: Path, step: int) -> dict[str, dict]:
    from safetensors.torch import load_file

    ckpt = out / "checkpoints" / f"checkpoint-{step:08d}"
    return {
        "trained": load_file(ckpt / "state" / "trainable.safetensors"),
        "ema": load_file(ckpt / "adapter" / "adapter.safetensors"),  # the averaged weights
    }


def _assert_same(a: dict, b: dict) -> None:
    import torch

    for kind in a:
        assert a[kind].keys() == b[kind].keys()
        for name in a[kind]:
            torch.testing.assert_close(
                a[kind][name], b[kind][name], rtol=1e-4, atol=1e-6, msg=f"{kind} {name}"
            )


def test_two_processes_match_one_process_with_the_same_global_batch_and_resume_across(single_data, tmp_path):
    """2 processes × batch 1 = 1 process × batch 1 × 2 accumulation steps, with EMA: the same
    data, noise and weights after 3 steps; a 2-process checkpoint resumes on 1 process (and a
    1-process one on 2) and ends where the uninterrupted runs end."""
    import torch

    ddp = tmp_path / "ddp"
    _launch(["-m", "uniportrait.training"], 1, single_data, ddp, *EQUAL)
    one = tmp_path / "one"
    _in_process(single_data, one, accumulation=2)
    for step in (2, 3):
        _assert_same(_weights(ddp, step), _weights(one, step))
    start = _weights(one, 2)["trained"]
    assert any(not torch.equal(start[k], _weights(one, 3)["trained"][k]) for k in start)  # it trained

    # N → M: the 2-process checkpoint of step 2 goes on in 1 process.
    moved = tmp_path / "moved"
    _in_process(single_data, moved, 2, resume=str(ddp / "checkpoints" / "checkpoint-00000002"))
    _assert_same(_weights(moved, 3), _weights(ddp, 3))
    # M → N: the 1-process checkpoint of step 2 goes on in 2 processes.
    back = tmp_path / "back"
    log = _launch(
        ["-m", "uniportrait.training"],
        1,
        single_data,
        back,
        *EQUAL,
        extra=["--resume", str(one / "checkpoints" / "checkpoint-00000002")],
    )
    assert "resuming a 1-process checkpoint on 2 processes" in log
    _assert_same(_weights(back, 3), _weights(one, 3))


def test_launch_without_multi_gpu_warns_that_it_runs_one_process(single_data, tmp_path):
    log = _launch(
        ["-m", "uniportrait.training"], 1, single_data, tmp_path / "run", "train.max_steps=1", multi_gpu=False
    )
    assert "1 process(es)" in log and "accelerate launch started ONE process" in log
