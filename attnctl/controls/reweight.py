"""Cross-attention reweighting: emphasise or mute words at the attention level.

Prompt-to-Prompt (Hertz et al. 2022, "Prompt-to-Prompt Image Editing with Cross Attention Control", §3.2
"attention re-weighting"): the post-softmax attention probabilities of chosen text tokens are multiplied
by a factor, without renormalisation, `A' = A ⊙ w`. Since `A' V = A (w ⊙ V)`, this is a per-key value
scale, which every fused kernel takes at no cost: no attention matrix is materialised. `normalize=True`
renormalises instead, `softmax(logits + log w)`: an additive per-key bias.

Where: the conditional rows (perturbed copies of them included) of every cross-attention layer (UNet,
PixArt) and the image-query rows of every joint-attention layer (SD3, Flux) over each text encoder's span;
the text-query rows of joint attention are unchanged. Token positions are resolved per prompt row.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass
from typing import Any, ClassVar

import torch

from ..control import BindContext, Bound, Control
from ..denoiser_call import DenoiserCall, upload
from ..errors import CallLayoutError, ConfigError
from ..families.base import LayerInfo, ModelAdapter
from ..processors.edit import Edit, image_queries
from ..selection import LayerSpec, validate_layers
from ..steps import StepInfo, StepWindow, validate_steps
from ..tokens import WordQuery, describe_query, explicit_position, validate_word_query
from ..validation import FLOAT32_MAX, choice, plain_scalar, set_field
from .common import TEXT_KINDS, select_kinds, text_layers

#: A factor: a number, a `(start, end)` pair (linear ramp over the steps the control acts on), or a
#: callable of the step fraction `i / n` returning a number.
Factor = float | tuple[float, float] | Callable[[float], float]
BRANCHES: tuple[str, ...] = ("cond", "uncond", "both")
_ENTRY_KEYS = frozenset({"word", "occurrence", "position", "weight"})


@dataclass(frozen=True)
class Weight:
    """One entry of a weight table: a word query and its factor (number, (start, end) ramp or callable)."""

    query: WordQuery
    factor: Factor


WeightTable = tuple[Weight, ...]


@dataclass(frozen=True)
class Reweight(Control, type_name="reweight"):
    """Multiply the attention paid to chosen words by a factor (Prompt-to-Prompt reweighting).

    `weights`: a mapping from a word or phrase (every occurrence), a `(word, occurrence)` pair or a token
    position to a factor; or a list of such mappings, one per prompt of the call (applied to all the images
    of that prompt). At least one entry is needed (an empty mapping is a ConfigError). A factor is a number >= 0 (0 mutes, 1 changes nothing), a `(start, end)` pair for a
    linear ramp from the first to the last step the control acts on, or a callable of the step fraction
    `i / n`. Positions matched by several keys get the product of their factors.

    `normalize`: False (default) is Prompt-to-Prompt, `A ⊙ w` without renormalisation; True is
    `softmax(logits + log w)`. `layers`: cross-attention (UNet, PixArt) or joint-attention (SD3, Flux)
    layers, all by default; a selection keeps only those kinds. `steps`: the step window. `branch`:
    `"cond"` (the prompt's rows, default), `"uncond"` (the negative prompt's rows: words are looked up in
    the negative prompt) or `"both"` (each prompt's words in its own rows; a word must be in both).
    """

    weights: Any
    _: KW_ONLY
    normalize: bool = False
    layers: LayerSpec = None
    steps: StepWindow = (0.0, 1.0)
    branch: str = "cond"

    needs_words: ClassVar[bool] = True

    def compile_refusal(self, adapter: ModelAdapter) -> str | None:
        return None

    def __post_init__(self) -> None:
        weights = _parse_weights(self.weights)
        if not any(weights):  # no entry (in any prompt's table)
            raise ConfigError(
                f"Reweight.weights is empty ({self.weights!r}): give at least one word or token position and its factor, "
                "e.g. {'cat': 1.5}"
            )
        set_field(self, "weights", weights)
        if not isinstance(self.normalize, bool):
            raise ConfigError(f"Reweight.normalize must be True or False, got {self.normalize!r}")
        set_field(self, "layers", validate_layers(self.layers, name="Reweight.layers"))
        set_field(self, "steps", validate_steps(self.steps, name="Reweight.steps"))
        choice(self.branch, "Reweight.branch", BRANCHES)

    # -- construction helpers ---------------------------------------------------------------------------
    @classmethod
    def from_prompt(cls, prompt: str | Sequence[str], **options: Any) -> tuple[str | list[str], Reweight]:
        """`(clean prompt(s), Reweight)` from prompts written with weighting syntax (`attnctl.parse_prompt`)."""
        from ..prompt_weights import parse_prompts

        clean, weights = parse_prompts(prompt)
        if not (any(weights) if isinstance(weights, list) else weights):
            raise ConfigError(
                f"Reweight.from_prompt: {prompt!r} has no weighting syntax such as (word:1.5), (word) or [word]; "
                "use the prompt as it is, without Reweight"
            )
        return clean, cls(weights, **options)

    @property
    def per_prompt(self) -> bool:
        """Whether `weights` holds one table per prompt."""
        return bool(self.weights) and isinstance(self.weights[0], tuple)

    @property
    def varies_by_step(self) -> bool:
        """A ramp `(start, end)` with start != end, or a callable of the step fraction, changes the weights per step."""
        return any(callable(w.factor) or (isinstance(w.factor, tuple) and w.factor[0] != w.factor[1])
                   for table in self.tables() for w in table)

    def tables(self) -> tuple[WeightTable, ...]:
        """The weight tables: one shared table, or one per prompt."""
        return self.weights if self.per_prompt else (self.weights,)

    # -- Control protocol -------------------------------------------------------------------------------
    def default_layers(self, adapter: ModelAdapter) -> str:
        return text_layers(adapter)

    def select(self, adapter: ModelAdapter) -> tuple[LayerInfo, ...]:
        return select_kinds(self, adapter, TEXT_KINDS, "cross- or joint-attention")

    def bind(self, context: BindContext) -> ReweightBound:
        return ReweightBound(self, context)

    def layer_effects(self, adapter: ModelAdapter, layer: LayerInfo) -> tuple[str, ...]:
        """A per-key value scale on the text keys ("value_scale"), or a logit bias with `normalize` ("key_bias")."""
        return ("key_bias",) if self.normalize else ("value_scale",)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        tables = [[_entry(w.query, w.factor) for w in table] for table in self.tables()]
        out["weights"] = tables if self.per_prompt else tables[0]
        return out


def _is_factor_like(value: Any) -> bool:
    """A factor, a (start, end) pair of them or a schedule; numbers as numpy scalars or 0-d tensors count."""
    if isinstance(value, (tuple, list)):
        return len(value) == 2 and all(_is_number(v) for v in value)
    return _is_number(value) or callable(value)


def _is_number(value: Any) -> bool:
    value = plain_scalar(value)
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_entry_dict(value: Any) -> bool:
    """A JSON entry {'word' | 'position', 'occurrence'?, 'weight'}; a mapping of the word "weight" alone is a table."""
    return isinstance(value, Mapping) and "weight" in value and bool({"word", "position"} & set(value)) and set(value) <= _ENTRY_KEYS


def _refuse_broken_entries(weights: Any, name: str) -> None:
    """Raise for a mapping that can only be meant as a JSON entry, yet is not one: it holds 'word' or 'position' and
    a value no table takes (the word itself), beside a key no entry has or without 'weight' ({'word': 'cat',
    'weigth': 2}, otherwise read as a table of the words 'word' and 'weigth'). A table of factors ({'word': 1.5},
    from `(word:1.5)` in a prompt) stays a table."""
    if isinstance(weights, (list, tuple)):
        for i, item in enumerate(weights):
            _refuse_broken_entries(item, f"{name}[{i}]")
        return
    if (not isinstance(weights, Mapping) or not {"word", "position"} & set(weights)
            or all(_is_factor_like(value) for value in weights.values())):
        return
    unknown = [key for key in weights if key not in _ENTRY_KEYS]
    if unknown:
        raise ConfigError(f"{name}: unknown key {unknown[0]!r} in a weight entry {dict(weights)!r}; keys: word, occurrence, "
                          "position, weight")
    if "weight" not in weights:
        raise ConfigError(f"{name}: the weight entry {dict(weights)!r} has no 'weight'; keys: word, occurrence, position, "
                          "weight")


def _is_pair(item: Any) -> bool:
    return isinstance(item, (list, tuple)) and len(item) == 2 and not isinstance(item[0], Mapping) and _is_factor_like(item[1])


def _is_prompt_table(item: Any) -> bool:
    """One prompt's table in a per-prompt list: a mapping, a list of JSON entries, or a normalised table."""
    if isinstance(item, Mapping):
        return not _is_entry_dict(item)
    if isinstance(item, tuple) and all(isinstance(e, Weight) for e in item):
        return True
    return isinstance(item, list) and all(_is_entry_dict(e) for e in item) and not _is_pair(item)


def _parse_weights(weights: Any) -> WeightTable | tuple[WeightTable, ...]:
    """Normalise every accepted form of `weights` to a table (or a tuple of tables, one per prompt)."""
    _refuse_broken_entries(weights, "Reweight.weights")
    if isinstance(weights, Mapping) and not _is_entry_dict(weights):
        return _table(list(weights.items()), "Reweight.weights")
    if isinstance(weights, (list, tuple)):
        items = list(weights)
        if items and all(_is_prompt_table(item) for item in items):
            return tuple(
                _table(list(item.items()) if isinstance(item, Mapping) else list(item), f"Reweight.weights[{i}]")
                for i, item in enumerate(items)
            )
        return _table(items, "Reweight.weights")
    raise ConfigError(
        "Reweight.weights must be a mapping {word: factor}, a list of (word, factor) pairs or of "
        "{'word'|'position', 'occurrence', 'weight'} entries, or a list of mappings (one per prompt); "
        f"got {weights!r}"
    )


def _table(items: list[Any], name: str) -> WeightTable:
    table: list[tuple[WordQuery, Factor]] = []
    seen: list[WordQuery] = []
    for item in items:
        if isinstance(item, Weight):
            query, factor = item.query, item.factor
        elif _is_entry_dict(item):
            query, factor = _from_entry(item, name)
        elif isinstance(item, (list, tuple)) and len(item) == 2:
            query, factor = item
        else:
            raise ConfigError(f"{name}: {item!r} is neither a (word, factor) pair nor a {{'word', 'weight'}} entry")
        query = validate_word_query(query, owner=name)
        if query in seen:
            raise ConfigError(f"{name}: {describe_query(query)} is given twice")
        seen.append(query)
        table.append(Weight(query, _factor(factor, f"{name}[{describe_query(query)}]")))
    return tuple(table)


def _from_entry(entry: Mapping[str, Any], name: str) -> tuple[Any, Any]:
    if ("word" in entry) == ("position" in entry) or ("occurrence" in entry and "word" not in entry):
        raise ConfigError(f"{name}: entry {dict(entry)!r} needs exactly one of 'word' (with an optional 'occurrence') or 'position'")
    if "position" in entry:
        return entry["position"], entry["weight"]
    if "occurrence" in entry:
        return (entry["word"], entry["occurrence"]), entry["weight"]
    return entry["word"], entry["weight"]


def _entry(query: WordQuery, factor: Factor) -> dict[str, Any]:
    if callable(factor):
        raise ConfigError(
            f"Reweight.to_dict: the factor of {describe_query(query)} is a callable ({factor!r}), which cannot be "
            "serialised; use a number or a (start, end) ramp"
        )
    weight = list(factor) if isinstance(factor, tuple) else factor
    if isinstance(query, int):
        return {"position": query, "weight": weight}
    if isinstance(query, tuple):
        return {"word": query[0], "occurrence": query[1], "weight": weight}
    return {"word": query, "weight": weight}


def _number(value: Any, name: str) -> float:
    value = plain_scalar(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number >= 0, a (start, end) pair or a callable of the step fraction, got {value!r}")
    if not 0 <= value <= FLOAT32_MAX:  # NaN, inf, negative and beyond float32 (inf in the attention math) fail here
        raise ConfigError(f"{name} must be a finite number >= 0 and at most {FLOAT32_MAX:.4g} (float32's largest; 0 mutes, "
                          f"1 changes nothing), got {value!r}")
    return float(value)


def _factor(value: Any, name: str) -> Factor:
    if callable(value):
        return value
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ConfigError(f"{name}: a schedule pair must be (start, end), got {value!r}")
        return (_number(value[0], f"{name} start"), _number(value[1], f"{name} end"))
    return _number(value, name)


def factor_values(factor: Factor, active: Sequence[int], count: int, name: str) -> list[float]:
    """The factor at each active step index (`active`: the indices the control acts on, of `count`)."""
    if isinstance(factor, float):
        return [factor] * len(active)
    if isinstance(factor, tuple):
        start, end = factor
        if len(active) < 2:
            return [start] * len(active)
        first, last = active[0], active[-1]
        return [start + (end - start) * (i - first) / (last - first) for i in active]
    values = []
    for i in active:
        try:
            value = factor(i / count)
        except Exception as error:  # noqa: BLE001 - report which schedule failed, keep the cause
            raise ConfigError(f"{name}: the schedule raised {error!r} at step fraction {i / count:g}") from error
        if hasattr(value, "item") and getattr(value, "numel", lambda: 1)() == 1:
            value = value.item()
        values.append(_number(value, f"{name} at step fraction {i / count:g}"))
    return values


class ReweightBound(Bound):
    """Reweight bound to one pipeline call: per-step weights per prompt row, per branch."""

    layers_only = True

    def __init__(self, control: Reweight, context: BindContext):
        super().__init__(control, context.layers, control.steps)
        self.normalize = control.normalize
        self.text_len = context.canvas.text_len  # the cond rows' (the call the control is bound at)
        # each branch's own text length: Qwen-Image's negative prompt is encoded by a call of its own, padded to its own
        # longest prompt, so its denoiser calls have another text length; each table has its branch's length
        self.text_lens: dict[str, int] = {}
        self.device = context.device
        count = context.steps
        self.active_steps = tuple(i for i in range(count) if StepInfo(i, count).inside(control.steps))
        self._step_slot = {step: k for k, step in enumerate(self.active_steps)}
        branches = ("cond", "uncond") if control.branch == "both" else (control.branch,)
        tables = control.tables()
        rows = context.prompt_rows
        images = context.images_per_prompt
        prompts = rows // images if images is not None and rows % images == 0 else None
        if len(tables) > 1 and (rows % len(tables) or (prompts is not None and len(tables) != prompts)):
            raise ConfigError(
                f"Reweight has weights for {len(tables)} prompts, but the call has "
                + (f"{prompts} prompt(s) x {images} image(s) per prompt" if prompts is not None else f"{rows} prompt row(s)")
                + "; give one mapping per prompt, or one mapping for all"
            )
        per_prompt = rows // len(tables)
        # factor values per table entry per active step, validated before anything is computed
        values = [
            [factor_values(w.factor, self.active_steps, count, f"Reweight factor of {describe_query(w.query)}") for w in table]
            for table in tables
        ]
        # weights[branch]: (active steps, prompt rows, the branch's text length) on the CPU, none without an active step;
        # identity[branch][k]: all ones
        self.weights: dict[str, torch.Tensor] = {}
        self.identity: dict[str, list[bool]] = {}
        for branch in branches:
            tokens = _tokens_for(context, branch, tables)
            if tokens is _NO_ROWS:  # no uncond rows in this call: nothing to resolve (idle, warned)
                continue
            text_len = self.text_lens[branch] = context.text_len_of(branch)
            # built in Python floats rounded to float32 after every product, exactly as float32 tensors would
            # hold it: one tensor made from host data, and no tensor read to find the identity steps
            cells = [[[1.0] * text_len for _ in range(rows)] for _ in self.active_steps]
            for row in range(rows):
                t = row // per_prompt if len(tables) > 1 else 0
                for weight, per_step in zip(tables[t], values[t]):
                    positions = _positions(tokens, weight.query, row, text_len)
                    touched = {p % text_len if p < 0 else p for p in positions}
                    for k, factor in enumerate(per_step):
                        factor, line = _f32(float(factor)), cells[k][row]
                        for p in touched:
                            line[p] = _f32(line[p] * factor)
                            if math.isinf(line[p]) or math.isnan(line[p]):
                                raise ConfigError(
                                    f"attnctl: Reweight: the weights on token {p} of prompt row {row} multiply to {line[p]} "
                                    f"(weight {weight.query!r} and the others on that token), beyond float32's range: "
                                    "give smaller weights"
                                )
            if self.normalize:
                _check_not_all_muted(cells, branch, self.active_steps, context)
            if not self.active_steps:  # idle in this call (no step inside its window): the words are checked, no table made
                continue
            grid = torch.tensor(cells, dtype=torch.float32).reshape(len(self.active_steps), rows, text_len)
            self.weights[branch] = grid
            self.identity[branch] = [all(v == 1.0 for line in step for v in line) for step in cells]
        self.no_uncond_rows = control.branch == "uncond" and not self.text_lens
        self._cache: dict[Any, Edit | None] = {}
        self._scales: dict[Any, torch.Tensor | None] = {}  # per row layout: (active steps, B, keys), once per call
        self._on_device = {branch: upload(grid, self.device) for branch, grid in self.weights.items()}  # one async copy per call

    def idle_reason(self, count: int) -> str | None:
        """branch="uncond" in a call without negative-prompt rows (no classifier-free guidance, Flux without true CFG):
        nothing to reweight, bitwise stock (a tested identity: the handle warns)."""
        if self.no_uncond_rows:
            return (
                "branch='uncond' reweights the negative prompt's rows, and this call has none (the pipeline ran it "
                "without classifier-free guidance: e.g. guidance_scale <= 1 on SD, <= 0 on Z-Image; Flux and Qwen-Image "
                "need true_cfg_scale > 1 and a negative_prompt or negative_prompt_embeds), so the output is the stock one; use "
                "branch='cond' or 'both', or enable CFG"
            )
        return super().idle_reason(count)

    def weights_at(self, step: int, branch: str = "cond") -> torch.Tensor | None:
        """(prompt rows, the branch's text length) factors at step index `step` for `branch`; None outside the step
        window."""
        k = self._step_slot.get(step)
        if k is None or branch not in self.weights:
            return None
        return self.weights[branch][k]

    def edit(self, layer: LayerInfo, frame: DenoiserCall) -> Edit | None:
        step = frame.step.index
        k = self._step_slot.get(step)
        if k is None:
            return None
        # a branch with no rows in this call changes nothing here
        live = [b for b, identity in self.identity.items() if not identity[k]]
        if not any(frame.rows.indices(b) for b in live):
            return None
        geometry = frame.geometry(layer)
        key_text = geometry.key_text_slice
        # keys from the frame's geometry: another control may have appended text tokens (Regions on SD3 / Flux puts
        # region prompts after the base text); the weights stay on the base text, the first text keys, as many as
        # the row's branch has (Qwen-Image's negative prompt call has its own text length)
        n_keys = geometry.text_len if layer.kind == "cross" else geometry.image_len + geometry.text_len
        key = (frame.rows.rows, key_text.start, n_keys, layer.kind == "cross" or (geometry.image_slice.start, geometry.image_slice.stop))
        cached = self._cache.get((k, key), _UNSET)
        if cached is _UNSET:
            if not any(row.branch in live for row in frame.rows.rows):
                cached = None  # no row of this call has a branch with weights at this step: stock attention
            else:
                if key not in self._scales:
                    self._check_text_len(frame, layer, geometry.text_len)
                    self._scales[key] = self._scale(frame, key_text, n_keys)
                image_rows = None if layer.kind == "cross" else geometry.image_slice
                query_range = None if image_rows is None else image_queries(image_rows, frame)
                scale = self._scales[key][k]  # a view: no operation
                cached = Edit(key_bias=scale, query_range=query_range) if self.normalize else Edit(value_scale=scale, query_range=query_range)
            self._cache[(k, key)] = cached
        return cached

    def _check_text_len(self, frame: DenoiserCall, layer: LayerInfo, text_len: int) -> None:
        """Each weighted row's table fits the text keys of this denoiser call: a call whose text is shorter than its
        rows' branch was encoded with is a layout attnctl does not know (once per row layout, on the host)."""
        for branch in {row.branch for row in frame.rows.rows if row.branch in self.weights}:
            if text_len < self.text_lens[branch]:
                raise CallLayoutError(
                    f"attnctl: Reweight's {branch} rows were encoded with {self.text_lens[branch]} text tokens, but layer "
                    f"{layer.name} has {text_len} in this denoiser call"
                )

    def _scale(self, frame: DenoiserCall, key_text: slice, n_keys: int) -> torch.Tensor:
        """(active steps, B, n_keys) value scales (log: key biases with `normalize`) of a row layout, every step
        at once: a few operations per call instead of a few per step and layer. Each row's weights cover its branch's
        text (Qwen-Image's negative prompt call has its own length), ones elsewhere. A branch that is the identity at a
        step has all-ones weights there, so its rows are the same as the ones they used to get."""
        per_row = [(self._on_device.get(row.branch), row.prompt) for row in frame.rows.rows]
        lengths = {table.shape[-1] for table, _ in per_row if table is not None}
        steps = len(self.active_steps)
        if lengths == {n_keys} and key_text.start == 0 and all(table is not None for table, _ in per_row):
            scale = torch.stack([table[:, prompt] for table, prompt in per_row], dim=1)  # (steps, B, text_len)
        else:
            scale = torch.ones(steps, len(per_row), n_keys, device=self.device)
            start = key_text.start
            for b, (table, prompt) in enumerate(per_row):
                if table is not None:
                    scale[:, b, start : start + table.shape[-1]] = table[:, prompt]
        return torch.log(scale) if self.normalize else scale


_UNSET = object()


def _f32(value: float) -> float:
    """`value` rounded to float32, as torch.tensor(list of floats) stores it."""
    try:
        return struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:
        return math.copysign(math.inf, value)




_NO_ROWS = object()


def _tokens_for(context: BindContext, branch: str, tables: tuple[WeightTable, ...]) -> Any:
    """The PromptTokens of `branch`; None when only explicit positions are used and the branch has no text; _NO_ROWS
    when the call has no rows of that branch, as its layout says (no CFG; Flux without true CFG has no negative
    prompt), not where only the branch's text is missing (its negative prompt given as embeddings)."""
    if branch == "uncond" and not context.uncond_rows:
        return _NO_ROWS
    needs_words = any(not isinstance(w.query, int) for table in tables for w in table)
    tokens = context.tokens if branch == "cond" else context.negative_tokens
    if tokens is None and needs_words:
        return context.require_tokens("Reweight", branch, positions=True)
    return tokens


def _positions(tokens: Any, query: WordQuery, row: int, text_len: int) -> tuple[int, ...]:
    if tokens is not None:
        return tokens.positions(query, row)
    return explicit_position(query, text_len)  # explicit positions without prompts (prompt_embeds)


def _check_not_all_muted(cells: list[list[list[float]]], branch: str, steps: tuple[int, ...], context: BindContext) -> None:
    """normalize=True with every text key at 0 leaves a cross-attention row with no key at all."""
    if not any(layer.kind == "cross" for layer in context.layers):
        return
    dead = [(k, row) for k, step in enumerate(cells) for row, line in enumerate(step) if all(v == 0 for v in line)]
    if dead:
        k, row = dead[0]
        raise ConfigError(
            f"Reweight(normalize=True) mutes every text token of {branch} prompt row {row} at step {steps[k]}: "
            "cross-attention would have no key left; use normalize=False or keep a token"
        )
