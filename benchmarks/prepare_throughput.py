"""Throughput of ``prepare-data`` (detect, align, masks, write) in images per second.

Makes ``--images`` synthetic photos of ``--size`` (a bundled sample face, upscaled to about a
third of the height, pasted on a blurred copy of itself; each photo mirrored/shifted a little so
no two are identical), then times ``prepare_dataset`` with each ``--workers`` value on a fresh
output folder. Prints one JSON line per run::

    python benchmarks/prepare_throughput.py --images 48 --workers 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageFilter, ImageOps


def make_photos(folder: Path, count: int, size: tuple[int, int]) -> None:
    from uniportrait.faces import load_image, sample_photo
    from uniportrait.training.samples import PEOPLE

    width, height = size
    for k in range(count):
        face = load_image(sample_photo(PEOPLE[k % len(PEOPLE)]))
        background = face.resize(size).filter(ImageFilter.GaussianBlur(12))
        side = height // 3 + (k % 7) * 8
        face = face.resize((side, side), Image.Resampling.LANCZOS)
        if k % 2:
            face = ImageOps.mirror(face)
        left = (width - side) // 2 + (k % 5 - 2) * 20
        background.paste(face, (left, height // 4))
        background.save(folder / f"{k:05d}.jpg", quality=92)


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--size", type=int, nargs=2, default=(768, 1024), metavar=("W", "H"))
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()

    from uniportrait.training.prepare import prepare_dataset

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        make_photos(src, args.images, tuple(args.size))
        for workers in args.workers:
            out = Path(tmp) / f"out-{workers}"
            cpu_before = _cpu_seconds()
            started = time.perf_counter()
            summary = prepare_dataset(src, out, workers=workers, progress=False)
            elapsed = time.perf_counter() - started
            cpu = _cpu_seconds() - cpu_before
            print(
                json.dumps(
                    {
                        "workers": workers,
                        "images": summary.total,
                        "written": summary.written,
                        "size": list(args.size),
                        "seconds": round(elapsed, 2),
                        "images_per_s": round(summary.total / elapsed, 2),
                        # CPU time of this process and its finished workers: what one core costs,
                        # whatever else the machine was running
                        "cpu_s_per_image": round(cpu / summary.total, 3),
                        "images_per_cpu_s": round(summary.total / cpu, 2),
                        "load_avg_1min": round(os.getloadavg()[0], 1),
                        "cpus": os.cpu_count(),
                        "cpu": platform.processor() or platform.machine(),
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
