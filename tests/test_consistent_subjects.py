"""Consistent subjects (StoryDiffusion's consistent self-attention, IR-Diffusion's subject restriction): identities,
an independent eager reference written from docs/methods.md ("Consistent subjects"), every family, errors."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch

import attnctl
from attnctl import ConfigError, UnsupportedError
from attnctl.control import Bound, Control
from attnctl.controls.cross_image.consistent import ConsistentSubjects
from attnctl.processors.edit import Edit, LayerHook
from attnctl.testing import CALL_DEFAULTS, NEW_TINY_MODELS, TINY_MODELS
from attnctl.testing.new_families import PROMPT_KEYWORD, available

from .helpers import load_benchmark

PROMPTS = ["a red cat on the street", "a blue dog in a field", "a green car"]
TOL = {"rtol": 1e-4, "atol": 1e-4}
LOOSE = {"rtol": 1e-3, "atol": 1e-3}


def _additive(mask: torch.Tensor) -> torch.Tensor:
    """The model's attention mask as a float64 logit bias (a bool mask: 0 where allowed, -inf elsewhere)."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, -math.inf)
    return mask.double()


def run(pipe, name, prompts=PROMPTS, steps=2, guidance=5.0, **kwargs):
    options = dict(CALL_DEFAULTS[name])
    options.update(kwargs)
    options.setdefault("guidance_scale", guidance)
    generators = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    prompts = list(prompts)  # a fresh list per call: diffusers' Z-Image pipelines write the chat-templated prompts into it
    if name in PROMPT_KEYWORD:
        out = pipe(prompt=prompts, num_inference_steps=steps, output_type="latent", generator=generators, **options)
    else:
        out = pipe(prompts, num_inference_steps=steps, output_type="latent", generator=generators, **options)
    return out.frames if hasattr(out, "frames") and not hasattr(out, "images") else out.images


class _EagerHook(LayerHook):
    """From the definition: for each row that is not the reference, its image queries attend (float64 softmax) to
    its own keys and to the reference row's image keys inside the box, the latter with a bias log(strength)."""

    def __init__(self, control):
        self.control = control

    def attend(self, call, q, k, v, spec, compute):
        out, _ = compute(q, k, v, spec)
        out = out.clone()
        c = self.control
        rows = call.rows.rows
        batch, heads, nq, d = q.shape
        scale = spec.scale if spec.scale is not None else d**-0.5
        g = call.geometry
        text = call.layer.text
        image = slice(0, nq) if text == "none" else g.image_slice
        h, w = g.image_hw
        inside = torch.zeros(g.frames * h * w, dtype=torch.bool)
        for idx in range(g.frames * h * w):
            r, col = (idx % (h * w)) // w, idx % w
            y, x = (r + 0.5) / h, (col + 0.5) / w
            inside[idx] = c.box is None or (c.box[0] <= x <= c.box[2] and c.box[1] <= y <= c.box[3])
        mask = spec.attn_mask
        for i, row in enumerate(rows):
            sources = [j for j, r in enumerate(rows) if (r.branch, r.tag) == (row.branch, row.tag) and r.prompt != row.prompt
                       and (c.reference is None or r.prompt == c.reference)]
            if c.reference is not None and row.prompt == c.reference:
                continue
            keys = [k[i].double()] + [k[j][:, image].double() for j in sources]
            values = [v[i].double()] + [v[j][:, image].double() for j in sources]
            extras = []
            for j in sources:
                keep = inside
                if c.sample_rate < 1:  # StoryDiffusion's sampling: each source image its own draw, seeded as docs/methods.md says
                    tokens = g.frames * h * w
                    seed = ((c.seed * 1_000_003 + call.step.index) * 1_000_033 + tokens) % 2**63
                    drawn = torch.rand(len({r.prompt for r in rows}), tokens, generator=torch.Generator().manual_seed(seed))
                    keep = inside & (drawn[rows[j].prompt] < c.sample_rate)
                extras.append(torch.where(keep, math.log(c.strength), -math.inf).double())
            bias = torch.cat([torch.zeros(k.shape[2], dtype=torch.float64)] + extras)
            logits = q[i][:, image].double() @ torch.cat(keys, 1).transpose(-1, -2) * scale + bias
            if mask is not None:
                m = _additive(mask[i if mask.shape[0] > 1 else 0])
                m = m[..., image, :] if m.shape[-2] > 1 else m
                logits[..., : k.shape[2]] += m
            out[i, :, image] = (torch.softmax(logits, -1) @ torch.cat(values, 1)).to(out.dtype)
        return out, None


@dataclass(frozen=True)
class EagerConsistent(Control, type_name="test-eager-consistent"):
    reference: int | None = 0
    box: tuple | None = None
    strength: float = 1.0
    sample_rate: float = 1.0
    seed: int = 0

    def select(self, adapter):
        return tuple(layer for layer in adapter.layers if layer.kind in ("self", "joint"))

    def bind(self, context):
        return _EagerBound(self, context.layers, (0.0, 1.0))


class _EagerBound(Bound):
    def edit(self, layer, frame):
        return Edit(hooks=(_EagerHook(self.control),))


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-flux"])
def test_idle_is_bitwise_stock(name, tiny_cache):
    pipe = tiny_cache(name)
    stock = run(pipe, name)
    for control in (ConsistentSubjects(strength=0.0), ConsistentSubjects(steps=(0.99, 1.0))):
        with attnctl.apply(pipe, [control]):
            assert torch.equal(run(pipe, name), stock)


@pytest.mark.parametrize(
    "options", [{}, {"subject": (0.0, 0.0, 0.5, 1.0), "strength": 3.0}, {"reference": None}, {"reference": 1, "strength": 0.5},
                {"sample_rate": 0.5, "seed": 3}, {"reference": None, "subject": (0.0, 0.0, 0.5, 1.0), "sample_rate": 0.3}],
    ids=["reference", "box", "all", "row1", "sampled", "all-box-sampled"],
)
@pytest.mark.parametrize("name", TINY_MODELS)
def test_matches_eager_reference(name, options, tiny_cache):
    pipe = tiny_cache(name)
    stock = run(pipe, name)
    with attnctl.apply(pipe, [ConsistentSubjects(**options)]):
        ours = run(pipe, name)
    eager = EagerConsistent(options.get("reference", 0), options.get("subject"), options.get("strength", 1.0),
                            options.get("sample_rate", 1.0), options.get("seed", 0))
    with attnctl.apply(pipe, [eager]):
        expected = run(pipe, name)
    assert not torch.allclose(expected, stock, **TOL)
    torch.testing.assert_close(ours, expected, **(LOOSE if name == "tiny-pixart" else TOL))
    reference = options.get("reference", 0)
    if reference is not None:  # the reference row is not changed
        torch.testing.assert_close(ours[reference], stock[reference], **TOL)


def test_flux_true_cfg(tiny_cache):
    name = "tiny-flux"
    pipe = tiny_cache(name)
    extra = {"negative_prompt": "a blurry dog", "true_cfg_scale": 3.0}
    with attnctl.apply(pipe, [ConsistentSubjects()]):
        ours = run(pipe, name, **extra)
    with attnctl.apply(pipe, [EagerConsistent()]):
        expected = run(pipe, name, **extra)
    torch.testing.assert_close(ours, expected, **TOL)


@pytest.mark.parametrize("name", list(NEW_TINY_MODELS))
def test_new_families_run_or_refuse(name, tiny_cache):
    if not available(name):
        pytest.skip(f"diffusers lacks {name}")
    pipe = tiny_cache(name)
    stock = run(pipe, name, prompts=PROMPTS[:2], guidance=3.0)
    with attnctl.apply(pipe, [ConsistentSubjects(strength=3.0)]):
        ours = run(pipe, name, prompts=PROMPTS[:2], guidance=3.0)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours[0], stock[0], **LOOSE)
    assert not torch.allclose(ours[1], stock[1], **TOL)
    if name == "tiny-wan":
        with pytest.raises(UnsupportedError, match="video"):
            attnctl.apply(pipe, [ConsistentSubjects(subject=(0, 0, 0.5, 0.5))])


def test_bad_options():
    with pytest.raises(ConfigError, match="subject"):
        ConsistentSubjects(subject=(0.5, 0.0, 0.2, 1.0))
    with pytest.raises(ConfigError, match="strength"):
        ConsistentSubjects(strength=-1)
    with pytest.raises(ConfigError, match="reference"):
        ConsistentSubjects(reference=-1)
    for rate in (0, 1.5):
        with pytest.raises(ConfigError, match="sample_rate"):
            ConsistentSubjects(sample_rate=rate)
    with pytest.raises(ConfigError, match="seed"):
        ConsistentSubjects(seed=-1)
    control = ConsistentSubjects(reference=None, subject=(0, 0, 0.5, 1), strength=2.0, sample_rate=0.5, seed=7)
    assert Control.from_dict(control.to_dict()) == control and control != ConsistentSubjects(reference=None, subject=(0, 0, 0.5, 1), strength=2.0)
    assert "every step" in ConsistentSubjects(sample_rate=0.5).compile_refusal(None)


def test_reference_outside_the_call_raises(tiny_cache):
    pipe = tiny_cache("tiny-sd")
    with attnctl.apply(pipe, [ConsistentSubjects(reference=5)]):
        with pytest.raises(ConfigError, match="prompt row 5"):
            run(pipe, "tiny-sd")


# -- subjects by word maps, masks, isolation and reposition (IR-Diffusion) --------------------------------------------
WORD_PROMPTS = ["a red cat and a dog", "a blue cat and a dog", "a green cat and a dog"]
LEFT_RIGHT = [(0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)]


def _left_mask():
    mask = torch.zeros(16, 16)
    mask[:, :8] = 1.0
    return mask


def _pool(maps: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(P, gh, gw) -> (P, h, w): cell averages when shrinking, repeated cells when growing (integer factors)."""
    gh, gw = maps.shape[-2:]
    h, w = grid
    if (h, w) == (gh, gw):
        return maps
    if h <= gh:
        return torch.nn.functional.adaptive_avg_pool2d(maps, (h, w))
    return maps.repeat_interleave(h // gh, dim=-2).repeat_interleave(w // gw, dim=-1)


class _EagerSubjects:
    """From the definition in docs/methods.md ("Consistent subjects"), materialised in float64.

    Word maps: at each map layer, the cond rows' softmax(q kᵀ scale) of the image queries over all keys, averaged over
    heads, summed over the word's tokens, resized bilinearly to the finest map grid and summed over the layers; the
    maps of step t select the subject tokens at step t + 1 (none at step 0: no sharing). At a self-attention grid a
    word's map is averaged onto the grid, divided by its maximum; cells >= threshold belong to the subject (the
    highest score wins). Boxes: cell centre inside; masks: cell average >= threshold."""

    def __init__(self, control, context):
        self.c = control
        self.context = context
        self.prompt_rows = context.prompt_rows
        self.ready = None
        self.pending = {}
        self.pending_step = None
        self.seen = None
        words = [s for s in (control.subject or ()) if not (isinstance(s, tuple) and len(s) == 4)]
        self.words = words
        self.columns = []
        if words:
            tokens = context.require_tokens("test")
            for row in range(self.prompt_rows):
                self.columns.append([list(tokens.positions(word, row)) if word in WORD_PROMPTS[row % 3].split() else [] for word in words])

    def step(self, index):
        if index != self.seen:
            self.seen = index
            self.ready = sum(self.pending.values()) if self.pending and self.pending_step == index - 1 else None
            self.pending = {}
            self.pending_step = None

    def capture(self, call, q, k, spec):
        if not any(row.branch == "cond" and row.tag is None for row in call.rows.rows):
            return  # an uncond-only call (Flux's true CFG) has no maps of the words
        g = call.geometry
        image = g.image_slice
        key_text = g.key_text_slice
        scale = spec.scale if spec.scale is not None else q.shape[-1] ** -0.5
        maps = torch.zeros(self.prompt_rows, len(self.words), *g.image_hw, dtype=torch.float64)
        for i, row in enumerate(call.rows.rows):
            if row.branch != "cond" or row.tag is not None:
                continue
            logits = q[i][:, image].double() @ k[i].double().transpose(-1, -2) * scale
            if spec.attn_mask is not None:
                m = _additive(spec.attn_mask[i if spec.attn_mask.shape[0] > 1 else 0])
                logits = logits + (m[..., image, :] if m.shape[-2] > 1 else m)
            probs = torch.softmax(logits, -1).mean(0)  # (Ni, Nk)
            for w, columns in enumerate(self.columns[row.prompt]):
                if columns:
                    maps[row.prompt, w] = probs[:, [key_text.start + t for t in columns]].sum(-1).reshape(g.image_hw)
        grid = self.finest
        if tuple(maps.shape[-2:]) != grid:
            maps = torch.nn.functional.interpolate(maps, size=grid, mode="bilinear", align_corners=False)
        self.pending[call.layer.index] = maps
        self.pending_step = call.step.index

    def labels(self, grid):
        """(P, h*w) long."""
        c = self.c
        h, w = grid
        centres = [((r + 0.5) / h, (col + 0.5) / w) for r in range(h) for col in range(w)]

        def box_scores(box):
            return torch.tensor([1.0 if box[0] <= x <= box[2] and box[1] <= y <= box[3] else 0.0 for y, x in centres], dtype=torch.float64)

        if c.reposition is not None:
            scores = torch.stack([box_scores(pair[1]) for pair in c.reposition])[None].repeat(self.prompt_rows, 1, 1)
        elif c.mask is not None:
            per = []
            for m in c.mask:
                per.append(torch.nn.functional.adaptive_avg_pool2d(m.double()[None, None], grid).flatten())
            scores = torch.stack(per)[None].repeat(self.prompt_rows, 1, 1)
        else:
            per, word = [], 0
            for s in c.subject:
                if isinstance(s, tuple) and len(s) == 4:
                    per.append(box_scores(s)[None].repeat(self.prompt_rows, 1))
                else:
                    m = _pool(self.ready[:, word], grid).flatten(1)
                    word += 1
                    peak = m.max(1, keepdim=True).values
                    per.append(torch.where(peak > 0, m / torch.where(peak > 0, peak, 1.0), 0.0))
            scores = torch.stack(per, 1)
        out = torch.zeros(self.prompt_rows, h * w, dtype=torch.long)
        for p in range(self.prompt_rows):
            for t in range(h * w):
                best, label = -1.0, 0
                for s in range(scores.shape[1]):
                    if scores[p, s, t] >= c.threshold and scores[p, s, t] > best:
                        best, label = float(scores[p, s, t]), s + 1
                out[p, t] = label
        return out


class _EagerSubjectsHook(LayerHook):
    def __init__(self, state, kind):
        self.state = state
        self.kind = kind

    def attend(self, call, q, k, v, spec, compute):
        st = self.state
        if self.kind == "map":
            out = compute(q, k, v, spec)
            st.capture(call, q, k, spec)
            return out
        out, _ = compute(q, k, v, spec)
        out = out.clone()
        c = st.c
        rows = call.rows.rows
        batch, heads, nq, d = q.shape
        scale = spec.scale if spec.scale is not None else d**-0.5
        g = call.geometry
        text = call.layer.text
        image = slice(0, nq) if text == "none" else g.image_slice
        h, w = g.image_hw
        has_subjects = c.subject is not None or c.mask is not None or c.reposition is not None
        labels = st.labels((h, w)) if has_subjects else torch.ones(st.prompt_rows, h * w, dtype=torch.long)
        if c.reposition is not None:  # source cell of each appended key, and its subject
            picks, pick_labels = [], []
            for i, (src, dst) in enumerate(c.reposition):
                for t in range(h * w):
                    y, x = (t // w + 0.5) / h, (t % w + 0.5) / w
                    if dst[0] <= x <= dst[2] and dst[1] <= y <= dst[3]:
                        sy = src[1] + (y - dst[1]) / (dst[3] - dst[1]) * (src[3] - src[1])
                        sx = src[0] + (x - dst[0]) / (dst[2] - dst[0]) * (src[2] - src[0])
                        picks.append(min(h - 1, int(math.floor(sy * h))) * w + min(w - 1, int(math.floor(sx * w))))
                        pick_labels.append(i + 1)
        for i, row in enumerate(rows):
            sources = [j for j, r in enumerate(rows) if (r.branch, r.tag) == (row.branch, row.tag) and r.prompt != row.prompt
                       and (c.reference is None or r.prompt == c.reference)]
            if (c.reference is not None and row.prompt == c.reference) or not sources:
                continue
            own_labels = torch.zeros(k.shape[2], dtype=torch.long)
            own_labels[image] = labels[row.prompt]
            keys, values, biases, key_labels = [k[i].double()], [v[i].double()], [torch.zeros(k.shape[2], dtype=torch.float64)], [own_labels]
            for j in sources:
                if c.reposition is not None:
                    cells = torch.tensor(picks)
                    slab = torch.tensor(pick_labels)
                else:
                    cells = torch.arange(h * w)
                    slab = labels[rows[j].prompt]
                keys.append(k[j][:, image][:, cells].double())
                values.append(v[j][:, image][:, cells].double())
                biases.append(torch.where(slab > 0, math.log(c.strength), -math.inf).double())
                key_labels.append(slab)
            logits = q[i][:, image].double() @ torch.cat(keys, 1).transpose(-1, -2) * scale + torch.cat(biases)
            if spec.attn_mask is not None:
                m = _additive(spec.attn_mask[i if spec.attn_mask.shape[0] > 1 else 0])
                m = m[..., image, :] if m.shape[-2] > 1 else m
                logits[..., : k.shape[2]] += m
            if c.isolate:
                ql = labels[row.prompt][:, None]
                kl = torch.cat(key_labels)[None, :]
                logits = logits.masked_fill((ql > 0) & (kl > 0) & (ql != kl), -math.inf)
            out[i, :, image] = (torch.softmax(logits, -1) @ torch.cat(values, 1)).to(out.dtype)
        return out, None


@dataclass(frozen=True)
class EagerSubjects(Control, type_name="test-eager-subjects"):
    """The reference of ConsistentSubjects with subjects (`control` holds the options; its code is not used)."""

    control: object = None

    def select(self, adapter):
        kinds = ("cross", "joint") if self.control.words else ()
        return tuple(layer for layer in adapter.layers if layer.kind in ("self", "joint") + kinds)

    def bind(self, context):
        return _EagerSubjectsBound(self, context)


class _EagerSubjectsBound(Bound):
    def __init__(self, control, context):
        super().__init__(control, context.layers, (0.0, 1.0))
        self.state = _EagerSubjects(control.control, context)
        map_layers = [layer for layer in context.layers if layer.kind in ("cross", "joint")]
        self.state.finest = max((context.canvas.grid_at(layer.level) for layer in map_layers), key=lambda hw: hw[0] * hw[1], default=None)

    def edit(self, layer, frame):
        st = self.state
        st.step(frame.step.index)
        hooks = []
        if st.words and layer.kind in ("cross", "joint") and frame.step.index + 1 < frame.step.count:
            hooks.append(_EagerSubjectsHook(st, "map"))
        if layer.kind in ("self", "joint") and (not st.words or st.ready is not None):
            hooks.append(_EagerSubjectsHook(st, "self"))
        return Edit(hooks=tuple(hooks)) if hooks else None


SUBJECT_OPTIONS = {
    "word": {"subject": "cat"},
    "words-isolate": {"subject": ["cat", "dog"], "isolate": True, "strength": 2.0, "threshold": 0.4},
    "all-words-isolate": {"subject": ["cat", "dog"], "isolate": True, "reference": None},
    "boxes-isolate": {"subject": LEFT_RIGHT, "isolate": True, "strength": 3.0},
    "mask": {"mask": "left", "strength": 2.0},
    "reposition": {"reposition": [(LEFT_RIGHT[0], LEFT_RIGHT[1]), (LEFT_RIGHT[1], LEFT_RIGHT[0])], "isolate": True},
}


def _options(key):
    options = dict(SUBJECT_OPTIONS[key])
    if options.get("mask") == "left":
        options["mask"] = _left_mask()
    return options


# tiny-flux runs cond rows only either way (no batched CFG): with guidance 5.0 two options cover it
MATCH_CASES = [
    pytest.param(name, key, guidance, id=f"{name}-{key}-{'cfg' if guidance > 1 else 'no-cfg'}")
    for name in ("tiny-sd", "tiny-flux") for key in SUBJECT_OPTIONS for guidance in (5.0, 1.0)
    if name == "tiny-sd" or guidance == 1.0 or key in ("word", "words-isolate")
]


@pytest.mark.parametrize("name, key, guidance", MATCH_CASES)
def test_subjects_match_eager_reference(name, key, guidance, tiny_cache):
    pipe = tiny_cache(name)
    control = ConsistentSubjects(**_options(key))
    if name == "tiny-flux" and control.reposition is not None:
        with pytest.raises(UnsupportedError, match="rotary"):
            attnctl.apply(pipe, [control])
        return
    stock = run(pipe, name, prompts=WORD_PROMPTS, steps=3, guidance=guidance)
    with attnctl.apply(pipe, [control]):
        ours = run(pipe, name, prompts=WORD_PROMPTS, steps=3, guidance=guidance)
    with attnctl.apply(pipe, [EagerSubjects(control)]):
        expected = run(pipe, name, prompts=WORD_PROMPTS, steps=3, guidance=guidance)
    assert not torch.allclose(expected, stock, **TOL)
    torch.testing.assert_close(ours, expected, **TOL)
    if control.reference is not None:
        torch.testing.assert_close(ours[control.reference], stock[control.reference], **TOL)


def test_subject_word_flux_true_cfg(tiny_cache):
    """Separate cond / uncond calls: the uncond call of a step uses the maps the cond calls captured the step before."""
    name = "tiny-flux"
    pipe = tiny_cache(name)
    extra = {"negative_prompt": "a blurry dog", "true_cfg_scale": 3.0}
    control = ConsistentSubjects(subject=["cat", "dog"], isolate=True)
    with attnctl.apply(pipe, [control]):
        ours = run(pipe, name, prompts=WORD_PROMPTS, steps=3, **extra)
    with attnctl.apply(pipe, [EagerSubjects(control)]):
        expected = run(pipe, name, prompts=WORD_PROMPTS, steps=3, **extra)
    torch.testing.assert_close(ours, expected, **TOL)


@pytest.mark.parametrize("options", [{"subject": "cat", "strength": 0.0}, {"subject": "cat", "steps": (0.9, 1.0)},
                                     {"subject": LEFT_RIGHT, "isolate": True, "steps": (0.9, 1.0)},
                                     {"reposition": (LEFT_RIGHT[0], LEFT_RIGHT[1]), "strength": 0.0}])
def test_subjects_idle_is_bitwise_stock(options, tiny_cache):
    pipe = tiny_cache("tiny-sd")
    stock = run(pipe, "tiny-sd", prompts=WORD_PROMPTS)
    with attnctl.apply(pipe, [ConsistentSubjects(**options)]):
        assert torch.equal(run(pipe, "tiny-sd", prompts=WORD_PROMPTS), stock)


def test_subject_options_errors_and_round_trip():
    with pytest.raises(ConfigError, match="threshold"):
        ConsistentSubjects(subject="cat", threshold=0.0)
    with pytest.raises(ConfigError, match="one of subject, mask or reposition"):
        ConsistentSubjects(subject="cat", mask=_left_mask())
    with pytest.raises(ConfigError, match="reference=None"):
        ConsistentSubjects(reference=None, reposition=(LEFT_RIGHT[0], LEFT_RIGHT[1]))
    with pytest.raises(ConfigError, match="isolate"):
        ConsistentSubjects(isolate=True)
    with pytest.raises(ConfigError, match="isolate"):
        ConsistentSubjects(subject="cat", isolate="yes")
    with pytest.raises(ConfigError, match="map_layers"):
        ConsistentSubjects(subject=LEFT_RIGHT[0], map_layers=("down",))
    with pytest.raises(ConfigError, match="reposition"):
        ConsistentSubjects(reposition=[(LEFT_RIGHT[0],)])
    with pytest.raises(ConfigError, match="subject"):
        ConsistentSubjects(subject=["cat", "cat"])
    with pytest.raises(ConfigError, match="mask"):
        ConsistentSubjects(mask=torch.full((4, 4), 2.0))
    for options in (_options(key) for key in SUBJECT_OPTIONS):
        control = ConsistentSubjects(**options)
        again = Control.from_dict(control.to_dict())
        assert again == control and hash(again) == hash(control)
    assert ConsistentSubjects(subject=("cat", 1)).subject == (("cat", 1),)
    assert ConsistentSubjects(subject=["cat", ("dog", 0), LEFT_RIGHT[0]]).words == ("cat", ("dog", 0))


def test_word_absent_from_every_prompt_raises(tiny_cache):
    pipe = tiny_cache("tiny-sd")
    with attnctl.apply(pipe, [ConsistentSubjects(subject="horse")]):
        with pytest.raises(attnctl.TokenError, match="horse"):
            run(pipe, "tiny-sd", prompts=WORD_PROMPTS)


@pytest.mark.parametrize("name", [n for n in TINY_MODELS if n not in ("tiny-sd", "tiny-flux")] + list(NEW_TINY_MODELS))
def test_subjects_on_every_family_run_or_refuse(name, tiny_cache):
    """Word subjects with isolation run on every image family (finite, the reference row unchanged, a target changed);
    refused on video (no 2-D subject) and reposition refused where keys carry rotary positions."""
    if name in NEW_TINY_MODELS and not available(name):
        pytest.skip(f"diffusers lacks {name}")
    pipe = tiny_cache(name)
    control = ConsistentSubjects(subject=["cat", "dog"], isolate=True, strength=3.0)
    adapter = attnctl.handle.adapter_for(pipe.transformer if hasattr(pipe, "transformer") else pipe.unet)
    if adapter.grid_dims != 2:
        with pytest.raises(UnsupportedError, match="video"):
            attnctl.apply(pipe, [control])
        return
    repositioned = ConsistentSubjects(reposition=(LEFT_RIGHT[0], LEFT_RIGHT[1]), strength=3.0)
    if adapter.rotary:
        with pytest.raises(UnsupportedError, match="rotary"):
            attnctl.apply(pipe, [repositioned])
        controls = [control]
    else:
        controls = [control, repositioned]
    prompts = WORD_PROMPTS[:2]
    stock = run(pipe, name, prompts=prompts, steps=3, guidance=3.0)
    for each in controls:
        with attnctl.apply(pipe, [each]):
            ours = run(pipe, name, prompts=prompts, steps=3, guidance=3.0)
        assert torch.isfinite(ours).all()
        torch.testing.assert_close(ours[0], stock[0], **LOOSE)
        assert not torch.allclose(ours[1], stock[1], **TOL)


@pytest.mark.skipif(__import__("importlib").util.find_spec("attnctl.toy") is None, reason="no toy model in this build")
def test_toy_agreement_benchmark_ci_size(monkeypatch):
    """The 8-seed version of benchmarks/cross_image.py's consistent-subjects measurement: in every batch it scores,
    the word-map subject changes each target image and never the reference (an idle control would leave every image
    stock's). (On this model sharing does not make the colour agree: the 48-seed numbers and the diagnostic are in
    the README; nothing here asserts a rate the model does not show.)"""
    bench = load_benchmark("cross_image.py", "benchmarks_cross_image_cs")
    from attnctl.toy import CALL_DEFAULTS, analysis, load_toy_shapes

    pipe = load_toy_shapes()
    variants = bench.consistent_variants(quick=True)
    scored: list = []  # every image the benchmark scores, in its order: per seed, per variant, the batch's rows
    describe = analysis.describe
    monkeypatch.setattr(analysis, "describe", lambda image: scored.append(np.asarray(image)) or describe(image))
    seeds, rows = 8, 4
    rates = bench.agreement_rates(pipe, range(seeds), rows, variants)
    assert set(rates) == set(variants) and all(0.0 <= a <= 1.0 and 0.0 <= m <= 1.0 for a, m in rates.values()), rates
    assert list(variants) == ["stock", "subject='circle' (word map)"] and len(scored) == seeds * len(variants) * rows
    for seed in range(seeds):
        stock, ours = scored[seed * 2 * rows:(seed * 2 + 1) * rows], scored[(seed * 2 + 1) * rows:(seed + 1) * 2 * rows]
        assert np.array_equal(ours[0], stock[0]), seed  # the reference
        assert all(not np.array_equal(target, plain) for target, plain in zip(ours[1:], stock[1:])), seed
    control = variants["subject='circle' (word map)"]
    generators = [torch.Generator().manual_seed(i) for i in range(2)]
    stock = pipe(["a circle on the left"] * 2, generator=generators, output_type="latent", **CALL_DEFAULTS).images
    generators = [torch.Generator().manual_seed(i) for i in range(2)]
    with attnctl.apply(pipe, [control]):
        ours = pipe(["a circle on the left"] * 2, generator=generators, output_type="latent", **CALL_DEFAULTS).images
    assert torch.equal(ours[0], stock[0])
    assert not torch.allclose(ours[1], stock[1], **TOL)


@pytest.mark.slow
@pytest.mark.parametrize("options", [{"subject": LEFT_RIGHT}, {"reposition": (LEFT_RIGHT[0], LEFT_RIGHT[1])}, {"mask": "left"}],
                         ids=["boxes", "reposition", "mask"])
def test_box_mask_and_reposition_subjects_compile(options):
    """Boxes, masks and reposition hand their hook constants only: compiled (dynamo's eager backend) bitwise eager, no
    graph break, nothing compiled on the second call; word subjects name their reason. Isolation runs compiled too
    (its label mask on sdpa in the graph: tests/test_compile_controls.py's matrix)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from .test_compile_controls import PROMPTS as COMPILE_PROMPTS
    from .test_compile_controls import _check, _compiled_run

    options = dict(options)
    if options.get("mask") == "left":
        options["mask"] = _left_mask()
    torch._dynamo.reset()
    counters.clear()
    _check(str(options), *_compiled_run("tiny-sd", lambda: ConsistentSubjects(**options), "blocks", steps=4, prompt=COMPILE_PROMPTS))
    adapter = attnctl.handle.adapter_for(__import__("attnctl.testing", fromlist=["x"]).make_tiny_pipeline("tiny-sd").unet)
    assert "maps" in ConsistentSubjects(subject="cat").compile_refusal(adapter)
    assert ConsistentSubjects(subject=LEFT_RIGHT, isolate=True).compile_refusal(adapter) is None


def _latents_per_step(pipe, name, prompts, steps, **kwargs):
    latents = {}

    def keep(pipeline, i, t, state):
        latents[i] = state["latents"].clone()
        return state

    generators = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    pipe(list(prompts), num_inference_steps=steps, output_type="latent", generator=generators, callback_on_step_end=keep,
         guidance_scale=5.0, **CALL_DEFAULTS[name], **kwargs)
    return [latents[i] for i in range(steps)]


@pytest.mark.parametrize("steps", [(0.5, 1.0), (0.5, 0.75)], ids=["window", "one-step"])
def test_word_subject_shares_from_the_window_first_step(steps, tiny_cache):
    """The maps of the step before the window pick the subject tokens of its first step: the steps before the window
    are bitwise stock (the capture changes nothing), the window's first step already shares (a one-step window too)."""
    pipe = tiny_cache("tiny-sd")
    stock = _latents_per_step(pipe, "tiny-sd", WORD_PROMPTS, 4)
    with attnctl.apply(pipe, [ConsistentSubjects(subject="cat", steps=steps, strength=5.0)]):
        ours = _latents_per_step(pipe, "tiny-sd", WORD_PROMPTS, 4)
    assert torch.equal(ours[0], stock[0]) and torch.equal(ours[1], stock[1])
    assert not torch.equal(ours[2], stock[2])


def test_word_missing_from_the_reference_prompt_raises(tiny_cache):
    pipe = tiny_cache("tiny-sd")
    with attnctl.apply(pipe, [ConsistentSubjects(subject="dog", strength=10.0)]):
        with pytest.raises(attnctl.TokenError, match="reference prompt.*row 0"):
            run(pipe, "tiny-sd", prompts=["a red cat", "a blue dog", "a green dog"])


def test_word_truncated_away_in_one_row_raises(tiny_cache):
    pipe = tiny_cache("tiny-sd")
    long = "a red dog " + "and a tree " * 30 + "and a cat"
    with attnctl.apply(pipe, [ConsistentSubjects(subject="cat", strength=10.0)]):
        with pytest.raises(attnctl.TokenError, match="truncates"):
            run(pipe, "tiny-sd", prompts=["a red cat", long])


def test_isolation_label_mask_made_once_per_plan(tiny_cache, monkeypatch):
    """The isolation mask is one object per plan: the backend's dense form of it is built once per call and grid, not
    at every attention call."""
    from attnctl.kernels import spec as kernel_spec

    built = []
    dense = kernel_spec.LabelMask.dense

    def counting(self, *args, **kwargs):
        built.append(id(self))
        return dense(self, *args, **kwargs)

    monkeypatch.setattr(kernel_spec.LabelMask, "dense", counting)
    pipe = tiny_cache("tiny-sd")
    with attnctl.apply(pipe, [ConsistentSubjects(subject=LEFT_RIGHT, isolate=True)]):
        run(pipe, "tiny-sd", prompts=["a cat"] * 3, steps=4)
    assert built and len(built) == len(set(built)) <= 2  # one per self-attention grid (two on tiny-sd) for the call


def test_sag_extra_pass_does_not_replace_the_word_maps(tiny_cache):
    """Without CFG, SAG runs an extra (degraded) forward: the subject's maps are the main pass's, as with SAG absent."""
    from attnctl.controls.cross_image import consistent

    pipe = tiny_cache("tiny-sd")
    passes = []
    capture = consistent._ConsistentBound.capture

    def recording(self, call, *args):
        passes.append(call.frame.extra_pass)
        return capture(self, call, *args)

    control = ConsistentSubjects(subject="cat", layers=["down_blocks.0"], strength=2.0)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(consistent._ConsistentBound, "capture", recording)
        with attnctl.apply(pipe, [control, attnctl.SAG(scale=0.75)]) as handle:
            run(pipe, "tiny-sd", prompts=WORD_PROMPTS, steps=3, guidance=1.0)
    assert passes and handle is not None
    calls = len(passes)
    with pytest.MonkeyPatch.context() as patch:
        passes.clear()
        patch.setattr(consistent._ConsistentBound, "capture", recording)
        with attnctl.apply(pipe, [control]):
            run(pipe, "tiny-sd", prompts=WORD_PROMPTS, steps=3, guidance=1.0)
    assert calls == len(passes)  # SAG's extra pass captured nothing


def test_a_position_subject_works_with_prompt_embeds(tiny_cache):
    """A subject given as a token position needs no prompt text: with `prompt_embeds` it shares as the same word does on
    the text prompts ("cat" is token 3 of each, by the tokenizer). It was refused for want of the prompt's words."""
    pipe = tiny_cache("tiny-sd")
    prompts = ["a red cat", "a blue cat", "a green cat"]
    cat = pipe.tokenizer.convert_tokens_to_ids("cat</w>")
    assert {pipe.tokenizer(p)["input_ids"].index(cat) for p in prompts} == {3}
    embeds, negative = pipe.encode_prompt(prompts, "cpu", 1, True)
    with attnctl.apply(pipe, [ConsistentSubjects(subject=3, strength=5.0)]):
        generators = [torch.Generator().manual_seed(i) for i in range(3)]
        options = dict(CALL_DEFAULTS["tiny-sd"], guidance_scale=5.0)
        by_position = pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, num_inference_steps=2, output_type="latent",
                           generator=generators, **options).images
    with attnctl.apply(pipe, [ConsistentSubjects(subject="cat", strength=5.0)]):
        by_word = run(pipe, "tiny-sd", prompts=prompts)
    torch.testing.assert_close(by_position, by_word, rtol=1e-5, atol=1e-5)
    assert not torch.equal(by_word, run(pipe, "tiny-sd", prompts=prompts))
