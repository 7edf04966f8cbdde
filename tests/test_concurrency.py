"""Concurrent calls on one pipeline get exactly what each would get alone (no shared per-call state)."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import assert_differ, assert_same, random_pil, run_pipe

# Requests that differ in every per-call setting: identities, scales, masks, seeds, steps, image prompt.
REQUESTS = {
    "none": {"seed": 11, "steps": 2},
    "one": {"seed": 12, "steps": 3, "n_ids": 1, "faceid_scale": 1.0, "face_structure_scale": 0.4},
    "two-ip": {"seed": 13, "steps": 2, "n_ids": 2, "faceid_scale": 0.5, "ip": True, "ip_scale": 0.7},
    "three": {"seed": 14, "steps": 2, "n_ids": 3, "faceid_scale": 0.8, "lora_scale": 0.5},
}
PAIRS = [("none", "three"), ("one", "two-ip")]


def _call(pipe, idents, name: str):
    kwargs = dict(REQUESTS[name])
    n_ids = kwargs.pop("n_ids", 0)
    if kwargs.pop("ip", False):
        kwargs["ip_image"] = random_pil(21)
    out = run_pipe(pipe, identities=idents[:n_ids], return_routing_maps=n_ids >= 2, **kwargs)
    return out.images, out.routing_maps


@pytest.fixture(scope="module")
def alone(tiny_pipe, idents):
    return {name: _call(tiny_pipe, idents, name) for name in REQUESTS}


def test_requests_differ(alone):
    """Otherwise the concurrency test below could not notice settings leaking between calls."""
    names = list(REQUESTS)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert_differ(alone[a][0], alone[b][0])


def _run_together(pipe, idents, names) -> dict[str, tuple]:
    """Start one thread per request, released at the same moment by a barrier."""
    barrier = threading.Barrier(len(names))
    results: dict[str, tuple] = {}
    errors: list[BaseException] = []

    def work(name: str) -> None:
        try:
            barrier.wait(timeout=30)
            results[name] = _call(pipe, idents, name)
        except BaseException as exc:  # reported in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(name,)) for name in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert sorted(results) == sorted(names)
    return results


@pytest.mark.parametrize("pair", PAIRS, ids=["-".join(p) for p in PAIRS])
def test_two_threads_match_running_alone(tiny_pipe, idents, alone, pair):
    for _ in range(2):
        results = _run_together(tiny_pipe, idents, pair)
        for name in pair:
            images, maps = results[name]
            want_images, want_maps = alone[name]
            assert_same(images, want_images, atol=1e-6)
            if want_maps is not None:
                assert len(maps) == len(want_maps)
                for got, want in zip(maps, want_maps):
                    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


class _WatchedTokenizer:
    """The pipeline's tokenizer, counting how many calls are inside it at once (each call
    lingers a little, so overlapping calls would be seen)."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self._lock = threading.Lock()
        self.inside = self.most_inside = 0

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def __call__(self, *args, **kwargs):
        import time

        with self._lock:
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
        time.sleep(0.01)
        try:
            return self._tokenizer(*args, **kwargs)
        finally:
            with self._lock:
                self.inside -= 1


@pytest.mark.parametrize("pipelines", [1, 2], ids=["one-pipeline", "two-sharing-a-tokenizer"])
def test_prompt_encoding_is_not_interleaved_between_calls(pipelines):
    """Fast tokenizers keep padding settings on the shared object and diffusers' encode_prompt
    tokenizes with two different ones: interleaved, a prompt came back 2 tokens long instead of 77
    ("Sizes of tensors must match ... Expected size 2 but got size 77"). Pipelines made with
    ``from_pipe`` share the tokenizer, so they must not interleave either."""
    from uniportrait.pipeline import UniPortraitPipeline
    from uniportrait.presets import build_tiny_pipeline

    pipe = build_tiny_pipeline(0)
    pipes = [pipe] if pipelines == 1 else [pipe, UniPortraitPipeline.from_pipe(pipe)]
    watched = _WatchedTokenizer(pipe.tokenizer)
    for p in pipes:
        p.set_progress_bar_config(disable=True)
        object.__setattr__(p, "tokenizer", watched)
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        try:
            barrier.wait(timeout=30)
            run_pipe(pipes[seed % len(pipes)], seed=seed, steps=1, negative_prompt="" if seed < 2 else None)
        except BaseException as exc:  # reported in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert watched.most_inside == 1
