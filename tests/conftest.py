"""Shared fixtures: one tiny random pipeline for the session, random face crops, a generate helper.

The tiny preset's UNet has two levels, so any multiple of 8 pixels works; tests use 64 px and
2 steps unless the size matters.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import PIL.Image
import pytest
import torch

# The tiny models run faster on one thread, and much more steadily on a busy machine (OpenMP
# threads of small ops stall when cores are shared). Results are compared within one process only.
torch.set_num_threads(1)

PROMPT = "a photo of a person at the beach"
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
SIZE = 64
STEPS = 2


def random_crop(seed: int) -> torch.Tensor:
    """A (3, 224, 224) float crop in [0, 1]; the pipeline API accepts it as an aligned face."""
    return torch.rand(3, 224, 224, generator=torch.Generator().manual_seed(seed))


def random_pil(seed: int, size: int = SIZE) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def run_pipe(pipe, prompt: str = PROMPT, seed: int = 0, size: int = SIZE, steps: int = STEPS, **kwargs):
    """One call with the test defaults; returns the pipeline output (images as float arrays)."""
    kwargs.setdefault("output_type", "np")
    return pipe(
        prompt,
        height=size,
        width=size,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed),
        **kwargs,
    )


@pytest.fixture(scope="session")
def tiny_pipe():
    """The shared tiny pipeline (IP-Adapter and ControlNet included). Tests must not modify it."""
    from uniportrait.presets import build_tiny_pipeline

    pipe = build_tiny_pipeline(0, ip_adapter=True, controlnet=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def crops() -> list[torch.Tensor]:
    """Four different random 'faces'."""
    return [random_crop(100 + i) for i in range(4)]


@pytest.fixture(scope="session")
def idents(tiny_pipe, crops):
    """Identities A, B, C, D encoded by the shared pipeline."""
    return [tiny_pipe.encode_identity(c, name=f"person-{i}") for i, c in enumerate(crops)]


@pytest.fixture
def generate(tiny_pipe) -> Callable[..., np.ndarray]:
    """``generate(**kwargs)`` → images (B, H, W, 3) of the shared pipeline with the test defaults."""

    def _generate(pipe=None, **kwargs) -> np.ndarray:
        return run_pipe(pipe or tiny_pipe, **kwargs).images

    return _generate


def assert_same(a: np.ndarray, b: np.ndarray, atol: float = 1e-5) -> None:
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, atol=atol, rtol=0)


def assert_differ(a: np.ndarray, b: np.ndarray, min_diff: float = 1e-3) -> None:
    assert a.shape == b.shape
    diff = float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())
    assert diff > min_diff, f"outputs should differ but max |diff| = {diff:.2e}"


def plain_sd_pipeline(components):
    """diffusers' own StableDiffusionPipeline from SD components (no safety checker, quiet)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=components["vae"],
        text_encoder=components["text_encoder"],
        tokenizer=components["tokenizer"],
        unet=components["unet"],
        scheduler=components["scheduler"],
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_script(name: str) -> ModuleType:
    """``scripts/<name>.py`` as a module (the scripts are not a package), for tests of their ``main``."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
