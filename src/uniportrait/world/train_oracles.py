"""Training the oracles on ground-truth renders (see :mod:`uniportrait.world.oracles`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from uniportrait.world.data import load_set
from uniportrait.world.loop import run_loop
from uniportrait.world.oracles import (
    FaceDetector,
    FaceOracle,
    PersonOracle,
    SceneOracle,
    detector_targets,
    person_crops,
)
from uniportrait.world.train_base import IdentityBatches, augment_faces, supcon_loss, to_pixels
from uniportrait.world.traits import CONTINUOUS_TRAITS, DISCRETE_TRAITS, PERSON_ATTRIBUTES, SCENE_ATTRIBUTES

logger = logging.getLogger(__name__)


def _jitter_colour(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    b = x.shape[0]
    gain = 1.0 + 0.15 * (torch.rand(b, 1, 1, 1, generator=gen) - 0.5)
    bias = 0.15 * (torch.rand(b, 1, 1, 1, generator=gen) - 0.5)
    noise = 0.03 * torch.randn(x.shape, generator=gen)
    return (x * gain + bias + noise).clamp(-1, 1)


def focal_loss(logits: torch.Tensor, heat: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss on (B, h, w) heatmaps."""
    p = torch.sigmoid(logits).clamp(1e-4, 1 - 1e-4)
    pos = heat.eq(1.0).float()
    pos_loss = -torch.log(p) * (1 - p) ** 2 * pos
    neg_loss = -torch.log(1 - p) * p**2 * (1 - heat) ** 4 * (1 - pos)
    return (pos_loss.sum() + neg_loss.sum()) / pos.sum().clamp(min=1.0)


def train_detector(sets: list[dict], out: Path, steps: int, batch: int = 16, lr: float = 2e-3, seed: int = 0):
    torch.manual_seed(seed)
    model = FaceDetector()
    unit = model.config.size_unit
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)

    def step(i: int) -> dict[str, float]:
        data = sets[i % len(sets)]
        idx = torch.randint(len(data["images"]), (batch,), generator=gen).numpy()
        images = data["images"][idx]
        heat, reg, weight = detector_targets(
            data["boxes"][idx], data["landmarks"][idx], data["num_people"][idx], *images.shape[1:3], unit
        )
        out = model(_jitter_colour(to_pixels(images), gen))
        heat_t, reg_t, w_t = torch.from_numpy(heat), torch.from_numpy(reg), torch.from_numpy(weight)
        l_heat = focal_loss(out[:, 0], heat_t)
        l1 = ((out[:, 1:] - reg_t).abs() * w_t[:, None]).sum() / w_t.sum().clamp(min=1.0) / 14
        loss = l_heat + 5.0 * l1
        loss.backward()
        return {"heat": l_heat.item(), "reg": l1.item()}

    run_loop(out / "run_detector", {"model": model}, opt, step, steps, lr, "oracle: detector")
    return model.eval()


def _trait_targets(traits: np.ndarray):
    """Trait vectors → continuous targets (N, C) and class indices per discrete trait."""
    n_cont = len(CONTINUOUS_TRAITS)
    cont = torch.from_numpy(traits[:, :n_cont])
    classes, start = {}, n_cont
    for name, values in DISCRETE_TRAITS.items():
        classes[name] = torch.from_numpy(traits[:, start : start + len(values)].argmax(1))
        start += len(values)
    return cont, classes


def train_face_oracle(crops: dict, out: Path, steps: int, batch: int = 64, lr: float = 1e-3, seed: int = 1):
    """Identity embedding (supervised contrastive, identities × 4 faces per batch) + trait heads."""
    torch.manual_seed(seed)
    model = FaceOracle()
    labels = np.unique(crops["labels"], return_inverse=True)[1].astype(np.int64)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(seed)
    batches = IdentityBatches(labels, batch // 4, 4, gen)

    def step(i: int) -> dict[str, float]:
        idx = batches()
        out = model(augment_faces(to_pixels(crops["crops"][idx]), gen))
        l_id = supcon_loss(out["embedding"], torch.from_numpy(labels[idx]))
        cont, classes = _trait_targets(crops["traits"][idx])
        l_cont = F.binary_cross_entropy_with_logits(out["cont"], cont)
        l_disc = sum(F.cross_entropy(out[name], classes[name]) for name in DISCRETE_TRAITS) / len(
            DISCRETE_TRAITS
        )
        loss = l_id + 2.0 * l_cont + l_disc
        loss.backward()
        return {"id": l_id.item(), "cont": l_cont.item(), "disc": l_disc.item()}

    run_loop(out / "run_face", {"model": model}, opt, step, steps, lr, "oracle: face", warmup=50)
    return model.eval()


def _person_crops_of(sets: list[dict], rng: np.random.Generator, jitter: float):
    crops, attrs = [], []
    for data in sets:
        pairs = [(i, p) for i in range(len(data["num_people"])) for p in range(int(data["num_people"][i]))]
        pairs = np.array(pairs)
        boxes = data["boxes"][pairs[:, 0], pairs[:, 1]].copy()
        if jitter:
            size = (boxes[:, 3] - boxes[:, 1])[:, None]
            boxes += rng.normal(0.0, jitter, boxes.shape) * size
        crops.append(person_crops(data["images"][pairs[:, 0]], boxes))
        attrs.append(data["person_attrs"][pairs[:, 0], pairs[:, 1]])
    return np.concatenate(crops), np.concatenate(attrs)


def train_person_oracle(
    crops: np.ndarray, attrs: np.ndarray, out: Path, steps: int, batch: int = 128, lr=2e-3, seed=2
):
    torch.manual_seed(seed)
    model = PersonOracle()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    names = list(PERSON_ATTRIBUTES)

    def step(i: int) -> dict[str, float]:
        idx = torch.randint(len(crops), (batch,), generator=gen).numpy()
        out = model(_jitter_colour(to_pixels(crops[idx]), gen))
        y = torch.from_numpy(attrs[idx])
        losses = {n: F.cross_entropy(out[n], y[:, k]) for k, n in enumerate(names)}
        sum(losses.values()).backward()
        return {n: v.item() for n, v in losses.items()}

    run_loop(out / "run_person", {"model": model}, opt, step, steps, lr, "oracle: person")
    return model.eval()


def train_scene_oracle(sets: list[dict], out: Path, steps: int, batch: int = 32, lr=2e-3, seed=3):
    torch.manual_seed(seed)
    model = SceneOracle()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    names = list(SCENE_ATTRIBUTES)

    def step(i: int) -> dict[str, float]:
        data = sets[i % len(sets)]
        idx = torch.randint(len(data["images"]), (batch,), generator=gen).numpy()
        out = model(_jitter_colour(to_pixels(data["images"][idx]), gen))
        y = torch.from_numpy(data["scene_attrs"][idx])
        losses = {n: F.cross_entropy(out[n], y[:, k]) for k, n in enumerate(names)}
        sum(losses.values()).backward()
        return {n: v.item() for n, v in losses.items()}

    run_loop(out / "run_scene", {"model": model}, opt, step, steps, lr, "oracle: scene")
    return model.eval()


def train_face_detector(data_dir: Path, out: Path, steps: int) -> None:
    """The generator side's face detector (the world's MTCNN, for ``WorldFaceAnalyzer``): the
    detector recipe, another seed, written to ``out/face_detector``."""
    singles, groups = load_set(data_dir / "singles_train.npz"), load_set(data_dir / "groups_train.npz")
    for data in (singles, groups):
        data.pop("masks")
    model = train_detector([singles, groups], out, steps, seed=7)
    model.save_pretrained(out / "face_detector")


def train_all(data_dir: Path, folder: Path, plan) -> None:
    """Train the four oracles and write them to ``folder/export/`` (fp16), then ``folder/done``."""
    folder.mkdir(parents=True, exist_ok=True)
    export = folder / "export"
    singles, groups = load_set(data_dir / "singles_train.npz"), load_set(data_dir / "groups_train.npz")
    for key in ("masks",):  # not needed here; frees memory
        singles.pop(key), groups.pop(key)
    models = {}
    if not (export / "detector").is_dir():
        models["detector"] = train_detector([singles, groups], folder, plan.detector_steps)
        models["detector"].half().save_pretrained(export / "detector")
    if not (export / "face").is_dir():
        with np.load(data_dir / "crops_train.npz") as f:
            crops = {k: f[k] for k in f.files}
        models["face"] = train_face_oracle(crops, folder, plan.face_oracle_steps)
        models["face"].half().save_pretrained(export / "face")
        del crops
    if not (export / "person").is_dir():
        p_crops, p_attrs = _person_crops_of([singles, groups], np.random.default_rng(0), jitter=0.04)
        models["person"] = train_person_oracle(p_crops, p_attrs, folder, plan.person_oracle_steps)
        models["person"].half().save_pretrained(export / "person")
    if not (export / "scene").is_dir():
        models["scene"] = train_scene_oracle([singles, groups], folder, plan.scene_oracle_steps)
        models["scene"].half().save_pretrained(export / "scene")
    (folder / "done").write_text(json.dumps({"oracles": sorted(p.name for p in export.iterdir())}))
