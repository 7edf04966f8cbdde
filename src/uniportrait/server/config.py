"""Server settings: where to listen, how much work to accept, and the limits on each request."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

API_KEY_ENV = "UNIPORTRAIT_API_KEY"
MB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """What one request may ask for. Anything beyond is refused with a message naming the limit."""

    max_upload_bytes: int = 10 * MB  # one uploaded photo
    max_request_bytes: int = 64 * MB  # a whole request body
    max_pixels: int = 16_000_000  # one uploaded photo, width × height (read from the header)
    max_steps: int = 50
    max_images: int = 4  # images per request
    max_identities: int = 4  # people per request
    max_photos: int = 8  # photos per identity (mix photos included)
    max_side: int = 1024  # width and height of generated images
    max_prompt_chars: int = 1000

    def __post_init__(self) -> None:
        for name, value in self.__dict__.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"limit {name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class ServerConfig:
    """How the server runs.

    Attributes:
        workers: threads that run generations (the pipeline is shared; 1–2 suit a CPU).
        queue_size: requests that may wait for a worker; beyond that, HTTP 429 with Retry-After.
        timeout_s: per-request limit, queueing included; beyond it, HTTP 504. A job that has not
            started by then never runs; one that has stops at its next stage boundary.
        api_key: when set, every ``/v1`` call needs ``Authorization: Bearer <key>`` (or
            ``X-API-Key``) and the web UI asks for it as its password.
        home: identity bank location (default ``$UNIPORTRAIT_HOME``).
        default_side: the UI's initial image size (256 for tiny, 512 for sd15).
        ui: mount the Gradio web UI at ``/ui``.
    """

    limits: Limits = field(default_factory=Limits)
    workers: int = 1
    queue_size: int = 8
    timeout_s: float = 600.0
    api_key: str | None = None
    home: str | None = None
    preset: str = "tiny"
    default_side: int = 256
    default_steps: int = 25
    ui: bool = True

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError("workers must be at least 1")
        if self.queue_size < 0:
            raise ValueError("queue_size must be 0 or more")
        if not self.timeout_s > 0:
            raise ValueError("timeout_s must be positive")

    @staticmethod
    def api_key_from_env() -> str | None:
        """``$UNIPORTRAIT_API_KEY``, or None when unset or empty."""
        return os.environ.get(API_KEY_ENV) or None
