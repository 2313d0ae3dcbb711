"""What attnctl does on the denoiser calls where diffusers' FirstBlockCache skips every block but the first (issue 17,
"control for free" with a block cache): counts, never times (`benchmarks/cost_counters.per_denoiser_call`).

Edits are built lazily, at a layer's first attention call in a denoiser call, so the blocks a cache skips cost attnctl
nothing: no edit, no mask, no perturbed-row work. PAG(steps=(0, 0.4)) runs its two-row calls under a cache context of
their own (`foreign_patches.keyed_cache_context`), so the pipeline's context starts empty at the first call after the
window: that call always runs every block (one full call more than stock + FirstBlockCache at a threshold that skips)."""

from __future__ import annotations

import pytest

import attnctl
from attnctl.testing import make_tiny_pipeline

from .helpers import load_benchmark

diffusers = pytest.importorskip("diffusers")
if not hasattr(diffusers, "FirstBlockCacheConfig"):
    pytest.skip(f"diffusers {diffusers.__version__} has no FirstBlockCacheConfig", allow_module_level=True)

bench = load_benchmark("cost_counters.py", "attnctl_cost_counters_fbc", register=True)

STEPS = 10
ALWAYS_SKIP = 1e9  # every call after a context's first skips the later blocks
NEVER_SKIP = 0.0


def _cff():
    regions = attnctl.Regions([attnctl.Region("a red cat", box=(0.0, 0.0, 0.5, 1.0)),
                               attnctl.Region("a blue dog", box=(0.5, 0.0, 1.0, 1.0))], base_ratio=0.2)
    return [attnctl.Reweight({"red": 2.0}), regions, attnctl.PAG(scale=3.0, steps=(0.0, 0.4))]


CONTROLS = {
    "reweight": lambda: [attnctl.Reweight({"red": 2.0})],
    "regions": lambda: [bench._regions(False)],
    "pag(0..0.4)": lambda: [attnctl.PAG(scale=3.0, steps=(0.0, 0.4))],
    "cff": _cff,
}


@pytest.fixture(scope="module")
def flux():
    pipe = make_tiny_pipeline("tiny-flux")
    layers = {
        "all": len(bench._blocks(pipe.transformer)),  # tiny-flux: one attention layer per block
        "first": 1,
    }
    stock = {threshold: bench.per_denoiser_call(pipe, "tiny-flux", None, diffusers.FirstBlockCacheConfig(threshold=threshold), STEPS)
             for threshold in (ALWAYS_SKIP, NEVER_SKIP)}
    return pipe, layers, stock


@pytest.mark.parametrize("name", list(CONTROLS))
def test_skipped_calls_build_edits_only_for_the_first_block(flux, name):
    pipe, layers, stock = flux
    calls = bench.per_denoiser_call(pipe, "tiny-flux", CONTROLS[name], diffusers.FirstBlockCacheConfig(threshold=ALWAYS_SKIP), STEPS)
    assert len(calls) == STEPS
    skipped = [call for call in calls if not call.tail_ran]
    assert skipped, "the cache skipped nothing"
    for call in calls:
        expected = layers["all"] if call.tail_ran else layers["first"]
        assert call.layers_run == expected, call
        assert call.edits_built <= call.layers_run, call  # nothing built for a layer that never runs
    # the operations attnctl adds to a skipped call are those of the first block: fewer than it adds to the same call
    # with every block run (the same step, no skip)
    full = bench.per_denoiser_call(pipe, "tiny-flux", CONTROLS[name], diffusers.FirstBlockCacheConfig(threshold=NEVER_SKIP), STEPS)
    for i, call in enumerate(calls):
        if not call.tail_ran:
            skipped_extra, full_extra = call.ops - stock[ALWAYS_SKIP][i].ops, full[i].ops - stock[NEVER_SKIP][i].ops
            assert 0 <= skipped_extra <= full_extra, (i, call, full[i])
            if name != "pag(0..0.4)":  # PAG perturbs the middle double block: on tiny-flux (one double block) the first
                assert skipped_extra < full_extra, (i, call, full[i])


def test_pag_window_boundary_runs_one_full_call_more(flux):
    """PAG's rows (2 instead of 1) for the first 40% of the steps: the cache keys them apart, so the first call after
    the window finds the pipeline's context empty and runs every block, where stock + cache would have skipped."""
    pipe, layers, stock = flux
    calls = bench.per_denoiser_call(pipe, "tiny-flux", _cff, diffusers.FirstBlockCacheConfig(threshold=ALWAYS_SKIP), STEPS)
    window = sum(1 for call in calls if call.rows == 2)
    assert window == 4  # steps 0..3 of 10 (PAG's steps=(0, 0.4))
    assert [call.tail_ran for call in stock[ALWAYS_SKIP]] == [True] + [False] * (STEPS - 1)
    assert [call.tail_ran for call in calls] == [True] + [False] * (window - 1) + [True] + [False] * (STEPS - window - 1)


def test_without_skips_every_layer_gets_its_edit(flux):
    pipe, layers, _ = flux
    calls = bench.per_denoiser_call(pipe, "tiny-flux", _cff, diffusers.FirstBlockCacheConfig(threshold=NEVER_SKIP), STEPS)
    assert all(call.tail_ran and call.layers_run == call.edits_built == layers["all"] for call in calls)


def test_block_cache_table_prints_every_kind_of_call(capsys):
    """`python benchmarks/cost_counters.py --block-cache tiny-flux`: one line per variant, the calls grouped by rows and by
    whether every block ran; edits built only for the attention calls that ran."""
    import re

    bench.block_cache_calls("tiny-flux", ALWAYS_SKIP, STEPS)
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines()[1:] if line.strip()}
    assert set(lines) == {"stock", "cff", "cff(trim)"}
    assert "1 row(s) first block: 9 x" in lines["stock"]
    assert "2 row(s) all blocks: 1 x" in lines["cff"] and "2 row(s) first block: 3 x" in lines["cff"]
    assert "1 row(s) all blocks: 1 x" in lines["cff"] and "1 row(s) first block: 5 x" in lines["cff"]
    built, ran = map(int, re.search(r"edits built (\d+) for (\d+) attention calls", lines["cff"]).groups())
    assert built == ran
