"""Small validators for control configs: messages name the bad value and what is allowed."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from .errors import ConfigError


def set_field(obj: Any, name: str, value: Any) -> None:
    """Normalise a field of a frozen dataclass in `__post_init__`."""
    object.__setattr__(obj, name, value)


#: The largest float32: a value above it is infinite in the attention math (float32 or lower).
FLOAT32_MAX = 3.4028234663852886e38
#: Seeds go to `torch.Generator.manual_seed`, which takes at most 2**64 - 1.
SEED_MAX = 2**64 - 1


def plain_scalar(value: Any) -> Any:
    """numpy scalars and 0-d torch tensors as Python numbers (bools stay bools, so they are refused)."""
    if type(value).__module__ == "numpy" or (type(value).__module__.startswith("torch") and getattr(value, "ndim", None) == 0):
        item = getattr(value, "item", None)
        if callable(item) and getattr(value, "ndim", 0) == 0:
            return item()
    return value


def number(value: Any, name: str, *, minimum: float | None = None, maximum: float | None = None,
           exclusive_minimum: bool = False, allow_inf: bool = False) -> float:
    """A real number (not bool; numpy scalars and 0-d tensors included), finite unless `allow_inf` (finite means within
    float32's range: larger values are infinite in the attention math), within the given bounds."""
    value = plain_scalar(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    try:
        value = float(value)
    except OverflowError:
        raise ConfigError(f"{name} must be a finite number (at most {FLOAT32_MAX:.4g} in magnitude), got {value!r}") from None
    if math.isnan(value) or (math.isinf(value) and not allow_inf):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if not allow_inf and abs(value) > FLOAT32_MAX:
        raise ConfigError(f"{name} must be at most {FLOAT32_MAX:.4g} in magnitude (float32's largest value), got {value!r}")
    if minimum is not None and (value < minimum or (exclusive_minimum and value == minimum)):
        raise ConfigError(f"{name} must be {'>' if exclusive_minimum else '>='} {minimum:g}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name} must be <= {maximum:g}, got {value!r}")
    return value


def integer(value: Any, name: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """An integer (not bool; numpy integers and 0-d integer tensors included) within the given bounds."""
    value = plain_scalar(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name} must be <= {maximum}, got {value!r}")
    return int(value)


def seed(value: Any, name: str) -> int:
    """A generator seed: an integer in [0, 2**64 - 1] (what `torch.Generator.manual_seed` takes)."""
    return integer(value, name, minimum=0, maximum=SEED_MAX)


def same_float32(value: Any, default: Any) -> bool:
    """Whether a number equals a float default once both are rounded to float32: `np.float32(0.3)` (normalised to
    0.30000001192092896) is the default 0.3 as the user wrote it, not a setting away from it."""
    value = plain_scalar(value)
    if not isinstance(default, float) or isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if not all(math.isfinite(x) and abs(x) <= FLOAT32_MAX for x in (float(value), default)):
        return False
    return float(np.float32(value)) == float(np.float32(default))


def refuse_unused(control: Any, name: str, why: str) -> None:
    """Refuse a field of a dataclass control set away from its default where it changes nothing (`why`: the setting
    that leaves it unread, and what would read it), rather than accept it silently. Call after normalising. A float
    equal to the default at float32 precision (a numpy float32 scalar of it) is the default, and is set to it."""
    default = next(f.default for f in dataclasses.fields(control) if f.name == name)
    value = getattr(control, name)
    if value == default:
        return
    if not same_float32(value, default):
        raise ConfigError(f"{type(control).__name__}.{name}={value!r} does nothing {why}; leave it at its default ({default!r})")
    set_field(control, name, default)


def choice(value: Any, name: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    return value
