"""Training UniPortrait: data preparation and both stages, on 🤗 accelerate.

    uniportrait prepare-data photos/ --out data/        # faces, crops, masks, captions, labels
    accelerate launch -m uniportrait.training --stage 1 --config configs/train_stage1.yaml
    accelerate launch -m uniportrait.training --stage 2 --config configs/train_stage2.yaml

See ``docs/training.md`` for the recipe and the choices made where the paper is silent.
Training needs the ``train`` extra (accelerate, pyyaml, tensorboard); modules are imported on
first use, so ``import uniportrait.training`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "TrainConfig": "uniportrait.training.config",
    "load_config": "uniportrait.training.config",
    "Trainer": "uniportrait.training.trainer",
    "find_checkpoint": "uniportrait.training.trainer",
    "export_published": "uniportrait.training.trainer",
    "PortraitDataset": "uniportrait.training.data",
    "BatchSchedule": "uniportrait.training.data",
    "prepare_dataset": "uniportrait.training.prepare",
    "PrepareOptions": "uniportrait.training.prepare",
    "routing_loss": "uniportrait.training.losses",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'uniportrait.training' has no attribute {name!r}")
