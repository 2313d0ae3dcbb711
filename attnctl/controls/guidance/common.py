"""What the guidance controls share: the base class of the perturbing controls (PAG, SEG, skip-layer),
default layers per family and the guidance term. What a spec means on a block of queries and keys (PAG's
identity, SAG's received attention) is `attnctl.kernels.semantics`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ...control import Bound, Control
from ...denoiser_call import DenoiserCall, Perturbation, RowPlan
from ...errors import ConfigError, UnsupportedError
from ...families.base import LayerInfo, ModelAdapter
from ...processors.edit import AttentionCall, Edit, LayerHook
from ...validation import number, set_field
from ..common import RowIndex, select_kinds

PERTURBABLE_KINDS: tuple[str, ...] = ("self", "joint")
_TAGS = itertools.count()


def new_tag(name: str) -> str:
    """A row tag unique within the process (two guidance controls of one type may be applied together)."""
    return f"{name}#{next(_TAGS)}"


def timestep_1000(frame: DenoiserCall, adapter: ModelAdapter) -> torch.Tensor:
    """The denoiser call's timestep on diffusers' 0..1000 scale, as a 0-d float tensor (`ModelAdapter.timestep_1000`)."""
    value = adapter.timestep_1000(frame.inputs or {})
    if value is None:
        raise UnsupportedError(f"attnctl: this {adapter.family} denoiser call has no timestep input; the adaptive scale needs it")
    return value


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
    """A bound perturbing control: one tag, rows only while scale > 0, the step is inside the window and (on a
    pipeline with several denoiser experts) the expert running the call holds one of its layers."""

    layers_only = True

    def __init__(self, control: Any, layers: tuple[LayerInfo, ...], adapter: ModelAdapter):
        super().__init__(control, layers, control.steps)
        self.adapter = adapter
        #: the experts whose calls get perturbed rows (None: one denoiser); the other expert's calls would run the rows
        #: unperturbed, at full cost, for a term of cond - cond
        self.experts = adapter.layer_experts(layer.name for layer in layers)
        self.tag = new_tag(control.type_name)
        self.index = RowIndex()  # the tagged rows' positions as index tensors, per device
        self._edits: dict[tuple[Any, ...], Edit] = {}

    def term(self, cond: torch.Tensor, perturbed: torch.Tensor, frame: DenoiserCall) -> torch.Tensor:
        return self.control.scale * (cond - perturbed)

    def row_plan(self, frame: DenoiserCall) -> RowPlan | None:
        if self.control.scale == 0 or (self.experts is not None and frame.expert not in self.experts):
            return None
        return RowPlan((Perturbation(self.tag, self.term, separate=self.control.separate),))

    def rows(self, frame: DenoiserCall) -> tuple[int, ...]:
        return frame.rows.indices("cond", self.tag)

    def rows_edit(
        self, frame: DenoiserCall, hooks: Callable[[tuple[int, ...], int], tuple[LayerHook, ...]], key: tuple[Any, ...] = (),
    ) -> Edit | None:
        """The edit for `frame`: None without this control's rows, else `Edit(hooks=hooks(tagged, batch))`, made once
        per (row positions, batch, key). The hooks get the perturbed rows' positions in the frame's batch as
        constants (`PerturbedRows`): they never read the row tags, new at every pipeline call, inside the
        processor, where a compiled processor would guard on them and recompile at every call."""
        tagged = self.rows(frame)
        if not tagged:
            return None
        found_key = (tagged, len(frame.rows)) + key
        found = self._edits.get(found_key)
        if found is None:
            found = self._edits[found_key] = Edit(hooks=hooks(tagged, len(frame.rows)))
        return found

    def finish(self) -> None:
        self.index.clear()


class PerturbedRows:
    """Base of the perturbing controls' hooks: the positions of the perturbed rows in the layer call's batch, as
    constants.

    `tagged`: the perturbed rows' positions in the frame's batch of `batch` rows (`PerturbingBound.rows_edit`).
    Inside a hook that runs the rest of the chain on some rows only (`restricted_rows`), the positions are mapped
    through `call.row_source`."""

    def __init__(self, tagged: tuple[int, ...], batch: int, index: RowIndex | None = None):
        self.tagged = tuple(tagged)
        self.batch = batch
        chosen = set(self.tagged)
        self.rest = tuple(i for i in range(batch) if i not in chosen)
        self.index = index if index is not None else RowIndex()

    def positions(self, call: AttentionCall) -> tuple[tuple[int, ...], tuple[int, ...], int]:
        """(tagged, rest, batch) in the rows this call's tensors hold."""
        source = call.row_source
        if source is None:
            return self.tagged, self.rest, self.batch
        chosen = set(self.tagged)
        tagged = tuple(j for j, origin in enumerate(source) if origin in chosen)
        rest = tuple(j for j, origin in enumerate(source) if origin not in chosen)
        return tagged, rest, len(source)

    def tensor(self, positions: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """An index tensor of `positions`: cached per device when eager; a constant of the graph when compiled
        (no lookup in a Python dict for dynamo to guard on)."""
        if torch.compiler.is_compiling():
            return torch.tensor(positions, dtype=torch.long, device=device)
        return self.index(positions, device)
