"""Test-time latent optimisation on attention maps: Attend-and-Excite, A-STAR and box layout guidance.

All three move the latent at early steps by gradient steps of a loss on the cross-attention maps of some words
(`engine.LatentOptimizerBound`); they differ in the maps they read and the loss:

- `AttendExcite` (Chefer et al. 2023, "Attend-and-Excite: Attention-Based Semantic Guidance for Text-to-Image
  Diffusion Models", arXiv:2301.13826): raise the maximum attention of the most neglected subject;
- `AStar` (Agarwal et al. 2023, "A-STAR: Test-time Attention Segregation and Retention for Text-to-image
  Synthesis"): keep the subjects' maps apart (segregation) and each subject's map where it was (retention);
- `BoxGuidance` (Chen, Laina, Vedaldi 2023, "Training-Free Layout Control with Cross-Attention Guidance", backward
  guidance; BoxDiff's constraints as an option): pull each word's attention mass inside its box.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ...control import BindContext, Control
from ...denoiser_call import DenoiserCall, upload
from ...errors import ConfigError, IdleControlWarning, UnsupportedError
from ...families.base import LayerInfo, ModelAdapter
from ...kernels.spec import kept_tensors
from ...noise import noise_level, require_noise_level
from ...selection import LayerSpec, validate_layers
from ...steps import StepInfo, StepWindow, validate_steps
from ...tokens import WordQuery, has_duplicates, validate_word_query
from ...validation import choice, integer, number, refuse_unused, set_field
from ..common import TEXT_KINDS, select_kinds, text_layers
from ..regions.masks import box_mask, validate_box
from . import losses
from .engine import LatentOptimizerBound, word_columns

#: The UNet level whose maps the losses read by default: two 2x downsamplings below the latent (Attend-and-Excite's
#: 16x16 maps of a 64x64 SD latent; 32x32 on SDXL; 4x4 on the toy-shapes model's 16x16 latent).
MAP_LEVEL = 2
#: Upper bound of AttendExcite.max_refinement_steps and BoxGuidance.iterations (each iteration is a forward and a
#: backward through the denoiser; the papers use 20 and 5): a mistyped 10**6 is refused, not a call that never ends.
MAX_ITERATIONS = 1000


def _subjects(value: Any, owner: str) -> tuple[WordQuery, ...]:
    if isinstance(value, (str, int)) or not isinstance(value, (tuple, list)) or not value:
        raise ConfigError(f"{owner}.subjects must be a non-empty list of words, e.g. ['cat', 'dog'], got {value!r}")
    subjects = tuple(validate_word_query(v, owner=f"{owner}.subjects") for v in value)
    if has_duplicates(subjects):
        raise ConfigError(f"{owner}.subjects names a word twice (words match whatever their case): {subjects!r}; give each subject once")
    return subjects


def _range(value: Any, name: str) -> tuple[float, float]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ConfigError(f"{name} must be a pair (first, last) of positive numbers, got {value!r}")
    return (number(value[0], name, minimum=0.0, exclusive_minimum=True), number(value[1], name, minimum=0.0, exclusive_minimum=True))


@dataclass(frozen=True)
class _LatentOptimization(Control):
    """Fields and checks shared by the latent optimisers."""

    needs_words: ClassVar[bool] = True
    grid_dims: ClassVar[tuple[int, ...]] = (2,)  # maps over a 2-D image-token grid (video: not implemented yet)
    needs: ClassVar[tuple[str, ...]] = ("extra_rows", "row_inputs")  # the loss pass runs the denoiser on the cond rows alone, its latents replaced
    step_cache_refusal: ClassVar[str | None] = (
        "its loss passes run the denoiser's first layers with gradients outside the cache's schedule"
    )

    def compile_refusal(self, adapter: ModelAdapter) -> str | None:
        return (
            "its loss passes differentiate the latent through the denoiser under autograd at the steps it optimises and end "
            "the forward early by raising an exception from an attention hook once the map layers are read: the exception "
            "escapes the compiled graph (an error under fullgraph=True, a graph break otherwise), and the compiled denoiser "
            "recompiles for the loss passes at the optimised steps"
        )

    def _check_common(self) -> None:
        owner = type(self).__name__
        set_field(self, "scale", number(self.scale, f"{owner}.scale", minimum=0.0))
        set_field(self, "steps", validate_steps(self.steps, name=f"{owner}.steps"))
        set_field(self, "layers", validate_layers(self.layers, name=f"{owner}.layers"))

    def default_layers(self, adapter: ModelAdapter) -> str:
        return text_layers(adapter)

    def select(self, adapter: ModelAdapter) -> tuple[LayerInfo, ...]:
        layers = select_kinds(self, adapter, TEXT_KINDS, "cross- or joint-attention")
        if self.layers is None:
            levels = sorted({layer.level for layer in layers})
            level = MAP_LEVEL if MAP_LEVEL in levels else levels[-1]
            layers = tuple(layer for layer in layers if layer.level == level)
        return layers

    def validate_for(self, adapter: ModelAdapter) -> None:
        if adapter.text_attention not in TEXT_KINDS:
            raise UnsupportedError(f"attnctl: {type(self).__name__} reads text attention maps; the {adapter.family} family has none")

    def layer_effects(self, adapter: ModelAdapter, layer: LayerInfo) -> tuple[str, ...]:
        """"capture": its loss passes read the layer's attention to the words (normal passes are untouched)."""
        return ("capture",)

    def call_effects(self, adapter: ModelAdapter) -> tuple[str, ...]:
        """"latent_loss": its updates are the gradient of the images' summed loss through the denoiser."""
        return ("latent_loss",) if self.scale > 0 else ()


def _excite_step_size(control: Any, step: int, count: int) -> float:
    """Attend-and-Excite's step size: `scale * sqrt(r_i)`, r linear from `scale_range[0]` at the first step to
    `scale_range[1]` at the last."""
    first, last = control.scale_range
    r = first if count <= 1 else first + (last - first) * step / (count - 1)
    return control.scale * math.sqrt(r)


#: Attend-and-Excite's refinement: steps 0, 10 and 20 of 50 at thresholds 0.05, 0.5 and 0.8 (as fractions).
DEFAULT_REFINE: tuple[tuple[float, float], ...] = ((0.0, 0.05), (0.2, 0.5), (0.4, 0.8))


@dataclass(frozen=True)
class AttendExcite(_LatentOptimization, type_name="attend-excite"):
    """Attend-and-Excite (Chefer et al. 2023, arXiv:2301.13826): at the steps in `steps`, a gradient step on the
    latent raises the maximum attention of the most neglected subject.

    `subjects`: the words to excite (resolved in every prompt as every control resolves words). `scale`: the
    step-size factor (paper 20; 0: idle); `scale_range`: the step size is `scale * sqrt(r)`, r linear from the first to
    the second number over the schedule. `columns`: the text positions the softmax renormalises over, `"all"` but the
    first and last (the paper's SD 1.x setting) or `"prompt"` (its tokens without start and end: the SD 2.1 setting).
    `steps`: the window (paper: the first 25 of 50 steps). `refine`:
    `(fraction, threshold)` pairs inside the window, iterative refinement at step `round(fraction * steps)` until
    every subject's maximum reaches `threshold` (None, the default: the paper's steps 0, 10, 20 of 50 at 0.05, 0.5,
    0.8, those inside the window; `()`: no refinement; a call whose step count puts a given pair's step outside the
    window, or on another pair's step, is refused; the paper's pairs are dropped there, with a warning), at most `max_refinement_steps`
    steps, as the authors' loop (the step after the one that reaches it is still taken; 0: no refinement). `temperature`: the renormalising softmax's factor over the text tokens (paper 100); `kernel_size`,
    `sigma`: the smoothing (paper 3, 0.5; kernel_size 1: none). `layers`: the cross- or joint-attention layers
    whose maps are averaged (default: the UNet level two downsamplings below the latent, every text layer of a DiT).
    """

    subjects: tuple[WordQuery, ...]
    scale: float = 20.0
    steps: StepWindow = (0.0, 0.5)
    refine: tuple[tuple[float, float], ...] | None = None
    max_refinement_steps: int = 20
    scale_range: tuple[float, float] = (1.0, 0.5)
    columns: str = "all"
    temperature: float = 100.0
    kernel_size: int = 3
    sigma: float = 0.5
    layers: LayerSpec = None

    def __post_init__(self) -> None:
        set_field(self, "subjects", _subjects(self.subjects, "AttendExcite"))
        self._check_common()
        if self.refine is None:  # the paper's refinement, at its steps inside the window (`refinement`)
            refine = None
        else:
            refine = self._given_refine()
        set_field(self, "refine", refine)
        set_field(self, "max_refinement_steps", integer(self.max_refinement_steps, "AttendExcite.max_refinement_steps", minimum=0,
                                                              maximum=MAX_ITERATIONS))
        set_field(self, "scale_range", _range(self.scale_range, "AttendExcite.scale_range"))
        set_field(self, "temperature", number(self.temperature, "AttendExcite.temperature", minimum=0.0, exclusive_minimum=True))
        choice(self.columns, "AttendExcite.columns", COLUMNS)
        _smoothing(self)
        if self.refine == () and self.max_refinement_steps != 0:
            refuse_unused(self, "max_refinement_steps", "with refine=() (it bounds the iterative refinement, which refine=() turns off)")

    def _given_refine(self) -> tuple[tuple[float, float], ...]:
        """`refine` as given, validated: (fraction, threshold) pairs, fractions inside the step window, each once."""
        if not isinstance(self.refine, (tuple, list)):
            raise ConfigError(f"AttendExcite.refine must be None (the paper's), () or (fraction, threshold) pairs, got {self.refine!r}")
        refine = []
        for pair in self.refine:
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise ConfigError(f"AttendExcite.refine must hold (fraction, threshold) pairs, got {pair!r}")
            refine.append((number(pair[0], "AttendExcite.refine fraction", minimum=0.0, maximum=1.0),
                           number(pair[1], "AttendExcite.refine threshold", minimum=0.0, maximum=1.0)))
        start, stop = self.steps
        for fraction, _ in refine:
            if start < stop and not start <= fraction < stop:  # an empty window is an idle control (tested identity)
                raise ConfigError(
                    f"AttendExcite.refine fraction {fraction:g} is outside steps=({start:g}, {stop:g}): refinement runs only "
                    "at steps the control acts on; give fractions f with start <= f < stop"
                )
        if len({fraction for fraction, _ in refine}) != len(refine):
            raise ConfigError(f"AttendExcite.refine gives one fraction twice: {tuple(refine)!r}")
        return tuple(refine)

    @property
    def refinement(self) -> tuple[tuple[float, float], ...]:
        """The (fraction, threshold) pairs refined: `refine`, or with None the paper's (`DEFAULT_REFINE`) inside the
        step window."""
        if self.refine is not None:
            return self.refine
        start, stop = self.steps
        return tuple((fraction, threshold) for fraction, threshold in DEFAULT_REFINE if start <= fraction < stop)

    def bind(self, context: BindContext) -> AttendExciteBound:
        return AttendExciteBound(self, context)


def _smoothing(control: Any) -> None:
    owner = type(control).__name__
    size = integer(control.kernel_size, f"{owner}.kernel_size", minimum=1)
    if size % 2 == 0:
        raise ConfigError(f"{owner}.kernel_size must be odd, got {size}")
    set_field(control, "kernel_size", size)
    set_field(control, "sigma", number(control.sigma, f"{owner}.sigma", minimum=0.0, exclusive_minimum=True))


COLUMNS: tuple[str, ...] = ("all", "prompt")


def _start_tokens(tokenizer: Any) -> int:
    """1 when the tokenizer puts a start token first (CLIP's <sot>, which the paper's `[1:-1]` drops), else 0 (T5 and
    other tokenizers without one: the first position is a word)."""
    with_special = list(tokenizer("x", add_special_tokens=True)["input_ids"])
    plain = list(tokenizer("x", add_special_tokens=False)["input_ids"])
    return 1 if with_special[: len(plain)] != plain else 0


def _prompt_columns(context: BindContext, owner: str) -> tuple[int, ...]:
    """The prompt's tokens without start and end tokens, in each text encoder's span (SD3: CLIP's, then T5's), up to
    the longest prompt's end token."""
    columns: list[int] = []
    for encoder in context.require_tokens(f"{owner}(columns='prompt')").encoders:
        start = _start_tokens(encoder.tokenizers[0])
        longest = max(
            len(tokenizer(text, add_special_tokens=True)["input_ids"])
            for tokenizer, prompts in zip(encoder.tokenizers, encoder.prompts)
            for text in prompts
        )
        columns.extend(range(encoder.offset + start, encoder.offset + min(longest, encoder.limit) - 1))
    return tuple(sorted(set(columns)))


def _renormalised_columns(context: BindContext, words: tuple[WordQuery, ...], owner: str, which: str = "all") -> tuple[tuple[int, ...], torch.Tensor]:
    """Attend-and-Excite's columns and the selector (rows, S, W) of each word's tokens among them: `"all"`, every
    text position but the first and the last (the paper's `[1:-1]`, its SD 1.x setting); `"prompt"`, the prompt's
    tokens without its start and end tokens (the paper's SD 2.1 setting, `normalize_eot`)."""
    if which == "all":
        tokens = context.tokens
        tokenizer = tokens.encoders[0].tokenizers[0] if tokens is not None and tokens.encoders else context.text_tokenizer
        if tokenizer is None:
            context.require_tokens(owner, positions=True)  # raises, saying why the words are unknown
        columns = tuple(range(_start_tokens(tokenizer), context.canvas.text_len - 1))
    else:
        columns = _prompt_columns(context, owner)
    index = {position: i for i, position in enumerate(columns)}
    per_row = word_columns(context, words, owner)
    selector = torch.zeros(context.prompt_rows, len(words), len(columns))
    for row, per_word in enumerate(per_row):
        for s, positions in enumerate(per_word):
            for p in positions:
                if p not in index:
                    raise ConfigError(
                        f"attnctl: {owner}: the word {words[s]!r} sits at text position {p}, outside the maps read "
                        f"(columns={which!r}: {_ranges(columns)})"
                    )
                selector[row, s, index[p]] = 1.0
    return columns, selector


def _ranges(positions: tuple[int, ...]) -> str:
    """`1..5, 77..81` for the positions 1-5 and 77-81."""
    spans: list[list[int]] = []
    for p in positions:
        if spans and spans[-1][1] == p - 1:
            spans[-1][1] = p
        else:
            spans.append([p, p])
    return ", ".join(f"{a}..{b}" for a, b in spans)


def _refinement_steps(control: AttendExcite, count: int) -> dict[int, float]:
    """Step -> threshold of each refinement at step `round(f n)` of the call's `n` steps. A step outside the window
    (`start <= i/n < stop`), or one an earlier pair already refines at, would silently not run as asked: refused for a
    `refine` the user gave; for the paper's pairs (`refine=None`), dropped with an `IdleControlWarning` naming them."""
    start, stop = control.steps
    if start >= stop:  # an empty window: an idle control (no step runs)
        return {}
    chosen: dict[int, tuple[float, float]] = {}
    for fraction, threshold in control.refinement:
        step = round(fraction * count)
        if not StepInfo(step, count).inside(control.steps):
            why = f"is outside steps=({start:g}, {stop:g}) (step i runs at i/n, here {step}/{count} = {step / count:g})"
        elif step in chosen:
            why = f"is also the step of the refinement at fraction {chosen[step][0]:g}"
        else:
            chosen[step] = (fraction, threshold)
            continue
        where = f"(fraction {fraction:g}, threshold {threshold:g}): its step round({fraction:g} x {count}) = {step} {why}"
        if control.refine is not None:
            raise ConfigError(
                f"attnctl: AttendExcite.refine {where} in this call of {count} steps, so it would not run as given; give "
                "fractions whose steps fall inside the window, one refinement per step, or run more steps"
            )
        warnings.warn(
            f"attnctl: AttendExcite drops the paper's refinement {where} in this call of {count} steps; give refine= "
            "pairs for this step count, or run more steps",
            IdleControlWarning,
            stacklevel=2,
        )
    return {step: threshold for step, (_, threshold) in chosen.items()}


class AttendExciteBound(LatentOptimizerBound):
    def __init__(self, control: AttendExcite, context: BindContext):
        columns, selector = _renormalised_columns(context, control.subjects, "AttendExcite", control.columns)
        super().__init__(control, context, columns, selector)
        self.refine_at = _refinement_steps(control, context.steps)
        h, w = self.grid
        widest = min(h, w) + 2 - (min(h, w) % 2)  # odd kernels only
        if control.kernel_size > 1 and control.kernel_size > widest:
            # the authors pad by 1 and convolve without padding: the kernel must fit the padded map
            raise ConfigError(
                f"attnctl: AttendExcite.kernel_size={control.kernel_size} does not fit the {h}x{w} attention maps of this "
                f"call padded by 1 cell (the authors' smoothing); give an odd kernel_size <= {widest}, or 1 for no smoothing"
            )

    def _loss(self, selector: torch.Tensor):
        c = self.control

        def loss_of(maps: torch.Tensor) -> torch.Tensor:
            # the authors pad by 1 (reflect) whatever the kernel size, then convolve without padding
            return losses.attend_excite_loss(losses.excite_maps(maps, selector, c.temperature, c.kernel_size, c.sigma, padding=1))

        return loss_of

    def optimise_step(self, x, inputs, frame, selector, outer: DenoiserCall):
        c = self.control
        step = outer.step.index
        size = _excite_step_size(c, step, outer.step.count)
        loss_of = self._loss(selector)
        loss, grad = self.gradient(x, inputs, frame, loss_of)
        self.log_loss(step, loss)
        threshold = self.refine_at.get(step)
        if threshold is not None and c.max_refinement_steps > 0:
            x, loss, grad = self._refine(x, loss, grad, size, threshold, lambda z: self.gradient(z, inputs, frame, loss_of))
        return x - size * grad

    def _refine(self, x, loss, grad, size, threshold, gradient):
        """The authors' `_perform_iterative_refinement_step`, per image: entered where the loss is above
        `1 - threshold`; each iteration steps, and the next one runs while the loss *before* that step was above the
        target (their `while` test), at most `max_refinement_steps` steps; then a closing loss pass at the refined
        latent, whose gradient the step's own update uses. Returns (x, loss, grad) of that closing pass."""
        going = loss > 1.0 - threshold
        if not bool(going.any()):
            return x, loss, grad
        target = max(0.0, 1.0 - threshold)
        shape = (-1, *([1] * (x.ndim - 1)))
        for iteration in range(1, self.control.max_refinement_steps + 1):
            x = x - size * grad * going.to(x.dtype).view(shape)
            going = going & (loss > target)
            if iteration == self.control.max_refinement_steps or not bool(going.any()):
                break
            loss, grad = gradient(x)
        loss, grad = gradient(x)
        return x, loss, grad


@dataclass(frozen=True)
class AStar(_LatentOptimization, type_name="a-star"):
    """A-STAR (Agarwal et al. 2023, "A-STAR: Test-time Attention Segregation and Retention for Text-to-image
    Synthesis"): at the steps in `steps`, a gradient step on the latent that keeps the subjects' attention maps apart
    (`loss="segregation"`), keeps each subject's map on the region it held at the previous step (`"retention"`), or
    both (`"both"`, the paper's).

    The maps are Attend-and-Excite's (token probabilities renormalised by a softmax of `temperature` times them over
    the text tokens, smoothed); the overlap of two maps is the paper's `sum min(a, b) / sum (a + b)`. `threshold`
    binarises the previous step's maps for the retention loss, as a fraction of each map's maximum. The step size is Attend-and-Excite's (`scale * sqrt(r)`). Other fields as `AttendExcite`.
    """

    subjects: tuple[WordQuery, ...]
    loss: str = "both"
    scale: float = 20.0
    steps: StepWindow = (0.0, 0.5)
    scale_range: tuple[float, float] = (1.0, 0.5)
    threshold: float = 0.5
    columns: str = "all"
    temperature: float = 100.0
    kernel_size: int = 3
    sigma: float = 0.5
    layers: LayerSpec = None

    LOSSES: ClassVar[tuple[str, ...]] = ("both", "segregation", "retention")

    def __post_init__(self) -> None:
        set_field(self, "subjects", _subjects(self.subjects, "AStar"))
        choice(self.loss, "AStar.loss", self.LOSSES)
        if self.loss != "retention" and len(self.subjects) < 2:
            raise ConfigError(f"AStar with loss={self.loss!r} needs at least two subjects (segregation is between subjects), got {self.subjects!r}")
        self._check_common()
        set_field(self, "scale_range", _range(self.scale_range, "AStar.scale_range"))
        set_field(self, "threshold", number(self.threshold, "AStar.threshold", minimum=0.0, maximum=1.0))
        set_field(self, "temperature", number(self.temperature, "AStar.temperature", minimum=0.0, exclusive_minimum=True))
        choice(self.columns, "AStar.columns", COLUMNS)
        _smoothing(self)
        if self.loss == "segregation":
            refuse_unused(self, "threshold", "with loss='segregation' (it binarises the maps of the retention loss: give loss='both' or 'retention')")

    def bind(self, context: BindContext) -> AStarBound:
        return AStarBound(self, context)


class AStarBound(LatentOptimizerBound):
    def __init__(self, control: AStar, context: BindContext):
        columns, selector = _renormalised_columns(context, control.subjects, "AStar", control.columns)
        super().__init__(control, context, columns, selector)
        self.previous: dict[int, torch.Tensor] = {}  # prompt row -> its binarised subject maps of the last step
        self._windows: dict[int, tuple[int, ...]] = {}  # step count -> the call's steps inside the window

    def window(self, count: int) -> tuple[int, ...]:
        """The steps of a call of `count` steps that the window holds."""
        if count not in self._windows:
            self._windows[count] = tuple(i for i in range(count) if self.active(StepInfo(i, count)))
        return self._windows[count]

    def idle_reason(self, count: int) -> str | None:
        """As every control's; and `loss="retention"` with one of the call's steps in the window: the retention term
        compares each subject's map with its map at the previous step (Agarwal et al. 2023, eq. 3), so it has no term
        at the window's first step, and a window of one step moves nothing (bitwise stock: the handle warns)."""
        reason = super().idle_reason(count)
        c = self.control
        if reason is not None or c.loss != "retention" or c.scale == 0 or len(self.window(count)) != 1:
            return reason
        start, stop = c.steps
        other = ", or give loss='both'" if len(c.subjects) > 1 else ""
        return (
            f"loss='retention' compares each subject's map with its map at the window's previous step, so it has no term "
            f"at the window's first step, and steps=({start:g}, {stop:g}) holds only step {self.window(count)[0]} of the "
            f"{count} steps of this call (step i runs at i/n), so the output is the stock one; widen the window to hold "
            f"two steps or more, or run more steps{other}"
        )

    def transform_inputs(self, frame: DenoiserCall, inputs: dict[str, Any]) -> dict[str, Any]:
        if self.control.loss == "retention" and len(self.window(frame.step.count)) < 2:
            return inputs  # idle (`idle_reason`): no pass, neither a loss pass nor one for the maps
        return super().transform_inputs(frame, inputs)

    def optimise_step(self, x, inputs, frame, selector, outer: DenoiserCall):
        c = self.control
        prompts = tuple(row.prompt for row in frame.rows.rows)
        previous = [self.previous.get(p) for p in prompts]
        retain = c.loss in ("both", "retention") and all(p is not None for p in previous)
        if c.loss == "retention" and not retain:
            # the window's first step: no previous map, so the loss has no term and no gradient (eq. 3); a forward
            # without autograd (no backward, no saved activations) records the maps the next step retains
            with torch.no_grad():
                subjects = losses.excite_maps(self.loss_maps(x, inputs, frame), selector, c.temperature, c.kernel_size, c.sigma)
            self.log_loss(outer.step.index, subjects.new_zeros(subjects.shape[0]))
            self._remember(prompts, subjects)
            return None
        seen: dict[str, torch.Tensor] = {}

        def loss_of(maps: torch.Tensor) -> torch.Tensor:
            subjects = losses.excite_maps(maps, selector, c.temperature, c.kernel_size, c.sigma)
            seen["maps"] = subjects.detach()
            total = subjects.new_zeros(subjects.shape[0])
            if c.loss in ("both", "segregation"):
                total = total + losses.segregation_loss(subjects)
            if retain:  # "both" at the window's first step: segregation alone
                total = total + losses.retention_loss(subjects, torch.stack(previous))
            return total

        loss, grad = self.gradient(x, inputs, frame, loss_of)
        self.log_loss(outer.step.index, loss)
        if c.loss != "segregation":
            self._remember(prompts, seen["maps"])
        return x - _excite_step_size(c, outer.step.index, outer.step.count) * grad

    def _remember(self, prompts: tuple[int, ...], subjects: torch.Tensor) -> None:
        """Each image's subject maps, binarised, for the next step's retention term."""
        binary = losses.binarize(subjects, self.control.threshold)
        for j, p in enumerate(prompts):
            self.previous[p] = binary[j]


BOX_CONSTRAINTS: tuple[str, ...] = ("ratio", "inner", "outer", "corner")


def _boxes(value: Any) -> tuple[tuple[WordQuery, tuple[float, float, float, float]], ...]:
    if isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, (tuple, list)):
        items = list(value)
    else:
        raise ConfigError(f"BoxGuidance.boxes must map words to boxes (x0, y0, x1, y1), got {value!r}")
    out = []
    for item in items:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ConfigError(f"BoxGuidance.boxes must map words to boxes (x0, y0, x1, y1), got the entry {item!r}")
        word, box = item
        out.append((validate_word_query(word if not isinstance(word, list) else tuple(word), owner="BoxGuidance.boxes"), validate_box(box, owner="BoxGuidance.boxes")))
    if not out:
        raise ConfigError("BoxGuidance.boxes is empty; give at least one word and its box")
    words = [word for word, _ in out]
    if has_duplicates(words):
        raise ConfigError(f"BoxGuidance.boxes gives a word more than one box (words match whatever their case): {tuple(words)!r}; one box per word")
    return tuple(out)


@dataclass(frozen=True)
class BoxGuidance(_LatentOptimization, type_name="box-guidance"):
    """Box layout guidance: backward guidance of Chen, Laina, Vedaldi 2023 ("Training-Free Layout Control with
    Cross-Attention Guidance"): at the steps in `steps`, up to `iterations` gradient steps per step on the loss
    `sum_words (1 - mass inside the word's box / total mass)^2` of the words' cross-attention maps, while it is above
    `loss_threshold`. The authors' step is `scale * sigma_t^2` times the gradient on their sampler's latent
    `x0 + sigma_t * noise` (LMS, `sigma_t^2 = (1 - alpha_bar_t) / alpha_bar_t`); the same move of the denoiser's input
    is `scale * (1 - alpha_bar_t)` times the gradient with respect to that input (flow matching: `scale * sigma^2`),
    which is what this control steps, on any scheduler (`guidance_step_variance`).

    `boxes`: `{word: (x0, y0, x1, y1)}` in relative image coordinates (x right, y down), as `Region` boxes.
    `constraints`: `("ratio",)` (Chen et al., default) and / or BoxDiff's `"inner"`, `"outer"`, `"corner"` (Xie et al.
    2023, "BoxDiff: Text-to-Image Synthesis with Training-Free Box-Constrained Diffusion"). BoxDiff's constraints read
    Attend-and-Excite's maps (`columns`, `temperature`, `kernel_size`, `sigma` as in `AttendExcite`); their top-k means
    take the top `topk` fraction, and the corner constraint the cells within `corner_width` of the box edges
    (P = 0.2 and L = 1: the authors' README runs and the config of their default branch). The step and
    iterations stay Chen et al.'s with any constraints. With `Regions`: `BoxGuidance.from_regions(regions, words)` gives each word its
    region's box.
    """

    boxes: Any
    scale: float = 30.0
    steps: StepWindow = (0.0, 0.2)
    iterations: int = 5
    loss_threshold: float = 0.2
    constraints: tuple[str, ...] = ("ratio",)
    topk: float = 0.2
    corner_width: int = 1
    columns: str = "all"
    temperature: float = 100.0
    kernel_size: int = 3
    sigma: float = 0.5
    layers: LayerSpec = None

    def __post_init__(self) -> None:
        set_field(self, "boxes", _boxes(self.boxes))
        self._check_common()
        set_field(self, "iterations", integer(self.iterations, "BoxGuidance.iterations", minimum=1, maximum=MAX_ITERATIONS))
        set_field(self, "loss_threshold", number(self.loss_threshold, "BoxGuidance.loss_threshold", minimum=0.0))
        if not isinstance(self.constraints, (str, tuple, list)):
            raise ConfigError(f"BoxGuidance.constraints must name one or more of {', '.join(BOX_CONSTRAINTS)}, got {self.constraints!r}")
        constraints = (self.constraints,) if isinstance(self.constraints, str) else tuple(self.constraints)
        if not constraints:
            raise ConfigError(f"BoxGuidance.constraints must name at least one of {', '.join(BOX_CONSTRAINTS)}")
        for name in constraints:
            choice(name, "BoxGuidance.constraints", BOX_CONSTRAINTS)
        set_field(self, "constraints", tuple(dict.fromkeys(constraints)))
        set_field(self, "topk", number(self.topk, "BoxGuidance.topk", minimum=0.0, maximum=1.0, exclusive_minimum=True))
        set_field(self, "corner_width", integer(self.corner_width, "BoxGuidance.corner_width", minimum=0))
        choice(self.columns, "BoxGuidance.columns", COLUMNS)
        set_field(self, "temperature", number(self.temperature, "BoxGuidance.temperature", minimum=0.0, exclusive_minimum=True))
        _smoothing(self)
        if "corner" not in self.constraints:
            refuse_unused(self, "corner_width", f"with constraints={self.constraints!r} (it is the width of the 'corner' constraint's bands)")
        if not {"inner", "outer"} & set(self.constraints):
            refuse_unused(self, "topk", f"with constraints={self.constraints!r} (it is the top fraction the 'inner' and 'outer' constraints average)")

    def select(self, adapter: ModelAdapter) -> tuple[LayerInfo, ...]:
        """Default with the ratio loss on a UNet: Chen et al.'s layers, the mid block's and the first up block's
        cross-attention (8x8 and 16x16 on SD 1.x at 512 px); otherwise the maps' default level."""
        layers = super().select(adapter)
        if self.layers is not None or "ratio" not in self.constraints:
            return layers
        text = select_kinds(self, adapter, TEXT_KINDS, "cross- or joint-attention")
        mid = tuple(layer for layer in text if layer.group == "mid")
        up = sorted({layer.block for layer in text if layer.group == "up"})
        if not mid or not up:
            return layers
        return mid + tuple(layer for layer in text if layer.group == "up" and layer.block == up[0])

    @staticmethod
    def from_regions(regions: Any, words: Any, **fields: Any) -> BoxGuidance:
        """Box guidance whose boxes are the boxes of `regions` (a `Regions` or a list of `Region`): `words[i]` (a
        word of the base prompt) gets the box of the i-th region; regions with a mask instead of a box are refused."""
        listed = tuple(getattr(regions, "regions", regions))
        words = (words,) if isinstance(words, str) else tuple(words)
        if len(words) != len(listed):
            raise ConfigError(f"BoxGuidance.from_regions: {len(listed)} region(s) but {len(words)} word(s) {words!r}; give one word per region")
        boxes = []
        for word, region in zip(words, listed):
            if getattr(region, "box", None) is None or isinstance(region.box, list):
                raise ConfigError(f"BoxGuidance.from_regions: the region {region.prompt!r} has no single box (masks are not boxes)")
            boxes.append((word, tuple(region.box)))
        return BoxGuidance(boxes=tuple(boxes), **fields)

    def bind(self, context: BindContext) -> BoxGuidanceBound:
        return BoxGuidanceBound(self, context)

    def call_effects(self, adapter: ModelAdapter) -> tuple[str, ...]:
        """As every latent optimiser; on joint attention also "base_words_in_boxes" (its loss reads the base
        prompt's words' joint maps inside the boxes)."""
        effects = super().call_effects(adapter)
        return effects + ("base_words_in_boxes",) if effects and adapter.text_attention == "joint" else effects


class BoxGuidanceBound(LatentOptimizerBound):
    def __init__(self, control: BoxGuidance, context: BindContext):
        words = tuple(word for word, _ in control.boxes)
        self.boxdiff = tuple(name for name in control.constraints if name != "ratio")
        if self.boxdiff:  # Attend-and-Excite's columns: BoxDiff renormalises over the text tokens
            columns, selector = _renormalised_columns(context, words, "BoxGuidance", control.columns)
        else:  # the ratio loss reads the words' own columns only
            per_row = word_columns(context, words, "BoxGuidance")
            columns = tuple(sorted({p for per_word in per_row for positions in per_word for p in positions}))
            where = {p: i for i, p in enumerate(columns)}
            selector = torch.zeros(context.prompt_rows, len(words), len(columns))
            for row, per_word in enumerate(per_row):
                for s, positions in enumerate(per_word):
                    for p in positions:
                        selector[row, s, where[p]] = 1.0
        if control.scale != 0:  # the step size is the input's noise level: refused here rather than mid-call
            require_noise_level(getattr(context.pipeline, "scheduler", None), "attnctl: BoxGuidance")
        super().__init__(control, context, columns, selector)
        # Chen et al.'s loss reads each layer's maps per head at the layer's own grid, with their hard boxes there
        self.keep_heads = "ratio" in control.constraints
        with kept_tensors():  # the loss passes save them for backward
            self.layer_boxes = tuple(
                upload(torch.stack([losses.hard_box(box, context.canvas.grid_at(layer.level)) for _, box in control.boxes]), context.device)
                for layer in self.layers
            )
            inside, bands, cells = self._boxdiff_boxes(control, context)
            self._refuse_empty_boxes(control, context, inside)
            self.cells = tuple(tuple(upload(part, context.device) for part in side) for side in cells)
            self.masks = upload(inside, context.device)
            self.bands = tuple(upload(band, context.device) for band in bands)

    def _boxdiff_boxes(self, control: BoxGuidance, context: BindContext) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], Any]:
        """BoxDiff's box at the maps' grid (each edge rounded to a cell edge: the cells whose centre is inside), its
        corner bands and its cells inside and out, on the host: made once per handle and grid (they read the boxes)."""
        key = ("boxdiff boxes", self.grid, control.corner_width)
        if key not in context.handle_cache:
            inside = torch.stack([box_mask(box, self.grid).view(self.grid).float() for _, box in control.boxes])
            bands = (losses.edge_bands(inside.amax(dim=1), control.corner_width), losses.edge_bands(inside.amax(dim=2), control.corner_width))
            context.handle_cache[key] = (inside, bands, losses.box_cells(inside))
        return context.handle_cache[key]

    def _refuse_empty_boxes(self, control: BoxGuidance, context: BindContext, inside: torch.Tensor) -> None:
        """A box that holds no cell of the maps it guides gives the loss no gradient: the output would be stock. The
        boxes are read on the host once per handle and grid (a warm call reads nothing)."""
        grids = tuple(dict.fromkeys(context.canvas.grid_at(layer.level) for layer in self.layers))
        key = ("empty boxes", grids, self.grid)
        if key not in context.handle_cache:
            hard = [torch.stack([losses.hard_box(box, grid) for _, box in control.boxes]) for grid in grids]
            context.handle_cache[key] = [
                s for s in range(len(control.boxes))
                if not ((self.keep_heads and any(bool(boxes[s].any()) for boxes in hard)) or (self.boxdiff and bool(inside[s].any())))
            ]
        if context.handle_cache[key]:
            word, box = control.boxes[context.handle_cache[key][0]]
            shown = [f"{h}x{w}" for h, w in grids] if self.keep_heads else []
            shown += [f"{self.grid[0]}x{self.grid[1]} (BoxDiff's maps)"] if self.boxdiff else []
            raise ConfigError(
                f"attnctl: BoxGuidance box {box} of {word!r} holds no cell of the attention maps it guides at this call's "
                f"size (h x w: {', '.join(shown)}), so it would change nothing: give a box at least one cell wide and high "
                "there (a cell is 1/w of the width, 1/h of the height), or render a larger image"
            )

    def _loss(self, maps: Any, selector: torch.Tensor) -> torch.Tensor:
        c = self.control
        total = None
        if self.keep_heads:
            total = losses.layout_loss(maps, self.layer_boxes, selector)
            maps = self.averaged(maps) if self.boxdiff else None
        if self.boxdiff:
            subjects = losses.excite_maps(maps, selector, c.temperature, c.kernel_size, c.sigma)
            boxdiff = losses.boxdiff_loss(subjects, self.masks, self.boxdiff, c.topk, c.corner_width, self.bands, self.cells)
            total = boxdiff if total is None else total + boxdiff
        return total

    def optimise_step(self, x, inputs, frame, selector, outer: DenoiserCall):
        c = self.control
        size = c.scale * guidance_step_variance(self.scheduler, inputs.get("timestep"))

        def loss_of(maps: Any) -> torch.Tensor:
            return self._loss(maps, selector)

        # the authors' loop: each iteration steps, and the next one runs while the loss before that step was above
        # the threshold
        going = None
        for iteration in range(c.iterations):
            loss, grad = self.gradient(x, inputs, frame, loss_of)
            if iteration == 0:
                self.log_loss(outer.step.index, loss)
                going = torch.ones_like(loss, dtype=torch.bool)
            # the step size rounded once to float32 and the product taken in float32, as a Python number would be
            step = (size.float() * grad.float()).to(grad.dtype)
            x = x - step * going.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
            going = going & (loss > c.loss_threshold)
            # a threshold of 0 never stops the loop early (a loss of exactly 0 has no gradient): no host read
            if c.loss_threshold > 0 and iteration + 1 < c.iterations and not bool(going.any()):
                break
        return x


def guidance_step_variance(scheduler: Any, timestep: Any) -> torch.Tensor:
    """The variance of the noise in the denoiser's input at the step in progress: `1 - alpha_bar` (VP schedulers:
    `sigma^2 / (sigma^2 + 1)` from the scheduler's own sigma, or `alphas_cumprod` at the timestep), `sigma^2` for
    flow matching (`(1 - sigma) x0 + sigma noise`); the level is `attnctl.noise.noise_level` (a number, or a 0-d tensor
    where the scheduler gathers it on the device: it stays there).

    It turns Chen et al.'s step into the input's scale. Their code steps LMS's latent `y = x0 + s noise` by
    `scale * s^2 * dL/dy`, `s^2 = (1 - alpha_bar) / alpha_bar`; the denoiser reads `x = y / sqrt(s^2 + 1)`, so
    `dL/dy = dL/dx / sqrt(s^2 + 1)` and `x` moves by `scale * s^2 / (s^2 + 1) * dL/dx = scale * (1 - alpha_bar) *
    dL/dx`. A flow-matching input `(1 - sigma) y` with `s = sigma / (1 - sigma)` moves by `scale * sigma^2 * dL/dx`.
    The scheduler's own sample then moves by the input's move over the input's scale (`_updated_sample`)."""
    level = noise_level(scheduler, timestep, owner="attnctl: BoxGuidance")
    value = level.value  # a float64 0-d tensor, left where the scheduler has it (no host read)
    return value**2 if level.kind == "flow" else 1.0 - value
