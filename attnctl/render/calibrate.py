"""Calibrating a DiTFastAttn plan: one pipeline call with `FastAttn` in calibration mode (docs/methods.md "DiTFastAttn")."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Sequence
from typing import Any

from ..controls.fastattn import FastAttn, FastAttnPlan
from ..errors import ConfigError
from ..handle import apply


def calibrate(control: FastAttn, pipe: Any, prompts: str | Sequence[str], *, backend: str = "auto", **call_kwargs: Any) -> FastAttnPlan:
    """Run `pipe` once on `prompts` (one batch) with `control` calibrating, and return the plan it makes.

    `call_kwargs` go to the pipeline call (num_inference_steps, height, width, guidance_scale, generator, ...);
    the plan is made for exactly that number of steps and resolution. The pipeline must not have a live handle.
    """
    if not isinstance(control, FastAttn):
        raise ConfigError(f"attnctl.calibrate takes a FastAttn control, got {control!r} ({type(control).__name__})")
    prompt = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompt or not all(isinstance(p, str) and p for p in prompt):
        raise ConfigError(f"attnctl.calibrate: prompts must be a prompt or a non-empty list of prompts, got {prompts!r}")
    parameters = inspect.signature(type(pipe).__call__).parameters
    named = {name for name, p in parameters.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    unknown = sorted(set(call_kwargs) - named)
    if unknown:  # diffusers swallows unknown arguments into **kwargs: a misspelt step count made a 50-step plan
        raise ConfigError(
            f"attnctl.calibrate: {type(pipe).__name__}.__call__ takes no argument(s) {', '.join(map(repr, unknown))}; "
            f"it takes: {', '.join(sorted(named - {'self'}))}"
        )
    if "prompt" in call_kwargs:
        raise ConfigError("attnctl.calibrate: the prompts are its `prompts` argument; do not pass `prompt` too")
    windowed = "window_residual" in control.techniques
    control = dataclasses.replace(control, plan=None, window=control.window_size if windowed else None)
    call_kwargs.setdefault("output_type", "latent")
    with apply(pipe, [control], backend=backend) as handle:
        pipe(prompt=prompt, **call_kwargs)  # Flux.2 klein takes `image` first
        report = handle.outputs.get(control.key)
    if report is None or report.plan is None:
        ran = len({step for step, _ in report.entries}) if report is not None else 0
        steps = f"{ran} of its {report.steps}" if report is not None else "no"
        raise ConfigError(
            f"attnctl.calibrate: the pipeline call ran {steps} denoising steps (a callback set pipe._interrupt?), so "
            "no plan was made: a plan needs every step calibrated; calibrate without stopping the call"
        )
    return report.plan
