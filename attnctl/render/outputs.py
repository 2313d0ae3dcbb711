"""Atomic file writes and PNG files that carry their generation parameters.

Every file is written to a temporary name in the same folder and renamed over its final name
(`os.replace`, atomic on POSIX and Windows), so a killed process leaves either the old file, the new file
or a stray temporary (`.<name>.<pid>.tmp`, removed by the next run), never a truncated file. `fsync=True`
also flushes the data and the folder entry to the disk, which protects against power loss, not only
against a killed process.

PNG text chunks: `attnctl` holds the parameters as JSON (read back with `read_png_params`); `parameters`
holds the same in the `prompt / Negative prompt: / Steps: ...` text that image browsers show.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from collections.abc import Iterable
from typing import Any

from ..errors import ConfigError

PNG_KEY = "attnctl"
TEMP_PATTERN = re.compile(r"^\..+\.\d+\.tmp$")
#: What `attnctl render` writes beside an image as `<seed>.<name>`: the image, the video (MP4 or GIF) and its frames
#: folder. A control's output folder `<seed>.<key>/` may not take one of these names (nor end in one).
RENDERER_NAMES: tuple[str, ...] = ("png", "gif", "mp4", "frames")


def output_folder_name(key: Any) -> str:
    """The file-safe name of a control's output key: `<seed>.<name>/` is the folder its `save` fills (characters
    outside letters, digits and `._-` become `_`; leading and trailing dots are dropped)."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in str(key)).strip(".") or "output"


def output_key_problems(keys: Iterable[tuple[Any, str]]) -> list[str]:
    """Why these output keys (each with a label naming its control) cannot each have their own folder
    `<seed>.<name>/` beside the renderer's files: a name the renderer writes itself (`png`, `gif`, `mp4`,
    `frames`, or one ending in `.png` ...), or two keys with one file-safe name (compared ignoring case, as
    macOS and Windows do). Empty when every key is usable. Checked for every control's key, also a report's
    that is never saved: a job file cannot tell which outputs will have a `save()` method."""
    problems: list[str] = []
    seen: dict[str, tuple[Any, str]] = {}
    for key, label in keys:
        name = output_folder_name(key)
        lowered = name.lower()
        if lowered in RENDERER_NAMES or lowered.rsplit(".", 1)[-1] in RENDERER_NAMES:
            problems.append(  # a report without save() writes nothing, but the job file cannot tell which outputs have one
                f"{label}: output key {key!r} names <seed>.{name}/, a name the renderer uses for its own files "
                f"(<seed>.png, <seed>.gif, <seed>.mp4, <seed>.frames/); the renderer saves an output with a save() method "
                "(attention maps) to <seed>.<key>/, so these names are reserved for every control's key, whether or not "
                "its output is saved; choose a key other than png, gif, mp4 or frames that does not end in .png, .gif, "
                ".mp4 or .frames"
            )
            continue
        if lowered in seen:
            other, other_label = seen[lowered]
            problems.append(
                f"{label}: output key {key!r} names <seed>.{name}/, as output key {other!r} ({other_label}) does: the "
                "folder an output with a save() method is saved to; keys must differ after characters other than "
                "letters, digits and ._- become '_' (and ignoring case)"
            )
            continue
        seen[lowered] = (key, label)
    return problems


def temp_name(path: str) -> str:
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}.{os.getpid()}.tmp")


def atomic_write(path: str, data: bytes, *, fsync: bool = False) -> None:
    """Write `data` to `path` through a temporary file and a rename."""
    temp = temp_name(path)
    try:
        with open(temp, "wb") as handle:
            handle.write(data)
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        _remove_quietly(temp)
        raise
    if fsync:
        fsync_folder(os.path.dirname(path) or ".")


def atomic_folder(path: str, fill, *, fsync: bool = False) -> None:
    """Create the folder `path` by filling a temporary folder (`fill(temp_path)`) and renaming it."""
    temp = temp_name(path)
    shutil.rmtree(temp, ignore_errors=True)
    os.makedirs(temp)
    try:
        fill(temp)
        if os.path.isdir(path):
            shutil.rmtree(path)  # a rename cannot replace a non-empty folder
        os.replace(temp, path)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    if fsync:
        fsync_folder(os.path.dirname(path) or ".")


def fsync_folder(folder: str) -> None:
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without folder descriptors
        return
    try:
        os.fsync(descriptor)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(descriptor)


def remove_temporaries(folder: str) -> int:
    """Remove temporaries left by killed runs under `folder` (one level of sub-folders); returns the count."""
    removed = 0
    if not os.path.isdir(folder):
        return 0
    for place in [folder] + [e.path for e in os.scandir(folder) if e.is_dir(follow_symlinks=False)]:
        for entry in os.scandir(place):
            if TEMP_PATTERN.match(entry.name):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    _remove_quietly(entry.path)
                removed += 1
    return removed


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


# -- PNG with parameters ------------------------------------------------------------------------------------------
def png_bytes(image: Any, params: dict[str, Any]) -> bytes:
    """The PNG encoding of a PIL image with `params` in its text chunks."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(PNG_KEY, json.dumps(params, ensure_ascii=True, sort_keys=True))
    info.add_text("parameters", parameters_text(params))  # iTXt when not latin-1
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def save_png(image: Any, path: str, params: dict[str, Any], *, fsync: bool = False) -> int:
    """Atomically write `image` with `params` to `path`; returns the number of bytes written."""
    data = png_bytes(image, params)
    atomic_write(path, data, fsync=fsync)
    return len(data)


# -- videos ------------------------------------------------------------------------------------------------------
#: Frames per second of the GIFs written for video pipelines (Wan generates at 16 fps).
VIDEO_FPS = 16


def gif_bytes(frames: list[Any], params: dict[str, Any], fps: int = VIDEO_FPS) -> bytes:
    """An animated GIF of PIL `frames` (looping, `fps` frames per second; GIF stores hundredths of a second), with
    `params` as JSON in its comment (read back with `read_gif_params`)."""
    if not frames:
        raise ValueError("a video needs at least one frame")
    buffer = io.BytesIO()
    first, *rest = (frame.convert("RGB") for frame in frames)
    first.save(buffer, format="GIF", save_all=True, append_images=rest, duration=max(1, round(1000 / fps)), loop=0,
               comment=json.dumps(params, ensure_ascii=True, sort_keys=True).encode("ascii"))
    return buffer.getvalue()


def strip(images: list[Any], *, vertical: bool = False) -> Any:
    """The images side by side, left to right (top to bottom with `vertical`), as one PIL image (an interpolation
    sequence's PNG; the rows of an example's comparison); a narrower image leaves white beside it."""
    from PIL import Image

    images = [image.convert("RGB") for image in images]
    along = [image.height if vertical else image.width for image in images]
    across = max(image.width if vertical else image.height for image in images)
    out = Image.new("RGB", (across, sum(along)) if vertical else (sum(along), across), "white")
    offset = 0
    for image, length in zip(images, along):
        out.paste(image, (0, offset) if vertical else (offset, 0))
        offset += length
    return out


def video_format() -> str:
    """The format `attnctl render` writes videos in: "mp4" where imageio-ffmpeg (the ffmpeg binary imageio uses;
    `pip install imageio-ffmpeg`) is importable, "gif" (pillow) otherwise."""
    try:
        import imageio_ffmpeg

        imageio_ffmpeg.get_ffmpeg_exe()
    except Exception:  # noqa: BLE001 - not installed, or no ffmpeg binary for this platform: GIF
        return "gif"
    return "mp4"


def _mp4_file(frames: list[Any], path: str, params: dict[str, Any], fps: int) -> None:
    """Encode PIL `frames` as H.264 MP4 (yuv420p, sizes padded to even) at `path`, `params` as JSON in its comment."""
    import imageio_ffmpeg
    import numpy as np

    pictures = [np.asarray(frame.convert("RGB")) for frame in frames]
    height, width = pictures[0].shape[:2]
    comment = json.dumps(params, ensure_ascii=True, sort_keys=True)
    writer = imageio_ffmpeg.write_frames(
        path, (width, height), fps=fps, codec="libx264", quality=8, macro_block_size=1, pix_fmt_out="yuv420p",
        output_params=["-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2", "-metadata", f"comment={comment}", "-f", "mp4"],
    )
    writer.send(None)
    try:
        for picture in pictures:
            writer.send(np.ascontiguousarray(picture))
    finally:
        writer.close()


def save_video(frames: list[Any], path: str, params: dict[str, Any], *, fsync: bool = False, fps: int = VIDEO_FPS) -> int:
    """Atomically write `frames` with `params` to `path`: an MP4 when `path` ends in .mp4 (needs imageio-ffmpeg),
    else an animated GIF; returns the number of bytes written."""
    if not frames:
        raise ConfigError("a video needs at least one frame")
    if path.lower().endswith(".mp4"):
        if video_format() != "mp4":
            raise ConfigError(f"writing {path} needs imageio-ffmpeg (pip install imageio-ffmpeg); write a .gif instead")
        temp = temp_name(path)
        try:
            _mp4_file(frames, temp, params, fps)
            if fsync:
                with open(temp, "rb") as handle:
                    os.fsync(handle.fileno())
            os.replace(temp, path)
        except BaseException:
            _remove_quietly(temp)
            raise
        if fsync:
            fsync_folder(os.path.dirname(path) or ".")
        return os.path.getsize(path)
    data = gif_bytes(frames, params, fps)
    atomic_write(path, data, fsync=fsync)
    return len(data)


def read_mp4_params(path: str) -> dict[str, Any]:
    """The parameters `save_video` stored in an MP4's comment (needs imageio-ffmpeg; ValueError if it holds none)."""
    import subprocess

    with open(path, "rb"):  # a missing or unreadable file is an OSError naming it, not "no parameters"
        pass
    import imageio_ffmpeg

    result = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", path, "-f", "ffmetadata", "-"],
                            capture_output=True, check=False)
    for line in result.stdout.decode("utf-8", "replace").splitlines():
        if line.startswith("comment="):
            value = re.sub(r"\\(.)", r"\1", line[len("comment="):])  # ffmetadata escapes = ; # \ and newlines
            try:
                return json.loads(value)
            except ValueError:
                break
    raise ValueError(f"{path} has no attnctl parameters in its MP4 comment")


def save_frames(frames: list[Any], folder: str, params: dict[str, Any], *, fsync: bool = False) -> None:
    """Atomically create `folder` with one PNG per frame (`0000.png`, ...), each carrying `params` and its `frame`."""

    def fill(path: str) -> None:
        for index, frame in enumerate(frames):
            with open(os.path.join(path, f"{index:04d}.png"), "wb") as handle:
                handle.write(png_bytes(frame, {**params, "frame": index}))

    atomic_folder(folder, fill, fsync=fsync)


def read_gif_params(path: str) -> dict[str, Any]:
    """The parameters `save_video` stored in a GIF's comment (raises ValueError if it holds none)."""
    from PIL import Image

    with Image.open(path) as image:
        comment = image.info.get("comment", b"")
    try:
        return json.loads(comment.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise ValueError(f"{path} has no attnctl parameters in its GIF comment") from None


def read_png_params(path: str) -> dict[str, Any]:
    """The parameters `save_png` stored in a PNG (raises ValueError if it holds none)."""
    from PIL import Image

    with Image.open(path) as image:
        text = getattr(image, "text", {}) or {}
        if PNG_KEY not in text:
            raise ValueError(f"{path} has no attnctl parameters (text chunks: {', '.join(sorted(text)) or 'none'})")
        return json.loads(text[PNG_KEY])


#: diffusers scheduler classes under the sampler names AUTOMATIC1111 writes (PNG-info readers show them as given).
SAMPLER_NAMES: dict[str, str] = {
    "EulerDiscreteScheduler": "Euler", "EulerAncestralDiscreteScheduler": "Euler a", "DDIMScheduler": "DDIM",
    "PNDMScheduler": "PLMS", "LMSDiscreteScheduler": "LMS", "HeunDiscreteScheduler": "Heun",
    "DPMSolverMultistepScheduler": "DPM++ 2M", "DPMSolverSinglestepScheduler": "DPM++ 2S",
    "DPMSolverSDEScheduler": "DPM++ SDE", "KDPM2DiscreteScheduler": "DPM2", "KDPM2AncestralDiscreteScheduler": "DPM2 a",
    "UniPCMultistepScheduler": "UniPC", "DDPMScheduler": "DDPM", "LCMScheduler": "LCM", "DEISMultistepScheduler": "DEIS",
    "FlowMatchEulerDiscreteScheduler": "Euler", "FlowMatchHeunDiscreteScheduler": "Heun",
}


def sampler_fields(scheduler: Any) -> dict[str, str]:
    """`sampler` (A1111's name for the scheduler class), `schedule_type` (Karras / Exponential / Beta / Automatic)
    and `scheduler` (the diffusers class) of a pipeline's scheduler."""
    cls = type(scheduler).__name__
    config = getattr(scheduler, "config", {}) or {}
    get = config.get if hasattr(config, "get") else (lambda key, default=None: default)
    schedule = ("Karras" if get("use_karras_sigmas", False) else "Exponential" if get("use_exponential_sigmas", False)
                else "Beta" if get("use_beta_sigmas", False) else "Automatic")
    return {"sampler": SAMPLER_NAMES.get(cls, cls), "schedule_type": schedule, "scheduler": cls}


def _a1111_value(value: Any) -> str:
    text = str(value)
    # A1111 quotes a value holding a separator (its readers split on ", " and ": " outside quotes)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ',:"\n') else text


def parameters_text(params: dict[str, Any]) -> str:
    """The parameters in AUTOMATIC1111's `parameters` layout, which PNG-info readers parse: the prompt, then
    `Negative prompt: ...`, then `Steps: N, Sampler: X, Schedule type: Y, CFG scale: Z, Seed: S, Size: WxH,
    Model: M` and attnctl's own fields (values holding `,` or `:` are JSON-quoted, as A1111 does)."""
    lines = [str(params.get("prompt", ""))]
    if params.get("negative_prompt"):
        lines.append(f"Negative prompt: {params['negative_prompt']}")
    controls = params.get("controls") or ()
    fields = [
        ("Steps", params.get("steps")),
        ("Sampler", params.get("sampler")),
        ("Schedule type", params.get("schedule_type")),
        ("CFG scale", params.get("guidance_scale")),
        ("Seed", params.get("seed")),
        ("Size", f"{params['width']}x{params['height']}" if params.get("width") else None),
        ("Model", params.get("model")),
        ("Controls", ", ".join(c.get("type", "?") for c in controls if isinstance(c, dict)) or None),
        ("Output", params.get("output")),
        ("attnctl", params.get("attnctl")),
    ]
    lines.append(", ".join(f"{name}: {_a1111_value(value)}" for name, value in fields if value is not None))
    return "\n".join(lines)
