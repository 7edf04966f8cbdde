"""A small resumable training loop for the world's models (not UniPortrait's trainer).

Each run has a folder with ``state.pt`` (model + optimizer + step, tensors only: it is read back
with ``weights_only=True``), ``metrics.jsonl`` (one row per logging interval) and, when done,
the exported model folder. A row holds, per metric, its mean over the interval's steps that
reported it (a step may report only some, e.g. a portrait or a group loss). Killing a run and
starting it again continues from the last save.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from uniportrait.atomic import atomic_path

logger = logging.getLogger(__name__)


def cosine_lr(step: int, total: int, base: float, warmup: int = 200) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def run_loop(
    folder: str | Path,
    modules: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer,
    step_fn: Callable[[int], dict[str, float]],
    steps: int,
    lr: float,
    desc: str,
    warmup: int = 200,
    log_every: int = 50,
    save_every_s: float = 120.0,
    after_step: Callable[[], None] | None = None,
) -> None:
    """Run ``step_fn(step)`` (forward, backward; returns metrics) ``steps`` times, resumably."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state_path, metrics_path = folder / "state.pt", folder / "metrics.jsonl"
    start = 0
    if state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        for name, module in modules.items():
            module.load_state_dict(state["modules"][name])
        optimizer.load_state_dict(state["optimizer"])
        start = int(state["step"])
        logger.info("%s: resuming at step %d", desc, start)
        if metrics_path.is_file():  # drop rows logged after the last save (they are redone)
            rows = [r for r in metrics_path.read_text().splitlines() if r and json.loads(r)["step"] <= start]
            metrics_path.write_text("".join(r + "\n" for r in rows))
    if start >= steps:
        return

    def save(step: int) -> None:
        state = {
            "modules": {name: m.state_dict() for name, m in modules.items()},
            "optimizer": optimizer.state_dict(),
            "step": step,
        }
        with atomic_path(state_path) as tmp:
            torch.save(state, tmp)

    for module in modules.values():
        module.train()
    last_save, sums, counts = time.time(), {}, {}  # per key: a step may report only some keys
    shown = logger.isEnabledFor(logging.INFO)  # not under `uniportrait -q`
    bar = tqdm(
        range(start, steps),
        desc=desc,
        initial=start,
        total=steps,
        leave=False,
        mininterval=5,
        disable=not shown,
    )
    with open(metrics_path, "a") as log:
        for step in bar:
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(step, steps, group.get("base_lr", lr), warmup)
            metrics = step_fn(step)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if after_step is not None:
                after_step()
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + float(value)
                counts[key] = counts.get(key, 0) + 1
            if (step + 1) % log_every == 0 or step + 1 == steps:
                means = {k: v / counts[k] for k, v in sums.items()}
                row = {"step": step + 1, "time": round(time.time(), 1), **means}
                log.write(json.dumps(row) + "\n")
                log.flush()
                bar.set_postfix({k: f"{v:.4f}" for k, v in means.items()})
                sums, counts = {}, {}
            if time.time() - last_save > save_every_s or step + 1 == steps:
                save(step + 1)
                last_save = time.time()
    for module in modules.values():
        module.eval()
