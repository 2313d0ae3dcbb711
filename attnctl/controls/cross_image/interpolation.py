"""Attention interpolation between two prompts (AID: He, Wang, Liu and Yao, NeurIPS 2024, "AID: Attention
Interpolation of Text-to-Image Diffusion", arXiv:2403.17924).

One pipeline call renders a sequence: prompt row 0 is the first endpoint (t = 0), the last prompt row the second
(t = 1), and every row between them is an interpolated image at its point t. An interpolated row reads the keys and
values of the two endpoint rows of the same branch in the same denoiser call (`RowLayout.linked`: uncond from
uncond, cond from cond, a perturbed copy from the copy with its tag), and replaces its attention at every selected
layer, with `K1, V1` the first endpoint's keys and values at that layer and `K2, V2` the second's:

- cross-attention (text keys only): inner `Attn(Q, (1-t) K1 + t K2, (1-t) V1 + t V2)`, outer
  `(1-t) Attn(Q, K1, V1) + t Attn(Q, K2, V2)`, with `K1, V1, K2, V2` the endpoints' text keys and values;
- self-attention, fused (AID's "fused interpolated attention"): the row keeps its own keys and the endpoints'
  are appended: inner `Attn(Q, [K; (1-t) K1 + t K2], [V; (1-t) V1 + t V2])`, outer
  `(1-t) Attn(Q, [K; K1], [V; V1]) + t Attn(Q, [K; K2], [V; V2])`;
- joint attention (SD3, Flux, ...): the row's image queries over its own image keys and, in place of its own text
  keys, the endpoints' text keys (and, fused, the endpoints' image keys): inner
  `Attn(Q, [K_img; (1-t) K1_img + t K2_img; (1-t) K1_txt + t K2_txt])`, outer `(1-t) Attn(Q, [K_img; K1_img;
  K1_txt]) + t Attn(Q, [K_img; K2_img; K2_txt])`; its text queries keep their stock attention. So `K1` / `K2` on
  joint attention are the endpoint rows' text-token keys at that layer, computed from their own text streams.

The endpoint rows are never changed. Nothing is materialised beyond one attention op per endpoint over the
concatenated keys (the own keys plus one endpoint's), on the handle's backend. The interpolation points come from
`beta_points` (AID §4.3: the inverse CDF of a Beta distribution at evenly spaced probabilities).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from ...control import BindContext, Bound, Control
from ...denoiser_call import DenoiserCall, RowLayout, upload
from ...errors import ConfigError
from ...families.base import LayerInfo, ModelAdapter
from ...kernels.semantics import spec_rows
from ...kernels.spec import AttentionSpec, as_additive
from ...processors.chain import backend_op, has_span, restricted_rows
from ...processors.edit import AttentionCall, Edit, LayerHook
from ...selection import LayerSpec, validate_layers
from ...steps import validate_steps
from ...validation import choice, number, plain_scalar, refuse_unused, set_field
from ..common import RowIndex, keep_kinds

MODES: tuple[str, ...] = ("inner", "outer")
#: Default Beta parameters, alpha = beta (symmetric: the two prompts are treated alike); see `beta_points`.
DEFAULT_BETA: float = 2.0
#: The largest Beta parameter taken: the grid that inverts the CDF resolves the distribution up to 400 (at 400 the
#: quartiles lie within 0.012 of t = 1/2; above it the mass underflows).
BETA_MAX: float = 400.0


def beta_points(n: int, alpha: float = DEFAULT_BETA, beta: float = DEFAULT_BETA) -> tuple[float, ...]:
    """The n interpolation points of AID §4.3: `t_i = F^-1(i / (n-1))`, F the CDF of Beta(alpha, beta).

    AID observes that the images of a linear schedule change little near the endpoints and jump in the middle, and
    draws the points from a Beta distribution with alpha, beta > 1 so that they crowd where the change is fast
    (the paper then picks alpha, beta per pair by Bayesian optimisation of the smoothness; attnctl takes them as
    given). `t_0 = 0` and `t_{n-1} = 1` exactly. Computed in float64 on a fine grid (no scipy), rounded to 9 digits;
    alpha or beta below 1 are accepted (the density is then infinite at an end) and computed as accurately.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ConfigError(f"beta_points: n must be an integer >= 2 (the two endpoints included), got {n!r}")
    alpha = number(alpha, "beta_points alpha", minimum=0, exclusive_minimum=True, maximum=BETA_MAX)
    beta = number(beta, "beta_points beta", minimum=0, exclusive_minimum=True, maximum=BETA_MAX)
    return _beta_points(n, float(alpha), float(beta))


@functools.lru_cache(maxsize=64)
def _beta_points(n: int, alpha: float, beta: float) -> tuple[float, ...]:
    """`beta_points` of validated arguments, once per (n, alpha, beta): a bound call asks at every call."""
    # The density x^(a-1) (1-x)^(b-1) is integrated per cell of a fine grid with its singular factor exactly: on the
    # left half x^(a-1) (the other factor at the cell's midpoint), on the right half (1-x)^(b-1); the same form
    # inverts the CDF inside a cell. Exact for Beta(a, 1) and Beta(1, b), accurate to ~1e-9 otherwise, a or b < 1
    # included (their density is infinite at an end).
    grid = 200_000
    edges = torch.linspace(0, 1, grid + 1, dtype=torch.float64)
    lo, hi = edges[:-1], edges[1:]
    mid = (lo + hi) / 2
    left = mid < 0.5
    mass = torch.where(
        left,
        torch.exp((beta - 1) * torch.log1p(-mid)) * (hi**alpha - lo**alpha) / alpha,
        torch.exp((alpha - 1) * torch.log(mid)) * ((1 - lo) ** beta - (1 - hi) ** beta) / beta,
    )
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(mass, 0)])
    cdf = cdf / cdf[-1]
    points = [0.0]
    for i in range(1, n - 1):
        p = i / (n - 1)
        j = int(torch.searchsorted(cdf, torch.tensor(p, dtype=torch.float64)).item())
        below, above = cdf[j - 1].item(), cdf[j].item()
        frac = 0.0 if above == below else (p - below) / (above - below)
        a, b = edges[j - 1].item(), edges[j].item()
        if left[j - 1]:  # within the cell the CDF grows as x^alpha
            t = (a**alpha + frac * (b**alpha - a**alpha)) ** (1 / alpha)
        else:  # as -(1 - x)^beta
            t = 1 - ((1 - a) ** beta - frac * ((1 - a) ** beta - (1 - b) ** beta)) ** (1 / beta)
        points.append(round(t, 9))
    points.append(1.0)
    return tuple(points)


@dataclass(frozen=True)
class AttentionInterpolation(Control, type_name="attention-interpolation"):
    """Interpolate between the first and the last prompt of a call at the attention level (AID, He et al. 2024).

    The call's prompt rows are the sequence: row 0 is the first endpoint, the last row the second, the rows between
    are the interpolated images (`attnctl.interpolate` builds such a call). `points`: the t of every prompt row
    (0 first, 1 last, non-decreasing), or None for `beta_points(rows, alpha, beta)`. `mode`: "outer" (AID's
    default, a mix of the two attentions) or "inner" (attention over mixed keys and values). `self_attention`:
    fuse the endpoints' keys into the self-attention of the interpolated rows (AID's fused attention; on joint
    attention, the endpoints' image keys beside their text keys). `layers`: a selection (default every
    cross- / joint layer, and every self-attention layer with `self_attention`). `steps`: the step window.
    `to` and `n` are for `attnctl.Model.generate` and `attnctl render` jobs: with `to` set, the job's prompt is the
    first endpoint, `to` the second, and one call renders `n` images (`len(points)` when points are given).
    """

    points: tuple[float, ...] | None = None
    mode: str = "outer"
    alpha: float = DEFAULT_BETA
    beta: float = DEFAULT_BETA
    self_attention: bool = True
    layers: LayerSpec = None
    steps: tuple[float, float] = (0.0, 1.0)
    to: str | None = None
    n: int = 5

    def __post_init__(self) -> None:
        if self.to is not None and not isinstance(self.to, str):
            raise ConfigError(f"AttentionInterpolation.to must be None or the second prompt (a string), got {self.to!r}")
        n = plain_scalar(self.n)
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise ConfigError(f"AttentionInterpolation.n must be an integer >= 2 (the two endpoints included), got {self.n!r}")
        set_field(self, "n", int(n))
        choice(self.mode, "AttentionInterpolation.mode", MODES)
        set_field(self, "alpha", number(self.alpha, "AttentionInterpolation.alpha", minimum=0, exclusive_minimum=True, maximum=BETA_MAX))
        set_field(self, "beta", number(self.beta, "AttentionInterpolation.beta", minimum=0, exclusive_minimum=True, maximum=BETA_MAX))
        if not isinstance(self.self_attention, bool):
            raise ConfigError(f"AttentionInterpolation.self_attention must be True or False, got {self.self_attention!r}")
        if self.points is not None:
            if not isinstance(self.points, (list, tuple)) or len(self.points) < 2:
                raise ConfigError(
                    f"AttentionInterpolation.points must be None or a list of at least 2 numbers (0 first, 1 last), got {self.points!r}"
                )
            points = tuple(number(p, f"AttentionInterpolation.points[{i}]", minimum=0, maximum=1) for i, p in enumerate(self.points))
            if points[0] != 0 or points[-1] != 1 or any(b < a for a, b in zip(points, points[1:])):
                raise ConfigError(
                    f"AttentionInterpolation.points must start at 0, end at 1 and never decrease, got {self.points!r}"
                )
            set_field(self, "points", points)
            for name in ("alpha", "beta"):
                refuse_unused(self, name, "with points given (it shapes the Beta distribution the points come from when points=None)")
            if self.n != len(points):
                refuse_unused(self, "n", f"with points given (a sequence renders len(points) = {len(points)} images)")
        set_field(self, "layers", validate_layers(self.layers, name="AttentionInterpolation.layers"))
        set_field(self, "steps", validate_steps(self.steps, name="AttentionInterpolation.steps"))

    def kinds(self) -> tuple[str, ...]:
        return ("cross", "joint", "self") if self.self_attention else ("cross", "joint")

    def select(self, adapter: ModelAdapter) -> tuple[LayerInfo, ...]:
        layers = Control.select(self, adapter)
        return keep_kinds(layers, self.kinds(), type(self).__name__, "cross-, joint or self-attention", self.layers)

    def layer_effects(self, adapter: ModelAdapter, layer: LayerInfo) -> tuple[str, ...]:
        """"linked_keys": the interpolated rows attend to the endpoint rows' keys and values."""
        return ("linked_keys",)

    def call_effects(self, adapter: ModelAdapter) -> tuple[str, ...]:
        """"row_links": the interpolated rows attend to the endpoint rows' keys and values."""
        return ("row_links",)

    def compile_refusal(self, adapter: ModelAdapter) -> str | None:
        return None  # the edit hands its hook the row links as constants (tests/test_compile_controls.py)

    def point_list(self, rows: int) -> tuple[float, ...]:
        """The t of each of `rows` prompt rows."""
        if self.points is None:
            return beta_points(rows, self.alpha, self.beta) if rows >= 2 else (0.0,) * rows
        if len(self.points) != rows:
            raise ConfigError(
                f"AttentionInterpolation has {len(self.points)} points, but the call has {rows} prompt row(s) "
                "(prompts x num_images_per_prompt): give one point per prompt row"
            )
        return self.points

    def bind(self, context: BindContext) -> _InterpolationBound:
        return _InterpolationBound(self, context)


def sequence_prompts(prompt_a: str, prompt_b: str, points: tuple[float, ...]) -> list[str]:
    """The prompt of each row of an interpolation call: the endpoints' own, and for an interpolated row the nearer
    endpoint's (t < 0.5: the first). That prompt gives the row's pooled embeddings (SDXL, SD3, Flux) and, on joint
    families, the start of its text stream; its image tokens read only the endpoints' text at the selected layers."""
    prompts = [prompt_a if t < 0.5 else prompt_b for t in points]
    prompts[0], prompts[-1] = prompt_a, prompt_b
    return prompts


@dataclass(frozen=True)
class RowLinks:
    """Within one row layout: the interpolated rows, their two endpoint rows (positions in the batch) and their t."""

    targets: tuple[int, ...]
    first: tuple[int, ...]
    last: tuple[int, ...]
    t: tuple[float, ...]


def interpolation_links(rows: RowLayout, points: tuple[float, ...]) -> RowLinks:
    """Which rows are interpolated and which rows they read (the first and last prompt rows of the same branch)."""
    count = len(points)
    interior = lambda prompt, end: end if 0 < prompt < count - 1 else None  # noqa: E731
    first = rows.linked(lambda prompt: interior(prompt, 0))
    last = rows.linked(lambda prompt: interior(prompt, count - 1))
    targets = tuple(i for i in range(len(rows)) if first[i] is not None and last[i] is not None)
    return RowLinks(
        targets, tuple(first[i] for i in targets), tuple(last[i] for i in targets),
        tuple(points[rows.rows[i].prompt] for i in targets),
    )


class _InterpolationBound(Bound):
    layers_only = True  # the interpolated rows' attention at its layers (the rows' prompts are the call's own)

    def __init__(self, control: AttentionInterpolation, context: BindContext):
        super().__init__(control, context.layers, control.steps)
        if context.prompt_rows < 2:
            raise ConfigError(
                "attnctl: AttentionInterpolation makes images between the first and the last prompt row of a call, and this "
                "call makes 1 image: give a list of prompts [prompt_a, ..., prompt_b], or use attnctl.interpolate(pipe, a, b, n=5)"
            )
        images = context.images_per_prompt
        if images is not None and images > 1:  # rows 0 and n-1 would be one prompt's first image and another's last
            raise ConfigError(
                f"attnctl: AttentionInterpolation interpolates between the first and the last prompt row of a call, and "
                f"num_images_per_prompt={images} makes {images} rows of each prompt, whose extra images would be "
                "interpolated between them; call with one image per prompt (attnctl.interpolate does), once per seed"
            )
        self.points = control.point_list(context.prompt_rows)
        self.index = RowIndex()
        self._links: dict[tuple[Any, ...], RowLinks] = {}
        self._t: dict[tuple[Any, ...], torch.Tensor] = {}
        self._edits: dict[RowLinks, Edit] = {}

    def idle_reason(self, count: int) -> str | None:
        """Two prompt rows are the two endpoints (t = 0 and t = 1): nothing between them is interpolated (a tested
        identity, so the handle warns rather than refuses)."""
        if len(self.points) == 2:
            return (
                "the call has 2 prompt rows, and both are endpoints (t = 0 and t = 1), so nothing is interpolated and "
                "the output is the stock one; give at least 3 prompts [prompt_a, ..., prompt_b] (or n >= 3)"
            )
        return super().idle_reason(count)

    def links(self, rows: RowLayout) -> RowLinks:
        found = self._links.get(rows.rows)
        if found is None:
            found = self._links[rows.rows] = interpolation_links(rows, self.points)
        return found

    def tensor(self, positions: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """An index tensor of `positions`: cached per device when eager; a constant of the graph when compiled."""
        if torch.compiler.is_compiling():
            return torch.tensor(positions, dtype=torch.long, device=device)
        return self.index(positions, device)

    def t_tensor(self, links: RowLinks, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return torch.tensor(links.t, dtype=dtype, device=device).view(-1, 1, 1, 1)
        key = (links.t, device, dtype)
        found = self._t.get(key)
        if found is None:
            found = self._t[key] = upload(torch.tensor(links.t, dtype=dtype), device).view(-1, 1, 1, 1)
        return found

    def edit(self, layer: LayerInfo, frame: DenoiserCall) -> Edit | None:
        if not self.active(frame.step):
            return None
        links = self.links(frame.rows)
        if not links.targets:
            return None
        found = self._edits.get(links)
        if found is None:
            found = self._edits[links] = Edit(hooks=(InterpolationHook(self, links),))
        return found

    def finish(self) -> None:
        self.index.clear()


class InterpolationHook(LayerHook):
    """The interpolated rows' attention at one layer (the module docstring's definition); the other rows go through
    the rest of the hook chain. `links`: the frame's, found by the edit (a compiled processor reads no row layout);
    inside another hook's restricted rows, found from the call's rows."""

    def __init__(self, bound: _InterpolationBound, links: RowLinks | None = None):
        self.bound = bound
        self.links = links

    def attend(self, call: AttentionCall, q, k, v, spec: AttentionSpec, compute):
        links = self.links if self.links is not None and call.row_source is None else self.bound.links(call.rows)
        if not links.targets:
            return compute(q, k, v, spec)
        batch = q.shape[0]
        index = self.bound.tensor
        targets = index(links.targets, q.device)
        first = index(links.first, q.device)
        last = index(links.last, q.device)
        t = self.bound.t_tensor(links, q.device, q.dtype)
        own = _interpolated_rows(call, self.bound.control, q, k, v, spec, targets, first, last, t)
        chosen = set(links.targets)
        rest = tuple(i for i in range(batch) if i not in chosen)
        kept = index(rest, q.device)
        with restricted_rows(call, rest):
            out, _ = compute(q.index_select(0, kept), k.index_select(0, kept), v.index_select(0, kept), spec_rows(spec, kept, batch))
        full = out.new_empty((batch,) + tuple(out.shape[1:]))
        full.index_copy_(0, kept, out)
        full.index_copy_(0, targets, own.to(out.dtype))
        return full, None


def _mask_part(mask: torch.Tensor | None, rows: torch.Tensor, batch: int, queries: slice | None, keys: slice | None) -> torch.Tensor | None:
    """The model's mask (B|1, H|1, Nq|1, Nk) for some rows, query span and key span (None: all)."""
    if mask is None:
        return None
    if mask.ndim < 4:
        mask = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))
    if mask.shape[0] == batch and batch > 1:
        mask = mask.index_select(0, rows)
    if has_span(queries) and mask.shape[-2] > 1:
        mask = mask[..., queries, :]
    if has_span(keys):
        mask = mask[..., keys]
    return mask


def _cat_masks(parts: list[tuple[torch.Tensor | None, int]], dtype: torch.dtype) -> torch.Tensor | None:
    """Additive masks of consecutive key spans, one mask over their concatenation (None when none is masked)."""
    present = [m for m, _ in parts if m is not None]
    if not present:
        return None
    present = [as_additive(m, dtype) for m in present]
    rows = max(m.shape[0] for m in present)
    heads = max(m.shape[1] for m in present)
    queries = max(m.shape[2] for m in present)
    ref = present[0]
    out = []
    for mask, n in parts:
        if mask is None:
            out.append(ref.new_zeros((rows, heads, queries, n)))
        else:
            out.append(as_additive(mask, dtype).expand(rows, heads, queries, n))
    return torch.cat(out, dim=-1)


def _combine_masks(a: torch.Tensor | None, b: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A key of mixed keys is masked only where both endpoints mask it."""
    if a is None or b is None:
        return None
    return torch.maximum(as_additive(a, dtype), as_additive(b, dtype))


def _interpolated_rows(call, control: AttentionInterpolation, q, k, v, spec: AttentionSpec, targets, first, last, t):
    """(m, H, Nq, D): the attention output of the interpolated rows `targets` (module docstring)."""
    batch = q.shape[0]
    text = call.layer.text
    mask = spec.attn_mask
    dtype = q.dtype
    qt = q.index_select(0, targets)
    k1, v1, k2, v2 = k.index_select(0, first), v.index_select(0, first), k.index_select(0, last), v.index_select(0, last)
    kt, vt = k.index_select(0, targets), v.index_select(0, targets)

    def op(queries, keys, values, attn_mask):
        return backend_op(call, queries, keys, values, AttentionSpec(scale=spec.scale, attn_mask=attn_mask))[0]

    def mix(own_k, own_v, own_mask, spans_1, spans_2, queries):
        """spans_e: list of (keys, values, mask, length) of endpoint e, appended after the own keys."""
        own = [] if own_k is None else [(own_k, own_v, own_mask, own_k.shape[2])]
        if control.mode == "inner":
            parts = own + [
                ((1 - t) * a[0] + t * b[0], (1 - t) * a[1] + t * b[1], _combine_masks(a[2], b[2], dtype) if (a[2] is not None or b[2] is not None) else None, a[3])
                for a, b in zip(spans_1, spans_2)
            ]
            keys = torch.cat([p[0] for p in parts], dim=2)
            values = torch.cat([p[1] for p in parts], dim=2)
            return op(queries, keys, values, _cat_masks([(p[2], p[3]) for p in parts], dtype))
        outs = []
        for spans in (spans_1, spans_2):
            parts = own + spans
            keys = torch.cat([p[0] for p in parts], dim=2)
            values = torch.cat([p[1] for p in parts], dim=2)
            outs.append(op(queries, keys, values, _cat_masks([(p[2], p[3]) for p in parts], dtype)))
        return (1 - t) * outs[0] + t * outs[1]

    if text == "keys":  # cross-attention: the endpoints' text keys replace the row's own
        def span(kk, vv, rows):
            return [(kk, vv, _mask_part(mask, rows, batch, None, None), kk.shape[2])]
        return mix(None, None, None, span(k1, v1, first), span(k2, v2, last), qt)
    if text == "none":  # self-attention, fused: own keys kept, the endpoints' appended
        def span(kk, vv, rows):
            return [(kk, vv, _mask_part(mask, rows, batch, None, None), kk.shape[2])]
        return mix(kt, vt, _mask_part(mask, targets, batch, None, None), span(k1, v1, first), span(k2, v2, last), qt)
    # joint attention
    geometry = call.geometry
    image, txt = geometry.image_slice, geometry.text_slice
    if q.shape[2] != geometry.query_len or k.shape[2] != geometry.query_len:
        raise ConfigError(
            f"attnctl: AttentionInterpolation at {call.layer.name} expected {geometry.query_len} joint tokens, got "
            f"{q.shape[2]} queries and {k.shape[2]} keys: another control changed the token sequence"
        )

    def span(kk, vv, rows):
        found = [(kk[:, :, txt], vv[:, :, txt], _mask_part(mask, rows, batch, image, txt), txt.stop - txt.start)]
        if control.self_attention:
            found.insert(0, (kk[:, :, image], vv[:, :, image], _mask_part(mask, rows, batch, image, image), image.stop - image.start))
        return found

    image_out = mix(
        kt[:, :, image], vt[:, :, image], _mask_part(mask, targets, batch, image, image), span(k1, v1, first), span(k2, v2, last),
        qt[:, :, image],
    )
    text_out = op(qt[:, :, txt], kt, vt, _mask_part(mask, targets, batch, txt, None))
    parts = (text_out, image_out) if txt.start < image.start else (image_out, text_out)
    return torch.cat(parts, dim=2)


__all__ = ["AttentionInterpolation", "beta_points", "sequence_prompts", "interpolation_links", "RowLinks", "MODES", "DEFAULT_BETA"]
