"""Ahead-of-time compilation of every Triton kernel for real GPU targets, on a machine without a GPU.

Triton's whole pipeline (ttir, ttgir, llir, ptx, and cubin with the ptxas that ships in the triton wheel) runs on the
CPU for a `GPUTarget("cuda", arch, 32)`. The interpreter (`TRITON_INTERPRET=1`, the CPU tests) accepts code a GPU
compile rejects, e.g. a kernel that reads a plain module float (issue #15); this compile does not.

The default set (`runtime`) compiles the launches the runtime makes: for the real families' attention shapes
(`FAMILIES`) and the controls' calls (`CALLS`), the triton backend's launcher builds the launch itself
(`triton_backend.launcher_for(spec).launch`: its tiles, arguments, label layouts and block lists), and
`JITFunction.warmup` compiles it with a Triton driver that reports the GPU (`_TargetDriver`): Triton's own binder
specialises the arguments as at runtime (an int equal to 1 becomes a constant, sizes and strides divisible by 16 and
aligned pointers get the divisibility hint), which changes the generated code and its shared memory. The launchers
pick tiles for the shared memory per block of the GPU (`MAX_SHARED`), so each arch's launches are built with its
limit. Each compile's shared memory is checked against every GPU that runs that code (`SHARED_BY`: sm_80's compile
against sm_80, and sm_86 / sm_89 where they get the same tiles); sm_86 (whose code and 99 KiB are sm_89's too)
compiles the launches whose tiles differ from sm_80's (`COMPILED_ON`). Per arch (`RUNTIME_ARCHS`) the default holds
one launch per tile configuration of the real families (`runtime_default`), so that every switch value of every
kernel is compiled; `runtime-all` holds every launch of the matrix, one per Triton cache key.

The other sets are built from each launcher module's declarations:

- `SWITCHES`: constexpr switch -> every value the launcher passes; `FIXED`: constexprs with one value;
  `TILE_CONSTEXPRS`: the constexprs its tile configuration sets; `launchable(switches)`: the combinations the
  launcher can produce;
- `POINTERS` / `FLOATS`: argument types (every other argument is an int32 size or stride, not specialised).

`check_declarations()` fails when a kernel's constexpr parameters are not exactly these declarations, so a
new switch cannot escape the compile test. `variants("switches")` covers, per GPU arch, every switch value of
every kernel, every dtype and every head-dim class at least once; `variants("product")` every launchable
switch combination of every kernel; `variants("full")` also crosses those with every dtype and head dim.

The jit functions must be real `JITFunction`s: run this module with `TRITON_INTERPRET=0` (in a subprocess
when the interpreter is on in the caller, as in the tests):

    TRITON_INTERPRET=0 python -m attnctl.kernels.triton_aot --set runtime --arch 80,86,90
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import ModuleType

import torch

from .spec import AttentionSpec, LabelMask, Sparse, Window

#: Integer kernel arguments named in upper case (sizes); other upper-case names must be declared pointers.
SIZES = ("H", "N_Q", "N_K", "HEAD_DIM")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
ARCHS = (80, 90)
#: The archs of the runtime sets: sm_86 for the launches whose tiles differ from sm_80's (`COMPILED_ON`).
RUNTIME_ARCHS = (80, 86, 90)
#: `runtime` (the default) and `runtime-all` compile the launchers' own launches (`runtime_jobs`); the others compile
#: from the declarations with every integer an i32 (`variants`).
RUNTIME_SETS = ("runtime", "runtime-all")
VARIANT_SETS = ("switches", "product", "full", "widest")
#: Shared memory per block a kernel may use (bytes, opt-in maximum): A100 (sm_80), RTX 30xx / A10 (sm_86), RTX 40xx /
#: L4 / L40 (sm_89) and H100 / H200 (sm_90).
MAX_SHARED = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
#: The GPUs that can run the code compiled for an arch: Triton generates the same code for every sm_8x (mma v2,
#: cp.async; the compiles for sm_80 and sm_86 need the same shared memory), so sm_80's compile is checked against the
#: 99 KiB of sm_86 / sm_89 too where the launchers pick the same tiles there (`compile_runtime`).
SHARED_BY = {80: (80, 86, 89), 86: (86, 89), 89: (89,), 90: (90,)}
#: An arch whose launches are compiled on another where their tiles are the same (the same code: `SHARED_BY`); the
#: runtime sets compile on it only the launches whose tiles differ.
COMPILED_ON = {86: 80, 89: 80}


#: The dtypes of the `widest` set: one per element size. bf16 takes fp16's tiles (`cuda_config` and the sparse launcher
#: read the element size only) and compiled to the same shared memory in all 8 pairs of the set (sm_86, Triton 3.9).
WIDEST_DTYPES = ("fp16", "fp32")
#: The variant index of the `widest` set: the sparse kernel's one-tile layout at its longest key row (`ONE_TILE_KEYS`).
WIDEST_INDEX = -1


@dataclass(frozen=True)
class KernelDecl:
    """A kernel and its launcher's declarations; `config(dtype, head_dim, switches, index, shared_memory)` gives the
    launcher's tile configuration (a `triton_attention.Config`) for a variant on a GPU with that shared memory."""

    name: str
    module: ModuleType
    config: Callable[[torch.dtype, int, dict, int, int], object]
    fixed: dict = field(default_factory=dict)

    @property
    def fn(self):
        return getattr(self.module, self.name)

    @property
    def switches(self) -> dict[str, tuple]:
        return self.module.SWITCHES


def kernels() -> dict[str, KernelDecl]:
    """Every Triton kernel attnctl launches, with its launcher's declarations."""
    from . import triton_attention as ta
    from . import triton_labels as tlab
    from . import triton_sparse as ts

    def dense_config(dtype, head_dim, switches, index, shared_memory):
        return ta.cuda_config(dtype, head_dim, masked=switches["HAS_MASK"], shared_memory=shared_memory)

    def sparse_config(dtype, head_dim, switches, index, shared_memory):
        keys = 4096
        if switches["ONE_TILE"]:  # a key row the launcher runs in one tile at this dtype and head dim (the longest
            # of them for the `widest` set's index -1): never a one-tile switch with the streaming config
            fitting = [n for n in ts.ONE_TILE_KEYS if ts.one_tile(n, head_dim, dtype.itemsize)]
            keys = fitting[index % len(fitting)]
        config = dense_config(dtype, head_dim, switches, index, shared_memory)
        return ts.launch_config(config, keys, True, head_dim, dtype.itemsize)

    return {
        "_attn_fwd": KernelDecl("_attn_fwd", ta, dense_config),
        "_sparse_attn_fwd": KernelDecl("_sparse_attn_fwd", ts, sparse_config, dict(ts.FIXED)),
        "_label_attn_fwd": KernelDecl("_label_attn_fwd", tlab, dense_config),
    }


def constexpr_names(fn) -> list[str]:
    """The constexpr parameters of a jit function (a JITFunction, or the function an InterpretedFunction wraps)."""
    import inspect

    import triton.language as tl

    target = getattr(fn, "fn", fn)
    names = []
    for param in inspect.signature(target).parameters.values():
        annotation = param.annotation
        if annotation is tl.constexpr or (isinstance(annotation, str) and annotation.split(".")[-1] == "constexpr"):
            names.append(param.name)
    return names


def check_declarations() -> list[str]:
    """Problems with the declarations: constexpr parameters a launcher does not declare, or declared ones the
    kernel does not have. Empty when every constexpr is covered."""
    problems = []
    for decl in kernels().values():
        declared = set(decl.switches) | set(decl.fixed) | set(decl.module.TILE_CONSTEXPRS)
        actual = set(constexpr_names(decl.fn))
        if actual - declared:
            problems.append(f"{decl.name}: constexpr parameters not declared by its launcher: {sorted(actual - declared)}")
        if declared - actual:
            problems.append(f"{decl.name}: declared but not constexpr parameters of the kernel: {sorted(declared - actual)}")
    return problems


@dataclass(frozen=True)
class Variant:
    kernel: str
    arch: int
    dtype: str
    head_dim: int
    switches: tuple[tuple[str, object], ...]
    index: int = 0

    def label(self) -> str:
        flags = ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in self.switches)
        return f"{self.kernel} sm_{self.arch} {self.dtype} d{self.head_dim} {flags}"


def _all_combinations(decl: KernelDecl) -> list[dict]:
    names = list(decl.switches)
    combos = [dict(zip(names, values)) for values in itertools.product(*(decl.switches[n] for n in names))]
    return [c for c in combos if decl.module.launchable(c)]


def _covering(decl: KernelDecl) -> list[dict]:
    """Few launchable combinations that together hold every value of every switch: greedy over the product,
    preferring combinations with many switches on (the heaviest code paths)."""
    combos = _all_combinations(decl)
    combos.sort(key=lambda c: -sum(bool(v) for v in c.values()))
    missing = {(name, value) for name, values in decl.switches.items() for value in values}
    chosen = []
    while missing:
        best = max(combos, key=lambda c: len(missing & set(c.items())))
        gain = missing & set(best.items())
        if not gain:
            raise ValueError(f"{decl.name}: no launchable combination has {sorted(missing)}")
        chosen.append(best)
        missing -= gain
    return chosen


def head_dim_classes() -> tuple[int, ...]:
    from . import triton_attention as ta

    return ta.HEAD_DIM_CLASSES


def variants(which: str = "switches", archs: tuple[int, ...] = ARCHS) -> list[Variant]:
    """The compile jobs of a variant set, per GPU arch in `archs`:

    - `switches`: every switch value of every kernel, every dtype and every head-dim class at least once;
    - `product`: every launchable switch combination of every kernel (dtype and head-dim class rotating),
      plus every dtype x head-dim class at each of `switches`'s combinations (the slow test);
    - `full`: switch combinations x dtypes x head-dim classes (about 10k per arch: hours on one core);
    - `widest`: the tiles that need the most shared memory: per kernel, the combinations with the most switches on
      (the sparse kernel's one-tile and streaming layouts, the one-tile at its longest key row), one dtype per element
      size (`WIDEST_DTYPES`), the two widest head-dim classes (for the consumer GPUs' 99 KiB: `--arch 86`; the slow test).
    """
    if which not in VARIANT_SETS:
        raise ValueError(f"variant set must be one of {', '.join(VARIANT_SETS)}, got {which!r}")
    decls = kernels()
    heads = head_dim_classes()
    dtypes = list(DTYPES)
    out: list[Variant] = []
    for arch in archs:
        if which == "widest":
            for decl in decls.values():
                combos = _all_combinations(decl)
                layouts = {combo.get("ONE_TILE") for combo in combos}
                for layout in sorted(layouts, key=str):
                    mine = [combo for combo in combos if combo.get("ONE_TILE") == layout]
                    combo = max(mine, key=lambda c: sum(bool(v) for v in c.values()))
                    for dtype, head in itertools.product(WIDEST_DTYPES, heads[-2:]):
                        out.append(Variant(decl.name, arch, dtype, head, tuple(combo.items()), WIDEST_INDEX))
            continue
        if which == "full":
            for decl in decls.values():
                for i, (combo, dtype, head) in enumerate(itertools.product(_all_combinations(decl), dtypes, heads)):
                    out.append(Variant(decl.name, arch, dtype, head, tuple(combo.items()), i))
            continue
        if which == "product":
            pairs = list(itertools.product(dtypes, heads))
            for decl in decls.values():
                seen = set()
                for i, combo in enumerate(_all_combinations(decl)):
                    dtype, head = pairs[i % len(pairs)]
                    seen.add((tuple(combo.items()), dtype, head))
                    out.append(Variant(decl.name, arch, dtype, head, tuple(combo.items()), i))
                for j, (combo, (dtype, head)) in enumerate(itertools.product(_covering(decl), pairs)):
                    if (tuple(combo.items()), dtype, head) not in seen:
                        out.append(Variant(decl.name, arch, dtype, head, tuple(combo.items()), j))
            continue
        counter = 0
        for decl in decls.values():
            combos = _covering(decl)
            while len(combos) < len(dtypes):  # every kernel sees every dtype
                combos.append(combos[len(combos) % len(combos)])
            for i, combo in enumerate(combos):
                out.append(Variant(decl.name, arch, dtypes[i % len(dtypes)], heads[counter % len(heads)], tuple(combo.items()), i))
                counter += 1
        while counter < len(heads):  # fewer variants than head-dim classes: add plain ones of the first kernel
            decl = next(iter(decls.values()))
            combo = _covering(decl)[0]
            out.append(Variant(decl.name, arch, dtypes[counter % len(dtypes)], heads[counter], tuple(combo.items()), counter))
            counter += 1
    return out


def _type(kind: str, dtype: str) -> str:
    if kind == "qkv":
        return "*" + dtype
    if kind == "mask":
        return "*" + dtype  # the model's additive mask, in the model dtype
    return "*" + kind


def signature(decl: KernelDecl, dtype: str, constexprs: dict) -> dict[str, str]:
    """The compile signature of every parameter, from the launcher's POINTERS / FLOATS (ints otherwise)."""
    pointers, floats = decl.module.POINTERS, decl.module.FLOATS
    sig = {}
    for name in decl.fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = _type(pointers[name], dtype)
        elif name in floats:
            sig[name] = "fp32"
        elif name[:1].isupper() and name not in SIZES:
            raise TypeError(f"{decl.name}: argument {name} looks like a pointer but its launcher's POINTERS lacks it")
        else:
            sig[name] = "i32"
    return sig


def compile_variant(variant: Variant) -> dict:
    """Compile one variant to cubin; returns a JSON-able record (ok, seconds, stages, shared memory, error)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    decl = kernels()[variant.kernel]
    switches = dict(variant.switches)
    dtype = DTYPES[variant.dtype]
    config = decl.config(dtype, variant.head_dim, switches, variant.index, MAX_SHARED[variant.arch])
    constexprs = {**switches, **decl.fixed, **decl.module.tile_constexprs(config, variant.head_dim, dtype)}
    sig = signature(decl, variant.dtype, constexprs)
    pointer_args = [i for i, name in enumerate(decl.fn.arg_names) if sig[name].startswith("*")]
    attrs = {(i,): [["tt.divisibility", 16]] for i in pointer_args}  # what the launcher's allocations give
    record = {"variant": variant.label(), "kernel": variant.kernel, "arch": variant.arch, "dtype": variant.dtype,
              "head_dim": variant.head_dim, "switches": dict(variant.switches),
              "config": [config.block_m, config.block_n, config.num_warps, config.num_stages]}
    start = time.perf_counter()
    try:
        compiled = triton.compile(
            ASTSource(decl.fn, sig, constexprs, attrs),
            target=GPUTarget("cuda", variant.arch, 32),
            options={"num_warps": config.num_warps, "num_stages": config.num_stages},
        )
    except Exception as error:  # noqa: BLE001 - reported per variant
        record.update(ok=False, error=_describe_error(error))
    else:
        shared = int(compiled.metadata.shared)
        record.update(ok=True, stages=sorted(compiled.asm), shared=shared)
        if shared > MAX_SHARED[variant.arch]:
            record.update(ok=False, error=f"needs {shared} bytes of shared memory, sm_{variant.arch} has {MAX_SHARED[variant.arch]}")
        elif "cubin" not in compiled.asm:
            record.update(ok=False, error="no cubin: ptxas did not run")
    record["seconds"] = round(time.perf_counter() - start, 2)
    return record


# --- the launches the runtime makes ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """One attention level of a model family at its default resolution: heads x head dim, the image-token grid
    ((h, w), or (frames, h, w) for video) and the text tokens (cross-attention keys, or the text part of a joint
    sequence). `mask`: the mask the model passes to attention on its text-attending layers (`MASKS`), or None."""

    name: str
    heads: int
    head_dim: int
    grid: tuple[int, ...]
    text: int
    joint: bool
    mask: str | None = None

    def __post_init__(self) -> None:
        if self.mask is not None and self.mask not in MASKS:
            raise ValueError(f"Family.mask must be None or one of {', '.join(MASKS)}, got {self.mask!r}")

    @property
    def image_tokens(self) -> int:
        return math.prod(self.grid)


#: The masks the models pass to attention, as they pass them (`runtime_call` builds each; the mask's dtype is part of
#: the kernel's signature, its strides of the specialisation):
#: - "key": an additive (B, H, 1, Nk) text padding mask in the model dtype (PixArt: diffusers' (B * H, 1, Nk) viewed
#:   per head);
#: - "bool-key": a bool (B, 1, 1, N) padding mask over a joint sequence's keys (Qwen-Image's text mask; Z-Image's,
#:   where the rows' captions pad to different lengths), which the launchers turn into the queries' dtype
#:   (`spec.additive_in`);
#: - "dense": a (B, 1, N, N) float mask in the model dtype over the joint sequence (Chroma: `mask[:, None, None, :] *
#:   mask[:, None, :, None]`, which diffusers adds as it is).
MASKS = ("key", "bool-key", "dense")

#: The real families' attention shapes (the tiles depend on head dim and dtype; the specialisation on which sizes
#: and strides are 1 or divisible by 16; the one-tile PLADIS layout on the text length).
FAMILIES: tuple[Family, ...] = (
    Family("sd15-64x64", 8, 40, (64, 64), 77, joint=False),  # SD 1.5 at 512 px, its three attention levels
    Family("sd15-32x32", 8, 80, (32, 32), 77, joint=False),
    Family("sd15-16x16", 8, 160, (16, 16), 77, joint=False),
    Family("sd15-16x16-long-prompt", 8, 160, (16, 16), 154, joint=False),  # two CLIP windows (compel and the like)
    Family("sd2-96x96", 5, 64, (96, 96), 77, joint=False),  # SD 2.x at 768 px
    Family("sdxl-64x64", 10, 64, (64, 64), 77, joint=False),  # SDXL at 1024 px
    Family("pixart-64x64", 16, 72, (64, 64), 120, joint=False, mask="key"),  # PixArt-alpha: T5's 120 tokens, masked
    # PixArt-Sigma at 1024 px (the README's example): 300 T5 tokens, so PLADIS streams the cross-attention keys
    Family("pixart-sigma-128x128", 16, 72, (128, 128), 300, joint=False, mask="key"),
    Family("sd3-64x64", 24, 64, (64, 64), 333, joint=True),  # 77 CLIP + 256 T5 tokens
    Family("flux-64x64", 24, 128, (64, 64), 512, joint=True),  # Flux.1-dev
    Family("flux-schnell-64x64", 24, 128, (64, 64), 256, joint=True),
    # prompts of different lengths in one batch: the text length is the longest prompt's
    Family("qwenimage-64x64", 24, 128, (64, 64), 93, joint=True, mask="bool-key"),
    # captions pad to a multiple of 32 tokens; a batch whose captions pad to different lengths (a longer negative
    # prompt) is masked (with equal lengths there is no mask: Flux's unmasked launches)
    Family("zimage-64x64", 30, 128, (64, 64), 96, joint=True, mask="bool-key"),
    Family("chroma-64x64", 24, 128, (64, 64), 512, joint=True, mask="dense"),
    Family("wan-21x30x52", 12, 128, (21, 30, 52), 512, joint=False),  # Wan 2.1 1.3B, 81 frames at 480 x 832
)

#: The calls controls make (alone and composed, `semantics.merge_specs`), with the layers they make them on: "cross"
#: (text keys), "self" (image tokens) or "joint" (text and image in one sequence); the specs are `runtime_call`'s.
CALLS = (
    ("Reweight key bias", ("cross", "joint")),
    ("Reweight value scale", ("cross", "joint")),
    ("Regions labels", ("cross", "self", "joint")),
    ("Regions + Reweight key bias and value scale", ("cross", "joint")),
    ("Regions + log-sum-exp", ("self", "joint")),
    ("PLADIS sparsemax", ("cross", "joint")),
    ("PLADIS 1.5-entmax", ("cross", "joint")),
    ("PLADIS alpha 3 + labels + key bias", ("cross", "joint")),
    ("window radius", ("self", "joint")),
    ("window band", ("self", "joint")),
    ("labels + window", ("self", "joint")),
    ("PLADIS + window", ("joint",)),
    ("PLADIS + Reweight value scale", ("cross", "joint")),
    ("PLADIS + band window + log-sum-exp", ("joint",)),
    ("log-sum-exp + key bias", ("self", "joint")),
)
#: Per-call arrays made by a control on the host (per-step scales: a view into one tensor of every step).
_STEPS = 3


@dataclass(frozen=True)
class RuntimeCase:
    family: Family
    dtype: str
    layer: str
    call: str

    def label(self) -> str:
        return f"{self.family.name} {self.dtype} {self.layer}: {self.call}"


def runtime_cases() -> list[RuntimeCase]:
    """Every (family, dtype, layer, call) of the runtime matrix."""
    out = []
    for family, dtype in itertools.product(FAMILIES, DTYPES):
        layers = ("joint",) if family.joint else ("cross", "self")
        for layer, (call, where) in itertools.product(layers, CALLS):
            if layer in where:
                out.append(RuntimeCase(family, dtype, layer, call))
    return out


def _projections(batch: int, tokens: int, family: Family, dtype: torch.dtype) -> torch.Tensor:
    """(B, H, N, D) as diffusers' processors make it: a (B, N, H * D) projection viewed and transposed."""
    flat = torch.empty(batch, tokens, family.heads * family.head_dim, dtype=dtype)
    return flat.view(batch, tokens, family.heads, family.head_dim).transpose(1, 2)


def _label_mask(batch: int, nq: int, nk: int) -> LabelMask:
    q_labels = (torch.arange(nq) * 3 // max(nq, 1)).repeat(batch, 1)
    k_labels = q_labels if nq == nk else (torch.arange(nk) % 3).repeat(batch, 1)
    table = torch.zeros(1, 3, 3)
    table[0, 0, 1] = float("-inf")
    table[0, 1, 2] = -3.0
    return LabelMask(q_labels, k_labels, table)


def _model_mask(kind: str, batch: int, heads: int, nq: int, nk: int, dtype: torch.dtype) -> torch.Tensor:
    """The model's mask of a `MASKS` kind, laid out as the model passes it."""
    if kind == "key":
        return torch.zeros(batch * heads, 1, nk, dtype=dtype).view(batch, heads, 1, nk)
    if kind == "bool-key":
        return torch.ones(batch, nk, dtype=torch.bool)[:, None, None, :]  # (B, N) viewed per key, as the processors do
    return torch.empty(batch, 1, nq, nk, dtype=dtype)  # (B, 1, N, N): never filled, only its layout matters here


def runtime_call(case: RuntimeCase, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionSpec]:
    """The tensors and spec of a case (CPU tensors, never filled: only shapes, strides and dtypes matter here)."""
    family, layer, call = case.family, case.layer, case.call
    dtype = DTYPES[case.dtype]
    n_img, text = family.image_tokens, family.text
    nq = n_img + text if layer == "joint" else n_img
    nk = text if layer == "cross" else nq
    q, k, v = (_projections(batch, n, family, dtype) for n in (nq, nk, nk))
    frames, grid = (family.grid[0], family.grid[1:]) if len(family.grid) == 3 else (1, family.grid)
    text_len = text if layer == "joint" else 0
    radius = (1, 8, 8) if frames > 1 else (8, 8)
    window = Window(grid, radius=radius, text_len=text_len, text_first=True, frames=frames)
    band = Window(grid, band=256, text_len=text_len, text_first=True, frames=frames)
    rows = (text, nq) if layer == "joint" else None  # joint layers edit the image rows only
    mask = None
    if family.mask is not None and layer != "self":
        mask = _model_mask(family.mask, batch, family.heads, nq, nk, dtype)
    scales = torch.zeros(_STEPS, batch, nk)[1]
    labels = _label_mask(batch, nq, nk)
    specs = {
        "Reweight key bias": AttentionSpec(attn_mask=mask, key_bias=scales, query_range=rows),
        "Reweight value scale": AttentionSpec(attn_mask=mask, value_scale=scales, query_range=rows),
        "Regions labels": AttentionSpec(attn_mask=mask, labels=labels),
        "Regions + Reweight key bias and value scale": AttentionSpec(
            attn_mask=mask, labels=labels, key_bias=scales, value_scale=scales, query_range=rows
        ),
        "Regions + log-sum-exp": AttentionSpec(attn_mask=mask, labels=labels, return_lse=True),
        "PLADIS sparsemax": AttentionSpec(attn_mask=mask, sparse=Sparse(2.0, 2.0), query_range=rows),
        "PLADIS 1.5-entmax": AttentionSpec(attn_mask=mask, sparse=Sparse(1.5, 2.0), query_range=rows),
        "PLADIS alpha 3 + labels + key bias": AttentionSpec(
            attn_mask=mask, sparse=Sparse(3.0, 2.0), labels=labels, key_bias=scales, query_range=rows
        ),
        "window radius": AttentionSpec(attn_mask=mask, window=window),
        "window band": AttentionSpec(attn_mask=mask, window=band),
        "labels + window": AttentionSpec(attn_mask=mask, labels=labels, window=window),
        "PLADIS + window": AttentionSpec(attn_mask=mask, sparse=Sparse(1.5, 2.0), window=window, query_range=rows),
        "PLADIS + Reweight value scale": AttentionSpec(attn_mask=mask, sparse=Sparse(1.5, 2.0), value_scale=scales, query_range=rows),
        "PLADIS + band window + log-sum-exp": AttentionSpec(
            attn_mask=mask, sparse=Sparse(2.0, 2.0), window=band, query_range=rows, return_lse=True
        ),
        "log-sum-exp + key bias": AttentionSpec(
            attn_mask=mask, key_bias=torch.zeros(batch, nk), query_range=(0, nq // 2), return_lse=True
        ),
    }
    return q, k, v, specs[call]


def runtime_launch(case: RuntimeCase, arch: int):
    """The kernel launch (`triton_attention.Launch`) the triton backend makes for the case on a GPU of `arch`: the
    launchers' own tile choice (`cuda_config` for the arch's shared memory, the sparse one-tile layout), argument
    building, label layouts and block lists."""
    from . import triton_attention as ta
    from . import triton_backend

    q, k, v, spec = runtime_call(case)
    launcher = triton_backend.launcher_for(spec)
    if launcher is None:
        raise ValueError(f"{case.label()}: SDPA's plain path, no Triton kernel")
    out, lse = ta.outputs(q, v, spec.return_lse)
    return launcher.launch(q, k, v, spec, out, lse, config=None, gpu=True, shared_memory=MAX_SHARED[arch])


def tile_configuration(launch) -> tuple:
    """(kernel, dtype, BLOCK_D, BLOCK_M, BLOCK_N, warps, stages, layout): what the launchers pick per head dim, dtype
    and key length."""
    options = launch.options
    layout = "one-tile" if options.get("ONE_TILE") else ""
    dtype = next(name for name, value in DTYPES.items() if value == launch.args[0].dtype)
    return (launch.name, dtype, options["BLOCK_D"], options["BLOCK_M"], options["BLOCK_N"], options["num_warps"],
            options["num_stages"], layout)


#: The dtypes of the default set per arch: fp16 and bf16 take the same tiles (the same shared memory), so each arch
#: compiles every tile of the real families once, in one of them, and sm_80 and sm_90 together every dtype.
DEFAULT_DTYPES = {80: ("fp16", "fp32"), 86: ("fp16", "fp32"), 90: ("bf16", "fp32")}


def compiled_elsewhere(case: RuntimeCase, arch: int) -> bool:
    """Whether the case's launch on `arch` is compiled on `COMPILED_ON[arch]`: the same tiles, the same code."""
    other = COMPILED_ON.get(arch)
    return other is not None and tile_configuration(runtime_launch(case, arch)) == tile_configuration(runtime_launch(case, other))


def runtime_default(arch: int, cases: list[RuntimeCase] | None = None) -> list[RuntimeCase]:
    """The default set on `arch`: one case per tile configuration (`tile_configuration`) in `DEFAULT_DTYPES[arch]`,
    each the one that compiles the most switch values not yet compiled, then a case for each switch value of each
    kernel still missing; on an arch of `COMPILED_ON`, of the cases whose tiles differ there only. Every chosen case
    is a different kernel, tile or switch combination: different code."""
    cases = runtime_cases() if cases is None else cases
    dtypes = DEFAULT_DTYPES.get(arch, tuple(DTYPES))
    by_config: dict[tuple, list[tuple[RuntimeCase, set]]] = {}
    for case in cases:
        if case.dtype in dtypes and not compiled_elsewhere(case, arch):
            launch = runtime_launch(case, arch)
            switches = {(launch.name, name, value) for name, value in launch.options.items() if name in _switch_names(launch.name)}
            by_config.setdefault(tile_configuration(launch), []).append((case, switches))
    chosen: list[RuntimeCase] = []
    covered: set = set()
    for options in by_config.values():
        case, switches = max(options, key=lambda option: len(option[1] - covered))  # the first of the best
        chosen.append(case)
        covered |= switches
    for options in by_config.values():
        for case, switches in options:
            if not switches <= covered:
                chosen.append(case)
                covered |= switches
    return chosen


def _switch_names(kernel: str) -> tuple[str, ...]:
    return tuple(kernels()[kernel].switches)


class _TargetDriver:
    """A Triton driver that reports a CUDA GPU of `arch` and launches nothing: `JITFunction.warmup` then compiles a
    launch exactly as on that GPU (Triton's own binder specialises the real arguments: ints equal to 1 become
    constexprs, sizes and strides divisible by 16 and 16-byte aligned pointers get the divisibility hint). The device
    number is the arch, so each arch keeps its own binder and kernel cache."""

    def __init__(self) -> None:
        self.arch = ARCHS[0]

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", self.arch, 32)

    def get_current_device(self) -> int:
        return self.arch

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


_DRIVER = _TargetDriver()


def _warmup(launch, arch: int, compile_it: bool):
    """Specialise `launch` for `arch` and compile it (`compile_it`), or only return its Triton cache key (the
    specialisation and options: what changes the compiled code)."""
    from triton import knobs
    from triton.runtime import driver

    driver.set_active(_DRIVER)  # for this process (the compile runs in its own, with TRITON_INTERPRET=0)
    _DRIVER.arch = arch
    keys = []

    def hook(*, key, **_):
        keys.append(key)
        return not compile_it  # True: skip the compile

    previous = knobs.runtime.jit_cache_hook
    knobs.runtime.jit_cache_hook = hook
    try:
        kernel = launch.kernel.warmup(*launch.args, grid=launch.grid, **launch.options)
    finally:
        knobs.runtime.jit_cache_hook = previous
    return kernel, (keys[0] if keys else None)


def runtime_key(launch, arch: int) -> str:
    """Triton's cache key of `launch` on `arch`: two launches with the same key compile to the same code."""
    return f"sm_{arch} {launch.name} " + _warmup(launch, arch, compile_it=False)[1]


def runtime_jobs(which: str, archs: tuple[int, ...]) -> list[tuple[int, RuntimeCase]]:
    """(arch, case) to compile: `runtime` (the default) per arch `runtime_default`; `runtime-all` every case of
    the matrix (on an arch of `COMPILED_ON`, those whose tiles differ), deduplicated per arch by Triton's cache key
    (the first case of each key)."""
    cases = runtime_cases()
    if which == "runtime":
        return [(arch, case) for arch in archs for case in runtime_default(arch, cases)]
    jobs, seen = [], set()
    for arch in archs:
        for case in cases:
            if compiled_elsewhere(case, arch):
                continue
            key = runtime_key(runtime_launch(case, arch), arch)
            if key not in seen:
                seen.add(key)
                jobs.append((arch, case))
    return jobs


def specialisation(src) -> dict[str, list[str]]:
    """The integer arguments a compile specialised (an `ASTSource`): `ones` became the constant 1, `div16` carry the
    divisibility-by-16 hint."""
    names = src.fn.arg_names
    declared = set(constexpr_names(src.fn))
    ones = sorted(names[index[0]] for index in src.constants if names[index[0]] not in declared)
    div16 = sorted(
        names[index[0]] for index, attrs in src.attrs.items()
        if not src.signature[names[index[0]]].startswith("*") and ["tt.divisibility", 16] in [list(a) for a in attrs]
    )
    return {"ones": ones, "div16": div16}


def compile_runtime(arch: int, case: RuntimeCase) -> dict:
    """Compile a case's launch for `arch` to cubin; a JSON-able record with its shared memory against the limit of
    every GPU that runs the same code (`SHARED_BY`, where the launchers pick the same tiles as on `arch`)."""
    launch = runtime_launch(case, arch)
    tiles = tile_configuration(launch)
    limits = {f"sm_{a}": MAX_SHARED[a] for a in SHARED_BY[arch] if a == arch or tile_configuration(runtime_launch(case, a)) == tiles}
    record = {"variant": f"sm_{arch} {case.label()}", "kernel": launch.name, "arch": arch, "dtype": case.dtype,
              "tiles": list(tiles[2:])}
    start = time.perf_counter()
    try:
        compiled, _ = _warmup(launch, arch, compile_it=True)
    except Exception as error:  # noqa: BLE001 - reported per case
        record.update(ok=False, error=_describe_error(error))
    else:
        shared = int(compiled.metadata.shared)
        record.update(ok=True, stages=sorted(compiled.asm), shared=shared, limits=limits,
                      margin=min(limits.values()) - shared, **specialisation(compiled.src))
        over = [name for name, limit in limits.items() if shared > limit]
        if over:
            record.update(ok=False, error=f"needs {shared} bytes of shared memory, over the limit of {', '.join(over)} ({limits})")
        elif "cubin" not in compiled.asm:
            record.update(ok=False, error="no cubin: ptxas did not run")
    record["seconds"] = round(time.perf_counter() - start, 2)
    return record


def _describe_error(error: BaseException) -> str:
    """The error and its causes, innermost last (a CompilationError in a called jit function wraps the real one)."""
    parts = []
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        lines = [line for line in str(error).strip().splitlines() if line.strip()]
        parts.append(f"{type(error).__name__}: {' | '.join(lines[-3:])[-600:]}")
        error = error.__cause__ or error.__context__
    return " <- ".join(parts)


def run(
    which: str, archs: tuple[int, ...], shard: tuple[int, int] = (0, 1), limit: int | None = None, kernel: str | None = None
) -> Iterator[dict]:
    """Compile a set (optionally one shard of it: job i goes to shard i % count); yields records."""
    index, count = shard
    if which in RUNTIME_SETS:
        jobs = [job for i, job in enumerate(runtime_jobs(which, archs)) if i % count == index]
        jobs = [job for job in jobs if kernel in (None, runtime_launch(job[1], job[0]).name)][:limit]
        for arch, case in jobs:
            yield compile_runtime(arch, case)
        return
    todo = [v for i, v in enumerate(variants(which, archs)) if i % count == index and kernel in (None, v.kernel)]
    for variant in todo[:limit]:
        yield compile_variant(variant)


def labels(which: str, archs: tuple[int, ...]) -> list[str]:
    """What a set compiles, in order (the `variant` of its records)."""
    if which in RUNTIME_SETS:
        return [f"sm_{arch} {case.label()}" for arch, case in runtime_jobs(which, archs)]
    return [variant.label() for variant in variants(which, archs)]


def _interpreted() -> bool:
    from . import triton_attention as ta

    return ta.interpreted()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", default="runtime", choices=RUNTIME_SETS + VARIANT_SETS)
    parser.add_argument("--arch", default=None, help="comma-separated sm numbers, e.g. 80,90 (default: 80,86,90 for "
                        "the runtime sets, 80,90 for the others)")
    parser.add_argument("--shard", default="0/1", help="i/n: compile every n-th variant starting at i")
    parser.add_argument("--kernel", default=None, help="compile only this kernel's variants (e.g. _label_attn_fwd)")
    parser.add_argument("--limit", type=int, default=None, help="compile at most this many variants")
    parser.add_argument("--list", action="store_true", help="print the variants and the declaration check, compile nothing")
    args = parser.parse_args(argv)
    default_archs = RUNTIME_ARCHS if args.set in RUNTIME_SETS else ARCHS
    archs = tuple(int(a) for a in args.arch.split(",")) if args.arch else default_archs
    for arch in archs:
        if arch not in MAX_SHARED:
            parser.error(f"--arch takes {', '.join(map(str, MAX_SHARED))}, got {arch}")
    if _interpreted():
        print(json.dumps({"error": "TRITON_INTERPRET is on: the kernels are interpreted functions; run with TRITON_INTERPRET=0"}))
        return 2
    problems = check_declarations()
    print(json.dumps({"declarations": problems}), flush=True)
    if args.list:
        for label in labels(args.set, archs):
            print(label)
        return 1 if problems else 0
    index, count = (int(x) for x in args.shard.split("/"))
    failed = bool(problems)
    for record in run(args.set, archs, (index, count), args.limit, args.kernel):
        print(json.dumps(record), flush=True)
        failed |= not record["ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; 1 is the runtime default
    sys.exit(main())
