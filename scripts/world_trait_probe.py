"""Where does a person's trait get lost on the way from photo to identity tokens?

    python scripts/world_trait_probe.py --people 3000 --out runs/world/trait-probe.json
    python scripts/world_trait_probe.py --people 3000 --clean   # photos only: no hat, sunglasses, sketch

For ``--people`` held-out people, one world photo each (a random scene, or with ``--clean`` a
plain photo without hat or sunglasses), aligned on its ground-truth landmarks as the pipeline
aligns a reference. A linear read-out (ridge regression, its strength chosen on a validation
split of the training people) is fitted on 80% of the people and scored on the other 20%, per
trait, from each stage of the identity path:

- ``pixels``: the aligned crop itself, 32×32 (what the encoders are shown),
- ``intrinsic``: the face backbone's last stage (the Q-Former's intrinsic input),
- ``structure_backbone`` / ``structure_clip``: the structure branch's shallow backbone features
  and CLIP patch features, pooled to a 4×4 grid,
- ``tokens``: the adapter's 16 identity tokens (structure branch on and off).

Discrete traits score the share of test people whose class the read-out picks; continuous ones
the share read within half of :data:`~uniportrait.world.identity_report.TRAIT_GAP` (what the
identity report's trait agreement counts). ``chance`` is the majority class / the training mean.
Prints one JSON line per stage and writes them all to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from uniportrait.world.identity_report import TRAIT_GAP, _split_traits
from uniportrait.world.traits import CONTINUOUS_TRAITS, DISCRETE_TRAITS, Traits

logger = logging.getLogger(__name__)
RIDGE = (1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)  # relative to the kernel's mean diagonal


def render_crops(people: int, clean: bool, seed: int) -> tuple[np.ndarray, list[dict]]:
    """(N, 224, 224, 3) uint8 aligned crops of ``people`` held-out people, and their traits."""
    from uniportrait.faces.align import ALIGNED_SIZE
    from uniportrait.world.faces import aligned_crops
    from uniportrait.world.scenes import identity_number, sample_spec

    rng = np.random.default_rng(seed)
    pins = {"look": {"hat": 0, "sunglasses": 0}, "scene": {"style": 0}} if clean else {}
    crops, traits = [], []
    for k in tqdm(range(people), desc="render", leave=False):
        ident = identity_number(k, held_out=True)
        r = sample_spec(rng, [ident], seed=int(rng.integers(1 << 31)), **pins).render()
        crops.append(aligned_crops(r.image[None], r.landmarks[:1], size=ALIGNED_SIZE)[0])
        traits.append(_split_traits(Traits.of(ident).vector()))
    return np.stack(crops), traits


@torch.no_grad()
def stage_features(pipe, crops: np.ndarray, batch: int = 64) -> dict[str, torch.Tensor]:
    """Per stage of the identity path, (N, D) float32 features of the crops."""
    from uniportrait.identity import encode_face_features, module_device_dtype

    qformer = pipe.adapter.qformer
    device, dtype = module_device_dtype(qformer)
    out: dict[str, list[torch.Tensor]] = {}
    for at in tqdm(range(0, len(crops), batch), desc="encode", leave=False):
        x = torch.from_numpy(crops[at : at + batch]).permute(0, 3, 1, 2).float() / 255.0
        intrinsic, structure = encode_face_features(
            pipe.face_backbone, pipe.image_encoder, x, qformer.sizes.intrinsic
        )
        n, cells, _ = structure.shape
        side = int(round(cells**0.5))
        grid = structure.transpose(1, 2).reshape(n, -1, side, side)
        pooled = F.adaptive_avg_pool2d(grid, 4).flatten(2)  # (n, C_st, 16)
        split = structure.shape[-1] - pipe.image_encoder.config.hidden_size
        parts = {
            "pixels": F.interpolate(x, size=32, mode="area").flatten(1),
            "intrinsic": intrinsic.flatten(1),
            "structure_backbone": pooled[:, :split].flatten(1),
            "structure_clip": pooled[:, split:].flatten(1),
        }
        for name, scale in (("tokens", 1.0), ("tokens_structure_off", 0.0)):
            tokens = qformer(intrinsic.to(device, dtype), structure.to(device, dtype), structure_scale=scale)
            parts[name] = tokens.float().flatten(1).cpu()
        for name, value in parts.items():
            out.setdefault(name, []).append(value.float())
    return {name: torch.cat(values) for name, values in out.items()}


def ridge_predict(kernel: torch.Tensor, fit: torch.Tensor, at: torch.Tensor, y: torch.Tensor, lam: float):
    """Kernel ridge regression with a linear kernel (``kernel`` = x xᵀ over all samples): fitted
    on the ``fit`` rows' ``y`` (centred here), predictions for the ``at`` rows."""
    k = kernel[fit][:, fit]
    y_mean = y[fit].mean(0)
    reg = lam * k.diagonal().mean()
    alpha = torch.linalg.solve(k + reg * torch.eye(len(k), dtype=k.dtype), y[fit] - y_mean)
    return kernel[at][:, fit] @ alpha + y_mean


def score(pred: torch.Tensor, truth: torch.Tensor, discrete: bool) -> float:
    if discrete:
        return float((pred.argmax(1) == truth).float().mean())
    return float(((pred[:, 0] - truth).abs() < TRAIT_GAP / 2).float().mean())


def probe(x: torch.Tensor, traits: list[dict], test: torch.Tensor, val: torch.Tensor) -> dict[str, float]:
    """Per trait, the test score of the read-out whose ridge strength did best on ``val``."""
    x = x.double()
    fit, train = ~test & ~val, ~test
    x = (x - x[train].mean(0)) / (x[train].std(0) + 1e-6)
    kernel = x @ x.T  # (N, N)
    result = {}
    for name in (*DISCRETE_TRAITS, *CONTINUOUS_TRAITS):
        discrete = name in DISCRETE_TRAITS
        values = torch.tensor([t[name] for t in traits])
        if discrete:
            y = F.one_hot(values, len(DISCRETE_TRAITS[name])).double()
        else:
            y = values.double()[:, None]
        best = max(
            RIDGE, key=lambda lam: score(ridge_predict(kernel, fit, val, y, lam), values[val], discrete)
        )
        result[name] = round(score(ridge_predict(kernel, train, test, y, best), values[test], discrete), 3)
    return result


def chance(traits: list[dict], test: torch.Tensor) -> dict[str, float]:
    result = {}
    for name in (*DISCRETE_TRAITS, *CONTINUOUS_TRAITS):
        train = [t[name] for t, m in zip(traits, test) if not m]
        held = [t[name] for t, m in zip(traits, test) if m]
        if name in DISCRETE_TRAITS:
            guess = max(set(train), key=train.count)
            result[name] = round(float(np.mean([v == guess for v in held])), 3)
        else:
            result[name] = round(float(np.mean(np.abs(np.array(held) - np.mean(train)) < TRAIT_GAP / 2)), 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", default=None, help="adapter folder (default: the shipped one)")
    parser.add_argument("--people", type=int, default=3000)
    parser.add_argument("--clean", action="store_true", help="plain photos: no hat, sunglasses or filter")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the rows here as JSON")
    args = parser.parse_args()
    if args.people < 50:
        parser.error(f"--people must be at least 50 (a 20% test split of people), got {args.people}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(2)

    from uniportrait.errors import UniPortraitError
    from uniportrait.presets.pipelines import build_world_pipeline

    try:
        pipe = build_world_pipeline(args.adapter) if args.adapter else build_world_pipeline()
    except UniPortraitError as error:
        parser.exit(2, f"world_trait_probe.py: error: {error}\n")
    crops, traits = render_crops(args.people, args.clean, args.seed)
    features = stage_features(pipe, crops)
    order = np.random.default_rng(args.seed + 1).permutation(args.people)
    test = torch.zeros(args.people, dtype=torch.bool)
    val = torch.zeros(args.people, dtype=torch.bool)
    test[order[: args.people // 5]] = True
    val[order[args.people // 5 : args.people // 5 + args.people // 10]] = True
    rows = [{"stage": "chance", **chance(traits, test)}]
    print(json.dumps(rows[0]), flush=True)
    for name, x in features.items():
        rows.append({"stage": name, "dims": x.shape[1], **probe(x, traits, test, val)})
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        from uniportrait.atomic import write_text_atomic

        write_text_atomic(
            args.out, json.dumps({"clean": args.clean, "people": args.people, "rows": rows}, indent=1)
        )


if __name__ == "__main__":
    main()
