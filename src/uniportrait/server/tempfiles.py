"""The server's own temporary folder: the web UI's uploads and results live there, files older than
a time-to-live are deleted on a schedule, and the folder is emptied when the server stops."""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path

logger = logging.getLogger(__name__)


class TempFolder:
    """``path`` (given, or a new ``uniportrait-serve-*`` folder in the system's temp folder).

    :meth:`sweep` deletes what is older than ``ttl_s``; :meth:`close` deletes everything in it
    (and the folder itself when this object created it).
    """

    def __init__(self, path: str | None = None, ttl_s: float = 3600.0) -> None:
        if not ttl_s > 0:
            from uniportrait.errors import ConfigError

            raise ConfigError(f"the temporary files' time-to-live must be positive, got {ttl_s}")
        self.ttl_s = ttl_s
        self.owned = path is None
        self.path = Path(tempfile.mkdtemp(prefix="uniportrait-serve-")) if path is None else Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    @property
    def period_s(self) -> float:
        """How often :meth:`sweep` should run: a tenth of the time-to-live, 1 s to 10 min."""
        return min(max(self.ttl_s / 10, 1.0), 600.0)

    def sweep(self, now: float | None = None) -> int:
        """Delete files (and then empty folders) older than the time-to-live; returns how many files."""
        cutoff = (time.time() if now is None else now) - self.ttl_s
        removed = 0
        for path in sorted(self.path.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            try:
                if path.is_file() or path.is_symlink():
                    if path.lstat().st_mtime < cutoff:
                        path.unlink()
                        removed += 1
                elif path.is_dir() and not any(path.iterdir()):
                    path.rmdir()
            except OSError:  # in use or already gone: the next sweep gets it
                continue
        if removed:
            logger.info(
                "deleted %d temporary file(s) older than %g s from %s", removed, self.ttl_s, self.path
            )
        return removed

    def close(self) -> None:
        """Delete everything this server left in the folder."""
        if self.owned:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        for child in self.path.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
