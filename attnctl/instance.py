"""Instance-level method wrapping that can always be undone (no diffusers class is ever patched).

`wrap_method(obj, name, make)` sets `obj.<name>` as an instance attribute to `make(original)`. `unwrap`
puts back exactly what was there. If something was stacked on top of the wrapper in the meantime
(accelerate's offload hooks keep the previous forward as `_old_forward`), the stack is mended in place;
a wrapper that cannot be taken out is switched to pass-through instead.

On an object that is not an `nn.Module` (the pipeline, its scheduler, image or video processor) the wrapper is a
`MethodWrapper`, whose deep copies and pickles are what was there before the wrap: a copy of a wrapped scheduler is a
stock scheduler of its own, not one whose `step` steps the original. Module methods (`forward`) keep plain function
wrappers, which dynamo traces; a module with a live handle is not copied anyway (its hooks refuse it). A shallow
`copy.copy` of the object shares its instance attributes, the wrapper included, and cannot be intercepted.
"""

from __future__ import annotations

import copy
import functools
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

_MISSING = object()


@dataclass
class Wrapped:
    obj: Any
    name: str
    previous: Any  # the instance attribute before wrapping, or _MISSING
    original: Callable[..., Any]
    wrapper: Callable[..., Any]
    active: bool = True

    def unwrap(self) -> bool:
        """Restore the attribute; return False when the wrapper could only be switched to pass-through."""
        self.active = False
        current = self.obj.__dict__.get(self.name, _MISSING)
        if current is self.wrapper:
            if self.previous is _MISSING:
                del self.obj.__dict__[self.name]
            else:
                self.obj.__dict__[self.name] = self.previous
            return True
        if self.obj.__dict__.get("_old_forward", _MISSING) is self.wrapper:  # accelerate stacked its hook on ours
            self.obj.__dict__["_old_forward"] = self.original
            return True
        above = _attnctl_wrapper_above(current, self.wrapper)
        if above is not None:  # another handle's wrapper (two pipelines sharing a scheduler): take ours out under it
            above.original, above.previous = self.original, self.previous
            return True
        return current is self.previous  # someone else already put back what was there before: nothing of ours left


class MethodWrapper:
    """attnctl's instance-level wrapper of a method of an object that is not an `nn.Module`: calls `call`; a deep copy
    or a pickle of it (made with the object holding it) is what the attribute was before the wrap, so the copy of a
    wrapped scheduler or image processor is stock and independent of the original and of the handle."""

    __attnctl_wrapper__ = True
    __attnctl_record__: Wrapped

    def __init__(self, call: Callable[..., Any], original: Callable[..., Any]):
        functools.update_wrapper(self, original)  # its name and signature (`inspect.signature` follows __wrapped__)
        self._call = call  # after: update_wrapper copies the attributes of `original`, another wrapper's `_call` too

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._call(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<attnctl wrapper of {self.__module__}.{self.__qualname__}>"

    def __copy__(self) -> MethodWrapper:
        return self  # as a function's copy is the function

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        record = self.__attnctl_record__
        if id(record.obj) not in memo:
            # the object's attributes copied without the object (diffusers' panorama copies `scheduler.__dict__` to put
            # it back per view): the wrapper itself, as the deep copy of a function is the function
            return self
        if record.previous is not _MISSING:
            return copy.deepcopy(record.previous, memo)
        return copy.deepcopy(record.original, memo)  # the class's method, bound to the copy (in `memo`) of record.obj

    def __reduce_ex__(self, protocol: Any) -> Any:
        record = self.__attnctl_record__
        if record.previous is not _MISSING:
            return operator.getitem, ((record.previous,), 0)
        # unpickled before the object's attributes are set: the class's method of the new object, as a bound method
        return getattr, (record.obj, record.name)


def wrap_method(obj: Any, name: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> Wrapped:
    """Wrap `obj.<name>` (looked up as Python would) with `make(original)` at instance level."""
    previous = obj.__dict__.get(name, _MISSING)
    original = getattr(obj, name)
    record: Wrapped

    @functools.wraps(original)  # its signature too (`inspect.signature` follows __wrapped__)
    def below(*args: Any, **kwargs: Any) -> Any:
        return record.original(*args, **kwargs)  # read at each call: an unwrap under this wrapper may change it

    inner = make(below)

    def call(*args: Any, **kwargs: Any) -> Any:
        if not record.active:
            return record.original(*args, **kwargs)
        return inner(*args, **kwargs)

    wrapper: Any = functools.update_wrapper(call, original) if isinstance(obj, torch.nn.Module) else MethodWrapper(call, original)
    wrapper.__attnctl_wrapper__ = True  # lets foreign-patch checks tell attnctl's own wraps from others'
    record = Wrapped(obj, name, previous, original, wrapper)
    wrapper.__attnctl_record__ = record
    obj.__dict__[name] = wrapper
    return record


def _attnctl_wrapper_above(current: Any, wrapper: Any) -> Wrapped | None:
    """The record of the attnctl wrapper stacked directly on `wrapper`, following attnctl wrappers down from
    `current`; None when another library's callable is in between."""
    seen = 0
    while is_attnctl_wrapper(current) and seen < 64:
        record = getattr(current, "__attnctl_record__", None)
        if record is None:
            return None
        if record.original is wrapper:
            return record
        current, seen = record.original, seen + 1
    return None


def is_wrapped_by(obj: Any, name: str, record: Wrapped) -> bool:
    return obj.__dict__.get(name, _MISSING) is record.wrapper


def is_attnctl_wrapper(fn: Any) -> bool:
    return getattr(fn, "__attnctl_wrapper__", False) is True


def describe_callable(fn: Any) -> str:
    """A short name for a callable found where attnctl expected its own (for error messages)."""
    inner = getattr(fn, "func", fn)  # functools.partial (accelerate, diffusers' hook registry)
    name = getattr(inner, "__qualname__", None) or type(inner).__name__
    module = getattr(inner, "__module__", None)
    return f"{module}.{name}" if module else name
