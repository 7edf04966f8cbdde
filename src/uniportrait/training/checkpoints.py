"""Training checkpoints that are safe to read: no pickles of our own, a manifest with checksums
written last, and resume that skips a damaged checkpoint for the newest good one.

Accelerate's own files (optimizer, RNG states) are read with ``weights_only=True``; the objects it
would unpickle without that (``custom_checkpoint_*.pkl``) are never written or read.

A checkpoint folder is complete when ``manifest.json`` exists and every file it lists has the
size and SHA-256 it records. Files are written first, the manifest last (atomically), so a run
killed while saving leaves a checkpoint without a manifest, which resume skips.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from uniportrait.atomic import write_bytes_atomic
from uniportrait.errors import CheckpointError

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "uniportrait-checkpoint"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path, info: dict[str, Any]) -> Path:
    """List every file under ``folder`` with its size and SHA-256, plus ``info``; written last."""
    files = {
        str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")
    }
    body = {"format": MANIFEST_FORMAT, "version": 1, **info, "files": files}
    write_bytes_atomic(folder / MANIFEST, (json.dumps(body, indent=2) + "\n").encode())
    return folder / MANIFEST


def verify(folder: Path) -> dict[str, Any]:
    """The manifest's contents if every file matches it, else :class:`CheckpointError` saying what."""
    path = folder / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{folder} has no {MANIFEST} (saving was interrupted?)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is unreadable: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise CheckpointError(f"{path} is not a {MANIFEST_FORMAT} manifest")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"{path} lists no files")
    for name, meta in files.items():
        file = folder / name
        if not file.is_file():
            raise CheckpointError(f"{folder}: {name} is missing")
        if file.stat().st_size != meta.get("bytes"):
            raise CheckpointError(
                f"{folder}: {name} has {file.stat().st_size} bytes, expected {meta.get('bytes')}"
            )
        if _sha256(file) != meta.get("sha256"):
            raise CheckpointError(f"{folder}: {name} does not match its checksum (damaged)")
    for extra in folder.rglob(
        "custom_checkpoint_*.pkl"
    ):  # accelerate unpickles these with weights_only=False
        raise CheckpointError(f"{folder}: {extra.name} is a pickled object; this trainer never reads those")
    return manifest


def newest_good(candidates: list[Path]) -> tuple[Path | None, list[str]]:
    """The newest checkpoint of ``candidates`` (oldest first) that verifies, and why newer ones did not."""
    problems = []
    for folder in reversed(candidates):
        try:
            verify(folder)
            return folder, problems
        except CheckpointError as err:
            problems.append(str(err))
    return None, problems


def save_json_state(path: Path, state: dict[str, Any]) -> None:
    write_bytes_atomic(path, (json.dumps(state, indent=2, sort_keys=True) + "\n").encode())


def load_json_state(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        state = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is unreadable: {exc}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return state


def trim_metrics(path: Path, last_step: int) -> int:
    """Drop ``metrics.jsonl`` rows logged after ``last_step`` (by a run that was stopped after its
    last checkpoint), so a resumed run does not write them twice. Returns how many were dropped."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            step = json.loads(line).get("step")
        except (json.JSONDecodeError, AttributeError):
            dropped += 1  # a row cut short by the kill
            continue
        if isinstance(step, int) and step > last_step:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        write_bytes_atomic(path, ("\n".join(kept) + "\n" if kept else "").encode())
    return dropped
