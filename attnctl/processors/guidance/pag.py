"""Perturbed-Attention Guidance (Ahn et al. 2024, "Self-Rectifying Diffusion Sampling with Perturbed-Attention
Guidance", arXiv:2403.17377).

The perturbed rows (copies of the cond rows) replace the self-attention map of the selected layers by the
identity, `out = V`. In joint attention (SD3, Flux) the image x image block is masked to its diagonal, as
diffusers' `PAGCFGJointAttnProcessor2_0` does: an image query attends to itself and to every text key,
text queries see everything. That is computed here in O(N (1 + T)) per head (a token's own logit beside its
T text logits), never with an N x N mask. qk-norm and RoPE are applied by the family processor before
this point, as in the stock processor (diffusers' PAG processors skip qk-norm).

The guidance term `scale (cond - perturbed)` is added to every combined row; with `adaptive_scale > 0`
the scale is diffusers' `max(scale - adaptive_scale (1000 - t), 0)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...control import Frame
from ...errors import ConfigError
from ...kernels.reference import entmax
from ...kernels.spec import AttentionSpec
from ...selection import LayerSpec, validate_layers
from ...steps import validate_steps
from ...validation import number, set_field
from ..edit import Edit, LayerCall, LayerHook
from .common import PerturbingBound, PerturbingControl, bias_block, bias_pairs, query_rows, spec_rows, timestep_1000


@dataclass(frozen=True)
class PAG(PerturbingControl, type_name="pag"):
    """Perturbed-attention guidance (Ahn et al. 2024).

    scale: guidance scale of `cond - perturbed` (0: off, no rows are added). layers: self- / joint attention
    layers to perturb (default: every self-attention of the mid block on SD / SDXL, `transformer_blocks.1`
    on SD3 / PixArt, the middle double block on Flux). steps: the step window. adaptive_scale: diffusers'
    `pag_adaptive_scale` (the scale decays as `scale - adaptive_scale (1000 - t)`, clamped at 0).
    separate: run the perturbed rows as their own forward (less memory) instead of batching them.
    """

    scale: float = 3.0
    layers: LayerSpec = None
    steps: tuple[float, float] = (0.0, 1.0)
    adaptive_scale: float = 0.0
    separate: bool = False

    def __post_init__(self) -> None:
        self._check_scale()
        set_field(self, "adaptive_scale", number(self.adaptive_scale, "PAG.adaptive_scale", minimum=0))
        set_field(self, "layers", validate_layers(self.layers, name="PAG.layers"))
        set_field(self, "steps", validate_steps(self.steps, name="PAG.steps"))

    def bind(self, context) -> _PAGBound:
        return _PAGBound(self, context.layers, context.adapter.family)


class _PAGBound(PerturbingBound):
    def __init__(self, control: PAG, layers, family: str):
        super().__init__(control, layers, family)
        self._edit = Edit(hooks=(IdentityAttention(self.tag),))

    def term(self, cond: torch.Tensor, perturbed: torch.Tensor, frame: Frame) -> torch.Tensor:
        control = self.control
        if control.adaptive_scale == 0:
            return control.scale * (cond - perturbed)
        t = timestep_1000(frame, self.family).to(cond.device)
        scale = (control.scale - control.adaptive_scale * (1000.0 - t)).clamp(min=0.0)
        return scale.to(cond.dtype) * (cond - perturbed)

    def edit(self, layer, frame: Frame) -> Edit | None:
        return self._edit if self.rows(frame) else None


class IdentityAttention(LayerHook):
    """The rows tagged `tag` get identity attention (self-attention) or the diagonal-masked image block (joint)."""

    def __init__(self, tag: str):
        self.tag = tag

    def attend(self, call: LayerCall, q, k, v, spec: AttentionSpec, compute):
        # Every row goes through the backend (inner hooks see the whole batch); the tagged rows are replaced.
        out, lse = compute(q, k, v, spec)
        rows = call.rows.indices("cond", self.tag)
        if not rows:
            return out, lse
        index = torch.tensor(rows, device=q.device)
        sub = spec_rows(spec, index, q.shape[0])
        q, k, v = (t.index_select(0, index) for t in (q, k, v))
        if call.layer.text in ("first", "last"):
            image = call.geometry.image_slice
            positions = torch.arange(image.start, image.stop, device=q.device)
            image_out, image_lse = joint_identity(q, k, v, sub, positions)
            replaced = out.index_select(0, index)
            replaced[:, :, image] = image_out.to(out.dtype)
            out = out.index_copy(0, index, replaced)
            if lse is not None:
                sub_lse = lse.index_select(0, index)
                sub_lse[:, :, image] = image_lse.to(lse.dtype)
                lse = lse.index_copy(0, index, sub_lse)
            return out, lse
        if call.layer.text != "none" or q.shape[2] != k.shape[2]:
            raise ConfigError(f"PAG: layer {call.layer.name} is not self-attention; PAG perturbs self- and joint attention")
        own, own_lse = self_identity(q, k, v, sub)
        out = out.index_copy(0, index, own.to(out.dtype))
        if lse is not None:
            lse = lse.index_copy(0, index, own_lse.to(lse.dtype))
        return out, lse


def self_identity(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Identity attention: each query attends only to its own key, so `out = V` (times a value scale on the
    rows it applies to). Also returns the log-sum-exp (the own logit). Layout (B, H, N, D)."""
    n = q.shape[2]
    positions = torch.arange(n, device=q.device)
    scale = spec.scale if spec.scale is not None else q.shape[-1] ** -0.5
    logit = (q.float() * k.float()).sum(-1, keepdim=True) * scale
    bias = bias_pairs(spec, positions, positions)
    if bias is not None:
        logit = logit + bias
    out = v.float()
    if spec.value_scale is not None:
        weights = _value_scale(spec.value_scale)[..., positions, None]  # (B, H|1, N, 1)
        rows = query_rows(spec, positions)[:, None]
        out = out * (1 - rows) + out * weights * rows
    return out, logit[..., 0]


def joint_identity(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec, image: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """PAG in joint attention for the image queries at positions `image` (the rest are text tokens).

    Image query i attends to its own key i and to every text key: softmax over 1 + T logits, no N x N
    tensor. Honours the model's mask, per-key bias and value scale (on the rows of `query_range`), label
    masks and PLADIS's sparse transform of the same logits. Returns (out (B, H, N, D), lse (B, H, N)),
    computed in float32.
    """
    total = q.shape[2]
    keep = torch.ones(total, dtype=torch.bool, device=q.device)
    keep[image] = False
    text = torch.nonzero(keep).flatten()
    scale = spec.scale if spec.scale is not None else q.shape[-1] ** -0.5
    qi, ki, vi = (t.index_select(2, image).float() for t in (q, k, v))
    kt, vt = k.index_select(2, text).float(), v.index_select(2, text).float()
    own = (qi * ki).sum(-1, keepdim=True) * scale  # (B, H, N, 1)
    cross = qi @ kt.transpose(-1, -2) * scale  # (B, H, N, T)
    own_bias, cross_bias = bias_pairs(spec, image, image), bias_block(spec, image, text)
    if own_bias is not None:
        own = own + own_bias
    if cross_bias is not None:
        cross = cross + cross_bias
    logits = torch.cat([own, cross], dim=-1)
    dead = torch.isneginf(logits).all(-1, keepdim=True)
    probs = torch.softmax(logits, dim=-1).masked_fill(dead, 0.0)
    rows = query_rows(spec, image)[:, None]  # (N, 1)

    def combine(p: torch.Tensor, scaled: bool) -> torch.Tensor:
        self_v, text_v = vi, vt
        if scaled and spec.value_scale is not None:
            weights = _value_scale(spec.value_scale)
            self_v = vi * weights[..., image, None]
            text_v = vt * weights[..., text, None]
        return p[..., :1] * self_v + p[..., 1:] @ text_v

    out = combine(probs, False)
    if spec.value_scale is not None:
        out = out * (1 - rows) + combine(probs, True) * rows
    if spec.sparse is not None:
        sparse = entmax(logits, spec.sparse.alpha).masked_fill(dead, 0.0)
        out = out + rows * spec.sparse.scale * (combine(sparse, True) - out)
    return out, torch.logsumexp(logits, dim=-1)


def _value_scale(value_scale: torch.Tensor) -> torch.Tensor:
    """(B, Nk) or (B, H, Nk) -> (B, H|1, Nk) float."""
    return (value_scale[:, None] if value_scale.ndim == 2 else value_scale).float()
