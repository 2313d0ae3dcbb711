"""Shared helpers for the tests: running tiny pipelines deterministically, small probe controls."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from attnctl.control import Bound, Control
from attnctl.testing import CALL_DEFAULTS

PROMPTS = ["a photo of a cat", "a red car on the street"]

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(filename: str, module_name: str, *, register: bool = False) -> ModuleType:
    """A fresh module of `benchmarks/<filename>` (benchmarks/ is not a package). With `register`, it is also put in
    `sys.modules` under `module_name` before it runs (dataclasses in the module look their module up there); the
    caller removes it when it must."""
    spec = importlib.util.spec_from_file_location(module_name, BENCHMARKS / filename)
    module = importlib.util.module_from_spec(spec)
    if register:
        sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


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


def tiny_inpainting(base: Any) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """An inpainting pipeline on tiny-sd's components with a 9-channel UNet (latent 4, mask 1, masked image 4; random
    weights from seed 0), and a 32 x 32 image and mask (a centred square) for its calls."""
    from diffusers import StableDiffusionInpaintPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config({**base.unet.config, "in_channels": 9})
    pipe = StableDiffusionInpaintPipeline(**{**base.components, "unet": unet})
    pipe.set_progress_bar_config(disable=True)
    image, mask = torch.rand(1, 3, 32, 32), torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    return pipe, image, mask


def tiny_sdxl_conditioned(base: Any, kind: str) -> Any:
    """An SDXL pipeline conditioned by an image on tiny-sdxl's components: `"controlnet"`, a
    `StableDiffusionXLControlNetPipeline` with a ControlNet made from its UNet (`ControlNetModel.from_unet`), or
    `"adapter"`, a `StableDiffusionXLAdapterPipeline` with a tiny T2I-Adapter (random weights from seed 0). Call it with
    `image=` a (1, 3, 32, 32) tensor in [0, 1]."""
    from diffusers import (
        ControlNetModel,
        StableDiffusionXLAdapterPipeline,
        StableDiffusionXLControlNetPipeline,
        T2IAdapter,
    )

    components = {k: v for k, v in base.components.items() if k not in ("image_encoder", "feature_extractor")}
    torch.manual_seed(0)
    if kind == "controlnet":
        controlnet = ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=(4, 8)).eval()
        pipe = StableDiffusionXLControlNetPipeline(**components, controlnet=controlnet)
    else:
        adapter = T2IAdapter(in_channels=3, channels=[8, 16], num_res_blocks=1, downscale_factor=4, adapter_type="full_adapter_xl")
        pipe = StableDiffusionXLAdapterPipeline(**components, adapter=adapter.eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe


class KernelLaunches:
    """Which Triton kernels each call of the `triton` backend launched: `Launch.run` (every launcher's way into a
    kernel) is wrapped, and forward pre-hooks on the attention modules name the layer in progress. `calls` holds
    (layer, spec features, the kernel `triton_backend.kernel_for` names for them, kernels launched) per call."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, denoiser: torch.nn.Module):
        from attnctl.kernels import BACKENDS, triton_attention, triton_backend

        self.calls: list[tuple[str | None, tuple[str, ...], str | None, list[str]]] = []
        self._layer: str | None = None
        self._launched: list[str] | None = None
        run, backend = triton_attention.Launch.run, BACKENDS["triton"]

        def launch(launch_self: Any) -> None:
            if self._launched is not None:
                self._launched.append(launch_self.name)
            run(launch_self)

        def attention(q, k, v, spec):
            self._launched = launched = []
            try:
                return backend.fn(q, k, v, spec)
            finally:
                self._launched = None
                features = spec.features()
                self.calls.append((self._layer, features, triton_backend.kernel_for(features), launched))

        monkeypatch.setattr(triton_attention.Launch, "run", launch)
        monkeypatch.setitem(BACKENDS, "triton", dataclasses.replace(backend, fn=attention))
        self._hooks = [module.register_forward_pre_hook(lambda m, a, name=name: setattr(self, "_layer", name))
                       for name, module in denoiser.named_modules() if hasattr(module, "processor")]

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()

    def check(self, kernels_expected: set[str]) -> None:
        """Every call launched the kernel its features name (none for a plain call); together, `kernels_expected`."""
        assert self.calls, "no call reached the triton backend"
        for layer, features, kernel, launched in self.calls:
            assert launched == ([kernel] if kernel else []), (layer, features, launched)
        assert {kernel for *_, kernel, _ in self.calls if kernel} == kernels_expected
