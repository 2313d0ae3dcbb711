"""DiTFastAttn: window attention with residual sharing, attention sharing across timesteps and across CFG rows,
chosen per layer and step by a calibration run.

Yuan et al. 2024, "DiTFastAttn: Attention Compression for Diffusion Transformer Models" (NeurIPS 2024,
arXiv 2406.08552; github.com/thu-nics/DiTFastAttn). Per layer and step, one of:

- `full`: full attention. When a later step uses window attention, the residual `R = full - window` is cached;
- `window_residual` (WA-RS): window attention plus the cached residual, `window + R`;
- `step_share` (AST): the layer's output of the previous step, reused (the whole layer is skipped);
- `cfg_share` (ASC): attention computed for the cond rows only; each uncond row takes the output of the cond
  row of its prompt (combined with `window_residual` as `window_residual+cfg_share`).

Calibration (`FastAttn.calibrate`, or any call made without a plan) runs a few prompts step by step and, in
each step, layer by layer in model order with every earlier choice applied, takes the most compressive choice
whose relative L1 error `sum|O' - O| / sum|O|` of the layer's attention output against full attention `O` is
strictly below `threshold`. The paper's window is a 1-D band over the flattened image tokens (`window=w`:
`|i - j| <= w`); `window=(rh, rw)` is a 2-D neighbourhood over the token grid instead, and on video (Wan)
`window=(rf, rh, rw)` a 3-D one over frames x height x width. Text tokens of joint layouts attend to and are
attended by every token. A plan records the model, the number of steps, the resolution, the number of token
frames and, on a pipeline with denoiser experts (Wan 2.2 A14B), the expert of each step it was made for, and raises
on a mismatch; it is saved and loaded as JSON.

The first step always runs full attention (the reference never compresses step 0). Deviations from the reference
code, as the project's specification asks: the error is the relative L1 above, measured on each layer's attention
output (the reference compares the model's output after trying each candidate, a forward pass per candidate, by a
mean elementwise relative error clipped at 10, against a threshold scaled by depth, `(i + 1) / L * threshold` for
layer i of L); the candidates are tried most compressive first by their modelled cost (the reference: a fixed order,
step sharing, window + CFG sharing, window, CFG sharing, which differs only when a window keeps more than half the
pairs). CFG sharing computes the cond rows and copies them to the uncond rows, as the reference (its default
`[uncond, cond]` order keeps the second half); the attention projections still run for every row except in
`step_share`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..control import BindContext, Bound, Control
from ..denoiser_call import DenoiserCall
from ..errors import ConfigError, IdleControlWarning, UnsupportedError
from ..families.base import Geometry, LayerInfo, ModelAdapter
from ..kernels import choose_traced_backend, sdpa
from ..kernels.semantics import spec_rows
from ..kernels.spec import AttentionSpec, Window
from ..processors.chain import restricted_rows, token_layout
from ..processors.edit import AttentionCall, Edit, LayerHook
from ..selection import LayerSpec, validate_layers
from ..steps import step_timesteps
from ..validation import number, plain_scalar, refuse_unused, same_float32, set_field
from .caching import Accountant, BranchCache, CacheReport, PassCounter, row_keys, take_rows, window_pairs
from .common import RowIndex, image_size, output_key, publish, write_atomically

TECHNIQUES: tuple[str, ...] = ("window_residual", "step_share", "cfg_share")
METHODS: tuple[str, ...] = ("full", "cfg_share", "window_residual", "window_residual+cfg_share", "step_share")
#: Candidates in order of preference when two cost the same (most compressive first).
CANDIDATES: tuple[str, ...] = ("step_share", "window_residual+cfg_share", "window_residual", "cfg_share")
FAMILIES: tuple[str, ...] = ("pixart", "sd3", "flux", "unet")
DEFAULT_WINDOW = 64  # run_pixart.py's command-line default in the reference code; its published PixArt runs use tokens / 8
WindowSize = int | tuple[int, int] | tuple[int, int, int]


# -- the plan ----------------------------------------------------------------------------------------------------
def model_identity(denoiser: torch.nn.Module) -> tuple[str, str, str]:
    """(class name, name or path it was loaded from, fingerprint of its config)."""
    config = dict(getattr(denoiser, "config", {}) or {})
    source = str(config.get("_name_or_path") or "")
    public = {k: v for k, v in config.items() if not str(k).startswith("_")}
    text = json.dumps(public, sort_keys=True, default=str)
    return type(denoiser).__name__, source, hashlib.sha1(text.encode()).hexdigest()[:16]


def _validate_window(window: Any, name: str) -> WindowSize:
    window = plain_scalar(window)
    if isinstance(window, Sequence) and not isinstance(window, str):
        window = tuple(plain_scalar(v) for v in window)
    if isinstance(window, bool):
        raise ConfigError(f"{name} must be an int (1-D band), a pair (rh, rw) (2-D radius) or a triple (rf, rh, rw) (3-D video radius), got {window!r}")
    if isinstance(window, int):
        if window < 0:
            raise ConfigError(f"{name} must be >= 0, got {window!r}")
        return int(window)
    if isinstance(window, Sequence) and not isinstance(window, str) and len(window) in (2, 3):
        if all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in window):
            return tuple(int(v) for v in window)
    raise ConfigError(
        f"{name} must be an int w >= 0 (the paper's 1-D band |i - j| <= w over flattened image tokens), a pair "
        f"(rh, rw) of ints >= 0 (a 2-D neighbourhood over the token grid) or a triple (rf, rh, rw) of ints >= 0 (a 3-D "
        f"neighbourhood over a video's frames x height x width tokens), got {window!r}"
    )


def describe_experts(experts: tuple[str, ...]) -> str:
    """`transformer` at steps 0-2, `transformer_2` at steps 3-5: an expert schedule in runs."""
    runs: list[tuple[str, int, int]] = []
    for step, expert in enumerate(experts):
        if runs and runs[-1][0] == expert and runs[-1][2] == step - 1:
            runs[-1] = (expert, runs[-1][1], step)
        else:
            runs.append((expert, step, step))
    return ", ".join(f"{e} at step {a}" if a == b else f"{e} at steps {a}-{b}" for e, a, b in runs)


def _same_timesteps(a: Sequence[float], b: Sequence[float]) -> bool:
    """The same timesteps, up to float rounding (a schedule computed on another device may differ in its last bits)."""
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-5, abs_tol=1e-3) for x, y in zip(a, b))


def _show_timesteps(timesteps: Sequence[float]) -> str:
    """`(999, 749, 499, ...)`: at most eight, rounded."""
    shown = ", ".join(f"{t:.4g}" for t in timesteps[:8])
    return f"({shown}{', ...' if len(timesteps) > 8 else ''})"


def _is_list(value: Any) -> bool:
    """A list or tuple (JSON's array), not a string, which is a sequence of characters."""
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes))


@dataclass(frozen=True)
class FastAttnPlan:
    """Per layer and step, which DiTFastAttn method runs; made by calibration, saved and loaded as JSON.

    `model` / `fingerprint`: the denoiser class and a hash of its config (checked when applied); `source`: the name
    or path it was loaded from (informative); `steps`: the number of steps run; `resolution`: the image (height,
    width) in pixels; `frames`: the token (latent) frames of a video, 1 for images (checked when applied: a window
    and the cached residuals are per token, so a plan holds for one frame count); `methods`: `(layer name, (method
    of step 0, method of step 1, ...))` in model order; `experts`: on a pipeline with denoiser experts (Wan 2.2
    A14B), the expert (pipeline attribute) that ran each step (checked when applied: another `boundary_ratio` or
    scheduler shift runs another expert at some step, whose layers the plan has no methods for there); None for one
    denoiser and for plans made before it was recorded. `timesteps`: the timestep of each step it was calibrated at
    (checked when applied: img2img `strength`, another scheduler, shift or custom `timesteps=` / `sigmas=` run other
    timesteps with the same count, where its methods' errors were never measured); None for plans made before it was
    recorded (the count alone is checked) and where the call's timesteps were not known. `scheduler`: the class name
    of the pipeline's scheduler at calibration (checked when applied: Euler and Heun, or Euler and EulerAncestral, run
    the same step timesteps, but Heun adds corrector calls between them and an ancestral scheduler other latents);
    None for plans made before it was recorded (not checked) and where the pipeline has no scheduler.
    """

    model: str
    fingerprint: str
    steps: int
    resolution: tuple[int, int]
    window: WindowSize
    threshold: float
    methods: tuple[tuple[str, tuple[str, ...]], ...]
    source: str = ""
    version: int = 1
    frames: int = 1
    experts: tuple[str, ...] | None = None
    timesteps: tuple[float, ...] | None = None
    scheduler: str | None = None

    def __post_init__(self) -> None:
        set_field(self, "steps", plain_scalar(self.steps))
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 1:
            raise ConfigError(f"FastAttnPlan.steps must be an int >= 1, got {self.steps!r}")
        if not isinstance(self.frames, int) or isinstance(self.frames, bool) or self.frames < 1:
            raise ConfigError(f"FastAttnPlan.frames must be an int >= 1 (token frames; 1 for images), got {self.frames!r}")
        resolution = tuple(self.resolution) if isinstance(self.resolution, Sequence) else ()
        if len(resolution) != 2 or not all(isinstance(v, int) and v > 0 for v in resolution):
            raise ConfigError(f"FastAttnPlan.resolution must be (height, width) in pixels, got {self.resolution!r}")
        set_field(self, "resolution", resolution)
        set_field(self, "window", _validate_window(self.window, "FastAttnPlan.window"))
        set_field(self, "threshold", number(self.threshold, "FastAttnPlan.threshold", minimum=0))
        for name in ("model", "fingerprint", "source"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"FastAttnPlan.{name} must be a string, got {getattr(self, name)!r}")
        if isinstance(self.methods, Mapping):
            items = tuple(self.methods.items())
        elif _is_list(self.methods):
            items = tuple(self.methods)
        else:
            raise ConfigError(
                "FastAttnPlan.methods must be a mapping {layer name: [method of each step]} or a list of (layer name, "
                f"methods) pairs, got {self.methods!r}"
            )
        methods = []
        for item in items:
            if not _is_list(item) or len(item) != 2 or not isinstance(item[0], str):
                raise ConfigError(f"FastAttnPlan.methods must hold (layer name, methods per step) pairs, got {item!r}")
            name, per_step = item[0], item[1]
            if not _is_list(per_step):
                raise ConfigError(f"FastAttnPlan.methods[{name!r}] must be a list of per-step methods, got {per_step!r}")
            per_step = tuple(per_step)
            if len(per_step) != self.steps:
                raise ConfigError(f"FastAttnPlan: layer {name!r} has {len(per_step)} methods for {self.steps} steps")
            bad = [m for m in per_step if m not in METHODS]
            if bad:
                raise ConfigError(f"FastAttnPlan: layer {name!r} has unknown method(s) {bad}; known: {', '.join(METHODS)}")
            if per_step[0] in ("step_share", "window_residual", "window_residual+cfg_share"):
                raise ConfigError(f"FastAttnPlan: layer {name!r} starts with {per_step[0]!r}, which needs an earlier step")
            methods.append((name, per_step))
        names = [name for name, _ in methods]
        if len(set(names)) != len(names):
            raise ConfigError("FastAttnPlan.methods names a layer twice")
        set_field(self, "methods", tuple(methods))
        if self.experts is not None:
            if not _is_list(self.experts) or len(self.experts) != self.steps or not all(isinstance(e, str) for e in self.experts):
                raise ConfigError(
                    f"FastAttnPlan.experts must be None or the expert (pipeline attribute) of each of its {self.steps} "
                    f"steps, got {self.experts!r}"
                )
            set_field(self, "experts", tuple(self.experts))
        if self.timesteps is not None:
            if _is_list(self.timesteps):
                set_field(self, "timesteps", tuple(plain_scalar(t) for t in self.timesteps))
            if not _is_list(self.timesteps) or len(self.timesteps) != self.steps or not all(
                    isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) for t in self.timesteps):
                raise ConfigError(
                    f"FastAttnPlan.timesteps must be None or the timestep (a number) of each of its {self.steps} steps, "
                    f"got {self.timesteps!r}"
                )
            set_field(self, "timesteps", tuple(float(t) for t in self.timesteps))
        if self.scheduler is not None and (not isinstance(self.scheduler, str) or not self.scheduler):
            raise ConfigError(f"FastAttnPlan.scheduler must be None or the scheduler's class name, got {self.scheduler!r}")

    @property
    def layers(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.methods)

    def per_step(self, layer: str) -> tuple[str, ...]:
        for name, methods in self.methods:
            if name == layer:
                return methods
        return ("full",) * self.steps

    def counts(self) -> dict[str, int]:
        out = {method: 0 for method in METHODS}
        for _, methods in self.methods:
            for method in methods:
                out[method] += 1
        return out

    def check(self, *, model: str | None = None, fingerprint: str | None = None, steps: int | None = None,
              resolution: tuple[int, int] | None = None, frames: int | None = None,
              experts: tuple[str, ...] | None = None, timesteps: tuple[float, ...] | None = None,
              scheduler: str | None = None) -> None:
        """Raise ConfigError when the plan was made for another model, number of steps, resolution, number of
        (token) frames, expert schedule (`experts`: the expert of each step of the call), timesteps (`timesteps`:
        the timestep of each step of the call, equal up to float rounding) or scheduler (`scheduler`: the class name
        of the call's); the last three are not checked when the plan or the call has none."""
        if model is not None and (model != self.model or fingerprint != self.fingerprint):
            raise ConfigError(
                f"this FastAttn plan was calibrated for {self.model} (config {self.fingerprint}), not for this "
                f"{model} (config {fingerprint}); calibrate a plan for this model"
            )
        if steps is not None and steps != self.steps:
            raise ConfigError(
                f"this FastAttn plan was calibrated for {self.steps} steps, but the call runs {steps} (with img2img "
                "strength, only the steps run count); calibrate a plan with this call's pipeline and schedule"
            )
        if resolution is not None and tuple(resolution) != self.resolution:
            raise ConfigError(
                f"this FastAttn plan was calibrated at {self.resolution[0]}x{self.resolution[1]}, but the call runs at "
                f"{resolution[0]}x{resolution[1]}; calibrate a plan for this resolution"
            )
        if frames is not None and frames != self.frames:
            raise ConfigError(
                f"this FastAttn plan was calibrated for {self.frames} token frame(s), but the call has {frames} token "
                "frame(s) (a video's latent frames; 1 for an image); calibrate a plan for this number of frames"
            )
        if experts is not None and self.experts is not None and tuple(experts) != self.experts:
            raise ConfigError(
                f"this FastAttn plan was calibrated with the experts running {describe_experts(self.experts)}, but this call "
                f"runs {describe_experts(tuple(experts))} (the pipeline's boundary_ratio and its scheduler's timesteps "
                "decide which expert runs a step; the plan has no methods for an expert at the steps it did not run); "
                "calibrate a plan for this pipeline's schedule"
            )
        if timesteps is not None and self.timesteps is not None and not _same_timesteps(timesteps, self.timesteps):
            raise ConfigError(
                f"this FastAttn plan was calibrated at the timesteps {_show_timesteps(self.timesteps)}, but this call runs "
                f"{_show_timesteps(timesteps)}: its methods were chosen by their error at those timesteps (img2img "
                "strength, another scheduler or shift, or custom timesteps / sigmas run others with the same number of "
                "steps); calibrate a plan with this call's pipeline and schedule (an img2img plan on the img2img "
                "pipeline at this strength)"
            )
        if scheduler is not None and self.scheduler is not None and scheduler != self.scheduler:
            raise ConfigError(
                f"this FastAttn plan was calibrated with {self.scheduler}, but this call runs {scheduler}: its methods "
                "were chosen by their error on that scheduler's model calls and latents (a second-order scheduler adds "
                "a call per step, an ancestral one adds noise); calibrate a plan with this call's scheduler"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version, "model": self.model, "source": self.source, "fingerprint": self.fingerprint,
            "steps": self.steps, "resolution": list(self.resolution), "frames": self.frames,
            "window": self.window if isinstance(self.window, int) else list(self.window), "threshold": self.threshold,
            "methods": {name: list(methods) for name, methods in self.methods},
            **({"experts": list(self.experts)} if self.experts is not None else {}),
            **({"timesteps": list(self.timesteps)} if self.timesteps is not None else {}),
            **({"scheduler": self.scheduler} if self.scheduler is not None else {}),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FastAttnPlan:
        if not isinstance(data, Mapping):
            raise ConfigError(f"a FastAttn plan must be a dict, got {type(data).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ConfigError(f"FastAttnPlan has no field(s) {', '.join(unknown)}; fields: {', '.join(sorted(fields))}")
        missing = sorted(f for f in ("model", "fingerprint", "steps", "resolution", "window", "threshold", "methods") if f not in data)
        if missing:
            raise ConfigError(f"FastAttnPlan is missing {', '.join(missing)}")
        if data.get("version", 1) != 1:
            raise ConfigError(f"FastAttnPlan version {data['version']!r} is not supported (this attnctl reads version 1)")
        values = dict(data)
        if isinstance(values["window"], list):
            values["window"] = tuple(values["window"])
        return cls(**values)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> FastAttnPlan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"a FastAttn plan must be JSON: {error}") from None
        return cls.from_dict(data)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the plan as JSON through a temporary file and a rename: never a half-written plan."""
        text = self.to_json() + "\n"

        def write(temp: str) -> None:
            with open(temp, "w", encoding="utf-8") as handle:
                handle.write(text)

        write_atomically(path, write)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FastAttnPlan:
        """Read a plan saved by `save`; a missing or unreadable file is a ConfigError naming it."""
        try:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(f"FastAttnPlan.load: cannot read the plan file {os.fspath(path)!r}: {error}") from None
        return cls.from_json(text)


# -- the control -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FastAttn(Control, type_name="fastattn"):
    """DiTFastAttn (Yuan et al. 2024) for PixArt, SD3, Flux and UNet self-attention.

    threshold: the calibration's bound on each layer's relative L1 error (strictly below); 0 changes nothing.
    window: `w` for the paper's 1-D band over flattened image tokens (`|i - j| <= w`), `(rh, rw)` for a 2-D
        neighbourhood over the token grid (images), or `(rf, rh, rw)` for a 3-D neighbourhood over a video's
        frames x height x width tokens (`|df| <= rf`, `|dr| <= rh`, `|dc| <= rw`; video families only); default 64
        (the reference code's), or the plan's.
    plan: a `FastAttnPlan` (or its dict) from `calibrate`; None: every call calibrates on its own prompts (the
        plan is in `handle.outputs["fastattn"].plan`).
    techniques: which of "window_residual", "step_share", "cfg_share" calibration may choose.
    layers: default self-attention on UNet and PixArt, every attention layer on SD3 and Flux (with a plan: the
        plan's layers). Cross-attention layers may be selected; they use step_share and cfg_share only.
    key: where the `CacheReport` goes in `handle.outputs` (two cache controls need different keys).
    """

    #: images and video; on video (frames x height x width tokens, frame-major) the window is the paper's 1-D band
    #: over the flattened video tokens (`window=w`) or a 3-D neighbourhood `(rf, rh, rw)`; a 2-D radius is refused
    #: there, a 3-D one on images
    grid_dims: ClassVar[tuple[int, ...]] = (2, 3)

    threshold: float = 0.05
    window: WindowSize | None = None
    plan: FastAttnPlan | None = None
    techniques: tuple[str, ...] = TECHNIQUES
    layers: LayerSpec = None
    key: str = "fastattn"


    step_cache_refusal: ClassVar[str | None] = (
        "both would reuse attention outputs across steps (FastAttn's step sharing and residual cache); the plan's "
        "error bounds assume every layer runs every step"
    )

    def compile_refusal(self, adapter: ModelAdapter) -> str | None:
        if self.plan is None and self.threshold > 0:
            return (
                "without a plan it calibrates in the call, choosing each layer's method from measured errors (a host "
                "read per layer and step); calibrate uncompiled (attnctl.calibrate) and apply FastAttn(plan=...) to the "
                "compiled denoiser"
            )
        return None  # with a plan, the caches are read and filled outside the graph (`_TracedFastAttnHook`)

    def __post_init__(self) -> None:
        set_field(self, "threshold", number(self.threshold, "FastAttn.threshold", minimum=0))
        if isinstance(self.techniques, str) or not isinstance(self.techniques, Sequence):
            raise ConfigError(f"FastAttn.techniques must be a tuple drawn from {TECHNIQUES}, got {self.techniques!r}")
        techniques = tuple(self.techniques)
        bad = [t for t in techniques if t not in TECHNIQUES]
        if bad or len(set(techniques)) != len(techniques) or not techniques:
            raise ConfigError(
                f"FastAttn.techniques must be one or more distinct names from {', '.join(TECHNIQUES)} (with none every "
                f"layer keeps full attention: nothing to choose), got {self.techniques!r}"
            )
        set_field(self, "techniques", techniques)
        set_field(self, "layers", validate_layers(self.layers, name="FastAttn.layers"))
        set_field(self, "key", output_key(self.key, "FastAttn"))
        plan = self.plan
        if isinstance(plan, Mapping):
            plan = FastAttnPlan.from_dict(plan)
            set_field(self, "plan", plan)
        if plan is not None and not isinstance(plan, FastAttnPlan):
            raise ConfigError(f"FastAttn.plan must be a FastAttnPlan, its dict or None, got {type(plan).__name__}")
        if self.window is not None:
            set_field(self, "window", _validate_window(self.window, "FastAttn.window"))
            if plan is None and "window_residual" not in techniques:
                refuse_unused(self, "window", "without 'window_residual' in FastAttn.techniques (only window attention reads it)")
        if plan is not None:
            if self.window is not None and self.window != plan.window:
                raise ConfigError(f"FastAttn.window {self.window!r} differs from the plan's window {plan.window!r}")
            if self.layers is not None:
                raise ConfigError("FastAttn.layers must be None with a plan: the plan names its layers")
            if same_float32(self.threshold, plan.threshold):
                set_field(self, "threshold", plan.threshold)
            elif self.threshold != plan.threshold:
                refuse_unused(self, "threshold", f"with a plan (the plan was calibrated at its own threshold, {plan.threshold!r})")
            allowed = {"full"} | {m for m in METHODS if all(part in techniques for part in m.split("+") if part != "full")}
            used = sorted({m for _, methods in plan.methods for m in methods} - allowed)
            if used:
                raise ConfigError(f"the plan uses {', '.join(used)}, which FastAttn.techniques {techniques} does not allow")

    @property
    def output_key(self) -> str:
        """Where the report goes in `handle.outputs`."""
        return self.key

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        plan = out.get("plan")
        if isinstance(plan, dict) and plan.get("scheduler") is None:
            # a plan without a recorded scheduler (saved before it was) is written as it was then: the renderer's
            # request digest of a job naming it stays the same, so a resumed run does not render its images again
            del plan["scheduler"]
        return out

    def layer_effects(self, adapter: ModelAdapter, layer: LayerInfo) -> tuple[str, ...]:
        """"cache" where outputs may be stored and reused, "window" where window attention may run (by the plan's
        methods for the layer; without a plan, what calibration may choose; nothing at threshold 0)."""
        if self.plan is not None:
            methods = dict(self.plan.methods).get(layer.name, ())
            effects = ("cache",) if any(m != "full" for m in methods) else ()
            return effects + (("window",) if any(m.startswith("window_residual") for m in methods) else ())
        if self.threshold == 0:
            return ()
        windowed = "window_residual" in self.techniques and layer.kind != "cross"
        return ("cache", "window") if windowed else ("cache",)

    @property
    def window_size(self) -> WindowSize:
        if self.plan is not None:
            return self.plan.window
        return DEFAULT_WINDOW if self.window is None else self.window

    def default_layers(self, adapter: ModelAdapter) -> str | tuple[str, ...] | None:
        if self.plan is not None:
            return self.plan.layers
        return "self" if adapter.text_attention == "cross" else None

    def validate_for(self, adapter: ModelAdapter) -> None:
        size = self.window_size
        if isinstance(size, tuple) and "window_residual" in self.techniques and len(size) != adapter.grid_dims:
            if adapter.grid_dims == 3:
                raise ConfigError(
                    f"FastAttn.window={size!r} is a 2-D (rh, rw) neighbourhood, and the {adapter.family} family has a "
                    "3-D (frames x height x width) video token grid; use a 3-D neighbourhood (rf, rh, rw) (e.g. "
                    f"(0, {size[0]}, {size[1]}) for the same window within each frame), the 1-D band window=w over the "
                    "frame-major video tokens (|i - j| <= w), or techniques without 'window_residual'"
                )
            raise ConfigError(
                f"FastAttn.window={size!r} is a 3-D (rf, rh, rw) video neighbourhood, and the {adapter.family} family "
                f"has a 2-D (height x width) image token grid; use (rh, rw) = ({size[1]}, {size[2]}) or a band window=w"
            )
        if self.plan is not None:
            model, _, fingerprint = model_identity(adapter.denoiser)
            self.plan.check(model=model, fingerprint=fingerprint)
            kinds = {layer.name: layer.kind for layer in adapter.layers}
            missing = [name for name in self.plan.layers if name not in kinds]
            if missing:
                raise ConfigError(f"the FastAttn plan names layer(s) this model does not have: {', '.join(missing[:5])}")
            windowed = [name for name, methods in self.plan.methods
                        if kinds[name] == "cross" and any(m.startswith("window_residual") for m in methods)]
            if windowed:
                raise ConfigError(f"the FastAttn plan asks for window attention in cross-attention layer(s) {', '.join(windowed[:5])}")
        if adapter.cfg_calls == "separate":
            self._refuse_cfg_share_alone(adapter)

    def _refuse_cfg_share_alone(self, adapter: ModelAdapter) -> None:
        """CFG sharing (the paper's ASC) copies each prompt's cond rows' attention to its uncond rows inside one
        denoiser call; a family whose uncond rows never share a call with their cond rows can never use it. Where it is
        all FastAttn may do (techniques=('cfg_share',), or a plan of full attention and cfg_share), it would be silently
        inert: refused. Beside other methods it falls back to full attention, and the handle warns where it was asked
        for explicitly (`FastAttnBound._unused_cfg_share`)."""
        why = _separate_cfg(adapter.family)
        if self.plan is None and self.techniques == ("cfg_share",) and self.threshold > 0:  # threshold 0: the documented identity
            raise UnsupportedError(
                f"attnctl: FastAttn(techniques=('cfg_share',)) can never act on {adapter.family}: CFG sharing copies each "
                f"prompt's cond attention to its uncond rows within one denoiser call, and {why}; add 'window_residual' "
                "or 'step_share' to techniques"
            )
        if self.plan is not None and _cfg_share_use(self.plan.methods) == "only":
            raise UnsupportedError(
                f"attnctl: this FastAttn plan's only method besides full attention is cfg_share, which can never act on "
                f"{adapter.family}: CFG sharing copies each prompt's cond attention to its uncond rows within one denoiser "
                f"call, and {why}; calibrate a plan on this pipeline (calibration never chooses CFG sharing here)"
            )

    def bind(self, context: BindContext) -> Bound:
        return FastAttnBound(self, context)


# -- one pipeline call -------------------------------------------------------------------------------------------
class _LayerState:
    __slots__ = ("output", "residual")

    def __init__(self, index: RowIndex) -> None:
        self.output = BranchCache(index)  # step_share: module results (inference) or attention outputs (calibration)
        self.residual = BranchCache(index)  # window_residual: R = full - window, (B, H, N, D) rows


def _relative_l1(candidate: torch.Tensor, full: torch.Tensor) -> float:
    total = full.float().abs().sum()
    diff = (candidate.float() - full.float()).abs().sum()
    if total == 0:
        return 0.0 if diff == 0 else math.inf
    return float(diff / total)


class FastAttnBound(Bound):
    layers_only = True

    def __init__(self, control: FastAttn, context: BindContext):
        super().__init__(control, context.layers, (0.0, 1.0))
        self.fast = control
        self.adapter = context.adapter
        self.steps_count = context.steps
        self.resolution = image_size(context)
        model, source, fingerprint = model_identity(context.adapter.denoiser)
        self.identity = (model, source, fingerprint)
        plan = control.plan
        self.frames = context.canvas.frames
        self.experts = context.adapter.expert_schedule(context.pipeline, context.steps)
        needed = plan is None or plan.timesteps is not None  # recorded in the plan made, or checked against the plan's
        self.timesteps = step_timesteps(context.pipeline, context.steps) if needed else None
        scheduler = getattr(context.pipeline, "scheduler", None)
        self.scheduler = type(scheduler).__name__ if scheduler is not None else None
        if plan is not None:
            plan.check(steps=context.steps, resolution=self.resolution, frames=self.frames, experts=self.experts,
                       timesteps=self.timesteps, scheduler=self.scheduler)
            self.methods = {layer.name: list(plan.per_step(layer.name)) for layer in context.layers}
            if plan.experts is None and self.experts is not None:
                self._warn_unrecorded_experts(context.adapter)
        else:
            self.methods = {layer.name: ["full"] * context.steps for layer in context.layers}
        self.calibrating = plan is None and control.threshold > 0
        self.decided: set[tuple[int, int]] = set()  # (layer index, step) decided by calibration
        self.report = CacheReport("fastattn", steps=context.steps, plan=plan)
        publish(context, control.key, self.report)
        self.accountant = Accountant(context.adapter, context.layers, self.report)
        self.index = RowIndex()  # row positions as index tensors, per device (shared by the layers' caches)
        self.states = {layer.index: _LayerState(self.index) for layer in context.layers}
        self.passes = PassCounter()
        # CFG sharing needs a prompt's uncond rows beside its cond rows in one denoiser call: batched CFG, in a call with it
        self.shares_cfg = context.adapter.cfg_calls == "batched" and context.uncond_rows
        self.family = context.adapter.family
        self.backend = context.backend
        self.pending: list[_TracedFastAttnHook] = []  # what a compiled forward kept, not yet filed (`settle`)
        self.swept_step = -1  # the last step whose first edit dropped the caches no later step reads (`drop_unread`)
        unused = self._unused_cfg_share() if self.idle_reason(context.steps) is None else None
        if unused is not None:
            warnings.warn(f"attnctl: FastAttn's 'cfg_share' is idle in this call: {unused}", IdleControlWarning, stacklevel=2)

    def _cfg_share_asked(self) -> str | None:
        """How much of what this call's FastAttn may do is CFG sharing: with a plan, by its methods (`_cfg_share_use`);
        without, "only" for techniques=('cfg_share',), "some" for CFG sharing among other techniques asked for
        explicitly, None otherwise (the default techniques' fallback to full attention without batched CFG rows is
        documented)."""
        if self.fast.plan is not None:
            return _cfg_share_use(self.fast.plan.methods)
        if not self.calibrating or "cfg_share" not in self.fast.techniques:
            return None
        if self.fast.techniques == ("cfg_share",):
            return "only"
        return "some" if set(self.fast.techniques) != set(TECHNIQUES) else None

    def _no_cfg_rows(self) -> str:
        """Why no row of this call can take CFG sharing (`shares_cfg` is False)."""
        if self.adapter.cfg_calls == "separate":
            return _separate_cfg(self.family)
        return ("this call has no classifier-free guidance (no uncond rows beside the cond rows: guidance_scale <= 1, "
                "or <= 0 on Z-Image)")

    def _unused_cfg_share(self) -> str | None:
        """CFG sharing asked for beside other techniques, in a call where no row can take it: the other techniques
        act, CFG sharing does not (the handle's idle warnings cover the control as a whole; this its part)."""
        if self.shares_cfg or self._cfg_share_asked() != "some":
            return None
        if self.fast.plan is not None:
            what = "its plan's cfg_share steps run full attention (window_residual+cfg_share: the window alone); " + (
                "calibrate a plan on this pipeline (calibration never chooses CFG sharing here)"
                if self.adapter.cfg_calls == "separate" else "run it with classifier-free guidance, as it was calibrated")
        else:
            others = ", ".join(repr(t) for t in self.fast.techniques if t != "cfg_share")
            what = f"calibration chooses among {others} only; leave 'cfg_share' out of techniques here"
        return (
            f"CFG sharing copies each prompt's cond attention to its uncond rows within one denoiser call, and "
            f"{self._no_cfg_rows()}, so {what}"
        )

    def idle_reason(self, count: int) -> str | None:
        """Calibration can choose nothing by construction (threshold 0 is the documented identity): one step (step 0
        always runs full attention), or CFG sharing alone in a call without uncond rows beside its cond rows; or a plan
        of full attention only, or of full attention and CFG sharing in such a call. The handle warns."""
        if not self.calibrating:
            if self.fast.plan is not None and all(m == "full" for _, methods in self.fast.plan.methods for m in methods):
                return "its plan runs full attention on every layer and step, so the output is the stock one"
            if self.fast.plan is not None and not self.shares_cfg and self._cfg_share_asked() == "only":
                return (
                    f"its plan's only method besides full attention is cfg_share, which copies each prompt's cond "
                    f"attention to its uncond rows within one denoiser call, and {self._no_cfg_rows()}, so the output is "
                    "the stock one; run it with classifier-free guidance, as it was calibrated"
                )
            return None
        if self.fast.techniques == ("window_residual",) and all(layer.kind == "cross" for layer in self.layers):
            return ("techniques=('window_residual',) windows image tokens, and every selected layer is cross-attention "
                    "(text keys), so the output is the stock one; select self- or joint-attention layers")
        if count == 1:
            return "the call has 1 step, and step 0 always runs full attention, so the output is the stock one"
        lone = self._lone_expert_steps()
        if lone is not None:
            return lone
        if self.fast.techniques == ("cfg_share",) and not self.shares_cfg:
            return (
                f"techniques=('cfg_share',) shares attention between CFG rows, and {self._no_cfg_rows()}, so the output "
                "is the stock one; add 'window_residual' or 'step_share'"
            )
        return None

    def _lone_expert_steps(self) -> str | None:
        """Calibration on a pipeline with denoiser experts (Wan 2.2) where each expert holding the selected layers runs
        at most one step of the call: a layer has nothing cached at its expert's first step (no earlier output to share,
        no residual for a window), so that step runs full attention, as step 0 does, unless CFG sharing can act there
        (not at step 0, and only with batched CFG rows). None where some step can take another method, and where no
        such expert runs a step (the handle's own idle rule names the expert then)."""
        if self.experts is None:
            return None
        held = self.adapter.layer_experts(layer.name for layer in self.layers) or frozenset()
        steps = {expert: [i for i, runs in enumerate(self.experts) if runs == expert] for expert in sorted(held)}
        cfg = self.shares_cfg and "cfg_share" in self.fast.techniques
        if not any(steps.values()) or any(len(run) > 1 or (run and run[0] > 0 and cfg) for run in steps.values()):
            return None
        return (
            f"each expert holding its layers ({', '.join(steps)}) runs at most one step of this call "
            f"({describe_experts(self.experts)}), and an expert's first step runs full attention (its layers have "
            "nothing cached from an earlier step), so the output is the stock one; run more steps"
        )

    def _warn_unrecorded_experts(self, adapter: ModelAdapter) -> None:
        """A plan made before plans recorded their expert schedule: its methods other than full attention tell which
        expert ran a step; where this call runs the other one, those methods are lost (the layers do not run)."""
        lost = sorted({(step, name.split(".", 1)[0]) for name, methods in self.fast.plan.methods
                       for step, method in enumerate(methods)
                       if method != "full" and name.split(".", 1)[0] in adapter.experts and name.split(".", 1)[0] != self.experts[step]})
        if lost:
            shown = ", ".join(f"{expert} at step {step}" for step, expert in lost[:6])
            warnings.warn(
                f"attnctl: this FastAttn plan records no expert schedule (made before plans did), and it has methods for "
                f"{shown}, where this call runs {describe_experts(self.experts)}: those methods are lost (their "
                "layers do not run there), and the other expert runs full attention; calibrate a plan for this schedule",
                stacklevel=2,
            )

    # -- per layer geometry ---------------------------------------------------------------------------------------
    def window_for(self, layer: LayerInfo, geometry: Geometry) -> Window | None:
        if layer.kind == "cross" or "window_residual" not in self.fast.techniques:
            return None
        joint = layer.text in ("first", "last")
        size = self.fast.window_size
        window = Window(
            grid_hw=geometry.image_hw,
            radius=size if isinstance(size, tuple) else None,
            band=size if isinstance(size, int) else None,
            text_len=geometry.text_len if joint else 0,
            text_first=layer.text == "first",
            frames=geometry.frames,
        )
        return window

    def needs_residual(self, layer: LayerInfo, step: int) -> bool:
        for method in self.methods[layer.name][step + 1 :]:
            if method in ("full", "cfg_share"):
                return False
            if method.startswith("window_residual"):
                return True
        return False

    def needs_output(self, layer: LayerInfo, step: int) -> bool:
        methods = self.methods[layer.name]
        return step + 1 < len(methods) and methods[step + 1] == "step_share"

    def drop_unread(self, step: int) -> None:
        """With a plan, at a step's first edit: free each layer's residual and module output that no step reads any
        more, instead of holding them to the end of the call. A residual is read by window steps only, and a full or
        CFG-shared step stores a fresh one where a later window step needs it; a module output is read by step
        sharing only, and any other step stores a fresh one where the next step shares it. On a real-size video model
        they are large (Wan 14B at 480p, 81 frames: 0.31 GiB per layer and CFG branch in bfloat16, 25 GiB over its 40
        layers), and on Wan 2.2 the expert that stopped running kept its layers' entries to the end (they are freed at
        the first edit of a later step, which a layer of the other expert makes where the control selected one)."""
        for layer in self.layers:
            state, method = self.states[layer.index], self.methods[layer.name][step]
            if len(state.residual) and not method.startswith("window_residual") and (
                method != "step_share" or not self.needs_residual(layer, step)
            ):
                state.residual.clear()
            if len(state.output) and method != "step_share":
                state.output.clear()

    # -- edits ----------------------------------------------------------------------------------------------------
    def edit(self, layer: LayerInfo, frame: DenoiserCall) -> Edit | None:
        if self.pending and self.pending[0].number != frame.number:
            self.settle()
        self.accountant.see(frame, len(frame.rows))
        step = frame.step.index
        if not self.calibrating and step != self.swept_step:
            self.swept_step = step
            self.drop_unread(step)
        pass_index = self.passes(frame)
        geometry = frame.geometry(layer)
        window = self.window_for(layer, geometry)
        method = self.methods[layer.name][step]
        if self.calibrating:
            undecided = (layer.index, step) not in self.decided
            return Edit(hooks=(_FastAttnHook(self, layer, frame, method, window, pass_index, calibrate=undecided),))
        if method == "full" and not self.needs_residual(layer, step) and not self.needs_output(layer, step):
            one = self.accountant.full(layer, frame, 1)
            self.report.record(step, layer.name, "full", len(frame.rows) * one, len(frame.rows) * one)
            return None
        if frame.compiled:
            hook = _TracedFastAttnHook(self, layer, frame, method, window, pass_index)
            self.pending.append(hook)
            window = hook.window  # with its dense mask for the graph
        else:
            hook = _FastAttnHook(self, layer, frame, method, window, pass_index, calibrate=False)
        return Edit(window=window if method.startswith("window_residual") else None, hooks=(hook,))

    def settle(self) -> None:
        """File what the last compiled forward kept (module outputs for step sharing, residuals) into the caches,
        before the next forward's edits."""
        pending, self.pending = self.pending, []
        for hook in pending:
            state = self.states[hook.layer.index]
            if hook.output is not None:
                state.output.store(hook.layout, hook.output, hook.keys)
            if hook.new_residual is not None:
                state.residual.store(hook.layout, hook.new_residual, hook.keys)

    def finish(self) -> None:
        model, source, fingerprint = self.identity
        calibrated = {step for _, step in self.decided}
        # a call stopped early (pipe._interrupt) never calibrated its last steps: their "full" was never chosen
        if self.fast.plan is None and (not self.calibrating or calibrated == set(range(self.steps_count))):
            self.report.plan = FastAttnPlan(
                model=model, fingerprint=fingerprint, steps=self.steps_count, resolution=self.resolution,
                frames=self.frames, window=self.fast.window_size, threshold=self.fast.threshold, source=source,
                experts=self.experts, timesteps=self.timesteps, scheduler=self.scheduler,
                methods=tuple((layer.name, tuple(self.methods[layer.name])) for layer in self.layers),
            )
        for state in self.states.values():
            state.output.clear()
            state.residual.clear()
        self.index.clear()
        self.pending.clear()
        self.swept_step = -1
        self.accountant._frame = None


def _cfg_share_use(methods: tuple[tuple[str, tuple[str, ...]], ...]) -> str | None:
    """Whether a plan's methods use CFG sharing: "only" (every method but full attention is cfg_share), "some", or None."""
    used = {m for _, per_step in methods for m in per_step} - {"full"}
    if used == {"cfg_share"}:
        return "only"
    return "some" if any(m.endswith("cfg_share") for m in used) else None


def _separate_cfg(family: str) -> str:
    """Why a family with `cfg_calls == "separate"` never has a prompt's uncond rows beside its cond rows."""
    return (
        f"the {family} family never runs a prompt's uncond rows beside its cond rows in one denoiser call (its "
        "classifier-free guidance, where it has any, is an uncond call of its own per step: true CFG; a guidance-distilled "
        "model has no uncond rows)"
    )


def _ran(method: str, shared: bool) -> str:
    """What the report says ran for `method`: without its CFG sharing when no row was shared (no uncond rows)."""
    return method if shared else method.replace("+cfg_share", "").replace("cfg_share", "full")


def _share_index(layout) -> tuple[list[int], list[int]] | None:
    """For CFG sharing: (rows to compute, for every row the position of its source among them), or None."""
    uncond = layout.indices("uncond", None)
    if not uncond:
        return None
    cond = {layout.rows[i].prompt: i for i in layout.indices("cond", None)}
    if any(layout.rows[i].prompt not in cond for i in uncond):
        return None
    skipped = set(uncond)
    computed = [i for i in range(len(layout)) if i not in skipped]
    position = {row: k for k, row in enumerate(computed)}
    source = [position[cond[layout.rows[i].prompt]] if i in skipped else position[i] for i in range(len(layout))]
    return computed, source


@dataclass(frozen=True)
class _Run:
    """What one layer call computes, decided before its tensors (`_FastAttnHook._decide`)."""

    computed: list[int]  # the rows attention runs on (the cond rows with CFG sharing)
    rows: tuple[torch.Tensor, torch.Tensor] | None  # with CFG sharing: (those rows, each row's source among them)
    residual: torch.Tensor | None  # window + residual: the cached residual of the computed rows (None: a miss)
    keep_residual: bool  # full attention also computes the window, for the residual a later step reuses


class _FastAttnHook(LayerHook):
    """Carries out one layer's method in one denoiser call (and, while calibrating, chooses it first)."""


    def __init__(self, bound: FastAttnBound, layer: LayerInfo, frame: DenoiserCall, method: str, window: Window | None,
                 pass_index: Any, calibrate: bool):
        self.bound, self.layer, self.method, self.window = bound, layer, method, window
        self.pass_index, self.calibrate = pass_index, calibrate
        self.state = bound.states[layer.index]
        self.step = frame.step.index
        self.keys = row_keys(frame.rows, pass_index)
        self.rows = len(frame.rows)
        self.one = bound.accountant.full(layer, frame, 1)
        width = bound.accountant.width(layer)
        self.window_one = 4.0 * window_pairs(window) * width if window is not None else self.one
        self.stored_miss = False

    def _record(self, ran: str, flops: float, hit: bool = False) -> None:
        self.bound.report.record(self.step, self.layer.name, ran, flops, self.rows * self.one, hit)

    def _cost(self, method: str, computed: int, residual: bool) -> float:
        if method == "step_share":
            return 0.0
        if method.startswith("window_residual"):
            return computed * self.window_one
        return computed * (self.one + (self.window_one if residual else 0.0))

    # -- step sharing at the module level (inference) -------------------------------------------------------------
    def reuse(self, call: AttentionCall, hidden: Any, context: Any) -> Any | None:
        if self.calibrate or self.bound.calibrating or self.method != "step_share":
            return None
        value = self.state.output.load(call.rows, self.keys)
        if value is not None:
            self._record("step_share", 0.0, hit=True)
        return value

    def result(self, call: AttentionCall, result: Any) -> Any:
        if not self.bound.calibrating and (self.method == "step_share" or self.bound.needs_output(self.layer, self.step)):
            self.state.output.store(call.rows, result, self.keys)  # a step_share miss stores too, for the next hit
        return result

    # -- the attention op -----------------------------------------------------------------------------------------
    def attend(self, call: AttentionCall, q, k, v, spec: AttentionSpec, compute):
        if token_layout(call).sub:  # a sub-attention an outer hook runs (Regions' base attention): computed as asked
            return compute(q, k, v, spec)
        # The rows here may be fewer than the layer call's (an outer hook ran the rest of the chain on some rows,
        # e.g. PAG on the rows it does not perturb): the attention caches are keyed by the rows seen here.
        layer_rows, layer_keys = self.rows, self.keys
        if q.shape[0] != self.rows:
            self.rows, self.keys = len(call.rows), row_keys(call.rows, self.pass_index)
        try:
            if self.calibrate:
                return self._calibrate(call, q, k, v, spec, compute)
            out, lse = self._apply(call, q, k, v, spec, compute)
            if self.bound.calibrating:  # later frames of a calibrated step: step sharing works on attention outputs
                self.state.output.store(call.rows, out, self.keys)
            return out, lse
        finally:
            self.rows, self.keys = layer_rows, layer_keys

    def _some_rows(self, call: AttentionCall, computed: list[int], compute, q, k, v, spec: AttentionSpec):
        """`compute` on the rows `computed` only (the hooks inside see those rows)."""
        if len(computed) == self.rows:
            return compute(q, k, v, spec)
        with restricted_rows(call, computed):
            return compute(q, k, v, spec)

    def _apply(self, call: AttentionCall, q, k, v, spec: AttentionSpec, compute):
        if self.method == "step_share":
            previous = self.state.output.load(call.rows, self.keys) if self.bound.calibrating else None
            if previous is not None:
                self._record("step_share", 0.0, hit=True)
                return previous, None
            self._record("miss", self.rows * self.one)  # (with a plan: the module-level reuse missed)
            return compute(q, k, v, dataclasses.replace(spec, window=None))
        run = self._decide(call.rows, q.device)
        out, lse, residual = self._run(run, call, q, k, v, spec, compute)
        if residual is not None:
            self.state.residual.store(call.rows, residual, self.keys)
        return out, lse

    def _decide(self, layout, device: torch.device | None) -> _Run:
        """What this layer call computes for the rows `layout` (not step sharing), and its report entry: the cached
        residual a window reuses, the rows CFG sharing computes, whether full attention also keeps a residual."""
        method = self.method
        share = _share_index(layout) if method.endswith("cfg_share") else None
        computed = share[0] if share is not None else list(range(self.rows))
        index = self.bound.index
        rows = None if share is None else (index(share[0], device), index(share[1], device))
        label = _ran(method, share is not None)
        if method.startswith("window_residual"):
            residual = self.state.residual.load(layout, self.keys)
            if residual is None:  # rows no earlier step kept (PAG's rows from a late start, a new pass): full, and a
                # residual for the next steps, which would otherwise miss too until the plan's next full step
                keep = self.window is not None and self.window_one < self.one
                self._record("miss", len(computed) * (self.one + (self.window_one if keep else 0.0)))
                return _Run(computed, rows, None, keep)
            if share is not None:
                residual = take_rows(residual, computed, index)
            self._record(label, self._cost(method, len(computed), False))
            return _Run(computed, rows, residual, False)
        calibrating = self.bound.calibrating
        keep = self.window is not None and (self.bound.needs_residual(self.layer, self.step) or (calibrating and self.window_one < self.one))
        # while calibrating, the report shows what the chosen method costs with a plan, not calibration's own work
        self._record(label, self._cost(method, len(computed), keep and not calibrating))
        return _Run(computed, rows, None, keep)

    def _run(self, run: _Run, call: AttentionCall, q, k, v, spec: AttentionSpec, compute):
        """The tensors of a decided call: (output of every row, log-sum-exp or None, the residual to keep or None)."""
        if run.rows is not None:
            sub = run.rows[0].to(q.device)
            q, k, v = q.index_select(0, sub), k.index_select(0, sub), v.index_select(0, sub)
            spec = spec_rows(spec, sub, self.rows)

        def spread(out: torch.Tensor) -> torch.Tensor:  # every row takes its source row (uncond rows their cond row's)
            return out if run.rows is None else out.index_select(0, run.rows[1].to(out.device))

        if self.method.startswith("window_residual"):
            if run.residual is None:
                full, _ = self._some_rows(call, run.computed, compute, q, k, v, dataclasses.replace(spec, window=None))
                if not run.keep_residual:
                    return spread(full), None, None
                window, _ = self._some_rows(call, run.computed, compute, q, k, v, dataclasses.replace(spec, window=self.window))
                return spread(full), None, spread(full - window)
            window_spec = spec if spec.window is not None else dataclasses.replace(spec, window=self.window)
            out, _ = self._some_rows(call, run.computed, compute, q, k, v, window_spec)
            return spread(out + run.residual.to(out.dtype)), None, None
        full, lse = self._some_rows(call, run.computed, compute, q, k, v, spec)
        residual = None
        if run.keep_residual:
            window, _ = self._some_rows(call, run.computed, compute, q, k, v, dataclasses.replace(spec, window=self.window))
            residual = spread(full - window)
        return spread(full), (lse if run.rows is None else None), residual

    # -- calibration ----------------------------------------------------------------------------------------------
    def _calibrate(self, call: AttentionCall, q, k, v, spec: AttentionSpec, compute):
        bound, state, techniques = self.bound, self.state, self.bound.fast.techniques
        full, lse = compute(q, k, v, spec)
        window_out = None
        # a window that lets every pair through would save nothing: not a candidate then
        if self.window is not None and self.window_one < self.one:
            window_out, _ = compute(q, k, v, dataclasses.replace(spec, window=self.window))
        residual = state.residual.load(call.rows, self.keys)
        previous = state.output.load(call.rows, self.keys)
        share = _share_index(call.rows) if "cfg_share" in techniques else None
        fraction = len(share[0]) / self.rows if share is not None else 1.0
        window_fraction = self.window_one / self.one if self.one else 1.0

        def spread(out: torch.Tensor) -> torch.Tensor:  # every row takes its source row, among all rows here
            computed, source = share
            return out.index_select(0, bound.index([computed[s] for s in source], out.device))

        options: list[tuple[float, int, str, Any]] = []
        if "step_share" in techniques and previous is not None:
            options.append((0.0, 0, "step_share", lambda: previous))
        if window_out is not None and residual is not None:
            if share is not None:
                options.append((window_fraction * fraction, 1, "window_residual+cfg_share", lambda: spread(window_out + residual.to(full.dtype))))
            options.append((window_fraction, 2, "window_residual", lambda: window_out + residual.to(full.dtype)))
        if share is not None:
            options.append((fraction, 3, "cfg_share", lambda: spread(full)))
        if self.step == 0:  # the authors' calibration never compresses the first step (`if now_stepi == 0: continue`)
            options = []
        chosen, out = "full", full
        for _, _, name, make in sorted(options, key=lambda option: (option[0], option[1])):
            candidate = make()
            if _relative_l1(candidate, full) < bound.fast.threshold:
                chosen, out = name, candidate
                break
        bound.methods[self.layer.name][self.step] = chosen
        bound.decided.add((self.layer.index, self.step))
        if chosen in ("full", "cfg_share") and window_out is not None:
            fresh = full - window_out
            state.residual.store(call.rows, spread(fresh) if chosen == "cfg_share" else fresh, self.keys)
        state.output.store(call.rows, out, self.keys)
        computed = self.rows if share is None or "cfg_share" not in chosen else len(share[0])
        self._record(chosen, self._cost(chosen, computed, False), hit=chosen == "step_share")
        return out, (lse if chosen == "full" else None)


class _TracedFastAttnHook(_FastAttnHook):
    """One layer's planned method in a compiled forward. What the eager hook decides as it runs in Python (cache
    lookups, row indices, the report: `_decide`) is decided here, with the edit, before the forward; what it stores
    (the module output for step sharing, the residual) is kept on the hook and filed before the next forward's edits
    (`FastAttnBound.settle`). The graph then holds tensors and the method only: no cache, step or report for dynamo
    to guard on (it would recompile every step)."""

    def __init__(self, bound: FastAttnBound, layer: LayerInfo, frame: DenoiserCall, method: str, window: Window | None,
                 pass_index: Any):
        super().__init__(bound, layer, frame, method, window, pass_index, calibrate=False)
        self.number, self.layout = frame.number, frame.rows
        self.keep_output = method == "step_share" or bound.needs_output(layer, self.step)
        self.output = self.new_residual = self.reused = None
        self.run: _Run | None = None  # None: step sharing
        if method == "step_share":
            self.reused = self.state.output.load(self.layout, self.keys)
            if self.reused is not None:
                self._record("step_share", 0.0, hit=True)
            else:  # computed in full, without a window
                self._record("miss", self.rows * self.one)
        else:
            weight = bound.adapter.placed_weight(layer.name)
            self.run = self._decide(self.layout, weight.device if weight is not None else None)
            if window is not None and weight is not None and self.window_rows():  # offloaded: the graph makes the mask
                # its own object (the edit's too): it keeps the dense mask, which a cache holding an equal window as
                # its key (`window_pairs`) must not keep alive
                self.window = dataclasses.replace(window)
                self._prepare_window(self.window, weight)

    def _prepare_window(self, window: Window, weight: torch.Tensor) -> None:
        """The window's dense mask, made now for the graph where it runs on sdpa (`sdpa.prepare_window`): a graph that
        made it from the window's grid would be specialised to the image size and make it at every attention call."""
        tokens = window.n_img + window.text_len
        elements = self.window_rows() * tokens * tokens
        if choose_traced_backend(self.bound.backend, weight.device, ("window",), elements) == "sdpa":
            sdpa.prepare_window(window, weight.dtype, weight.device)

    def reuse(self, call: AttentionCall, hidden: Any, context: Any) -> Any | None:
        return self.reused

    def window_rows(self) -> int:
        run = self.run
        windowed = run is not None and (run.keep_residual or (self.method.startswith("window_residual") and run.residual is not None))
        return len(run.computed) if windowed else 0

    def result(self, call: AttentionCall, result: Any) -> Any:
        if self.keep_output:
            self.output = result
        return result

    def attend(self, call: AttentionCall, q, k, v, spec: AttentionSpec, compute):
        if token_layout(call).sub:
            return compute(q, k, v, spec)
        if q.shape[0] != self.rows:
            raise UnsupportedError(
                f"attnctl: FastAttn at {self.layer.name} got {q.shape[0]} of the call's {self.rows} rows (another control "
                "on the layer runs its attention on some rows); in a compiled denoiser FastAttn needs the layer's own rows: "
                "apply that control to other layers, or run uncompiled"
            )
        if self.run is None:  # step sharing whose module-level reuse missed
            return compute(q, k, v, dataclasses.replace(spec, window=None))
        out, lse, self.new_residual = self._run(self.run, call, q, k, v, spec, compute)
        return out, lse
