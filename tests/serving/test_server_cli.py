"""`uniportrait serve` itself: a real process on 127.0.0.1, and its argument checks."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import pytest

from uniportrait.cli import main
from uniportrait.cli.serve import is_loopback
from uniportrait.faces import sample_photo

from .support import free_port


def test_serve_command_answers_on_localhost(tmp_path):
    port = free_port()
    env = {**os.environ, "UNIPORTRAIT_HOME": str(tmp_path), "UNIPORTRAIT_API_KEY": ""}
    cmd = [sys.executable, "-m", "uniportrait", "serve", "--preset", "tiny", "--port", str(port), "--no-ui"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the server did not start"
            try:
                if httpx.get(f"{url}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        with sample_photo("ffhq-0100").open("rb") as photo:
            r = httpx.post(
                f"{url}/v1/generate",
                data={"prompt": "a person", "steps": "2", "width": "64", "height": "64", "format": "png"},
                files={"id1": photo},
                timeout=60,
            )
        assert r.status_code == 200 and r.content[:4] == b"\x89PNG", r.text
        assert httpx.get(f"{url}/ui/").status_code == 404  # --no-ui
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    assert f"API docs: http://127.0.0.1:{port}/docs" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--workers", "0"], "workers must be at least 1"),
        (["--max-steps", "0"], "max_steps must be a positive"),
    ],
)
def test_bad_settings_fail_before_loading(args, message, capsys):
    assert main(["serve", "--preset", "tiny", *args]) == 2
    assert message in capsys.readouterr().err


def test_bad_or_busy_port_fails_before_loading(capsys, monkeypatch):
    import socket

    import uniportrait.cli.serve as serve_cli

    def no_loading(args):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(serve_cli, "load_pipeline_from_args", no_loading)
    assert main(["serve", "--preset", "tiny", "--port", "99999"]) == 2
    assert "--port must be between 1 and 65535" in capsys.readouterr().err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--preset", "tiny", "--port", str(port)]) == 2
        assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def test_loopback_hosts():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2") and not is_loopback("example.org")
