"""Does a stage-I adapter use identity? The held-out probe behind issue 12's learning tests.

For each held-out world portrait, the denoising MSE of the adapter with the person's own identity
features (taken from *another* render of them, as the ID augmentation does) is compared with the
MSE with another held-out person's features, at the same noise and timestep. Prints the mean
difference (other − own), its standard error and z. Zero means the identity tokens are ignored;
positive means the adapter denoises a person better with their own identity::

    uniportrait world render --out runs/world/heldout-singles --count 300 --people 1 \\
        --identities 50 --held-out --seed 31
    python scripts/world_identity_probe.py runs/world/train-stage1/adapter runs/world/heldout-singles 150

``ADAPTER`` is an adapter folder or a training checkpoint folder; the model and the rest of the
training set-up are ``configs/world/stage1.yaml``'s.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from uniportrait.training.config import load_config
from uniportrait.training.data import collate
from uniportrait.training.trainer import Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("adapter", help="adapter or training checkpoint folder")
    parser.add_argument("data", help="held-out dataset (uniportrait world render --held-out)")
    parser.add_argument("count", nargs="?", type=int, default=200, help="portraits to use (default 200)")
    parser.add_argument("--config", default="configs/world/stage1.yaml")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(
        args.config,
        [f"data.path={args.data}", f"model.init_adapter={args.adapter}", "output_dir=outputs/identity-probe",
         "data.id_drop=0", "data.text_drop=0", "data.structure_drop_all=0", "data.structure_drop_tokens=0",
         "data.id_augment=1.0", "train.batch_size=1"],
        stage=1,
    )  # fmt: skip
    trainer = Trainer(cfg)
    model, dataset = trainer.model.eval(), trainer.dataset
    rng = np.random.default_rng(0)
    own, other = [], []
    with torch.no_grad():
        for i in range(min(args.count, len(dataset))):
            # another person: world render writes six consecutive renders per identity
            j = (i + 6 + int(rng.integers(len(dataset) - 12))) % len(dataset)
            mine = trainer.prepare_inputs(collate([dataset[(i, i)]]), seed=1000 + i)
            theirs = trainer.prepare_inputs(collate([dataset[(j, j)]]), seed=1000 + i)
            own.append(float(model(**mine)["diffusion"]))
            mine["intrinsic"], mine["structure"] = theirs["intrinsic"], theirs["structure"]
            other.append(float(model(**mine)["diffusion"]))
    own_a, other_a = np.array(own), np.array(other)
    diff = other_a - own_a
    se = diff.std(ddof=1) / np.sqrt(len(diff))
    print(json.dumps({
        "adapter": args.adapter, "portraits": len(diff), "own_mse": own_a.mean(), "other_mse": other_a.mean(),
        "diff_mean": diff.mean(), "diff_se": se, "relative": diff.mean() / own_a.mean(), "z": diff.mean() / se,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
