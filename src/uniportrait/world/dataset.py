"""``uniportrait world render``: world pictures written as a ``prepare-data`` dataset folder.

The trainer reads the folder unchanged (``docs/training.md``): ``index.jsonl`` rows with the
caption and one identity label per face (left to right), ``images/<key>.png``, and
``faces/<key>.npz`` with the aligned 224 crops, boxes, landmarks and masks. Faces are aligned on
their ground-truth landmarks, and the masks are the ground-truth head masks. Identity labels are
``world-<number>``, so other renders of the same person (another expression, pose, lighting,
background) serve as its reference photos.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from uniportrait.world.data import _spec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RenderOptions:
    """What ``world render`` draws: ``count`` pictures of ``people`` persons each (cycled)."""

    count: int = 1000
    people: tuple[int, ...] = (1,)
    identities: int = 4000
    held_out: bool = False
    renders_per_identity: int = 6
    seed: int = 0
    framing: str = "wide"  # how large faces are drawn (uniportrait.world.scenes.FRAMINGS)


def identity_label(number: int) -> str:
    return f"world-{number}"


def write_dataset(out: str | Path, options: RenderOptions, progress: bool = True) -> int:
    """Write (or complete) the dataset folder; returns the number of rows it now has."""
    from uniportrait.atomic import write_bytes_atomic
    from uniportrait.faces import align_face
    from uniportrait.training.prepare import (
        FACES_DIR,
        IMAGE_DIR,
        INDEX_FILE,
        PrepareOptions,
        _write_info,
        read_jsonl,
    )

    out = Path(out)
    (out / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    (out / FACES_DIR).mkdir(parents=True, exist_ok=True)
    done = {row["key"] for row in read_jsonl(out / INDEX_FILE)} if (out / INDEX_FILE).is_file() else set()
    people = options.people
    with open(out / INDEX_FILE, "a") as index:
        for k in tqdm(range(options.count), desc="world render", disable=not progress):
            key = f"w{options.seed}-{k:07d}"
            if key in done:
                continue
            args = (options.seed, k, people[k % len(people)], options.identities, options.held_out,
                    options.renders_per_identity, options.framing)  # fmt: skip
            spec, text = _spec(args)
            pic = spec.render()
            image = Image.fromarray(pic.image)
            crops = np.stack([np.asarray(align_face(image, points)) for points in pic.landmarks])
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            write_bytes_atomic(out / IMAGE_DIR / f"{key}.png", buffer.getvalue(), durable=False)
            buffer = io.BytesIO()
            np.savez_compressed(
                buffer,
                crops=crops.astype(np.uint8),
                boxes=pic.boxes.astype(np.float32),
                landmarks=pic.landmarks.astype(np.float32),
                scores=np.ones(len(pic.boxes), np.float32),
                masks=pic.masks,
            )
            write_bytes_atomic(out / FACES_DIR / f"{key}.npz", buffer.getvalue(), durable=False)
            row = {
                "key": key,
                "source": f"world:{options.seed}:{k}",
                "image": f"{IMAGE_DIR}/{key}.png",
                "faces": f"{FACES_DIR}/{key}.npz",
                "caption": text,
                "width": image.width,
                "height": image.height,
                "num_faces": len(spec.people),
                "multi_id": len(spec.people) >= 2,
                "identities": [identity_label(p.identity) for p in spec.people],
                "boxes": [[round(float(v), 1) for v in box] for box in pic.boxes],
                "world": {"requested": spec.requested()},
            }
            index.write(json.dumps(row) + "\n")
            index.flush()
            done.add(key)
    # the options of a world render are recorded beside the prepare-data info
    write_bytes_atomic(out / "world.json", (json.dumps(options.__dict__, indent=2) + "\n").encode())
    _write_info(out, PrepareOptions(analyzer="world ground truth", min_face_size=0), out, len(done), 0)
    return len(done)
