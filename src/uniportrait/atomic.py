"""Writing a file or a folder atomically: the project's one definition of each.

The new contents go to a hidden temporary file beside the target, are flushed to disk, and the
file is moved over the target with :func:`os.replace` (atomic on one file system). Readers see the
old file or the complete new one, never a partial one; a failure removes the temporary file and
leaves the target as it was. Folders (:func:`atomic_directory`) are filled beside the target and
swapped in by two renames.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s new contents to; on success it replaces ``path``.

    The parent folder is created if missing. The temporary file, ``.{name}.{random}.tmp`` in the same
    folder, already exists (empty) when yielded: it is created with mode 0o666, so the umask picks
    the permissions as for a plain ``open``. Write it by name (``"wb"`` truncates it) or through a
    handle; a writer that appends its own suffix to names (``np.savez``) should get a handle. When
    the block ends without error the file is fsynced (unless ``durable`` is False) and renamed
    over ``path``; on any exception (``KeyboardInterrupt`` included) it is removed and the
    exception propagates.

    ``durable=False`` skips the fsync (about 4 ms a file on this project's VMs): the write stays
    atomic for a killed process, not for a power cut. For bulk dataset files, whose folder's index
    is written (durably) last.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        if durable:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes, durable: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`); returns ``path``."""
    with atomic_path(path, durable) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` as UTF-8 to ``path`` atomically (see :func:`atomic_path`); returns ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder to fill; on success it replaces the folder ``path``.

    The temporary folder lives in a hidden staging folder beside ``path`` (same file system).
    When the block ends without error, the old folder (if any) is moved aside, the new one moved
    to ``path`` and the old one deleted: readers find the old folder or the complete new one
    (or, between the two renames, none), never a partial one. On any exception the staging folder
    is removed, ``path`` is left as it was, and the exception propagates.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        new = staging / "new"
        new.mkdir()
        yield new
        old = staging / "old"
        if path.exists():
            os.replace(path, old)
        try:
            os.replace(new, path)
        except BaseException:
            if old.exists():
                os.replace(old, path)
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
