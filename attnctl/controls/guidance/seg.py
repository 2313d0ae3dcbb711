"""Smoothed Energy Guidance (Hong 2024, "Smoothed Energy Guidance: Guiding Diffusion Models with Reduced
Energy Curvature of Attention", NeurIPS 2024, arXiv:2408.00760).

The perturbed rows blur the queries of the selected self-attention layers with a 2-D Gaussian of std sigma
over the image-token grid, which smooths the attention energy landscape. The blur acts on the output of the
query projection, before qk-norm and RoPE (where diffusers' SEG hook sits), on image tokens only (text
tokens of joint attention are untouched), and only on the perturbed rows.

Kernel size as docs/methods.md: `ceil(6 sigma) + 1` made odd (`ceil(6 sigma)` when that is odd, as the authors'
SEG-SDXL code), clamped as the authors clamp it to the grid's longer side L: `L - (L % 2 - 1)`, i.e. L when L is
odd and L + 1 when it is even (one tap wider than the grid; its reflect padding of L / 2 still fits). The grid is
never assumed square: one isotropic kernel for both axes; reflect padding, replicate padding on an axis (the
shorter one) the pad would exceed. `sigma >= 9999` means infinite (the project's specification; the authors' and
diffusers' code test `> 9999`, which differs only at exactly 9999): every image query becomes the mean image query. (diffusers 0.42's `_gaussian_blur_2d` inverts its two branches and assumes a
square, image-only sequence; not reproduced.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ...denoiser_call import DenoiserCall
from ...errors import UnsupportedError
from ...families.base import LayerInfo, ModelAdapter
from ...kernels.spec import kept_tensors
from ...processors.edit import AttentionCall, Edit, LayerHook
from ...selection import LayerSpec, validate_layers
from ...steps import validate_steps
from ...validation import number, set_field
from ..common import RowIndex
from .common import PerturbedRows, PerturbingBound, PerturbingControl

INFINITE_SIGMA = 9999.0


@dataclass(frozen=True)
class SEG(PerturbingControl, type_name="seg"):
    """Smoothed energy guidance (Hong 2024).

    scale: guidance scale of `cond - perturbed` (0: off). sigma: std of the Gaussian blur of the queries,
    in image tokens (>= 9999 or inf: the mean query). layers / steps / separate as PAG (same default layers).
    Defaults: the authors' SEG-SDXL scale 3.0 and their README's sigma 100 (their code's default, 9999999, is the
    infinite blur: the mean query; pass `sigma=float('inf')` for it).
    """

    #: images, and video: the queries are blurred within each token frame (the blur is spatial, as on images)
    grid_dims: ClassVar[tuple[int, ...]] = (2, 3)

    scale: float = 3.0
    sigma: float = 100.0
    layers: LayerSpec = None
    steps: tuple[float, float] = (0.0, 1.0)
    separate: bool = False

    def compile_refusal(self, adapter: ModelAdapter) -> str | None:
        return None

    def __post_init__(self) -> None:
        self._check_scale()
        if isinstance(self.sigma, str) and self.sigma.strip().lower() in ("inf", "infinity"):  # from to_dict()
            set_field(self, "sigma", math.inf)
        set_field(self, "sigma", number(self.sigma, "SEG.sigma", minimum=0, exclusive_minimum=True, allow_inf=True))
        set_field(self, "layers", validate_layers(self.layers, name="SEG.layers"))
        set_field(self, "steps", validate_steps(self.steps, name="SEG.steps"))

    def bind(self, context) -> _SEGBound:
        return _SEGBound(self, context.layers, context.adapter)

    def layer_effects(self, adapter: ModelAdapter, layer: LayerInfo) -> tuple[str, ...]:
        """"query": the perturbed rows' image queries are blurred over the grid (none while scale is 0)."""
        return ("query",) if self.scale > 0 else ()


class _SEGBound(PerturbingBound):
    def edit(self, layer, frame: DenoiserCall) -> Edit | None:
        hw = frame.geometry(layer).image_hw
        sigma = self.control.sigma
        # a compiled forward gets the grid's kernel as a tensor on the denoiser's device (`BlurQueries.kernel`)
        device = frame.canvas_shape.device if frame.compiled and frame.canvas_shape is not None else None
        return self.rows_edit(
            frame, lambda tagged, batch: (BlurQueries(tagged, batch, sigma, hw, self.index, device),), key=(hw, device)
        )


class BlurQueries(PerturbedRows, LayerHook):
    """Blurs the image-token query projections of the perturbed rows (`PerturbedRows`) over the layer's image
    grid `grid_hw`.

    `device`: the device a compiled forward runs on, which reads the grid's kernel from `kernel`, made here on it: a
    tensor input of the graph whose length is symbolic once it varies (SEG's default sigma clamps the kernel to the
    grid), where Python taps or a lookup in the kernel table would be constants of the graph, one graph per size.
    None (eager): the kernel table, as `blur_grid` looks it up."""

    def __init__(
        self, tagged: tuple[int, ...], batch: int, sigma: float, grid_hw: tuple[int, int], index: RowIndex | None = None,
        device: torch.device | None = None,
    ):
        super().__init__(tagged, batch, index)
        self.sigma = sigma
        self.kernel = None if device is None else grid_kernel(sigma, grid_hw, device)

    def query(self, call: AttentionCall, q_proj: torch.Tensor) -> torch.Tensor:
        rows, _, _ = self.positions(call)
        if not rows:
            return q_proj
        hw, frames = call.geometry.image_hw, call.geometry.frames
        if q_proj.shape[1] != frames * hw[0] * hw[1]:
            raise UnsupportedError(
                f"attnctl: SEG at {call.layer.name} got {q_proj.shape[1]} image queries for its "
                f"{f'{frames}x' if frames > 1 else ''}{hw[0]}x{hw[1]} grid: "
                "another control on this layer changed the image tokens (token reduction merges them), so they cannot be "
                "blurred over the grid; give the controls disjoint layers"
            )
        index = self.tensor(rows, q_proj.device)
        picked = q_proj.index_select(0, index)
        count, tokens, channels = picked.shape
        # video tokens are frame-major: each frame's (h, w) grid is blurred on its own, never across frames
        per_frame = picked.reshape(count * frames, hw[0] * hw[1], channels)
        blurred = blur_tokens(per_frame, hw, self.sigma, self.kernel).reshape(count, tokens, channels)
        return q_proj.index_copy(0, index, blurred.to(q_proj.dtype))


def kernel_size(sigma: float, grid_hw: tuple[int, int]) -> int:
    """`ceil(6 sigma) + 1` made odd, clamped as SEG's code does to `L - (L % 2 - 1)` of the grid's longer side L
    (17 for 16, 15 for 15)."""
    size = math.ceil(6 * sigma) + 1 - math.ceil(6 * sigma) % 2
    longest = max(grid_hw)
    return min(size, longest - (longest % 2 - 1))


def gaussian_kernel1d(size: int, sigma: float, device=None) -> torch.Tensor:
    """The float32 kernel on `device`, built in float64 on the CPU once per (size, sigma, device): it is the
    same at every step and layer of every call (read-only: callers only view it)."""
    key = (size, float(sigma), str(torch.device(device)) if device is not None else "cpu")
    found = _KERNELS.get(key)
    if found is None:
        with kept_tensors():
            half = (size - 1) / 2
            x = torch.linspace(-half, half, steps=size, dtype=torch.float64)
            pdf = torch.exp(-0.5 * (x / sigma) ** 2)
            found = (pdf / pdf.sum()).to(device=device, dtype=torch.float32)
        if len(_KERNELS) >= 64:
            _KERNELS.clear()
        _KERNELS[key] = found
    return found


_KERNELS: dict[tuple[int, float, str], torch.Tensor] = {}


def grid_kernel(sigma: float, grid_hw: tuple[int, int], device=None) -> torch.Tensor | None:
    """The blur's float32 kernel over a `grid_hw` grid on `device` (None: no kernel, the mean or no blur)."""
    if sigma >= INFINITE_SIGMA:
        return None
    size = kernel_size(sigma, grid_hw)
    return gaussian_kernel1d(size, sigma, device) if size > 1 else None


def blur_grid(images: torch.Tensor, sigma: float, kernel: torch.Tensor | None = None) -> torch.Tensor:
    """Gaussian blur of (B, C, H, W) per channel as SEG specifies (see the module docstring), in float32.

    `kernel` (`grid_kernel` of this grid, moved to the images' device): the kernel used while torch.compile traces, a
    graph input whose length can be symbolic, instead of a size computed from the grid and a lookup in the
    process-wide kernel table, which dynamo would make constants (one graph per kernel size)."""
    height, width = images.shape[-2:]
    x = images.float()
    if sigma >= INFINITE_SIGMA:
        return x.mean(dim=(-2, -1), keepdim=True).expand_as(x)
    if kernel is not None and torch.compiler.is_compiling():
        # made on the device the denoiser runs on (`DenoiserCall.device`); should a layer run elsewhere the graph still
        # holds, and `.to` of a tensor already there is no op
        kernel, size = kernel.to(x.device), kernel.shape[0]
    else:
        size = kernel_size(sigma, (height, width))
        if size <= 1:
            return x
        kernel = gaussian_kernel1d(size, sigma, x.device)
    pad = size // 2
    x = F.pad(x, (pad, pad, 0, 0), mode="reflect" if pad < width else "replicate")
    x = F.pad(x, (0, 0, pad, pad), mode="reflect" if pad < height else "replicate")
    channels = x.shape[1]
    x = F.conv2d(x, kernel.view(1, 1, 1, size).expand(channels, 1, 1, size), groups=channels)
    return F.conv2d(x, kernel.view(1, 1, size, 1).expand(channels, 1, size, 1), groups=channels)


def blur_tokens(tokens: torch.Tensor, grid_hw: tuple[int, int], sigma: float, kernel: torch.Tensor | None = None) -> torch.Tensor:
    """(B, H*W, C) row-major image tokens -> blurred, same layout, float32 (`kernel`: as `blur_grid`)."""
    batch, n, channels = tokens.shape
    height, width = grid_hw
    images = tokens.transpose(1, 2).reshape(batch, channels, height, width)
    return blur_grid(images, sigma, kernel).reshape(batch, channels, n).transpose(1, 2)
