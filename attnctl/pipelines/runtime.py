"""Per-handle runtime: the state of the pipeline call in progress and of the denoiser call in progress.

The handle feeds it from instance-level hook points (docs/architecture.md): `check_inputs` starts a call,
`encode_prompt` records the prompts and whether CFG is on, `scheduler.step` advances the step,
`transformer.cache_context` names Flux's cond / uncond passes, the denoiser's `forward` opens a frame,
`maybe_free_model_hooks` ends the call (or, for a pipeline that returns before it, reading `handle.outputs`, the
next call or `remove()`: `Runtime.call_returned`). Processors ask `edit_for(layer)` in the hot path: a dict lookup
once the frame's edit for that layer is built.
"""

from __future__ import annotations

import contextlib
import dis
import functools
import inspect
import sys
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .. import kernels
from ..control import BindContext, Bound, Control
from ..denoiser_call import DenoiserCall, Perturbation, RowPlan, RowSelect, SecondPass, input_device
from ..errors import BackendError, CallLayoutError, HandleError, IdleControlWarning
from ..families.base import Canvas, LayerInfo, ModelAdapter
from ..foreign_patches import settle_plain_states
from ..instance import Wrapped, wrap_method
from ..kernels import choose_backend, choose_traced_backend, prepare_traced_labels
from ..kernels.spec import LabelMask, forget_mask_conversions
from ..processors.edit import AttentionCall, Edit, merge_edits
from ..steps import StepGroups, StepInfo, call_frame, loop_timesteps, step_groups
from ..tokens import PromptTokens
from .denoiser import hook_device, rebatch
from .prompts import PromptCache, encode_prompts
from .protocol import (
    CallProtocol,
    PromptRecord,
    base_rows,
    branch_text_len,
    cfg_dropped,
    encoder_prompts,
    has_uncond_rows,
    named_call_arguments,
    pipeline_cfg,
    sequential_branch,
    textless_reason,
)


@dataclass
class PipelineCallState:
    """Everything about one pipeline call; replaced wholesale at the next call's start."""

    encode_calls: list[dict[str, Any]] = field(default_factory=list)
    # the text length (tokens) of the embeddings each of those calls returned (None: not known, or it raised): the
    # negative prompt's own call may have another length than the prompt's (Qwen-Image pads each call to its longest)
    encode_lengths: list[int | None] = field(default_factory=list)
    positions_done: int = 0  # scheduler.step calls so far
    num_positions: int | None = None
    groups: StepGroups = field(default_factory=StepGroups)  # how the scheduler's positions group into steps
    bound: list[Bound] | None = None
    input_order: tuple[Bound, ...] = ()  # `bound` in the order their `transform_inputs` run (`Bound.input_order`)
    frames: int = 0
    guidance_terms: dict[int, torch.Tensor] = field(default_factory=dict)  # the last guided step -> its D, for separate cond/uncond calls
    guidance_prompts: dict[int, tuple[int, ...]] = field(default_factory=dict)  # that step -> prompt row of each D row
    images: Any = None  # what pipe.image_processor.postprocess returned (controls with `needs_images`)
    position_calls: dict[int, int] = field(default_factory=dict)  # scheduler position -> denoiser calls opened there
    pixels: tuple[int, int] | None = None  # (height, width) the pipeline's check_inputs got, when it names them
    owner: CallOwner | None = None  # the pipeline's `__call__` running this call (None where it was not found)
    finished: bool = False  # its bound controls have finished
    cache_states: dict[Any, Any] = field(default_factory=dict)  # diffusers hooks' plain states per batch of attnctl's
    cfg_cut_at: int | None = None  # the step of the first denoiser call after a callback dropped the uncond rows
    # branch (`DenoiserCall.context`) -> the storages of the text input the bound controls follow (`_check_text`)
    text_storages: dict[str | None, frozenset[int]] = field(default_factory=dict)

    @property
    def record(self) -> PromptRecord:
        return PromptRecord(self.encode_calls)


@dataclass(frozen=True, eq=False)
class CallOwner:
    """The pipeline's `__call__` frame a call runs in, and its thread. The frame is held (compared by identity: a
    new frame may reuse a dead one's address) while the call is open; a call that ended with an error releases it at
    the next call of the pipeline, or at `handle.remove()`."""

    frame: Any
    thread: int

    @staticmethod
    def find(pipeline: Any) -> CallOwner | None:
        """The innermost running `__call__` of `pipeline` on this thread's stack, or None."""
        frame = call_frame(pipeline)
        return CallOwner(frame, threading.get_ident()) if frame is not None else None

    def running(self) -> bool:
        """Whether that `__call__` is still on its thread's stack (it has not returned or raised)."""
        frame = sys._getframe(1) if self.thread == threading.get_ident() else sys._current_frames().get(self.thread)
        while frame is not None:
            if frame is self.frame:
                return True
            frame = frame.f_back
        return False

    def calls_here(self, pipeline: Any) -> bool:
        """Whether that `__call__` is running on this thread and makes the call in progress here (a denoiser call, a
        scheduler step) itself: False once it has returned or raised. The call of another pipeline object running
        inside it (a from_pipe sibling or a modular pipeline sharing the denoiser, called from a callback) is refused
        (HandleError). The caller checked the thread; this walks the stack up to that frame, as `running` does."""
        frame = sys._getframe(1)
        foreign = None
        while frame is not None:
            if frame is self.frame:
                if foreign is not None:
                    raise HandleError(
                        f"attnctl: a {type(foreign).__name__} was called from inside a call of the controlled "
                        f"{type(pipeline).__name__} (from a callback?), and it shares that pipeline's denoiser (from_pipe, or "
                        "built from its components): the controls keep the running call's state and would act on the other "
                        "call's denoiser calls. Call the other pipeline after this call returns, or give it a denoiser of its own"
                    )
                return True
            if foreign is None and frame.f_code.co_name == "__call__":
                caller = frame.f_locals.get("self")
                if caller is not pipeline and _is_pipeline(caller):
                    foreign = caller
            frame = frame.f_back
        return False

    def returned(self) -> bool:
        """Whether that `__call__` has returned, rather than raised: it is off the stack and the last instruction it
        ran is a return (a frame that raised stops at the raising instruction or at a re-raise)."""
        if self.running() or self.frame.f_lasti < 0:
            return False
        return dis.opname[self.frame.f_code.co_code[self.frame.f_lasti]] in _RETURNS


#: The bytecode instructions that return from a function (RETURN_CONST: Python 3.12 and 3.13).
_RETURNS = frozenset({"RETURN_VALUE", "RETURN_CONST"})


#: diffusers' pipeline base classes, found by class name in the MRO: a modular pipeline's blocks call a shared
#: denoiser as a classic pipeline does.
_PIPELINE_BASES = frozenset({"DiffusionPipeline", "ModularPipeline"})


def _is_pipeline(obj: Any) -> bool:
    """Whether `obj` is a diffusers pipeline, classic (`DiffusionPipeline`) or modular (`ModularPipeline`)."""
    return obj is not None and any(klass.__name__ in _PIPELINE_BASES for klass in type(obj).__mro__)


class Runtime:
    def __init__(
        self,
        pipeline: Any,
        adapter: ModelAdapter,
        protocol: CallProtocol,
        controls: tuple[Control, ...],
        resolved: dict[int, tuple[LayerInfo, ...]],
        backend: str,
    ):
        self.pipeline = pipeline
        self.adapter = adapter
        self.protocol = protocol
        self.controls = controls
        self.resolved = resolved  # control position -> layers it acts on
        self.backend = backend
        self.call: PipelineCallState | None = None
        self.frame: DenoiserCall | None = None
        self.context: str | None = None  # Flux cache_context name
        self._frame_edits: dict[int, Edit | None] = {}
        self._expert_layers: dict[int, frozenset[int]] = {}  # id(denoiser or expert) -> the indices of its layers
        self._backend_cache: dict[tuple[Any, ...], tuple[str, str]] = {}
        self.backend_log: dict[str, tuple[str, str]] = {}
        self.last_call: PipelineCallState | None = None
        self.outputs: dict[str, Any] = {}
        self.internal = 0  # >0 while attnctl itself calls pipeline methods (not recorded)
        self._call_wraps: list[Wrapped] = []  # controls' instance-level wraps for the current call
        self._call_makers: dict[int, Any] = {}  # id(Wrapped) -> the maker that made it (to re-stack it)
        self.prefilled = False  # True while the processors' `edit_now` holds the current frame's edits (compiled)
        self._prefilled_processors: dict[str, Any] = {}  # whose `edit_now` to clear when the forward ends
        self._canvas_shapes: tuple[tuple[Canvas, torch.device], torch.Tensor] | None = None  # the last `_canvas_shape`
        self._signature = inspect.signature(type(adapter.denoiser).forward.__get__(adapter.denoiser))  # the class's: see denoiser.call_signature
        self._plans: tuple[DenoiserCall, list[RowPlan]] | None = None  # the active bound controls' plans of a frame
        self._handle_caches: dict[int, dict[Any, Any]] = {}  # control position -> its cache for the handle's life
        self._prompts = PromptCache(skip=(adapter.denoiser, *adapter.experts.values()))  # extra prompts, encoded once
        self.differentiable = 0  # >0 while a control's loss pass runs: backends autograd can differentiate only
        self.extra_forward: Any = None  # the denoiser hooks' `call_with` (set by DenoiserHooks)

    def __reduce_ex__(self, protocol: Any) -> Any:
        """A denoiser or pipeline with a live handle cannot be copied or pickled (its hooks reach this runtime)."""
        raise HandleError(
            f"attnctl: a {type(self.pipeline).__name__} (or its denoiser) with a live attnctl handle cannot be copied or "
            "pickled while the handle is applied (the copy would share its state and could not be restored); call "
            "handle.remove() first, copy, then apply to each pipeline"
        )

    # -- call lifecycle -------------------------------------------------------------------------------------
    def begin_call(self, pixels: tuple[Any, Any] | None = None) -> None:
        owner = CallOwner.find(self.pipeline)
        previous = self.call
        failed = self.call_failed()  # its controls finish below and publish what they had: not readable as a call's
        if previous is not None and previous.owner is not None and previous.owner.running():
            if previous.owner.thread != threading.get_ident():
                self._refuse_other_thread()
            if previous.frames and (owner is None or owner.frame is not previous.owner.frame):
                raise HandleError(
                    f"attnctl: this {type(self.pipeline).__name__} was called from inside its own call (a callback?); a "
                    "controlled pipeline runs one call at a time (its controls keep the call's state)"
                )
        if self.call_returned():  # it returned before maybe_free_model_hooks: it ends as a call that ran to its end
            try:
                self.end_call()
            except Exception as error:  # noqa: BLE001 - that call is over; this one starts clean
                warnings.warn(f"attnctl: the controls of the previous call could not finish: {type(error).__name__}: "
                              f"{error}", RuntimeWarning, stacklevel=3)
        try:  # the previous call, if it ended with an error before its end: its controls finish now
            self._finish_bound()
        except Exception as error:  # noqa: BLE001 - that call failed already; this one starts clean
            warnings.warn(f"attnctl: the controls of the previous call, which ended with an error, could not finish: "
                          f"{type(error).__name__}: {error}", RuntimeWarning, stacklevel=3)
        if previous is not None:
            previous.owner = None
        if owner is not None or failed:
            # an encode_prompt made outside a pipeline call (embeddings computed ahead) is recorded but starts no call
            # of the pipeline: the last call's outputs stay readable until the next call's check_inputs (a failed
            # call's never are)
            self.outputs.clear()
        self.call = PipelineCallState(owner=owner)
        if pixels is not None and all(isinstance(p, int) for p in pixels):
            self.call.pixels = (int(pixels[0]), int(pixels[1]))
        self.frame = None
        self.context = None
        self._plans = None

    def _refuse_other_thread(self, shared: bool = False) -> None:
        subject = (f"the {type(self.pipeline).__name__} this denoiser is controlled on (pipelines made with from_pipe share "
                   "it)" if shared else f"this {type(self.pipeline).__name__}")
        raise HandleError(
            f"attnctl: {subject} is in a call in another thread; a controlled pipeline runs one call at a time (its "
            "controls keep the call's state): wait for that call, or give each thread its own pipeline and handle"
        )

    def refuse_other_thread(self, shared: bool = True) -> None:
        """Refuse what is made on another thread while the open call runs: a denoiser call or a scheduler step (a
        from_pipe sibling shares the denoiser and the scheduler: `shared`), or a prompt encoding of this pipeline; it
        would join that call. One `get_ident` when it is not."""
        owner = self.call.owner if self.call is not None else None
        if owner is not None and owner.thread != threading.get_ident() and owner.running():
            self._refuse_other_thread(shared=shared)

    def _owner_calls(self, owner: CallOwner) -> bool:
        """Whether the open call's `__call__` is running and makes the denoiser call or scheduler step in progress;
        refused when it runs on another thread, or when another pipeline's `__call__` inside it makes it
        (`CallOwner.calls_here`). False: it has returned or raised."""
        if owner.thread != threading.get_ident():
            if owner.running():
                self._refuse_other_thread(shared=True)
            return False
        return owner.calls_here(self.pipeline)

    def call_running(self) -> bool:
        """Whether the open call's pipeline `__call__` is running (on any thread)."""
        return self.call is not None and self.call.owner is not None and self.call.owner.running()

    def record_encode(self, arguments: dict[str, Any]) -> int | None:
        """Record an `encode_prompt` call of the pipeline (it starts a call when the open one has run its denoiser):
        its index in the call's record, or None for one made inside the open call's denoising loop (a callback that
        encodes another prompt), which is not recorded and runs as attnctl's own calls do."""
        self.refuse_other_thread(shared=False)
        owner = self.call.owner if self.call is not None else None
        if owner is not None and self.call.frames and owner.running():
            return None  # in the denoising loop (a callback switching the prompt): no new call; `_check_text` decides
        if self.call is None or self.call.frames or self.call_ended():  # an ended call's prompts are not this one's
            self.begin_call()
        # lists copied: a pipeline may rewrite its prompt list in place (ZImagePipeline templates each prompt)
        recorded = {k: list(v) if isinstance(v, list) else v for k, v in arguments.items()}
        if not ({"num_images_per_prompt", "num_videos_per_prompt"} & recorded.keys()) and self.call.owner is not None:
            # an encode_prompt without the argument (ZImagePipeline repeats the embeddings after it): the call's own
            per_prompt = self.call.owner.frame.f_locals.get("num_images_per_prompt")
            if isinstance(per_prompt, int) and not isinstance(per_prompt, bool) and per_prompt > 1:
                recorded["num_images_per_prompt"] = per_prompt
        self.call.encode_calls.append(recorded)
        self.call.encode_lengths.append(None)
        return len(self.call.encode_calls) - 1

    def record_encoded(self, index: int | None, out: Any) -> None:
        """The text length of what the call's `index`-th `encode_prompt` returned (its embeddings come first: a
        (prompts, tokens, channels) tensor in every supported pipeline); a shape, read without a device sync."""
        call = self.call
        if call is None or index is None or not 0 <= index < len(call.encode_lengths):
            return
        embeds = out[0] if isinstance(out, (tuple, list)) and out else out
        if isinstance(embeds, torch.Tensor) and embeds.ndim == 3:
            call.encode_lengths[index] = int(embeds.shape[1])

    def before_step(self) -> None:
        """Before a `scheduler.step`: one made from another thread, or by another pipeline's `__call__` inside the
        open call (a from_pipe sibling shares the scheduler), is refused before it changes the scheduler."""
        owner = self.call.owner if self.call is not None else None
        if owner is not None:
            self._owner_calls(owner)

    def scheduler_stepped(self) -> None:
        if self.call is not None:
            self.call.positions_done += 1

    def end_call(self) -> None:
        try:
            self._finish_bound()
        finally:  # the call is over whatever its controls' finish raised (the next call starts clean)
            if self.call is not None:
                self.call.owner = None  # the pipeline's frame (and its locals) is not kept past the call
                settle_plain_states(self.call.cache_states)
                self.call.cache_states.clear()  # diffusers hooks' states of attnctl's batches hold attention outputs
                self.call.guidance_terms, self.call.guidance_prompts, self.call.images = {}, {}, None
            self._plans = None  # the last frame, whose inputs are the call's latents and text embeddings
            self.last_call = self.call
            self.call = None
            self.frame = None

    def call_ended(self) -> bool:
        """Whether the open call's pipeline `__call__` is no longer running (it raised, or returned without calling
        `maybe_free_model_hooks`)."""
        return self.call is not None and self.call.owner is not None and not self.call.owner.running()

    def call_failed(self) -> bool:
        """Whether the open call ended with an error (its pipeline `__call__` raised)."""
        return self.call_ended() and not self.call.owner.returned()

    def call_returned(self) -> bool:
        """Whether the open call's pipeline `__call__` returned without calling `maybe_free_model_hooks`, where
        attnctl ends a call: StableDiffusionXLAdapterPipeline and the ControlNet (and ControlNet-Union) SDXL inpaint
        pipelines return early for `output_type="latent"`. Such a call ends (`end_call`) when `handle.outputs` is
        read, when the next call starts, or at `handle.remove()`."""
        return self.call_ended() and self.call.owner.returned()

    def drop_handle_caches(self) -> None:
        """Forget what the handle kept across calls (controls' handle caches and the last call's bound controls, with
        their label masks and the backends' dense forms of them, extra prompts' encodings, backend choices): a removed
        handle never runs again, and a `handle` variable outliving `remove()` should not hold them. The last call's
        outputs stay readable."""
        self._handle_caches.clear()
        self._backend_cache.clear()
        self.last_call = None
        self._frame_edits = {}
        self._prompts = PromptCache(skip=(self.adapter.denoiser, *self.adapter.experts.values()))

    def end_returned_call(self) -> None:
        """End the open call if it returned without calling `maybe_free_model_hooks` (`call_returned`)."""
        if self.call_returned():
            self.end_call()

    def end_call_quietly(self) -> None:
        """End a call that ended with an error (its controls' finish errors become a warning). Nothing it published
        stays readable (reports published at bind, results at finish): `handle.outputs` then says the last call
        failed. A call whose `__call__` returned (`call_returned`) ran to its end, and keeps its outputs."""
        failed = self.call is not None and not self.call_returned()
        try:
            self.end_call()
        except Exception as error:  # noqa: BLE001 - that call failed already
            warnings.warn(f"attnctl: the controls of a call that ended with an error could not finish: "
                          f"{type(error).__name__}: {error}", RuntimeWarning, stacklevel=3)
        finally:
            if failed:
                self.outputs.clear()

    def _finish_bound(self) -> None:
        """Every bound control of the call finishes, once (one that raises does not stop the others), and the call's
        wraps are undone; the first error is raised afterwards."""
        errors: list[BaseException] = []
        try:
            if self.call is not None and self.call.bound and not self.call.finished:
                self.call.finished = True  # once: a later begin or end of the call does not finish them again
                for each in self.call.bound:
                    try:
                        each.finish()
                    except Exception as error:  # noqa: BLE001 - raised below, after every control has finished
                        errors.append(error)
        finally:
            self._unwrap_call()
        if errors:
            raise errors[0]

    # -- denoiser calls -------------------------------------------------------------------------------------
    def bind_inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        bound = self._signature.bind(*args, **kwargs)
        return dict(bound.arguments)

    def open_frame(self, inputs: dict[str, Any], batch: int, module: torch.nn.Module | None = None) -> DenoiserCall:
        """The frame of a denoiser call of `module` (the denoiser, or the expert that runs it)."""
        call = self.call
        if call is not None and call.owner is not None and not self._owner_calls(call.owner):  # it raised, or returned early
            self.end_call_quietly()
            call = None
        if call is None or not call.encode_calls:
            raise HandleError(
                f"attnctl: the {self.adapter.family} denoiser was called outside a call of the pipeline it was "
                f"applied to ({type(self.pipeline).__name__}). Pipelines made with from_pipe share the denoiser: "
                "apply attnctl to the pipeline you call (handle.remove() first)."
            )
        forget_mask_conversions()
        canvas = self._canvas(inputs)
        if call.frames == 0:
            self._start_schedule(call)
        step = self._step(call)
        calls_before = call.position_calls.get(call.positions_done, 0)
        call.position_calls[call.positions_done] = calls_before + 1
        context = self.context or sequential_branch(self.protocol, call.record, calls_before)
        cfg_now = pipeline_cfg(self.protocol, self.pipeline, call.record, batch)
        rows = base_rows(self.protocol, call.record, batch, context, inputs, cfg_now)
        frame = DenoiserCall(step=step, rows=rows, canvas=canvas, context=context, inputs=inputs, number=call.frames,
                             expert=None if module is None else self.adapter.expert_name(module),
                             device=self.layer_device(self.adapter.denoiser if module is None else module, inputs))
        if call.bound is None:
            call.bound = self._bind(call, canvas, step, inputs, frame.device)
            call.input_order = tuple(sorted(call.bound, key=lambda bound: bound.input_order))  # stable: control order
        if call.bound:
            self._check_text(call, frame, inputs)
        if call.cfg_cut_at is None and cfg_dropped(self.protocol, call.record, batch, cfg_now):
            self._check_cfg_cut(call, step, inputs, batch)
        call.frames += 1
        return frame

    def _check_text(self, call: PipelineCallState, frame: DenoiserCall, inputs: dict[str, Any]) -> None:
        """Refuse a text input that a callback replaced mid-call (other `prompt_embeds`) when a bound control cannot
        follow it (`Bound.text_switch_refusal`), before this forward runs. Compared by storage, per branch (Flux's true
        CFG passes its negative embeddings in calls of their own): diffusers' CFG-cutoff slices (`prompt_embeds[-1:]`,
        `chunk(2)[-1]`) keep the storage. Host pointers only: no device sync."""
        skip = self.protocol.skip_layer_kwarg
        if skip and inputs.get(skip) is not None:
            return  # SD3's skip-layer pass reads the cond embeddings from before they were batched with the negative ones
        storages = _text_storages(inputs.get(self.adapter.text_input))
        if not storages:
            return
        seen = call.text_storages.get(frame.context)
        if seen is None or call.positions_done == 0:  # no callback_on_step_end has run before the first step's end
            call.text_storages[frame.context] = storages | (seen or frozenset())
            return
        if storages <= seen:
            return
        for bound in call.bound or ():
            reason = bound.text_switch_refusal(frame.step)
            if reason is not None:
                raise CallLayoutError(
                    f"attnctl: the text the controls were bound to changed mid-call: at step {frame.step.index} the "
                    "denoiser reads other text embeddings than the call started with (a callback_on_step_end that returned "
                    f"other prompt_embeds, e.g. from pipe.encode_prompt, or a copy of them), and {type(bound.control).__name__} "
                    f"cannot follow it: {reason}. Change the prompt between calls (stop the call at the switch, then start "
                    "a call with the new prompt from its latents), or leave the control out; callbacks that only slice the "
                    "embeddings (diffusers' CFG-cutoff callbacks) are fine"
                )
        call.text_storages[frame.context] = storages  # the controls follow the new text from here on

    def _check_cfg_cut(self, call: PipelineCallState, step: StepInfo, inputs: dict[str, Any], batch: int) -> None:
        """Once per call, at its first denoiser call without the uncond rows a callback dropped (diffusers' CFG-cutoff
        callbacks): a bound control that cannot follow the cond-only rows from there on (`Control.cfg_cutoff_refusal`)
        is refused, before this forward runs; so are controls when the text rows left no longer match the images
        (`_refuse_cut_text`)."""
        text = inputs.get(self.adapter.text_input)
        if call.bound and isinstance(text, torch.Tensor) and text.ndim == 3 and text.shape[0] != batch:
            self._refuse_cut_text(call, step, int(text.shape[0]), batch)
        for bound in call.bound or ():
            reason = bound.control.cfg_cutoff_refusal
            if reason is not None:
                raise CallLayoutError(
                    f"attnctl: {type(bound.control).__name__} cannot follow this call from step {step.index}: its uncond "
                    "rows were dropped mid-call (the denoiser got the cond rows only, as after diffusers' CFG-cutoff "
                    "callbacks SDCFGCutoffCallback, SDXLCFGCutoffCallback and SD3CFGCutoffCallback, or past Z-Image's "
                    f"cfg_truncation): {reason}. Leave out the callback (or the truncation) or the control (docs/methods.md, "
                    "'Classifier-free guidance cut off mid-call', lists the controls that follow it)"
                )
        call.cfg_cut_at = step.index

    def _refuse_cut_text(self, call: PipelineCallState, step: StepInfo, rows: int, batch: int) -> None:
        """After a callback dropped the uncond rows, `rows` rows of text for `batch` images: refused unless one row
        serves images that all read one prompt in a joint-attention denoiser, which broadcasts it through its
        modulation (diffusers' SD3CFGCutoffCallback keeps `prompt_embeds[-1:]`; with num_images_per_prompt > 1 it
        serves every image of the one prompt)."""
        record = call.record
        one_prompt = record.one_prompt()
        if rows == 1 and one_prompt and self.adapter.text_attention == "joint":
            return
        head = f"attnctl: from step {step.index} the {batch} image row(s) of this call read {rows} row(s) of text"
        if rows > batch:
            raise CallLayoutError(
                f"{head}: more text rows than images. The callback that dropped the uncond rows (set _guidance_scale to 0 "
                "mid-call) left the negative prompt's rows in prompt_embeds: slice them as well (prompt_embeds.chunk(2)[-1], "
                "as diffusers' CFG-cutoff callbacks do)"
            )
        per_prompt = record.per_prompt()
        if not one_prompt:
            why = (f"the call has {record.prompt_rows() // per_prompt} prompts (different texts, or prompt_embeds), so the "
                   "images no longer read their own prompts. Use one prompt per call with it (num_images_per_prompt is fine)")
        elif rows == 1:
            why = (f"the {self.adapter.family} family's denoiser does not broadcast one text row over the images "
                   f"(num_images_per_prompt={per_prompt}; the stock pipeline fails here too)")
        else:
            why = "the callback kept only part of the prompt rows"
        raise CallLayoutError(
            f"{head}: fewer text rows than images. The callback kept too few rows of prompt_embeds (diffusers' "
            f"SD3CFGCutoffCallback and SDCFGCutoffCallback keep prompt_embeds[-1:], one row), and {why}; or use a "
            "callback that keeps the whole cond half (prompt_embeds.chunk(2)[-1], diffusers' 'dynamic classifier-free "
            "guidance' recipe)"
        )

    def transform_inputs(self, frame: DenoiserCall, inputs: dict[str, Any]) -> tuple[dict[str, Any], DenoiserCall]:
        """Let active bound controls change the denoiser's inputs, in `Bound.input_order`; after each change the frame
        (its inputs, and its canvas: e.g. the text length with appended region tokens) follows the new inputs, so the
        next control sees them as the denoiser will."""
        for bound in self.call.input_order:
            if bound.active(frame.step):
                new = bound.transform_inputs(frame, inputs)
                if new is not inputs:
                    inputs = new
                    frame = replace(frame, canvas=self._canvas(inputs), inputs=inputs)
        return inputs, frame

    def _canvas(self, inputs: dict[str, Any]) -> Canvas:
        """The adapter's canvas; an adapter with `canvas_for_call` (Flux) takes the call's pixel size as a hint
        that spares it reading the image ids on the host."""
        for_call = getattr(self.adapter, "canvas_for_call", None)
        pixels = self.call.pixels if self.call is not None else None
        if for_call is None or pixels is None:
            return self.adapter.canvas(inputs)
        canvas = for_call(inputs, pixels, getattr(self.pipeline, "vae_scale_factor", None))
        if canvas.reference_len and self.call.frames == 0:
            # tokens past the size's grid: check once per call that the ids lay them out as references after it
            read = self.adapter.canvas(inputs)
            if read != canvas:  # the size does not describe the generated image (an inpaint pipeline's own size)
                self.call.pixels = None
                return read
        return canvas

    @contextlib.contextmanager
    def internal_calls(self) -> Iterator[None]:
        """Calls of pipeline methods made by attnctl itself inside this block are not recorded."""
        self.internal += 1
        try:
            yield
        finally:
            self.internal -= 1

    def row_plan(self, frame: DenoiserCall) -> RowPlan:
        """The row plans of the bound controls active in `frame`, merged (perturbations and second passes)."""
        found: list[Perturbation] = []
        second: list[SecondPass] = []
        reuse = False
        for plan in self._row_plans(frame):
            if plan is not None:
                found.extend(plan.perturbations)
                second.extend(plan.second)
                reuse = reuse or plan.reuse_cond
        tags = [p.tag for p in found] + [p.tag for p in second]
        if len(set(tags)) != len(tags):
            raise CallLayoutError(f"attnctl: two guidance controls use the same row tag: {tags}")
        if reuse:  # the cond prediction it returns already holds the guidance terms of perturbations and second passes
            return RowPlan(reuse_cond=True)
        return RowPlan(tuple(found), tuple(second))

    def selection(self, frame: DenoiserCall) -> RowSelect | None:
        """The row selection the bound controls ask for in this denoiser call (two different ones conflict)."""
        found: RowSelect | None = None
        for plan in self._row_plans(frame):
            if plan is not None and plan.select is not None:
                if found is not None and plan.select != found:
                    raise CallLayoutError(f"attnctl: two controls select different rows: {found} and {plan.select}")
                found = plan.select
        return found

    def _row_plans(self, frame: DenoiserCall) -> list[RowPlan | None]:
        """The row plans of the active bound controls for `frame`, asked once per frame (the denoiser wrapper
        wants both the selection and the plan)."""
        cached = self._plans
        if cached is not None and cached[0] is frame:
            return cached[1]
        plans = [bound.row_plan(frame) for bound in self.call.bound or () if bound.active(frame.step)]
        self._plans = (frame, plans)
        return plans

    def enter(self, frame: DenoiserCall) -> None:
        self.frame = frame
        self._frame_edits = {}
        self.prefilled = False

    def leave(self) -> None:
        self.frame = None
        self._frame_edits = {}
        self.prefilled = False
        for processor in self._prefilled_processors.values():  # the edits hold tensors (cached outputs) of the call
            processor.edit_now = None
        self._prefilled_processors = {}

    def skipped_layers(self, module: torch.nn.Module) -> tuple[Bound, tuple[LayerInfo, ...]] | None:
        """The first active bound control that needs each of its layers at every step (`Control.step_cache_refusal`)
        with layers of `module` (the denoiser, or the expert, whose forward is ending) whose processors did not run in
        this denoiser call, and those layers: something outside attnctl skipped their blocks (another library's block
        cache). None when every such layer ran, or when the edits were prefilled (compiled: not tracked)."""
        frame, call = self.frame, self.call
        if frame is None or self.prefilled or call is None or not call.bound:
            return None
        held = self._held_layers(module)
        for bound in call.bound:
            if bound.control.step_cache_refusal is None or not bound.active(frame.step):
                continue
            missing = bound.layer_indices & held - self._frame_edits.keys()
            layers = tuple(layer for layer in self.adapter.layers if layer.index in missing and bound.needs_layer(layer, frame))
            if layers:
                return bound, layers
        return None

    def _held_layers(self, module: torch.nn.Module) -> frozenset[int]:
        """The indices of the layers inside `module` (the denoiser, or one of Wan 2.2's experts)."""
        held = self._expert_layers.get(id(module))
        if held is None:
            adapter = self.adapter
            held = self._expert_layers[id(module)] = frozenset(
                layer.index for layer in adapter.layers if adapter.expert_of(layer) is module
            )
        return held

    def _start_schedule(self, call: PipelineCallState) -> None:
        scheduler = getattr(self.pipeline, "scheduler", None)
        call.groups = step_groups(scheduler)
        positions = getattr(self.pipeline, "_num_timesteps", None)
        if positions is None and scheduler is not None and getattr(scheduler, "timesteps", None) is not None:
            begin = getattr(scheduler, "_begin_index", None) or 0
            positions = len(scheduler.timesteps) - begin
        ended = self._positions_to_denoising_end(call)
        if ended is not None:
            positions = ended
        call.num_positions = int(positions) if positions else None

    @staticmethod
    def _positions_to_denoising_end(call: PipelineCallState) -> int | None:
        """With SDXL's `denoising_end` (the base of an "ensemble of experts"), the scheduler positions the loop runs:
        its `timesteps` cut at that fraction. The ControlNet, ControlNet-Union and PAG ControlNet SDXL pipelines set
        `_num_timesteps` before that cut and the T2I-Adapter one never sets it (the scheduler's count is the whole
        schedule); every diffusers pipeline taking `denoising_end` loops over the cut `timesteps` local. None: the
        call has no `denoising_end` (or its frame, or that local, is not found)."""
        frame = call.owner.frame if call.owner is not None else None
        if frame is None or frame.f_locals.get("denoising_end") is None:
            return None
        timesteps = loop_timesteps(frame)
        return len(timesteps) if timesteps is not None else None

    def _step(self, call: PipelineCallState) -> StepInfo:
        groups = call.groups
        position = call.positions_done
        index = groups.step_of(position)
        first = groups.first_position(index) == position
        if call.num_positions is None:
            return StepInfo(index=index, count=index + 1, first=first)
        # a second-order scheduler (Heun, KDPM2) calls the model twice per step, except for the last step:
        # calls (0, 1) are step 0, (2, 3) step 1, ..., the last call alone the last step
        count = groups.count(call.num_positions)
        return StepInfo(index=min(index, count - 1), count=count, first=first)

    def _bind(
        self, call: PipelineCallState, canvas: Canvas, step: StepInfo, inputs: dict[str, Any], device: torch.device
    ) -> list[Bound]:
        record = call.record
        pipe = self.pipeline
        # each branch's text length: the negative prompt encoded by a call of its own has that call's length
        text_lens = {branch: branch_text_len(self.protocol, record, call.encode_lengths, canvas.text_len, branch)
                     for branch in ("cond", "uncond")}
        cond_prompts = encoder_prompts(self.protocol, pipe, record, text_lens["cond"], "cond")
        uncond_prompts = encoder_prompts(self.protocol, pipe, record, text_lens["uncond"], "uncond")
        prompt_rows = record.prompt_rows()
        tokens = PromptTokens(cond_prompts, prompt_rows, text_lens["cond"], "cond") if cond_prompts else None
        negative = PromptTokens(uncond_prompts, prompt_rows, text_lens["uncond"], "uncond") if uncond_prompts else None
        sample = next((v for v in inputs.values() if isinstance(v, torch.Tensor) and v.is_floating_point()), None)
        self._prompts.begin_call()
        context = BindContext(
            adapter=self.adapter,
            canvas=canvas,
            steps=step.count,
            cfg=self.protocol.cfg_source == "flag" and record.cfg_flag(),
            prompt_rows=prompt_rows,
            tokens=tokens,
            negative_tokens=negative,
            text_lens=text_lens,
            uncond_rows=has_uncond_rows(self.protocol, record),
            textless={branch: reason for branch in ("cond", "uncond")
                      if (reason := textless_reason(self.protocol, pipe, record, branch)) is not None},
            text_tokenizer=getattr(pipe, self.protocol.encoders[0].tokenizers[0], None) if self.protocol.encoders else None,
            backend=self.backend,
            pipeline=pipe,
            device=device,
            input_device=sample.device if sample is not None else device,
            dtype=sample.dtype if sample is not None else torch.float32,
            outputs=self.outputs,
            current_frame=lambda: self.frame,
            internal=self.internal_calls,
            prompt_arguments=tuple(call.encode_calls),
            encode_prompts=functools.partial(
                encode_prompts, pipe, self.adapter, call.encode_calls[0] if call.encode_calls else {},
                sample.device if sample is not None else torch.device("cpu"), self.internal_calls, cache=self._prompts,
            ),
            wrap_method=self.wrap_for_call,
            call_images=lambda: call.images,
            call_failed=self.call_failed,
            select_rows=self.select_rows,
            run_denoiser=self.run_differentiable,
            call_arguments=_call_arguments(pipe, call.owner),
        )
        bound: list[Bound] = []
        try:
            for position, control in enumerate(self.controls):
                if control.needs_words and tokens is not None:
                    tokens.check_lengths()
                cache = self._handle_caches.setdefault(position, {})
                bound.append(control.bind(replace(context, layers=self.resolved[position], handle_cache=cache)))
        except BaseException:
            for done in bound:
                done.finish()
            self._unwrap_call()
            raise
        if call.num_positions is not None:
            schedule: list[tuple[str, ...] | None] = []  # the experts' schedule, read once, if some control needs it
            for done in bound:
                reason = done.idle_reason(step.count) or self._expert_idle_reason(done, step.count, schedule)
                if reason is not None:
                    warnings.warn(f"attnctl: {type(done.control).__name__} is idle in this call: {reason}", IdleControlWarning,
                                  stacklevel=2)
        return bound

    def _expert_idle_reason(self, bound: Bound, count: int, schedule: list[tuple[str, ...] | None]) -> str | None:
        """Why `bound` is idle in a call of `count` steps on a pipeline with several experts, or None: it acts through its
        layers only (`Bound.layers_only`), and every one sits on experts that run none of its active steps (Wan 2.2 with a
        boundary that gives those steps to the other expert). `schedule`: the call's expert schedule once read."""
        adapter = self.adapter
        experts = adapter.layer_experts(layer.name for layer in bound.layers) if bound.layers_only else None
        if not experts or experts >= set(adapter.experts):
            return None
        if not schedule:
            schedule.append(adapter.expert_schedule(self.pipeline, count))
        runs = schedule[0]
        if runs is None or any(runs[i] in experts for i in range(count) if bound.active(StepInfo(i, count))):
            return None
        held = " and ".join(sorted(experts))
        steps = [i for i in range(count) if runs[i] in experts]
        if steps:
            start, stop = bound.steps
            what = (f"which runs steps {', '.join(map(str, steps))} of the {count} steps of this call, none inside its step "
                    f"window steps=({start:g}, {stop:g}){bound.window_rule}")
        else:
            what = f"which runs none of the {count} steps of this call"
        return (
            f"its layers are all on {held}, {what} ({adapter.expert_rule(self.pipeline)}), so the output is the stock one; "
            "select layers of an expert that runs its steps, or change the boundary"
        )

    def select_rows(self, inputs: dict[str, Any], index: tuple[int, ...]) -> dict[str, Any]:
        """The denoiser inputs of the rows `index` only (`BindContext.select_rows`)."""
        adapter = self.adapter
        return rebatch(inputs, adapter.batched_inputs, adapter.dict_inputs, adapter.batch_size(inputs), tuple(index))

    def run_differentiable(self, inputs: dict[str, Any], frame: DenoiserCall) -> Any:
        """An extra forward with `frame` set, every attention op on a backend autograd differentiates
        (`BindContext.run_denoiser`)."""
        if self.extra_forward is None:
            raise HandleError("attnctl: the denoiser hooks are not installed; no extra forward can run")
        self.differentiable += 1
        try:
            return self.extra_forward(inputs, frame)
        finally:
            self.differentiable -= 1

    def wrap_for_call(self, obj: Any, name: str, make: Any, innermost: bool = False) -> None:
        """An instance-level wrap of `obj.<name>` for the current pipeline call (a control's, e.g. skip-layer
        guidance's transformer blocks); undone at the end of the call or by `handle.remove()`. `innermost`: beneath
        the other controls' wraps of that method in this call (a wrap that reads the arguments as the method itself
        receives them, after another control narrowed the batch); otherwise on top of them."""
        above = [record for record in self._call_wraps if record.obj is obj and record.name == name] if innermost else []
        for record in reversed(above):  # this call's wraps are on top of each other in order: take them off
            record.unwrap()
            self._call_wraps.remove(record)
        for maker in (make, *(self._call_makers.pop(id(record)) for record in above)):
            record = wrap_method(obj, name, maker)
            self._call_wraps.append(record)
            self._call_makers[id(record)] = maker

    def record_images(self, images: Any) -> None:
        """What `pipe.image_processor.postprocess` returned in the current call (for controls with `needs_images`)."""
        if self.call is not None and not self.internal:
            self.call.images = images

    def _unwrap_call(self) -> None:
        while self._call_wraps:
            self._call_wraps.pop().unwrap()
        self._call_makers.clear()

    # -- the hot path ---------------------------------------------------------------------------------------
    def edit_for(self, layer: LayerInfo) -> Edit | None:
        """The merged edit of all bound controls at `layer` in the current frame (None: stock math)."""
        frame = self.frame
        if frame is None or not self.controls:
            return None
        cached = self._frame_edits.get(layer.index, _UNSET)
        if cached is not _UNSET:
            return cached
        edits = []
        for bound in self.call.bound or ():
            if layer.index in bound.layer_indices and bound.active(frame.step):
                edit = bound.edit(layer, frame)
                if edit is not None:
                    edits.append(edit)
        merged = merge_edits(edits, where=f"layer {layer.name}")
        self._frame_edits[layer.index] = merged
        return merged

    def prefill_edits(self, processors: dict[str, Any], module: torch.nn.Module) -> None:
        """Compute the edit of every layer of `module` (the denoiser or expert about to run) for the frame now,
        outside any compiled graph, and hand it to the layer's processor (`edit_now`): compiled processors then read
        only their own `edit_now`, so dynamo never traces the controls' Python state (step windows, caches) nor guards
        on a layer's index (blocks of one class share a graph), and recompiles only when whether a layer has an edit,
        or an edit's structure, changes. The other expert's layers do not run: they get no edit (and a control
        counts nothing for them, as AttentionMaps' contributions). A label mask is made dense here, on the sdpa
        backend that runs it in a graph (`kernels.choose_traced_backend`), which refuses one past its size limit before
        the forward starts; a window (FastAttn) past that limit is refused here too."""
        held = self._held_layers(module)
        skipped = self._skipped_blocks(self.frame)
        self.frame.compiled = True
        self.frame.canvas_shape = self._canvas_shape(self.frame.canvas, self.frame.layers_device())
        self._prefilled_processors = processors
        for layer in self.adapter.layers:
            runs = layer.index in held and not layer.name.startswith(skipped)
            edit = self.edit_for(layer) if runs else None
            processors[layer.name].edit_now = edit
            if edit is not None and edit.kernel.labels is not None:
                self._prepare_labels(layer, edit.kernel.labels)
            if edit is not None:
                self._check_traced_window(layer, edit)
        self.prefilled = True

    def layer_device(self, module: torch.nn.Module, inputs: dict[str, Any]) -> torch.device:
        """The device the layers of `module` (the denoiser or expert about to run) run on: where accelerate's hook on it
        moves its inputs inside `forward`, after attnctl's pre-hook (a pipeline-level device map makes the latents on the
        pipeline's execution device, the first component's, and runs the denoiser on its own), else the device of the
        inputs. One device per call: `apply` refuses a denoiser split over devices."""
        device = hook_device(module)
        return device if device is not None else input_device(inputs)

    def _canvas_shape(self, canvas: Canvas, device: torch.device) -> torch.Tensor:
        """`canvas.shape_tensor` on the device the denoiser's layers run on, made once per canvas and device."""
        made = self._canvas_shapes
        if made is None or made[0] != (canvas, device):
            made = self._canvas_shapes = ((canvas, device), canvas.shape_tensor(device))
        return made[1]

    def _skipped_blocks(self, frame: DenoiserCall) -> tuple[str, ...]:
        """Prefixes of the layers the denoiser skips in this call (SD3's skip-layer pass: the protocol's
        `skip_layer_kwarg` indexes its `skip_layer_blocks`): they do not run, so they get no edit, as eagerly."""
        protocol = self.protocol
        indices = frame.inputs.get(protocol.skip_layer_kwarg) if protocol.skip_layer_kwarg else None
        return tuple(f"{protocol.skip_layer_blocks}.{int(i)}." for i in indices or ())

    def _check_traced_window(self, layer: LayerInfo, edit: Edit) -> None:
        """A window in a graph runs on sdpa as a dense mask (`kernels.choose_traced_backend`): one past its size limit
        is refused here, before the forward, rather than inside dynamo's trace."""
        declared = [hook.window_rows() for hook in edit.hooks]
        rows = max((count for count in declared if count is not None), default=0)
        if edit.kernel.window is not None and (None in declared or not declared):  # unknown: every row of the call
            rows = max(rows, len(self.frame.rows))
        weight = self.adapter.placed_weight(layer.name)
        if rows and weight is not None:  # offloaded: the device is not known yet, the graph's choice decides
            tokens = self.frame.geometry(layer).query_len
            choose_traced_backend(self.backend, weight.device, ("window",), rows * tokens * tokens)

    def _prepare_labels(self, layer: LayerInfo, labels: LabelMask) -> None:
        weight = self.adapter.placed_weight(layer.name)
        if weight is not None:  # offloaded: the graph builds the mask
            prepare_traced_labels(labels, self.backend, weight.dtype, weight.device)

    def layer_call(self, layer: LayerInfo, module: torch.nn.Module, edit: Edit) -> AttentionCall:
        frame = self.frame
        return AttentionCall(layer, frame.geometry(layer), frame, module, self.backend)

    def backend_for(
        self, layer: LayerInfo, device: torch.device, features: tuple[str, ...], dense_elements: int = 0,
        shape: tuple[int, int] | None = None,
    ) -> str:
        """The backend of one attention call (`dense_elements`: `AttentionSpec.dense_elements` of the call; `shape`:
        its (query tokens, head dim), which picks `auto`'s measured row on CUDA)."""
        if self.differentiable:  # a loss pass (latent optimisation): the fused Triton kernels are forward-only
            try:
                return choose_backend("sdpa", device, features, dense_elements, shape)[0]
            except BackendError:
                return "reference"
        if torch.compiler.is_compiling():  # a pure function of constants in a graph: no dict state to guard on
            return choose_traced_backend(self.backend, device, features, dense_elements, shape)
        key = (device.type, features, dense_elements, shape, len(kernels.KERNEL_FAILURES))  # a compile failure re-chooses
        choice = self._backend_cache.get(key)
        if choice is None:
            choice = choose_backend(self.backend, device, features, dense_elements, shape)
            self._backend_cache[key] = choice
        self.backend_log[layer.name] = choice
        kernels.note_request(self.backend)  # the backend's function falls back on a compile failure only under auto
        return choice[0]


_UNSET = object()


def _call_arguments(pipeline: Any, owner: CallOwner | None) -> dict[str, Any]:
    """The named arguments of `pipeline.__call__` as its running frame holds them now (`BindContext.call_arguments`)."""
    if owner is None:
        return {}
    values = owner.frame.f_locals
    settings = {name: _setting(values[name]) for name in named_call_arguments(pipeline) if name in values}
    return {name: value for name, value in settings.items() if _plain(value)}


def _plain(value: Any) -> bool:
    """A setting, not data: None, a number, a string or a list of strings (the call's tensors, generators and callbacks
    are left out, so that nothing the controls keep past the call holds them alive)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    return isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value)


def _setting(value: Any) -> Any:
    """A numpy scalar or a one-element tensor given as a number (`guidance_scale=np.float32(3)`): its Python value."""
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "ndim", None) == 0:
        return item()
    return value


def _text_storages(value: Any) -> frozenset[int]:
    """The addresses of the storages of the denoiser's text input (empty: none, or a tensor without a storage)."""
    tensors = [value] if isinstance(value, torch.Tensor) else value if isinstance(value, (list, tuple)) else ()
    if not tensors or not all(isinstance(t, torch.Tensor) for t in tensors):
        return frozenset()
    try:
        return frozenset(t.untyped_storage().data_ptr() for t in tensors)
    except (RuntimeError, NotImplementedError):  # a tensor subclass without a plain storage: not checked
        return frozenset()
