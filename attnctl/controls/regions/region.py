"""`Region`: one prompt and where it applies on the canvas (a box or a soft mask)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ...errors import ConfigError
from .masks import Box, frame_stack, load_mask, validate_box, validate_frames

_FIELDS = ("prompt", "box", "mask", "subject", "frames")
_SHAPES = "a Region also takes (frames, H, W) or a list of masks, one mask per token frame (video denoisers)"


@dataclass(frozen=True, eq=False)
class Region:
    """A prompt that applies to part of the canvas.

    Give exactly one of:

    - `box=(x0, y0, x1, y1)`: relative image coordinates in [0, 1] (x to the right, y down), a hard mask;
    - `mask=`: a soft mask in [0, 1] covering the whole image (stretched to the canvas like a box): a PIL
      image (grayscale, white = inside), a numpy array or torch tensor (H, W), or a path to an image file
      (relative to the current directory unless absolute).

    Video denoisers (Wan: a frames x height x width token grid): one box or mask applies to every token frame;
    `box=[box, ...]` or `mask=[mask, ...]` (one per token frame, masks of one size) gives one shape per token
    frame, and so does a 3-D numpy array or tensor (frames, H, W), read as the list of its frames (one video of
    `AttentionMapResult.masks`: `mask=masks[i]` is `mask=list(masks[i])`, except that a uint8 stack is scaled as
    one array; a 3-D array with a first or last axis of 1 is one single-channel mask, one whose last axis is 3 or 4
    an RGB / RGBA image, refused). One frame's mask may be empty (the region has no cells in that frame: the object
    is out of view), as long as one is not. In-memory per-frame masks are kept as a tuple of (H, W) tensors.
    `frames=(start, stop)` limits the region to token frames start..stop-1 (a spatio-temporal tube; stop None: to
    the last), and per-frame shapes then cover exactly that range. Token frames are the denoiser's latent frames
    (Wan's VAE: frame 0 is video frame 0, token frame t >= 1 video frames 4t-3..4t). A region with `frames` or
    per-frame shapes is refused on image denoisers.

    `subject` (default True) marks the region as a subject for `Regions(isolate=True)`: image tokens of two
    different subjects do not attend to each other. Set it to False for regions that should stay shared with
    everything, like a background ("a blue sky").

    A path mask is read when the region is made (an empty or unreadable mask raises then) and serialises
    as its path; an in-memory mask cannot be serialised (`to_dict` raises; save it as a PNG, see
    `Regions.with_mask_files`).
    """

    prompt: str
    box: Box | None = None
    mask: Any = None
    subject: bool = True
    frames: tuple[int, int | None] | None = None

    def __post_init__(self) -> None:
        owner = f"Region({self.prompt!r})" if isinstance(self.prompt, str) else "Region"
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ConfigError(f"{owner}: the prompt must be a non-empty string, got {self.prompt!r}")
        if not isinstance(self.subject, bool):
            raise ConfigError(f"{owner}: subject must be True or False, got {self.subject!r}")
        if (self.box is None) == (self.mask is None):
            raise ConfigError(f"{owner}: give exactly one of box=(x0, y0, x1, y1) or mask=...; got {'both' if self.box is not None else 'neither'}")
        object.__setattr__(self, "frames", validate_frames(self.frames, owner=owner))
        if self.box is not None:
            if _box_list(self.box):
                boxes = tuple(validate_box(b, owner=f"{owner} box[{i}]") for i, b in enumerate(self.box))
                if not boxes:
                    raise ConfigError(f"{owner}: a list of per-frame boxes needs at least one box, got {self.box!r}")
                object.__setattr__(self, "box", boxes)
            else:
                object.__setattr__(self, "box", validate_box(self.box, owner=owner))
            object.__setattr__(self, "_pixels", None)
            object.__setattr__(self, "_stacked", None)
            return
        stack = frame_stack(self.mask)  # a (frames, H, W) array reads as the list of its frames
        object.__setattr__(self, "_stacked", None if stack is None else tuple(self.mask.shape))
        masks = stack if stack is not None else self.mask
        if isinstance(masks, (list, tuple)):  # one mask per token frame (video), each in any accepted form
            if not masks:
                raise ConfigError(f"{owner}: a list of per-frame masks needs at least one mask, got {masks!r}")
            # A frame may be empty (the region has no cells there: the object is out of the frame), the region not.
            frames = [load_mask(m, owner=f"{owner} mask[{f}]", allow_empty=True) for f, m in enumerate(masks)]
            if len({tuple(m.shape) for m in frames}) != 1:
                raise ConfigError(f"{owner}: per-frame masks must share one size, got {[tuple(m.shape) for m in frames]}")
            if not any(bool(m.any()) for m in frames):
                raise ConfigError(
                    f"{owner}: every per-frame mask is empty (all zeros); a region needs some area in at least one frame"
                )
            pixels = torch.stack(frames)
            paths = all(isinstance(m, (str, os.PathLike)) for m in masks)  # kept as paths: the layout round-trips
            # In memory: a tuple of (H, W) frames, which reads back as per-frame masks (dataclasses.replace), as the
            # (F, H, W) stack would not when F is 1 or W is 1, 3 or 4.
            object.__setattr__(self, "mask", tuple(os.fspath(m) for m in masks) if paths else tuple(pixels))
            object.__setattr__(self, "_pixels", pixels)
            return
        if isinstance(self.mask, (str, os.PathLike)):
            path = os.fspath(self.mask)
            object.__setattr__(self, "mask", path)
            object.__setattr__(self, "_pixels", load_mask(path, owner=owner, shapes=_SHAPES))
        else:
            pixels = load_mask(self.mask, owner=owner, shapes=_SHAPES)
            object.__setattr__(self, "mask", pixels)  # a private copy: later changes to the caller's array do not leak in
            object.__setattr__(self, "_pixels", pixels)

    # -- what the control uses ----------------------------------------------------------------------------------
    @property
    def shape(self) -> Box | torch.Tensor:
        """The box, or the mask as a (H, W) float32 tensor in [0, 1] (per-frame shapes: the first frame's)."""
        frames = self.per_frame
        if frames is not None:
            return frames[0]
        return self.box if self.box is not None else self._pixels

    @property
    def per_frame(self) -> tuple[Box | torch.Tensor, ...] | None:
        """One shape per token frame (boxes, or (H, W) masks), or None when one shape covers every frame."""
        if self.box is not None:
            return self.box if isinstance(self.box[0], tuple) else None
        return tuple(self._pixels) if self._pixels.ndim == 3 else None

    @property
    def video(self) -> bool:
        """Whether the region uses video fields (a frame range or per-frame shapes)."""
        return self.frames is not None or self.per_frame is not None

    @property
    def mask_path(self) -> str | tuple[str, ...] | None:
        """The mask's file, or one file per token frame; None for a box or an in-memory mask."""
        if isinstance(self.mask, tuple) and not isinstance(self.mask[0], str):
            return None  # per-frame masks in memory
        return self.mask if isinstance(self.mask, (str, tuple)) else None

    # -- equality (masks are tensors) -----------------------------------------------------------------------------
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Region):
            return NotImplemented
        if (self.prompt, self.box, self.subject, self.mask_path, self.frames) != (other.prompt, other.box, other.subject, other.mask_path, other.frames):
            return False
        if self.box is not None:
            return True
        return self._pixels.shape == other._pixels.shape and torch.equal(self._pixels, other._pixels)

    def __hash__(self) -> int:
        pixels = None if self._pixels is None else tuple(self._pixels.shape)
        return hash((self.prompt, self.box, self.subject, self.mask_path, pixels, self.frames))

    def __repr__(self) -> str:
        if self.box is not None:
            where = f"box={self.box}"
        elif self.mask_path is not None:
            where = f"mask={self.mask_path!r}"
        elif self._stacked is not None:  # name the rule: a (3, H, W) colour tensor reads as 3 frames
            where = (f"mask=<{self._stacked} array, read as {self._stacked[0]} per-token-frame masks: a 3-D mask (F, H, W) "
                     "is F masks, one per token frame>")
        else:
            where = f"mask=<{tuple(self._pixels.shape)} array>"
        extra = "" if self.subject else ", subject=False"
        extra += "" if self.frames is None else f", frames={self.frames}"
        return f"Region({self.prompt!r}, {where}{extra})"

    # -- serialisation --------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """`{"prompt", "box" | "mask", "subject"}`; raises ConfigError for an in-memory mask."""
        out: dict[str, Any] = {"prompt": self.prompt}
        if self.box is not None:
            out["box"] = [list(b) for b in self.box] if self.per_frame is not None else list(self.box)
        elif self.mask_path is not None:
            out["mask"] = self.mask_path if isinstance(self.mask_path, str) else list(self.mask_path)
        else:
            raise ConfigError(
                f"{self!r} has an in-memory mask, which cannot be serialised; save it as an image and pass its path "
                "(Regions.with_mask_files(directory) does that for every in-memory mask)"
            )
        out["subject"] = self.subject
        if self.frames is not None:
            out["frames"] = list(self.frames)
        return out

    @staticmethod
    def from_dict(data: Mapping[str, Any], *, base_dir: str | None = None) -> Region:
        """Rebuild from `to_dict` output. A relative mask path is taken relative to `base_dir` when given."""
        if isinstance(data, Region):
            return data
        if not isinstance(data, Mapping):
            raise ConfigError(f"a region is a mapping with 'prompt' and 'box' or 'mask', got {data!r}")
        unknown = sorted(set(data) - set(_FIELDS))
        if unknown:
            raise ConfigError(f"a region has no field(s) {', '.join(unknown)}; fields: {', '.join(_FIELDS)}")
        if "prompt" not in data:
            raise ConfigError(f"a region needs a 'prompt', got {dict(data)!r}")
        fields = dict(data)
        mask = fields.get("mask")
        if base_dir is not None and isinstance(mask, str) and not os.path.isabs(mask):
            fields["mask"] = os.path.normpath(os.path.join(base_dir, mask))
        elif base_dir is not None and isinstance(mask, list) and all(isinstance(m, str) for m in mask):  # per frame
            fields["mask"] = [m if os.path.isabs(m) else os.path.normpath(os.path.join(base_dir, m)) for m in mask]
        if fields.get("box") is not None and isinstance(fields["box"], list):
            fields["box"] = [tuple(b) for b in fields["box"]] if _box_list(fields["box"]) else tuple(fields["box"])
        if isinstance(fields.get("frames"), list):
            fields["frames"] = tuple(fields["frames"])
        return Region(**fields)


def _box_list(box: Any) -> bool:
    """Whether `box` is a list of boxes (one per token frame) rather than one box."""
    if not isinstance(box, (list, tuple)):
        return False
    return len(box) == 0 or all(hasattr(b, "__len__") and not isinstance(b, (str, bytes)) for b in box)
