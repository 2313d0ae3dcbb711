"""Helpers for the cache tests: a control that records every attention call, explicit-softmax references."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from attnctl.control import Bound, Control
from attnctl.controls.fastattn import FastAttnPlan, model_identity
from attnctl.processors.edit import Edit, LayerHook


@dataclass(frozen=True)
class Capture(Control, type_name="test-capture"):
    """Records (layer, step, rows, q, k, v, out, window) of every attention call on its layers, changing nothing.

    Put it first in the list of controls: its hook is then the outermost, so it sees q, k, v as they come and the
    output the other controls' hooks produce.
    """

    layers: Any = None
    log: list = field(default_factory=list, compare=False, hash=False)

    def bind(self, context):
        return _CaptureBound(self, context.layers, (0.0, 1.0))


class _CaptureBound(Bound):
    def edit(self, layer, frame):
        return Edit(hooks=(_CaptureHook(self.control.log, layer),))


class _CaptureHook(LayerHook):
    def __init__(self, log, layer):
        self.log, self.layer = log, layer

    def attend(self, call, q, k, v, spec, compute):
        out, lse = compute(q, k, v, spec)
        self.log.append((self.layer.name, call.step.index, call.rows, q.clone(), k.clone(), v.clone(), out.clone(), spec.window))
        return out, lse


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v in float64, with disallowed pairs removed."""
    logits = (q.double() @ k.double().transpose(-1, -2)) / q.shape[-1] ** 0.5
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    return (torch.softmax(logits, dim=-1) @ v.double()).to(q.dtype)


def band_allowed(n: int, w: int) -> torch.Tensor:
    i = torch.arange(n)
    return (i[:, None] - i[None, :]).abs() <= w


def grid_allowed(h: int, w: int, rh: int, rw: int, text: int = 0, text_first: bool = False) -> torch.Tensor:
    """A 2-D neighbourhood over an h x w image grid; `text` tokens (before or after the image) see and are seen by all."""
    n = h * w
    total = n + text
    allowed = torch.ones(total, total, dtype=torch.bool)
    offset = text if text_first else 0
    for a in range(n):
        for b in range(n):
            ra, ca, rb, cb = a // w, a % w, b // w, b % w
            allowed[offset + a, offset + b] = abs(ra - rb) <= rh and abs(ca - cb) <= rw
    return allowed


def make_plan(pipe: Any, steps: int, methods: dict[str, list[str]], window: Any = 8, resolution=(32, 32),
              frames: int = 1) -> FastAttnPlan:
    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    model, source, fingerprint = model_identity(denoiser)
    return FastAttnPlan(model=model, fingerprint=fingerprint, steps=steps, resolution=resolution, window=window,
                        threshold=0.0, methods=tuple((k, tuple(v)) for k, v in methods.items()), source=source,
                        frames=frames)
