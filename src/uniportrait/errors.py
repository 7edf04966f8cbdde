"""User-facing errors.

Anything the user can fix (a missing file, a photo without a face, a bad setting) raises a
subclass of :class:`UniPortraitError` with a one-line message. The command line prints it as
``error: <message>`` and exits non-zero; library users catch it like any exception.
"""

from __future__ import annotations


class UniPortraitError(Exception):
    """Base class for errors caused by the user's input or environment."""

    exit_code = 2


class ConfigError(UniPortraitError, ValueError):
    """A configuration (``config.json``, a YAML file, an option) has an unknown key or a bad value.

    Also a ``ValueError``, so code that validated configs with ``except ValueError`` still works.
    """


class CheckpointError(UniPortraitError):
    """A checkpoint is missing, malformed, or does not match the model (names the keys)."""


class WeightsNotFoundError(UniPortraitError):
    """Real weights were asked for but are neither on disk nor in the Hugging Face cache."""


class InvalidImageError(UniPortraitError):
    """A file is not a readable image, is truncated, or is too large."""


class NoFaceError(UniPortraitError):
    """No usable face was found in a photo."""


class IdentityError(UniPortraitError):
    """An identity is unknown, malformed, or was made by another encoder."""
