"""Training under `accelerate launch` with two CPU processes (DDP over gloo).

``configs/accelerate/cpu2.yaml`` is a MULTI_GPU config: accelerate starts several processes only
through torchrun, and on a machine without CUDA the trainer asks accelerate for CPU (gloo) DDP.
Covered: both stages in 2 processes; 2 processes × batch 1 = 1 process × 2 accumulation steps
(fp32 and bf16, with EMA); a 2-process checkpoint resumed in 1 process; the warning when
``accelerate launch --num_processes 2`` starts one process; the shipped accelerate configs; FSDP
(skipped without 2 GPUs, with the reason). Slow (several launches) but part of the default run.
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
ACCELERATE = Path(__file__).resolve().parents[1] / "configs" / "accelerate"


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
    if multi_gpu:  # the shipped two-CPU-process config (MULTI_GPU: torchrun; gloo without CUDA)
        launcher = ["--config_file", str(ACCELERATE / "cpu2.yaml")]
    else:  # what a user may type: asks for 2 processes, gets accelerate's one-process launcher
        launcher = "--num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no".split()
    cmd = [
        _tool("accelerate"), "launch", *launcher,
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
        "ema": load_file(ckpt / "adapter" / "diffusion_pytorch_model.safetensors"),  # the averaged weights
    }


def _assert_same(a: dict, b: dict) -> None:
    import torch

    for kind in a:
        assert a[kind].keys() == b[kind].keys()
        for name in a[kind]:
            torch.testing.assert_close(
                a[kind][name], b[kind][name], rtol=1e-4, atol=1e-6, msg=f"{kind} {name}"
            )


@pytest.fixture(scope="module")
def ddp_run(single_data, tmp_path_factory):
    """Stage I in 2 processes × batch 1, EMA on, 3 steps (checkpoints at 2 and 3)."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    _launch(["-m", "uniportrait.training"], 1, single_data, out, *EQUAL)
    return out


def test_two_processes_match_one_process_with_the_same_global_batch_and_resume_across(
    single_data, ddp_run, tmp_path
):
    """2 processes × batch 1 = 1 process × batch 1 × 2 accumulation steps, with EMA: the same
    data, noise and weights after 2 and 3 steps; the 2-process checkpoint of step 2 resumes in
    1 process and ends where the uninterrupted runs end."""
    import torch

    one = tmp_path / "one"
    _in_process(single_data, one, accumulation=2)
    for step in (2, 3):
        _assert_same(_weights(ddp_run, step), _weights(one, step))
    start = _weights(one, 2)["trained"]
    assert any(not torch.equal(start[k], _weights(one, 3)["trained"][k]) for k in start)  # it trained

    moved = tmp_path / "moved"  # N → M
    _in_process(single_data, moved, 2, resume=str(ddp_run / "checkpoints" / "checkpoint-00000002"))
    _assert_same(_weights(moved, 3), _weights(ddp_run, 3))
    # The stream went on at the same place: one process consumed 2 × 2 micro-batches by step 2.
    assert (
        json.loads((moved / "checkpoints" / "checkpoint-00000003" / "trainer_state.json").read_text())[
            "micro_batches"
        ]
        == 6
    )


def test_mixed_precision_two_processes_match_one_process(single_data, tmp_path):
    """The same comparison under bf16 autocast (frozen networks stored in bf16), both runs in
    fresh processes with one thread each (accelerate's precision is fixed once per process)."""
    bf16 = [*EQUAL, "train.mixed_precision=bf16"]
    _launch(["-m", "uniportrait.training"], 1, single_data, tmp_path / "ddp", *bf16)
    sets = [*bf16, "train.max_steps=3", "checkpoint.every=2", "train.gradient_accumulation_steps=2"]
    cmd = [_tool("uniportrait"), "train", "--stage", "1", "--preset", "tiny", "--data", str(single_data),
           "--output-dir", str(tmp_path / "one"), *[a for o in sets for a in ("--set", o)]]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "weights bfloat16" in proc.stdout + proc.stderr
    for step in (2, 3):
        _assert_same(_weights(tmp_path / "ddp", step), _weights(tmp_path / "one", step))


def test_launch_without_multi_gpu_warns_that_it_runs_one_process(single_data, tmp_path):
    log = _launch(
        ["-m", "uniportrait.training"], 1, single_data, tmp_path / "run", "train.max_steps=1", multi_gpu=False
    )
    assert "1 process(es)" in log and "accelerate launch started ONE process" in log


# -- launch configs, FSDP -----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(p.name for p in ACCELERATE.glob("*.yaml")))
def test_shipped_accelerate_configs_load_and_name_their_command(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ACCELERATE / name))
    text = (ACCELERATE / name).read_text()
    assert f"accelerate launch --config_file configs/accelerate/{name}" in text
    assert "-m uniportrait.training --stage" in text
    expected = {
        "1gpu.yaml": ("NO", 1),
        "8gpu.yaml": ("MULTI_GPU", 8),
        "multinode.yaml": ("MULTI_GPU", 16),
        "fsdp.yaml": ("FSDP", 8),
        "deepspeed_zero2.yaml": ("DEEPSPEED", 8),
        "cpu2.yaml": ("MULTI_GPU", 2),
    }[name]
    assert (str(config.distributed_type).rsplit(".", 1)[-1], config.num_processes) == expected
    if name == "deepspeed_zero2.yaml":
        assert config.deepspeed_config["zero_stage"] == 2
    if name == "multinode.yaml":
        assert config.num_machines == 2


FSDP_COMMAND = (
    "accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 2 "
    "-m uniportrait.training --stage 1 --preset tiny --data DATA --output-dir OUT"
)


def _fsdp_unavailable() -> str | None:
    """Why accelerate cannot run FSDP here, or None."""
    import accelerate
    import torch

    if torch.cuda.device_count() >= 2:
        return None
    return (
        f"accelerate {accelerate.__version__} turns FSDP on only over a multi-accelerator backend "
        "(AcceleratorState sets DistributedType.FSDP only on top of MULTI_GPU/NPU/XPU/...); CPU processes "
        f"run DDP over gloo (MULTI_CPU), and this machine has {torch.cuda.device_count()} CUDA device(s)"
    )


def test_fsdp_trains_both_stages_and_the_adapter_loads(tmp_path):
    """configs/accelerate/fsdp.yaml on 2 GPUs: both stages train, and the saved adapter loads
    with strict keys and shapes. Never run on this project's CPU-only machines."""
    reason = _fsdp_unavailable()
    if reason is not None:
        pytest.skip(f"{reason}. On 2+ GPUs: {FSDP_COMMAND}")
    import torch
    from safetensors.torch import load_file

    from uniportrait.models.adapter import read_adapter_files

    data = tmp_path / "data"
    make_sample_source(tmp_path / "src")
    prepare_dataset(tmp_path / "src", data, options=PrepareOptions(identity_from_folder=True), progress=False)
    fsdp = [
        "--config_file",
        str(ACCELERATE / "fsdp.yaml"),
        "--num_processes",
        "2",
        "--main_process_port",
        "0",
    ]
    for stage, init in ((1, []), (2, [f"model.init_adapter={tmp_path / 's1' / 'adapter'}"])):
        out = tmp_path / f"s{stage}"
        cmd = [
            _tool("accelerate"), "launch", *fsdp, "-m", "uniportrait.training", "--stage", str(stage),
            "--preset", "tiny", "--data", str(data), "--output-dir", str(out),
            "--set", "train.max_steps=2", "--set", "checkpoint.every=1",
            *[a for o in init for a in ("--set", o)],
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
        log = proc.stdout + proc.stderr
        assert proc.returncode == 0, log[-4000:]
        assert "FSDP has not been tested" in log and "2 process(es)" in log  # FSDP was really on
        adapter, _ = read_adapter_files(out / "adapter")  # strict keys and shapes
        assert adapter.config.multi_id == (stage == 2)
        steps = [
            load_file(out / "checkpoints" / f"checkpoint-{k:08d}" / "state" / "trainable.safetensors")
            for k in (1, 2)
        ]
        assert all(torch.isfinite(v).all() for v in steps[1].values())
        assert any(not torch.equal(steps[0][k], steps[1][k]) for k in steps[0])
