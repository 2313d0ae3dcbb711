"""Region masks: reading them, resizing them to attention grids, overlaps and token labels (docs/methods.md "Regions").

A region's shape is a box in relative image coordinates or a soft mask in [0, 1] covering the whole image
(stretched to the canvas, as boxes are). At each attention layer it is resized to that layer's image-token
grid by **exact area averaging**: cell (i, j) of an h x w grid covers `[i/h, (i+1)/h) x [j/w, (j+1)/w)` of the
image and takes the mean of the mask over that area, so soft stays soft and a box edge that cuts a cell
gives that cell the covered fraction. Where the resized masks of a cell sum above 1 they are divided by
their sum (overlaps share the cell).

Token labels (joint attention and isolation): a cell belongs to the region whose resized mask is largest
there, if that value is at least 1/2 (ties: the region listed later); otherwise it is background (label 0).
The 1/2 threshold uses the masks before overlap normalisation, so a cell covered by three regions still
belongs to one of them.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ...errors import ConfigError
from ...validation import plain_scalar

#: Cells whose largest mask value is at least this (minus rounding) get that region's label.
LABEL_THRESHOLD = 0.5
_EPS = 1e-6

Box = tuple[float, float, float, float]


def load_mask(value: Any, *, owner: str, allow_empty: bool = False, shapes: str = "") -> torch.Tensor:
    """A user mask as a (H, W) float32 CPU tensor in [0, 1], or ConfigError naming what is wrong.

    Accepts a PIL image (read as grayscale, white = inside; alpha ignored; 16-bit and 32-bit integer images scaled
    by 65535), a numpy array or a torch tensor of rank 2 (or rank 3 with one singleton channel axis): bool, uint8
    (0..255 scaled to [0, 1]), uint16 (scaled by 65535), other integers holding 0 / 1, or floats in [0, 1]; or a
    path to an image file (a `str` or `os.PathLike`, relative to the current directory unless absolute). An integer
    mask or image that holds only the values 0 and 1 is taken as a 0 / 1 mask, not scaled (it would be 1/255 or
    1/65535 of a mask: nearly empty).

    `allow_empty`: an all-zero mask is returned (one frame of per-frame masks may be empty) instead of refused.
    `shapes`: what else the caller takes, appended to the refusal of a mask that is not 2-D.
    """
    check = functools.partial(_check, owner=owner, allow_empty=allow_empty, shapes=shapes)
    if isinstance(value, (str, os.PathLike)):
        return check(_from_image(_open_image(value, owner)))
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        Image = None
    if Image is not None and isinstance(value, Image.Image):
        return check(_from_image(value))
    if isinstance(value, np.ndarray):
        kind = value.dtype
        if kind == np.bool_:
            return check(torch.from_numpy(value.astype(np.float64)))
        if kind in (np.uint8, np.uint16):
            return check(torch.from_numpy(_scaled(value.astype(np.float64), 255.0 if kind == np.uint8 else 65535.0)))
        if np.issubdtype(kind, np.integer):
            return check(torch.from_numpy(value.astype(np.float64)), integer=True)
        if np.issubdtype(kind, np.floating):
            return check(torch.from_numpy(value.astype(np.float64)))
        raise ConfigError(f"{owner}: a numpy mask must hold bools, integers or floats, got dtype {kind}")
    if isinstance(value, torch.Tensor):
        tensor = value.detach().to("cpu")
        if tensor.dtype == torch.bool:
            return check(tensor.double())
        if tensor.dtype == torch.uint8:
            return check(torch.from_numpy(_scaled(tensor.double().numpy(), 255.0)))
        if tensor.dtype in (torch.int8, torch.int16, torch.int32, torch.int64):
            return check(tensor.double(), integer=True)
        if tensor.is_floating_point():
            return check(tensor.double())
        raise ConfigError(f"{owner}: a tensor mask must hold bools, integers or floats, got {tensor.dtype}")
    raise ConfigError(
        f"{owner}: a mask must be a PIL image, a numpy array, a torch tensor (values in [0, 1]) or a path to an image "
        f"file, got {type(value).__name__}"
    )


def frame_stack(value: Any) -> list[Any] | None:
    """The frames of a 3-D numpy array or torch tensor that is a stack of masks, (frames, H, W): one mask per token
    frame (video), read as the list `list(value)`; None for anything else.

    The rule for a 3-D array: (frames, H, W) unless an axis at either end has one entry, (1, H, W) or (H, W, 1) (one
    channel: one mask, as `load_mask` reads it), or its last axis has 3 or 4 entries ((H, W, 3) / (H, W, 4): an RGB /
    RGBA image array, which `load_mask` refuses). A channel-first colour tensor (3, H, W) is read as three frames.
    A uint8 / uint16 stack is one array of one scale: it is scaled as a whole (a stack of only 0 and 1 as is,
    otherwise over 255 / 65535) and its frames are then floats, so a frame of only 0 and 1 in a 0..255 stack stays
    nearly empty, as it is in that stack (a list of separate masks scales each mask on its own).
    """
    if not isinstance(value, (np.ndarray, torch.Tensor)) or value.ndim != 3:
        return None
    if value.shape[0] == 1 or value.shape[-1] in (1, 3, 4):
        return None
    full = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0, torch.uint8: 255.0}.get(value.dtype)
    if full is not None:
        array = value.detach().to("cpu").numpy() if isinstance(value, torch.Tensor) else value
        value = torch.from_numpy(_scaled(array.astype(np.float64), full))
    return list(value)


def _open_image(path: Any, owner: str):
    from PIL import Image

    resolved = os.path.abspath(os.fspath(path))
    if not os.path.isfile(resolved):
        raise ConfigError(f"{owner}: mask file {os.fspath(path)!r} does not exist (looked for {resolved!r})")
    try:
        with Image.open(resolved) as image:
            image.load()
            return image.copy()
    except OSError as error:
        raise ConfigError(f"{owner}: mask file {resolved!r} is not an image PIL can read: {error}") from None


def _from_image(image: Any) -> torch.Tensor:
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        array = _scaled(np.asarray(image, dtype=np.float64), 65535.0)
    elif mode == "F":
        array = np.asarray(image, dtype=np.float64)
    elif mode == "1":  # bilevel: 0 / 255 in "L"
        array = np.asarray(image.convert("L"), dtype=np.float64) / 255.0
    else:
        array = _scaled(np.asarray(image.convert("L"), dtype=np.float64), 255.0)
    return torch.from_numpy(np.ascontiguousarray(array))


def _scaled(values: np.ndarray, full: float) -> np.ndarray:
    """Integer mask values over their full scale `full`, except a mask of only 0 and 1, which is already 0 / 1."""
    if values.size and bool(np.isin(values, (0.0, 1.0)).all()):
        return values
    return values / full


def _check(mask: torch.Tensor, owner: str, integer: bool = False, allow_empty: bool = False, shapes: str = "") -> torch.Tensor:
    also = f"; {shapes}" if shapes else ""
    if mask.ndim == 3 and 1 in (mask.shape[0], mask.shape[-1]):
        mask = mask[0] if mask.shape[0] == 1 else mask[..., 0]
    if mask.ndim == 3 and mask.shape[-1] in (3, 4):
        raise ConfigError(
            f"{owner}: a 3-D mask whose last axis has 3 or 4 entries is read as an RGB / RGBA image (H, W, C), which is "
            f"not a mask: convert it to grayscale (or pass the PIL image){also}; got shape {tuple(mask.shape)}"
        )
    if mask.ndim != 2:
        raise ConfigError(
            f"{owner}: a mask must be 2-D (H, W), or 3-D with one singleton channel axis ((1, H, W) or (H, W, 1))"
            f"{also}; got shape {tuple(mask.shape)}"
        )
    if mask.shape[0] == 0 or mask.shape[1] == 0:
        raise ConfigError(f"{owner}: the mask has no pixels (shape {tuple(mask.shape)})")
    mask = mask.double()
    if torch.isnan(mask).any():
        raise ConfigError(f"{owner}: the mask contains NaN")
    low, high = float(mask.min()), float(mask.max())
    if low < 0.0 or high > 1.0:
        what = "integer masks must hold 0 and 1 (uint8 masks 0..255)" if integer else "mask values must lie in [0, 1]"
        raise ConfigError(f"{owner}: {what}; got values from {low:g} to {high:g}")
    if high == 0.0 and not allow_empty:
        raise ConfigError(f"{owner}: the mask is empty (all zeros); a region needs some area")
    return mask.float().contiguous()


def validate_box(box: Any, *, owner: str) -> Box:
    """(x0, y0, x1, y1) relative image coordinates with 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1."""
    if isinstance(box, (str, bytes)) or not hasattr(box, "__len__") or len(box) != 4:
        raise ConfigError(f"{owner}: a box is (x0, y0, x1, y1) in relative image coordinates, got {box!r}")
    values = []
    for v in box:
        v = plain_scalar(v)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not -2.0 <= v <= 2.0:
            raise ConfigError(f"{owner}: box coordinates must be finite numbers in [0, 1], got {box!r}")
        values.append(float(v))
    x0, y0, x1, y1 = values
    if not all(0.0 <= v <= 1.0 for v in values):
        raise ConfigError(f"{owner}: box {tuple(values)} lies outside [0, 1]; boxes are relative (x0, y0, x1, y1)")
    if not (x0 < x1 and y0 < y1):
        raise ConfigError(f"{owner}: box {tuple(values)} needs x0 < x1 and y0 < y1")
    return (x0, y0, x1, y1)


def validate_frames(frames: Any, *, owner: str) -> tuple[int, int | None] | None:
    """A token-frame range (start, stop): ints with 0 <= start < stop, stop None for "to the last frame"; or None."""
    if frames is None:
        return None

    def integer(v: Any) -> bool:
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    if (
        isinstance(frames, (str, bytes)) or not isinstance(frames, (tuple, list)) or len(frames) != 2
        or not integer(frames[0]) or not (frames[1] is None or integer(frames[1]))
        or frames[0] < 0 or (frames[1] is not None and frames[1] <= frames[0])
    ):
        raise ConfigError(
            f"{owner}: frames must be (start, stop), token frames start..stop-1 with 0 <= start < stop (stop None: to "
            f"the last frame), got {frames!r}"
        )
    return (int(frames[0]), None if frames[1] is None else int(frames[1]))


# -- resizing ---------------------------------------------------------------------------------------------------
def area_matrix(source: int, target: int) -> torch.Tensor:
    """(target, source) float64 weights of exact area averaging from `source` equal cells to `target` equal cells."""
    src = torch.arange(source + 1, dtype=torch.float64) / source
    dst = torch.arange(target + 1, dtype=torch.float64) / target
    low = torch.maximum(dst[:-1, None], src[None, :-1])
    high = torch.minimum(dst[1:, None], src[None, 1:])
    return (high - low).clamp(min=0.0) * target


def box_coverage(box: Box, grid: tuple[int, int]) -> torch.Tensor:
    """(h, w) float64: the fraction of each grid cell inside `box` (a hard box averaged over each cell)."""
    x0, y0, x1, y1 = box

    def axis(a: float, b: float, n: int) -> torch.Tensor:
        edges = torch.arange(n + 1, dtype=torch.float64) / n
        return (torch.minimum(edges[1:], torch.tensor(b, dtype=torch.float64)) - torch.maximum(edges[:-1], torch.tensor(a, dtype=torch.float64))).clamp(min=0.0) * n

    return axis(y0, y1, grid[0])[:, None] * axis(x0, x1, grid[1])[None, :]


def box_mask(box: Box | None, grid: tuple[int, int], frames: int = 1) -> torch.Tensor:
    """(frames * h * w,) bool: image tokens whose cell centre lies inside `box` (every token when None): a box with
    each edge rounded to the grid, as BoxDiff's."""
    h, w = grid
    if box is None:
        return torch.ones(frames * h * w, dtype=torch.bool)
    ys = (torch.arange(h, dtype=torch.float64) + 0.5) / h
    xs = (torch.arange(w, dtype=torch.float64) + 0.5) / w
    inside = ((ys >= box[1]) & (ys <= box[3]))[:, None] & ((xs >= box[0]) & (xs <= box[2]))[None, :]
    return inside.flatten().repeat(frames)


def resize_mask(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(h, w) float64: `mask` (H, W) area-averaged onto `grid`."""
    h, w = grid
    rows = area_matrix(mask.shape[0], h)
    cols = area_matrix(mask.shape[1], w)
    return rows @ mask.double() @ cols.T


@dataclass(frozen=True)
class GridLayout:
    """All regions on one attention grid.

    `coverage` (R, N): each region's mask area-averaged onto the grid (before overlap normalisation);
    `weights` (R, N): the same, divided by the per-cell sum where that sum exceeds 1 (these are the `m_r(x)` of
    docs/methods.md); `total` (N,): `M(x) = sum_r m_r(x)` (<= 1); `labels` (N,) int64: 0 for background, r + 1 for a
    cell that belongs to region r (see the module docstring). N = h * w, row-major.
    """

    grid: tuple[int, int]
    coverage: torch.Tensor
    weights: torch.Tensor
    total: torch.Tensor
    labels: torch.Tensor

    @property
    def binary(self) -> bool:
        """Whether every cell is either fully inside one region's weight or outside all (M in {0, 1})."""
        return bool(((self.total == 0) | (self.total == 1)).all())


def _coverage(shape: torch.Tensor | Box, grid: tuple[int, int]) -> torch.Tensor:
    return box_coverage(shape, grid) if isinstance(shape, tuple) else resize_mask(shape, grid)


@dataclass(frozen=True, eq=False)
class Tube:
    """A region on a video (frames x height x width) token grid: `shapes` is one shape for every frame of `frames`
    or one shape per frame of it; `frames` (start, stop) token frames (stop None: to the last), None: every frame."""

    shapes: tuple[torch.Tensor | Box, ...]
    frames: tuple[int, int | None] | None = None
    owner: str = "Region"

    def span(self, total: int) -> tuple[int, int]:
        """The token frames (start, stop) on a video of `total` token frames, or ConfigError naming what is allowed."""
        start, stop = self.frames if self.frames is not None else (0, None)
        stop = total if stop is None else stop
        if stop > total or start >= total:
            raise ConfigError(
                f"{self.owner}: frames={self.frames} lies outside this video's {total} token frames; start and stop must "
                f"satisfy 0 <= start < stop <= {total}"
            )
        if len(self.shapes) not in (1, stop - start):
            raise ConfigError(
                f"{self.owner}: {len(self.shapes)} per-frame shapes for token frames {start}..{stop - 1} ({stop - start} "
                f"frames of this video's {total}); give one shape per frame of the range, or one for all"
            )
        return start, stop

    def plane(self, grid: tuple[int, int, int]) -> torch.Tensor:
        """(frames, h, w) float64 coverage: the shape of each frame of the range, zero outside it."""
        total, h, w = grid
        start, stop = self.span(total)
        planes = torch.zeros(total, h, w, dtype=torch.float64)
        for f in range(start, stop):
            planes[f] = _coverage(self.shapes[0] if len(self.shapes) == 1 else self.shapes[f - start], (h, w))
        return planes


def grid_layout(shapes: tuple[torch.Tensor | Box | Tube, ...], grid: tuple[int, ...]) -> GridLayout:
    """Resize every region shape (a (H, W) mask tensor or a box; on a video grid (frames, h, w) a `Tube`, frame-major)
    to `grid` and derive weights and labels."""
    if len(grid) == 3:
        planes = [(s if isinstance(s, Tube) else Tube((s,))).plane(grid) for s in shapes]
    else:
        planes = [_coverage(s, grid) for s in shapes]
    coverage = torch.stack([p.reshape(-1) for p in planes])  # (R, N) float64
    coverage = coverage.clamp(0.0, 1.0)
    coverage = torch.where(coverage < 1e-12, torch.zeros_like(coverage), coverage)
    coverage = torch.where(coverage > 1 - 1e-12, torch.ones_like(coverage), coverage)
    total = coverage.sum(0)
    scale = torch.where(total > 1.0, 1.0 / total.clamp(min=1e-12), torch.ones_like(total))
    weights = coverage * scale
    labels = region_labels(coverage)
    return GridLayout(grid, coverage.float(), weights.float(), weights.sum(0).clamp(max=1.0).float(), labels)


def region_labels(coverage: torch.Tensor) -> torch.Tensor:
    """(N,) int64 labels from (R, N) coverage: the largest region (ties: the later one) if >= 1/2, else 0."""
    best = coverage.max(0).values
    order = torch.arange(1, coverage.shape[0] + 1, dtype=torch.int64)[:, None]
    label = torch.where(coverage >= best - 1e-12, order, torch.zeros_like(order)).max(0).values
    return torch.where(best >= LABEL_THRESHOLD - _EPS, label, torch.zeros_like(label))
