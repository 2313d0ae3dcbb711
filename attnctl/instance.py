"""Instance-level method wrapping that can always be undone (no diffusers class is ever patched).

`wrap_method(obj, name, make)` sets `obj.<name>` as an instance attribute to `make(original)`. `unwrap`
puts back exactly what was there. If something was stacked on top of the wrapper in the meantime
(accelerate's offload hooks keep the previous forward as `_old_forward`), the stack is mended in place;
a wrapper that cannot be taken out is switched to pass-through instead.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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


def wrap_method(obj: Any, name: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> Wrapped:
    """Wrap `obj.<name>` (looked up as Python would) with `make(original)` at instance level."""
    previous = obj.__dict__.get(name, _MISSING)
    original = getattr(obj, name)
    record: Wrapped

    @functools.wraps(original)  # its signature too (`inspect.signature` follows __wrapped__)
    def below(*args: Any, **kwargs: Any) -> Any:
        return record.original(*args, **kwargs)  # read at each call: an unwrap under this wrapper may change it

    inner = make(below)

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not record.active:
            return record.original(*args, **kwargs)
        return inner(*args, **kwargs)

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
