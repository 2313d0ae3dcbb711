"""Consistent subjects across the images of one call: each image's self-attention also reads the subject tokens of
a reference image, or of every other image.

StoryDiffusion (Zhou et al. 2024, "StoryDiffusion: Consistent Self-Attention for Long-Range Image and Video
Generation", arXiv:2405.01434): consistent self-attention, where each image of a batch attends to tokens of the
other images besides its own; IR-Diffusion (He et al. 2024, "Improving Multi-Subject Consistency in Open-Domain
Image Generation with Isolation and Reposition Attention") restricts the shared tokens to the subject. Here: for a
target row with own keys `K, V` and source rows `s` (the reference row, or every other prompt row, of the same
branch: `RowLayout.linked`), the image queries attend to

    softmax(Q [K; K_s1; K_s2; ...]ᵀ scale + [0; b; b; ...]) [V; V_s1; V_s2; ...]

with `b = log(strength)` on the source keys inside the subject mask and `-inf` outside it (no mask: every image
token of the source). Self-attention layers; on joint attention the image queries over the image and text keys
plus the sources' image keys (text queries stock). The source rows are not changed. Subject tokens by a box or
mask of the source image; selecting them by a word's attention map and IR-Diffusion's isolation / reposition are
not implemented.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ...control import BindContext, Bound, Control
from ...denoiser_call import DenoiserCall, RowLayout
from ...errors import ConfigError, UnsupportedError
from ...families.base import LayerInfo, ModelAdapter
from ...kernels.semantics import spec_rows
from ...kernels.spec import AttentionSpec, as_additive
from ...processors.chain import backend_op, restricted_rows
from ...processors.edit import AttentionCall, Edit, LayerHook
from ...selection import LayerSpec, validate_layers
from ...steps import validate_steps
from ...validation import number, set_field
from ..common import RowIndex, keep_kinds
from ..regions.masks import validate_box

Box = tuple[float, float, float, float]


def optional_box(value: Any, owner: str) -> Box | None:
    """None, or a box validated as Regions validates its boxes."""
    return None if value is None else validate_box(value, owner=owner)


def box_mask(box: Box | None, grid: tuple[int, int], frames: int = 1) -> torch.Tensor:
    """(frames * h * w,) bool: image tokens whose cell centre lies inside `box` (every token when None)."""
    h, w = grid
    if box is None:
        return torch.ones(frames * h * w, dtype=torch.bool)
    ys = (torch.arange(h, dtype=torch.float64) + 0.5) / h
    xs = (torch.arange(w, dtype=torch.float64) + 0.5) / w
    inside = ((ys >= box[1]) & (ys <= box[3]))[:, None] & ((xs >= box[0]) & (xs <= box[2]))[None, :]
    return inside.flatten().repeat(frames)


@dataclass(frozen=True)
class ConsistentSubjects(Control, type_name="consistent-subjects"):
    """Every image of the call also attends to the subject tokens of a reference image (StoryDiffusion's consistent
    self-attention, restricted to the subject as IR-Diffusion does).

    `reference`: the prompt row every other row reads (default 0), or None: every row reads every other row.
    `subject`: a box (x0, y0, x1, y1) in relative coordinates of the source image whose tokens are shared (None: all
    its image tokens). `strength`: a factor on the attention the shared tokens get (the logit bias is
    log(strength); 0 is off). `layers`: self-attention (and joint attention) layers, all by default. `steps`: the
    step window.
    """

    reference: int | None = 0
    subject: Box | None = None
    strength: float = 1.0
    layers: LayerSpec = None
    steps: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        if self.reference is not None and (isinstance(self.reference, bool) or not isinstance(self.reference, int) or self.reference < 0):
            raise ConfigError(f"ConsistentSubjects.reference must be None or a prompt row index >= 0, got {self.reference!r}")
        set_field(self, "subject", optional_box(self.subject, "ConsistentSubjects.subject"))
        set_field(self, "strength", number(self.strength, "ConsistentSubjects.strength", minimum=0))
        set_field(self, "layers", validate_layers(self.layers, name="ConsistentSubjects.layers"))
        set_field(self, "steps", validate_steps(self.steps, name="ConsistentSubjects.steps"))

    def select(self, adapter: ModelAdapter) -> tuple[LayerInfo, ...]:
        return keep_kinds(Control.select(self, adapter), ("self", "joint"), type(self).__name__, "self- or joint attention", self.layers)

    def validate_for(self, adapter: ModelAdapter) -> None:
        if self.subject is not None and adapter.grid_dims != 2:
            raise UnsupportedError(
                f"attnctl: ConsistentSubjects' subject box is defined on a 2-D image grid, and the {adapter.family} family "
                "has a video token grid; share every token (subject=None) there"
            )

    def layer_effects(self, adapter: ModelAdapter, layer: LayerInfo) -> tuple[str, ...]:
        """"linked_keys": the rows attend to the source rows' keys and values (none while strength is 0)."""
        return ("linked_keys",) if self.strength > 0 else ()

    def compile_refusal(self, adapter: ModelAdapter) -> str | None:
        return None  # the edit hands its hook the row links and bias as constants (tests/test_compile_controls.py)

    def bind(self, context: BindContext) -> _ConsistentBound:
        return _ConsistentBound(self, context)


Links = tuple[tuple[int, ...], tuple[tuple[int, ...], ...]]


class LinkedKeysBound(Bound):
    """What the appended-keys controls (ConsistentSubjects, ReferenceAttention) share per call: the row links of each
    row layout (`find_links`, found once per layout), the row index tensors, and the edits with their hook while the
    control is active (its `strength` above 0, inside its steps, and some row linked).

    The edit (computed eagerly, also before a compiled forward) hands its hook the links of the frame's rows and the
    source bias of the layer's grid as constants, so a compiled processor reads no row layout and no per-device cache."""

    def __init__(self, control: Control, context: BindContext, hook: type[LayerHook]):
        super().__init__(control, context.layers, control.steps)
        self.index = RowIndex()
        self._links: dict[Any, Links] = {}
        self._bias: dict[Any, torch.Tensor] = {}
        self._hook = hook
        self._edits: dict[Any, Edit] = {}

    def find_links(self, rows: RowLayout) -> Links:  # pragma: no cover - abstract
        raise NotImplementedError

    def links(self, rows: RowLayout) -> Links:
        """(targets, sources per target): the rows that read others, and which (equally many per target)."""
        found = self._links.get(rows.rows)
        if found is None:
            found = self._links[rows.rows] = self.find_links(rows)
        return found

    def edit(self, layer: LayerInfo, frame: DenoiserCall) -> Edit | None:
        if self.control.strength == 0 or not self.active(frame.step):
            return None
        links = self.links(frame.rows)
        if not links[0]:
            return None
        geometry = frame.geometry(layer)
        key = (links, geometry.image_hw, geometry.frames, geometry.image_len)
        found = self._edits.get(key)
        if found is None:
            found = self._edits[key] = Edit(hooks=(self._hook(self, links, geometry, frame_device(frame)),))
        return found

    def call_links(self, call: AttentionCall, links: Links) -> Links:
        """The links of the rows the call's tensors hold: the edit's, or inside another hook's restricted rows, the
        links of those rows."""
        return links if call.row_source is None else self.links(call.rows)

    def tensor(self, positions: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """An index tensor of `positions`: cached per device when eager; a constant of the graph when compiled."""
        if torch.compiler.is_compiling():
            return torch.tensor(positions, dtype=torch.long, device=device)
        return self.index(positions, device)

    def finish(self) -> None:
        self.index.clear()


def frame_device(frame: DenoiserCall) -> torch.device:
    """The device of the denoiser call's first tensor input (where the constants of its edits are made)."""
    for value in (frame.inputs or {}).values():
        if isinstance(value, torch.Tensor):
            return value.device
    return torch.device("cpu")


def on_device(table: torch.Tensor, device: torch.device, make) -> torch.Tensor:
    """`table` (made by the edit) when it is on `device`, else `make(device)` (the same table, made there)."""
    return table if table.device == device else make(device)


class _ConsistentBound(LinkedKeysBound):
    def __init__(self, control: ConsistentSubjects, context: BindContext):
        super().__init__(control, context, AppendedKeysHook)
        self.prompt_rows = context.prompt_rows
        if control.reference is not None and control.reference >= context.prompt_rows:
            raise ConfigError(
                f"ConsistentSubjects.reference is prompt row {control.reference}, but the call has {context.prompt_rows} "
                "prompt row(s) (prompts x num_images_per_prompt)"
            )

    def find_links(self, rows: RowLayout) -> Links:
        reference = self.control.reference
        if reference is not None:
            linked = rows.linked(lambda prompt: reference)
            targets = tuple(i for i, s in enumerate(linked) if s is not None)
            return targets, tuple((linked[i],) for i in targets)
        others = [rows.linked(lambda prompt, k=k: (prompt + k) % self.prompt_rows) for k in range(1, self.prompt_rows)]
        targets = tuple(i for i in range(len(rows)) if others and all(o[i] is not None for o in others))
        return targets, tuple(tuple(o[i] for o in others) for i in targets)

    def source_bias(self, geometry, device, dtype) -> torch.Tensor:
        """(image_len,) logit bias of one source's image keys: log(strength) inside the subject, -inf outside."""
        key = (geometry.image_hw, geometry.frames, device, dtype)
        found = self._bias.get(key)
        if found is None:
            inside = box_mask(self.control.subject, geometry.image_hw, geometry.frames)
            bias = torch.full(inside.shape, -math.inf, dtype=torch.float32)
            bias[inside] = math.log(self.control.strength)
            found = self._bias[key] = bias.to(device=device, dtype=dtype)
        return found

class AppendedKeysHook(LayerHook):
    """The target rows' image queries attend to their own keys plus the source rows' image keys, with the source
    bias (`bound.source_bias`); the other rows (and text queries) go through the rest of the chain unchanged."""

    def __init__(self, bound: Any, links: Links = ((), ()), geometry: Any = None, device: Any = None):
        self.bound = bound
        self.links = links
        self.bias = None if geometry is None else bound.source_bias(geometry, device, torch.float32)

    def attend(self, call: AttentionCall, q, k, v, spec: AttentionSpec, compute):
        targets, sources = self.bound.call_links(call, self.links)
        if not targets:
            return compute(q, k, v, spec)
        batch = q.shape[0]
        index = self.bound.tensor
        target_index = index(targets, q.device)
        bias = on_device(self.bias, q.device, lambda device: self.bound.source_bias(call.geometry, device, torch.float32))
        own = appended_attention(call, q, k, v, spec, target_index, [index(tuple(s[j] for s in sources), q.device) for j in range(len(sources[0]))],
                                 bias)
        chosen = set(targets)
        rest = tuple(i for i in range(batch) if i not in chosen)
        if not rest:
            return own, None
        kept = index(rest, q.device)
        with restricted_rows(call, rest):
            out, _ = compute(q.index_select(0, kept), k.index_select(0, kept), v.index_select(0, kept), spec_rows(spec, kept, batch))
        full = out.new_empty((batch,) + tuple(out.shape[1:]))
        full.index_copy_(0, kept, out)
        full.index_copy_(0, target_index, own.to(out.dtype))
        return full, None


def appended_attention(call, q, k, v, spec: AttentionSpec, targets: torch.Tensor, sources: list[torch.Tensor],
                       bias: torch.Tensor) -> torch.Tensor:
    """(m, H, Nq, D): rows `targets`; image queries over [own keys; each source's image keys (+ bias)], text queries
    (joint layers) over their own keys."""
    batch = q.shape[0]
    geometry = call.geometry
    text = call.layer.text
    image = slice(0, k.shape[2]) if text == "none" else geometry.image_slice
    if text == "keys":
        raise ConfigError(f"attnctl: layer {call.layer.name} is cross-attention; appended image keys act on self- and joint attention")
    qt, kt, vt = q.index_select(0, targets), k.index_select(0, targets), v.index_select(0, targets)
    mask = spec.attn_mask
    if mask is not None and mask.ndim == 4 and mask.shape[0] == batch and batch > 1:
        mask_t = mask.index_select(0, targets)
    else:
        mask_t = mask
    image_q = slice(0, q.shape[2]) if text == "none" else image
    keys = [kt] + [k.index_select(0, s)[:, :, image] for s in sources]
    values = [vt] + [v.index_select(0, s)[:, :, image] for s in sources]
    n_own = kt.shape[2]
    n_img = image.stop - image.start
    key_bias = torch.cat([bias.new_zeros(n_own)] + [bias] * len(sources))[None, :].expand(qt.shape[0], -1)
    attn_mask = None
    if mask_t is not None:
        own_mask = as_additive(mask_t, torch.float32)
        if own_mask.shape[-2] > 1:
            own_mask = own_mask[..., image_q, :]
        attn_mask = torch.cat([own_mask, own_mask.new_zeros(own_mask.shape[:-1] + (n_img * len(sources),))], dim=-1)
    out_image = backend_op(call, qt[:, :, image_q], torch.cat(keys, dim=2), torch.cat(values, dim=2),
                           AttentionSpec(scale=spec.scale, attn_mask=attn_mask, key_bias=key_bias.to(q.dtype)))[0]
    if text == "none":
        return out_image
    txt = geometry.text_slice
    text_mask = None
    if mask_t is not None:
        text_mask = mask_t[..., txt, :] if mask_t.shape[-2] > 1 else mask_t
    out_text = backend_op(call, qt[:, :, txt], kt, vt, AttentionSpec(scale=spec.scale, attn_mask=text_mask))[0]
    parts = (out_text, out_image) if txt.start < image.start else (out_image, out_text)
    return torch.cat(parts, dim=2)



