"""Layer selection shared by all controls.

A selection is one selector string or a sequence of them (a union). A selector is one or more terms
joined by `&` (an intersection). A term is

- a kind: `self`, `cross`, `joint`;
- a group: `down`, `mid`, `up` (UNet), `double`, `single` (Flux), `blocks` (SD3 / PixArt);
- a name pattern matched against whole dot-separated parts of the layer name, anywhere in it:
  `transformer_blocks.1` matches `transformer_blocks.1.attn` but never `transformer_blocks.10.attn`;
  `mid_block` matches every layer of the mid block; parts may use shell wildcards (`attentions.*`, `[7-9]`).

Examples: `"cross"`, `"self & mid"`, `["transformer_blocks.7", "transformer_blocks.8"]`,
`"down_blocks.1 & cross"`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from .errors import SelectionError
from .families.base import KINDS, LayerInfo

LayerSpec = str | tuple[str, ...] | None
GROUPS: tuple[str, ...] = ("down", "mid", "up", "double", "single", "blocks")


def validate_layers(layers: object, *, name: str = "layers") -> LayerSpec:
    """Normalise a user's layer selection to None, a string or a tuple of strings, or raise."""
    if layers is None:
        return None
    if isinstance(layers, str):
        _parse_selector(layers, name)
        return layers
    if isinstance(layers, Sequence) and not isinstance(layers, (bytes, bytearray)):
        items = tuple(layers)
        if not items:
            raise SelectionError(f"{name} is empty; give a selector such as 'cross' or a layer name, or None for the default")
        for item in items:
            if not isinstance(item, str):
                raise SelectionError(f"{name} must hold strings, got {item!r} in {layers!r}")
            _parse_selector(item, name)
        return items
    raise SelectionError(f"{name} must be None, a selector string or a sequence of them, got {layers!r}")


def _parse_selector(selector: str, name: str) -> tuple[str, ...]:
    terms = tuple(term.strip() for term in selector.split("&"))
    if not all(terms):
        raise SelectionError(f"{name}: empty term in selector {selector!r}; terms are joined by '&'")
    for term in terms:
        if any(c.isspace() for c in term):
            raise SelectionError(f"{name}: selector term {term!r} contains spaces; join terms with '&'")
    return terms


def _term_matches(term: str, layer: LayerInfo) -> bool:
    if term in KINDS:
        return layer.kind == term
    if term in GROUPS:
        return layer.group == term
    pattern = term.split(".")
    parts = layer.parts
    width = len(pattern)
    for offset in range(len(parts) - width + 1):
        if all(fnmatch.fnmatchcase(parts[offset + i], pattern[i]) for i in range(width)):
            return True
    return False


def select_layers(
    layers: tuple[LayerInfo, ...], selection: LayerSpec, *, default: LayerSpec, owner: str
) -> tuple[LayerInfo, ...]:
    """Resolve `selection` (or `default` when it is None) against `layers`, keeping model order.

    Every selector must match at least one layer; the error lists the layers there are.
    """
    spec = default if selection is None else selection
    if spec is None:
        return layers
    selectors = (spec,) if isinstance(spec, str) else tuple(spec)
    chosen: set[int] = set()
    for selector in selectors:
        terms = _parse_selector(selector, owner)
        matched = [layer.index for layer in layers if all(_term_matches(t, layer) for t in terms)]
        if not matched:
            raise SelectionError(
                f"{owner}: layer selector {selector!r} matched no attention layer of this model. "
                f"Kinds: {', '.join(KINDS)}; groups here: {', '.join(sorted({l.group for l in layers}))}; "
                f"layers: {describe_layers(layers)}"
            )
        chosen.update(matched)
    return tuple(layer for layer in layers if layer.index in chosen)


def describe_layers(layers: tuple[LayerInfo, ...], limit: int = 400) -> str:
    """The layers' names and kinds, cut after the last whole entry that fits in `limit` characters."""
    entries = [f"{l.name} ({l.kind})" for l in layers]
    text = ", ".join(entries)
    if len(text) <= limit:
        return text
    shown: list[str] = []
    for entry in entries:
        if shown and len(", ".join(shown + [entry])) > limit:
            break
        shown.append(entry)
    return ", ".join(shown) + f", ... ({len(layers)} layers in all)"
