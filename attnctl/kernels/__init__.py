"""Attention backends and the table of what each can do.

`attention(q, k, v, spec, backend)` runs one attention call with the changes in `spec` (an
`AttentionSpec`) on a backend: `"reference"` (eager, the specification), `"sdpa"` (torch SDPA with
additive masks), and the fused backends registered by their modules when their dependencies import.
`"auto"` picks by device, capability and, on CUDA, the measured speed of each backend for the call's
controls (`MEASURED`; `choose_backend` says why). A backend that cannot honour a spec raises `BackendError`;
nothing is ever dropped silently. When a Triton kernel fails to compile on the device at its first use, `auto`
moves to the next backend that computes the same result (one warning; `choose_backend`, and so
`Handle.describe()`, report it); an explicit `backend="triton"` raises instead, naming the kernel and the
backend that would work.

This package imports without triton installed.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch

from ..errors import BackendError, ConfigError, UnsupportedInputError
from . import reference, sdpa
from .spec import PLAIN, AttentionSpec, LabelMask, Sparse, Window

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionSpec], tuple[torch.Tensor, torch.Tensor | None]]


@dataclass(frozen=True)
class Backend:
    name: str
    fn: AttentionFn
    features: frozenset[str]
    devices: tuple[str, ...]
    note: str = ""
    #: device type -> features this backend lacks there (compiled flex returns no log-sum-exp on CPU)
    missing_on: dict[str, frozenset[str]] = field(default_factory=dict)
    #: The most mask elements it builds for label masks and windows, counted as sdpa does (`sdpa.mask_elements`: a
    #: window it computes in tiles builds none); only sdpa builds such masks (None: no limit)
    dense_limit: int | None = None
    #: features -> the name of the compiled kernel a call with them runs (None: none), for compile failures
    kernel_of: Callable[[tuple[str, ...]], str | None] | None = None


_ALL = frozenset({"attn_mask", "key_bias", "value_scale", "query_range", "labels", "window", "sparse", "lse"})

BACKENDS: dict[str, Backend] = {
    "reference": Backend("reference", reference.attention, _ALL, ("cpu", "cuda", "mps", "xpu"), "eager, explicit softmax"),
    "sdpa": Backend(
        "sdpa",
        sdpa.attention,
        frozenset({"attn_mask", "key_bias", "value_scale", "query_range", "labels", "window"}),
        ("cpu", "cuda", "mps", "xpu"),
        f"torch SDPA; label masks and windows dense up to {sdpa.DENSE_MASK_LIMIT} elements (a window alone on a large "
        "grid in tiles, no mask)",
        dense_limit=sdpa.DENSE_MASK_LIMIT,
    ),
}
BACKEND_NAMES: tuple[str, ...] = ("reference", "sdpa", "flex", "triton")
# Preference of `auto` per device type; names not registered (no triton, no flex) are skipped, and so is a
# backend whose `dense_limit` the call exceeds (CPU: label masks and windows past sdpa's limit go to flex, then
# the reference).
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cpu": ("sdpa", "reference"),
    "cuda": ("sdpa", "reference"),
}

# Measured speed per workload and backend, which `auto` on CUDA reads: issue #15's kernel benchmark
# (benchmarks/bench_kernels.py) on an NVIDIA H200, torch 2.11.0+cu130, triton 3.6.0, diffusers 0.42.1, fp16,
# medians of triton.testing.do_bench; speed = sdpa-flash time without control / time (higher is faster).
# "regions" = 8 subjects + background with isolation; the triton figures are of the ungrouped label kernel
# (the grouped one, `triton_labels`, is not measured yet), so label masks go to dense SDPA up to its limit.
MEASURED_ON = "NVIDIA H200, torch 2.11.0+cu130, triton 3.6.0, diffusers 0.42.1, fp16"
#: shape name -> (tokens N, head dim D) of the benchmark rows
MEASURED_SHAPES: dict[str, tuple[int, int]] = {"sdxl-4k": (4096, 64), "flux": (4608, 128), "16k": (16384, 64)}
MEASURED: dict[str, dict[str, dict[str, float]]] = {
    # triton's own plain kernel measured 1.01x / 1.17x; the triton backend sends plain calls to SDPA, so not listed
    "plain": {"sdpa": {"sdxl-4k": 1.0, "flux": 1.0, "16k": 1.0}},
    "reweight": {"triton": {"sdxl-4k": 0.80, "flux": 0.99}, "flex": {"sdxl-4k": 0.68, "flux": 1.17, "16k": 1.25}},
    "regions": {
        "sdpa": {"sdxl-4k": 0.87, "flux": 0.97, "16k": 0.78},
        "flex": {"sdxl-4k": 0.23, "flux": 0.58, "16k": 0.23},
        "triton": {"sdxl-4k": 0.14, "flux": 0.26},
    },
    "window": {"triton": {"sdxl-4k": 1.24, "flux": 1.97}},
}
#: The benchmark row used when the call's size is not known (the runtime passes each call's (query tokens, head dim)).
DEFAULT_MEASURED_SHAPE = "sdxl-4k"

#: (device type, kernel) -> why the kernel failed to compile there (recorded at its first use, one warning).
KERNEL_FAILURES: dict[tuple[str, str], str] = {}
#: backend name -> why it is not registered although its package imports (e.g. its kernels module failed).
UNAVAILABLE: dict[str, str] = {}
_WARNED: set[tuple[str, str]] = set()
#: What the caller of a backend function asked for ("auto" or a backend name): a backend whose kernel fails to
#: compile falls back under "auto" and raises otherwise. `attention` sets it; the runtime sets it per call.
_REQUESTED: ContextVar[str] = ContextVar("attnctl_backend_requested", default="")


def clear_caches() -> None:
    """Forget every backend's cached masks, block lists and layouts (dense window masks, label masks, flex block masks,
    triton block lists): `Handle.remove()` calls it once no handle is live. Backends not imported have none."""
    sdpa.clear_caches()
    for name in ("flex", "triton_attention", "triton_labels"):
        module = sys.modules.get(f"{__name__}.{name}")
        if module is not None:
            module.clear_caches()


def note_request(requested: str) -> None:
    """Record what the caller asked for before it calls `BACKENDS[name].fn` (the runtime does, per call)."""
    _REQUESTED.set(requested)


def register_backend(backend: Backend, *, auto: dict[str, int] | None = None) -> None:
    """Add a backend to the table; `auto` maps device types to its position in that device's preference."""
    BACKENDS[backend.name] = backend
    for device, position in (auto or {}).items():
        order = [name for name in AUTO_ORDER.get(device, ()) if name != backend.name]
        order.insert(position, backend.name)
        AUTO_ORDER[device] = tuple(order)


def validate_backend(name: object) -> str:
    allowed = ("auto",) + BACKEND_NAMES
    if not isinstance(name, str) or name not in allowed:
        raise ConfigError(f"backend must be one of {', '.join(allowed)}, got {name!r}")
    return name


def _unsupported(backend: Backend, features: tuple[str, ...], device: str, dense_elements: int = 0) -> list[str]:
    lacking = backend.missing_on.get(device, frozenset())
    missing = [f for f in features if f not in backend.features]
    missing += [f"{f} on {device}" for f in features if f in backend.features and f in lacking]
    if device not in backend.devices:
        missing.append(f"device {device}")
    if backend.dense_limit is not None and dense_elements > backend.dense_limit:
        missing.append(f"a dense mask of {dense_elements} elements (limit {backend.dense_limit})")
    return missing


def workload(features: tuple[str, ...]) -> str | None:
    """The row of `MEASURED` a call with `features` belongs to (None: not measured)."""
    wanted = set(features) - {"attn_mask"}
    if "sparse" in wanted or "lse" in wanted:
        return None
    if "labels" in wanted:
        return None if "window" in wanted else "regions"
    if "window" in wanted:
        return "window"
    if wanted & {"key_bias", "value_scale"}:
        return "reweight"
    return "plain" if not wanted else None


def _measured_row(shape: tuple[int, int] | None) -> str:
    """The benchmark shape nearest to (tokens, head dim): same head dim first, then nearest token count."""
    if shape is None:
        return DEFAULT_MEASURED_SHAPE
    tokens, head_dim = shape
    return min(
        MEASURED_SHAPES,
        key=lambda name: (MEASURED_SHAPES[name][1] != head_dim, abs(math.log(max(tokens, 1) / MEASURED_SHAPES[name][0]))),
    )


def auto_order(device_type: str, features: tuple[str, ...], shape: tuple[int, int] | None = None) -> tuple[tuple[str, ...], str]:
    """(`auto`'s preference for this call, where it comes from). On CUDA, the backends `MEASURED` for the call's
    workload come first, fastest first at the nearest measured shape; the rest keep `AUTO_ORDER`'s order."""
    order = AUTO_ORDER.get(device_type, ("sdpa", "reference"))
    kind = workload(features)
    if device_type != "cuda" or kind is None:
        return order, "preference"
    row = _measured_row(shape)
    speeds = MEASURED[kind]
    if kind == "reweight" and "key_bias" not in features:
        # A value scale alone (Reweight's default): sdpa runs the plain fused kernel on the scaled values (one multiply
        # more), as fast as plain sdpa. The fused backends' reweight rows (flex 1.17x at head dim 128, triton 0.80x /
        # 0.99x) were measured with a bias and a value scale together, which sdpa cannot run in its flash kernel; no
        # measurement here has flex or triton with a value scale alone, so sdpa comes first at every head dim (flex's
        # 1.17x used to send it to flex at head dim 128 only) and the others keep their preference order.
        speeds = {"sdpa": MEASURED["plain"]["sdpa"]}
        kind = "plain (a value scale alone)"

    def speed(name: str) -> float:
        by_shape = speeds[name]
        if row in by_shape:
            return by_shape[row]
        return math.exp(sum(math.log(x) for x in by_shape.values()) / len(by_shape))  # other rows: geometric mean

    measured = sorted((name for name in order if name in speeds), key=speed, reverse=True)
    rest = [name for name in order if name not in speeds]
    return tuple(measured + rest), f"measured {kind} at {row} ({MEASURED_ON})"


def _kernel_failure(backend: Backend, device_type: str, features: tuple[str, ...]) -> tuple[str, str] | None:
    if backend.kernel_of is None or not KERNEL_FAILURES:
        return None
    kernel = backend.kernel_of(features)
    why = KERNEL_FAILURES.get((device_type, kernel)) if kernel else None
    return (kernel, why) if why else None


def choose_backend(
    requested: str, device: torch.device | str, features: tuple[str, ...], dense_elements: int = 0,
    shape: tuple[int, int] | None = None, exclude: tuple[str, ...] = (),
) -> tuple[str, str]:
    """Return (backend name, reason) for a call needing `features` on `device`, or raise BackendError.

    `dense_elements` is the dense mask the sdpa backend would build for this call's label masks and windows
    (`sdpa.mask_elements(spec, batch, nq, nk)`; 0 when unknown or none, or for a window it tiles): `auto` skips a backend whose
    `dense_limit` it exceeds, an explicit request of that backend raises. `shape` = (tokens, head dim) picks
    the measured row on CUDA (None: `DEFAULT_MEASURED_SHAPE`). A backend whose kernel for these features
    failed to compile on this device type is skipped by `auto` and refused when requested; `exclude` names
    backends `auto` must not pick.
    """
    device_type = torch.device(device).type
    if requested != "auto":
        backend = BACKENDS.get(requested)
        if backend is None:
            raise BackendError(f"backend {requested!r} is not available here: {_why_missing(requested)}")
        missing = _unsupported(backend, features, device_type, dense_elements)
        if missing:
            raise BackendError(f"backend {requested!r} cannot do {', '.join(missing)}; {capability_table()}")
        failure = _kernel_failure(backend, device_type, features)
        if failure is not None:
            raise BackendError(_failure_message(requested, failure, device_type, features, dense_elements, shape))
        return requested, "requested"
    if device_type == "cuda" and "triton" in UNAVAILABLE:
        _warn_once(("cuda", "triton-import"), f"attnctl: the triton backend is unavailable ({UNAVAILABLE['triton']}); auto uses the other backends")
    order, source = auto_order(device_type, features, shape)
    skipped: list[str] = []
    for name in order:
        backend = BACKENDS.get(name)
        if backend is None or name in exclude:
            continue
        if not _unsupported(backend, features, device_type, dense_elements):
            failure = _kernel_failure(backend, device_type, features)
            if failure is not None:
                skipped.append(f"{name} skipped: {failure[1]}")
                continue
            needs = ", ".join(features) if features else "plain attention (no kernel feature needed)"
            why = f"auto on {device_type}: first of {'/'.join(order)} ({source}) that can do {needs}"
            if skipped:
                why += f" ({'; '.join(skipped)})"
            return name, why
        if not _unsupported(backend, features, device_type):
            skipped.append(f"{name} would build a dense mask of {dense_elements} elements, limit {backend.dense_limit}")
    raise BackendError(f"no backend can do {', '.join(features)} on {device_type}; {capability_table()}")


#: Backends whose ops dynamo puts in a graph as they are, label masks made inside the op from the labels alone:
#: while torch.compile traces, `auto` picks among these (`choose_traced_backend`). The fused backends build their
#: label layouts on the host (cached per LabelMask, with version checks and a host sync when built), which dynamo
#: cannot trace, and launch their kernels through host-side code not verified inside a graph on a GPU.
TRACEABLE_BACKENDS = ("sdpa", "reference")


def choose_traced_backend(
    requested: str, device: torch.device | str, features: tuple[str, ...], dense_elements: int = 0,
    shape: tuple[int, int] | None = None,
) -> str:
    """The backend of a call while torch.compile traces. `auto` picks among the backends whose ops dynamo puts in
    the graph as they are (`TRACEABLE_BACKENDS`: sdpa, then the reference): the fused backends reach their
    kernels through host-side code (launch configurations, compile-failure fallbacks, label layouts and flex block
    masks built and cached on the host), which has not been verified inside a graph on a GPU; eagerly `auto` keeps
    them. On sdpa, label masks and windows become dense masks in the graph; one past its limit raises BackendError
    naming the size and the limit. An explicit fused backend is honoured, except for label masks, whose host-built
    layouts dynamo cannot trace (BackendError naming why and what works)."""
    dense = [name for name in ("labels", "window") if name in features]
    if "labels" in features and requested not in ("auto", *TRACEABLE_BACKENDS):
        raise BackendError(
            f"backend {requested!r} builds its label-mask layouts (regions, isolation) on the host, which torch.compile "
            "cannot trace; with a compiled denoiser use backend='auto' or 'sdpa' (label masks then run on sdpa), or "
            "run the denoiser uncompiled"
        )
    if requested not in ("auto", *TRACEABLE_BACKENDS):
        return choose_backend(requested, device, features, dense_elements, shape)[0]
    chosen = "sdpa" if requested == "auto" else requested
    limit = BACKENDS[chosen].dense_limit
    if dense and limit is not None and dense_elements > limit:
        what = "label masks (regions, isolation)" if "labels" in dense else "windows (FastAttn)"
        raise BackendError(
            f"under torch.compile, {what} run on the {chosen} backend, which makes them dense: this call's mask has "
            f"{dense_elements} elements, past its limit of {limit}; run the denoiser uncompiled for it (attnctl then "
            "runs such masks on the fused backends)"
        )
    if requested != "auto":
        return choose_backend(requested, device, features, dense_elements, shape)[0]
    fused = tuple(name for name in BACKENDS if name not in TRACEABLE_BACKENDS)
    return choose_backend("auto", device, features, dense_elements, shape, exclude=fused)[0]


def prepare_traced_labels(labels: LabelMask, requested: str, dtype: torch.dtype, device: torch.device) -> None:
    """Before a compiled forward (outside any graph): the backend a graph will run `labels` on (`choose_traced_backend`,
    which refuses a mask past sdpa's size limit here, before the forward starts) gets its dense form now, so that the
    graph does not build it at every attention call."""
    elements = labels.q_labels.shape[0] * labels.q_labels.shape[1] * labels.k_labels.shape[1]
    if choose_traced_backend(requested, device, ("labels",), elements) == "sdpa":
        sdpa.prepare_labels(labels, dtype, device)


def _warn_once(key: tuple[str, str], message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _failure_message(
    name: str, failure: tuple[str, str], device_type: str, features: tuple[str, ...], dense_elements: int,
    shape: tuple[int, int] | None,
) -> str:
    try:
        alternative, _ = choose_backend("auto", device_type, features, dense_elements, shape, exclude=(name,))
    except BackendError:
        instead = "no other backend can do this call"
    else:
        instead = f"backend {alternative!r} computes the same (or use backend='auto')"
    return f"backend {name!r} cannot run kernel {failure[0]} on {device_type}: {failure[1]}; {instead}"


def record_kernel_failure(device_type: str, kernel: str, why: str) -> None:
    """Remember that `kernel` does not compile on `device_type`: `auto` stops choosing its backend for calls
    that need it, an explicit request raises."""
    KERNEL_FAILURES[(device_type, kernel)] = why


def _with_fallback(name: str, fn: AttentionFn) -> AttentionFn:
    """A backend function whose compiled kernels may fail to compile on the device: the failure is recorded
    (one warning) and, when the caller asked for `auto`, the call runs on the next backend that can do it;
    otherwise BackendError names the kernel and that backend."""

    def call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec):
        device_type = q.device.type
        features = spec.features()
        backend = BACKENDS[name]
        failure = _kernel_failure(backend, device_type, features)
        if failure is None:
            try:
                return fn(q, k, v, spec)
            except UnsupportedInputError as error:  # these tensors only (dtype, head dim): nothing is recorded
                if _REQUESTED.get() != "auto":
                    raise
                failure = (f"{name} inputs", str(error))
            except BackendError as error:
                kernel = getattr(error, "kernel", None)
                if kernel is None or not hasattr(error, "error"):  # not a compile failure
                    raise
                record_kernel_failure(device_type, kernel, str(error))
                failure = (kernel, str(error))
        dense = sdpa.mask_elements(spec, q.shape[0], q.shape[2], k.shape[2])
        shape = (q.shape[2], q.shape[3])
        if _REQUESTED.get() != "auto":
            raise BackendError(_failure_message(name, failure, device_type, features, dense, shape))
        other, _ = choose_backend("auto", q.device, features, dense, shape, exclude=(name,))
        _warn_once((device_type, failure[0] if failure[0] != f"{name} inputs" else failure[1]),
                   f"attnctl: {failure[1]}; auto runs such calls on {other!r} instead")
        return BACKENDS[other].fn(q, k, v, spec)

    call.__name__ = getattr(fn, "__name__", name)
    call.__wrapped__ = fn  # type: ignore[attr-defined]
    return call


def check_features(requested: str, features: tuple[str, ...], owner: str) -> None:
    """Raise BackendError when an explicitly requested backend lacks a feature `owner` needs (any device).

    `apply` calls this so that a control a backend cannot carry out fails before anything is installed,
    not in the middle of a render; device-specific gaps are checked per call by `choose_backend`.
    """
    if requested == "auto":
        return
    backend = BACKENDS.get(requested)
    if backend is None:
        raise BackendError(f"backend {requested!r} is not available here: {_why_missing(requested)}")
    missing = [f for f in features if f not in backend.features]
    if missing:
        raise BackendError(f"backend {requested!r} cannot do {', '.join(missing)}, which {owner} needs; {capability_table()}")


def _why_missing(name: str) -> str:
    if name in UNAVAILABLE:
        return UNAVAILABLE[name]
    if name == "triton":
        return "it needs the triton package (pip install 'attnctl[triton]') and its kernels module"
    if name == "flex":
        return "it needs torch.nn.attention.flex_attention (torch >= 2.5)"
    return "unknown backend"


def capability_table() -> str:
    """A one-line-per-backend text of what each registered backend can do."""
    lines = []
    for name, b in BACKENDS.items():
        limits = "".join(f"; not on {device}: {', '.join(sorted(f))}" for device, f in b.missing_on.items())
        lines.append(f"{name}: {', '.join(sorted(b.features))} on {'/'.join(b.devices)}{limits} [{b.note}]")
    return "capabilities: " + "; ".join(lines)


def _register_optional_backends() -> None:
    """Register flex when torch has it and triton when the triton package imports; on CUDA `auto` then
    prefers triton > flex > sdpa > reference for controlled layers whose workload `MEASURED` does not cover
    (it reorders the measured ones, see `auto_order`). CPU prefers sdpa > flex > reference:
    compiled flex costs seconds per new shape there and is slower than sdpa, so it serves only what sdpa
    refuses and flex can do (label masks and windows past sdpa's dense limit); triton runs on CPU only in
    the interpreter (TRITON_INTERPRET=1, for tests), which lists "cpu" among its devices but never in `auto`."""
    try:
        import torch.nn.attention.flex_attention  # noqa: F401  (torch >= 2.5)
    except ImportError:
        pass
    else:
        from . import flex

        register_backend(
            Backend(
                "flex", _with_fallback("flex", flex.attention), _ALL - {"sparse"}, ("cpu", "cuda"),
                "torch flex_attention compiled; score_mod / mask_mod per control, block masks cached; no PLADIS "
                "(per-row threshold); plain calls go to SDPA",
                missing_on={device: frozenset(f) for device, f in flex.DEVICE_LIMITS.items()},
                kernel_of=lambda features: flex.FLEX_KERNEL,
            ),
            auto={"cuda": 0, "cpu": 1},  # CPU: only for label masks / windows past sdpa's dense limit
        )
    try:
        import triton  # noqa: F401
    except ImportError:
        return
    try:
        from . import triton_attention, triton_backend
    except Exception as error:  # noqa: BLE001 - e.g. a triton too old for the kernels: auto uses the others
        UNAVAILABLE["triton"] = f"attnctl's triton kernels do not import with this triton: {type(error).__name__}: {error}"
        return

    register_backend(
        Backend(
            "triton", _with_fallback("triton", triton_backend.attention), _ALL,
            ("cuda", "cpu") if triton_attention.interpreted() else ("cuda",),
            "fused flash kernels: bias / value scale, labels grouped by label with tile skipping, windows, LSE, "
            "entmax for PLADIS; plain calls go to SDPA",
            kernel_of=triton_backend.kernel_for,
        ),
        auto={"cuda": 0},
    )


_register_optional_backends()


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: AttentionSpec = PLAIN,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention over (B, H, N, D) tensors with the changes in `spec`; returns (out, lse or None)."""
    dense = sdpa.mask_elements(spec, q.shape[0], q.shape[2], k.shape[2])
    name, _ = choose_backend(backend, q.device, spec.features(), dense, shape=(q.shape[2], q.shape[3]))
    token = _REQUESTED.set(backend)
    try:
        return BACKENDS[name].fn(q, k, v, spec)
    finally:
        _REQUESTED.reset(token)


__all__ = [
    "AUTO_ORDER", "BACKENDS", "BACKEND_NAMES", "KERNEL_FAILURES", "MEASURED", "MEASURED_ON", "AttentionSpec", "Backend",
    "LabelMask", "PLAIN", "Sparse", "TRACEABLE_BACKENDS", "Window", "attention", "auto_order", "capability_table", "check_features",
    "choose_backend", "choose_traced_backend", "clear_caches", "note_request", "prepare_traced_labels", "record_kernel_failure", "register_backend", "validate_backend",
]
