"""What a hostile web page can make a browser send to a server on 127.0.0.1 (cross-site forms,
DNS rebinding), and the smaller gaps of the REST API, against a live server."""

from __future__ import annotations

import os

import pytest

PROMPT = "a photo of a person"
FAST = {"prompt": PROMPT, "steps": "2", "width": "64", "height": "64", "seed": "1"}


def photo(photos):
    return [("photos", ("a.jpg", photos["ffhq-0100"], "image/jpeg"))]


def refused(response, status, code):
    assert response.status_code == status, response.text
    assert response.json()["code"] == code, response.text


@pytest.mark.parametrize("origin", ["http://evil.example", "null", "http://127.0.0.1:1"])
def test_cross_origin_writes_are_refused(serve, photos, origin):
    client = serve()
    r = client.post("/v1/identities", data={"name": "alice"}, files=photo(photos), headers={"Origin": origin})
    refused(r, 403, "cross_origin")
    r = client.post("/v1/generate", data=FAST, headers={"Origin": origin})
    refused(r, 403, "cross_origin")
    r = client.delete("/v1/identities/alice", headers={"Referer": f"{origin}/page.html"})
    refused(r, 403, "cross_origin")
    assert client.get("/v1/identities").json()["identities"] == []  # nothing was created


def test_same_origin_and_non_browser_writes_work(serve, photos):
    client = serve()
    own = str(client.base_url).rstrip("/")
    r = client.post("/v1/identities", data={"name": "alice"}, files=photo(photos), headers={"Origin": own})
    assert r.status_code == 201, r.text
    r = client.post("/v1/identities", data={"name": "bob"}, files=photo(photos))  # curl: no Origin
    assert r.status_code == 201, r.text
    local = own.replace("127.0.0.1", "localhost")
    host = local.removeprefix("http://")
    r = client.delete("/v1/identities/bob", headers={"Origin": local, "Host": host})
    assert r.status_code == 200, r.text


def test_only_served_host_names_are_answered(serve):
    client = serve()
    port = client.base_url.port
    refused(client.get("/v1/identities", headers={"Host": f"evil.example:{port}"}), 403, "host_not_allowed")
    refused(client.get("/healthz", headers={"Host": "rebind.attacker.test"}), 403, "host_not_allowed")
    for ok in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "192.168.1.20"):
        assert client.get("/v1/identities", headers={"Host": ok}).status_code == 200, ok
    named = serve(allowed_hosts=("portrait.lan",))
    assert named.get("/healthz", headers={"Host": "portrait.lan"}).status_code == 200
    refused(named.get("/healthz", headers={"Host": "other.lan"}), 403, "host_not_allowed")
    assert serve(allowed_hosts=("*",)).get("/healthz", headers={"Host": "any.name"}).status_code == 200


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"steps": "0"}, "steps must be between 1"),
        ({"width": "0"}, "width must be between 64"),
        ({"height": "0"}, "height must be between 64"),
        ({"negative_prompt": "x" * 1001}, "negative_prompt is 1001 characters"),
        ({"guidance_scale": "nan"}, "guidance_scale"),
    ],
)
def test_zero_and_oversized_settings_are_422(client, fields, words):
    r = client.post("/v1/generate", data={**FAST, **fields})
    refused(r, 422, "invalid_request")
    assert words in r.json()["detail"]


def test_internal_errors_are_json(serve, monkeypatch):
    from uniportrait.server.service import PortraitService

    def broken(*_args, **_kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(PortraitService, "generate", broken)
    r = serve().post("/v1/generate", data=FAST)
    refused(r, 500, "internal_error")
    assert "a bug" not in r.text  # no internals in the answer


def test_identity_names_with_a_newline_are_refused(client, photos):
    r = client.post("/v1/identities", data={"name": "carol\n"}, files=photo(photos))
    refused(r, 400, "invalid_name")


def test_key_guessing_is_slowed_down(serve):
    client = serve(api_key="right-key")
    for _ in range(10):
        refused(client.get("/v1/identities", headers={"X-API-Key": "guess"}), 401, "wrong_api_key")
    r = client.get("/v1/identities", headers={"X-API-Key": "right-key"})  # even the right one, for now
    refused(r, 429, "too_many_attempts")
    assert int(r.headers["retry-after"]) >= 1


def test_the_ui_temp_folder_is_swept_and_removed(tmp_path):
    import os
    import time

    from uniportrait.server.tempfiles import TempFolder

    temp = TempFolder(ttl_s=60)
    old, new = temp.path / "abc" / "old.png", temp.path / "new.png"
    old.parent.mkdir()
    old.write_bytes(b"x")
    new.write_bytes(b"y")
    os.utime(old, (time.time() - 120, time.time() - 120))
    assert temp.sweep() == 1
    assert not old.parent.exists() and new.exists()
    temp.close()
    assert not temp.path.exists()
    given = TempFolder(str(tmp_path / "mine"), ttl_s=60)
    (given.path / "f").write_bytes(b"z")
    given.close()
    assert given.path.is_dir() and not any(given.path.iterdir())  # a folder we were given stays


def test_the_ui_keeps_its_files_in_the_server_temp_folder_and_removes_them_at_exit(tiny_pipe, tmp_path):
    import httpx

    from uniportrait.server import create_app
    from uniportrait.server.config import ServerConfig

    from .support import TEST_LIMITS, live_server

    pytest.importorskip("gradio")
    config = ServerConfig(
        limits=TEST_LIMITS, home=str(tmp_path / "home"), ui=True, default_side=64, default_steps=2
    )
    app = create_app(tiny_pipe, config)
    folder = app.state.temp.path
    with live_server(app) as url:
        upload = httpx.post(
            f"{url}/ui/gradio_api/upload", files={"files": ("x.txt", b"not an image")}, timeout=30
        )
        assert upload.status_code == 200, upload.text
        (stored,) = upload.json()
        assert os.path.realpath(stored).startswith(os.path.realpath(folder))  # not the shared /tmp/gradio
    assert not folder.exists()  # removed when the server stopped


def test_a_damaged_identity_does_not_break_the_api(serve, photos, tmp_path):
    client = serve()
    assert client.post("/v1/identities", data={"name": "alice"}, files=photo(photos)).status_code == 201
    assert client.post("/v1/identities", data={"name": "bob"}, files=photo(photos)).status_code == 201
    bob = tmp_path / "home" / "identities" / "bob.safetensors"
    bob.write_bytes(bob.read_bytes()[:100])
    listing = client.get("/v1/identities")
    assert listing.status_code == 200, listing.text
    entries = {e["name"]: e for e in listing.json()["identities"]}
    assert entries["bob"]["damaged"] and not entries["bob"]["usable"] and entries["alice"]["usable"]
    assert client.get("/v1/identities/bob").status_code == 200
    refused(client.post("/v1/generate", data={**FAST, "id1": "bob"}), 409, "damaged_identity")
    assert client.delete("/v1/identities/bob").status_code == 200
