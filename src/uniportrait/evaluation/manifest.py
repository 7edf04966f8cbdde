"""Evaluation manifests: which image, made from which prompt and which reference identities.

One row per generated image, as JSON Lines or CSV. Relative paths are relative to the
manifest's folder.

JSONL (one object per line; blank lines and lines starting with ``#`` are skipped)::

    {"image": "out/0001.png", "prompt": "a photo of a person", "identities": [["anna.jpg"]]}
    {"image": "out/0002.png", "prompt": "two friends", "identities": ["anna.jpg", "id:ben"]}

Each entry of ``identities`` is one person, given as

- a list of photo paths (several photos of the same person),
- a string: one photo path, or ``"id:NAME"`` for a stored identity (``uniportrait id add``),
- an object: ``{"photos": [...]}`` or ``{"id": "NAME"}``, with an optional ``"label"``.

Other keys (``seed``, ``group``…) are kept and copied to the results.

CSV: a header with ``image``, ``prompt`` and ``identities`` (other columns are kept). In the
``identities`` cell, ``;`` separates people and ``|`` separates the photos of one person;
``id:NAME`` is a stored identity::

    image,prompt,identities
    out/0002.png,two friends,anna.jpg|anna2.jpg;id:ben
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uniportrait.atomic import write_text_atomic
from uniportrait.errors import UniPortraitError

STORED_PREFIX = "id:"
REQUIRED = ("image", "prompt", "identities")
MAX_LISTED_PROBLEMS = 5


class ManifestError(UniPortraitError):
    """A manifest or benchmark spec is unreadable, or one of its rows is bad (the row is named)."""


@dataclass(frozen=True)
class IdentitySpec:
    """One reference person: photo paths, or the name of a stored identity."""

    photos: tuple[Path, ...] = ()
    name: str | None = None
    label: str | None = None

    def __post_init__(self) -> None:
        if bool(self.photos) == bool(self.name):
            raise ValueError("an identity is either photos or a stored name")

    @property
    def key(self) -> tuple:
        """Identifies the reference (for caching its embeddings), whatever its label."""
        return ("id", self.name) if self.name else ("photos", tuple(str(p) for p in self.photos))

    @property
    def display(self) -> str:
        if self.label:
            return self.label
        return self.name if self.name else Path(self.photos[0]).stem

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"id": self.name} if self.name else {"photos": [str(p) for p in self.photos]}
        if self.label:
            data["label"] = self.label
        return data


@dataclass(frozen=True)
class ManifestRow:
    """One generated image to evaluate.

    Attributes:
        line: 1-based line of the row in its manifest (for error messages).
        image: the generated image.
        identities: the reference people, in order.
        extra: the row's other fields, copied to the results.
    """

    line: int
    image: Path
    prompt: str
    identities: tuple[IdentitySpec, ...]
    extra: dict[str, Any] = field(default_factory=dict)
    source: str = "manifest"

    @property
    def where(self) -> str:
        return f"{self.source} line {self.line}"

    def to_json(self, relative_to: Path | None = None) -> dict[str, Any]:
        image = self.image
        if relative_to is not None:
            try:
                image = self.image.relative_to(relative_to)
            except ValueError:
                pass
        return {
            "image": str(image),
            "prompt": self.prompt,
            "identities": [spec.to_json() for spec in self.identities],
            **self.extra,
        }


def parse_identity(value: Any, base: Path) -> IdentitySpec:
    """One ``identities`` entry (see the module docstring) → :class:`IdentitySpec`.

    Raises:
        ValueError: with a message saying what is wrong.
    """
    label = None
    if isinstance(value, dict):
        unknown = sorted(set(value) - {"photos", "photo", "id", "label"})
        if unknown:
            raise ValueError(f"unknown identity field(s) {unknown} (use photos, id, label)")
        label = value.get("label")
        if label is not None and not isinstance(label, str):
            raise ValueError("an identity's label must be a string")
        given = [k for k in ("photos", "photo", "id") if k in value]
        if len(given) != 1:
            raise ValueError('an identity object needs exactly one of "photos", "photo" or "id"')
        value = value[given[0]] if given[0] != "id" else STORED_PREFIX + str(value["id"])
    if isinstance(value, str):
        value = value.strip()
        if value.startswith(STORED_PREFIX):
            name = value[len(STORED_PREFIX) :].strip()
            if not name:
                raise ValueError(f"empty stored identity name in {value!r}")
            return IdentitySpec(name=name, label=label)
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(p, str) and p.strip() for p in value):
        raise ValueError(f"an identity must be photo path(s) or 'id:NAME', got {value!r}")
    return IdentitySpec(photos=tuple(_resolve(p.strip(), base) for p in value), label=label)


def _resolve(path: str, base: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else base / p


def _row_from_mapping(data: dict[str, Any], base: Path) -> tuple[Path, str, tuple[IdentitySpec, ...], dict]:
    missing = [k for k in REQUIRED if k not in data or data[k] in (None, "")]
    if missing:
        raise ValueError(f"missing {', '.join(repr(k) for k in missing)}")
    if not isinstance(data["image"], str):
        raise ValueError('"image" must be a path string')
    if not isinstance(data["prompt"], str):
        raise ValueError('"prompt" must be a string')
    identities = data["identities"]
    if not isinstance(identities, list) or not identities:
        raise ValueError('"identities" must be a non-empty list (one entry per person)')
    specs = tuple(parse_identity(item, base) for item in identities)
    extra = {k: v for k, v in data.items() if k not in REQUIRED}
    return _resolve(data["image"], base), data["prompt"], specs, extra


def _jsonl_records(text: str):
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as err:
            yield number, None, f"not valid JSON ({err.msg} at column {err.colno})"
            continue
        if not isinstance(data, dict):
            yield number, None, "a row must be a JSON object"
            continue
        yield number, data, None


def _csv_records(text: str):
    reader = csv.reader(io.StringIO(text))
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        return
    absent = [k for k in REQUIRED if k not in header]
    if absent:
        yield (
            1,
            None,
            f"the CSV header must name the columns {', '.join(REQUIRED)} (missing {', '.join(absent)})",
        )
        return
    start = reader.line_num + 1
    for cells in reader:
        number, start = start, reader.line_num + 1
        if not any(c.strip() for c in cells):
            continue
        if len(cells) != len(header):
            yield number, None, f"{len(cells)} columns, the header has {len(header)}"
            continue
        data: dict[str, Any] = dict(zip(header, cells))
        people = [p.strip() for p in data["identities"].split(";") if p.strip()]
        data["identities"] = [
            p if p.startswith(STORED_PREFIX) else [x.strip() for x in p.split("|") if x.strip()]
            for p in people
        ]
        yield number, data, None


def read_manifest(path: str | os.PathLike, bank=None, check_files: bool = True) -> list[ManifestRow]:
    """Read and check a ``.jsonl`` or ``.csv`` manifest.

    Every row is checked before anything is evaluated: required fields, image and photo files
    present, stored identity names known to ``bank``
    (a :class:`~uniportrait.bank.IdentityBank`; default: the user's).

    Raises:
        ManifestError: naming the file and the line of each bad row (the first few).
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest {path} not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise ManifestError(f"cannot read manifest {path}: {err}") from None
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".csv"):
        raise ManifestError(f"manifest {path}: use a .jsonl or .csv file (got {suffix or 'no suffix'})")
    records = _csv_records(text) if suffix == ".csv" else _jsonl_records(text)
    rows, problems = [], []
    base = path.parent
    for number, data, problem in records:
        if problem is None:
            try:
                image, prompt, specs, extra = _row_from_mapping(data, base)
                row = ManifestRow(number, image, prompt, specs, extra, source=path.name)
                problem = check_row_files(row, bank) if check_files else None
            except ValueError as err:
                problem = str(err)
        if problem:
            problems.append(f"line {number}: {problem}")
        else:
            rows.append(row)
    if problems:
        raise ManifestError(_problem_message(path.name, problems))
    if not rows:
        raise ManifestError(f"manifest {path} has no rows")
    return rows


def check_row_files(row: ManifestRow, bank=None) -> str | None:
    """What is wrong with a row's files (image, photos, stored names), or None."""
    if not row.image.is_file():
        return f"image {row.image} not found"
    for spec in row.identities:
        for photo in spec.photos:
            if not photo.is_file():
                return f"reference photo {photo} not found"
        if spec.name is not None:
            problem = stored_identity_problem(spec.name, bank)
            if problem:
                return problem
    return None


def stored_identity_problem(name: str, bank) -> str | None:
    """Why ``name`` is not a usable stored identity in ``bank`` (default: the user's), or None."""
    from uniportrait.bank import IdentityBank

    bank = bank or IdentityBank()
    try:
        if not bank.exists(name):
            known = ", ".join(i.name for i in bank.list()) or "none"
            return f"unknown stored identity {name!r} in {bank.folder} (known: {known})"
    except UniPortraitError as err:  # an invalid name
        return str(err)
    return None


def _problem_message(source: str, problems: list[str]) -> str:
    shown = "; ".join(problems[:MAX_LISTED_PROBLEMS])
    more = len(problems) - MAX_LISTED_PROBLEMS
    head = f"{source}: {len(problems)} bad rows: " if len(problems) > 1 else f"{source} "
    return head + shown + (f" (and {more} more)" if more > 0 else "")


def write_manifest(rows: list[ManifestRow], path: str | os.PathLike) -> Path:
    """Write rows as JSON Lines (paths relative to the manifest's folder when inside it)."""
    path = Path(path)
    lines = [json.dumps(row.to_json(relative_to=path.parent.resolve())) for row in rows]
    return write_text_atomic(path, "\n".join(lines) + "\n")
