"""Attention maps: how much each image token attends to each requested word (docs/methods.md).

Per word, per image: the attention probabilities of the word's tokens (summed over them) from
cross-attention, or from the image-query rows of joint attention normalised over the *full* row (image
keys included), summed over heads (as DAAM and attention-map-diffusers; `heads="mean"` averages them),
summed over the chosen layers and steps, resized to the image. This is the cross-attention visualisation of
Prompt-to-Prompt (Hertz et al. 2022, Fig. 4) and of DAAM (Tang et al. 2023, "What the DAAM: Interpreting
Stable Diffusion Using Cross Attention"), extended to joint attention.

Capture never materialises an N x N matrix and never changes the output: a `LayerHook.attend` lets the
layer's own attention op run, then computes the attention mass of the requested words from q and k as a
second, narrow attention whose values are the words' indicator columns (`word_attention`): one fused SDPA
call over chunks of query rows, normalised over all keys. Running sums at the finest token
grid of the chosen layers keep memory independent of the number of steps. The layer's spec means what it means
everywhere (`kernels.semantics`): the model's own attention mask, the per-key edits of other controls on the
same layer (Reweight's value scale or bias), label masks (Regions' isolation) and windows (DiTFastAttn) are
reflected, evaluated per chunk of query rows; on the rows a sparse transform (PLADIS) applies to, the map is of
its attention weights `P + scale (entmax - P)`, computed eagerly per chunk.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ...control import BindContext, Bound, Control, VideoFrames
from ...denoiser_call import DenoiserCall, RowLayout, upload
from ...errors import ConfigError, TokenError, UnsupportedError
from ...families.base import LayerInfo, ModelAdapter
from ...kernels.chunks import row_chunks
from ...kernels.semantics import block_bias, block_logits, probabilities, query_segments, spec_rows
from ...kernels.spec import AttentionSpec, per_key
from ...processors.chain import own_rows, token_layout
from ...processors.edit import AttendFn, AttentionCall, Edit, LayerHook
from ...selection import LayerSpec, validate_layers
from ...steps import StepWindow, validate_steps
from ...tokens import WordQuery, describe_query, has_duplicates, validate_word_query
from ...validation import choice, plain_scalar, refuse_unused, set_field
from ..common import TEXT_KINDS, RowIndex, image_size, output_key, publish, select_kinds, text_layers
from .heatmap import check_fps, save_maps, save_video_maps
from .magnets import MAGNET_FAMILIES, MAGNET_WORDS, global_sinks, magnet_prompt, renormalised, sink_columns
from .masks import MASK_THRESHOLD, masks_from_maps

#: Elements of one chunk of logits (rows x keys x heads x batch): 16M floats, 64 MB in float32.
CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class AttentionMaps(Control, type_name="attention-maps"):
    """Capture per-word attention maps for every image of a call; read them from `handle.outputs[key]`.

    On video denoisers (3-D token grids: Wan) the maps are per token frame: `maps` is (videos, words, frames,
    height, width), see `AttentionMapResult`.

    `words`: words or phrases (every occurrence), `(word, occurrence)` pairs or token positions; a word
    absent from some prompts gives zero maps for those images (absent from all: `TokenError`).
    `layers`: cross-attention (UNet, PixArt) or joint-attention (SD3, Flux) layers, all by default.
    `steps`: the step window. `resolution`: the maps' size, an int (square) or `(height, width)`; None is
    the generated image's size. `key`: where the result goes in `handle.outputs` (an `AttentionMapResult`
    once the call has ended; None while it runs). `heads`: "sum" (default; DAAM and attention-map-diffusers sum
    a layer's heads, so a level with more heads weighs more) or "mean" (each layer's map is a probability mass
    in [0, 1], as Prompt-to-Prompt's average).

    `magnets` (RefAM, opt-in; `attnctl.controls.maps.magnets`): True appends the default stop words
    (`MAGNET_WORDS`), or give your own tuple. They soak up surplus attention and are filtered out; global
    attention sinks at the deepest captured level are detected and suppressed. The magnets change the prompt and
    so the image, so they run only in a separate readout pass, an img2img call over the image at
    `readout_strength`: on an img2img pipeline the call itself is that pass; on a text-to-image pipeline the
    generation runs stock (nothing captured) and, once it has returned its images, the handle reads them in a
    readout pass (`attnctl.read_maps`'s, with the call's prompts, `num_inference_steps` and `guidance_scale`,
    re-noised with seed 0) and publishes that pass's maps under `key`. A ControlNet text-to-image call (its `image`
    is a condition) raises; an inpainting pipeline (it generates the masked area) and one whose `image` is a
    condition with no img2img pipeline in diffusers (T2I-Adapter, Flux Kontext) are refused at apply
    (`magnets_refusal`). SD / SDXL, SD3 and Flux (padded text embeddings); other families are refused at apply
    with the reason.
    """

    #: images (2-D token grids) and video (3-D: one map per token frame, see `AttentionMapResult`)
    grid_dims: ClassVar[tuple[int, ...]] = (2, 3)

    words: tuple[WordQuery, ...]
    layers: LayerSpec = None
    steps: StepWindow = (0.0, 1.0)
    resolution: int | tuple[int, int] | None = None
    key: str = "attention_maps"
    magnets: bool | tuple[str, ...] = False
    heads: str = "sum"
    readout_strength: float = 0.5

    needs_words: ClassVar[bool] = True
    needs_images: ClassVar[bool] = True  # the maps are drawn over the generated images

    step_cache_refusal: ClassVar[str | None] = (
        "the cache skips attention layers (or blocks) on some steps, so their maps would be silently missing from "
        "the averages"
    )

    def compile_refusal(self, adapter: ModelAdapter) -> str | None:
        return None  # each layer's rows to capture are decided with its edit; the hook adds to the running sums

    def __post_init__(self) -> None:
        words = (self.words,) if isinstance(self.words, (str, int)) else self.words
        if isinstance(words, tuple) and len(words) == 2 and isinstance(words[0], str) and isinstance(words[1], int) and not isinstance(words[1], bool):
            raise ConfigError(
                f"AttentionMaps.words={words!r} is ambiguous; pass a list of words, e.g. [{words!r}] for a "
                "(word, occurrence) pair"
            )
        if not isinstance(words, (list, tuple)) or not words:
            raise ConfigError(f"AttentionMaps.words must be a non-empty list of words, got {self.words!r}")
        checked = tuple(validate_word_query(w, owner="AttentionMaps.words") for w in words)
        if has_duplicates(checked):
            raise ConfigError(f"AttentionMaps.words has duplicates (words match whatever their case): {checked!r}")
        set_field(self, "words", checked)
        set_field(self, "layers", validate_layers(self.layers, name="AttentionMaps.layers"))
        set_field(self, "steps", validate_steps(self.steps, name="AttentionMaps.steps"))
        set_field(self, "resolution", _resolution(self.resolution))
        set_field(self, "key", output_key(self.key, "AttentionMaps"))
        set_field(self, "magnets", _magnets(self.magnets))
        set_field(self, "heads", choice(self.heads, "AttentionMaps.heads", ("sum", "mean")))
        strength = plain_scalar(self.readout_strength)
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 < float(strength) <= 1.0:
            raise ConfigError(
                f"AttentionMaps.readout_strength must be in (0, 1] (the share of the schedule the readout pass re-runs), "
                f"got {self.readout_strength!r}"
            )
        set_field(self, "readout_strength", float(strength))
        if not self.magnets:
            refuse_unused(self, "readout_strength", "without magnets (only a magnets readout after a text-to-image call reads it)")

    def validate_for(self, adapter: ModelAdapter) -> None:
        if self.magnets and adapter.family not in MAGNET_FAMILIES:
            raise UnsupportedError(
                f"attnctl: AttentionMaps(magnets=...) swaps the cond rows' prompt embeddings for those of the prompt with the "
                f"magnets appended (same padded length), implemented for {', '.join(MAGNET_FAMILIES)}; the "
                f"{adapter.family} family's text input (unpadded or masked text, video) is not handled yet; pass "
                "magnets=False for the plain maps (read_maps defaults to magnets=True)"
            )

    @property
    def output_key(self) -> str:
        """Where the result goes in `handle.outputs`."""
        return self.key

    def default_layers(self, adapter: ModelAdapter) -> str:
        return text_layers(adapter)

    def select(self, adapter: ModelAdapter) -> tuple[LayerInfo, ...]:
        return select_kinds(self, adapter, TEXT_KINDS, "cross- or joint-attention")

    def reads_after_call(self, pipeline: Any) -> bool:
        """Magnets on a pipeline that generates from text alone (no `image`): the readout runs after the call."""
        return bool(self.magnets) and _call_kind(pipeline) == "text"

    def bind(self, context: BindContext) -> Bound:
        if self.reads_after_call(context.pipeline):
            return _ReadoutAfterCall(self, context)
        return AttentionMapsBound(self, context)

    def layer_effects(self, adapter: ModelAdapter, layer: LayerInfo) -> tuple[str, ...]:
        """"capture": the layer's attention to the words is read (it needs the layer's own image tokens)."""
        return ("capture",)


#: The largest side `AttentionMaps.resolution` takes: the maps are (images, words, height, width) float32 tensors.
MAX_RESOLUTION = 8192


def _resolution(value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    given, value = value, plain_scalar(value)
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if isinstance(value, (tuple, list)) and len(value) == 2:
        value = tuple(plain_scalar(v) for v in value)
    if (
        isinstance(value, tuple)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_RESOLUTION for v in value)
    ):
        return (int(value[0]), int(value[1]))
    raise ConfigError(
        f"AttentionMaps.resolution must be None (the image's size), a positive int or (height, width), each at most "
        f"{MAX_RESOLUTION} pixels, got {given!r}"
    )


def _magnets(value: Any) -> tuple[str, ...]:
    if value is False or value is None or (isinstance(value, (list, tuple)) and not value):
        return ()
    if value is True:
        return MAGNET_WORDS
    if isinstance(value, str):
        value = (value,)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) and v.strip() for v in value):
        return tuple(v.strip() for v in value)
    raise ConfigError(f"AttentionMaps.magnets must be False, True (the default stop words) or a list of words, got {value!r}")


def word_label(query: WordQuery) -> str:
    """The display name of a word query: `cat`, `cat#1` (second occurrence), `token 5`."""
    if isinstance(query, tuple):
        return f"{query[0]}#{query[1]}"
    if isinstance(query, int):
        return f"token {query}"
    return query


# -- the capture math -------------------------------------------------------------------------------------
def key_columns(cache: dict[tuple[Any, ...], torch.Tensor], text_selector: torch.Tensor, prompts: tuple[int, ...],
                prompt_index: torch.Tensor, n_keys: int, text_start: int, device: torch.device) -> torch.Tensor:
    """(b, W, n_keys): the words' columns `text_selector` (prompt rows, W, text_len) of the prompt rows `prompts`
    (`prompt_index` on the selector's device) placed over a layer's keys, its text from `text_start`. Made once per
    call and layout, kept in `cache` (a bound's, cleared with it); in a compiled graph made at each call (no dict
    lookup for dynamo to guard on)."""
    key = (prompts, n_keys, text_start, device)
    found = None if torch.compiler.is_compiling() else cache.get(key)
    if found is None:
        words = text_selector.index_select(0, prompt_index).to(device)
        found = words.new_zeros(len(prompts), words.shape[1], n_keys)
        found[:, :, text_start : text_start + words.shape[2]] = words
        if not torch.compiler.is_compiling():
            cache[key] = found
    return found


def joined(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    """`torch.cat(parts, dim)`, without the copy `cat` makes of a single part (one query chunk, one head group: the
    usual case, at every captured layer)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def word_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    selector: torch.Tensor,
    *,
    scale: float | None = None,
    bias: torch.Tensor | Callable[[int, int], torch.Tensor | None] | None = None,
    chunk_elements: int | None = None,
    per_head: bool = False,
    values: torch.Tensor | None = None,
) -> torch.Tensor:
    """Head-averaged attention mass of each word: `mean_h sum_t softmax(q k^T scale + bias)[.., t] S[w, t]`
    (`per_head`: not averaged, (B, H, Nq, W)).

    q (B, H, Nq, D) are the query rows wanted; k (B, H, Nk, D) all keys (the softmax runs over all of them);
    selector (B, W, Nk), or (B, H, W, Nk) per head, weights the keys of each word (1 at its tokens; times
    the value scale where a control scales values); bias is additive and broadcasts to (B, H, Nq, Nk), or is a
    function `bias(start, stop)` giving the block of rows start:stop (never all rows at once). Returns (B, Nq, W)
    in float32.

    The sum `softmax(...) @ S^T` is itself an attention whose values are the selector columns, so it runs as
    a fused SDPA call (values padded to the head width): the softmax is normalised over every key and no
    Nq x Nk matrix is formed. Query rows go in chunks of at most about `chunk_elements` logits (None: `CHUNK_ELEMENTS`;
    a power-of-two count of chunks, `kernels.chunks.row_chunks`), which also bounds memory where SDPA falls back to
    its unfused kernel. `values`: `word_values(selector, q, k)`, where the caller keeps it
    (the same selector at every layer of a call).
    """
    batch, heads, nq, _ = q.shape
    nk = k.shape[2]
    words, head_dim = selector.shape[-2], q.shape[-1]
    groups = -(-words // head_dim)
    if values is None:
        values = word_values(selector, q, k)
    if isinstance(bias, torch.Tensor) and bias.dtype != q.dtype:
        bias = bias.to(q.dtype)
    budget = CHUNK_ELEMENTS if chunk_elements is None else chunk_elements
    options = {} if scale is None else {"scale": scale}
    out = []
    for chunk in row_chunks(0, nq, max(1, budget // max(1, batch * heads * nk))):  # may end with an empty chunk
        start, stop = chunk.start, chunk.stop
        if callable(bias):
            mask = bias(start, stop)
            mask = mask if mask is None or mask.dtype == q.dtype else mask.to(q.dtype)
        else:
            mask = None if bias is None else (bias[..., start:stop, :] if bias.shape[-2] > 1 else bias)
        mass = joined(
            [
                F.scaled_dot_product_attention(q[:, :, start:stop], k, values[..., g * head_dim : (g + 1) * head_dim], attn_mask=mask, **options)
                for g in range(groups)
            ],
            dim=-1,
        )
        mass = mass[..., :words]
        # a fully masked row (NaN in every column) attends to nothing. Zeroed through a (B, H, rows, 1) mask and averaged
        # over heads before anything is kept: under autograd the mask is all that is saved, not a float32 copy of the
        # per-head maps (nan_to_num would save its input); the values are those of `.float().nan_to_num(0.0)`
        hidden = mass.isnan().any(dim=-1, keepdim=True)
        mass = mass.masked_fill(hidden, 0.0).float()
        out.append(mass if per_head else mass.mean(dim=1))
    return joined(out, dim=2 if per_head else 1)


def word_values(selector: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The selector columns as `word_attention`'s SDPA values: (B, H, Nk, groups * head_dim) in q's dtype and device.
    Fused SDPA kernels (CPU flash, CUDA flash) need values as wide as the queries, otherwise SDPA falls back to its
    unfused kernel (3x slower here): the word columns are padded with zeros to groups of head_dim."""
    batch, heads, _, head_dim = q.shape
    nk = k.shape[2]
    if selector.ndim == 3:
        values = selector.transpose(-1, -2)[:, None].expand(batch, heads, nk, selector.shape[1])
    else:
        values = selector.transpose(-1, -2)
    words = values.shape[-1]
    groups = -(-words // head_dim)
    return F.pad(values, (0, groups * head_dim - words)).to(device=q.device, dtype=q.dtype).contiguous()


class _CaptureHook(LayerHook):
    """Lets the layer's attention op run, then adds the word maps of the cond rows to the running sums. Whether the
    layer's sinks are suppressed is decided with the edit; in a compiled forward also which rows count (`rows` of
    prompt rows `prompts`, constants of the graph), otherwise the hook decides when the maps are added (None)."""

    def __init__(self, bound: AttentionMapsBound, rows: tuple[int, ...] | None, prompts: tuple[int, ...] | None, sinks: bool):
        self.bound = bound
        self.rows = rows
        self.prompts = prompts
        self.sinks = sinks

    def attend(self, call: AttentionCall, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec, compute: AttendFn):
        result = compute(q, k, v, spec)
        if not token_layout(call).sub:  # a sub-attention an outer hook runs (Regions' base attention) is not the map
            with torch.no_grad():
                self.bound.accumulate(call, q, k, spec, self)
        return result


def _mapped_rows(call: AttentionCall, rows: tuple[int, ...], prompts: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The frame's `rows` as positions among the rows of `call`, which another hook may have restricted
    (`processors.chain.own_rows`: each row's own copy; rows it left out are dropped)."""
    if call.row_source is None:
        return rows, prompts
    kept = [prompt for row, prompt in zip(rows, prompts) if row in call.row_source]
    return own_rows(call, rows), tuple(kept)


class AttentionMapsBound(Bound):
    """Running sums of the maps of one pipeline call, at the finest token grid of the chosen layers."""

    def __init__(self, control: AttentionMaps, context: BindContext):
        super().__init__(control, context.layers, control.steps)
        self.layers_only = not control.magnets  # magnets change the cond rows' prompt
        self.key = control.key
        self.outputs = context.outputs
        publish(context, self.key, None)  # claimed for this call; the result replaces it at the end
        self.labels = tuple(word_label(w) for w in control.words)
        self.text_len = context.canvas.text_len
        self.device = context.device
        rows = context.prompt_rows
        tokens = None
        if any(not isinstance(w, int) for w in control.words):
            tokens = context.require_tokens("AttentionMaps", positions=True)
        selector = torch.zeros(rows, len(control.words), self.text_len)
        for w, query in enumerate(control.words):
            if tokens is None:
                found = [_position(query, self.text_len)] * rows
            else:  # a word missing from some rows is fine; one truncated away by the encoder's limit raises
                found = [tokens.positions(query, row, missing_ok=True) for row in range(rows)]
                if not any(found):
                    tokens.positions(query, 0)  # the TokenError that names the word and shows the prompt
            for row, positions in enumerate(found):
                selector[row, w, list(positions)] = 1.0
        self.selector = upload(selector, self.device)  # (prompt rows, words, text_len)
        self.prompts = _prompt_texts(tokens, rows)
        grids = [context.canvas.grid_at(layer.level) for layer in context.layers]
        self.grid = max(grids, key=lambda hw: hw[0] * hw[1])
        # video (a 3-D token grid): one map per token frame; the layers of a video denoiser share its frames
        self.frames = context.canvas.frames if context.adapter.grid_dims == 3 else None
        frames = () if self.frames is None else (self.frames,)
        self.sums = torch.zeros(rows, len(control.words), *frames, *self.grid, device=self.device)
        self.contributions = [0] * rows
        self.index = RowIndex()  # batch rows and prompt rows as index tensors, per device
        # (prompts, keys, first text key, device) -> selector; ("values", ..., heads, head dim, dtype) -> its `word_values`
        self._key_selectors: dict[tuple[Any, ...], torch.Tensor] = {}
        self._last_step: dict[tuple[int, int], int] = {}  # (layer, prompt row) -> last step summed
        self.resolution = control.resolution or image_size(context)
        # PixArt's resolution binning generates at a binned size, then resizes and centre-crops the image to the size
        # asked for: the maps follow the image the same way (the pipeline's own function), unless a resolution is given
        self.fit_to_image = None if control.resolution else getattr(
            getattr(context.pipeline, "image_processor", None), "resize_and_crop_tensor", None)
        self.layer_names = tuple(layer.name for layer in context.layers)
        self._edits: dict[tuple[Any, ...], Edit] = {}
        self.call_images = context.call_images
        self.magnets = control.magnets
        self.sum_heads = control.heads == "sum"
        self.magnet_text = None
        if self.magnets:
            _require_readout(context.pipeline)
            tokens = context.require_tokens("AttentionMaps(magnets=...)")
            # the call's texts as given: the tokens' are as the tokenizer sees them (textual inversion's `<x>` expanded,
            # which encode_prompt would expand again)
            arguments = context.prompt_arguments[0] if context.prompt_arguments else {}
            texts = _call_texts(arguments, "prompt", rows) or _prompt_texts(tokens, rows)
            own = {name: _call_texts(arguments, name, rows) for name in _OWN_PROMPTS}
            self.magnet_text = context.encode_prompts(
                [magnet_prompt(p, self.magnets) for p in texts],
                others={name: [magnet_prompt(p, self.magnets) for p in found] for name, found in own.items() if found is not None},
            )
            sizes = {layer.index: math.prod(context.canvas.grid_at(layer.level)) for layer in context.layers}
            deepest = min(sizes.values())
            self.sink_layers = frozenset(index for index, size in sizes.items() if size == deepest)

    def transform_inputs(self, frame: DenoiserCall, inputs: dict[str, Any]) -> dict[str, Any]:
        """Readout with magnets: the cond rows read the prompt with the magnets appended."""
        if not self.magnets or not frame.rows.indices("cond"):
            return inputs
        text = inputs.get("encoder_hidden_states")
        embeds = self.magnet_text.embeds
        if not isinstance(text, torch.Tensor) or text.shape[1:] != embeds.shape[1:]:
            raise UnsupportedError(
                f"attnctl: AttentionMaps(magnets=...) expected text embeddings of shape (rows, {tuple(embeds.shape[1:])}) "
                f"in the denoiser call, got {None if not isinstance(text, torch.Tensor) else tuple(text.shape)}"
            )
        rows = frame.rows.indices("cond")
        index = self.index(rows, text.device)
        prompts = self.index(tuple(frame.rows.rows[i].prompt for i in rows), text.device)
        swapped = embeds.to(device=text.device, dtype=text.dtype).index_select(0, prompts)
        return {**inputs, "encoder_hidden_states": text.index_copy(0, index, swapped)}

    def edit(self, layer: LayerInfo, frame: DenoiserCall) -> Edit | None:
        """The capture of `layer` in `frame`. Each prompt row counts once per step (a step's second model call, Heun's
        or SD3's skip-layer pass, adds nothing): when the maps are added (`counted`), or, in a compiled forward, here.
        attnctl's own extra forwards (`frame.extra_pass`: a latent optimiser's loss pass, which runs before the step's
        forward at the latent before its update; SAG's degraded pass) are not the call's attention: not captured."""
        cond = frame.rows.indices("cond", None)
        if not cond or frame.extra_pass is not None:
            return None
        sinks = bool(self.magnets) and layer.index in self.sink_layers
        rows = prompts = None
        if frame.compiled:
            rows, prompts = self.counted(layer, frame.step.index, frame.rows, cond)
            if not rows:
                return None
        key = (rows, prompts, sinks)
        found = self._edits.get(key)
        if found is None:
            found = self._edits[key] = Edit(hooks=(_CaptureHook(self, *key),))
        return found

    def counted(self, layer: LayerInfo, step: int, layout: RowLayout, cond: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(the rows of `cond` whose prompt row has no map of `layer` at `step` yet, their prompt rows); counts them."""
        rows, prompts = [], []
        for i in cond:
            prompt = layout.rows[i].prompt
            if self._last_step.get((layer.index, prompt)) == step:
                continue
            self._last_step[(layer.index, prompt)] = step
            rows.append(i)
            prompts.append(prompt)
            self.contributions[prompt] += 1
        return tuple(rows), tuple(prompts)

    def stored_bytes(self) -> int:
        """Bytes of the tensors this bound keeps across steps (independent of the number of steps)."""
        return sum(t.numel() * t.element_size() for t in (self.sums, self.selector)) + 8 * len(self.contributions)

    def accumulate(self, call: AttentionCall, q: torch.Tensor, k: torch.Tensor, spec: AttentionSpec, hook: _CaptureHook) -> None:
        if hook.rows is None:  # eager: counted when added (a loss pass that stops at this layer adds nothing)
            batch_rows, prompts = self.counted(call.layer, call.step.index, call.rows, call.rows.indices("cond", None))
            if not batch_rows:
                return
        else:
            batch_rows, prompts = _mapped_rows(call, hook.rows, hook.prompts)
        geometry = call.geometry
        image = geometry.image_slice
        if q.shape[2] != geometry.query_len or (call.layer.kind == "joint" and k.shape[2] != geometry.key_len):
            raise UnsupportedError(
                f"attnctl: AttentionMaps at {call.layer.name} got {q.shape[2]} query tokens, its grid "
                f"{geometry.frames}x{geometry.image_hw[0]}x{geometry.image_hw[1]} has {geometry.image_len} image tokens: another control "
                "on this layer changed the tokens (token reduction merges them); give the controls disjoint layers"
            )
        if torch.compiler.is_compiling():  # constants of the graph: no lookup in the index cache to guard on
            index = torch.tensor(batch_rows, dtype=torch.long, device=q.device)
            prompt_index = torch.tensor(prompts, dtype=torch.long, device=self.selector.device)
        else:
            index = self.index(batch_rows, q.device)
            prompt_index = self.index(prompts, self.selector.device)
        spec = spec_rows(spec, index, q.shape[0])
        qb = q.index_select(0, index)
        qi = qb[:, :, image]
        ki = k.index_select(0, index)
        n_keys = ki.shape[2]
        text_start = geometry.key_text_slice.start
        selector = key_columns(self._key_selectors, self.selector, prompts, prompt_index, n_keys, text_start, q.device)
        text_keys = slice(text_start, text_start + self.text_len)
        segments = []  # (queries, edited, the words' weights over the keys)
        for start, stop, edited in query_segments(spec, image):
            chosen = selector
            if edited and spec.value_scale is not None:
                value_scale = per_key(spec.value_scale.float(), "value_scale")  # (b, H|1, Nk)
                chosen = selector * value_scale if value_scale.shape[1] == 1 else selector[:, None] * value_scale[:, :, None, :]
            segments.append((slice(start, stop), edited, chosen))

        image_start = image.start  # `mass` holds ints, not slices: dynamo makes a slice a closure holds a constant

        def mass(queries: slice, edited: bool, columns: torch.Tensor, per_head: bool) -> torch.Tensor:
            """The segment's attention to each column of `columns` (b, C, Nk) or (b, H, C, Nk)."""
            offset = image_start + queries.start
            if edited and spec.sparse is not None:
                return _sparse_words(qb, ki, columns, spec, slice(offset, image_start + queries.stop), per_head=per_head)

            def bias(lo: int, hi: int) -> torch.Tensor | None:
                return block_bias(spec, slice(offset + lo, offset + hi), slice(0, n_keys), q.device)

            values = None
            if columns is selector and not torch.compiler.is_compiling():  # padded once per call and layout, as the selector
                values_key = ("values", prompts, n_keys, text_start, q.device, q.shape[1], q.shape[3], q.dtype)
                values = self._key_selectors.get(values_key)
                if values is None:
                    values = self._key_selectors[values_key] = word_values(selector, qb, ki)
            return word_attention(qi[:, :, queries], ki, columns, scale=spec.scale, bias=bias, per_head=per_head, values=values)

        if not hook.sinks:
            parts = [mass(queries, edited, chosen, False) for queries, edited, chosen in segments]
        else:  # sinks found on the head-averaged attention; each head's softmax then renormalised without them
            every = selector.new_zeros(len(batch_rows), self.text_len, n_keys)
            every[:, :, text_keys] = torch.eye(self.text_len, device=every.device)
            sinks = global_sinks(torch.cat([mass(queries, edited, every, False) for queries, edited, _ in segments], dim=1))
            sink_keys = selector.new_zeros(len(batch_rows), n_keys)
            sink_keys[:, text_keys] = sinks
            parts = [renormalised(mass(queries, edited, sink_columns(chosen, sink_keys), True)) for queries, edited, chosen in segments]
        words = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # (b, Ni, W)
        if self.sum_heads:
            words = words * q.shape[1]  # word_attention averages the heads
        h, w = geometry.image_hw
        maps = words.transpose(1, 2).reshape(len(batch_rows), -1, h, w)  # video: (b, W * frames, h, w), frame-major
        grid = self.sums.shape[-2:]  # not `self.grid`: its ints would be constants of a compiled graph, the shape is not
        if h != grid[0] or w != grid[1]:
            maps = F.interpolate(maps, size=(grid[0], grid[1]), mode="bilinear", align_corners=False)
        maps = maps.reshape(len(batch_rows), *self.sums.shape[1:])  # video: (b, W, frames, h, w)
        self.sums.index_add_(0, prompt_index, maps.to(self.sums.device))

    def finish(self) -> None:
        shown = self.call_images()
        if self.frames is None:
            images = _to_pil(shown) if shown is not None and not isinstance(shown, VideoFrames) else None
        else:
            images = _video_to_pil(shown.frames) if isinstance(shown, VideoFrames) else None
        self.index.clear()
        self._key_selectors.clear()
        maps = self.sums.float()
        if tuple(maps.shape[-2:]) != self.resolution:  # per frame on video
            flat = maps if self.frames is None else maps.flatten(1, 2)
            maps = F.interpolate(flat, size=self.resolution, mode="bilinear", align_corners=False).reshape(*maps.shape[:-2], *self.resolution)
        if images and self.frames is None and self.fit_to_image is not None and (images[0].height, images[0].width) != tuple(maps.shape[-2:]):
            maps = self.fit_to_image(maps, images[0].width, images[0].height)
        self.outputs[self.key] = AttentionMapResult(
            words=self.labels,
            maps=maps.clamp_min(0).cpu(),
            grid_maps=self.sums.cpu().clone(),
            prompts=self.prompts,
            layers=self.layer_names,
            contributions=tuple(self.contributions),
            images=images,
            stored_bytes=self.stored_bytes(),
            frames=self.frames,
        )


def _call_parameters(pipeline: Any) -> Mapping[str, Any]:
    try:
        return inspect.signature(type(pipeline).__call__).parameters
    except (AttributeError, TypeError, ValueError):
        return {}


def _call_kind(pipeline: Any) -> str:
    """What a call of `pipeline` is to magnets, by its arguments: "text" (no `image`: it generates from text, and the
    handle reads its images after it, `_ReadoutAfterCall`), "img2img" (an `image` re-noised to a `strength`: the call
    is the readout pass), "inpaint" (also a `mask_image`: it generates the masked area) or "conditioned" (an `image`
    and no `strength`: a ControlNet or T2I-Adapter condition, Flux Kontext's reference image; it generates)."""
    parameters = _call_parameters(pipeline)
    if "image" not in parameters:
        return "text"
    if "mask_image" in parameters:
        return "inpaint"
    return "img2img" if "strength" in parameters else "conditioned"


def _read_with(pipeline: Any) -> str:
    """Where to read the maps of `pipeline`'s images with magnets instead: an img2img pipeline of the model."""
    from ...families import base_img2img_name

    base = base_img2img_name(pipeline)
    made = f" ({base}, made of this pipeline's components)" if base is not None else ""
    return f"generate without magnets, then read the images with attnctl.read_maps on an img2img pipeline of the model{made}"


def magnets_refusal(pipeline: Any) -> str | None:
    """Why `AttentionMaps(magnets=...)` can read in no call of `pipeline` (checked at apply), or None. Magnets change
    the prompt and so the image, so they run only in a readout pass over an image (`_require_readout`). An
    inpainting call (its `mask_image`: Inpaint and Fill pipelines) generates the masked area, so it is no readout
    pass; a call whose `image` is a condition (no `strength`) generates too, and where diffusers has no img2img
    pipeline for it (Flux Kontext, T2I-Adapter) no readout can be made of it either (`attnctl.read_maps(pipe, ...)`
    raises). A ControlNet pipeline, whose img2img pipeline reads given images, raises at each call instead."""
    import diffusers

    from ...families import img2img_name

    kind = _call_kind(pipeline)
    name = type(pipeline).__name__
    why = ("attnctl: AttentionMaps(magnets=...) changes the prompt and so the image, so it runs only in a readout pass "
           "over an image (an img2img call, or one the handle runs after a text-to-image call); ")
    if kind == "inpaint":
        return why + (
            f"{name}'s call inpaints (it takes a mask_image): it generates the masked area, which the magnets would "
            f"change, so it is no readout pass (an img2img call re-noises a whole image); {_read_with(pipeline)}; an "
            "inpainting denoiser with extra input channels (a 9-channel UNet, Flux Fill's) runs in none: read with the "
            "base model's"
        )
    if kind == "conditioned" and not hasattr(diffusers, img2img_name(pipeline)):
        return why + (
            f"{name}'s call takes its `image` as a condition (it has no strength to re-noise it), so it generates, and "
            f"diffusers has no {img2img_name(pipeline)} to make a readout pass of ({name} itself cannot be read by "
            f"attnctl.read_maps either); {_read_with(pipeline)}"
        )
    return None


def _require_readout(pipeline: Any) -> None:
    """Magnets change the prompt and so the image: only an img2img call (a readout pass over an image, re-noised to a
    `strength`) may use them. A ControlNet text-to-image call also takes an `image` (its condition), but no
    `strength`: it generates (a text-to-image call without an image reads its result after it, `_ReadoutAfterCall`;
    the pipelines no readout can be made of are refused at apply, `magnets_refusal`)."""
    kind = _call_kind(pipeline)
    if kind == "img2img":
        return
    refused = magnets_refusal(pipeline)
    if refused is not None:
        raise UnsupportedError(refused)
    condition = ""
    if kind == "conditioned":  # diffusers has its img2img pipeline (magnets_refusal), which takes the condition apart
        import diffusers

        from ...families import img2img_name

        reader = img2img_name(pipeline)
        if "control_image" in inspect.signature(getattr(diffusers, reader).__call__).parameters:
            condition = f", giving this call's image as control_image= (the condition of {reader}, which read_maps makes)"
    raise ConfigError(
        f"attnctl: AttentionMaps(magnets=...) changes the prompt and so the image, so it runs only in a separate "
        f"readout pass over an image (an img2img call); {type(pipeline).__name__} generates. Generate without "
        f"magnets, then read the maps with attnctl.read_maps(pipe, images, prompt, words, magnets=True){condition}"
    )


@dataclass(frozen=True)
class ReadoutRequest:
    """The readout a handle runs after a text-to-image call (`AttentionMaps.reads_after_call`): `control` (its
    words, layers, steps, heads, magnets, resolution) read over the call's `images` (PIL, one per prompt row) with
    `prompts` (the call's, one per image), in an img2img pass at `strength` with the noise of `seed`, and `call`: the
    call's arguments the pass takes where the img2img call names them (`num_inference_steps`, `guidance_scale`,
    `true_cfg_scale`, `max_sequence_length`, `prompt_2` / `prompt_3` and the negative prompts, one per image). The result goes to `handle.outputs[control.key]`."""

    control: AttentionMaps
    images: tuple[Any, ...]
    prompts: tuple[str, ...]
    strength: float
    seed: int = 0
    call: Mapping[str, Any] = field(default_factory=dict)


#: The text-to-image call's arguments the readout pass takes over (where its img2img call names them).
READOUT_CALL_ARGUMENTS = ("num_inference_steps", "guidance_scale", "true_cfg_scale", "max_sequence_length")
#: The call's negative prompts the readout pass reads too (one per image, as its prompts).
_NEGATIVE_PROMPTS = ("negative_prompt", "negative_prompt_2", "negative_prompt_3")


class _ReadoutAfterCall(Bound):
    """`AttentionMaps(magnets=...)` in a text-to-image call: nothing during the call (no layer, no input changed, no
    map captured: the generation is stock); at its end a `ReadoutRequest` over the images it returned, which the
    handle runs with the pipeline stock (`Handle._run_readouts`). Refuses at bind, before the generation, what the
    readout could not read: no decoded images (`output_type="latent"`), a strength that runs no step, a word that is in
    no prompt."""

    def __init__(self, control: AttentionMaps, context: BindContext):
        super().__init__(control, (), control.steps)
        arguments = dict(context.call_arguments)
        output_type = arguments.get("output_type", "pil")
        if output_type == "latent":
            raise ConfigError(
                f"attnctl: AttentionMaps(magnets=...) on a {type(context.pipeline).__name__} reads the call's images in a "
                "readout pass after it, and output_type='latent' returns no images; call with output_type='pil' (or "
                "'np' / 'pt'), or decode the latents and read them with attnctl.read_maps(pipe, images, prompt, words)"
            )
        steps = arguments.get("num_inference_steps")
        steps = steps if isinstance(steps, int) and not isinstance(steps, bool) else context.steps
        if int(steps * control.readout_strength) < 1:
            raise ConfigError(
                f"attnctl: AttentionMaps.readout_strength={control.readout_strength:g} of num_inference_steps={steps} "
                f"runs no denoising step in the readout pass (img2img runs int(steps * strength) = "
                f"{int(steps * control.readout_strength)}), so there would be no maps to read: raise either"
            )
        rows = context.prompt_rows
        tokens = None
        if any(not isinstance(w, int) for w in control.words):
            tokens = context.require_tokens("AttentionMaps", positions=True)
            for query in control.words:  # a word in no prompt raises now, not after the generation
                if not isinstance(query, int) and not any(tokens.positions(query, row, missing_ok=True) for row in range(rows)):
                    tokens.positions(query, 0)
        given = context.prompt_arguments[0] if context.prompt_arguments else {}
        texts = _call_texts(given, "prompt", rows)
        if texts is None and tokens is None:
            raise ConfigError(
                f"attnctl: AttentionMaps(magnets=...) on a {type(context.pipeline).__name__} reads the call's images in a "
                "readout pass that encodes the call's prompts with the magnets appended, and this call gave no prompt text "
                "(prompt_embeds); call with prompt=..., or read the images with attnctl.read_maps(pipe, images, prompt, words)"
            )
        self.prompts = tuple(texts or _prompt_texts(tokens, rows))
        call = {name: arguments[name] for name in READOUT_CALL_ARGUMENTS if arguments.get(name) is not None}
        call["num_inference_steps"] = steps
        for name in _OWN_PROMPTS:  # the call's own prompts of the encoders that read them, one per image
            texts = _call_texts(given, name, rows)
            if texts is not None:
                call[name] = texts
        for name in _NEGATIVE_PROMPTS:
            texts = _call_texts(arguments, name, rows)
            if texts is not None:
                call[name] = texts
        self.call = call
        self.call_images = context.call_images
        self.call_failed = context.call_failed
        self.key = control.key
        self.outputs = context.outputs
        publish(context, self.key, None)  # claimed for this call; the readout's result replaces it after the call

    def finish(self) -> None:
        if self.call_failed():  # no images to read (a failed call publishes nothing); its own error was raised
            return
        found = self.call_images()
        images = _to_pil(found) if found is not None and not isinstance(found, VideoFrames) else None
        if images is None or len(images) != len(self.prompts):
            raise UnsupportedError(
                f"attnctl: AttentionMaps(magnets=...) reads the call's images after it, and this call returned "
                f"{'no decoded images' if images is None else f'{len(images)} images for {len(self.prompts)} prompt rows'} "
                "through pipe.image_processor.postprocess; read them with attnctl.read_maps(pipe, images, prompt, words)"
            )
        self.readout = ReadoutRequest(self.control, tuple(images), self.prompts, self.control.readout_strength, 0, self.call)


def _position(query: WordQuery, text_len: int) -> tuple[int, ...]:
    if not isinstance(query, int) or query >= text_len:
        raise TokenError(f"attnctl: token position {query} is outside the text sequence of {text_len} tokens")
    return (query,)


#: `encode_prompt`'s prompts of the encoders that read their own (SDXL's CLIP-G, SD3's T5, Flux's T5): the magnet
#: text of each is its own prompt with the magnets appended.
_OWN_PROMPTS = ("prompt_2", "prompt_3")


def _call_texts(arguments: dict[str, Any], name: str, rows: int) -> list[str] | None:
    """The text of each prompt row in `encode_prompt`'s argument `name` as the call gave it (one string, or one per
    prompt, each repeated `num_images_per_prompt` times), before the pipeline rewrites it (textual inversion); None
    where the call left it None."""
    value = arguments.get(name)
    if value is None:
        return None
    texts = [value] if isinstance(value, str) else list(value)
    per_prompt = int(arguments.get("num_images_per_prompt") or 1)
    if len(texts) == 1:
        texts = texts * (rows // per_prompt)
    if not all(isinstance(t, str) for t in texts) or len(texts) * per_prompt != rows:
        raise UnsupportedError(
            f"attnctl: AttentionMaps(magnets=...) cannot append the magnets to {name}={value!r}: expected a string or "
            f"{rows // per_prompt} strings (one per prompt) for {rows} prompt rows"
        )
    return [text for text in texts for _ in range(per_prompt)]


def _prompt_texts(tokens: Any, rows: int) -> tuple[str, ...]:
    if tokens is None or not tokens.encoders:
        return ("",) * rows
    texts = tokens.encoders[0].prompts[0]
    return tuple(texts[r] for r in range(rows))


def _sparse_words(
    q: torch.Tensor, k: torch.Tensor, selector: torch.Tensor, spec: AttentionSpec, queries: slice,
    chunk_elements: int | None = None, per_head: bool = False,
) -> torch.Tensor:
    """`word_attention` for query rows a sparse transform (PLADIS) applies to: the words' mass under the attention
    weights `kernels.semantics.probabilities` (eager, per chunk of rows; q holds every query position, k every key).
    Returns (B, n, W) in float32 (`per_head`: (B, H, n, W))."""
    batch, heads, nk = q.shape[0], q.shape[1], k.shape[2]
    values = selector.float().transpose(-1, -2)  # (B, Nk, W) or (B, H, Nk, W)
    values = values[:, None] if values.ndim == 3 else values
    budget = CHUNK_ELEMENTS if chunk_elements is None else chunk_elements
    out = []
    for chunk in row_chunks(queries.start, queries.stop, max(1, budget // max(1, batch * heads * nk))):  # as in `word_attention`
        weights = probabilities(block_logits(q, k, spec, chunk, slice(0, nk)), spec, chunk)
        mass = weights @ values
        out.append(mass if per_head else mass.mean(dim=1))
    return joined(out, dim=2 if per_head else 1)


class MissingWordError(TokenError, KeyError):
    """A word that was not captured, asked of an `AttentionMapResult` (a KeyError too, as for any mapping)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class _WordMaps(dict):
    """One image's maps by word label; a missing word says which labels there are."""

    def __missing__(self, key: Any) -> Any:
        if isinstance(key, (tuple, int)) and word_label(key) in self:
            return self[word_label(key)]
        raise MissingWordError(_missing_word(key, tuple(self)))


def _missing_word(item: Any, words: tuple[str, ...]) -> str:
    return (
        f"{item!r} is not one of the captured words {words}; a word query (word, k) is keyed 'word#k' and a token "
        "position p 'token p'"
    )


# -- the generated images ---------------------------------------------------------------------------------
def _to_pil(result: Any) -> list[Any] | None:
    """PIL images from what `postprocess` returned (a list of PIL images, an array or a tensor in [0, 1])."""
    from PIL import Image

    try:
        if isinstance(result, list) and all(isinstance(r, Image.Image) for r in result):
            return [r.copy() for r in result]
        if isinstance(result, torch.Tensor):
            result = result.detach().float().cpu().permute(0, 2, 3, 1).numpy()
        import numpy as np

        if isinstance(result, np.ndarray) and result.ndim == 4:
            array = (np.clip(result, 0, 1) * 255).round().astype("uint8")
            if array.shape[-1] == 1:
                return [Image.fromarray(a[..., 0], mode="L").convert("RGB") for a in array]
            return [Image.fromarray(a[..., :3]) for a in array]
    except Exception:  # noqa: BLE001 - pictures are a convenience; never break the pipeline call
        return None
    return None


def _video_to_pil(result: Any) -> list[list[Any]] | None:
    """Per video, its frames as PIL images, from what `postprocess_video` returned (lists of PIL frames, an array
    (videos, frames, H, W, C) or a tensor (videos, frames, C, H, W) in [0, 1])."""
    from PIL import Image

    try:
        if isinstance(result, list) and all(isinstance(v, list) and all(isinstance(f, Image.Image) for f in v) for v in result):
            return [[f.copy() for f in v] for v in result]
        if getattr(result, "ndim", 0) == 5:
            videos = [_to_pil(v) for v in result]
            return None if any(v is None for v in videos) else videos
    except Exception:  # noqa: BLE001 - pictures are a convenience; never break the pipeline call
        return None
    return None


# -- the result ---------------------------------------------------------------------------------------------
@dataclass
class AttentionMapResult:
    """Per-image, per-word attention maps of one pipeline call (`handle.outputs["attention_maps"]`), on the CPU.

    `maps` (images, words, height, width): the sums over layers and steps (of each layer's heads summed, or
    averaged with `heads="mean"`), resized to the resolution; `grid_maps` the same sums at the finest token grid,
    before resizing; `contributions[i]` how many (layer, step) maps were summed for image i (divide for a mean:
    with the default heads="sum", `grid_maps[i] / contributions[i]` is attention-map-diffusers' map of the cond
    image, bilinear at the finest grid); `images` the generated pictures when
    the pipeline decoded them (None with `output_type="latent"`).

    Video (a 3-D token grid, `frames` not None): one map per *token* frame (the denoiser's latent frames: Wan's
    VAE encodes the first video frame alone, then 4 frames per latent frame), so `maps` is (videos, words,
    frames, height, width), `result["cat"]` (videos, frames, height, width) and `result[i]["cat"]` (frames,
    height, width); `images` holds per video its decoded frames (a list of PIL frames); `save` writes a strip
    of the token frames and an animated GIF per word.
    """

    words: tuple[str, ...]
    maps: torch.Tensor
    grid_maps: torch.Tensor
    prompts: tuple[str, ...]
    layers: tuple[str, ...]
    contributions: tuple[int, ...]
    images: list[Any] | None = None
    stored_bytes: int = 0
    frames: int | None = None  # token frames of a video call; None for images
    _pictures: Any = field(default=None, repr=False)

    def __len__(self) -> int:
        return int(self.maps.shape[0])

    def __getitem__(self, item: int | str | tuple[str, int]) -> dict[str, torch.Tensor] | torch.Tensor:
        """`result[i]`: `{word: (height, width) map}` of image i; `result["red"]`: (images, height, width).

        Words are keyed by their display label: `"red"`, `"street#1"` for the query `("street", 1)` (an
        occurrence), `"token 5"` for a position; `result[("street", 1)]` finds the same map."""
        if isinstance(item, tuple):
            item = word_label(item)
        if isinstance(item, str):
            if item not in self.words:
                raise MissingWordError(_missing_word(item, self.words))
            return self.maps[:, self.words.index(item)]
        return _WordMaps({word: self.maps[item, w] for w, word in enumerate(self.words)})

    def select_images(self, indices: Sequence[int]) -> AttentionMapResult:
        """The result of images `indices` only, in that order (maps, grid maps, prompts, contributions, pictures):
        what a caller keeps of a call that rendered rows it does not return (`Model.generate` with ReferenceAttention
        keeps row 1 of `[reference, image]`)."""
        rows = list(indices)
        bad = [i for i in rows if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(self)]
        if bad:
            raise ConfigError(f"select_images: indices must be image positions in [0, {len(self)}), got {bad[0]!r}")
        return replace(self, maps=self.maps[rows], grid_maps=self.grid_maps[rows],
                       prompts=tuple(self.prompts[i] for i in rows),
                       contributions=tuple(self.contributions[i] for i in rows),
                       images=[self.images[i] for i in rows] if self.images is not None and len(self.images) == len(self) else None,
                       _pictures=None)

    def normalized(self) -> torch.Tensor:
        """Every map scaled to [0, 1] by its own maximum (all-zero maps stay zero); on video, by the maximum over
        all its frames (so that frames compare)."""
        peak = self.maps.amax(dim=(-2, -1) if self.frames is None else (-3, -2, -1), keepdim=True)
        return torch.where(peak > 0, self.maps / peak.clamp_min(1e-30), torch.zeros_like(self.maps))

    def masks(self, word: str | tuple[str, int] | int, soft: bool = False, threshold: float = MASK_THRESHOLD) -> torch.Tensor:
        """Segmentation masks of `word` for every image: (images, height, width) at the maps' resolution (the image's
        size by default), bool, or floats in [0, 1] with `soft=True`. Usable directly as `Region(mask=masks[i])`.

        The rule (docs/methods.md "Segmentation masks from attention"): each image's map is min-max normalised to
        [0, 1] (the soft mask; a constant map gives zeros) and the binary mask is `soft >= threshold` (0.5, the
        half maximum, by default). Video: (videos, frames, height, width), normalised over the whole video; a region
        takes one video's masks, `Region(mask=masks[i])` (a (frames, H, W) stack, read as its list of frames)."""
        if isinstance(word, bool) or not isinstance(word, (str, tuple, int)):
            raise ConfigError(f"masks: word must be a captured word, a (word, occurrence) pair or a token position, got {word!r}")
        item = word_label(word) if isinstance(word, (tuple, int)) else word
        return masks_from_maps(self[item], soft=soft, threshold=threshold, frames=self.frames is not None)

    def save(self, directory: str, scaling: str = "max", fps: int = 16) -> list[str]:
        """Write, per image i, `image{i}_{word}.png` (heatmap over the image) and `image{i}_grid.png` (the
        image and every word's heatmap, names below); returns the paths. `scaling`: "max" (each map divided by
        its maximum) or "minmax". Without decoded images (`output_type="latent"`) the heatmaps stand alone.

        Video: per video i and word, `video{i}_{word}_strip.png` (the token frames side by side, each over its
        first decoded frame) and `video{i}_{word}.gif` (animated: every decoded frame under its token frame's map,
        or the token frames alone without decoded frames), scaled over the whole video; `fps` is the GIF's rate.
        Every argument is checked before the folder is created."""
        check_fps(fps)  # on images too (unread there), so that a bad value is named rather than ignored
        if self.frames is not None:
            return save_video_maps(self.maps, self.words, self.images, directory, scaling, fps=fps)
        return save_maps(self.maps, self.words, self.images, directory, scaling)


__all__ = ["AttentionMapResult", "AttentionMaps", "ReadoutRequest", "describe_query", "word_attention", "word_label"]
