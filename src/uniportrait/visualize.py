"""Pictures for people: routing-map overlays and contact sheets."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch

# One colour per identity (RGB), repeated when there are more identities.
PALETTE = ((230, 57, 70), (29, 120, 230), (42, 157, 80), (244, 162, 97), (131, 56, 236), (0, 180, 190))
#: The palette's colours in words (legends).
PALETTE_NAMES = ("red", "blue", "green", "orange", "purple", "teal")


def routing_overlay(
    image: PIL.Image.Image, maps: torch.Tensor | np.ndarray, alpha: float = 0.45
) -> PIL.Image.Image:
    """Colour each pixel by the identity routed there; maps: (N, h, w) in [0, 1]."""
    maps = torch.as_tensor(np.asarray(maps), dtype=torch.float32)
    if maps.ndim != 3 or maps.shape[0] == 0:
        return image.copy()
    maps = torch.nn.functional.interpolate(maps[None], size=(image.height, image.width), mode="nearest")[0]
    colours = torch.tensor([PALETTE[i % len(PALETTE)] for i in range(maps.shape[0])], dtype=torch.float32)
    colour = torch.einsum("nhw,nc->hwc", maps, colours)  # (H, W, 3)
    base = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32))
    out = (1 - alpha) * base + alpha * colour
    return PIL.Image.fromarray(out.clamp(0, 255).round().to(torch.uint8).numpy())


def contact_sheet(
    rows: Sequence[Sequence[PIL.Image.Image]],
    labels: Sequence[str] | None = None,
    cell: int = 192,
    pad: int = 6,
) -> PIL.Image.Image:
    """A grid: each row a list of images (resized to ``cell`` px), with an optional row label."""
    label_h = 16 if labels else 0
    cols = max((len(r) for r in rows), default=1)
    width = pad + cols * (cell + pad)
    height = pad + len(rows) * (cell + pad + label_h)
    sheet = PIL.Image.new("RGB", (width, height), (250, 250, 250))
    draw = PIL.ImageDraw.Draw(sheet)
    y = pad
    for r, row in enumerate(rows):
        if labels:
            draw.text((pad, y), labels[r], fill=(20, 20, 20))
            y += label_h
        for c, img in enumerate(row):
            thumb = img.convert("RGB").resize((cell, cell), PIL.Image.BICUBIC)
            sheet.paste(thumb, (pad + c * (cell + pad), y))
        y += cell + pad
    return sheet
