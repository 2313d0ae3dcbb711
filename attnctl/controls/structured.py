"""Structured Diffusion Guidance: noun phrases encoded on their own, their values averaged in (docs/methods.md).

Feng et al. 2023, "Training-Free Structured Diffusion Guidance for Compositional Text-to-Image Synthesis"
(arXiv:2212.05032), §3.3 and the authors' code ("align_seq"): the prompt's noun phrases are encoded separately
by the text encoder; for each phrase a copy of the full prompt's embedding gets the phrase's own token
embeddings written over the phrase's positions. Cross-attention keeps the keys of the full prompt and averages
its output over the value sets, `O = mean_i softmax(Q K_full^T / sqrt(d)) V_i` with `V_0` the full prompt's
values and `V_i` (i = 1..n) the aligned phrase copies' values.

Since `mean_i (P V_i) = P mean_i V_i`, this is ONE attention call with averaged values: a value edit, no extra
softmax and no materialised P. `V_i` equals `V_0` outside phrase i's positions, so the averaged values are
`V_0 (1 - s c) + s/(n+1) sum_i scatter_i(W_v e_i)`, where `c(t)` counts the phrases covering token t over
`n + 1` and `e_i` is phrase i's own encoding; `s` (scale, 1 = the paper) blends from stock (0) to SDG (1).
The phrase values are projected once per call and layer; per attention call the edit is one multiply-add on
the cond rows' text values.

Where: the conditional rows (and perturbed copies of them) of cross-attention layers (UNet SD / SDXL, PixArt,
Wan). Joint-attention families (SD3, Flux, Chroma, Flux.2, Qwen-Image, Z-Image) are refused at apply: their text
keys and values at a layer come from the text stream the denoiser itself transforms block by block, so a phrase
encoded at the input has no values at a deep layer unless it runs through every block as its own text stream
(a second denoiser pass per phrase), which is not the paper's method.
"""

from __future__ import annotations

import re
from dataclasses import KW_ONLY, dataclass
from typing import Any, ClassVar

import torch

from ..control import BindContext, Bound, Control
from ..denoiser_call import DenoiserCall, upload
from ..errors import ConfigError, TokenError, UnsupportedError
from ..families.base import LayerInfo, ModelAdapter
from ..processors.edit import AttendFn, AttentionCall, Edit, LayerHook
from ..selection import LayerSpec, validate_layers
from ..steps import StepWindow, validate_steps
from ..tokens import EncoderPrompts, PromptTokens
from ..validation import plain_scalar, set_field
from .common import RowIndex, select_kinds

#: Words that end a noun phrase in `noun_phrases` (conjunctions, prepositions, relative words, verbs of being, and
#: common verbs of captions; "-ing" words are listed one by one: "a building", "an oil painting" are nouns).
PHRASE_BREAKS: tuple[str, ...] = (
    "and", "or", "but", "with", "without", "on", "in", "at", "of", "to", "from", "by", "near", "under", "over",
    "above", "below", "behind", "beside", "besides", "between", "next", "inside", "outside", "into", "onto",
    "under", "beneath", "around", "against", "along", "across", "through", "while", "that", "which", "who",
    "is", "are", "was", "were", "holding", "wearing", "riding", "sitting", "standing", "left", "right", "top",
    "bottom", "has", "have", "sits", "stands", "lies", "takes", "looks", "runs", "walks", "eats", "flies", "full",
    "filled", "covered", "lying", "looking", "playing", "chasing", "running", "walking", "eating", "flying",
    "jumping", "swimming", "carrying", "parked",
)
#: Words that open a noun phrase (kept in it).
DETERMINERS: tuple[str, ...] = ("a", "an", "the", "one", "two", "three", "some", "many", "his", "her", "their", "its", "this", "that")


def noun_phrases(prompt: str) -> tuple[str, ...]:
    """The noun phrases of `prompt` by a small rule-based chunker (no parser download).

    The prompt is cut at punctuation (`, ; : .`) and at the words of `PHRASE_BREAKS` (which end a phrase and
    are dropped); a determiner (`DETERMINERS`) opens a new phrase. A chunk is kept when it starts with a
    determiner and has at least one more word (`"a red car"`, `"the sky"`), so that bare position words
    (`"on the left"` gives `"the"` alone: dropped) and adjectives without a noun are not phrases. Phrases are
    returned in order, each as it is written in the prompt; a phrase equal to the whole prompt is dropped (its
    aligned copy would be the prompt itself).

    `noun_phrases("a red car and a blue house")` -> `("a red car", "a blue house")`;
    `noun_phrases("a cat sitting on a wooden bench, oil painting")` -> `("a cat", "a wooden bench")`.
    """
    if not isinstance(prompt, str):
        raise ConfigError(f"noun_phrases takes a prompt string, got {prompt!r}")
    phrases: list[str] = []
    for piece in re.split(r"[,;:.!?]", prompt):
        current: list[str] = []
        for word in re.findall(r"[\w'-]+", piece):
            lower = word.lower()
            if lower in PHRASE_BREAKS and not (lower == "that" and not current):
                _close(current, phrases)
                current = []
                continue
            if lower in DETERMINERS and current:
                _close(current, phrases)
                current = []
            current.append(word)
        _close(current, phrases)
    whole = " ".join(re.findall(r"[\w'-]+", prompt)).lower()
    return tuple(p for p in dict.fromkeys(phrases) if p.lower() != whole)


def _occurrences(tokens: PromptTokens, phrase: str, row: int) -> list[tuple[int, ...]]:
    """The token positions of each occurrence of `phrase` in prompt row `row`, in order (TokenError: the first one is
    past the encoder's limit)."""
    found: list[tuple[int, ...]] = []
    for occurrence in range(tokens.text_len):
        try:
            positions = tokens.positions((phrase, occurrence), row, missing_ok=True)
        except TokenError:  # this occurrence is past the encoder's limit: the kept ones count, as for a word query
            if found:
                break
            raise
        if not positions:
            break
        found.append(positions)
    return found


def _close(words: list[str], phrases: list[str]) -> None:
    if len(words) >= 2 and words[0].lower() in DETERMINERS:
        phrases.append(" ".join(words))


@dataclass(frozen=True)
class StructuredGuidance(Control, type_name="structured-guidance"):
    """Structured Diffusion Guidance (Feng et al. 2023): each noun phrase's own encoding averaged into the
    cross-attention values at the phrase's positions; keys stay the full prompt's.

    `phrases`: the noun phrases, each written as in the prompt (`["a red car", "a blue house"]`), applied to
    every prompt of the call that contains them (a phrase in none of them: `TokenError`); None (default): the
    phrases `noun_phrases` finds in each prompt. `scale`: 1 is the paper's average; 0 is stock (bitwise); in
    between blends the values. `layers`: cross-attention layers, all by default. `steps`: the step window
    (the paper: every step).
    """

    phrases: tuple[str, ...] | None = None
    _: KW_ONLY
    scale: float = 1.0
    layers: LayerSpec = None
    steps: StepWindow = (0.0, 1.0)

    needs_words: ClassVar[bool] = True
    grid_dims: ClassVar[tuple[int, ...]] = (2, 3)  # values only: the token grid's shape does not enter

    def compile_refusal(self, adapter: ModelAdapter) -> str | None:
        return None  # its edits carry the layer's phrase values and the cond rows as constants (StructuredBound.edit)

    def __post_init__(self) -> None:
        phrases = self.phrases
        if phrases is not None:
            if isinstance(phrases, str):
                phrases = (phrases,)
            if not isinstance(phrases, (list, tuple)) or not phrases or not all(isinstance(p, str) and p.strip() for p in phrases):
                raise ConfigError(
                    f"StructuredGuidance.phrases must be None (the rule-based chunker) or a non-empty list of "
                    f"non-empty phrases as written in the prompt, e.g. ['a red car', 'a blue house']; got {self.phrases!r}"
                )
            phrases = tuple(p.strip() for p in phrases)
            if len(set(phrases)) != len(phrases):
                raise ConfigError(f"StructuredGuidance.phrases has duplicates: {phrases!r}")
        set_field(self, "phrases", phrases)
        scale = plain_scalar(self.scale)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0.0 <= float(scale) <= 1.0:
            raise ConfigError(f"StructuredGuidance.scale must be a number in [0, 1] (1 = the paper, 0 = stock), got {scale!r}")
        set_field(self, "scale", float(scale))
        set_field(self, "layers", validate_layers(self.layers, name="StructuredGuidance.layers"))
        set_field(self, "steps", validate_steps(self.steps, name="StructuredGuidance.steps"))

    def default_layers(self, adapter: ModelAdapter) -> str:
        return "cross"

    def validate_for(self, adapter: ModelAdapter) -> None:
        if adapter.text_attention != "cross":
            raise UnsupportedError(
                f"attnctl: StructuredGuidance is defined on cross-attention, and the {adapter.family} family has joint "
                "attention: its text keys and values at each layer come from the text stream the denoiser transforms "
                "block by block, so a separately encoded noun phrase has no values there without its own pass through "
                "every block (a denoiser pass per phrase, not the paper's method)"
            )

    def select(self, adapter: ModelAdapter) -> tuple[LayerInfo, ...]:
        return select_kinds(self, adapter, ("cross",), "cross-attention")

    def layer_effects(self, adapter: ModelAdapter, layer: LayerInfo) -> tuple[str, ...]:
        """"value_edit": the text values of the cond rows are replaced (averaged with the phrases' values)."""
        return ("value_edit",)

    def bind(self, context: BindContext) -> StructuredBound:
        return StructuredBound(self, context)


@dataclass(frozen=True)
class PhraseSpan:
    """One phrase in one prompt row: its positions in the prompt's text sequence and, in order, the positions of
    its tokens in its own encoding (`source`, index into `StructuredBound.text`)."""

    row: int
    positions: tuple[int, ...]
    source: int
    own: tuple[int, ...]


def phrase_tokens(tokens: PromptTokens, phrase: str) -> tuple[int, ...]:
    """Positions of `phrase`'s tokens in its own encoding (after CLIP's start token; from 0 in T5), the phrase
    rewritten as the pipeline rewrites what it encodes (PixArt lower-cases it, textual inversion expands its tokens)."""

    def encoded(encoder: EncoderPrompts, t: int) -> str:
        prepare = encoder.prepare[t] if t < len(encoder.prepare) else None
        return prepare(phrase) if prepare is not None else phrase

    alone = PromptTokens(
        [
            EncoderPrompts(e.name, e.tokenizers, tuple((encoded(e, t),) for t in range(len(e.tokenizers))), e.offset, e.limit,
                           e.convert, e.prepare)
            for e in tokens.encoders
        ],
        rows=1,
        text_len=tokens.text_len,
    )
    return alone.positions(phrase, 0)


class StructuredBound(Bound):
    """The phrases of each prompt row resolved and encoded once per call; the value edit per layer."""

    layers_only = True  # its value edit at the selected layers is all it does

    def __init__(self, control: StructuredGuidance, context: BindContext):
        super().__init__(control, context.layers, control.steps)
        self.scale = control.scale
        self.adapter = context.adapter
        self.spans: list[PhraseSpan] = []
        self.counts = [0] * context.prompt_rows  # phrases per prompt row
        self.text = None
        self._cache: dict[Any, Any] = {}
        self.index = RowIndex()  # batch rows and prompt rows as index tensors, per device
        self.no_phrase: str | None = None  # why the call has nothing to average (no phrase in any prompt)
        if self.scale == 0.0:
            return
        tokens = context.require_tokens("StructuredGuidance")
        texts = tokens.encoders[0].prompts[0] if tokens.encoders else ("",) * context.prompt_rows
        sources: list[str] = []
        missing: list[str] = []
        for row in range(context.prompt_rows):
            phrases = control.phrases if control.phrases is not None else noun_phrases(texts[row])
            for phrase in phrases:
                try:
                    occurrences = _occurrences(tokens, phrase, row)
                except TokenError:  # in the prompt, past the encoder's limit
                    if control.phrases is not None:
                        raise
                    occurrences = []  # a phrase the chunker found where the pipeline truncates the prompt
                if not occurrences:
                    missing.append(phrase)
                    continue
                if phrase not in sources:
                    sources.append(phrase)
                own = phrase_tokens(tokens, phrase)
                for positions in occurrences:  # each occurrence is a span of its own, as each parsed noun phrase
                    if len(own) != len(positions):
                        raise TokenError(
                            f"attnctl: StructuredGuidance: {phrase!r} has {len(positions)} token(s) at one of its occurrences "
                            f"in the prompt of row {row} ({texts[row]!r}) and {len(own)} encoded alone"
                        )
                    self.spans.append(PhraseSpan(row, positions, sources.index(phrase), own))
                    self.counts[row] += 1
        if control.phrases is not None:
            absent = [p for p in control.phrases if p not in sources]
            if absent:
                raise TokenError(f"attnctl: StructuredGuidance: phrase(s) {absent!r} are in none of the prompts {list(texts)!r}")
        if control.phrases is None and not self.spans:  # a tested identity (bitwise stock): the handle warns
            self.no_phrase = (
                f"its chunker (noun_phrases) found no noun phrase in the prompts {list(texts)!r}"
                + (f" (those it found, {missing!r}, are not in the tokenized prompts)" if missing else "")
                + ", so the output is the stock one; a phrase starts with a determiner (a, the, ...), has a second word "
                "and is not the whole prompt: give phrases=[...] as written in the prompt, or prompts with two or more "
                "noun phrases"
            )
        self.sources = tuple(sources)
        if sources:
            self.text = context.encode_prompts(list(sources))

    def idle_reason(self, count: int) -> str | None:
        return self.no_phrase or super().idle_reason(count)

    def edit(self, layer: LayerInfo, frame: DenoiserCall) -> Edit | None:
        rows = frame.rows.indices("cond")
        if not self.spans or not rows:
            return None
        key = ("edit", layer.index, rows)
        found = self._cache.get(key)
        if found is None:
            prompts = tuple(frame.rows.rows[i].prompt for i in rows)
            found = self._cache[key] = Edit(hooks=(_ValueHook(self, rows, prompts, self._layer_plan(layer, frame)),))
        return found

    def _layer_plan(self, layer: LayerInfo, frame: DenoiserCall) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The layer's plan made with the edit (eagerly, also before a compiled forward), on the device of the
        layer's weights, so that a compiled processor looks nothing up by layer name; None where the weights are
        not on a real device (the hook then makes its own)."""
        weight = self.adapter.placed_weight(layer.name)
        if weight is None:
            return None
        return self.plan_for(self.adapter.modules[layer.name], layer.name, weight.device, frame.geometry(layer).text_len)

    def plan(self, call: AttentionCall, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(keep, add), each (prompt rows, H, T, D) float32 on v's device: the averaged values are `v keep + add`."""
        keep, add = self.plan_for(call.module, call.layer.name, v.device, v.shape[2])
        if tuple(add.shape[1:]) != tuple(v.shape[1:]):
            raise UnsupportedError(
                f"attnctl: StructuredGuidance at {call.layer.name}: the phrases' values have shape {tuple(add.shape[1:])} "
                f"(heads, text, head dim), the layer's values {tuple(v.shape[1:])}"
            )
        return keep, add

    def plan_for(self, module: torch.nn.Module, name: str, device: torch.device, text: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(keep, add) of the layer `name` for `text` text keys on `device`, once per call."""
        key = (name, str(device), text)
        found = self._cache.get(key)
        if found is not None:
            return found
        weight = next(module.parameters()).dtype
        with torch.no_grad():
            embeds = self.adapter.project_text(self.text.embeds.to(device=device, dtype=weight), self.adapter.layer(name))
            _, values = module.processor.project_context(module, embeds)  # (phrases, H, T', D)
        values = values.float()
        rows, heads, dim = len(self.counts), values.shape[1], values.shape[3]
        cover = torch.zeros(rows, 1, text, 1, device=device)
        summed = torch.zeros(rows, heads, text, dim, device=device)
        spans, counts = self._span_indices(device)
        for span, (positions, own) in zip(self.spans, spans):
            cover[span.row, :, positions] += 1.0
            summed[span.row, :, positions] += values[span.source][:, own]
        sets = counts.add(1.0)[:, None, None, None]
        keep = 1.0 - self.scale * cover / sets
        add = self.scale * summed / sets
        found = (keep, add)
        self._cache[key] = found
        return found

    def _span_indices(self, device: torch.device) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """Each span's (positions, own token indices) and the value-set counts on `device`: one copy per call
        and device for all the layers."""
        key = ("spans", str(device))
        if key not in self._cache:
            lengths = [len(span.positions) for span in self.spans] + [len(span.own) for span in self.spans]
            host = torch.tensor([p for span in self.spans for p in span.positions] + [o for span in self.spans for o in span.own],
                                dtype=torch.long)
            parts = upload(host, device).split(lengths)
            spans = list(zip(parts[: len(self.spans)], parts[len(self.spans):]))
            self._cache[key] = (spans, upload(torch.tensor(self.counts, dtype=torch.float32), device))
        return self._cache[key]

    def finish(self) -> None:
        self.index.clear()
        self._cache.clear()


class _ValueHook(LayerHook):
    """The cond rows' text values averaged with the phrases' (`rows` / `prompts`: the frame's cond rows and their
    prompt rows; `plan`: the layer's (keep, add), both made by the edit)."""

    edits_values: ClassVar[bool] = True

    def __init__(self, bound: StructuredBound, rows: tuple[int, ...], prompts: tuple[int, ...], plan: Any = None):
        self.bound = bound
        self.rows = rows
        self.prompts = prompts
        self.plan = plan

    def attend(
        self, call: AttentionCall, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: Any, compute: AttendFn
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if call.row_source is None:
            rows, prompt_rows = self.rows, self.prompts
        else:  # inside another hook's restricted rows
            layout = call.rows
            rows = layout.indices("cond")
            prompt_rows = tuple(layout.rows[i].prompt for i in rows)
        plan = self.plan
        if plan is None or plan[1].device != v.device or tuple(plan[1].shape[1:]) != tuple(v.shape[1:]):
            plan = self.bound.plan(call, v)
        keep, add = plan
        if v.shape[2] != keep.shape[2]:
            raise UnsupportedError(
                f"attnctl: StructuredGuidance at {call.layer.name} got {v.shape[2]} text keys, the prompt has "
                f"{keep.shape[2]}: another control on this layer changed the text (give the controls disjoint layers)"
            )
        if torch.compiler.is_compiling():  # constants of the graph: no lookup in the index cache to guard on
            index = torch.tensor(rows, dtype=torch.long, device=v.device)
            prompts = torch.tensor(prompt_rows, dtype=torch.long, device=v.device)
        else:
            index = self.bound.index(rows, v.device)
            prompts = self.bound.index(prompt_rows, v.device)
        chosen = v.index_select(0, index).float()
        edited = chosen * keep.index_select(0, prompts) + add.index_select(0, prompts)
        v = v.index_copy(0, index, edited.to(v.dtype))
        return compute(q, k, v, spec)


__all__ = ["PHRASE_BREAKS", "StructuredGuidance", "noun_phrases", "phrase_tokens"]
