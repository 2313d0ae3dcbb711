"""Attention magnets and global attention sinks for the readout of attention maps (docs/methods.md).

RefAM (Kukleva et al. 2025, "RefAM: Attention Magnets for Zero-Shot Referral Segmentation", arXiv:2509.22650):

- *magnets*: stop words appended to the prompt soak up the surplus attention of image tokens that belong to no
  word of the prompt (the background), so the words' maps lose their diffuse floor; the magnets' own maps are
  read and thrown away (never captured).
- *global attention sinks*: in the deep layers some text token receives a large share of the attention of
  every image token alike (a flat map that carries no location). Our detection rule: at a layer of the
  deepest captured level (the coarsest token grid), a text token is a sink in an image when its attention,
  averaged over the image tokens, is at least `SINK_MASS` and its smallest value is at least `SINK_FLATNESS`
  times that average (on the head-averaged attention). Suppression: each head's softmax is taken again without the
  sink keys, which for the words' probabilities is exact without recomputing it:
  `p'_h(x, w) = sum_{t in w, not a sink} p_h(x, t) / (1 - sum_s p_h(x, s))`, then averaged over the heads (a word
  loses only its sink tokens' share); the sinks' share is so redistributed over the other tokens, magnets included.

The magnets change the prompt and so the image: they run in a separate readout pass (an img2img call of the same
pipeline over a given or generated image, `attnctl.pipelines.readout`: `attnctl.read_maps`, or the handle after a
text-to-image call), never in the generation.
"""

from __future__ import annotations

import torch

#: The default magnets: English stop words (single tokens for CLIP and T5), appended after the prompt.
MAGNET_WORDS: tuple[str, ...] = ("and", "the", "of", "with", "a", "in", "to", "is")
#: Families whose prompt embeddings have a fixed padded length, so that the magnet prompt's replace them in place.
MAGNET_FAMILIES: tuple[str, ...] = ("unet", "sd3", "flux")
#: A sink's mean share of the image tokens' attention (out of 1), at least.
SINK_MASS = 0.3
#: A sink's smallest share over the image tokens, relative to its mean, at least (flat: everywhere).
SINK_FLATNESS = 0.5


def magnet_prompt(prompt: str, magnets: tuple[str, ...]) -> str:
    """The readout prompt: the prompt with the magnets appended (the words keep their positions)."""
    return f"{prompt.rstrip()} {' '.join(magnets)}" if magnets else prompt


def global_sinks(mass: torch.Tensor) -> torch.Tensor:
    """(B, T) 1.0 at the text tokens that are global sinks of each image, 0.0 elsewhere: by the rule above, on the
    head average of `mass`, each text token's attention per image token: (B, N, T) averaged over the heads already,
    or (B, H, N, T) per head."""
    averaged = mass.mean(dim=1) if mass.ndim == 4 else mass  # (B, N, T)
    mean = averaged.mean(dim=1)  # (B, T)
    low = averaged.amin(dim=1)
    return ((mean >= SINK_MASS) & (low >= SINK_FLATNESS * mean)).to(mass.dtype)


def without_sinks(mass: torch.Tensor, selector: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """The definition (the capture computes the same from the words' and the sinks' columns, without the per-head
    attention of every text token): the words' attention with the sinks' keys removed from the softmax, per head, then
    averaged over the heads:
    `mean_h sum_{t not a sink} p_h(x, t) S(w, t) / (1 - sum_s p_h(x, s))`, exact since each head's softmax is
    renormalised by its own sink mass (a word loses only its sink tokens' share; a word of sinks only gets 0).

    mass (B, H, N, T): each text token's attention per head and image token; selector (B, W, T), or (B, H, W, T) per
    head, each word's weight at each text token; sinks (B, T) from `global_sinks`. Returns (B, N, W), no host sync."""
    kept = selector * (1.0 - sinks)[:, None, :] if selector.ndim == 3 else selector * (1.0 - sinks)[:, None, None, :]
    kept = kept[:, None] if kept.ndim == 3 else kept  # (B, H|1, W, T)
    words = mass @ kept.transpose(-1, -2).to(mass.dtype)  # (B, H, N, W)
    sunk = (mass * sinks[:, None, None, :]).sum(-1, keepdim=True)  # (B, H, N, 1)
    return (words / (1.0 - sunk).clamp_min(1e-6)).mean(dim=1)


def sink_columns(selector: torch.Tensor, sink_keys: torch.Tensor) -> torch.Tensor:
    """The columns the capture reads per head to apply `without_sinks` without the attention of every text token:
    each word's weights with its sink keys dropped, then one column of the sink keys. selector (B, W, Nk) or
    (B, H, W, Nk); sink_keys (B, Nk) 1.0 at the sinks' keys. Returns (B, W + 1, Nk) or (B, H, W + 1, Nk)."""
    keys = sink_keys[:, None] if selector.ndim == 3 else sink_keys[:, None, None].expand(-1, selector.shape[1], -1, -1)
    return torch.cat([selector * (1.0 - keys), keys], dim=-2)


def renormalised(found: torch.Tensor) -> torch.Tensor:
    """`without_sinks` from each head's attention to `sink_columns` (B, H, N, W + 1): (B, N, W)."""
    return (found[..., :-1] / (1.0 - found[..., -1:]).clamp_min(1e-6)).mean(dim=1)


__all__ = ["MAGNET_FAMILIES", "MAGNET_WORDS", "SINK_FLATNESS", "SINK_MASS", "global_sinks", "magnet_prompt", "renormalised", "sink_columns", "without_sinks"]
