"""The web UI's handlers, called directly: stored identities, several photos, and the messages
a person sees for bad uploads (Gradio error pop-ups carrying the service's message)."""

from __future__ import annotations

from dataclasses import replace

import PIL.Image
import pytest

from .support import TEST_CONFIG, TEST_LIMITS

gr = pytest.importorskip("gradio", reason="needs the serve extra: pip install -e '.[serve]'")

from uniportrait.bank import IdentityBank  # noqa: E402
from uniportrait.faces import sample_photo  # noqa: E402
from uniportrait.server.jobs import WorkQueue  # noqa: E402
from uniportrait.server.service import PortraitService  # noqa: E402
from uniportrait.server.ui import PortraitUI, guarded  # noqa: E402

# prompt, face-ID, structure, guidance, identity guidance (None: the guidance's), seed, steps, w, h, n
SETTINGS = ("two friends", 0.7, 0.3, 7.5, None, 5, 2, 64, 64, 1)
EMPTY = (None, None, None, 0.3)  # a person slot left empty


@pytest.fixture
def ui(tiny_pipe, tmp_path):
    config = replace(TEST_CONFIG, home=str(tmp_path / "home"), ui=True)
    queue = WorkQueue(1, 2)
    yield PortraitUI(PortraitService(tiny_pipe, config.limits, IdentityBank(config.home)), queue, config)
    queue.shutdown()


def person(*names: str, stored=None):
    return ([str(sample_photo(n)) for n in names] or None, stored, None, 0.3)


def test_stored_and_uploaded_people_with_routing(ui):
    status, table, *_ = ui.add_identity("bob", [str(sample_photo("newton"))], None, 0.3, False)
    assert "Stored **bob**" in status and "| bob | 1 |" in table
    gallery, faces, note = ui.generate(*SETTINGS, *person("ffhq-0100", "ffhq-0293"), *person(stored="bob"))
    assert [caption for _, caption in gallery] == ["image 1", "routing 1"]
    assert [caption for _, caption in faces] == [
        "identity 1",
        "identity 1",
        "identity 2",
    ]  # 2 photos, then bob
    assert note.startswith("seed 5")
    status, table, *_ = ui.remove_identity("bob")
    assert "Deleted" in status and "No stored identities" in table


def test_one_person_has_no_routing_overlay(ui):
    gallery, faces, _ = ui.generate(*SETTINGS, *person("ffhq-0381"), *EMPTY)
    assert [caption for _, caption in gallery] == ["image 1"] and len(faces) == 1


def test_guidance_scales_reach_the_pipeline(ui, monkeypatch):
    calls = []
    call = type(ui.service.pipe).__call__

    def spy(pipe, *args, **kwargs):
        calls.append(kwargs)
        return call(pipe, *args, **kwargs)

    monkeypatch.setattr(type(ui.service.pipe), "__call__", spy)
    ui.generate("a person", 0.7, 0.3, 3.0, 10.0, 5, 2, 64, 64, 1, *person("ffhq-0381"), *EMPTY)
    assert (calls[-1]["guidance_scale"], calls[-1]["identity_guidance_scale"]) == (3.0, 10.0)
    ui.generate(*SETTINGS, *person("ffhq-0381"), *EMPTY)  # an empty box: the guidance scale's
    assert (calls[-1]["guidance_scale"], calls[-1]["identity_guidance_scale"]) == (7.5, None)


def test_bad_uploads_become_clear_popups(ui, tmp_path):
    blank = tmp_path / "wall.png"
    PIL.Image.new("RGB", (200, 200), (128, 128, 128)).save(blank)
    big = tmp_path / "big.jpg"
    big.write_bytes(b"\0" * (TEST_LIMITS.max_upload_bytes + 1))
    cases = [
        ((str(blank),), "no face found in identity 1: photo 'wall.png'"),
        ((str(big),), "identity 1: photo 'big.jpg' is 0.2 MB; the limit is"),
    ]
    for files, words in cases:
        with pytest.raises(gr.Error) as err:
            guarded(ui.generate)(*SETTINGS, list(files), None, None, 0.3, *EMPTY)
        assert words in err.value.message
    with pytest.raises(gr.Error, match="invalid identity name"):
        guarded(ui.add_identity)("../x", [str(sample_photo("newton"))], None, 0.3, False)
    with pytest.raises(gr.Error, match="steps must be between 1 and 4"):
        guarded(ui.generate)("a person", 0.7, 0.3, 7.5, None, 0, 9, 64, 64, 1, *EMPTY, *EMPTY)
    with pytest.raises(gr.Error, match="identity_guidance"):
        guarded(ui.generate)("a person", 0.7, 0.3, 7.5, 31.0, 0, 2, 64, 64, 1, *EMPTY, *EMPTY)


def test_ui_asks_for_the_api_key_as_password(serve):
    http = serve(ui=True, api_key="s3cret")
    assert http.get("/ui/config").status_code == 401
    assert http.post("/ui/login", data={"username": "me", "password": "wrong"}).status_code == 400
    assert http.post("/ui/login", data={"username": "me", "password": "s3cret"}).json() == {"success": True}
    assert http.get("/ui/config").status_code == 200  # the session cookie now lets the page load
