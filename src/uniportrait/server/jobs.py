"""A bounded work queue in front of a small thread pool.

Generation is CPU-bound and the pipeline is shared, so requests run on ``workers`` threads and at
most ``queue_size`` more may wait. A request that finds every slot taken is refused at once
(:class:`QueueFull`, with a Retry-After estimate) rather than piling up. Each job carries a
:class:`Deadline`: if the caller stops waiting, a job that has not started is dropped, and a
running one stops at its next :meth:`Deadline.check`. A slot is freed only when its job has really
finished, so the count of busy slots is always the true load.
"""

from __future__ import annotations

import asyncio
import ctypes
import math
import sys
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar

T = TypeVar("T")


class QueueFull(Exception):
    """Every worker is busy and the waiting line is full."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the server is busy; retry in about {retry_after} s")
        self.retry_after = retry_after


class JobTimeout(Exception):
    """The request ran past its time limit."""

    def __init__(self, limit_s: float) -> None:
        super().__init__(f"the request did not finish within the server's time limit of {limit_s:g} s")
        self.limit_s = limit_s


class ClientGone(Exception):
    """The client disconnected before its answer was ready; nobody is left to answer."""


def release_memory() -> None:
    """Give freed heap memory back to the system (glibc keeps it otherwise: a request that decoded
    a large photo would leave the process hundreds of MB larger)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (e.g. musl)
            pass


class Deadline:
    """The moment a job must be done by; jobs call :meth:`check` between stages."""

    def __init__(self, limit_s: float) -> None:
        self.limit_s = limit_s
        self.at = time.monotonic() + limit_s
        self._abandoned = threading.Event()

    def remaining(self) -> float:
        return self.at - time.monotonic()

    def abandon(self) -> None:
        """The caller has stopped waiting (timed out or disconnected)."""
        self._abandoned.set()

    def check(self) -> None:
        if self._abandoned.is_set() or self.remaining() <= 0:
            raise JobTimeout(self.limit_s)


class WorkQueue:
    """``workers`` threads, ``workers + queue_size`` slots."""

    def __init__(self, workers: int = 1, queue_size: int = 8) -> None:
        self.workers = workers
        self.capacity = workers + queue_size
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="uniportrait-worker")
        self._lock = threading.Lock()
        self._busy = 0
        self._durations: deque[float] = deque(maxlen=20)

    # -- state ---------------------------------------------------------------------------------

    @property
    def busy(self) -> int:
        """Jobs running or waiting."""
        return self._busy

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the average job time × queued jobs / workers."""
        average = sum(self._durations) / len(self._durations) if self._durations else 5.0
        return max(1, math.ceil(average * max(self._busy, 1) / self.workers))

    def stats(self) -> dict[str, Any]:
        return {"workers": self.workers, "capacity": self.capacity, "busy": self._busy}

    # -- submitting ----------------------------------------------------------------------------

    def submit(self, fn: Callable[[Deadline], T], deadline: Deadline) -> Future[T]:
        """Queue ``fn(deadline)``; raises :class:`QueueFull` when no slot is free."""
        with self._lock:
            if self._busy >= self.capacity:
                raise QueueFull(self.retry_after())
            self._busy += 1

        def job() -> T:
            deadline.check()  # waited too long in the queue, or its client left: do not start
            start = time.monotonic()
            try:
                return fn(deadline)
            finally:
                self._durations.append(time.monotonic() - start)
                release_memory()

        try:
            future = self._pool.submit(job)
        except BaseException:
            self._release(None)
            raise
        future.add_done_callback(self._release)  # finished, failed or cancelled before starting
        return future

    def _release(self, _future: Future | None) -> None:
        with self._lock:
            self._busy -= 1

    async def run(
        self,
        fn: Callable[[Deadline], T],
        timeout_s: float,
        disconnected: Callable[[], Awaitable[bool]] | None = None,
        poll_s: float = 0.25,
    ) -> T:
        """Run ``fn`` on a worker and await its result, for at most ``timeout_s`` seconds.

        ``disconnected``: polled while waiting; once it says the client has gone, a queued job
        is dropped and a running one stops at its next :meth:`Deadline.check`.
        """
        deadline = Deadline(timeout_s)
        future = self.submit(fn, deadline)
        waiting = asyncio.wrap_future(future)
        try:
            while True:
                left = deadline.remaining()
                if left <= 0:
                    raise JobTimeout(timeout_s)
                done, _ = await asyncio.wait({waiting}, timeout=min(poll_s, left) if disconnected else left)
                if done:
                    return waiting.result()
                if disconnected is not None and await disconnected():
                    raise ClientGone()
        finally:
            if not future.done():
                deadline.abandon()
                future.cancel()

    def run_sync(self, fn: Callable[[Deadline], T], timeout_s: float) -> T:
        """Blocking :meth:`run`, for callers on ordinary threads (the web UI's handlers)."""
        deadline = Deadline(timeout_s)
        future = self.submit(fn, deadline)
        try:
            return future.result(timeout=timeout_s)
        except FutureTimeout:
            raise JobTimeout(timeout_s) from None
        finally:
            if not future.done():
                deadline.abandon()
                future.cancel()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
