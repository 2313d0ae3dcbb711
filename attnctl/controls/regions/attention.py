"""What region control does inside attention layers (docs/methods.md "Regions").

Cross-attention (UNet, PixArt): a `LayerHook.attend` computes the base attention as the layer would, one
attention per region over that region's own text keys (projected with the layer's own `to_k` / `to_v`),
and blends on the cond rows

    out(x) = (1 - (1-b) M(x)) Attn(q_x, base) + (1-b) sum_r m_r(x) Attn(q_x, region r).

Region attentions are batched; each region only computes the queries where its weight is nonzero
(gathered, padded per chunk), and chunks are sized so that memory stays about that of one attention output
whatever the number of regions.

Joint attention (SD3 `[image; text]`, Flux `[text; image]`): the region prompts' tokens are appended after the
base text (`RegionsBound.transform_inputs`), and one masked softmax, expressed as token labels plus an allow
table (`LabelMask`), applies the rules of docs/methods.md; the image outputs are then blended with the unmasked base
attention (over image + base text) by the base ratio. See `joint_table` for the rules and `JointHook` for
the soft-mask semantics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ...errors import CallLayoutError, ConfigError, UnsupportedError
from ...kernels.semantics import spec_tokens
from ...kernels.spec import AttentionSpec
from ...processors.chain import TokenLayout, backend_op, restricted_rows, restricted_tokens
from ...processors.edit import AttendFn, AttentionCall, LayerHook

if TYPE_CHECKING:
    from .control import RegionsBound

NEG_INF = float("-inf")


# -- region keys and values in a cross-attention layer ---------------------------------------------------------------
def project_context(attn: Any, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values (R, H, T, D) of text `context` (R, T, C) as the layer's processor computes them."""
    if attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    if getattr(attn, "fused_projections", False):
        kv = attn.to_kv(context)
        key, value = torch.split(kv, kv.shape[-1] // 2, dim=-1)
    else:
        key, value = attn.to_k(context), attn.to_v(context)
    head_dim = key.shape[-1] // attn.heads
    key = key.view(context.shape[0], -1, attn.heads, head_dim).transpose(1, 2)
    value = value.view(context.shape[0], -1, attn.heads, head_dim).transpose(1, 2)
    original = getattr(getattr(attn, "processor", None), "original", None)
    if attn.norm_k is not None and type(original).__name__ != "IPAdapterAttnProcessor2_0":  # as the processor does
        key = attn.norm_k(key)
    return key, value


def _weight_dtype(module: torch.nn.Module) -> torch.dtype:
    for parameter in module.parameters():
        return parameter.dtype
    return torch.float32


@dataclass(frozen=True)
class RegionChunk:
    """Regions `start:stop`, each with the query cells where its weight is nonzero, padded to one length."""

    start: int
    stop: int
    index: torch.Tensor  # (C, S) int64 cell indices (padding: 0)
    weight: torch.Tensor  # (C, S) float: m_r at those cells (padding: 0)


def region_chunks(weights: torch.Tensor, budget: int) -> tuple[RegionChunk, ...]:
    """Group regions into chunks whose padded query count C * S stays within `budget` (at least one region each)."""
    supports = [torch.nonzero(w > 0).flatten() for w in weights]
    chunks: list[RegionChunk] = []
    start = 0
    while start < len(supports):
        stop, longest = start + 1, len(supports[start])
        while stop < len(supports) and (stop + 1 - start) * max(longest, len(supports[stop])) <= budget:
            longest = max(longest, len(supports[stop]))
            stop += 1
        width = max(longest, 1)
        index = torch.zeros(stop - start, width, dtype=torch.long)
        weight = torch.zeros(stop - start, width, dtype=weights.dtype)
        for row, r in enumerate(range(start, stop)):
            cells = supports[r]
            index[row, : len(cells)] = cells
            weight[row, : len(cells)] = weights[r, cells]
        chunks.append(RegionChunk(start, stop, index, weight))
        start = stop
    return tuple(chunks)


class CrossHook(LayerHook):
    """Regional prompts in a cross-attention layer (UNet, PixArt); see the module docstring."""

    def __init__(self, bound: RegionsBound):
        self.bound = bound

    def attend(self, call: AttentionCall, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec, compute: AttendFn):
        out, lse = compute(q, k, v, spec)
        cond = call.rows.indices("cond")
        if not cond:
            return out, lse
        bound = self.bound
        grid = call.geometry.image_hw
        layout = bound.layout(grid)
        n = layout.weights.shape[1]
        if q.shape[2] != n:
            raise CallLayoutError(f"attnctl: Regions expected {n} image queries ({grid[0]}x{grid[1]}) at {call.layer.name}, got {q.shape[2]}")
        rows = bound.index(cond, q.device)
        qc = q.index_select(0, rows)
        batch, heads, _, head_dim = qc.shape
        keys, values = project_context(call.module, bound.text_embeds(q.device, _weight_dtype(call.module)))
        keys, values = keys.to(q.dtype), values.to(v.dtype)
        padding = bound.text_bias(q.device, q.dtype)  # (R, 1, 1, T) or None
        total = keys.new_zeros(batch, heads, n, head_dim, dtype=torch.float32)
        for chunk in bound.chunks(grid, q.device):
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
        keep = bound.blend_weight(grid, q.device, "keep")  # (1, 1, N, 1): 1 - (1 - b) M(x)
        blended = keep * out.index_select(0, rows).float() + (1.0 - bound.base_ratio) * total
        return out.index_copy(0, rows, blended.to(out.dtype)), lse


# -- joint attention ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class JointSequence:
    """Token layout of a joint layer with region text appended after the base text."""

    image_len: int
    base_len: int
    region_lens: tuple[int, ...]
    text_first: bool

    @property
    def text_len(self) -> int:
        return self.base_len + sum(self.region_lens)

    @property
    def length(self) -> int:
        return self.image_len + self.text_len

    @property
    def image_slice(self) -> slice:
        start = self.text_len if self.text_first else 0
        return slice(start, start + self.image_len)

    @property
    def text_start(self) -> int:
        return 0 if self.text_first else self.image_len

    def region_slice(self, r: int) -> slice:
        start = self.text_start + self.base_len + sum(self.region_lens[:r])
        return slice(start, start + self.region_lens[r])

    def base_spans(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """Image and base-text positions as (start, stop) spans, in sequence order (the stock sequence)."""
        image = (self.image_slice.start, self.image_slice.stop)
        text = (self.text_start, self.text_start + self.base_len)
        return (text, image) if self.text_first else (image, text)

    def base_positions(self) -> torch.Tensor:
        """Image and base-text positions, in sequence order (the stock sequence)."""
        return torch.cat([torch.arange(start, stop) for start, stop in self.base_spans()])

    def labels(self, image_labels: torch.Tensor, regions: int, cond: bool) -> torch.Tensor:
        """(S,) labels: image `image_labels` (0 background, r+1 region r); base text R+1; region r text R+2+r;
        hidden text 2R+2.

        Rows that are not cond rows get hidden region text (see `joint_table`); their image labels are the
        regions' only when isolation needs them (the caller passes zeros otherwise).
        """
        labels = torch.empty(self.length, dtype=torch.long)
        labels[self.image_slice] = image_labels
        labels[self.text_start : self.text_start + self.base_len] = regions + 1
        for r in range(len(self.region_lens)):
            labels[self.region_slice(r)] = regions + 2 + r if cond else 2 * regions + 2
        return labels


def isolation_table(subjects: tuple[bool, ...], strength: float) -> torch.Tensor:
    """(R+1, R+1) additive bias between image labels: -strength between two different subject regions."""
    regions = len(subjects)
    table = torch.zeros(regions + 1, regions + 1)
    for a in range(regions):
        for b in range(regions):
            if a != b and subjects[a] and subjects[b]:
                table[a + 1, b + 1] = -strength
    return table


def joint_table(subjects: tuple[bool, ...], isolate: bool, strength: float) -> torch.Tensor:
    """(2R+3, 2R+3) allow table of the masked joint softmax (0 allowed, -inf masked, -strength isolation).

    - an image token of region r (label r+1) attends to every image token and to region r's text;
    - a background image token (label 0) attends to every image token and to the base text;
    - the base text (R+1) attends to itself and every image token;
    - region r's text (R+2+r) attends to itself and to region r's image tokens;
    - hidden text (2R+2: the region tokens of uncond rows) attends only to hidden text, and nothing attends to it.

    With `isolate`, image tokens of two different subject regions get -strength between them.
    """
    regions = len(subjects)
    size = 2 * regions + 3
    table = torch.full((size, size), NEG_INF)
    image = slice(0, regions + 1)
    table[image, image] = isolation_table(subjects, strength) if isolate else 0.0
    base = regions + 1
    table[0, base] = 0.0
    table[base, image] = 0.0
    table[base, base] = 0.0
    for r in range(regions):
        text = regions + 2 + r
        table[r + 1, text] = 0.0
        table[text, r + 1] = 0.0
        table[text, text] = 0.0
    table[size - 1, size - 1] = 0.0
    return table


def base_table(subjects: tuple[bool, ...], isolate: bool, strength: float) -> torch.Tensor:
    """The allow table of the unmasked base attention (image + base text) in the joint label space: the blend's base
    attention, the rows that are not cond rows (their region text, if any, hidden), and isolation without region
    prompts."""
    regions = len(subjects)
    size = 2 * regions + 3
    table = torch.full((size, size), NEG_INF)
    image = slice(0, regions + 1)
    table[image, image] = isolation_table(subjects, strength) if isolate else 0.0
    table[image, regions + 1] = 0.0
    table[regions + 1, image] = 0.0
    table[regions + 1, regions + 1] = 0.0
    table[size - 1, size - 1] = 0.0
    return table


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

    def __init__(self, bound: RegionsBound):
        self.bound = bound

    def attend(self, call: AttentionCall, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec, compute: AttendFn):
        bound = self.bound
        sequence = bound.sequence(call)
        _check_tokens(call, q, sequence)
        out, lse = compute(q, k, v, spec)
        grid = call.geometry.image_hw
        if not bound.needs_blend(grid):
            return out, lse
        cond = call.rows.indices("cond")
        if not cond:
            return out, lse
        rows = bound.index(cond, q.device)
        image = sequence.image_slice
        positions = bound.base_positions(sequence, q.device)
        labels = bound.base_labels(sequence, grid, len(cond), q.device)
        base_spec = spec_tokens(
            spec, ((image.start, image.stop),), sequence.base_spans(), positions, rows=rows, labels=labels, where=f"layer {call.layer.name}"
        )
        qc = q.index_select(0, rows)[:, :, image]
        kc = k.index_select(0, rows).index_select(2, positions)
        vc = v.index_select(0, rows).index_select(2, positions)
        # the base attention runs through the other hooks as a sub-attention of the cond rows (PAG perturbs it too)
        tokens = TokenLayout.joint(sequence.image_len, sequence.base_len, sequence.text_first, queries="image")
        with restricted_rows(call, cond), restricted_tokens(call, tokens):
            base, _ = compute(qc, kc, vc, base_spec)
        weight = bound.blend_weight(grid, q.device, "region")  # (1, 1, N, 1): (1 - b) M(x)
        chosen = out.index_select(0, rows)
        mixed = (1.0 - weight) * base.float() + weight * chosen[:, :, image].float()
        chosen = torch.cat([chosen[:, :, : image.start], mixed.to(out.dtype), chosen[:, :, image.stop :]], dim=2)
        return out.index_copy(0, rows, chosen), lse


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

    def __init__(self, bound: RegionsBound):
        self.bound = bound

    def attend(self, call: AttentionCall, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec, compute: AttendFn):
        if spec.labels is not None:
            raise ConfigError(f"attnctl: Regions cannot share joint layer {call.layer.name} with another control's label mask")
        sequence = self.bound.sequence(call)
        _check_tokens(call, q, sequence)
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
