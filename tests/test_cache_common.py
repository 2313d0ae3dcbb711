"""What the cache controls share: per-call state, exclusive caches, row selection, composition with other
controls."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

import attnctl
from attnctl.control import Bound, Control
from attnctl.denoiser_call import Perturbation, RowLayout, RowPlan
from attnctl.errors import ConfigError
from attnctl.processors.edit import Edit

from .cache_helpers import make_plan
from .helpers import generate

pytestmark = pytest.mark.parity


def _controls(pipe, kind):
    if kind == "tgate":
        return [attnctl.TGate(gate_step=2, sp_interval=1, fi_interval=2)]
    layers = ("transformer_blocks.0.attn1", "transformer_blocks.1.attn1")
    return [attnctl.FastAttn(plan=make_plan(pipe, 4, {name: ["full", "window_residual", "step_share", "cfg_share"] for name in layers}))]


def _caches(bound):
    if hasattr(bound, "caches"):
        return [len(cache) for cache in bound.caches.values()]
    return [len(state.output) + len(state.residual) for state in bound.states.values()]


@pytest.mark.parametrize("kind, name", [("tgate", "tiny-sd"), ("fastattn", "tiny-pixart")])
def test_caches_do_not_survive_into_the_next_call(kind, name, tiny_cache):
    pipe = tiny_cache(name)
    with attnctl.apply(pipe, _controls(pipe, kind)) as handle:
        generate(pipe, name, steps=4, prompt=["a blue bird", "a dog"], seed=7)
        first = handle.runtime.last_call.bound[0]
        assert all(n == 0 for n in _caches(first))  # emptied at the end of the call
        second = generate(pipe, name, steps=4, seed=1)
        assert handle.runtime.last_call.bound[0] is not first
    with attnctl.apply(pipe, _controls(pipe, kind)):
        fresh = generate(pipe, name, steps=4, seed=1)
    assert torch.equal(second, fresh)


@pytest.mark.parametrize("kind, name", [("tgate", "tiny-sd"), ("fastattn", "tiny-pixart")])
def test_a_failed_call_leaves_no_cache_behind(kind, name, tiny_cache):
    pipe = tiny_cache(name)

    def stop(*args):
        step = args[0] if isinstance(args[0], int) else args[1]
        if step == 2:
            raise KeyboardInterrupt("stop")
        return args[-1]

    # PixArt pipelines take the older callback(step, timestep, latents)
    callback = {"callback": stop, "callback_steps": 1} if name == "tiny-pixart" else {"callback_on_step_end": stop}
    with attnctl.apply(pipe, _controls(pipe, kind)) as handle:
        with pytest.raises(KeyboardInterrupt):
            generate(pipe, name, steps=4, seed=3, **callback)
        stale = handle.runtime.call.bound[0]
        after = generate(pipe, name, steps=4, seed=1)
        assert all(n == 0 for n in _caches(stale))
    with attnctl.apply(pipe, _controls(pipe, kind)):
        assert torch.equal(after, generate(pipe, name, steps=4, seed=1))


def test_two_caches_on_one_layer_are_refused_at_apply(tiny_cache):
    pipe = tiny_cache("tiny-pixart")
    with pytest.raises(ConfigError, match="two caches on one layer"):
        attnctl.apply(pipe, [attnctl.TGate(gate_step=2, sp_interval=2), attnctl.FastAttn(threshold=0.1)])
    assert "forward" not in pipe.transformer.__dict__
    with attnctl.apply(pipe, [attnctl.TGate(gate_step=2), attnctl.FastAttn(threshold=0.3, window=4)]) as handle:
        generate(pipe, "tiny-pixart", steps=4)
        assert handle.outputs["tgate"].hits > 0 and handle.outputs["fastattn"].hits > 0


def test_row_selection_layout():
    layout, index = RowLayout.batched_cfg(2).selected("uncond", "cond")
    assert index == (0, 1) and [(r.branch, r.prompt) for r in layout.rows] == [("cond", 0), ("cond", 1)]


# -- composition: stand-ins for a guidance control and a reweighting control, available now ---------------------------
@dataclass(frozen=True)
class ZeroGuidance(Control, type_name="test-zero-guidance"):
    """Adds perturbed copies of the cond rows with a zero guidance term; records the shapes it saw."""

    separate: bool = False
    seen: list = field(default_factory=list, compare=False, hash=False)

    def bind(self, context):
        return _ZeroBound(self, context.layers, (0.0, 1.0))


class _ZeroBound(Bound):
    def row_plan(self, frame):
        def term(cond, perturbed, frame):
            self.control.seen.append((frame.step.index, tuple(cond.shape)))
            return torch.zeros_like(cond)

        return RowPlan((Perturbation("zero", term, separate=self.control.separate),))


@dataclass(frozen=True)
class CondBias(Control, type_name="test-cond-bias"):
    """A per-key logit bias on the cond rows of cross-attention (what a reweighting control hands the backend)."""

    layers: str = "cross"

    def bind(self, context):
        return _BiasBound(self, context.layers, (0.0, 1.0))


class _BiasBound(Bound):
    def edit(self, layer, frame):
        text = frame.geometry(layer).text_len
        bias = torch.zeros(len(frame.rows), text)
        bias[list(frame.rows.indices("cond")), 1:3] = 1.5
        return Edit(key_bias=bias)


@pytest.mark.parametrize("separate", [False, True], ids=["batched", "separate"])
def test_tgate_composes_with_added_rows_and_key_bias(separate, tiny_cache):
    pipe = tiny_cache("tiny-sd")
    guidance = ZeroGuidance(separate=separate)
    with attnctl.apply(pipe, [attnctl.TGate(gate_step=2)]):
        alone = generate(pipe, "tiny-sd", steps=4)
    with attnctl.apply(pipe, [CondBias(), attnctl.TGate(gate_step=2), guidance]) as handle:
        together = generate(pipe, "tiny-sd", steps=4)
        report = handle.outputs["tgate"]
    with attnctl.apply(pipe, [attnctl.TGate(gate_step=2), guidance]):
        rows_only = generate(pipe, "tiny-sd", steps=4)
    torch.testing.assert_close(rows_only, alone, rtol=1e-5, atol=1e-5)  # zero term: the added rows change nothing
    assert not torch.allclose(together, alone)  # the bias acts before the gate
    cross = [layer.name for layer in handle.adapter.layers if layer.kind == "cross"]
    assert all(report.entries[(3, name)].ran == ["cached"] for name in cross)  # perturbed rows included
    # after the gate the guidance control still gets its rows: copies of the single null-text row per prompt
    assert {shape[0] for step, shape in guidance.seen if step >= 2} == {2}


# -- composition with the real controls (issues 3 and 5) ------------------------------------------------------------
needs_reweight_and_pag = pytest.mark.skipif(
    not (hasattr(attnctl, "PAG") and hasattr(attnctl, "Reweight")),
    reason="attnctl.PAG and attnctl.Reweight are built in issues 5 and 3; this test runs once both are merged",
)


@needs_reweight_and_pag
@pytest.mark.parametrize("kind, name", [("tgate", "tiny-sd"), ("fastattn", "tiny-pixart"), ("fastattn", "tiny-sd")])
def test_cache_composes_with_reweight_and_pag(kind, name, tiny_cache):
    pipe = tiny_cache(name)
    cache = attnctl.TGate(gate_step=2) if kind == "tgate" else attnctl.FastAttn(threshold=0.3, window=4)
    reweight = attnctl.Reweight({"cat": 2.0})
    pag = attnctl.PAG(scale=3.0)
    with attnctl.apply(pipe, [cache]):
        cache_only = generate(pipe, name, prompt="a photo of a cat", steps=4)
    with attnctl.apply(pipe, [reweight, pag]):
        without_cache = generate(pipe, name, prompt="a photo of a cat", steps=4)
    with attnctl.apply(pipe, [reweight, cache, pag]) as handle:
        together = generate(pipe, name, prompt="a photo of a cat", steps=4)
        report = handle.outputs[kind]
    assert torch.isfinite(together).all()
    assert report.hits > 0
    assert not torch.allclose(together, cache_only) and not torch.allclose(together, without_cache)


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sdxl", "tiny-sd3", "tiny-flux", "tiny-pixart"])
def test_report_flops_match_the_shapes_each_layer_sees(name, tiny_cache):
    """The report's FLOPs come from the geometry; they must equal 4 B H Nq Nk D of the q and k each layer received."""
    from .cache_helpers import Capture

    pipe = tiny_cache(name)
    capture = Capture()
    with attnctl.apply(pipe, [capture, attnctl.FastAttn(threshold=0.0)]) as handle:
        generate(pipe, name, steps=2, guidance=1.0 if name == "tiny-flux" else 5.0)
        report = handle.outputs["fastattn"]
    seen = {}
    for layer, step, _, q, k, _, _, _ in capture.log:
        batch, heads, nq, head_dim = q.shape
        seen[(step, layer)] = seen.get((step, layer), 0.0) + 4.0 * batch * heads * nq * k.shape[2] * head_dim
    assert set(seen) == set(report.entries) and len(seen) == 2 * len(handle.adapter.layers)
    for key, flops in seen.items():
        assert report.entries[key].full_flops == flops == report.entries[key].flops, key


@pytest.mark.skipif(not hasattr(attnctl, "PAG"), reason="attnctl.PAG is built in issue 5; this test runs once it is merged")
@pytest.mark.parametrize("kind, name", [("tgate", "tiny-sd"), ("fastattn", "tiny-pixart"), ("fastattn", "tiny-flux")])
@pytest.mark.parametrize("separate", [False, True], ids=["batched", "separate"])
def test_cache_composes_with_pag(kind, name, separate, tiny_cache):
    """PAG's perturbed rows (batched or in their own forward) next to cached layers: after TGATE's gate they are
    copies of the single null-text row, and every cross-attention layer still hits its stored mean."""
    pipe = tiny_cache(name)
    guidance = 1.0 if name == "tiny-flux" else 5.0
    cache = attnctl.TGate(gate_step=2) if kind == "tgate" else attnctl.FastAttn(threshold=0.3, window=4)
    pag = attnctl.PAG(scale=3.0, separate=separate)
    with attnctl.apply(pipe, [cache]):
        cache_only = generate(pipe, name, prompt="a photo of a cat", steps=4, guidance=guidance)
    with attnctl.apply(pipe, [pag]):
        pag_only = generate(pipe, name, prompt="a photo of a cat", steps=4, guidance=guidance)
    with attnctl.apply(pipe, [cache, pag]) as handle:
        together = generate(pipe, name, prompt="a photo of a cat", steps=4, guidance=guidance)
        report = handle.outputs[kind]
    assert torch.isfinite(together).all() and report.hits > 0
    assert not torch.allclose(together, cache_only) and not torch.allclose(together, pag_only)
    if kind == "tgate":
        cross = [layer.name for layer in handle.adapter.layers if layer.kind == "cross"]
        assert all(report.entries[(3, layer)].ran == ["cached"] for layer in cross)


def test_branch_cache_hands_back_the_stored_batch_without_copies_and_reorders_by_prompt():
    """A batched CFG layout stored under one key per branch comes back as the stored tensor itself when the rows are
    asked in the stored order (no per-branch split at the store, no cat at every reuse); another order or another
    row set gets the right rows, matched by prompt."""
    from attnctl.controls.caching import BranchCache, row_keys
    from attnctl.denoiser_call import Row

    layout = RowLayout(tuple(Row(branch, prompt) for branch in ("uncond", "cond") for prompt in (0, 1)))
    value = torch.arange(4.0)[:, None].expand(4, 3).clone()
    cache = BranchCache()
    cache.store(layout, value, row_keys(layout, 0))
    assert cache.load(layout, row_keys(layout, 0)) is value
    swapped = RowLayout(tuple(Row(branch, prompt) for branch in ("cond", "uncond") for prompt in (1, 0)))
    assert torch.equal(cache.load(swapped, row_keys(swapped, 0)), value[[3, 2, 1, 0]])
    cond_only = RowLayout((Row("cond", 1),))
    assert torch.equal(cache.load(cond_only, row_keys(cond_only, 0)), value[[3]])
    assert cache.load(RowLayout((Row("cond", 2),)), [(0, "cond", None)]) is None
    assert cache.load(layout, row_keys(layout, 1)) is None
