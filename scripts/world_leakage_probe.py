"""Does one person's identity change another person's face? :func:`uniportrait.training.probe.leakage_probe`
on held-out world group pictures, for each adapter, group size and way of placing identities
(the router, every identity everywhere, the ground-truth face masks)::

    uniportrait world render --out runs/world/heldout-groups --count 200 --people 2,3 \\
        --identities 50 --held-out --seed 32
    python scripts/world_leakage_probe.py runs/world/heldout-groups src/uniportrait/assets/world/adapter

Prints one JSON line per adapter, group size and routing (leakage, its standard error over batches).
"""

from __future__ import annotations

import argparse
import json

import torch

from uniportrait.training.config import load_config
from uniportrait.training.probe import LEAKAGE_ROUTINGS, PROBE_OVERRIDES, leakage_probe
from uniportrait.training.trainer import Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "data", help="held-out group dataset (uniportrait world render --held-out --people 2,3)"
    )
    parser.add_argument("adapters", nargs="+", help="adapter or training checkpoint folders")
    parser.add_argument("--count", type=int, default=100, help="pictures per group size (default 100)")
    parser.add_argument("--routings", default=",".join(LEAKAGE_ROUTINGS), help="comma-separated")
    parser.add_argument("--config", default="configs/world/stage2.yaml")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for adapter in args.adapters:
        for people in (2, 3):
            overrides = [f"data.path={args.data}", f"model.init_adapter={adapter}", "output_dir=outputs/leakage-probe",
                         f"data.min_faces={people}", f"data.max_faces={people}"]  # fmt: skip
            trainer = Trainer(load_config(args.config, overrides + list(PROBE_OVERRIDES), stage=2))
            for routing in args.routings.split(","):
                result = leakage_probe(trainer, routing=routing, count=args.count, batch=20)
                print(json.dumps({"adapter": adapter, "people": people, **result}), flush=True)


if __name__ == "__main__":
    main()
