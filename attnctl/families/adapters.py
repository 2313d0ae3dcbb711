"""Model adapters for the supported denoiser classes.

Each adapter discovers the attention layers through the public `attn_processors` surface, classifies them
from the module's own attributes, and reads a call's geometry from the call's inputs.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..errors import CallLayoutError, SelectionError, UnsupportedError
from .base import Canvas, LayerInfo, ModelAdapter

#: Forward arguments of diffusers' `BasicTransformerBlock` (UNet, PixArt) with one row per batch row.
BASIC_BLOCK_INPUTS = ("hidden_states", "attention_mask", "encoder_hidden_states", "encoder_attention_mask", "timestep", "class_labels")


def _attention_modules(denoiser: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Attention modules by name (module path without `.processor`), in model order."""
    if hasattr(denoiser, "attn_processors"):
        names = [key[: -len(".processor")] for key in denoiser.attn_processors]
        return {name: denoiser.get_submodule(name) for name in names}
    return {
        name: module
        for name, module in denoiser.named_modules()
        if hasattr(module, "set_processor") and hasattr(module, "processor")
    }


def _block_index(parts: list[str], container: str) -> int | None:
    if container in parts:
        position = parts.index(container)
        if position + 1 < len(parts) and parts[position + 1].isdigit():
            return int(parts[position + 1])
    return None


class UNetAdapter(ModelAdapter):
    """`UNet2DConditionModel` (SD 1.x / 2.x, SDXL): self-attention `attn1`, cross-attention `attn2`."""

    block_inputs: ClassVar[dict[str, tuple[str, ...]]] = {"BasicTransformerBlock": BASIC_BLOCK_INPUTS}
    indexed_blocks: ClassVar[bool] = False
    conditioning_inputs: ClassVar[tuple[str, ...]] = (  # ControlNet's, T2I-Adapter's
        "down_block_additional_residuals", "mid_block_additional_residual", "down_intrablock_additional_residuals",
    )
    refused_pipelines: ClassVar[dict[str, str]] = {
        "StableDiffusionAttendAndExcitePipeline": "sets its own attention processors on the UNet during each call; use "
        "attnctl.AttendExcite on the plain StableDiffusionPipeline",
        "StableDiffusionSAGPipeline": "sets its own attention processor and hooks on the UNet during each call; use "
        "attnctl.SAG on the plain StableDiffusionPipeline",
        "StableDiffusionPanoramaPipeline": "denoises several views of a wide latent per step, stepping the scheduler "
        "once per view from a copy of its state: attnctl's steps and canvases follow one image per step",
        "StableDiffusionDiffEditPipeline": "runs the denoiser in generate_mask and invert outside a pipeline call, and "
        "invert steps its inverse_scheduler, which attnctl does not follow",
        "StableDiffusionGLIGENPipeline": "adds gated self-attention layers over image and grounding tokens whose inputs "
        "keep the pipeline's batch, which attnctl does not place",
        "StableDiffusionGLIGENTextImagePipeline": "adds gated self-attention layers over image and grounding tokens "
        "whose inputs keep the pipeline's batch, which attnctl does not place",
        "StableDiffusionXLInstructPix2PixPipeline": "batches three rows per prompt (text and image, image only, neither), "
        "a classifier-free guidance layout attnctl does not know",
    }

    def perturbed_layers(self) -> str:
        return "self & mid"

    def project_text(self, embeds: torch.Tensor, layer: LayerInfo | None = None) -> torch.Tensor:
        projection = getattr(self.denoiser, "encoder_hid_proj", None)
        if projection is None:
            return embeds
        kind = getattr(self.denoiser.config, "encoder_hid_dim_type", None)
        if kind == "text_proj":
            return projection(embeds)
        if kind != "ip_image_proj":
            raise UnsupportedError(f"attnctl: a UNet whose encoder_hid_dim_type is {kind!r} is not supported here")
        # an IP-Adapter's image projection takes the image embeddings; a text projection it moved aside (Kolors) still
        # projects the text, as the UNet's forward does
        text = getattr(self.denoiser, "text_encoder_hid_proj", None)
        return embeds if text is None else text(embeds)

    @classmethod
    def discover(cls, denoiser: torch.nn.Module) -> UNetAdapter:
        modules = _attention_modules(denoiser)
        down_levels, mid_level, up_levels = _unet_levels(denoiser)
        layers = []
        for index, (name, module) in enumerate(modules.items()):
            parts = name.split(".")
            if parts[0] == "down_blocks":
                group, block = "down", int(parts[1])
                level = down_levels[block]
            elif parts[0] == "mid_block":
                group, block, level = "mid", 0, mid_level
            elif parts[0] == "up_blocks":
                group, block = "up", int(parts[1])
                level = up_levels[block]
            else:
                raise UnsupportedError(f"attnctl: unexpected attention layer {name!r} in {type(denoiser).__name__}")
            cross = bool(getattr(module, "is_cross_attention", False))
            layers.append(
                LayerInfo(name, index, "cross" if cross else "self", group, block, level, "keys" if cross else "none")
            )
        return cls(
            family="unet",
            denoiser=denoiser,
            layers=tuple(layers),
            modules=modules,
            batched_inputs=(
                "sample", "timestep", "encoder_hidden_states", "class_labels", "timestep_cond", "attention_mask",
                "encoder_attention_mask", "down_block_additional_residuals", "mid_block_additional_residual",
                "down_intrablock_additional_residuals",
            ),
            dict_inputs=("added_cond_kwargs",),
        )

    def canvas(self, inputs: dict[str, Any]) -> Canvas:
        sample = inputs["sample"]
        context = inputs.get("encoder_hidden_states")
        hw = (int(sample.shape[-2]), int(sample.shape[-1]))
        return Canvas(latent_hw=hw, token_hw=hw, text_len=_text_len(context))


def _unet_levels(unet: torch.nn.Module) -> tuple[list[int], int, list[int]]:
    """Downsampling level of each down block, the mid block and each up block, from the model structure."""
    down_levels, level = [], 0
    for block in unet.down_blocks:
        down_levels.append(level)
        if getattr(block, "downsamplers", None):
            level += 1
    mid_level = level
    up_levels = []
    for block in unet.up_blocks:
        up_levels.append(level)
        if getattr(block, "upsamplers", None):
            level -= 1
    return down_levels, mid_level, up_levels


def _text_len(context: Any) -> int:
    if isinstance(context, tuple):  # IP-Adapter: (text, image embeds)
        context = context[0]
    return int(context.shape[1]) if isinstance(context, torch.Tensor) else 0


class SD3Adapter(ModelAdapter):
    """`SD3Transformer2DModel`: joint attention `[image; text]`; SD3.5-M dual blocks add image-only `attn2`."""

    text_attention: ClassVar[str] = "joint"
    block_inputs: ClassVar[dict[str, tuple[str, ...]]] = {"JointTransformerBlock": ("hidden_states", "encoder_hidden_states", "temb")}
    text_stream_blocks: ClassVar[tuple[str, ...]] = ("JointTransformerBlock",)
    conditioning_inputs: ClassVar[tuple[str, ...]] = ("block_controlnet_hidden_states",)

    def perturbed_layers(self) -> str:
        return "transformer_blocks.1"  # exactly block 1 (diffusers' regex `blocks.1` also picks 10-19)

    def append_text(self, inputs: dict[str, Any], block: torch.Tensor, segments: int = 1,
                    block_mask: torch.Tensor | None = None) -> dict[str, Any]:
        changed = dict(inputs)
        changed["encoder_hidden_states"] = torch.cat([inputs["encoder_hidden_states"], block], dim=1)
        return changed

    @classmethod
    def discover(cls, denoiser: torch.nn.Module) -> SD3Adapter:
        modules = _attention_modules(denoiser)
        layers = []
        for index, (name, module) in enumerate(modules.items()):
            parts = name.split(".")
            block = _block_index(parts, "transformer_blocks")
            joint = getattr(module, "add_k_proj", None) is not None or getattr(module, "to_added_qkv", None) is not None
            kind, text = ("joint", "last") if joint else ("self", "none")
            layers.append(LayerInfo(name, index, kind, "blocks", block, 0, text))
        return cls(
            family="sd3",
            denoiser=denoiser,
            layers=tuple(layers),
            modules=modules,
            batched_inputs=("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "block_controlnet_hidden_states"),
            dict_inputs=("joint_attention_kwargs",),  # IP-Adapter image embeds (`ip_adapter_image_embeds`)
        )

    def canvas(self, inputs: dict[str, Any]) -> Canvas:
        latents = inputs["hidden_states"]
        patch = int(self.denoiser.config.patch_size)
        h, w = int(latents.shape[-2]), int(latents.shape[-1])
        return Canvas(latent_hw=(h, w), token_hw=(h // patch, w // patch), text_len=_text_len(inputs.get("encoder_hidden_states")))


class PixArtAdapter(ModelAdapter):
    """`PixArtTransformer2DModel`: self-attention `attn1`, cross-attention `attn2` to T5 tokens."""

    prompt_mask_index: ClassVar[int | None] = 1
    block_inputs: ClassVar[dict[str, tuple[str, ...]]] = {"BasicTransformerBlock": BASIC_BLOCK_INPUTS}

    def perturbed_layers(self) -> str:
        return "transformer_blocks.1 & self"

    def project_text(self, embeds: torch.Tensor, layer: LayerInfo | None = None) -> torch.Tensor:
        projection = getattr(self.denoiser, "caption_projection", None)
        return embeds if projection is None else projection(embeds)

    @classmethod
    def discover(cls, denoiser: torch.nn.Module) -> PixArtAdapter:
        modules = _attention_modules(denoiser)
        layers = []
        for index, (name, module) in enumerate(modules.items()):
            block = _block_index(name.split("."), "transformer_blocks")
            cross = bool(getattr(module, "is_cross_attention", False))
            layers.append(LayerInfo(name, index, "cross" if cross else "self", "blocks", block, 0, "keys" if cross else "none"))
        return cls(
            family="pixart",
            denoiser=denoiser,
            layers=tuple(layers),
            modules=modules,
            batched_inputs=("hidden_states", "encoder_hidden_states", "timestep", "attention_mask", "encoder_attention_mask"),
            dict_inputs=("added_cond_kwargs",),
        )

    def canvas(self, inputs: dict[str, Any]) -> Canvas:
        latents = inputs["hidden_states"]
        patch = int(self.denoiser.config.patch_size)
        h, w = int(latents.shape[-2]), int(latents.shape[-1])
        return Canvas(latent_hw=(h, w), token_hw=(h // patch, w // patch), text_len=_text_len(inputs.get("encoder_hidden_states")))


class FluxAdapter(ModelAdapter):
    """`FluxTransformer2DModel`: double blocks (joint, `[text; image]`), single blocks (text concatenated first)."""

    text_attention: ClassVar[str] = "joint"
    timestep_scale: ClassVar[float] = 1000.0
    rotary: ClassVar[bool] = True
    cfg_calls: ClassVar[str] = "separate"
    padded_text_tokenizer: ClassVar[str | None] = "tokenizer_2"
    latent_packing: ClassVar[int] = 2
    refused_pipelines: ClassVar[dict[str, str]] = {
        "FluxKontextInpaintPipeline": "appends its image's tokens (or image_reference's) to every call's sequence as a "
        "reference, which attnctl does not place on FLUX.1 yet (it does on Flux.2 and Qwen-Image's edit pipelines)",
    }
    block_inputs: ClassVar[dict[str, tuple[str, ...]]] = {
        "FluxTransformerBlock": ("hidden_states", "encoder_hidden_states", "temb"),
        "FluxSingleTransformerBlock": ("hidden_states", "encoder_hidden_states", "temb"),
    }
    text_stream_blocks: ClassVar[tuple[str, ...]] = ("FluxTransformerBlock", "FluxSingleTransformerBlock")
    conditioning_inputs: ClassVar[tuple[str, ...]] = ("controlnet_block_samples", "controlnet_single_block_samples")

    def perturbed_layers(self) -> str:
        blocks = sorted({layer.block for layer in self.layers if layer.group == "double" and layer.block is not None})
        if not blocks:
            raise SelectionError("attnctl: this Flux transformer has no double-stream block; give layers=... explicitly")
        return f"transformer_blocks.{blocks[len(blocks) // 2]}"  # the middle double block

    def append_text(self, inputs: dict[str, Any], block: torch.Tensor, segments: int = 1,
                    block_mask: torch.Tensor | None = None) -> dict[str, Any]:
        """Also extends `txt_ids`: each of the `segments` appended prompts takes the base text's first positions
        (all zeros when the base text's are)."""
        context = inputs["encoder_hidden_states"]
        ids = inputs.get("txt_ids")
        if not isinstance(ids, torch.Tensor) or ids.shape[-2] != context.shape[1]:
            raise CallLayoutError(f"attnctl: expected Flux txt_ids with {context.shape[1]} rows, got {getattr(ids, 'shape', ids)}")
        length = block.shape[1] // segments
        if length <= ids.shape[-2]:  # the base text's first positions (zeros when they are: no host read)
            extra = ids[..., :length, :]
        elif bool((ids == 0).all()):
            extra = torch.zeros(ids.shape[:-2] + (length, ids.shape[-1]), dtype=ids.dtype, device=ids.device)
        else:
            raise UnsupportedError("attnctl: appended Flux text longer than the base text's non-zero ids cannot be placed")
        changed = dict(inputs)
        changed["encoder_hidden_states"] = torch.cat([context, block], dim=1)
        changed["txt_ids"] = torch.cat([ids] + [extra] * segments, dim=-2)
        return changed

    def latent_image(self, latents: torch.Tensor, canvas: Canvas) -> torch.Tensor:
        """Flux packs 2 x 2 latent patches into tokens: (B, N, 4C) -> (B, C, 2h, 2w)."""
        batch, n, channels = latents.shape
        rows, cols = canvas.token_hw
        if rows * cols != n:
            raise CallLayoutError(f"attnctl: {n} Flux tokens for a {rows}x{cols} grid")
        latent = latents.view(batch, rows, cols, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return latent.reshape(batch, channels // 4, rows * 2, cols * 2)

    def packed_latents(self, images: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = images.shape
        packed = images.view(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
        return packed.reshape(batch, (height // 2) * (width // 2), channels * 4)

    @classmethod
    def discover(cls, denoiser: torch.nn.Module) -> FluxAdapter:
        modules = _attention_modules(denoiser)
        layers = []
        for index, name in enumerate(modules):
            parts = name.split(".")
            if parts[0] == "transformer_blocks":
                layers.append(LayerInfo(name, index, "joint", "double", int(parts[1]), 0, "first"))
            elif parts[0] == "single_transformer_blocks":
                layers.append(LayerInfo(name, index, "joint", "single", int(parts[1]), 0, "first", concatenated=True))
            else:
                raise UnsupportedError(f"attnctl: unexpected attention layer {name!r} in {type(denoiser).__name__}")
        return cls(
            family="flux",
            denoiser=denoiser,
            layers=tuple(layers),
            modules=modules,
            batched_inputs=(
                "hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "guidance",
                "controlnet_block_samples", "controlnet_single_block_samples",
            ),
            dict_inputs=("joint_attention_kwargs",),  # IP-Adapter image embeds (`ip_adapter_image_embeds`)
        )

    def canvas(self, inputs: dict[str, Any]) -> Canvas:
        latents = inputs["hidden_states"]
        img_ids = inputs.get("img_ids")
        if img_ids is None:
            raise CallLayoutError("attnctl: the Flux transformer was called without img_ids; the image grid is unknown")
        if img_ids.ndim == 3:
            img_ids = img_ids[0]
        n = int(latents.shape[1])
        if img_ids.shape[0] != n:
            raise CallLayoutError(
                f"attnctl: Flux img_ids has {img_ids.shape[0]} rows but hidden_states has {n} image tokens; "
                "extra image tokens (Kontext-style references) are not supported yet"
            )
        # one host read: the tokens with another first coordinate than the first token's, and the grid's extent
        references, last_row, last_col = (int(v) for v in torch.stack([
            (img_ids[:, 0] != img_ids[0, 0]).sum().to(torch.float64), img_ids[:, 1].max().to(torch.float64),
            img_ids[:, 2].max().to(torch.float64)]).tolist())
        if references:
            raise UnsupportedError(
                f"attnctl: this Flux call's {n} image tokens include {references} tokens of a reference image (img_ids "
                "with another first coordinate, as FluxKontextPipeline and FluxKontextInpaintPipeline append for their "
                "`image`); attnctl does not place reference tokens on FLUX.1 yet (it does on Flux.2 and Qwen-Image's "
                "edit pipelines): call FluxKontextPipeline without the image, or without attnctl"
            )
        rows, cols = last_row + 1, last_col + 1
        if rows * cols != n:
            raise CallLayoutError(f"attnctl: Flux img_ids describe a {rows}x{cols} grid but there are {n} image tokens")
        return Canvas(latent_hw=(rows * 2, cols * 2), token_hw=(rows, cols), text_len=_text_len(inputs.get("encoder_hidden_states")))

    def canvas_for_call(self, inputs: dict[str, Any], pixels: tuple[int, int], vae_scale_factor: Any) -> Canvas:
        """The canvas from the pipeline call's image size, as FluxPipeline makes its img_ids (a
        `height // (2 * vae_scale_factor)` by `width // (2 * vae_scale_factor)` token grid): no host read of the
        img_ids. Falls back to `canvas` (which reads them) when the size does not account for the tokens."""
        grid = self._pixel_grid(inputs, pixels, vae_scale_factor)
        if grid is not None and grid[0] * grid[1] == inputs["hidden_states"].shape[1]:
            return self._grid_canvas(inputs, grid)
        return self.canvas(inputs)

    @staticmethod
    def _pixel_grid(inputs: dict[str, Any], pixels: tuple[int, int], vae_scale_factor: Any) -> tuple[int, int] | None:
        """The generated image's token grid from the call's pixel size, where img_ids has a row per token."""
        latents = inputs["hidden_states"]
        img_ids = inputs.get("img_ids")
        if not (isinstance(vae_scale_factor, int) and vae_scale_factor > 0 and isinstance(img_ids, torch.Tensor) and latents.ndim == 3):
            return None
        if img_ids.ndim < 2 or img_ids.shape[-2] != latents.shape[1]:
            return None
        return pixels[0] // (2 * vae_scale_factor), pixels[1] // (2 * vae_scale_factor)

    @staticmethod
    def _grid_canvas(inputs: dict[str, Any], grid: tuple[int, int]) -> Canvas:
        rows, cols = grid
        return Canvas(latent_hw=(rows * 2, cols * 2), token_hw=(rows, cols), text_len=_text_len(inputs.get("encoder_hidden_states")))
