"""Training steps per second on the tiny preset: one process, then two (DDP over gloo).

Prepares the sample dataset, then runs stage I for ``--steps`` optimizer steps with
``uniportrait train`` (1 process) and with ``accelerate launch --config_file
configs/accelerate/cpu2.yaml`` (2 processes), the same batch per process, and prints one JSON line
per run with the steps/s of the last logged step (the trainer's ``steps_per_s``: steps since the
start of the loop, after the networks are built) and the samples/s it makes::

    python benchmarks/train_throughput.py --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tool(name: str) -> str:
    return shutil.which(name, path=str(Path(sys.executable).parent)) or name


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=2, help="per process")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (OMP_NUM_THREADS)")
    args = parser.parse_args()

    from uniportrait.training.prepare import PrepareOptions, prepare_dataset
    from uniportrait.training.samples import make_sample_source

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_sample_source(tmp / "src")
        prepare_dataset(
            tmp / "src", tmp / "data", options=PrepareOptions(identity_from_folder=True), progress=False
        )
        train = ["--stage", "1", "--preset", "tiny", "--data", str(tmp / "data")]
        sets = [
            f"train.max_steps={args.steps}",
            f"train.batch_size={args.batch_size}",
            "checkpoint.every=100000",
        ]
        train += [a for s in sets for a in ("--set", s)]
        launchers = {
            1: [_tool("uniportrait"), "-q", "train"],
            2: [_tool("accelerate"), "launch", "--config_file", str(ROOT / "configs/accelerate/cpu2.yaml"),
                "-m", "uniportrait.training"],
        }  # fmt: skip
        for processes, launcher in launchers.items():
            out = tmp / f"run-{processes}"
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "CUDA_VISIBLE_DEVICES": ""}
            subprocess.run(
                [*launcher, *train, "--output-dir", str(out)], check=True, env=env, capture_output=True
            )
            last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
            steps_per_s = last["steps_per_s"]
            print(
                json.dumps(
                    {
                        "processes": processes,
                        "threads_per_process": args.threads,
                        "batch_per_process": args.batch_size,
                        "steps": last["step"],
                        "steps_per_s": round(steps_per_s, 3),
                        "samples_per_s": round(steps_per_s * args.batch_size * processes, 2),
                        "load_avg_1min": round(os.getloadavg()[0], 1),
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
