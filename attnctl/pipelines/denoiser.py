"""The wrapper around the denoiser's `forward` (docs/architecture.md, steps 2 and 4).

Every denoiser call opens a frame (step, rows, geometry) for the processors. When guidance controls
add perturbed rows, they are batched with the pipeline's rows in one forward (every batched input is
re-batched), and `D = sum_k term_k(cond, perturbed_k)` is added to every row the pipeline combines, so
the pipeline's own CFG gives `uncond + s (cond - uncond) + D` for any scale s. In a separate uncond call
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

from ..denoiser_call import DenoiserCall, Row, RowLayout, RowPlan, RowSelect, host_tensor
from ..errors import CallLayoutError


def first_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple):
        return output[0]
    return output.sample


def replace_first(output: Any, value: torch.Tensor) -> Any:
    if isinstance(output, torch.Tensor):
        return value
    if isinstance(output, tuple):
        return (value, *output[1:])
    if dataclasses.is_dataclass(output):
        return dataclasses.replace(output, sample=value)
    output.sample = value
    return output


def rebatch(inputs: dict[str, Any], names: tuple[str, ...], dict_names: tuple[str, ...], batch: int, index: tuple[int, ...]) -> dict[str, Any]:
    """Inputs with every batched tensor re-indexed by `index` (rows of the original batch)."""
    index = tuple(index)

    def take(value: Any, where: str) -> Any:
        if isinstance(value, torch.Tensor):
            if value.ndim == 0 or value.shape[0] == 1 and batch != 1:
                return value
            if value.shape[0] != batch:
                raise CallLayoutError(f"attnctl: input {where} has {value.shape[0]} rows, expected {batch} (or 1)")
            return value.index_select(0, host_tensor(index, torch.long, value.device))
        if isinstance(value, (list, tuple)):
            return type(value)(take(v, f"{where}[{i}]") for i, v in enumerate(value))
        return value

    out = dict(inputs)
    for name in names:
        if out.get(name) is not None:
            out[name] = take(out[name], name)
    for name in dict_names:
        if isinstance(out.get(name), dict):
            out[name] = {key: take(value, f"{name}[{key!r}]") for key, value in out[name].items()}
    return out


def make_forward(runtime: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    adapter = runtime.adapter
    signature = inspect.signature(adapter.denoiser.forward)
    main_input = adapter.batched_inputs[0]

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def call_with(inputs: dict[str, Any], frame: DenoiserCall) -> Any:
            bound = inspect.BoundArguments(signature, inputs)
            runtime.enter(frame)
            try:
                return original(*bound.args, **bound.kwargs)
            finally:
                runtime.leave()

        def rows_of(inputs: dict[str, Any], frame: DenoiserCall, batch: int) -> Any:
            plan = runtime.row_plan(frame)
            if not plan.perturbations and not plan.second:
                return call_with(inputs, frame)
            return guided(inputs, frame, batch, plan, call_with)

        def forward(*args: Any, **kwargs: Any) -> Any:
            inputs = runtime.bind_inputs(args, kwargs)
            batch = int(inputs[main_input].shape[0])
            frame = runtime.open_frame(inputs, batch)
            inputs, frame = runtime.transform_inputs(frame, inputs)
            selection = runtime.selection(frame)
            if selection is not None:
                return selected(inputs, frame, batch, selection, rows_of)
            return rows_of(inputs, frame, batch)

        return forward

    def selected(inputs, frame: DenoiserCall, batch: int, selection: RowSelect, rows_of) -> Any:
        """Run only the selected rows (guidance rows still added to them), then give every row of the pipeline's
        layout the prediction of the selected row with its prompt."""
        layout, index = frame.rows.selected(selection.branch, selection.label)
        if not index:
            raise CallLayoutError(f"attnctl: a control selected the {selection.branch} rows, but this denoiser call has none")
        narrow = rebatch(inputs, adapter.batched_inputs, adapter.dict_inputs, batch, index)
        output = rows_of(narrow, dataclasses.replace(frame, rows=layout, inputs=narrow), len(index))
        prediction = first_tensor(output)
        where = {row.prompt: i for i, row in enumerate(layout.rows)}
        spread = host_tensor(tuple(where[row.prompt] for row in frame.rows.rows), torch.long, prediction.device)
        return replace_first(output, prediction[spread])

    def guided(inputs, frame: DenoiserCall, batch: int, plan: RowPlan, call_with) -> Any:
        base = frame.rows
        cond = base.indices("cond", None)
        step = frame.step.index
        skip_kwarg = runtime.protocol.skip_layer_kwarg
        if not cond or (skip_kwarg and inputs.get(skip_kwarg) is not None):
            # a separate uncond call (Flux true CFG) or the pipeline's own extra pass (SD3 skip-layer guidance):
            # the pipeline combines it with the cond call of the same step, so it gets that call's D
            output = call_with(inputs, frame)
            terms = runtime.call.guidance_terms.get(step)
            if terms is None:
                raise CallLayoutError(
                    "attnctl: an uncond-only denoiser call (or SD3's skip-layer pass) came before the cond call of its "
                    "step; guidance needs the cond call first (as Flux's true CFG and SD3's pipeline do)"
                )
            return replace_first(output, first_tensor(output) + _spread(terms, base, runtime.call.guidance_prompts.get(step)))
        batched = tuple(p for p in plan.perturbations if not p.separate)
        layout, source = base.with_perturbed(tuple(p.tag for p in batched))
        names, dicts = adapter.batched_inputs, adapter.dict_inputs
        wide = rebatch(inputs, names, dicts, batch, source) if batched else inputs
        output = call_with(wide, dataclasses.replace(frame, rows=layout, inputs=wide))
        prediction = first_tensor(output)
        own = prediction[:batch]
        cond_prediction = own[list(cond)]
        total = torch.zeros_like(cond_prediction)
        for k, perturbation in enumerate(batched):
            start = batch + k * len(cond)
            total = total + perturbation.term(cond_prediction, prediction[start : start + len(cond)], frame)
        for perturbation in (p for p in plan.perturbations if p.separate):
            rows = RowLayout(tuple(Row("cond", base.rows[i].prompt, perturbation.tag) for i in cond))
            narrow = rebatch(inputs, names, dicts, batch, cond)
            perturbed = first_tensor(call_with(narrow, dataclasses.replace(frame, rows=rows, inputs=narrow)))
            total = total + perturbation.term(cond_prediction, perturbed, frame)
        if plan.second:
            first = FirstPass(frame, inputs, own, main_input, lambda index: rebatch(inputs, names, dicts, batch, index), call_with)
            for second in plan.second:
                total = total + second.term(first)
        prompts = tuple(base.rows[i].prompt for i in cond)
        runtime.call.guidance_terms[step] = total
        runtime.call.guidance_prompts[step] = prompts
        return replace_first(output, own + _spread(total, base, prompts))

    return make


@dataclasses.dataclass
class FirstPass:
    """What a `SecondPass` term sees: the pipeline rows' prediction of this denoiser call, and a way to run
    the denoiser again (SAG's degraded forward). Extra forwards are frames with `extra_pass` set."""

    frame: DenoiserCall  # the pipeline's rows (`frame.rows`), step and inputs
    inputs: dict[str, Any]  # the denoiser's inputs for those rows
    prediction: torch.Tensor  # the denoiser's prediction for those rows, before any guidance term
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
        return first_tensor(self._call_with(inputs, frame))


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
