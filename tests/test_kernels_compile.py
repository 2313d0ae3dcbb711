"""Every Triton kernel compiles for real GPU targets (sm_80, sm_90), on this CPU-only machine, as the runtime launches it.

The interpreter (TRITON_INTERPRET=1, set by conftest.py for the other kernel tests) accepts code that a GPU
compile rejects: issue #15's kernels read a plain module float and failed on every GPU while CI passed. Here
`attnctl.kernels.triton_aot` compiles the kernels to cubin in a subprocess with TRITON_INTERPRET=0 and a fresh,
empty cache: the launches the triton backend makes for the real families' shapes (SD 1.5 at head dims 40 / 80 / 160,
SD 2 / SDXL / SD3 at 64, PixArt-alpha / -Sigma at 72, Flux / Qwen-Image / Z-Image / Chroma / Wan at 128; 77 to 512 text
tokens; every control's call; the models' own masks as they pass them, `triton_aot.MASKS`: PixArt's (B, H, 1, Nk) in the
model dtype, Qwen-Image's and Z-Image's bool key masks, which the launchers make additive in the queries' dtype,
Chroma's dense (B, 1, N, N)), built by the launchers themselves (`launch`: tiles, arguments, label layouts, block
lists) and compiled through `JITFunction.warmup` with a Triton driver that reports the GPU, so Triton's own binder
specialises them as at runtime (unit strides become the constant 1, sizes and strides divisible by 16 get the hint:
head dim 40 and 64 compile to different code, 25,088 and 66,048 bytes of shared memory on sm_90). The launchers pick
tiles for the GPU's shared memory per block, so each arch's launches are built with its limit. Each compile's shared
memory is checked against the limit of every GPU that runs it (sm_80's against sm_80 and, where they get the same
tiles, the 99 KiB of sm_86 / sm_89; sm_86's against sm_86 / sm_89; sm_90's against sm_90); any launch over fails.
`check_declarations` fails when a kernel has a constexpr its launcher does not declare. Compiled flex attention is not
compiled here: Inductor generates its kernels on the device at their first use, and only the compile-failure fallback
(`flex._flex_call`: `auto` moves such calls to the next backend) covers it.

Default (`--set runtime`): per arch one launch per tile configuration of the real families (kernel, dtype, BLOCK_D,
BLOCK_M, BLOCK_N, warps, stages, PLADIS layout: 35 on sm_80 / sm_90, 3 more on sm_86), sm_80 in fp16 and fp32, sm_90
in bf16 and fp32 (fp16 and bf16 take the same tiles), chosen so that every switch value of every kernel is compiled on
both; sm_86 compiles the launches whose tiles differ from sm_80's (a model mask at head dim 128 in fp16: Qwen-Image,
128 x 32 tiles at 2 stages instead of 128 x 64 at 3; 65,536-82,176 bytes): 46 + 15 compiles, about 5 minutes of one
core. The tightest fits are the 128 x 64 tiles at head dims 72-128 in fp16 (8 warps, 3 stages): 98,304 bytes (PLADIS
streaming, 3,072 under sm_86's limit) to 99,072 (the label kernel at head dim 80, 2,304 under); sm_90 needs at most
164,608 (compiled with this change: 61 launches, none over). Outside the default set, PixArt-Sigma's label kernel
with a per-key bias and value scale (head dim 72, fp16) needs 99,332 bytes on sm_80, 2,044 under sm_86's limit, and
the masked head-dim-128 label kernel with them 132,608 on sm_80 and 165,376 on sm_90 (compiled once from the
`runtime-all` matrix). Opt-in (ATTNCTL_COMPILE_ALL=1): every
launch of the runtime matrix (15 families x 3 dtypes x their calls), one per Triton cache key per arch (`--set
runtime-all`), and every launchable switch combination of every kernel from the declarations (`--set product`, 2976
compiles, about 5 hours of one core); ATTNCTL_COMPILE_SHARD=i/n runs every n-th from the i-th.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
from attnctl.kernels import triton_aot  # noqa: E402
from attnctl.kernels import triton_attention as ta  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
needs_ptxas = pytest.mark.skipif(not PTXAS.exists(), reason=f"the triton wheel ships no ptxas ({PTXAS})")


def _compile_env(tmp_path: Path) -> dict[str, str]:
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path / "triton-cache"), "TRITON_DEFAULT_FP_FUSION": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _run_aot(tmp_path: Path, *args: str, timeout: float = 1800) -> tuple[int, list[dict], str]:
    proc = subprocess.run(
        [sys.executable, "-m", "attnctl.kernels.triton_aot", *args],
        env=_compile_env(tmp_path), cwd=ROOT, capture_output=True, text=True, timeout=timeout,
    )
    records = []
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            records.append(json.loads(line))
    return proc.returncode, records, proc.stderr[-3000:]


def _failures(records: list[dict]) -> list[str]:
    return [f"{r['variant']}: {r['error']}" for r in records if "variant" in r and not r["ok"]]


# --- the declarations the variants come from ----------------------------------------------------------------


def test_every_constexpr_is_declared_by_its_launcher():
    assert triton_aot.check_declarations() == []
    assert set(triton_aot.kernels()) == {"_attn_fwd", "_sparse_attn_fwd", "_label_attn_fwd"}


def test_a_new_switch_cannot_escape(monkeypatch):
    """A constexpr the launcher does not declare (or a declared one the kernel lacks) is reported."""
    monkeypatch.setattr(ta, "SWITCHES", {k: v for k, v in ta.SWITCHES.items() if k != "HAS_VSCALE"})
    problems = triton_aot.check_declarations()
    assert any("_attn_fwd" in p and "HAS_VSCALE" in p and "not declared" in p for p in problems), problems
    monkeypatch.setattr(ta, "SWITCHES", {**ta.SWITCHES, "HAS_VSCALE": (False, True), "HAS_NEW": (False, True)})
    assert any("HAS_NEW" in p and "not constexpr parameters" in p for p in triton_aot.check_declarations())


def test_launcher_passes_only_declared_switch_values():
    """What `kernel_arguments` really passes for a spec with every control is in the declarations."""
    import torch

    from attnctl.kernels import AttentionSpec, LabelMask, Window

    n = 20
    q = torch.randn(1, 2, n, 16)
    labels = LabelMask(torch.zeros(1, n, dtype=torch.long), torch.zeros(1, n, dtype=torch.long), torch.zeros(1, 1, 1))
    spec = AttentionSpec(attn_mask=torch.zeros(1, 1, n, n), key_bias=torch.zeros(1, n), value_scale=torch.ones(1, n),
                         labels=labels, window=Window((4, 5), radius=(1, 1)), return_lse=True)
    for s in (spec, AttentionSpec()):
        _, switches = ta.kernel_arguments(q, q, q, s, ta.Config(16, 16))
        for name, value in switches.items():
            if name in ta.TILE_CONSTEXPRS:
                continue
            assert value in ta.SWITCHES[name], (name, value)
        assert set(switches) == (set(ta.SWITCHES) - {"RETURN_LSE"}) | set(ta.TILE_CONSTEXPRS)


@pytest.mark.parametrize("which", ["switches", "product"])
def test_variant_sets_cover_every_switch_value_dtype_and_head_dim(which):
    for arch in triton_aot.ARCHS:
        chosen = [v for v in triton_aot.variants(which) if v.arch == arch]
        assert {v.dtype for v in chosen} == set(triton_aot.DTYPES)
        assert {v.head_dim for v in chosen} == set(ta.HEAD_DIM_CLASSES)
        for name, decl in triton_aot.kernels().items():
            mine = [v for v in chosen if v.kernel == name]
            assert {v.dtype for v in mine} == set(triton_aot.DTYPES), name
            covered = {item for v in mine for item in v.switches}
            wanted = {(k, value) for k, values in decl.switches.items() for value in values}
            assert wanted <= covered, (name, wanted - covered)
            assert all(decl.module.launchable(dict(v.switches)) for v in mine)
    if which == "product":
        for name, decl in triton_aot.kernels().items():
            combos = {v.switches for v in triton_aot.variants(which, (90,)) if v.kernel == name}
            assert len(combos) == len(triton_aot._all_combinations(decl))


def _expected_tiles(dtype, head_dim: int, keys: int, masked: bool = False, shared_memory: int = 166912) -> set[tuple]:
    """The tiles of the three kernels for a head dim, dtype and cross-attention key length, from the launchers'
    documented rules: `cuda_config` for the dense and label kernels and PLADIS's streaming layout; PLADIS's one-tile
    layout (the whole key row, BLOCK_M 32, 4 warps) while the key row fits a 128-key tile of at most 64 KiB of K."""
    import torch

    from attnctl.kernels import triton_sparse as ts

    name = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    block_d = max(16, 1 << (head_dim - 1).bit_length())
    c = ta.cuda_config(dtype, head_dim, masked=masked, shared_memory=shared_memory)
    tiles = {(kernel, name, block_d, c.block_m, c.block_n, c.num_warps, c.num_stages, "") for kernel in ("_attn_fwd", "_label_attn_fwd")}
    block_n = max(16, 1 << (keys - 1).bit_length())
    if block_n <= 128 and block_n * block_d * dtype.itemsize <= 65536:
        tiles.add(("_sparse_attn_fwd", name, block_d, min(c.block_m, 32), block_n, 4, c.num_stages, "one-tile"))
    else:
        tiles.add(("_sparse_attn_fwd", name, block_d, c.block_m, c.block_n, c.num_warps, c.num_stages, ""))
    assert ts.one_tile(keys, head_dim, dtype.itemsize) == (block_n <= 128 and block_n * block_d * dtype.itemsize <= 65536)
    return tiles


def test_runtime_default_compiles_every_tile_of_the_real_families():
    """The default set holds every tile configuration the launchers pick for the real families (head dims 40 / 64 /
    72 / 80 / 128 / 160; cross-attention keys 77 and 120 in one PLADIS tile, 154, 512 and joint rows streamed; fp16,
    bf16, fp32; Qwen-Image's model mask at head dim 128): all 35 of sm_80 / sm_90 across the two archs, every tile
    layout on each arch, and every switch value of every kernel on each arch; on sm_86, the 3 tile layouts that
    differ there (the masked head-dim-128 calls in 128 x 32 tiles), with every switch value those calls take. Before, the
    default (`variants("default")`) held 4 of them, and none at sm_86's tiles."""
    import torch

    from attnctl.kernels import triton_backend

    wide = {80: 166912, 86: 101376, 90: 232448}
    expected = {arch: set() for arch in wide}
    for arch, shared_memory in wide.items():
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            for head_dim, keys in ((40, 77), (64, 77), (80, 77), (160, 77), (160, 154), (128, 512), (64, 4429)):
                expected[arch] |= _expected_tiles(dtype, head_dim, keys, False, shared_memory)
            # PixArt-alpha / -Sigma (cross) and Qwen-Image / Z-Image / Chroma (joint) with their masks
            for head_dim, keys in ((72, 120), (72, 300), (128, 4189), (128, 4192), (128, 4608)):
                expected[arch] |= _expected_tiles(dtype, head_dim, keys, True, shared_memory)
    assert expected[80] == expected[90] and len(expected[80]) == 35
    differing = expected[86] - expected[80]
    assert {(t[0], t[1], *t[3:7]) for t in differing} == {(k, d, 128, 32, 8, 2) for k in triton_aot.kernels() for d in ("fp16", "bf16")}
    cases = triton_aot.runtime_cases()
    for arch in triton_aot.RUNTIME_ARCHS:
        matrix = {triton_aot.tile_configuration(triton_aot.runtime_launch(case, arch)) for case in cases}
        assert matrix == expected[arch], arch
    compiled = set()
    for arch in triton_aot.RUNTIME_ARCHS:
        chosen = triton_aot.runtime_default(arch)
        launches = [triton_aot.runtime_launch(case, arch) for case in chosen]
        tiles = [triton_aot.tile_configuration(launch) for launch in launches]
        codes = {(tile, tuple(sorted(launch.options.items()))) for tile, launch in zip(tiles, launches, strict=True)}
        assert len(codes) == len(chosen), arch  # no two launches compile the same code
        mine = expected[arch] if arch != 86 else differing
        assert {(t[0], *t[2:]) for t in tiles} == {(t[0], *t[2:]) for t in mine}, arch  # every tile layout
        compiled |= set(tiles)
        for case, launch in zip(chosen, launches, strict=True):  # the launch is the backend's
            q, k, v, spec = triton_aot.runtime_call(case)
            assert launch.name == triton_backend.kernel_for(spec.features())
        for name, decl in triton_aot.kernels().items():
            covered = {(key, value) for launch in launches if launch.name == name for key, value in launch.options.items()}
            if arch == 86:  # the switch values of the calls whose tiles differ there: masked, head dims 80-128
                differ = [triton_aot.runtime_launch(c, 86) for c in cases if c.dtype == "fp16" and c.family.mask
                          and c.layer != "self" and c.family.head_dim % 16 == 0 and 64 < c.family.head_dim <= 128]
                wanted = {(key, value) for launch in differ if launch.name == name for key, value in launch.options.items()
                          if key in decl.switches}
            else:
                wanted = {(key, value) for key, values in decl.switches.items() for value in values}
            assert wanted and wanted <= covered, (arch, name, wanted - covered)
    assert {t for t in compiled if t[1] != "bf16"} >= {t for t in expected[80] | expected[86] if t[1] != "bf16"}
    assert {t for t in compiled if t[1] != "fp16"} >= {t for t in expected[80] if t[1] != "fp16"}


def test_masked_wide_head_tiles_fit_the_gpu_shared_memory():
    """A model mask at head dim 128 in fp16 / bf16 (Qwen-Image's and Z-Image's key masks, Chroma's dense mask) needs
    131,072-132,608 bytes of shared memory in 128 x 64 tiles at 3 stages (Triton pipelines the mask tile beside K and
    V; the sm_80 compiles), and still 131,072-131,584 at 2 stages with labels: those tiles where the GPU has the room
    (A100 166,912 bytes per block, H100 232,448), 128 x 32 at 2 stages (57,344-82,176) on sm_86 / sm_89 (RTX 30xx / 40xx, A10, L4: 101,376),
    where 128 x 64 failed to compile. Without the mask, at head dims whose mask tile is not pipelined (72), in fp32,
    and at other head dims the tiles are the same on every GPU."""
    import torch

    a100, h100, rtx = 166912, 232448, 101376
    for dtype in (torch.float16, torch.bfloat16):
        for head_dim in (80, 96, 128):
            assert ta.cuda_config(dtype, head_dim, masked=True, shared_memory=a100) == ta.Config(128, 64, 8, 3)
            assert ta.cuda_config(dtype, head_dim, masked=True, shared_memory=h100) == ta.Config(128, 64, 8, 3)
            assert ta.cuda_config(dtype, head_dim, masked=True, shared_memory=rtx) == ta.Config(128, 32, 8, 2)
    for masked, dtype, head_dim in ((False, torch.float16, 128), (True, torch.float16, 72), (True, torch.float32, 128),
                                    (True, torch.bfloat16, 64), (True, torch.float16, 160)):
        tiles = {ta.cuda_config(dtype, head_dim, masked=masked, shared_memory=s) for s in (a100, h100, rtx)}
        assert len(tiles) == 1, (masked, dtype, head_dim, tiles)


def test_launchers_take_the_tiles_of_the_gpu_they_run_on(monkeypatch):
    """The three launchers build a masked head-dim-128 fp16 launch at the tiles of the GPU's shared memory per block
    (opt-in: 128 x 32 at 2 stages on 101,376 bytes, 128 x 64 at 3 on 166,912), which is read once per device, not per
    call (no device query in the hot path)."""
    import torch

    from attnctl.kernels import AttentionSpec, LabelMask, Sparse
    from attnctl.kernels import triton_labels as tlab
    from attnctl.kernels import triton_sparse as ts

    reads = []

    class Properties:
        shared_memory_per_block = 49152

        def __init__(self, optin: int) -> None:
            self.shared_memory_per_block_optin = optin

    def properties(index: int) -> Properties:
        reads.append(index)
        return Properties({0: 101376, 1: 166912}[index])

    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
    monkeypatch.setattr(ta, "_SHARED_MEMORY", {})
    n = 300
    q = torch.empty(1, 2, n, 128, dtype=torch.float16)
    mask = torch.zeros(1, 1, 1, n, dtype=torch.float16)
    labels = LabelMask(torch.zeros(1, n, dtype=torch.long), torch.zeros(1, n, dtype=torch.long), torch.zeros(1, 1, 1))
    specs = {ta: AttentionSpec(attn_mask=mask), tlab: AttentionSpec(attn_mask=mask, labels=labels),
             ts: AttentionSpec(attn_mask=mask, sparse=Sparse(1.5, 2.0))}
    for index, tiles in ((0, (32, 2)), (1, (64, 3)), (0, (32, 2))):
        shared_memory = ta.device_shared_memory(torch.device("cuda", index))
        for module, spec in specs.items():
            out, lse = ta.outputs(q, q, False)
            launch = module.launch(q, q, q, spec, out, lse, config=None, gpu=True, shared_memory=shared_memory)
            assert (launch.options["BLOCK_N"], launch.options["num_stages"]) == tiles, (module.__name__, index)
        out, lse = ta.outputs(q, q, False)
        plain = ta.launch(q, q, q, AttentionSpec(), out, lse, config=None, gpu=True, shared_memory=shared_memory).options
        assert (plain["BLOCK_N"], plain["num_stages"]) == (64, 3)
    assert reads == [0, 1]  # once per device
    with pytest.raises(ValueError, match="shared memory per block"):  # a GPU launch from CPU tensors names its target
        ta.launch(q, q, q, specs[ta], *ta.outputs(q, q, False), config=None, gpu=True)


#: Tiny pipelines whose models pass their own mask to attention, with prompts that pad differently in one batch, and the
#: family of the runtime matrix that stands for each: Qwen-Image (prompts of different lengths), Z-Image (a negative
#: prompt whose caption pads to more tokens than the prompt's), Chroma (its dense mask, every call).
MASKED_MODELS = {
    "tiny-qwenimage": ("qwenimage-64x64", {"prompt": ["a red cat", "a red dog on a very long green field"]}),
    "tiny-zimage": ("zimage-64x64", {"prompt": "a red cat", "negative_prompt": "a blurry photo " * 12, "max_sequence_length": 64}),
    "tiny-chroma": ("chroma-64x64", {"prompt": "a red cat"}),
}


def _signature(launch) -> tuple:
    """What a launch compiles to apart from its sizes and tiles: the kernel, the q / k / v dtype, the mask's dtype and
    layout (whether it broadcasts over heads and over queries: zero strides) and the constexpr switches (not the tiles,
    set by the head dim and the GPU, nor PLADIS's one-tile layout, set by the key count)."""
    names, args = launch.kernel.arg_names, launch.args
    mask = None
    if launch.options["HAS_MASK"]:
        tensor = args[names.index("Mask")]
        mask = (tensor.dtype, args[names.index("stride_mh")] == 0, args[names.index("stride_mm")] == 0)
    layout = set(ta.TILE_CONSTEXPRS) | {"ONE_TILE"}
    switches = tuple(sorted((k, v) for k, v in launch.options.items() if k.isupper() and k not in layout))
    return launch.name, args[0].dtype, mask, switches


def test_the_masked_models_launches_are_in_the_compile_matrix(monkeypatch):
    """The launches the tiny Qwen-Image, Z-Image and Chroma pipelines make in fp16 with padded batched prompts (the
    launch is recorded, not run) have the signatures of their family's launches in `runtime_cases()`: the models'
    own masks as they pass them (bool key masks made additive in the queries' dtype, Chroma's dense mask in the model
    dtype). Before, the matrix gave Qwen-Image a (B, H, 1, Nk) fp16 mask while the runtime passed a float32 (B, 1, 1,
    N) one, and treated Z-Image and Chroma as unmasked: CI never compiled the launches these models make."""
    import torch

    import attnctl
    from attnctl.testing import CALL_DEFAULTS, make_tiny_pipeline

    launches: list = []
    monkeypatch.setattr(ta.Launch, "run", lambda self: launches.append(self) or self.args[3].zero_())
    controls = (lambda: [attnctl.Reweight({"red": 2.0})], lambda: [attnctl.Reweight({"red": 2.0}, normalize=True)],
                lambda: [attnctl.PLADIS()])
    for model, (family, call) in MASKED_MODELS.items():
        pipe = make_tiny_pipeline(model).to(torch.float16)
        if model == "tiny-zimage":  # room on the RoPE's first axis for a 64-token caption (the image's positions follow it)
            pipe.transformer.rope_embedder.axes_lens = [128, 32, 32]
            pipe.transformer.rope_embedder.freqs_cis = None
        launches.clear()
        for make in controls:
            with attnctl.apply(pipe, make(), backend="triton"), torch.inference_mode():
                pipe(**{**CALL_DEFAULTS[model], **call}, num_inference_steps=1, output_type="latent",
                     generator=torch.Generator().manual_seed(0))
        seen = {_signature(launch) for launch in launches}
        assert {name for name, _, _, _ in seen} == {"_attn_fwd", "_sparse_attn_fwd"}, model
        assert any(mask is not None for _, _, mask, _ in seen), f"{model} made no masked launch"
        # the model's family, and Flux's unmasked launches for the calls whose batch is not padded (Qwen-Image's uncond)
        cases = [case for case in triton_aot.runtime_cases() if case.dtype == "fp16" and case.family.name in (family, "flux-64x64")]
        matrix = {_signature(triton_aot.runtime_launch(case, 80)) for case in cases}
        assert seen <= matrix, (model, seen - matrix)


# --- compiling ---------------------------------------------------------------------------------------------


@needs_ptxas
@pytest.mark.heavy
@pytest.mark.parametrize("arch", triton_aot.RUNTIME_ARCHS, ids=lambda a: f"sm_{a}")
def test_runtime_launches_compile_to_cubin_within_shared_memory(arch, tmp_path):
    """The default set's launches compile to cubin with the runtime's specialisation, within the shared memory of
    every GPU that runs them (sm_80's compile: sm_80, and sm_86 / sm_89 where they take the same tiles; sm_86's
    compile, of the launches whose tiles differ there: sm_86 and sm_89). Any launch over a limit fails."""
    expected = triton_aot.labels("runtime", (arch,))
    rc, records, stderr = _run_aot(tmp_path, "--set", "runtime", "--arch", str(arch), timeout=900)
    assert records and records[0] == {"declarations": []}, (records[:1], stderr)
    compiled = [r for r in records if "variant" in r]
    assert not _failures(compiled), "\n".join(_failures(compiled))
    assert [r["variant"] for r in compiled] == expected, stderr
    assert all("cubin" in r["stages"] and "ptx" in r["stages"] for r in compiled)
    limits = {80: ("sm_80", "sm_86", "sm_89"), 86: ("sm_86", "sm_89"), 90: ("sm_90",)}[arch]
    assert all(set(r["limits"]) == set(limits) for r in compiled if not (arch == 80 and " qwenimage-" in r["variant"]))
    assert all(r["margin"] == min(r["limits"].values()) - r["shared"] >= 0 for r in compiled)
    assert all(r["shared"] <= r["limits"][f"sm_{arch}"] for r in compiled)
    # diffusers' (B, N, H, D) projections transposed to (B, H, N, D): the head dim has unit stride, which Triton's
    # binder makes the constant 1; a head dim of 40 is not divisible by 16, 64 is
    for r in compiled:
        assert {"stride_qd", "stride_kd", "stride_vd", "stride_od"} <= set(r["ones"]), r["variant"]
    if arch == 86:  # the masked head-dim-128 launches, at the tiles sm_86 / sm_89 take
        assert all(" qwenimage-" in r["variant"] and r["tiles"][1:5] == [128, 32, 8, 2] for r in compiled)
    else:
        d40 = [r for r in compiled if " sd15-64x64 " in r["variant"]]
        d64 = [r for r in compiled if any(f" {family} " in r["variant"] for family in ("sd2-96x96", "sdxl-64x64", "sd3-64x64"))]
        assert d40 and all("HEAD_DIM" not in r["div16"] for r in d40)
        assert d64 and all("HEAD_DIM" in r["div16"] for r in d64)
    tightest = min(compiled, key=lambda r: r["margin"])
    print(f"\nsm_{arch}: {len(compiled)} launches in {sum(r['seconds'] for r in compiled):.0f} s; largest shared memory "
          f"{max(r['shared'] for r in compiled)} B; tightest {tightest['variant']}: {tightest['shared']} B, "
          f"{tightest['margin']} B under {min(tightest['limits'], key=tightest['limits'].get)}")
    assert rc == 0, stderr


@needs_ptxas
def test_a_kernel_reading_a_plain_global_fails_to_compile(tmp_path):
    """The failure this file exists for (issue #15): a plain module float read inside @triton.jit runs in the
    interpreter but does not compile; the same value as a tl.constexpr does."""
    code = textwrap.dedent(
        """
        import json, triton, triton.language as tl
        SCALE = 1.5
        SCALE_C = tl.constexpr(1.5)

        @triton.jit
        def plain(X, n, BLOCK: tl.constexpr):
            offs = tl.arange(0, BLOCK)
            tl.store(X + offs, tl.load(X + offs, mask=offs < n) * SCALE, mask=offs < n)

        @triton.jit
        def const(X, n, BLOCK: tl.constexpr):
            offs = tl.arange(0, BLOCK)
            tl.store(X + offs, tl.load(X + offs, mask=offs < n) * SCALE_C, mask=offs < n)

        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        out = {}
        for fn in (plain, const):
            try:
                triton.compile(ASTSource(fn, {"X": "*fp32", "n": "i32", "BLOCK": "constexpr"}, {"BLOCK": 64}),
                               target=GPUTarget("cuda", 90, 32))
                out[fn.__name__] = "ok"
            except Exception as error:
                out[fn.__name__] = type(error).__name__ + ": " + str(error)
        print(json.dumps(out))
        """
    )
    script = tmp_path / "plain_global.py"  # @triton.jit reads the source: a file, not `python -c`
    script.write_text(code)
    proc = subprocess.run([sys.executable, str(script)], env=_compile_env(tmp_path), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["const"] == "ok"
    assert result["plain"].startswith("CompilationError") and "Cannot access global variable SCALE" in result["plain"]


@needs_ptxas
@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("ATTNCTL_COMPILE_ALL") != "1", reason="thousands of compiles (hours on one core): set ATTNCTL_COMPILE_ALL=1")
def test_every_switch_combination_compiles(tmp_path):
    shard = os.environ.get("ATTNCTL_COMPILE_SHARD", "0/1")
    index, count = (int(x) for x in shard.split("/"))
    expected = [v.label() for i, v in enumerate(triton_aot.variants("product")) if i % count == index]
    rc, records, stderr = _run_aot(tmp_path, "--set", "product", "--shard", shard, timeout=24 * 3600)
    compiled = [r for r in records if "variant" in r]
    seconds = sum(r["seconds"] for r in compiled)
    print(f"\ncompiled {len(compiled)} of {len(expected)} variants (shard {shard}) in {seconds:.0f} s of compile time; "
          f"slowest {max((r['seconds'] for r in compiled), default=0):.1f} s")
    assert not _failures(compiled), "\n".join(_failures(compiled)[:20])
    assert [r["variant"] for r in compiled] == expected, stderr
    assert rc == 0, stderr


@needs_ptxas
@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("ATTNCTL_COMPILE_ALL") != "1", reason="every runtime launch (954 compiles, hours on one core): set ATTNCTL_COMPILE_ALL=1")
def test_every_runtime_launch_compiles(tmp_path):
    """Every launch of the runtime matrix (every family, dtype and call), one per Triton cache key per arch, compiles
    within the shared memory of the GPUs that run it (`--set runtime-all`, sm_80 and sm_90)."""
    shard = os.environ.get("ATTNCTL_COMPILE_SHARD", "0/1")
    index, count = (int(x) for x in shard.split("/"))
    listing = subprocess.run([sys.executable, "-m", "attnctl.kernels.triton_aot", "--set", "runtime-all", "--list"],
                             env=_compile_env(tmp_path), cwd=ROOT, capture_output=True, text=True, timeout=3600)
    labels = [line for line in listing.stdout.splitlines() if line and not line.startswith("{")]
    expected = [label for i, label in enumerate(labels) if i % count == index]
    rc, records, stderr = _run_aot(tmp_path, "--set", "runtime-all", "--shard", shard, timeout=24 * 3600)
    compiled = [r for r in records if "variant" in r]
    print(f"\ncompiled {len(compiled)} launches (shard {shard}) in {sum(r['seconds'] for r in compiled):.0f} s")
    assert not _failures(compiled), "\n".join(_failures(compiled)[:20])
    assert [r["variant"] for r in compiled] == expected, stderr
    assert rc == 0, stderr


def test_wide_tiles_fit_consumer_gpus_by_their_configs():
    """The tiles `cuda_config` / the sparse launcher pick at the widest heads fit the 99 KiB of shared memory per block
    of sm_86 / sm_89 (RTX 30xx / 40xx, A10, L4): float32 at head dims above 128 takes 32 x 32 tiles (64 x 32 needed
    139-156 KiB), and the sparse kernel's one-tile layout is kept for key rows whose K tile fits 64 KiB (a float32
    row of 77 keys at head dim 256 needed 160 KiB; it streams instead). The compiles behind the numbers:
    `test_widest_tiles_compile_within_consumer_shared_memory` (slow)."""
    import torch

    from attnctl.kernels import triton_sparse as ts

    def tiles(head_dim: int) -> ta.Config:
        return ta.cuda_config(torch.float32, head_dim, masked=True, shared_memory=101376)

    assert (tiles(256).block_m, tiles(256).block_n) == (32, 32)
    assert tiles(128) == ta.Config(64, 32, num_warps=4, num_stages=2)  # unchanged where it fits
    assert not ts.one_tile(77, 256, 4) and ts.one_tile(64, 256, 4) and ts.one_tile(77, 256, 2) and ts.one_tile(77, 128, 4)
    assert ts.launch_config(tiles(256), 77, True, 256, 4) == tiles(256)
    assert triton_aot.MAX_SHARED[86] == triton_aot.MAX_SHARED[89] == 101376


def test_bf16_takes_the_tiles_of_fp16():
    """The `widest` set compiles fp16 and fp32 only (`WIDEST_DTYPES`): bf16 gets fp16's tiles at every head dim, mask
    and GPU, so its shared memory is fp16's."""
    import torch

    assert set(triton_aot.WIDEST_DTYPES) == {"fp16", "fp32"}
    for head_dim, masked, limit in itertools.product(range(8, 257, 8), (False, True), set(triton_aot.MAX_SHARED.values())):
        assert (ta.cuda_config(torch.bfloat16, head_dim, masked=masked, shared_memory=limit)
                == ta.cuda_config(torch.float16, head_dim, masked=masked, shared_memory=limit)), (head_dim, masked, limit)


@needs_ptxas
@pytest.mark.slow
@pytest.mark.heavy
def test_widest_tiles_compile_within_consumer_shared_memory(tmp_path):
    """The variants that need the most shared memory (`--set widest`: most switches on, fp16 and fp32, head dims 128
    and 256, the sparse kernel's two layouts) compile for sm_86 within its 101,376 bytes (16 compiles, about 2 minutes of one core)."""
    expected = [v.label() for v in triton_aot.variants("widest", (86,))]
    rc, records, stderr = _run_aot(tmp_path, "--set", "widest", "--arch", "86", timeout=3600)
    compiled = [r for r in records if "variant" in r]
    assert not _failures(compiled), "\n".join(_failures(compiled))
    assert [r["variant"] for r in compiled] == expected, stderr
    assert rc == 0, stderr

