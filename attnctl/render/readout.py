"""The readout pass: attention maps of a given image through img2img (RefAM's zero-shot setting, docs/methods.md).

`read_maps(pipe, images, prompt, words, strength=...)` re-noises the images to `strength` and runs the rest of the
schedule through the same pipeline's denoiser (an img2img pipeline made from `pipe`'s components, as diffusers'
`from_pipe` does but with no dtype cast, so no weights are loaded, copied or cast), with `AttentionMaps(words, magnets=...)` applied: the maps of
that pass are the readout. The given images are not changed; the readout's own output (the images the pass
denoised) is thrown away. Works for images the pipeline generated (generate without magnets, read them after)
and for any image.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

from ..controls.maps.capture import AttentionMapResult, AttentionMaps
from ..errors import ConfigError, UnsupportedError
from ..handle import apply
from ..pipelines.protocol import named_call_arguments
from ..validation import seed as valid_seed


def img2img_of(pipe: Any) -> Any:
    """An img2img pipeline sharing `pipe`'s components (`pipe` itself if it already takes an image).

    Built with the img2img class's constructor from `pipe.components` and its config, as diffusers' `from_pipe`
    does, but without `from_pipe`'s final `.to(dtype=float32)`: the components are the caller's own modules, and that
    cast turned a half-precision pipeline into a float32 one (tests/test_first_hour.py)."""
    import inspect

    if "image" in inspect.signature(type(pipe).__call__).parameters and "strength" in inspect.signature(type(pipe).__call__).parameters:
        return pipe
    import diffusers

    name = type(pipe).__name__.replace("Pipeline", "Img2ImgPipeline")  # StableDiffusion(XL)Pipeline -> ...Img2ImgPipeline
    try:
        cls = getattr(diffusers, name)  # only that pipeline's module is imported
        parameters = inspect.signature(cls.__init__).parameters
        components = {key: value for key, value in pipe.components.items() if key in parameters}
        settings = {key: value for key, value in pipe.config.items() if key in parameters and key not in components}
        made = cls(**components, **settings)
    except (AttributeError, ValueError, KeyError, TypeError) as error:
        raise UnsupportedError(
            f"attnctl: read_maps needs an img2img pipeline for {type(pipe).__name__} ({name}), and diffusers has none to "
            f"make from it ({error}); pass an img2img pipeline of the model instead"
        ) from error
    made.set_progress_bar_config(disable=True)
    return made


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
    if getattr(pipe, "video_processor", None) is not None:
        raise UnsupportedError(
            f"attnctl: read_maps reads the maps of given images through an img2img pass; {type(pipe).__name__} makes "
            "videos, and no video-to-video pass is wired for it: capture AttentionMaps while generating instead"
        )
    reader = img2img_of(pipe)
    call = _check_call_arguments(reader, call)
    call = {**_image_size(reader, images[0]), **call}
    steps = call.get("num_inference_steps", inspect.signature(reader.__call__).parameters.get("num_inference_steps"))
    steps = getattr(steps, "default", steps)
    if isinstance(steps, int) and not isinstance(steps, bool) and int(steps * float(strength)) < 1:
        raise ConfigError(
            f"read_maps: strength={strength!r} of num_inference_steps={steps} runs no denoising step (img2img runs "
            f"int(steps * strength) = {int(steps * float(strength))}), so there are no maps to read: raise either"
        )
    sizes = [_pixel_size(image) for image in images]  # the maps at the given images' size
    if len(set(sizes)) > 1:
        raise ConfigError(
            f"read_maps: the images have different sizes (height x width: {', '.join(f'{s[0]}x{s[1]}' if s else '?' for s in dict.fromkeys(sizes))}); "
            "the pipeline processes a batch at the first image's size, so the maps and masks would not fit the others: read "
            "images of one size per call"
        )
    resolution = sizes[0]
    words = words if isinstance(words, str) else tuple(words)  # one word as a string, as AttentionMaps takes it
    control = AttentionMaps(words, layers=layers, magnets=magnets, resolution=resolution, key="readout_maps")
    with apply(reader, control) as handle:
        reader(prompts, image=images, strength=float(strength), generator=torch.Generator().manual_seed(seed), output_type="latent", **call)
        result = handle.outputs["readout_maps"]
    result.images = _pictures(reader, images, result.maps.shape[0])
    return result


def _pictures(reader: Any, images: list[Any], count: int) -> list[Any] | None:
    """The given images as PIL pictures for the result (its heatmaps and `save` draw on them): PIL images copied,
    numpy arrays and tensors converted as the pipeline reads them (its image processor). None where they do not
    give one picture per map row."""
    pictures: list[Any] = []
    processor = getattr(reader, "image_processor", None)
    for image in images:
        if hasattr(image, "convert"):
            pictures.append(image.copy())
        elif processor is not None:
            pictures.extend(processor.postprocess(processor.preprocess(image), output_type="pil"))
        else:
            return None
    return pictures if len(pictures) == count else None


def _pixel_size(image: Any) -> tuple[int, int] | None:
    """(height, width) of a PIL image, a numpy array (..., height, width, channels) or a tensor (..., channels, height,
    width), as the pipeline's image processor reads them; None for another layout."""
    import torch

    if hasattr(image, "convert"):
        width, height = image.size
    elif type(image).__name__ == "ndarray" and image.ndim in (3, 4):
        height, width = image.shape[-3:-1]
    elif isinstance(image, torch.Tensor) and image.dim() in (3, 4):
        height, width = image.shape[-2:]
    else:
        return None
    return int(height), int(width)


def _image_size(reader: Any, image: Any) -> dict[str, int]:
    """`height` / `width` of the image for an img2img call that takes them: SD3's and Flux's default to the model's
    square size (1024 px) whatever the image, which would read the maps of the image stretched to a square. Rounded
    down to the size the pipeline accepts (SD3 refuses others: `vae_scale_factor * patch_size`, 16 px; Flux resizes to
    its `2 * vae_scale_factor`); the maps are fitted back to the image's own size."""
    named = named_call_arguments(reader)
    size = _pixel_size(image)
    if "height" not in named or "width" not in named or size is None:
        return {}
    height, width = size
    multiple = int(getattr(reader, "vae_scale_factor", 1) or 1) * int(getattr(reader, "patch_size", 2) or 2)
    return {"height": max(multiple, int(height) - int(height) % multiple), "width": max(multiple, int(width) - int(width) % multiple)}


#: The img2img call's arguments read_maps sets itself (one image per prompt: the maps' rows are the given images).
READOUT_ARGUMENTS = ("prompt", "image", "strength", "generator", "output_type", "num_images_per_prompt")


def _check_call_arguments(reader: Any, call: dict[str, Any]) -> dict[str, Any]:
    """The further arguments of the img2img call. Each must be a named argument of it (diffusers swallows an unknown
    one, a typo such as `num_inference_step`, into `**kwargs` and ignores it), except `height` / `width`, which the
    text-to-image call takes and most img2img calls do not (the size is the image's): those are left out there."""
    named = named_call_arguments(reader)
    call = {key: value for key, value in call.items() if key in named or key not in ("height", "width")}
    unknown = [name for name in call if name not in named]
    reserved = [name for name in call if name in READOUT_ARGUMENTS]
    if unknown or reserved:
        raise ConfigError(
            f"read_maps: {type(reader).__name__}.__call__ " + (f"takes no argument(s) {', '.join(map(repr, unknown))}"
            if unknown else f"gets {', '.join(map(repr, reserved))} from read_maps itself") + "; further arguments: "
            + ", ".join(name for name in named if name not in READOUT_ARGUMENTS)
        )
    return call


__all__ = ["img2img_of", "read_maps"]
