"""Small validators for control configs: messages name the bad value and what is allowed."""

from __future__ import annotations

import math
from typing import Any

from .errors import ConfigError


def set_field(obj: Any, name: str, value: Any) -> None:
    """Normalise a field of a frozen dataclass in `__post_init__`."""
    object.__setattr__(obj, name, value)


def number(value: Any, name: str, *, minimum: float | None = None, maximum: float | None = None,
           exclusive_minimum: bool = False, allow_inf: bool = False) -> float:
    """A real number (not bool), finite unless `allow_inf`, within the given bounds."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if math.isnan(value) or (math.isinf(value) and not allow_inf):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if minimum is not None and (value < minimum or (exclusive_minimum and value == minimum)):
        raise ConfigError(f"{name} must be {'>' if exclusive_minimum else '>='} {minimum:g}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name} must be <= {maximum:g}, got {value!r}")
    return value


def integer(value: Any, name: str, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value!r}")
    return value


def choice(value: Any, name: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    return value
