"""The REST API on a live server (tiny preset): generation, the identity bank, and every refusal
with its status code, error code and message."""

from __future__ import annotations

import base64
import io

import numpy as np
import PIL.Image
import pytest

from .support import TEST_LIMITS, decode_png, png_bytes

PROMPT = "a photo of a person at the beach"
FAST = {"prompt": PROMPT, "steps": "2", "width": "64", "height": "64", "seed": "7"}


def jpg(photos, name: str):
    return (f"{name}.jpg", photos[name], "image/jpeg")


def post_generate(client, files=(), **fields):
    return client.post("/v1/generate", data={**FAST, **fields}, files=list(files))


def refused(response, status: int, code: str, *words: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] == code, body
    for word in words:
        assert word in body["detail"], body["detail"]
    return body


# -- generating ----------------------------------------------------------------------------------


def test_healthz_and_docs(client):
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["queue"]["capacity"] == 10
    spec = client.get("/openapi.json").json()
    assert {"/v1/generate", "/v1/identities", "/v1/identities/{name}", "/healthz"} <= set(spec["paths"])
    page = client.get("/docs")
    assert page.status_code == 200
    assert "/docs-assets/swagger-ui-bundle.js" in page.text and "cdn." not in page.text  # works offline
    script = client.get("/docs-assets/swagger-ui-bundle.js")
    assert script.status_code == 200 and len(script.content) > 100_000
    assert client.get("/docs-assets/swagger-ui.css").status_code == 200
    assert client.get("/redoc").status_code == 404  # no packaged assets: not served


def test_generate_one_identity(client, photos):
    r = post_generate(client, [("id1", jpg(photos, "ffhq-0100"))])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["seed"] == 7 and len(body["images"]) == 1
    assert decode_png(body["images"][0]).shape == (64, 64, 3)
    assert [decode_png(f).shape for f in body["faces"][0]] == [(224, 224, 3)]  # the aligned face used
    assert body["routing_overlays"] is None  # one person: nothing to route
    assert body["nsfw_content_detected"] is None  # no safety checker on this pipeline


def test_generate_two_identities_with_routing(client, photos):
    files = [("id1", jpg(photos, "ffhq-0100")), ("id2", jpg(photos, "newton"))]
    r = post_generate(client, files, routing="true", num_images="2")
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["images"]) == len(body["routing_overlays"]) == 2
    assert decode_png(body["routing_overlays"][0]).shape == (64, 64, 3)
    assert [len(maps) for maps in body["routing_maps"]] == [2, 2]  # per image, one map per person
    maps = np.stack([decode_png(m) for m in body["routing_maps"][0]]).astype(int)
    assert abs(maps.sum(0) - 255).max() <= 2  # the router's weights sum to one at each pixel
    assert [len(f) for f in body["faces"]] == [1, 1]


def test_several_photos_per_person_and_mixing(client, photos):
    base = post_generate(client, [("id1", jpg(photos, "ffhq-0100"))]).json()
    several = post_generate(
        client, [("id1", jpg(photos, "ffhq-0100")), ("id1", jpg(photos, "ffhq-0293"))]
    ).json()
    mixed = post_generate(
        client, [("id1", jpg(photos, "ffhq-0100")), ("mix1", jpg(photos, "newton"))], mix1_scale="0.5"
    )
    assert len(several["faces"][0]) == 2
    assert mixed.status_code == 200, mixed.text
    for other in (several["images"][0], mixed.json()["images"][0]):
        assert not np.array_equal(decode_png(base["images"][0]), decode_png(other))


def test_png_and_multipart_formats(client, photos):
    r = post_generate(client, [("id1", jpg(photos, "ffhq-0100"))], format="png")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.headers["x-seed"] == "7"
    as_json = post_generate(client, [("id1", jpg(photos, "ffhq-0100"))]).json()
    assert np.array_equal(np.asarray(PIL.Image.open(io.BytesIO(r.content))), decode_png(as_json["images"][0]))
    r = post_generate(
        client,
        [("id1", jpg(photos, "ffhq-0100")), ("id2", jpg(photos, "newton"))],
        format="multipart",
        routing="true",
    )
    assert r.status_code == 200 and r.headers["content-type"].startswith("multipart/mixed; boundary=")
    for name in ("info.json", "image_00.png", "routing_00.png", "face_1_0.png", "face_2_0.png"):
        assert f'filename="{name}"'.encode() in r.content
    refused(post_generate(client, format="png", num_images="2"), 422, "invalid_request", "one image")


def test_random_seed_is_reported(client):
    a, b = post_generate(client, seed=""), post_generate(client, seed="")
    assert a.status_code == 200, a.text
    assert isinstance(a.json()["seed"], int) and a.json()["seed"] != b.json()["seed"]


# -- the identity bank ---------------------------------------------------------------------------


def test_identity_bank_round_trip(client, photos):
    r = client.post("/v1/identities", data={"name": "alice"}, files=[("photos", jpg(photos, "ffhq-0100"))])
    assert r.status_code == 201, r.text
    assert r.json()["name"] == "alice" and r.json()["references"] == 1 and r.json()["usable"]
    listed = client.get("/v1/identities").json()["identities"]
    assert [i["name"] for i in listed] == ["alice"] and "path" not in listed[0]
    shown = client.get("/v1/identities/alice").json()
    assert decode_png(shown["faces"][0]).shape == (224, 224, 3)

    # A stored identity gives exactly what uploading the same photo gives.
    newton = ("id2", jpg(photos, "newton"))
    stored = post_generate(client, [newton], id1="alice")
    uploaded = post_generate(client, [("id1", jpg(photos, "ffhq-0100")), newton])
    assert stored.status_code == 200, stored.text
    assert np.array_equal(decode_png(stored.json()["images"][0]), decode_png(uploaded.json()["images"][0]))

    refused(
        client.post("/v1/identities", data={"name": "alice"}, files=[("photos", jpg(photos, "newton"))]),
        409, "identity_exists", "already exists",
    )  # fmt: skip
    r = client.post(
        "/v1/identities",
        data={"name": "alice", "overwrite": "true"},
        files=[("photos", jpg(photos, "newton"))],
    )
    assert r.status_code == 201, r.text
    assert client.delete("/v1/identities/alice").json() == {"deleted": "alice"}
    assert client.get("/v1/identities").json() == {"identities": []}
    refused(client.delete("/v1/identities/alice"), 404, "unknown_identity", "alice")
    refused(post_generate(client, id1="alice"), 404, "unknown_identity", "unknown identity 'alice'")


def test_identity_from_another_encoder_is_refused(client, tiny_pipe, home):
    from uniportrait.bank import IdentityBank

    other = tiny_pipe.encode_identity(PIL.Image.new("RGB", (224, 224), (90, 60, 40)))
    other.encoder = "some-other-encoder"
    bank = IdentityBank(home)
    bank.add("stranger", other)
    refused(post_generate(client, id1="stranger"), 409, "encoder_mismatch", "another face encoder")
    assert [i["usable"] for i in client.get("/v1/identities").json()["identities"]] == [False]
    bank.remove("stranger")


# -- refusals ------------------------------------------------------------------------------------


def test_bad_uploads(client, photos):
    refused(post_generate(client, [("id1", ("notes.txt", b"hello, not a photo", "text/plain"))]),
            400, "invalid_image", "photo 'notes.txt'", "not an image")  # fmt: skip
    blank = png_bytes(PIL.Image.new("RGB", (200, 200), (128, 128, 128)))
    refused(
        post_generate(client, [("id1", ("wall.png", blank, "image/png"))]),
        422,
        "no_face",
        "no face found",
        "wall.png",
    )
    truncated = photos["ffhq-0100"][:3000]
    refused(
        post_generate(client, [("id1", ("cut.jpg", truncated, "image/jpeg"))]),
        400,
        "invalid_image",
        "cut.jpg",
    )


def test_size_limits(client, photos):
    big = b"\xff\xd8" + b"\0" * TEST_LIMITS.max_upload_bytes
    refused(
        post_generate(client, [("id1", ("big.jpg", big, "image/jpeg"))]),
        413,
        "upload_too_large",
        "big.jpg",
        "limit",
    )
    huge = b"\0" * (TEST_LIMITS.max_request_bytes + 1)
    refused(
        post_generate(client, [("id1", ("huge.jpg", huge, "image/jpeg"))]),
        413,
        "upload_too_large",
        "request body",
    )

    def chunks():  # no Content-Length: the limit must hold while the body streams in
        yield b'--x\r\nContent-Disposition: form-data; name="id1"; filename="a.jpg"\r\n\r\n'
        for _ in range(TEST_LIMITS.max_request_bytes // 65536 + 2):
            yield b"\0" * 65536

    streamed = client.post(
        "/v1/generate", content=chunks(), headers={"Content-Type": "multipart/form-data; boundary=x"}
    )
    refused(streamed, 413, "upload_too_large", "request body")
    many = png_bytes(PIL.Image.new("RGB", (401, 400)))  # a few KB, but 160,400 pixels
    refused(
        post_generate(client, [("id1", ("wide.png", many, "image/png"))]),
        413,
        "too_many_pixels",
        "160,400",
        "160,000",
    )


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"steps": "5"}, "steps must be between 1 and 4"),
        ({"num_images": "3"}, "num_images must be between 1 and 2"),
        ({"width": "256"}, "width must be between 64 and 128"),
        ({"height": "100"}, "height must be a multiple of 8"),
        ({"faceid_scale": "nan"}, "faceid_scale"),
        ({"structure_scale": "1.5"}, "structure_scale must be between 0.0 and 1.0"),
        ({"identity_guidance": "31"}, "identity_guidance must be between 0.0 and 30.0"),
        ({"prompt": " "}, "prompt must not be empty"),
        ({"steps": "many"}, "steps: Input should be a valid integer"),
        ({"step": "2"}, "unknown form field 'step'"),
        ({"id2": "alice"}, "without gaps"),
    ],
)
def test_settings_out_of_limits(client, fields, words):
    refused(post_generate(client, **fields), 422, "invalid_request", words)


def test_too_many_identities_and_photos(client, photos):
    three = [(f"id{k}", jpg(photos, "ffhq-0100")) for k in (1, 2, 3)]
    refused(post_generate(client, three), 422, "invalid_request", "3 identities given; the limit is 2")
    four_photos = [("id1", jpg(photos, n)) for n in ("ffhq-0100", "ffhq-0293", "ffhq-0381", "newton")]
    refused(post_generate(client, four_photos), 422, "invalid_request", "4 photos given; the limit is 3")
    both = [("id1", jpg(photos, "ffhq-0100"))]
    refused(post_generate(client, both, id1="alice"), 422, "invalid_request", "either photos or the name")


@pytest.mark.parametrize("name", ["../x", "..", ".hidden", "a/b", "x" * 65, "bob.safetensors"])
def test_bad_identity_names(client, photos, name):
    refused(post_generate(client, id1=name), 400, "invalid_name", "invalid identity name")
    add = client.post("/v1/identities", data={"name": name}, files=[("photos", jpg(photos, "ffhq-0100"))])
    refused(add, 400, "invalid_name", "invalid identity name")
    quoted = "".join(f"%{b:02X}" for b in name.encode())  # so the client cannot normalise '..'
    refused(client.delete(f"/v1/identities/{quoted}"), 400, "invalid_name")
    refused(client.get(f"/v1/identities/{quoted}"), 400, "invalid_name")


def test_api_key(serve):
    http = serve(api_key="s3cret")
    refused(http.get("/v1/identities"), 401, "missing_api_key", "Authorization: Bearer")
    assert http.get("/v1/identities").headers["www-authenticate"] == "Bearer"
    refused(http.get("/v1/identities", headers={"Authorization": "Bearer nope"}), 401, "wrong_api_key")
    refused(post_generate(http), 401, "missing_api_key")
    assert http.get("/v1/identities", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    r = http.post("/v1/generate", data=FAST, headers={"X-API-Key": "s3cret"})
    assert r.status_code == 200, r.text
    assert http.get("/healthz").status_code == 200  # liveness needs no key


def test_unknown_field_types_are_named(client):
    refused(post_generate(client, mix1="text"), 422, "invalid_request", "mix1: expected a photo upload")
    refused(post_generate(client, mix1_scale="lots"), 422, "invalid_request", "mix1_scale must be a number")


def test_b64_is_plain_png(client):
    body = post_generate(client).json()
    assert base64.b64decode(body["images"][0])[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_stalled_upload_is_answered_408_and_closed(serve):
    """A client that sends headers and part of a body, then nothing, does not hold the server."""
    import socket
    import time
    from urllib.parse import urlsplit

    http = serve(body_timeout_s=1.0)
    url = urlsplit(str(http.base_url))
    with socket.create_connection((url.hostname, url.port), timeout=20) as sock:
        sock.sendall(
            b"POST /v1/generate HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: multipart/form-data; boundary=xyz\r\nContent-Length: 5000\r\n\r\n--xyz\r\n"
        )
        started = time.monotonic()
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert time.monotonic() - started < 10
    assert http.get("/healthz").status_code == 200  # and the server still answers others
