"""The control protocol: frozen configs that describe changes, bound once per pipeline call.

A `Control` is a frozen dataclass validated on construction; it serialises to a plain dict
(`to_dict` / `Control.from_dict`) for job files, PNG metadata and saved plans. Once per pipeline call the
handle calls `bind(context)`, which resolves words to tokens, layers to indices and sizes caches, and
returns a `Bound`. For every denoiser call and layer the processor asks the bound controls for an `Edit`
(`attnctl.processors.edit`): plain data saying what changes (bias, value scale, masks, hooks). A bound
control may also change the rows of a denoiser call (`row_plan`, for guidance by perturbation).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .denoiser_call import DenoiserCall, RowPlan
from .errors import ConfigError, TokenError
from .families.base import Canvas, Geometry, LayerInfo, ModelAdapter
from .processors.edit import Edit, effect_features
from .selection import select_layers
from .steps import StepInfo, StepWindow
from .tokens import PromptTokens

_REGISTRY: dict[str, type[Control]] = {}


@dataclass(frozen=True)
class Control:
    """Base class of every control. Subclasses are frozen dataclasses with a `type_name` class keyword."""

    type_name: ClassVar[str] = "control"
    #: Whether `bind` needs the words of the prompts (then `prompt_embeds` passed directly is an error).
    needs_words: ClassVar[bool] = False
    #: Whether the control reads the images the call produces (`BindContext.call_images`).
    needs_images: ClassVar[bool] = False
    #: Why the control cannot share the denoiser with a diffusers step cache (FirstBlockCache, FasterCache, ...),
    #: or None when it can. Read on the instance (a control may need every layer in some settings only).
    step_cache_refusal: ClassVar[str | None] = None
    #: Why the control cannot follow a call whose uncond rows a callback dropped mid-call (diffusers' CFG-cutoff
    #: callbacks: the denoiser gets the cond rows only from then on), or None when it follows it as a call without
    #: CFG would run from that step on (every built-in control). Read on the instance.
    cfg_cutoff_refusal: ClassVar[str | None] = None
    #: The image-token grids the control's definition covers (`ModelAdapter.grid_dims`): 2 (images) and 3 (video:
    #: frames x height x width). A control that works on token maps, masks or windows over a 2-D grid says (2,).
    grid_dims: ClassVar[tuple[int, ...]] = (2, 3)
    #: Call-machinery capabilities the control relies on (`ModelAdapter.lacks`): "extra_rows" (guidance by
    #: perturbed rows), "appended_text" (tokens appended to a joint text sequence), "row_inputs" (a row's latent input
    #: replaced: the loss passes, ReferenceAttention's reference row), "second_pass" (a second forward over the re-noised latent input: SAG).
    needs: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, type_name: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if type_name is not None:
            if type_name in _REGISTRY and _REGISTRY[type_name] is not cls:
                raise TypeError(f"control type name {type_name!r} is already registered by {_REGISTRY[type_name]}")
            cls.type_name = type_name
            _REGISTRY[type_name] = cls

    def default_layers(self, adapter: ModelAdapter) -> str | tuple[str, ...] | None:
        """The selection used when the control's `layers` is None (None: every layer)."""
        return None

    def select(self, adapter: ModelAdapter) -> tuple[LayerInfo, ...]:
        """The layers this control acts on (its `layers` field, or its default); raises SelectionError."""
        return select_layers(
            adapter.layers, getattr(self, "layers", None), default=self.default_layers(adapter), owner=type(self).__name__
        )

    def validate_for(self, adapter: ModelAdapter) -> None:
        """Raise if this control cannot act on this model family (checked at apply time)."""

    def validate_traits(self, adapter: ModelAdapter) -> None:
        """Raise UnsupportedError when the family's image-token grid has dimensions the control's definition does
        not cover (`grid_dims`) or the family lacks a capability the control needs (`needs`, `ModelAdapter.lacks`);
        checked at apply time, before `validate_for`."""
        from .errors import UnsupportedError

        for need in self.needs:
            if need in adapter.lacks:
                raise UnsupportedError(
                    f"attnctl: {type(self).__name__} needs {need.replace('_', ' ')}, which the {adapter.family} family does "
                    f"not offer: {adapter.lacks[need]}"
                )
        if adapter.grid_dims not in self.grid_dims:
            kind = "a 3-D (frames x height x width) video" if adapter.grid_dims == 3 else f"a {adapter.grid_dims}-D"
            raise UnsupportedError(
                f"attnctl: {type(self).__name__} is defined over a 2-D image-token grid, and the {adapter.family} family "
                f"has {kind} token grid; its video semantics are not implemented yet"
            )

    def layer_effects(self, adapter: ModelAdapter, layer: LayerInfo) -> tuple[str, ...]:
        """What this control does to one of its layers: names from `processors.edit.EFFECT_TABLE`.

        The one declaration of a control's footprint: `apply` refuses two controls whose effects on a shared
        layer conflict (`processors.edit.CONFLICTS`), and an explicit backend that lacks a feature the effects
        need, before anything is installed (conflicts raise at apply time, not in the middle of a render).
        Default: none.
        """
        return ()

    def call_effects(self, adapter: ModelAdapter) -> tuple[str, ...]:
        """What this control does to the pipeline call as a whole, whatever its layers: names from
        `processors.edit.CALL_EFFECTS`. `apply` refuses two controls whose call effects conflict
        (`processors.edit.CALL_CONFLICTS`), before anything is installed. Default: none."""
        return ()

    def kernel_features(self, adapter: ModelAdapter, layers: tuple[LayerInfo, ...]) -> tuple[str, ...]:
        """The backend features this control needs on `layers` (from its declared effects)."""
        return effect_features(tuple(effect for layer in layers for effect in self.layer_effects(adapter, layer)))

    def reuses_calls(self, adapter: ModelAdapter) -> bool:
        """Whether the control may ask that a separate uncond denoiser call return its step's cond prediction without
        running (`RowPlan.reuse_cond`); `apply` then installs the hook that can skip the denoiser's forward."""
        return False

    def reads_after_call(self, pipeline: Any) -> bool:
        """Whether the control, applied to `pipeline`, acts on nothing during its calls and instead reads the call's
        result in a separate pass after it (`AttentionMaps(magnets=...)` on a text-to-image pipeline: the readout):
        its bound control then leaves a `ReadoutRequest` in `readout`, which the handle runs once the call has ended,
        with the pipeline stock. Default: False."""
        return False

    def compile_refusal(self, adapter: ModelAdapter) -> str | None:
        """Why the control cannot run in a torch.compile'd denoiser of this family, or None when it is verified to
        (no graph break in the processors, one compilation per control set and shapes: tests/test_compose_compile.py)."""
        return (
            "it is not verified to run compiled (a hook that keeps per-step Python state makes dynamo guard on it and "
            "recompile per step, or break the graph inside the processor)"
        )

    @property
    def step_window(self) -> StepWindow:
        return getattr(self, "steps", (0.0, 1.0))

    @property
    def varies_by_step(self) -> bool:
        """Whether the control's edit changes from step to step inside its window (a reweighting ramp or a callable
        of the step): a cache that reuses outputs across steps cannot hold such an edit either."""
        return False

    def bind(self, context: BindContext) -> Bound:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__}.bind")

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON-friendly dict: `{"type": ..., field: value, ...}`."""
        out: dict[str, Any] = {"type": self.type_name}
        for f in dataclasses.fields(self):
            out[f.name] = _plain(getattr(self, f.name))
        return out

    def to_record(self) -> dict[str, Any]:
        """What the renderer writes beside an image it made: `to_dict()`, unless a field cannot be serialised (then a
        description of it: a record, not replayable)."""
        return self.to_dict()

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> Control:
        """Rebuild a control from `to_dict` output; unknown types or fields raise ConfigError.

        `type` is a registered type name or a class name, in any case and with or without `-` / `_`
        (`"pag"`, `"PAG"`, `"skip-layer"`, `"SkipLayer"`), as job files accept it.
        """
        if not isinstance(data, Mapping) or "type" not in data:
            raise ConfigError(f"a control dict needs a 'type' key, got {data!r}")
        kind = data["type"]
        cls = _REGISTRY.get(canonical_type_name(kind)) if isinstance(kind, str) else None
        if cls is None:
            raise ConfigError(f"unknown control type {kind!r}; known: {', '.join(sorted(_REGISTRY))}")
        return cls._from_fields({k: v for k, v in data.items() if k != "type"})

    @classmethod
    def _from_fields(cls, fields: dict[str, Any]) -> Control:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - names)
        if unknown:
            raise ConfigError(f"{cls.__name__} has no field(s) {', '.join(unknown)}; fields: {', '.join(sorted(names))}")
        return cls(**fields)


def _plain(value: Any) -> Any:
    if isinstance(value, Control):
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k) if not isinstance(k, (int, float)) else k: _plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def registered_controls() -> dict[str, type[Control]]:
    return dict(_REGISTRY)


def canonical_type_name(name: str) -> str:
    """The registered type name for `name`, accepting class names and case or `-`/`_`/space variants
    (`"PAG"`, `"skip_layer"`, `"Reweight"`); a name matching no single control is returned unchanged."""
    if name in _REGISTRY:
        return name
    key = _loose(name)
    matches = tuple(dict.fromkeys(
        type_name for type_name, cls in sorted(_REGISTRY.items()) if key in (_loose(type_name), _loose(cls.__name__))
    ))
    return matches[0] if len(matches) == 1 else name


def _loose(name: str) -> str:
    return re.sub(r"[-_\s]", "", name).lower()


@dataclass(frozen=True)
class EncodedText:
    """Extra prompts encoded by the pipeline's own text encoders: `embeds` (R, T, C) as `encode_prompt` returns
    them, `mask` (R, T) 0/1 where the family's encoder returns an attention mask, else None."""

    embeds: Any
    mask: Any = None

    @property
    def length(self) -> int:
        return int(self.embeds.shape[1])


def _no_handle(*args: Any, **kwargs: Any) -> Any:
    raise TypeError("attnctl: this BindContext was made outside a handle; it offers no pipeline services")


@dataclass(frozen=True)
class VideoFrames:
    """What a video pipeline's `video_processor.postprocess_video` returned (`BindContext.call_images()` of a video
    call): per video, its frames (a list of lists of PIL images, an array (videos, frames, H, W, C) or a tensor
    (videos, frames, C, H, W) in [0, 1])."""

    frames: Any


@dataclass(frozen=True)
class BindContext:
    """What a control may know when it is bound at the start of a pipeline call."""

    adapter: ModelAdapter
    canvas: Canvas
    steps: int
    cfg: bool
    prompt_rows: int
    tokens: PromptTokens | None
    negative_tokens: PromptTokens | None
    backend: str
    pipeline: Any
    device: Any  # where the denoiser's layers run: the tensors they read are made here
    dtype: Any
    outputs: dict[str, Any]  # results a control publishes for the handle (maps, reports), by key
    layers: tuple[LayerInfo, ...] = ()  # the layers this control resolved to at apply time
    # where the pipeline passes the denoiser's inputs (its latents, text embeddings): what a control puts into them
    # (`Bound.transform_inputs`) is made here. Another device than `device` where accelerate's hook moves the inputs
    # inside the denoiser's forward (a pipeline-level device_map="balanced"); None: `device`
    input_device: Any = None
    # the text length of each branch's rows ("cond", "uncond"): Qwen-Image encodes the negative prompt by a call of its
    # own, padded to its own longest prompt, so its denoiser calls have another text length than the prompt's; a
    # branch not named has `canvas.text_len` (`text_len_of`)
    text_lens: Mapping[str, int] = field(default_factory=dict, compare=False)
    # whether this call runs rows of the negative prompt (batched CFG, or a separate negative-prompt call), as its
    # layout says: they exist even where their text is unknown (`negative_tokens` None, `textless`)
    uncond_rows: bool = False
    # why a branch's prompt has no text ("cond", "uncond": embeddings given, SDXL's zeroed negative prompt)
    textless: Mapping[str, str] = field(default_factory=dict, compare=False)
    # the first tokenizer of the first text encoder (CLIP-L on SD, SDXL, SD3; T5 on Flux, PixArt), for what needs no
    # prompt text (whether a start token comes first); None where the pipeline has none
    text_tokenizer: Any = field(default=None, compare=False, repr=False)
    # The denoiser call in progress (None between calls), for code that runs outside attention layers
    # (instance-level wraps of transformer blocks: skip-layer guidance).
    current_frame: Callable[[], DenoiserCall | None] = field(default=lambda: None, compare=False, repr=False)
    # `with context.internal():` around attnctl's own calls of pipeline methods (encode_prompt, ...): not recorded
    internal: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext
    # the arguments (defaults applied) of this call's encode_prompt calls, in order (Flux true CFG: cond, negative)
    prompt_arguments: tuple[dict[str, Any], ...] = ()
    # `encode_prompts(texts, trim=False, others=None)`: extra prompts encoded as the pipeline encodes its own prompt in
    # this call (`trim`: cut after the longest prompt's last token, where `ModelAdapter.padded_text_tokenizer` says how;
    # `others`: {"prompt_2": texts, ...} for the encoders that read their own prompt, None where left out); the
    # handle keeps the embeddings for later calls while nothing they depend on changes (`pipelines.prompts.PromptCache`)
    encode_prompts: Callable[..., EncodedText] = field(default=_no_handle, compare=False, repr=False)
    # `wrap_method(obj, name, make, innermost=False)`: an instance-level wrap for this pipeline call, owned by the
    # handle (undone at the end of the call, or by `handle.remove()`); on top of the call's other wraps of that
    # method, or beneath them with `innermost=True` (it then sees the arguments as the method itself receives them)
    wrap_method: Callable[..., None] = field(
        default=_no_handle, compare=False, repr=False
    )
    # `call_images()`: what `pipe.image_processor.postprocess` returned in this call (None before it ran), or for a
    # video pipeline `VideoFrames` of what `pipe.video_processor.postprocess_video` returned; only for controls
    # with `needs_images`
    call_images: Callable[[], Any] = field(default=lambda: None, compare=False, repr=False)
    # `call_failed()`: whether the call ended with an error (its pipeline `__call__` raised): at finish, a control
    # that reads the call's results has none to read, and that call's own error was raised already
    call_failed: Callable[[], bool] = field(default=lambda: False, compare=False, repr=False)
    # a dict the control's bound objects share for the life of the handle: what depends only on the control and
    # the handle (masks per token grid, index tensors per layer and step) is computed once, not once per call
    handle_cache: dict[Any, Any] = field(default_factory=dict, compare=False, repr=False)
    # `select_rows(inputs, index)`: the denoiser inputs of the rows `index` only (every batched input re-indexed)
    select_rows: Callable[[dict[str, Any], tuple[int, ...]], dict[str, Any]] = field(default=_no_handle, compare=False, repr=False)
    # `run_denoiser(inputs, frame)`: an extra forward of attnctl's own with `frame` set (its edits apply), on backends
    # that autograd can differentiate (sdpa, reference) whatever the handle's backend: for a control that optimises the
    # latent through the denoiser (Attend-and-Excite); returns the denoiser's output
    run_denoiser: Callable[[dict[str, Any], DenoiserCall], Any] = field(default=_no_handle, compare=False, repr=False)
    # the pipeline `__call__`'s named arguments as its frame holds them when the controls are bound (the first
    # denoiser call: `output_type`, `num_inference_steps`, `guidance_scale`, ...), settings only (None, numbers, strings,
    # lists of strings: no tensor, generator or callback); empty where the call was not found
    call_arguments: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def require_tokens(self, owner: str, branch: str = "cond", *, positions: bool = False) -> PromptTokens:
        """The PromptTokens of `branch`, or a TokenError saying why its words cannot be found. `positions`: the
        control also takes explicit token positions (ints), which need no text: the refusal suggests them."""
        tokens = self.tokens if branch == "cond" else self.negative_tokens
        if tokens is not None:
            return tokens
        what = "prompt" if branch == "cond" else "negative prompt"
        if branch == "uncond" and not self.uncond_rows:
            raise TokenError(
                f"attnctl: {owner} needs the words of the negative prompt, but this call has no negative-prompt rows "
                "(no classifier-free guidance)"
            )
        reason = self.textless.get(branch)
        if reason is None:  # text, but not placed
            instead = "give explicit token positions or use a control that needs no words" if positions else "use a control that needs no words"
            raise TokenError(
                f"attnctl: {owner} needs the words of the {what}, but "
                f"attnctl does not know where {type(self.pipeline).__name__}'s text encoding puts them (its chat template "
                "is not modelled, e.g. Flux2Pipeline's Mistral template, Qwen-Image edit pipelines other than Edit and "
                f"EditPlus); {instead}"
            )
        fix = f"pass the {what} as text" + (" or give explicit token positions" if positions else "")
        raise TokenError(f"attnctl: {owner} needs the words of the {what}, but {reason}; {fix}")

    @property
    def images_per_prompt(self) -> int | None:
        """`num_images_per_prompt` (video pipelines: `num_videos_per_prompt`) of the call's `encode_prompt`; None where
        the call does not say."""
        arguments = self.prompt_arguments[0] if self.prompt_arguments else {}
        value = arguments.get("num_images_per_prompt", arguments.get("num_videos_per_prompt"))
        return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else None

    def text_len_of(self, branch: str) -> int:
        """The text length of `branch`'s rows ("cond" or "uncond"; `text_lens`)."""
        return self.text_lens.get(branch, self.canvas.text_len)

    def geometry(self, layer: LayerInfo) -> Geometry:
        return Geometry(layer, self.canvas.grid_at(layer.level), self.canvas.text_len, self.canvas.frames, self.canvas.trailing_len)


class Bound:
    """A control bound to one pipeline call. Subclasses override what they take part in."""

    def __init__(self, control: Control, layers: tuple[LayerInfo, ...], steps: StepWindow):
        self.control = control
        self.layers = layers
        self.layer_indices = frozenset(layer.index for layer in layers)
        self.steps = steps

    def active(self, step: StepInfo) -> bool:
        return step.inside(self.steps)

    def needs_layer(self, layer: LayerInfo, frame: DenoiserCall) -> bool:
        """Whether the control acts on `layer` in `frame`, for a control with a `step_cache_refusal`: a layer it needs
        that something outside attnctl skipped is refused (`Runtime.skipped_layers`). Default: inside its window."""
        return self.active(frame.step)

    def idle_reason(self, count: int) -> str | None:
        """Why the control does nothing in a call of `count` steps although it was asked to act, or None.

        The default: a step window that is not empty (`start < stop`) but holds none of the call's step positions
        `i / count` (e.g. `steps=(0.9, 1.0)` with 5 steps). The handle warns once per call; the output stays the
        stock one (a window outside the call's steps is a documented identity, so it is not refused). An empty
        window (`start == stop`) is an explicit "off" and gets no warning.
        """
        start, stop = self.steps
        if start >= stop or count < 1 or any(self.active(StepInfo(i, count)) for i in range(count)):
            return None
        positions = ", ".join(f"{i / count:g}" for i in range(min(count, 6))) + (", ..." if count > 6 else "")
        return (
            f"its step window steps=({start:g}, {stop:g}) holds none of the {count} steps of this call (step i runs at "
            f"i/n = {positions}{self.window_rule}), so the output is the stock one; widen the window or run more steps"
        )

    #: How the control's `active` reads its window, when it differs from `start <= i/n < stop` (for `idle_reason`).
    window_rule: str = ""

    #: Whether the control changes a denoiser call only through its layers (edits there, or perturbed rows run only
    #: where the expert holding them runs): on a pipeline with several denoiser experts (Wan 2.2), a control whose
    #: layers all sit on experts that run none of its steps is idle, and the handle warns. False (the default) where a
    #: control also changes the call's rows or inputs (TGATE drops the CFG rows, PromptToPrompt shares initial latents).
    layers_only: bool = False

    #: What the handle is to read after the call (`Control.reads_after_call`): a `ReadoutRequest` left at `finish`
    #: (`attnctl.controls.maps.capture`), taken by the handle once the call has ended; None: nothing.
    readout: Any = None

    #: When the control's `transform_inputs` runs among the call's controls': lower first, control order among equals.
    #: A control that reads the inputs as the denoiser will receive them (a latent optimiser's loss pass) says 1.
    input_order: int = 0

    def edit(self, layer: LayerInfo, frame: DenoiserCall) -> Edit | None:
        """What changes at `layer` in the denoiser call `frame` (None: nothing)."""
        return None

    def transform_inputs(self, frame: DenoiserCall, inputs: dict[str, Any]) -> dict[str, Any]:
        """The denoiser's inputs for this call, changed before the forward (return `inputs` itself: unchanged).

        Called for active controls only. A changed text sequence (e.g. appended region tokens) is reflected
        in the frame's canvas (`text_len`) that the layers see.
        """
        return inputs

    def row_plan(self, frame: DenoiserCall) -> RowPlan | None:
        """Extra or fewer rows for this denoiser call (guidance, CFG dropping); None: the pipeline's rows."""
        return None

    def text_switch_refusal(self, step: StepInfo) -> str | None:
        """Why the control cannot follow a call whose text input a callback replaced before `step` (other
        `prompt_embeds`), or None when it follows it as a call made with the new text would. Default: a control that
        needs words refuses, since it resolved them (or its token positions) in the prompts the call started with."""
        if self.control.needs_words:
            return ("it resolved its words (or token positions) in the prompts the call started with, and the new text "
                    "may hold other words at those positions")
        return None

    def finish(self) -> None:
        """End of the pipeline call (successful or not)."""
