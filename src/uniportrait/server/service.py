"""What the web UI and the REST API both do: check requests against the limits, turn uploaded
photos and stored names into identities, generate, and manage the identity bank.

Everything a request needs travels in its :class:`GenerateRequest`; the one pipeline is shared
by all worker threads (its per-call settings travel in the call, see
:mod:`uniportrait.pipeline`). Problems the caller can fix raise :class:`ServiceError` with an
HTTP status, a short code and a one-line message.
"""

from __future__ import annotations

import io
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import PIL.Image
import torch

from uniportrait.bank import IdentityBank, IdentityInfo, check_name
from uniportrait.errors import IdentityError, InvalidImageError, NoFaceError, UniPortraitError
from uniportrait.identity import Identity, check_mix_scales
from uniportrait.server.config import MB, Limits
from uniportrait.server.jobs import Deadline
from uniportrait.settings import (
    FACEID_SCALE,
    GUIDANCE_SCALE,
    MIX_SCALE,
    NUM_IMAGES,
    SEED,
    STEPS,
    SettingError,
    check_prompt,
    check_settings,
)

logger = logging.getLogger(__name__)

MAX_SEED = SEED.high


class ServiceError(Exception):
    """A request the server refuses: ``status`` (HTTP), ``code`` (stable, for programs), message."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


@dataclass(frozen=True)
class Upload:
    """One uploaded photo: its bytes and the name to use in messages."""

    data: bytes
    filename: str = "photo"


@dataclass
class IdentityRequest:
    """One person: uploaded photos, or the name of a stored identity; optionally faces mixed in."""

    photos: list[Upload] = field(default_factory=list)
    name: str | None = None
    mix: list[Upload] = field(default_factory=list)
    mix_scale: float = 0.0
    label: str | None = None  # names it in messages (default "identity <k>")


@dataclass
class GenerateRequest:
    """One generation. ``seed=None`` picks a random seed (returned with the result)."""

    prompt: str
    identities: list[IdentityRequest] = field(default_factory=list)
    negative_prompt: str | None = None
    seed: int | None = None
    steps: int = STEPS.default
    guidance_scale: float = GUIDANCE_SCALE.default
    identity_guidance: float | None = None
    faceid_scale: float = FACEID_SCALE.default
    structure_scale: float | None = None
    width: int = 512
    height: int = 512
    num_images: int = NUM_IMAGES.default
    routing: bool = False


@dataclass
class GenerateResult:
    """Images, and per image the routing overlay and maps (N, H, W) when asked for (2+ people);
    per identity the aligned 224×224 faces that were used."""

    images: list[PIL.Image.Image]
    overlays: list[PIL.Image.Image | None]
    routing_maps: list[np.ndarray] | None
    faces: list[list[PIL.Image.Image]]
    seed: int
    seconds: float
    nsfw: list[bool] | None = None  # per image, when the pipeline has a safety checker


def invalid(message: str) -> ServiceError:
    return ServiceError(422, "invalid_request", message)


class PortraitService:
    """The shared pipeline, face analyzer and identity bank, behind checks and limits."""

    def __init__(
        self,
        pipe,
        limits: Limits | None = None,
        bank: IdentityBank | None = None,
        analyzer=None,
        analyzer_name: str = "mtcnn",
    ):
        self.pipe = pipe
        self.limits = limits or Limits()
        self.bank = bank or IdentityBank()
        self._analyzer = analyzer
        self._analyzer_name = analyzer_name  # used when no analyzer is given (the preset's)
        self._analyzer_lock = threading.Lock()
        self._bank_lock = threading.Lock()

    @property
    def analyzer(self):
        with self._analyzer_lock:  # built on first use; it serialises its own detector calls
            if self._analyzer is None:
                from uniportrait.faces import get_face_analyzer

                self._analyzer = get_face_analyzer(self._analyzer_name)
            return self._analyzer

    # -- checks (cheap: run before a request is queued) ----------------------------------------

    def check_generate(self, request: GenerateRequest) -> None:
        lim = self.limits
        try:
            check_prompt(request.prompt, "prompt", lim, style="api")
            if request.negative_prompt is not None:
                check_prompt(request.negative_prompt, "negative_prompt", lim, required=False, style="api")
            check_settings(
                {
                    "num_inference_steps": request.steps,
                    "num_images_per_prompt": request.num_images,
                    "width": request.width,
                    "height": request.height,
                    "seed": request.seed,
                    "faceid_scale": request.faceid_scale,
                    "guidance_scale": request.guidance_scale,
                    "identity_guidance_scale": request.identity_guidance,
                    "face_structure_scale": request.structure_scale,
                },
                lim,
                "api",
                num_identities=len(request.identities),
            )
        except SettingError as err:
            raise invalid(str(err)) from None
        n_ids = len(request.identities)
        if n_ids >= 2 and not self.pipe.adapter.config.multi_id:
            raise invalid("this model has no router weights: it takes one identity per request")
        for k, ident in enumerate(request.identities, start=1):
            self.check_identity_request(ident, ident.label or f"identity {k}")

    def check_identity_request(self, ident: IdentityRequest, label: str) -> None:
        if bool(ident.photos) == bool(ident.name):
            raise invalid(f"{label}: give either photos or the name of a stored identity (not both)")
        if len(ident.photos) + len(ident.mix) > self.limits.max_photos:
            raise invalid(
                f"{label}: {len(ident.photos) + len(ident.mix)} photos given; "
                f"the limit is {self.limits.max_photos} per identity"
            )
        try:
            MIX_SCALE.check(ident.mix_scale, style="api")
        except SettingError as err:
            raise invalid(f"{label}: {err}") from None
        for upload in [*ident.photos, *ident.mix]:
            self.check_upload_size(upload, label)
        if ident.name:
            self.stored_info(ident.name)  # invalid (400) or unknown (404) names fail now

    def check_upload_size(self, upload: Upload, label: str) -> None:
        limit = self.limits.max_upload_bytes
        if len(upload.data) > limit:
            raise ServiceError(
                413,
                "upload_too_large",
                f"{label}: photo {upload.filename!r} is {len(upload.data) / MB:.1f} MB; "
                f"the limit is {limit / MB:g} MB per photo",
            )

    # -- photos → identities (worker threads) --------------------------------------------------

    def load_photo(self, upload: Upload, label: str) -> PIL.Image.Image:
        """Decode one upload as RGB, refusing oversized files and pixel counts before decoding."""
        from uniportrait.faces import load_image
        from uniportrait.faces.image_io import describe_source

        self.check_upload_size(upload, label)
        where = f"{label}: photo {upload.filename!r}"
        limit = self.limits.max_pixels
        try:
            with PIL.Image.open(io.BytesIO(upload.data)) as probe:  # reads the header only
                width, height = probe.size
        except PIL.Image.DecompressionBombError:
            width = height = limit + 1
        except Exception:
            width = height = 0  # not an image: load_image says so below
        if width * height > limit:
            raise ServiceError(
                413,
                "too_many_pixels",
                f"{where} has {width * height:,} pixels ({width}x{height}); the limit is {limit:,}",
            )
        try:
            return load_image(upload.data, max_pixels=limit)
        except InvalidImageError as err:
            message = str(err).replace(describe_source(upload.data), where)
            raise ServiceError(400, "invalid_image", message) from None

    def aligned_faces(self, uploads: list[Upload], label: str, deadline: Deadline) -> list[PIL.Image.Image]:
        from uniportrait.faces import extract_faces

        crops = []
        for upload in uploads:
            deadline.check()
            image = self.load_photo(upload, label)
            try:
                faces = extract_faces(
                    image, self.analyzer, max_faces=1, name=f"{label}: photo {upload.filename!r}"
                )
            except NoFaceError as err:
                raise ServiceError(422, "no_face", str(err)) from None
            crops.append(faces[0][1])
        return crops

    def build_identity(self, ident: IdentityRequest, label: str, deadline: Deadline) -> Identity:
        """Photos are detected, aligned and encoded; a stored name is read from the bank."""
        from uniportrait.faces import aligner_id

        mixed = []
        if ident.mix:
            mix_crops = self.aligned_faces(ident.mix, f"{label} (mix)", deadline)
            with torch.inference_mode():
                mixed.append((self.pipe.encode_identity(mix_crops), float(ident.mix_scale)))
        if ident.name:
            identity = self.stored_identity(ident.name)
            identity.mix = identity.mix + mixed
            try:
                check_mix_scales([s for _, s in identity.mix])
            except IdentityError as err:
                raise invalid(f"{label}: {err}") from None
            return identity
        crops = self.aligned_faces(ident.photos, label, deadline)
        deadline.check()
        with torch.inference_mode():
            identity = self.pipe.encode_identity(crops, mix=mixed)
        identity.crops = torch.from_numpy(np.stack([np.asarray(c) for c in crops]))
        identity.aligner = aligner_id(self.analyzer)
        return identity

    # -- generation (worker threads) -----------------------------------------------------------

    def generate(self, request: GenerateRequest, deadline: Deadline) -> GenerateResult:
        from uniportrait.visualize import routing_overlay

        start = time.monotonic()
        identities = [
            self.build_identity(ident, ident.label or f"identity {k}", deadline)
            for k, ident in enumerate(request.identities, start=1)
        ]
        seed = secrets.randbelow(2**31) if request.seed is None else request.seed
        want_maps = request.routing and len(identities) >= 2
        deadline.check()
        try:
            out = self.pipe(
                request.prompt,
                identities=identities,
                negative_prompt=request.negative_prompt or None,
                faceid_scale=float(request.faceid_scale),
                face_structure_scale=request.structure_scale,
                num_inference_steps=request.steps,
                guidance_scale=float(request.guidance_scale),
                identity_guidance_scale=request.identity_guidance,  # checked above: a number or None
                height=request.height,
                width=request.width,
                num_images_per_prompt=request.num_images,
                generator=torch.Generator().manual_seed(seed),
                return_routing_maps=want_maps,
                callback_on_step_end=lambda _pipe, _step, _t, _tensors: deadline.check(),
            )
        except UniPortraitError as err:
            raise invalid(str(err)) from None
        maps = [m.numpy() for m in out.routing_maps] if want_maps else None
        overlays = [routing_overlay(img, m) for img, m in zip(out.images, maps)] if maps else []
        return GenerateResult(
            images=list(out.images),
            overlays=overlays or [None] * len(out.images),
            routing_maps=maps,
            faces=[_crops(i) for i in identities],
            seed=seed,
            seconds=time.monotonic() - start,
            nsfw=getattr(out, "nsfw_content_detected", None),
        )

    # -- the identity bank ---------------------------------------------------------------------

    def check_name(self, name: str) -> str:
        try:
            return check_name(name)
        except IdentityError as err:
            raise ServiceError(400, "invalid_name", str(err)) from None

    def stored_info(self, name: str) -> IdentityInfo:
        self.check_name(name)
        try:
            return self.bank.info(name)
        except IdentityError:
            known = ", ".join(i.name for i in self.bank.list()) or "none"
            raise ServiceError(
                404, "unknown_identity", f"unknown identity {name!r} (stored: {known})"
            ) from None

    def stored_identity(self, name: str) -> Identity:
        info = self.stored_info(name)
        if info.problem is not None:
            raise ServiceError(
                409,
                "damaged_identity",
                f"identity {name!r} is damaged ({info.problem}); delete it and add it again",
            )
        try:
            identity = self.bank.get(name)
        except (IdentityError, OSError):  # deleted meanwhile, or unreadable
            raise ServiceError(404, "unknown_identity", f"identity {name!r} is gone or unreadable") from None
        try:
            self.pipe.check_identity(identity)
        except IdentityError as err:
            raise ServiceError(409, "encoder_mismatch", str(err)) from None
        return identity

    def list_identities(self) -> list[dict]:
        return [self.describe(info) for info in self.bank.list()]

    def describe(self, info: IdentityInfo) -> dict:
        """Public facts about a stored identity (no server paths)."""
        return {
            "name": info.name,
            "references": info.references,
            "mixes": info.mixes,
            "created": info.created,
            "encoder": info.encoder,
            "aligner": info.aligner,
            "usable": info.problem is None and info.encoder == self.pipe.encoder_id and info.current,
            "damaged": info.problem,
        }

    def check_new_identity(self, name: str, ident: IdentityRequest, overwrite: bool) -> None:
        self.check_name(name)
        if ident.name or not ident.photos:
            raise invalid("a new identity needs one or more photos")
        self.check_identity_request(ident, f"identity {name!r}")
        if self.bank.exists(name) and not overwrite:
            raise ServiceError(
                409, "identity_exists", f"identity {name!r} already exists (set overwrite to replace it)"
            )

    def add_identity(self, name: str, ident: IdentityRequest, overwrite: bool, deadline: Deadline) -> dict:
        self.check_new_identity(name, ident, overwrite)
        identity = self.build_identity(ident, f"identity {name!r}", deadline)
        deadline.check()
        with self._bank_lock:
            if self.bank.exists(name) and not overwrite:  # added meanwhile
                raise ServiceError(409, "identity_exists", f"identity {name!r} already exists")
            self.bank.add(name, identity, overwrite=overwrite)
        return self.describe(self.bank.info(name))

    def remove_identity(self, name: str) -> None:
        self.stored_info(name)
        with self._bank_lock:
            try:
                self.bank.remove(name)
            except IdentityError:
                raise ServiceError(404, "unknown_identity", f"unknown identity {name!r}") from None


def _crops(identity: Identity) -> list[PIL.Image.Image]:
    if identity.crops is None:
        return []
    return [PIL.Image.fromarray(c.numpy()) for c in identity.crops]
