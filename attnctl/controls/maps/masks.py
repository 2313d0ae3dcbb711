"""Masks from attention maps: the soft and binary masks of `AttentionMapResult.masks` (docs/methods.md).

The rule (the thresholding step of RefAM, Kukleva et al. 2025, "RefAM: Attention Magnets for Zero-Shot Referral
Segmentation", arXiv:2509.22650, on the map that the magnets and the sink suppression leave; our choices of
normalisation and threshold): per image, the word's map (summed over layers and steps, at the result's
resolution) is min-max normalised to [0, 1], `soft = (m - min m) / (max m - min m)` (a constant map gives
zeros), and the binary mask is `soft >= threshold` with `threshold = 0.5` by default (the half-maximum
of the normalised map). Video maps are normalised over all their frames together.
"""

from __future__ import annotations

import torch

from ...errors import ConfigError
from ...validation import number, plain_scalar

#: Default threshold of the binary masks, on the min-max normalised map.
MASK_THRESHOLD = 0.5


def soft_masks(maps: torch.Tensor, frames: bool = False) -> torch.Tensor:
    """Min-max normalised maps in [0, 1]: per image over (height, width), or per video over (frames, height, width)."""
    dims = (-3, -2, -1) if frames else (-2, -1)
    low = maps.amin(dim=dims, keepdim=True)
    span = maps.amax(dim=dims, keepdim=True) - low
    return torch.where(span > 0, (maps - low) / span.clamp_min(1e-30), torch.zeros_like(maps)).float()


def masks_from_maps(maps: torch.Tensor, *, soft: bool = False, threshold: float = MASK_THRESHOLD, frames: bool = False) -> torch.Tensor:
    """`soft_masks(maps)` (soft=True) or its binary mask `soft >= threshold` (a bool tensor)."""
    soft_flag = plain_scalar(soft)
    if not isinstance(soft_flag, bool):
        raise ConfigError(f"masks: soft must be True (the soft masks) or False (the binary masks), got {soft!r}")
    try:  # numpy and 0-d tensor scalars too, as every control field takes them
        level = number(threshold, "masks: threshold", minimum=0.0, exclusive_minimum=True, maximum=1.0)
    except ConfigError:
        raise ConfigError(f"masks: threshold must be a number in (0, 1] (on the min-max normalised map), got {threshold!r}") from None
    normalised = soft_masks(maps, frames)
    return normalised if soft_flag else normalised >= level


__all__ = ["MASK_THRESHOLD", "masks_from_maps", "soft_masks"]
