"""Fast self-attention by token reduction: `ToMe` and `AgentAttention` (AgentSD).

- `ToMe`: Bolya and Hoffman 2023, "Token Merging for Fast Stable Diffusion" (arXiv:2303.17604).
- `AgentAttention`: Han et al. 2024, "Agent Attention: On the Integration of Softmax and Linear Attention"
  (ECCV 2024, arXiv:2312.08874), applied training-free to Stable Diffusion as the authors' AgentSD.

Both are one `LayerHook` in the exclusive `"tokens"` slot of a layer: `tokens_in` merges the image tokens
before the projections (the math is in `merging.py`), `attend` runs the attention op on the merged sequence
(AgentAttention: through agent tokens) and maps other controls' per-key edits onto the merged keys, and
`result` unmerges the layer's output after the output projection. Every layer call is recorded in a
`TokenReductionReport` published as `handle.outputs[control.key]` (`"tome"` / `"agent_attention"` by default;
two controls need two keys).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ...control import BindContext, Bound, Control
from ...denoiser_call import DenoiserCall
from ...errors import CallLayoutError, ConfigError, UnsupportedError
from ...families.base import LayerInfo, ModelAdapter
from ...kernels.semantics import spec_merged
from ...kernels.spec import AttentionSpec
from ...processors.chain import row_source
from ...processors.edit import AttentionCall, Edit, LayerHook
from ...selection import LayerSpec, describe_layers, validate_layers
from ...steps import StepInfo, StepWindow, validate_steps
from ...validation import integer, number, refuse_unused, set_field
from ..common import RowIndex, output_key, publish
from .merging import MergePlan, agent_attention, derived_seed, match, plan_from_matching, video_cell_destinations

if TYPE_CHECKING:
    from ...families.base import Geometry

# -- the report -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReductionRecord:
    """One attention call of one layer: how many tokens went in, how many attention saw, what it cost.

    FLOPs count the two matrix products of attention (`4 * B * H * Nq * Nk * D`; agent attention:
    `4 * B * H * D * (Na * Nk + Nq * Na)`); `full_flops` is the same layer's full attention, `matching_flops`
    the cosine similarity of the matching (`2 * B * Ns * Nd * C`), an overhead outside attention. `extra_pass`: the
    tag of attnctl's own extra forward the call belongs to (`DenoiserCall.extra_pass`: a latent optimiser's loss pass,
    SAG's degraded pass), None for the pipeline's own denoiser calls.
    """

    step: int
    layer: str
    rows: int
    tokens: int  # image tokens entering the layer
    kept: int  # image tokens attention ran on
    agents: int  # agent tokens (0: softmax attention on the kept tokens)
    flops: int
    full_flops: int
    matching_flops: int
    extra_pass: str | None = None

    @property
    def merged(self) -> int:
        return self.tokens - self.kept


class TokenReductionReport:
    """What token reduction did during the last pipeline call, layer by layer and step by step.

    `records` (and every summary) hold the pipeline's own denoiser calls; the calls of attnctl's extra forwards (a
    latent optimiser's loss passes, which stop after its map layers; SAG's degraded pass; `PAG(separate=True)`) are
    kept apart in `extra_records`, so that they do not change what the summaries say about the pipeline's calls."""

    def __init__(self, method: str):
        self.method = method
        self.records: list[ReductionRecord] = []
        self.extra_records: list[ReductionRecord] = []

    def add(self, record: ReductionRecord) -> None:
        (self.records if record.extra_pass is None else self.extra_records).append(record)

    def _select(self, layers: Iterable[str] | None) -> list[ReductionRecord]:
        chosen = None if layers is None else set(layers)
        return [r for r in self.records if chosen is None or r.layer in chosen]

    def flops(self, layers: Iterable[str] | None = None) -> int:
        """Attention FLOPs computed (of `layers`; None: every layer), as `CacheReport.flops`."""
        return sum(r.flops for r in self._select(layers))

    def full_flops(self, layers: Iterable[str] | None = None) -> int:
        """FLOPs of full attention at the same layer calls."""
        return sum(r.full_flops for r in self._select(layers))

    def flops_ratio(self, layers: Iterable[str] | None = None) -> float:
        """Attention FLOPs computed / FLOPs of full attention at the same layer calls (1.0: nothing saved); a method,
        as `CacheReport.flops_ratio`."""
        full = self.full_flops(layers)
        return self.flops(layers) / full if full else 1.0

    def merged(self) -> dict[tuple[str, int], int]:
        """Tokens merged away per (layer, step), per batch row."""
        out: dict[tuple[str, int], int] = {}
        for r in self.records:
            out[(r.layer, r.step)] = r.merged
        return out

    def per_layer(self) -> dict[str, dict[str, float]]:
        """Per layer: calls, mean tokens merged per call, attention FLOPs and the ratio to full attention."""
        table: dict[str, dict[str, float]] = {}
        for r in self.records:
            entry = table.setdefault(r.layer, {"calls": 0, "merged": 0, "flops": 0, "full_flops": 0})
            entry["calls"] += 1
            entry["merged"] += r.merged
            entry["flops"] += r.flops
            entry["full_flops"] += r.full_flops
        for entry in table.values():
            entry["merged"] /= entry["calls"]
            entry["flops_ratio"] = entry["flops"] / entry["full_flops"] if entry["full_flops"] else 1.0
        return table

    def per_step(self) -> dict[int, dict[str, float]]:
        """Per step: tokens merged (summed over layers, per row), attention FLOPs and the ratio to full."""
        table: dict[int, dict[str, float]] = {}
        for r in self.records:
            entry = table.setdefault(r.step, {"merged": 0, "flops": 0, "full_flops": 0})
            entry["merged"] += r.merged
            entry["flops"] += r.flops
            entry["full_flops"] += r.full_flops
        for entry in table.values():
            entry["flops_ratio"] = entry["flops"] / entry["full_flops"] if entry["full_flops"] else 1.0
        return table

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "flops": self.flops(),
            "full_flops": self.full_flops(),
            "flops_ratio": self.flops_ratio(),
            "records": [dataclasses.asdict(r) for r in self.records],
            "extra_records": [dataclasses.asdict(r) for r in self.extra_records],
        }

    def table(self) -> str:
        lines = [f"{self.method}: attention FLOPs {self.flops_ratio():.3f} of full attention over {len(self.records)} layer calls"
                 + (f" (and {len(self.extra_records)} in attnctl's extra forwards)" if self.extra_records else "")]
        lines.append(f"  {'step':>4}  {'layer':<60} {'tokens':>7} {'merged':>7} {'agents':>6} {'flops/full':>10}")
        for r in self.records:
            ratio = r.flops / r.full_flops if r.full_flops else 1.0
            lines.append(f"  {r.step:>4}  {r.layer:<60} {r.tokens:>7} {r.merged:>7} {r.agents:>6} {ratio:>10.3f}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<TokenReductionReport {self.method}: {len(self.records)} layer calls, FLOPs ratio {self.flops_ratio():.3f}>"


# -- the controls ---------------------------------------------------------------------------------------------
def _stride(value: Any, name: str) -> int:
    return integer(value, name, minimum=2)


def _merge_ratio(value: Any, name: str, strides: tuple[int, ...]) -> float:
    """A merge ratio in [0, 1 - 1/s^2] for every stride s it is used with (at most every source merges)."""
    largest = min(1.0 - 1.0 / (s * s) for s in strides)
    return number(value, name, minimum=0.0, maximum=largest)


def _validate_common(control: Control, owner: str) -> None:
    set_field(control, "layers", validate_layers(control.layers, name=f"{owner}.layers"))
    set_field(control, "steps", validate_steps(control.steps, name=f"{owner}.steps"))
    set_field(control, "seed", integer(control.seed, f"{owner}.seed", minimum=0))
    if not isinstance(control.random, bool):
        raise ConfigError(f"{owner}.random must be True (a random destination per cell) or False (its top-left token), got {control.random!r}")
    if not control.random:
        refuse_unused(control, "seed", "with random=False (it seeds the random destination draws; random=False takes each cell's top-left token)")
    set_field(control, "key", output_key(control.key, owner))


class _Reducer:
    """What ToMe and AgentAttention share as controls: the report's key and their effect on a layer."""

    def compile_refusal(self, adapter: ModelAdapter) -> str | None:
        return "its token-merge plan creates objects dynamo cannot build inside a graph (an opaque object)"

    @property
    def output_key(self) -> str:
        """Where the `TokenReductionReport` goes in `handle.outputs`."""
        return self.key

    def layer_effects(self, adapter: ModelAdapter, layer: LayerInfo) -> tuple[str, ...]:
        """"tokens": the image tokens entering attention are merged (or pass through agent tokens)."""
        return ("tokens",)


def _refuse_family(owner: str, adapter: ModelAdapter) -> None:
    if adapter.rotary:
        tokens = "video token (3-D RoPE over frame, row and column)" if adapter.grid_dims == 3 else "image token"
        raise UnsupportedError(
            f"attnctl: {owner} does not support the {adapter.family} family: its attention applies rotary position "
            f"embeddings per {tokens} to the projected queries and keys, so a merged token (a mean of tokens at "
            "different positions) has no position to rotate by; it supports families without rotary image positions "
            "(SD / SDXL, SD3, PixArt)"
        )


def _highest_resolution(adapter: ModelAdapter, kinds: tuple[str, ...]) -> tuple[str, ...]:
    """Names of the layers of `kinds` at the highest-resolution level (lowest `LayerInfo.level`) that has one."""
    candidates = [layer for layer in adapter.layers if layer.kind in kinds]
    if not candidates:
        return ()
    level = min(layer.level for layer in candidates)
    return tuple(layer.name for layer in candidates if layer.level == level)


def _check_blocks(owner: str, control: Control, adapter: ModelAdapter) -> None:
    """The matching reads the input of the transformer block that holds each layer (`block_of`): it must be one of
    the family's transformer blocks (`ModelAdapter.transformer_blocks`)."""
    blocks = adapter.transformer_blocks()
    for layer in control.select(adapter):
        if block_of(layer) not in blocks:
            raise UnsupportedError(
                f"attnctl: {owner} matches the tokens of {layer.name} on the input of the transformer block that holds it, "
                f"and {block_of(layer)} is not one of the {adapter.family} family's transformer blocks "
                f"({', '.join(adapter.block_inputs)})"
            )


def _check_layers(owner: str, control: Control, adapter: ModelAdapter, kinds: tuple[str, ...], why: str) -> None:
    if not _highest_resolution(adapter, kinds):
        raise UnsupportedError(
            f"attnctl: {owner} acts on {' or '.join(kinds)} attention layers and this {adapter.family} model has none; {why}"
        )
    bad = tuple(layer for layer in control.select(adapter) if layer.kind not in kinds)
    if bad:
        raise ConfigError(
            f"{owner}.layers selects {describe_layers(bad)}; it acts on {' or '.join(kinds)} attention layers only ({why})"
        )


@dataclass(frozen=True)
class ToMe(_Reducer, Control, type_name="tome"):
    """Token merging in self-attention (Bolya and Hoffman 2023, "Token Merging for Fast Stable Diffusion").

    In each selected layer the image grid is cut into `stride x stride` cells; one token per cell, drawn from
    a private generator seeded from (`seed`, layer name, step index), is a destination, every other token a
    source. `ratio` of the image tokens (sources with the highest cosine similarity to their best destination,
    measured, as tomesd does, on the hidden states entering the transformer block that holds the layer) are
    merged into that destination by mean; attention runs on the merged tokens and every merged token receives
    its group's output (unmerged tokens their own).

    - `ratio`: fraction of the image tokens merged away, `0 <= ratio <= 1 - 1/stride**2`; 0 is stock.
    - `stride`: cell size (>= 2) of the destination grid.
    - `layers`: default: every self-attention layer at the highest-resolution level that has one (SD 1.x/2.x:
      the first UNet level; SDXL: the second, its first has no attention; PixArt: every block). On SD3, joint
      layers may be selected too and are the default: only their image tokens are merged, never the text.
    - `steps`, `seed`: step window; seed of the destination draws (never the pipeline's generator).
    - `random`: False takes the top-left token of each cell as its destination (tomesd's `use_rand=False`; no
      draws, the same cells at every layer and step).
    - `key`: where the `TokenReductionReport` goes in `handle.outputs` (two ToMe controls need two keys).
    """

    #: images and video: on a (frames, height, width) grid the cells are `1 x stride x stride` within each frame (a
    #: merge never mixes frames); the video family attnctl supports (Wan) is refused for its rotary positions
    grid_dims: ClassVar[tuple[int, ...]] = (2, 3)

    ratio: float = 0.5
    stride: int = 2
    layers: LayerSpec = None
    steps: StepWindow = (0.0, 1.0)
    seed: int = 0
    key: str = "tome"
    random: bool = True  # last: added after the others (positional arguments keep their meaning)


    def __post_init__(self) -> None:
        set_field(self, "stride", _stride(self.stride, "ToMe.stride"))
        set_field(self, "ratio", _merge_ratio(self.ratio, "ToMe.ratio", (self.stride,)))
        _validate_common(self, "ToMe")

    def kinds(self, adapter: ModelAdapter) -> tuple[str, ...]:
        return ("self", "joint") if adapter.text_attention == "joint" else ("self",)

    def default_layers(self, adapter: ModelAdapter) -> tuple[str, ...]:
        return _highest_resolution(adapter, self.kinds(adapter))

    def validate_for(self, adapter: ModelAdapter) -> None:
        _refuse_family("ToMe", adapter)
        _check_layers("ToMe", self, adapter, self.kinds(adapter), "cross-attention keys are text, not image tokens")
        _check_blocks("ToMe", self, adapter)

    def phase(self, step: StepInfo) -> _Phase:
        return _Phase(self.stride, self.ratio, None)

    def bind(self, context: BindContext) -> Bound:
        return _ReductionBound(self, context)

    def layer_effects(self, adapter: ModelAdapter, layer: LayerInfo) -> tuple[str, ...]:
        """"tokens" (none at ratio 0: stock)."""
        return ("tokens",) if self.ratio > 0 else ()


@dataclass(frozen=True)
class AgentAttention(_Reducer, Control, type_name="agent-attention"):
    """Training-free agent attention in self-attention: AgentSD (Han et al. 2024, "Agent Attention").

    The tokens are matched as in `ToMe` (one destination per cell, cosine similarity). `ratio` of them are
    merged (as ToMe) and Q, K, V are those of the merged tokens; a stronger merge of the same matching,
    `agent_ratio` of the tokens, gives the agent tokens A (projected by the layer's own query projection).
    The agents attend to all keys and values, then the queries attend to the agents:
    `out = softmax(Q Aᵀ s^scale_power) softmax(A Kᵀ s) V + shortcut * V`, and the result is unmerged.
    As in the authors' code, a layer call uses agents only when they are fewer than half the merged tokens;
    otherwise it is plain ToMe (with the default late phase, 0.5 agents vs 0.6 kept tokens: ToMe).

    The authors' schedule is the default: steps with `i/n < switch` use `stride` and `agent_ratio`, later
    steps `late_stride` and `late_agent_ratio`. Agent ratios above what the cells allow are capped (at most
    every source merges, leaving one agent per cell). `scale_power` (0.3) and `shortcut` (0.075) are the
    authors' `k_scale2` and `k_shortcut`; `scale_power=1, shortcut=0` is the plain two-softmax form.
    Acts on self-attention layers only (UNet, PixArt, SD3.5's image-only `attn2`); layers, seed, random and key
    (default `"agent_attention"`) as `ToMe`; the matching's metric as `ToMe` (and agentsd): the block's input.
    """

    #: images and video: on a (frames, height, width) grid the cells are `1 x stride x stride` within each frame (a
    #: merge never mixes frames); the video family attnctl supports (Wan) is refused for its rotary positions
    grid_dims: ClassVar[tuple[int, ...]] = (2, 3)

    ratio: float = 0.4
    agent_ratio: float = 0.95
    stride: int = 4
    late_stride: int = 2
    late_agent_ratio: float = 0.5
    switch: float = 0.4
    layers: LayerSpec = None
    steps: StepWindow = (0.0, 1.0)
    seed: int = 0
    scale_power: float = 0.3
    shortcut: float = 0.075
    key: str = "agent_attention"
    random: bool = True  # last: added after the others (positional arguments keep their meaning)


    def __post_init__(self) -> None:
        set_field(self, "stride", _stride(self.stride, "AgentAttention.stride"))
        set_field(self, "late_stride", _stride(self.late_stride, "AgentAttention.late_stride"))
        set_field(self, "ratio", _merge_ratio(self.ratio, "AgentAttention.ratio", (self.stride, self.late_stride)))
        for name in ("agent_ratio", "late_agent_ratio"):
            value = number(getattr(self, name), f"AgentAttention.{name}", minimum=0.0, maximum=1.0)
            if value == 1.0:
                raise ConfigError(f"AgentAttention.{name} must be < 1 (at least one agent per cell remains), got 1.0")
            set_field(self, name, value)
        set_field(self, "switch", number(self.switch, "AgentAttention.switch", minimum=0.0, maximum=1.0))
        set_field(self, "scale_power", number(self.scale_power, "AgentAttention.scale_power", minimum=0.0))
        set_field(self, "shortcut", number(self.shortcut, "AgentAttention.shortcut"))
        _validate_common(self, "AgentAttention")

    def default_layers(self, adapter: ModelAdapter) -> tuple[str, ...]:
        return _highest_resolution(adapter, ("self",))

    def validate_for(self, adapter: ModelAdapter) -> None:
        _refuse_family("AgentAttention", adapter)
        _check_layers(
            "AgentAttention", self, adapter, ("self",),
            "agents would have to stand for text tokens too in joint attention; use ToMe there",
        )
        _check_blocks("AgentAttention", self, adapter)

    def phase(self, step: StepInfo) -> _Phase:
        if step.fraction < self.switch:
            return _Phase(self.stride, self.ratio, self.agent_ratio)
        return _Phase(self.late_stride, self.ratio, self.late_agent_ratio)

    def bind(self, context: BindContext) -> Bound:
        return _ReductionBound(self, context)


@dataclass(frozen=True)
class _Phase:
    stride: int
    ratio: float
    agent_ratio: float | None  # None: ToMe

    @property
    def identity(self) -> bool:
        return self.ratio == 0.0 and self.agent_ratio is None


# -- bound control and hook -----------------------------------------------------------------------------------
class _ReductionBound(Bound):
    def __init__(self, control: ToMe | AgentAttention, context: BindContext):
        super().__init__(control, context.layers, control.steps)
        owner = type(control).__name__
        used = (StepInfo(i, context.steps) for i in range(context.steps))
        strides = {control.phase(step).stride for step in used if step.inside(control.steps) and not control.phase(step).identity}
        for stride in sorted(strides, reverse=True):
            for layer in context.layers:
                h, w = context.canvas.grid_at(layer.level)
                if min(h, w) < stride:  # no stride x stride cell fits: no destination token to merge into
                    name = "stride" if stride == control.stride else "late_stride"
                    raise ConfigError(
                        f"attnctl: {owner}.{name}={stride} is larger than the {h}x{w} token grid of {layer.name} at this "
                        f"call's size: a {stride}x{stride} cell must fit the grid; give {name} <= {min(h, w)} or select "
                        "layers with larger grids"
                    )
        self.report = TokenReductionReport(owner)
        publish(context, control.key, self.report)
        self.index = RowIndex()
        # (dst, src) per layer, step, grid and device: drawn from a seed, so constant for the handle (kept across calls
        # of one canvas; a call at another size starts them afresh, so a handle used at many sizes keeps one size's)
        kept = context.handle_cache.get("partitions")
        if kept is None or kept[0] != context.canvas:
            kept = context.handle_cache["partitions"] = (context.canvas, {})
        self._partitions: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = kept[1]
        # the matching's metric: the hidden states entering the transformer block of each layer (as tomesd), held
        # by reference while that block runs
        self.block_inputs: dict[str, torch.Tensor] = {}
        self.block_names = {layer.index: block_of(layer) for layer in context.layers}
        adapter = context.adapter
        blocks = adapter.transformer_blocks()
        for block in sorted(set(self.block_names.values())):
            module = blocks[block]  # present: `_check_blocks` at apply
            hidden = adapter.block_inputs[type(module).__name__][0]  # the block's hidden-states parameter (its first)
            # beneath other controls' block wraps (SkipLayer runs the block on fewer rows): the rows the block gets
            context.wrap_method(module, "forward", self._remember_input(block, hidden), innermost=True)

    def _remember_input(self, block: str, hidden: str) -> Any:
        def make(original: Any) -> Any:
            def forward(*args: Any, **kwargs: Any) -> Any:
                self.block_inputs[block] = kwargs[hidden] if hidden in kwargs else args[0]
                try:
                    return original(*args, **kwargs)
                finally:
                    self.block_inputs.pop(block, None)

            return forward

        return make

    def metric(self, call: AttentionCall, hidden: torch.Tensor) -> torch.Tensor:
        """The block input of `call`'s layer: (B, N, C) with the rows and image tokens of `hidden`."""
        block = self.block_names[call.layer.index]
        metric = self.block_inputs.get(block)
        if not isinstance(metric, torch.Tensor) or metric.ndim != 3 or metric.shape[:2] != hidden.shape[:2]:
            found = "nothing" if metric is None else tuple(metric.shape) if isinstance(metric, torch.Tensor) else type(metric).__name__
            raise CallLayoutError(
                f"attnctl: {type(self.control).__name__} matches the tokens of {call.layer.name} on the hidden states "
                f"entering its block {block} (as tomesd), expected (B, N, C) with B, N = {tuple(hidden.shape[:2])}; the "
                f"block received {found}"
            )
        return metric

    def edit(self, layer: LayerInfo, frame: DenoiserCall) -> Edit | None:
        phase = self.control.phase(frame.step)
        if phase.identity:
            return None
        return Edit(hooks=(_ReductionHook(self, phase),))

    def partition(self, layer: LayerInfo, step: StepInfo, grid_hw: tuple[int, int], stride: int, device: torch.device,
                  frames: int = 1):
        """(dst, src) of this layer at this step: the same for every batch row and every pass of the step (video:
        per-frame cells, `video_cell_destinations`)."""
        key = (layer.name, step.index, grid_hw, stride, str(device), frames)
        found = self._partitions.get(key)
        if found is None:
            generator = None
            if self.control.random:
                generator = torch.Generator().manual_seed(derived_seed(self.control.seed, layer.name, step.index))
            dst, src = video_cell_destinations(frames, grid_hw, stride, generator)
            found = self._partitions[key] = (dst.to(device), src.to(device))
        return found

    def finish(self) -> None:
        self.index.clear()


@dataclass
class _CallState:
    plan: MergePlan
    agents: torch.Tensor | None  # (B, Na, C) agent tokens before projection
    matching_flops: int


class _ReductionHook(LayerHook):
    """Merge before the projections, attend (with agents or not), unmerge after the output projection."""

    innermost: ClassVar[bool] = True

    def __init__(self, bound: _ReductionBound, phase: _Phase):
        self.bound = bound
        self.phase = phase
        self._calls: dict[int, _CallState] = {}

    def tokens_in(self, call: AttentionCall, hidden: torch.Tensor) -> torch.Tensor:
        geometry = call.geometry
        tokens = geometry.image_len
        if hidden.ndim != 3 or hidden.shape[1] != tokens:
            raise CallLayoutError(
                f"attnctl: {type(self.bound.control).__name__} at {call.layer.name} expected (B, {tokens}, C) image "
                f"tokens for the {geometry.image_hw[0]}x{geometry.image_hw[1]} grid, got {tuple(hidden.shape)}"
            )
        phase = self.phase
        dst, src = self.bound.partition(call.layer, call.step, geometry.image_hw, phase.stride, hidden.device, geometry.frames)
        target, rank = match(self.bound.metric(call, hidden), dst, src)
        plan = plan_from_matching(tokens, dst, src, target, rank, int(tokens * phase.ratio))
        agents = None
        if phase.agent_ratio is not None:
            agent_plan = plan_from_matching(tokens, dst, src, target, rank, int(tokens * phase.agent_ratio))
            if 2 * agent_plan.kept < plan.kept:  # the authors' condition for agent attention
                agents = agent_plan.merge(hidden)
        matching = 2 * hidden.shape[0] * src.numel() * dst.numel() * hidden.shape[2]
        self._calls[id(call)] = _CallState(plan, agents, matching)
        return plan.merge(hidden)

    def attend(self, call, q, k, v, spec, compute):
        state = self._calls.get(id(call))
        if state is None:  # tokens_in did not run for this call: nothing was merged
            return compute(q, k, v, spec)
        source = row_source(call)
        if source is not None and q.shape[0] != state.plan.group.shape[0]:
            # an outer hook runs the op on some rows only (PAG on the rows it does not perturb): their plans
            index = self.bound.index(source, q.device)
            agents = None if state.agents is None else state.agents.index_select(0, index)
            state = _CallState(state.plan.rows(index), agents, state.matching_flops)
        batch, heads, nq, dim = q.shape
        nk = k.shape[2]
        merged = state.plan.merged
        full = 4 * batch * heads * (nq + merged) * (nk + merged) * dim
        if state.agents is not None:
            if spec.features():
                raise UnsupportedError(
                    f"attnctl: AgentAttention at {call.layer.name} replaces the attention op by two softmax attentions "
                    f"through agent tokens; it cannot carry out {', '.join(spec.features())} asked by another control "
                    "or the model on the same layer; give them disjoint layers or use ToMe there"
                )
            agents = call.module.processor.project_queries(call.module, state.agents)

            def attend(q_: torch.Tensor, k_: torch.Tensor, v_: torch.Tensor) -> torch.Tensor:
                return compute(q_, k_, v_, AttentionSpec())[0]  # default scale: agent_attention pre-scales

            control = self.bound.control
            out = agent_attention(
                q, k, v, agents, scale=spec.scale, scale_power=control.scale_power, shortcut=control.shortcut, attend=attend
            )
            flops = 4 * batch * heads * dim * agents.shape[2] * (nk + nq)
            result = (out, None)
        else:
            result = compute(q, k, v, _merged_spec(spec, state.plan, call.geometry, call.layer))
            flops = 4 * batch * heads * nq * nk * dim
        self.bound.report.add(
            ReductionRecord(
                step=call.step.index, layer=call.layer.name, rows=batch, tokens=state.plan.tokens, kept=state.plan.kept,
                agents=0 if state.agents is None else state.agents.shape[1], flops=flops, full_flops=full,
                matching_flops=state.matching_flops, extra_pass=call.frame.extra_pass,
            )
        )
        return result

    def result(self, call: AttentionCall, result: Any) -> Any:
        state = self._calls.pop(id(call), None)
        if state is None:
            return result
        if isinstance(result, tuple):  # joint layers: (image, text[, ...]); only the image tokens were merged
            return (state.plan.unmerge(result[0]), *result[1:])
        return state.plan.unmerge(result)


def block_of(layer: LayerInfo) -> str:
    """The module path of the transformer block that holds the attention layer (its parent)."""
    return layer.name.rsplit(".", 1)[0]


def _merged_spec(spec: AttentionSpec, plan: MergePlan, geometry: Geometry, layer: LayerInfo) -> AttentionSpec:
    """Other controls' edits, made for the full token sequence, mapped onto the merged one
    (`kernels.semantics.spec_merged`: the keys are the image tokens, then the text tokens of SD3 joint layers)."""
    return spec_merged(spec, plan.merge_keys, geometry.image_slice, geometry.image_len, plan.merged, layer.name)


__all__ = ["AgentAttention", "ReductionRecord", "ToMe", "TokenReductionReport"]
