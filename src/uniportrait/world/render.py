"""Drawing people of the identity world, with exact ground truth.

A picture is drawn at ``SUPERSAMPLE``× its size with PIL, person by person (body layer, head
layer, each rotated about the face centre by the head's roll), lit, filtered by its style and
box-downsampled. Coordinates follow the face stack's convention: pixel ``(i, j)`` has its centre
at ``(i, j)``. Every picture comes with, per person: the identity number and trait vector, the
face box (the skin outline's bounding box), the five landmarks (eye centres, nose tip, mouth
corners: the ArcFace template's order), the head mask (face, ears, hair, hat; occlusion by
people in front removed) and the look; and the scene's background, lighting and style.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageOps

from uniportrait.world.traits import (
    COLOURS,
    HAIR_STYLES,
    LIGHTING,
    STYLES,
    Look,
    SceneStyle,
    Traits,
)

SUPERSAMPLE = 4

_SKIN_LIGHT = np.array([250.0, 222.0, 198.0])
_SKIN_DARK = np.array([88.0, 56.0, 38.0])
_HAIR_RGB = (
    (24, 21, 21),
    (66, 40, 24),
    (122, 80, 42),
    (150, 56, 30),
    (228, 198, 118),
    (205, 82, 28),
    (150, 150, 152),
    (238, 238, 232),
)
_EYE_RGB = ((92, 55, 24), (55, 120, 225), (45, 150, 70), (128, 140, 152), (205, 140, 28))
_COLOUR_RGB = (
    (210, 38, 38),
    (40, 72, 205),
    (38, 150, 60),
    (238, 212, 40),
    (30, 30, 32),
    (242, 242, 242),
    (132, 50, 172),
    (242, 132, 28),
)
_LIGHT_DIR = {"front": (0.0, 0.0), "left": (-1.0, 0.0), "right": (1.0, 0.0), "above": (0.0, -1.0)}


@dataclass(frozen=True)
class Person:
    """Who (identity number + traits) and how they appear (look)."""

    identity: int
    traits: Traits
    look: Look


@dataclass
class Rendered:
    """A picture and its ground truth (picture pixel coordinates, pixel centres at integers).

    Attributes:
        image: (H, W, 3) uint8.
        boxes: (N, 4) float32 face boxes ``x0, y0, x1, y1``.
        landmarks: (N, 5, 2) float32: left eye, right eye, nose tip, left / right mouth corner
            (left = the picture's left).
        masks: (N, H, W) bool head masks.
        people: the N people, in drawing order (back to front).
        scene: background, lighting and style.
    """

    image: np.ndarray
    boxes: np.ndarray
    landmarks: np.ndarray
    masks: np.ndarray
    people: list[Person]
    scene: SceneStyle


def _lerp(a: float, b: float, t: float) -> float:
    return a + (b - a) * t


def skin_rgb(traits: Traits) -> tuple[int, int, int]:
    base = _SKIN_LIGHT + (_SKIN_DARK - _SKIN_LIGHT) * traits.skin
    warm = (traits.skin_hue - 0.5) * np.array([14.0, 0.0, -18.0])
    return tuple(int(v) for v in np.clip(base + warm, 0, 255))


def _shade(rgb, factor: float) -> tuple[int, int, int]:
    return tuple(int(np.clip(c * factor, 0, 255)) for c in rgb)


@dataclass(frozen=True)
class _Geometry:
    """A person's key points in the unrotated frame (supersampled canvas coordinates)."""

    cx: float
    cy: float
    a: float  # face half-width
    b: float  # face half-height
    unit: float
    eye_y: float
    eye_dx: float
    eye_r: float
    nose_y: float
    nose_w: float
    mouth_y: float
    mouth_dx: float
    outline: tuple[tuple[float, float], ...]

    def landmarks(self) -> np.ndarray:
        return np.array(
            [
                [self.cx - self.eye_dx, self.eye_y],
                [self.cx + self.eye_dx, self.eye_y],
                [self.cx, self.nose_y],
                [self.cx - self.mouth_dx, self.mouth_y],
                [self.cx + self.mouth_dx, self.mouth_y],
            ]
        )


def _geometry(traits: Traits, look: Look, origin: tuple[float, float] = (0.0, 0.0)) -> _Geometry:
    """Key points in supersampled canvas coordinates, minus ``origin`` (for drawing on a local layer)."""
    ss = SUPERSAMPLE
    unit = look.size * ss
    cx, cy = (look.cx + 0.5) * ss - origin[0], (look.cy + 0.5) * ss - origin[1]
    a = unit * _lerp(0.86, 1.08, traits.head_width)
    b = unit * _lerp(1.18, 1.38, traits.head_length)
    jaw = _lerp(0.45, 0.95, traits.jaw)
    outline = []
    for k in range(48):
        theta = 2 * math.pi * k / 48
        s, c = math.sin(theta), math.cos(theta)
        x = a * c
        if s > 0:  # lower half: narrow towards the chin according to the jaw
            x *= 1.0 - (1.0 - jaw) * s**1.6
        outline.append((cx + x, cy + b * s))
    return _Geometry(
        cx=cx,
        cy=cy,
        a=a,
        b=b,
        unit=unit,
        eye_y=cy - 0.2 * b,
        eye_dx=unit * _lerp(0.34, 0.46, traits.eye_spacing),
        eye_r=unit * _lerp(0.085, 0.135, traits.eye_size),
        nose_y=cy - 0.2 * b + unit * _lerp(0.42, 0.62, traits.nose_length),
        nose_w=unit * _lerp(0.09, 0.2, traits.nose_width),
        mouth_y=cy + 0.55 * b,
        mouth_dx=unit * _lerp(0.24, 0.4, traits.mouth_width),
        outline=tuple(outline),
    )


def _ellipse(draw: ImageDraw.ImageDraw, cx, cy, rx, ry, fill) -> None:
    draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=fill)


def _draw_body(
    draw: ImageDraw.ImageDraw, g: _Geometry, traits: Traits, look: Look, height: float, mask: bool = False
) -> None:
    """Neck, shirt and collar; with ``mask``, the same shapes in white (on an "L" image)."""
    skin = 255 if mask else skin_rgb(traits)
    neck_w = g.a * 0.42
    draw.rectangle(
        (g.cx - neck_w, g.cy + 0.5 * g.b, g.cx + neck_w, g.cy + 1.5 * g.b),
        fill=skin if mask else _shade(skin, 0.88),
    )
    top = g.cy + 1.35 * g.b
    cloth = 255 if mask else _COLOUR_RGB[look.clothing]
    draw.polygon(
        [
            (g.cx - 1.0 * g.a, top),
            (g.cx + 1.0 * g.a, top),
            (g.cx + 2.2 * g.a, top + 0.6 * g.b),
            (g.cx + 2.4 * g.a, height + 4 * g.b),
            (g.cx - 2.4 * g.a, height + 4 * g.b),
            (g.cx - 2.2 * g.a, top + 0.6 * g.b),
        ],
        fill=cloth,
    )
    draw.polygon(  # collar
        [(g.cx - neck_w, top), (g.cx + neck_w, top), (g.cx, top + 0.35 * g.b)],
        fill=skin if mask else _shade(skin, 0.88),
    )


def _draw_back_hair(draw, g: _Geometry, style: str, hair) -> None:
    a, b, cx, cy = g.a, g.b, g.cx, g.cy
    if style == "long":
        draw.rounded_rectangle(
            (cx - 1.22 * a, cy - 1.08 * b, cx + 1.22 * a, cy + 1.55 * b), radius=a, fill=hair
        )
    elif style == "bob":
        draw.rounded_rectangle(
            (cx - 1.2 * a, cy - 1.1 * b, cx + 1.2 * a, cy + 0.62 * b), radius=0.8 * a, fill=hair
        )
    elif style == "curly":
        _ellipse(draw, cx, cy - 0.25 * b, 1.45 * a, 1.0 * b, hair)
        for k in range(9):
            angle = math.pi * (1.05 + 0.9 * k / 8)
            _ellipse(
                draw,
                cx + 1.35 * a * math.cos(angle),
                cy - 0.25 * b + 0.95 * b * math.sin(angle),
                0.3 * a,
                0.3 * a,
                hair,
            )
    elif style == "bun":
        _ellipse(draw, cx, cy - 1.12 * b, 0.42 * a, 0.36 * a, hair)


def _draw_front_hair(draw, g: _Geometry, style: str, hair, hairline: float) -> None:
    a, b, cx, cy = g.a, g.b, g.cx, g.cy
    if style == "bald":
        # a thin fringe of hair above the ears
        for side in (-1, 1):
            _ellipse(draw, cx + side * 0.93 * a, cy - 0.25 * b, 0.14 * a, 0.28 * b, hair)
        return
    line = cy - b * _lerp(0.42, 0.7, hairline)  # where the hair meets the forehead
    cap = (cx - 1.07 * a, cy - 1.12 * b, cx + 1.07 * a, 2 * line - (cy - 1.12 * b))
    draw.chord(cap, 180, 360, fill=hair)
    if style == "spiky":
        for k in range(7):
            x = cx + a * (-0.9 + 1.8 * k / 6)
            base_y = cy - b * (0.95 - 0.25 * abs(k - 3) / 3)
            draw.polygon(
                [(x - 0.22 * a, base_y + 0.1 * b), (x + 0.22 * a, base_y + 0.1 * b), (x, base_y - 0.45 * b)],
                fill=hair,
            )
    if style in ("long", "bob", "curly"):  # side locks over the temples
        for side in (-1, 1):
            draw.polygon(
                [
                    (cx + side * 1.07 * a, line - 0.2 * b),
                    (cx + side * 0.8 * a, line),
                    (cx + side * 0.9 * a, cy + 0.1 * b),
                    (cx + side * 1.1 * a, cy + 0.2 * b),
                ],
                fill=hair,
            )


def _draw_features(draw, g: _Geometry, traits: Traits, look: Look) -> None:
    skin = skin_rgb(traits)
    hair = _HAIR_RGB[traits.hair_colour]
    brow_rgb = _shade(hair, 0.8) if traits.hair_colour < 6 else _shade(hair, 0.65)
    expression = look.expression
    unit = g.unit
    # ears were drawn with the head outline; nose: a shaded wedge ending at the tip
    nose_top = g.eye_y + 0.12 * unit
    draw.polygon(
        [
            (g.cx - 0.25 * g.nose_w, nose_top),
            (g.cx + 0.25 * g.nose_w, nose_top),
            (g.cx + g.nose_w, g.nose_y),
            (g.cx - g.nose_w, g.nose_y),
        ],
        fill=_shade(skin, 0.86),
    )
    _ellipse(draw, g.cx, g.nose_y, 0.7 * g.nose_w, 0.35 * g.nose_w, _shade(skin, 0.7))
    # eyes (centres are the landmarks) and brows
    for side in (-1, 1):
        ex = g.cx + side * g.eye_dx
        if expression == 3:  # eyes closed: a lid line
            draw.line(
                (ex - 1.3 * g.eye_r, g.eye_y, ex + 1.3 * g.eye_r, g.eye_y),
                fill=(40, 30, 30),
                width=max(1, int(0.35 * g.eye_r)),
            )
        else:
            _ellipse(draw, ex, g.eye_y, 1.45 * g.eye_r, 0.95 * g.eye_r, (250, 250, 250))
            _ellipse(draw, ex, g.eye_y, 0.85 * g.eye_r, 0.85 * g.eye_r, _EYE_RGB[traits.eye_colour])
            _ellipse(draw, ex, g.eye_y, 0.38 * g.eye_r, 0.38 * g.eye_r, (15, 15, 15))
        brow_y = g.eye_y - 2.1 * g.eye_r - (0.08 * unit if expression == 2 else 0.0)
        tilt = (traits.brow_tilt - 0.5) * 0.35 * unit
        thick = _lerp(0.05, 0.14, traits.brow) * unit
        inner, outer = ex - side * 1.1 * g.eye_r, ex + side * 1.6 * g.eye_r
        draw.polygon(
            [
                (inner, brow_y),
                (outer, brow_y - tilt),
                (outer, brow_y - tilt - thick),
                (inner, brow_y - thick * 1.2),
            ],
            fill=brow_rgb,
        )
    # mouth: corners are the landmarks
    lip = (
        int(_lerp(200, 120, traits.skin)),
        int(_lerp(90, 50, traits.skin)),
        int(_lerp(90, 50, traits.skin)),
    )
    thick = _lerp(0.05, 0.13, traits.lips) * unit
    left, right, y = g.cx - g.mouth_dx, g.cx + g.mouth_dx, g.mouth_y
    if expression == 1:  # smile: a crescent dipping below the corners
        draw.polygon(
            [
                (left, y),
                (g.cx - 0.5 * g.mouth_dx, y + 0.35 * g.mouth_dx),
                (g.cx, y + 0.45 * g.mouth_dx),
                (g.cx + 0.5 * g.mouth_dx, y + 0.35 * g.mouth_dx),
                (right, y),
                (g.cx, y + 0.12 * g.mouth_dx),
            ],
            fill=lip,
        )
        draw.polygon(
            [
                (left + 0.15 * g.mouth_dx, y + 0.05 * g.mouth_dx),
                (g.cx, y + 0.3 * g.mouth_dx),
                (right - 0.15 * g.mouth_dx, y + 0.05 * g.mouth_dx),
                (g.cx, y + 0.14 * g.mouth_dx),
            ],
            fill=(250, 250, 245),
        )
    elif expression == 2:  # mouth open
        draw.ellipse(
            (
                left + 0.15 * g.mouth_dx,
                y - 0.35 * g.mouth_dx,
                right - 0.15 * g.mouth_dx,
                y + 0.6 * g.mouth_dx,
            ),
            fill=lip,
        )
        draw.ellipse(
            (left + 0.3 * g.mouth_dx, y - 0.2 * g.mouth_dx, right - 0.3 * g.mouth_dx, y + 0.45 * g.mouth_dx),
            fill=(60, 20, 25),
        )
    else:
        draw.polygon([(left, y), (g.cx, y - thick), (right, y), (g.cx, y + thick)], fill=lip)
    # mole
    if traits.mole:
        mx, my = {
            1: (-0.55 * g.a, g.cy + 0.2 * g.b),
            2: (0.55 * g.a, g.cy + 0.2 * g.b),
            3: (0.0, g.cy + 0.82 * g.b),
        }[traits.mole]
        _ellipse(draw, g.cx + mx, my, 0.07 * unit, 0.07 * unit, (55, 35, 30))
    # facial hair
    beard = _shade(hair, 0.9)
    if traits.facial_hair == 1:  # moustache
        draw.polygon(
            [
                (left - 0.1 * g.mouth_dx, y - 0.05 * unit),
                (g.cx, y - 0.25 * unit),
                (right + 0.1 * g.mouth_dx, y - 0.05 * unit),
                (g.cx, y - 0.12 * unit),
            ],
            fill=beard,
        )
    elif traits.facial_hair == 2:  # beard along the jaw
        pts = [p for p in g.outline if p[1] > g.cy + 0.25 * g.b]
        pts.sort(key=lambda p: p[0])
        inner = [(p[0] * 0.7 + g.cx * 0.3, p[1] - 0.3 * g.b) for p in reversed(pts)]
        draw.polygon(pts + inner, fill=beard)
    elif traits.facial_hair == 3:  # goatee
        _ellipse(draw, g.cx, g.mouth_y + 0.3 * g.b, 0.22 * unit, 0.18 * g.b, beard)


def _draw_hat(draw, g: _Geometry, look: Look) -> None:
    rgb = _COLOUR_RGB[look.hat - 1]
    a, b, cx, cy = g.a, g.b, g.cx, g.cy
    brim_y = cy - 0.62 * b
    draw.chord((cx - 0.98 * a, cy - 1.55 * b, cx + 0.98 * a, brim_y + 0.5 * b), 180, 360, fill=rgb)
    draw.rounded_rectangle(
        (cx - 1.35 * a, brim_y - 0.12 * b, cx + 1.35 * a, brim_y + 0.08 * b),
        radius=0.08 * b,
        fill=_shade(rgb, 0.8),
    )


def _draw_sunglasses(draw, g: _Geometry) -> None:
    r = max(g.eye_r * 1.9, 0.2 * g.unit)
    for side in (-1, 1):
        ex = g.cx + side * g.eye_dx
        draw.rounded_rectangle(
            (ex - r, g.eye_y - 0.75 * r, ex + r, g.eye_y + 0.75 * r), radius=0.4 * r, fill=(20, 20, 24)
        )
    draw.line(
        (g.cx - g.eye_dx + r, g.eye_y - 0.3 * r, g.cx + g.eye_dx - r, g.eye_y - 0.3 * r),
        fill=(20, 20, 24),
        width=max(1, int(0.2 * r)),
    )


def _draw_head(draw, g: _Geometry, traits: Traits, look: Look) -> None:
    skin = skin_rgb(traits)
    hair = _HAIR_RGB[traits.hair_colour]
    style = HAIR_STYLES[traits.hair_style]
    _draw_back_hair(draw, g, style, hair)
    ear_r = g.unit * _lerp(0.13, 0.26, traits.ear_size)
    for side in (-1, 1):
        _ellipse(
            draw,
            g.cx + side * (g.a - 0.1 * ear_r),
            g.eye_y + 0.15 * g.b,
            ear_r * 0.8,
            ear_r * 1.4,
            _shade(skin, 0.92),
        )
    draw.polygon(g.outline, fill=skin)
    _draw_features(draw, g, traits, look)
    if look.hat == 0:
        _draw_front_hair(draw, g, style, hair, traits.hairline)
    else:
        if style in ("long", "bob", "curly"):
            _draw_front_hair(draw, g, "bald", hair, traits.hairline)
        _draw_hat(draw, g, look)
    if look.sunglasses:
        _draw_sunglasses(draw, g)


def _rotate_points(points: np.ndarray, cx: float, cy: float, degrees: float) -> np.ndarray:
    """Rotate (…, 2) points clockwise on screen (y down) by ``degrees`` about (cx, cy)."""
    t = math.radians(degrees)
    c, s = math.cos(t), math.sin(t)
    dx, dy = points[..., 0] - cx, points[..., 1] - cy
    return np.stack([cx + dx * c - dy * s, cy + dx * s + dy * c], axis=-1)


def _paste(dst: np.ndarray, src: np.ndarray, ox: int, oy: int) -> None:
    """Copy ``src`` into ``dst`` at offset (ox, oy), clipped to ``dst``."""
    h, w = dst.shape
    x0, y0 = max(0, ox), max(0, oy)
    x1, y1 = min(w, ox + src.shape[1]), min(h, oy + src.shape[0])
    if x1 > x0 and y1 > y0:
        dst[y0:y1, x0:x1] = src[y0 - oy : y1 - oy, x0 - ox : x1 - ox]


def _background(kind: str, width: int, height: int, rng: np.random.Generator) -> Image.Image:
    img = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(img)
    if kind == "beach":
        draw.rectangle((0, 0, width, 0.45 * height), fill=(138, 200, 236))
        draw.rectangle((0, 0.45 * height, width, 0.6 * height), fill=(38, 108, 178))
        draw.rectangle((0, 0.6 * height, width, height), fill=(232, 212, 152))
        for _ in range(int(rng.integers(1, 3))):  # clouds
            x, y = rng.uniform(0, width), rng.uniform(0.05, 0.3) * height
            _ellipse(draw, x, y, 0.12 * width, 0.05 * height, (250, 250, 252))
    elif kind == "forest":
        draw.rectangle((0, 0, width, height), fill=(44, 96, 48))
        for _ in range(int(rng.integers(4, 8))):
            x, w = rng.uniform(0, width), rng.uniform(0.03, 0.07) * width
            draw.rectangle((x - w, 0, x + w, height), fill=(92, 62, 36))
        for _ in range(int(rng.integers(5, 9))):
            x, y = rng.uniform(0, width), rng.uniform(0, 0.4) * height
            _ellipse(draw, x, y, 0.14 * width, 0.1 * height, (72, 140, 64))
    elif kind == "city":
        draw.rectangle((0, 0, width, height), fill=(196, 200, 212))
        x = -rng.uniform(0, 0.1) * width
        while x < width:
            w = rng.uniform(0.12, 0.25) * width
            top = rng.uniform(0.05, 0.45) * height
            grey = int(rng.uniform(90, 140))
            draw.rectangle((x, top, x + w, height), fill=(grey, grey, grey + 8))
            step = 0.06 * height
            for wy in np.arange(top + step, height, 2 * step):
                for wx in np.arange(x + 0.2 * w, x + w - 0.1 * w, 0.3 * w):
                    draw.rectangle((wx, wy, wx + 0.12 * w, wy + step), fill=(235, 220, 140))
            x += w + rng.uniform(0.0, 0.04) * width
    else:
        colour = {"blue": (72, 112, 204), "pink": (236, 160, 192), "grey": (150, 150, 152)}[kind]
        ramp = np.linspace(1.08, 0.9, height)[:, None, None]
        arr = np.clip(np.array(colour, dtype=np.float32)[None, None] * ramp, 0, 255)
        return Image.fromarray(np.broadcast_to(arr, (height, width, 3)).astype(np.uint8))
    return img


def _light(arr: np.ndarray, lighting: str) -> np.ndarray:
    """(H, W, 3) float → lit: brighter towards the light, darker away from it."""
    h, w = arr.shape[:2]
    dx, dy = _LIGHT_DIR[lighting]
    if dx == 0.0 and dy == 0.0:
        return arr * 1.04
    xs = np.linspace(-1.0, 1.0, w)[None, :]
    ys = np.linspace(-1.0, 1.0, h)[:, None]
    gain = 1.0 + 0.38 * (dx * xs + dy * ys)
    return arr * gain[..., None]


def _stylise(img: Image.Image, style: str) -> Image.Image:
    if style == "sketch":
        grey = ImageOps.grayscale(img)
        edges = ImageOps.invert(grey.filter(ImageFilter.FIND_EDGES)).filter(ImageFilter.MinFilter(3))
        mixed = Image.blend(edges, grey.point(lambda v: 150 + v * 0.4), 0.3)
        return ImageOps.colorize(mixed, black=(40, 36, 30), white=(248, 244, 232))
    if style == "painting":  # brush strokes at a quarter of the supersampled size, then back up
        small = img.reduce(2).filter(ImageFilter.ModeFilter(3)).filter(ImageFilter.SMOOTH_MORE)
        img = ImageOps.posterize(small, 4).resize(img.size, Image.Resampling.BILINEAR)
        return ImageEnhance.Color(img).enhance(1.5)
    return img


def render(people: list[Person], scene: SceneStyle, width: int, height: int, seed: int = 0) -> Rendered:
    """Draw ``people`` (back to front) in a ``width``×``height`` picture of ``scene``.

    ``seed`` drives the background's random details only; everything else is in the arguments.
    """
    from uniportrait.world.traits import BACKGROUNDS

    rng = np.random.default_rng(seed)
    ss = SUPERSAMPLE
    big_w, big_h = width * ss, height * ss
    canvas = _background(BACKGROUNDS[scene.background], big_w, big_h, rng).convert("RGBA")
    head_alphas, full_alphas, boxes, landmarks = [], [], [], []
    draw = ImageDraw.Draw(canvas)
    for person in people:
        g = _geometry(person.traits, person.look)
        # the body stays upright, drawn straight onto the canvas (and its mask)
        body_mask = Image.new("L", (big_w, big_h), 0)
        _draw_body(draw, g, person.traits, person.look, big_h)
        _draw_body(ImageDraw.Draw(body_mask), g, person.traits, person.look, big_h, mask=True)
        # the head is drawn on a local layer, rotated by the roll about the face centre, pasted
        radius = int(math.ceil(1.9 * g.b + 2))
        ox, oy = int(math.floor(g.cx)) - radius, int(math.floor(g.cy)) - radius
        local = _geometry(person.traits, person.look, origin=(ox, oy))
        head = Image.new("RGBA", (2 * radius, 2 * radius), (0, 0, 0, 0))
        _draw_head(ImageDraw.Draw(head), local, person.traits, person.look)
        roll = person.look.roll
        # PIL rotates counter-clockwise about a point given in continuous coordinates.
        head = head.rotate(-roll, resample=Image.Resampling.BILINEAR, center=(local.cx, local.cy))
        # alpha_composite needs a non-negative destination: crop what lies off the canvas
        visible = head.crop((max(0, -ox), max(0, -oy), head.width, head.height))
        canvas.alpha_composite(visible, dest=(max(0, ox), max(0, oy)))
        head_alpha = np.zeros((big_h, big_w), dtype=np.float32)
        _paste(head_alpha, np.asarray(head.getchannel("A"), dtype=np.float32), ox, oy)
        head_alphas.append(head_alpha)
        full_alphas.append(np.maximum(head_alpha, np.asarray(body_mask, dtype=np.float32)))
        outline = _rotate_points(np.array(g.outline), g.cx, g.cy, roll)
        points = _rotate_points(g.landmarks(), g.cx, g.cy, roll)
        # supersampled continuous → picture pixel-centre coordinates
        boxes.append(np.concatenate([outline.min(0), outline.max(0)]) / ss - 0.5)
        landmarks.append(points / ss - 0.5)
    lit = _light(np.asarray(canvas.convert("RGB"), dtype=np.float32), LIGHTING[scene.lighting])
    image = Image.fromarray(np.clip(lit, 0, 255).astype(np.uint8))
    image = _stylise(image, STYLES[scene.style]).reduce(ss)
    masks = np.zeros((len(people), height, width), dtype=bool)
    for i, alpha in enumerate(head_alphas):
        visible = alpha.copy()
        for later in full_alphas[i + 1 :]:
            visible *= 1.0 - later / 255.0
        small = visible.reshape(height, ss, width, ss).mean(axis=(1, 3))
        masks[i] = small >= 127.5
    return Rendered(
        image=np.asarray(image, dtype=np.uint8),
        boxes=np.array(boxes, dtype=np.float32).reshape(-1, 4),
        landmarks=np.array(landmarks, dtype=np.float32).reshape(-1, 5, 2),
        masks=masks,
        people=list(people),
        scene=scene,
    )


__all__ = ["COLOURS", "SUPERSAMPLE", "Person", "Rendered", "render", "skin_rgb"]
