"""HTTP plumbing: results as base64 JSON, a PNG, or ``multipart/mixed``; JSON errors; and the
guard that refuses request bodies over the size limit, or too slow to arrive, before they are
read."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import secrets

import PIL.Image
from fastapi.responses import JSONResponse, Response

from uniportrait.server.config import MB
from uniportrait.server.service import GenerateRequest, GenerateResult


def png_bytes(image: PIL.Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def b64png(image: PIL.Image.Image) -> str:
    return base64.b64encode(png_bytes(image)).decode("ascii")


def result_json(result: GenerateResult, request: GenerateRequest) -> dict:
    maps = None
    if result.routing_maps is not None:
        maps = [
            [b64png(PIL.Image.fromarray((m * 255).round().astype("uint8"))) for m in per]
            for per in result.routing_maps
        ]
    return {
        "seed": result.seed,
        "seconds": round(result.seconds, 3),
        "width": request.width,
        "height": request.height,
        "images": [b64png(img) for img in result.images],
        "routing_overlays": [b64png(o) for o in result.overlays] if request.routing and maps else None,
        "routing_maps": maps,
        "faces": [[b64png(face) for face in crops] for crops in result.faces],
        "nsfw_content_detected": result.nsfw,  # null without a safety checker; flagged images are black
    }


def multipart_response(result: GenerateResult, request: GenerateRequest) -> Response:
    """``multipart/mixed``: a JSON part (seed, sizes), then image_00.png, routing_00.png, face_1_0.png…"""
    boundary = secrets.token_hex(16)
    parts = [
        (
            "info.json",
            "application/json",
            json.dumps({"seed": result.seed, "images": len(result.images)}).encode(),
        )
    ]
    for k, (image, overlay) in enumerate(zip(result.images, result.overlays)):
        parts.append((f"image_{k:02d}.png", "image/png", png_bytes(image)))
        if overlay is not None and request.routing:
            parts.append((f"routing_{k:02d}.png", "image/png", png_bytes(overlay)))
    for i, crops in enumerate(result.faces, start=1):
        parts += [(f"face_{i}_{j}.png", "image/png", png_bytes(c)) for j, c in enumerate(crops)]
    chunks = []
    for name, kind, data in parts:
        head = f'--{boundary}\r\nContent-Type: {kind}\r\nContent-Disposition: attachment; filename="{name}"\r\n\r\n'
        chunks += [head.encode(), data, b"\r\n"]
    body = b"".join([*chunks, f"--{boundary}--\r\n".encode()])
    return Response(
        body, media_type=f"multipart/mixed; boundary={boundary}", headers={"X-Seed": str(result.seed)}
    )


def error_response(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"detail": message, "code": code}, status_code=status, headers=headers)


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes (declared or streamed) with 413, and bodies
    that take longer than ``timeout_s`` to arrive (a slow or stalled client) with 408."""

    def __init__(self, app, limit: int, timeout_s: float | None = None) -> None:
        self.app = app
        self.limit = limit
        self.timeout_s = timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"the request body is over the limit of {self.limit / MB:g} MB"
        too_large = error_response(413, "upload_too_large", message)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await too_large(scope, receive, send)
        state = {"received": 0, "refusal": None, "replaced": False, "body_done": False}
        loop = asyncio.get_running_loop()
        deadline = None if self.timeout_s is None else loop.time() + self.timeout_s

        async def counting_receive():
            if state["body_done"] or deadline is None:  # e.g. waiting for a disconnect later
                msg = await receive()
            else:
                try:
                    msg = await asyncio.wait_for(receive(), timeout=max(0.0, deadline - loop.time()))
                except asyncio.TimeoutError:
                    state["refusal"] = error_response(
                        408, "request_timeout", f"the request body did not arrive within {self.timeout_s:g} s"
                    )
                    return {"type": "http.disconnect"}
            if msg["type"] == "http.request":
                state["received"] += len(msg.get("body", b""))
                state["body_done"] = not msg.get("more_body", False)
                if state["received"] > self.limit:
                    state["refusal"] = too_large
                    return {"type": "http.disconnect"}
            return msg

        async def guarded_send(msg):
            if (
                state["refusal"] is not None
                and msg["type"] == "http.response.start"
                and not state["replaced"]
            ):
                state["replaced"] = True
                return await state["refusal"](scope, receive, send)
            if not state["replaced"]:
                await send(msg)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if state["refusal"] is None:
                raise
            if not state["replaced"]:  # the app gave up on the cut-off body with an error
                state["replaced"] = True
                await state["refusal"](scope, receive, send)
        if state["refusal"] is not None and not state["replaced"]:  # nothing answered yet
            await state["refusal"](scope, receive, send)
