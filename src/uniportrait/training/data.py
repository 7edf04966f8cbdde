"""Reading a prepared dataset for training, and a resumable, deterministic batch order.

Samples are addressed by ``(row, seed)``: the row of ``index.jsonl`` (sorted by key, so the
order does not depend on how ``prepare-data`` finished) and a seed for the sample's own
randomness (which other photo feeds the ID augmentation). The :class:`BatchSchedule` makes both
from the run's seed and the position in the stream alone, so the data seen after a resume is
exactly the data an uninterrupted run would have seen.

Batches only mix samples with the same number of faces (stage II has 2–4 identities per
sample): each epoch, the rows of every face count are shuffled and cut into batches, and the
batches of all counts are shuffled together.
"""

from __future__ import annotations

import io
import json
import logging
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from uniportrait.training.prepare import INDEX_FILE, DatasetError, read_dataset_info, read_jsonl

logger = logging.getLogger(__name__)

Item = tuple[int, int]  # (row index, sample seed)


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (stable across processes and Python runs)."""
    state = np.random.SeedSequence([int(v) % (1 << 64) for v in values]).generate_state(1, np.uint64)[0]
    return int(state) & ((1 << 63) - 1)


def step_seed(seed: int, *keys: int) -> int:
    """The seed of one unit of work (e.g. ``(seed, step, micro_batch, process)``)."""
    return _mix(seed, *keys)


class PortraitDataset(torch.utils.data.Dataset):
    """Samples of a prepared dataset with ``min_faces``–``max_faces`` faces.

    An item is a dict:
        pixels: (3, H, W) float32 in [-1, 1], the training size (``resolution``: R → R×R, or
            (W, H)); resized to cover it and cropped to keep faces whole (:func:`make_item`)
        masks: (N, H, W) bool face masks after the same resize and crop (cleared for cut faces)
        faces_whole: (N,) bool, False for a face the crop cuts (its tokens are dropped)
        crops: (N, 224, 224, 3) uint8 aligned faces (structure branch and, usually, intrinsic)
        id_crops: (N, 224, 224, 3) uint8 faces for the intrinsic branch (another photo of the
            same person with probability ``id_augment``)
        caption: str
        original_size, crop_top_left: (h, w) and (top, left) of the stored image and the crop,
            for SDXL's micro-conditioning
        row: int
    """

    def __init__(
        self,
        root: str | Path,
        resolution: int | tuple[int, int],
        min_faces: int = 1,
        max_faces: int = 1,
        id_augment: float = 0.0,
    ) -> None:
        self.root = Path(root)
        read_dataset_info(self.root)
        keep = ("key", "image", "faces", "caption", "width", "height", "num_faces", "identities")
        rows = sorted(
            ({k: r.get(k) for k in keep} for r in read_jsonl(self.root / INDEX_FILE)), key=lambda r: r["key"]
        )  # only what training reads: the rows live in every process and DataLoader worker
        self.rows = [r for r in rows if min_faces <= r["num_faces"] <= max_faces]
        if not self.rows:
            raise DatasetError(
                f"{self.root} has no image with {min_faces}–{max_faces} faces ({len(rows)} images in total)"
            )
        self.resolution = training_size(resolution)
        self.id_augment = float(id_augment)
        # label -> [(row, face)] over the whole dataset, for the ID augmentation
        self.by_label: dict[str, list[tuple[int, int]]] = defaultdict(list)
        self._all_rows = rows
        for r_index, row in enumerate(rows):
            for f_index, label in enumerate(row.get("identities") or []):
                if label is not None:
                    self.by_label[label].append((r_index, f_index))

    def __len__(self) -> int:
        return len(self.rows)

    def num_faces(self) -> list[int]:
        return [r["num_faces"] for r in self.rows]

    def faces(self, row: dict[str, Any]) -> dict[str, np.ndarray]:
        """The ``.npz`` contents of a row (crops, boxes, landmarks, scores, masks)."""
        path = self.root / row["faces"]
        if not path.is_file():
            raise DatasetError(f"{path} is missing (listed in {self.root / INDEX_FILE})")
        with np.load(path) as npz:
            return {name: npz[name] for name in npz.files}

    def face_crop(self, row: int, face: int) -> np.ndarray:
        """The aligned (224, 224, 3) uint8 crop of face ``face`` of row ``row`` of the whole
        dataset (the indices :attr:`by_label` lists)."""
        return self.faces(self._all_rows[row])["crops"][face]

    def __getitem__(self, item: Item | int) -> dict[str, Any]:
        index, seed = item if isinstance(item, tuple) else (item, 0)
        row = self.rows[index]
        rng = np.random.default_rng(seed)
        faces = self.faces(row)
        crops = torch.from_numpy(faces["crops"])  # (N, 224, 224, 3)
        id_crops = crops.clone()
        labels = row.get("identities") or [None] * len(crops)
        for f_index, label in enumerate(labels):
            if label is None or rng.random() >= self.id_augment:
                continue
            others = [rf for rf in self.by_label[label] if self._all_rows[rf[0]]["key"] != row["key"]]
            if others:
                other_row, other_face = others[int(rng.integers(len(others)))]
                id_crops[f_index] = torch.from_numpy(self.face_crop(other_row, other_face))
        image = Image.open(self.root / row["image"]).convert("RGB")
        return make_item(image, faces["masks"], crops, id_crops, row, self.resolution, index)

    def schedule(self, batch_size: int, seed: int, rank: int = 0, world: int = 1, overfit: bool = False):
        """The :class:`BatchSchedule` of this dataset for one process."""
        return BatchSchedule(self.num_faces(), batch_size, seed, rank, world, overfit)

    def validation_samples(self, count: int) -> list[tuple[str, list[np.ndarray]]]:
        """(caption, [aligned crop (224, 224, 3) uint8 per face]) of the first ``count`` rows."""
        return [
            (row.get("caption") or "", list(self.faces(row)["crops"])) for row in self.rows[: max(count, 0)]
        ]


def training_size(resolution: int | tuple[int, int]) -> tuple[int, int]:
    """``(width, height)`` of training images from an int (square) or a (width, height) pair."""
    if isinstance(resolution, int):
        return resolution, resolution
    width, height = resolution
    return int(width), int(height)


def _crop_offset(extents: list[tuple[float, float]], length: int, window: int) -> int:
    """Where a ``window`` along an axis of ``length`` keeps the most faces (their ``(start, end)``
    extents) whole; ties go to the offset nearest the centre."""
    centre = (length - window) // 2
    if length <= window or not extents:
        return max(0, centre)
    candidates = {centre}
    for start, end in extents:
        candidates.update((int(np.floor(start)), int(np.ceil(end)) - window))
    candidates = {min(max(0, c), length - window) for c in candidates}

    def score(offset: int) -> tuple[int, int]:
        whole = sum(offset <= start and end <= offset + window for start, end in extents)
        return whole, -abs(offset - centre)

    return max(sorted(candidates), key=score)


def make_item(
    image: Image.Image,
    masks: np.ndarray,
    crops: torch.Tensor,
    id_crops: torch.Tensor,
    row: dict[str, Any],
    resolution: int | tuple[int, int],
    index: int,
) -> dict[str, Any]:
    """A training item (see :class:`PortraitDataset`) from a stored image, its face masks
    (N, H, W) bool and crops (N, 224, 224, 3) uint8.

    The image is resized to cover the training size (``resolution``: an int, square, or
    ``(width, height)``) and cropped where the crop keeps the most faces whole (the centre when
    all fit). A face the crop still cuts is marked ``faces_whole[n] = False`` and its mask is
    cleared, so the trainer drops its identity tokens: no tokens of a face the image lacks.
    """
    width, height = training_size(resolution)
    scale = max(width / image.width, height / image.height)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    mask = torch.from_numpy(masks).float()[:, None]  # (N, 1, H, W)
    mask = torch.nn.functional.interpolate(mask, size=(size[1], size[0]), mode="nearest")[:, 0] > 0.5
    spans = []  # per face: ((x0, x1), (y0, y1)) in resized pixels
    for m in mask:
        ys, xs = torch.nonzero(m, as_tuple=True)
        if len(xs):
            spans.append(((xs.min().item(), xs.max().item() + 1), (ys.min().item(), ys.max().item() + 1)))
    left = _crop_offset([s[0] for s in spans], size[0], width)
    top = _crop_offset([s[1] for s in spans], size[1], height)
    image = image.resize(size, Image.Resampling.BICUBIC).crop((left, top, left + width, top + height))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
    cropped = mask[:, top : top + height, left : left + width]  # (N, H', W')
    whole = cropped.flatten(1).sum(1) == mask.flatten(1).sum(1)  # (N,)
    cropped = cropped & whole[:, None, None]
    return {
        "pixels": pixels,
        "masks": cropped,
        "faces_whole": whole,
        "crops": crops,
        "id_crops": id_crops,
        "caption": row["caption"] or "",
        "original_size": (row["height"], row["width"]),
        "crop_top_left": (round(top / scale), round(left / scale)),
        "row": index,
    }


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack items with the same number of faces: tensors gain a batch axis, the rest are lists."""
    counts = {len(it["crops"]) for it in items}
    if len(counts) != 1:
        raise ValueError(f"a batch must have one number of faces per sample, got {sorted(counts)}")
    out: dict[str, Any] = {}
    for key in items[0]:
        values = [it[key] for it in items]
        out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out


class BatchSchedule:
    """The deterministic, endless stream of micro-batches for one process.

    Every process computes the same per-epoch plan (a list of batches of rows); process ``rank``
    of ``world`` takes batches ``rank, rank + world, ...``. The ``k``-th micro-batch of a process
    depends only on ``(seed, k, rank, world)``, so resuming is starting the stream at ``k``.

    Args:
        num_faces: face count of each dataset row (batches never mix counts).
        batch_size: samples per micro-batch.
        seed: the run's seed.
        rank, world: this process and the number of processes.
        overfit: always yield the first batch with the same sample seeds (debugging).
    """

    def __init__(
        self,
        num_faces: list[int],
        batch_size: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        overfit: bool = False,
    ) -> None:
        self.batch_size, self.seed, self.rank, self.world, self.overfit = (
            batch_size,
            seed,
            rank,
            world,
            overfit,
        )
        buckets: dict[int, list[int]] = defaultdict(list)
        for row, n in enumerate(num_faces):
            buckets[n].append(row)
        self.buckets = dict(sorted(buckets.items()))
        usable = sum(len(rows) // batch_size for rows in self.buckets.values())
        if usable < world:
            sizes = ", ".join(f"{len(r)} with {n} face(s)" for n, r in self.buckets.items())
            raise DatasetError(
                f"too few samples for batch size {batch_size} on {world} process(es): {sizes}; "
                f"each face count needs whole batches and every process needs at least one"
            )
        self.batches_per_epoch = usable - usable % world
        self._plan_epoch: int | None = None
        self._plan: list[list[int]] = []

    def _epoch_plan(self, epoch: int) -> list[list[int]]:
        if self._plan_epoch != epoch:
            rng = np.random.default_rng(_mix(self.seed, epoch, 0x5EED))
            batches = []
            for rows in self.buckets.values():
                order = rng.permutation(rows)
                whole = len(order) - len(order) % self.batch_size
                batches += [order[i : i + self.batch_size].tolist() for i in range(0, whole, self.batch_size)]
            perm = rng.permutation(len(batches))
            self._plan = [batches[i] for i in perm[: self.batches_per_epoch]]
            self._plan_epoch = epoch
        return self._plan

    def batch(self, k: int) -> list[Item]:
        """This process's ``k``-th micro-batch: [(row, sample seed), ...]."""
        if self.overfit:
            k_global = self.rank
            return [
                (row, _mix(self.seed, 0, k_global, i)) for i, row in enumerate(self._epoch_plan(0)[k_global])
            ]
        g = k * self.world + self.rank
        epoch, j = divmod(g, self.batches_per_epoch)
        rows = self._epoch_plan(epoch)[j]
        return [(row, _mix(self.seed, epoch, j, i)) for i, row in enumerate(rows)]

    def epoch_of(self, k: int) -> int:
        return (k * self.world + self.rank) // self.batches_per_epoch

    def stream(self, start: int = 0) -> Iterator[list[Item]]:
        """Micro-batches ``start, start + 1, ...`` (endless)."""
        k = start
        while True:
            yield self.batch(k)
            k += 1


class _Stream(torch.utils.data.Sampler):
    """A batch sampler over :meth:`BatchSchedule.stream` (DataLoader wants a Sampler)."""

    def __init__(self, schedule: BatchSchedule, start: int) -> None:
        self.schedule, self.start = schedule, start

    def __iter__(self) -> Iterator[list[Item]]:
        return self.schedule.stream(self.start)


def make_loader(
    dataset: PortraitDataset, schedule: BatchSchedule, start: int, num_workers: int
) -> torch.utils.data.DataLoader:
    """An endless DataLoader yielding this process's micro-batches from number ``start`` on."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=_Stream(schedule, start),
        num_workers=num_workers,
        collate_fn=collate,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
    )


class DataPosition:
    """How many micro-batches each process of this run has consumed; saved with the training state.

    A checkpoint written by ``N`` processes resumes on ``M``: the ``N × micro_batches`` batches
    consumed so far are the start of the global stream, so each of the ``M`` processes goes on
    from ``ceil(N × micro_batches / M)`` (with the folder format's :class:`BatchSchedule` that
    continues the same stream, skipping fewer than ``M`` batches when ``M`` does not divide it).
    """

    def __init__(self, world: int = 1) -> None:
        self.micro_batches = 0
        self.world = world

    def state_dict(self) -> dict[str, int]:
        return {"micro_batches": self.micro_batches, "world": self.world}

    def load_state_dict(self, state: dict[str, int]) -> None:
        saved_world = int(state.get("world", self.world))
        consumed = int(state["micro_batches"]) * saved_world  # batches of the global stream
        self.micro_batches = -(-consumed // self.world)
        if saved_world != self.world:
            logger.warning(
                "resuming a %d-process checkpoint on %d processes: the global batch changes by %d/%d "
                "(keep batch_size × gradient_accumulation_steps × processes to keep the recipe); "
                "the data stream goes on at batch %d of %d consumed",
                saved_world,
                self.world,
                self.world,
                saved_world,
                self.micro_batches * self.world,
                consumed,
            )


# -- WebDataset shards --------------------------------------------------------------------------


class ShardedPortraitDataset(torch.utils.data.Dataset):
    """The samples of a WebDataset shard folder (``uniportrait data pack``), read shard by shard.

    Items are addressed by ``(record, seed)``, where a record (from :class:`ShardSchedule`)
    names a sample's shard and the offsets of its members: the schedule reads the tar headers
    and the small ``.json`` members in order, and the DataLoader workers read and decode the
    image and faces of the samples they are given. Items are the same dicts as
    :class:`PortraitDataset`'s (``row`` is -1). The ID augmentation picks among the
    ``.alt.npz`` crops that ``pack`` stored with the sample.
    """

    def __init__(
        self,
        root: str | Path,
        resolution: int | tuple[int, int],
        min_faces: int = 1,
        max_faces: int = 1,
        id_augment: float = 0.0,
    ) -> None:
        from uniportrait.training.shards import read_webdataset_info

        self.root = Path(root)
        self.info = read_webdataset_info(self.root)
        self.face_range = (min_faces, max_faces)
        self.shards = [
            s for s in self.info["shards"] if any(min_faces <= int(n) <= max_faces for n in s["faces"])
        ]
        self.count = sum(
            c for s in self.shards for n, c in s["faces"].items() if min_faces <= int(n) <= max_faces
        )
        if not self.count:
            raise DatasetError(
                f"{self.root} has no sample with {min_faces}–{max_faces} faces ({self.info['images']} in total)"
            )
        self.resolution = training_size(resolution)
        self.id_augment = float(id_augment)

    def __len__(self) -> int:
        return self.count

    def records(self, shard: str) -> list[dict[str, Any]]:
        """The samples of one shard with this dataset's face counts, in file order."""
        from uniportrait.training.shards import image_member, read_member, tar_members

        path = self.root / shard
        out = []
        with path.open("rb") as f:
            for key, members in tar_members(path).items():
                if not {"json", "npz"} <= set(members) or image_member(members) is None:
                    raise DatasetError(f"{path}: sample {key} lacks a .json, .npz or image member")
                meta = json.loads(read_member(f, members["json"]))
                lo, hi = self.face_range
                if lo <= meta["num_faces"] <= hi:
                    out.append({"shard": str(path), "meta": meta, "members": members})
        return out

    def _read(self, record: dict[str, Any]) -> tuple[Image.Image, dict[str, np.ndarray], dict | None]:
        from uniportrait.training.shards import image_member, read_member

        members = record["members"]
        with open(record["shard"], "rb") as f:
            image = Image.open(io.BytesIO(read_member(f, members[image_member(members)]))).convert("RGB")
            with np.load(io.BytesIO(read_member(f, members["npz"]))) as npz:
                faces = {name: npz[name] for name in npz.files}
            alt = None
            if "alt.npz" in members:
                with np.load(io.BytesIO(read_member(f, members["alt.npz"]))) as npz:
                    alt = {name: npz[name] for name in npz.files}
        return image, faces, alt

    def __getitem__(self, item: tuple[dict[str, Any], int]) -> dict[str, Any]:
        record, seed = item
        rng = np.random.default_rng(seed)
        image, faces, alt = self._read(record)
        crops = torch.from_numpy(faces["crops"])  # (N, 224, 224, 3)
        id_crops = crops.clone()
        labels = record["meta"].get("identities") or [None] * len(crops)
        for f_index, label in enumerate(labels):
            if label is None or rng.random() >= self.id_augment or alt is None:
                continue
            choices = np.flatnonzero(alt["face"] == f_index)
            if len(choices):
                id_crops[f_index] = torch.from_numpy(alt["crops"][choices[int(rng.integers(len(choices)))]])
        return make_item(image, faces["masks"], crops, id_crops, record["meta"], self.resolution, -1)

    def schedule(self, batch_size: int, seed: int, rank: int = 0, world: int = 1, overfit: bool = False):
        return ShardSchedule(self, batch_size, seed, rank, world, overfit)

    def validation_samples(self, count: int) -> list[tuple[str, list[np.ndarray]]]:
        out: list[tuple[str, list[np.ndarray]]] = []
        for shard in self.shards:
            for record in self.records(shard["file"]):
                if len(out) >= count:
                    return out
                _, faces, _ = self._read(record)
                out.append((record["meta"].get("caption") or "", list(faces["crops"])))
        return out


class ShardSchedule:
    """The deterministic, endless stream of micro-batches of one process over tar shards.

    Epoch ``e``: the shards are shuffled with ``(seed, e)``, cut to a multiple of ``world``, and
    process ``rank`` takes every ``world``-th one; it reads them in that order, shuffles each
    shard's samples with ``(seed, e, rank, shard)``, and fills one bucket per face count,
    yielding a micro-batch whenever a bucket is full (partial buckets are dropped at the end
    of the epoch). The ``k``-th micro-batch depends only on ``(seed, k, rank, world)`` and the
    shards, so resuming replays the headers up to ``k`` without decoding any image.
    """

    def __init__(
        self,
        dataset: ShardedPortraitDataset,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        overfit: bool = False,
    ) -> None:
        if len(dataset.shards) < world:
            raise DatasetError(
                f"{dataset.root}: {len(dataset.shards)} shard(s) with these face counts for {world} "
                "processes; every process reads its own shards: pack with a smaller --samples-per-shard"
            )
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world, self.overfit = rank, world, overfit
        self._epoch_starts: list[int] = [0]

    def _shards(self, epoch: int) -> list[str]:
        rng = np.random.default_rng(_mix(self.seed, epoch, 0x5EED))
        order = rng.permutation(len(self.dataset.shards))
        usable = len(order) - len(order) % self.world
        return [self.dataset.shards[i]["file"] for i in order[:usable]][self.rank :: self.world]

    def _epoch(self, epoch: int) -> Iterator[list[dict[str, Any]]]:
        buckets: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for s_index, shard in enumerate(self._shards(epoch)):
            records = self.dataset.records(shard)
            rng = np.random.default_rng(_mix(self.seed, epoch, self.rank, s_index))
            for i in rng.permutation(len(records)):
                record = records[int(i)]
                bucket = buckets[record["meta"]["num_faces"]]
                bucket.append(record)
                if len(bucket) == self.batch_size:
                    yield list(bucket)
                    bucket.clear()

    def stream(self, start: int = 0) -> Iterator[list[tuple[dict[str, Any], int]]]:
        """Micro-batches ``start, start + 1, ...`` (endless)."""
        k, epoch = 0, 0
        while True:
            produced = 0
            for records in self._epoch(epoch):
                if self.overfit:
                    batch = [(r, _mix(self.seed, 0, 0, self.rank, i)) for i, r in enumerate(records)]
                    while True:
                        if k >= start:
                            yield batch
                        k += 1
                if k >= start:
                    yield [(r, _mix(self.seed, epoch, k, self.rank, i)) for i, r in enumerate(records)]
                k += 1
                produced += 1
            if not produced:
                raise DatasetError(
                    f"process {self.rank} got no whole batch of {self.batch_size} from its shards in "
                    f"epoch {epoch}: use a smaller batch or fewer processes"
                )
            epoch += 1
            if len(self._epoch_starts) == epoch:
                self._epoch_starts.append(k)

    def epoch_of(self, k: int) -> int:
        """The epoch of micro-batch ``k`` (as far as the stream has been read)."""
        import bisect

        return bisect.bisect_right(self._epoch_starts, k) - 1


def open_portrait_dataset(
    root: str | Path,
    resolution: int | tuple[int, int],
    min_faces: int,
    max_faces: int,
    id_augment: float = 0.0,
) -> PortraitDataset | ShardedPortraitDataset:
    """A dataset folder (``prepare-data``) or a WebDataset shard folder (``data pack``)."""
    from uniportrait.training.shards import is_webdataset

    cls = ShardedPortraitDataset if is_webdataset(root) else PortraitDataset
    return cls(root, resolution, min_faces, max_faces, id_augment=id_augment)
