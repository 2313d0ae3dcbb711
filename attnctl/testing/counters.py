"""Deterministic cost counters: the aten operations a piece of code dispatches and its host synchronisations.

On a GPU every dispatched aten operation that is not a view is (at least) one kernel launch, and every host
synchronisation stalls the CPU until the GPU queue drains. Both are deterministic, so they can be counted on a
CPU and tested in CI, where wall times cannot.

    with CostCounter() as counter:
        pipe(...)
    counter.ops, counter.syncs, counter.sync_ops

`ops` counts every dispatched operation except views (`OpOverload.is_view`) and the few pure metadata ones
in `_FREE`. A composite operation reaching the counter undecomposed (on an inference tensor, which has no autograd key:
`to`, `contiguous`, `reshape`) is decomposed first, as autograd does for other tensors, so its copy counts. `syncs` counts what makes the host wait for the device when the tensor lives on a GPU:

- reading a value to Python: `.item()` / `_local_scalar_dense`, `bool(t)` / `is_nonzero`, `int(t)`,
  `float(t)`, `torch.equal`, `torch.allclose`, `.tolist()`, `.numpy()`;
- data-dependent shapes: `nonzero`, `masked_select`, `unique`, indexing with a boolean mask,
  `repeat_interleave` without `output_size`, `bincount` (CUDA reads the input's minimum and maximum on the host,
  `minlength` or not), `histc` without bounds (`min == max`: CUDA reads the input's range on the host);
- copies of a tensor to the CPU: `.cpu()` and `.to("cpu")` (the device named by a string) by the call, whatever
  the tensor's device, since on a CPU machine they dispatch nothing; `_to_copy` / `copy_` from another device.

`copies_in` counts, apart, the calls that copy host data to a named device: `torch.tensor(..., device=d)`,
`torch.as_tensor(..., device=d)` and `tensor.to(d)` / `.to(device=d)` / `.cuda()` without `non_blocking=True`.
On CUDA a blocking copy from pageable host memory synchronises the stream; on a CPU machine the same calls are
no-ops, so they are counted by the call, whatever the tensor's device (a `.to(d)` of a tensor already on `d`
counts too: compare with stock).

On a CPU machine every tensor is on the CPU, so a read such as `.tolist()` or `.item()`, or a copy such as
`.cpu()`, counts whatever the tensor's device: the tests compare a control's counts with stock's, and a control
that reads tensor values on the host during a pipeline call would sync on a GPU unless the tensor was made on the
host. These four are counted at the Python level (`TorchFunctionMode`), once per call, whatever they dispatch.
`.to(d)` with `d` a `torch.device` is taken as a copy to the call's device (`copies_in`), what it is in attnctl's
code (`.to(q.device)`), even where `d` is the CPU: on a CPU machine the call's device is the CPU, and only the
string form says "to the host" there.

A `torch.compile`d function (compiled flex attention) runs compiled under the counter, as it does outside it: the
kernels of its generated code are not counted (they dispatch nothing through Python), the operations of a graph run
by dynamo's eager backend are, and a higher-order operator run eagerly (`flex_attention`) counts as one operation.

Imports only torch (a low layer: attnctl.testing).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch._ops import HigherOrderOperator
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

#: Operations that read a tensor's value into Python (a host sync for a device tensor).
_READS = {
    aten._local_scalar_dense.default, aten.item.default, aten.is_nonzero.default, aten.equal.default,
    aten.allclose.default,
}
#: Operations whose output shape depends on the data (a host sync on a GPU).
_DATA_SHAPES = {
    aten.nonzero.default, aten.masked_select.default, aten._unique2.default, aten.unique_dim.default,
    aten.unique_consecutive.default, aten._unique.default, aten.bincount.default,
}
_COMPOSITE = torch._C.DispatchKey.CompositeImplicitAutograd
#: Pure metadata operations, never a kernel launch.
_FREE = {aten.sym_size.int, aten.sym_stride.int, aten.sym_numel.default, aten.sym_storage_offset.default}

#: Python-level tensor methods that read values or copy a tensor to the host (on a CPU tensor `.tolist()`, `.numpy()`
#: and `.cpu()` dispatch nothing, `.item()` a `_local_scalar_dense` that is then not counted again).
_FUNCTION_READS = {
    torch.Tensor.tolist: "tolist", torch.Tensor.numpy: "numpy", torch.Tensor.item: "item", torch.Tensor.cpu: "cpu()",
}


def _sync_name(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    if func in _READS or func in _DATA_SHAPES:
        return func._schema.name.split("::")[-1]
    if func is aten.index.Tensor:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        if any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices):
            return "index(bool mask)"
    if func in (aten.index_put.default, aten.index_put_.default):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        if any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices):
            return "index_put(bool mask)"
    if func is aten.histc.default:  # histc(self, bins=100, min=0, max=0): equal bounds mean the data's range
        low = args[2] if len(args) > 2 else kwargs.get("min", 0)
        high = args[3] if len(args) > 3 else kwargs.get("max", 0)
        if low == high:
            return "histc(no bounds)"
    if func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
        return "repeat_interleave"
    if func is aten.repeat_interleave.self_Tensor and kwargs.get("output_size") is None:
        return "repeat_interleave"
    if func is aten._to_copy.default:
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "cpu" and args[0].device.type != "cpu":
            return "copy to cpu"
    if func is aten.copy_.default:
        dst, src = args[0], args[1]
        if isinstance(src, torch.Tensor) and dst.device.type == "cpu" and src.device.type != "cpu":
            return "copy to cpu"
    return None


class _Dispatch(TorchDispatchMode):
    #: Higher-order operators (compiled flex attention's `flex_attention`, `while_loop`, ...) come here too, counted as
    #: one operation each by name and run as they are; without this a warm compiled flex call raises NotImplementedError.
    supports_higher_order_operators = True

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        """A compiled function (compiled flex attention) runs compiled under the counter, as outside it (by default
        dynamo runs eagerly under a dispatch mode, and flex's inner `fullgraph` compile then raises); the counter sees
        what its compiled code dispatches, not what tracing it does."""
        return True

    def __init__(self, counter: CostCounter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        counter = self.counter
        if isinstance(func, HigherOrderOperator):
            counter.op_names[func.name()] += 1
            return func(*args, **kwargs)
        if torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), _COMPOSITE):
            # An inference tensor has no autograd key, so a composite op (`to`, `contiguous`, `reshape`: schemas that
            # may alias, `is_view`) reaches the mode undecomposed: decomposed here, the copy it makes is counted.
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        if not func.is_view and func not in _FREE:
            counter.op_names[func.__name__] += 1
            sync = _sync_name(func, args, kwargs)
            if sync is not None and not counter.quiet:
                counter.sync_ops[sync] += 1
        return func(*args, **kwargs)


def _named_host(device: Any) -> bool:
    return isinstance(device, str) and torch.device(device).type == "cpu"


def _function_sync(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    name = _FUNCTION_READS.get(func)
    if name is None and func is torch.Tensor.to and (_named_host(kwargs.get("device")) or (len(args) > 1 and _named_host(args[1]))):
        name = "to(cpu)"
    return name


def _copy_in(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    if func in (torch.tensor, torch.as_tensor):
        return func.__name__ if kwargs.get("device") is not None else None
    if func is torch.Tensor.cuda:
        return None if kwargs.get("non_blocking") else "cuda"
    if func is torch.Tensor.to and not kwargs.get("non_blocking"):
        device = kwargs.get("device", next((a for a in args[1:] if isinstance(a, (str, torch.device))), None))
        named = device is not None and not _named_host(device)  # "cpu": a copy to the host (`_function_sync`)
        if len(args) > 2 and args[-1] is True and not isinstance(args[1], torch.dtype):  # to(device, dtype, True)
            return None
        return "to(device)" if named else None
    return None


class _Function(TorchFunctionMode):
    def __init__(self, counter: CostCounter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        counter = self.counter
        copy = _copy_in(func, args, kwargs)
        if copy is not None:
            counter.copy_ops[copy] += 1
        name = _function_sync(func, args, kwargs)
        if name is None:
            return func(*args, **kwargs)
        counter.sync_ops[name] += 1
        counter.quiet += 1  # what it dispatches (`_local_scalar_dense`, a `_to_copy` to the CPU) is this one sync
        try:
            return func(*args, **kwargs)
        finally:
            counter.quiet -= 1


class CostCounter:
    """Counts dispatched aten operations (views excluded) and host synchronisations inside a `with` block."""

    def __init__(self) -> None:
        self.op_names: Counter[str] = Counter()
        self.sync_ops: Counter[str] = Counter()
        self.copy_ops: Counter[str] = Counter()
        self.quiet = 0  # >0 inside a sync counted at the Python level: its dispatched operations are not counted again
        self._modes: list[Any] = []

    @property
    def ops(self) -> int:
        return sum(self.op_names.values())

    @property
    def syncs(self) -> int:
        return sum(self.sync_ops.values())

    @property
    def copies_in(self) -> int:
        return sum(self.copy_ops.values())

    def __enter__(self) -> CostCounter:
        self._modes = [_Function(self), _Dispatch(self)]
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        self._modes = []

    def __repr__(self) -> str:
        return f"CostCounter(ops={self.ops}, syncs={self.syncs} {dict(self.sync_ops)}, copies_in={self.copies_in})"


def count(fn: Any, *args: Any, **kwargs: Any) -> tuple[CostCounter, Any]:
    """Run `fn(*args, **kwargs)` under a `CostCounter`; returns (counter, result)."""
    with CostCounter() as counter:
        result = fn(*args, **kwargs)
    return counter, result
