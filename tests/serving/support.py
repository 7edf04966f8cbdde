"""Helpers for the serving tests: live servers, small limits, a pipeline that can be held busy.

Live servers run uvicorn on 127.0.0.1, on a free port, in a thread of the test process.
"""

from __future__ import annotations

import base64
import contextlib
import io
import socket
import threading
import time
from collections.abc import Iterator

import numpy as np
import PIL.Image

from uniportrait.server import Limits, ServerConfig

# Small limits so every one of them is easy to hit.
TEST_LIMITS = Limits(
    max_upload_bytes=200_000,
    max_request_bytes=1_000_000,
    max_pixels=400 * 400,
    max_steps=4,
    max_images=2,
    max_identities=2,
    max_photos=3,
    max_side=128,
)
TEST_CONFIG = ServerConfig(
    limits=TEST_LIMITS, workers=2, queue_size=8, timeout_s=60, default_side=64, default_steps=2, ui=False
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def live_server(app) -> Iterator[str]:
    """Serve ``app`` with uvicorn on 127.0.0.1 (a free port) in a thread; yields the base URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def decode_png(b64: str) -> np.ndarray:
    """A base64 PNG from the API → (H, W, C) uint8."""
    return np.asarray(PIL.Image.open(io.BytesIO(base64.b64decode(b64))))


def png_bytes(image: PIL.Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class GatedPipe:
    """The tiny pipeline, but every call waits for ``gate`` first, so a test can keep workers busy."""

    def __init__(self, pipe) -> None:
        self._pipe = pipe
        self.gate = threading.Event()
        self.calls = 0
        self.entered = threading.Semaphore(0)

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        self.entered.release()
        self.gate.wait(timeout=30)
        return self._pipe(*args, **kwargs)
