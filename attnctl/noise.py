"""The noise level of the denoiser call in progress, read from the pipeline's scheduler: where the denoiser's input
sits between the clean latent and the noise, and what the model predicts. SAG and ReferenceAttention split and
re-noise latents with it; BoxGuidance sizes its step by it.

Everything is in the space of the denoiser's input: for Euler-type schedulers that input is `x / sqrt(sigma^2 + 1)`
(`scale_model_input`), i.e. variance preserving with `alpha_bar = 1 / (1 + sigma^2)`. Flow matching: the input is
`(1 - sigma) x0 + sigma eps` and the output `eps - x0`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch

from .errors import UnsupportedError


@dataclass(frozen=True)
class NoiseLevel:
    """Where the denoiser's input sits: `vp` (input = sqrt(a) x0 + sqrt(1 - a) eps) or `flow` (input =
    (1 - sigma) x0 + sigma eps, output = eps - x0), and what the model predicts."""

    kind: str  # "vp" | "flow"
    value: torch.Tensor  # alpha_bar (vp) or sigma (flow), 0-d float64
    prediction: str  # "epsilon" | "v_prediction" | "sample" | "flow"

    def split(self, sample: torch.Tensor, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, eps) from the denoiser's input and output (float32)."""
        s, m = sample.float(), output.float()
        if self.kind == "flow":
            sigma = self.value.float()
            return s - sigma * m, s + (1 - sigma) * m
        a = self.value.float()
        root_a, root_b = a.sqrt(), (1 - a).sqrt()
        if self.prediction == "epsilon":
            return (s - root_b * m) / root_a, m
        if self.prediction == "v_prediction":
            return root_a * s - root_b * m, root_b * s + root_a * m
        if self.prediction == "sample":
            return m, (s - root_a * m) / root_b
        raise UnsupportedError(f"attnctl: the scheduler's prediction type {self.prediction!r} is not supported (epsilon, v_prediction, sample, flow)")

    def noise(self, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """The denoiser input at this level for `x0` and `eps` (the inverse of `split`)."""
        if self.kind == "flow":
            sigma = self.value.float()
            return (1 - sigma) * x0 + sigma * eps
        a = self.value.float()
        return a.sqrt() * x0 + (1 - a).sqrt() * eps


def _is_flow(scheduler: Any) -> bool:
    config = getattr(scheduler, "config", {})
    get = config.get if hasattr(config, "get") else (lambda key, default=None: default)
    return "FlowMatch" in type(scheduler).__name__ or get("prediction_type", "epsilon") == "flow_prediction" or bool(get("use_flow_sigmas", False))


def _is_kdpm2_ancestral(scheduler: Any) -> bool:
    return any(cls.__name__ == "KDPM2AncestralDiscreteScheduler" for cls in type(scheduler).__mro__)


def require_noise_level(scheduler: Any, owner: str) -> None:
    """Raise UnsupportedError, naming `owner`, when `noise_level` cannot tell the noise level of `scheduler`'s
    denoiser inputs (called at bind by the controls that need it, so that they are refused before the call runs)."""
    if scheduler is None:
        raise UnsupportedError(f"{owner} needs the pipeline's scheduler (pipe.scheduler) to know the noise level")
    name = type(scheduler).__name__
    if "EDM" in name:
        raise UnsupportedError(f"{owner}: {name} preconditions the model (EDM); not supported")
    has_sigmas = getattr(scheduler, "sigmas", None) is not None and hasattr(scheduler, "step_index")
    if _is_flow(scheduler) and not has_sigmas:
        raise UnsupportedError(f"{owner}: flow-matching scheduler {name} has no sigmas")
    if not has_sigmas and getattr(scheduler, "alphas_cumprod", None) is None:
        raise UnsupportedError(f"{owner}: cannot tell the noise level from scheduler {name} (no sigmas, no alphas_cumprod)")


def noise_level(scheduler: Any, timestep: Any, owner: str) -> NoiseLevel:
    """The noise level of the denoiser call in progress, from the pipeline's scheduler (see the module
    docstring): flow-matching sigma; a VP scheduler's sigma (Euler, Heun, DPM-Solver, UniPC: the input is VP
    with alpha_bar = 1 / (1 + sigma^2); the second call of KDPM2's, KDPM2-Ancestral's and DPM-Solver-SDE's steps
    reads their interpolated sigma, as their `scale_model_input` does); or alphas_cumprod at the timestep (DDIM, DDPM, PNDM)."""
    require_noise_level(scheduler, owner)
    config = getattr(scheduler, "config", {})
    prediction = config.get("prediction_type", "epsilon") if hasattr(config, "get") else "epsilon"
    flow = _is_flow(scheduler)
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is not None and hasattr(scheduler, "step_index"):
        index = scheduler.step_index
        if index is None:  # before the first scheduler.step: the first sigma of the steps run
            index = getattr(scheduler, "begin_index", None) or 0
        value = sigmas[index]
        if not getattr(scheduler, "state_in_first_order", True):  # the second call of a second-order step
            if getattr(scheduler, "sigmas_interpol", None) is not None:
                # the first call has advanced step_index: KDPM2 reads sigmas_interpol at it, KDPM2Ancestral (whose
                # table interpolates towards sigma_down) one back
                value = scheduler.sigmas_interpol[index - 1 if _is_kdpm2_ancestral(scheduler) else index]
            elif getattr(scheduler, "mid_point_sigma", None) is not None:
                value = scheduler.mid_point_sigma
        value = torch.as_tensor(value)
        sigma = value.double() if value.device.type != "mps" else value  # MPS has no float64
        if flow:
            return NoiseLevel("flow", sigma, "flow")
        return NoiseLevel("vp", 1.0 / (1.0 + sigma**2), prediction)
    if timestep is None:
        raise UnsupportedError(f"{owner}: the denoiser call has no timestep to read {type(scheduler).__name__}'s alphas_cumprod at")
    t = torch.as_tensor(timestep).flatten()[:1].round().long()
    # gathered where the timestep is (no copy of it to the host); float64 is exact for the float32 table
    value = _on_device(torch.as_tensor(scheduler.alphas_cumprod), t.device).index_select(0, t)[0]
    return NoiseLevel("vp", value.double() if value.device.type != "mps" else value, prediction)


_TABLES: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}


def _on_device(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The scheduler's (host) table on `device`, copied once per table and device, not at every step."""
    if table.device == device:
        return table
    key = (id(table), str(device))
    found = _TABLES.get(key)
    if found is None or found[0] is not table:
        if len(_TABLES) >= 16:
            _TABLES.clear()
        with torch.inference_mode(False):
            found = _TABLES[key] = (table, table.to(device))
    return found[1]


#: Schedulers whose `step` draws fresh noise at every step, whatever their config (diffusers 0.42.1): the ancestral
#: samplers, DDPM, the consistency samplers (LCM, its flow-matching form; CM, sCM), SA-Solver (its default `tau_func`),
#: CogVideoX's DPM, the cosine DPM-Solver (an SDE solver: a Brownian tree seeded by the generators), and DPM-Solver-SDE
#: (a Brownian tree of its own `noise_sampler_seed`, which the generators do not reach).
#: Others are stochastic by a setting `step_noise` reads: `algorithm_type="sde-..."` (the DPM-Solvers),
#: `stochastic_sampling` (flow-matching Euler), an `eta` above 0 (DDIM, TCD: the call's `eta`; LTX's config).
STOCHASTIC_SCHEDULERS = frozenset({
    "EulerAncestralDiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "DDPMScheduler",
    "DDPMParallelScheduler", "DDPMWuerstchenScheduler", "LCMScheduler", "FlowMatchLCMScheduler",
    "CMStochasticIterativeScheduler", "SCMScheduler", "SASolverScheduler", "CogVideoXDPMScheduler",
    "CosineDPMSolverMultistepScheduler", "DPMSolverSDEScheduler", "ScoreSdeVeScheduler", "RePaintScheduler", "UnCLIPScheduler",
})

#: Of those, the ones whose noise is one draw for the whole batch from a seed of the scheduler's (`noise_sampler_seed`),
#: which the pipeline's generators do not reach; a list of one seed per image gives each image a tree of its own.
BATCH_NOISE_SCHEDULERS = frozenset({"DPMSolverSDEScheduler"})


def _class_names(scheduler: Any) -> set[str]:
    return {cls.__name__ for cls in type(scheduler).__mro__}


def step_noise(scheduler: Any, eta: Any = None) -> str | None:
    """Why `scheduler`'s `step` adds fresh noise at each step (so that images sharing their initial latents drift
    apart unless each draws the same noise), or None where it is deterministic given the latents. `eta`: the pipeline
    call's `eta` argument (diffusers' pipelines pass it to a `step` that takes one; None: the call has none, and the
    step's own default counts). Read once per call, at bind."""
    if scheduler is None:
        return None
    name = type(scheduler).__name__
    if _class_names(scheduler) & STOCHASTIC_SCHEDULERS:
        return f"{name} adds noise at every step"
    config = getattr(scheduler, "config", {})
    get = config.get if hasattr(config, "get") else (lambda key, default=None: default)
    algorithm = get("algorithm_type", None)
    if isinstance(algorithm, str) and algorithm.startswith("sde-"):
        return f"{name} with algorithm_type={algorithm!r} adds noise at every step"
    if get("stochastic_sampling", False) is True:
        return f"{name} with stochastic_sampling=True adds noise at every step"
    step = getattr(type(scheduler), "step", None)  # the class's: the instance's may be wrapped (attnctl wraps it)
    try:
        parameter = inspect.signature(step).parameters.get("eta") if callable(step) else None
    except (TypeError, ValueError):
        parameter = None
    if parameter is not None:
        value = eta if eta is not None else parameter.default
        where = "the call's eta" if eta is not None else "its step's default eta"
    else:  # LTX's Euler Ancestral: eta (and s_noise) in its config
        value, where = get("eta", None), "its config's eta"
        if get("s_noise", 1.0) == 0:
            value = 0
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return f"{name} adds noise at every step ({where} is {value})"
    return None


def batch_noise(scheduler: Any) -> bool:
    """Whether `scheduler` draws its step noise for the whole batch from a seed of its own (`BATCH_NOISE_SCHEDULERS`)."""
    return scheduler is not None and bool(_class_names(scheduler) & BATCH_NOISE_SCHEDULERS)
