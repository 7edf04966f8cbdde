"""Writing an evaluation: ``results.json``, ``results.md`` and ``contact_sheet.png``.

Everything is rendered in memory first, then written through temporary files and renamed; if a
write fails, the files already written by this call are removed again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from uniportrait.atomic import write_text_atomic  # also imported from here by other modules
from uniportrait.evaluation.evaluate import EvaluationReport, ImageResult, image_path_label

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
CONTACT_SHEET = "contact_sheet.png"
SHEET_CELL = 160
DEFAULT_SHEET_ROWS = 50
UNMATCHED = (150, 150, 150)


# -- Markdown --------------------------------------------------------------------------------------


def _stat(s: dict) -> str:
    if not s or s.get("count", 0) == 0:
        return "–"
    return f"{s['mean']:.3f} ± {s['std']:.3f} (n={s['count']})"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.0f}%"


def _num(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _flags(result: ImageResult) -> str:
    match = result.match
    labels = [ref.label for ref in result.references]
    parts = []
    if match.missing:
        parts.append("missing " + ", ".join(labels[i] for i in match.missing))
    if match.duplicated:
        parts.append("duplicated " + ", ".join(labels[i] for i in match.duplicated))
    if match.blending:
        parts.append(f"blending ({len(match.blending)} face{'s' if len(match.blending) > 1 else ''})")
    return "; ".join(parts) or "–"


def _prompt_cell(result: ImageResult) -> str:
    """ "2/3" (asks shown / asked), or "–" where nothing was read."""
    counts = result.prompt_counts
    return "–" if counts is None else f"{counts[0]}/{counts[1]}"


def to_markdown(report: EvaluationReport, per_image: bool = True) -> str:
    """The summary table (and a table of every image)."""
    b = report.backend
    t = b.thresholds
    lines = ["# UniPortrait evaluation", ""]
    if report.manifest:
        lines.append(f"- Manifest: `{report.manifest}`")
    if report.context.get("benchmark"):
        c = report.context
        settings = ", ".join(f"{k}={v}" for k, v in c.get("settings", {}).items() if v is not None)
        lines.append(f"- Benchmark: {c['benchmark']} (preset {c.get('preset', '?')}; {settings})")
    lines += [
        f"- Face-similarity backend: **{b.name}** (detector {b.detector}; {b.embedding}; similarity: {b.similarity}). "
        "Numbers from different backends are not comparable.",
        f"- Assignment: {report.assignment}; thresholds: match {t.match:g}"
        + (
            f", blend {t.blend:g}, ambiguity margin {t.margin:g}, related {t.related:g}."
            if b.blends_by_similarity
            else "."
        ),
        f"- CLIP-T: {report.clip_status}.",
        f"- Blending: {b.blending}.",
        *([f"- Prompt following: {b.prompt_following}."] if b.prompt_following else []),
        f"- {len(report.images)} image(s) evaluated in {report.seconds:.1f} s.",
        "",
        "## Summary",
        "",
        "Face Sim (lowest) is the paper's value: per image, the lowest similarity among the matched "
        "identities. Images where no face matched have no Face Sim (see detection and missing).",
        "",
        "| group | images | Face Sim (lowest) | Face Sim (mean) | CLIP-T | detection | missing | duplicated | blending |",
        "|---|---:|---|---|---|---:|---:|---:|---:|",
    ]
    for group, s in report.summary.items():
        lines.append(
            f"| {group} | {s['images']} | {_stat(s['face_sim_min'])} | {_stat(s['face_sim_mean'])} | "
            f"{_stat(s['clip_t'])} | {_pct(s['detection_rate'])} | {_pct(s['missing_rate'])} | "
            f"{_pct(s['duplicated_rate'])} | {_pct(s['blending_rate'])} |"
        )
    following = {
        group: s["prompt_following"] for group, s in report.summary.items() if "prompt_following" in s
    }
    if following:
        lines += [
            "",
            "## Prompt following",
            "",
            "The share of the attributes the prompts ask for that the picture shows (every ask counts "
            "once), and its balanced form: per attribute the mean over the values asked of the share "
            "shown, so drawing an attribute's most common value every time scores chance.",
            "",
            "| group | asks | prompt following | balanced |",
            "|---|---:|---:|---:|",
        ]
        for group, f in following.items():
            lines.append(
                f"| {group} | {f['asks']} | {_pct(f['prompt_following'])} | {_pct(f['prompt_following_balanced'])} |"
            )
        per = following.get("all", {})
        if per.get("prompt_following_by_attribute"):
            lines += ["", "| attribute | followed | balanced |", "|---|---:|---:|"]
            for name, share in per["prompt_following_by_attribute"].items():
                balanced = per["prompt_following_balanced_by_attribute"][name]
                lines.append(f"| {name} | {_pct(share)} | {_pct(balanced)} |")
    if per_image and report.images:
        lines += [
            "",
            "## Images",
            "",
            "| line | image | identities | faces | Face Sim (lowest) | Face Sim (mean) | CLIP-T"
            + (" | prompt" if following else "")
            + " | flags |",
            "|---:|---|---|---:|---:|---:|---:|" + ("---:|" if following else "") + "---|",
        ]
        for r in report.images:
            names = ", ".join(ref.label for ref in r.references)
            prompt = f" {_prompt_cell(r)} |" if following else ""
            lines.append(
                f"| {r.row.line} | {image_path_label(r.row)} | {names} | {len(r.faces)} | "
                f"{_num(r.match.face_sim_min)} | {_num(r.match.face_sim_mean)} | {_num(r.clip_t)} |{prompt} {_flags(r)} |"
            )
    return "\n".join(lines) + "\n"


# -- contact sheet ---------------------------------------------------------------------------------


def _font(size: int = 13):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def _fit(image: Image.Image, cell: int) -> tuple[Image.Image, float, tuple[int, int]]:
    """Letterbox ``image`` into a cell×cell square: (square, scale, offset)."""
    scale = cell / max(image.width, image.height)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    square = Image.new("RGB", (cell, cell), (235, 235, 235))
    offset = ((cell - size[0]) // 2, (cell - size[1]) // 2)
    square.paste(image.convert("RGB").resize(size, Image.BICUBIC), offset)
    return square, scale, offset


def _caption(cell: Image.Image, text: str, colour) -> Image.Image:
    draw = ImageDraw.Draw(cell)
    font = _font()
    box = draw.textbbox((4, 4), text, font=font)
    draw.rectangle((box[0] - 2, box[1] - 2, box[2] + 2, box[3] + 2), fill=(255, 255, 255))
    draw.text((4, 4), text, fill=colour, font=font)
    return cell


def _blank(text: str, cell: int) -> Image.Image:
    return _caption(Image.new("RGB", (cell, cell), (245, 245, 245)), text, (120, 120, 120))


def sheet_row(result: ImageResult, cell: int = SHEET_CELL) -> list[Image.Image]:
    """[the image with its faces boxed] + per identity [its matched face, its reference crop]."""
    from uniportrait.faces import load_image
    from uniportrait.visualize import PALETTE

    image = load_image(result.row.image)
    square, scale, (ox, oy) = _fit(image, cell)
    draw = ImageDraw.Draw(square)
    font = _font(12)
    reference_of_face = result.match.reference_of_face
    for f, face in enumerate(result.faces):
        ref = reference_of_face[f]
        colour = PALETTE[ref % len(PALETTE)] if ref is not None else UNMATCHED
        x0, y0, x1, y1 = (
            ox + face.box[0] * scale,
            oy + face.box[1] * scale,
            ox + face.box[2] * scale,
            oy + face.box[3] * scale,
        )
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=2)
        tag = f"{result.references[ref].label}" if ref is not None else "?"
        draw.text((x0 + 2, max(0, y0 - 14)), tag, fill=colour, font=font)
    cells = [square]
    for n, reference in enumerate(result.references):
        colour = PALETTE[n % len(PALETTE)]
        face_index = result.match.face_of_reference[n]
        if face_index is None:
            cells.append(_blank(f"{reference.label}: missing", cell))
        else:
            face = result.faces[face_index]
            crop = image.crop(tuple(round(v) for v in face.box))
            similarity = result.match.similarities[face_index, n]
            cells.append(_caption(_fit(crop, cell)[0], f"{reference.label}: {similarity:.3f}", colour))
        ref_cell = _fit(reference.crops[0], cell)[0] if reference.crops else _blank("no crop", cell)
        cells.append(_caption(ref_cell, f"ref {reference.label}", colour))
    return cells


def contact_sheet_image(report: EvaluationReport, max_rows: int = DEFAULT_SHEET_ROWS, cell: int = SHEET_CELL):
    """One row per image (the first ``max_rows``): the image with faces boxed in each identity's
    colour, then per identity its matched face (with the similarity) and its reference crop."""
    from uniportrait.visualize import contact_sheet

    shown = report.images[:max_rows]
    if not shown:
        return _blank("no images", cell)
    rows = [sheet_row(r, cell) for r in shown]
    labels = []
    for r in shown:
        flags = _flags(r)
        text = f"line {r.row.line}: {image_path_label(r.row)} | {r.row.prompt}"
        labels.append(
            (text[:90] + ("…" if len(text) > 90 else "")) + (f"  [{flags}]" if flags != "–" else "")
        )
    return contact_sheet(rows, labels, cell=cell)


# -- all outputs -----------------------------------------------------------------------------------


def write_report(
    report: EvaluationReport, out: str | os.PathLike, sheet_rows: int = DEFAULT_SHEET_ROWS
) -> list[Path]:
    """Write ``results.json``, ``results.md`` and ``contact_sheet.png`` into ``out`` (all or none)."""
    from uniportrait.faces.image_io import save_png_atomic

    out = Path(out)
    data = report.to_dict()
    if len(report.images) > sheet_rows:
        data["contact_sheet_rows"] = sheet_rows
    markdown = to_markdown(report)
    if len(report.images) > sheet_rows:
        markdown += f"\nThe contact sheet shows the first {sheet_rows} of {len(report.images)} images.\n"
    sheet = contact_sheet_image(report, sheet_rows)
    written: list[Path] = []
    try:
        written.append(write_text_atomic(out / RESULTS_JSON, json.dumps(data, indent=2) + "\n"))
        written.append(write_text_atomic(out / RESULTS_MD, markdown))
        written.append(save_png_atomic(sheet, out / CONTACT_SHEET, {"backend": report.backend.name}))
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return written
