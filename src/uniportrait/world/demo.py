"""``uniportrait demo --preset world``: the world's trained UniPortrait on people it never saw.

Three held-out people, each from one reference photo (a render of them), generated under several
prompts; then two and three of them together with the routing map of each picture. Every
generated face is scored by the world's oracles (never part of generation): Face Sim to another
render of the person it was matched to. Everything is written to ``out`` with a contact sheet.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from uniportrait.settings import FACEID_SCALE
from uniportrait.visualize import PALETTE_NAMES, routing_overlay

#: Held-out identity numbers of the demo's people (index into the held-out range) and their names.
PEOPLE = ((3, "Ada"), (11, "Ben"), (27, "Cleo"))
SINGLE_PROMPTS = (
    "a photo of a person smiling on a beach",
    "a pencil sketch of a person wearing a red hat",
    "a painting of a person with closed eyes in a forest",
    "a photo of a person wearing sunglasses in a city, lit from the left",
)
GROUP_PROMPTS = {
    2: "a photo of two people smiling in a forest",
    3: "a photo of three people on a beach",
}
SCALE = 3  # sheet pixels per picture pixel


@dataclass
class DemoPerson:
    name: str
    identity: int
    photo: np.ndarray  # (64, 64, 3) the reference render the pipeline is given
    crop: np.ndarray  # (224, 224, 3) its aligned face
    check: np.ndarray  # (E,) oracle embedding of another render (what Face Sim compares with)


def demo_people(oracles) -> list[DemoPerson]:
    from uniportrait.faces.align import ALIGNED_SIZE
    from uniportrait.world.faces import aligned_crops
    from uniportrait.world.scenes import identity_number, sample_spec

    people = []
    for index, name in PEOPLE:
        ident = identity_number(index, True)
        rng = np.random.default_rng([index, 2024])
        photo = sample_spec(rng, [ident], seed=1, look={"expression": 0, "hat": 0, "sunglasses": 0}).render()
        other = sample_spec(rng, [ident], seed=2).render()
        crop = aligned_crops(photo.image[None], photo.landmarks[:1], size=ALIGNED_SIZE)[0]
        check = oracles.describe_crops(aligned_crops(other.image[None], other.landmarks[:1]))["embedding"][0]
        people.append(DemoPerson(name, ident, photo.image, crop, check))
    return people


def face_scores(oracles, image: np.ndarray, people: list[DemoPerson]) -> list[str]:
    """Per person, "name sim" for the face matched to them (oracle detector + recogniser), or "name: no face"."""
    from uniportrait.evaluation.backends import DEFAULT_THRESHOLDS
    from uniportrait.evaluation.matching import match_faces

    faces = oracles.detect(image)
    if not faces:
        return [f"{p.name}: no face" for p in people]
    emb = oracles.describe(image, faces)["embedding"]
    result = match_faces(emb @ np.stack([p.check for p in people]).T, DEFAULT_THRESHOLDS["world"])
    return [
        f"{p.name} {s:.2f}" if s is not None else f"{p.name}: no face"
        for p, s in zip(people, result.matched_similarities)
    ]


def _cell(image: np.ndarray | Image.Image, text: list[str], width: int | None = None) -> Image.Image:
    """A picture scaled by :data:`SCALE` with lines of text under it."""
    pic = image if isinstance(image, Image.Image) else Image.fromarray(image)
    pic = pic.resize((pic.width * SCALE, pic.height * SCALE), Image.Resampling.NEAREST)
    w = max(pic.width, width or 0)
    cell = Image.new("RGB", (w, pic.height + 14 * len(text) + 4), (255, 255, 255))
    cell.paste(pic, (0, 0))
    draw = ImageDraw.Draw(cell)
    for k, line in enumerate(text):
        draw.text((2, pic.height + 2 + 14 * k), line, fill=(0, 0, 0))
    return cell


def _sheet(rows: list[tuple[str, list[Image.Image]]], pad: int = 8) -> Image.Image:
    width = max(sum(c.width + pad for c in cells) for _, cells in rows) + pad
    height = sum(max(c.height for c in cells) + 18 + pad for _, cells in rows) + pad
    sheet = Image.new("RGB", (width, height), (245, 245, 245))
    draw = ImageDraw.Draw(sheet)
    y = pad
    for label, cells in rows:
        draw.text((pad, y), label, fill=(0, 0, 0))
        y += 18
        x = pad
        for c in cells:
            sheet.paste(c, (x, y))
            x += c.width + pad
        y += max(c.height for c in cells) + pad
    return sheet


@torch.no_grad()
def run_world_demo(
    pipe, out: Path, seed: int = 0, steps: int = 25, faceid_scale: float = FACEID_SCALE.default
) -> list[Path]:
    """Generate the demo's pictures into ``out``; returns the files written (the sheet last).

    ``faceid_scale`` defaults to the pipeline's (``settings.FACEID_SCALE``): on the shipped world
    weights it gives the most identity with the fewest broken faces (docs/world.md, the
    fidelity/editability curve: one face in 80% of portraits at 1.0, 62% at 2.0).
    """
    from uniportrait.faces.image_io import save_png_atomic
    from uniportrait.world.oracles import WorldOracles

    oracles = WorldOracles()
    people = demo_people(oracles)
    identities = {p.name: pipe.encode_identity(p.crop, name=p.name) for p in people}
    call = {"num_inference_steps": steps, "output_type": "np", "faceid_scale": faceid_scale}
    written, rows = [], []

    def picture(prompt: str, who: list[DemoPerson], width: int) -> tuple[np.ndarray, np.ndarray | None]:
        result = pipe(
            prompt, height=64, width=width, identities=[identities[p.name] for p in who],
            generator=torch.Generator().manual_seed(seed), return_routing_maps=len(who) > 1, **call,
        )  # fmt: skip
        image = (np.asarray(result.images[0]) * 255).round().clip(0, 255).astype(np.uint8)
        maps = result.routing_maps[0].float().numpy() if result.routing_maps else None
        return image, maps

    for person in people:
        cells = [_cell(person.photo, ["reference photo"])]
        for k, prompt in enumerate(SINGLE_PROMPTS):
            image, _ = picture(prompt, [person], 64)
            written.append(save_png_atomic(Image.fromarray(image), out / f"{person.name.lower()}-{k}.png"))
            cells.append(_cell(image, [*textwrap.wrap(prompt, 30), *face_scores(oracles, image, [person])]))
        rows.append((f"{person.name} (held-out identity {person.identity})", cells))
    for n, prompt in GROUP_PROMPTS.items():
        who = people[:n]
        image, maps = picture(prompt, who, 128)
        written.append(save_png_atomic(Image.fromarray(image), out / f"group-{n}.png"))
        cells = [_cell(p.photo, [p.name]) for p in who]
        cells.append(_cell(image, face_scores(oracles, image, who)))
        if maps is not None:
            overlay = routing_overlay(Image.fromarray(image), maps)
            written.append(save_png_atomic(overlay, out / f"group-{n}-routing.png"))
            legend = [f"{p.name} = {PALETTE_NAMES[k]}" for k, p in enumerate(who)]
            cells.append(_cell(overlay, ["routing map:", *legend]))
        rows.append((f"{n} people: {prompt}", cells))
    sheet = _sheet(rows)
    written.append(save_png_atomic(sheet, out / "contact_sheet.png"))
    return written
