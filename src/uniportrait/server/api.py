"""The FastAPI app: REST API under ``/v1``, health at ``/healthz``, OpenAPI at ``/docs``, and the
web UI mounted at ``/ui``.

Errors are JSON ``{"detail": "<one-line message>", "code": "<stable code>"}``:

=====  ==========================================================================================
400    ``invalid_image`` (not an image, corrupt), ``invalid_name`` (identity name)
401    ``missing_api_key``, ``wrong_api_key`` (only when ``UNIPORTRAIT_API_KEY`` is set)
404    ``unknown_identity``
409    ``identity_exists``, ``encoder_mismatch``, ``damaged_identity``
413    ``upload_too_large`` (one photo, or the whole body), ``too_many_pixels``
422    ``invalid_request`` (settings, limits on steps / images / identities / size), ``no_face``
429    ``queue_full``, ``too_many_attempts`` (wrong API keys), with a ``Retry-After`` header (seconds)
500    ``internal_error`` (a bug; the server logs the traceback)
504    ``timeout`` (the per-request time limit)
=====  ==========================================================================================
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
from contextlib import asynccontextmanager
from typing import Annotated, Literal

import PIL.Image
from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from starlette.datastructures import UploadFile as StarletteUpload

from uniportrait import __version__
from uniportrait.bank import IdentityBank
from uniportrait.errors import UniPortraitError
from uniportrait.server.config import ServerConfig
from uniportrait.server.jobs import ClientGone, JobTimeout, QueueFull, WorkQueue
from uniportrait.server.security import BrowserGuard, HostPolicy, KeyGuard
from uniportrait.server.service import (
    GenerateRequest,
    IdentityRequest,
    PortraitService,
    ServiceError,
    Upload,
)
from uniportrait.server.tempfiles import TempFolder
from uniportrait.server.transport import (
    BodyLimit,
    b64png,
    error_response,
    multipart_response,
    png_bytes,
    result_json,
)
from uniportrait.settings import (
    FACEID_SCALE,
    GUIDANCE_SCALE,
    IDENTITY_GUIDANCE,
    NUM_IMAGES,
    STRUCTURE_SCALE,
    widest_limits,
)

logger = logging.getLogger(__name__)

IDENTITY_FIELD = re.compile(r"^(id|mix)([1-9][0-9]?)(_scale)?$")


def _range(setting) -> str:
    return f"{setting.help}; {setting.low:g}–{setting.high:g}"


class GenerateForm(BaseModel):
    """The settings of ``POST /v1/generate`` (multipart form fields); people come as ``id<k>``."""

    prompt: str = Field(description="free-form text prompt")
    negative_prompt: str | None = None
    seed: int | None = Field(None, description="random when left out; the seed used is returned")
    steps: int | None = Field(None, description="denoising steps (default: the server's)")
    guidance_scale: float = Field(GUIDANCE_SCALE.default, description=_range(GUIDANCE_SCALE))
    identity_guidance: float | None = Field(None, description=_range(IDENTITY_GUIDANCE))
    faceid_scale: float = Field(FACEID_SCALE.default, description=_range(FACEID_SCALE))
    structure_scale: float | None = Field(None, description=_range(STRUCTURE_SCALE))
    width: int | None = Field(None, description="multiple of 8 (default: the server's)")
    height: int | None = Field(None, description="multiple of 8 (default: the server's)")
    num_images: int = NUM_IMAGES.default
    routing: bool = Field(False, description="also return routing-map overlays (two or more people)")
    format: Literal["json", "png", "multipart"] = Field(
        "json", description="json: base64 PNGs; png: the image itself; multipart: multipart/mixed PNG parts"
    )


GENERATE_DOC = """Generate images of the people given as form fields, in order:

* `id1`, `id2`, …: one or more **photos** of that person (repeat the field for several photos),
  **or** the **name** of a stored identity (a text field).
* `mix1`, `mix2`, …: optional photos of faces blended into person *k*, with `mix1_scale`, … in [0, 1].

Example: `curl -F prompt="two people in a cafe" -F id1=@alice.jpg -F id2=bob -F steps=20 …`
"""


BEARER = HTTPBearer(auto_error=False, description="the server's UNIPORTRAIT_API_KEY")
API_KEY_HEADER = APIKeyHeader(
    name="X-API-Key", auto_error=False, description="the server's UNIPORTRAIT_API_KEY"
)


def require_key(
    request: Request,
    token: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)],
    key: Annotated[str | None, Depends(API_KEY_HEADER)],
) -> None:
    """When the server has an API key, the request must carry it (Bearer token or X-API-Key)."""
    expected = request.app.state.config.api_key
    if expected is None:
        return
    guard: KeyGuard = request.app.state.key_guard
    client = request.client.host if request.client else "unknown"
    wait = guard.retry_after(client)
    if wait:
        raise ServiceError(
            429,
            "too_many_attempts",
            f"too many wrong API keys; retry in {wait} s",
            {"Retry-After": str(wait)},
        )
    given = key or (token.credentials if token else None)
    if not given:
        raise ServiceError(
            401,
            "missing_api_key",
            "this server needs an API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
        )
    if not hmac.compare_digest(given.encode(), expected.encode()):
        guard.failed(client)
        raise ServiceError(401, "wrong_api_key", "the API key is wrong")


def create_app(pipe, config: ServerConfig | None = None, service: PortraitService | None = None) -> FastAPI:
    """The app around one shared ``pipe``. ``config.api_key`` (or ``$UNIPORTRAIT_API_KEY`` via the
    command line) protects ``/v1`` and the UI."""
    config = config or ServerConfig()
    if service is None:
        from uniportrait.presets.registry import get_preset

        analyzer = get_preset(config.preset).face_analyzer  # e.g. the world's detector for world photos
        service = PortraitService(pipe, config.limits, IdentityBank(config.home), analyzer_name=analyzer)
    queue = WorkQueue(config.workers, config.queue_size)
    temp = TempFolder(config.temp_dir, config.temp_ttl_s) if config.ui else None  # the UI's files

    @asynccontextmanager
    async def lifespan(_app):
        sweeper = asyncio.create_task(_sweep_forever(temp)) if temp is not None else None
        try:
            yield
        finally:
            queue.shutdown()
            if sweeper is not None:
                sweeper.cancel()
            if temp is not None:
                temp.close()

    app = FastAPI(
        title="UniPortrait",
        version=__version__,
        description="Identity-preserving generation of one or several people. Web UI at [/ui](/ui).",
        lifespan=lifespan,
        docs_url=None,  # served from local assets below (FastAPI's own page loads them from a CDN)
        redoc_url=None,
    )
    _add_docs(app)
    app.state.service, app.state.queue, app.state.config = service, queue, config
    app.state.key_guard = KeyGuard()
    if hasattr(pipe, "generation_limits"):  # the pipeline must accept what the server accepts
        pipe.generation_limits = widest_limits(pipe.generation_limits, config.limits)
    app.add_middleware(BodyLimit, limit=config.limits.max_request_bytes, timeout_s=config.body_timeout_s)
    app.add_middleware(BrowserGuard, policy=HostPolicy(config.host, config.allowed_hosts))  # runs first

    @app.exception_handler(ServiceError)
    async def _service_error(_req, err: ServiceError):
        headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else err.headers
        return error_response(err.status, err.code, err.message, headers)

    @app.exception_handler(QueueFull)
    async def _queue_full(_req, err: QueueFull):
        return error_response(429, "queue_full", str(err), {"Retry-After": str(err.retry_after)})

    @app.exception_handler(ClientGone)
    async def _client_gone(_req, err: ClientGone):  # nobody reads it; the job was stopped
        return error_response(499, "client_gone", "the client disconnected; the job was stopped")

    @app.exception_handler(JobTimeout)
    async def _timeout(_req, err: JobTimeout):
        return error_response(504, "timeout", str(err))

    @app.exception_handler(UniPortraitError)
    async def _library_error(_req, err: UniPortraitError):
        return error_response(422, "invalid_request", str(err))

    @app.exception_handler(Exception)
    async def _internal(_req, err: Exception):  # a bug: logged with its traceback, answered as JSON
        logger.error("internal error: %s", err, exc_info=err)
        return error_response(500, "internal_error", "internal server error (see the server's log)")

    @app.exception_handler(RequestValidationError)
    async def _validation(_req, err: RequestValidationError):
        problems = [f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in err.errors()]
        return error_response(422, "invalid_request", "; ".join(problems))

    auth = [Depends(require_key)]

    @app.get("/", include_in_schema=False)
    async def root():
        return RedirectResponse("/ui/" if config.ui else "/docs")

    @app.get("/healthz", tags=["server"])
    async def healthz() -> dict:
        """Liveness and load; needs no API key."""
        return {"status": "ok", "version": __version__, "preset": config.preset, "queue": queue.stats()}

    @app.post("/v1/generate", tags=["generate"], dependencies=auth, description=GENERATE_DOC)
    async def generate(request: Request, form: Annotated[GenerateForm, Form()]):
        job = GenerateRequest(
            prompt=form.prompt,
            identities=await identities_from_form(request, service),
            negative_prompt=form.negative_prompt,
            seed=form.seed,
            steps=config.default_steps if form.steps is None else form.steps,
            guidance_scale=form.guidance_scale,
            identity_guidance=form.identity_guidance,
            faceid_scale=form.faceid_scale,
            structure_scale=form.structure_scale,
            width=config.default_side if form.width is None else form.width,
            height=config.default_side if form.height is None else form.height,
            num_images=form.num_images,
            routing=form.routing,
        )
        if form.format == "png" and job.num_images != 1:
            raise ServiceError(
                422, "invalid_request", "format=png returns one image; use json or multipart for several"
            )
        service.check_generate(job)

        def work(deadline):  # on a worker thread: generating and PNG-encoding stay off the event loop
            result = service.generate(job, deadline)
            if form.format == "png":
                headers = {"X-Seed": str(result.seed)}
                return Response(png_bytes(result.images[0]), media_type="image/png", headers=headers)
            if form.format == "multipart":
                return multipart_response(result, job)
            return JSONResponse(result_json(result, job))

        return await queue.run(work, config.timeout_s, request.is_disconnected)

    @app.get("/v1/identities", tags=["identities"], dependencies=auth)
    async def list_identities() -> dict:
        """Stored identities; ``usable`` says whether this server's encoder made them."""
        return {"identities": service.list_identities()}

    @app.post("/v1/identities", tags=["identities"], dependencies=auth, status_code=201)
    async def add_identity(
        request: Request,
        name: Annotated[str, Form(description="1–64 letters, digits, '_', '.', '-'")],
        photos: Annotated[list[UploadFile], File(description="one or more photos of the person")],
        mix: Annotated[list[UploadFile] | None, File(description="faces to blend in")] = None,
        mix_scale: Annotated[float, Form()] = 0.0,
        overwrite: Annotated[bool, Form()] = False,
    ) -> dict:
        """Detect, align and encode the photos, and store the identity under ``name``."""
        ident = IdentityRequest(
            photos=[await read_upload(f, service, f"identity {name!r}") for f in photos],
            mix=[await read_upload(f, service, f"identity {name!r} (mix)") for f in mix or []],
            mix_scale=mix_scale,
        )
        service.check_new_identity(name, ident, overwrite)
        return await queue.run(
            lambda d: service.add_identity(name, ident, overwrite, d),
            config.timeout_s,
            request.is_disconnected,
        )

    @app.get("/v1/identities/{name:path}", tags=["identities"], dependencies=auth)
    async def show_identity(name: str) -> dict:
        """One stored identity, with its aligned reference faces as base64 PNGs."""
        stored = service.stored_info(name)
        info = service.describe(stored)
        if stored.problem is not None:
            return {**info, "faces": []}
        identity = service.bank.get(name)
        crops = [] if identity.crops is None else [PIL.Image.fromarray(c.numpy()) for c in identity.crops]
        return {**info, "faces": [b64png(c) for c in crops]}

    @app.delete("/v1/identities/{name:path}", tags=["identities"], dependencies=auth)
    async def delete_identity(name: str) -> dict:
        service.remove_identity(name)
        return {"deleted": name}

    if config.ui:
        mount_ui(app, service, queue, config, temp)
    app.state.temp = temp
    return app


async def _sweep_forever(temp: TempFolder) -> None:
    while True:
        await asyncio.sleep(temp.period_s)
        await asyncio.to_thread(temp.sweep)


async def read_upload(upload: StarletteUpload, service: PortraitService, label: str) -> Upload:
    """Read one uploaded file, refusing it as soon as it is over the per-photo limit."""
    limit = service.limits.max_upload_bytes
    data = await upload.read(limit + 1)
    result = Upload(data, upload.filename or "photo")
    service.check_upload_size(result, label)
    return result


async def identities_from_form(request: Request, service: PortraitService) -> list[IdentityRequest]:
    """``id<k>`` (photos or a stored name), ``mix<k>`` (photos), ``mix<k>_scale`` → people in order."""
    form = await request.form()
    people: dict[int, IdentityRequest] = {}
    known = set(GenerateForm.model_fields)
    for key, value in form.multi_items():
        if key in known:
            continue
        match = IDENTITY_FIELD.match(key)
        if not match or (match.group(3) and match.group(1) != "mix"):
            raise ServiceError(
                422,
                "invalid_request",
                f"unknown form field {key!r}; expected {', '.join(sorted(known))}, id<k>, mix<k>, mix<k>_scale",
            )
        kind, k, is_scale = match.group(1), int(match.group(2)), bool(match.group(3))
        person = people.setdefault(k, IdentityRequest())
        label = f"{kind}{k}"
        if is_scale:
            try:
                person.mix_scale = float(value)
            except ValueError:
                raise ServiceError(422, "invalid_request", f"{key} must be a number, got {value!r}") from None
        elif isinstance(value, StarletteUpload):
            label = f"identity {k}" + (" (mix)" if kind == "mix" else "")
            (person.photos if kind == "id" else person.mix).append(await read_upload(value, service, label))
        elif kind == "id" and value.strip():
            if person.name is not None:
                raise ServiceError(422, "invalid_request", f"{label}: one stored identity name per person")
            person.name = value.strip()
        else:
            raise ServiceError(
                422, "invalid_request", f"{label}: expected a photo upload, got text {value!r}"
            )
    order = sorted(people)
    if order != list(range(1, len(order) + 1)):
        raise ServiceError(
            422, "invalid_request", f"people must be numbered id1, id2, … without gaps; got {order}"
        )
    return [people[k] for k in order]


def mount_ui(
    app: FastAPI, service: PortraitService, queue: WorkQueue, config: ServerConfig, temp: TempFolder
) -> None:
    """Mount the Gradio UI at ``/ui`` (password: the API key, when one is set); its uploads and
    results go to ``temp`` (Gradio reads its folder from ``GRADIO_TEMP_DIR`` when the UI is built)."""
    import os

    os.environ["GRADIO_TEMP_DIR"] = str(temp.path)
    try:
        import gradio as gr
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise UniPortraitError(
            "the web UI needs gradio: pip install 'uniportrait[serve]' (or start with --no-ui)"
        ) from err
    from uniportrait.server.ui import PortraitUI

    auth = None
    if config.api_key is not None:
        key = config.api_key

        def auth(_user: str, password: str) -> bool:
            return hmac.compare_digest(password.encode(), key.encode())

    blocks = PortraitUI(service, queue, config).build()
    gr.mount_gradio_app(
        app,
        blocks,
        path="/ui",
        auth=auth,
        auth_message="Password: the server's API key",
        max_file_size=config.limits.max_upload_bytes,
        show_error=True,
    )


def _add_docs(app: FastAPI) -> None:
    """``/docs`` (Swagger UI) with its JavaScript and CSS served by this server, from the
    ``swagger-ui-bundle`` package (the ``serve`` extra), so the page works offline. Without the
    package there is no ``/docs``; the schema is always at ``/openapi.json``. ReDoc has no
    packaged assets, so ``/redoc`` is not served."""
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:
        logger.info("swagger-ui-bundle is not installed: no /docs page (the schema is at /openapi.json)")
        return
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.staticfiles import StaticFiles

    app.mount("/docs-assets", StaticFiles(directory=str(swagger_ui_path)), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def _docs():
        return get_swagger_ui_html(
            openapi_url=app.openapi_url,
            title=f"{app.title} API",
            swagger_js_url="/docs-assets/swagger-ui-bundle.js",
            swagger_css_url="/docs-assets/swagger-ui.css",
            swagger_favicon_url="/docs-assets/favicon-32x32.png",
        )
