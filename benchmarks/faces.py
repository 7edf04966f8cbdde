"""Face stack measurements for docs/faces.md: MTCNN (default) against dlib HOG.

    nice -n 19 python benchmarks/faces.py --out outputs/faces           # a few minutes on 2 idle cores
    nice -n 19 python benchmarks/faces.py --out outputs/faces --quick   # fewer rounds and sizes

1. Landmarks per sample photo: MTCNN's five points against the dlib-derived ones (5-point model,
   calibrated mouth corners) and dlib's 68-point model, in pixels and in eye distances; and how
   far the aligned 224 crop moves (mean over the crop) between aligning on each pair.
2. Aligned crops on the same landmarks: ours (``align_face``) and the previous PIL bicubic path
   against insightface's ``norm_crop`` (reference computed as in tests/test_alignment.py).
3. Detection on composed multi-face pictures: the tests' four pictures and a sweep of face
   sizes × rotations × tight/loose crops (4 faces per picture): recall and false positives.
4. Speed per photo (median wall-clock, 2 torch threads): the sample photos (≤ 320 px) and a
   1024 px upscale.
5. Stability proxy: each photo against a mirrored and shifted copy (crop flipped back): the
   dlib recogniser's similarity between the two crops (1 − d/1.2) and their mean grey difference.
6. dlib's descriptor with its points placed in the MTCNN box instead of its own HOG box.

Writes ``faces.json`` and ``faces.md`` to ``--out`` and prints the Markdown.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from uniportrait.faces import align_face, get_face_analyzer, load_image, sample_photo  # noqa: E402
from uniportrait.faces.composed import PICTURES, Placement, compose_picture, composed_pictures, match_faces  # noqa: E402

PHOTOS = ("ffhq-0100.jpg", "ffhq-0293.jpg", "ffhq-0381.jpg", "newton.jpg")


def _old_align(image: Image.Image, landmarks: np.ndarray, size: int = 224) -> Image.Image:
    """The previous default warp: PIL bicubic, grey fill, continuous-coordinate correction."""
    from uniportrait.faces import alignment_matrix

    matrix = alignment_matrix(landmarks, size)
    linear, shift = matrix[:, :2], matrix[:, 2] + 0.5 - matrix[:, :2] @ np.array([0.5, 0.5])
    inverse = np.linalg.inv(linear)
    inverse_shift = -inverse @ shift
    data = (*inverse[0], inverse_shift[0], *inverse[1], inverse_shift[1])
    return image.convert("RGB").transform(
        (size, size),
        Image.Transform.AFFINE,
        data,
        resample=Image.Resampling.BICUBIC,
        fillcolor=(128, 128, 128),
    )


def _crop_shift(a: np.ndarray, b: np.ndarray) -> float:
    """Mean displacement (px) over the 224 crop between aligning on landmarks ``a`` and ``b``."""
    from uniportrait.faces import alignment_matrix

    ma, mb = alignment_matrix(a), alignment_matrix(b)
    ys, xs = np.mgrid[0:224:4, 0:224:4]
    grid = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.float64)
    # Crop point → image (via a's inverse) → crop under b.
    inv = np.linalg.inv(np.vstack([ma, [0, 0, 1]]))
    image_points = grid @ inv[:2, :2].T + inv[:2, 2]
    moved = image_points @ mb[:, :2].T + mb[:, 2]
    return float(np.linalg.norm(moved - grid, axis=1).mean())


def landmarks_table(mtcnn, dlib5, dlib68) -> list[dict]:
    rows = []
    for name in PHOTOS:
        image = load_image(sample_photo(name))
        m, d5, d68 = (a.detect(image)[0].landmarks.astype(np.float64) for a in (mtcnn, dlib5, dlib68))
        eyes = float(np.linalg.norm(m[1] - m[0]))
        row = {"photo": name, "eye_distance_px": round(eyes, 1)}
        for label, other in (("dlib5", d5), ("dlib68", d68)):
            dist = np.linalg.norm(m - other, axis=1)
            row[f"mtcnn_vs_{label}_px"] = [round(float(v), 1) for v in dist]
            row[f"mtcnn_vs_{label}_mean_eyes"] = round(float(dist.mean() / eyes), 3)
            row[f"crop_shift_vs_{label}_px"] = round(_crop_shift(m, other), 2)
        rows.append(row)
    return rows


def crops_table(mtcnn) -> list[dict]:
    from test_alignment import norm_crop  # the test's reference, written from norm_crop's algorithm

    rows = []
    for name in PHOTOS:
        image = load_image(sample_photo(name))
        landmarks = mtcnn.detect(image)[0].landmarks
        reference = norm_crop(np.asarray(image), landmarks).astype(np.int16)
        ours = np.abs(np.asarray(align_face(image, landmarks)).astype(np.int16) - reference)
        old = np.abs(np.asarray(_old_align(image, landmarks)).astype(np.int16) - reference)
        rows.append(
            {
                "photo": name,
                "ours_mean": round(float(ours.mean()), 3),
                "ours_max": int(ours.max()),
                "old_pil_mean": round(float(old.mean()), 3),
                "old_pil_max": int(old.max()),
            }
        )
    return rows


def sweep_pictures(sources, quick: bool):
    sizes = (30, 40, 60, 100) if quick else (24, 30, 40, 60, 100, 150)
    angles = (-30, 0, 30) if quick else (-45, -30, -15, 0, 15, 30, 45)
    for context in (1.0, 1.8):
        for size in sizes:
            for angle in angles:
                step = max(size * context * 1.5, size + 40)
                width, height = int(step * 4 + 40), int(step + 40)
                placements = [
                    Placement(
                        name,
                        size,
                        angle if k % 2 == 0 else -angle,
                        (20 + step * (k + 0.5), height / 2),
                        context,
                    )
                    for k, name in enumerate(PHOTOS)
                ]
                yield (
                    (size, angle, context),
                    compose_picture(f"{size}-{angle}-{context}", (width, height), placements, sources),
                )


def detection_table(analyzers, sources, quick: bool) -> dict:
    out = {"test_pictures": {}, "sweep": {}}
    for picture in composed_pictures(sources):
        for analyzer in analyzers:
            matched, fp = match_faces(analyzer.detect(picture.image), picture.landmarks)
            out["test_pictures"].setdefault(picture.name, {})[analyzer.name] = {
                "found": sum(m >= 0 for m in matched),
                "faces": len(matched),
                "false_positives": fp,
            }
    for (size, angle, context), picture in sweep_pictures(sources, quick):
        print(f"sweep: size {size}, angle {angle}, context {context}", file=sys.stderr, flush=True)
        for analyzer in analyzers:
            matched, fp = match_faces(analyzer.detect(picture.image), picture.landmarks)
            cell = (
                out["sweep"]
                .setdefault(analyzer.name, {})
                .setdefault(f"{size}", {"found": 0, "faces": 0, "fp": 0})
            )
            cell["found"] += sum(m >= 0 for m in matched)
            cell["faces"] += len(matched)
            cell["fp"] += fp
            key = f"angle {abs(angle)}"
            cell = out["sweep"][analyzer.name].setdefault(key, {"found": 0, "faces": 0, "fp": 0})
            cell["found"] += sum(m >= 0 for m in matched)
            cell["faces"] += len(matched)
            cell["fp"] += fp
            key = f"context {context}"
            cell = out["sweep"][analyzer.name].setdefault(key, {"found": 0, "faces": 0, "fp": 0})
            cell["found"] += sum(m >= 0 for m in matched)
            cell["faces"] += len(matched)
            cell["fp"] += fp
    return out


def speed_table(analyzers, rounds: int) -> list[dict]:
    images = {name: load_image(sample_photo(name)) for name in PHOTOS}
    big = images["ffhq-0100.jpg"].resize((1024, 1024), Image.Resampling.LANCZOS)
    rows = []
    for analyzer in analyzers:
        analyzer.detect(images[PHOTOS[0]])  # load models, warm up
        small, large = [], []
        for _ in range(rounds):
            for image in images.values():
                start = time.perf_counter()
                analyzer.detect(image)
                small.append(time.perf_counter() - start)
            start = time.perf_counter()
            analyzer.detect(big)
            large.append(time.perf_counter() - start)
        rows.append(
            {
                "analyzer": analyzer.name,
                "sample_photo_s": round(statistics.median(small), 3),
                "photo_1024_s": round(statistics.median(large), 3),
            }
        )
    return rows


def stability_table(analyzers, embedder) -> list[dict]:
    from uniportrait.faces import Face, arcface_template

    whole = Face((0, 0, 224, 224), 1.0, arcface_template(224))
    rows = []
    for name in PHOTOS:
        image = load_image(sample_photo(name))
        shifted = Image.new("RGB", image.size, (128, 128, 128))
        shifted.paste(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), (7, 5))  # mirror, move by (7, 5)
        row = {"photo": name}
        for analyzer in analyzers:
            a = align_face(image, analyzer.detect(image)[0].landmarks)
            b = align_face(shifted, analyzer.detect(shifted)[0].landmarks).transpose(
                Image.Transpose.FLIP_LEFT_RIGHT
            )
            distance = float(np.linalg.norm(embedder.embed(a, whole) - embedder.embed(b, whole)))
            grey = float(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16))[40:184, 40:184].mean())
            row[analyzer.name] = {
                "similarity": round(1 - distance / 1.2, 3),
                "grey_diff_centre": round(grey, 2),
            }
        rows.append(row)
    return rows


def descriptor_shift_table(mtcnn, dlib5) -> list[dict]:
    """How far dlib's 128-D descriptor moves when dlib places its points in the MTCNN box rather
    than in its own HOG box (the ``dlib`` evaluation backend now detects with MTCNN)."""
    rows = []
    for name in PHOTOS:
        image = load_image(sample_photo(name))
        own, other = dlib5.detect(image)[0], mtcnn.detect(image)[0]
        distance = float(np.linalg.norm(dlib5.embed(image, own) - dlib5.embed(image, other)))
        rows.append(
            {"photo": name, "distance": round(distance, 3), "similarity_change": round(distance / 1.2, 3)}
        )
    return rows


def markdown(result: dict) -> str:
    lines = [f"Measured on {result['machine']}, torch {result['torch']} ({result['threads']} threads).", ""]
    lines += [
        "| photo | eye dist px | MTCNN vs dlib-5 derived, px (L eye, R eye, nose, L mouth, R mouth) | mean / eye dist | crop shift px | MTCNN vs dlib-68, px | mean / eye dist | crop shift px |"
    ]
    lines += ["|---|---|---|---|---|---|---|---|"]
    for r in result["landmarks"]:
        lines.append(
            f"| {r['photo']} | {r['eye_distance_px']} | {r['mtcnn_vs_dlib5_px']} | {r['mtcnn_vs_dlib5_mean_eyes']} | "
            f"{r['crop_shift_vs_dlib5_px']} | {r['mtcnn_vs_dlib68_px']} | {r['mtcnn_vs_dlib68_mean_eyes']} | {r['crop_shift_vs_dlib68_px']} |"
        )
    lines += [
        "",
        "| photo | ours vs norm_crop: mean / max | previous PIL path vs norm_crop: mean / max |",
        "|---|---|---|",
    ]
    for r in result["crops"]:
        lines.append(
            f"| {r['photo']} | {r['ours_mean']} / {r['ours_max']} | {r['old_pil_mean']} / {r['old_pil_max']} |"
        )
    lines += [
        "",
        "| test picture | " + " | ".join(result["analyzers"]) + " |",
        "|---|" + "---|" * len(result["analyzers"]),
    ]
    for name, cells in result["detection"]["test_pictures"].items():
        lines.append(
            f"| {name} | "
            + " | ".join(
                f"{c['found']}/{c['faces']} found, {c['false_positives']} FP" for c in cells.values()
            )
            + " |"
        )
    lines += [
        "",
        "| sweep slice | " + " | ".join(result["analyzers"]) + " |",
        "|---|" + "---|" * len(result["analyzers"]),
    ]
    keys = sorted(
        next(iter(result["detection"]["sweep"].values())),
        key=lambda k: (
            (0, int(k), 0.0) if k.isdigit() else (1 if k.startswith("angle") else 2, 0, float(k.split()[1]))
        ),
    )
    for key in keys:
        cells = [result["detection"]["sweep"][a][key] for a in result["analyzers"]]
        label = f"face {key} px" if key.isdigit() else key
        lines.append(
            f"| {label} | " + " | ".join(f"{c['found']}/{c['faces']}, {c['fp']} FP" for c in cells) + " |"
        )
    lines += ["", "| detector | sample photo (≤320 px) s | 1024 px photo s |", "|---|---|---|"]
    for r in result["speed"]:
        lines.append(f"| {r['analyzer']} | {r['sample_photo_s']} | {r['photo_1024_s']} |")
    lines += [
        "",
        "| photo | " + " | ".join(f"{a}: similarity / grey diff" for a in result["analyzers"]) + " |",
        "|---|" + "---|" * len(result["analyzers"]),
    ]
    for r in result["stability"]:
        lines.append(
            f"| {r['photo']} | "
            + " | ".join(f"{r[a]['similarity']} / {r[a]['grey_diff_centre']}" for a in result["analyzers"])
            + " |"
        )
    lines += [
        "",
        "| photo | dlib descriptor: HOG box vs MTCNN box, distance | similarity change |",
        "|---|---|---|",
    ]
    for r in result["descriptor_shift"]:
        lines.append(f"| {r['photo']} | {r['distance']} | {r['similarity_change']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/faces"))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (MTCNN)")
    parser.add_argument("--speed-only", action="store_true", help="only the speed table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    mtcnn, dlib5 = get_face_analyzer("mtcnn"), get_face_analyzer("dlib")
    dlib68 = get_face_analyzer("dlib", landmarks="68")
    analyzers = [mtcnn, dlib5]
    if args.speed_only:
        rows = speed_table(analyzers, 3 if args.quick else 7)
        print(json.dumps({"torch_threads": torch.get_num_threads(), "speed": rows}, indent=2))
        return
    sources = {name: mtcnn.detect(load_image(sample_photo(name)))[0] for name in PHOTOS}
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "analyzers": [a.name for a in analyzers],
        "landmarks": landmarks_table(mtcnn, dlib5, dlib68),
        "crops": crops_table(mtcnn),
        "detection": detection_table(analyzers, sources, args.quick),
        "speed": speed_table(analyzers, 3 if args.quick else 7),
        "stability": stability_table(analyzers, dlib5),
        "descriptor_shift": descriptor_shift_table(mtcnn, dlib5),
        "test_pictures": list(PICTURES),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "faces.json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    (args.out / "faces.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
