"""What the guidance controls share: the base class of the perturbing controls (PAG, SEG, skip-layer),
default layers per family and the guidance term. What a spec means on a block of queries and keys (PAG's
identity, SAG's received attention) is `attnctl.kernels.semantics`.
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
