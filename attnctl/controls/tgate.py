"""TGATE: caching cross-attention after a gate step, and dropping classifier-free guidance there.

Zhang, Liu et al. 2024, "Cross-Attention Makes Inference Cumbersome in Text-to-Image Diffusion Models"
(arXiv 2404.02747), as their reference code (github.com/HaozheLiu-ST/T-GATE, `tgate_scheduler`) does it:

- step indices `0 .. g-1` run with CFG, unchanged;
- at index `g-1` every cross-attention layer also stores the mean of its uncond and cond outputs;
- from index `g` on one row per prompt runs, with the negative / null-text conditioning (SDXL: its pooled
  embeddings and time ids too), every cross-attention layer returns the stored mean, and that prediction is
  returned for both CFG rows, so the pipeline's CFG gives it back unchanged;
- TGATE v2's self-attention reuse (optional): after `warm_up` steps, self-attention outputs are stored every
  `sp_interval` steps and reused in between, before the gate; at `g-1` the mean is stored, and after the gate
  they are stored every `fi_interval` steps and reused in between.

Without CFG (guidance_scale <= 1) there is nothing to drop: the cross-attention outputs of step `g-1` are stored
and reused after it (and the self-attention reuse as configured). TGATE needs cross-attention: on joint-attention
models (SD3, Flux) it raises; `FastAttn` is the method for those.

Families whose pipelines run CFG as two denoiser calls per step (Wan: cond, then uncond) get the same semantics
across the calls: at `g-1` the cond call stores its cross-attention outputs and the uncond call folds its own into
the mean; from `g` on the cond call's cross-attention layers return the mean and the uncond call does not run: it
returns the cond call's prediction (`RowPlan.reuse_cond`), so the pipeline's CFG gives that prediction back
unchanged. The text enters Wan's denoiser only through cross-attention, so after the gate the two calls would
compute the same thing: the one run is TGATE's single null-text row.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from ..control import BindContext, Bound, Control
from ..denoiser_call import DenoiserCall, RowLayout, RowPlan, RowSelect
from ..errors import ConfigError, UnsupportedError
from ..families.base import LayerInfo, ModelAdapter
from ..processors.edit import AttentionCall, Edit, LayerHook
from ..selection import LayerSpec, validate_layers
from ..steps import StepInfo
from ..validation import integer, refuse_unused, set_field
from .caching import Accountant, BranchCache, CacheReport, PassCounter, row_keys, take_rows
from .common import RowIndex, output_key, publish

Action = Literal["compute", "store", "store_mean", "reuse"]


def cross_action(step: int, gate_step: int, steps: int) -> Action:
    """What a cross-attention layer does at step index `step` (TGATE)."""
    if step < gate_step - 1:
        return "compute"
    if step == gate_step - 1:
        return "store_mean" if gate_step < steps else "compute"
    return "reuse"


def self_action(step: int, gate_step: int, steps: int, warm_up: int, sp_interval: int | None, fi_interval: int | None) -> Action:
    """What a self-attention layer does at step index `step` (TGATE v2's `tgate_scheduler`)."""
    if step < gate_step - 1:
        if sp_interval is None or step < warm_up:
            return "compute"
        if step == warm_up or step % sp_interval == 0:
            return "store"
        return "reuse"
    if step == gate_step - 1:
        return "store_mean" if fi_interval is not None and gate_step < steps else "compute"
    if fi_interval is None:
        return "compute"
    return "store" if step % fi_interval == 0 else "reuse"


@dataclass(frozen=True)
class TGate(Control, type_name="tgate"):
    """TGATE (Zhang et al. 2024): cache cross-attention from step `gate_step` on and drop CFG there.

    gate_step: the step index from which cross-attention is cached and CFG dropped (>= 1). At or beyond the
        number of steps no cross-attention is cached and CFG is kept: only the v2 self-attention reuse before it
        (`sp_interval` steps after `warm_up`) can change the output; without it the output is stock (the handle
        warns).
    warm_up, sp_interval, fi_interval: TGATE v2's self-attention reuse (off while both intervals are None):
        after `warm_up` steps, store every `sp_interval` steps before the gate and every `fi_interval` after it,
        reusing the stored output in between (`warm_up` 2 as the reference code's; the intervals are opt-in).
    layers: the attention layers; default the cross-attention layers (and the self-attention layers when an
        interval is set). Cross layers get the caching, self layers the v2 reuse.
    key: where the `CacheReport` goes in `handle.outputs` (two cache controls need different keys).
    """

    gate_step: int = 10
    warm_up: int = 2
    sp_interval: int | None = None
    fi_interval: int | None = None
    layers: LayerSpec = None
    key: str = "tgate"


    step_cache_refusal: ClassVar[str | None] = (
        "both would cache attention across steps (TGate keeps the cross-attention output after its gate step); "
        "the cache would reuse outputs TGate already replaced, or skip the steps TGate caches from"
    )

    def compile_refusal(self, adapter: ModelAdapter) -> str | None:
        return None  # compiled, the cache is read and filled outside the graph (`TGateBound.traced_edit`)

    def __post_init__(self) -> None:
        set_field(self, "gate_step", integer(self.gate_step, "TGate.gate_step", minimum=1))
        set_field(self, "warm_up", integer(self.warm_up, "TGate.warm_up", minimum=0))
        for name in ("sp_interval", "fi_interval"):
            value = getattr(self, name)
            if value is not None:
                set_field(self, name, integer(value, f"TGate.{name}", minimum=1))
        if self.sp_interval is None and self.warm_up != 0:  # 0 (no warm-up of a reuse that is off) is harmless
            refuse_unused(self, "warm_up", "without sp_interval (the self-attention reuse before the gate starts after warm_up)")
        set_field(self, "layers", validate_layers(self.layers, name="TGate.layers"))
        set_field(self, "key", output_key(self.key, "TGate"))

    @property
    def output_key(self) -> str:
        """Where the report goes in `handle.outputs`."""
        return self.key

    def layer_effects(self, adapter: ModelAdapter, layer: LayerInfo) -> tuple[str, ...]:
        """"cache": the layer's output is stored and reused."""
        return ("cache",)

    @property
    def reuses_self_attention(self) -> bool:
        return self.sp_interval is not None or self.fi_interval is not None

    def default_layers(self, adapter: ModelAdapter) -> str | tuple[str, ...]:
        return ("cross", "self") if self.reuses_self_attention else "cross"

    def validate_for(self, adapter: ModelAdapter) -> None:
        if adapter.text_attention != "cross":
            raise UnsupportedError(
                f"attnctl: TGate caches cross-attention, which {adapter.family} does not have (its text and image "
                "tokens share joint attention layers); TGate supports families with cross-attention (SD / SDXL, "
                "PixArt, Wan). Use attnctl.FastAttn for joint-attention models."
            )
        if self.layers is not None:
            kinds = {layer.kind for layer in self.select(adapter)}
            if "self" in kinds and not self.reuses_self_attention:
                raise ConfigError(
                    "TGate.layers selects self-attention layers, but self-attention reuse is off (sp_interval and "
                    "fi_interval are None); select cross-attention layers, or set an interval"
                )

    def reuses_calls(self, adapter: ModelAdapter) -> bool:
        """After the gate a separate uncond call (Wan) returns the cond call's prediction without running."""
        return adapter.cfg_calls == "separate"

    def bind(self, context: BindContext) -> Bound:
        return TGateBound(self, context)


class TGateBound(Bound):
    def __init__(self, control: TGate, context: BindContext):
        super().__init__(control, context.layers, (0.0, 1.0))
        self.tgate = control
        self.count = context.steps
        self.cfg = context.cfg
        self.report = CacheReport("tgate", steps=context.steps)
        publish(context, control.key, self.report)
        self.accountant = Accountant(context.adapter, context.layers, self.report)
        self.index = RowIndex()
        self.caches: dict[int, BranchCache] = {layer.index: BranchCache(self.index) for layer in context.layers}
        self.mean_mode: dict[int, bool] = {}
        self.passes = PassCounter()
        self.warned = False
        self._dropped: tuple[int, int] = (-1, 0)  # (frame number, rows dropped by the row selection)
        self.pending: list[_TracedTGateHook] = []  # outputs a compiled forward kept, not yet filed (`settle`)

    def idle_reason(self, count: int) -> str | None:
        """A gate at or beyond the call's step count and no step whose self-attention output is reused (no v2 intervals, no
        self-attention layer, or intervals that reuse no step of the call): nothing changes, the handle warns."""
        control = self.tgate
        if control.gate_step < count:
            return None
        selfs = any(layer.kind == "self" for layer in self.layers)
        schedule = (self_action(step, control.gate_step, count, control.warm_up, control.sp_interval, control.fi_interval)
                    for step in range(count))
        if selfs and "reuse" in schedule:
            return None
        allowed = f"gate_step must be at most {count - 1} to cache any step" if count > 1 else "a 1-step call has no step after a gate"
        reuse = ""
        if control.reuses_self_attention:
            reuse = (
                f"; its self-attention reuse (warm_up={control.warm_up}, sp_interval={control.sp_interval}, "
                f"fi_interval={control.fi_interval}) reuses no step of it ("
                + ("none of its layers is self-attention)" if not selfs else
                   "it reuses between stores every sp_interval steps from warm_up to the gate, every fi_interval steps "
                   "after the gate)")
            )
        return (
            f"its gate_step={control.gate_step} is not less than the {count} steps of this call ({allowed}), so no "
            f"cross-attention is cached and CFG is never dropped{reuse}: the output is the stock one"
        )

    def text_switch_refusal(self, step: StepInfo) -> str | None:
        gate = self.tgate.gate_step
        if step.index < gate:  # the cross-attention it stores at step gate_step - 1 is made with the new text
            return None
        return (f"from its gate step {gate} on it reuses the cross-attention it cached at step {gate - 1}, made with the "
                "old text, so the new text would be ignored")

    # -- rows -----------------------------------------------------------------------------------------------------
    def row_plan(self, frame: DenoiserCall) -> RowPlan | None:
        rows = frame.rows
        if frame.step.index < self.tgate.gate_step:
            return None
        uncond = rows.indices("uncond", None)
        if uncond and len(uncond) == len(rows) and frame.extra_pass is None:  # a separate uncond call: not run
            self._record_skipped(frame)
            return RowPlan(reuse_cond=True)
        if not uncond or not rows.indices("cond", None):
            return None
        self._dropped = (frame.number, len(rows.indices("uncond", None)))
        return RowPlan(select=RowSelect("uncond", label="cond"))

    def _record_skipped(self, frame: DenoiserCall) -> None:
        rows, step = len(frame.rows), frame.step.index
        for layer in self.accountant.adapter.layers:
            self.report.record(step, layer.name, "skipped", 0.0, self.accountant.full(layer, frame, rows))

    # -- layers ---------------------------------------------------------------------------------------------------
    def action(self, layer: LayerInfo, step: int) -> Action:
        control = self.tgate
        if layer.kind == "cross":
            return cross_action(step, control.gate_step, self.count)
        return self_action(step, control.gate_step, self.count, control.warm_up, control.sp_interval, control.fi_interval)

    def edit(self, layer: LayerInfo, frame: DenoiserCall) -> Edit | None:
        if self.pending and self.pending[0].number != frame.number:
            self.settle()
        # the rows the selection dropped count in the baseline of the forward that holds the selected rows (not in
        # a separate forward of perturbed rows made for the same denoiser call)
        selected_here = self._dropped[0] == frame.number and frame.rows.indices("cond", None)
        dropped = self._dropped[1] if selected_here else 0
        rows, baseline = len(frame.rows), len(frame.rows) + dropped
        self.accountant.see(frame, baseline)
        pass_index = self.passes(frame)
        step = frame.step.index
        action = self.action(layer, step)
        one = self.accountant.full(layer, frame, 1)
        if action == "compute":
            self.report.record(step, layer.name, "nocfg" if dropped else "full", rows * one, baseline * one)
            return None
        if action != "reuse":  # reuse records hit or miss when it runs
            self.report.record(step, layer.name, "store", rows * one, baseline * one)
        if frame.compiled:
            return self.traced_edit(layer, frame, action, pass_index, one, baseline)
        return Edit(hooks=(_TGateHook(self, layer, action, pass_index, one, baseline),))

    def traced_edit(self, layer: LayerInfo, frame: DenoiserCall, action: Action, pass_index: Any, one: float,
                    baseline: int) -> Edit | None:
        """The edit for a compiled forward: a reused output is looked up now, and a stored one is kept on the hook
        and filed into the cache before the next forward's edits (`settle`). The graph then holds no cache lookup,
        no step and no report (dynamo would guard on each, and recompile every step)."""
        if action != "reuse":
            hook = _TracedTGateHook(layer, frame, action, pass_index)
            self.pending.append(hook)
            return Edit(hooks=(hook,))
        value = self.load(layer, frame.rows, pass_index)
        self.record_lookup(layer, frame.step.index, value, len(frame.rows) * one, baseline * one)
        return None if value is None else Edit(hooks=(_TracedTGateHook(layer, frame, action, pass_index, value),))

    def record_lookup(self, layer: LayerInfo, step: int, value: Any, computed: float, full: float) -> None:
        """Report a reuse: a hit, or a miss (the layer computes, `computed` FLOPs; a cross-attention miss warns)."""
        if value is None:
            self.report.record(step, layer.name, "miss", computed, full)
            if layer.kind == "cross":
                self.warn_miss(layer)
        else:
            self.report.record(step, layer.name, "cached", 0.0, full, hit=True)

    def settle(self) -> None:
        """File the outputs the last compiled forward kept into the caches (before the next forward's edits)."""
        pending, self.pending = self.pending, []
        for hook in pending:
            if hook.output is None:  # the layer did not run (a reused block, another expert)
                continue
            if hook.action == "store":
                self.store(hook.layer, hook.rows, hook.output, hook.pass_index)
            elif hook.action == "store_mean":
                self.store_mean(hook.layer, hook.rows, hook.output, hook.extra_pass)

    def store(self, layer: LayerInfo, rows: RowLayout, result: Any, pass_index: Any) -> None:
        cache = self.caches[layer.index]
        if self.mean_mode.pop(layer.index, False):
            cache.clear()
        cache.store(rows, result, row_keys(rows, pass_index))

    def store_mean(self, layer: LayerInfo, rows: RowLayout, result: Any, extra_pass: Any = None) -> None:
        """The mean of each prompt's uncond and cond outputs (the cond output alone without CFG). A separate uncond
        call (Wan) folds its outputs into the cond call's, stored just before at the same step. The outputs of an
        extra forward (`extra_pass`: SAG's degraded rows, uncond or, without CFG, cond) are not the call's own."""
        if extra_pass is not None:
            return
        cond = rows.indices("cond", None)
        if not cond:
            uncond = rows.indices("uncond", None)
            if uncond and len(uncond) == len(rows) and self.mean_mode.get(layer.index):
                cache = self.caches[layer.index]
                stored = cache.load(rows, ["mean"] * len(rows))
                if stored is not None:
                    cache.store_by_prompt("mean", tuple(row.prompt for row in rows.rows), (stored + result) / 2)
            return  # otherwise a forward of perturbed copies only (separate guidance rows): the mean is not theirs
        uncond = {rows.rows[i].prompt: i for i in rows.indices("uncond", None)}
        prompts = tuple(rows.rows[i].prompt for i in cond)
        value = take_rows(result, cond, self.index)
        if uncond:
            value = (take_rows(result, [uncond[p] for p in prompts], self.index) + value) / 2
        cache = self.caches[layer.index]
        cache.clear()
        cache.store_by_prompt("mean", prompts, value)
        self.mean_mode[layer.index] = True

    def load(self, layer: LayerInfo, rows: RowLayout, pass_index: Any) -> Any | None:
        cache = self.caches[layer.index]
        keys = ["mean"] * len(rows) if self.mean_mode.get(layer.index) else row_keys(rows, pass_index)
        return cache.load(rows, keys)

    def warn_miss(self, layer: LayerInfo) -> None:
        """Once per call: a cross-attention layer reached the gate's reuse with nothing stored (it did not run at step
        gate - 1: Wan 2.2's second expert when the gate falls before it takes over), so it computes, without CFG."""
        if self.warned:
            return
        self.warned = True
        warnings.warn(
            f"attnctl: TGate has no stored cross-attention at {layer.name} after its gate step {self.tgate.gate_step} (the "
            "layer did not run at the step before it; on Wan 2.2 choose a gate step after the switch to the low-noise "
            "expert): such layers compute their cross-attention from the one row that runs after the gate, and CFG stays dropped "
            "(handle.outputs report them as 'miss')",
            stacklevel=2,
        )

    def finish(self) -> None:
        self.warned = False
        for cache in self.caches.values():
            cache.clear()
        self.index.clear()
        self.mean_mode.clear()
        self.pending.clear()
        self.accountant._frame = None


class _TGateHook(LayerHook):

    def __init__(self, bound: TGateBound, layer: LayerInfo, action: Action, pass_index: Any, one_row: float, baseline: int):
        self.bound, self.layer, self.action, self.pass_index = bound, layer, action, pass_index
        self.one_row, self.baseline = one_row, baseline

    def reuse(self, call: AttentionCall, hidden: Any, context: Any) -> Any | None:
        if self.action != "reuse":
            return None
        value = self.bound.load(self.layer, call.rows, self.pass_index)
        self.bound.record_lookup(self.layer, call.step.index, value, len(call.rows) * self.one_row, self.baseline * self.one_row)
        return value

    def result(self, call: AttentionCall, result: Any) -> Any:
        if self.action == "store":
            self.bound.store(self.layer, call.rows, result, self.pass_index)
        elif self.action == "store_mean":
            self.bound.store_mean(self.layer, call.rows, result, call.frame.extra_pass)
        return result


class _TracedTGateHook(LayerHook):
    """TGATE's layer in a compiled forward (`TGateBound.traced_edit`): returns the output looked up with the edit, or
    keeps the layer's output for `TGateBound.settle`. Dynamo sees one tensor attribute and one attribute store."""

    def __init__(self, layer: LayerInfo, frame: DenoiserCall, action: Action, pass_index: Any, value: Any = None):
        self.layer, self.rows, self.number, self.action, self.pass_index = layer, frame.rows, frame.number, action, pass_index
        self.extra_pass = frame.extra_pass
        self.value = value
        self.output: Any = None

    def reuse(self, call: AttentionCall, hidden: Any, context: Any) -> Any | None:
        return self.value

    def result(self, call: AttentionCall, result: Any) -> Any:
        self.output = result
        return result
