"""benchmarks/gpu_e2e.py runs (`--tiny`: the same code on CPU-size configs, seconds; nothing is timed here)."""

from __future__ import annotations

import math

from .helpers import load_benchmark

bench = load_benchmark("gpu_e2e.py", "attnctl_gpu_e2e_benchmark", register=True)


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


def test_tiny_wan_and_flux2_runs_print_the_fastattn_flop_bound(capsys):
    """--models wan,flux2 (issue 19): the CPU-size configs run every variant; FastAttn's fixed band plan reports the
    attention FLOPs it skipped and the FLOP bound beside its speed-up (nothing is timed or judged on CPU)."""
    from attnctl.testing.new_families import available

    missing = [name for name in ("tiny-wan", "tiny-flux2") if not available(name)]
    if missing:
        import pytest

        pytest.skip(f"the installed diffusers lacks {', '.join(missing)}")
    rows = bench.main(["--tiny", "--models", "wan,flux2", "--variants", "apply[],maps,fastattn(band=8),fastattn(window=1x1x1)",
                       "--flux-steps", "3", "--repeats", "1", "--device", "cpu"])
    out = capsys.readouterr().out
    assert not [row for row in rows if row.error], [row.error for row in rows if row.error]
    by = {(row.model, row.variant): row for row in rows}
    for model in ("wan", "flux2"):
        assert by[(model, "apply[]")].bitwise and by[(model, "maps")].bitwise  # capture never changes the output
        fast = by[(model, "fastattn(band=8)")]
        assert fast.attention_saved is not None and fast.flop_bound is not None and not fast.bitwise
        stock = by[(model, "stock")]
        assert abs(fast.flop_bound - stock.flops / (stock.flops - fast.attention_saved)) < 1e-9
    # Wan's 36 video tokens with a band of 8: the window steps skip pairs, so the bound exceeds 1
    assert by[("wan", "fastattn(band=8)")].attention_saved > 0 and by[("wan", "fastattn(band=8)")].flop_bound > 1.0
    # the 3-D window (1, 1, 1) over Wan's 3 x 4 x 3 tokens: the same arithmetic, the backend that ran it printed
    window = by[("wan", "fastattn(window=1x1x1)")]
    assert window.attention_saved > 0 and window.flop_bound > 1.0 and window.backends
    assert abs(window.flop_bound - by[("wan", "stock")].flops / (by[("wan", "stock")].flops - window.attention_saved)) < 1e-9
    assert out.count("beside its FLOP bound") == 3 and "PASS" not in out and "FAIL" not in out


def test_the_gpu_session_script_names_files_that_exist():
    """benchmarks/gpu_session.sh is run on a lent GPU only: here, its syntax and every file it runs are checked."""
    import re
    import shutil
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    script = root / "benchmarks" / "gpu_session.sh"
    if shutil.which("bash"):
        subprocess.run(["bash", "-n", str(script)], check=True)
    named = set(re.findall(r"((?:tests|benchmarks)/[\w/]+\.py)", script.read_text()))
    assert named and all((root / path).is_file() for path in named), sorted(p for p in named if not (root / p).is_file())


def test_flux_cpu_config_and_extra_threshold_rows(capsys):
    """--models flux-cpu (issue 17's CPU judgement of "control for free" with FirstBlockCache): Flux-dev's layout at
    1024 image + 64 text tokens, built in seconds; --fbc-extra-thresholds adds rows (the claim stays at --fbc-threshold).
    Run here with --tiny (tiny-flux), 3 steps: the rows and the "cached" counts, nothing timed."""
    import torch

    torch.manual_seed(0)
    pipe, call = bench.build_flux_cpu()
    config = pipe.transformer.config
    assert (config.num_layers, config.num_single_layers, config.num_attention_heads * config.attention_head_dim) == (4, 8, 256)
    packed = (call["height"] // pipe.vae_scale_factor // 2) * (call["width"] // pipe.vae_scale_factor // 2)
    assert packed == 1024 and call["max_sequence_length"] == 64
    names = set(bench.variants("flux-cpu", 10, cacheable=True, fbc_extra=(0.5,)))
    assert {"pag(0..0.4)", "stock+fbc", "cff", "cff+fbc", "cff(trim)+fbc", "stock+fbc@0.5", "cff+fbc@0.5", "cff(trim)+fbc@0.5"} <= names
    rows = bench.main(["--tiny", "--models", "flux-cpu", "--variants", "stock+fbc,stock+fbc@1000,cff(trim)+fbc@1000",
                       "--fbc-extra-thresholds", "1000", "--flux-steps", "3", "--repeats", "1", "--device", "cpu", "--no-flops"])
    assert not [row for row in rows if row.error], [row.error for row in rows if row.error]
    by = {row.variant: row for row in rows}
    # stock + cache at a threshold that always skips: the last block ran once per pipeline call (its first step)
    assert by["stock+fbc@1000"].last_block_runs == 2 and by["stock+fbc@1000"].denoiser_calls == 6
    # with PAG(steps=(0, 0.4)) the first step after its window runs every block again (a cache context of its own)
    assert by["cff(trim)+fbc@1000"].last_block_runs == 4
    assert "stock+fbc@1000" in capsys.readouterr().out


def test_cpu_claim_line_judges_cff_fbc_at_the_benchmark_threshold(capsys):
    rows = {
        "stock": bench.Row("flux-cpu", "stock", ratio=1.0),
        "stock+fbc": bench.Row("flux-cpu", "stock+fbc", ratio=1.004, last_block_runs=20, denoiser_calls=20),
        "cff+fbc": bench.Row("flux-cpu", "cff+fbc", ratio=2.311, flop_ratio=2.164),
        "cff(trim)+fbc@1": bench.Row("flux-cpu", "cff(trim)+fbc@1", ratio=0.617),  # an extra row: not judged
    }
    bench._cpu_claim(rows, 0.12)
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("CPU FAIL flux-cpu cff+fbc at threshold 0.12: x2.311")
    assert "last block ran in 20/20 calls" in out[0]


def test_an_unknown_variant_name_stops_the_run_before_any_model_is_built(monkeypatch):
    """--variants with a name no model has (`tgate` for `tgate(g=8/20)`, a typo) was skipped silently, wasting a GPU
    window: it stops the run, listing the known names; a name of another model is accepted (one list per session)."""
    import argparse

    import pytest

    monkeypatch.setattr(bench, "build", lambda *args, **kwargs: pytest.fail("a model was built"))
    with pytest.raises(SystemExit, match=r"unknown variant\(s\) 'tgate', 'bogus' .*sd15: stock, .*tgate\(g=8/20\)"):
        bench.main(["--tiny", "--models", "sd15", "--variants", "stock,tgate,bogus", "--device", "cpu"])
    args = argparse.Namespace(variants="tgate(g=8/20),fastattn(band=8),stock+fbc@0.5", steps=20, flux_steps=10, tiny=True,
                              fbc_threshold=0.12, fbc_extra_thresholds="0.5")
    bench.check_variants(["flux"], args)  # SD 1.5's TGate, Wan's FastAttn band, an extra threshold's row
    with pytest.raises(SystemExit, match="'tgate\\(g=8/20\\)'"):
        bench.check_variants(["sd15"], argparse.Namespace(**{**vars(args), "steps": 10}))  # 10 steps: tgate(g=4/10)
