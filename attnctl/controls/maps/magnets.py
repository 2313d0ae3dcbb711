"""Attention magnets and global attention sinks for the readout of attention maps (docs/methods.md).

RefAM (Kukleva et al. 2025, "RefAM: Attention Magnets for Zero-Shot Referral Segmentation", arXiv:2509.22650):

- *magnets*: stop words appended to the prompt soak up the surplus attention of image tokens that belong to no
  word of the prompt (the background), so the words' maps lose their diffuse floor; the magnets' own maps are
  read and thrown away (never captured).
- *global attention sinks*: in the deep layers some text token receives a large share of the attention of
  every image token alike (a flat map that carries no location). Our detection rule: at a layer of the
  deepest captured level (the coarsest token grid), a text token is a sink in an image when its attention,
  averaged over the image tokens, is at least `SINK_MASS` and its smallest value is at least `SINK_FLATNESS`
  times that average. Suppression: the softmax is taken again without the sink keys, which for the words'
  probabilities is exact without recomputing it: `p'(x, w) = p(x, w) / (1 - sum_s p(x, s))` (a word that is
  itself a sink gets zero); the sinks' share is so redistributed over the other tokens, magnets included.

The magnets change the prompt and so the image: they run in a separate readout pass (an img2img call of the same
pipeline over a given or generated image, `attnctl.render.readout.read_maps`), never in the generation.
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


def suppress_sinks(words: torch.Tensor, mass: torch.Tensor, selector: torch.Tensor) -> torch.Tensor:
    """Words' probabilities with the global sinks' keys removed from the softmax.

    words (B, N, W): the words' attention per image token; mass (B, N, T): every text token's attention per image
    token; selector (B, W, T): each word's tokens. Returns (B, N, W), no host sync."""
    mean = mass.mean(dim=1)  # (B, T)
    low = mass.amin(dim=1)
    sinks = ((mean >= SINK_MASS) & (low >= SINK_FLATNESS * mean)).to(mass.dtype)  # (B, T)
    sunk = (mass * sinks[:, None, :]).sum(-1, keepdim=True)  # (B, N, 1)
    word_is_sink = ((selector * sinks[:, None, :]).sum(-1) > 0).to(words.dtype)  # (B, W)
    return words / (1.0 - sunk).clamp_min(1e-6) * (1.0 - word_is_sink[:, None, :])


__all__ = ["MAGNET_FAMILIES", "MAGNET_WORDS", "SINK_FLATNESS", "SINK_MASS", "magnet_prompt", "suppress_sinks"]
