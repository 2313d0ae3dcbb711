"""Shared helpers for the tests: running tiny pipelines deterministically, small probe controls."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from attnctl.control import Bound, Control
from attnctl.testing import CALL_DEFAULTS

PROMPTS = ["a photo of a cat", "a red car on the street"]


def generate(pipe: Any, name: str, prompt: Any = PROMPTS, steps: int = 2, guidance: float = 5.0, seed: int = 0, **kwargs: Any) -> torch.Tensor:
    """Latents of a short generation; deterministic for a fixed seed."""
    options = dict(CALL_DEFAULTS[name])
    options.update(kwargs)
    generator = torch.Generator().manual_seed(seed)
    out = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, output_type="latent", generator=generator, **options)
    return out.images


@dataclass(frozen=True)
class Probe(Control, type_name="test-probe"):
    """Records which layers ran, at which step, with which rows; changes nothing unless `edit_factory` says."""

    layers: Any = None
    steps: tuple[float, float] = (0.0, 1.0)
    log: list = field(default_factory=list, compare=False, hash=False)

    def bind(self, context):
        return _ProbeBound(self, context.layers, self.steps, context)


class _ProbeBound(Bound):
    def __init__(self, control, layers, steps, context):
        super().__init__(control, layers, steps)
        self.context = context
        control.log.append(("bind", context.steps, context.cfg, context.prompt_rows))

    def edit(self, layer, frame):
        rows = tuple((r.branch, r.prompt, r.tag) for r in frame.rows.rows)
        self.control.log.append((layer.name, frame.step.index, frame.step.count, rows, frame.number))
        return None


@dataclass(frozen=True)
class WordProbe(Control, type_name="test-word-probe"):
    """Resolves words at bind time for every prompt row (cond and, if asked, uncond) and records them."""

    words: tuple = ()
    uncond: bool = False
    log: list = field(default_factory=list, compare=False, hash=False)
    needs_words = True

    def bind(self, context):
        tokens = context.require_tokens("WordProbe")
        for row in range(context.prompt_rows):
            self.log.append(("cond", row, {w: tokens.positions(w, row) for w in self.words}))
        if self.uncond:
            negative = context.require_tokens("WordProbe", "uncond")
            for row in range(context.prompt_rows):
                self.log.append(("uncond", row, {w: negative.positions(w, row) for w in self.words}))
        self.log.append(("text_len", context.canvas.text_len))
        return Bound(self, context.layers, (0.0, 1.0))
