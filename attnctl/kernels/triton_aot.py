"""Ahead-of-time compilation of every Triton kernel for real GPU targets, on a machine without a GPU.

`triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", arch, 32))` runs Triton's
whole pipeline (ttir, ttgir, llir, ptx, and cubin with the ptxas that ships in the triton wheel) on the CPU.
The interpreter (`TRITON_INTERPRET=1`, the CPU tests) accepts code a GPU compile rejects, e.g. a kernel that
reads a plain module float (issue #15); this compile does not.

Each launcher module declares what it can launch, and everything here is derived from that:

- `SWITCHES`: constexpr switch -> every value the launcher passes; `FIXED`: constexprs with one value;
  `TILE_CONSTEXPRS`: the constexprs its tile configuration sets; `launchable(switches)`: the combinations the
  launcher can produce;
- `POINTERS` / `FLOATS`: argument types (every other argument is an int32 size or stride).

`check_declarations()` fails when a kernel's constexpr parameters are not exactly these declarations, so a
new switch cannot escape the compile test. `variants("default")` covers, per GPU arch, every switch value of
every kernel, every dtype and every head-dim class at least once; `variants("product")` every launchable
switch combination of every kernel; `variants("full")` also crosses those with every dtype and head dim.

The jit functions must be real `JITFunction`s: run this module with `TRITON_INTERPRET=0` (in a subprocess
when the interpreter is on in the caller, as in the tests):

    TRITON_INTERPRET=0 python -m attnctl.kernels.triton_aot --set default --arch 80,90
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import ModuleType

import torch

#: Integer kernel arguments named in upper case (sizes); other upper-case names must be declared pointers.
SIZES = ("H", "N_Q", "N_K", "HEAD_DIM")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
ARCHS = (80, 90)
VARIANT_SETS = ("default", "product", "full", "widest")
#: Shared memory per block a kernel may use (bytes, opt-in maximum): A100 (sm_80), RTX 30xx / A10 (sm_86), RTX 40xx /
#: L4 / L40 (sm_89) and H100 / H200 (sm_90).
MAX_SHARED = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


#: The variant index of the `widest` set: the sparse kernel's one-tile layout at its longest key row (`ONE_TILE_KEYS`).
WIDEST_INDEX = -1


@dataclass(frozen=True)
class KernelDecl:
    """A kernel and its launcher's declarations; `config(dtype, head_dim, switches, index)` gives the launcher's
    tile configuration (a `triton_attention.Config`) for a variant."""

    name: str
    module: ModuleType
    config: Callable[[torch.dtype, int, dict, int], object]
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

    def sparse_config(dtype, head_dim, switches, index):
        keys = 4096
        if switches["ONE_TILE"]:  # a key row the launcher runs in one tile at this dtype and head dim (the longest
            # of them for the `widest` set's index -1): never a one-tile switch with the streaming config
            fitting = [n for n in ts.ONE_TILE_KEYS if ts.one_tile(n, head_dim, dtype.itemsize)]
            keys = fitting[index % len(fitting)]
        return ts.launch_config(ta.cuda_config(dtype, head_dim), keys, True, head_dim, dtype.itemsize)

    return {
        "_attn_fwd": KernelDecl("_attn_fwd", ta, lambda dtype, head_dim, switches, index: ta.cuda_config(dtype, head_dim)),
        "_sparse_attn_fwd": KernelDecl("_sparse_attn_fwd", ts, sparse_config, dict(ts.FIXED)),
        "_label_attn_fwd": KernelDecl(
            "_label_attn_fwd", tlab, lambda dtype, head_dim, switches, index: tlab.cuda_config(dtype, head_dim)
        ),
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


def variants(which: str = "default", archs: tuple[int, ...] = ARCHS) -> list[Variant]:
    """The compile jobs of a variant set, per GPU arch in `archs`:

    - `default`: every switch value of every kernel, every dtype and every head-dim class at least once
      (a few variants per kernel: `make test`);
    - `product`: every launchable switch combination of every kernel (dtype and head-dim class rotating),
      plus every dtype x head-dim class at each of `default`'s combinations (the slow test);
    - `full`: switch combinations x dtypes x head-dim classes (about 10k per arch: hours on one core);
    - `widest`: the tiles that need the most shared memory: per kernel, the combinations with the most switches on
      (the sparse kernel's one-tile and streaming layouts, the one-tile at its longest key row), every dtype, the two
      widest head-dim classes (for the consumer GPUs' 99 KiB: `--arch 86`; the slow test).
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
                    for dtype, head in itertools.product(dtypes, heads[-2:]):
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
    config = decl.config(dtype, variant.head_dim, switches, variant.index)
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
    """Compile a variant set (optionally one shard of it: variant i goes to shard i % count); yields records."""
    index, count = shard
    todo = [v for i, v in enumerate(variants(which, archs)) if i % count == index and kernel in (None, v.kernel)]
    if limit is not None:
        todo = todo[:limit]
    for variant in todo:
        yield compile_variant(variant)


def _interpreted() -> bool:
    from . import triton_attention as ta

    return ta.interpreted()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", default="default", choices=VARIANT_SETS)
    parser.add_argument("--arch", default=",".join(map(str, ARCHS)), help="comma-separated sm numbers, e.g. 80,90")
    parser.add_argument("--shard", default="0/1", help="i/n: compile every n-th variant starting at i")
    parser.add_argument("--kernel", default=None, help="compile only this kernel's variants (e.g. _label_attn_fwd)")
    parser.add_argument("--limit", type=int, default=None, help="compile at most this many variants")
    parser.add_argument("--list", action="store_true", help="print the variants and the declaration check, compile nothing")
    args = parser.parse_args(argv)
    archs = tuple(int(a) for a in args.arch.split(","))
    for arch in archs:
        if arch not in MAX_SHARED:
            parser.error(f"--arch takes {', '.join(map(str, MAX_SHARED))}, got {arch}")
    if _interpreted():
        print(json.dumps({"error": "TRITON_INTERPRET is on: the kernels are interpreted functions; run with TRITON_INTERPRET=0"}))
        return 2
    problems = check_declarations()
    print(json.dumps({"declarations": problems}), flush=True)
    if args.list:
        for variant in variants(args.set, archs):
            print(variant.label())
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
