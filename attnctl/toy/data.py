"""Synthetic coloured-shapes data for the ``toy-shapes`` demo model.

Every sample is a 32x32 RGB image on a white background with one or two shapes
(circle, square, triangle) in one of four colours, and a caption such as
``"a red circle on the left and a blue square on the right"``.  Some captions
carry no position word (``"a red circle"``): the shape is then anywhere on the
canvas, so that prompts without positions (the per-region prompts of region
control) are in the training distribution.

Everything is deterministic from a seed: the generator uses a private
``numpy.random.Generator`` and never touches global random state.  Shapes are
drawn with PIL at 4x resolution and box-filtered down, which gives clean
anti-aliased edges.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 32
SUPERSAMPLE = 4
BACKGROUND = (255, 255, 255)

#: Colour name -> RGB.  Chosen far apart in hue so that pixel analysis is easy.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 200, 20),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom")
#: Pairs of positions used by two-object samples (each pair is also used reversed).
POSITION_PAIRS: tuple[tuple[str, str], ...] = (("left", "right"), ("top", "bottom"))

#: Centre of each named position, in pixels (x, y) on the 32x32 canvas.
ANCHORS: dict[str, tuple[float, float]] = {
    "left": (8.0, 16.0),
    "right": (24.0, 16.0),
    "top": (16.0, 8.0),
    "bottom": (16.0, 24.0),
}
SIZE_RANGE = (9.0, 12.0)  # side / diameter / triangle width, in pixels
ALONG_JITTER = 1.5  # jitter along the axis that names the position (pixels)
ACROSS_JITTER = 4.0  # jitter across it

#: Sample kinds and their default mixture weights.
KIND_WEIGHTS: dict[str, float] = {
    "one": 0.25,  # one object, no position word: anywhere on the canvas
    "one_pos": 0.30,  # one object with a position word
    "two_pos": 0.30,  # two objects with positions
    "two": 0.05,  # two objects, no position words
    "one_of_two": 0.10,  # two objects with positions, the caption names one of them (no position word)
}

#: Every word any caption (or a reasonable prompt) uses; each is one token.
VOCAB_WORDS: tuple[str, ...] = (
    ("a", "an", "the", "on", "at", "in", "and", "of", "with", "side")
    + COLORS
    + SHAPES
    + POSITIONS
)


@dataclass(frozen=True)
class Shape:
    """One shape on the canvas: colour, kind, centre (pixels) and size (pixels)."""

    color: str
    shape: str
    cx: float
    cy: float
    size: float
    position: str | None = None  # the position word used in the caption, if any


@dataclass(frozen=True)
class Sample:
    """A caption and the shapes it describes (render with :func:`render`)."""

    caption: str
    shapes: tuple[Shape, ...]
    kind: str


# --------------------------------------------------------------------------- drawing
def shape_polygon(shape: str, cx: float, cy: float, size: float) -> list[tuple[float, float]] | tuple[float, ...]:
    """Geometry of a shape in pixel coordinates: a bounding box for circles, a polygon otherwise."""
    h = size / 2.0
    if shape == "circle":
        return (cx - h, cy - h, cx + h, cy + h)
    if shape == "square":
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        # upward isosceles triangle filling its size x size bounding box
        return [(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, size: float, fill, scale: float) -> None:
    """Draw one shape onto a PIL canvas that is ``scale`` times the 32x32 grid."""
    geom = shape_polygon(shape, cx, cy, size)
    if shape == "circle":
        x0, y0, x1, y1 = (v * scale for v in geom)
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
    else:
        draw.polygon([(x * scale, y * scale) for x, y in geom], fill=fill)


def render(shapes: Sequence[Shape], image_size: int = IMAGE_SIZE) -> Image.Image:
    """Render shapes on a white canvas, anti-aliased by 4x supersampling."""
    big = image_size * SUPERSAMPLE
    canvas = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    scale = SUPERSAMPLE * image_size / IMAGE_SIZE
    for s in shapes:
        draw_shape(draw, s.shape, s.cx, s.cy, s.size, PALETTE[s.color], scale)
    return canvas.resize((image_size, image_size), Image.BOX)


def render_alpha(shape: str, box: tuple[float, float, float, float], image_size: int = IMAGE_SIZE) -> np.ndarray:
    """Coverage (0..1) of a shape stretched to a box ``(x0, y0, x1, y1)``; used as a template by the analysis."""
    big = image_size * SUPERSAMPLE
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    s = SUPERSAMPLE
    if shape == "circle":
        draw.ellipse((x0 * s, y0 * s, x1 * s - 1, y1 * s - 1), fill=255)
    elif shape == "square":
        draw.polygon([(x0 * s, y0 * s), (x1 * s, y0 * s), (x1 * s, y1 * s), (x0 * s, y1 * s)], fill=255)
    elif shape == "triangle":
        draw.polygon([((x0 + w / 2) * s, y0 * s), (x1 * s, (y0 + h) * s), (x0 * s, y1 * s)], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.asarray(canvas.resize((image_size, image_size), Image.BOX), dtype=np.float32) / 255.0


# --------------------------------------------------------------------------- captions
def object_phrase(color: str, shape: str, position: str | None = None) -> str:
    """``"a red circle"`` or ``"a red circle on the left"`` / ``"... at the top"``."""
    phrase = f"a {color} {shape}"
    if position is None:
        return phrase
    prep = "on" if position in ("left", "right") else "at"
    return f"{phrase} {prep} the {position}"


def caption_for(shapes: Sequence[Shape]) -> str:
    """Caption of a list of shapes, using each shape's ``position`` word when set."""
    return " and ".join(object_phrase(s.color, s.shape, s.position) for s in shapes)


# --------------------------------------------------------------------------- sampling
def _positioned(rng: np.random.Generator, color: str, shape: str, position: str, size: float) -> Shape:
    ax, ay = ANCHORS[position]
    along = rng.uniform(-ALONG_JITTER, ALONG_JITTER)
    across = rng.uniform(-ACROSS_JITTER, ACROSS_JITTER)
    if position in ("left", "right"):
        cx, cy = ax + along, ay + across
    else:
        cx, cy = ax + across, ay + along
    return Shape(color, shape, float(cx), float(cy), float(size), position)


def _anywhere(rng: np.random.Generator, color: str, shape: str, size: float) -> Shape:
    lo, hi = size / 2 + 1.0, IMAGE_SIZE - size / 2 - 1.0
    return Shape(color, shape, float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi)), float(size), None)


def _size(rng: np.random.Generator) -> float:
    return float(rng.uniform(*SIZE_RANGE))


def _two_colors(rng: np.random.Generator) -> tuple[str, str]:
    i, j = rng.choice(len(COLORS), size=2, replace=False)
    return COLORS[int(i)], COLORS[int(j)]


def sample_one(rng: np.random.Generator, kind: str) -> Sample:
    """Draw one random sample of the given kind (``one``, ``one_pos``, ``two_pos``, ``two``, ``one_of_two``)."""
    if kind in ("one", "one_pos"):
        color = COLORS[int(rng.integers(len(COLORS)))]
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        if kind == "one":
            shapes: tuple[Shape, ...] = (_anywhere(rng, color, shape, _size(rng)),)
        else:
            pos = POSITIONS[int(rng.integers(len(POSITIONS)))]
            shapes = (_positioned(rng, color, shape, pos, _size(rng)),)
    elif kind in ("two_pos", "one_of_two"):
        c1, c2 = _two_colors(rng)
        s1, s2 = (SHAPES[int(k)] for k in rng.integers(len(SHAPES), size=2))
        p1, p2 = POSITION_PAIRS[int(rng.integers(len(POSITION_PAIRS)))]
        if rng.random() < 0.5:
            p1, p2 = p2, p1
        shapes = (_positioned(rng, c1, s1, p1, _size(rng)), _positioned(rng, c2, s2, p2, _size(rng)))
    elif kind == "two":
        c1, c2 = _two_colors(rng)
        s1, s2 = (SHAPES[int(k)] for k in rng.integers(len(SHAPES), size=2))
        a = _anywhere(rng, c1, s1, _size(rng))
        while True:  # rejection: keep the two shapes apart
            b = _anywhere(rng, c2, s2, _size(rng))
            if np.hypot(a.cx - b.cx, a.cy - b.cy) > (a.size + b.size) / 2 * 1.15 + 1.0:
                break
        shapes = (a, b)
    else:
        raise ValueError(f"unknown sample kind {kind!r}; expected one of {tuple(KIND_WEIGHTS)}")
    if kind == "one_of_two":
        named = shapes[int(rng.integers(2))]
        return Sample(object_phrase(named.color, named.shape), shapes, kind)
    return Sample(caption_for(shapes), shapes, kind)


def sample_stream(seed: int, kind_weights: dict[str, float] | None = None) -> Iterator[Sample]:
    """An infinite, seeded stream of samples drawn from the kind mixture."""
    weights = dict(KIND_WEIGHTS if kind_weights is None else kind_weights)
    kinds = list(weights)
    p = np.array([weights[k] for k in kinds], dtype=np.float64)
    p /= p.sum()
    rng = np.random.default_rng(seed)
    while True:
        kind = kinds[int(rng.choice(len(kinds), p=p))]
        yield sample_one(rng, kind)


def make_samples(n: int, seed: int = 0, kind_weights: dict[str, float] | None = None) -> list[Sample]:
    """The first ``n`` samples of :func:`sample_stream` (the ones :func:`make_dataset` renders)."""
    stream = sample_stream(seed, kind_weights)
    return [next(stream) for _ in range(n)]


def make_dataset(n: int, seed: int = 0, kind_weights: dict[str, float] | None = None) -> tuple[np.ndarray, list[str]]:
    """``n`` samples as a uint8 array ``(n, 32, 32, 3)`` and their captions, deterministic from ``seed``."""
    samples = make_samples(n, seed, kind_weights)
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for i, s in enumerate(samples):
        images[i] = np.asarray(render(s.shapes))
    return images, [s.caption for s in samples]


def named_objects(sample: Sample) -> list[tuple[Shape, int, int]]:
    """The shapes a sample's caption names, each with the word indices of its colour and shape words.

    Word ``k`` of the caption is token ``k + 1`` of the toy tokenizer (one token per word after the start token).
    """
    words = sample.caption.split()
    named: list[tuple[Shape, int, int]] = []
    start = 0
    for shape in sample.shapes:
        if sample.kind == "one_of_two" and shape.color != words[1]:
            continue  # the one-of-two caption names a single object, by its colour
        if words[start : start + 3] != ["a", shape.color, shape.shape]:
            raise ValueError(f"caption {sample.caption!r} does not name {shape.color} {shape.shape} at word {start}")
        named.append((shape, start + 1, start + 2))
        start += len(object_phrase(shape.color, shape.shape, shape.position).split()) + 1  # the phrase and "and"
    return named


def all_captions() -> list[str]:
    """Every caption the generator can produce (used to check the tokenizer and to cache text embeddings)."""
    caps: set[str] = set()
    for c in COLORS:
        for s in SHAPES:
            caps.add(object_phrase(c, s))
            for p in POSITIONS:
                caps.add(object_phrase(c, s, p))
    for c1 in COLORS:
        for c2 in COLORS:
            if c1 == c2:
                continue
            for s1 in SHAPES:
                for s2 in SHAPES:
                    caps.add(f"{object_phrase(c1, s1)} and {object_phrase(c2, s2)}")
                    for pa, pb in POSITION_PAIRS:
                        for p1, p2 in ((pa, pb), (pb, pa)):
                            caps.add(f"{object_phrase(c1, s1, p1)} and {object_phrase(c2, s2, p2)}")
    return sorted(caps)
