"""``uniportrait faces``: list the faces in photos, optionally writing aligned 224×224 crops."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from uniportrait.faces import ANALYZER_NAMES, DEFAULT_ANALYZER

logger = logging.getLogger(__name__)

DESCRIPTION = """\
Detect the faces in each photo (largest first) and print their boxes, scores and 5 landmarks
(left eye, right eye, nose tip, left / right mouth corner, as seen in the image).

With --crops DIR, each usable face is aligned to the ArcFace template and written as
DIR/<stem>_face<k>.png (k = the face's index in the listing). All photos are read and analysed
before anything is written: if any photo cannot be read, or (with --crops) has no usable face,
the command fails with that photo's error and writes no crops at all.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "faces",
        help="detect and align the faces in photos",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("photos", nargs="+", metavar="PHOTO", help="image files")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--crops", metavar="DIR", type=Path, help="write aligned 224x224 face crops here")
    parser.add_argument(
        "--analyzer",
        choices=ANALYZER_NAMES,
        default=DEFAULT_ANALYZER,
        help=f"face detector (default: {DEFAULT_ANALYZER}; dlib and dlib-cnn derive the mouth corners)",
    )
    parser.add_argument(
        "--landmarks",
        choices=("5", "68"),
        default="5",
        help="dlib only: landmark model (default: 5; the 68-point model is for non-commercial use only)",
    )
    parser.add_argument(
        "--upsample", type=int, default=1, help="dlib only: upsample the photo N times to find small faces"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from uniportrait.errors import NoFaceError, UniPortraitError
    from uniportrait.faces import align_face, detect_faces, face_problem, get_face_analyzer, load_image

    options = (
        {"landmarks": args.landmarks, "upsample": args.upsample} if args.analyzer.startswith("dlib") else {}
    )
    analyzer = get_face_analyzer(args.analyzer, **options)
    stems = [Path(photo).stem for photo in args.photos]
    if args.crops is not None and len(set(stems)) < len(stems):
        raise UniPortraitError("two photos share a file name; their crops would overwrite each other")

    # 1. Read and analyse every photo (nothing is written yet).
    reports: list[dict[str, Any]] = []
    pictures = []
    for photo in args.photos:
        picture = load_image(photo)
        faces = detect_faces(picture, analyzer)
        problems = [face_problem(face) for face in faces]
        if args.crops is not None and all(problems):
            detail = f": {problems[0]}" if problems else ""
            raise NoFaceError(f"no usable face in {photo}{detail}")
        reports.append(
            {
                "photo": str(photo),
                "width": picture.width,
                "height": picture.height,
                "detector": analyzer.name,
                "faces": [{**face.to_dict(), "problem": problem} for face, problem in zip(faces, problems)],
            }
        )
        pictures.append((picture, faces, problems))

    # 2. Write the crops.
    if args.crops is not None:
        from uniportrait.faces import save_png_atomic

        for report, stem, (picture, faces, problems) in zip(reports, stems, pictures):
            for index, (face, problem, entry) in enumerate(zip(faces, problems, report["faces"])):
                if problem:
                    continue
                path = args.crops / f"{stem}_face{index}.png"
                metadata = {"source": report["photo"], "face": json.dumps(entry), "detector": analyzer.name}
                save_png_atomic(align_face(picture, face.landmarks), path, metadata)
                entry["crop"] = str(path)
        logger.info(
            "wrote %d crop(s) to %s", sum("crop" in f for r in reports for f in r["faces"]), args.crops
        )

    # 3. Report.
    if args.json:
        print(json.dumps(reports, indent=2))
    else:
        print("\n\n".join(_table(report) for report in reports))
    return 0


def _point(xy: list[float]) -> str:
    return f"{xy[0]:.0f},{xy[1]:.0f}"


def _table(report: dict[str, Any]) -> str:
    faces = report["faces"]
    lines = [f"{report['photo']} ({report['width']}x{report['height']}): {len(faces)} face(s)"]
    if faces:
        columns = (
            "#",
            "box x0,y0,x1,y1",
            "score",
            "left eye",
            "right eye",
            "nose",
            "mouth L",
            "mouth R",
            "note",
        )
        rows = [
            (
                str(index),
                ",".join(f"{v:.0f}" for v in face["box"]),
                f"{face['score']:.2f}",
                *(_point(xy) for xy in face["landmarks"].values()),
                face["problem"] or face.get("crop", ""),
            )
            for index, face in enumerate(faces)
        ]
        widths = [max(len(row[i]) for row in (columns, *rows)) for i in range(len(columns))]
        for row in (columns, *rows):
            lines.append("  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return "\n".join(lines)
