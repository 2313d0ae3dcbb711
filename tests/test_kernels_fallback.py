"""`auto` on measurements, and the move to the next backend when a Triton kernel does not compile.

A compile failure is simulated by replacing a kernel with one whose launch raises Triton's CompilationError
(what the GPU compile of issue #15 raised); the kernels run in the interpreter on CPU otherwise.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import warnings

import pytest
import torch

from attnctl import kernels
from attnctl.errors import BackendError
from attnctl.kernels import AttentionSpec, LabelMask, Sparse, choose_backend, reference

triton = pytest.importorskip("triton")
from attnctl.kernels import triton_attention as ta  # noqa: E402
from attnctl.kernels import triton_labels as tlab  # noqa: E402

INF = float("-inf")


class _Broken:
    """Stands for a jit kernel whose compilation fails: `kernel[grid](...)` raises CompilationError."""

    def __getitem__(self, grid):
        from triton.compiler.errors import CompilationError

        def launch(*args, **kwargs):
            raise CompilationError(None, ast.Name("LOG2E"), 'NameError("Cannot access global variable LOG2E")')

        return launch


@pytest.fixture
def fresh(monkeypatch):
    """Empty failure records, triton first in CPU auto (the interpreter stands for the GPU), warnings reset."""
    monkeypatch.setattr(kernels, "KERNEL_FAILURES", {})
    monkeypatch.setattr(kernels, "_WARNED", set())
    monkeypatch.setitem(kernels.AUTO_ORDER, "cpu", ("triton", "sdpa", "reference"))
    return monkeypatch


def _qkv(n=24, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, 2, n, d, generator=g) for _ in range(3))


def _reweight(n=24):
    return AttentionSpec(key_bias=torch.linspace(-1, 1, n)[None], value_scale=torch.linspace(0.5, 2, n)[None])


def _falls_back(q, k, v, spec, first, warning, kernel):
    """`auto` chooses `first`, whose kernel fails to compile: one warning, the reference's result, the failure recorded."""
    assert choose_backend("auto", "cpu", spec.features())[0] == first
    with pytest.warns(RuntimeWarning, match=warning):
        out, _ = kernels.attention(q, k, v, spec, "auto")
    torch.testing.assert_close(out, reference.attention(q, k, v, spec)[0], rtol=1e-5, atol=1e-5)
    assert list(kernels.KERNEL_FAILURES) == [("cpu", kernel)]
    return out


def test_auto_falls_back_once_with_one_warning_and_reports_it(fresh):
    fresh.setattr(ta, "_attn_fwd", _Broken())
    q, k, v = _qkv()
    spec = _reweight()
    out = _falls_back(q, k, v, spec, "triton", "_attn_fwd failed to compile on cpu", "_attn_fwd")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        again, _ = kernels.attention(q, k, v, spec, "auto")
    assert torch.equal(out, again)
    name, why = choose_backend("auto", "cpu", spec.features())
    assert name == "sdpa" and "triton skipped" in why and "_attn_fwd" in why and "CompilationError" in why
    # other kernels are not affected: PLADIS still runs on triton
    assert choose_backend("auto", "cpu", ("sparse",))[0] == "triton"


def test_explicit_triton_raises_naming_the_kernel_and_the_backend_that_works(fresh):
    fresh.setattr(ta, "_attn_fwd", _Broken())
    q, k, v = _qkv()
    spec = _reweight()
    with pytest.raises(BackendError, match=r"kernel _attn_fwd.*backend 'sdpa' computes the same"):
        kernels.attention(q, k, v, spec, "triton")
    assert ("cpu", "_attn_fwd") in kernels.KERNEL_FAILURES
    with pytest.raises(BackendError, match=r"cannot run kernel _attn_fwd on cpu.*'sdpa'"):
        choose_backend("triton", "cpu", spec.features())
    # a call of the backend's function without auto (the runtime of a handle with backend="triton") raises too
    kernels.note_request("triton")
    with pytest.raises(BackendError, match="_attn_fwd"):
        kernels.BACKENDS["triton"].fn(q, k, v, spec)


def test_fallback_of_the_label_and_sparse_kernels(fresh):
    fresh.setattr(tlab, "_label_attn_fwd", _Broken())
    q, k, v = _qkv(n=16)
    labels = LabelMask(torch.arange(16)[None] % 2, torch.arange(16)[None] % 2, torch.tensor([[[0.0, INF], [INF, 0.0]]]))
    spec = AttentionSpec(labels=labels)
    with pytest.warns(RuntimeWarning, match="_label_attn_fwd"):
        out, _ = kernels.attention(q, k, v, spec, "auto")
    torch.testing.assert_close(out, reference.attention(q, k, v, spec)[0], rtol=1e-5, atol=1e-5)
    from attnctl.kernels import triton_sparse as ts

    fresh.setattr(ts, "_sparse_attn_fwd", _Broken())
    pladis = AttentionSpec(sparse=Sparse(1.5, 2.0))
    with pytest.warns(RuntimeWarning, match="_sparse_attn_fwd"):
        out, _ = kernels.attention(q, k, v, pladis, "auto")
    torch.testing.assert_close(out, reference.attention(q, k, v, pladis)[0], rtol=1e-5, atol=1e-5)
    assert choose_backend("auto", "cpu", ("sparse",))[0] == "reference"


def test_inputs_a_kernel_cannot_take_run_on_the_next_backend_under_auto(fresh):
    """A dtype or head dim the Triton kernels do not take (float64, head dim 320) is no compile failure: `auto` runs
    that call on the next backend (one warning, nothing recorded, the kernel stays chosen for other calls); an
    explicit `triton` raises UnsupportedInputError."""
    from attnctl.errors import UnsupportedInputError

    spec = _reweight()
    for q, k, v in (tuple(t.double() for t in _qkv()), _qkv(d=320)):
        with pytest.warns(RuntimeWarning, match="auto runs such calls on 'sdpa'"):
            out, _ = kernels.attention(q, k, v, spec, "auto")
        torch.testing.assert_close(out, reference.attention(q, k, v, spec)[0], rtol=1e-5, atol=1e-5)
        with pytest.raises(UnsupportedInputError):
            kernels.attention(q, k, v, spec, "triton")
    assert not kernels.KERNEL_FAILURES and choose_backend("auto", "cpu", spec.features())[0] == "triton"


def test_other_errors_are_not_taken_for_compile_failures(fresh):
    class Crashing:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise RuntimeError("an illegal memory access was encountered")

            return launch

    fresh.setattr(ta, "_attn_fwd", Crashing())
    q, k, v = _qkv()
    with pytest.raises(RuntimeError, match="illegal memory access"):
        kernels.attention(q, k, v, _reweight(), "auto")
    assert not kernels.KERNEL_FAILURES


def test_kernels_module_that_does_not_import_leaves_auto_the_other_backends():
    code = (
        "import sys; sys.modules['attnctl.kernels.triton_attention'] = None\n"
        "from attnctl.kernels import BACKENDS, UNAVAILABLE, choose_backend\n"
        "from attnctl.errors import BackendError\n"
        "assert 'triton' not in BACKENDS and 'do not import' in UNAVAILABLE['triton'], UNAVAILABLE\n"
        "assert choose_backend('auto', 'cpu', ('key_bias',))[0] == 'sdpa'\n"
        "try:\n    choose_backend('triton', 'cuda', ('key_bias',))\nexcept BackendError as e:\n    assert 'do not import' in str(e), e\n"
        "else:\n    raise SystemExit('no error')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "TRITON_INTERPRET": "1"})


# --- the measured preference on CUDA ----------------------------------------------------------------------------


def test_measured_table_names_its_hardware_and_every_backend_it_lists_exists():
    assert "H200" in kernels.MEASURED_ON and "triton 3.6" in kernels.MEASURED_ON and "fp16" in kernels.MEASURED_ON
    for kind, speeds in kernels.MEASURED.items():
        for name, by_shape in speeds.items():
            assert name in kernels.BACKEND_NAMES and set(by_shape) <= set(kernels.MEASURED_SHAPES), (kind, name)


def test_auto_on_cuda_follows_the_measured_table():
    if "flex" not in kernels.BACKENDS:
        pytest.skip("needs flex")
    # reweight: triton at SDXL's D=64 (0.80x vs flex 0.68x), flex at Flux's D=128 (1.17x vs 0.99x) and at 16k
    assert choose_backend("auto", "cuda", ("key_bias", "value_scale"), shape=(4096, 64))[0] == "triton"
    assert choose_backend("auto", "cuda", ("key_bias", "value_scale"), shape=(4608, 128))[0] == "flex"
    assert choose_backend("auto", "cuda", ("key_bias",), shape=(16384, 64))[0] == "flex"
    # a value scale alone (Reweight's default): sdpa runs the plain flash kernel on scaled values (plain SDPA's 1.0x)
    # at every head dim: the fused rows (flex 1.17x at D=128, triton 0.80x at D=64) were measured with a bias too
    for shape in ((4096, 64), (4608, 128), (16384, 64), (4096, 72), None):
        name, why = choose_backend("auto", "cuda", ("value_scale", "query_range"), shape=shape)
        assert name == "sdpa" and "a value scale alone" in why, (shape, why)
        assert choose_backend("auto", "cuda", ("attn_mask", "value_scale"), shape=shape)[0] == "sdpa"
    assert kernels.auto_order("cuda", ("value_scale",), (4608, 128))[0][:3] == ("sdpa", "triton", "flex")
    # regions: dense SDPA while the mask fits, then flex (0.23-0.58x) before the ungrouped triton kernel
    name, why = choose_backend("auto", "cuda", ("labels",), dense_elements=2 * 4096 * 4096)
    assert name == "sdpa" and "measured regions" in why and "H200" in why
    over = kernels.sdpa.DENSE_MASK_LIMIT + 1
    assert choose_backend("auto", "cuda", ("labels",), dense_elements=over)[0] == "flex"
    # windows: triton (1.24x / 1.97x)
    assert choose_backend("auto", "cuda", ("window",), dense_elements=2 * 4096 * 4096)[0] == "triton"
    # not measured: the preference order (triton first); PLADIS only triton / reference
    assert choose_backend("auto", "cuda", ("key_bias", "lse"))[0] == "triton"
    assert choose_backend("auto", "cuda", ("sparse",))[0] == "triton"
    assert choose_backend("auto", "cuda", ())[0] == "sdpa"
    assert kernels.auto_order("cpu", ("key_bias",))[1] == "preference"  # CPU keeps its order


def test_describe_shows_the_fallback(tiny_cache, fresh):
    """A handle with auto on a device where the kernel does not compile: the render completes, one warning,
    and describe() names the kernel and the backend used instead."""
    import attnctl

    from .helpers import generate

    pipe = tiny_cache("tiny-sd")
    fresh.setattr(tlab, "_label_attn_fwd", _Broken())
    fresh.setitem(kernels.AUTO_ORDER, "cpu", ("triton", "reference"))
    with pytest.warns(RuntimeWarning, match="_label_attn_fwd") as caught:
        regions = [attnctl.Region("a red cube", box=(0, 0, 0.5, 1)), attnctl.Region("a blue ball", box=(0.5, 0, 1, 1))]
        with attnctl.apply(pipe, [attnctl.Regions(regions, isolate=True)]) as handle:
            generate(pipe, "tiny-sd", prompt="a red cube and a blue ball", height=16, width=16)
            text = handle.describe()
    assert len([w for w in caught if "_label_attn_fwd" in str(w.message)]) == 1
    assert "triton skipped" in text and "_label_attn_fwd" in text and "reference" in text


def test_the_runtime_gives_auto_the_calls_shape(tiny_cache, monkeypatch):
    """Inside a pipeline, `auto` reads the measured row of the call's own (query tokens, head dim)."""
    import attnctl
    from attnctl.pipelines import runtime as runtime_module

    from .helpers import generate

    pipe = tiny_cache("tiny-flux")
    seen = []
    choose = runtime_module.choose_backend
    monkeypatch.setattr(runtime_module, "choose_backend", lambda *args: seen.append(args[4]) or choose(*args))
    with attnctl.apply(pipe, [attnctl.Reweight({"red": 2.0})]):
        generate(pipe, "tiny-flux", prompt="a red cat", steps=1)
    attn = pipe.transformer.transformer_blocks[0].attn
    assert seen and all(shape is not None and shape[1] == attn.head_dim for shape in seen)


def test_flex_compile_failures_fall_back_as_triton_ones(fresh):
    """Compiled flex attention that cannot be built for the device (an Inductor failure, a Triton kernel out of
    shared memory: known on 99 KB cards at head dim 128 / 256) is recorded and `auto` moves on; it crashed before."""
    from attnctl.kernels import flex

    class InductorError(RuntimeError):
        pass

    def failing(*args, **kwargs):
        raise InductorError("out of resource: shared memory, Required: 131072, Hardware limit: 101376")

    fresh.setitem(kernels.AUTO_ORDER, "cpu", ("flex", "sdpa", "reference"))
    fresh.setattr(flex, "_compiled_call", failing)
    q, k, v = _qkv()
    spec = _reweight()
    _falls_back(q, k, v, spec, "flex", "compiled flex_attention failed to compile on cpu: InductorError", "flex_attention")
    assert choose_backend("auto", "cpu", spec.features())[0] == "sdpa"
    with pytest.raises(BackendError, match="flex_attention"):
        kernels.attention(q, k, v, spec, "flex")
    # any other error is not taken for a compile failure
    fresh.setattr(kernels, "KERNEL_FAILURES", {})
    fresh.setattr(flex, "_compiled_call", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("CUDA error: an illegal memory access")))
    with pytest.raises(RuntimeError, match="illegal memory access"):
        kernels.attention(q, k, v, spec, "auto")
    assert not kernels.KERNEL_FAILURES
