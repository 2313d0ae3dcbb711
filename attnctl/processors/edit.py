"""Edits: what controls change at one attention layer in one denoiser call, as plain data.

Kernel-level changes (per-key bias and value scale, label masks, windows, sparse attention, log-sum-exp)
go to the backend through `AttentionSpec`. Changes a kernel cannot express (perturbed rows, query
transforms, caches, token reduction, extra contexts) are `LayerHook`s, called by the processor at fixed
stages. Several controls on one layer merge their edits: biases add, value scales multiply, hooks run in
control order. What a control does to a layer is declared once, as effects (`EFFECT_TABLE`: what each
needs from the backend, and which cannot be shared): `apply` refuses controls whose effects conflict on a
shared layer (`CONFLICTS`), and an explicit backend that lacks a feature they need, before anything is
installed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..errors import ConfigError
from ..kernels.spec import AttentionSpec, LabelMask, Sparse, Window

if TYPE_CHECKING:
    from ..denoiser_call import DenoiserCall
    from ..families.base import Geometry, LayerInfo

AttendFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionSpec], tuple[torch.Tensor, torch.Tensor | None]]

@dataclass(frozen=True)
class Effect:
    """Something a control can do to one of its layers (`Control.layer_effects`): the one declaration that
    `apply` checks. `features` are what the backend must then be able to do (`AttentionSpec.features`);
    `exclusive`, when set, says why two controls cannot both do it on one layer."""

    name: str
    meaning: str
    features: tuple[str, ...] = ()
    exclusive: str | None = None


#: Every effect, in a fixed order.
EFFECT_TABLE: tuple[Effect, ...] = (
    Effect("tokens", "changes which tokens enter attention (ToMe, AgentAttention)", exclusive="two token reducers on one layer"),
    Effect("labels", "label masks (Regions)", ("labels",), exclusive="two label masks on one layer"),
    Effect("region_prompts", "separate attentions to region prompts (Regions on cross-attention)", exclusive="two sets of region prompts on one layer"),
    Effect("region_tokens", "adds text tokens to a joint sequence (Regions on SD3 / Flux)", exclusive="two sets of region text tokens on one layer"),
    Effect("window", "local attention (DiTFastAttn)", ("window",), exclusive="two windows on one layer"),
    Effect("sparse", "sparse attention on a query range (PLADIS)", ("sparse", "query_range"), exclusive="two sparse transforms on one layer"),
    Effect("query", "a query transform (SEG)"),
    Effect("capture", "reads the attention probabilities (AttentionMaps, SAG's capture layer)"),
    Effect("cache", "reuses outputs (TGATE, DiTFastAttn)", exclusive="two caches on one layer"),
    Effect("perturb", "identity rows (PAG)"),
    Effect("value_scale", "a per-key value scale (Reweight)", ("value_scale",)),
    Effect("key_bias", "a per-key logit bias (Reweight with normalize)", ("key_bias",)),
)
EFFECTS: tuple[str, ...] = tuple(effect.name for effect in EFFECT_TABLE)
_BY_NAME: dict[str, Effect] = {effect.name: effect for effect in EFFECT_TABLE}

#: Pairs of different effects that cannot share a layer, with why (each exclusive effect also conflicts with itself).
CONFLICTS: tuple[tuple[str, str, str], ...] = (
    ("tokens", "labels", "token reduction merges image tokens, and label masks address image tokens pairwise"),
    ("tokens", "region_tokens", "token reduction merges the image tokens that region text tokens are masked against"),
    ("tokens", "window", "token reduction merges image tokens, so the window's grid no longer matches them"),
    ("tokens", "query", "token reduction merges image tokens, so the query transform's grid no longer matches them"),
    ("tokens", "capture", "token reduction merges image tokens, so captured maps would not cover the image grid"),
    ("tokens", "cache", "token reduction changes the tokens whose outputs the cache stores and reuses"),
    ("sparse", "region_tokens", "the joint region mask and the sparse (entmax) transform are separate attention passes"),
    ("window", "region_tokens", "the joint region mask and the window are separate attention passes"),
) + tuple((effect.name, effect.name, effect.exclusive) for effect in EFFECT_TABLE if effect.exclusive)


def effect_conflict(first: str, second: str) -> str | None:
    """Why effects `first` and `second` of two controls cannot share a layer, or None when they can."""
    for a, b, why in CONFLICTS:
        if (first, second) in ((a, b), (b, a)):
            return why
    return None


def effect_features(effects: tuple[str, ...]) -> tuple[str, ...]:
    """The backend features `effects` need, in a fixed order, without repeats."""
    return tuple(dict.fromkeys(feature for name in effects for feature in _BY_NAME[name].features))


@dataclass
class AttentionCall:
    """What a hook knows about the attention call in progress."""

    layer: LayerInfo
    geometry: Geometry
    frame: DenoiserCall
    module: torch.nn.Module
    backend: str
    # Set while an outer hook runs the rest of the chain on some rows or tokens only (`processors.chain`):
    # the original batch position of each row the inner hooks see, and the token layout of the op they run.
    row_source: tuple[int, ...] | None = None
    token_layout: Any = None

    @property
    def rows(self):
        return self.frame.rows

    @property
    def step(self):
        return self.frame.step


class LayerHook:
    """Stages of a controlled attention call a control can take part in. Defaults change nothing.

    Tensor layouts: `hidden` (B, N, C) as the module receives it; `q_proj` (B, N, H*D) right after the query
    projection (before qk-norm and RoPE); q, k, v (B, H, N, D) as the attention op receives them; `out`
    (B, H, Nq, D) from the attention op; `result` what the module returns (a tensor, or (image, text) for
    joint layers).
    """

    #: True: the hook sits closest to the attention op at every stage (its `tokens_in` runs last, its `attend`
    #: is the innermost wrapper, its `result` runs first), whatever the control order. For hooks that change
    #: the token sequence or replace the op by calls of another shape (token merging, agent attention), so
    #: that the other hooks see the layer's own tokens and one attention op over q, k, v.
    innermost: ClassVar[bool] = False

    def reuse(self, call: AttentionCall, hidden: torch.Tensor, context: torch.Tensor | None) -> Any | None:
        """Return a module result to skip the whole computation (cached attention), or None."""
        return None

    def tokens_in(self, call: AttentionCall, hidden: torch.Tensor) -> torch.Tensor:
        return hidden

    def query(self, call: AttentionCall, q_proj: torch.Tensor) -> torch.Tensor:
        return q_proj

    def attend(
        self, call: AttentionCall, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec, compute: AttendFn
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return compute(q, k, v, spec)

    def result(self, call: AttentionCall, result: Any) -> Any:
        return result


@dataclass(frozen=True)
class Edit:
    """The changes at one layer for one denoiser call. See `AttentionSpec` for tensor shapes."""

    key_bias: torch.Tensor | None = None
    value_scale: torch.Tensor | None = None
    query_range: tuple[int, int] | None = None
    labels: LabelMask | None = None
    window: Window | None = None
    sparse: Sparse | None = None
    return_lse: bool = False
    hooks: tuple[LayerHook, ...] = field(default=())

    def spec(self, attn_mask: torch.Tensor | None = None, scale: float | None = None) -> AttentionSpec:
        return AttentionSpec(
            scale=scale,
            attn_mask=attn_mask,
            key_bias=self.key_bias,
            value_scale=self.value_scale,
            query_range=self.query_range,
            labels=self.labels,
            window=self.window,
            sparse=self.sparse,
            return_lse=self.return_lse,
        )

    @property
    def per_key(self) -> bool:
        return self.key_bias is not None or self.value_scale is not None or self.sparse is not None


def merge_edits(edits: list[Edit], where: str) -> Edit | None:
    """Combine the edits of several controls on one layer, or raise ConfigError on a conflict."""
    edits = [e for e in edits if e is not None]
    if not edits:
        return None
    if len(edits) == 1:
        return edits[0]
    key_bias = value_scale = labels = window = sparse = None
    query_range = None
    return_lse = False
    hooks: list[LayerHook] = []
    for edit in edits:
        if edit.per_key:
            if query_range is not None and edit.query_range != query_range and (key_bias is not None or value_scale is not None or sparse is not None):
                raise ConfigError(f"{where}: two controls edit keys for different query rows ({query_range} and {edit.query_range})")
            query_range = edit.query_range if edit.query_range is not None else query_range
        if edit.key_bias is not None:
            key_bias = edit.key_bias if key_bias is None else key_bias + edit.key_bias
        if edit.value_scale is not None:
            value_scale = edit.value_scale if value_scale is None else value_scale * edit.value_scale
        for name, value in (("labels", edit.labels), ("window", edit.window), ("sparse", edit.sparse)):
            if value is None:
                continue
            current = {"labels": labels, "window": window, "sparse": sparse}[name]
            if current is not None:  # apply refuses this from the controls' `layer_effects`: a declaration is wrong
                raise ConfigError(f"{where}: two controls both set {name} although their declared effects allowed it")
            if name == "labels":
                labels = value
            elif name == "window":
                window = value
            else:
                sparse = value
        return_lse = return_lse or edit.return_lse
        hooks.extend(edit.hooks)
    hooks.sort(key=lambda hook: hook.innermost)  # stable: control order otherwise
    return Edit(key_bias, value_scale, query_range, labels, window, sparse, return_lse, tuple(hooks))
