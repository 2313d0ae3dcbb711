"""An independent eager reference of region control, written from docs/methods.md "Regions" (and the documented
choices of attnctl's README: labels for joint attention and isolation, the joint soft-mask blend).

It does not use `attnctl.controls.regions`: masks are rasterised on a fine pixel grid and average-pooled, attention is an
explicit float64 softmax with dense masks built from per-token categories, and it runs on a *stock* pipeline
through its own attention processors (`set_attn_processor`) and, for joint models, its own wrapper of the
transformer's `forward` that appends the region tokens (uncond rows get the negative prompt's tokens there,
which are invisible to everything else).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

FINE = 192  # fine raster (per axis) for boxes; test boxes use multiples of 1/64 and grids dividing 192


# -- masks ------------------------------------------------------------------------------------------------------
def rasterise(shape: Any) -> torch.Tensor:
    """A box (relative x0, y0, x1, y1) as a FINE x FINE 0/1 raster (pixel centres inside), or a mask tensor as is."""
    if isinstance(shape, tuple):
        x0, y0, x1, y1 = shape
        centres = (torch.arange(FINE, dtype=torch.float64) + 0.5) / FINE
        rows = (centres >= y0) & (centres < y1)
        cols = (centres >= x0) & (centres < x1)
        return (rows[:, None] & cols[None, :]).double()
    return torch.as_tensor(shape, dtype=torch.float64)


def on_grid(shape: Any, grid: tuple[int, int]) -> torch.Tensor:
    return F.adaptive_avg_pool2d(rasterise(shape)[None, None], grid)[0, 0].reshape(-1)


@dataclass
class RefLayout:
    weights: torch.Tensor  # (R, N) m_r(x)
    total: torch.Tensor  # (N,) M(x)
    labels: list[int]  # (N,) 0 background, r+1 region r


def ref_layout(shapes: list[Any], grid: tuple[int, int]) -> RefLayout:
    coverage = torch.stack([on_grid(s, grid) for s in shapes])  # (R, N)
    total = coverage.sum(0)
    weights = torch.where(total > 1, coverage / total, coverage)
    labels = []
    for cell in range(coverage.shape[1]):
        values = coverage[:, cell].tolist()
        best = max(values)
        winner = max(r for r, value in enumerate(values) if value == best)  # ties: the later region
        labels.append(winner + 1 if best >= 0.5 else 0)
    return RefLayout(weights, weights.sum(0), labels)


def isolation_bias(labels: list[int], subjects: list[bool], strength: float) -> torch.Tensor:
    """-strength between two tokens of two different subject regions (labels r+1), 0 elsewhere."""
    label = torch.tensor(labels)
    subject = torch.tensor([False] + list(subjects))[label]  # label 0 (background) is never a subject
    apart = (label[:, None] != label[None, :]) & subject[:, None] & subject[None, :]
    return torch.where(apart, torch.tensor(-strength, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64))


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Explicit softmax attention in float64; q (H, N, D), k and v (H, M, D)."""
    logits = (q.double() @ k.double().transpose(-1, -2)) * q.shape[-1] ** -0.5
    if bias is not None:
        logits = logits + bias
    return torch.softmax(logits, -1) @ v.double()


# -- the state of one reference run ----------------------------------------------------------------------------
@dataclass
class RefState:
    shapes: list[Any]
    subjects: list[bool]
    base_ratio: float
    isolate: bool
    strength: float
    grids: dict[int, tuple[int, int]]  # image token count -> grid
    region_context: torch.Tensor | None = None  # (R, T, C) cross-attention region context (after caption projection)
    region_bias: torch.Tensor | None = None  # (R, T) additive padding bias (PixArt)
    cond_rows: list[int] = field(default_factory=list)
    # joint
    base_len: int = 0
    region_len: int = 0
    text_first: bool = False
    rule: str = "open"  # "chen": Chen et al.'s code (image tokens see their own region only; background no text)

    def layout(self, n: int) -> RefLayout:
        return ref_layout(self.shapes, self.grids[n])

    @property
    def regions(self) -> int:
        return len(self.shapes)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)


class RefClassicProcessor:
    """UNet / PixArt attention (AttnProcessor2_0 math) with regions on cross layers and isolation on self layers."""

    def __init__(self, state: RefState, cross: bool, isolate_here: bool, regions_here: bool = True):
        self.state, self.cross, self.isolate_here, self.regions_here = state, cross, isolate_here, regions_here

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        state = self.state
        batch, n, _ = hidden_states.shape
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q = _heads(attn.to_q(hidden_states), attn.heads)
        k = _heads(attn.to_k(context), attn.heads)
        v = _heads(attn.to_v(context), attn.heads)
        out = torch.empty(batch, attn.heads, n, v.shape[-1], dtype=torch.float64)
        for row in range(batch):
            bias = None
            if attention_mask is not None:  # (B, 1, T) additive, from the model
                bias = attention_mask[row].double()
            cond = row in state.cond_rows
            if not self.cross and self.isolate_here and state.isolate:  # isolation: every row, uncond rows too
                layout = state.layout(n)
                bias = isolation_bias(layout.labels, state.subjects, state.strength)
            base = softmax_attention(q[row], k[row], v[row], bias)
            if self.cross and self.regions_here and cond and state.base_ratio < 1:
                layout = state.layout(n)
                b = state.base_ratio
                mixed = (1 - (1 - b) * layout.total)[None, :, None] * base
                for r in range(state.regions):
                    ctx = state.region_context[r : r + 1].to(hidden_states.dtype)
                    rk = _heads(attn.to_k(ctx), attn.heads)[0]
                    rv = _heads(attn.to_v(ctx), attn.heads)[0]
                    rbias = None if state.region_bias is None else state.region_bias[r].double()[None, :]
                    mixed = mixed + (1 - b) * layout.weights[r][None, :, None] * softmax_attention(q[row], rk, rv, rbias)
                base = mixed
            out[row] = base
        hidden = _merge(out).to(hidden_states.dtype)
        hidden = attn.to_out[0](hidden)
        return attn.to_out[1](hidden)


# -- joint attention --------------------------------------------------------------------------------------------
def joint_categories(state: RefState, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per position of the extended sequence: is_image, image label, is_base_text, region text id (-1: none)."""
    t = state.base_len + state.regions * state.region_len
    length = n + t
    is_image = torch.zeros(length, dtype=torch.bool)
    image_label = torch.zeros(length, dtype=torch.long)
    is_base = torch.zeros(length, dtype=torch.bool)
    region_id = torch.full((length,), -1, dtype=torch.long)
    image_start, text_start = (t, 0) if state.text_first else (0, n)
    is_image[image_start : image_start + n] = True
    image_label[image_start : image_start + n] = torch.tensor(state.layout(n).labels)
    is_base[text_start : text_start + state.base_len] = True
    for r in range(state.regions):
        start = text_start + state.base_len + r * state.region_len
        region_id[start : start + state.region_len] = r
    return is_image, image_label, is_base, region_id


def joint_bias(state: RefState, n: int, cond: bool, isolate: bool) -> torch.Tensor:
    """The dense (S, S) additive mask of docs/methods.md's joint rules (uncond rows: region text hidden); `isolate`: the
    image x image isolation bias (every row of a layer the control acts on, uncond rows too)."""
    is_image, label, is_base, region = joint_categories(state, n)
    length = len(is_image)
    allowed = torch.zeros(length, length, dtype=torch.bool)
    extra = torch.zeros(length, length, dtype=torch.float64)
    for i in range(length):
        if is_image[i]:
            if cond and state.rule == "chen":  # Chen et al.'s regional stream: own region's image and text only
                allowed[i] = (is_image & (label == label[i])) | ((region == label[i] - 1) if label[i] > 0 else False)
            elif cond and label[i] > 0:
                allowed[i] = is_image | (region == label[i] - 1)
            else:
                allowed[i] = is_image | is_base
        elif is_base[i]:
            allowed[i] = is_image | is_base
        else:
            r = int(region[i])
            allowed[i] = (is_image & (label == r + 1)) | (region == r) if cond else (region == r)
    if isolate:
        image = torch.nonzero(is_image).flatten()
        extra[image[:, None], image[None, :]] = isolation_bias(label[image].tolist(), state.subjects, state.strength)
    return torch.where(allowed, extra, torch.full_like(extra, float("-inf")))


def joint_attention(state: RefState, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n: int, active: bool = True) -> torch.Tensor:
    """q, k, v (B, H, S, D) over the extended sequence -> (B, H, S, D) float64 per docs/methods.md and the blend.

    A layer outside the control's layers (`active=False`) treats every row as an uncond row: the stock
    attention for image and base text, region text hidden."""
    out = torch.empty(q.shape[:3] + (v.shape[-1],), dtype=torch.float64)
    is_image, label, is_base, _ = joint_categories(state, n)
    base_keys = torch.nonzero(is_image | is_base).flatten()
    image = torch.nonzero(is_image).flatten()
    layout = state.layout(n)
    for row in range(q.shape[0]):
        cond = active and row in state.cond_rows
        masked = softmax_attention(q[row], k[row], v[row], joint_bias(state, n, cond, active and state.isolate))
        if cond:
            base_bias = torch.zeros(len(image), len(base_keys), dtype=torch.float64)
            if state.isolate:  # image x image isolation; the base text stays visible to every image token
                image_keys = torch.nonzero(is_image[base_keys]).flatten()
                base_bias[:, image_keys] = isolation_bias(label[image].tolist(), state.subjects, state.strength)
            base = softmax_attention(q[row][:, image], k[row][:, base_keys], v[row][:, base_keys], base_bias)
            share = torch.ones_like(layout.total) if state.rule == "chen" else layout.total  # Chen et al.: every token
            w = ((1 - state.base_ratio) * share)[None, :, None]
            masked[:, image] = (1 - w) * base + w * masked[:, image]
        out[row] = masked
    return out


class RefFluxProcessor:
    def __init__(self, state: RefState, active: bool = True):
        self.state, self.active = state, active

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None, **kwargs):
        from diffusers.models.embeddings import apply_rotary_emb

        def split(x):
            return x.unflatten(-1, (-1, attn.head_dim))

        q, k, v = split(attn.to_q(hidden_states)), split(attn.to_k(hidden_states)), split(attn.to_v(hidden_states))
        q, k = attn.norm_q(q), attn.norm_k(k)
        if encoder_hidden_states is not None:
            eq = attn.norm_added_q(split(attn.add_q_proj(encoder_hidden_states)))
            ek = attn.norm_added_k(split(attn.add_k_proj(encoder_hidden_states)))
            ev = split(attn.add_v_proj(encoder_hidden_states))
            q, k, v = torch.cat([eq, q], 1), torch.cat([ek, k], 1), torch.cat([ev, v], 1)
        q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
        k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        text = self.state.base_len + self.state.regions * self.state.region_len
        n = q.shape[1] - text
        out = joint_attention(self.state, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), n, self.active)
        hidden = out.transpose(1, 2).flatten(2, 3).to(hidden_states.dtype)
        if encoder_hidden_states is None:
            return hidden
        context, hidden = hidden[:, :text], hidden[:, text:]
        return attn.to_out[1](attn.to_out[0](hidden)), attn.to_add_out(context)


class RefSD3Processor:
    def __init__(self, state: RefState, active: bool = True):
        self.state, self.active = state, active

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        n = hidden_states.shape[1]
        q, k, v = (_heads(f(hidden_states), attn.heads) for f in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        if encoder_hidden_states is None:  # SD3.5's image-only attn2: isolation on every row
            labels = self.state.layout(n).labels
            out = torch.stack([
                softmax_attention(q[row], k[row], v[row],
                                  isolation_bias(labels, self.state.subjects, self.state.strength)
                                  if self.active and self.state.isolate else None)
                for row in range(q.shape[0])
            ])
            return attn.to_out[1](attn.to_out[0](_merge(out).to(hidden_states.dtype)))
        eq, ek, ev = (_heads(f(encoder_hidden_states), attn.heads) for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        if attn.norm_added_q is not None:
            eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
        out = joint_attention(self.state, torch.cat([q, eq], 2), torch.cat([k, ek], 2), torch.cat([v, ev], 2), n, self.active)
        out = _merge(out).to(hidden_states.dtype)
        hidden, context = out[:, :n], out[:, n:]
        if not attn.context_pre_only:
            context = attn.to_add_out(context)
        hidden = attn.to_out[1](attn.to_out[0](hidden))
        return hidden, context


def install_joint_reference(pipe: Any, state: RefState, region_embeds: torch.Tensor, negative_embeds: torch.Tensor | None, cfg: bool,
                            active: Any = None):
    """Reference processors on every attention layer (`active(name)`: the control acts there; default all), and a
    forward wrapper appending region tokens; returns an undo."""
    transformer = pipe.transformer
    saved = dict(transformer.attn_processors)
    flux = state.text_first
    kind = RefFluxProcessor if flux else RefSD3Processor
    transformer.set_attn_processor({name: kind(state, True if active is None else active(name)) for name in saved})
    original = transformer.forward

    def forward(*args, **kwargs):
        context = kwargs["encoder_hidden_states"]
        batch = context.shape[0]
        state.cond_rows = list(range(batch // 2, batch)) if cfg else list(range(batch))
        rows = []
        for row in range(batch):
            source = region_embeds if row in state.cond_rows else negative_embeds
            rows.append(source.reshape(-1, source.shape[-1]).to(context.dtype))
        kwargs["encoder_hidden_states"] = torch.cat([context, torch.stack(rows)], 1)
        if flux:
            ids = kwargs["txt_ids"]
            kwargs["txt_ids"] = torch.cat([ids, torch.zeros(state.regions * state.region_len, ids.shape[-1], dtype=ids.dtype)], 0)
        return original(*args, **kwargs)

    transformer.forward = forward

    def undo():
        del transformer.forward
        transformer.set_attn_processor(saved)

    return undo
