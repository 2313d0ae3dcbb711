"""Layouts as data (JSON / TOML) and as a picture.

A layout file holds either a list of regions or a table with `regions` and any other `Regions` field:

    {"base_ratio": 0.2, "isolate": true,
     "regions": [{"prompt": "a red circle", "box": [0.05, 0.25, 0.45, 0.75]},
                 {"prompt": "a blue square", "mask": "square.png", "subject": true}]}

    # TOML
    base_ratio = 0.2
    [[regions]]
    prompt = "a red circle"
    box = [0.05, 0.25, 0.45, 0.75]

A relative mask path in a layout file is relative to the file's directory (in `Region(mask=path)` and in
`Control.from_dict` it is relative to the current directory). `Regions.to_dict()` output (with its `type`
key) is a valid layout too.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from ...errors import ConfigError
from ..common import write_atomically
from .region import Region


class Layout(Protocol):
    """What the layout functions read of a `Regions` control."""

    regions: tuple[Region, ...]
    base_ratio: float
    isolate: bool

    def to_dict(self) -> dict[str, Any]: ...

#: The PNG text chunk holding the layout's JSON in pictures saved by `save_picture`.
PNG_KEY = "attnctl:layout"

_PALETTE = (
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240), (240, 50, 230),
    (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255), (170, 110, 40), (128, 0, 0), (170, 255, 195),
    (128, 128, 0), (0, 0, 128),
)


def _read(path: str) -> Any:
    extension = os.path.splitext(path)[1].lower()
    if not os.path.isfile(path):
        raise ConfigError(f"layout file {path!r} does not exist")
    if extension == ".json":
        with open(path, encoding="utf-8") as f:
            try:
                return json.load(f)
            except json.JSONDecodeError as error:
                raise ConfigError(f"layout file {path!r} is not valid JSON: {error}") from None
    if extension == ".toml":
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover - depends on the Python version
            import tomli as tomllib
        with open(path, "rb") as f:
            try:
                return tomllib.load(f)
            except tomllib.TOMLDecodeError as error:
                raise ConfigError(f"layout file {path!r} is not valid TOML: {error}") from None
    raise ConfigError(f"layout file {path!r} must end in .json or .toml")


def layout_fields(source: str | os.PathLike | Mapping[str, Any] | Sequence[Any], **overrides: Any) -> dict[str, Any]:
    """The fields of a `Regions` control from a JSON / TOML file, a mapping or a list of regions; keyword
    arguments override fields (`Regions.from_layout` builds the control and checks the field names)."""
    base_dir = None
    data: Any = source
    if isinstance(source, (str, os.PathLike)):
        path = os.path.abspath(os.fspath(source))
        data = _read(path)
        base_dir = os.path.dirname(path)
    if isinstance(data, Sequence) and not isinstance(data, (str, bytes)):
        data = {"regions": list(data)}
    if not isinstance(data, Mapping):
        raise ConfigError(f"a layout is a list of regions or a table with 'regions', got {type(data).__name__}")
    fields = {k: v for k, v in data.items() if k != "type"}
    if data.get("type", "regions") != "regions":
        raise ConfigError(f"a layout has type 'regions', got {data.get('type')!r}")
    if "regions" not in fields:
        raise ConfigError(f"a layout needs 'regions' (a list of {{prompt, box | mask}}), got keys {sorted(fields)}")
    regions = fields["regions"]
    if isinstance(regions, (str, bytes, Mapping)) or not isinstance(regions, Sequence):
        raise ConfigError(f"a layout's 'regions' must be a list, got {regions!r}")
    fields["regions"] = tuple(Region.from_dict(r, base_dir=base_dir) for r in regions)
    if isinstance(fields.get("steps"), list):
        fields["steps"] = tuple(fields["steps"])
    if isinstance(fields.get("layers"), list):
        fields["layers"] = tuple(fields["layers"])
    fields.update(overrides)
    return fields


def save_layout(regions: Layout, path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if not path.lower().endswith(".json"):
        raise ConfigError(f"layouts are saved as JSON; {path!r} must end in .json")
    data = regions.to_dict()
    folder = os.path.dirname(os.path.abspath(path))

    def relative(mask: str) -> str:  # a layout reads its mask paths relative to its own folder (`load_layout`)
        return os.path.relpath(os.path.abspath(mask), folder)

    for region in data.get("regions", ()):
        mask = region.get("mask")
        if isinstance(mask, str):
            region["mask"] = relative(mask)
        elif isinstance(mask, list) and all(isinstance(m, str) for m in mask):
            region["mask"] = [relative(m) for m in mask]
    text = json.dumps(data, indent=2) + "\n"

    def write(temp: str) -> None:
        with open(temp, "w", encoding="utf-8") as f:
            f.write(text)

    return write_atomically(path, write)


def save_mask(mask: torch.Tensor, path: str) -> str:
    """Save a (H, W) mask in [0, 1] as a 16-bit grayscale PNG (read back by `Region(mask=path)`)."""
    from PIL import Image

    array = np.round(mask.detach().cpu().double().clamp(0, 1).numpy() * 65535).astype(np.uint16)
    return write_atomically(path, lambda temp: Image.fromarray(array).save(temp, format="PNG"))


def draw_layout(regions: Layout, size: tuple[int, int] = (512, 512), background: Any = None):
    """A PIL RGB picture of the layout (`size` = (width, height)): each region's area tinted in its colour,
    boxes outlined, each prompt written at its region's top-left corner. `background`: a PIL image to draw on."""
    from PIL import Image, ImageDraw

    width, height = int(size[0]), int(size[1])
    if width <= 0 or height <= 0:
        raise ConfigError(f"picture size must be positive (width, height), got {size!r}")
    if background is None:
        canvas = Image.new("RGB", (width, height), (255, 255, 255))
    else:
        canvas = background.convert("RGB").resize((width, height))
    base = np.asarray(canvas, dtype=np.float32)
    for position, region in enumerate(regions.regions):
        colour = np.array(_PALETTE[position % len(_PALETTE)], dtype=np.float32)
        alpha = 0.35 * _raster(region, height, width)[..., None]
        base = base * (1 - alpha) + colour * alpha
    picture = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    font = _font(max(10, height // 32))
    for position, region in enumerate(regions.regions):
        colour = _PALETTE[position % len(_PALETTE)]
        shape = region.shape  # per-frame boxes: the first frame's, as the region's own colour raster
        if not isinstance(shape, torch.Tensor):
            x0, y0, x1, y1 = shape
            corner = (x0 * width, y0 * height)
            draw.rectangle([x0 * width, y0 * height, x1 * width - 1, y1 * height - 1], outline=colour, width=max(1, width // 256))
        else:
            inside = torch.nonzero(_raster_tensor(region, height, width) >= 0.5)
            corner = (float(inside[:, 1].min()), float(inside[:, 0].min())) if len(inside) else (0.0, 0.0)
        label = f"{position + 1}. {region.prompt}" + ("" if region.subject else " (shared)")
        x, y = corner[0] + 3, corner[1] + 2
        box = draw.textbbox((x, y), label, font=font)
        draw.rectangle(box, fill=(255, 255, 255))
        draw.text((x, y), label, fill=colour, font=font)
    footer = f"base_ratio {regions.base_ratio:g}" + (" | isolate" if regions.isolate else "")
    fbox = draw.textbbox((0, 0), footer, font=font)
    draw.text((width - (fbox[2] - fbox[0]) - 4, height - (fbox[3] - fbox[1]) - 6), footer, fill=(0, 0, 0), font=font)
    return picture


def save_picture(regions: Layout, path: str | os.PathLike, size: tuple[int, int] = (512, 512), background: Any = None) -> str:
    """Save `draw_layout` as a PNG; the layout's JSON goes in its text chunk `attnctl:layout` when serialisable."""
    from PIL.PngImagePlugin import PngInfo

    path = os.fspath(path)
    info = PngInfo()
    try:
        info.add_text(PNG_KEY, json.dumps(regions.to_dict()))
    except ConfigError:
        pass  # in-memory masks: the picture is still useful without the data
    picture = draw_layout(regions, size=size, background=background)
    return write_atomically(path, lambda temp: picture.save(temp, format="PNG", pnginfo=info))


def _raster_tensor(region: Region, height: int, width: int) -> torch.Tensor:
    from .masks import box_coverage, resize_mask

    shape = region.shape
    return box_coverage(shape, (height, width)) if isinstance(shape, tuple) else resize_mask(shape, (height, width))


def _raster(region: Region, height: int, width: int) -> np.ndarray:
    return _raster_tensor(region, height, width).float().numpy()


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()
