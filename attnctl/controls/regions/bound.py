"""Regions bound to one pipeline call, and the layer hooks that carry it out (docs/methods.md "Regions").

`RegionsBound` holds what is constant within the call (encoded region prompts, per-grid masks, labels and
tables, row indices); the hooks read it: `CrossHook` (cross-attention: the base attention and one attention
per region, blended), `JointHook` (joint attention: one masked softmax over image, base text and region text,
blended with the base attention), `HiddenHook` (joint layers Regions does not select: region text hidden).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

import torch

from ...control import BindContext, Bound, Control, EncodedText
from ...denoiser_call import DenoiserCall, RowLayout
from ...errors import CallLayoutError, ConfigError, IdleControlWarning, UnsupportedError
from ...families.base import Geometry, LayerInfo
from ...kernels import prepare_traced_labels
from ...kernels.semantics import spec_tokens
from ...kernels.spec import AttentionSpec, LabelMask, kept_tensors
from ...processors.chain import TokenLayout, backend_op, restricted_rows, restricted_tokens
from ...processors.edit import AttendFn, AttentionCall, Edit, LayerHook
from ..common import RowIndex
from .attention import (
    JointSequence,
    RegionChunk,
    base_table,
    isolation_table,
    joint_table,
    region_chunks,
)
from .masks import GridLayout, Tube, grid_layout


class RegionsBound(Bound):
    """Regions bound to one pipeline call: encoded region prompts, per-grid masks and labels, the layer hooks."""

    def __init__(self, control: Control, context: BindContext, selected: tuple[LayerInfo, ...]):
        """`control`: the `Regions` config (its fields are read here)."""
        adapter = context.adapter
        self.adapter = adapter
        self.base_ratio = float(control.base_ratio)
        # a video denoiser (3-D token grid): each region is a tube over the token frames (docs/methods.md "Regions")
        self.video = adapter.grid_dims == 3
        if self.video:
            self.shapes = tuple(
                Tube(region.per_frame or (region.shape,), region.frames, owner=repr(region)) for region in control.regions
            )
            for tube in self.shapes:  # a frame range or per-frame count that does not fit this video: raise at bind
                tube.span(context.canvas.frames)
        else:
            self.shapes = tuple(region.shape for region in control.regions)
        self.subjects = tuple(region.subject for region in control.regions)
        self.isolating = control.isolating
        self.strength = float(control.isolation_strength)
        self.joint_rule = control.joint_rule
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
        # region tokens appended to the text stream reach every joint layer; without them Regions acts at its layers only
        self.layers_only = not self.tokens
        self.device = context.device
        self.backend = context.backend
        self.denoiser = adapter.denoiser
        self.base_text_len = context.canvas.text_len
        self.text: EncodedText | None = None
        if roles and (self.tokens or "cross" in roles.values()):
            self.text = context.encode_prompts([region.prompt for region in control.regions], trim=control.trim_prompts)
        # per token grid (masks, labels, chunks): constant for the handle, kept across calls
        self._layouts: dict[tuple[int, int], GridLayout] = context.handle_cache.setdefault("layouts", {})
        self._grids: dict[Any, Any] = context.handle_cache.setdefault("grids", {})
        self._cache: dict[Any, Any] = {}  # per call (encoded region prompts, their keys and values per layer)
        self.index = RowIndex()  # the cond rows' positions as index tensors, per device
        self._check_labels(control, context)

    def _check_labels(self, control: Control, context: BindContext) -> None:
        """Joint attention (region prompts) and isolation act through token labels: a token belongs to the region that
        covers the most of it, at least half. A region that labels no token at any grid they use is dropped there (on
        joint families its prompt entirely): a warning, once per call (a soft background under the subjects, or a
        region under a later one, is a layout the project's own tests use, so it is not refused)."""
        canvas = context.canvas
        grids = {
            (canvas.frames, *canvas.grid_at(layer.level)) if self.video else canvas.grid_at(layer.level)
            for layer in self.layers if self.roles.get(layer.index) in ("joint", "isolate")
        }
        if not grids:
            return
        key = ("unlabelled", tuple(sorted(grids)))
        if key not in self._grids:  # read once per handle (host data, but no read in a warm call)
            labelled = {grid: {int(v) for v in self.layout(grid).labels.unique()} for grid in sorted(grids)}
            self._grids[key] = tuple(
                (p, tuple(grid for grid, found in labelled.items() if p + 1 not in found)) for p in range(len(control.regions))
            )
        for position, missing in self._grids[key]:
            region = control.regions[position]
            if not missing or not (self.tokens or (self.isolating and region.subject)):
                continue
            shown = ", ".join("x".join(map(str, grid)) for grid in missing)
            where = f"at this call's size (token grids {shown})" if len(missing) == len(grids) else (
                f"on the token grid(s) {shown} (of {len(grids)} its layers use)")
            warnings.warn(
                f"attnctl: Regions: {region!r} labels no image token {where}: joint attention and isolation give a "
                "token to the region that covers the most of it, at least half, so this region is dropped there; give "
                "it a larger box or mask (at least half a token cell, and not under a later region)",
                IdleControlWarning,
                stacklevel=2,
            )

    # -- per-grid data ---------------------------------------------------------------------------------------------
    def grid(self, geometry: Geometry) -> tuple[int, ...]:
        """The token grid a layer's masks live on: (h, w), or (frames, h, w) on a video denoiser (frame-major)."""
        return (geometry.frames, *geometry.image_hw) if self.video else geometry.image_hw

    def layout(self, grid: tuple[int, ...]) -> GridLayout:
        if grid not in self._layouts:
            self._layouts[grid] = grid_layout(self.shapes, grid)
        return self._layouts[grid]

    def chunks(self, grid: tuple[int, int], device: torch.device) -> tuple[RegionChunk, ...]:
        key = ("chunks", grid, str(device))
        if key not in self._grids:
            cells = math.prod(grid)
            chunks = region_chunks(self.layout(grid).weights, budget=max(2 * cells, 256))
            self._grids[key] = tuple(dataclasses.replace(c, index=c.index.to(device), weight=c.weight.to(device)) for c in chunks)
        return self._grids[key]

    def text_embeds(self, device: torch.device, dtype: torch.dtype, layer: LayerInfo | None = None) -> torch.Tensor:
        """Region text as cross-attention layers see it: after the denoiser's own caption projection, if any (that of
        the expert holding `layer`, on a pipeline with several: Wan 2.2)."""
        expert = layer.parts[0] if layer is not None and self.adapter.experts else None
        key = ("embeds", str(device), dtype, expert)
        if key not in self._cache:
            embeds = self.text.embeds.to(device=device, dtype=dtype)
            # normal tensors: a latent optimiser's loss pass (autograd on, outside inference mode) projects them with
            # the layer's weights, which autograd saves; encoded under torch.inference_mode() they could not be saved
            with torch.inference_mode(False), torch.no_grad():  # in this order: leaving inference mode restores grad
                projected = self.adapter.project_text(embeds, layer)
                self._cache[key] = projected.clone() if projected.is_inference() else projected
        return self._cache[key]

    def region_keys(self, call: AttentionCall, device: torch.device, q_dtype: torch.dtype, v_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(R, H, T, D) keys and values of the region prompts at a cross-attention layer: the layer's `to_k` /
        `to_v` of constant text, projected once per call and layer (not at every step)."""
        return self.layer_keys(call.module, call.layer.name, device, q_dtype, v_dtype)

    def cross_edit(self, layer: LayerInfo, frame: DenoiserCall) -> Edit:
        """The edit of a cross-attention layer. Its hook gets, as constants made here (eagerly, also before a compiled
        forward), the cond rows' positions, the layer's region keys and values (on the device and in the dtype of the
        layer's weights; elsewhere the hook projects its own) and the grid's tables, so that a compiled processor
        looks nothing up by layer name (which would compile one graph per layer) nor by grid (a graph's grid is symbolic:
        a lookup by it would make it a constant, one graph per image size)."""
        cond = frame.rows.indices("cond")
        key = ("cross", layer.index, cond)
        found = self._cache.get(key)
        if found is None:
            module = self.adapter.modules[layer.name]
            weight = self.adapter.placed_weight(layer.name)
            kv = chunks = keep = None
            if weight is not None:
                kv = self.layer_keys(module, layer.name, weight.device, weight.dtype, weight.dtype)
                grid = self.grid(frame.geometry(layer))
                chunks = self.chunks(grid, weight.device)
                keep = self.blend_weight(grid, weight.device, "keep")
                self.text_bias(weight.device, weight.dtype)
            found = Edit(hooks=(CrossHook(self, cond, kv, chunks, keep),))
            if not torch.is_grad_enabled():  # as layer_keys: with autograd on, every step keeps its own graph
                self._cache[key] = found
        return found

    def layer_keys(self, module: torch.nn.Module, name: str, device: torch.device, q_dtype: torch.dtype, v_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = ("kv", name, str(device), q_dtype, v_dtype)
        found = self._cache.get(key)
        if found is None:
            keys, values = module.processor.project_context(module, self.text_embeds(device, _weight_dtype(module), self.adapter.layer(name)))
            found = (keys.to(q_dtype), values.to(v_dtype))
            if not torch.is_grad_enabled():  # with autograd on, every step keeps its own graph
                self._cache[key] = found
        return found

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
        if key not in self._grids:
            layout = self.layout(grid)  # on the CPU: no device sync
            soft = self.joint_rule == "open" and bool((layout.total[layout.labels > 0] < 1).any())
            self._grids[key] = self.base_ratio > 0 or soft
        return self._grids[key]

    def blend_weight(self, grid: tuple[int, int], device: torch.device, kind: str) -> torch.Tensor:
        """(1, 1, N, 1) float32 on `device`: "keep" `1 - (1-b) M(x)` (cross-attention's base share) or "region"
        `(1-b) M(x)` (the joint blend's masked share)."""
        key = ("weight", kind, grid, str(device))
        if key not in self._grids:
            total = self.layout(grid).total.float()
            if kind == "region" and self.joint_rule == "chen":  # every image token, background included (Chen et al.)
                total = torch.ones_like(total)
            share = (1.0 - self.base_ratio) * total
            weight = 1.0 - share if kind == "keep" else share
            self._grids[key] = weight.to(device)[None, None, :, None]
        return self._grids[key]

    def base_positions(self, sequence: JointSequence, device: torch.device) -> torch.Tensor:
        """The image and base-text positions of `sequence` (the stock sequence) as an index tensor on `device`."""
        key = ("positions", sequence, str(device))
        if key not in self._grids:
            self._grids[key] = sequence.base_positions().to(device)
        return self._grids[key]

    # -- joint sequences and labels --------------------------------------------------------------------------------
    def region_lens(self) -> tuple[int, ...]:
        return (self.text.length,) * len(self.shapes) if self.tokens else ()

    def has_tokens(self, rows: RowLayout) -> bool:
        """Whether a denoiser call with these rows has the region tokens appended (only calls with cond rows do)."""
        return self.tokens and bool(rows.indices("cond"))

    def sequence(self, call: AttentionCall | Geometry, with_tokens: bool = True) -> JointSequence:
        """The token sequence of a joint layer; `with_tokens=False`: a call without region tokens, whose text is its
        own (a negative prompt's may have another length, as on Qwen-Image)."""
        geometry = call.geometry if isinstance(call, AttentionCall) else call
        text_first = geometry.layer.text == "first"
        if not with_tokens or not self.tokens:
            return JointSequence(geometry.image_len, geometry.text_len, (), text_first)
        sequence = JointSequence(geometry.image_len, self.base_text_len, self.region_lens(), text_first)
        if geometry.text_len != sequence.text_len:
            raise CallLayoutError(
                f"attnctl: Regions expected {sequence.text_len} text tokens at {geometry.layer.name} "
                f"({self.base_text_len} base + {sum(sequence.region_lens)} region), got {geometry.text_len}"
            )
        return sequence

    def _rows_key(self, rows: RowLayout) -> tuple[bool, ...]:
        return tuple(row.branch == "cond" for row in rows.rows)

    def isolation_labels(self, geometry: Geometry, rows: RowLayout) -> Any:
        """Self-attention isolation: every row (uncond rows too) gets the regions' image labels, so the label mask has
        one row that stands for all (`LabelMask`): the sdpa backend makes a (1, 1, N, N) mask, not one per row."""

        key = ("isolate", self.grid(geometry), str(self.device))
        if key not in self._grids:
            image = self.layout(self.grid(geometry)).labels
            labels = image[None].to(self.device)
            table = isolation_table(self.subjects, self.strength)[None].to(self.device)
            self._grids[key] = LabelMask(labels, labels, table)
        return self._grids[key]

    def joint_labels(self, geometry: Geometry, rows: RowLayout) -> Any:
        """The joint label mask: cond rows with region tokens follow `joint_table`; the other rows (uncond rows, and
        every row without region prompts) `base_table`: the stock attention, with isolation when it acts."""

        with_tokens = self.has_tokens(rows)
        sequence = self.sequence(geometry, with_tokens)
        key = ("joint", sequence, self.grid(geometry), self._rows_key(rows), str(self.device))
        if key not in self._grids:
            image = self.layout(self.grid(geometry)).labels
            regions = len(self.shapes)
            labels, tables = [], []
            for cond in self._rows_key(rows):
                shown = image if cond or self.isolating else torch.zeros_like(image)
                labels.append(sequence.labels(shown, regions, cond))
                tables.append("joint" if cond and with_tokens else "base")
            made = {
                "joint": joint_table(self.subjects, self.isolating, self.strength, self.joint_rule),
                "base": base_table(self.subjects, self.isolating, self.strength),
            }
            table = made[tables[0]][None] if len(set(tables)) == 1 else torch.stack([made[t] for t in tables])
            stacked = torch.stack(labels).to(self.device)
            self._grids[key] = LabelMask(stacked, stacked, table.to(self.device))
        return self._grids[key]

    def base_labels(self, sequence: JointSequence, grid: tuple[int, int], device: torch.device) -> Any:
        """Labels of the blend's base attention (cond rows: image queries, image + base-text keys), one row for all the
        cond rows (`LabelMask`); None without isolation."""
        if not self.isolating:
            return None

        key = ("base", sequence, grid, str(device))
        if key not in self._grids:
            regions = len(self.shapes)
            image = self.layout(grid).labels
            full = sequence.labels(image, regions, True)
            keys = full[sequence.base_positions()]
            table = base_table(self.subjects, True, self.strength)[None]
            self._grids[key] = LabelMask(image[None].to(device), keys[None].to(device), table.to(device))
        return self._grids[key]

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
        block_mask = None
        if self.text.mask is not None:  # the region prompts' padding stays masked, as the base prompt's (Chroma, Qwen-Image)
            key = ("mask-joint", str(context.device))
            if key not in self._cache:
                self._cache[key] = self.text.mask.to(device=context.device).reshape(1, -1)
            block_mask = self._cache[key].expand(context.shape[0], -1)
        return self.adapter.append_text(inputs, block, segments=len(self.shapes), block_mask=block_mask)

    def edit(self, layer: LayerInfo, frame: DenoiserCall) -> Edit | None:
        with kept_tensors():  # what the edit makes is kept for the call (region keys, masks, tables)
            return self._edit(layer, frame)

    def _edit(self, layer: LayerInfo, frame: DenoiserCall) -> Edit | None:
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
            return self.cross_edit(layer, frame)
        if role == "isolate":
            return Edit(labels=self.isolation_labels(geometry, frame.rows))
        if role == "hidden":
            return Edit(hooks=(self.hidden_edit_hook(layer, geometry),))
        if role == "joint":
            labels = self.joint_labels(geometry, frame.rows)
            return Edit(labels=labels, hooks=(self.joint_edit_hook(layer, frame),) if self.tokens else ())
        return None

    def joint_edit_hook(self, layer: LayerInfo, frame: DenoiserCall) -> JointHook:
        """The hook of a joint layer, with its `JointPlan` made here (eagerly, also before a compiled forward) on the
        device of the layer's weights, so that a compiled processor runs no data-dependent op (whether the blend acts
        reads the masks) and looks nothing up in the caches. Weights on the meta device (sequential offload): the hook
        makes its plan on the queries' device."""
        weight = self.adapter.placed_weight(layer.name)
        if weight is None:
            return JointHook(self)
        plan = self.joint_plan(frame.geometry(layer), frame.rows, weight.device)
        if frame.compiled and plan.labels is not None:  # the blend's base attention: its mask made before the graph
            prepare_traced_labels(plan.labels, self.backend, weight.dtype, weight.device)
        return JointHook(self, plan)

    def hidden_edit_hook(self, layer: LayerInfo, geometry: Geometry) -> HiddenHook:
        """The hook of a joint layer Regions does not select, with the stock sequence's positions made here, on the device
        of the layer's weights (a compiled processor looks nothing up by its sequence, whose sizes are symbolic)."""
        sequence = self.sequence(geometry)  # raises here if the text length is not the expected one
        weight = self.adapter.placed_weight(layer.name)
        return HiddenHook(self, None if weight is None else self.base_positions(sequence, weight.device))

    def joint_plan(self, geometry: Geometry, rows: RowLayout, device: torch.device) -> JointPlan:
        """What a joint layer's blend needs in one call, per token sequence, grid, cond rows and device."""
        sequence = self.sequence(geometry)
        grid = self.grid(geometry)
        cond = rows.indices("cond")
        key = ("joint-plan", sequence, grid, cond, str(device))
        found = self._cache.get(key)
        if found is None:
            blend = bool(cond) and self.needs_blend(grid)
            weight = self.blend_weight(grid, device, "region") if blend else None
            found = JointPlan(
                sequence, cond, blend,
                rows=self.index(cond, device) if blend else None,
                every_row=cond == tuple(range(len(rows))),
                positions=self.base_positions(sequence, device) if blend else None,
                labels=self.base_labels(sequence, grid, device) if blend else None,
                weight=weight,
                keep=1.0 - weight if weight is not None else None,
            )
            self._cache[key] = found
        return found

    def finish(self) -> None:
        self._cache.clear()  # the per-grid data stays with the handle
        self.index.clear()


def _weight_dtype(module: torch.nn.Module) -> torch.dtype:
    for parameter in module.parameters():
        return parameter.dtype
    return torch.float32


class CrossHook(LayerHook):
    """Regional prompts in a cross-attention layer (UNet, PixArt); see the module docstring."""

    def __init__(
        self, bound: RegionsBound, cond: tuple[int, ...] | None = None, kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        chunks: tuple[RegionChunk, ...] | None = None, keep: torch.Tensor | None = None,
    ):
        self.bound = bound
        self.cond = cond  # the cond rows of the frame (`RegionsBound.cross_edit`)
        self.kv = kv
        self.chunks = chunks  # the layer's grid's region chunks and blend weight, on the device of its weights
        self.keep = keep

    def attend(self, call: AttentionCall, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec, compute: AttendFn):
        out, lse = compute(q, k, v, spec)
        parts: tuple[int, ...] = ()
        if self.cond is not None and call.row_source is None:
            cond = self.cond
        else:
            cond, parts = _first_and_parts(call.rows.indices("cond"), call.row_source)
        if not cond:
            return out, lse
        bound = self.bound
        chunks, keep = self.chunks, self.keep
        if keep is None or keep.device != q.device:
            grid = bound.grid(call.geometry)
            chunks, keep = bound.chunks(grid, q.device), bound.blend_weight(grid, q.device, "keep")  # (1, 1, N, 1)
        n = keep.shape[2]
        if q.shape[2] != n:
            shown = "x".join(map(str, bound.grid(call.geometry)))
            raise CallLayoutError(f"attnctl: Regions expected {n} image queries ({shown}) at {call.layer.name}, got {q.shape[2]}")
        if torch.compiler.is_compiling():  # a constant of the graph: no lookup in the index cache to guard on
            rows = torch.tensor(cond, dtype=torch.long, device=q.device)
        else:
            rows = bound.index(cond, q.device)
        qc = q.index_select(0, rows)
        batch, heads, _, head_dim = qc.shape
        kv = self.kv
        if kv is None or kv[0].device != q.device or kv[0].dtype != q.dtype or kv[1].dtype != v.dtype:
            kv = bound.region_keys(call, q.device, q.dtype, v.dtype)
        keys, values = kv
        padding = bound.text_bias(q.device, q.dtype)  # (R, 1, 1, T) or None
        total = keys.new_zeros(batch, heads, n, head_dim, dtype=torch.float32)
        for chunk in chunks:
            count, width = chunk.index.shape
            gathered = qc.index_select(2, chunk.index.reshape(-1))  # (Bc, H, C*S, D)
            gathered = gathered.view(batch, heads, count, width, head_dim).transpose(1, 2).reshape(batch * count, heads, width, head_dim)
            ck = keys[chunk.start : chunk.stop].unsqueeze(0).expand(batch, -1, -1, -1, -1).reshape(batch * count, heads, -1, head_dim)
            cv = values[chunk.start : chunk.stop].unsqueeze(0).expand(batch, -1, -1, -1, -1).reshape(batch * count, heads, -1, head_dim)
            mask = None
            if padding is not None:
                mask = padding[chunk.start : chunk.stop].unsqueeze(0).expand(batch, -1, -1, -1, -1).reshape(batch * count, 1, 1, -1)
            # region attentions are ops of their own (other keys): the layer's other hooks do not see them
            part, _ = backend_op(call, gathered, ck, cv, AttentionSpec(attn_mask=mask))
            part = part.view(batch, count, heads, width, head_dim).float() * chunk.weight[None, :, None, :, None]
            total.index_add_(2, chunk.index.reshape(-1), part.transpose(1, 2).reshape(batch, heads, count * width, head_dim))
        blended = keep * out.index_select(0, rows).float() + (1.0 - bound.base_ratio) * total
        out = out.index_copy(0, rows, blended.to(out.dtype))
        if parts:  # the outer hook adds the parts of a row: the base attention's share applies to each
            index = torch.tensor(parts, dtype=torch.long, device=q.device) if torch.compiler.is_compiling() else bound.index(parts, q.device)
            out = out.index_copy(0, index, (keep * out.index_select(0, index).float()).to(out.dtype))
        return out, lse


def _first_and_parts(cond: tuple[int, ...], source: tuple[int, ...] | None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The positions of `cond` rows split into each row's first position and the later ones: an outer hook that holds a
    row more than once sums its copies (Prompt-to-Prompt's refine on a cross-attention layer: the linked part first,
    the row's own part after), so the region prompts' attention is added once, at the first (`processors.chain.own_rows`)."""
    if source is None:
        return cond, ()
    first: list[int] = []
    parts: list[int] = []
    seen: set[int] = set()
    for position in cond:
        (parts if source[position] in seen else first).append(position)
        seen.add(source[position])
    return tuple(first), tuple(parts)


# -- joint attention ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class JointPlan:
    """A joint layer's constants in one call: its token sequence, the cond rows, whether the blend with the base acts
    and, if it does, the cond rows' index, the base positions, the base labels (isolation) and the blend weight."""

    sequence: JointSequence
    cond: tuple[int, ...]
    blend: bool
    rows: torch.Tensor | None = None
    every_row: bool = False  # the cond rows are every row of the call, in order: no rows to pick
    positions: torch.Tensor | None = None
    labels: LabelMask | None = None
    weight: torch.Tensor | None = None  # (1, 1, N, 1): (1 - b) M(x)
    keep: torch.Tensor | None = None  # 1 - weight


class JointHook(LayerHook):
    """Regions in a joint attention layer: the masked softmax (labels in the spec), then the blend with the base.

    Soft masks in joint attention (our choice; docs/methods.md states the rules for hard regions): an image token takes
    the text of one region, its label (the region with the largest mask there if >= 1/2, ties to the later
    region; else background), and its output is

        out(x) = (1 - (1-b) M(x)) Attn_base(x) + (1-b) M(x) Attn_masked(x),

    with `M(x) = sum_r m_r(x)` after overlap normalisation. For hard, non-overlapping regions this is exactly
    docs/methods.md's "blend with the unmasked base attention by b"; a background token's masked attention equals its
    base attention, so it is unchanged. With isolation the base attention of the blend is isolated too.
    """

    def __init__(self, bound: RegionsBound, plan: JointPlan | None = None):
        self.bound = bound
        self.plan = plan  # made with the edit (`RegionsBound.joint_edit_hook`)

    def attend(self, call: AttentionCall, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec, compute: AttendFn):
        plan = self.plan
        if plan is None or call.row_source is not None or (plan.blend and plan.rows.device != q.device):
            plan = self.bound.joint_plan(call.geometry, call.rows, q.device)
        # in a graph, the sequence of the graph's symbolic sizes: the plan's ints would make the image size a constant
        sequence = self.bound.sequence(call.geometry) if torch.compiler.is_compiling() else plan.sequence
        _check_tokens(call, q, sequence)
        out, lse = compute(q, k, v, spec)
        if not plan.blend:
            return out, lse
        cond, positions = plan.cond, plan.positions
        every = plan.every_row and q.shape[0] == len(cond)
        rows = None if every else plan.rows  # None: every row, in order (no index_select to make)

        def pick(t: torch.Tensor) -> torch.Tensor:
            return t if rows is None else t.index_select(0, rows)

        image = sequence.image_slice
        base_spec = spec_tokens(
            spec, ((image.start, image.stop),), sequence.base_spans(), positions, rows=rows, labels=plan.labels,
            where=f"layer {call.layer.name}",
        )
        qc = pick(q)[:, :, image]
        kc = pick(k).index_select(2, positions)
        vc = pick(v).index_select(2, positions)
        # the base attention runs through the other hooks as a sub-attention of the cond rows (PAG perturbs it too)
        tokens = TokenLayout.joint(sequence.image_len, sequence.base_len, sequence.text_first, queries="image")
        with restricted_rows(call, cond), restricted_tokens(call, tokens):
            base, _ = compute(qc, kc, vc, base_spec)
        weight = plan.weight  # (1, 1, N, 1): (1 - b) M(x)
        chosen = pick(out)
        mixed = plan.keep * base.float() + weight * chosen[:, :, image].float()
        chosen = torch.cat([chosen[:, :, : image.start], mixed.to(out.dtype), chosen[:, :, image.stop :]], dim=2)
        return (chosen if rows is None else out.index_copy(0, rows, chosen)), lse


def _check_tokens(call: AttentionCall, q: torch.Tensor, sequence: JointSequence) -> None:
    if q.shape[2] != sequence.length:
        raise UnsupportedError(
            f"attnctl: Regions at {call.layer.name} expected {sequence.length} joint tokens, got {q.shape[2]}: another "
            "control on this layer changed the token sequence (token reduction merges image tokens); give them disjoint layers"
        )


class HiddenHook(LayerHook):
    """A joint layer outside the control's `layers` while region tokens are in the sequence.

    Image and base-text tokens attend exactly as stock (over image + base text); each region's text attends
    only to itself; nothing attends to region text. No dense mask is needed.
    """

    def __init__(self, bound: RegionsBound, positions: torch.Tensor | None = None):
        self.bound = bound
        self.positions = positions  # the stock sequence's positions (`RegionsBound.hidden_edit_hook`)

    def attend(self, call: AttentionCall, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec, compute: AttendFn):
        if spec.labels is not None:
            raise ConfigError(f"attnctl: Regions cannot share joint layer {call.layer.name} with another control's label mask")
        sequence = self.bound.sequence(call)
        _check_tokens(call, q, sequence)
        positions = self.positions
        if positions is None or positions.device != q.device:
            positions = self.bound.base_positions(sequence, q.device)
        spans = sequence.base_spans()
        base_spec = spec_tokens(spec, spans, spans, positions, labels=None, where=f"layer {call.layer.name}")
        with restricted_tokens(call, TokenLayout.joint(sequence.image_len, sequence.base_len, sequence.text_first)):
            base, lse = compute(q.index_select(2, positions), k.index_select(2, positions), v.index_select(2, positions), base_spec)
        out = base.new_empty(q.shape[:3] + (v.shape[-1],))
        out[:, :, positions] = base
        lengths = set(sequence.region_lens)
        if len(lengths) == 1:  # every region text has the same length: one batched call
            length = lengths.pop()
            start = sequence.region_slice(0).start
            stop = start + length * len(sequence.region_lens)
            batch, heads, _, head_dim = q.shape

            def split(t: torch.Tensor) -> torch.Tensor:
                part = t[:, :, start:stop].reshape(batch, heads, -1, length, head_dim).transpose(1, 2)
                return part.reshape(-1, heads, length, head_dim)

            own, _ = backend_op(call, split(q), split(k), split(v), AttentionSpec())
            own = own.reshape(batch, -1, heads, length, head_dim).transpose(1, 2).reshape(batch, heads, stop - start, head_dim)
            out[:, :, start:stop] = own
        else:
            for r in range(len(sequence.region_lens)):
                span = sequence.region_slice(r)
                own, _ = backend_op(call, q[:, :, span], k[:, :, span], v[:, :, span], AttentionSpec())
                out[:, :, span] = own
        return out, None
