"""Does a stage-I adapter use identity? :func:`uniportrait.training.probe.identity_probe` on
held-out world portraits::

    uniportrait world render --out runs/world/heldout-singles --count 300 --people 1 \\
        --identities 50 --held-out --seed 31
    python scripts/world_identity_probe.py runs/world/train-stage1/adapter runs/world/heldout-singles 300

``ADAPTER`` is an adapter folder or a training checkpoint folder; the model and the rest of the
training set-up are ``configs/world/stage1.yaml``'s (``--set KEY=VALUE`` overrides it, e.g. the
base model an adapter was trained on). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json

import torch

from uniportrait.errors import UniPortraitError
from uniportrait.training.config import load_config
from uniportrait.training.probe import PROBE_OVERRIDES, identity_probe
from uniportrait.training.trainer import Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("adapter", help="adapter or training checkpoint folder")
    parser.add_argument("data", help="held-out dataset (uniportrait world render --held-out)")
    parser.add_argument("count", nargs="?", type=int, default=300, help="pictures to use (default 300)")
    parser.add_argument("--config", default="configs/world/stage1.yaml")
    parser.add_argument(
        "--faceid-scale", type=float, default=1.0, help="identity attention weight (default 1)"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="config override, e.g. model.pretrained_model=runs/world/traits/base (repeatable)",
    )  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(1)
    overrides = [
        f"data.path={args.data}",
        f"model.init_adapter={args.adapter}",
        "output_dir=outputs/identity-probe",
        *args.set,
    ]
    try:
        config = load_config(args.config, overrides + list(PROBE_OVERRIDES), stage=1)
    except UniPortraitError as error:
        parser.error(str(error))
    trainer = Trainer(config)
    trainer.model.faceid_scale = args.faceid_scale
    result = identity_probe(trainer, args.count)
    print(json.dumps({"adapter": args.adapter, "faceid_scale": args.faceid_scale, **result}))


if __name__ == "__main__":
    main()
