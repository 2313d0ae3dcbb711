"""Consistent subjects across the images of one call: each image's self-attention also reads the subject tokens of
a reference image, or of every other image.

StoryDiffusion (Zhou et al. 2024, "StoryDiffusion: Consistent Self-Attention for Long-Range Image and Video
Generation", arXiv:2405.01434): consistent self-attention, where each image of a batch attends to tokens of the
other images besides its own; IR-Diffusion (He et al. 2024, "Improving Multi-Subject Consistency in Open-Domain
Image Generation with Isolation and Reposition Attention", arXiv:2411.19261) restricts the shared tokens to the
subjects, keeps two subjects apart (isolation attention) and moves a reference subject to where the subject stands
in the target (reposition attention). Here: for a target row with own keys `K, V` and source rows `s` (the
reference row, or every other prompt row, of the same branch: `RowLayout.linked`), the image queries attend to

    softmax(Q [K; K_s1; K_s2; ...]ᵀ scale + [0; b_s1; b_s2; ...] + I) [V; V_s1; V_s2; ...]

with `b_s = log(strength)` on the source's subject tokens and `-inf` on its other image tokens (no subject: every
image token of the source), and `I` the isolation mask (-inf between a query of subject i and a key of subject
j != i, own or appended; 0 elsewhere). Subject tokens: a box, a mask, or a word whose cross-attention map
(head-averaged, from the previous step of the same call, normalised by its maximum) is at least `threshold`.
Reposition: the appended keys of subject i are the source's tokens in the reference box resampled (nearest cell)
onto the cells of the target box. Self-attention layers; on joint attention the image queries over the image and
text keys plus the sources' keys (text queries stock). The source rows are not changed. docs/methods.md
("Consistent subjects") gives the definitions and choices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ...control import BindContext, Bound, Control
from ...denoiser_call import DenoiserCall, RowLayout, upload
from ...errors import ConfigError, TokenError, UnsupportedError
from ...families.base import LayerInfo, ModelAdapter
from ...kernels import prepare_traced_labels
from ...kernels.semantics import block_bias, spec_rows
from ...kernels.spec import AttentionSpec, LabelMask, as_additive
from ...processors.chain import backend_op, restricted_rows, token_layout
from ...processors.edit import AttentionCall, Edit, LayerHook
from ...selection import LayerSpec, select_layers, validate_layers
from ...steps import StepInfo, validate_steps
from ...tokens import WordQuery, describe_query, explicit_position, validate_word_query
from ...validation import integer, number, plain_scalar, refuse_unused, set_field
from ..common import TEXT_KINDS, RowIndex, keep_kinds, text_layers
from ..maps.capture import key_columns, word_attention
from ..regions.masks import area_matrix, box_mask, load_mask, resize_mask, validate_box

Box = tuple[float, float, float, float]
Subject = Box | WordQuery

#: The default threshold on a word's normalised attention map (its maximum over the image is 1).
SUBJECT_THRESHOLD = 0.5


def optional_box(value: Any, owner: str) -> Box | None:
    """None, or a box validated as Regions validates its boxes."""
    return None if value is None else validate_box(value, owner=owner)


def _is_box(value: Any) -> bool:
    return (isinstance(value, (tuple, list)) and len(value) == 4
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value))


def _subjects(value: Any) -> tuple[Subject, ...] | None:
    """None, or the subjects: each a box (x0, y0, x1, y1) or a word query (word, phrase, (word, occurrence), token)."""
    owner = "ConsistentSubjects.subject"
    if value is None:
        return None
    if _is_box(value):
        return (validate_box(value, owner=owner),)
    if isinstance(value, (str, int)) or (isinstance(value, (tuple, list)) and len(value) == 2 and isinstance(value[0], str)
                                         and isinstance(value[1], int) and not isinstance(value[1], bool)):
        return (validate_word_query(value, owner=owner),)
    if isinstance(value, (tuple, list)) and value:
        out = tuple(validate_box(item, owner=f"{owner}[{i}]") if _is_box(item) else validate_word_query(item, owner=f"{owner}[{i}]")
                    for i, item in enumerate(value))
        if len(set(out)) != len(out):
            raise ConfigError(f"{owner} has duplicates: {out!r}")
        return out
    raise ConfigError(
        f"{owner} must be None, a box (x0, y0, x1, y1), a word (or (word, occurrence), or a token position), or a list of "
        f"them (one per subject), got {value!r}"
    )


def _masks(value: Any) -> tuple[torch.Tensor, ...] | None:
    """None, or one (H, W) float mask in [0, 1] per subject (a list of masks: several subjects; nested lists from a
    job file are read as one mask when they are 2-D)."""
    owner = "ConsistentSubjects.mask"
    if value is None:
        return None
    if isinstance(value, list) and value and isinstance(value[0], list) and value[0] and isinstance(value[0][0], (int, float)):
        value = torch.tensor(value, dtype=torch.float64)
    if isinstance(value, (tuple, list)):
        if not value:
            raise ConfigError(f"{owner} must be a mask or a non-empty list of masks, got {value!r}")
        items = [torch.tensor(m, dtype=torch.float64) if isinstance(m, list) else m for m in value]
        return tuple(load_mask(m, owner=f"{owner}[{i}]") for i, m in enumerate(items))
    return (load_mask(value, owner=owner),)


def _reposition(value: Any) -> tuple[tuple[Box, Box], ...] | None:
    """None, or one (reference box, target box) pair per subject."""
    owner = "ConsistentSubjects.reposition"
    if value is None:
        return None
    pairs = (value,) if isinstance(value, (tuple, list)) and len(value) == 2 and _is_box(value[0]) else value
    if not isinstance(pairs, (tuple, list)) or not pairs:
        raise ConfigError(f"{owner} must be None, a (reference box, target box) pair, or a list of pairs, got {value!r}")
    out = []
    for i, pair in enumerate(pairs):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ConfigError(f"{owner}[{i}] must be a (reference box, target box) pair, got {pair!r}")
        out.append((validate_box(pair[0], owner=f"{owner}[{i}][0]"), validate_box(pair[1], owner=f"{owner}[{i}][1]")))
    return tuple(out)


@dataclass(frozen=True)
class ConsistentSubjects(Control, type_name="consistent-subjects"):
    """Every image of the call also attends to the subject tokens of a reference image (StoryDiffusion's consistent
    self-attention, restricted to the subjects as IR-Diffusion does, with its isolation and reposition attention).

    `reference`: the prompt row every other row reads (default 0), or None: every row reads every other row.
    `subject`: what the source rows share: None (every image token), a box (x0, y0, x1, y1) in relative coordinates,
    a word of the prompts (the tokens where its attention map is at least `threshold` of its maximum; `(word,
    occurrence)` and token positions as every control takes them), or a list of boxes / words, one per subject.
    `mask`: instead of `subject`, a mask (tensor, array or PIL image, [0, 1], stretched over the image; cells whose
    area average is at least `threshold`) or a list of masks, one per subject. `strength`: a factor on the attention
    the shared tokens get (the logit bias is log(strength); 0 is off). `layers`: self-attention (and joint attention)
    layers, all by default. `steps`: the step window. `threshold`: in (0, 1]. `map_layers`: the cross-attention (or
    joint) layers whose maps select a word's tokens, all by default. `isolate`: a target's subject-i queries do not
    attend to another subject's tokens, its own or appended (IR-Diffusion's isolation attention). `reposition`: a
    (reference box, target box) pair per subject: the reference's subject tokens are resampled from the first box onto
    the second before they are appended (IR-Diffusion's reposition attention; needs `reference`, replaces
    `subject`; refused on rotary-position families). `sample_rate` in (0, 1]: StoryDiffusion's random sampling of the
    source images' tokens, a fresh subset at each step shared by every layer, query and image of that step
    (`sampled_tokens`, seeded by `seed`); 1 (default) appends them all.
    """

    reference: int | None = 0
    subject: Any = None
    strength: float = 1.0
    layers: LayerSpec = None
    steps: tuple[float, float] = (0.0, 1.0)
    mask: Any = None
    threshold: float = SUBJECT_THRESHOLD
    map_layers: LayerSpec = None
    isolate: bool = False
    reposition: Any = None
    sample_rate: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        reference = plain_scalar(self.reference)
        if reference is not None and (isinstance(reference, bool) or not isinstance(reference, int) or reference < 0):
            raise ConfigError(f"ConsistentSubjects.reference must be None or a prompt row index >= 0, got {self.reference!r}")
        set_field(self, "reference", None if reference is None else int(reference))
        set_field(self, "subject", _subjects(self.subject))
        set_field(self, "mask", _masks(self.mask))
        set_field(self, "reposition", _reposition(self.reposition))
        set_field(self, "strength", number(self.strength, "ConsistentSubjects.strength", minimum=0))
        set_field(self, "layers", validate_layers(self.layers, name="ConsistentSubjects.layers"))
        set_field(self, "steps", validate_steps(self.steps, name="ConsistentSubjects.steps"))
        threshold = number(self.threshold, "ConsistentSubjects.threshold", minimum=0)
        if not 0 < threshold <= 1:
            raise ConfigError(f"ConsistentSubjects.threshold must be in (0, 1], got {self.threshold!r}")
        set_field(self, "threshold", threshold)
        set_field(self, "map_layers", validate_layers(self.map_layers, name="ConsistentSubjects.map_layers"))
        rate = number(self.sample_rate, "ConsistentSubjects.sample_rate", minimum=0, maximum=1)
        if rate <= 0:
            raise ConfigError(f"ConsistentSubjects.sample_rate must be in (0, 1], got {self.sample_rate!r}")
        set_field(self, "sample_rate", rate)
        set_field(self, "seed", integer(self.seed, "ConsistentSubjects.seed", minimum=0))
        if not isinstance(self.isolate, bool):
            raise ConfigError(f"ConsistentSubjects.isolate must be True or False, got {self.isolate!r}")
        given = [name for name in ("subject", "mask", "reposition") if getattr(self, name) is not None]
        if len(given) > 1:
            raise ConfigError(f"ConsistentSubjects: give one of subject, mask or reposition (reposition's boxes are the subjects), got {' and '.join(given)}")
        if self.reposition is not None and self.reference is None:
            raise ConfigError("ConsistentSubjects.reposition maps a reference subject into the target: it needs reference=<prompt row>, got reference=None")
        if self.isolate and not given:
            raise ConfigError("ConsistentSubjects.isolate keeps subjects apart: give the subjects (subject=, mask= or reposition=)")
        if self.map_layers is not None and not self.words:
            raise ConfigError("ConsistentSubjects.map_layers selects the maps of subject words; subject gives no word")
        if not self.words and self.mask is None:
            refuse_unused(self, "threshold", "without a word subject or a mask (it selects the tokens of a word's map or a mask)")
        if self.sample_rate == 1:
            refuse_unused(self, "seed", "with sample_rate=1 (it seeds the random sampling of the shared tokens: give sample_rate < 1)")

    @property
    def step_cache_refusal(self) -> str | None:  # type: ignore[override]
        """Word subjects read the word maps of every map layer at every step; boxes and masks need no layer's maps."""
        if self.words:
            return ("its word subjects are selected by the word maps of its map layers at every step, and the cache skips "
                    "layers (or blocks) on some steps, so those maps would be silently missing")
        return None

    # -- what the subjects are ----------------------------------------------------------------------------------
    @property
    def words(self) -> tuple[WordQuery, ...]:
        """The subjects given as words (selected by their attention maps)."""
        return tuple(s for s in (self.subject or ()) if not _is_box(s))

    @property
    def subject_count(self) -> int:
        for value in (self.subject, self.mask, self.reposition):
            if value is not None:
                return len(value)
        return 0

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ConsistentSubjects):
            return NotImplemented
        fields = ("reference", "subject", "strength", "layers", "steps", "threshold", "map_layers", "isolate", "reposition",
                  "sample_rate", "seed")
        if any(getattr(self, f) != getattr(other, f) for f in fields):
            return False
        if (self.mask is None) != (other.mask is None):
            return False
        return self.mask is None or (len(self.mask) == len(other.mask)
                                     and all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(self.mask, other.mask)))

    def __hash__(self) -> int:
        masks = None if self.mask is None else tuple(tuple(m.shape) for m in self.mask)
        return hash((self.reference, self.subject, self.strength, self.layers, self.steps, self.threshold, self.map_layers,
                     self.isolate, self.reposition, masks, self.sample_rate, self.seed))

    def to_dict(self) -> dict[str, Any]:
        out = Control.to_dict(self)
        if self.mask is not None:  # masks as nested lists of numbers (a job file's form)
            out["mask"] = [m.tolist() for m in self.mask]
        return out

    # -- where it acts ------------------------------------------------------------------------------------------
    def attention_layers(self, adapter: ModelAdapter) -> tuple[LayerInfo, ...]:
        return keep_kinds(Control.select(self, adapter), ("self", "joint"), type(self).__name__, "self- or joint attention", self.layers)

    def word_map_layers(self, adapter: ModelAdapter) -> tuple[LayerInfo, ...]:
        if not self.words:
            return ()
        layers = select_layers(adapter.layers, self.map_layers, default=text_layers(adapter), owner="ConsistentSubjects.map_layers")
        return keep_kinds(layers, TEXT_KINDS, "ConsistentSubjects.map_layers", "cross- or joint-attention", self.map_layers)

    def select(self, adapter: ModelAdapter) -> tuple[LayerInfo, ...]:
        chosen = {layer.index: layer for layer in self.attention_layers(adapter) + self.word_map_layers(adapter)}
        return tuple(chosen[i] for i in sorted(chosen))

    def validate_for(self, adapter: ModelAdapter) -> None:
        if self.subject_count and adapter.grid_dims != 2:
            raise UnsupportedError(
                f"attnctl: ConsistentSubjects' subjects (boxes, masks, word maps) are defined on a 2-D image grid, and the "
                f"{adapter.family} family has a video token grid; share every token (no subject) there"
            )
        if self.reposition is not None and adapter.rotary:
            raise UnsupportedError(
                f"attnctl: ConsistentSubjects.reposition moves the reference's subject tokens to the target box, and the "
                f"{adapter.family} family's image keys carry rotary position embeddings of their own positions, applied "
                "inside the attention processor before attnctl sees the keys: moved keys would keep their old positions "
                "(not exact); reposition works on families without rotary keys (SD / SDXL, SD3, PixArt)"
            )

    def call_effects(self, adapter: ModelAdapter) -> tuple[str, ...]:
        """"row_links": the rows attend to the source rows' keys and values (none while strength is 0)."""
        return ("row_links",) if self.strength > 0 else ()

    def layer_effects(self, adapter: ModelAdapter, layer: LayerInfo) -> tuple[str, ...]:
        """"linked_keys" (and "labels" with `isolate`): the rows attend to the source rows' keys and values (none while
        strength is 0); "capture": a map layer of a subject word."""
        if self.strength == 0:
            return ()
        effects = []
        if any(layer.index == a.index for a in self.attention_layers(adapter)):
            effects += ["linked_keys"] + (["labels"] if self.isolate else [])
        if any(layer.index == m.index for m in self.word_map_layers(adapter)):
            effects.append("capture")
        return tuple(effects)

    def compile_refusal(self, adapter: ModelAdapter) -> str | None:
        if self.sample_rate < 1:
            return ("its sampled tokens change at every step, and the hook that carries them as constants with them: "
                    "dynamo would recompile every step")
        if self.words:
            return ("its subject words' maps of one step pick the next step's subject tokens in Python state inside "
                    "the processor, so dynamo would recompile every step")
        # the edit hands its hook the row links and bias as constants; isolation's label mask runs on sdpa in a graph
        # (kernels.choose_traced_backend) (tests/test_compile_controls.py)
        return None

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
            found = self._edits[key] = Edit(hooks=(self._hook(self, links, geometry, frame.layers_device()),))
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


def sampled_tokens(seed: int, step: int, images: int, tokens: int, rate: float) -> torch.Tensor:
    """(images, tokens) bool on the CPU: StoryDiffusion's random sample of each source image's tokens at step `step`,
    every token of every image kept independently with probability `rate` (`torch.rand(images, tokens) < rate`, row
    p the image of prompt row p, from a private generator seeded `((seed * 1_000_003 + step) * 1_000_033 + tokens) mod
    2**63`, never the pipeline's): the same for every layer of one token grid and every target image of that step, a
    separate draw per grid, as StoryDiffusion draws one per resolution."""
    generator = torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1_000_033 + tokens) % 2**63)
    return torch.rand(images, tokens, generator=generator) < rate


def on_device(table: torch.Tensor, device: torch.device, make) -> torch.Tensor:
    """`table` (made by the edit) when it is on `device`, else `make(device)` (the same table, made there)."""
    return table if table.device == device else make(device)


class _ConsistentBound(LinkedKeysBound):
    """Row links, the subjects' labels per prompt row at each grid, and (subject words) the maps of the previous
    step: captured in the cond rows' map layers during step t, used by every row at step t + 1."""

    layers_only = True  # the rows share keys and values at its layers only (no row, input or latent of the call changes)

    def __init__(self, control: ConsistentSubjects, context: BindContext):
        super().__init__(control, context, AppendedKeysHook)
        self.prompt_rows = context.prompt_rows
        self.backend = context.backend
        self.adapter = context.adapter
        if context.prompt_rows < 2 and control.strength > 0:  # strength 0 is "off": nothing asked of the rows
            raise ConfigError(
                "attnctl: ConsistentSubjects links the images of one pipeline call, and this call makes 1 image: give a list "
                "of prompts or num_images_per_prompt > 1"
            )
        if control.reference is not None and control.reference >= context.prompt_rows:
            raise ConfigError(
                f"ConsistentSubjects.reference is prompt row {control.reference}, but the call has {context.prompt_rows} "
                "prompt row(s) (prompts x num_images_per_prompt)"
            )
        adapter = context.adapter
        chosen = {layer.index for layer in context.layers}
        self.attention_indices = frozenset(layer.index for layer in control.attention_layers(adapter)) & chosen
        self._check_static_subjects(control, context)
        map_layers = tuple(layer for layer in control.word_map_layers(adapter) if layer.index in chosen)
        self.map_slots = {layer.index: i for i, layer in enumerate(map_layers)}
        self.device = context.device
        self.words = control.words
        self.capture_hook = _SubjectMapHook(self)
        self.ready: torch.Tensor | None = None  # (prompt rows, words, gh, gw): the maps of the previous step
        self.step_seen: int | None = None
        self.pending_step: int | None = None
        self.sample_step: int | None = None  # the step whose sampled tokens the cached plans hold
        if self.words:
            text_len = context.canvas.text_len
            positions_only = context.tokens is None and all(isinstance(query, int) for query in self.words)
            tokens = None if positions_only else context.require_tokens("ConsistentSubjects(subject=<word>)", positions=True)
            if tokens is not None:
                tokens.check_lengths()
            selector = torch.zeros(self.prompt_rows, len(self.words), text_len)
            for w, query in enumerate(self.words):
                if tokens is None:  # an explicit position: the same in every row, no text needed (prompt_embeds)
                    selector[:, w, list(explicit_position(query, text_len))] = 1.0  # type: ignore[arg-type]
                    continue
                found = [tokens.positions(query, row, missing_ok=True) for row in range(self.prompt_rows)]
                if not any(found):
                    tokens.positions(query, 0)  # raises the TokenError that names the word and shows the prompt
                if control.reference is not None and not found[control.reference]:
                    try:
                        tokens.positions(query, control.reference)
                    except TokenError as error:
                        raise TokenError(
                            f"attnctl: ConsistentSubjects.subject {describe_query(query)} must be in the reference prompt "
                            f"(row {control.reference}), or the reference shares nothing for it; "
                            + str(error).removeprefix("attnctl: ")
                        ) from None
                for row, positions in enumerate(found):
                    selector[row, w, [p for p in positions if p < text_len]] = 1.0
            self.selector = upload(selector, self.device)
            grids = [context.canvas.grid_at(layer.level) for layer in map_layers]
            self.map_grid = max(grids, key=lambda hw: hw[0] * hw[1])
            self.pending = torch.zeros(len(map_layers), self.prompt_rows, len(self.words), *self.map_grid, device=self.device)
            self.text_len = text_len
            self._key_selectors: dict[tuple[Any, ...], torch.Tensor] = {}  # (prompts, keys, first text key, device)

    def _check_static_subjects(self, control: ConsistentSubjects, context: BindContext) -> None:
        """A box or mask subject that holds no cell of any grid the control attends at (`labels`: a box holds the cells
        whose centre is inside it, a mask those whose area average reaches `threshold`) would share nothing."""
        if control.strength == 0:
            return
        grids = {context.canvas.grid_at(layer.level) for layer in context.layers if layer.index in self.attention_indices}
        if control.reposition is not None:
            shapes = [(f"the target box {pair[1]} of reposition[{i}]", lambda g, box=pair[1]: box_mask(box, g))
                      for i, pair in enumerate(control.reposition)]
        elif control.mask is not None:
            shapes = [(f"mask[{i}]", lambda g, m=m: resize_mask(m, g).flatten() >= control.threshold)
                      for i, m in enumerate(control.mask)]
        else:
            shapes = [(f"the subject box {box}", lambda g, box=box: box_mask(box, g)) for box in control.subject or () if _is_box(box)]
        key = ("empty subjects", tuple(sorted(grids)))
        if key not in context.handle_cache:  # read once per handle (host data, but no read in a warm call)
            context.handle_cache[key] = [name for name, cells in shapes if grids and not any(bool(cells(g).any()) for g in grids)]
        if context.handle_cache[key]:
            name = context.handle_cache[key][0]
            shown = ", ".join(f"{h}x{w}" for h, w in sorted(grids))
            raise ConfigError(
                f"attnctl: ConsistentSubjects: {name} holds no image token at this call's size (token grids {shown}; a "
                f"box holds the cells whose centre is inside it, a mask those whose area average is at least "
                f"threshold={control.threshold:g}), so that subject would share nothing: give a larger box or mask"
            )

    # -- row links ------------------------------------------------------------------------------------------------
    def find_links(self, rows: RowLayout) -> Links:
        reference = self.control.reference
        if reference is not None:
            linked = rows.linked(lambda prompt: reference)
            targets = tuple(i for i, s in enumerate(linked) if s is not None)
            return targets, tuple((linked[i],) for i in targets)
        others = [rows.linked(lambda prompt, k=k: (prompt + k) % self.prompt_rows) for k in range(1, self.prompt_rows)]
        targets = tuple(i for i in range(len(rows)) if others and all(o[i] is not None for o in others))
        return targets, tuple(tuple(o[i] for o in others) for i in targets)

    # -- edits ----------------------------------------------------------------------------------------------------
    def edit(self, layer: LayerInfo, frame: DenoiserCall) -> Edit | None:
        control = self.control
        if control.strength == 0:
            return None
        hooks: list[LayerHook] = []
        if self.words:
            self._next_step(frame.step.index)
            if (layer.index in self.map_slots and self._capture_at(frame.step) and frame.extra_pass is None
                    and frame.rows.indices("cond", None)):
                hooks.append(self.capture_hook)
        if (layer.index in self.attention_indices and frame.step.inside(control.steps)
                and (not self.words or self.ready is not None)):
            links = self.links(frame.rows)
            if links[0]:
                geometry = frame.geometry(layer)
                if control.sample_rate < 1 and self.sample_step != frame.step.index:  # a fresh subset each step
                    self.sample_step = frame.step.index
                    self._edits.clear()
                key = (links, tuple(row.prompt for row in frame.rows.rows), geometry.image_hw, geometry.frames, geometry.image_len,
                       self.step_seen if self.words else None)
                found = self._edits.get(key)
                if found is None:
                    found = self._edits[key] = AppendedKeysHook(self, links, geometry, frame.layers_device(), frame.rows)
                    if frame.compiled:
                        self._prepare_isolation(found, layer, geometry)
                hooks.append(found)
        return Edit(hooks=tuple(hooks)) if hooks else None

    def _prepare_isolation(self, hook: AppendedKeysHook, layer: LayerInfo, geometry: Any) -> None:
        """Before a compiled forward: the isolation mask over the layer's own and appended keys, made dense now
        (`kernels.prepare_traced_labels`) rather than in the graph at every attention call."""
        labels = hook.plan.label_mask(geometry.key_len, geometry, layer.text) if hook.plan is not None else None
        weight = self.adapter.placed_weight(layer.name)
        if labels is not None and weight is not None and weight.device == hook.plan.device:
            prepare_traced_labels(labels, self.backend, weight.dtype, weight.device)

    def text_switch_refusal(self, step: StepInfo) -> str | None:
        if not self.words:
            return None
        return "it resolved its subject words in the prompts the call started with"

    def active(self, step: StepInfo) -> bool:
        """Inside the step window, and (subject words) at the step before it, whose maps pick the window's first
        subject tokens (a capture-only step is stock: the capture reads the layer's attention, it changes nothing)."""
        return step.inside(self.control.steps) or (bool(self.words) and self._capture_at(step))

    def _capture_at(self, step: StepInfo) -> bool:
        """Maps are captured at a step when the next step shares (they are used there)."""
        return step.index + 1 < step.count and StepInfo(step.index + 1, step.count).inside(self.control.steps)

    def _next_step(self, index: int) -> None:
        """At the first edit of a step, the maps captured at the step before become the ones in use."""
        if index == self.step_seen:
            return
        self.ready = self.pending.sum(0) if self.pending_step is not None and self.pending_step == index - 1 else None
        self.pending = torch.zeros_like(self.pending)
        self.pending_step = None
        self.step_seen = index
        self._edits.clear()

    def capture(self, call: AttentionCall, q: torch.Tensor, k: torch.Tensor, spec: AttentionSpec) -> None:
        """The cond rows' head-averaged attention to each subject word, from this layer's image queries, normalised over
        all keys (`maps.capture.word_attention`, no N x N matrix), resized to the finest map grid."""
        layout = call.rows
        batch_rows = layout.indices("cond", None)
        if not batch_rows:
            return
        prompts = tuple(layout.rows[i].prompt for i in batch_rows)
        geometry = call.geometry
        image = geometry.image_slice
        index = self.index(batch_rows, q.device)
        spec = spec_rows(spec, index, q.shape[0])
        qi = q.index_select(0, index)[:, :, image]
        ki = k.index_select(0, index)
        key_text = geometry.key_text_slice
        prompt_index = self.index(prompts, self.selector.device)
        selector = key_columns(self._key_selectors, self.selector, prompts, prompt_index, ki.shape[2], key_text.start, q.device)
        keys = slice(0, ki.shape[2])

        def bias(lo: int, hi: int) -> torch.Tensor | None:
            return block_bias(spec, slice(image.start + lo, image.start + hi), keys, q.device)

        mass = word_attention(qi, ki, selector, scale=spec.scale, bias=bias)  # (b, Ni, W)
        h, w = geometry.image_hw
        maps = mass.transpose(1, 2).reshape(len(batch_rows), -1, h, w)
        if (h, w) != self.map_grid:
            maps = F.interpolate(maps, size=self.map_grid, mode="bilinear", align_corners=False)
        self.pending[self.map_slots[call.layer.index]].index_copy_(0, prompt_index, maps.to(self.pending.device))
        self.pending_step = call.step.index

    # -- the subjects at a grid -----------------------------------------------------------------------------------
    def labels(self, grid: tuple[int, int], device: torch.device) -> torch.Tensor | None:
        """(prompt rows, h * w) long: 0 outside every subject, i + 1 in subject i (None: no subjects, share all).

        A subject's score per cell: 1 / 0 for a box (cell centre inside), a mask's area average, a word's map (the
        previous step's, area-averaged onto the grid) divided by its maximum over the image. Cells scoring at least
        `threshold` are in; a cell in several subjects goes to the highest score (the first on a tie)."""
        control = self.control
        if control.reposition is not None:
            boxes = [pair[1] for pair in control.reposition]
            scores = torch.stack([box_mask(b, grid).double() for b in boxes])[None].expand(self.prompt_rows, -1, -1)
        elif control.mask is not None:
            scores = torch.stack([resize_mask(m, grid).flatten() for m in control.mask])[None].expand(self.prompt_rows, -1, -1)
        elif control.subject is not None:
            parts = []
            word = 0
            for subject in control.subject:
                if _is_box(subject):
                    parts.append(upload(box_mask(subject, grid).double(), device)[None].expand(self.prompt_rows, -1))
                    continue
                maps = self.ready[:, word].double()  # (P, gh, gw)
                word += 1
                rows = upload(area_matrix(maps.shape[1], grid[0]).double(), maps.device)
                cols = upload(area_matrix(maps.shape[2], grid[1]).double(), maps.device)
                resized = (rows @ maps @ cols.T).flatten(1)
                parts.append((resized / resized.amax(1, keepdim=True).clamp_min(1e-30)).to(device))
            scores = torch.stack(parts, 1)
        else:
            return None
        scores = upload(scores.contiguous(), device) if scores.device.type == "cpu" else scores.to(device)
        inside = scores >= control.threshold
        best = torch.where(inside, scores, torch.full_like(scores, -1.0)).argmax(1)
        return torch.where(inside.any(1), best + 1, torch.zeros_like(best))

    def appended(self, grid: tuple[int, int], labels: torch.Tensor | None, device: torch.device):
        """What each source appends at this grid: (gather, appended labels, bias). `gather` (n,) long: the source's
        image tokens appended (None: all); appended labels (P, n) long (None without subjects); bias (P, n) float32:
        log(strength) on the subject tokens, -inf elsewhere."""
        log_strength = math.log(self.control.strength)
        h, w = grid
        if self.control.reposition is not None:
            gather, slot_labels = [], []
            for i, (source_box, target_box) in enumerate(self.control.reposition):
                cells = box_mask(target_box, grid).nonzero().flatten()  # constant per grid: computed on the CPU
                ys = (cells // w + 0.5) / h
                xs = (cells % w + 0.5) / w
                sy = source_box[1] + (ys - target_box[1]) * (source_box[3] - source_box[1]) / (target_box[3] - target_box[1])
                sx = source_box[0] + (xs - target_box[0]) * (source_box[2] - source_box[0]) / (target_box[2] - target_box[0])
                row = (sy * h).floor().long().clamp(0, h - 1)
                col = (sx * w).floor().long().clamp(0, w - 1)
                gather.append(row * w + col)
                slot_labels.append(torch.full((cells.numel(),), i + 1, dtype=torch.long))
            index = upload(torch.cat(gather), device)
            slot = upload(torch.cat(slot_labels), device)[None].expand(self.prompt_rows, -1)
            return index, slot, torch.full(slot.shape, log_strength, dtype=torch.float32, device=device)
        if labels is None:
            return None, None, torch.full((self.prompt_rows, h * w), log_strength, dtype=torch.float32, device=device)
        bias = torch.full(labels.shape, log_strength, dtype=torch.float32, device=device).masked_fill_(labels == 0, -math.inf)
        return None, labels, bias

    def sampled(self, tokens: int, gather: torch.Tensor | None, device: torch.device) -> torch.Tensor:
        """(prompt rows, n appended) bool: each source image's tokens sampled at the current step (`sampled_tokens`;
        `gather`: the source tokens appended, default all)."""
        keep = upload(sampled_tokens(self.control.seed, self.sample_step or 0, self.prompt_rows, tokens, self.control.sample_rate), device)
        return keep if gather is None else keep.index_select(1, gather)

    def finish(self) -> None:
        super().finish()
        self.ready = None
        self.sample_step = None
        self.step_seen = self.pending_step = None
        self._edits.clear()


class _SubjectMapHook(LayerHook):
    """Lets the layer's attention run, then records the cond rows' maps of the subject words (a map layer)."""

    def __init__(self, bound: _ConsistentBound):
        self.bound = bound

    def attend(self, call: AttentionCall, q, k, v, spec: AttentionSpec, compute):
        result = compute(q, k, v, spec)
        if not token_layout(call).sub:
            with torch.no_grad():
                self.bound.capture(call, q, k, spec)
        return result


class AppendedKeysHook(LayerHook):
    """The target rows' image queries attend to their own keys plus the source rows' (subject) image keys, with
    the source bias and, with `isolate`, the isolation labels; the other rows (and text queries) go through the rest
    of the chain unchanged. The edit hands it the links, the grid's labels and the appended keys as constants."""

    def __init__(self, bound: Any, links: Links = ((), ()), geometry: Any = None, device: Any = None, rows: RowLayout | None = None):
        self.bound = bound
        self.links = links
        self.plan = None
        if geometry is not None:
            self.plan = _plan(bound, links, geometry, device, rows)

    def attend(self, call: AttentionCall, q, k, v, spec: AttentionSpec, compute):
        targets, sources = self.bound.call_links(call, self.links)
        if not targets:
            return compute(q, k, v, spec)
        plan = self.plan
        if plan is None or plan.device != q.device or (call.row_source is not None and (targets, sources) != self.links):
            plan = _plan(self.bound, (targets, sources), call.geometry, q.device, call.rows)
        batch = q.shape[0]
        index = self.bound.tensor
        target_index = index(targets, q.device)
        own = appended_attention(call, q, k, v, spec, target_index,
                                 [index(tuple(s[j] for s in sources), q.device) for j in range(len(sources[0]))],
                                 plan.bias, gather=plan.gather, labels=plan.label_mask(k.shape[2], call.geometry, call.layer.text),
                                 key_bias_cache=plan.key_biases)
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


@dataclass
class _Plan:
    device: torch.device
    bias: list[torch.Tensor]  # per source slot: (targets, n appended) float32
    gather: torch.Tensor | None  # (n appended,) image-token indices of a source (None: all)
    q_labels: torch.Tensor | None  # (targets, image queries) long, with isolation
    k_labels: list[torch.Tensor] | None  # own image keys (targets, image tokens), then per source slot (targets, n appended)
    table: torch.Tensor | None  # (1, S + 1, S + 1): 0, -inf between two different subjects
    _masks: dict = field(default_factory=dict)  # `label_mask`: one per text layout, text length and key offset
    key_biases: dict = field(default_factory=dict)  # `appended_attention`'s joined key bias, per key count and dtype

    def label_mask(self, n_own: int, geometry: Any, text: str) -> LabelMask | None:
        """The isolation mask over [own keys; appended keys] for `n_own` own keys, made once per plan and key count
        (the backend keeps its dense form per mask object: a new object per call would rebuild it every call)."""
        if self.q_labels is None:
            return None
        # keyed by the text layout and length and by the key count's offset from the layer's own (0 but in another
        # hook's sub-attention), not by the key count: a graph's key count is symbolic, and a dict key is made a
        # constant (a graph per image size). The text length varies only between calls (Qwen-Image's cond and uncond).
        key = (text, geometry.text_len, n_own - geometry.key_len)
        found = self._masks.get(key)
        if found is None:
            image = slice(0, n_own) if text == "none" else geometry.image_slice
            own_keys = self.k_labels[0].new_zeros(self.k_labels[0].shape[0], n_own)  # own text keys: label 0, open
            own_keys[:, image] = self.k_labels[0]
            found = self._masks[key] = LabelMask(self.q_labels, torch.cat([own_keys] + list(self.k_labels[1:]), dim=-1), self.table)
        return found


def _plan(bound: _ConsistentBound, links: Links, geometry: Any, device: torch.device, rows: RowLayout) -> _Plan:
    """The constants of one edit: per target row and source slot, the appended keys' bias and labels."""
    targets, sources = links
    grid = geometry.image_hw
    labels = None if (bound.control.subject is None and bound.control.mask is None and bound.control.reposition is None) \
        else bound.labels(grid, device)
    sampling = bound.control.sample_rate < 1
    prompt = [r.prompt for r in rows.rows]
    slots = range(len(sources[0]))
    # the bound's cached index tensors: a plan is made again at every step with subject words or sampling
    source_prompts = [bound.tensor(tuple(prompt[s[j]] for s in sources), device) for j in slots]
    if labels is None and geometry.frames > 1:  # video, no subject: every token of every frame
        bias_all = torch.full((bound.prompt_rows, geometry.image_len), math.log(bound.control.strength), dtype=torch.float32, device=device)
        if sampling:
            bias_all = bias_all.masked_fill(~bound.sampled(geometry.image_len, None, device), -math.inf)
        bias = [bias_all.index_select(0, p) for p in source_prompts]
        return _Plan(device, bias, None, None, None, None)
    gather, appended_labels, appended_bias = bound.appended(grid, labels, device)
    if sampling:
        appended_bias = appended_bias.masked_fill(~bound.sampled(grid[0] * grid[1], gather, device), -math.inf)
    target_prompts = bound.tensor(tuple(prompt[t] for t in targets), device)
    bias = [appended_bias.index_select(0, p) for p in source_prompts]
    if not bound.control.isolate:
        return _Plan(device, bias, gather, None, None, None)
    n_subjects = bound.control.subject_count
    table = torch.zeros(n_subjects + 1, n_subjects + 1, dtype=torch.float32)
    table[1:, 1:] = -math.inf
    table[1:, 1:].fill_diagonal_(0.0)
    own = labels.index_select(0, target_prompts)  # (m, image tokens)
    k_labels = [own] + [appended_labels.index_select(0, p) for p in source_prompts]
    return _Plan(device, bias, gather, own, k_labels, upload(table[None], device))


def appended_attention(call, q, k, v, spec: AttentionSpec, targets: torch.Tensor, sources: list[torch.Tensor],
                       bias: torch.Tensor | list[torch.Tensor], *, gather: torch.Tensor | None = None,
                       labels: LabelMask | None = None, key_bias_cache: dict | None = None) -> torch.Tensor:
    """(m, H, Nq, D): rows `targets`; image queries over [own keys; each source's image keys (+ bias)], text queries
    (joint layers) over their own keys. `bias`: one (n,) tensor for every source, or per source a (m, n) tensor;
    `gather`: the source image tokens appended (default all); `labels`: a label mask over the image queries and
    [own keys; appended keys] (isolation). `key_bias_cache`: the caller's store for the joined key bias, which is
    constant while `bias` is (so it is built once, not at every attention call; not used while compiling)."""
    batch = q.shape[0]
    geometry = call.geometry
    text = call.layer.text
    image = slice(0, k.shape[2]) if text == "none" else geometry.image_slice
    if text == "keys":
        raise ConfigError(f"attnctl: layer {call.layer.name} is cross-attention; appended image keys act on self- and joint attention")
    qt, kt, vt = q.index_select(0, targets), k.index_select(0, targets), v.index_select(0, targets)
    m = qt.shape[0]
    mask = spec.attn_mask
    if mask is not None and mask.ndim == 4 and mask.shape[0] == batch and batch > 1:
        mask_t = mask.index_select(0, targets)
    else:
        mask_t = mask
    image_q = slice(0, q.shape[2]) if text == "none" else image
    picked = None if gather is None else gather + image.start
    image_start, image_stop = image.start, image.stop  # ints, not the slice: a closure's slice is made constant
    def appended(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        rows = t.index_select(0, s)
        return rows[:, :, image_start:image_stop] if picked is None else rows.index_select(2, picked)
    keys = [kt] + [appended(k, s) for s in sources]
    values = [vt] + [appended(v, s) for s in sources]
    n_own = kt.shape[2]
    cache = None if key_bias_cache is None or torch.compiler.is_compiling() else key_bias_cache
    cache_key = (m, n_own, q.dtype, q.device)
    key_bias = None if cache is None else cache.get(cache_key)
    if key_bias is None:
        biases = [bias[None, :].expand(m, -1) for _ in sources] if isinstance(bias, torch.Tensor) else bias
        key_bias = torch.cat([biases[0].new_zeros(m, n_own)] + list(biases), dim=-1).to(q.dtype)
        if cache is not None:
            cache[cache_key] = key_bias
    n_app = key_bias.shape[-1] - n_own
    attn_mask = None
    if mask_t is not None:
        own_mask = as_additive(mask_t, torch.float32)
        if own_mask.shape[-2] > 1:
            own_mask = own_mask[..., image_q, :]
        attn_mask = torch.cat([own_mask, own_mask.new_zeros(own_mask.shape[:-1] + (n_app,))], dim=-1)
    out_image = backend_op(call, qt[:, :, image_q], torch.cat(keys, dim=2), torch.cat(values, dim=2),
                           AttentionSpec(scale=spec.scale, attn_mask=attn_mask, key_bias=key_bias, labels=labels))[0]
    if text == "none":
        return out_image
    txt = geometry.text_slice
    text_mask = None
    if mask_t is not None:
        text_mask = mask_t[..., txt, :] if mask_t.shape[-2] > 1 else mask_t
    out_text = backend_op(call, qt[:, :, txt], kt, vt, AttentionSpec(scale=spec.scale, attn_mask=text_mask))[0]
    parts = (out_text, out_image) if txt.start < image.start else (out_image, out_text)
    return torch.cat(parts, dim=2)
