"""Calibrate the ArcFace nose tip and mouth corners derived from dlib's 5-point landmarks.

dlib's 5-point model gives the two corners of each eye and the nose base, not the nose tip or the
mouth corners that the ArcFace template needs. ``uniportrait.faces.dlib_backend`` predicts them
in a face frame (origin = midpoint of the eye centres, u along the eye line, v perpendicular and
pointing down, unit = eye distance; eye centre = mean of the eye's two corners) from the nose
base ``(u_b, v_b)`` (see ``FivePointCalibration``):

    nose tip     = (nose_u_ratio · u_b,                      v_b + nose_v_offset)
    mouth corner = (mouth_u_ratio · u_b ∓ mouth_half_width,  v_b + mouth_v_offset)

The targets are the 68-point model's nose tip (30) and mouth corners (48, 54). Each photo is
used as is, mirrored (which also fixes the left/right symmetry and gives the yaw slopes),
rescaled (×0.75, ×1.5) and rotated (±8°), 18 variants per photo; parameters are 1-D
least-squares fits. Method check: leave one photo (identity) out, fit on the others, measure the
error on the one left out, and how far the aligned 224 crop moves (mean over the crop) compared
with aligning on the 68-point positions.

Result on the bundled samples (ffhq-0100, ffhq-0293, ffhq-0381, newton; 72 detections):

    nose_u_ratio=1.618  nose_v_offset=-0.201  mouth_u_ratio=0.060
    mouth_half_width=0.450  mouth_v_offset=0.252
    held-out error, eye distances (px in the 224 crop, where the eyes are 70.5 px apart):
        calibrated (used):      eyes 0.019 (1.4)  nose 0.049 (3.5)  mouth 0.093 (6.6)  crop shift 3.6 px
        fixed frame constants:  eyes 0.016 (1.1)  nose 0.179 (12.6) mouth 0.113 (7.9)  crop shift 4.7 px

(The 512 px originals give the same constants to ±0.015.) What remains is mostly real variation
between faces that five points cannot see: mouth width (a smile widens it by ~20%) and the
mouth's height. The eye error is "mean of two corners" vs "mean of the six contour points", a
small near-constant vertical offset left uncorrected (ArcFace's eye points are pupils, which
neither definition hits exactly). Four identities is a small sample: re-run this on more photos
(``python scripts/calibrate_dlib_5pt.py PHOTO ...``) before trusting the third decimal.

Usage: python scripts/calibrate_dlib_5pt.py [PHOTO ...]   (default: the bundled sample faces)
"""

from __future__ import annotations

import argparse
from dataclasses import asdict

import numpy as np
from PIL import Image

from uniportrait.faces import arcface_template, load_image, sample_photo, similarity_transform
from uniportrait.faces.dlib_backend import (
    DlibFaceAnalyzer,
    FivePointCalibration,
    calibrated_frame_points,
    face_frame,
    to_frame,
)

DEFAULT_PHOTOS = ("ffhq-0100.jpg", "ffhq-0293.jpg", "ffhq-0381.jpg", "newton.jpg")
IOD_224 = 73.5318 * 2 - 38.2946 * 2  # eye distance in the 224 template, px


def variants(image: Image.Image):
    """The photo mirrored, rescaled and rotated (the rotation keeps the whole canvas)."""
    for flipped in (image, image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)):
        for scale in (1.0, 0.75, 1.5):
            scaled = flipped.resize(
                (round(flipped.width * scale), round(flipped.height * scale)), Image.Resampling.LANCZOS
            )
            for angle in (0.0, -8.0, 8.0):
                yield scaled.rotate(
                    angle, resample=Image.Resampling.BICUBIC, expand=True, fillcolor=(128, 128, 128)
                )


def measure(analyzer: DlibFaceAnalyzer, image: Image.Image) -> dict[str, np.ndarray] | None:
    """Frame coordinates of the nose base (5-pt) and the 68-pt targets for the largest face."""
    pixels = np.ascontiguousarray(np.asarray(image, dtype=np.uint8))
    with analyzer._lock:
        found = analyzer._rectangles(pixels)
        if not found:
            return None
        rect = max(found, key=lambda item: item[0].area())[0]
        five = analyzer.shape(pixels, rect, "5")
        sixty_eight = analyzer.shape(pixels, rect, "68")
    origin, axes = face_frame(five[2:4].mean(0), five[0:2].mean(0))
    targets = np.stack(
        [
            sixty_eight[36:42].mean(0),
            sixty_eight[42:48].mean(0),
            sixty_eight[30],
            sixty_eight[48],
            sixty_eight[54],
        ]
    )
    return {"base": to_frame(five[4:5], origin, axes)[0], "targets": to_frame(targets, origin, axes)}


def fit(samples: list[dict[str, np.ndarray]]) -> FivePointCalibration:
    """Least-squares fit of the calibration (each parameter is a 1-D mean or slope fit)."""
    base = np.stack([s["base"] for s in samples])  # (N, 2)
    targets = np.stack([s["targets"] for s in samples])  # (N, 5, 2)
    mouth_mid_u = (targets[:, 3, 0] + targets[:, 4, 0]) / 2
    return FivePointCalibration(
        nose_u_ratio=float(targets[:, 2, 0] @ base[:, 0] / (base[:, 0] @ base[:, 0])),
        nose_v_offset=float((targets[:, 2, 1] - base[:, 1]).mean()),
        mouth_u_ratio=float(mouth_mid_u @ base[:, 0] / (base[:, 0] @ base[:, 0])),
        mouth_half_width=float(((targets[:, 4, 0] - targets[:, 3, 0]) / 2).mean()),
        mouth_v_offset=float((targets[:, 3:, 1].mean(1) - base[:, 1]).mean()),
    )


def crop_shift(predicted: np.ndarray, true: np.ndarray) -> float:
    """Mean displacement (px) over the 224 crop between aligning with predicted vs true points."""
    template = arcface_template(224).astype(np.float64)
    m_pred, m_true = similarity_transform(predicted, template), similarity_transform(true, template)
    # crop point -> frame (through the true alignment) -> crop (through the predicted one)
    grid = np.stack(np.meshgrid(np.arange(0, 224, 8.0), np.arange(0, 224, 8.0)), -1).reshape(-1, 2)
    linear, shift = m_true[:, :2], m_true[:, 2]
    frame = (grid - shift) @ np.linalg.inv(linear).T
    moved = frame @ m_pred[:, :2].T + m_pred[:, 2]
    return float(np.linalg.norm(moved - grid, axis=1).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("photos", nargs="*", help="face photos (default: the bundled samples)")
    args = parser.parse_args()
    photos = args.photos or [str(sample_photo(name)) for name in DEFAULT_PHOTOS]
    analyzer = DlibFaceAnalyzer(detector="hog", upsample=1, landmarks="5")

    per_photo: dict[str, list[dict[str, np.ndarray]]] = {}
    for photo in photos:
        image = load_image(photo)
        per_photo[photo] = [m for m in (measure(analyzer, v) for v in variants(image)) if m is not None]
        print(f"{photo}: {len(per_photo[photo])} detections")
    everything = [m for ms in per_photo.values() for m in ms]
    calibration = fit(everything)
    print("calibration (all photos):")
    for key, value in asdict(calibration).items():
        print(f"    {key}: float = {value:.3f}")

    errors: dict[str, list[np.ndarray]] = {"calibrated": [], "fixed": []}
    shifts: dict[str, list[float]] = {"calibrated": [], "fixed": []}
    for held_out, samples in per_photo.items():
        rest = [m for photo, ms in per_photo.items() if photo != held_out for m in ms]
        if not rest or not samples:
            continue
        held = fit(rest)
        fixed = np.stack([m["targets"] for m in rest]).mean(0)  # baseline: constant frame points
        for sample in samples:
            for kind, predicted in (
                ("calibrated", calibrated_frame_points(sample["base"], held)),
                ("fixed", fixed),
            ):
                errors[kind].append(np.linalg.norm(predicted - sample["targets"], axis=1))
                shifts[kind].append(crop_shift(predicted, sample["targets"]))
    print("held-out-photo mean error in eye distances (and px in the 224 crop, eye distance 70.5 px):")
    for kind, values in errors.items():
        if values:
            e = np.mean(values, axis=0)
            eyes, nose, mouth = e[:2].mean(), e[2], e[3:].mean()
            print(
                f"    {kind:>10}: eyes {eyes:.3f} ({eyes * IOD_224:.1f})  nose {nose:.3f} ({nose * IOD_224:.1f})"
                f"  mouth {mouth:.3f} ({mouth * IOD_224:.1f});  aligned crop shifts {np.mean(shifts[kind]):.1f} px"
            )


if __name__ == "__main__":
    main()
