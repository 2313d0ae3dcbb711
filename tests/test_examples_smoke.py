"""Every example and every benchmark runs, in its smoke mode (`--quick`: the smallest sizes, seconds each), as
a user runs it: a subprocess from another folder (issue #18). Nothing here is timed; the benchmarks' numbers
mean nothing at these sizes. `benchmarks/bench_kernels.py` and `benchmarks/gpu_e2e.py` have smoke tests of their own.

PYTHONSAFEPATH=1: the script's own folder is not put first on sys.path, so a module in it can never shadow an
installed package (`benchmarks/kernels.py` shadowed the `kernels` package transformers imports)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
slow = pytest.mark.slow
heavy = pytest.mark.heavy

#: (script, extra arguments, a line its output must hold); the slow ones (over ~20 s of CPU on 2 cores) are marked
EXAMPLES = [
    pytest.param("examples/reweight.py", [], "saved", id="reweight"),
    pytest.param("examples/attention_maps.py", [], "pictures in", id="attention_maps"),
    pytest.param("examples/token_reduction.py", [], "saved stock.png, tome.png, agent.png", id="token_reduction"),
    pytest.param("examples/guidance.py", ["--methods", "pag,sag,skip"], "saved 4 images", id="guidance"),
    pytest.param("examples/regions.py", ["--describe"], "saved layout.png", id="regions"),
    pytest.param("examples/interpolate.py", [], "saved strip.png", id="interpolate"),
    pytest.param("examples/consistent_subjects.py", [], "saved comparison.png", id="consistent_subjects"),
    pytest.param("examples/reference_attention.py", [], "saved comparison.png", id="reference_attention"),
    pytest.param("examples/prompt_to_prompt.py", [], "saved", id="prompt_to_prompt"),
    pytest.param("examples/attend_and_excite.py", [], "saved stock.png, attend_excite.png", id="attend_and_excite"),
    pytest.param("examples/generate.py", ["--control", '{"type": "pag", "scale": 2.0}'], "0.png", id="generate"),
    pytest.param("examples/fast_attention.py", [], "PSNR against the uncached image", id="fast_attention", marks=slow),
    pytest.param("examples/segmentation_masks.py", [], "second_pass.png", id="segmentation_masks"),
    pytest.param("examples/structured_guidance.py", [], "comparison.png", id="structured_guidance"),
]
BENCHMARKS = [
    pytest.param("benchmarks/overhead.py", [], "ratio", id="overhead"),
    pytest.param("benchmarks/render.py", [], "", id="render"),
    pytest.param("benchmarks/token_reduction.py", [], "ToMe at ratio", id="token_reduction"),
    pytest.param("benchmarks/cross_image.py", [], "cost, one 3-row call", id="cross_image", marks=slow),
    pytest.param("benchmarks/cost_counters.py", [], "| tiny-sd | reweight |", id="cost_counters"),
    pytest.param("benchmarks/guidance.py", ["--variants", "pag-self"], "", id="guidance", marks=slow),
    pytest.param("benchmarks/reweight.py", [], "", id="reweight", marks=slow),
    pytest.param("benchmarks/regions.py", [], "labels-blocked", id="regions", marks=slow),
    pytest.param("benchmarks/p2p.py", [], "success", id="p2p", marks=slow),
    pytest.param("benchmarks/p2p_padding.py", [], "own probs after it", id="p2p_padding", marks=slow),
    pytest.param("benchmarks/cache_ab.py", ["--repeats", "1", "--families", "sd,pixart"], "time ratio", id="cache_ab", marks=slow),
    pytest.param("benchmarks/toy_eval.py", ["--controls"], "two-object regions binding", id="toy_eval", marks=slow),
    pytest.param("benchmarks/attend_excite.py", [], "peak memory of one 64x64 call", id="attend_excite", marks=[slow, heavy]),
    pytest.param("benchmarks/segmentation.py", [], "mean IoU  magnets", id="segmentation"),
    pytest.param("benchmarks/structured.py", [], "colour binding", id="structured"),
    pytest.param("benchmarks/video_window_attention.py", ["--backends", "sdpa"], "speed-up", id="video_window_attention"),
    pytest.param("benchmarks/window_tiles_ab.py", [], "FLOP bound", id="window_tiles_ab", marks=slow),
]
NOISE = ("requires torchvision", "Loading pipeline components", "Loading weights", "Traceback")


def _pixels(path: Path):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"), dtype=float)


def _check_attention_maps(stdout: str, out: Path) -> None:
    """toy-shapes' maps are read at attnctl.toy.MAP_LAYERS (the 4x4 down level's cross-attention): the default, every
    cross layer, gives maps anti-correlated with the objects there."""
    assert "AttentionMaps: steps 0 <= i/n < 1, 1 layer(s)" in stdout, stdout[-3000:]
    assert "down_blocks.2.attentions.0.transformer_blocks.0.attn2 (cross)" in stdout, stdout[-3000:]


def _check_guidance(stdout: str, out: Path) -> None:
    """On toy-shapes PAG on its default layers (the 16-token mid block) changed the 2-step image by at most 2 levels of
    255; the example's toy layers (every self-attention layer) change it visibly (77)."""
    change = abs(_pixels(out / "pag.png") - _pixels(out / "none.png")).max()
    assert change > 16, change


def _check_reweight(stdout: str, out: Path) -> None:
    """The toy default 'a (red:0) circle' at the default seed takes the red off the circle (2 steps: 28 -> 12 red
    pixels; at seed 0, where the 10-step circle stays red, 58 -> 59)."""
    from attnctl.toy import analysis

    def red(name: str) -> float:
        return float(analysis.color_masks(_pixels(out / name))["red"].sum())

    assert red("reweighted.png") < 0.6 * red("stock.png"), (red("stock.png"), red("reweighted.png"))


def _check_regions(stdout: str, out: Path) -> None:
    """Isolation is on by default on toy-shapes: its 7 self-attention layers are controlled with the 7 cross layers."""
    if "(toy-shapes," in stdout:
        assert "Regions: steps 0 <= i/n < 1, 14 layer(s)" in stdout, stdout[-3000:]


#: what an example's smoke run must also show, read from its stdout and its --out folder
CHECKS = {"examples/attention_maps.py": _check_attention_maps, "examples/guidance.py": _check_guidance,
          "examples/reweight.py": _check_reweight, "examples/regions.py": _check_regions}


def run(script: str, args: list[str], tmp_path: Path, out: bool) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONSAFEPATH": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(ROOT / script), "--quick", *args] + (["--out", str(tmp_path / "out")] if out else [])
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(("script", "args", "expect"), EXAMPLES)
def test_example_smoke(script, args, expect, tmp_path):
    result = run(script, args, tmp_path, out=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert expect in result.stdout, result.stdout[-3000:]
    # a control idle in the quick run would make its image the stock one (guidance.py's skip-layer window held none
    # of its 2 steps): the smoke run would test nothing of it
    assert "IdleControlWarning" not in result.stderr, result.stderr[-3000:]
    assert not [noise for noise in NOISE if noise in result.stderr + result.stdout], result.stderr[-3000:]
    assert any((tmp_path / "out").rglob("*.png"))
    if script in CHECKS:
        CHECKS[script](result.stdout, tmp_path / "out")


def test_quickstart_prints_its_result_lines_only(tmp_path):
    result = run("examples/quickstart.py", [], tmp_path, out=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not [noise for noise in NOISE if noise in result.stderr + result.stdout], result.stderr[-3000:]
    assert (tmp_path / "out" / "grid.png").is_file()
    lines = result.stdout.strip().splitlines()
    assert [line.split(":")[0].strip() for line in lines[:2]] == ["stock", "regions"]
    assert "attnctl handle on" not in result.stdout and len(lines) == 4, result.stdout


@pytest.mark.parametrize(("script", "args", "expect"), BENCHMARKS)
def test_benchmark_smoke(script, args, expect, tmp_path):
    result = run(script, args, tmp_path, out=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert expect in result.stdout, result.stdout[-3000:]
    assert "Traceback" not in result.stderr


def test_every_example_and_benchmark_is_smoke_tested():
    covered = {p.values[0] for p in EXAMPLES + BENCHMARKS} | {"examples/quickstart.py"}
    present = {f"examples/{p.name}" for p in (ROOT / "examples").glob("*.py") if not p.name.startswith("_")}
    present |= {f"benchmarks/{p.name}" for p in (ROOT / "benchmarks").glob("*.py")}
    # smoke-tested by their own tests: tests/test_kernels_bench.py (--tiny), tests/test_gpu_e2e_smoke.py (--tiny)
    present -= {"benchmarks/bench_kernels.py", "benchmarks/gpu_e2e.py"}
    assert present == covered
