"""What the cache controls (TGATE, DiTFastAttn) share: bounded per-call caches keyed by branch, attention FLOPs
counted per layer and step, and the report published on the handle after each call.

Caches live in a control's `Bound`, which exists for one pipeline call only: nothing cached survives into the
next call. A `BranchCache` holds at most one value per key, a key being one kind of row of a denoiser call
(`(pass, branch, tag)`: uncond, cond, or a perturbed copy of cond rows, and which denoiser call of the step it
came from when a step makes several, such as Flux's separate cond / uncond calls or SD3's skip-layer pass). So
every technique holds at most one tensor per layer and branch.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..kernels.spec import Window
from .common import RowIndex

if TYPE_CHECKING:
    from ..denoiser_call import DenoiserCall, RowLayout
    from ..families.base import Geometry, LayerInfo, ModelAdapter

Key = tuple[Any, str, Any]  # (pass, branch, tag)
Value = Any  # a tensor or a tuple of tensors (or None entries) whose first dimension is the batch


# -- rows --------------------------------------------------------------------------------------------------------
def take_rows(value: Value, positions: Sequence[int], index: RowIndex | None = None) -> Value:
    """The rows `positions` of a tensor, or of every tensor of a tuple (None entries stay None). The index tensors
    come from `index` (cached per device: no host-to-device copy per call once made)."""
    index = index if index is not None else RowIndex()
    if isinstance(value, torch.Tensor):
        if list(positions) == list(range(value.shape[0])):
            return value
        return value.index_select(0, index(positions, value.device))
    if isinstance(value, tuple):
        return tuple(None if v is None else take_rows(v, positions, index) for v in value)
    raise TypeError(f"attnctl: cannot cache a layer result of type {type(value).__name__}")


def cat_rows(values: list[Value]) -> Value:
    first = values[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(values, dim=0)
    return tuple(None if first[i] is None else torch.cat([v[i] for v in values], dim=0) for i in range(len(first)))


class PassCounter:
    """Which denoiser call of its step a frame is: (0 for the first, 1, ... for Flux true CFG's uncond call or SD3's
    skip-layer pass; the tag of an extra forward a guidance control makes, such as SAG's, or None)."""

    def __init__(self) -> None:
        self._step = -1
        self._numbers: list[int] = []

    def __call__(self, frame: DenoiserCall) -> tuple[int, Any]:
        if frame.step.index != self._step:
            self._step, self._numbers = frame.step.index, []
        if frame.number not in self._numbers:
            self._numbers.append(frame.number)
        return self._numbers.index(frame.number), getattr(frame, "extra_pass", None)


def row_keys(layout: RowLayout, pass_index: Any) -> list[Key]:
    return [(pass_index, row.branch, row.tag) for row in layout.rows]


class BranchCache:
    """At most one value per key; a key's entry holds which prompts its rows are and where they lie in the batch it
    was stored from. The stored batch is kept whole (no copy per key): a load that asks for its rows in their
    stored order gets it back as it is, any other order one `index_select`."""

    def __init__(self, index: RowIndex | None = None) -> None:
        self._values: dict[Any, tuple[tuple[int, ...], Value, tuple[int, ...]]] = {}
        self.index = index if index is not None else RowIndex()  # the owner clears it at the end of the call

    def __len__(self) -> int:
        return len(self._values)

    def clear(self) -> None:
        self._values.clear()

    def store(self, layout: RowLayout, value: Value, keys: list[Any]) -> None:
        """Store the rows of `value` under their keys (one entry per key, replacing what was there)."""
        groups: dict[Any, list[int]] = {}
        for i, key in enumerate(keys):
            groups.setdefault(key, []).append(i)
        for key, index in groups.items():
            self._values[key] = (tuple(layout.rows[i].prompt for i in index), value, tuple(index))

    def store_by_prompt(self, key: Any, prompts: tuple[int, ...], value: Value) -> None:
        self._values[key] = (prompts, value, tuple(range(len(prompts))))

    def load(self, layout: RowLayout, keys: list[Any]) -> Value | None:
        """The value for every row of `layout` (row i from key `keys[i]`, matched by prompt), or None on any miss."""
        sources: list[tuple[Value, list[int]]] = []  # (stored batch, positions in it), one per batch, in row order
        for i, key in enumerate(keys):
            entry = self._values.get(key)
            if entry is None:
                return None
            prompts, value, rows = entry
            try:
                position = rows[prompts.index(layout.rows[i].prompt)]
            except ValueError:
                return None
            if not sources or sources[-1][0] is not value:
                sources.append((value, []))
            sources[-1][1].append(position)
        parts = [take_rows(value, positions, self.index) for value, positions in sources]
        return parts[0] if len(parts) == 1 else cat_rows(parts)


# -- FLOPs -------------------------------------------------------------------------------------------------------
def inner_dim(module: torch.nn.Module) -> int:
    """Heads x head size of the attention's queries."""
    value = getattr(module, "inner_dim", None)
    if isinstance(value, int):
        return value
    return int(module.to_q.out_features)


def key_len(geometry: Geometry) -> int:
    kind = geometry.layer.kind
    if kind == "cross":
        return geometry.text_len
    return geometry.query_len


def attention_flops(rows: int, geometry: Geometry, width: int, pairs: int | None = None) -> float:
    """FLOPs of the attention op (`Q K^T` and `A V`, 2 per multiply-add): 4 x rows x query-key pairs x H*D."""
    if pairs is None:
        pairs = geometry.query_len * key_len(geometry)
    return 4.0 * rows * pairs * width


def _span(n: int, radius: int) -> int:
    """Sum over i < n of how many j < n satisfy |i - j| <= radius: a band of width 2r+1, less its two corners."""
    if radius >= n - 1:
        return n * n
    return n * (2 * radius + 1) - radius * (radius + 1)


@functools.lru_cache(maxsize=256)
def window_pairs(window: Window) -> int:
    """Query-key pairs a window lets through (what a block-sparse kernel computes), text rows and columns included."""
    h, w = window.grid_hw
    n = window.n_img
    if window.band is not None:
        image = _span(n, window.band)
    else:
        rf, rh, rw = window.reach
        image = _span(window.frames, rf) * _span(h, rh) * _span(w, rw)
    t = window.text_len
    return image + 2 * n * t + t * t


# -- the report --------------------------------------------------------------------------------------------------
@dataclass
class Entry:
    """One layer at one step: what ran, its attention FLOPs, those of full attention on the pipeline's rows, hits."""

    step: int
    layer: str
    ran: list[str] = field(default_factory=list)
    flops: float = 0.0
    full_flops: float = 0.0
    hits: int = 0

    def add(self, ran: str, flops: float, full: float, hit: bool = False) -> None:
        if ran not in self.ran:
            self.ran.append(ran)
        self.flops += flops
        self.full_flops += full
        self.hits += int(hit)


@dataclass
class CacheReport:
    """What a cache control did in the last pipeline call (`handle.outputs[control.key]`: "tgate" / "fastattn" by default).

    `entries[(step, layer)]` covers every attention layer of the model (layers the control does not act on run
    `"full"`). FLOPs count the attention op only (`Q K^T` and `A V`); window attention counts the query-key pairs
    the window lets through, which is what a block-sparse kernel computes (the sdpa backend computes a dense masked
    op instead). The baseline is full attention on the rows the pipeline itself would run. With two cache controls
    on disjoint layers, each report counts its own savings: the other's layers count as computed there.
    """

    method: str
    steps: int = 0
    entries: dict[tuple[int, str], Entry] = field(default_factory=dict)
    plan: Any = None  # FastAttnPlan, for DiTFastAttn
    order: tuple[str, ...] = ()  # layer names in model order

    def record(self, step: int, layer: str, ran: str, flops: float, full: float, hit: bool = False) -> Entry:
        entry = self.entries.get((step, layer))
        if entry is None:
            entry = self.entries[(step, layer)] = Entry(step, layer)
        entry.add(ran, flops, full, hit)
        return entry

    def _select(self, layers: Iterable[str] | None) -> list[Entry]:
        chosen = None if layers is None else set(layers)
        return [e for e in self.entries.values() if chosen is None or e.layer in chosen]

    def flops(self, layers: Iterable[str] | None = None) -> float:
        return sum(e.flops for e in self._select(layers))

    def full_flops(self, layers: Iterable[str] | None = None) -> float:
        return sum(e.full_flops for e in self._select(layers))

    def flops_ratio(self, layers: Iterable[str] | None = None) -> float:
        """Attention FLOPs computed / those of full attention (1.0 when nothing was saved)."""
        full = self.full_flops(layers)
        return self.flops(layers) / full if full else 1.0

    @property
    def hits(self) -> int:
        return sum(e.hits for e in self.entries.values())

    def counts(self) -> dict[str, int]:
        """How many (layer, step) entries ran each method, in first-seen order."""
        out: dict[str, int] = {}
        for entry in self.entries.values():
            label = "+".join(entry.ran)
            out[label] = out.get(label, 0) + 1
        return out

    def layers(self) -> tuple[str, ...]:
        """The layers with entries, in model order."""
        seen = {entry.layer for entry in self.entries.values()}
        known = [name for name in self.order if name in seen]
        return tuple(known + sorted(seen - set(known)))

    def table(self) -> str:
        """One line per layer: what ran at each step (the first letters of the method), FLOPs ratio, hits."""
        steps = sorted({step for step, _ in self.entries})
        lines = [f"{self.method}: attention FLOPs {self.flops_ratio():.3f} of full, {self.hits} cache hit(s); {self.legend()}"]
        for layer in self.layers():
            marks = []
            for step in steps:
                entry = self.entries.get((step, layer))
                marks.append(_abbreviation(entry.ran) if entry else ".")
            lines.append(f"  {layer:<60} {' '.join(marks)}  {self.flops_ratio([layer]):.2f}")
        return "\n".join(lines)

    def legend(self) -> str:
        names = []
        for entry in self.entries.values():
            for ran in entry.ran:
                if ran not in names:
                    names.append(ran)
        return ", ".join(f"{_ABBREVIATIONS.get(n, n[:2])}={n}" for n in names)

    def summary(self) -> str:
        counts = ", ".join(f"{name} x{n}" for name, n in self.counts().items())
        return (f"{self.method}: {len(self.layers())} layers x {self.steps} steps; attention FLOPs "
                f"{self.flops_ratio():.3f} of full; {self.hits} cache hit(s); {counts}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "steps": self.steps,
            "flops_ratio": self.flops_ratio(),
            "hits": self.hits,
            "entries": [dataclasses.asdict(e) for e in self.entries.values()],
            "plan": self.plan.to_dict() if self.plan is not None else None,
        }


_ABBREVIATIONS = {
    "full": "F", "cfg_share": "C", "window_residual": "W", "window_residual+cfg_share": "WC", "step_share": "S",
    "cached": "K", "store": "St", "reuse": "R", "miss": "M", "uncontrolled": "-",
}


def _abbreviation(ran: list[str]) -> str:
    return "/".join(_ABBREVIATIONS.get(r, r[:2]) for r in ran)


class Accountant:
    """Counts attention FLOPs for every layer of the model in each denoiser call of a pipeline call.

    Layers a control acts on are recorded by the control; the others are recorded as `"uncontrolled"` the first
    time the control sees a new denoiser call (frame), with `rows` computed and `baseline` rows in the stock call.
    """

    def __init__(self, adapter: ModelAdapter, controlled: tuple[LayerInfo, ...], report: CacheReport):
        self.adapter = adapter
        self.report = report
        report.order = tuple(layer.name for layer in adapter.layers)
        self.controlled = frozenset(layer.index for layer in controlled)
        self.widths = {layer.name: inner_dim(adapter.modules[layer.name]) for layer in adapter.layers}
        self._frame: DenoiserCall | None = None

    def width(self, layer: LayerInfo) -> int:
        return self.widths[layer.name]

    def full(self, layer: LayerInfo, frame: DenoiserCall, rows: int) -> float:
        return attention_flops(rows, frame.geometry(layer), self.widths[layer.name])

    def see(self, frame: DenoiserCall, baseline_rows: int) -> None:
        """Record the uncontrolled layers of a denoiser call once."""
        if frame is self._frame:
            return
        self._frame = frame
        rows = len(frame.rows)
        for layer in self.adapter.layers:
            if layer.index not in self.controlled:
                self.report.record(
                    frame.step.index, layer.name, "uncontrolled", self.full(layer, frame, rows), self.full(layer, frame, baseline_rows)
                )
