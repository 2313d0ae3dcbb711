"""Attention backends and the table of what each can do.

`attention(q, k, v, spec, backend)` runs one attention call with the changes in `spec` (an
`AttentionSpec`) on a backend: `"reference"` (eager, the specification), `"sdpa"` (torch SDPA with
additive masks), and the fused backends registered by their modules when their dependencies import.
`"auto"` picks by device and capability (`choose_backend` says why). A backend that cannot honour a
spec raises `BackendError`; nothing is ever dropped silently.

This package imports without triton installed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..errors import BackendError, ConfigError
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
    #: The most mask elements (`AttentionSpec.dense_elements`) it builds for label masks and windows (None: no limit)
    dense_limit: int | None = None


_ALL = frozenset({"attn_mask", "key_bias", "value_scale", "query_range", "labels", "window", "sparse", "lse"})

BACKENDS: dict[str, Backend] = {
    "reference": Backend("reference", reference.attention, _ALL, ("cpu", "cuda", "mps", "xpu"), "eager, explicit softmax"),
    "sdpa": Backend(
        "sdpa",
        sdpa.attention,
        frozenset({"attn_mask", "key_bias", "value_scale", "query_range", "labels", "window"}),
        ("cpu", "cuda", "mps", "xpu"),
        f"torch SDPA; label masks and windows dense up to {sdpa.DENSE_MASK_LIMIT} elements",
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


def choose_backend(
    requested: str, device: torch.device | str, features: tuple[str, ...], dense_elements: int = 0
) -> tuple[str, str]:
    """Return (backend name, reason) for a call needing `features` on `device`, or raise BackendError.

    `dense_elements` is what a backend that makes label masks and windows dense would build for this call
    (`AttentionSpec.dense_elements(batch, nq, nk)`; 0 when unknown or none): `auto` skips a backend whose
    `dense_limit` it exceeds, an explicit request of that backend raises.
    """
    device_type = torch.device(device).type
    if requested != "auto":
        backend = BACKENDS.get(requested)
        if backend is None:
            raise BackendError(f"backend {requested!r} is not available here: {_why_missing(requested)}")
        missing = _unsupported(backend, features, device_type, dense_elements)
        if missing:
            raise BackendError(f"backend {requested!r} cannot do {', '.join(missing)}; {capability_table()}")
        return requested, "requested"
    order = AUTO_ORDER.get(device_type, ("sdpa", "reference"))
    skipped: list[str] = []
    for name in order:
        backend = BACKENDS.get(name)
        if backend is None:
            continue
        if not _unsupported(backend, features, device_type, dense_elements):
            needs = ", ".join(features) if features else "no control"
            why = f"auto on {device_type}: first of {'/'.join(order)} that can do {needs}"
            if skipped:
                why += f" ({'; '.join(skipped)})"
            return name, why
        if not _unsupported(backend, features, device_type):
            skipped.append(f"{name} would build a dense mask of {dense_elements} elements, limit {backend.dense_limit}")
    raise BackendError(f"no backend can do {', '.join(features)} on {device_type}; {capability_table()}")


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
    prefers triton > flex > sdpa > reference for controlled layers. CPU prefers sdpa > flex > reference:
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
                "flex", flex.attention, _ALL - {"sparse"}, ("cpu", "cuda"),
                "torch flex_attention compiled; score_mod / mask_mod per control, block masks cached; no PLADIS "
                "(per-row threshold); plain calls go to SDPA",
                missing_on={device: frozenset(f) for device, f in flex.DEVICE_LIMITS.items()},
            ),
            auto={"cuda": 0, "cpu": 1},  # CPU: only for label masks / windows past sdpa's dense limit
        )
    try:
        import triton  # noqa: F401
    except ImportError:
        return
    from . import triton_attention, triton_sparse

    register_backend(
        Backend(
            "triton", triton_sparse.backend_attention, _ALL,
            ("cuda", "cpu") if triton_attention.interpreted() else ("cuda",),
            "fused flash kernels: bias / value scale, labels and windows with tile skipping, LSE, entmax for PLADIS; "
            "plain calls go to SDPA",
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
    name, _ = choose_backend(backend, q.device, spec.features(), spec.dense_elements(q.shape[0], q.shape[2], k.shape[2]))
    return BACKENDS[name].fn(q, k, v, spec)


__all__ = [
    "AUTO_ORDER", "BACKENDS", "BACKEND_NAMES", "AttentionSpec", "Backend", "LabelMask", "PLAIN", "Sparse", "Window",
    "attention", "capability_table", "check_features", "choose_backend", "register_backend", "validate_backend",
]
