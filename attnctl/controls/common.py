"""What the controls share (guidance, caches, regions, maps, reweighting, token reduction).

- `RowIndex`: batch-row positions as index tensors, made once per (positions, device) and kept by a bound
  control, so that no attention call pays a host-to-device copy (or a sync) to pick its rows.
- `select_kinds`, `text_layers`: layer selections filtered by kind, and the default text layers
  (cross-attention on UNet / PixArt, joint attention on SD3 / Flux).
- `image_size`, `output_key`, `publish`: the generated image's size, and the `handle.outputs` keys.
- `write_atomically`: files the controls save (heatmaps, layouts, masks) go through a temporary name and a rename.

The hook chain (`restricted_rows`, `restricted_tokens`, `backend_op`) is in `attnctl.processors.chain`; what
a spec means (`spec_rows`, `spec_queries`, `spec_tokens`, `spans_range`, ...) in `attnctl.kernels.semantics`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..denoiser_call import host_tensor
from ..errors import ConfigError, SelectionError
from ..selection import describe_layers

if TYPE_CHECKING:
    from ..control import BindContext, Control
    from ..families.base import LayerInfo, ModelAdapter

TEXT_KINDS: tuple[str, ...] = ("cross", "joint")


# -- rows ---------------------------------------------------------------------------------------------------------
class RowIndex:
    """Index tensors of batch-row positions, cached per (positions, device).

    `index(positions, device)` returns the same int64 tensor for the same positions and device, so picking
    rows in an attention layer costs no host-to-device copy after the first call. A bound control keeps one
    and clears it at `finish()`; the tensors themselves come from a small process-wide table (positions and
    device are all they depend on), so a later pipeline call copies nothing either.
    """

    def __init__(self) -> None:
        self._tensors: dict[tuple[tuple[int, ...], torch.device], torch.Tensor] = {}

    def __call__(self, positions: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
        device = torch.device("cpu") if device is None else torch.device(device)
        key = (tuple(positions), device)
        found = self._tensors.get(key)
        if found is None:
            found = self._tensors[key] = host_tensor(key[0], torch.long, device)
        return found

    def clear(self) -> None:
        self._tensors.clear()


def text_layers(adapter: ModelAdapter) -> str:
    """The default layers of controls that act on text attention: cross- or joint attention, as the family has."""
    return adapter.text_attention


def keep_kinds(layers: tuple[LayerInfo, ...], kinds: tuple[str, ...], owner: str, what: str, selection: Any) -> tuple[LayerInfo, ...]:
    """The layers of `kinds` among `layers`; raises SelectionError when none is left."""
    kept = tuple(layer for layer in layers if layer.kind in kinds)
    if not kept:
        raise SelectionError(
            f"{owner}: the layer selection {selection!r} holds no {what} layer ({owner} acts on {', '.join(kinds)} "
            f"attention); it selected {describe_layers(layers)}"
        )
    return kept


def select_kinds(control: Control, adapter: ModelAdapter, kinds: tuple[str, ...], what: str) -> tuple[LayerInfo, ...]:
    """`control`'s selection (its `layers`, or its default) restricted to the layers of `kinds`."""
    from ..control import Control

    layers = Control.select(control, adapter)
    selection = getattr(control, "layers", None) or control.default_layers(adapter)
    return keep_kinds(layers, kinds, type(control).__name__, what, selection)


# -- outputs ------------------------------------------------------------------------------------------------------
def image_size(context: BindContext) -> tuple[int, int]:
    """The generated image's (height, width): the latent grid times the pipeline's VAE scale factor (8 when the
    pipeline does not say; video pipelines say `vae_scale_factor_spatial`)."""
    factor = getattr(context.pipeline, "vae_scale_factor", None)
    if factor is None:
        factor = getattr(context.pipeline, "vae_scale_factor_spatial", None)
    if not isinstance(factor, int) or isinstance(factor, bool) or factor <= 0:
        factor = 8
    h, w = context.canvas.latent_hw
    return (h * factor, w * factor)


def output_key(value: Any, owner: str) -> str:
    """Validate the `key` field of a control that publishes into `handle.outputs`."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{owner}.key must be a non-empty string (where the result goes in handle.outputs), got {value!r}")
    return value


def publish(context: BindContext, key: str, value: Any) -> None:
    """Put `value` at `handle.outputs[key]` for this call (`apply` refused two controls with one key)."""
    context.outputs[key] = value


def write_atomically(path: str | os.PathLike, write: Callable[[str], Any]) -> str:
    """`write(temporary path)`, then rename it to `path`: a failed or interrupted save never leaves a half-written
    file at `path` (nor the temporary). PIL callers pass `format=` (the temporary name has no image extension)."""
    path = os.fspath(path)
    folder, name = os.path.split(path)
    if not os.path.isdir(folder or "."):
        raise ConfigError(f"cannot write {path!r}: the folder {folder!r} does not exist; create it first")
    temp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
    try:
        write(temp)
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.remove(temp)
        raise
    return path
