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
    rows = bench.main(["--tiny", "--models", "sd15,flux", "--variants", "apply[],reweight,pag", "--steps", "2",
                       "--flux-steps", "2", "--repeats", "1", "--device", "cpu"])
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
    assert "not CUDA: no target is judged" in out and "PASS" not in out and "FAIL" not in out
