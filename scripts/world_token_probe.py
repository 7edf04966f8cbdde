"""Do an adapter's identity tokens tell held-out people apart? :func:`uniportrait.training.warmup.token_identification`::

    python scripts/world_token_probe.py runs/world/train-stage1/adapter runs/world/heldout-singles

For ``--people`` held-out people with two photos each (default 48), the share whose tokens from
one photo are nearest to their tokens from the other (chance 1/48), with the structure branch off
and on; and the same for the raw intrinsic features (the Q-Former's input). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json

import torch

from uniportrait.presets.pipelines import build_world_pipeline
from uniportrait.training.data import PortraitDataset
from uniportrait.training.warmup import token_identification


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("adapter", help="adapter or training checkpoint folder")
    parser.add_argument("data", help="held-out dataset (uniportrait world render --held-out)")
    parser.add_argument("--people", type=int, default=48)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipe = build_world_pipeline(args.adapter)
    qformer, backbone, image_encoder = pipe.adapter.qformer, pipe.face_backbone, pipe.image_encoder
    held = PortraitDataset(args.data, 64)
    result = {
        f"structure_{s}": token_identification(qformer, backbone, image_encoder, held, args.people, s)
        for s in (0.0, 1.0)
    }
    print(json.dumps({"adapter": args.adapter, "people": args.people, **result}))


if __name__ == "__main__":
    main()
