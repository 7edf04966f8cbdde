"""Fixtures for the serving tests. Without the ``serve`` extra they are not collected, except
under CI, where they must run (and fail loudly if something is missing)."""

from __future__ import annotations

import contextlib
import importlib.util
import os
from dataclasses import replace

import pytest

if not os.environ.get("CI") and not all(
    importlib.util.find_spec(m) for m in ("fastapi", "httpx", "uvicorn", "python_multipart")
):
    collect_ignore_glob = ["test_*.py"]  # pip install -e '.[serve]' to run them


@pytest.fixture(scope="session")
def photos() -> dict[str, bytes]:
    """The bundled sample photos as uploaded bytes: ``{"ffhq-0100": b"...", ...}``."""
    from uniportrait.faces import SAMPLE_PHOTOS, sample_photo

    return {name.removesuffix(".jpg"): sample_photo(name).read_bytes() for name in SAMPLE_PHOTOS}


@pytest.fixture
def serve(tiny_pipe, tmp_path):
    """``serve(pipe=None, **config_changes)`` → an ``httpx.Client`` on a fresh live server."""
    import httpx

    from uniportrait.server import create_app

    from .support import TEST_CONFIG, live_server

    stack = contextlib.ExitStack()

    def _serve(pipe=None, **changes) -> httpx.Client:
        config = replace(TEST_CONFIG, home=str(tmp_path / "home"), **changes)
        url = stack.enter_context(live_server(create_app(pipe or tiny_pipe, config)))
        return stack.enter_context(httpx.Client(base_url=url, timeout=60))

    with stack:
        yield _serve


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """The identity bank folder of the module's shared server."""
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def client(tiny_pipe, home):
    """One live server for a whole module (its identity bank is shared by the module's tests)."""
    import httpx

    from uniportrait.server import create_app

    from .support import TEST_CONFIG, live_server

    config = replace(TEST_CONFIG, home=str(home))
    with live_server(create_app(tiny_pipe, config)) as url, httpx.Client(base_url=url, timeout=60) as http:
        yield http
