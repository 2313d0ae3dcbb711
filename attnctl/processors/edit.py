"""Edits: what controls change at one attention layer in one denoiser call, as plain data.

Kernel-level changes (per-key bias and value scale, label masks, windows, sparse attention, log-sum-exp)
go to the backend through `AttentionSpec`. Changes a kernel cannot express (perturbed rows, query
transforms, caches, token reduction, extra contexts) are `LayerHook`s, called by the processor at fixed
stages. Several controls on one layer merge their edits: biases add, value scales multiply, hooks run in
control order (but for `LayerHook.edits_values` and `LayerHook.links_rows` hooks, outermost in that order, and
`LayerHook.inside_others` and `LayerHook.innermost` hooks, nearest the op in that order). What a control does to
a layer is declared once, as effects (`EFFECT_TABLE`: what each needs from the backend, and which cannot be
shared): `apply` refuses controls whose effects conflict on a shared layer (`CONFLICTS`), and an explicit backend
that lacks a feature they need, before anything is installed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..kernels.semantics import EDIT_FIELDS, edits_keys, merge_specs
from ..kernels.spec import IMAGE_QUERIES, PLAIN, AttentionSpec

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
    Effect("joint_perturb", "the perturbed rows' image x image block masked to its diagonal over the layer's own image "
           "tokens (PAG on a joint layer)"),
    Effect("value_scale", "a per-key value scale (Reweight)", ("value_scale",)),
    Effect("value_edit", "replaces the text values of the cond rows (Structured Diffusion Guidance)", exclusive="two value replacements on one layer"),
    Effect("key_bias", "a per-key logit bias (Reweight with normalize)", ("key_bias",)),
    Effect(
        "linked_keys", "some rows attend to keys and values of other rows of the batch (attention interpolation, "
        "consistent subjects, reference attention)", ("key_bias",), exclusive="two cross-image links on one layer",
    ),
    Effect("linked_rows", "rows read another row's queries, keys and attention (Prompt-to-Prompt)",
           exclusive="two controls linking batch rows on one layer"),
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
    ("tokens", "joint_perturb", "token reduction merges image tokens, and PAG's joint-attention identity (the image "
     "block's diagonal) is defined over the layer's own image tokens, not over merged ones"),
    ("sparse", "region_tokens", "the joint region mask and the sparse (entmax) transform are separate attention passes"),
    ("window", "region_tokens", "the joint region mask and the window are separate attention passes"),
    ("tokens", "linked_rows", "token reduction merges each row's tokens differently, so one row's keys no longer match another's values"),
    ("region_tokens", "linked_rows", "appended region text tokens are not part of the prompts whose tokens are aligned"),
    ("cache", "linked_rows", "a reused output skips the linked attention"),
    ("cache", "capture", "a reused output skips the attention whose probabilities the capture reads, so the steps it "
     "reuses would be missing from the maps (or the loss)"),
    ("linked_keys", "linked_rows", "two controls linking batch rows on one layer"),
) + tuple(
    ("linked_keys", other, "the linked rows attend to other rows' keys in their own attention op, which does not carry "
     "this edit over to the appended keys")
    for other in ("tokens", "labels", "region_prompts", "region_tokens", "window", "sparse", "capture", "cache", "perturb",
                  "value_scale", "value_edit", "key_bias")
)
CONFLICTS += tuple((effect.name, effect.name, effect.exclusive) for effect in EFFECT_TABLE if effect.exclusive)


#: What a control does to a pipeline call as a whole, whatever its layers (`Control.call_effects`): name -> meaning.
CALL_EFFECTS: dict[str, str] = {
    "row_links": "some rows of the call are computed from other rows of the call (their attention, keys and values, "
    "features or latents): Prompt-to-Prompt, ConsistentSubjects, ReferenceAttention, AttentionInterpolation",
    "latent_loss": "the call's latents are moved by the gradient of the images' summed loss through the denoiser "
    "(AttendExcite, AStar, BoxGuidance)",
    "base_words_in_boxes": "the loss pulls the base prompt's words' joint-attention maps inside their boxes (BoxGuidance "
    "on SD3 / Flux and the other joint-attention families)",
    "regions_hide_base_text": "image tokens inside a region read their region's prompt instead of the base prompt "
    "(Regions' joint rule, on SD3 / Flux and the other joint-attention families)",
}

#: Pairs of call effects that cannot be in one call, on any layers, with why.
CALL_CONFLICTS: tuple[tuple[str, str, str], ...] = (
    ("latent_loss", "row_links", "the loss pass applies the row links, so the loss of a linked row would differentiate "
     "through, and move, the row it reads (Prompt-to-Prompt's base row, ConsistentSubjects' reference, "
     "AttentionInterpolation's endpoints, ReferenceAttention's noised reference), and the optimiser's update would overwrite latents the linking control "
     "sets itself"),
    ("base_words_in_boxes", "regions_hide_base_text", "inside a region a base word's map is 0 under Regions' joint rule, "
     "so the box loss stays at its maximum with no gradient and BoxGuidance would not move the latent (on a UNet or "
     "PixArt, where the region rule is a blend of cross-attentions, the two compose)"),
)


def call_conflict(first: str, second: str) -> str | None:
    """Why call effects `first` and `second` of two controls cannot be in one call, or None when they can."""
    for a, b, why in CALL_CONFLICTS:
        if (first, second) in ((a, b), (b, a)):
            return why
    return None


#: Effects whose result a cache stores with the output it reuses: they hold over the reused steps only when they act at
#: every step (a step window would be bypassed where the cache reuses an output made outside it, or carried past it).
HELD_BY_CACHE: tuple[str, ...] = (
    "labels", "region_prompts", "region_tokens", "window", "sparse", "value_scale", "value_edit", "key_bias",
)
# (PAG's and SEG's rows exist only inside their window, and the caches key outputs by row tag: not in the list.)


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
    # The rows of a restricted call (`processors.chain.restricted_rows`); None: the frame's rows. Kept apart from
    # the frame so that restricting rows copies no frame (a compiled processor would guard on every field it copies).
    row_layout: Any = None

    @property
    def rows(self):
        return self.frame.rows if self.row_layout is None else self.row_layout

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
    #: True: the hook's `attend` sits inside every other hook's but the `innermost` ones, whatever the control order.
    #: For hooks that compute some rows themselves instead of the op (PAG's identity rows): the other controls'
    #: per-row edits (Regions' region prompts and base blend, Prompt-to-Prompt's links of perturbed copies) then
    #: reach those rows too, as their definitions say, instead of only when listed first.
    inside_others: ClassVar[bool] = False
    #: True: the hook's `attend` sits outside every other hook's but the `edits_values` ones, whatever the control
    #: order. For hooks that make some rows attend with other rows' queries and keys (Prompt-to-Prompt's links): the
    #: attention the other controls add from a row's queries (Regions' region prompts) is then linked too, as the
    #: link's definition says of the row's cross-attention, and a row the link runs in parts (refine's own part, one
    #: more copy of the row) is still one row to them (`processors.chain.own_rows`).
    links_rows: ClassVar[bool] = False
    #: True: the hook's `attend` sits outside every other hook's, whatever the control order. For hooks that change
    #: the values a row attends to as that row's own (Structured Diffusion Guidance's averaged values): a
    #: `links_rows` hook then maps and splits the changed values, as it does a row's own.
    edits_values: ClassVar[bool] = False

    def reuse(self, call: AttentionCall, hidden: torch.Tensor, context: torch.Tensor | None) -> Any | None:
        """Return a module result to skip the whole computation (cached attention), or None."""
        return None

    def window_rows(self) -> int | None:
        """How many batch rows this hook runs window attention on (0: none), when it knows before the layer runs;
        None: unknown (the edit's own window then counts for every row). A compiled forward checks the windows'
        dense masks against the traced backend's limit before it starts (`Runtime.prefill_edits`)."""
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


@dataclass(frozen=True, init=False)
class Edit:
    """The changes at one layer for one denoiser call: the kernel-level edits as an `AttentionSpec` (`kernel`;
    its `scale` and `attn_mask` are the call's, filled in by `spec`) and the `hooks`.

    `Edit(key_bias=..., query_range=..., hooks=...)` takes the spec's edit fields as keywords, and they read back
    as attributes (`edit.key_bias`), so the field list is the spec's alone. See `AttentionSpec` for tensor shapes.
    """

    kernel: AttentionSpec = PLAIN
    hooks: tuple[LayerHook, ...] = field(default=())

    def __init__(self, kernel: AttentionSpec | None = None, hooks: tuple[LayerHook, ...] = (), **edits: Any):
        if kernel is not None and edits:
            raise TypeError("Edit takes either kernel=AttentionSpec(...) or the spec's fields as keywords, not both")
        if "scale" in edits or "attn_mask" in edits:
            raise TypeError("Edit: `scale` and `attn_mask` are the attention call's, not an edit")
        object.__setattr__(self, "kernel", kernel if kernel is not None else AttentionSpec(**edits) if edits else PLAIN)
        object.__setattr__(self, "hooks", tuple(hooks))

    def __hash__(self) -> int:
        return hash((tuple(getattr(self.kernel, name) for name in sorted(EDIT_FIELDS)), self.hooks))

    def __getattr__(self, name: str) -> Any:  # only for names that are not attributes: the spec's edit fields
        if name in EDIT_FIELDS:
            return getattr(self.kernel, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def spec(self, attn_mask: torch.Tensor | None = None, scale: float | None = None, geometry: Geometry | None = None) -> AttentionSpec:
        """The spec of the attention call at the layer of `geometry` (its `IMAGE_QUERIES` made its image rows)."""
        kernel = self.kernel
        if kernel.query_range == IMAGE_QUERIES:
            image = geometry.image_slice
            kernel = dataclasses.replace(kernel, query_range=(image.start, image.stop))
        if attn_mask is None and scale is None and kernel.attn_mask is None and kernel.scale is None:
            return kernel  # the common call: no copy of the spec per attention call
        return dataclasses.replace(kernel, scale=scale, attn_mask=attn_mask)

    @property
    def per_key(self) -> bool:
        return edits_keys(self.kernel)


def image_queries(image: slice, frame: DenoiserCall) -> tuple[int, int] | str:
    """An edit's `query_range` over its layer's image queries `image`: the range, or in a compiled forward
    `IMAGE_QUERIES`, which the processor makes the range inside the graph from its symbolic sizes."""
    return IMAGE_QUERIES if frame.compiled else (image.start, image.stop)


def merge_edits(edits: list[Edit], where: str) -> Edit | None:
    """Combine the edits of several controls on one layer (`kernels.semantics.merge_specs` for the kernel
    edits), or raise ConfigError on a conflict."""
    edits = [e for e in edits if e is not None]
    if not edits:
        return None
    if len(edits) == 1:
        return edits[0]
    kernel = merge_specs([edit.kernel for edit in edits], where)
    hooks: list[LayerHook] = []
    for edit in edits:
        hooks.extend(edit.hooks)
    # outermost first: value edits, row links, the others, `inside_others`, `innermost`; stable: control order otherwise
    hooks.sort(key=lambda hook: (hook.innermost, hook.inside_others, not hook.edits_values, not hook.links_rows))
    return Edit(kernel, tuple(hooks))
