"""Browser-facing protections: the ``Host`` names the server answers, and same-origin writes.

Two attacks need no API key and no access to the port from outside, only a web page the user
visits while the server runs on their machine (see ``docs/security.md``):

* **Cross-site requests.** A page may POST a multipart form to ``http://127.0.0.1:7860`` (a
  "simple" request: no CORS preflight). Browsers send ``Origin`` with every cross-origin POST
  and with every WebSocket, so state-changing requests (and WebSockets) whose ``Origin`` (or,
  without one, ``Referer``) is not this server's own are refused. Programs (curl, httpx) send
  neither header and are not affected.
* **DNS rebinding.** A page at ``evil.example`` whose name is made to resolve to 127.0.0.1
  becomes "same-origin" with the server and could read its answers. Its requests carry
  ``Host: evil.example``, so the server answers only ``Host`` names it serves: ``localhost``,
  IP addresses (a rebinding page cannot make its requests carry one), the ``--host`` it
  binds, and the ``--allowed-hosts`` names (``*``: any, e.g. behind a proxy that checks).
"""

from __future__ import annotations

import ipaddress
import json
import threading
import time
from collections import deque
from collections.abc import Iterable
from urllib.parse import urlsplit

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LOCAL_NAMES = frozenset({"localhost", "localhost.localdomain"})


def split_host(value: str) -> tuple[str, str | None]:
    """``"name:port"`` / ``"[::1]:port"`` / ``"name"`` → (lower-case name, port or None)."""
    value = value.strip().lower()
    if value.startswith("["):
        name, _, rest = value[1:].partition("]")
        return name, rest[1:] if rest.startswith(":") else None
    name, sep, port = value.rpartition(":")
    if not sep or ":" in name:  # no port, or a bare IPv6 address
        return value, None
    return name, port


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class HostPolicy:
    """Which ``Host`` names are served; ``"*"`` in ``allowed`` serves any."""

    def __init__(self, bind_host: str, allowed: Iterable[str] = ()) -> None:
        names = {h.strip().lower().strip("[]") for h in allowed if h.strip()}
        self.any = "*" in names
        self.names = frozenset(names | LOCAL_NAMES | {bind_host.lower().strip("[]")})

    def allows(self, host_header: str | None) -> bool:
        if self.any:
            return True
        if not host_header:
            return False
        name, _ = split_host(host_header)
        return name in self.names or _is_ip(name)


class BrowserGuard:
    """ASGI middleware: refuse unknown ``Host`` names (403 ``host_not_allowed``) and cross-origin
    writes and WebSockets (403 ``cross_origin``)."""

    def __init__(self, app, policy: HostPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = headers.get("host")
        if not self.policy.allows(host):
            return await _refuse(
                scope,
                send,
                "host_not_allowed",
                f"this server does not answer for Host {host!r}; start it with --allowed-hosts to add a name",
            )
        is_write = scope["type"] == "websocket" or scope.get("method", "GET") not in SAFE_METHODS
        if is_write and not _same_origin(headers, host):
            return await _refuse(
                scope, send, "cross_origin", "cross-origin requests may not change anything on this server"
            )
        return await self.app(scope, receive, send)


def _same_origin(headers: dict[str, str], host: str | None) -> bool:
    """True unless the request says (Origin, else Referer) that it comes from another origin."""
    source = headers.get("origin") or headers.get("referer")
    if source is None:
        return True  # not sent by a browser on another site's behalf
    if source == "null" or not host:
        return False  # sandboxed frames, file:// pages, data: URLs
    parts = urlsplit(source)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return False
    origin_name, origin_port = split_host(parts.netloc)
    host_name, host_port = split_host(host)
    default = "443" if parts.scheme == "https" else "80"
    return origin_name == host_name and (origin_port or default) == (host_port or default)


async def _refuse(scope, send, code: str, message: str) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008, "reason": code})
        return
    body = json.dumps({"detail": message, "code": code}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 403,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


class KeyGuard:
    """Slows down API-key guessing: after ``max_failures`` wrong keys from one client address
    within ``window_s``, that address is refused (HTTP 429) until the window has passed."""

    def __init__(self, max_failures: int = 10, window_s: float = 60.0) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, client: str, now: float) -> deque[float]:
        times = self._failures.setdefault(client, deque())
        while times and times[0] <= now - self.window_s:
            times.popleft()
        return times

    def retry_after(self, client: str) -> int:
        """Seconds until ``client`` may try again (0: now)."""
        now = time.monotonic()
        with self._lock:
            times = self._recent(client, now)
            if len(times) < self.max_failures:
                if not times:
                    self._failures.pop(client, None)
                return 0
            return max(1, int(times[0] + self.window_s - now) + 1)

    def failed(self, client: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._recent(client, now).append(now)
