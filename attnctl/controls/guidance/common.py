"""What the guidance controls share: the base class of the perturbing controls (PAG, SEG, skip-layer),
default layers per family, the guidance term, and eager helpers that evaluate an `AttentionSpec`'s
additive terms on a few (query, key) pairs without ever building an N x N tensor.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ...control import Bound, Control
from ...denoiser_call import DenoiserCall, Perturbation, RowPlan
from ...errors import ConfigError, UnsupportedError
from ...families.base import LayerInfo, ModelAdapter
from ...kernels.spec import AttentionSpec
from ...validation import number, set_field
from ..common import RowIndex, select_kinds

PERTURBABLE_KINDS: tuple[str, ...] = ("self", "joint")
_TAGS = itertools.count()


def new_tag(name: str) -> str:
    """A row tag unique within the process (two guidance controls of one type may be applied together)."""
    return f"{name}#{next(_TAGS)}"


def timestep_1000(frame: DenoiserCall, adapter: ModelAdapter) -> torch.Tensor:
    """The denoiser call's timestep on diffusers' 0..1000 scale, as a 0-d float tensor."""
    inputs = frame.inputs or {}
    value = inputs.get("timestep")
    if value is None:
        raise UnsupportedError("attnctl: the denoiser call has no `timestep` input; the adaptive scale needs it")
    return torch.as_tensor(value).flatten()[0].float() * adapter.timestep_scale


@dataclass(frozen=True)
class PerturbingControl(Control):
    """Base class of the controls that add perturbed copies of the cond rows (PAG, SEG, skip-layer).

    Their guidance term is `scale (cond - perturbed)` added to every combined row (docs/architecture.md), so the
    pipeline's CFG yields `uncond + s (cond - uncond) + scale (cond - perturbed)`.
    """

    kinds: ClassVar[tuple[str, ...]] = PERTURBABLE_KINDS
    needs: ClassVar[tuple[str, ...]] = ("extra_rows",)

    def _check_scale(self) -> None:
        set_field(self, "scale", number(self.scale, f"{type(self).__name__}.scale", minimum=0))
        if not isinstance(self.separate, bool):
            raise ConfigError(f"{type(self).__name__}.separate must be True or False, got {self.separate!r}")

    def default_layers(self, adapter: ModelAdapter) -> str:
        return adapter.perturbed_layers()

    def select(self, adapter: ModelAdapter) -> tuple[LayerInfo, ...]:
        return select_kinds(self, adapter, self.kinds, "self- or joint attention")


class PerturbingBound(Bound):
    """A bound perturbing control: one tag, rows only while scale > 0 and the step is inside the window."""

    def __init__(self, control: Any, layers: tuple[LayerInfo, ...], adapter: ModelAdapter):
        super().__init__(control, layers, control.steps)
        self.adapter = adapter
        self.tag = new_tag(control.type_name)
        self.index = RowIndex()  # the tagged rows' positions as index tensors, per device

    def term(self, cond: torch.Tensor, perturbed: torch.Tensor, frame: DenoiserCall) -> torch.Tensor:
        return self.control.scale * (cond - perturbed)

    def row_plan(self, frame: DenoiserCall) -> RowPlan | None:
        if self.control.scale == 0:
            return None
        return RowPlan((Perturbation(self.tag, self.term, separate=self.control.separate),))

    def rows(self, frame: DenoiserCall) -> tuple[int, ...]:
        return frame.rows.indices("cond", self.tag)

    def finish(self) -> None:
        self.index.clear()


# -- a spec's additive terms at chosen (query, key) positions ---------------------------------------------------
# Positions are contiguous `slice`s (image tokens, text tokens, a chunk of queries): everything below is views and
# gathers of tensors already on the device, no index tensor is copied from the host.


def query_rows(spec: AttentionSpec, queries: slice, device: torch.device) -> torch.Tensor | None:
    """(n,) float: 1 where the per-key edits (key bias, value scale, sparse) apply to these query positions, 0
    elsewhere; None when they apply to all of them."""
    if spec.query_range is None:
        return None
    lo, hi = max(spec.query_range[0], queries.start), min(spec.query_range[1], queries.stop)
    if lo <= queries.start and hi >= queries.stop:
        return None
    rows = torch.zeros(queries.stop - queries.start, device=device)
    if lo < hi:
        rows[lo - queries.start : hi - queries.start] = 1.0
    return rows


def _per_key(tensor: torch.Tensor) -> torch.Tensor:
    """(B, Nk) or (B, H, Nk) -> (B, H|1, Nk)."""
    return tensor[:, None] if tensor.ndim == 2 else tensor


def _float_mask(mask: torch.Tensor) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask.float()


def _scaled_rows(term: torch.Tensor, rows: torch.Tensor | None, query_dim: int) -> torch.Tensor:
    """`term` times the 0/1 query-row weights along dimension `query_dim` (no-op when they are all 1)."""
    if rows is None:
        return term
    shape = [1] * term.ndim
    shape[query_dim] = -1
    return term * rows.view(shape)


def _sum(terms: list[torch.Tensor]) -> torch.Tensor | None:
    total = None
    for term in terms:
        total = term if total is None else total + term
    return total


def bias_block(spec: AttentionSpec, queries: slice, keys: slice) -> torch.Tensor | None:
    """The additive logits of `spec` for every (query in `queries`, key in `keys`): (B|1, H|1, nq, nk), or None.

    Covers the model's mask, per-key bias (on the rows of `query_range`) and label masks. Windows never
    restrict text keys nor a token's own key, the only keys this is used for; they add nothing here.
    """
    terms = []
    if spec.attn_mask is not None:
        mask = _float_mask(spec.attn_mask)
        mask = mask if mask.shape[-2] == 1 else mask[..., queries, :]
        terms.append(mask[..., keys])
    if spec.key_bias is not None:
        rows = query_rows(spec, queries, spec.key_bias.device)
        terms.append(_scaled_rows(_per_key(spec.key_bias).float()[..., keys][:, :, None, :], rows, 2))
    if spec.labels is not None:
        labels = spec.labels
        q_labels, k_labels = labels.q_labels[:, queries], labels.k_labels[:, keys]  # (B, n), (B, m)
        table = labels.table.float().expand(q_labels.shape[0], -1, -1)
        by_query = torch.gather(table, 1, q_labels[:, :, None].expand(-1, -1, table.shape[-1]))  # (B, n, Lk)
        terms.append(torch.gather(by_query, 2, k_labels[:, None, :].expand(-1, q_labels.shape[1], -1))[:, None])
    return _sum(terms)


def bias_pairs(spec: AttentionSpec, queries: slice, keys: slice) -> torch.Tensor | None:
    """The additive logits of `spec` for the pairs (queries[i], keys[i]) of two equally long spans (a token and
    its own key): (B|1, H|1, n, 1), or None."""
    terms = []
    if spec.attn_mask is not None:
        mask = _float_mask(spec.attn_mask)
        if mask.shape[-2] == 1:
            own = mask[..., 0, keys]
        else:
            own = torch.diagonal(mask[..., queries, keys], dim1=-2, dim2=-1)
        while own.ndim < 3:
            own = own[None]
        terms.append(own[..., None])
    if spec.key_bias is not None:
        rows = query_rows(spec, queries, spec.key_bias.device)
        terms.append(_scaled_rows(_per_key(spec.key_bias).float()[..., keys], rows, 2)[..., None])
    if spec.labels is not None:
        labels = spec.labels
        q_labels, k_labels = labels.q_labels[:, queries], labels.k_labels[:, keys]  # (B, n)
        table = labels.table.float().expand(q_labels.shape[0], -1, -1)
        by_query = torch.gather(table, 1, q_labels[:, :, None].expand(-1, -1, table.shape[-1]))  # (B, n, Lk)
        terms.append(torch.gather(by_query, 2, k_labels[:, :, None])[:, None])  # (B, 1, n, 1)
    return _sum(terms)
