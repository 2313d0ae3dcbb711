"""Step windows and the step position of a denoiser call (docs/methods.md: `start <= i/n < stop`)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import torch

from .errors import ConfigError
from .validation import plain_scalar

StepWindow = tuple[float, float]
ALL_STEPS: StepWindow = (0.0, 1.0)


def validate_steps(steps: object, *, name: str = "steps") -> StepWindow:
    """Return `steps` as a `(start, stop)` pair of floats with `0 <= start <= stop <= 1`, or raise."""
    if (isinstance(steps, (str, bytes)) or not hasattr(steps, "__len__") or getattr(steps, "ndim", 1) == 0
            or len(steps) != 2):  # type: ignore[arg-type]
        raise ConfigError(f"{name} must be a pair (start, stop) of fractions of the schedule, got {steps!r}")
    pair = []
    for value in steps:  # type: ignore[union-attr]
        value = plain_scalar(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (-2.0 <= value <= 2.0):
            raise ConfigError(f"{name} must hold two finite numbers in [0, 1], got {steps!r}")
        pair.append(float(value))
    start, stop = pair
    if not (0.0 <= start <= stop <= 1.0):
        raise ConfigError(f"{name} must satisfy 0 <= start <= stop <= 1, got {steps!r}")
    return (start, stop)


@dataclass(frozen=True)
class StepInfo:
    """Where a denoiser call sits in the schedule that is actually run.

    `index` counts steps from 0 (a second-order scheduler's two model calls share one index, as do the four of a
    PNDM Runge-Kutta step; with img2img strength only the steps run are counted), `count` is the number of steps
    run. `first`: the call is at the step's first scheduler position (False at the second call of a Heun / KDPM2 step,
    which the scheduler resumes from the sample it stored at the first); not compared.
    """

    index: int
    count: int
    first: bool = field(default=True, compare=False)

    @property
    def fraction(self) -> float:
        return self.index / self.count if self.count else 0.0

    def inside(self, window: StepWindow) -> bool:
        start, stop = window
        return start <= self.fraction < stop


@dataclass(frozen=True)
class StepGroups:
    """How a scheduler's positions (its `step` calls, one per model call) group into steps: `order` positions per
    step (Heun, KDPM2, DPM-Solver-SDE: 2; the last step has one), after `lead` positions grouped `lead_order` per step
    (PNDM without `skip_prk_steps`: its Runge-Kutta warm-up makes 4 model calls for each of its first 3 steps)."""

    order: int = 1
    lead: int = 0
    lead_order: int = 1

    def step_of(self, position: int) -> int:
        if position < self.lead:
            return position // self.lead_order
        return self.lead // self.lead_order + (position - self.lead) // self.order

    def count(self, positions: int) -> int:
        """The steps that `positions` positions make (a step begun counts)."""
        lead = min(positions, self.lead)
        return -(-lead // self.lead_order) + -(-(positions - lead) // self.order)

    def first_position(self, step: int) -> int:
        lead_steps = self.lead // self.lead_order
        if step < lead_steps:
            return step * self.lead_order
        return self.lead + (step - lead_steps) * self.order


def step_groups(scheduler: Any) -> StepGroups:
    """The grouping of `scheduler`'s positions from its next `step` on (read before a call's first one): by its
    `order`, and for PNDM with `skip_prk_steps=False` (what `PNDMScheduler()` and `from_config` of another
    scheduler's config give) the Runge-Kutta positions it has left (`prk_timesteps`, `counter`) `pndm_order` per step."""
    order = int(getattr(scheduler, "order", 1) or 1)
    config = getattr(scheduler, "config", None)
    get = config.get if hasattr(config, "get") else (lambda key, default=None: default)
    prk = getattr(scheduler, "prk_timesteps", None)
    group = getattr(scheduler, "pndm_order", None)
    if prk is None or get("skip_prk_steps", True) or not isinstance(group, int) or group < 1:
        return StepGroups(order)
    lead = max(len(prk) - int(getattr(scheduler, "counter", 0) or 0), 0)
    return StepGroups(order, lead, group) if lead else StepGroups(order)


def call_frame(pipeline: Any) -> FrameType | None:
    """The innermost running `__call__` of `pipeline` on this thread's stack (the pipeline call in progress), or None."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "__call__" and frame.f_locals.get("self") is pipeline:
            return frame
        frame = frame.f_back
    return None


def loop_timesteps(frame: FrameType) -> torch.Tensor | list[Any] | tuple[Any, ...] | None:
    """The `timesteps` local of a pipeline's running `__call__`, or None where it has none: diffusers' pipelines loop
    `for i, t in enumerate(timesteps)` over it once img2img's `strength` and SDXL's `denoising_end` have cut it, so
    it holds exactly the scheduler positions the call runs (read once per call: it builds the frame's locals)."""
    value = frame.f_locals.get("timesteps")
    if isinstance(value, torch.Tensor) and value.ndim == 1 or isinstance(value, (list, tuple)):
        return value
    return None


def step_timesteps(pipeline: Any, count: int) -> tuple[float, ...] | None:
    """The timestep of each of the `count` steps the running call of `pipeline` runs (a second-order scheduler's first
    position of each step): its loop's `timesteps` (`loop_timesteps`), else the scheduler's from its begin index; None
    where neither is known. Reads them to the host: once per call, at bind."""
    scheduler = getattr(pipeline, "scheduler", None)
    groups = step_groups(scheduler)
    frame = call_frame(pipeline)
    timesteps = loop_timesteps(frame) if frame is not None else None
    begin = 0
    if timesteps is None:
        timesteps = getattr(scheduler, "timesteps", None)
        begin = getattr(scheduler, "_begin_index", None) or 0
    positions = [begin + groups.first_position(step) for step in range(count)]
    if timesteps is None or count < 1 or positions[-1] >= len(timesteps):
        return None
    values = timesteps.tolist() if isinstance(timesteps, torch.Tensor) else list(timesteps)
    try:
        return tuple(float(values[position]) for position in positions)
    except (TypeError, ValueError):  # not numbers: not a schedule attnctl can compare
        return None
