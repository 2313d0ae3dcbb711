"""The readout pass: attention maps of given images through img2img (RefAM's zero-shot setting, docs/methods.md).

`read_pass(apply, pipe, images, prompts, control, ...)` re-noises the images to `strength` and runs the rest of the
schedule through the same pipeline's denoiser (an img2img pipeline made from `pipe`'s components, as diffusers'
`from_pipe` does but with no dtype cast, so no weights are loaded, copied or cast), with the `AttentionMaps` control
applied through `apply` (passed in: `attnctl.apply` sits above this layer): the maps of that pass are the readout.
The given images are not changed; the pass's own output (the images it denoised) is thrown away.

Two callers: `attnctl.read_maps` (render/readout.py, any image) and a handle whose `AttentionMaps(magnets=...)` was
applied to a text-to-image pipeline (`Handle._run_readouts`: the images that call generated, read after it).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from ..controls.maps.capture import AttentionMapResult, AttentionMaps, ReadoutRequest
from ..errors import ConfigError, UnsupportedError
from ..families import base_img2img_name, img2img_name
from .protocol import named_call_arguments


def refuse_unreadable(pipe: Any, owner: str = "read_maps") -> None:
    """Refuse a pipeline no img2img readout pass can be made of: a video pipeline (no video-to-video pass is wired)."""
    if getattr(pipe, "video_processor", None) is not None:
        raise UnsupportedError(
            f"attnctl: {owner} reads the maps of given images through an img2img pass; {type(pipe).__name__} makes "
            "videos, and no video-to-video pass is wired for it: capture AttentionMaps while generating instead"
        )


def img2img_of(pipe: Any) -> Any:
    """An img2img pipeline sharing `pipe`'s components (`pipe` itself if it already takes an image).

    Built with the img2img class's constructor from `pipe.components` and its config, as diffusers' `from_pipe`
    does, but without `from_pipe`'s final `.to(dtype=float32)`: the components are the caller's own modules, and that
    cast turned a half-precision pipeline into a float32 one (tests/test_first_hour.py)."""
    parameters = inspect.signature(type(pipe).__call__).parameters
    if "mask_image" in parameters:  # an inpainting call generates the masked area: no readout of the whole image
        base = base_img2img_name(pipe) or "<the model's img2img pipeline>"
        raise UnsupportedError(
            f"attnctl: read_maps reads the maps of given images through an img2img pass; {type(pipe).__name__}'s call "
            f"inpaints (it takes a mask_image) and regenerates only the masked area: pass an img2img pipeline of the "
            f"model instead, e.g. diffusers.{base}(**pipe.components) where the denoiser takes plain latents (an "
            "inpainting-only denoiser, a 9-channel UNet or Flux Fill's, needs its base model)"
        )
    if "image" in parameters and "strength" in parameters:
        return pipe
    import diffusers

    name = img2img_name(pipe)
    try:
        cls = getattr(diffusers, name)  # only that pipeline's module is imported
        parameters = inspect.signature(cls.__init__).parameters
        components = {key: value for key, value in pipe.components.items() if key in parameters}
        scheduler = components.get("scheduler")
        if hasattr(scheduler, "config") and callable(getattr(type(scheduler), "from_config", None)):
            # its own: the img2img constructor's deprecation fix-ups (SD's clip_sample, steps_offset) would rewrite the
            # shared scheduler's config, and so every later generation of `pipe`
            components["scheduler"] = type(scheduler).from_config(scheduler.config)
        settings = {key: value for key, value in pipe.config.items() if key in parameters and key not in components}
        made = cls(**components, **settings)
    except (AttributeError, ValueError, KeyError, TypeError) as error:
        raise UnsupportedError(
            f"attnctl: read_maps needs an img2img pipeline for {type(pipe).__name__} ({name}), and diffusers has none to "
            f"make from it ({error}); pass an img2img pipeline of the model instead"
        ) from error
    made.set_progress_bar_config(disable=True)
    return made


def read_pass(
    apply: Callable[..., Any],
    pipe: Any,
    images: list[Any],
    prompts: list[str],
    control: AttentionMaps,
    *,
    strength: float,
    seed: int,
    call: dict[str, Any],
    reader: Any = None,
) -> AttentionMapResult:
    """The readout of `control` (its words, layers, steps, heads, magnets; `resolution` None: the images' size) over
    `images` (checked by the caller: one per prompt), an img2img call at `strength` with the noise of `seed` and the
    further arguments `call` (each a named argument of the img2img call, `height` / `width` left out where it takes
    none). `apply` is `attnctl.apply`; `reader`: the img2img pipeline of `pipe` where the caller made it already.
    Returns the result with `images` set to the given images."""
    import torch

    refuse_unreadable(pipe)
    reader = img2img_of(pipe) if reader is None else reader
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
    control = replace(control, resolution=control.resolution or sizes[0], key="readout_maps")
    with apply(reader, control) as handle:
        reader(prompts, image=images, strength=float(strength), generator=torch.Generator().manual_seed(seed), output_type="latent", **call)
        result = handle.outputs["readout_maps"]
    result.images = _pictures(reader, images, result.maps.shape[0])
    return result


def read_request(apply: Callable[..., Any], pipe: Any, request: ReadoutRequest) -> AttentionMapResult:
    """The readout a handle owes after a text-to-image call (`ReadoutRequest`): `read_pass` over the call's images,
    with the call's prompts and those of its settings the img2img call takes."""
    reader = img2img_of(pipe)
    reader_arguments = named_call_arguments(reader)
    call = {name: value for name, value in request.call.items() if name in reader_arguments}
    return read_pass(apply, pipe, list(request.images), list(request.prompts), request.control, strength=request.strength,
                     seed=request.seed, call=call, reader=reader)


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


__all__ = ["img2img_of", "read_pass", "read_request", "refuse_unreadable"]
