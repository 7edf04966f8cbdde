"""The identity bank: named identities stored locally, so generating needs no face encoding.

Each identity is one ``<name>.safetensors`` file (features, aligned crops, the encoder's
fingerprint) in ``$UNIPORTRAIT_HOME/identities`` (default ``~/.cache/uniportrait/identities``),
written atomically. Tokens from one encoder are never used with another: the pipeline checks
the fingerprint and says so.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from uniportrait.errors import IdentityError
from uniportrait.identity import IDENTITY_VERSION, LEGACY_ALIGNER, Identity

STALE_TEMP_S = 3600.0  # a hidden temp file this old belongs to an `id add` that was killed
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
SUFFIX = ".safetensors"


def default_home() -> Path:
    env = os.environ.get("UNIPORTRAIT_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "uniportrait"


def check_name(name: str) -> str:
    """Identity names: 1–64 characters of letters, digits, ``_ . -``, not starting with a dot or dash."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or name.endswith(SUFFIX) or ".." in name:
        raise IdentityError(
            f"invalid identity name {name!r}: use 1-64 letters, digits, '_', '.', '-' (starting with a letter or digit)"
        )
    return name


@dataclass(frozen=True)
class IdentityInfo:
    """What ``id list`` shows, read from the file's metadata without loading tensors."""

    name: str
    references: int
    mixes: int
    encoder: str
    created: str
    path: Path
    aligner: str = ""
    current: bool = True  # False: made by the old face alignment, refused when loaded
    problem: str | None = None  # why the file is damaged (it is listed, removable, never used)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "references": self.references,
            "mixes": self.mixes,
            "encoder": self.encoder,
            "aligner": self.aligner,
            "current": self.current,
            "created": self.created,
            "path": str(self.path),
            "damaged": self.problem,
        }


def _read_info(path: Path) -> IdentityInfo:
    import json

    from uniportrait.identity import IDENTITY_FORMAT

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        # version 1 (the old face alignment) is listed as not current, not as damaged
        if meta.get("format") != IDENTITY_FORMAT or meta.get("version") not in ("1", str(IDENTITY_VERSION)):
            raise IdentityError(f"not a {IDENTITY_FORMAT} v{IDENTITY_VERSION} file")
        features = {k: f.get_tensor(k) for k in ("intrinsic", "structure")}
        keys = set(f.keys())
    scales = json.loads(meta.get("mix_scales", "[]"))
    if not isinstance(scales, list) or not all(isinstance(s, (int, float)) for s in scales):
        raise IdentityError(f"mix_scales is not a list of numbers: {meta.get('mix_scales')!r}")
    missing = [f"mix.{k}.{part}" for k in range(len(scales)) for part in ("intrinsic", "structure")]
    missing = [k for k in missing if k not in keys]
    if missing:
        raise IdentityError(f"missing tensors {', '.join(missing)}")
    for name, tensor in features.items():
        if tensor.ndim != 3 or not torch.isfinite(tensor).all():
            raise IdentityError(f"{name} features are not finite (R, T, C) numbers")
    if not meta.get("encoder"):
        raise IdentityError("no encoder recorded")
    return IdentityInfo(
        name=path.stem,
        references=int(features["intrinsic"].shape[0]),
        mixes=len(scales),
        encoder=meta["encoder"],
        created=meta.get("created", ""),
        path=path,
        aligner=meta.get("aligner", LEGACY_ALIGNER if meta.get("version") == "1" else ""),
        current=meta.get("version") == str(IDENTITY_VERSION),
    )


class IdentityBank:
    """A folder of named identities."""

    def __init__(self, home: str | os.PathLike | None = None) -> None:
        self.home = Path(home).expanduser() if home is not None else default_home()
        self.folder = self.home / "identities"

    def path(self, name: str) -> Path:
        return self.folder / f"{check_name(name)}{SUFFIX}"

    def exists(self, name: str) -> bool:
        return self.path(name).is_file()

    def clean_stale_temp_files(self, older_than_s: float = STALE_TEMP_S) -> int:
        """Delete the hidden temporary files of writes that were killed (``.NAME.safetensors.*``)."""
        if not self.folder.is_dir():
            return 0
        cutoff, removed = time.time() - older_than_s, 0
        for path in self.folder.glob(f".*{SUFFIX}.*"):
            try:
                if path.is_file() and path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except OSError:
                continue
        return removed

    def add(self, name: str, identity: Identity, overwrite: bool = False) -> Path:
        path = self.path(name)
        self.clean_stale_temp_files()
        if path.exists() and not overwrite:
            raise IdentityError(f"identity {name!r} already exists (use --overwrite to replace it)")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise IdentityError(
                f"cannot create the identity bank at {self.folder}: {exc.strerror or exc}"
            ) from exc
        identity.name = name
        created = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime())
        try:
            return identity.save(path, extra_metadata={"created": created})
        except OSError as exc:
            raise IdentityError(f"cannot write {path}: {exc.strerror or exc}") from exc

    def get(self, name: str) -> Identity:
        path = self.path(name)
        if not path.is_file():
            known = ", ".join(i.name for i in self.list()) or "none"
            raise IdentityError(
                f"unknown identity {name!r} (known: {known}); add it with `uniportrait id add`"
            )
        info = self._info(path)
        if info.problem is not None:
            raise IdentityError(
                f"identity {name!r} is damaged ({info.problem}); remove it with `uniportrait id rm {name}` "
                "and add it again"
            )
        identity = Identity.load(path)
        identity.name = name
        return identity

    def remove(self, name: str) -> None:
        path = self.path(name)
        if not path.is_file():
            raise IdentityError(f"unknown identity {name!r}")
        path.unlink()

    def info(self, name: str) -> IdentityInfo:
        path = self.path(name)
        if not path.is_file():
            raise IdentityError(f"unknown identity {name!r}")
        return self._info(path)

    def list(self) -> list[IdentityInfo]:
        """Every stored identity, damaged ones included (with ``problem`` saying why)."""
        if not self.folder.is_dir():
            return []
        self.clean_stale_temp_files()
        return [
            self._info(path)
            for path in sorted(self.folder.glob(f"*{SUFFIX}"))
            if NAME_PATTERN.fullmatch(path.stem) and path.is_file()
        ]

    @staticmethod
    def _info(path: Path) -> IdentityInfo:
        """What the file says about itself; a damaged file gives an entry with its ``problem``
        (it never raises, so one bad file cannot hide the others)."""
        try:
            return _read_info(path)
        except Exception as exc:  # safetensors, json and type errors alike: the file is damaged
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            return IdentityInfo(path.stem, 0, 0, "?", "", path, current=False, problem=reason)
