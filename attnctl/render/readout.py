"""The readout pass: attention maps of a given image through img2img (RefAM's zero-shot setting, docs/methods.md).

`read_maps(pipe, images, prompt, words, strength=...)` checks its arguments and runs `attnctl.pipelines.readout`'s
pass: the images re-noised to `strength` and the rest of the schedule run through the same pipeline's denoiser (an
img2img pipeline made from `pipe`'s components, as diffusers' `from_pipe` does but with no dtype cast, so no weights
are loaded, copied or cast), with `AttentionMaps(words, magnets=...)` applied: the maps of that pass are the readout.
The given images are not changed; the readout's own output (the images the pass denoised) is thrown away. Works
for any image; `AttentionMaps(magnets=...)` applied to a text-to-image pipeline runs the same pass over each
call's images after the call.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..controls.maps.capture import AttentionMapResult, AttentionMaps
from ..errors import ConfigError
from ..handle import apply
from ..pipelines.readout import img2img_of, read_pass
from ..validation import seed as valid_seed


def read_maps(
    pipe: Any,
    images: Any,
    prompt: str | Sequence[str],
    words: str | Sequence[Any],
    *,
    strength: float = 0.5,
    magnets: bool | tuple[str, ...] = True,
    layers: Any = None,
    seed: int = 0,
    **call: Any,
) -> AttentionMapResult:
    """Attention maps of `words` over `images` (PIL images, one per prompt, or one prompt for all), read in a
    separate img2img pass at `strength` (the share of the schedule re-run: 0.5 re-noises to the middle).

    `magnets`: True (default) the RefAM magnets and sink suppression, a tuple: your own magnet words, False: the
    plain maps. `layers`: as `AttentionMaps`. `seed`: the re-noising noise. Other keyword arguments go to the
    pipeline call (num_inference_steps, guidance_scale, height, width). `pipe` must not hold a live attnctl handle.
    Returns the `AttentionMapResult` with `images` set to the given images; `.masks(word)` gives the masks.
    """
    import torch

    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 < float(strength) <= 1.0:
        raise ConfigError(f"read_maps: strength must be in (0, 1], got {strength!r}")
    seed = valid_seed(seed, "read_maps: seed")
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    if not images:
        raise ConfigError("read_maps: images is empty; give an image (or a list of them, one per prompt)")
    for image in images:
        if not (hasattr(image, "convert") or isinstance(image, torch.Tensor) or type(image).__name__ == "ndarray"):
            raise ConfigError(
                f"read_maps: images must be PIL images (or numpy arrays / torch tensors as the pipeline takes them), one "
                f"per prompt or a list of them; got {image!r}"
            )
    if not isinstance(prompt, str) and not (isinstance(prompt, (list, tuple)) and all(isinstance(p, str) for p in prompt)):
        raise ConfigError(f"read_maps: prompt must be a string or a list of strings (one per image), got {prompt!r}")
    prompts = [prompt] * len(images) if isinstance(prompt, str) else list(prompt)
    if len(prompts) != len(images):
        raise ConfigError(f"read_maps: {len(images)} image(s) and {len(prompts)} prompt(s); give one prompt, or one per image")
    words = words if isinstance(words, str) else tuple(words)  # one word as a string, as AttentionMaps takes it
    control = AttentionMaps(words, layers=layers, magnets=magnets, key="readout_maps")
    return read_pass(apply, pipe, images, prompts, control, strength=float(strength), seed=seed, call=call)


__all__ = ["img2img_of", "read_maps"]
