"""Model adapters for the newer DiT families (issue #19): Chroma, Qwen-Image, Z-Image, Flux.2, Wan.

As in `adapters.py`, layers are discovered through the public `attn_processors` surface and classified by
their module path; a call's geometry comes from the call's own inputs (`img_ids`, `img_shapes`, the latent
shape), never from guessing on tensor shapes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch

from ..errors import CallLayoutError, UnsupportedError
from .adapters import FluxAdapter, _attention_modules, _text_len
from .base import Canvas, LayerInfo, ModelAdapter, RowGroups, RowList


def _appended_mask(block: torch.Tensor, block_mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """The mask entries of appended text tokens `block` (B, T', C), in the dtype and device of the call's mask `like`:
    `block_mask` (B, T') where the appended prompts have padding, else ones."""
    if block_mask is None:
        return torch.ones(like.shape[0], block.shape[1], dtype=like.dtype, device=like.device)
    return block_mask.to(device=like.device, dtype=like.dtype)


class ChromaAdapter(FluxAdapter):
    """`ChromaTransformer2DModel`: Flux's layout (double blocks `[text; image]`, single blocks with the text
    concatenated first, RoPE, 2x2 packed latents), T5 only, a text padding mask, true CFG as two calls."""

    min_diffusers: ClassVar[tuple[int, int] | None] = (0, 42)  # its processors reproduce diffusers 0.42's
    padded_text_tokenizer: ClassVar[str | None] = None  # T5 with a padding mask
    prompt_mask_index: ClassVar[int | None] = 2  # encode_prompt: (embeds, text_ids, mask, ...)
    layer_mask_input: ClassVar[str | None] = "attention_mask"  # every block: mask[:, None, None, :] * mask[:, None, :, None]

    block_inputs: ClassVar[dict[str, tuple[str, ...]]] = {
        "ChromaTransformerBlock": ("hidden_states", "encoder_hidden_states", "temb", "attention_mask"),
        "ChromaSingleTransformerBlock": ("hidden_states", "temb", "attention_mask"),
    }
    text_stream_blocks: ClassVar[tuple[str, ...]] = ("ChromaTransformerBlock",)

    @classmethod
    def discover(cls, denoiser: torch.nn.Module) -> ChromaAdapter:
        adapter = super().discover(denoiser)
        adapter.family = "chroma"
        adapter.batched_inputs = (
            "hidden_states", "encoder_hidden_states", "timestep", "attention_mask",
            "controlnet_block_samples", "controlnet_single_block_samples",
        )
        return adapter

    def append_text(self, inputs: dict[str, Any], block: torch.Tensor, segments: int = 1,
                    block_mask: torch.Tensor | None = None) -> dict[str, Any]:
        """As Flux, and the `[text; image]` attention mask gets the appended prompts' padding mask (ones without
        one); without a mask of the call, one is made (ones for the base text and the image) when they have padding."""
        changed = super().append_text(inputs, block, segments)
        mask = inputs.get("attention_mask")
        if not isinstance(mask, torch.Tensor) and block_mask is not None:
            length = inputs["encoder_hidden_states"].shape[1] + inputs["hidden_states"].shape[1]
            mask = torch.ones(block.shape[0], length, dtype=torch.bool, device=block.device)
        if isinstance(mask, torch.Tensor):
            text = inputs["encoder_hidden_states"].shape[1]
            extra = _appended_mask(block, block_mask, mask)
            changed["attention_mask"] = torch.cat([mask[:, :text], extra, mask[:, text:]], dim=1)
        return changed


class QwenImageAdapter(ModelAdapter):
    """`QwenImageTransformer2DModel`: double-stream blocks only, joint attention `[text; image]` with the text
    padding mask, separate text / image RoPE, 2x2 packed latents (`img_shapes` gives the token grid), true CFG
    as separate `cache_context("cond" / "uncond")` calls; guidance-distilled checkpoints take `guidance`."""

    min_diffusers: ClassVar[tuple[int, int] | None] = (0, 42)  # its processors reproduce diffusers 0.42's
    latent_packing: ClassVar[int] = 2

    text_attention: ClassVar[str] = "joint"
    timestep_scale: ClassVar[float] = 1000.0
    rotary: ClassVar[bool] = True
    cfg_calls: ClassVar[str] = "separate"
    prompt_mask_index: ClassVar[int | None] = 1  # encode_prompt: (embeds, mask or None when nothing is padded)
    layer_mask_input: ClassVar[str | None] = "encoder_hidden_states_mask"  # every layer: [mask; ones] (processors/qwen.py)
    masks_text_padding: ClassVar[bool] = True
    conditioning_inputs: ClassVar[tuple[str, ...]] = ("controlnet_block_samples",)
    refused_pipelines: ClassVar[dict[str, str]] = {
        "QwenImageLayeredPipeline": "generates several layer images in one sequence (img_shapes lists the layers after "
        "the first image), which attnctl would take for reference images: the controls would act on the first layer only",
    }
    reference_pipelines: ClassVar[tuple[str, ...]] = ("QwenImageEditPipeline", "QwenImageEditPlusPipeline", "QwenImageEditInpaintPipeline")
    block_inputs: ClassVar[dict[str, tuple[str, ...]]] = {
        "QwenImageTransformerBlock": ("hidden_states", "encoder_hidden_states", "encoder_hidden_states_mask", "temb"),
    }
    text_stream_blocks: ClassVar[tuple[str, ...]] = ("QwenImageTransformerBlock",)

    latent_image = FluxAdapter.latent_image  # the same 2x2 packing as Flux
    packed_latents = FluxAdapter.packed_latents
    lacks: ClassVar[dict[str, str]] = {
        "image_vae": "its VAE encodes frames (5-D latents normalised by a per-channel mean and std), not 2-D image latents",
    }

    @classmethod
    def discover(cls, denoiser: torch.nn.Module) -> QwenImageAdapter:
        modules = _attention_modules(denoiser)
        layers = []
        for index, name in enumerate(modules):
            parts = name.split(".")
            if parts[0] != "transformer_blocks" or len(parts) != 3 or not parts[1].isdigit():
                raise UnsupportedError(f"attnctl: unexpected attention layer {name!r} in {type(denoiser).__name__}")
            layers.append(LayerInfo(name, index, "joint", "blocks", int(parts[1]), 0, "first"))
        adapter = cls(
            family="qwenimage",
            denoiser=denoiser,
            layers=tuple(layers),
            modules=modules,
            batched_inputs=(
                "hidden_states", "encoder_hidden_states", "encoder_hidden_states_mask", "timestep", "guidance",
                "controlnet_block_samples", "additional_t_cond",
                # one shape list per row (Qwen-Image-Edit-2511's `zero_cond_t` builds its per-row modulation index from it)
                RowList("img_shapes"),
            ),
            dict_inputs=("attention_kwargs",),
        )
        return adapter

    def perturbed_layers(self) -> str:
        blocks = sorted({layer.block for layer in self.layers if layer.block is not None})
        return f"transformer_blocks.{blocks[len(blocks) // 2]}"  # the middle block

    def append_text(self, inputs: dict[str, Any], block: torch.Tensor, segments: int = 1,
                    block_mask: torch.Tensor | None = None) -> dict[str, Any]:
        """Text RoPE positions follow the text length, so appended tokens take the next positions; the padding
        mask gets the appended prompts' padding mask (ones without one); without a mask of the call, one is made
        (ones for the base text) when they have padding."""
        changed = dict(inputs)
        context = inputs["encoder_hidden_states"]
        changed["encoder_hidden_states"] = torch.cat([context, block], dim=1)
        mask = inputs.get("encoder_hidden_states_mask")
        if not isinstance(mask, torch.Tensor) and block_mask is not None:
            mask = torch.ones(context.shape[:2], dtype=block_mask.dtype, device=context.device)
        if isinstance(mask, torch.Tensor):
            changed["encoder_hidden_states_mask"] = torch.cat([mask, _appended_mask(block, block_mask, mask)], dim=1)
        return changed

    def canvas(self, inputs: dict[str, Any]) -> Canvas:
        latents = inputs["hidden_states"]
        shapes = inputs.get("img_shapes")
        if not shapes:
            raise CallLayoutError("attnctl: the Qwen-Image transformer was called without img_shapes; the image grid is unknown")
        per_sample = shapes[0] if isinstance(shapes[0], list) else list(shapes)
        n = int(latents.shape[1])
        frames, rows, cols = (int(x) for x in per_sample[0])
        # QwenImageEditPipeline / EditPlus: the reference images' shapes follow the generated image's
        references = sum(int(f) * int(h) * int(w) for f, h, w in per_sample[1:])
        if frames != 1 or rows * cols + references != n:
            raise CallLayoutError(f"attnctl: Qwen-Image img_shapes {per_sample} disagree with {n} image tokens")
        return Canvas(
            latent_hw=(rows * 2, cols * 2), token_hw=(rows, cols), text_len=_text_len(inputs.get("encoder_hidden_states")),
            reference_len=references,
        )


class Flux2Adapter(FluxAdapter):
    """`Flux2Transformer2DModel` (Flux.2 dev, Flux.2 klein): Flux's layout with 4-axis positions (t, h, w, l):
    double-stream blocks (`Flux2Attention`, `[text; image]`) and single-stream blocks (`Flux2ParallelSelfAttention`,
    text concatenated first, attention and MLP from one fused projection); an LLM text encoder (no CLIP, no pooled
    text); guidance-distilled (dev: `guidance`, no uncond call) or true CFG as `cache_context` calls (klein base)."""

    min_diffusers: ClassVar[tuple[int, int] | None] = (0, 42)  # its processors reproduce diffusers 0.42's
    padded_text_tokenizer: ClassVar[str | None] = None  # an LLM's chat-templated text, not one padded tokenizer sequence

    block_inputs: ClassVar[dict[str, tuple[str, ...]]] = {
        "Flux2TransformerBlock": ("hidden_states", "encoder_hidden_states", "temb_mod_img", "temb_mod_txt"),
        "Flux2SingleTransformerBlock": ("hidden_states", "temb_mod"),
    }
    text_stream_blocks: ClassVar[tuple[str, ...]] = ("Flux2TransformerBlock",)

    @classmethod
    def discover(cls, denoiser: torch.nn.Module) -> Flux2Adapter:
        adapter = super().discover(denoiser)
        adapter.family = "flux2"
        adapter.batched_inputs = ("hidden_states", "encoder_hidden_states", "timestep", "guidance")
        return adapter

    def canvas(self, inputs: dict[str, Any]) -> Canvas:
        """As Flux; reference-image tokens (Flux2KleinPipeline(image=...): the encoded reference images after the
        generated image's tokens, each with its own time coordinate in `img_ids`) are counted in `reference_len`
        and left out of the image grid."""
        img_ids = inputs.get("img_ids")
        if isinstance(img_ids, torch.Tensor):
            ids = img_ids[0] if img_ids.ndim == 3 else img_ids
            if ids.ndim == 2 and ids.shape[-1] == 4:
                times = ids[:, 0]
                generated = int((times == times[0]).sum())  # a host read of the ids, as Flux's canvas makes
                total = int(ids.shape[0])
                if generated < total:
                    if bool((times[:generated] != times[0]).any()):
                        raise CallLayoutError(
                            "attnctl: this Flux.2 call's img_ids interleave the generated image's tokens with reference-image "
                            "tokens; attnctl expects the generated image first, then the references (as Flux2KleinPipeline)"
                        )
                    latents = inputs["hidden_states"]
                    own = {**inputs, "hidden_states": latents[:, :generated], "img_ids": ids[:generated]}
                    return dataclasses.replace(super().canvas(own), reference_len=total - generated)
        return super().canvas(inputs)

    def vae_latents(self, vae: Any, latents: torch.Tensor) -> torch.Tensor:
        """Flux.2's pipelines normalise the VAE's encoding by the VAE's batch-norm statistics, kept per 2 x 2 patch
        channel (`Flux2KleinPipeline._encode_vae_image`: patchify, then `(z - running_mean) / sqrt(running_var +
        batch_norm_eps)`); the patch channel `c * 4 + 2 * dy + dx` is the one `packed_latents` makes."""
        bn = getattr(vae, "bn", None)
        if bn is None or getattr(bn, "running_mean", None) is None:
            return super().vae_latents(vae, latents)
        batch, channels, height, width = latents.shape
        shape = (1, channels, 1, 2, 1, 2)
        mean = bn.running_mean.view(channels, 2, 2).to(latents.device, latents.dtype).reshape(shape)
        std = torch.sqrt(bn.running_var.view(channels, 2, 2) + vae.config.batch_norm_eps).to(latents.device, latents.dtype).reshape(shape)
        patches = latents.view(batch, channels, height // 2, 2, width // 2, 2)
        return ((patches - mean) / std).reshape(latents.shape)

    def canvas_for_call(self, inputs: dict[str, Any], pixels: tuple[int, int], vae_scale_factor: Any) -> Canvas:
        """As Flux's; with more tokens than the call's size accounts for, the grid comes from the size too and the
        rest are taken as reference-image tokens after it (the runtime checks that against `canvas` once per call)."""
        grid = self._pixel_grid(inputs, pixels, vae_scale_factor)
        total = int(inputs["hidden_states"].shape[1])
        if grid is None or grid[0] * grid[1] >= total:
            return super().canvas_for_call(inputs, pixels, vae_scale_factor)
        return dataclasses.replace(self._grid_canvas(inputs, grid), reference_len=total - grid[0] * grid[1])


class WanAdapter(ModelAdapter):
    """`WanTransformer3DModel` (Wan 2.1 / 2.2 video): per block, self-attention `attn1` over the video's
    (frames x height x width) tokens with 3-D RoPE and cross-attention `attn2` to umT5 tokens (image-to-video
    models add a separate attention to CLIP image tokens inside `attn2`); true CFG as `cache_context` calls."""

    min_diffusers: ClassVar[tuple[int, int] | None] = (0, 42)  # its processors reproduce diffusers 0.42's

    rotary: ClassVar[bool] = True
    grid_dims: ClassVar[int] = 3
    cfg_calls: ClassVar[str] = "separate"
    block_inputs: ClassVar[dict[str, tuple[str, ...]]] = {"WanTransformerBlock": ("hidden_states", "encoder_hidden_states", "temb")}
    indexed_blocks: ClassVar[bool] = False  # Wan's blocks are `blocks.i`; name them by path

    @classmethod
    def discover(cls, denoiser: torch.nn.Module) -> WanAdapter:
        modules = _attention_modules(denoiser)
        layers = []
        for index, name in enumerate(modules):
            parts = name.split(".")
            if len(parts) != 3 or parts[0] != "blocks" or not parts[1].isdigit() or parts[2] not in ("attn1", "attn2"):
                raise UnsupportedError(f"attnctl: unexpected attention layer {name!r} in {type(denoiser).__name__}")
            cross = parts[2] == "attn2"
            layers.append(LayerInfo(name, index, "cross" if cross else "self", "blocks", int(parts[1]), 0, "keys" if cross else "none"))
        # a first-last-frame model (its image embedder has a `pos_embed`) takes two CLIP rows per video, first and last
        # frame, and views them as one row (`WanImageEmbedding.forward`)
        image_embedder = getattr(getattr(denoiser, "condition_embedder", None), "image_embedder", None)
        image = "encoder_hidden_states_image"
        if getattr(image_embedder, "pos_embed", None) is not None:
            image = RowGroups(image, 2)
        return cls(
            family="wan",
            denoiser=denoiser,
            layers=tuple(layers),
            modules=modules,
            batched_inputs=("hidden_states", "timestep", "encoder_hidden_states", image),
            dict_inputs=("attention_kwargs",),
        )

    def perturbed_layers(self) -> str:
        blocks = sorted({layer.block for layer in self.layers if layer.block is not None})
        return f"blocks.{blocks[len(blocks) // 2]} & self"  # the middle block's self-attention

    @classmethod
    def discover_experts(cls, experts: dict[str, torch.nn.Module]) -> WanAdapter:
        """One adapter over Wan 2.2's two experts (`transformer`: the high-noise steps, `transformer_2`: the low-noise
        ones, switched by the pipeline's `boundary_ratio`). Each expert's layers keep their path behind the expert's
        attribute (`transformer.blocks.0.attn1`, `transformer_2.blocks.0.attn1`), so a selector such as `blocks.1` or
        `self` acts on both experts and `transformer_2` on the low-noise one only. The experts must share a class and a
        patch size (one token grid for a call, whichever runs)."""
        found = {attribute: cls.discover(module) for attribute, module in experts.items()}
        kinds = {type(module) for module in experts.values()}
        patches = {tuple(module.config.patch_size) for module in experts.values()}
        if len(kinds) != 1 or len(patches) != 1:
            raise UnsupportedError(
                f"attnctl: the pipeline's denoiser experts ({', '.join(f'{a}: {type(m).__name__}, patch {tuple(m.config.patch_size)}' for a, m in experts.items())}) "
                "differ in class or patch size; attnctl controls experts of one class and one token grid"
            )
        layers: list[LayerInfo] = []
        modules: dict[str, torch.nn.Module] = {}
        for attribute, adapter in found.items():
            for info in adapter.layers:
                name = f"{attribute}.{info.name}"
                layers.append(dataclasses.replace(info, name=name, index=len(layers)))
                modules[name] = adapter.modules[info.name]
        first = next(iter(found.values()))
        return cls(
            family=first.family, denoiser=first.denoiser, layers=tuple(layers), modules=modules, batched_inputs=first.batched_inputs,
            dict_inputs=first.dict_inputs, experts=dict(experts),
        )

    def expert_schedule(self, pipeline: Any, steps: int) -> tuple[str, ...] | None:
        """Wan 2.2's rule (`WanPipeline.__call__`): the first expert runs the steps whose timestep is at least
        `boundary_ratio * num_train_timesteps`, the second the others; with no `boundary_ratio`, the first runs all.
        Read from the scheduler's timesteps (set before the first denoiser call: one host read per call)."""
        if len(self.experts) < 2:
            return None
        first, second = tuple(self.experts)[:2]
        config = getattr(pipeline, "config", None) or {}
        ratio = config.get("boundary_ratio") if hasattr(config, "get") else getattr(config, "boundary_ratio", None)
        if ratio is None:
            return (first,) * steps
        scheduler = pipeline.scheduler
        timesteps = [float(t) for t in scheduler.timesteps.tolist()]
        begin = getattr(scheduler, "_begin_index", None) or 0
        order = int(getattr(scheduler, "order", 1) or 1)
        boundary = ratio * scheduler.config.num_train_timesteps
        positions = [min(begin + step * order, len(timesteps) - 1) for step in range(steps)]
        return tuple(first if timesteps[position] >= boundary else second for position in positions)

    def expert_rule(self, pipeline: Any) -> str:
        if len(self.experts) < 2:
            return ""
        first, second = tuple(self.experts)[:2]
        config = getattr(pipeline, "config", None) or {}
        ratio = config.get("boundary_ratio") if hasattr(config, "get") else getattr(config, "boundary_ratio", None)
        name = type(pipeline).__name__
        if ratio is None:
            return f"{name} has no boundary_ratio: {first} runs every step"
        boundary = ratio * pipeline.scheduler.config.num_train_timesteps
        return f"{name}'s boundary_ratio={ratio:g}: {first} runs the steps whose timestep is at least {boundary:g}, {second} the others"

    def transformer_blocks(self) -> dict[str, torch.nn.Module]:
        """As the base class; with experts, each path behind its expert's attribute (`transformer_2.blocks.3`)."""
        if not self.experts:
            return super().transformer_blocks()
        classes = tuple(self.block_inputs)
        return {
            f"{attribute}.{name}": module
            for attribute, expert in self.experts.items()
            for name, module in expert.named_modules()
            if type(module).__name__ in classes
        }

    def project_text(self, embeds: torch.Tensor, layer: LayerInfo | None = None) -> torch.Tensor:
        return self.expert_of(layer).condition_embedder.text_embedder(embeds)

    def canvas(self, inputs: dict[str, Any]) -> Canvas:
        latents = inputs["hidden_states"]
        if latents.ndim != 5:
            raise CallLayoutError(f"attnctl: Wan expects (batch, channels, frames, height, width) latents, got {tuple(latents.shape)}")
        p_t, p_h, p_w = (int(p) for p in self.denoiser.config.patch_size)
        frames, height, width = (int(n) for n in latents.shape[2:])
        return Canvas(
            latent_hw=(height, width), token_hw=(height // p_h, width // p_w), text_len=_text_len(inputs.get("encoder_hidden_states")),
            frames=frames // p_t,
        )


#: Z-Image pads the image tokens and the caption tokens of every row to a multiple of this (`SEQ_MULTI_OF`).
ZIMAGE_SEQ_MULTIPLE = 32


class ZImageAdapter(ModelAdapter):
    """`ZImageTransformer2DModel` (Z-Image, basic mode): per row, an image refiner (self-attention over the image
    tokens), a caption refiner (text tokens only: not controlled, it has no image queries) and the main layers over
    one sequence `[image; text]` with RoPE. The inputs are lists of per-row tensors; CFG is batched as
    `[cond, uncond]`. Each row's caption is padded with a learned pad token (visible to attention) to a multiple
    of 32, and the rows to the longest one with positions its attention mask hides: the text span a layer sees is
    the longest padded caption (a shorter row's extra positions are masked keys, so a per-key edit there changes
    nothing). The image tokens are padded to a multiple of 32 as well, with a learned token attention sees: those
    tokens sit between the image and the text (`Canvas.image_pad`); the processor keeps them out of the controls'
    sequence and lets them attend as stock. Omni mode is refused per call."""

    min_diffusers: ClassVar[tuple[int, int] | None] = (0, 42)  # its processors reproduce diffusers 0.42's
    image_token_multiple: ClassVar[int] = ZIMAGE_SEQ_MULTIPLE
    text_input: ClassVar[str] = "cap_feats"
    refused_pipelines: ClassVar[dict[str, str]] = {
        "ZImageOmniPipeline": "calls the transformer in omni mode (per-image lists of condition images) on every call, "
        "text-to-image included, which attnctl does not follow yet",
    }

    text_attention: ClassVar[str] = "joint"
    rotary: ClassVar[bool] = True
    prediction_sign: ClassVar[int] = -1  # ZImagePipeline hands the scheduler the negated output
    #: the blocks take their tokens as `x` (one batched tensor inside the denoiser, [image; text] in the main layers)
    block_inputs: ClassVar[dict[str, tuple[str, ...]]] = {"ZImageTransformerBlock": ("x", "attn_mask", "freqs_cis", "adaln_input")}
    indexed_blocks: ClassVar[bool] = False  # name the blocks by path: the refiners and the main layers share the class
    lacks: ClassVar[dict[str, str]] = {
        "appended_text": "each row's caption is padded inside the denoiser, so appended tokens would not sit at one "
        "position for every row",
        "row_inputs": "its denoiser takes a list of per-row latents, so one row's latent input cannot be replaced in a "
        "batched tensor",
    }

    @classmethod
    def discover(cls, denoiser: torch.nn.Module) -> ZImageAdapter:
        found = _attention_modules(denoiser)
        modules, layers = {}, []
        for name, module in found.items():
            parts = name.split(".")
            if len(parts) != 3 or not parts[1].isdigit() or parts[2] != "attention":
                raise UnsupportedError(f"attnctl: unexpected attention layer {name!r} in {type(denoiser).__name__}")
            if parts[0] == "noise_refiner":
                info = ("self", "refiner", "none")
            elif parts[0] == "layers":
                info = ("joint", "layers", "last")
            elif parts[0] in ("context_refiner", "siglip_refiner"):
                continue  # text (or SigLIP) tokens only: no image query to control; they stay stock
            else:
                raise UnsupportedError(f"attnctl: unexpected attention layer {name!r} in {type(denoiser).__name__}")
            kind, group, text = info
            modules[name] = module
            # the main layers' hidden states already hold [image; text] (one stream)
            layers.append(LayerInfo(name, len(layers), kind, group, int(parts[1]), 0, text, concatenated=kind == "joint"))
        return cls(
            family="zimage", denoiser=denoiser, layers=tuple(layers), modules=modules,
            batched_inputs=(RowList("x"), "t", RowList("cap_feats")),  # lists of per-row tensors: re-batched as lists
            dict_inputs=("joint_attention_kwargs",),
        )

    def timestep_1000(self, inputs: dict[str, Any]) -> torch.Tensor | None:
        """ZImagePipeline calls the denoiser with `t = (1000 - timestep) / 1000` (0 at pure noise, 1 at the end), so
        diffusers' timestep is `1000 (1 - t)`."""
        value = inputs.get("t")
        if value is None:
            return None
        return (1.0 - torch.as_tensor(value).flatten()[0].float()) * 1000.0

    def perturbed_layers(self) -> str:
        blocks = sorted({layer.block for layer in self.layers if layer.group == "layers"})
        return f"layers.{blocks[len(blocks) // 2]}"  # the middle main layer

    def latent_image(self, latents: torch.Tensor, canvas: Canvas) -> torch.Tensor:
        """Rows stacked as (B, C, 1, H, W) (one frame per row): (B, C, H, W)."""
        return latents.squeeze(2)

    def packed_latents(self, images: torch.Tensor) -> torch.Tensor:
        return images.unsqueeze(2)

    def canvas(self, inputs: dict[str, Any]) -> Canvas:
        images, captions = inputs["x"], inputs["cap_feats"]
        if not isinstance(images, (list, tuple)) or not images or isinstance(images[0], (list, tuple)):
            raise CallLayoutError("attnctl: Z-Image omni mode (nested lists of images, SigLIP features) is not supported yet")
        patch, f_patch = int(inputs.get("patch_size") or 2), int(inputs.get("f_patch_size") or 1)
        channels, frames, height, width = (int(n) for n in images[0].shape)
        if frames != f_patch:
            raise CallLayoutError(f"attnctl: Z-Image latents with {frames} frames are not supported (one image per row)")
        rows, cols = height // patch, width // patch
        # each row: [image; image padding; caption; caption padding], then zeros up to the longest row, which the
        # transformer's attention mask hides; the text span is the longest padded caption (`_build_unified_sequence`)
        text = max(-(-int(c.shape[0]) // ZIMAGE_SEQ_MULTIPLE) * ZIMAGE_SEQ_MULTIPLE for c in captions)
        return Canvas(
            latent_hw=(height, width), token_hw=(rows, cols), text_len=text, image_pad=(-rows * cols) % self.image_token_multiple,
        )
