"""Model adapters, one per supported denoiser class (see `base.py` for what an adapter knows)."""

from __future__ import annotations

import torch

from ..errors import UnsupportedError
from .adapters import FluxAdapter, PixArtAdapter, SD3Adapter, UNetAdapter
from .adapters_new import ChromaAdapter, Flux2Adapter, QwenImageAdapter, WanAdapter, ZImageAdapter
from .base import Canvas, Geometry, LayerInfo, ModelAdapter, TextSpan

# Ordered: the first entry whose class name matches the denoiser's class (or a base class) wins.
ADAPTERS: tuple[tuple[str, type[ModelAdapter]], ...] = (
    ("UNet2DConditionModel", UNetAdapter),
    ("SD3Transformer2DModel", SD3Adapter),
    ("FluxTransformer2DModel", FluxAdapter),
    ("PixArtTransformer2DModel", PixArtAdapter),
    ("ChromaTransformer2DModel", ChromaAdapter),
    ("QwenImageTransformer2DModel", QwenImageAdapter),
    ("Flux2Transformer2DModel", Flux2Adapter),
    ("WanTransformer3DModel", WanAdapter),
    ("ZImageTransformer2DModel", ZImageAdapter),
)
SUPPORTED_DENOISERS: tuple[str, ...] = tuple(name for name, _ in ADAPTERS)
#: Denoiser classes refused with a reason of their own (a variant of a supported family that attnctl does not follow).
REFUSED_DENOISERS: dict[str, str] = {
    "WanVACETransformer3DModel": (
        "the Wan VACE transformer (WanVACEPipeline) is not supported: its VACE blocks (vace_blocks.*), which add the "
        "control video's hints to the main blocks, have attention attnctl does not control yet; "
        "WanPipeline, WanImageToVideoPipeline and WanVideoToVideoPipeline are supported"
    ),
    "WanAnimateTransformer3DModel": (
        "the Wan Animate transformer (WanAnimatePipeline) is not supported: its face-adapter cross-attention "
        "(face_adapter.*, the driving face's motion tokens into the video tokens) is not controlled yet, and its pipeline "
        "denoises the video in segments attnctl does not follow; WanPipeline, WanImageToVideoPipeline and "
        "WanVideoToVideoPipeline are supported"
    ),
}


def img2img_name(pipe: object) -> str:
    """The name of the img2img pipeline class of `pipe`'s (StableDiffusion(XL)Pipeline -> ...Img2ImgPipeline)."""
    return type(pipe).__name__.replace("Pipeline", "Img2ImgPipeline")


_VARIANT_WORDS = ("Kontext", "Adapter", "ControlNet", "Control", "InstructPix2Pix", "Inpaint", "Fill")


def base_img2img_name(pipe: object) -> str | None:
    """The img2img pipeline class of `pipe`'s base model in diffusers (FluxKontextPipeline, FluxFillPipeline ->
    FluxImg2ImgPipeline; StableDiffusionXLAdapterPipeline -> StableDiffusionXLImg2ImgPipeline), or None."""
    import diffusers

    name = type(pipe).__name__
    for word in _VARIANT_WORDS:
        name = name.replace(word, "")
    name = name.replace("Pipeline", "Img2ImgPipeline")
    return name if hasattr(diffusers, name) else None


def installed_diffusers() -> tuple[int, int]:
    """(major, minor) of the installed diffusers."""
    import diffusers

    major, minor = diffusers.__version__.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def adapter_for(denoiser: torch.nn.Module) -> ModelAdapter:
    """Build the adapter of `denoiser`, or raise listing the supported denoiser classes."""
    mro = [klass.__name__ for klass in type(denoiser).__mro__]
    for class_name, adapter_cls in ADAPTERS:
        if class_name in mro:
            minimum = adapter_cls.min_diffusers
            if minimum is not None and installed_diffusers() < minimum:
                raise UnsupportedError(
                    f"attnctl: {type(denoiser).__name__} needs diffusers >= {minimum[0]}.{minimum[1]} with attnctl (its "
                    f"attention processors changed; attnctl reproduces those of {minimum[0]}.{minimum[1]}); installed: "
                    f"{'.'.join(map(str, installed_diffusers()))}"
                )
            return adapter_cls.discover(denoiser)
    refused = next((REFUSED_DENOISERS[name] for name in mro if name in REFUSED_DENOISERS), None)
    if refused is not None:
        raise UnsupportedError(f"attnctl: {refused}")
    raise UnsupportedError(
        f"attnctl: denoiser class {type(denoiser).__name__} is not supported; supported: {', '.join(SUPPORTED_DENOISERS)}"
    )


def adapter_for_experts(experts: dict[str, torch.nn.Module]) -> ModelAdapter:
    """One adapter over a pipeline's denoiser experts by attribute (Wan 2.2: `transformer` and `transformer_2`), or
    raise with the reason; a single entry is `adapter_for` of it."""
    first = next(iter(experts.values()))
    single = adapter_for(first)
    if len(experts) == 1:
        return single
    discover = getattr(type(single), "discover_experts", None)
    if discover is None:
        raise UnsupportedError(
            f"attnctl: this pipeline has several denoisers ({', '.join(experts)}); attnctl controls several experts of "
            f"one pipeline for Wan 2.2 only, not for {type(first).__name__}"
        )
    return discover(experts)


__all__ = ["ADAPTERS", "REFUSED_DENOISERS", "adapter_for_experts", "base_img2img_name", "img2img_name", "SUPPORTED_DENOISERS", "Canvas", "Geometry", "LayerInfo", "ModelAdapter", "TextSpan", "adapter_for"]
