"""Pictures of attention maps with PIL only: a colour map, heatmaps over the generated image, a grid.

Each map is scaled to [0, 1] before colouring, by its own maximum (`scaling="max"`, as Prompt-to-Prompt's
notebooks show maps) or from its minimum to its maximum (`"minmax"`, more contrast for flat maps); the
numbers stay in the result's `maps`. The colour map is a piecewise-linear approximation of matplotlib's
"inferno".
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ...errors import ConfigError
from ...validation import integer
from ..common import write_atomically

# (position, (r, g, b)) anchors of the "inferno" colour map
_INFERNO = (
    (0.0, (0, 0, 4)), (0.125, (31, 12, 72)), (0.25, (85, 15, 109)), (0.375, (136, 34, 106)), (0.5, (186, 54, 85)),
    (0.625, (227, 89, 51)), (0.75, (249, 140, 10)), (0.875, (249, 201, 50)), (1.0, (252, 255, 164)),
)
ALPHA = 0.55  # weight of the heatmap over the image
MIN_TILE = 128  # grid tiles are at least this tall, so tiny images stay legible
MAX_TILE = 512
LABEL_HEIGHT = 18


def colorize(values: np.ndarray) -> np.ndarray:
    """(H, W) values in [0, 1] -> (H, W, 3) uint8 colours."""
    values = np.clip(np.nan_to_num(values.astype(np.float64)), 0.0, 1.0)
    positions = np.array([p for p, _ in _INFERNO])
    colours = np.array([c for _, c in _INFERNO], dtype=np.float64)
    out = np.stack([np.interp(values, positions, colours[:, channel]) for channel in range(3)], axis=-1)
    return out.round().astype(np.uint8)


SCALINGS: tuple[str, ...] = ("max", "minmax")


def check_scaling(scaling: Any) -> str:
    if not isinstance(scaling, str) or scaling not in SCALINGS:
        raise ConfigError(f"scaling must be one of {', '.join(map(repr, SCALINGS))}, got {scaling!r}")
    return scaling


def check_fps(fps: Any) -> int:
    try:  # numpy and 0-d tensor integers too
        return integer(fps, "fps", minimum=1)
    except ConfigError:
        raise ConfigError(f"fps must be a positive int (frames per second of the GIF), got {fps!r}") from None


def output_folder(directory: Any) -> str:
    """The folder a `save` writes to, as a str: a path (str or os.PathLike), not empty. Checked before anything is
    created, so that a refused call leaves nothing behind."""
    path = os.fspath(directory) if isinstance(directory, (str, os.PathLike)) else None
    if not isinstance(path, str) or not path:
        raise ConfigError(f"save: directory must be a folder path (a non-empty str or os.PathLike), got {directory!r}")
    return path


def scale_map(array: np.ndarray, scaling: str = "max") -> np.ndarray:
    """Values in [0, 1]: divided by the maximum, or min-max scaled; a constant or zero map gives zeros."""
    check_scaling(scaling)
    low = float(array.min()) if scaling == "minmax" and array.size else 0.0
    span = (float(array.max()) - low) if array.size else 0.0
    return (array - low) / span if span > 0 else np.zeros_like(array)


def heatmap(values: torch.Tensor, image: Any | None = None, alpha: float = ALPHA, scaling: str = "max") -> Any:
    """A PIL image of one map, blended over `image` (PIL) when given."""
    from PIL import Image

    scaled = scale_map(values.detach().float().cpu().numpy(), scaling)
    picture = Image.fromarray(colorize(scaled))
    if image is None:
        return picture
    base = image.convert("RGB")
    if base.size != picture.size:
        base = base.resize(picture.size, Image.BILINEAR)
    return Image.blend(base, picture, alpha)


def _label(draw: Any, box: tuple[int, int, int, int], text: str) -> None:
    from PIL import ImageFont

    font = ImageFont.load_default()
    left, top, right, bottom = box
    width = right - left
    while text and draw.textlength(text, font=font) > width - 4:
        text = text[:-2] + "…" if len(text) > 2 else text[:-1]
    draw.text((left + 2, top + 3), text, fill=(0, 0, 0), font=font)


def grid(tiles: list[tuple[str, Any]]) -> Any:
    """One picture of `(name, PIL image)` tiles side by side, each name written below its tile."""
    from PIL import Image, ImageDraw

    first = tiles[0][1]
    height = min(max(first.height, MIN_TILE), MAX_TILE)
    width = max(1, round(first.width * height / first.height))
    canvas = Image.new("RGB", (width * len(tiles), height + LABEL_HEIGHT), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for column, (name, tile) in enumerate(tiles):
        resample = Image.NEAREST if tile.height < height else Image.BILINEAR
        canvas.paste(tile.convert("RGB").resize((width, height), resample), (column * width, 0))
        _label(draw, (column * width, height, (column + 1) * width, height + LABEL_HEIGHT), name)
    return canvas


def slug(word: str) -> str:
    """A file-name part for a word label."""
    return re.sub(r"[^0-9A-Za-z]+", "_", word).strip("_").lower() or "word"


def save_maps(
    maps: torch.Tensor, words: Sequence[str], images: Sequence[Any] | None, directory: str, scaling: str = "max"
) -> list[str]:
    """Per image i of `maps` (images, words, H, W): `image{i}_{word}.png` for each word (heatmap over the image,
    when `images` has one) and `image{i}_grid.png`. The arguments are checked before the folder is created."""
    check_scaling(scaling)
    directory = output_folder(directory)
    os.makedirs(directory, exist_ok=True)
    names: list[str] = []
    for word in words:  # file names unique even when two words slug alike, and never the grid's
        name = slug(word)
        while name in names or name == "grid":
            name += "_"
        names.append(name)
    written = []
    for i in range(maps.shape[0]):
        image = images[i] if images is not None and i < len(images) else None
        tiles = [("image", image)] if image is not None else []
        for w, word in enumerate(words):
            picture = heatmap(maps[i, w], image, scaling=scaling)
            path = os.path.join(directory, f"image{i}_{names[w]}.png")
            write_atomically(path, lambda temp, picture=picture: picture.save(temp, format="PNG"))
            written.append(path)
            tiles.append((word, picture))
        path = os.path.join(directory, f"image{i}_grid.png")
        write_atomically(path, lambda temp, tiles=tiles: grid(tiles).save(temp, format="PNG"))
        written.append(path)
    return written


def token_frame(index: int, video_frames: int, token_frames: int) -> int:
    """The token (latent) frame that decoded video frame `index` belongs to. A causal video VAE (Wan's) encodes
    frame 0 alone, then `stride` frames per latent frame: when `video_frames == 1 + stride * (token_frames - 1)`,
    frame i belongs to ceil(i / stride). Otherwise the frames are spread evenly."""
    if not 0 <= index < video_frames:
        raise IndexError(f"video frame {index} is outside 0..{video_frames - 1}")
    if token_frames <= 1:
        return 0
    stride, extra = divmod(video_frames - 1, token_frames - 1)
    if extra == 0 and stride >= 1:
        return -(-index // stride)
    return min(index * token_frames // video_frames, token_frames - 1)


def _overlay(scaled: np.ndarray, image: Any | None, alpha: float = ALPHA) -> Any:
    from PIL import Image

    picture = Image.fromarray(colorize(scaled))
    if image is None:
        return picture
    base = image.convert("RGB")
    if base.size != picture.size:
        base = base.resize(picture.size, Image.BILINEAR)
    return Image.blend(base, picture, alpha)


def save_video_maps(
    maps: torch.Tensor, words: Sequence[str], videos: Sequence[Sequence[Any]] | None, directory: str,
    scaling: str = "max", fps: int = 16,
) -> list[str]:
    """Per video i of `maps` (videos, words, token frames, H, W) and word: `video{i}_{word}_strip.png` (the token
    frames side by side, each over the first decoded frame that belongs to it, labelled `t=k`) and
    `video{i}_{word}.gif` (animated: each decoded frame under its token frame's map; the token frames alone when
    `videos` is None). Each word's maps are scaled over the whole video (frames compare). The arguments are checked
    before the folder is created."""
    check_scaling(scaling)
    fps = check_fps(fps)
    directory = output_folder(directory)
    os.makedirs(directory, exist_ok=True)
    names: list[str] = []
    for word in words:
        name = slug(word)
        while name in names:
            name += "_"
        names.append(name)
    written = []
    tokens = maps.shape[2]
    for i in range(maps.shape[0]):
        video = list(videos[i]) if videos is not None and i < len(videos) and videos[i] else None
        shown = len(video) if video is not None else tokens
        owner = [token_frame(f, shown, tokens) for f in range(shown)] if video is not None else list(range(tokens))
        for w, word in enumerate(words):
            scaled = scale_map(maps[i, w].detach().float().cpu().numpy(), scaling)  # over the whole video
            first = [owner.index(t) if t in owner else None for t in range(tokens)]
            tiles = [
                (f"{word} t={t}", _overlay(scaled[t], video[first[t]] if video is not None and first[t] is not None else None))
                for t in range(tokens)
            ]
            path = os.path.join(directory, f"video{i}_{names[w]}_strip.png")
            write_atomically(path, lambda temp, tiles=tiles: grid(tiles).save(temp, format="PNG"))
            written.append(path)
            pictures = [_overlay(scaled[owner[f]], video[f] if video is not None else None) for f in range(shown)]
            path = os.path.join(directory, f"video{i}_{names[w]}.gif")
            write_atomically(path, lambda temp, pictures=pictures: pictures[0].save(
                temp, format="GIF", save_all=True, append_images=pictures[1:], duration=max(1, round(1000 / fps)), loop=0))
            written.append(path)
    return written
