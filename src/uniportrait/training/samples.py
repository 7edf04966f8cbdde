"""A small training source folder made from the bundled sample photos (smoke runs and tests).

:func:`make_sample_source` writes single-person photos (each person twice: the photo and a
mirrored, slightly zoomed copy, so the ID augmentation has a second photo to pick), and
two-person photos (two faces pasted side by side), with ``.txt`` captions and a
``metadata.jsonl`` naming the identities — the same inputs a real dataset would have::

    make_sample_source("src/")
    uniportrait prepare-data src/ --out data/ --identity-from-folder
    uniportrait train --stage 1 --preset tiny --data data/ --output-dir runs/s1
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageOps

#: Bundled sample photos with one clear, large face (see ``uniportrait.faces.SAMPLE_PHOTOS``).
PEOPLE = ("ffhq-0100", "ffhq-0293", "ffhq-0381")


def _photo(name: str, size: int) -> Image.Image:
    from uniportrait.faces import load_image, sample_photo

    return load_image(sample_photo(name)).resize((size, size), Image.Resampling.LANCZOS)


def _variant(image: Image.Image) -> Image.Image:
    """Another 'photo' of the same person: mirrored and zoomed in by 8%."""
    w, h = image.size
    dx, dy = round(w * 0.04), round(h * 0.04)
    return ImageOps.mirror(image).crop((dx, dy, w - dx, h - dy)).resize((w, h), Image.Resampling.LANCZOS)


def make_sample_source(folder: str | Path, size: int = 128, pairs: bool = True) -> Path:
    """Write the sample source folder and return it.

    Layout: ``<person>/1.jpg``, ``<person>/2.jpg`` with ``.txt`` captions for each of
    :data:`PEOPLE`, and (``pairs``) ``pairs/<a>+<b>.jpg`` (``size`` × 2·``size``, person a on the
    left) listed in ``metadata.jsonl`` with their identities left to right.
    """
    folder = Path(folder)
    photos = {name: _photo(name, size) for name in PEOPLE}
    for name, image in photos.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for index, picture in enumerate((image, _variant(image)), 1):
            picture.save(folder / name / f"{index}.jpg", quality=95)
            (folder / name / f"{index}.txt").write_text(f"a portrait photo of person {name[-4:]}")
    rows = []
    if pairs:
        (folder / "pairs").mkdir(exist_ok=True)
        for k, left in enumerate(PEOPLE):
            for right in PEOPLE[k + 1 :] + PEOPLE[:k]:
                if left == right:
                    continue
                canvas = Image.new("RGB", (2 * size, size))
                canvas.paste(photos[left], (0, 0))
                canvas.paste(_variant(photos[right]), (size, 0))
                file = f"pairs/{left}+{right}.jpg"
                canvas.save(folder / file, quality=95)
                rows.append(
                    {
                        "file": file,
                        "caption": f"two people, {left[-4:]} and {right[-4:]}",
                        "identities": [left, right],
                    }
                )
        (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder
