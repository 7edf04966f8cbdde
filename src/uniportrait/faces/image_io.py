"""Reading photos safely and writing PNGs atomically.

:func:`load_image` is the one entry point for user photos: whatever comes in (a path, bytes, or a
PIL image in any mode), what comes out is an upright 8-bit RGB image, or an
:class:`~uniportrait.errors.InvalidImageError` with a one-line message naming the file.
:func:`save_png_atomic` writes through a temporary file in the target folder, so a crash or a
full disk never leaves a half-written PNG behind.
"""

from __future__ import annotations

import io
import logging
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from uniportrait.atomic import atomic_path
from uniportrait.errors import InvalidImageError, UniPortraitError

logger = logging.getLogger(__name__)

ImageSource = str | os.PathLike | bytes | Image.Image

DEFAULT_MAX_PIXELS = 50_000_000
# Errors PIL's decoders raise on corrupt or truncated data.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error)
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_WHITE = (255, 255, 255)


class ImageWriteError(UniPortraitError):
    """An output image could not be written (folder missing rights, disk full, ...)."""


def load_image(source: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Load a photo as an upright RGB image.

    Args:
        source: a file path, the encoded file's bytes, or a PIL image (any mode).
        max_pixels: refuse images whose declared width × height exceeds this. The check reads
            only the header, before any pixel is decoded. PIL's own decompression-bomb limit
            (``PIL.Image.MAX_IMAGE_PIXELS``, left untouched) still applies on top.

    Returns:
        A fully decoded ``RGB`` image with the EXIF orientation applied. Transparent pixels are
        composited on white; 16-bit and float greyscale are rescaled to 8 bit (not clipped).

    Raises:
        InvalidImageError: missing or empty file, not an image, truncated or corrupt data,
            too many pixels, or a mode that cannot be converted.
    """
    name = describe_source(source)
    if isinstance(source, Image.Image):
        image = source
        _check_size(image, max_pixels, name)
        _decode(image, name)
    else:
        image = _open(source, name, max_pixels)
    try:
        image = ImageOps.exif_transpose(image)
    except _DECODE_ERRORS as err:  # malformed EXIF: keep the pixels as stored
        logger.warning("ignoring unreadable EXIF orientation in %s (%s)", name, err)
    return to_rgb(image, name)


def describe_source(source: ImageSource) -> str:
    """A short human name for an image source, used in error messages."""
    if isinstance(source, Image.Image):
        filename = getattr(source, "filename", "")
        return str(filename) if filename else f"<{source.mode} image {source.width}x{source.height}>"
    if isinstance(source, bytes | bytearray | memoryview):
        return f"<{len(source)} bytes>"
    return os.fspath(source)


def _open(source: str | os.PathLike | bytes, name: str, max_pixels: int) -> Image.Image:
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
    else:
        path = Path(source)
        if not path.exists():
            raise InvalidImageError(f"file not found: {name}")
        if path.is_dir():
            raise InvalidImageError(f"{name} is a folder, not an image file")
        try:
            data = path.read_bytes()
        except OSError as err:
            raise InvalidImageError(f"cannot read {name}: {err.strerror or err}") from err
    if not data:
        raise InvalidImageError(f"{name} is empty (0 bytes)")
    with warnings.catch_warnings():
        # PIL only warns between its limit and twice that: make the warning an error too. (The
        # filter is process-wide while this block runs; with max_pixels below PIL's limit, as by
        # default, our own header check refuses those sizes anyway.)
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise InvalidImageError(f"{name} is too large to decode safely ({err})") from err
        except UnidentifiedImageError as err:
            raise InvalidImageError(f"{name} is not an image file (or not in a format PIL can read)") from err
        except _DECODE_ERRORS as err:
            raise InvalidImageError(f"{name} is corrupt: {err}") from err
        _check_size(image, max_pixels, name)
        _decode(image, name)
    return image


def _check_size(image: Image.Image, max_pixels: int, name: str) -> None:
    width, height = image.size
    if width <= 0 or height <= 0:
        raise InvalidImageError(f"{name} has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise InvalidImageError(
            f"{name} is too large: {width}x{height} = {width * height:,} pixels "
            f"(limit {max_pixels:,}; downscale it first)"
        )


def _decode(image: Image.Image, name: str) -> None:
    """Force the full decode now, so truncated data fails here and not later."""
    try:
        image.load()
    except _DECODE_ERRORS as err:
        raise InvalidImageError(f"{name} is truncated or corrupt: {err}") from err


def to_rgb(image: Image.Image, name: str = "image") -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (alpha composited on white, high bit depths rescaled)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*_WHITE, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_grey_to_uint8(np.asarray(image), mode), mode="L").convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as err:
        raise InvalidImageError(f"{name} has an unsupported colour mode {mode!r}") from err


def _grey_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """Rescale 16/32-bit integer or float greyscale to uint8.

    ``I;16*`` uses the full 0–65535 range. ``I`` (32-bit) is taken as 8-bit data when it fits in
    0–255, as 16-bit when it fits in 0–65535, and is min–max stretched otherwise. ``F`` is taken
    as 0–1 when it fits, as 0–255 when it fits, and is min–max stretched otherwise.
    """
    values = values.astype(np.float64)
    finite = values[np.isfinite(values)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if mode.startswith("I;16"):
        scale, offset = 255.0 / 65535.0, 0.0
    elif low >= 0 and high <= (1.0 if mode == "F" else 255.0):
        scale, offset = (255.0 if mode == "F" else 1.0), 0.0
    elif low >= 0 and high <= (255.0 if mode == "F" else 65535.0):
        scale, offset = (1.0 if mode == "F" else 255.0 / 65535.0), 0.0
    else:
        scale, offset = 255.0 / max(high - low, 1e-12), low
    values = np.nan_to_num(values, nan=offset, posinf=high, neginf=low)
    return np.clip(np.rint((values - offset) * scale), 0, 255).astype(np.uint8)


def save_png_atomic(
    image: Image.Image, path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> Path:
    """Write ``image`` as a PNG at ``path`` without ever leaving a partial file.

    The PNG is written through :func:`uniportrait.atomic.atomic_path`: a hidden temporary file in
    the same folder (created if missing), moved over ``path`` with :func:`os.replace`, which is
    atomic on one file system.
    ``metadata`` becomes PNG text chunks. Returns ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ImageWriteError: the folder cannot be created or written, or the write failed.
    """
    path = Path(path)
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ImageWriteError(f"cannot create output folder {folder}: {err.strerror or err}") from err
    info = PngImagePlugin.PngInfo()
    for key, value in (metadata or {}).items():
        info.add_text(str(key), str(value))
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            image.save(handle, format="PNG", pnginfo=info)
    except OSError as err:
        raise ImageWriteError(f"cannot write {path}: {err.strerror or err}") from err
    return path
