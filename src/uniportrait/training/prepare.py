"""``uniportrait prepare-data``: a folder of photos → a training dataset.

Input (``SRC``): image files anywhere below ``SRC``, with captions and optional identity labels
from, in order of precedence:

- a manifest, ``SRC/metadata.jsonl`` or ``SRC/metadata.csv`` (or ``--manifest``): one row per
  image with ``file`` (path relative to ``SRC``), ``caption`` (or ``text``) and optionally
  ``identity`` (the label of the largest face) or ``identities`` (one label per face, listed
  **left to right** in the image; a JSON list or a comma-separated string);
- a sidecar ``<image stem>.txt`` holding the caption;
- with ``identity_from_folder``, the first-level sub-folder of an image names the identity
  of its largest face (``SRC/alice/1.jpg`` → ``alice``).

Output (``DATA``)::

    dataset.json          format, version, options and the counts of the last run
    index.jsonl           one row per usable image (see below), in completion order
    skipped.jsonl         one row per unusable image: {"source", "key", "reason", "detail"}
    images/<key>.jpg      the image, RGB, long side at most ``max_side`` px
    faces/<key>.npz       per face (largest first): crops (N, 224, 224, 3) uint8 aligned crops,
                          boxes (N, 4) float32 (x0, y0, x1, y1), landmarks (N, 5, 2) float32,
                          scores (N,) float32, masks (N, H, W) bool face masks (boxes scaled
                          by ``mask_scale``), all in the stored image's pixel coordinates

An ``index.jsonl`` row: ``{"key", "source", "image", "faces", "caption", "width", "height",
"num_faces", "multi_id", "identities": [label or null per face], "boxes"}``.

A re-run skips every image already listed in ``index.jsonl`` or ``skipped.jsonl`` (pass
``retry_skipped`` to try the skipped ones again), so an interrupted run resumes where it
stopped. Files are written to a temporary name and renamed, and a row is appended only once
its files are in place. The work is spread over a pool of CPU worker processes, each with its
own face analyzer; only the main process writes the index.

This module does not import torch, so worker processes start quickly.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import multiprocessing
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from uniportrait.atomic import write_bytes_atomic
from uniportrait.errors import UniPortraitError
from uniportrait.faces import DEFAULT_ANALYZER

logger = logging.getLogger(__name__)

DATASET_FORMAT = "uniportrait-dataset"
DATASET_VERSION = 1
INFO_FILE = "dataset.json"
INDEX_FILE = "index.jsonl"
SKIPPED_FILE = "skipped.jsonl"
IMAGE_DIR = "images"
FACES_DIR = "faces"
MANIFEST_NAMES = ("metadata.jsonl", "metadata.csv")
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})

# Skip reasons (the summary groups by these).
UNREADABLE = "unreadable"
NO_FACE = "no face"
TOO_SMALL = "face too small"
TOO_MANY = "too many faces"
FAILED = "error"


class DatasetError(UniPortraitError):
    """A dataset folder is missing, malformed, or of another format version."""


@dataclass
class PrepareOptions:
    """How images are processed.

    Attributes:
        analyzer: face analyzer name (``uniportrait.faces.get_face_analyzer``; default MTCNN).
        max_side: stored images are downscaled so that their long side is at most this.
        min_face_size: faces whose box side is smaller are ignored (an image left without a
            usable face is skipped as "face too small").
        max_faces: images with more usable faces are skipped ("too many faces").
        mask_scale: face masks are the detector boxes scaled by this about their centre
            (detector boxes are tight around the face; the mask should cover it with some margin).
        jpeg_quality: quality of the stored JPEGs.
        identity_from_folder: label single faces by their first-level sub-folder.
    """

    analyzer: str = DEFAULT_ANALYZER
    max_side: int = 1024
    min_face_size: int = 48
    max_faces: int = 4
    mask_scale: float = 1.25
    jpeg_quality: int = 95
    identity_from_folder: bool = False


@dataclass
class SourceItem:
    """One input image and what is known about it before processing."""

    source: str  # path relative to SRC, "/"-separated
    path: str  # absolute path
    key: str
    caption: str | None = None
    identity: str | None = None  # label of the largest face
    identities: list[str] | None = None  # labels left to right
    member: tuple[int, int] | None = None  # (offset, size) of the image inside the tar file ``path``


@dataclass
class PrepareSummary:
    """What a run did."""

    total: int = 0
    already_done: int = 0
    written: int = 0
    skipped: Counter = field(default_factory=Counter)
    skip_examples: dict[str, str] = field(default_factory=dict)
    no_caption: int = 0
    label_mismatch: int = 0
    rows: int = 0  # rows in index.jsonl after the run

    def format(self) -> str:
        lines = [
            f"{self.total} images found: {self.written} added, {sum(self.skipped.values())} skipped, "
            f"{self.already_done} already done (dataset now has {self.rows} images)"
        ]
        for reason, count in self.skipped.most_common():
            example = self.skip_examples.get(reason, "")
            lines.append(f"  skipped {count:5d} × {reason}" + (f"  (e.g. {example})" if example else ""))
        if self.no_caption:
            lines.append(f"  {self.no_caption} image(s) without a caption (trained with an empty prompt)")
        if self.label_mismatch:
            lines.append(
                f"  {self.label_mismatch} image(s) whose identity labels did not match the faces found "
                "(labels dropped)"
            )
        return "\n".join(lines)


# -- sources ------------------------------------------------------------------------------------


def sample_key(source: str) -> str:
    """A file-name-safe key unique to a source path: a readable stem plus a short hash."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", source.rsplit(".", 1)[0]).strip("_")[-60:] or "image"
    return f"{stem}-{hashlib.sha1(source.encode()).hexdigest()[:8]}"


def _split_labels(value: Any) -> list[str] | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        value = value.strip()
        if value.startswith("["):
            value = json.loads(value)
        else:
            return [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list):
        raise DatasetError(f"identities must be a list or a comma-separated string, got {value!r}")
    return [str(v) for v in value]


def read_manifest(path: Path) -> dict[str, dict[str, Any]]:
    """``file`` (relative, "/"-separated) → {caption, identity, identities} from JSONL or CSV."""
    rows: list[dict[str, Any]] = []
    if path.suffix == ".csv":
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DatasetError(f"{path}:{n} is not valid JSON: {exc}") from None
    out = {}
    for n, row in enumerate(rows, 1):
        name = row.get("file") or row.get("file_name") or row.get("image")
        if not name:
            raise DatasetError(f"{path}: row {n} has no 'file' column")
        caption = row.get("caption", row.get("text"))
        out[Path(str(name)).as_posix()] = {
            "caption": str(caption) if caption not in (None, "") else None,  # empty CSV cell = none
            "identity": (str(row["identity"]) if row.get("identity") not in (None, "") else None),
            "identities": _split_labels(row.get("identities")),
        }
    return out


def scan_source(
    src: str | Path, manifest: str | Path | None = None, identity_from_folder: bool = False
) -> list[SourceItem]:
    """Every image of ``src`` (sorted), with captions and labels attached.

    ``src`` is a folder of images, a manifest file (``.jsonl``/``.csv``: its ``file`` column
    is relative to the manifest's folder), or WebDataset tar shards (a ``.tar`` file, or a folder
    whose top level holds ``.tar`` files, as ``img2dataset`` writes them).
    """
    from uniportrait.training.shards import is_tar_source, scan_tar_source

    src = Path(src)
    if src.is_file() and src.suffix.lower() in (".jsonl", ".csv"):
        if manifest is not None:
            raise DatasetError("SRC is already a manifest: do not also pass --manifest")
        return _scan_manifest(src, identity_from_folder)
    if is_tar_source(src):
        if manifest is not None or identity_from_folder:
            raise DatasetError("tar shard sources carry their own captions/labels (no --manifest / folders)")
        return scan_tar_source(src)
    if not src.is_dir():
        raise DatasetError(f"source folder {src} not found")
    manifest_path = (
        Path(manifest) if manifest else next((src / n for n in MANIFEST_NAMES if (src / n).is_file()), None)
    )
    meta = read_manifest(manifest_path) if manifest_path else {}
    items = []
    for path in sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
        rel = path.relative_to(src).as_posix()
        info = meta.get(rel, {})
        caption = info.get("caption")
        sidecar = path.with_suffix(".txt")
        if caption is None and sidecar.is_file():
            caption = sidecar.read_text(errors="replace").strip()
        identity = info.get("identity")
        if identity is None and identity_from_folder and "/" in rel:
            identity = rel.split("/", 1)[0]
        items.append(SourceItem(rel, str(path), sample_key(rel), caption, identity, info.get("identities")))
    return items


def _scan_manifest(path: Path, identity_from_folder: bool) -> list[SourceItem]:
    """The images a manifest file lists (relative to its folder), sorted."""
    meta = read_manifest(path)
    base = path.parent
    items = []
    for rel in sorted(meta):
        file = base / rel
        if not file.is_file():
            raise DatasetError(f"{path}: image {rel} not found (paths are relative to {base})")
        info = meta[rel]
        caption, identity = info["caption"], info["identity"]
        if caption is None and file.with_suffix(".txt").is_file():
            caption = file.with_suffix(".txt").read_text(errors="replace").strip()
        if identity is None and identity_from_folder and "/" in rel:
            identity = rel.split("/", 1)[0]
        items.append(SourceItem(rel, str(file), sample_key(rel), caption, identity, info["identities"]))
    return items


# -- the dataset files ------------------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file; a truncated last line (an interrupted write) is ignored."""
    if not path.is_file():
        return []
    rows = []
    lines = path.read_text().splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if n == len(lines):
                logger.warning("%s: ignoring a truncated last line", path)
                continue
            raise DatasetError(f"{path}:{n} is not valid JSON") from None
    return rows


def read_dataset_info(root: str | Path) -> dict[str, Any]:
    """``dataset.json`` of a dataset folder, checked for format and version."""
    root = Path(root)
    info_path = root / INFO_FILE
    if not info_path.is_file() or not (root / INDEX_FILE).is_file():
        raise DatasetError(
            f"{root} is not a dataset folder (no {INFO_FILE} / {INDEX_FILE}); "
            "make one with `uniportrait prepare-data SRC --out DATA`"
        )
    info = json.loads(info_path.read_text())
    if info.get("format") != DATASET_FORMAT or info.get("version") != DATASET_VERSION:
        raise DatasetError(f"{root}: not a {DATASET_FORMAT} v{DATASET_VERSION} dataset")
    return info


def _scaled_boxes(boxes: np.ndarray, scale: float) -> np.ndarray:
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]) * scale / 2
    return np.concatenate([centre - half, centre + half], axis=1)


# -- one image (runs in a worker) -------------------------------------------------------------------

_ANALYZER: tuple[str, Any] | None = None  # (name, analyzer) of this process


def _init_worker(analyzer_name: str, worker: bool = True) -> None:
    global _ANALYZER  # one analyzer per worker process (models are not shared)
    from uniportrait.faces import get_face_analyzer

    if worker and analyzer_name == "mtcnn":
        import torch

        torch.set_num_threads(1)  # parallelism comes from the worker processes
    _ANALYZER = (analyzer_name, get_face_analyzer(analyzer_name))


def _analyzer(name: str) -> Any:
    if _ANALYZER is None or _ANALYZER[0] != name:
        _init_worker(name, worker=False)
    return _ANALYZER[1]


def process_image(item: SourceItem, out: str, options: PrepareOptions) -> dict[str, Any]:
    """Detect, align and store one image. Returns ``{"row": ...}`` or ``{"skip": ...}``."""
    from uniportrait.errors import InvalidImageError
    from uniportrait.faces import align_face, detect_faces, face_masks, face_problem, load_image

    def skip(reason: str, detail: str) -> dict[str, Any]:
        return {"skip": {"source": item.source, "key": item.key, "reason": reason, "detail": detail}}

    try:
        image = load_image(item.path if item.member is None else _read_member(item.path, *item.member))
    except InvalidImageError as exc:
        return skip(UNREADABLE, str(exc))
    try:
        if max(image.size) > options.max_side:
            factor = options.max_side / max(image.size)
            size = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
            image = image.resize(size, Image.Resampling.LANCZOS)
        found = detect_faces(image, _analyzer(options.analyzer))
        if not found:
            return skip(NO_FACE, "no face detected")
        faces = [f for f in found if face_problem(f, options.min_face_size) is None]
        if not faces:
            return skip(TOO_SMALL, face_problem(found[0], options.min_face_size) or "")
        if len(faces) > options.max_faces:
            return skip(TOO_MANY, f"{len(faces)} faces (at most {options.max_faces})")

        labels, mismatch = _labels(item, faces)
        boxes = np.array([f.box for f in faces], dtype=np.float32)  # (N, 4)
        crops = np.stack([np.asarray(align_face(image, f.landmarks)) for f in faces])  # (N, 224, 224, 3)
        masks = face_masks(_scaled_boxes(boxes, options.mask_scale), image.height, image.width)
        root = Path(out)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=options.jpeg_quality)
        write_bytes_atomic(root / IMAGE_DIR / f"{item.key}.jpg", buffer.getvalue(), durable=False)
        buffer = io.BytesIO()
        np.savez_compressed(
            buffer,
            crops=crops.astype(np.uint8),
            boxes=boxes,
            landmarks=np.stack([f.landmarks for f in faces]).astype(np.float32),
            scores=np.array([f.score for f in faces], dtype=np.float32),
            masks=masks,
        )
        write_bytes_atomic(root / FACES_DIR / f"{item.key}.npz", buffer.getvalue(), durable=False)
    except Exception as exc:  # one bad image must not stop a long run; it is reported
        logger.debug("failed on %s", item.source, exc_info=True)
        return skip(FAILED, f"{type(exc).__name__}: {exc}")
    row = {
        "key": item.key,
        "source": item.source,
        "image": f"{IMAGE_DIR}/{item.key}.jpg",
        "faces": f"{FACES_DIR}/{item.key}.npz",
        "caption": item.caption or "",
        "width": image.width,
        "height": image.height,
        "num_faces": len(faces),
        "multi_id": len(faces) >= 2,
        "identities": labels,
        "boxes": [[round(float(v), 1) for v in box] for box in boxes],
    }
    return {"row": row, "no_caption": item.caption is None, "label_mismatch": mismatch}


def _read_member(path: str, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


def _labels(item: SourceItem, faces: list) -> tuple[list[str | None], bool]:
    """Per-face labels (faces largest first); True if the given labels did not fit."""
    labels: list[str | None] = [None] * len(faces)
    if item.identities is not None:
        if len(item.identities) != len(faces):
            return labels, True
        left_to_right = sorted(range(len(faces)), key=lambda i: faces[i].box[0] + faces[i].box[2])
        for label, index in zip(item.identities, left_to_right):
            labels[index] = label
    elif item.identity is not None:
        labels[0] = item.identity
    return labels, False


# -- the run ------------------------------------------------------------------------------------


def _results(
    items: list[SourceItem], out: Path, options: PrepareOptions, workers: int
) -> Iterator[dict[str, Any]]:
    if workers <= 1:
        for item in items:
            yield process_image(item, str(out), options)
        return
    # Fork where available: workers then start without re-importing anything.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
    context = multiprocessing.get_context(method)
    with context.Pool(workers, initializer=_init_worker, initargs=(options.analyzer,)) as pool:
        args = ((item, str(out), options) for item in items)
        yield from pool.imap_unordered(_process_star, args, chunksize=1)


def _process_star(args: tuple[SourceItem, str, PrepareOptions]) -> dict[str, Any]:
    return process_image(*args)


def prepare_dataset(
    src: str | Path,
    out: str | Path,
    workers: int = 1,
    options: PrepareOptions | None = None,
    manifest: str | Path | None = None,
    retry_skipped: bool = False,
    progress: bool = True,
    shard: tuple[int, int] | None = None,
) -> PrepareSummary:
    """Build (or resume building) a dataset from the images in ``src``; see the module docstring.

    Args:
        src: the source: a folder of images, a manifest file, or WebDataset tar shards
            (:func:`scan_source`).
        out: the dataset folder (created if needed).
        workers: worker processes (1: in this process).
        options: processing settings; a resumed dataset keeps the settings it was made with
            unless they are given again (a warning names any difference).
        manifest: a JSONL/CSV manifest (default: ``src/metadata.jsonl`` or ``.csv`` if present).
        retry_skipped: process again the images that an earlier run skipped.
        progress: show a tqdm progress bar.
        shard: ``(i, n)``: process only part ``i`` of ``n`` disjoint parts of the source (split
            by a hash of each image's key, so every worker/node computes the same split), into
            ``out/parts/<i>-of-<n>/``; ``uniportrait data merge out`` joins the parts.
    """
    from tqdm.auto import tqdm

    from uniportrait.training.shards import in_shard, part_folder

    options = options or PrepareOptions()
    out = Path(out) if shard is None else part_folder(out, *shard)
    info_path = out / INFO_FILE
    if info_path.is_file():
        old = read_dataset_info(out) if (out / INDEX_FILE).is_file() else json.loads(info_path.read_text())
        if old.get("merged"):
            raise DatasetError(
                f"{out} was merged from parts: add images with --shard I/N (then merge again) or use a new folder"
            )
        if old.get("options") and old["options"] != asdict(options):
            logger.warning(
                "%s was started with other options %s; now %s", out, old["options"], asdict(options)
            )

    items = scan_source(src, manifest, options.identity_from_folder)
    for sub in (IMAGE_DIR, FACES_DIR):
        (out / sub).mkdir(parents=True, exist_ok=True)
    if shard is not None:
        items = [item for item in items if in_shard(item.key, *shard)]
    rows = read_jsonl(out / INDEX_FILE)
    skipped = read_jsonl(out / SKIPPED_FILE)
    done = {r["key"] for r in rows}
    if retry_skipped:
        skipped = []
    done |= {s["key"] for s in skipped}
    # Rewrite both files: drops a truncated last line and, with retry_skipped, the old skips.
    _write_jsonl(out / INDEX_FILE, rows)
    _write_jsonl(out / SKIPPED_FILE, skipped)
    _write_info(out, options, src, len(rows), len(skipped), shard)

    todo = [item for item in items if item.key not in done]
    summary = PrepareSummary(total=len(items), already_done=len(items) - len(todo))
    workers = max(1, min(int(workers), len(todo) or 1))
    logger.info(
        "preparing %d image(s) (%d already done) with %d worker(s)", len(todo), summary.already_done, workers
    )
    with (
        (out / INDEX_FILE).open("a") as index,
        (out / SKIPPED_FILE).open("a") as skips,
        tqdm(total=len(todo), desc="prepare-data", unit="img", disable=not progress) as bar,
    ):
        for result in _results(todo, out, options, workers):
            if "row" in result:
                index.write(json.dumps(result["row"]) + "\n")
                index.flush()
                summary.written += 1
                summary.no_caption += int(result["no_caption"])
                summary.label_mismatch += int(result["label_mismatch"])
            else:
                record = result["skip"]
                skips.write(json.dumps(record) + "\n")
                skips.flush()
                summary.skipped[record["reason"]] += 1
                summary.skip_examples.setdefault(record["reason"], f"{record['source']}: {record['detail']}")
            bar.update()
    summary.rows = len(rows) + summary.written
    n_skipped = len(skipped) + sum(summary.skipped.values())
    _write_info(out, options, src, summary.rows, n_skipped, shard, complete=True)
    return summary


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    write_bytes_atomic(path, "".join(json.dumps(r) + "\n" for r in rows).encode())


def _write_info(
    out: Path,
    options: PrepareOptions,
    src: str | Path,
    rows: int,
    skipped: int,
    shard: tuple[int, int] | None = None,
    complete: bool = False,
) -> None:
    info = {
        "format": DATASET_FORMAT,
        "version": DATASET_VERSION,
        "source": str(Path(src).resolve()),
        "options": asdict(options),
        "images": rows,
        "skipped": skipped,
        "complete": complete,  # the last run went through every image
    }
    if shard is not None:
        info["shard"] = list(shard)
    write_bytes_atomic(out / INFO_FILE, (json.dumps(info, indent=2) + "\n").encode())
