"""Under load: concurrent requests do not see each other's settings; a full queue answers 429 with
Retry-After; a slow request answers 504 and a request that timed out while queued never runs."""

from __future__ import annotations

import threading
import time

import httpx
import numpy as np
import pytest

from .support import GatedPipe, decode_png

# Eight requests that differ in seed, scales, people, photos, steps and size.
REQUESTS = [
    {"seed": 1, "faceid_scale": 0.7, "ids": ["ffhq-0100"]},
    {"seed": 2, "faceid_scale": 1.2, "ids": ["ffhq-0100"], "structure_scale": 0.5},
    {"seed": 3, "faceid_scale": 0.4, "ids": ["ffhq-0293", "newton"], "routing": True},
    {"seed": 4, "faceid_scale": 1.0, "ids": ["newton", "ffhq-0293"], "structure_scale": 0.0},
    {"seed": 5, "faceid_scale": 0.0, "ids": ["ffhq-0381"]},
    {"seed": 6, "faceid_scale": 0.9, "ids": [], "steps": 3},
    {"seed": 7, "faceid_scale": 0.8, "ids": ["ffhq-0381", "ffhq-0100"], "routing": True, "num_images": 2},
    {"seed": 8, "faceid_scale": 0.7, "ids": ["ffhq-0100"], "width": 72, "height": 64},
]


def send(http: httpx.Client, photos, spec: dict) -> httpx.Response:
    spec = dict(spec)
    files = [
        (f"id{k}", (f"{name}.jpg", photos[name], "image/jpeg")) for k, name in enumerate(spec.pop("ids"), 1)
    ]
    data = {"prompt": "two friends in a park", "steps": 2, "width": 64, "height": 64, **spec}
    return http.post(
        "/v1/generate",
        data={k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in data.items()},
        files=files,
    )


def pixels(response: httpx.Response) -> list[np.ndarray]:
    assert response.status_code == 200, response.text
    body = response.json()
    return [decode_png(x) for x in body["images"] + (body["routing_overlays"] or [])]


class TogetherPipe:
    """The tiny pipeline; when ``together`` is set, calls wait (up to 10 s) until that many are
    inside, so that many pipelines really run at the same time (once; later calls do not wait)."""

    def __init__(self, pipe) -> None:
        self._pipe = pipe
        self.together = 0
        self.active = self.most_active = 0
        self._cond = threading.Condition()

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def __call__(self, *args, **kwargs):
        with self._cond:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
            self._cond.notify_all()
            self._cond.wait_for(lambda: self.active >= self.together, timeout=10)
            self.together = 0  # once: later calls do not wait
        try:
            return self._pipe(*args, **kwargs)
        finally:
            with self._cond:
                self.active -= 1


def test_concurrent_requests_get_what_they_get_alone(serve, photos, tiny_pipe):
    pipe = TogetherPipe(tiny_pipe)
    http = serve(pipe=pipe, workers=4, queue_size=8)
    alone = [pixels(send(http, photos, spec)) for spec in REQUESTS]
    for i in range(len(alone)):  # else a mix-up could go unnoticed
        for j in range(i):
            assert alone[i][0].shape != alone[j][0].shape or not np.array_equal(alone[i][0], alone[j][0])

    pipe.together = 4  # the first four calls start their denoising loops together
    barrier = threading.Barrier(len(REQUESTS))
    together: dict[int, list[np.ndarray]] = {}
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            with httpx.Client(base_url=str(http.base_url), timeout=60) as own:
                barrier.wait(timeout=30)
                together[k] = pixels(send(own, photos, REQUESTS[k]))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(REQUESTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert pipe.most_active == 4
    for k, want in enumerate(alone):
        got = together[k]
        assert len(got) == len(want)
        for a, b in zip(got, want):
            assert np.array_equal(a, b), f"request {k} changed when sent with others"


def _in_thread(fn) -> tuple[threading.Thread, list]:
    out: list = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    return thread, out


def _wait_busy(http: httpx.Client, busy: int) -> None:
    deadline = time.monotonic() + 20
    while http.get("/healthz").json()["queue"]["busy"] != busy:
        assert time.monotonic() < deadline, "the queue never reached the expected load"
        time.sleep(0.02)


def test_full_queue_answers_429_with_retry_after(serve, tiny_pipe):
    gated = GatedPipe(tiny_pipe)
    http = serve(pipe=gated, workers=1, queue_size=1)
    data = {"prompt": "a person", "steps": "2", "width": "64", "height": "64"}
    running, first = _in_thread(lambda: http.post("/v1/generate", data=data))
    assert gated.entered.acquire(timeout=20)  # the only worker is busy
    waiting, second = _in_thread(lambda: http.post("/v1/generate", data=data))
    _wait_busy(http, 2)  # ... and the one waiting place is taken
    try:
        r = http.post("/v1/generate", data=data)
        assert r.status_code == 429, r.text
        assert r.json()["code"] == "queue_full" and "busy" in r.json()["detail"]
        assert int(r.headers["retry-after"]) >= 1
    finally:
        gated.gate.set()
    running.join(30)
    waiting.join(30)
    assert first[0].status_code == second[0].status_code == 200
    _wait_busy(http, 0)
    assert http.post("/v1/generate", data=data).status_code == 200  # capacity is back


def test_timeout_answers_504_and_drops_queued_work(serve, tiny_pipe):
    gated = GatedPipe(tiny_pipe)
    http = serve(pipe=gated, workers=1, queue_size=2, timeout_s=0.5)
    data = {"prompt": "a person", "steps": "2", "width": "64", "height": "64"}
    running, first = _in_thread(lambda: http.post("/v1/generate", data=data))
    assert gated.entered.acquire(timeout=20)
    start = time.monotonic()
    r = http.post("/v1/generate", data=data)  # waits behind the stuck one, then gives up
    assert r.status_code == 504, r.text
    assert r.json()["code"] == "timeout" and "time limit of 0.5 s" in r.json()["detail"]
    assert time.monotonic() - start < 5
    running.join(30)
    assert first[0].status_code == 504
    gated.gate.set()
    _wait_busy(http, 0)  # the stuck job finished in the background and freed its slot
    assert gated.calls == 1  # the request that timed out while queued never ran


def test_running_generation_stops_at_the_deadline(tiny_pipe):
    """A generation already running stops at its next denoising step once the time is up."""
    from uniportrait.server.jobs import Deadline, JobTimeout
    from uniportrait.server.service import GenerateRequest, PortraitService

    steps_done = []

    def count(pipe, step, t, tensors):
        steps_done.append(step)

    class ExpiresAfterTwoSteps(Deadline):
        def check(self) -> None:
            if len(steps_done) >= 2:
                raise JobTimeout(self.limit_s)

    class CountingPipe:
        def __getattr__(self, name):
            return getattr(tiny_pipe, name)

        def __call__(self, *args, callback_on_step_end=None, **kwargs):
            def both(pipe, step, t, tensors):
                count(pipe, step, t, tensors)
                return callback_on_step_end(pipe, step, t, tensors)

            return tiny_pipe(*args, callback_on_step_end=both, **kwargs)

    service = PortraitService(CountingPipe())
    request = GenerateRequest(prompt="a person", steps=20, width=64, height=64)
    with pytest.raises(JobTimeout):
        service.generate(request, ExpiresAfterTwoSteps(60.0))
    assert steps_done == [0, 1]  # stopped mid-denoising, not after all 20 steps
