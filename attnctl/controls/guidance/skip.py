"""Skip-layer guidance (Stability AI, SD3.5; as SD3's `skip_guidance_layers`): the perturbed rows skip the
selected transformer blocks (a skipped block returns its inputs unchanged, text stream included, as
`SD3Transformer2DModel(skip_layers=...)` does), and `scale (cond - perturbed)` is added to every combined
row, as PAG's term.

What a block is, per family:
- SD3: `transformer_blocks.i` (an integer i, as SD3's `skip_layers`);
- PixArt: `transformer_blocks.i` (integer);
- Flux: integers index the double-stream `transformer_blocks`; single-stream blocks are named by path,
  `"single_transformer_blocks.j"`;
- UNet (SD, SDXL): there is no flat block list; name each `BasicTransformerBlock` by its path, e.g.
  `"mid_block.attentions.0.transformer_blocks.0"` (integers raise).

Skipping some rows of a batch wraps the block's `forward` at instance level for the pipeline call (no class
is patched; `finish()` restores it exactly): the block runs on the other rows only (its batched inputs re-indexed,
the attention layers inside it seeing those rows as the denoiser call's rows), and the skipping rows get their
inputs back. A forward made of skipping rows only (`separate=True`) does not run the block at all. When a block
input cannot be re-indexed safely (tensors inside `joint_attention_kwargs` / `cross_attention_kwargs` /
`added_cond_kwargs`, or a batched input whose rows do not match), the block runs on the whole batch and the
skipping rows' outputs are replaced, as before. A block that carries the first- or last-block hook of a diffusers
block cache (FirstBlockCache, MagCache, SeaCache), whose state covers the whole batch, is refused
(`refuse_block_caches`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch

from ...denoiser_call import DenoiserCall, RowLayout
from ...errors import ConfigError, SelectionError, UnsupportedError
from ...families.base import LayerInfo, ModelAdapter
from ...foreign_patches import block_cache_boundary, cache_removal_hint
from ...steps import StepInfo, validate_steps
from ...validation import plain_scalar, set_field
from .common import PerturbingBound, PerturbingControl

#: Arguments that are dicts of extra inputs: re-indexed only when they hold no tensor.
DICT_ARGUMENTS: tuple[str, ...] = ("joint_attention_kwargs", "cross_attention_kwargs", "added_cond_kwargs")


@dataclass(frozen=True)
class SkipLayer(PerturbingControl, type_name="skip-layer"):
    """Skip-layer guidance. Defaults are diffusers' SD3 pipeline's for SD3.5-Medium: blocks 7, 8, 9, scale 2.8, steps
    1%-20% (Stability's own SD3.5-Medium config: scale 2.5 with CFG 4.0).

    blocks: integers (SD3 / PixArt / Flux double blocks: `transformer_blocks.i`) or block paths (see the
    module docstring). separate: run the perturbed rows as their own forward.
    """

    scale: float = 2.8
    blocks: tuple[int | str, ...] = (7, 8, 9)
    steps: tuple[float, float] = (0.01, 0.2)
    separate: bool = False

    def compile_refusal(self, adapter: ModelAdapter) -> str | None:
        return (
            "it wraps the skipped blocks' forward for each pipeline call, and the wrapper reads the call's row tags (new at "
            "every call), binds the block's arguments with inspect and re-batches them in Python: traced as part of a "
            "compiled block or denoiser, it recompiles at every pipeline call; and the layers inside a narrowed block "
            "would get the edits made before the forward for the whole batch"
        )

    def __post_init__(self) -> None:
        self._check_scale()
        blocks = self.blocks
        if isinstance(plain_scalar(blocks), (int, str)):
            blocks = (blocks,)
        if not isinstance(blocks, (tuple, list)) or not blocks:
            raise ConfigError(f"SkipLayer.blocks must be a non-empty sequence of block indices or paths, got {self.blocks!r}")
        blocks = tuple(plain_scalar(block) for block in blocks)
        for block in blocks:
            valid_int = isinstance(block, int) and not isinstance(block, bool) and block >= 0
            if not (valid_int or (isinstance(block, str) and block.strip())):
                raise ConfigError(f"SkipLayer.blocks holds {block!r}; use integers >= 0 or block paths such as 'transformer_blocks.7'")
        if len(set(blocks)) != len(blocks):
            raise ConfigError(f"SkipLayer.blocks has duplicates: {blocks!r}")
        set_field(self, "blocks", tuple(blocks))
        set_field(self, "steps", validate_steps(self.steps, name="SkipLayer.steps"))

    def block_paths(self, adapter: ModelAdapter) -> tuple[str, ...]:
        """The module path of every selected block; raises SelectionError naming the blocks there are."""
        available = adapter.transformer_blocks()
        paths = []
        for block in self.blocks:
            if isinstance(block, int):
                if not adapter.indexed_blocks:
                    raise SelectionError(
                        f"SkipLayer: integer block {block} means nothing on a {adapter.family} denoiser; name the blocks "
                        f"by path, e.g. {_some(available)} (the defaults 7, 8, 9 are SD3.5-Medium's)"
                    )
                path = f"transformer_blocks.{block}"
            else:
                path = block
            if path not in available and adapter.experts and path.split(".")[0] not in adapter.experts:
                named = [f"{expert}.{path}" for expert in adapter.experts]
                raise SelectionError(
                    f"SkipLayer: block {block!r} does not exist: this pipeline has {len(adapter.experts)} denoiser experts "
                    f"({', '.join(adapter.experts)}), whose blocks are named behind the expert's attribute; name the block "
                    f"of each expert that should skip it ({' and '.join(repr(name) for name in named)}); blocks: {_some(available)}"
                )
            if path not in available:
                parent = path.rpartition(".")[0] + "."  # the blocks beside it: its siblings at the same path
                count = sum(1 for name in available if name.startswith(parent) and "." not in name[len(parent):])
                siblings = f"{parent[:-1]} has {count} block(s); " if count else ""
                raise SelectionError(
                    f"SkipLayer: block {block!r} ({path}) does not exist in {type(adapter.denoiser).__name__}; "
                    f"{siblings}blocks: {_some(available)}"
                )
            if path in paths:
                raise SelectionError(f"SkipLayer: block {block!r} ({path}) is named twice in blocks={self.blocks!r}")
            paths.append(path)
        return tuple(paths)

    def validate_for(self, adapter: ModelAdapter) -> None:
        refuse_block_caches(self, adapter, self.block_paths(adapter))

    def select(self, adapter: ModelAdapter) -> tuple[LayerInfo, ...]:
        """The attention layers inside the skipped blocks (for `describe()`)."""
        prefixes = tuple(path + "." for path in self.block_paths(adapter))
        return tuple(layer for layer in adapter.layers if layer.name.startswith(prefixes))

    def bind(self, context) -> _SkipBound:
        return _SkipBound(self, context)

    def layer_effects(self, adapter: ModelAdapter, layer: LayerInfo) -> tuple[str, ...]:
        """None: whole blocks are skipped for the perturbed rows only; no attention layer computes differently for
        the rows that run it, so nothing here conflicts with another control's edits."""
        return ()


def refuse_block_caches(control: SkipLayer, adapter: ModelAdapter, paths: tuple[str, ...]) -> None:
    """A block whose diffusers block-cache hook keeps state over the whole batch and the blocks after it (the first or
    last block of FirstBlockCache, MagCache, SeaCache) cannot run on the kept rows alone: its cached residual and its
    decision cover every row (FirstBlockCache's first block raised an IndexError, MagCache's dropped the later blocks
    for the kept rows, logging a dimension mismatch; the last blocks' residuals broadcast one row's to the others).
    Refused at apply and at each call (a cache enabled after apply)."""
    if control.scale == 0:
        return
    blocks = adapter.transformer_blocks()
    for path in paths:
        cache = block_cache_boundary(blocks[path])
        if cache is not None:
            raise UnsupportedError(
                f"attnctl: SkipLayer cannot skip block {path} for its rows under diffusers' {cache}: the skipped rows "
                "would leave that state with fewer rows than the batch. Skip other blocks (SkipLayer(blocks=...)), or "
                f"take the cache off: {cache_removal_hint(adapter.denoiser)}"
            )


def _some(available: dict[str, Any], limit: int = 6) -> str:
    names = list(available)
    text = ", ".join(names[:limit])
    return text + (f", ... ({len(names)} in all)" if len(names) > limit else "")


class _SkipBound(PerturbingBound):
    """Wraps the forward of each skipped block for the pipeline call (`BindContext.wrap_method`: the handle owns
    and undoes the wraps)."""

    def __init__(self, control: SkipLayer, context):
        super().__init__(control, context.layers, context.adapter)
        paths = control.block_paths(context.adapter)
        self.experts = context.adapter.layer_experts(paths)
        if control.scale == 0:
            return
        refuse_block_caches(control, context.adapter, paths)  # a cache enabled after apply
        modules = context.adapter.transformer_blocks()
        for path in paths:
            context.wrap_method(modules[path], "forward", self._make(modules[path], context.current_frame))

    def active(self, step: StepInfo) -> bool:
        """diffusers' SD3 window, strict at both ends: `n start < i < n stop` (so step 0 never is)."""
        start, stop = self.steps
        return start * step.count < step.index < stop * step.count

    window_rule = "; SkipLayer's window is strict at both ends: n start < i < n stop"

    def _make(self, module: torch.nn.Module, current_frame):
        tag = self.tag
        batched = self.adapter.block_inputs.get(type(module).__name__, ("hidden_states",))
        tokens = batched[0]  # the block's token input: `hidden_states`, or Z-Image's `x`
        two_streams = type(module).__name__ in self.adapter.text_stream_blocks
        index = self.index

        def make(original):
            signature = inspect.signature(original)

            def forward(*args: Any, **kwargs: Any) -> Any:
                frame: DenoiserCall | None = current_frame()
                rows = frame.rows.indices("cond", tag) if frame is not None else ()
                if not rows:
                    return original(*args, **kwargs)
                bound = signature.bind(*args, **kwargs)
                arguments = bound.arguments
                hidden, context = arguments.get(tokens), arguments.get("encoder_hidden_states")
                batch = hidden.shape[0]
                if len(rows) == batch:  # every row skips the block: it does not run
                    return skipped_output(module, hidden, context, two_streams)
                skipped = set(rows)
                kept = tuple(i for i in range(batch) if i not in skipped)
                narrow = _rebatch(batched, arguments, batch, index(kept, hidden.device))
                if narrow is None or len(frame.rows) != batch:
                    return skip_rows(original(*args, **kwargs), hidden, context, index(rows, hidden.device))
                layout = frame.rows
                frame.rows = RowLayout(tuple(layout.rows[i] for i in kept))  # the layers inside see the rows that run
                bound.arguments.update(narrow)
                try:
                    output = original(*bound.args, **bound.kwargs)
                finally:
                    frame.rows = layout
                return merge_rows(output, hidden, context, index(kept, hidden.device))

            return forward

        return make

    def finish(self) -> None:
        self.index.clear()


def _rebatch(batched: tuple[str, ...], arguments: dict[str, Any], batch: int, kept: torch.Tensor) -> dict[str, Any] | None:
    """The block's arguments for the rows `kept` only (`batched`: the block's arguments with one row per batch row),
    or None when some input cannot be re-indexed safely."""
    narrow = dict(arguments)
    for name in batched:
        value = arguments.get(name)
        if not isinstance(value, torch.Tensor) or value.ndim == 0 or value.shape[0] == 1:
            continue
        if value.shape[0] != batch:
            return None
        narrow[name] = value.index_select(0, kept if kept.device == value.device else kept.to(value.device))
    for name in DICT_ARGUMENTS:
        extra = arguments.get(name)
        if isinstance(extra, dict) and any(isinstance(v, (torch.Tensor, list, tuple)) for v in extra.values()):
            return None
    return narrow


def skipped_output(module: torch.nn.Module, hidden: torch.Tensor, context: torch.Tensor | None, two_streams: bool) -> Any:
    """What a block returns when every row skips it: its inputs (a last SD3 block, `context_pre_only`, returns no
    text stream)."""
    if not two_streams:
        return hidden
    return (None if getattr(module, "context_pre_only", False) else context), hidden


def merge_rows(output: Any, hidden: torch.Tensor, context: torch.Tensor | None, kept: torch.Tensor) -> Any:
    """The block's output for every row: the rows `kept` from `output` (the block ran on them only), the others
    their inputs (skipped)."""
    return _per_stream(output, hidden, context, lambda out, source: source.to(out.dtype).index_copy(0, kept, out))


def skip_rows(output: Any, hidden: torch.Tensor, context: torch.Tensor | None, rows: torch.Tensor) -> Any:
    """A block's output with the rows `rows` (an index tensor) replaced by the block's inputs (the block skipped
    for them)."""
    return _per_stream(output, hidden, context, lambda out, source: out.index_copy(0, rows, source.index_select(0, rows).to(out.dtype)))


def _per_stream(output: Any, hidden: torch.Tensor, context: torch.Tensor | None, put) -> Any:
    """`put(out, source)` on each stream of a block's output: `hidden_states`, or `(encoder_hidden_states,
    hidden_states)` (a missing text stream stays None)."""
    if isinstance(output, torch.Tensor):
        return put(output, hidden)
    if isinstance(output, tuple) and len(output) == 2:
        encoder_out, hidden_out = output
        if encoder_out is not None and context is not None:
            encoder_out = put(encoder_out, context)
        return encoder_out, put(hidden_out, hidden)
    raise ConfigError(f"SkipLayer: unexpected transformer-block output {type(output).__name__}; cannot skip it per row")
