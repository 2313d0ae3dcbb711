"""What the guidance controls share: the base class of the perturbing controls (PAG, SEG, skip-layer),
default layers per family, the guidance term, and eager helpers that evaluate an `AttentionSpec`'s
additive terms on a few (query, key) pairs without ever building an N x N tensor.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch

from ...control import Bound, Control, Frame
from ...errors import ConfigError, SelectionError, UnsupportedError
from ...families.base import LayerInfo, ModelAdapter
from ...kernels.spec import AttentionSpec, LabelMask
from ...pipelines.rows import Perturbation, RowPlan
from ...selection import describe_layers
from ...validation import number, set_field

PERTURBABLE_KINDS: tuple[str, ...] = ("self", "joint")
_TAGS = itertools.count()


def middle_double_block(adapter: ModelAdapter) -> int:
    blocks = sorted({layer.block for layer in adapter.layers if layer.group == "double" and layer.block is not None})
    if not blocks:
        raise SelectionError("attnctl: this Flux transformer has no double-stream block; give layers=... explicitly")
    return blocks[len(blocks) // 2]


def default_perturbed_layers(adapter: ModelAdapter, owner: str) -> str:
    """DESIGN §3 PAG / SEG defaults: SD / SDXL every self-attention of the mid block; SD3 and PixArt
    `transformer_blocks.1` (exactly block 1, never 10-19); Flux the middle double block."""
    family = adapter.family
    if family == "unet":
        return "self & mid"
    if family == "pixart":
        return "transformer_blocks.1 & self"
    if family == "sd3":
        return "transformer_blocks.1"
    if family == "flux":
        return f"transformer_blocks.{middle_double_block(adapter)}"
    raise UnsupportedError(f"attnctl: {owner} has no default layers for model family {family!r}; give layers=... explicitly")


def keep_kinds(layers: tuple[LayerInfo, ...], kinds: tuple[str, ...], owner: str, what: str, selection: Any) -> tuple[LayerInfo, ...]:
    """The layers of `kinds` among `layers`; raises SelectionError when none is left."""
    kept = tuple(layer for layer in layers if layer.kind in kinds)
    if not kept:
        raise SelectionError(
            f"{owner}: the layer selection {selection!r} holds no {what} layer ({owner} acts on {', '.join(kinds)} "
            f"attention); it selected {describe_layers(layers)}"
        )
    return kept


def new_tag(name: str) -> str:
    """A row tag unique within the process (two guidance controls of one type may be applied together)."""
    return f"{name}#{next(_TAGS)}"


def timestep_1000(frame: Frame, family: str) -> torch.Tensor:
    """The denoiser call's timestep on diffusers' 0..1000 scale, as a 0-d float tensor (Flux passes t / 1000)."""
    inputs = frame.inputs or {}
    value = inputs.get("timestep")
    if value is None:
        raise UnsupportedError("attnctl: the denoiser call has no `timestep` input; the adaptive scale needs it")
    t = torch.as_tensor(value).flatten()[0].float()
    return t * 1000.0 if family == "flux" else t


@dataclass(frozen=True)
class PerturbingControl(Control):
    """Base class of the controls that add perturbed copies of the cond rows (PAG, SEG, skip-layer).

    Their guidance term is `scale (cond - perturbed)` added to every combined row (DESIGN §2), so the
    pipeline's CFG yields `uncond + s (cond - uncond) + scale (cond - perturbed)`.
    """

    kinds: ClassVar[tuple[str, ...]] = PERTURBABLE_KINDS

    def _check_scale(self) -> None:
        set_field(self, "scale", number(self.scale, f"{type(self).__name__}.scale", minimum=0))
        if not isinstance(self.separate, bool):
            raise ConfigError(f"{type(self).__name__}.separate must be True or False, got {self.separate!r}")

    def default_layers(self, adapter: ModelAdapter) -> str:
        return default_perturbed_layers(adapter, type(self).__name__)

    def select(self, adapter: ModelAdapter) -> tuple[LayerInfo, ...]:
        layers = super().select(adapter)
        selection = getattr(self, "layers", None) or self.default_layers(adapter)
        return keep_kinds(layers, self.kinds, type(self).__name__, "self- or joint attention", selection)


class PerturbingBound(Bound):
    """A bound perturbing control: one tag, rows only while scale > 0 and the step is inside the window."""

    def __init__(self, control: Any, layers: tuple[LayerInfo, ...], family: str):
        super().__init__(control, layers, control.steps)
        self.family = family
        self.tag = new_tag(control.type_name)

    def term(self, cond: torch.Tensor, perturbed: torch.Tensor, frame: Frame) -> torch.Tensor:
        return self.control.scale * (cond - perturbed)

    def row_plan(self, frame: Frame) -> RowPlan | None:
        if self.control.scale == 0:
            return None
        return RowPlan((Perturbation(self.tag, self.term, separate=self.control.separate),))

    def rows(self, frame: Frame) -> tuple[int, ...]:
        return frame.rows.indices("cond", self.tag)


# -- a spec's additive terms at chosen (query, key) positions ---------------------------------------------------


def spec_rows(spec: AttentionSpec, index: torch.Tensor, batch: int) -> AttentionSpec:
    """`spec` restricted to the batch rows `index` (batched tensors re-indexed, broadcast ones kept)."""

    def take(tensor: torch.Tensor | None) -> torch.Tensor | None:
        if tensor is None or tensor.ndim == 0 or tensor.shape[0] != batch:
            return tensor
        return tensor.index_select(0, index.to(tensor.device))

    labels = spec.labels
    if labels is not None:
        labels = LabelMask(take(labels.q_labels), take(labels.k_labels), take(labels.table))
    return replace(
        spec, attn_mask=take(spec.attn_mask), key_bias=take(spec.key_bias), value_scale=take(spec.value_scale), labels=labels
    )


def query_rows(spec: AttentionSpec, queries: torch.Tensor) -> torch.Tensor:
    """(n,) float: 1 where the per-key edits (key bias, value scale, sparse) apply to these query positions."""
    if spec.query_range is None:
        return torch.ones(queries.shape[0], device=queries.device)
    start, stop = spec.query_range
    return ((queries >= start) & (queries < stop)).float()


def _per_key(tensor: torch.Tensor) -> torch.Tensor:
    """(B, Nk) or (B, H, Nk) -> (B, H|1, Nk)."""
    return tensor[:, None] if tensor.ndim == 2 else tensor


def _float_mask(mask: torch.Tensor) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask.float()


def bias_block(spec: AttentionSpec, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor | None:
    """The additive logits of `spec` for every (query in `queries`, key in `keys`): (B|1, H|1, nq, nk), or None.

    Covers the model's mask, per-key bias (on the rows of `query_range`) and label masks. Windows never
    restrict text keys nor a token's own key, the only keys this is used for; they add nothing here.
    """
    total = None

    def add(term: torch.Tensor) -> None:
        nonlocal total
        total = term if total is None else total + term

    if spec.attn_mask is not None:
        mask = _float_mask(spec.attn_mask)
        mask = mask if mask.shape[-2] == 1 else mask.index_select(-2, queries.to(mask.device))
        add(mask.index_select(-1, keys.to(mask.device)))
    if spec.key_bias is not None:
        rows = query_rows(spec, queries)
        add(_per_key(spec.key_bias).float().index_select(-1, keys)[:, :, None, :] * rows[:, None])
    if spec.labels is not None:
        add(_label_bias(spec.labels, queries, keys[None, :].expand(queries.shape[0], -1)))
    return total


def bias_pairs(spec: AttentionSpec, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor | None:
    """The additive logits of `spec` for the pairs (queries[n], keys[n]): (B|1, H|1, n, 1), or None."""
    total = None

    def add(term: torch.Tensor) -> None:
        nonlocal total
        total = term if total is None else total + term

    if spec.attn_mask is not None:
        mask = _float_mask(spec.attn_mask)
        rows = queries if mask.shape[-2] != 1 else torch.zeros_like(queries)
        add(mask[..., rows, keys][..., None])
    if spec.key_bias is not None:
        add((_per_key(spec.key_bias).float()[..., keys] * query_rows(spec, queries))[..., None])
    if spec.labels is not None:
        add(_label_bias(spec.labels, queries, keys[:, None]))
    return total


def _label_bias(labels: LabelMask, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Label-table bias for query positions `queries` (n,) and key positions `keys` (n, m): (B, 1, n, m)."""
    batch = labels.q_labels.shape[0]
    table = labels.table.float().expand(batch, -1, -1)
    q_labels = labels.q_labels[:, queries]  # (B, n)
    k_labels = labels.k_labels[:, keys]  # (B, n, m)
    rows = torch.gather(table, 1, q_labels[:, :, None].expand(-1, -1, table.shape[-1]))  # (B, n, Lk)
    return torch.gather(rows, 2, k_labels)[:, None]
