"""Memory of one large photo through decode + face detection (issue 13, item 3).

    python benchmarks/photo_memory.py              # detection at most DETECT_MAX_SIDE px (the default)
    python benchmarks/photo_memory.py --full-size  # detection on the whole photo (what it was before)
    python benchmarks/photo_memory.py --analyzer dlib  # another detector (default: the server's)

Prints resident memory (MB) before, at the peak, and after the request (after the server's
``release_memory``), for a blank 3999×3999 PNG (about 55 KB, under the 16 MP upload limit).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time

import PIL.Image


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mb() -> float:
    """This process's peak resident memory (``ru_maxrss`` would include the parent's at fork)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full-size", action="store_true", help="detect on the full-size photo")
    parser.add_argument("--side", type=int, default=3999)
    parser.add_argument("--analyzer", default=None, help="face analyzer (default: the server's, MTCNN)")
    args = parser.parse_args()

    from uniportrait.errors import NoFaceError
    from uniportrait.faces import detect_faces, extract_faces, get_face_analyzer, load_image, sample_photo
    from uniportrait.server.jobs import release_memory

    analyzer = get_face_analyzer(args.analyzer) if args.analyzer else get_face_analyzer()
    extract_faces(load_image(sample_photo("ffhq-0100")), analyzer)  # models loaded, allocator warm
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (args.side, args.side), "white").save(buffer, "PNG")
    data = buffer.getvalue()
    release_memory()
    before, start = rss_mb(), time.perf_counter()
    image = load_image(data)
    try:
        if args.full_size:
            detect_faces(image, analyzer, max_side=None)
        else:
            extract_faces(image, analyzer, max_faces=1)
    except NoFaceError:
        pass
    del image
    seconds = time.perf_counter() - start
    release_memory()
    peak = peak_mb()
    result = {"png_bytes": len(data), "seconds": round(seconds, 2), "rss_before_mb": round(before),
              "rss_peak_mb": round(peak), "rss_after_mb": round(rss_mb())}  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
