"""Does a stage-II router send face pixels to the right identity, and does one person's identity
reach another's face? :func:`uniportrait.training.probe.routing_probe` and, with ``--leakage``,
:func:`~uniportrait.training.probe.leakage_probe` on held-out world group pictures (their
ground-truth face masks), per group size::

    uniportrait world render --out runs/world/heldout-groups --count 200 --people 2,3 \\
        --identities 50 --held-out --seed 32
    python scripts/world_routing_probe.py runs/world/heldout-groups runs/world/train-stage2/adapter
    python scripts/world_routing_probe.py runs/world/heldout-groups ADAPTER --leakage router,everywhere,masks
    python scripts/world_routing_probe.py runs/world/heldout-groups ADAPTER --base BASE  # not the shipped base

Prints one JSON line per adapter and group size (accuracy, its standard error over batches,
chance), and with ``--leakage`` one per way of placing identities (leakage, its standard error).
"""

from __future__ import annotations

import argparse
import json

import torch

from uniportrait.cli._common import world_base_arg
from uniportrait.training.config import load_config
from uniportrait.training.probe import LEAKAGE_ROUTINGS, PROBE_OVERRIDES, leakage_probe, routing_probe
from uniportrait.training.trainer import Trainer


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "data", help="held-out group dataset (uniportrait world render --held-out --people 2,3)"
    )
    parser.add_argument("adapters", nargs="+", help="adapter or training checkpoint folders")
    parser.add_argument("--count", type=int, default=100, help="pictures per group size (default 100)")
    parser.add_argument(
        "--leakage",
        metavar="ROUTINGS",
        help=f"measure leakage instead, for these comma-separated ways of placing identities "
        f"({', '.join(LEAKAGE_ROUTINGS)})",
    )
    parser.add_argument("--config", default="configs/world/stage2.yaml")
    parser.add_argument(
        "--base",
        type=world_base_arg,
        help="base model folder the adapters were trained on (default: the config's, the shipped one)",
    )
    args = parser.parse_args(argv)
    routings = args.leakage.split(",") if args.leakage is not None else []
    unknown = sorted(set(routings) - set(LEAKAGE_ROUTINGS))
    if unknown:
        parser.error(f"--leakage: {', '.join(unknown)} not among {', '.join(LEAKAGE_ROUTINGS)}")
    torch.set_num_threads(1)
    for adapter in args.adapters:
        for people in (2, 3):
            overrides = [f"data.path={args.data}", f"model.init_adapter={adapter}", "output_dir=outputs/routing-probe",
                         f"data.min_faces={people}", f"data.max_faces={people}"]  # fmt: skip
            if args.base is not None:
                overrides.append(f"model.pretrained_model={args.base}")
            trainer = Trainer(load_config(args.config, overrides + list(PROBE_OVERRIDES), stage=2))
            if args.leakage is None:
                result = routing_probe(trainer, count=args.count, batch=20)
                print(json.dumps({"adapter": adapter, "people": people, **result}), flush=True)
                continue
            for routing in routings:
                result = leakage_probe(trainer, routing=routing, count=args.count, batch=20)
                print(json.dumps({"adapter": adapter, "people": people, **result}), flush=True)


if __name__ == "__main__":
    main()
