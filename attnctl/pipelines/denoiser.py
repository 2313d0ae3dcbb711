"""attnctl's hooks around each denoiser call (docs/architecture.md, steps 3 and 4).

Every denoiser call opens a frame (step, rows, geometry) for the processors. When guidance controls
add perturbed rows, they are batched with the pipeline's rows in one forward (every batched input is
re-batched), and `D = sum_k term_k(cond, perturbed_k)` is added to every row the pipeline combines, so
the pipeline's own CFG gives `uncond + s (cond - uncond) + D` for any scale s (a pipeline that rescales its CFG
result gets D on the uncond rows only, `rescale_shares`). In a separate uncond call
(Flux true CFG) and in SD3's own skip-layer pass the `D` of the same step's cond call is added.

A guidance term that needs the first forward's output (SAG's degraded input) is a `SecondPass`: after the
forward it gets a `FirstPass` (the pipeline rows' prediction, their inputs, and a way to run the denoiser
again; those extra forwards are frames with `extra_pass` set) and returns its share of `D`.
A control may instead select rows (`RowSelect`, TGATE after its gate): only those run, and their prediction is
spread to every row.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import torch

from ..control import Bound
from ..denoiser_call import DenoiserCall, Row, RowLayout, RowPlan, host_tensor
from ..errors import CallLayoutError, UnsupportedError
from ..families.base import LayerInfo, ModelAdapter, RowGroups, RowList
from ..foreign_patches import keyed_cache_context, stateful_forward


def _first(output: Any) -> Any:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple):
        return output[0]
    return output.sample


def first_tensor(output: Any) -> torch.Tensor:
    """The denoiser's prediction as one (B, ...) tensor; a list of per-row predictions (Z-Image) is stacked."""
    first = _first(output)
    return torch.stack(list(first)) if isinstance(first, (list, tuple)) else first


def replace_first(output: Any, value: torch.Tensor) -> Any:
    """`output` with its prediction replaced by `value` (B, ...), given back as a list of rows where it was one."""
    if isinstance(_first(output), list):
        value = list(value.unbind(0))
    if isinstance(output, torch.Tensor):
        return value
    if isinstance(output, tuple):
        return (value, *output[1:])
    if dataclasses.is_dataclass(output):
        return dataclasses.replace(output, sample=value)
    output.sample = value
    return output


def rebatch(inputs: dict[str, Any], names: tuple[str, ...], dict_names: tuple[str, ...], batch: int, index: tuple[int, ...]) -> dict[str, Any]:
    """Inputs with every batched tensor re-indexed by `index` (rows of the original batch); a `RowGroups` input by
    whole groups (its rows k*i .. k*i + k - 1 for batch row i)."""
    index = tuple(index)
    expected = f"{batch}" if batch == 1 else f"{batch} (or 1)"

    def take(value: Any, where: str) -> Any:
        if isinstance(value, torch.Tensor):
            if value.ndim == 0 or value.shape[0] == 1 and batch != 1:
                return value
            if value.shape[0] != batch:
                raise CallLayoutError(f"attnctl: input {where} has {value.shape[0]} rows, expected {expected}")
            return value.index_select(0, host_tensor(index, torch.long, value.device))
        if isinstance(value, (list, tuple)):
            return type(value)(take(v, f"{where}[{i}]") for i, v in enumerate(value))
        return value

    out = dict(inputs)
    for name in names:
        value = out.get(name)
        if value is None:
            continue
        if isinstance(name, RowList):  # one entry per row: the list itself is the batch (one entry: for every row)
            if len(value) == 1 and batch != 1:
                continue
            if len(value) != batch:
                raise CallLayoutError(f"attnctl: input {name} holds {len(value)} rows, expected {expected}")
            out[name] = type(value)(value[i] for i in index)
        elif isinstance(name, RowGroups) and isinstance(value, torch.Tensor):
            k = name.rows
            if value.ndim == 0 or value.shape[0] != k * batch:
                rows = value.shape[0] if value.ndim else 0
                raise CallLayoutError(f"attnctl: input {name} has {rows} rows, expected {k} per batch row: {k * batch}")
            grouped = tuple(k * i + j for i in index for j in range(k))
            out[name] = value.index_select(0, host_tensor(grouped, torch.long, value.device))
        else:
            out[name] = take(value, name)
    for name in dict_names:
        if isinstance(out.get(name), dict):
            out[name] = {key: take(value, f"{name}[{key!r}]") for key, value in out[name].items()}
    return out


def _unconsumed(inputs: dict[str, Any]) -> dict[str, Any]:
    """`inputs` with each list input copied: the UNet pops T2I-Adapter residuals off
    `down_intrablock_additional_residuals` as it adds them, so a list one forward was given is empty after it."""
    return {name: list(value) if type(value) is list else value for name, value in inputs.items()}


def call_signature(module: torch.nn.Module) -> inspect.Signature:
    """The denoiser's call signature, taken from its class: another library's instance-level `forward`
    wrapper (DeepCache, cache-dit, accelerate's hooks) often takes `*args, **kwargs` only."""
    return inspect.signature(type(module).forward.__get__(module))


def hook_device(module: torch.nn.Module) -> torch.device | None:
    """The device accelerate's hook on `module` itself moves the forward's inputs to (a pipeline-level device map,
    model CPU offload, a device map's block hooks), or None where it has none or the hook moves nothing (the top hook
    of sequential offload). The hook moves them inside `forward`, after attnctl's pre-hook has seen them; of a
    SequentialHook's parts the last that moves them decides."""
    hook = getattr(module, "_hf_hook", None)
    for part in reversed(getattr(hook, "hooks", (hook,))):
        device = getattr(part, "execution_device", None)
        if device is not None:
            return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    return None


def onload_device(module: torch.nn.Module) -> torch.device | None:
    """The device diffusers' group offloading loads `module`'s group onto before it runs (its weights rest on the
    offload device between uses), or None where `module` leads no group."""
    registry = module.__dict__.get("_diffusers_hook")
    hook = registry.get_hook("group_offloading") if registry is not None else None
    device = getattr(getattr(hook, "group", None), "onload_device", None)
    return None if device is None else torch.device(device)


def placement_devices(module: torch.nn.Module) -> set[torch.device]:
    """The devices `module`'s layers run on: the devices accelerate's hooks on it and its submodules move their inputs
    to, or diffusers' group offloading loads their weights onto, where it has such hooks (device maps, CPU or group
    offload: the weights rest elsewhere), else its parameters' devices. `cuda` without an index is the current one."""
    hooked = {device for part in module.modules() if (device := hook_device(part) or onload_device(part)) is not None}
    return {_indexed(device) for device in hooked or (parameter.device for parameter in module.parameters())}


def _indexed(device: torch.device) -> torch.device:
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device


@dataclasses.dataclass
class _Pending:
    """What the forward hook needs from the pre-hook of the same denoiser call."""

    frame: DenoiserCall  # the rows the pipeline (or a row selection) asked for
    inputs: dict[str, Any]
    batch: int
    plan: RowPlan | None = None
    mode: str = "plain"  # "plain", "terms" (separate uncond / skip-layer pass: add its step's D), "guided", "reused"
    batched: tuple[Any, ...] = ()
    outer: DenoiserCall | None = None  # the pipeline's frame when a control selected rows
    restore: Callable[[], None] | None = None  # puts back diffusers' cache context (keyed_cache_context)
    skips_layers: bool = False  # the pipeline's own skip-layer pass (SD3's skip_layers): some blocks do not run


#: What a control may do at a layer whose sequence holds reference-image tokens (Flux.2 `image=`, Qwen-Image Edit): the
#: processors give the controls the text and generated-image queries, extend per-key edits over the reference keys with
#: no change, and let the reference queries attend as stock (`processors/references.py`).
REFERENCE_EFFECTS: frozenset[str] = frozenset({"capture", "joint_perturb", "key_bias", "perturb", "query", "sparse", "value_scale"})
#: Needs (`Control.needs`) whose machinery rewrites the latent input, which holds the reference tokens, or the text.
_LATENT_NEEDS: dict[str, str] = {
    "row_inputs": "its own latent input for some rows (a loss pass, a reference row)",
    "appended_text": "tokens appended to the joint text sequence",
    "second_pass": "a second pass over the re-noised latent input",
}


def undefined_over_references(
    controls: tuple[Any, ...], resolved: tuple[tuple[LayerInfo, ...], ...], adapter: Any, idle: frozenset[int] = frozenset(),
) -> tuple[Any, LayerInfo, list[str]] | None:
    """The first (control, layer, effects) whose effects are not defined over tokens the processors leave unedited
    (reference-image tokens, Z-Image's image padding: `REFERENCE_EFFECTS`), or None; controls at positions in `idle`
    edit nothing and are skipped."""
    for position, control in enumerate(controls):
        if position in idle:
            continue
        for layer in resolved[position]:
            effects = sorted(set(control.layer_effects(adapter, layer)) - REFERENCE_EFFECTS)
            if effects:
                return control, layer, effects
    return None


def reference_refusal(
    controls: tuple[Any, ...], resolved: tuple[tuple[LayerInfo, ...], ...], adapter: Any, references: str,
    idle: frozenset[int] = frozenset(),
) -> str | None:
    """Why the controls cannot run where `references` (a description) are in the sequence, or None: a control that
    rewrites the latent input or the text (`_LATENT_NEEDS`), or whose effects are not defined over the tokens the
    processors leave unedited (`undefined_over_references`). Checked per call, and at apply for the pipelines whose
    every call has them (`ModelAdapter.reference_pipelines`)."""
    for position, control in enumerate(controls):
        need = next((_LATENT_NEEDS[n] for n in control.needs if n in _LATENT_NEEDS), None)
        if need is not None and position not in idle:
            return f"attnctl: {type(control).__name__} needs {need}, and {references}; not supported with reference images"
    found = undefined_over_references(controls, resolved, adapter, idle)
    if found is None:
        return None
    control, layer, effects = found
    return (
        f"attnctl: {type(control).__name__} ({', '.join(effects)} at {layer.name}) is not defined over the reference-image "
        f"tokens: {references}; with reference images attnctl supports controls whose effects are "
        f"{', '.join(sorted(REFERENCE_EFFECTS))}"
    )


def _skipped_error(skipped: tuple[Bound, tuple[LayerInfo, ...]], frame: DenoiserCall, adapter: ModelAdapter) -> UnsupportedError:
    bound, layers = skipped
    name = type(bound.control).__name__
    more = f" (and {len(layers) - 1} more of its layers)" if len(layers) > 1 else ""
    return UnsupportedError(
        f"attnctl: {name} acts on {layers[0].name}{more}, which did not run in the {adapter.family} denoiser's call at "
        f"step {frame.step.index}: something outside attnctl skipped its block (another library's block cache, such as "
        f"DeepCache or cache-dit, or a hook that skips layers); {name} cannot share the denoiser with a step cache: {bound.control.step_cache_refusal}. "
        f"Disable what skips it, or leave {name} out"
    )


def _layout_key(rows: RowLayout) -> str:
    """A call layout as a cache-context suffix: each row's branch and perturbation tag."""
    return ",".join(f"{row.branch}{'+' + row.tag if row.tag else ''}" for row in rows.rows)


class DenoiserHooks:
    """attnctl's entry into each denoiser call: a forward pre-hook and a forward hook on the denoiser
    (`register_forward_pre_hook` / `register_forward_hook`, owned by the handle and removed with it).

    Hooks, not an instance-level `forward` wrapper: another library that saves and restores `forward`
    (DeepCache, cache-dit, accelerate: `orig = m.forward; m.forward = new; ...; m.forward = orig`) never
    captures attnctl, and attnctl never captures it; both stack in any order. The inputs are bound with the
    class's signature. Both hooks run outside torch.compile's graph (`torch.compiler.disable`): the
    bookkeeping is Python, the denoiser's forward is compiled (docs: README "Works with").
    """

    def __init__(self, runtime: Any, module: torch.nn.Module, processors: dict[str, Any], others: tuple[torch.nn.Module, ...] = (),
                 reuse_calls: bool = False):
        self.runtime = runtime
        self.processors = processors
        self.modules = (module, *others)  # the pipeline's denoiser experts (Wan 2.2's transformer_2), all of one class
        self.module = module  # the expert of the call in progress: attnctl's extra forwards run it
        self.signature = call_signature(module)
        self.main_input = runtime.adapter.batched_inputs[0]
        self._pending: _Pending | None = None
        self._passthrough = 0  # >0 while attnctl runs an extra forward (its frame is set by attnctl)
        self._references_checked: Any = None  # the pipeline call whose controls were checked for reference tokens
        self._padding_checked: Any = None  # the pipeline call whose controls were checked for image padding tokens
        self.compiled = False  # set by the handle at each pipeline call: edits are then computed before the forward
        runtime.extra_forward = self.call_with  # `BindContext.run_denoiser` (latent optimisation's loss passes)
        self._handles = tuple(
            (
                expert.register_forward_pre_hook(self._pre, with_kwargs=True, prepend=True),
                expert.register_forward_hook(self._post, with_kwargs=True, prepend=True),  # others see the pipeline's rows
            )
            for expert in self.modules
        )
        # `RowPlan.reuse_cond`: a forward hook cannot skip the forward, so the skip is a diffusers model hook (the
        # registry diffusers' own caches use), installed only for controls that may ask for it
        self._cond_output: tuple[Any, int, Any] | None = None  # (pipeline call, step, what the step's cond call returned)
        self._reused: Any = None  # the output the next forward returns without running
        self._reuse_hooks = tuple(_install_reuse_hook(expert, self) for expert in self.modules) if reuse_calls else ()

    @property
    def installed(self) -> bool:
        return all(
            pre.id in expert._forward_pre_hooks and post.id in expert._forward_hooks
            for expert, (pre, post) in zip(self.modules, self._handles)
        )

    def remove(self) -> None:
        for pair in self._handles:
            for handle in pair:
                handle.remove()
        for expert, installed in zip(self.modules, self._reuse_hooks):
            _remove_reuse_hook(expert, *installed)
        self._reuse_hooks = ()
        self._drop_pending()
        self._cond_output = self._reused = None

    def _drop_pending(self) -> None:
        """Forget the forward in progress; a forward that raised never reached `_post`, so the diffusers cache context
        or state it keyed apart (`keyed_cache_context`) is put back here."""
        pending, self._pending = self._pending, None
        if pending is not None and pending.restore is not None:
            pending.restore()

    def take_reused(self) -> Any:
        """The output the current forward returns without running (None: run it), consumed."""
        output, self._reused = self._reused, None
        return output

    def _arguments(self, inputs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        bound = inspect.BoundArguments(self.signature, inputs)
        return bound.args, bound.kwargs

    def _cache_states(self) -> dict[Any, Any] | None:
        call = self.runtime.call
        return None if call is None else call.cache_states

    def call_with(self, inputs: dict[str, Any], frame: DenoiserCall) -> Any:
        """An extra forward of attnctl's own (separate perturbations, second passes) with `frame` set."""
        wrapper = stateful_forward(self.module)
        if wrapper is not None:
            raise UnsupportedError(
                f"attnctl: a control runs the {self.runtime.adapter.family} denoiser again on {len(frame.rows)} rows (SAG's "
                f"degraded pass, PAG(separate=True), a latent optimiser's loss pass), and the denoiser's forward is "
                f"{wrapper}: it keeps features of the pipeline's own calls across steps, which an extra forward of "
                "other rows would overwrite or misread. Disable the cache, or leave the control out"
            )
        args, kwargs = self._arguments(_unconsumed(inputs))
        self._passthrough += 1
        self.runtime.enter(frame)
        if self.compiled:
            self.runtime.prefill_edits(self.processors, self.module)
        # a batch of attnctl's beside the pipeline's call of the step
        restore = keyed_cache_context(self.module, f"pass:{_layout_key(frame.rows)}", self._cache_states(), replaces_call=False)
        try:
            return self.module(*args, **kwargs)
        finally:
            if restore is not None:
                restore()
            self.runtime.leave()
            self._passthrough -= 1

    @torch.compiler.disable
    def _pre(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self._passthrough:
            return None
        runtime, adapter = self.runtime, self.runtime.adapter
        runtime.refuse_other_thread()  # before the state of a forward the call may have in progress there is touched
        self._drop_pending()
        self._reused = None  # never left over from a call that failed before its forward
        self.module = module
        inputs = dict(self.signature.bind(*args, **kwargs).arguments)
        batch = adapter.batch_size(inputs)
        frame = runtime.open_frame(inputs, batch, module)
        if frame.canvas.reference_len:
            self._check_reference_tokens(frame)
        if frame.canvas.image_pad:
            self._check_image_padding(frame)
        given = inputs
        inputs, frame = runtime.transform_inputs(frame, inputs)
        outer = None
        selection = runtime.selection(frame)
        if selection is not None:
            layout, index = frame.rows.selected(selection.branch, selection.label)
            if not index:
                raise CallLayoutError(f"attnctl: a control selected the {selection.branch} rows, but this denoiser call has none")
            outer = frame
            conditioning = adapter.conditioning_inputs
            source = frame.rows.counterparts(index, selection.label) if selection.label else index
            inputs = rebatch(inputs, tuple(n for n in adapter.batched_inputs if n not in conditioning), adapter.dict_inputs, batch, index)
            inputs = rebatch(inputs, tuple(n for n in adapter.batched_inputs if n in conditioning), (), batch, source)
            frame = dataclasses.replace(frame, rows=layout, inputs=inputs)
            batch = len(index)
        pending = _Pending(frame, _unconsumed(inputs), batch, outer=outer)
        skip_kwarg = runtime.protocol.skip_layer_kwarg
        pending.skips_layers = bool(skip_kwarg and inputs.get(skip_kwarg) is not None)
        call_frame, call_inputs = frame, inputs
        plan = runtime.row_plan(frame)
        if plan.reuse_cond:
            self._reused = self._reused_output(frame)
            pending.mode = "reused"
        if plan.perturbations or plan.second:
            pending.plan = plan
            cond = frame.rows.indices("cond", None)
            if not cond or pending.skips_layers:
                pending.mode = "terms"
            else:
                pending.mode = "guided"
                pending.batched = tuple(p for p in plan.perturbations if not p.separate)
                if pending.batched:
                    layout, source = frame.rows.with_perturbed(tuple(p.tag for p in pending.batched))
                    call_inputs = rebatch(inputs, adapter.batched_inputs, adapter.dict_inputs, batch, source)
                    call_frame = dataclasses.replace(frame, rows=layout, inputs=call_inputs)
        runtime.enter(call_frame)
        if self.compiled and self._reused is None:  # a reused call runs no layer: no edits (eager asks for none)
            runtime.prefill_edits(self.processors, module)
        if call_frame is not pending.frame or outer is not None:  # a batch of attnctl's: diffusers' caches keyed apart
            pending.restore = keyed_cache_context(module, _layout_key(call_frame.rows), self._cache_states())
        self._pending = pending
        if call_inputs is given:
            return None
        # the caller's split of positional and keyword arguments, kept for other hooks and wrappers
        names = list(call_inputs)
        positional = tuple(call_inputs[name] for name in names[: len(args)])
        return positional, {name: call_inputs[name] for name in names[len(args) :]}

    @torch.compiler.disable
    def _post(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        if self._passthrough:
            return None
        pending, self._pending = self._pending, None
        skipped = None
        if pending is not None and pending.mode != "reused" and not pending.skips_layers:
            skipped = self.runtime.skipped_layers(module)
        self.runtime.leave()
        if pending is None:
            return None
        if pending.restore is not None:
            pending.restore()
        if skipped is not None:
            raise _skipped_error(skipped, pending.frame, self.runtime.adapter)
        self._reused = None
        if pending.mode == "terms":
            output = self._terms(pending, output)
        elif pending.mode == "guided":
            output = self._guided(pending, output)
        if pending.outer is not None:
            output = _spread_selected(pending.outer, pending.frame, output)
        elif self._reuse_hooks and pending.frame.rows.indices("cond", None) and not pending.frame.rows.indices("uncond", None):
            self._cond_output = (self.runtime.call, pending.frame.step.index, output)
        return output

    def _reused_output(self, frame: DenoiserCall) -> Any:
        saved = self._cond_output
        if saved is None or saved[0] is not self.runtime.call or saved[1] != frame.step.index:
            raise CallLayoutError(
                "attnctl: a control asked this uncond denoiser call to return its step's cond prediction, but no cond call "
                "came before it at this step (the pipeline is expected to run the cond call first, as Wan's does)"
            )
        if frame.rows.indices("cond", None) or len(frame.rows) != len(first_tensor(saved[2])):
            raise CallLayoutError("attnctl: only a separate uncond call with the cond call's rows can reuse its prediction")
        return saved[2]

    def _terms(self, pending: _Pending, output: Any) -> Any:
        """A separate uncond call (Flux true CFG) or the pipeline's own extra pass (SD3 skip-layer guidance):
        the pipeline combines it with the cond call of the same step, so it gets that call's D."""
        call, step = self.runtime.call, pending.frame.step.index
        terms = call.guidance_terms.get(step)
        if terms is None:
            raise CallLayoutError(
                "attnctl: an uncond-only denoiser call (or SD3's skip-layer pass) came before the cond call of its "
                "step; guidance needs the cond call first (as Flux's true CFG and SD3's pipeline do)"
            )
        return replace_first(output, first_tensor(output) + _spread(terms, pending.frame.rows, call.guidance_prompts.get(step)))

    def _guided(self, pending: _Pending, output: Any) -> Any:
        runtime, adapter = self.runtime, self.runtime.adapter
        frame, inputs, batch, plan = pending.frame, pending.inputs, pending.batch, pending.plan
        base = frame.rows
        cond = base.indices("cond", None)
        names, dicts = adapter.batched_inputs, adapter.dict_inputs
        prediction = first_tensor(output)
        own = prediction[:batch]
        cond_prediction = own[list(cond)]
        total = torch.zeros_like(cond_prediction)
        for k, perturbation in enumerate(pending.batched):
            start = batch + k * len(cond)
            total = total + perturbation.term(cond_prediction, prediction[start : start + len(cond)], frame)
        for perturbation in (p for p in plan.perturbations if p.separate):
            rows = RowLayout(tuple(Row("cond", base.rows[i].prompt, perturbation.tag) for i in cond))
            narrow = rebatch(inputs, names, dicts, batch, cond)
            perturbed = first_tensor(self.call_with(narrow, dataclasses.replace(frame, rows=rows, inputs=narrow)))
            total = total + perturbation.term(cond_prediction, perturbed, frame)
        if plan.second:
            main, sign = self.main_input, adapter.prediction_sign
            first = FirstPass(
                frame, _stacked(inputs, main), _signed(own, sign), main,
                lambda index: _stacked(rebatch(inputs, names, dicts, batch, index), main),
                lambda given, call_frame: self._signed_call(given, call_frame, main, sign),
            )
            for second in plan.second:
                total = total + _signed(second.term(first), sign)
        prompts = tuple(base.rows[i].prompt for i in cond)
        # only the step's own D is read again (by its separate uncond call or extra pass): one step's kept, not all
        runtime.call.guidance_terms = {frame.step.index: total}
        runtime.call.guidance_prompts = {frame.step.index: prompts}
        spread = _spread(total, base, prompts)
        shares = rescale_shares(runtime.pipeline, base)
        if shares is not None:
            weights = host_tensor(shares, torch.float32, spread.device).view(-1, *([1] * (spread.dim() - 1)))
            spread = (spread.to(torch.float32) * weights).to(spread.dtype)
        return replace_first(output, own + spread)

    def _check_reference_tokens(self, frame: DenoiserCall) -> None:
        """Refuse, once per pipeline call, a control that is not defined with reference-image tokens in the sequence
        (`reference_refusal`); a control idle in this call is not refused."""
        runtime = self.runtime
        if self._references_checked is runtime.call:
            return
        reason = reference_refusal(
            runtime.controls, runtime.resolved, runtime.adapter,
            f"this {runtime.adapter.family} call holds {frame.canvas.reference_len} reference-image tokens in its sequence (image=...)",
            idle=self._idle_positions(frame),
        )
        if reason is not None:
            raise UnsupportedError(reason)
        self._references_checked = runtime.call

    def _idle_positions(self, frame: DenoiserCall) -> frozenset[int]:
        """The positions of the controls idle in this call (`Bound.idle_reason`: the handle warns); they edit nothing."""
        call = self.runtime.call
        bound = call.bound if call is not None and call.num_positions is not None else []
        return frozenset(i for i, b in enumerate(bound) if b.idle_reason(frame.step.count) is not None)

    def _check_image_padding(self, frame: DenoiserCall) -> None:
        """Refuse, once per pipeline call, a control whose effects are not defined over the padding tokens between the
        image and the text (Z-Image at a size whose token count is not a multiple of 32: `Canvas.image_pad`). The
        processor handles them as reference-image tokens (`REFERENCE_EFFECTS`); the stock call is never refused."""
        runtime, adapter = self.runtime, self.runtime.adapter
        if self._padding_checked is runtime.call:
            return
        found = undefined_over_references(runtime.controls, runtime.resolved, adapter, self._idle_positions(frame))
        if found is not None:
            control, layer, effects = found
            canvas = frame.canvas
            (rows, cols), height = canvas.token_hw, canvas.latent_hw[0]
            multiple = adapter.image_token_multiple  # the family's padding: one side a multiple of `wide`, the other of
            wide = 1 << (multiple.bit_length() // 2)  # `narrow` (Z-Image's 32 = 8 x 4)
            narrow = max(multiple // wide, 1)
            vae = getattr(runtime.pipeline, "vae_scale_factor", None)
            pixels = vae * (height // rows) if isinstance(vae, int) else None
            sizes = (
                f"; at this pipeline's {pixels} px per token, e.g. a height a multiple of {wide * pixels} px and a width "
                f"a multiple of {narrow * pixels} px (or the other way round)" if pixels else ""
            )
            raise UnsupportedError(
                f"attnctl: {type(control).__name__} ({', '.join(effects)} at {layer.name}) is not defined over the "
                f"{canvas.image_pad} padding tokens {adapter.family} puts between the image and the text at this size: "
                f"its {rows}x{cols} = {rows * cols} image tokens are not a multiple of {multiple}. With such a size "
                f"attnctl supports controls whose effects are {', '.join(sorted(REFERENCE_EFFECTS))}; for "
                f"{type(control).__name__}, use a size whose token grid has a multiple of {multiple} tokens (rows x cols "
                f"with one of them a multiple of {wide} and the other of {narrow}{sizes})"
            )
        self._padding_checked = runtime.call

    def _signed_call(self, inputs: dict[str, Any], frame: DenoiserCall, main: str, sign: int) -> torch.Tensor:
        """A second pass's extra forward: its main input given back as a list of rows where the denoiser takes one,
        its prediction with the scheduler's sign (`ModelAdapter.prediction_sign`)."""
        value = inputs.get(main)
        if isinstance(main, RowList) and isinstance(value, torch.Tensor):
            inputs = {**inputs, main: list(value.unbind(0))}
        return _signed(first_tensor(self.call_with(inputs, frame)), sign)


#: The name of attnctl's model hook in the denoiser's diffusers hook registry (`RowPlan.reuse_cond`).
REUSE_HOOK = "attnctl_reuse_cond_call"


def _install_reuse_hook(module: torch.nn.Module, owner: DenoiserHooks) -> tuple[Any, bool, bool]:
    """Register on `module` a diffusers `ModelHook` whose forward returns `owner.take_reused()` when it is not None and
    runs the module's forward otherwise. Returns (the module's hook registry, whether the module had an instance
    `forward`, whether it had a registry), for `_remove_reuse_hook`."""
    from diffusers.hooks.hooks import HookRegistry, ModelHook

    class ReuseCondCall(ModelHook):
        def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
            output = owner.take_reused()
            if output is not None:
                return output
            return self.fn_ref.original_forward(*args, **kwargs)

    had_forward, had_registry = "forward" in module.__dict__, "_diffusers_hook" in module.__dict__
    registry = HookRegistry.check_if_exists_or_initialize(module)
    registry.register_hook(ReuseCondCall(), REUSE_HOOK)
    return registry, had_forward, had_registry


def _remove_reuse_hook(module: torch.nn.Module, registry: Any, had_forward: bool, had_registry: bool) -> None:
    """Unregister attnctl's model hook; what the registry leaves behind (the class's `forward` bound on the instance,
    an empty registry) goes too when attnctl's hook put it there."""
    registry.remove_hook(REUSE_HOOK, recurse=False)
    forward = module.__dict__.get("forward")
    if not had_forward and getattr(forward, "__func__", None) is type(module).forward and getattr(forward, "__self__", None) is module:
        del module.forward
    if not had_registry and not registry.hooks and module.__dict__.get("_diffusers_hook") is registry:
        del module._diffusers_hook


def _signed(value: torch.Tensor, sign: int) -> torch.Tensor:
    return value if sign == 1 else -value


def _stacked(inputs: dict[str, Any], main: str) -> dict[str, Any]:
    """`inputs` with the main (latent) input as one (B, ...) tensor where the denoiser takes a list of rows."""
    value = inputs.get(main)
    if isinstance(main, RowList) and isinstance(value, (list, tuple)):
        return {**inputs, main: torch.stack(list(value))}
    return inputs


def _spread_selected(outer: DenoiserCall, selected: DenoiserCall, output: Any) -> Any:
    """Give every row of the pipeline's layout the prediction of the selected row with its prompt."""
    prediction = first_tensor(output)
    where = {row.prompt: i for i, row in enumerate(selected.rows.rows)}
    spread = host_tensor(tuple(where[row.prompt] for row in outer.rows.rows), torch.long, prediction.device)
    return replace_first(output, prediction[spread])


@dataclasses.dataclass
class FirstPass:
    """What a `SecondPass` term sees: the pipeline rows' prediction of this denoiser call, and a way to run
    the denoiser again (SAG's degraded forward). Extra forwards are frames with `extra_pass` set."""

    frame: DenoiserCall  # the pipeline's rows (`frame.rows`), step and inputs
    inputs: dict[str, Any]  # the denoiser's inputs for those rows
    prediction: torch.Tensor  # the prediction for those rows, before any guidance term, with the scheduler's sign
    main_input: str  # the latent input's name ("sample", "hidden_states")
    _select: Callable[[tuple[int, ...]], dict[str, Any]] = dataclasses.field(repr=False)
    _call_with: Callable[..., Any] = dataclasses.field(repr=False)

    def select(self, index: tuple[int, ...]) -> dict[str, Any]:
        """The inputs of the rows `index` only (every batched input re-indexed)."""
        return self._select(tuple(index))

    def forward(self, inputs: dict[str, Any], rows: RowLayout, tag: str) -> torch.Tensor:
        """Run the denoiser on `inputs` whose rows are `rows`; returns its prediction."""
        batch = int(inputs[self.main_input].shape[0])
        if batch != len(rows):
            raise CallLayoutError(f"attnctl: an extra forward got {batch} rows but a layout of {len(rows)}")
        frame = dataclasses.replace(self.frame, rows=rows, inputs=inputs, extra_pass=tag)
        return self._call_with(inputs, frame)


def rescale_shares(pipeline: Any, layout: RowLayout) -> tuple[float, ...] | None:
    """Each row's share of the guidance term D where the pipeline rescales its CFG result (`guidance_rescale > 0`,
    SD / SDXL: Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps Are Flawed", rescale toward the
    standard deviation of the cond prediction): the cond rows keep their prediction (share 0) and the uncond rows take
    D / (1 - s), so the pipeline's `uncond' + s (cond - uncond')` is still `uncond + s (cond - uncond) + D` and its
    rescale reads the plain cond prediction, as diffusers' PAG pipelines rescale. None (D on every row) where the
    pipeline does not rescale, runs no CFG, or the rows are not uncond / cond pairs."""
    rescale = getattr(pipeline, "guidance_rescale", None)
    scale = getattr(pipeline, "guidance_scale", None)
    numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (rescale, scale))
    if not numbers or rescale <= 0 or scale <= 1 or getattr(pipeline, "do_classifier_free_guidance", None) is not True:
        return None
    if {row.branch for row in layout.rows} != {"uncond", "cond"}:
        return None
    return tuple(0.0 if row.branch == "cond" else 1.0 / (1.0 - float(scale)) for row in layout.rows)


def _spread(terms: torch.Tensor, layout: RowLayout, prompts: tuple[int, ...] | None) -> torch.Tensor:
    """Per-row guidance terms for every row of `layout`, matched by prompt row."""
    if prompts is None:
        raise CallLayoutError("attnctl: no guidance term was recorded for this step")
    where = {prompt: i for i, prompt in enumerate(prompts)}
    try:
        index = [where[row.prompt] for row in layout.rows]
    except KeyError as missing:
        raise CallLayoutError(f"attnctl: no guidance term for prompt row {missing}") from None
    return terms[host_tensor(tuple(index), torch.long, terms.device)]
