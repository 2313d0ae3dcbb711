"""Reference attention: the generated images attend to a reference image's self-attention keys and values.

Reference-only control (lllyasviel, ControlNet discussion #1236, 2023; diffusers' community
`StableDiffusionReferencePipeline`) and PrimeComposer's attention steering (Wang et al. 2024, "PrimeComposer: Faster
Progressively Combined Diffusion for Image Composition with Attention Steering", arXiv:2403.05053). One prompt row
of the call (`reference_row`) carries the reference: at every denoiser call its latent input is replaced by the
reference image, encoded by the pipeline's VAE and noised to the call's noise level with a fixed noise
(`x_t = sqrt(a) x0 + sqrt(1-a) eps`, or `(1 - sigma) x0 + sigma eps` for flow matching). Every other row of the same
branch (`RowLayout.linked`) attends in its self-attention (joint attention: its image queries) to its own keys and to
the reference row's image keys with a logit bias log(strength):

    softmax(Q [K; K_ref]ᵀ scale + [0; log(strength)]) [V; V_ref]

inside `region` (a box of the generated image, or a soft mask in [0, 1] area-averaged onto each attention grid as
Regions' masks are, whose value m per query weighs the two: m times this plus 1 - m times the stock attention),
everywhere when None. The reference row's own image is a by-product (a reconstruction of the reference); discard it.

Optionally (`adain=True`, UNet denoisers) reference-only's AdaIN ("reference_adain" in the community pipeline): after
each ResNet / transformer stage of the selected UNet blocks, every linked row's feature map is moved to the reference
row's per-channel mean and standard deviation over the spatial positions,

    x' = (x - mean(x)) / std(x) * std(x_ref) + mean(x_ref),    std = sqrt(max(var, 1e-6)),

the variance without correction, on the blocks whose weight the community pipeline's rule puts at or below
`adain_weight`: the mid block 0, down block w of D `2 (1 - w / D)`, up block w of U `2 w / U`.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from ...control import BindContext, Control
from ...denoiser_call import DenoiserCall, RowLayout, upload
from ...errors import CallLayoutError, ConfigError, UnsupportedError
from ...families.base import LayerInfo, ModelAdapter, channel_dim, noisy_channels
from ...kernels.semantics import spec_rows
from ...kernels.spec import AttentionSpec
from ...noise import noise_level, require_noise_level
from ...processors.chain import restricted_rows
from ...processors.edit import AttentionCall, LayerHook
from ...selection import LayerSpec, validate_layers
from ...steps import validate_steps
from ...validation import choice, number, plain_scalar, refuse_unused, set_field
from ...validation import seed as valid_seed
from ..common import keep_kinds
from ..regions.masks import grid_layout, load_mask
from .consistent import Box, LinkedKeysBound, Links, appended_attention, box_mask, on_device, optional_box


@dataclass(frozen=True)
class ReferenceAttention(Control, type_name="reference-attention"):
    """The images of the call attend to a reference image in their self-attention (reference-only, PrimeComposer).

    `image`: the reference, a path to an image file, a PIL image, or an RGB image as diffusers pipelines take one: a
    torch tensor (3, H, W) or (1, 3, H, W), or a numpy array (H, W, 3) or (1, H, W, 3), floats in [0, 1] (uint8 arrays
    and tensors: 0..255), kept as an 8-bit PIL image (a path serialises into job files).
    `reference_row`: the prompt row that carries the reference (default 0; give it a prompt describing the
    reference, and discard its output). `branch`: "both" (uncond rows read the reference's uncond row, cond rows its
    cond row) or "cond" (only the cond rows read it, so CFG amplifies the reference: reference-only's
    style_fidelity = 1). `style_fidelity` (with `branch="both"`): reference-only's blend on the uncond rows,
    `style_fidelity * their own attention + (1 - style_fidelity) * with the reference` (the community pipeline's
    default is 0.5; 0, the default here, is plain "both"; 1 is "cond"). `strength`: a factor on the attention the reference tokens get (logit bias
    log(strength); 0 is off). `region`: where the generated images read the reference (None: everywhere): a box
    (x0, y0, x1, y1) in relative coordinates (the tokens whose cell centre is inside), or a soft mask in [0, 1] over
    the whole image as `Region(mask=...)` takes it (a PIL image, a numpy array or torch tensor (H, W), or a path to an
    image file), area-averaged onto each attention grid: a query with mask value m takes m of its attention with the
    reference and 1 - m of its stock attention. A path mask serialises as its path; an in-memory one cannot
    (`to_dict` raises). `seed`: of the fixed noise the reference is noised with. `layers`, `steps` as usual.
    `adain`: also reference-only's AdaIN on the UNet's feature maps (module docstring; UNet families only; with
    `strength=0` AdaIN alone); `adain_weight` in [0, 2] picks its blocks as the community pipeline's
    `gn_auto_machine_weight` does (1, its default: the mid block and the lower-resolution half; 2: every block).
    `style_fidelity` blends AdaIN on the uncond rows as it blends the attention.
    """

    image: Any
    reference_row: int = 0
    strength: float = 1.0
    region: Box | str | torch.Tensor | None = None  # a box, a mask file's path, or an in-memory mask's (H, W) copy
    seed: int = 0
    branch: str = "both"
    layers: LayerSpec = None
    steps: tuple[float, float] = (0.0, 1.0)
    style_fidelity: float = 0.0
    adain: bool = False
    adain_weight: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.image, os.PathLike):
            set_field(self, "image", os.fspath(self.image))
        if isinstance(self.image, (torch.Tensor, np.ndarray)):
            set_field(self, "image", _image_from_array(self.image))
        if not isinstance(self.image, str) and not hasattr(self.image, "convert"):
            raise ConfigError(
                f"ReferenceAttention.image must be a path to an image, a PIL image, or an RGB image tensor / array, got "
                f"{self.image!r}"
            )
        row = plain_scalar(self.reference_row)
        if isinstance(row, bool) or not isinstance(row, int) or row < 0:
            raise ConfigError(f"ReferenceAttention.reference_row must be a prompt row index >= 0, got {self.reference_row!r}")
        set_field(self, "reference_row", int(row))
        set_field(self, "strength", number(self.strength, "ReferenceAttention.strength", minimum=0))
        region, pixels = _region(self.region)
        set_field(self, "region", region)
        object.__setattr__(self, "_mask", pixels)  # the mask's (H, W) pixels (None for a box or no region)
        set_field(self, "seed", valid_seed(self.seed, "ReferenceAttention.seed"))
        choice(self.branch, "ReferenceAttention.branch", ("both", "cond"))
        set_field(self, "style_fidelity", number(self.style_fidelity, "ReferenceAttention.style_fidelity", minimum=0, maximum=1))
        if self.branch == "cond" and self.style_fidelity not in (0.0, 1.0):
            raise ConfigError(
                f"ReferenceAttention.style_fidelity={self.style_fidelity} blends the uncond rows, which branch='cond' leaves "
                "stock; use branch='both' with it"
            )
        set_field(self, "layers", validate_layers(self.layers, name="ReferenceAttention.layers"))
        set_field(self, "steps", validate_steps(self.steps, name="ReferenceAttention.steps"))
        if not isinstance(self.adain, bool):
            raise ConfigError(f"ReferenceAttention.adain must be True or False, got {self.adain!r}")
        set_field(self, "adain_weight", number(self.adain_weight, "ReferenceAttention.adain_weight", minimum=0, maximum=2))
        if not self.adain:
            refuse_unused(self, "adain_weight", "with adain=False (it picks the blocks AdaIN acts on: give adain=True)")
        if self.adain and self.region is not None:
            raise ConfigError(
                "ReferenceAttention.adain matches the whole feature map's channel statistics, which a region cannot confine; "
                "use adain=False with region, or no region"
            )
        if isinstance(self.image, str):
            _check_image_file(self.image)

    grid_dims = (2,)
    needs = ("row_inputs", "image_vae")

    def select(self, adapter: ModelAdapter) -> tuple[LayerInfo, ...]:
        return keep_kinds(Control.select(self, adapter), ("self", "joint"), type(self).__name__, "self- or joint attention", self.layers)

    def layer_effects(self, adapter: ModelAdapter, layer: LayerInfo) -> tuple[str, ...]:
        """"linked_keys": the rows attend to the reference row's keys and values (none while strength is 0)."""
        return ("linked_keys",) if self.strength > 0 else ()

    def call_effects(self, adapter: ModelAdapter) -> tuple[str, ...]:
        """"row_links": the rows attend to the reference row's keys and values, or match its features' statistics
        (AdaIN), and the reference row's latent is the reference image's (none while strength is 0 without AdaIN)."""
        return ("row_links",) if self.strength > 0 or self.adain else ()

    def __eq__(self, other: object) -> bool:  # a mask compares by its pixels, as Region's (a tensor has no plain ==)
        if not isinstance(other, ReferenceAttention):
            return NotImplemented
        plain = [f.name for f in fields(self) if f.name != "region"]
        if any(getattr(self, name) != getattr(other, name) for name in plain):
            return False
        if self._mask is None or other._mask is None:
            return self._mask is other._mask and self.region == other.region
        same_path = isinstance(self.region, str) == isinstance(other.region, str) and (
            not isinstance(self.region, str) or self.region == other.region)
        return same_path and self._mask.shape == other._mask.shape and torch.equal(self._mask, other._mask)

    def __hash__(self) -> int:  # a PIL image is unhashable (and compares by content): its mode and size stand for it
        image = self.image if isinstance(self.image, str) else (self.image.mode, self.image.size)
        region = self.region if not isinstance(self.region, torch.Tensor) else ("mask", tuple(self.region.shape))
        return hash((image, region, *(getattr(self, f.name) for f in fields(self) if f.name not in ("image", "region"))))

    def to_dict(self) -> dict[str, Any]:
        if not isinstance(self.image, str):
            raise ConfigError("ReferenceAttention.to_dict: the image is in memory (a PIL image); give a path to serialise it")
        if isinstance(self.region, torch.Tensor):
            raise ConfigError(
                f"ReferenceAttention.to_dict: the region is an in-memory mask ({_described_mask(self.region)}), which "
                "cannot be serialised; save it as an image and pass its path"
            )
        return super().to_dict()

    def to_record(self) -> dict[str, Any]:
        if isinstance(self.image, str) and not isinstance(self.region, torch.Tensor):
            return self.to_dict()
        described = copy.copy(self)
        if not isinstance(self.image, str):
            size = getattr(self.image, "size", None)
            set_field(described, "image", f"<PIL image {size[0]}x{size[1]}, not saved>" if size else "<PIL image, not saved>")
        if isinstance(self.region, torch.Tensor):
            set_field(described, "region", f"<{_described_mask(self.region)}, not saved>")
        return Control.to_dict(described)

    def validate_for(self, adapter: ModelAdapter) -> None:
        if self.adain:
            adain_modules(adapter.denoiser, self.adain_weight, adapter.family)

    def compile_refusal(self, adapter: ModelAdapter) -> str | None:
        if self.adain:
            return ("adain wraps the forward of UNet blocks for each pipeline call (instance-level wraps that read the call's "
                    "row layout in Python), which a compiled UNet would trace once and keep; use adain=False under torch.compile")
        return None  # the edit hands its hook the row links and bias as constants (tests/test_compile_controls.py)

    def bind(self, context: BindContext) -> _ReferenceBound:
        return _ReferenceBound(self, context)


ADAIN_EPS = 1e-6


def _region(value: Any) -> tuple[Any, torch.Tensor | None]:
    """`region` as stored and its mask pixels: None; a box (a sequence of 4 numbers, or a rank-1 array / tensor, as
    before masks were taken), validated as Regions' boxes; a mask file's path (read now, as `Region(mask=path)`); or an
    in-memory mask, kept as its (H, W) float32 copy (`load_mask`: Region's types, validation and errors)."""
    owner = "ReferenceAttention.region"
    if value is None:
        return None, None
    from PIL import Image

    rank = getattr(value, "ndim", None) if isinstance(value, (torch.Tensor, np.ndarray)) else None
    if isinstance(value, (str, os.PathLike, Image.Image)) or (rank is not None and rank != 1):
        pixels = load_mask(value, owner=owner, shapes="ReferenceAttention takes one 2-D mask for the whole image, no per-frame masks")
        return (os.fspath(value) if isinstance(value, (str, os.PathLike)) else pixels), pixels
    if rank is None and not hasattr(value, "__len__"):
        raise ConfigError(
            f"{owner} must be None, a box (x0, y0, x1, y1) in relative image coordinates, or a mask (a PIL image, a numpy "
            f"array or torch tensor (H, W) with values in [0, 1], or a path to an image file), got {value!r}"
        )
    return optional_box(value, owner), None


def _described_mask(mask: torch.Tensor) -> str:
    return f"a {mask.shape[0]}x{mask.shape[1]} mask"


def _image_from_array(value: torch.Tensor | np.ndarray) -> Any:
    """An RGB image as diffusers pipelines take one (torch (3, H, W) / (1, 3, H, W), numpy (H, W, 3) / (1, H, W, 3);
    floats in [0, 1], uint8 0..255) as an 8-bit PIL image: the reference is resized as a PIL image (Lanczos, as the
    reference-only pipeline), so a path, a PIL image and an array take one road."""
    from PIL import Image

    owner = "ReferenceAttention.image"
    is_tensor = isinstance(value, torch.Tensor)
    array = value.detach().to("cpu") if is_tensor else torch.from_numpy(np.array(value))
    shape = tuple(array.shape)
    if array.ndim == 4 and shape[0] == 1:
        array = array[0]
    channels = (array.shape[0] if is_tensor else array.shape[-1]) if array.ndim == 3 else None
    if channels != 3:
        layout = "(3, H, W) or (1, 3, H, W)" if is_tensor else "(H, W, 3) or (1, H, W, 3)"
        raise ConfigError(f"{owner}: an RGB image {'tensor' if is_tensor else 'array'} has shape {layout}, got shape {shape}")
    if is_tensor:
        array = array.permute(1, 2, 0)
    if array.dtype == torch.uint8:
        return Image.fromarray(array.contiguous().numpy(), "RGB")
    if not array.is_floating_point():
        raise ConfigError(f"{owner}: an image array holds floats in [0, 1] or uint8 values 0..255, got {array.dtype}")
    array = array.double()
    if torch.isnan(array).any() or float(array.min()) < 0.0 or float(array.max()) > 1.0:
        raise ConfigError(
            f"{owner}: a float image holds values in [0, 1] (as diffusers pipelines take it), got values from "
            f"{float(array.min()):g} to {float(array.max()):g}"
        )
    return Image.fromarray((array * 255.0).round().to(torch.uint8).contiguous().numpy(), "RGB")


def adain_modules(denoiser: torch.nn.Module, weight: float, family: str) -> tuple[torch.nn.Module, ...]:
    """The modules after whose output reference-only's AdaIN acts, for `adain_weight` `weight`: the mid block (weight
    0), and in the down blocks (weight `2 (1 - w / D)` for block w of D) and up blocks (`2 w / U`) at or below `weight`
    each transformer stage (`attentions[i]`, which follows `resnets[i]`) or, in blocks without attention, each ResNet."""
    blocks = [getattr(denoiser, name, None) for name in ("down_blocks", "mid_block", "up_blocks")]
    if any(block is None for block in blocks):  # the denoiser's structure decides, not the family's name
        raise UnsupportedError(
            f"attnctl: ReferenceAttention(adain=True) moves the feature maps of a UNet's down, mid and up blocks to the "
            f"reference's channel statistics (reference-only's AdaIN); the {family} family's "
            f"{type(denoiser).__name__} has no such blocks. Use adain=False (reference attention alone)"
        )
    down, mid, up = blocks
    chosen: list[torch.nn.Module] = [mid]
    for stages, weights in ((down, [2.0 * (1.0 - w / len(down)) for w in range(len(down))]),
                            (up, [2.0 * w / len(up) for w in range(len(up))])):
        for block, block_weight in zip(stages, weights):
            if weight < block_weight:
                continue
            attentions, resnets = getattr(block, "attentions", None), getattr(block, "resnets", None)
            if attentions is not None and resnets is not None and len(attentions) == len(resnets):
                chosen.extend(attentions)
            elif attentions is None and resnets is not None:
                chosen.extend(resnets)
            else:
                raise UnsupportedError(
                    f"attnctl: ReferenceAttention(adain=True) does not know where the stages of a {type(block).__name__} end "
                    "(it handles blocks of ResNets, each followed by at most one transformer); use adain=False"
                )
    return tuple(chosen)


def _check_image_file(path: str) -> None:
    """A missing or unreadable reference is a ConfigError when the control is made (a Region's mask file is checked
    the same way), not an OSError at the first denoiser call."""
    from PIL import Image

    resolved = os.path.abspath(path)
    if not os.path.isfile(resolved):
        raise ConfigError(f"ReferenceAttention.image: file {path!r} does not exist (looked for {resolved!r})")
    try:
        with Image.open(resolved) as image:
            image.verify()
    except (OSError, SyntaxError, ValueError) as error:
        raise ConfigError(f"ReferenceAttention.image: {path!r} is not an image PIL can read: {error}") from None


def encode_reference(pipe: Any, adapter: ModelAdapter, image: Any, size: tuple[int, int], device: Any, dtype: Any) -> torch.Tensor:
    """The reference as the pipeline's VAE latents (1, C, h, w): resized to the call's image size (Lanczos, as the
    reference-only pipeline), scaled to [-1, 1], encoded (the distribution's mean), then mapped as the family's
    pipelines map an encoding (`ModelAdapter.vae_latents`: shifted and scaled by the VAE's config; Flux.2: its
    batch-norm statistics). A VAE whose config asks for `force_upcast` (SDXL's) encodes in float32, as diffusers' img2img
    pipelines do (its float16 encoder overflows), and is put back in its dtype afterwards."""
    from PIL import Image

    if isinstance(image, str):
        with Image.open(image) as opened:
            image = opened.convert("RGB")
    image = image.convert("RGB").resize((size[1], size[0]), Image.LANCZOS)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
    vae = getattr(pipe, "vae", None)
    if vae is None:
        raise UnsupportedError("attnctl: ReferenceAttention needs the pipeline's VAE (pipe.vae) to encode the reference")
    dtype_before = vae.dtype
    upcast = bool(getattr(vae.config, "force_upcast", False)) and dtype_before == torch.float16
    try:
        if upcast:
            vae.to(dtype=torch.float32)
        with torch.no_grad():
            encoded = vae.encode(pixels.to(device=device, dtype=vae.dtype))
    finally:
        if upcast:
            vae.to(dtype=dtype_before)
    dist = getattr(encoded, "latent_dist", None)
    latents = dist.mean if dist is not None else encoded[0]
    if latents.ndim != 4:
        raise UnsupportedError(
            f"attnctl: ReferenceAttention encodes a 2-D image latent; this pipeline's VAE gives a {latents.ndim}-D latent"
        )
    return adapter.vae_latents(vae, latents).to(dtype)


class _ReferenceBound(LinkedKeysBound):
    def __init__(self, control: ReferenceAttention, context: BindContext):
        super().__init__(control, context, ReferenceHook)
        if context.prompt_rows < 2 and (control.strength > 0 or control.adain):  # strength 0 alone is "off"
            raise ConfigError(
                f"attnctl: ReferenceAttention's reference_row {control.reference_row} carries the reference, and this call "
                "makes 1 image, so no image would read it: call the pipeline with [a prompt for the reference, the prompts "
                "to generate, ...] (attnctl render and Model.generate do this themselves)"
            )
        if control.strength > 0 or control.adain:  # the reference is noised to each call's level: refused here, not mid-call
            require_noise_level(getattr(context.pipeline, "scheduler", None), "attnctl: ReferenceAttention")
        if control.reference_row >= context.prompt_rows:
            raise ConfigError(
                f"ReferenceAttention.reference_row is prompt row {control.reference_row}, but the call has "
                f"{context.prompt_rows} prompt row(s); add a row for the reference (its output is a by-product)"
            )
        grids = sorted({context.canvas.grid_at(layer.level) for layer in context.layers})
        key = ("empty region", tuple(grids))
        if control.region is not None and key not in context.handle_cache:  # read once per handle, not in a warm call
            context.handle_cache[key] = not any(bool(region_cells(control, g).any()) for g in grids)
        if control.region is not None and control.strength > 0 and context.handle_cache[key]:
            shown = control.region if control._mask is None else _described_mask(control._mask)
            raise ConfigError(
                f"attnctl: ReferenceAttention.region {shown} holds no image token at this call's size (token grids "
                f"{', '.join(f'{h}x{w}' for h, w in grids)}; a box holds the cells whose centre is inside it, a mask those "
                "where its area average is above 0), so no image would read the reference: give a larger region"
            )
        from ..common import image_size

        self.adapter = context.adapter
        self.pipeline = context.pipeline
        # noised into the denoiser's inputs (`transform_inputs`): on their device
        device = context.device if context.input_device is None else context.input_device
        latents = encode_reference(context.pipeline, context.adapter, control.image, image_size(context), device, context.dtype)
        if tuple(latents.shape[-2:]) != tuple(context.canvas.latent_hw):
            raise UnsupportedError(
                f"attnctl: ReferenceAttention: the reference encodes to a {tuple(latents.shape[-2:])} latent, the call's "
                f"latent grid is {tuple(context.canvas.latent_hw)}"
            )
        generator = torch.Generator().manual_seed(control.seed)
        self.x0 = latents
        self.eps = upload(torch.randn(latents.shape, generator=generator, dtype=torch.float32), latents.device).to(latents.dtype)
        self.canvas = context.canvas
        self._region: dict[Any, torch.Tensor] = {}
        self._fidelity: dict[Any, torch.Tensor] = {}
        self.main_input = context.adapter.batched_inputs[0]
        self.noisy_channels = noisy_channels(context.adapter.denoiser)
        if control.adain:
            for module in adain_modules(context.adapter.denoiser, control.adain_weight, context.adapter.family):
                context.wrap_method(module, "forward", self._adain_wrap(context.current_frame))

    def find_links(self, rows: RowLayout) -> Links:
        linked = rows.linked(lambda prompt: self.control.reference_row)
        branches = ("cond",) if self.control.branch == "cond" else ("cond", "uncond")
        targets = tuple(i for i, s in enumerate(linked) if s is not None and rows.rows[i].branch in branches)
        return targets, tuple((linked[i],) for i in targets)

    def source_bias(self, geometry, device, dtype) -> torch.Tensor:
        key = (geometry.image_len, device, dtype)
        found = self._bias.get(key)
        if found is None:
            found = self._bias[key] = torch.full((geometry.image_len,), math.log(self.control.strength), dtype=dtype, device=device)
        return found

    def region_weight(self, geometry, device, dtype) -> torch.Tensor:
        """(Nq, 1): each image query's share of the attention with the reference (`region_cells`)."""
        key = (geometry.image_hw, device, dtype)
        found = self._region.get(key)
        if found is None:
            found = self._region[key] = upload(region_cells(self.control, geometry.image_hw), device).to(dtype)[:, None]
        return found

    def transform_inputs(self, frame: DenoiserCall, inputs: dict[str, Any]) -> dict[str, Any]:
        """The reference row's latent input: the reference noised to this call's level; its ControlNet / adapter
        residuals (computed by the pipeline for the latent replaced here) are zeroed, as the community
        `stable_diffusion_controlnet_reference.py` runs its reference pass without them."""
        rows = tuple(i for i, row in enumerate(frame.rows.rows) if row.prompt == self.control.reference_row)
        idle = self.control.strength == 0 and not self.control.adain
        if idle or not self.active(frame.step) or not rows or self.main_input not in inputs:
            return inputs
        sample = inputs[self.main_input]
        if not isinstance(sample, torch.Tensor):
            raise UnsupportedError(
                f"attnctl: ReferenceAttention replaces the reference row of the denoiser's {self.main_input!r} tensor; this "
                f"family passes it as {type(sample).__name__}"
            )
        level = noise_level(getattr(self.pipeline, "scheduler", None), inputs.get("timestep"), owner="attnctl: ReferenceAttention")
        noised = level.noise(self.x0.float(), self.eps.float()).to(sample.dtype)
        packed = self.adapter.packed_latents(noised)
        changed = sample.clone()
        latent = changed  # an inpainting denoiser's input: the noisy latent first, then its condition (kept as given)
        if self.noisy_channels is not None and packed.shape[channel_dim(packed)] == self.noisy_channels:
            latent = changed.narrow(channel_dim(sample), 0, self.noisy_channels)
        if packed.shape[1:] != latent.shape[1:]:
            raise UnsupportedError(
                f"attnctl: ReferenceAttention: the noised reference has shape {tuple(packed.shape[1:])}, the denoiser's "
                f"{self.main_input} rows {tuple(sample.shape[1:])}"
            )
        index = self.index(rows, sample.device)
        latent.index_copy_(0, index, packed.expand(len(rows), *packed.shape[1:]).to(sample.dtype))
        return self.adapter.without_conditioning({**inputs, self.main_input: changed}, index, len(frame.rows))


    def _adain_wrap(self, current_frame: Callable[[], DenoiserCall | None]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """A `wrap_method` maker: the block's forward, then `adain_rows` on its output while the control is active."""

        def make(original: Callable[..., Any]) -> Callable[..., Any]:
            def forward(*args: Any, **kwargs: Any) -> Any:
                output = original(*args, **kwargs)
                frame: DenoiserCall | None = current_frame()
                if frame is None or not self.active(frame.step):
                    return output
                targets, sources = self.links(frame.rows)
                if not targets:
                    return output
                sample = output if isinstance(output, torch.Tensor) else output[0]
                if sample.shape[0] != len(frame.rows):
                    raise CallLayoutError(
                        f"attnctl: ReferenceAttention(adain=True) got a feature map of {sample.shape[0]} rows in a denoiser "
                        f"call of {len(frame.rows)} rows"
                    )
                moved = self.adain_rows(sample, frame.rows, targets, tuple(s[0] for s in sources))
                if isinstance(output, torch.Tensor):
                    return moved
                if isinstance(output, tuple):
                    return (moved,) + tuple(output[1:])
                output[next(iter(output.keys()))] = moved  # a diffusers BaseOutput: its first field
                return output

            return forward

        return make

    def adain_rows(self, sample: torch.Tensor, rows: RowLayout, targets: tuple[int, ...], sources: tuple[int, ...]) -> torch.Tensor:
        """`sample` with each target row moved to its source row's per-channel mean and std (module docstring); an uncond
        target with `style_fidelity` s keeps s of its own map."""
        target_index, source_index = self.tensor(targets, sample.device), self.tensor(sources, sample.device)
        spatial = tuple(range(2, sample.ndim))
        own = sample.index_select(0, target_index).float()
        var, mean = torch.var_mean(own, dim=spatial, keepdim=True, correction=0)
        ref_var, ref_mean = torch.var_mean(sample.index_select(0, source_index).float(), dim=spatial, keepdim=True, correction=0)
        moved = (own - mean) / var.clamp_min(ADAIN_EPS).sqrt() * ref_var.clamp_min(ADAIN_EPS).sqrt() + ref_mean
        keep = self.fidelity_weight(rows, targets, sample.device)
        if keep is not None:
            moved = keep * own + (1.0 - keep) * moved
        return sample.index_copy(0, target_index, moved.to(sample.dtype))

    def fidelity_weight(self, rows: RowLayout, targets: tuple[int, ...], device: torch.device) -> torch.Tensor | None:
        """(targets, 1, 1, 1): `style_fidelity` on the uncond targets, 0 on the others; None when all are 0."""
        fidelity = self.control.style_fidelity
        if not fidelity or all(rows.rows[i].branch != "uncond" for i in targets):
            return None
        key = (rows.rows, targets, device)
        found = self._fidelity.get(key)
        if found is None:
            weights = [fidelity if rows.rows[i].branch == "uncond" else 0.0 for i in targets]
            found = self._fidelity[key] = torch.tensor(weights, dtype=torch.float32, device=device).view(-1, 1, 1, 1)
        return found


def region_cells(control: ReferenceAttention, grid: tuple[int, int]) -> torch.Tensor:
    """(h * w,) row-major: a box's cells (bool: centre inside), or a mask area-averaged onto `grid` as Regions' masks
    (float32 in [0, 1], `grid_layout`'s weights: exact area averaging, values within 1e-12 of 0 or 1 snapped)."""
    if control._mask is None:
        return box_mask(control.region, grid)
    return grid_layout((control._mask,), grid).weights[0]


class ReferenceHook(LayerHook):
    """The target rows: appended reference keys (`appended_attention`), blended with their stock attention outside
    the region; the other rows (the reference) through the rest of the chain."""

    def __init__(self, bound: _ReferenceBound, links: Links = ((), ()), geometry: Any = None, device: Any = None):
        self.bound = bound
        self.links = links
        self.bias = self.region = None
        self.key_biases: dict = {}  # `appended_attention`'s joined key bias (constant with `self.bias`)
        if geometry is not None:  # the edit's constants (`LinkedKeysBound.edit`)
            self.bias = bound.source_bias(geometry, device, torch.float32)
            if bound.control.region is not None:
                self.region = bound.region_weight(geometry, device, torch.float32)

    def attend(self, call: AttentionCall, q, k, v, spec: AttentionSpec, compute):
        targets, sources = self.bound.call_links(call, self.links)
        if not targets:
            return compute(q, k, v, spec)
        batch = q.shape[0]
        index = self.bound.tensor
        target_index = index(targets, q.device)
        source_index = index(tuple(s[0] for s in sources), q.device)
        bias = on_device(self.bias, q.device, lambda device: self.bound.source_bias(call.geometry, device, torch.float32))
        own = appended_attention(call, q, k, v, spec, target_index, [source_index], bias,
                                 key_bias_cache=self.key_biases if bias is self.bias else None)
        fidelity = self.bound.control.style_fidelity
        blended_rows = tuple(j for j, i in enumerate(targets) if call.rows.rows[i].branch == "uncond") if fidelity else ()
        stock_of = set(targets[j] for j in blended_rows)
        if self.bound.control.region is not None:
            rows = tuple(range(batch))
        else:
            rows = tuple(i for i in range(batch) if i not in set(targets) or i in stock_of)
        kept = index(rows, q.device)
        with restricted_rows(call, rows):
            out, _ = compute(q.index_select(0, kept), k.index_select(0, kept), v.index_select(0, kept), spec_rows(spec, kept, batch))
        full = out.new_empty((batch,) + tuple(out.shape[1:]))
        full.index_copy_(0, kept, out)
        if self.bound.control.region is not None:
            geometry = call.geometry
            image = slice(0, q.shape[2]) if call.layer.text == "none" else geometry.image_slice
            weight = on_device(self.region, q.device, lambda device: self.bound.region_weight(geometry, device, torch.float32))
            weight = weight.to(own.dtype)  # a box's 0 / 1: exact in any dtype
            stock = full.index_select(0, target_index)
            blended = stock.clone()
            blended[:, :, image] = stock[:, :, image] + weight * (own[:, :, image].to(stock.dtype) - stock[:, :, image])
            own = blended
        if blended_rows:  # reference-only's style fidelity on the uncond rows
            where = index(blended_rows, q.device)
            stock = full.index_select(0, index(tuple(targets[j] for j in blended_rows), q.device))
            own = own.index_copy(0, where, (fidelity * stock.float() + (1.0 - fidelity) * own.index_select(0, where).float()).to(own.dtype))
        full.index_copy_(0, target_index, own.to(out.dtype))
        return full, None
