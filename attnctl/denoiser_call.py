"""One denoiser call as controls and processors see it: its step, its canvas and its batch rows.

The rows say which are unconditional, conditional, or perturbed copies of the cond rows; perturbed copies
count as cond rows for every other control (Reweight, Regions apply to them too). A bound control changes
the rows of a denoiser call with a `RowPlan` (guidance by perturbation, CFG dropping, second passes).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from .errors import CallLayoutError
from .families.base import Canvas, Geometry, LayerInfo
from .kernels.spec import kept_tensors
from .steps import StepInfo

Branch = Literal["cond", "uncond"]

_HOST_DATA: dict[tuple[Any, ...], torch.Tensor] = {}


def host_tensor(values: tuple[Any, ...], dtype: torch.dtype, device: Any = None) -> torch.Tensor:
    """A read-only 1-D tensor of `values` on `device`, made once per process (row positions, row masks): the
    per-call path picks batch rows with it without a host-to-device copy (a stream sync on CUDA) each time."""
    device = torch.device("cpu") if device is None else torch.device(device)
    key = (values, dtype, device)
    found = _HOST_DATA.get(key)
    if found is None:
        if len(_HOST_DATA) >= 1024:
            _HOST_DATA.clear()
        with kept_tensors():
            found = _HOST_DATA[key] = torch.tensor(values, dtype=dtype, device=device)
    return found


def upload(host: torch.Tensor, device: Any) -> torch.Tensor:
    """Host data (built on the CPU once per call: weight grids, masks) on `device` without synchronising: on CUDA
    it is page-locked and copied asynchronously (a copy from pageable memory waits for the stream; the caching
    host allocator keeps the page-locked block until the copy has run). On the CPU it is `host` itself."""
    device = torch.device(device)
    if host.device == device or (device.type == "cpu" and host.device.type == "cpu"):
        return host
    if host.device.type != "cpu" or device.type == "cpu":  # made on a device already (torch.set_default_device)
        return host.to(device)
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


def input_device(inputs: dict[str, Any] | None) -> torch.device:
    """The device of the denoiser call's first floating-point tensor input (of a list of per-row tensors, Z-Image's,
    the first's); the CPU when it has none."""
    for value in (inputs or {}).values():
        if isinstance(value, (list, tuple)) and value:
            value = value[0]
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.device
    return torch.device("cpu")


@dataclass(frozen=True)
class Row:
    branch: Branch
    prompt: int  # index of the prompt row (after num_images_per_prompt expansion)
    tag: str | None = None  # perturbation tag of a perturbed copy of a cond row


@dataclass(frozen=True)
class RowLayout:
    rows: tuple[Row, ...]
    _masks: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    def __len__(self) -> int:
        return len(self.rows)

    def indices(self, branch: Branch | None = None, tag: str | None | Literal["any"] = "any") -> tuple[int, ...]:
        """Row indices with that branch (None: any) and tag ("any": any tag, None: untagged rows only); found
        once per layout (attention hooks ask at every layer)."""
        key = ("indices", branch, tag)
        found = self._masks.get(key)
        if found is None:
            found = self._masks[key] = tuple(
                i
                for i, row in enumerate(self.rows)
                if (branch is None or row.branch == branch) and (tag == "any" or row.tag == tag)
            )
        return found

    def mask(self, branch: Branch | None = None, tag: str | None | Literal["any"] = "any", device=None) -> torch.Tensor:
        """(B,) bool tensor of `indices(branch, tag)`, cached per device."""
        key = ("mask", branch, tag, str(device))
        if key not in self._masks:
            chosen = set(self.indices(branch, tag))
            self._masks[key] = host_tensor(tuple(i in chosen for i in range(len(self.rows))), torch.bool, device)
        return self._masks[key]

    @property
    def has_uncond(self) -> bool:
        return any(row.branch == "uncond" for row in self.rows)

    @property
    def tags(self) -> tuple[str, ...]:
        seen: list[str] = []
        for row in self.rows:
            if row.tag is not None and row.tag not in seen:
                seen.append(row.tag)
        return tuple(seen)

    def linked(self, source_prompt: Callable[[int], int | None]) -> tuple[int | None, ...]:
        """Cross-image links: for every row, the index of the row it reads from, or None.

        Row i reads from the row of the same branch and tag whose prompt row is `source_prompt(rows[i].prompt)`:
        an uncond row reads from an uncond row, a cond row from a cond row, a perturbed copy from the copy with
        the same tag. None where `source_prompt` gives None or the row itself, or where this call holds no such
        row (a pipeline that runs cond and uncond as separate calls still links inside each call).
        """
        where = {(row.branch, row.tag, row.prompt): i for i, row in enumerate(self.rows)}
        links: list[int | None] = []
        for i, row in enumerate(self.rows):
            source = source_prompt(row.prompt)
            found = None if source is None else where.get((row.branch, row.tag, source))
            links.append(None if found == i else found)
        return tuple(links)

    @staticmethod
    def batched_cfg(prompt_rows: int) -> RowLayout:
        return RowLayout(tuple(Row("uncond", p) for p in range(prompt_rows)) + tuple(Row("cond", p) for p in range(prompt_rows)))

    @staticmethod
    def single(branch: Branch, prompt_rows: int) -> RowLayout:
        return RowLayout(tuple(Row(branch, p) for p in range(prompt_rows)))

    def selected(self, branch: Branch, label: Branch | None = None) -> tuple[RowLayout, tuple[int, ...]]:
        """The untagged rows of `branch` (relabelled `label` when given) and their source indices."""
        index = self.indices(branch, None)
        return RowLayout(tuple(Row(label or self.rows[i].branch, self.rows[i].prompt) for i in index)), index

    def counterparts(self, index: tuple[int, ...], branch: Branch) -> tuple[int, ...]:
        """For each row of `index`, the untagged row of `branch` with the same prompt."""
        where = {self.rows[i].prompt: i for i in self.indices(branch, None)}
        missing = [self.rows[i].prompt for i in index if self.rows[i].prompt not in where]
        if missing:
            raise CallLayoutError(f"attnctl: this denoiser call has no {branch} row for prompt row(s) {missing}: {self.rows}")
        return tuple(where[self.rows[i].prompt] for i in index)

    def with_perturbed(self, tags: tuple[str, ...]) -> tuple[RowLayout, tuple[int, ...]]:
        """This layout plus one copy of the untagged cond rows per tag; also returns the source index of every row."""
        cond = self.indices("cond", None)
        rows = list(self.rows)
        source = list(range(len(self.rows)))
        for tag in tags:
            rows.extend(Row("cond", self.rows[i].prompt, tag) for i in cond)
            source.extend(cond)
        return RowLayout(tuple(rows)), tuple(source)


# guidance(cond_prediction, perturbed_prediction, frame) -> the term D_k added to every combined row
GuidanceTerm = Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor]


@dataclass(frozen=True)
class Perturbation:
    """Rows a guidance control adds: perturbed copies of the cond rows, and its guidance term.

    The wrapper adds `D = sum_k term_k(cond, perturbed_k)` to every row the pipeline combines (docs/architecture.md), so
    the pipeline's own CFG yields `uncond + s (cond - uncond) + D` for any scale s.
    """

    tag: str
    term: GuidanceTerm
    separate: bool = False  # run these rows as their own forward (saves memory) instead of batching them


@dataclass(frozen=True)
class SecondPass:
    """A guidance term that needs the pipeline rows' prediction first and may run further forwards (SAG).

    `term(first)` gets a `pipelines.denoiser.FirstPass` (the prediction of the pipeline's rows, their inputs,
    and `first.forward(inputs, rows, tag)` to run the denoiser again) and returns a term for the untagged cond rows
    (as a `Perturbation` term does), added to every combined row.
    """

    tag: str
    term: Callable[[object], torch.Tensor]


@dataclass(frozen=True)
class RowSelect:
    """Run only the untagged rows of `branch` (every batched input re-batched), labelled `label` for the controls,
    and give each row of the pipeline's layout the prediction of the selected row with the same prompt.

    TGATE (Zhang et al. 2024) after its gate step: one null-text row per prompt, `RowSelect("uncond", "cond")`:
    its prediction stands for the guided one, so it is returned for both CFG rows. Rows relabelled `label` take the
    conditioning residuals (`ModelAdapter.conditioning_inputs`: ControlNet, T2I-Adapter) of the `label` row with their
    prompt: the residuals of the prediction they stand for (ControlNet's guess mode gives the uncond rows zeros).
    """

    branch: Branch
    label: Branch | None = None


@dataclass(frozen=True)
class RowPlan:
    perturbations: tuple[Perturbation, ...] = ()
    second: tuple[SecondPass, ...] = ()
    select: RowSelect | None = None
    #: A separate uncond call (families that run CFG as separate calls) whose prediction is the one its step's cond
    #: call returned: its forward does not run (TGATE after its gate, where the two calls would compute the same).
    reuse_cond: bool = False


@dataclass
class DenoiserCall:
    """One denoiser call: its step, its rows (after row plans), its geometry."""

    step: StepInfo
    rows: RowLayout
    canvas: Canvas
    context: str | None = None
    inputs: dict[str, Any] | None = None
    number: int = 0  # denoiser calls before this one in the pipeline call
    # Tag of a control's own extra forward (SAG's degraded pass) made inside this denoiser call; None for
    # the forward that serves the pipeline's call (caches and captures usually skip extra passes).
    extra_pass: str | None = None
    # True when the forward runs compiled: every layer's edit is made before it (`Runtime.prefill_edits`) and the hooks
    # run inside a graph, so what a hook would decide in Python per call must be decided in `Bound.edit`.
    compiled: bool = False
    # The pipeline attribute of the denoiser expert running this call (Wan 2.2 A14B: "transformer" for the high-noise
    # steps, "transformer_2" for the low-noise ones); None with one denoiser.
    expert: str | None = None
    # A compiled forward's `canvas.shape_tensor` on the denoiser's device, made before it (`Runtime.prefill_edits`):
    # the layers in the graph read the canvas from its shape (`layer_canvas`).
    canvas_shape: torch.Tensor | None = None
    # The device the denoiser's layers run on in this call (`Runtime.layer_device`), where the controls make the tensors
    # the layers read; None in a frame made outside a pipeline call.
    device: torch.device | None = None

    def layers_device(self) -> torch.device:
        """`device`, or in a frame made outside a pipeline call the device of its inputs (`input_device`)."""
        return self.device if self.device is not None else input_device(self.inputs)

    def layer_canvas(self) -> Canvas:
        """The canvas as the attention layers read it: in a compiled graph, the one of `canvas_shape`, whose sizes
        are symbolic once they vary between calls, so that a new image size or prompt length runs the graph compiled
        for the previous one as the stock denoiser's does; elsewhere `canvas`."""
        if self.canvas_shape is not None and torch.compiler.is_compiling():
            return Canvas.from_shape(self.canvas_shape)
        return self.canvas

    def geometry(self, layer: LayerInfo) -> Geometry:
        canvas = self.layer_canvas()
        return Geometry(layer, canvas.grid_at(layer.level), canvas.text_len, canvas.frames, canvas.trailing_len)
