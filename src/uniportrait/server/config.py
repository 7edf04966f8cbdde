"""Server settings: where to listen, how much work to accept, and the limits on each request."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from uniportrait.errors import ConfigError
from uniportrait.settings import GenerationLimits

API_KEY_ENV = "UNIPORTRAIT_API_KEY"
MB = 1024 * 1024


@dataclass(frozen=True)
class Limits(GenerationLimits):
    """What one request may ask for: the generation limits (steps, images, people, image side,
    prompt length; see :mod:`uniportrait.settings`) and the upload limits. Anything beyond is
    refused with a message naming the limit."""

    max_upload_bytes: int = 10 * MB  # one uploaded photo
    max_request_bytes: int = 64 * MB  # a whole request body
    max_pixels: int = 16_000_000  # one uploaded photo, width × height (read from the header)
    max_photos: int = 8  # photos per identity (mix photos included)


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
        default_side, default_steps: what a request that does not say gets (None: the
            preset's, see :mod:`uniportrait.presets.registry`).
        ui: mount the Gradio web UI at ``/ui``.
        host: the address the server binds (a name here is also a ``Host`` it answers).
        allowed_hosts: more ``Host`` names to answer (``"*"``: any); localhost and IP
            addresses are always answered (see :mod:`uniportrait.server.security`).
        temp_dir: where the web UI keeps uploads and results (None: a new folder in the system's
            temp folder, removed at exit); files older than ``temp_ttl_s`` are deleted.
        body_timeout_s: a request body must arrive within this many seconds (else HTTP 408);
            slow clients cannot hold a connection by trickling an upload.
    """

    limits: Limits = field(default_factory=Limits)
    workers: int = 1
    queue_size: int = 8
    timeout_s: float = 600.0
    api_key: str | None = None
    home: str | None = None
    preset: str = "tiny"
    default_side: int | None = None
    default_steps: int | None = None
    ui: bool = True
    host: str = "127.0.0.1"
    allowed_hosts: tuple[str, ...] = ()
    temp_dir: str | None = None
    temp_ttl_s: float = 3600.0
    body_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        from uniportrait.presets.registry import preset_defaults

        defaults = preset_defaults(self.preset)
        if self.default_side is None:
            object.__setattr__(self, "default_side", min(defaults.side, self.limits.max_side))
        if self.default_steps is None:
            object.__setattr__(self, "default_steps", min(defaults.steps, self.limits.max_steps))
        if self.workers < 1:
            raise ConfigError("workers must be at least 1")
        if self.queue_size < 0:
            raise ConfigError("queue_size must be 0 or more")
        if not self.timeout_s > 0:
            raise ConfigError("timeout_s must be positive")
        if not self.body_timeout_s > 0:
            raise ConfigError("body_timeout_s must be positive")
        if not self.temp_ttl_s > 0:
            raise ConfigError("temp_ttl_s must be positive")

    @staticmethod
    def api_key_from_env() -> str | None:
        """``$UNIPORTRAIT_API_KEY``, or None when unset or empty."""
        return os.environ.get(API_KEY_ENV) or None
