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

from safetensors import safe_open

from uniportrait.errors import IdentityError
from uniportrait.identity import Identity

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

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "references": self.references,
            "mixes": self.mixes,
            "encoder": self.encoder,
            "created": self.created,
            "path": str(self.path),
        }


class IdentityBank:
    """A folder of named identities."""

    def __init__(self, home: str | os.PathLike | None = None) -> None:
        self.home = Path(home).expanduser() if home is not None else default_home()
        self.folder = self.home / "identities"

    def path(self, name: str) -> Path:
        return self.folder / f"{check_name(name)}{SUFFIX}"

    def exists(self, name: str) -> bool:
        return self.path(name).is_file()

    def add(self, name: str, identity: Identity, overwrite: bool = False) -> Path:
        path = self.path(name)
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
        if not self.folder.is_dir():
            return []
        out = []
        for path in sorted(self.folder.glob(f"*{SUFFIX}")):
            if NAME_PATTERN.fullmatch(path.stem):
                try:
                    out.append(self._info(path))
                except IdentityError:
                    continue  # a foreign or damaged file: not an identity
        return out

    @staticmethod
    def _info(path: Path) -> IdentityInfo:
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                refs = f.get_slice("intrinsic").get_shape()[0]
        except Exception as exc:
            raise IdentityError(f"{path} is not a readable identity file") from exc
        import json

        return IdentityInfo(
            name=path.stem,
            references=int(refs),
            mixes=len(json.loads(meta.get("mix_scales", "[]"))),
            encoder=meta.get("encoder", "?"),
            created=meta.get("created", ""),
            path=path,
        )
