"""Prompt-to-Prompt editing (Hertz et al. 2022, "Prompt-to-Prompt Image Editing with Cross Attention Control",
arXiv:2208.01626): a base prompt and edited prompts generated together from the same initial noise, the edited
rows taking the base row's attention.

The call is `pipe([base, edit1, edit2, ...], ...)`. Row r of prompt p > 0 reads from the base prompt's row with
the same image index (`RowLayout.linked`: uncond rows from the base's uncond row, cond rows from its cond row,
perturbed copies from the copy with the same tag), on every call protocol. With `P_x = softmax(Q_x K_x^T s)` the
probabilities of row x (b: base, e: edited) and `V_e` the edited row's values, in the layers it acts on:

- self-attention, in the `self_steps` window: `P_b V_e = Attn(Q_b, K_b, V_e)`;
- cross-attention (the image-query rows over the text keys on joint attention), in the `cross_steps` window:
  replace `P_b M diag(w) V_e = Attn(Q_b, K_b, M (w * V_e))` with P2P's word-swap matrix M;
  refine `(P_b M_a + P_e diag(1 - a)) diag(w) V_e = Attn(Q_b, K_b, M_a (w * V_e)) + Attn(Q_e, K_e, (1 - a) w * V_e)`
  with P2P's refinement mapper (`M_a[m(j), j] = a_j`, a_j = 1 where edited token j aligns to base token m(j));
  w is the reweighting (P2P's equalizer, 1 elsewhere). With per-word windows (P2P's time-word alphas, alpha_j = 1
  where edited token j is inside its word's window at this step), M diag(alpha w) and alpha (1 - a) w + (1 - alpha):
  the columns outside their window keep the edited row's own maps, in the same two fused attentions.

So no probability matrix is formed: the edited rows run the same fused attention with the base row's queries and
keys and mapped values (joint layers, whose text queries keep their own attention, run the edited rows once more).
Local blending (P2P's `LocalBlend`) keeps the edit where the chosen words' cross-attention maps exceed a threshold
and copies the base row's latents elsewhere after every scheduler step. docs/methods.md, "Prompt-to-Prompt editing".
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import KW_ONLY, dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ...control import BindContext, Bound, Control
from ...denoiser_call import DenoiserCall, RowLayout, upload
from ...errors import CallLayoutError, ConfigError, TokenError, UnsupportedError
from ...families.base import Canvas, LayerInfo, ModelAdapter
from ...kernels.semantics import spec_rows
from ...kernels.spec import AttentionSpec
from ...noise import batch_noise, step_noise
from ...processors.chain import has_span, restricted_rows, token_layout
from ...processors.edit import AttendFn, AttentionCall, Edit, LayerHook
from ...selection import LayerSpec, validate_layers
from ...steps import call_frame
from ...tokens import validate_word_query
from ...validation import choice, number, plain_scalar, refuse_unused, set_field
from ..common import RowIndex
from ..maps.capture import word_attention
from .p2p_align import refinement_mapper, replacement_mapper

MODES: tuple[str, ...] = ("replace", "refine")
#: The key of `cross_steps`' word mapping for every token not named (P2P's `"default_"`); without it, (0, 1).
DEFAULT_WORD = "default_"
P2PWindow = float | tuple[float, float]
BRANCHES: tuple[str, ...] = ("both", "cond")
#: P2P edits self-attention where it has at most 16x16 = 256 tokens (`att_replace.shape[2] <= 16 ** 2`, a token
#: count: an 8x32 grid counts), and takes its blending maps of 256 tokens (SD 1.x at 512 px: 16x16).
P2P_GRID = 16


class WordTable(Mapping):
    """An ordered, immutable, hashable `{word: value}` mapping (a frozen control's per-word settings: a dict field
    could be changed after validation, and would change the control's hash)."""

    __slots__ = ("_items",)

    def __init__(self, items: Any):
        self._items: tuple[tuple[str, Any], ...] = tuple(items.items() if isinstance(items, Mapping) else items)

    def __getitem__(self, key: str) -> Any:
        for word, value in self._items:
            if word == key:
                return value
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return (word for word, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:  # as a dict compares: the same items in another order are equal
        return hash(frozenset(self._items))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mapping):
            return dict(self._items) == dict(other.items())
        return NotImplemented

    def __repr__(self) -> str:
        return f"{type(self).__name__}({dict(self._items)!r})"


class WordWindows(WordTable):
    """`cross_steps` given per word: a `WordTable` of `{word: window}` with `"default_"` first.

    Later words override earlier ones on tokens they share, as P2P applies its dictionary in order: the order is
    part of the value."""

    __slots__ = ()

    def __hash__(self) -> int:
        return hash(self._items)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, WordWindows):
            return self._items == other._items
        return super().__eq__(other)


_WINDOW_FORMS = "a fraction of the steps in [0, 1] or a (start, end) pair of fractions with start <= end"


def p2p_window(value: Any, name: str) -> P2PWindow:
    """A validated window: a float (from the start) or a (start, end) tuple of fractions of the steps."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ConfigError(f"{name} must be {_WINDOW_FORMS}, got {value!r}")
        start = number(value[0], f"{name}[0] (the window's start)", minimum=0, maximum=1)
        end = number(value[1], f"{name}[1] (the window's end)", minimum=0, maximum=1)
        if start > end:
            raise ConfigError(f"{name} = {tuple(value)!r} starts after it ends; give (start, end) with start <= end")
        return (start, end)
    if isinstance(plain_scalar(value), bool) or not isinstance(plain_scalar(value), (int, float)):
        raise ConfigError(f"{name} must be {_WINDOW_FORMS}, got {value!r}")
    return number(value, name, minimum=0, maximum=1)


def cross_windows(value: Any) -> P2PWindow | WordWindows:
    """`cross_steps` validated: one window, or a mapping {word: window} with an optional `"default_"` key."""
    if not isinstance(value, Mapping):
        return p2p_window(value, "PromptToPrompt.cross_steps")
    if not value:
        raise ConfigError(
            "PromptToPrompt.cross_steps is an empty mapping; give {word: window, ..., 'default_': window} or one window"
        )
    default: list[tuple[str, P2PWindow]] = []
    words: list[tuple[str, P2PWindow]] = []
    for word, window in value.items():
        if not isinstance(word, str):
            raise ConfigError(f"PromptToPrompt.cross_steps: the mapping's keys are words or {DEFAULT_WORD!r}, got {word!r}")
        checked = p2p_window(window, f"PromptToPrompt.cross_steps[{word!r}]")
        if word == DEFAULT_WORD:
            default.append((DEFAULT_WORD, checked))
            continue
        query = validate_word_query(word, owner="PromptToPrompt.cross_steps")
        if any(query == seen for seen, _ in words):
            raise ConfigError(f"PromptToPrompt.cross_steps names the word {query!r} twice")
        words.append((query, checked))
    return WordWindows(default + words)


def _span(window: P2PWindow) -> tuple[float, float]:
    return (0.0, window) if isinstance(window, float) else window


def cross_step_range(window: P2PWindow, count: int) -> range:
    """The steps (0-based) inside a cross-attention window over `count` steps: P2P's time alphas have `count + 1`
    entries, and a window (start, end) sets the entries `int(start (count + 1))` to `int(end (count + 1)) - 1`
    (`update_alpha_time_word`; a float f is (0, f))."""
    start, end = _span(window)
    return range(int(start * (count + 1)), int(end * (count + 1)))


def self_step_range(window: P2PWindow, count: int) -> range:
    """The steps inside a self-attention window: P2P's `num_self_replace`, `int(count start) <= i < int(count end)`."""
    start, end = _span(window)
    return range(int(start * count), int(end * count))


def _holds_a_step(steps: range, count: int) -> bool:
    """Whether a window's step range holds one of the call's steps 0..count-1 (P2P's cross window runs over n + 1
    entries, so its last one is no step)."""
    return steps.start < min(steps.stop, count)


def _window_empty(window: P2PWindow) -> bool:
    start, end = _span(window)
    return end <= start


def _default_window(windows: P2PWindow | WordWindows) -> P2PWindow:
    if isinstance(windows, WordWindows):
        return windows[DEFAULT_WORD] if DEFAULT_WORD in windows else (0.0, 1.0)
    return windows


@dataclass(frozen=True)
class PromptToPrompt(Control, type_name="prompt-to-prompt"):
    """Edit an image by editing its prompt (Prompt-to-Prompt, Hertz et al. 2022).

    Call the pipeline with a list of prompts `[base, edit1, ...]` (each may have `num_images_per_prompt` images);
    the edited rows start from the base row's initial latents (copied at the first step, so one generator is
    enough with a deterministic scheduler) and take its attention. The base rows are never changed. A scheduler that
    adds noise at every step (Euler Ancestral, DDPM, LCM, ...: `attnctl.noise.step_noise`) needs one generator per
    image, seeded alike, for the edited rows to draw their base row's noise; the call warns where they do not.

    `mode`: `"replace"` (words swapped one for one; token counts may differ) or `"refine"` (words added or
    removed: aligned tokens take the base maps, new tokens keep their own). `cross_steps` / `self_steps`: the
    window of the steps in which cross- / self-attention is taken from the base row, as P2P's `cross_replace_steps`
    / `self_replace_steps`: a fraction f of the steps from the start, or a `(start, end)` pair of fractions;
    `cross_steps` may also be a mapping `{word: window, "default_": window}`: the edited prompts' tokens of each
    word take the base maps in that word's window, every other token in the `"default_"` window ((0, 1) when the
    key is missing, as P2P). Steps: cross `int(start (n + 1)) <= i < int(end (n + 1))`, self
    `int(start n) <= i < int(end n)` (P2P's counts).
    `reweight`: `{word: factor}` scaling the attention of words of the edited prompts (P2P's equalizer: any finite
    factor, negative ones included, multiplies the probability columns; only inside the cross-attention window, as
    P2P). `local_blend`: words (found in a prompt, they count for its rows)
    whose cross-attention maps confine the edit; `blend_threshold` on the max-normalised maps; blending from the
    step fraction `blend_start`. `branch`: `"cond"` (only the cond rows, as P2P's reference code; default) or
    `"both"` (uncond rows also read the base's uncond row). `layers`: default every cross- / joint-attention layer, and
    the self-attention layers with at most 16x16 = 256 tokens in the call (P2P's rule, a token count: 8x32 too; every
    self-attention layer of a denoiser with one token grid); given layers are all edited. Local blending averages
    the maps of the cross-attention level whose token count is nearest to 256. `edits`: the edited prompts, for `attnctl render` jobs and
    `Model.generate` (they call the pipeline with `[prompt, *edits]`, one image per prompt from the same seed);
    a direct call must then pass that many prompts.
    """

    mode: str = "replace"
    _: KW_ONLY
    cross_steps: float | tuple[float, float] | Mapping[str, float | tuple[float, float]] = 0.8
    self_steps: float | tuple[float, float] = 0.4
    reweight: Any = None
    local_blend: Any = None
    blend_threshold: float = 0.3
    blend_start: float = 0.2
    branch: str = "cond"
    layers: LayerSpec = None
    edits: Any = None

    needs_words: ClassVar[bool] = True
    grid_dims: ClassVar[tuple[int, ...]] = (2,)
    step_cache_refusal: ClassVar[str | None] = "the edited rows read the base row's attention in every layer it acts on"

    def compile_refusal(self, adapter: ModelAdapter) -> str | None:
        # Compiled, each edit's hook carries the frame's row links as tensors and reads only its phase's flags (one graph
        # per phase, not per layer); the blend's maps are added in place into a tensor the scheduler step reads after
        # the forward. tests/test_compile_controls.py: bitwise eager on UNet, SD3, Flux and PixArt, with each option.
        return None

    def __post_init__(self) -> None:
        choice(self.mode, "PromptToPrompt.mode", MODES)
        choice(self.branch, "PromptToPrompt.branch", BRANCHES)
        set_field(self, "cross_steps", cross_windows(self.cross_steps))
        set_field(self, "self_steps", p2p_window(self.self_steps, "PromptToPrompt.self_steps"))
        set_field(self, "blend_threshold", number(self.blend_threshold, "PromptToPrompt.blend_threshold", minimum=0, maximum=1))
        set_field(self, "blend_start", number(self.blend_start, "PromptToPrompt.blend_start", minimum=0, maximum=1))
        if self.reweight is not None:
            if not isinstance(self.reweight, Mapping) or not self.reweight:
                raise ConfigError(f"PromptToPrompt.reweight must be a non-empty mapping {{word: factor}} or None, got {self.reweight!r}")
            table = {}
            for word, factor in self.reweight.items():
                if not isinstance(word, str):
                    raise ConfigError(f"PromptToPrompt.reweight: keys are words, got {word!r}")
                query = validate_word_query(word, owner="PromptToPrompt.reweight")
                if query in table:
                    raise ConfigError(f"PromptToPrompt.reweight names {query!r} twice ({word!r}); one factor per word")
                # any finite factor: the equalizer multiplies probability columns (the mapped values), and P2P's
                # notebook uses negative ones ("pink bear", -1)
                table[query] = number(factor, f"PromptToPrompt.reweight[{word!r}]")
            if self.cross_idle:
                raise ConfigError(
                    "PromptToPrompt.reweight acts inside the cross-attention window (as P2P's equalizer), and "
                    f"cross_steps={self.cross_steps!r} leaves no step for it; give a non-empty cross_steps window"
                )
            set_field(self, "reweight", WordTable(table))
        if self.local_blend is not None:
            words = (self.local_blend,) if isinstance(self.local_blend, str) else self.local_blend
            if not isinstance(words, (tuple, list)) or not words or not all(isinstance(w, str) for w in words):
                raise ConfigError(f"PromptToPrompt.local_blend must be a word or a non-empty list of words, or None; got {self.local_blend!r}")
            set_field(self, "local_blend", tuple(validate_word_query(w, owner="PromptToPrompt.local_blend") for w in words))
        else:
            for name in ("blend_threshold", "blend_start"):
                refuse_unused(self, name, "with local_blend=None (it sets the local blend of the words' maps: give local_blend=[words])")
        set_field(self, "layers", validate_layers(self.layers, name="PromptToPrompt.layers"))
        if self.edits is not None:
            edits = (self.edits,) if isinstance(self.edits, str) else self.edits
            if not isinstance(edits, (tuple, list)) or not edits or not all(isinstance(e, str) and e.strip() for e in edits):
                raise ConfigError(f"PromptToPrompt.edits must be None or a non-empty list of edited prompts (strings), got {self.edits!r}")
            set_field(self, "edits", tuple(edits))

    @property
    def cross_idle(self) -> bool:
        """Every cross-attention window is empty (end <= start), for every word."""
        if isinstance(self.cross_steps, WordWindows):
            return _window_empty(_default_window(self.cross_steps)) and all(_window_empty(w) for w in self.cross_steps.values())
        return _window_empty(self.cross_steps)

    @property
    def idle(self) -> bool:
        """Nothing to do: no attention window and no blending (the output is the stock one, bit for bit)."""
        return self.cross_idle and _window_empty(self.self_steps) and self.local_blend is None

    # -- Control protocol -------------------------------------------------------------------------------
    def validate_for(self, adapter: ModelAdapter) -> None:
        for lack in ("extra_rows", "appended_text"):
            if lack in adapter.lacks:
                raise UnsupportedError(
                    f"attnctl: PromptToPrompt links the rows of one denoiser call and aligns their text tokens at fixed "
                    f"positions, which the {adapter.family} family does not offer: {adapter.lacks[lack]}"
                )

    def select(self, adapter: ModelAdapter) -> tuple[LayerInfo, ...]:
        """The `layers` given, or every cross-, joint- and self-attention layer (the self-attention layers P2P
        edits are then chosen per call by their token grid: `p2p_self_layers`)."""
        return Control.select(self, adapter)

    def layer_effects(self, adapter: ModelAdapter, layer: LayerInfo) -> tuple[str, ...]:
        if self.local_blend is not None and layer.kind != "self":
            return ("linked_rows", "capture")
        return ("linked_rows",)

    def call_effects(self, adapter: ModelAdapter) -> tuple[str, ...]:
        """"row_links": the edited rows read the base row's attention and start from its latent."""
        return () if self.idle else ("row_links",)

    def bind(self, context: BindContext) -> Bound:
        return PromptToPromptBound(self, context)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["local_blend"] = list(self.local_blend) if self.local_blend is not None else None
        out["edits"] = list(self.edits) if self.edits is not None else None
        return out


def _same_generators(generators: Any, pairs: list[tuple[int, int]], rows: int) -> bool:
    """Whether `generators` (the call's `generator`) is a list of one generator per image in which each (edited,
    base) pair holds two distinct generators in the same state (seeded alike, and the same draws so far: the
    initial latents): they draw the same noise at every step."""
    if not isinstance(generators, (list, tuple)) or len(generators) != rows:
        return False
    for row, base in pairs:
        mine, theirs = generators[row], generators[base]
        if mine is theirs or not isinstance(mine, torch.Generator) or not isinstance(theirs, torch.Generator):
            return False
        if mine.device != theirs.device or not torch.equal(mine.get_state(), theirs.get_state()):
            return False
    return True


def blend_level(layers: tuple[LayerInfo, ...], canvas: Canvas) -> int | None:
    """The level of the cross-attention maps local blending averages: the one whose token count is nearest to P2P's
    16x16 = 256 (its `LocalBlend` reads maps of 256 tokens; compared by the side of a square of as many tokens, the
    finer of two equally near), or None without cross- / joint-attention layers."""
    levels = sorted({layer.level for layer in layers if layer.kind in ("cross", "joint")})
    if not levels:
        return None
    return min(levels, key=lambda level: (abs(math.sqrt(_tokens(canvas, level)) - P2P_GRID), -_tokens(canvas, level)))


def p2p_self_layers(layers: tuple[LayerInfo, ...], canvas: Canvas) -> tuple[LayerInfo, ...]:
    """P2P edits self-attention only where it has at most 16x16 = 256 tokens (its `replace_self_attention`,
    `att_replace.shape[2] <= 16 ** 2`: an 8x32 grid too); a denoiser with one token grid (DiT) has it edited
    everywhere."""
    selfs = tuple(layer for layer in layers if layer.kind == "self")
    if len({layer.level for layer in selfs}) <= 1:
        return selfs
    return tuple(layer for layer in selfs if _tokens(canvas, layer.level) <= P2P_GRID**2)


def _tokens(canvas: Canvas, level: int) -> int:
    h, w = canvas.grid_at(level)
    return h * w


@dataclass
class _Plan:
    """The links of one row layout: target rows, their source rows and the mapped text tables, on the device."""

    targets: tuple[int, ...]
    sources: tuple[int, ...]  # the source row of each target
    target_index: torch.Tensor
    source_index: torch.Tensor
    permuted: tuple[int, ...]  # each row's own position, the source's for target rows
    mapper: torch.Tensor | None  # (E, T, T) M diag(w) per target; None: identity everywhere
    own_text: torch.Tensor  # (E, T) (1 - a) w per target
    own_text_zero: bool  # the edited rows keep none of their own cross-attention (replace)
    cross: bool = True  # some target row has a text column inside its cross-attention window
    text_len: int = 0  # T: the text length of the target rows' branch (Qwen-Image's negative prompt has its own)


class PromptToPromptBound(Bound):
    """PromptToPrompt bound to one pipeline call: token alignment per edited row, links per row layout, the
    blending maps and the scheduler wrap."""

    def __init__(self, control: PromptToPrompt, context: BindContext):
        super().__init__(control, context.layers, (0.0, 1.0))
        self.p2p = control
        self.adapter = context.adapter
        self.device = context.device
        self.count = context.steps
        self.text_len = context.canvas.text_len  # the cond rows' (the prompts'); each branch's own in `text_lens`
        self.rows = context.prompt_rows
        self.per_prompt = _per_prompt(context)
        if self.rows % self.per_prompt or self.rows // self.per_prompt < 2:
            raise ConfigError(
                f"attnctl: PromptToPrompt needs a list of prompts [base, edit, ...] in one call; this call has "
                f"{self.rows // max(self.per_prompt, 1)} prompt(s)"
            )
        if control.edits is not None and self.rows // self.per_prompt != 1 + len(control.edits):
            raise ConfigError(
                f"attnctl: PromptToPrompt.edits names {len(control.edits)} edited prompt(s), but this call has "
                f"{self.rows // self.per_prompt} prompts; call with [base, *edits]"
            )
        self.index = RowIndex()
        self.idle = control.idle
        tokens = context.require_tokens("PromptToPrompt")
        self.edited = tuple(range(self.per_prompt, self.rows))
        weights = self._equalizer(tokens)
        self.tables: dict[str, tuple[torch.Tensor | None, torch.Tensor, bool]] = {}
        self._host_tables: dict[str, tuple[torch.Tensor | None, torch.Tensor, bool]] = {}
        # each branch's text length: Qwen-Image encodes the negative prompt by a call of its own, padded to its own
        # longest prompt, so the uncond rows' tables have that length
        self.text_lens = {branch: context.text_len_of(branch) for branch in ("cond", "uncond")}
        for branch in ("cond", "uncond") if control.branch == "both" else ("cond",):
            source = tokens if branch == "cond" else context.negative_tokens
            host = self._host_tables[branch] = self._tables(source, weights if branch == "cond" else None, branch)
            self.tables[branch] = (None if host[0] is None else upload(host[0], self.device), upload(host[1], self.device), host[2])
        # per-word cross-attention windows: (window, (rows, T) columns it sets), "default_" first (P2P's order)
        self.word_windows: tuple[tuple[P2PWindow, torch.Tensor], ...] | None = None
        if isinstance(control.cross_steps, WordWindows):
            self.word_windows = self._word_columns(tokens, control.cross_steps)
            self._check_reweight_windows(context.steps)
        elif control.reweight and context.steps > 0 and not _holds_a_step(cross_step_range(control.cross_steps, context.steps), context.steps):
            raise ConfigError(
                f"attnctl: PromptToPrompt.reweight acts inside the cross-attention window (as P2P's equalizer), and "
                f"cross_steps={control.cross_steps!r} holds none of the {context.steps} steps of this call (steps "
                "int(start (n+1)) to int(end (n+1)) - 1): widen the window or run more steps"
            )
        self._windows: dict[tuple[int, int], Any] = {}  # (step, count) -> None, "all" or a key of _window_tables
        self._window_tables: dict[Any, dict[str, tuple[torch.Tensor | None, torch.Tensor, bool, tuple[bool, ...]]]] = {}
        self.text_layers = frozenset(layer.index for layer in context.layers if layer.kind in ("cross", "joint"))
        selfs = context.layers if control.layers is not None else p2p_self_layers(context.layers, context.canvas)
        self.self_layers = frozenset(layer.index for layer in selfs if layer.kind == "self") | frozenset(
            layer.index for layer in context.layers if layer.kind == "joint"
        )
        level = blend_level(context.layers, context.canvas)
        self.blend_layers = frozenset()
        self.blend_grid: tuple[int, int] | None = None
        self.selector: torch.Tensor | None = None
        if control.local_blend is not None:
            if level is None:
                raise ConfigError("attnctl: PromptToPrompt.local_blend needs cross- or joint-attention layers among its layers")
            self.blend_layers = frozenset(
                layer.index for layer in context.layers if layer.kind in ("cross", "joint") and layer.level == level
            )
            self.blend_grid = context.canvas.grid_at(level)
            self.selector = self._blend_selector(tokens, control.local_blend)
        self._canvas_token_hw = context.canvas.token_hw
        self.maps: torch.Tensor | None = None  # (rows, image tokens) running sums of the blend words' maps
        self.last_step = 0
        self.stepped = False
        self._plans: dict[Any, _Plan | None] = {}
        self._edits: dict[Any, Edit] = {}
        self._selectors: dict[Any, torch.Tensor] = {}
        if not self.idle:
            scheduler = getattr(context.pipeline, "scheduler", None)
            if scheduler is None or not callable(getattr(scheduler, "step", None)):
                raise UnsupportedError("attnctl: PromptToPrompt needs the pipeline's scheduler (its step copies the start latents and blends)")
            context.wrap_method(scheduler, "step", self._wrap_step)
            self._warn_step_noise(context.pipeline, scheduler)

    # -- binding ----------------------------------------------------------------------------------------
    def _warn_step_noise(self, pipeline: Any, scheduler: Any) -> None:
        """Warn (once per call) where the edited rows will not draw the noise their base rows draw: the scheduler adds
        noise at every step (`noise.step_noise`) and the call does not give each edited image the same noise source
        as its base image (a generator of its own, in the state of the base image's; for DPM-Solver-SDE, a seed of
        its own in `noise_sampler_seed`). The initial latents are copied either way: the drift comes from the steps."""
        frame = call_frame(pipeline)
        given = frame.f_locals if frame is not None else {}  # read once, at bind
        reason = step_noise(scheduler, given.get("eta"))
        if reason is None:
            return
        pairs = [(row, row % self.per_prompt) for row in self.edited]
        if batch_noise(scheduler):
            seeds = getattr(scheduler, "noise_sampler_seed", None)
            if isinstance(seeds, (list, tuple)) and len(seeds) == self.rows and all(seeds[r] == seeds[b] for r, b in pairs):
                return
            remedy = (
                "it draws that noise for the whole batch from its own noise_sampler_seed, which the pipeline's generators "
                "do not reach: give it one seed per image, the base image's for each edited image "
                f"({type(scheduler).__name__}.from_config(config, noise_sampler_seed=[seed] * {self.rows})), or use a "
                "deterministic scheduler"
            )
        else:
            if _same_generators(given.get("generator"), pairs, self.rows):
                return
            remedy = (
                "pass one generator per image, each edited image's seeded as its base image's "
                f"(generator=[torch.Generator().manual_seed(seed) for _ in range({self.rows})]: {self.rows} generator "
                "objects, not one object repeated), as attnctl render, Model.generate and attnctl.interpolate do, or use "
                "a deterministic scheduler"
            )
        warnings.warn(
            f"attnctl: PromptToPrompt: {reason}, and this call does not give each edited image the noise of its base "
            "image: the edited images start from their base image's latents but drift from it at every step (an edit "
            f"identical to its base prompt comes out different). To share the base images' noise, {remedy}",
            UserWarning, stacklevel=2,
        )

    def _equalizer(self, tokens: Any) -> dict[int, torch.Tensor]:
        """Per edited cond row: (T,) factors of P2P's equalizer (1 where not reweighted)."""
        out: dict[int, torch.Tensor] = {}
        table = self.p2p.reweight or {}
        found = {word: False for word in table}
        self._reweighted: dict[Any, torch.Tensor] = {word: torch.zeros(self.rows, self.text_len, dtype=torch.bool) for word in table}
        for row in self.edited:
            w = torch.ones(self.text_len)
            for word, factor in table.items():
                positions = tokens.positions(word, row, missing_ok=True)  # a word the pipeline truncated away raises
                if not positions:
                    continue
                found[word] = True
                w[list(positions)] *= factor
                self._reweighted[word][row, list(positions)] = True
            out[row] = w
        missing = [word for word, hit in found.items() if not hit]
        if missing:
            raise TokenError(f"attnctl: PromptToPrompt.reweight words {missing} are in none of the edited prompts")
        return out

    def _tables(self, tokens: Any, weights: dict[int, torch.Tensor] | None, branch: str):
        """(mapper (rows, T, T) or None for identity, own text scale (rows, T), own all zero) of one branch (T: its
        text length)."""
        t = self.text_lens[branch]
        mappers = torch.eye(t).repeat(self.rows, 1, 1)
        own = torch.zeros(self.rows, t)
        for row in self.edited:
            base = row % self.per_prompt
            if tokens is not None:
                mappers[row], own[row] = self._aligned(tokens, base, row, t, branch, 0)
                # SDXL / SD3: CLIP-L and CLIP-G share positions, so one alignment serves both texts (prompt, prompt_2)
                for k in range(1, tokens.tokenizer_count):
                    other = self._aligned(tokens, base, row, t, branch, k)
                    if not (torch.equal(other[0], mappers[row]) and torch.equal(other[1], own[row])):
                        prompt = "prompt" if branch == "cond" else "negative_prompt"
                        raise UnsupportedError(
                            f"attnctl: PromptToPrompt: row {row} edits row {base} differently in {prompt} "
                            f"({tokens.text(base)!r} -> {tokens.text(row)!r}) and in {prompt}_{k + 1} "
                            f"({tokens.text(base, k)!r} -> {tokens.text(row, k)!r}): their encoders share token "
                            f"positions, so one token alignment must serve both. Edit {prompt}_{k + 1} at the same token "
                            f"positions as {prompt}, or leave {prompt}_{k + 1} None (it then repeats {prompt})"
                        )
            if weights is not None:
                mappers[row] = mappers[row] * weights[row][None, :]
                own[row] = own[row] * weights[row]
        identity = bool(torch.equal(mappers, torch.eye(t).expand(self.rows, t, t)))
        zero = not bool(own.any())
        return (None if identity else mappers, own, zero)

    def _aligned(self, tokens: Any, base: int, row: int, t: int, branch: str, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(mapper (T, T), own text scale (T,)) of edited row `row` from its base row `base`, the tokens read by each
        encoder's tokenizer `k`."""
        mapper, own = torch.eye(t), torch.zeros(t)
        words = zip(tokens.token_words(base, k), tokens.token_words(row, k))
        for ((offset, limit, x), (_, _, y)), (x_words, y_words) in zip(zip(tokens.token_ids(base, k), tokens.token_ids(row, k)), words):
            span = min(limit, t - offset)
            if span <= 0 or offset < 0:
                continue
            block = slice(offset, offset + span)
            mapper[block, block] = 0.0
            if self.p2p.mode == "replace":
                what = f"the {branch} prompt of row {row}" + (f" (its text for tokenizer {k + 1})" if k else "")
                mapper[block, block] = torch.tensor(replacement_mapper(x, y, span, what=what, x_words=x_words, y_words=y_words))
            else:
                mapping, alpha = refinement_mapper(x, y, span, masked_padding=self.adapter.masks_text_padding)
                for j, (m, a) in enumerate(zip(mapping, alpha)):
                    if m >= 0:
                        mapper[offset + m, offset + j] = a
                    own[offset + j] = 1.0 - a
        return mapper, own

    def _word_columns(self, tokens: Any, windows: WordWindows) -> tuple[tuple[P2PWindow, torch.Tensor], ...]:
        """P2P's `get_time_words_attention_alpha`: the default window over every text column of every edited row,
        then each word's window over its tokens in the edited prompts that hold it (a word in none of them is an
        error)."""
        every = torch.zeros(self.rows, self.text_len, dtype=torch.bool)
        every[list(self.edited)] = True
        out = [(_default_window(windows), every)]
        missing = []
        for word, window in windows.items():
            if word == DEFAULT_WORD:
                continue
            columns = torch.zeros(self.rows, self.text_len, dtype=torch.bool)
            for row in self.edited:
                positions = tokens.positions(word, row, missing_ok=True)
                columns[row, list(positions)] = True
            if not bool(columns.any()):
                missing.append(word)
            out.append((window, columns))
        if missing:
            raise TokenError(f"attnctl: PromptToPrompt.cross_steps words {missing} are in none of the edited prompts")
        return tuple(out)

    def _alpha(self, step: int, count: int) -> torch.Tensor:
        """(rows, T) bool: the edited cond rows' text columns inside their cross-attention window at `step` (P2P's
        `cross_replace_alpha[step]`)."""
        alpha = torch.zeros(self.rows, self.text_len, dtype=torch.bool)
        for window, columns in self.word_windows:
            alpha = alpha.masked_fill(columns, step in cross_step_range(window, count))
        return alpha

    def idle_reason(self, count: int) -> str | None:
        """Windows that are not empty but hold none of the call's steps (P2P's rounding: `cross_step_range`,
        `self_step_range`) and no local blending: no attention is edited (the handle warns)."""
        control = self.p2p
        if control.idle or control.local_blend is not None or count < 1:
            return None
        cross = control.cross_steps
        windows = (*cross.values(), _default_window(cross)) if isinstance(cross, WordWindows) else (cross,)
        if any(_holds_a_step(cross_step_range(w, count), count) for w in windows) or _holds_a_step(self_step_range(control.self_steps, count), count):
            return None
        shown = dict(cross) if isinstance(cross, WordWindows) else cross
        return (
            f"its windows cross_steps={shown!r} and self_steps={control.self_steps!r} hold none of the {count} steps of "
            f"this call (cross-attention: steps int(start (n+1)) to int(end (n+1)) - 1; self-attention: int(start n) to "
            "int(end n) - 1), so no attention is edited: the edited prompts' images only start from the base row's "
            "noise; widen a window or run more steps"
        )

    def _check_reweight_windows(self, count: int) -> None:
        """A reweighted word whose tokens never fall inside their cross-attention window would be silently inert."""
        if count <= 0:
            return
        inside = torch.zeros(self.rows, self.text_len, dtype=torch.bool)
        for step in range(count):
            inside |= self._alpha(step, count)
        never = [word for word, columns in self._reweighted.items() if not bool((columns & inside).any())]
        if never:
            raise ConfigError(
                f"attnctl: PromptToPrompt.reweight acts inside the cross-attention window (as P2P's equalizer), and the "
                f"tokens of {never} are inside no window of cross_steps={dict(self.p2p.cross_steps)!r} over {count} steps"
            )

    def _cross_window(self, step: int, count: int) -> Any:
        """The cross-attention window at this step: None (no text column of any edited row inside it), "all" (every
        one: the tables as bound) or the key of the tables masked to the columns inside it."""
        key = (step, count)
        if key in self._windows:
            return self._windows[key]
        if self.word_windows is None:
            found = "all" if step in cross_step_range(self.p2p.cross_steps, count) else None
        else:
            alpha = self._alpha(step, count)
            edited = alpha[list(self.edited)]
            # uncond rows (branch="both") read their negative prompt, which holds none of the words: the default window
            uncond = "uncond" in self.tables and step in cross_step_range(self.word_windows[0][0], count)
            if not bool(edited.any()) and not uncond:
                found = None
            elif bool(edited.all()) and (uncond or "uncond" not in self.tables):
                found = "all"
            else:
                found = (edited.numpy().tobytes(), uncond)
                if found not in self._window_tables:
                    full = torch.zeros(self.rows, self.text_lens["uncond"], dtype=torch.bool)
                    full[list(self.edited)] = uncond
                    self._window_tables[found] = {
                        branch: self._masked_tables(branch, alpha if branch == "cond" else full) for branch in self.tables
                    }
        self._windows[key] = found
        return found

    def _masked_tables(self, branch: str, alpha: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, bool, tuple[bool, ...]]:
        """A branch's tables with the text columns outside their window (alpha 0) kept as the edited row's own:
        `M diag(alpha w)` and `alpha (1 - a) w + (1 - alpha)` (P2P's `A_new alpha + (1 - alpha) A_e`)."""
        on = tuple(bool(alpha[row].any()) for row in range(self.rows))
        if bool(alpha[list(self.edited)].all()):
            return self.tables[branch] + (on,)
        mapper, own, _ = self._host_tables[branch]
        t = self.text_lens[branch]
        full = torch.eye(t).expand(self.rows, t, t) if mapper is None else mapper
        masked = full * alpha[:, None, :]
        kept = torch.where(alpha, own, torch.ones(()))
        zero = not bool(kept[list(self.edited)].any())
        return (upload(masked, self.device), upload(kept, self.device), zero, on)

    def _blend_selector(self, tokens: Any, words: tuple[Any, ...]) -> torch.Tensor:
        """(rows, T) 1 at the tokens of the blend words found in each row's prompt."""
        selector = torch.zeros(self.rows, self.text_len)
        for row in range(self.rows):
            for word in words:  # a word the pipeline truncated away raises
                selector[row, list(tokens.positions(word, row, missing_ok=True))] = 1.0
            if not bool(selector[row].any()):
                raise TokenError(
                    f"attnctl: PromptToPrompt.local_blend: none of {list(words)} is in the prompt of row {row}; give the "
                    "words of the edited region as each prompt says them (e.g. ('cat', 'dog') for cat -> dog)"
                )
        return upload(selector, self.device)

    # -- per denoiser call ------------------------------------------------------------------------------
    def source_prompt(self, prompt: int) -> int | None:
        return prompt % self.per_prompt if prompt >= self.per_prompt else None

    def links(self, rows: RowLayout, attention: bool) -> tuple[int | None, ...]:
        links = rows.linked(self.source_prompt)
        if attention:  # rows of a branch without tables read nothing
            links = tuple(None if row.branch not in self.tables else link for row, link in zip(rows.rows, links))
        return links

    def plan(self, rows: RowLayout, device: torch.device, window: Any = "all") -> _Plan | None:
        """The links of a row layout, with the tables of the cross-attention `window` (`_cross_window`). While dynamo
        traces (rows another hook restricted), made in the graph from constants: no cache lookup to guard on."""
        tracing = torch.compiler.is_compiling()
        key = (rows.rows, device, window)
        if not tracing and key in self._plans:
            return self._plans[key]
        links = self.links(rows, attention=True)
        targets = tuple(i for i, link in enumerate(links) if link is not None)
        if not targets:
            if not tracing:
                self._plans[key] = None
            return None
        tables = self._window_tables[window] if window not in (None, "all") else self.tables
        sources = tuple(links[i] for i in targets)
        permuted = tuple(link if link is not None else i for i, link in enumerate(links))
        mapper, own, zero = [], [], True
        identity, cross = True, False
        lengths = {self.text_lens[rows.rows[i].branch] for i in targets}
        if len(lengths) > 1:  # one denoiser call has one text length; its rows' branches were encoded alike
            raise CallLayoutError(f"attnctl: PromptToPrompt's rows {rows.rows} hold texts of different lengths {sorted(lengths)}")
        text_len = lengths.pop()
        for i in targets:
            row = rows.rows[i]
            table, scale, table_zero = tables[row.branch][:3]
            identity = identity and table is None
            mapper.append(torch.eye(text_len, device=self.device) if table is None else table[row.prompt])
            own.append(scale[row.prompt])
            zero = zero and table_zero
            cross = cross or window == "all" or (window is not None and tables[row.branch][3][row.prompt])
        index = (lambda positions: torch.tensor(positions, device=device)) if tracing else (lambda positions: self.index(positions, device))
        plan = _Plan(
            targets, sources, index(targets), index(sources), permuted,
            None if identity else torch.stack(mapper).to(device), torch.stack(own).to(device), zero, cross, text_len,
        )
        if not tracing:
            self._plans[key] = plan
        return plan

    def transform_inputs(self, frame: DenoiserCall, inputs: dict[str, Any]) -> dict[str, Any]:
        """Before the first scheduler step, the edited rows' latents are the base rows' (same initial noise)."""
        if self.idle or self.stepped:
            return inputs
        name = self.adapter.batched_inputs[0]
        latents = inputs.get(name)
        if not isinstance(latents, torch.Tensor):
            raise CallLayoutError(f"attnctl: PromptToPrompt expected the latents as the denoiser's {name!r} tensor")
        links = self.links(frame.rows, attention=False)
        targets = tuple(i for i, link in enumerate(links) if link is not None)
        if not targets:
            return inputs
        sources = tuple(links[i] for i in targets)
        device = latents.device
        copied = latents.index_copy(0, self.index(targets, device), latents.index_select(0, self.index(sources, device)))
        return {**inputs, name: copied}

    def _acts(self, layer: LayerInfo, frame: DenoiserCall) -> tuple[Any, bool, bool]:
        """(cross window or None, self-attention replaced, blend maps captured) at `layer` in `frame`. The authors'
        step counts: cross-attention alphas over n + 1 entries (`cross_step_range`), self-attention over n
        (`self_step_range`)."""
        step = frame.step
        window = self._cross_window(step.index, step.count) if layer.index in self.text_layers else None
        self_ = layer.index in self.self_layers and step.index in self_step_range(self.p2p.self_steps, step.count)
        capture = layer.index in self.blend_layers and frame.extra_pass is None
        return window, self_, capture

    def needs_layer(self, layer: LayerInfo, frame: DenoiserCall) -> bool:
        window, self_, capture = self._acts(layer, frame)
        return not self.idle and (window is not None or self_ or capture)

    def edit(self, layer: LayerInfo, frame: DenoiserCall) -> Edit | None:
        if self.idle:
            return None
        self.last_step = frame.step.index
        window, self_, capture = self._acts(layer, frame)
        cross = window is not None
        if not (cross or self_ or capture):
            return None
        if frame.compiled:  # what the hook looks up by rows is made now, on the device the denoiser runs on (`_LinkHook`)
            if capture and self.maps is None:
                h, w = self.blend_grid
                self.maps = torch.zeros(self.rows, h * w, device=self.device)
                # its token count symbolic as the layers' from dynamo's first dynamic graph on: the blend level can
                # move with the image size (a UNet's finest level up to 16x16, then a coarser one), and a layer
                # whose maps a graph reads for the first time would otherwise get them static (one graph more)
                torch._dynamo.maybe_mark_dynamic(self.maps, 1)
            plan = self.plan(frame.rows, self.device, window) if (cross or self_) else None
            return Edit(hooks=(_LinkHook(self, layer, cross, self_, capture, window, plan),))
        key = (layer.index, window, self_, capture)
        found = self._edits.get(key)
        if found is None:
            found = self._edits[key] = Edit(hooks=(_LinkHook(self, layer, cross, self_, capture, window),))
        return found

    # -- local blending ---------------------------------------------------------------------------------
    def add_maps(self, call: AttentionCall, q: torch.Tensor, k: torch.Tensor, spec: AttentionSpec) -> None:
        """Add the blend words' maps of the cond rows of this layer call (head-averaged, P2P's attention store)."""
        cond = [i for i, row in enumerate(call.rows.rows) if row.branch == "cond" and row.tag is None]
        if not cond:
            return
        layout = token_layout(call)
        device = q.device
        positions = tuple(call.rows.rows[i].prompt for i in cond)
        start = layout.text_k.start
        if torch.compiler.is_compiling():  # constants of the graph: no lookup in the caches to guard on
            index, prompts = torch.tensor(cond, device=device), torch.tensor(positions, device=device)
            full = self._key_selector(layout.nk, start, device)
        else:
            index, prompts = self.index(cond, device), self.index(positions, device)
            key = (layout.nk, start, device)
            full = self._selectors.get(key)
            if full is None:
                full = self._selectors[key] = self._key_selector(layout.nk, start, device)
        selector = full.index_select(0, prompts)[:, None, :]
        mask = spec.attn_mask
        if mask is not None:
            mask = spec_rows(spec, index, q.shape[0]).attn_mask
            if mask.ndim == 4 and mask.shape[-2] > 1:
                mask = mask[..., layout.image_q, :]
        mass = word_attention(q.index_select(0, index)[:, :, layout.image_q], k.index_select(0, index), selector,
                              scale=spec.scale, bias=mask)[..., 0]
        if self.maps is None:
            self.maps = torch.zeros(self.rows, mass.shape[1], device=device)
        self.maps.index_add_(0, prompts, mass.to(self.maps.device))

    def _key_selector(self, keys: int, start: int, device: torch.device) -> torch.Tensor:
        """(prompt rows, keys): each prompt's blend-word weights at the text keys starting at `start`, 0 elsewhere."""
        full = torch.zeros(self.rows, keys, device=device)
        full[:, start : start + self.text_len] = self.selector.to(device)
        return full

    def blend_mask(self, latents: torch.Tensor) -> torch.Tensor:
        """(E, 1, ...) 0/1 mask per edited prompt row in the latents' layout: P2P's LocalBlend (max-pool 3x3,
        max-normalised, above the threshold in the base row's or the edited row's maps)."""
        h, w = self.blend_grid
        maps = self.maps.view(self.rows, 1, h, w)
        maps = F.max_pool2d(maps, 3, stride=1, padding=1)
        if latents.ndim == 4:
            maps = F.interpolate(maps, size=latents.shape[-2:])
        elif latents.ndim == 3:
            token_hw = self._token_hw(latents.shape[1])
            maps = F.interpolate(maps, size=token_hw).flatten(2).transpose(1, 2)  # (rows, N, 1)
        else:
            raise CallLayoutError(f"attnctl: PromptToPrompt.local_blend cannot blend latents of shape {tuple(latents.shape)}")
        flat = maps.flatten(1)
        peak = flat.max(dim=1).values.clamp_min(1e-12)
        above = (flat / peak[:, None]) > self.p2p.blend_threshold
        edited, base = self._edited_index(above.device)
        mask = above.index_select(0, edited) | above.index_select(0, base)
        return mask.view(len(self.edited), *maps.shape[1:]).to(device=latents.device, dtype=latents.dtype)  # maps: on the layers' device

    def _token_hw(self, tokens: int) -> tuple[int, int]:
        grid = self._canvas_token_hw
        if grid[0] * grid[1] != tokens:
            raise CallLayoutError(
                f"attnctl: PromptToPrompt.local_blend: the packed latents have {tokens} tokens, the image-token grid "
                f"{grid[0]}x{grid[1]}"
            )
        return grid

    # -- the scheduler ----------------------------------------------------------------------------------
    def _wrap_step(self, original):
        def step(*args: Any, **kwargs: Any) -> Any:
            if not self.stepped:
                args, kwargs = self._same_start(args, kwargs)
            result = original(*args, **kwargs)
            self.stepped = True
            if self.p2p.local_blend is not None and self.maps is not None and self.last_step >= int(self.p2p.blend_start * self.count):
                result = self._blend(result)
            return result

        return step

    def _edited_index(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return self.index(self.edited, device), self.index(tuple(r % self.per_prompt for r in self.edited), device)

    def _same_start(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        in_kwargs = "sample" in kwargs
        sample = kwargs["sample"] if in_kwargs else args[2] if len(args) > 2 else None
        if not isinstance(sample, torch.Tensor) or sample.shape[0] != self.rows:
            raise CallLayoutError(
                f"attnctl: PromptToPrompt expected scheduler.step's sample with {self.rows} rows (one per prompt row)"
            )
        edited, base = self._edited_index(sample.device)
        sample = sample.index_copy(0, edited, sample.index_select(0, base))
        if in_kwargs:
            return args, {**kwargs, "sample": sample}
        return args[:2] + (sample,) + args[3:], kwargs

    def _blend(self, result: Any) -> Any:
        latents = result[0] if isinstance(result, tuple) else result.prev_sample
        edited, base = self._edited_index(latents.device)
        mask = self.blend_mask(latents)
        source = latents.index_select(0, base)
        blended = source + mask * (latents.index_select(0, edited) - source)
        latents = latents.index_copy(0, edited, blended)
        if isinstance(result, tuple):
            return (latents,) + tuple(result[1:])
        result.prev_sample = latents
        return result

    def finish(self) -> None:
        self._plans.clear()
        self._edits.clear()
        self._windows.clear()
        self._window_tables.clear()
        self.index.clear()
        self.maps = None


_UNSET = object()


def _per_prompt(context: BindContext) -> int:
    first = context.prompt_arguments[0] if context.prompt_arguments else {}
    return int(first.get("num_images_per_prompt") or 1)


class _LinkHook(LayerHook):
    """The linked attention of one layer and step: see the module docstring. `plan`: the links of the frame's rows,
    made with the edit for a compiled forward (looked up by rows in the hook, dynamo would guard on the lookup)."""

    links_rows: ClassVar[bool] = True

    def __init__(self, bound: PromptToPromptBound, layer: LayerInfo, cross: bool, self_: bool, capture: bool,
                 window: Any = "all", plan: Any = _UNSET):
        self.bound, self.layer = bound, layer
        self.cross, self.self_, self.capture = cross, self_, capture
        self.window = window if cross else None
        self.plan = plan

    def attend(self, call: AttentionCall, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec, compute: AttendFn):
        if self.capture:
            self.bound.add_maps(call, q, k, spec)
        if not (self.cross or self.self_):
            return compute(q, k, v, spec)
        prefilled = self.plan is not _UNSET and call.row_layout is None  # another hook may run this on some rows
        plan = self.plan if prefilled else self.bound.plan(call.rows, q.device, self.window)
        if plan is None:
            return compute(q, k, v, spec)
        cross = self.cross and plan.cross
        if not (cross or self.self_):
            return compute(q, k, v, spec)
        layout = token_layout(call)
        text_k = layout.text_k if has_span(layout.text_k) and layout.text_k.stop > layout.text_k.start else None
        image_k = layout.image_k if layout.image_k.stop > layout.image_k.start else None
        own_text = plan.own_text
        if cross and has_span(text_k) and text_k.stop - text_k.start != plan.text_len:
            if plan.mapper is None and plan.own_text_zero:  # identity links (the same negative prompt): any length
                own_text = own_text.new_zeros(own_text.shape[0], text_k.stop - text_k.start)
            else:  # the tables have the text length each branch was encoded with: another one is not a known layout
                raise CallLayoutError(
                    f"attnctl: PromptToPrompt's {call.rows.rows[plan.targets[0]].branch} rows were encoded with "
                    f"{plan.text_len} text tokens, layer {call.layer.name} has {text_k.stop - text_k.start}"
                )
        targets, sources = plan.target_index, plan.source_index
        v_t = v.index_select(0, targets)
        # the edited rows' own share (the values of the keys they keep): zero where every key is linked, and then
        # neither built nor run
        own_zero = (not has_span(text_k) or (cross and plan.own_text_zero)) and (not has_span(image_k) or self.self_)
        base_v = torch.zeros_like(v_t)
        own_v = None if own_zero else v_t.clone()
        if has_span(text_k):
            text = v_t[:, :, text_k]
            if cross:
                mapped = text if plan.mapper is None else torch.einsum("ewj,ehjd->ehwd", plan.mapper.to(text.dtype), text)
                base_v[:, :, text_k] = mapped
                if own_v is not None:
                    own_v[:, :, text_k] = text * own_text.to(text.dtype)[:, None, :, None]
        if has_span(image_k) and self.self_:
            base_v[:, :, image_k] = v_t[:, :, image_k]
            if own_v is not None:
                own_v[:, :, image_k] = 0
        batch = q.shape[0]
        extra = [plan.targets] if not own_zero else []
        if not has_span(layout.text_q) and layout.image_q.start == 0 and layout.image_q.stop == layout.nq:
            # every query is an image query: the edited rows run in place with the base row's queries and keys
            q_all = q.index_copy(0, targets, q.index_select(0, sources))
            k_all = k.index_copy(0, targets, k.index_select(0, sources))
            v_all = v.index_copy(0, targets, base_v)
            rows = plan.permuted
            positions = list(range(batch))
        else:  # joint layers: the text queries of the edited rows keep their own attention
            q_all = torch.cat([q, q.index_select(0, sources)])
            k_all = torch.cat([k, k.index_select(0, sources)])
            v_all = torch.cat([v, base_v])
            rows = tuple(range(batch)) + plan.sources
            positions = list(range(batch)) + list(plan.targets)
        if extra:
            q_all = torch.cat([q_all, q.index_select(0, targets)])
            k_all = torch.cat([k_all, k.index_select(0, targets)])
            v_all = torch.cat([v_all, own_v])
            rows += plan.targets
            positions += list(plan.targets)
        # the spec's row of each row of q_all: an index cached by positions, so a label mask derived from it is too
        row_index = torch.tensor(rows, device=q.device) if torch.compiler.is_compiling() else self.bound.index(rows, q.device)
        spec_all = spec_rows(spec, row_index, batch)
        if len(positions) == batch:
            out, lse = compute(q_all, k_all, v_all, spec_all)
        else:
            with restricted_rows(call, positions):
                out, lse = compute(q_all, k_all, v_all, spec_all)
        lse = None if lse is None else lse[:batch]
        edited_count = len(plan.targets)
        if not has_span(layout.text_q) and layout.image_q.start == 0 and layout.image_q.stop == layout.nq:
            result = out[:batch]
            if extra:
                result = result.index_add(0, targets, out[batch:])
            return result, lse
        image_q = layout.image_q
        linked = out[batch : batch + edited_count, :, image_q]
        if extra:
            linked = linked + out[batch + edited_count :, :, image_q]
        result = out[:batch].clone()
        result[targets, :, image_q] = linked
        return result, lse
