"""Consistent subjects (StoryDiffusion's consistent self-attention, IR-Diffusion's subject restriction): identities,
an independent eager reference written from docs/methods.md ("Consistent subjects"), every family, errors."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

import attnctl
from attnctl import ConfigError, UnsupportedError
from attnctl.control import Bound, Control
from attnctl.controls.cross_image.consistent import ConsistentSubjects
from attnctl.processors.edit import Edit, LayerHook
from attnctl.testing import CALL_DEFAULTS, NEW_TINY_MODELS, TINY_MODELS
from attnctl.testing.new_families import PROMPT_KEYWORD, available

PROMPTS = ["a red cat on the street", "a blue dog in a field", "a green car"]
TOL = {"rtol": 1e-4, "atol": 1e-4}
LOOSE = {"rtol": 1e-3, "atol": 1e-3}


def run(pipe, name, prompts=PROMPTS, steps=2, guidance=5.0, **kwargs):
    options = dict(CALL_DEFAULTS[name])
    options.update(kwargs)
    options.setdefault("guidance_scale", guidance)
    generators = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
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
            extra = torch.where(inside, math.log(c.strength), -math.inf).double()
            bias = torch.cat([torch.zeros(k.shape[2], dtype=torch.float64)] + [extra] * len(sources))
            logits = q[i][:, image].double() @ torch.cat(keys, 1).transpose(-1, -2) * scale + bias
            if mask is not None:
                m = mask[i if mask.shape[0] > 1 else 0].double()
                m = m[..., image, :] if m.shape[-2] > 1 else m
                logits[..., : k.shape[2]] += m
            out[i, :, image] = (torch.softmax(logits, -1) @ torch.cat(values, 1)).to(out.dtype)
        return out, None


@dataclass(frozen=True)
class EagerConsistent(Control, type_name="test-eager-consistent"):
    reference: int | None = 0
    box: tuple | None = None
    strength: float = 1.0

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
    "options", [{}, {"subject": (0.0, 0.0, 0.5, 1.0), "strength": 3.0}, {"reference": None}, {"reference": 1, "strength": 0.5}],
    ids=["reference", "box", "all", "row1"],
)
@pytest.mark.parametrize("name", TINY_MODELS)
def test_matches_eager_reference(name, options, tiny_cache):
    pipe = tiny_cache(name)
    stock = run(pipe, name)
    with attnctl.apply(pipe, [ConsistentSubjects(**options)]):
        ours = run(pipe, name)
    eager = EagerConsistent(options.get("reference", 0), options.get("subject"), options.get("strength", 1.0))
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
    control = ConsistentSubjects(reference=None, subject=(0, 0, 0.5, 1), strength=2.0)
    assert Control.from_dict(control.to_dict()) == control


def test_reference_outside_the_call_raises(tiny_cache):
    pipe = tiny_cache("tiny-sd")
    with attnctl.apply(pipe, [ConsistentSubjects(reference=5)]):
        with pytest.raises(ConfigError, match="prompt row 5"):
            run(pipe, "tiny-sd")
