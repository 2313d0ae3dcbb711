"""Perturbed-Attention Guidance (Ahn et al. 2024, "Self-Rectifying Diffusion Sampling with Perturbed-Attention
Guidance", arXiv:2403.17377).

The perturbed rows (copies of the cond rows) replace the self-attention map of the selected layers by the
identity, `out = V`. In joint attention (SD3, Flux) the image x image block is masked to its diagonal, as
diffusers' `PAGCFGJointAttnProcessor2_0` does: an image query attends to itself and to every text key,
text queries see everything. That is computed here in O(N (1 + T)) per head (a token's own logit beside its
T text logits), never with an N x N mask. qk-norm and RoPE are applied by the family processor before
this point, as in the stock processor (diffusers' PAG processors skip qk-norm).

Only what is needed is computed: the perturbed rows never go through full attention. In self-attention they
are `V` (times a value scale); in joint attention their image queries take the O(N (1 + T)) path and their
text queries one attention op over all keys; the other rows go through the rest of the layer's hook chain
(other controls' hooks see only those rows).

The guidance term `scale (cond - perturbed)` is added to every combined row; with `adaptive_scale > 0`
the scale is diffusers' `max(scale - adaptive_scale (1000 - t), 0)`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from ...denoiser_call import DenoiserCall
from ...errors import ConfigError, UnsupportedError
from ...families.base import LayerInfo, ModelAdapter
from ...kernels.semantics import (
    block_bias,
    entmax,
    log_sum_exp,
    pair_bias,
    query_rows,
    softmax,
    spec_queries,
    spec_rows,
)
from ...kernels.spec import AttentionSpec, per_key
from ...processors.chain import TokenLayout, backend_op, has_span, restricted_rows, token_layout
from ...processors.edit import AttentionCall, Edit, LayerHook
from ...selection import LayerSpec, validate_layers
from ...steps import validate_steps
from ...validation import number, set_field
from .common import PerturbedRows, PerturbingBound, PerturbingControl, timestep_1000


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

    def compile_refusal(self, adapter: ModelAdapter) -> str | None:
        return None

    def __post_init__(self) -> None:
        self._check_scale()
        set_field(self, "adaptive_scale", number(self.adaptive_scale, "PAG.adaptive_scale", minimum=0))
        set_field(self, "layers", validate_layers(self.layers, name="PAG.layers"))
        set_field(self, "steps", validate_steps(self.steps, name="PAG.steps"))

    def bind(self, context) -> _PAGBound:
        return _PAGBound(self, context.layers, context.adapter)

    def layer_effects(self, adapter: ModelAdapter, layer: LayerInfo) -> tuple[str, ...]:
        """"perturb": the perturbed rows' attention is replaced (none while scale is 0); on a joint layer also
        "joint_perturb" (their image block is masked to its diagonal over the layer's own image tokens)."""
        if self.scale <= 0:
            return ()
        return ("perturb", "joint_perturb") if layer.text in ("first", "last") else ("perturb",)


class _PAGBound(PerturbingBound):
    def __init__(self, control: PAG, layers, adapter: ModelAdapter):
        super().__init__(control, layers, adapter)
        self._edits: dict[tuple[tuple[int, ...], int], Edit] = {}

    def term(self, cond: torch.Tensor, perturbed: torch.Tensor, frame: DenoiserCall) -> torch.Tensor:
        control = self.control
        if control.adaptive_scale == 0:
            return control.scale * (cond - perturbed)
        t = timestep_1000(frame, self.adapter).to(cond.device)
        scale = (control.scale - control.adaptive_scale * (1000.0 - t)).clamp(min=0.0)
        return scale.to(cond.dtype) * (cond - perturbed)

    def edit(self, layer, frame: DenoiserCall) -> Edit | None:
        return self.rows_edit(frame, lambda tagged, batch: (IdentityAttention(tagged, batch, self.index),))


class IdentityAttention(PerturbedRows, LayerHook):
    """The perturbed rows (`PerturbedRows`) get identity attention (self-attention) or the diagonal-masked image
    block (joint). It sits inside the other controls' hooks (`inside_others`): they see every row, and the
    identity replaces the op for the perturbed rows only."""

    inside_others: ClassVar[bool] = True

    def attend(self, call: AttentionCall, q, k, v, spec: AttentionSpec, compute):
        tagged, rest, batch = self.positions(call)
        if not tagged:
            return compute(q, k, v, spec)
        joint = call.layer.text in ("first", "last")
        if not joint and (call.layer.text != "none" or q.shape[2] != k.shape[2]):
            raise ConfigError(f"PAG: layer {call.layer.name} is not self-attention; PAG perturbs self- and joint attention")
        layout = token_layout(call)
        if joint and (q.shape[2] != layout.nq or k.shape[2] != layout.nk):
            raise UnsupportedError(
                f"attnctl: PAG at {call.layer.name} expected {layout.nq} joint tokens, got {q.shape[2]}: another control "
                "on this layer changed the token sequence (token reduction merges image tokens); give them disjoint layers"
            )
        index = self.tensor(tagged, q.device)
        sub = spec_rows(spec, index, batch)
        qt, kt, vt = (_take_rows(t, tagged, index) for t in (q, k, v))
        if joint:
            own, own_lse = _joint_rows(call, layout, qt, kt, vt, sub)
        else:
            own, own_lse = self_identity(qt, kt, vt, sub)
        if len(tagged) == batch:  # a separate forward of perturbed rows only
            return own.to(q.dtype), own_lse if spec.return_lse else None
        kept = self.tensor(rest, q.device)
        with restricted_rows(call, rest):
            out, lse = compute(*(_take_rows(t, rest, kept) for t in (q, k, v)), spec_rows(spec, kept, batch))
        full = _join_rows(out, own.to(out.dtype), rest, tagged, kept, index)
        if lse is None or own_lse is None:
            return full, None
        return full, _join_rows(lse, own_lse.to(lse.dtype), rest, tagged, kept, index)


def _consecutive(positions: tuple[int, ...]) -> bool:
    return positions == tuple(range(positions[0], positions[0] + len(positions)))


def _take_rows(t: torch.Tensor, positions: tuple[int, ...], index: torch.Tensor) -> torch.Tensor:
    """The batch rows `positions` of `t` (`index` holds them on the device): a view where they are consecutive (the
    perturbed copies follow the pipeline's rows), else gathered."""
    return t.narrow(0, positions[0], len(positions)) if _consecutive(positions) else t.index_select(0, index)


def _join_rows(
    kept_out: torch.Tensor, own: torch.Tensor, rest: tuple[int, ...], tagged: tuple[int, ...], kept: torch.Tensor,
    index: torch.Tensor,
) -> torch.Tensor:
    """The rows `rest` (`kept_out`) and `tagged` (`own`), which together are every row, as one batch: concatenated
    where each is a consecutive run, else scattered to their positions."""
    if _consecutive(rest) and _consecutive(tagged):
        return torch.cat((kept_out, own) if rest[0] == 0 else (own, kept_out), dim=0)
    full = kept_out.new_empty((len(rest) + len(tagged),) + tuple(kept_out.shape[1:]))
    full.index_copy_(0, kept, kept_out)
    full.index_copy_(0, index, own)
    return full


def _joint_rows(call: AttentionCall, layout: TokenLayout, q, k, v, spec: AttentionSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The perturbed rows of a joint layer: image queries by `joint_identity`, text queries (if any) by the layer's
    attention op over every key (a window never restricts text queries, so it is left out there)."""
    image_out, image_lse = joint_identity(q, k, v, spec, layout.image_q, layout.image_k, layout.text_k)
    if not has_span(layout.text_q):
        return image_out.to(q.dtype), image_lse
    text = layout.text_q
    text_spec = spec_queries(dataclasses.replace(spec, window=None), text.start, text.stop)
    text_out, text_lse = backend_op(call, q[:, :, text], k, v, text_spec)
    first_text = text.start < layout.image_q.start
    parts = (text_out, image_out) if first_text else (image_out, text_out)
    out = torch.cat([p.to(q.dtype) for p in parts], dim=2)
    if text_lse is None:
        return out, None
    lse_parts = (text_lse, image_lse) if first_text else (image_lse, text_lse)
    return out, torch.cat([p.float() for p in lse_parts], dim=2)


def self_identity(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Identity attention: each query attends only to its own key, so `out = V` (times a value scale on the
    rows it applies to). Also returns the log-sum-exp (the own logit). Layout (B, H, N, D)."""
    n = q.shape[2]
    positions = slice(0, n)
    scale = spec.scale if spec.scale is not None else q.shape[-1] ** -0.5
    logit = (q.float() * k.float()).sum(-1, keepdim=True) * scale
    bias = pair_bias(spec, positions, positions, q.device)
    if bias is not None:
        logit = logit + bias
    out = v.float()
    if spec.value_scale is not None:
        weights = per_key(spec.value_scale, "value_scale").float()[..., :n, None]  # (B, H|1, N, 1)
        rows = query_rows(spec, positions, q.device)
        scaled = out * weights
        out = scaled if rows is None else out * (1 - rows[:, None]) + scaled * rows[:, None]
    return out, logit[..., 0]


def joint_identity(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec, image: slice,
    image_keys: slice | None = None, text_keys: slice | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PAG in joint attention for the image queries `image` (a contiguous span of the queries).

    Image query i attends to its own key (position i of `image_keys`, default the same span as the queries) and
    to every text key (`text_keys`, default the keys outside `image`): softmax over 1 + T logits, no N x N
    tensor. The logits are `kernels.semantics`' (model mask, per-key bias on the rows of `query_range`, label
    masks; a window never cuts a token from its own key nor from the text); value scale and PLADIS's sparse
    transform of the same logits act on the rows of `query_range`. Returns (out (B, H, N, D), lse (B, H, N)),
    computed in float32.
    """
    total = k.shape[2]
    image_keys = image_keys if has_span(image_keys) else image
    if not has_span(text_keys):
        if image_keys.start == 0:
            text_keys = slice(image_keys.stop, total)
        elif image_keys.stop == total:
            text_keys = slice(0, image_keys.start)
        else:
            raise ConfigError(f"PAG: image keys {image_keys.start}..{image_keys.stop} of {total} are neither first nor last")
    scale = spec.scale if spec.scale is not None else q.shape[-1] ** -0.5
    qi = q[:, :, image].float()
    ki, vi = k[:, :, image_keys].float(), v[:, :, image_keys].float()
    kt, vt = k[:, :, text_keys].float(), v[:, :, text_keys].float()
    own = (qi * ki).sum(-1, keepdim=True) * scale  # (B, H, N, 1)
    cross = qi @ kt.transpose(-1, -2) * scale  # (B, H, N, T)
    own_bias, cross_bias = pair_bias(spec, image, image_keys, q.device), block_bias(spec, image, text_keys, q.device)
    if own_bias is not None:
        own = own + own_bias
    if cross_bias is not None:
        cross = cross + cross_bias
    logits = torch.cat([own, cross], dim=-1)
    probs = softmax(logits)
    rows = query_rows(spec, image, q.device)
    rows = None if rows is None else rows[:, None]  # (N, 1)

    scaled_values = (vi, vt)
    if spec.value_scale is not None:
        weights = per_key(spec.value_scale, "value_scale").float()
        scaled_values = (vi * weights[..., image_keys, None], vt * weights[..., text_keys, None])

    def combine(p: torch.Tensor, scaled: bool) -> torch.Tensor:  # no slice in its closure: dynamo would make it constant
        self_v, text_v = scaled_values if scaled else (vi, vt)
        return p[..., :1] * self_v + p[..., 1:] @ text_v

    def on_rows(edited: torch.Tensor, plain: torch.Tensor) -> torch.Tensor:
        return edited if rows is None else plain * (1 - rows) + edited * rows

    out = combine(probs, False)
    if spec.value_scale is not None:
        out = on_rows(combine(probs, True), out)
    if spec.sparse is not None:
        sparse = entmax(logits, spec.sparse.alpha)  # zeros on fully masked rows
        out = on_rows(out + spec.sparse.scale * (combine(sparse, True) - out), out)
    return out, log_sum_exp(logits)
