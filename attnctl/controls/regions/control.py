"""`Regions`: regional prompts, soft masks and subject isolation (docs/methods.md "Regions").

The base-ratio blend of per-region cross-attention is the "attention mode" of Regional Prompter (hako-mikan,
2023) and RPG's complementary regional diffusion (Yang et al., ICML 2024, "Mastering Text-to-Image Diffusion:
Recaptioning, Planning, and Generating with Multimodal LLMs"). The joint-attention rules for MMDiT models are
those of Chen et al. 2024, "Training-free Regional Prompting for Diffusion Transformers". Subject isolation is
the self-attention masking of Dahary et al., ECCV 2024, "Be Yourself: Bounded Attention for Multi-Subject T2I
Generation" (without its guidance). Soft masks and per-cell overlap normalisation are ours (docs/methods.md).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ...control import BindContext, Bound, Control, EncodedText, _plain
from ...denoiser_call import DenoiserCall, RowLayout
from ...errors import CallLayoutError, ConfigError
from ...families.base import Geometry, LayerInfo, ModelAdapter
from ...processors.edit import AttentionCall, Edit
from ...selection import LayerSpec, validate_layers
from ...steps import validate_steps
from ...validation import number, set_field
from ..common import RowIndex
from .attention import (
    CrossHook,
    HiddenHook,
    JointHook,
    JointSequence,
    RegionChunk,
    base_table,
    isolation_table,
    joint_table,
    region_chunks,
)
from .masks import GridLayout, grid_layout
from .region import Region


@dataclass(frozen=True)
class Regions(Control, type_name="regions"):
    """Each region of the canvas gets its own prompt; optionally, subjects are kept apart.

    - `regions`: `Region`s (or dicts with `prompt` and `box` or `mask`), at least one. The base prompt is the
      pipeline's prompt; it applies wherever the regions leave room.
    - `base_ratio` b in [0, 1]: how much of the base prompt stays inside the regions (0: only the region's
      prompt; 1: regions change nothing, apart from isolation).
    - `isolate`: image tokens of two different subject regions get a bias of `-isolation_strength` between
      them (infinite by default: they do not see each other) in self-attention (UNet, PixArt, SD3.5's image-only
      layers) and joint attention (SD3, Flux); background tokens and `Region(subject=False)` stay shared.
    - `layers`: cross-attention layers (UNet, PixArt) and joint layers (SD3, Flux) get the regional prompts;
      with `isolate`, self-attention layers get isolation. Default: every cross / joint layer, plus every
      self-attention layer with `isolate`.
    - `steps=(start, stop)`: the window of steps it acts in.

    The regional prompts apply to the cond rows (and perturbed copies of them); unconditional rows keep the
    negative prompt everywhere. Isolation applies to every row, unconditional rows included (docs/methods.md does not
    restrict it): the subjects are kept apart in both CFG branches. Region prompts are encoded by the pipeline's own text encoders with the
    options of the call (`clip_skip`, `max_sequence_length`, ...); the pooled embedding stays the base prompt's.
    The same layout applies to every prompt of a batch.
    """

    regions: tuple[Region, ...]
    base_ratio: float = 0.2
    isolate: bool = False
    isolation_strength: float = math.inf
    layers: LayerSpec = None
    steps: tuple[float, float] = (0.0, 1.0)


    def __post_init__(self) -> None:
        regions = self.regions
        if isinstance(regions, (Region, Mapping, str, bytes)) or not isinstance(regions, Sequence):
            raise ConfigError(f"Regions.regions must be a list of Region (or dicts), got {regions!r}")
        items = []
        for position, item in enumerate(regions):
            if isinstance(item, Mapping):
                item = Region.from_dict(item)
            if not isinstance(item, Region):
                raise ConfigError(f"Regions.regions[{position}] must be an attnctl.Region or a dict, got {item!r}")
            items.append(item)
        if not items:
            raise ConfigError("Regions needs at least one region")
        set_field(self, "regions", tuple(items))
        set_field(self, "base_ratio", number(self.base_ratio, "Regions.base_ratio", minimum=0.0, maximum=1.0))
        if not isinstance(self.isolate, bool):
            raise ConfigError(f"Regions.isolate must be True or False, got {self.isolate!r}")
        strength = self.isolation_strength
        if isinstance(strength, str) and strength.strip().lower() in ("inf", "infinity", "+inf"):
            strength = math.inf
        set_field(self, "isolation_strength", number(strength, "Regions.isolation_strength", minimum=0.0, exclusive_minimum=True, allow_inf=True))
        set_field(self, "layers", validate_layers(self.layers, name="Regions.layers"))
        set_field(self, "steps", validate_steps(self.steps, name="Regions.steps"))

    # -- layers --------------------------------------------------------------------------------------------------
    def default_layers(self, adapter: ModelAdapter) -> tuple[str, ...]:
        kinds = [adapter.text_attention]
        if self.isolate:
            kinds.append("self")
        present = {layer.kind for layer in adapter.layers}
        return tuple(kind for kind in kinds if kind in present)

    def select(self, adapter: ModelAdapter) -> tuple[LayerInfo, ...]:
        """The selected layers, plus (SD3, Flux) every joint layer: region tokens must be hidden where not selected."""
        chosen = super().select(adapter)
        if adapter.text_attention != "joint":
            return chosen
        indices = {layer.index for layer in chosen}
        return tuple(layer for layer in adapter.layers if layer.index in indices or layer.kind == "joint")

    @property
    def isolating(self) -> bool:
        """Whether isolation acts: `isolate` and at least two subject regions."""
        return self.isolate and sum(region.subject for region in self.regions) >= 2

    def layer_effects(self, adapter: ModelAdapter, layer: LayerInfo) -> tuple[str, ...]:
        """What Regions does at `layer` (the roles of `RegionsBound`): on SD3 / Flux "region_tokens" on every
        joint layer while region prompts act (their tokens are in the sequence there), "labels" on the joint
        layers it selects (the masked joint softmax, or isolation); "labels" on the self-attention layers it
        isolates; "region_prompts" on the cross-attention layers where region prompts act (separate attentions in a
        hook)."""
        prompts_act = self.base_ratio < 1.0
        selected = {info.index for info in Control.select(self, adapter)}
        here = layer.index in selected
        effects: list[str] = []
        if layer.kind == "joint":
            tokens = adapter.text_attention == "joint" and prompts_act and any(
                info.kind == "joint" and info.index in selected for info in adapter.layers
            )
            if here and (prompts_act or self.isolating):
                effects.append("labels")
            if tokens:
                effects.append("region_tokens")
        elif layer.kind == "self" and here and self.isolating:
            effects.append("labels")
        elif layer.kind == "cross" and here and prompts_act:
            effects.append("region_prompts")
        return tuple(effects)

    def bind(self, context: BindContext) -> Bound:
        selected = Control.select(self, context.adapter)
        bound = RegionsBound(self, context, selected)
        return bound if bound.roles else Bound(self, (), self.steps)

    # -- serialisation and layouts ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain dict; regions as `{"prompt", "box" | "mask", "subject"}` (in-memory masks raise, see `with_mask_files`)."""
        out: dict[str, Any] = {"type": self.type_name}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = [r.to_dict() for r in value] if f.name == "regions" else _plain(value)
        return out

    @classmethod
    def from_layout(cls, source: str | os.PathLike | Mapping[str, Any] | Sequence[Any], **overrides: Any) -> Regions:
        """Regions from a JSON or TOML layout file (or the same data): see `attnctl.regions.layout`."""
        from .layout import load_layout

        return load_layout(source, **overrides)

    def save_layout(self, path: str | os.PathLike) -> str:
        """Write this layout as JSON (`to_dict` without the type); returns the path."""
        from .layout import save_layout

        return save_layout(self, path)

    def with_mask_files(self, directory: str | os.PathLike) -> Regions:
        """A copy whose in-memory masks are saved as 16-bit PNGs in `directory` and referenced by path."""
        from .layout import save_mask

        os.makedirs(directory, exist_ok=True)
        regions = []
        for position, region in enumerate(self.regions):
            if region.box is None and region.mask_path is None:
                path = save_mask(region.shape, os.path.join(os.fspath(directory), f"region_{position:02d}.png"))
                region = Region(region.prompt, mask=path, subject=region.subject)
            regions.append(region)
        return dataclasses.replace(self, regions=tuple(regions))

    def picture(self, size: tuple[int, int] = (512, 512), background: Any = None):
        """A PIL picture of the layout: each region's box or mask in its colour, with its prompt."""
        from .layout import draw_layout

        return draw_layout(self, size=size, background=background)


class RegionsBound(Bound):
    """Regions bound to one pipeline call: encoded region prompts, per-grid masks and labels, the layer hooks."""

    def __init__(self, control: Regions, context: BindContext, selected: tuple[LayerInfo, ...]):
        adapter = context.adapter
        self.adapter = adapter
        self.base_ratio = float(control.base_ratio)
        self.shapes = tuple(region.shape for region in control.regions)
        self.subjects = tuple(region.subject for region in control.regions)
        self.isolating = control.isolating
        self.strength = float(control.isolation_strength)
        prompts_act = self.base_ratio < 1.0
        roles: dict[int, str] = {}
        for layer in selected:
            if layer.kind == "cross" and prompts_act:
                roles[layer.index] = "cross"
            elif layer.kind == "joint" and (prompts_act or self.isolating):
                roles[layer.index] = "joint"
            elif layer.kind == "self" and self.isolating:
                roles[layer.index] = "isolate"
        self.tokens = adapter.text_attention == "joint" and prompts_act and "joint" in roles.values()
        if self.tokens:
            for layer in adapter.layers:
                if layer.kind == "joint" and layer.index not in roles:
                    roles[layer.index] = "hidden"
        self.roles = roles
        super().__init__(control, tuple(layer for layer in adapter.layers if layer.index in roles), control.steps)
        self.device = context.device
        self.denoiser = adapter.denoiser
        self.base_text_len = context.canvas.text_len
        self.text: EncodedText | None = None
        if roles and (self.tokens or "cross" in roles.values()):
            self.text = context.encode_prompts([region.prompt for region in control.regions])
        self.cross_hook = CrossHook(self)
        self.joint_hook = JointHook(self)
        self.hidden_hook = HiddenHook(self)
        self._layouts: dict[tuple[int, int], GridLayout] = {}
        self._cache: dict[Any, Any] = {}
        self.index = RowIndex()  # the cond rows' positions as index tensors, per device

    # -- per-grid data ---------------------------------------------------------------------------------------------
    def layout(self, grid: tuple[int, int]) -> GridLayout:
        if grid not in self._layouts:
            self._layouts[grid] = grid_layout(self.shapes, grid)
        return self._layouts[grid]

    def chunks(self, grid: tuple[int, int], device: torch.device) -> tuple[RegionChunk, ...]:
        key = ("chunks", grid, str(device))
        if key not in self._cache:
            cells = grid[0] * grid[1]
            chunks = region_chunks(self.layout(grid).weights, budget=max(2 * cells, 256))
            self._cache[key] = tuple(dataclasses.replace(c, index=c.index.to(device), weight=c.weight.to(device)) for c in chunks)
        return self._cache[key]

    def text_embeds(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Region text as cross-attention layers see it: after the denoiser's own caption projection, if any."""
        key = ("embeds", str(device), dtype)
        if key not in self._cache:
            embeds = self.text.embeds.to(device=device, dtype=dtype)
            with torch.no_grad():
                self._cache[key] = self.adapter.project_text(embeds)
        return self._cache[key]

    def text_bias(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
        """(R, 1, 1, T) additive padding bias of the region prompts (PixArt's T5 mask), as the model builds its own."""
        if self.text is None or self.text.mask is None:
            return None
        key = ("bias", str(device), dtype)
        if key not in self._cache:
            mask = self.text.mask.to(device=device, dtype=dtype)
            self._cache[key] = ((1 - mask) * -10000.0)[:, None, None, :]
        return self._cache[key]

    def needs_blend(self, grid: tuple[int, int]) -> bool:
        """Whether the joint blend with the base attention changes anything (b > 0, or soft weights on labelled cells)."""
        key = ("blend?", grid)
        if key not in self._cache:
            layout = self.layout(grid)  # on the CPU: no device sync
            self._cache[key] = self.base_ratio > 0 or bool((layout.total[layout.labels > 0] < 1).any())
        return self._cache[key]

    def blend_weight(self, grid: tuple[int, int], device: torch.device, kind: str) -> torch.Tensor:
        """(1, 1, N, 1) float32 on `device`: "keep" `1 - (1-b) M(x)` (cross-attention's base share) or "region"
        `(1-b) M(x)` (the joint blend's masked share)."""
        key = ("weight", kind, grid, str(device))
        if key not in self._cache:
            share = (1.0 - self.base_ratio) * self.layout(grid).total.float()
            weight = 1.0 - share if kind == "keep" else share
            self._cache[key] = weight.to(device)[None, None, :, None]
        return self._cache[key]

    def base_positions(self, sequence: JointSequence, device: torch.device) -> torch.Tensor:
        """The image and base-text positions of `sequence` (the stock sequence) as an index tensor on `device`."""
        key = ("positions", sequence, str(device))
        if key not in self._cache:
            self._cache[key] = sequence.base_positions().to(device)
        return self._cache[key]

    # -- joint sequences and labels --------------------------------------------------------------------------------
    def region_lens(self) -> tuple[int, ...]:
        return (self.text.length,) * len(self.shapes) if self.tokens else ()

    def has_tokens(self, rows: RowLayout) -> bool:
        """Whether a denoiser call with these rows has the region tokens appended (only calls with cond rows do)."""
        return self.tokens and bool(rows.indices("cond"))

    def sequence(self, call: AttentionCall | Geometry, with_tokens: bool = True) -> JointSequence:
        geometry = call.geometry if isinstance(call, AttentionCall) else call
        lens = self.region_lens() if with_tokens else ()
        sequence = JointSequence(geometry.image_len, self.base_text_len, lens, geometry.layer.text == "first")
        if geometry.text_len != sequence.text_len:
            raise CallLayoutError(
                f"attnctl: Regions expected {sequence.text_len} text tokens at {geometry.layer.name} "
                f"({self.base_text_len} base + {sum(sequence.region_lens)} region), got {geometry.text_len}"
            )
        return sequence

    def _rows_key(self, rows: RowLayout) -> tuple[bool, ...]:
        return tuple(row.branch == "cond" for row in rows.rows)

    def isolation_labels(self, geometry: Geometry, rows: RowLayout) -> Any:
        """Self-attention isolation: every row (uncond rows too) gets the regions' image labels."""
        from ...kernels.spec import LabelMask

        key = ("isolate", geometry.image_hw, len(rows))
        if key not in self._cache:
            image = self.layout(geometry.image_hw).labels
            labels = image[None].repeat(len(rows), 1).to(self.device)
            table = isolation_table(self.subjects, self.strength)[None].to(self.device)
            self._cache[key] = LabelMask(labels, labels, table)
        return self._cache[key]

    def joint_labels(self, geometry: Geometry, rows: RowLayout) -> Any:
        """The joint label mask: cond rows with region tokens follow `joint_table`; the other rows (uncond rows, and
        every row without region prompts) `base_table`: the stock attention, with isolation when it acts."""
        from ...kernels.spec import LabelMask

        with_tokens = self.has_tokens(rows)
        sequence = self.sequence(geometry, with_tokens)
        key = ("joint", sequence, geometry.image_hw, self._rows_key(rows))
        if key not in self._cache:
            image = self.layout(geometry.image_hw).labels
            regions = len(self.shapes)
            labels, tables = [], []
            for cond in self._rows_key(rows):
                shown = image if cond or self.isolating else torch.zeros_like(image)
                labels.append(sequence.labels(shown, regions, cond))
                tables.append("joint" if cond and with_tokens else "base")
            made = {
                "joint": joint_table(self.subjects, self.isolating, self.strength),
                "base": base_table(self.subjects, self.isolating, self.strength),
            }
            table = made[tables[0]][None] if len(set(tables)) == 1 else torch.stack([made[t] for t in tables])
            stacked = torch.stack(labels).to(self.device)
            self._cache[key] = LabelMask(stacked, stacked, table.to(self.device))
        return self._cache[key]

    def base_labels(self, sequence: JointSequence, grid: tuple[int, int], rows: int, device: torch.device) -> Any:
        """Labels of the blend's base attention (cond rows: image queries, image + base-text keys); None without isolation."""
        if not self.isolating:
            return None
        from ...kernels.spec import LabelMask

        key = ("base", sequence, grid, rows, str(device))
        if key not in self._cache:
            regions = len(self.shapes)
            image = self.layout(grid).labels
            full = sequence.labels(image, regions, True)
            keys = full[sequence.base_positions()]
            table = base_table(self.subjects, True, self.strength)[None]
            self._cache[key] = LabelMask(image.expand(rows, -1).to(device), keys.expand(rows, -1).to(device), table.to(device))
        return self._cache[key]

    # -- the protocol ------------------------------------------------------------------------------------------------
    def transform_inputs(self, frame: DenoiserCall, inputs: dict[str, Any]) -> dict[str, Any]:
        """SD3 / Flux: append every region prompt's tokens after the base text (cond rows; zeros, hidden, elsewhere)."""
        if not self.tokens or not frame.rows.indices("cond"):
            return inputs
        context = inputs.get("encoder_hidden_states")
        if not isinstance(context, torch.Tensor) or context.ndim != 3:
            raise CallLayoutError("attnctl: Regions needs the text embeddings (encoder_hidden_states) of the denoiser call")
        if context.shape[1] != self.base_text_len:
            raise CallLayoutError(
                f"attnctl: Regions expected {self.base_text_len} base text tokens in this denoiser call, got {context.shape[1]}"
            )
        key = ("embeds-joint", str(context.device), context.dtype)
        if key not in self._cache:  # one copy per call
            self._cache[key] = self.text.embeds.to(device=context.device, dtype=context.dtype)
        embeds = self._cache[key]
        if embeds.shape[-1] != context.shape[-1]:
            raise CallLayoutError(f"attnctl: region embeddings have {embeds.shape[-1]} channels, the base text {context.shape[-1]}")
        block = embeds.reshape(1, -1, context.shape[-1]).expand(context.shape[0], -1, -1)
        cond = frame.rows.mask("cond", device=context.device)[:, None, None]
        block = torch.where(cond, block, torch.zeros_like(block))
        return self.adapter.append_text(inputs, block, segments=len(self.shapes))

    def edit(self, layer: LayerInfo, frame: DenoiserCall) -> Edit | None:
        role = self.roles.get(layer.index)
        if role is None:
            return None
        geometry = frame.geometry(layer)
        if not frame.rows.indices("cond"):
            # a call without cond rows (Flux true CFG's negative pass): no region prompts there, only isolation
            if not self.isolating:
                return None
            if role == "isolate":
                return Edit(labels=self.isolation_labels(geometry, frame.rows))
            if role == "joint":
                return Edit(labels=self.joint_labels(geometry, frame.rows))
            return None
        if role == "cross":
            return Edit(hooks=(self.cross_hook,))
        if role == "isolate":
            return Edit(labels=self.isolation_labels(geometry, frame.rows))
        if role == "hidden":
            self.sequence(geometry)
            return Edit(hooks=(self.hidden_hook,))
        if role == "joint":
            labels = self.joint_labels(geometry, frame.rows)
            return Edit(labels=labels, hooks=(self.joint_hook,) if self.tokens else ())
        return None

    def finish(self) -> None:
        self._cache.clear()
        self._layouts.clear()
        self.index.clear()
