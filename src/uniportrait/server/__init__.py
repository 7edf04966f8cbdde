"""Serving: one process with the REST API (FastAPI) and the web UI (Gradio), sharing one pipeline.

    from uniportrait.server import ServerConfig, create_app
    app = create_app(pipe, ServerConfig(workers=1, queue_size=8))   # then run it with uvicorn

or from the command line: ``uniportrait serve --preset tiny``. Needs the ``serve`` extra
(``pip install 'uniportrait[serve]'``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from uniportrait.errors import UniPortraitError
from uniportrait.server.config import API_KEY_ENV, Limits, ServerConfig

if TYPE_CHECKING:
    from fastapi import FastAPI

__all__ = ["API_KEY_ENV", "Limits", "ServerConfig", "create_app"]


def create_app(pipe, config: ServerConfig | None = None) -> FastAPI:
    """The FastAPI app (API, docs, and the UI unless ``config.ui`` is False) around ``pipe``."""
    import importlib.util

    for module, package in (("fastapi", "fastapi"), ("python_multipart", "python-multipart")):
        if importlib.util.find_spec(module) is None:
            raise UniPortraitError(
                f"serving needs the 'serve' extra ({package} is missing): pip install 'uniportrait[serve]'"
            )
    from uniportrait.server.api import create_app as _create_app

    return _create_app(pipe, config)
