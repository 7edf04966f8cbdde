"""Data at scale: disjoint parts of a source, merging them, and WebDataset tar shards.

Three pieces, each usable on its own:

- **Parts.** ``prepare-data SRC --out DATA --shard i/n`` processes part ``i`` of ``n`` of the
  source into ``DATA/parts/<i>-of-<n>/`` (an ordinary, resumable dataset folder). Images go to
  parts by a hash of their key, so every worker or node computes the same split without talking
  to the others, and a part never changes when another one is re-run.
  ``uniportrait data merge DATA`` then writes ``DATA/index.jsonl`` listing the rows of all parts
  (paths point into ``parts/``): no image is copied, so merging 500k images takes seconds.
- **Tar sources.** A ``.tar`` file or a folder of them, as ``img2dataset`` writes them: the
  members of one sample share a key (``000123.jpg``, ``000123.txt``, ``000123.json``); the
  caption is the ``.txt`` (else the ``caption`` of the ``.json``), and the ``.json`` may carry
  ``identity`` / ``identities`` labels like a manifest row.
- **WebDataset shards.** ``uniportrait data pack DATA --out SHARDS`` writes the samples of a
  dataset folder, in a seeded random order, into ``SHARDS/shard-<k>.tar`` (plain POSIX tars,
  readable by the ``webdataset`` library) with a ``dataset.json`` that lists the shards and their
  sample counts per number of faces. One sample is ``<key>.jpg`` (the stored image; ``.png``
  for a dataset stored as PNG),
  ``<key>.npz`` (the faces file, as in the folder format), ``<key>.json`` (its index row) and,
  for a single-face sample with a labelled face, ``<key>.alt.npz``: up to ``alternatives``
  aligned crops of *other* photos of the same person (``crops`` (M, 224, 224, 3) uint8, ``face`` (M,) int: which face
  each one replaces), so that the stage-I ID augmentation needs no random access to other samples.
  The trainer reads such a folder directly (``data.path=SHARDS``).

This module does not import torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import re
import tarfile
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from uniportrait.atomic import atomic_path, write_bytes_atomic
from uniportrait.training.prepare import (
    DATASET_FORMAT,
    DATASET_VERSION,
    IMAGE_SUFFIXES,
    INDEX_FILE,
    INFO_FILE,
    SKIPPED_FILE,
    DatasetError,
    SourceItem,
    _split_labels,
    _write_jsonl,
    read_dataset_info,
    read_jsonl,
    sample_key,
)

logger = logging.getLogger(__name__)

PARTS_DIR = "parts"
WEBDATASET_FORMAT = "uniportrait-webdataset"
WEBDATASET_VERSION = 1
SHARD_PATTERN = "shard-{:06d}.tar"
_PART_NAME = re.compile(r"(\d+)-of-(\d+)")


# -- parts --------------------------------------------------------------------------------------


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` → ``(i, n)`` with ``0 <= i < n``."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not match:
        raise DatasetError(f"--shard expects I/N (e.g. 0/4), got {text!r}")
    i, n = int(match[1]), int(match[2])
    if n < 1 or not 0 <= i < n:
        raise DatasetError(f"--shard {text}: need 0 <= I < N")
    return i, n


def in_shard(key: str, index: int, count: int) -> bool:
    """Whether the sample ``key`` belongs to part ``index`` of ``count`` (a stable hash split)."""
    digest = hashlib.sha1(key.encode()).digest()
    return int.from_bytes(digest[:8], "big") % count == index


def part_folder(root: str | Path, index: int, count: int) -> Path:
    """Where part ``index`` of ``count`` of the dataset ``root`` is written."""
    return Path(root) / PARTS_DIR / f"{index:05d}-of-{count:05d}"


def merge_parts(root: str | Path) -> dict[str, Any]:
    """Write ``root/index.jsonl``, ``skipped.jsonl`` and ``dataset.json`` from ``root/parts/*``.

    Checks that the parts form one complete split (``0..n-1`` of the same ``n``) with no key in
    two parts. Returns ``{"parts", "images", "skipped", "incomplete": [part names]}``.

    Raises:
        DatasetError: no parts, parts of different splits or missing parts, a duplicated key,
            or ``root`` holding a dataset that was not made by merging.
    """
    root = Path(root)
    folder = root / PARTS_DIR
    parts = sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    if not parts:
        raise DatasetError(
            f"{root} has no {PARTS_DIR}/ to merge; write them with "
            f"`uniportrait prepare-data SRC --out {root} --shard I/N`"
        )
    splits: dict[int, set[int]] = defaultdict(set)
    for part in parts:
        match = _PART_NAME.fullmatch(part.name)
        if not match:
            raise DatasetError(f"{part}: not a part folder (expected <i>-of-<n>)")
        splits[int(match[2])].add(int(match[1]))
    if len(splits) != 1:
        raise DatasetError(f"{folder} mixes parts of different splits (of {sorted(splits)}); keep one")
    ((count, present),) = splits.items()
    missing = sorted(set(range(count)) - present)
    if missing:
        listed = ", ".join(f"{i}/{count}" for i in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise DatasetError(f"{root}: {len(missing)} of {count} parts missing ({listed}); run them first")
    info_path = root / INFO_FILE
    if info_path.is_file() and not json.loads(info_path.read_text()).get("merged"):
        raise DatasetError(
            f"{root} already holds a dataset written without --shard; write the parts to a new folder"
        )

    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    options, source, incomplete = None, None, []
    seen: set[str] = set()
    for part in parts:
        info = read_dataset_info(part)
        if options is None:
            options, source = info.get("options"), info.get("source")
        elif info.get("options") != options:
            logger.warning("%s was prepared with other options than %s", part, parts[0])
        if not info.get("complete", False):
            incomplete.append(part.name)
        prefix = f"{PARTS_DIR}/{part.name}/"
        for row in read_jsonl(part / INDEX_FILE):
            if row["key"] in seen:
                raise DatasetError(f"{part}: sample {row['key']} is also in another part")
            seen.add(row["key"])
            rows.append({**row, "image": prefix + row["image"], "faces": prefix + row["faces"]})
        skipped += read_jsonl(part / SKIPPED_FILE)
    if incomplete:
        logger.warning("parts not finished (merged as they are; re-run them and merge again): %s", incomplete)
    rows.sort(key=lambda r: r["key"])
    _write_jsonl(root / INDEX_FILE, rows)
    _write_jsonl(root / SKIPPED_FILE, skipped)
    info = {
        "format": DATASET_FORMAT,
        "version": DATASET_VERSION,
        "source": source,
        "options": options,
        "images": len(rows),
        "skipped": len(skipped),
        "merged": {"parts": count},
    }
    write_bytes_atomic(info_path, (json.dumps(info, indent=2) + "\n").encode())
    return {"parts": count, "images": len(rows), "skipped": len(skipped), "incomplete": incomplete}


# -- tar files ----------------------------------------------------------------------------------


def split_member(name: str) -> tuple[str, str]:
    """WebDataset's naming: ``dir/000123.alt.npz`` → (``dir/000123``, ``alt.npz``)."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), (ext if dot else "")


def tar_members(path: str | Path) -> dict[str, dict[str, tuple[int, int]]]:
    """key → {extension: (data offset, size)} of the regular files of a tar, in file order."""
    samples: dict[str, dict[str, tuple[int, int]]] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if member.isfile():
                    key, ext = split_member(member.name)
                    samples.setdefault(key, {})[ext.lower()] = (member.offset_data, member.size)
    except (tarfile.TarError, OSError) as exc:
        raise DatasetError(f"{path} is not a readable tar file: {exc}") from None
    return samples


def image_member(members: dict[str, tuple[int, int]]) -> str | None:
    """The extension of a sample's image member (``jpg``, ``png``, ...), or None."""
    return next((ext for ext in members if f".{ext}" in IMAGE_SUFFIXES), None)


def read_member(file, member: tuple[int, int]) -> bytes:
    """The bytes of a member, from an open binary file."""
    file.seek(member[0])
    return file.read(member[1])


def is_tar_source(src: str | Path) -> bool:
    """A ``.tar`` file, or a folder whose top level holds ``.tar`` files."""
    src = Path(src)
    if src.is_file():
        return src.suffix.lower() == ".tar"
    return src.is_dir() and any(p.suffix.lower() == ".tar" and p.is_file() for p in src.iterdir())


def scan_tar_source(src: str | Path) -> list[SourceItem]:
    """Every sample with an image in the tar shard(s) ``src`` (``img2dataset``'s layout)."""
    src = Path(src)
    tars = [src] if src.is_file() else sorted(p for p in src.iterdir() if p.suffix.lower() == ".tar")
    items = []
    for tar in tars:
        members = tar_members(tar)
        with tar.open("rb") as f:
            for key, files in members.items():
                ext = image_member(files)
                if ext is None:
                    continue
                meta: dict[str, Any] = {}
                if "json" in files:
                    try:
                        meta = json.loads(read_member(f, files["json"]))
                    except (json.JSONDecodeError, UnicodeDecodeError):
                        logger.warning("%s: %s.json is not valid JSON (ignored)", tar, key)
                caption = (
                    read_member(f, files["txt"]).decode(errors="replace").strip() if "txt" in files else None
                )
                caption = caption or (str(meta["caption"]) if meta.get("caption") else None)
                source = f"{tar.name}/{key}.{ext}"
                items.append(
                    SourceItem(
                        source,
                        str(tar.resolve()),
                        sample_key(source),
                        caption,
                        str(meta["identity"]) if meta.get("identity") not in (None, "") else None,
                        _split_labels(meta.get("identities")),
                        member=files[ext],
                    )
                )
    return items


class _TarWriter:
    """Adds files from memory to an open tar, with reproducible bytes."""

    def __init__(self, tar: tarfile.TarFile) -> None:
        self.tar = tar

    def add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), 0o444, 0  # reproducible bytes
        self.tar.addfile(info, io.BytesIO(data))


@contextlib.contextmanager
def _write_tar(path: Path) -> Iterator[_TarWriter]:
    """A tar written atomically: it replaces ``path`` only when the block ends without error."""
    with atomic_path(path) as tmp, tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        yield _TarWriter(tar)


# -- WebDataset shards --------------------------------------------------------------------------


def pack_webdataset(
    root: str | Path,
    out: str | Path,
    samples_per_shard: int = 1000,
    alternatives: int = 4,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the dataset folder ``root`` as WebDataset shards in ``out`` (see the module docstring).

    Returns the ``dataset.json`` written to ``out``.
    """
    from tqdm.auto import tqdm

    root, out = Path(root), Path(out)
    info = read_dataset_info(root)
    if samples_per_shard < 1 or alternatives < 0:
        raise DatasetError("samples per shard must be at least 1 and alternatives at least 0")
    if out.resolve() == root.resolve():
        raise DatasetError("write the shards to another folder than the dataset")
    if (out / INFO_FILE).is_file() and json.loads((out / INFO_FILE).read_text()).get(
        "format"
    ) != WEBDATASET_FORMAT:
        raise DatasetError(f"{out} holds another dataset; not overwriting it")
    rows = sorted(read_jsonl(root / INDEX_FILE), key=lambda r: r["key"])
    if not rows:
        raise DatasetError(f"{root} has no images to pack")
    out.mkdir(parents=True, exist_ok=True)
    # Until the new dataset.json is written, the folder is not a dataset (an interrupted re-pack
    # must not leave an old list over new shards).
    (out / INFO_FILE).unlink(missing_ok=True)
    by_label: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for r_index, row in enumerate(rows):
        for f_index, label in enumerate(row.get("identities") or []):
            if label is not None:
                by_label[label].append((r_index, f_index))
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(rows))
    shards = []
    keep = ("key", "source", "caption", "width", "height", "num_faces", "multi_id", "identities", "boxes")
    with tqdm(total=len(rows), desc="pack", unit="img", disable=not progress) as bar:
        for k, start in enumerate(range(0, len(rows), samples_per_shard)):
            name = SHARD_PATTERN.format(k)
            counts: Counter = Counter()
            with _write_tar(out / name) as tar:
                for index in order[start : start + samples_per_shard]:
                    row = rows[int(index)]
                    key = row["key"]
                    tar.add(f"{key}.json", json.dumps({k2: row.get(k2) for k2 in keep}).encode())
                    image_ext = Path(row["image"]).suffix.lower().lstrip(".")  # jpg, or png (world render)
                    tar.add(f"{key}.{image_ext}", (root / row["image"]).read_bytes())
                    tar.add(f"{key}.npz", (root / row["faces"]).read_bytes())
                    alt = _alternatives(root, rows, int(index), by_label, alternatives, rng)
                    if alt is not None:
                        tar.add(f"{key}.alt.npz", alt)
                    counts[str(row["num_faces"])] += 1
                    bar.update()
            shards.append(
                {"file": name, "samples": sum(counts.values()), "faces": dict(sorted(counts.items()))}
            )
    for stale in out.glob("shard-*.tar"):  # from an earlier, larger pack
        if stale.name not in {s["file"] for s in shards}:
            stale.unlink()
    result = {
        "format": WEBDATASET_FORMAT,
        "version": WEBDATASET_VERSION,
        "source": str(root.resolve()),
        "options": info.get("options"),
        "images": len(rows),
        "samples_per_shard": samples_per_shard,
        "alternatives": alternatives,
        "seed": seed,
        "shards": shards,
    }
    write_bytes_atomic(out / INFO_FILE, (json.dumps(result, indent=2) + "\n").encode())
    return result


def _alternatives(
    root: Path,
    rows: list[dict[str, Any]],
    index: int,
    by_label: dict[str, list[tuple[int, int]]],
    limit: int,
    rng: np.random.Generator,
) -> bytes | None:
    """``.alt.npz`` bytes: crops of other photos of this sample's labelled people (or None)."""
    row = rows[index]
    if row["num_faces"] != 1:  # the ID augmentation is a stage-I (single-face) regularisation
        return None
    crops, faces = [], []
    for f_index, label in enumerate(row.get("identities") or []):
        if label is None or not limit:
            continue
        others = [rf for rf in by_label[label] if rows[rf[0]]["key"] != row["key"]]
        if not others:
            continue
        for pick in rng.permutation(len(others))[:limit]:
            other_row, other_face = others[int(pick)]
            with np.load(root / rows[other_row]["faces"]) as npz:
                crops.append(npz["crops"][other_face])
            faces.append(f_index)
    if not crops:
        return None
    buffer = io.BytesIO()
    np.savez_compressed(buffer, crops=np.stack(crops).astype(np.uint8), face=np.array(faces, dtype=np.int64))
    return buffer.getvalue()


def read_webdataset_info(root: str | Path) -> dict[str, Any]:
    """``dataset.json`` of a shard folder, checked; every listed shard must exist."""
    root = Path(root)
    path = root / INFO_FILE
    info = json.loads(path.read_text()) if path.is_file() else {}
    if info.get("format") != WEBDATASET_FORMAT or info.get("version") != WEBDATASET_VERSION:
        raise DatasetError(f"{root}: not a {WEBDATASET_FORMAT} v{WEBDATASET_VERSION} folder")
    missing = [s["file"] for s in info["shards"] if not (root / s["file"]).is_file()]
    if missing:
        raise DatasetError(
            f"{root}: {len(missing)} shard(s) listed in {INFO_FILE} are missing: {missing[:3]}"
        )
    return info


def is_webdataset(root: str | Path) -> bool:
    path = Path(root) / INFO_FILE
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("format") == WEBDATASET_FORMAT
    except json.JSONDecodeError:
        return False


def check_training_data(root: str | Path) -> dict[str, Any]:
    """``dataset.json`` of a dataset folder or of a shard folder (whichever ``root`` is)."""
    return read_webdataset_info(root) if is_webdataset(root) else read_dataset_info(root)
