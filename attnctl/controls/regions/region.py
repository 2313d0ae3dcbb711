"""`Region`: one prompt and where it applies on the canvas (a box or a soft mask)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ...errors import ConfigError
from .masks import Box, load_mask, validate_box

_FIELDS = ("prompt", "box", "mask", "subject")


@dataclass(frozen=True, eq=False)
class Region:
    """A prompt that applies to part of the canvas.

    Give exactly one of:

    - `box=(x0, y0, x1, y1)`: relative image coordinates in [0, 1] (x to the right, y down), a hard mask;
    - `mask=`: a soft mask in [0, 1] covering the whole image (stretched to the canvas like a box): a PIL
      image (grayscale, white = inside), a numpy array or torch tensor (H, W), or a path to an image file
      (relative to the current directory unless absolute).

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

    def __post_init__(self) -> None:
        owner = f"Region({self.prompt!r})" if isinstance(self.prompt, str) else "Region"
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ConfigError(f"{owner}: the prompt must be a non-empty string, got {self.prompt!r}")
        if not isinstance(self.subject, bool):
            raise ConfigError(f"{owner}: subject must be True or False, got {self.subject!r}")
        if (self.box is None) == (self.mask is None):
            raise ConfigError(f"{owner}: give exactly one of box=(x0, y0, x1, y1) or mask=...; got {'both' if self.box is not None else 'neither'}")
        if self.box is not None:
            object.__setattr__(self, "box", validate_box(self.box, owner=owner))
            object.__setattr__(self, "_pixels", None)
            return
        if isinstance(self.mask, (str, os.PathLike)):
            path = os.fspath(self.mask)
            object.__setattr__(self, "mask", path)
            object.__setattr__(self, "_pixels", load_mask(path, owner=owner))
        else:
            pixels = load_mask(self.mask, owner=owner)
            object.__setattr__(self, "mask", pixels)  # a private copy: later changes to the caller's array do not leak in
            object.__setattr__(self, "_pixels", pixels)

    # -- what the control uses ----------------------------------------------------------------------------------
    @property
    def shape(self) -> Box | torch.Tensor:
        """The box, or the mask as a (H, W) float32 tensor in [0, 1]."""
        return self.box if self.box is not None else self._pixels

    @property
    def mask_path(self) -> str | None:
        return self.mask if isinstance(self.mask, str) else None

    # -- equality (masks are tensors) -----------------------------------------------------------------------------
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Region):
            return NotImplemented
        if (self.prompt, self.box, self.subject, self.mask_path) != (other.prompt, other.box, other.subject, other.mask_path):
            return False
        if self.box is not None:
            return True
        return self._pixels.shape == other._pixels.shape and torch.equal(self._pixels, other._pixels)

    def __hash__(self) -> int:
        pixels = None if self._pixels is None else tuple(self._pixels.shape)
        return hash((self.prompt, self.box, self.subject, self.mask_path, pixels))

    def __repr__(self) -> str:
        if self.box is not None:
            where = f"box={self.box}"
        elif self.mask_path is not None:
            where = f"mask={self.mask_path!r}"
        else:
            where = f"mask=<{tuple(self._pixels.shape)} array>"
        extra = "" if self.subject else ", subject=False"
        return f"Region({self.prompt!r}, {where}{extra})"

    # -- serialisation --------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """`{"prompt", "box" | "mask", "subject"}`; raises ConfigError for an in-memory mask."""
        out: dict[str, Any] = {"prompt": self.prompt}
        if self.box is not None:
            out["box"] = list(self.box)
        elif self.mask_path is not None:
            out["mask"] = self.mask_path
        else:
            raise ConfigError(
                f"{self!r} has an in-memory mask, which cannot be serialised; save it as an image and pass its path "
                "(Regions.with_mask_files(directory) does that for every in-memory mask)"
            )
        out["subject"] = self.subject
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
            fields["mask"] = os.path.join(base_dir, mask)
        if fields.get("box") is not None and isinstance(fields["box"], list):
            fields["box"] = tuple(fields["box"])
        return Region(**fields)
