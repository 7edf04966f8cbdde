"""Work nobody waits for is dropped, and a large photo costs bounded time and memory."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

from .support import GatedPipe

DATA = {"prompt": "a person", "steps": "2", "width": "64", "height": "64"}


def _wait(predicate, what: str, limit: float = 20) -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_a_queued_job_whose_client_left_never_runs(serve, tiny_pipe):
    gated = GatedPipe(tiny_pipe)
    http = serve(pipe=gated, workers=1, queue_size=2, timeout_s=60)
    answers = []
    running = threading.Thread(target=lambda: answers.append(http.post("/v1/generate", data=DATA)))
    running.start()
    assert gated.entered.acquire(timeout=20)  # the only worker is busy (and stays busy)
    url = str(http.base_url)

    def impatient():  # its own connection, closed when it gives up after 1 s
        with httpx.Client(base_url=url, timeout=1.0) as other:
            try:
                other.post("/v1/generate", data=DATA)
            except httpx.TimeoutException:
                pass

    leaver = threading.Thread(target=impatient)
    leaver.start()
    _wait(lambda: http.get("/healthz").json()["queue"]["busy"] == 2, "the second job was never queued")
    leaver.join(10)
    # The server notices the departure and frees the queued slot while the worker is still busy.
    _wait(
        lambda: http.get("/healthz").json()["queue"]["busy"] == 1, "the departed client's job stayed queued"
    )
    gated.gate.set()
    running.join(30)
    assert answers[0].status_code == 200
    _wait(lambda: http.get("/healthz").json()["queue"]["busy"] == 0, "the queue did not drain")
    assert gated.calls == 1  # the departed client's generation never ran


def test_run_stops_a_running_job_when_its_client_leaves():
    from uniportrait.server.jobs import ClientGone, JobTimeout, WorkQueue

    queue = WorkQueue(workers=1, queue_size=0)
    stopped = threading.Event()

    def job(deadline):
        for _ in range(200):  # a long job with checkpoints, like decode/detect/encode/denoise
            time.sleep(0.01)
            try:
                deadline.check()
            except JobTimeout:
                stopped.set()
                raise
        return "finished"

    calls = []

    async def gone() -> bool:
        calls.append(1)
        return len(calls) >= 2

    with pytest.raises(ClientGone):
        asyncio.run(queue.run(job, 60.0, gone, poll_s=0.05))
    assert stopped.wait(5)  # the worker stopped at its next checkpoint, long before 2 s
    queue.shutdown()


def test_detection_runs_on_a_downscaled_copy_and_maps_faces_back():
    import numpy as np
    from PIL import Image

    from uniportrait.faces import DETECT_MAX_SIDE, detect_faces
    from uniportrait.faces.types import Face

    seen = []

    class Recording:
        def detect(self, image):
            seen.append(image.size)
            w, h = image.size  # one face in the middle, as found at this size
            marks = np.array([[0.4 * w, 0.4 * h], [0.6 * w, 0.4 * h], [0.5 * w, 0.5 * h],
                              [0.42 * w, 0.6 * h], [0.58 * w, 0.6 * h]])  # fmt: skip
            return [Face((0.3 * w, 0.3 * h, 0.7 * w, 0.7 * h), 1.0, marks)]

    big = Image.new("RGB", (3999, 2000))
    (face,) = detect_faces(big, Recording())
    assert seen == [(DETECT_MAX_SIDE, round(2000 * DETECT_MAX_SIDE / 3999))]
    np.testing.assert_allclose(face.box, (0.3 * 3999, 0.3 * 2000, 0.7 * 3999, 0.7 * 2000), rtol=1e-3)
    np.testing.assert_allclose(face.landmarks[2], (0.5 * 3999, 0.5 * 2000), rtol=1e-3)
    seen.clear()
    detect_faces(Image.new("RGB", (640, 480)), Recording())
    assert seen == [(640, 480)]  # small photos are searched as they are


@pytest.mark.slow
def test_a_large_blank_photo_costs_bounded_memory_that_is_given_back(tmp_path):
    """The 15 KB blank 3999×3999 PNG of issue 13: peak RSS growth and what stays resident."""
    import json
    import subprocess
    import sys

    script = r"""
import io, json, os
import PIL.Image
from uniportrait.faces import extract_faces, get_face_analyzer, load_image, sample_photo
from uniportrait.server.jobs import release_memory
an = get_face_analyzer("dlib")
extract_faces(load_image(sample_photo("ffhq-0100")), an)  # models loaded, allocator warm
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
# VmHWM: this process's peak (ru_maxrss would start from the parent's RSS at fork time)
hwm = lambda: next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
buf = io.BytesIO(); PIL.Image.new("RGB", (3999, 3999), "white").save(buf, "PNG")
before, peak_before = rss(), hwm()
try:
    extract_faces(load_image(buf.getvalue()), an, max_faces=1)
except Exception:
    pass
release_memory()
peak = hwm()
print(json.dumps({"before": before, "peak": max(peak, peak_before), "after": rss()}))
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600, check=True
    )
    mb = json.loads(out.stdout.strip().splitlines()[-1])
    assert mb["peak"] - mb["before"] < 400, mb  # was ~1900 MB with detection at full size
    assert mb["after"] - mb["before"] < 150, mb  # was ~1100 MB left resident
