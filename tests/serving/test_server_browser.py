"""The web UI in a real browser: Playwright driving Debian's headless Chromium (``make browser-deps``
installs it; Playwright never downloads one).

Skipped only on a machine without /usr/bin/chromium *and* without ``CI`` set; under CI it always runs.
The screenshot is kept at ``outputs/browser/ui-multi-id.png``.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest

from .support import TEST_CONFIG, live_server

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "outputs" / "browser"
IN_CI = bool(os.environ.get("CI"))

if not IN_CI and not CHROMIUM.exists():
    pytest.skip(
        "needs Debian's chromium (`make browser-deps`); always runs under CI", allow_module_level=True
    )
if not IN_CI:
    pytest.importorskip("playwright", reason="needs playwright: pip install -e '.[dev]'")
    pytest.importorskip("gradio", reason="needs the serve extra: pip install -e '.[serve]'")


@pytest.fixture(scope="module")
def ui_url(tiny_pipe, tmp_path_factory):
    from uniportrait.server import create_app

    config = replace(TEST_CONFIG, home=str(tmp_path_factory.mktemp("home")), ui=True)
    with live_server(create_app(tiny_pipe, config)) as url:
        yield f"{url}/ui/"


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert CHROMIUM.exists(), f"{CHROMIUM} is missing: run `make browser-deps` (apt-get install chromium)"
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 1400})
    context.set_default_timeout(30_000)
    yield context.new_page()
    context.close()


def test_two_people_image_and_routing_overlay(page, ui_url, capsys):
    from uniportrait.faces import sample_photo

    page.goto(ui_url)
    page.get_by_role("tab", name="Multi ID").click()
    page.locator("#multi-photos-1 input[type=file]").set_input_files(str(sample_photo("ffhq-0100")))
    page.locator("#multi-photos-2 input[type=file]").set_input_files(str(sample_photo("newton")))
    page.locator('#multi-photos-1 [aria-label="ffhq-0100.jpg"]').wait_for()  # both uploads are in
    page.locator('#multi-photos-2 [aria-label="newton.jpg"]').wait_for()
    page.locator("#multi-prompt textarea").fill("two people at the beach")
    page.locator("#multi-generate").click()

    results = page.locator("#multi-results")
    results.get_by_text("routing 1").wait_for()  # the overlay, next to its image
    results.get_by_text("image 1").wait_for()
    assert results.locator("img").count() == 2
    assert page.locator("#multi-faces img").count() == 2  # the aligned faces that were used
    assert "seed 0" in page.locator("#multi-note").inner_text()
    # The <img> elements exist before their pictures have arrived: wait until both are decoded.
    page.wait_for_function(
        "() => [...document.querySelectorAll('#multi-results img')]"
        ".every(i => i.complete && i.naturalWidth > 0)"
    )
    sizes = results.locator("img").evaluate_all("imgs => imgs.map(i => [i.naturalWidth, i.naturalHeight])")
    assert sizes == [[64, 64], [64, 64]]

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "ui-multi-id.png"
    page.screenshot(path=str(shot), full_page=True)
    with capsys.disabled():
        print(f"\nbrowser screenshot: {shot}")


def test_bad_upload_shows_a_clear_message(page, ui_url, tmp_path):
    fake = tmp_path / "holiday.jpg"
    fake.write_text("this is not a photo")
    page.goto(ui_url)
    page.locator("#single-photos-1 input[type=file]").set_input_files(str(fake))
    page.locator('#single-photos-1 [aria-label="holiday.jpg"]').wait_for()
    page.locator("#single-prompt textarea").fill("a person")
    page.locator("#single-generate").click()
    page.get_by_text("photo 'holiday.jpg' is not an image file").wait_for()
