"""benchmarks/gpu_e2e.py runs (`--tiny`: the same code on CPU-size configs, seconds; nothing is timed here)."""

from __future__ import annotations

import importlib.util
import math
import os
import sys

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "gpu_e2e.py")
_SPEC = importlib.util.spec_from_file_location("attnctl_gpu_e2e_benchmark", _PATH)
bench = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = bench
_SPEC.loader.exec_module(bench)


def test_tiny_run_reports_every_column(capsys):
    rows = bench.main(["--tiny", "--models", "sd15,flux", "--variants", "apply[],reweight,pag,stock+fbc,cff+fbc", "--steps", "2",
                       "--flux-steps", "3", "--repeats", "1", "--device", "cpu", "--fbc-threshold", "1.0"])
    out = capsys.readouterr().out
    by = {(row.model, row.variant): row for row in rows}
    assert {("sd15", "stock-nocfg"), ("flux", "pag")} <= set(by)
    assert not [row for row in rows if row.error], [row.error for row in rows if row.error]
    for model in ("sd15", "flux"):
        stock, empty, reweight, pag = (by[(model, v)] for v in ("stock", "apply[]", "reweight", "pag"))
        assert stock.ratio == 1.0 and stock.flop_ratio == 1.0 and stock.bitwise
        assert empty.bitwise and empty.flop_ratio == 1.0 and math.isinf(empty.psnr)
        assert not reweight.bitwise and math.isfinite(reweight.psnr)
        assert pag.flop_ratio > 1.0  # the perturbed rows are extra work
        assert all(row.ms > 0 and row.ratio > 0 for row in (empty, reweight, pag))
    assert by[("sd15", "stock-nocfg")].flop_ratio < 0.6  # no CFG: half the rows
    # "control for free" with FirstBlockCache: only where the denoiser has enable_cache (not the UNet)
    assert ("sd15", "stock+fbc") not in by and "UNet2DConditionModel has no enable_cache" in out
    cache, controlled = by[("flux", "stock+fbc")], by[("flux", "cff+fbc")]
    assert cache.denoiser_calls == controlled.denoiser_calls == 6  # two calls of 3 steps in the warm-up round
    assert cache.last_block_runs < cache.denoiser_calls and controlled.last_block_runs < controlled.denoiser_calls  # skips
    assert not cache.bitwise and not controlled.bitwise  # the cache acts, and so do the controls under it
    assert controlled.psnr != cache.psnr
    assert "not CUDA: no target is judged" in out and "PASS" not in out and "FAIL" not in out
