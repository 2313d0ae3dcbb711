"""Automatic pixel analysis of toy-shapes images (shared by the tests and ``benchmarks/toy_eval.py``).

Colour masks: every pixel is explained as a blend ``alpha * colour + (1 - alpha) * white`` of each palette
colour; the colour whose blend line passes closest to the pixel claims it, with coverage ``alpha`` (so
anti-aliased edges count fractionally and a pink edge pixel stays red).  Shapes are classified by matching
the largest connected blob of a colour against the three templates (circle, square, triangle) stretched
to the blob's bounding box; positions from the coverage-weighted centroid.

Only numpy (and PIL through :mod:`attnctl.toy.data` for the templates) is needed; no torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .data import COLORS, IMAGE_SIZE, PALETTE, POSITIONS, SHAPES, render_alpha

WHITE = np.array([255.0, 255.0, 255.0])
MIN_ALPHA = 0.2  # coverage below this is background
MAX_RESIDUAL = 70.0  # RGB distance from a colour's blend line beyond which a pixel is "no palette colour"
MIN_MASS = 12.0  # coverage (in pixels) a colour needs to count as present
SIDE_FRACTION = 0.75  # share of a colour's coverage that must lie on its side (two-object checks)

ObjectSpec = tuple[str, str, "str | None"]  # (colour, shape, position or None)


def as_array(image) -> np.ndarray:
    """PIL image / float array in [0, 1] / uint8 array -> float RGB array ``(H, W, 3)`` in 0..255."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8 and arr.size and float(np.nanmax(arr)) <= 1.0 + 1e-6:
        arr = arr * 255.0
    arr = arr.astype(np.float64)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {arr.shape}")
    return arr


def color_masks(image) -> dict[str, np.ndarray]:
    """Soft coverage ``(H, W)`` in [0, 1] of each palette colour; each pixel belongs to at most one colour."""
    x = as_array(image)
    d = WHITE - x  # (H, W, 3) distance from white
    alphas, residuals = [], []
    for name in COLORS:
        v = WHITE - np.array(PALETTE[name], dtype=np.float64)
        a = np.clip((d @ v) / (v @ v), 0.0, 1.0)
        residuals.append(np.linalg.norm(d - a[..., None] * v, axis=-1))
        alphas.append(a)
    alpha = np.stack(alphas)  # (C, H, W)
    res = np.stack(residuals)
    best = np.argmin(np.where(alpha >= MIN_ALPHA, res, np.inf), axis=0)
    ok = (np.take_along_axis(alpha, best[None], 0)[0] >= MIN_ALPHA) & (np.take_along_axis(res, best[None], 0)[0] <= MAX_RESIDUAL)
    return {name: np.where(ok & (best == i), alpha[i], 0.0) for i, name in enumerate(COLORS)}


def largest_component(mask: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """The largest 8-connected blob of ``mask >= threshold``, as a bool array (all False if none)."""
    on = mask >= threshold
    labels = np.zeros(on.shape, dtype=np.int32)
    best_label, best_size, current = 0, 0, 0
    h, w = on.shape
    for y0, x0 in zip(*np.nonzero(on)):
        if labels[y0, x0]:
            continue
        current += 1
        stack, size = [(y0, x0)], 0
        labels[y0, x0] = current
        while stack:
            y, x = stack.pop()
            size += 1
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < h and 0 <= nx < w and on[ny, nx] and not labels[ny, nx]:
                        labels[ny, nx] = current
                        stack.append((ny, nx))
        if size > best_size:
            best_label, best_size = current, size
    return labels == best_label if best_label else np.zeros(on.shape, dtype=bool)


def centroid(mask: np.ndarray) -> tuple[float, float] | None:
    """Coverage-weighted centroid ``(x, y)`` in pixel coordinates (pixel ``i`` spans ``[i, i+1)``)."""
    total = float(mask.sum())
    if total <= 0:
        return None
    ys, xs = np.mgrid[0 : mask.shape[0], 0 : mask.shape[1]]
    return float((mask * (xs + 0.5)).sum() / total), float((mask * (ys + 0.5)).sum() / total)


def classify_position(cx: float, cy: float, size: int = IMAGE_SIZE) -> str:
    """``left`` / ``right`` / ``top`` / ``bottom`` by the larger offset from the canvas centre."""
    dx, dy = cx - size / 2, cy - size / 2
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def side_fraction(mask: np.ndarray, position: str) -> float:
    """Share of a mask's coverage in the half of the canvas named by ``position``."""
    total = float(mask.sum())
    if total <= 0:
        return 0.0
    h, w = mask.shape
    half = {"left": mask[:, : w // 2], "right": mask[:, w // 2 :], "top": mask[: h // 2], "bottom": mask[h // 2 :]}
    return float(half[position].sum()) / total


def classify_shape(mask: np.ndarray) -> tuple[str | None, dict[str, float]]:
    """Best-matching template for the largest blob of ``mask``, with each template's soft IoU."""
    blob = largest_component(mask)
    if not blob.any():
        return None, {}
    ys, xs = np.nonzero(blob)
    box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
    # only this blob (and a 1-pixel rim for its soft edges) takes part in the comparison
    region = np.zeros_like(blob)
    region[max(0, ys.min() - 1) : ys.max() + 2, max(0, xs.min() - 1) : xs.max() + 2] = True
    soft = np.where(region, mask, 0.0)
    scores = {}
    for shape in SHAPES:
        t = render_alpha(shape, box, mask.shape[0])
        scores[shape] = float(np.minimum(soft, t).sum() / max(np.maximum(soft, t).sum(), 1e-9))
    return max(scores, key=scores.get), scores


@dataclass
class ObjectReport:
    """What the analysis found for one colour."""

    color: str
    mass: float
    shape: str | None
    centroid: tuple[float, float] | None
    position: str | None


def describe(image) -> list[ObjectReport]:
    """One report per palette colour present (coverage >= ``MIN_MASS``), largest first."""
    reports = []
    for color, mask in color_masks(image).items():
        mass = float(mask.sum())
        if mass < MIN_MASS:
            continue
        c = centroid(mask)
        shape, _ = classify_shape(mask)
        reports.append(ObjectReport(color, mass, shape, c, classify_position(*c) if c else None))
    return sorted(reports, key=lambda r: -r.mass)


def check_one(image, color: str, shape: str, position: str | None = None) -> dict[str, bool]:
    """Checks for a one-object prompt: the dominant colour, its shape and (if given) its position."""
    reports = describe(image)
    main = reports[0] if reports else None
    total = sum(r.mass for r in reports)
    res = {
        "color": main is not None and main.color == color and main.mass >= 0.8 * total,
        "shape": main is not None and main.color == color and main.shape == shape,
        "position": True if position is None else (main is not None and main.color == color and main.position == position),
    }
    res["all"] = all(res.values())
    return res


def check_two(image, objects: list[ObjectSpec]) -> dict[str, bool]:
    """Checks for a two-object prompt with positions.

    ``colors``: both colours present; ``binding``: each colour lies (>= 75% of its coverage) on the side its
    position names, so a colour swap fails; ``shapes``: each colour's blob has its shape; ``all``: all three.
    """
    masks = color_masks(image)
    colors_ok, binding_ok, shapes_ok = True, True, True
    for color, shape, position in objects:
        mask = masks[color]
        present = float(mask.sum()) >= MIN_MASS
        colors_ok &= present
        if position is not None:
            binding_ok &= present and side_fraction(mask, position) >= SIDE_FRACTION
        shapes_ok &= present and classify_shape(mask)[0] == shape
    res = {"colors": bool(colors_ok), "binding": bool(colors_ok and binding_ok), "shapes": bool(shapes_ok)}
    res["all"] = all(res.values())
    return res


_OBJECT_RE = re.compile(
    r"(?:a|an)\s+(?P<color>" + "|".join(COLORS) + r")\s+(?P<shape>" + "|".join(SHAPES) + r")"
    r"(?:\s+(?:on|at|in)\s+the\s+(?P<position>" + "|".join(POSITIONS) + r"))?"
)


def parse_caption(caption: str) -> list[ObjectSpec]:
    """``"a red circle on the left and a blue square"`` -> ``[("red", "circle", "left"), ("blue", "square", None)]``."""
    return [(m["color"], m["shape"], m["position"]) for m in _OBJECT_RE.finditer(caption.lower())]
