"""Wrapped generation: load a model, attach controls, generate one image per seed, keep the parameters.

    import attnctl

    model = attnctl.Model.load("tiny-sd")                  # embedded name, local folder or hub id
    result = model.generate("a photo of a cat", seed=3, steps=20, controls=[...])
    result.image                                           # PIL image
    result.params                                          # what made it (prompt, seed, steps, size, controls...)
    result.save("cat.png")                                 # PNG with the parameters in its text chunk (atomic)

    # or, on a pipeline you already have (controls attached for this call only):
    result = attnctl.generate(pipe, "a photo of a cat", seed=3, controls=[...])

One image per pipeline call (batch 1) with its own `torch.Generator` seeded from `seed`, on the CPU, so
that an image depends only on its own parameters: not on what else is rendered, in which order, on how
many processes. `Model` keeps the controls of the last call attached while the next call uses the very
same control objects (a job of many seeds pays `attnctl.apply` once); `model.release()` (or leaving a
`with model:` block) detaches them. Without controls the pipeline runs untouched (stock, bitwise).
"""

from __future__ import annotations

import difflib
import importlib.util
import inspect
import os
import reprlib
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._version import __version__
from ..control import Control
from ..errors import AttnctlError, ConfigError
from ..instance import describe_callable
from ..validation import SEED_MAX, plain_scalar
from .loading import TOY_MODELS
from .outputs import sampler_fields, save_png

#: Frames per second of the GIF of an interpolation sequence (`AttentionInterpolation(to=...)`).
SEQUENCE_FPS = 2
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def default_model() -> str:
    """The embedded model used when none is named: `toy-shapes` when this build ships it, else `tiny-sd`."""
    return "toy-shapes" if importlib.util.find_spec("attnctl.toy") is not None else "tiny-sd"


def example_pipeline(model: str | None, device: str, steps: int | None, quick: bool) -> tuple[str, Any, dict[str, Any]]:
    """How the examples start: the model's name (`default_model()` when None), its pipeline on `device`, and the call
    options (an embedded model's defaults; `steps` inference steps when given, 2 for a `quick` smoke run)."""
    from .loading import load_pipeline

    model = model or default_model()
    pipe = load_pipeline(model, device=device)
    options = embedded_call_defaults(model)
    if steps or quick:
        options["num_inference_steps"] = steps or 2
    return model, pipe, options


def embedded_call_defaults(name: str | None) -> dict[str, Any]:
    """Call arguments an embedded model needs (the tiny fixtures: 32x32, no PixArt resolution binning...)."""
    from ..testing import CALL_DEFAULTS

    if name in CALL_DEFAULTS:
        return dict(CALL_DEFAULTS[name])
    if name in TOY_MODELS:
        try:
            from .. import toy
        except ImportError:  # pragma: no cover - depends on the build
            return {}
        return dict(getattr(toy, "CALL_DEFAULTS", {}))
    return {}


def embedded_pipeline_defaults(pipe: Any) -> dict[str, Any]:
    """`embedded_call_defaults` of the embedded model `pipe` is (the toy model, by its folder; a tiny fixture, by the
    name `make_tiny_pipeline` records in `pipe.name_or_path`); nothing for any other pipeline."""
    from ..testing import CALL_DEFAULTS

    name = getattr(pipe, "name_or_path", None)
    if not isinstance(name, str) or not name:
        return {}
    if name in CALL_DEFAULTS:
        return embedded_call_defaults(name)
    try:
        from .. import toy

        for model in toy.MODEL_NAMES:
            if Path(name).resolve() == toy.toy_shapes_path(model).resolve():
                return embedded_call_defaults(model)
    except (ImportError, FileNotFoundError, OSError):  # pragma: no cover - depends on the build
        return {}
    return {}


def resolve_device(device: str | None) -> torch.device:
    """`auto` (or None): CUDA when available, else MPS, else CPU; anything else as torch reads it."""
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ConfigError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {device!r}") from error
    from .loading import check_device_available

    check_device_available(target)
    return target


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """`auto` (or None): float32 on a CPU; bfloat16 on a GPU that has it, else float16."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "mps":
            return torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be 'auto' or one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class Generation:
    """One generated image, the parameters that made it, and what the controls published (`outputs`).

    Video pipelines (Wan): `frames` holds the video's frames (PIL images) and `image` is its first frame (the
    poster the PNG holds); `save_video` writes the frames as an MP4 (a .mp4 path; needs imageio-ffmpeg) or an
    animated GIF."""

    image: Any
    params: dict[str, Any]
    outputs: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    frames: list[Any] | None = None

    def save_video(self, path: str, *, fsync: bool = False) -> int:
        """Write the frames with `params` in the file's comment (atomically): an MP4 for a .mp4 path (needs
        imageio-ffmpeg), else an animated GIF; returns the bytes written."""
        from .outputs import save_video

        if self.frames is None:
            raise ConfigError("this generation is an image, not a video: save it with save()")
        path = _checked_path(path, (".mp4", ".gif"), "Generation.save_video writes an MP4 or an animated GIF")
        return save_video(self.frames, path, self.params, fsync=fsync)

    def save(self, path: str, *, fsync: bool = False) -> int:
        """Write the image as PNG with `params` in its text chunk (atomically); returns the bytes written. The path
        ends in .png and its folder exists (ConfigError otherwise, rather than PNG bytes under another extension or an
        OSError naming the temporary file)."""
        path = _checked_path(path, (".png",), "Generation.save writes a PNG with its parameters")
        return save_png(self.image, path, self.params, fsync=fsync)


class Model:
    """A pipeline ready to generate with attnctl controls, one image per seed."""

    def __init__(self, pipe: Any, name: str | None = None, *, backend: str = "auto",
                 call_defaults: Mapping[str, Any] | None = None):
        from ..kernels import validate_backend

        if not callable(pipe):
            raise ConfigError(f"Model needs a diffusers pipeline (or use Model.load(name)), got {pipe!r}")
        self.pipe = pipe
        self.name = name or _pipeline_name(pipe)
        self.backend = validate_backend(backend)
        self.call_defaults = dict(embedded_call_defaults(name) if call_defaults is None else call_defaults)
        self._parameters = inspect.signature(pipe.__call__).parameters
        self._handle: Any = None
        self._attached: tuple[Control, ...] = ()

    @classmethod
    def load(cls, name_or_path: str | None = None, *, device: str | torch.device | None = "auto",
             dtype: str | torch.dtype | None = "auto", backend: str = "auto", cpu_offload: bool = False,
             **kwargs: Any) -> Model:
        """Load an embedded model (`default_model()` when None), a local diffusers folder or a hub id
        (safetensors only, no remote code) with `attnctl.load_pipeline`, on `device` in `dtype`."""
        from .loading import embedded_models, load_pipeline, refuse_embedded_options

        name = name_or_path or default_model()
        refuse_embedded_options(name, {key: value for key, value in kwargs.items() if key != "seed"}, "Model.load",
                                "device, dtype, backend, cpu_offload and seed")
        target = device if isinstance(device, torch.device) else resolve_device(device)
        torch_dtype = resolve_dtype(dtype, target)
        embedded = name in embedded_models()
        pipe = load_pipeline(name, torch_dtype=None if embedded else torch_dtype, **kwargs)
        if embedded and pipe.dtype != torch_dtype:  # cast only when needed (diffusers warns about casts)
            pipe = pipe.to(dtype=torch_dtype)
        if not cpu_offload:
            pipe = pipe.to(target)
        else:
            pipe.enable_model_cpu_offload(device=target)
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe, name, backend=backend)

    # -- introspection --------------------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        denoiser = getattr(self.pipe, "unet", None) or getattr(self.pipe, "transformer", None)
        if isinstance(denoiser, torch.nn.Module):  # cheaper than pipe.dtype, which walks every component
            parameter = next(denoiser.parameters(), None)
            if parameter is not None:
                return parameter.dtype
        return getattr(self.pipe, "dtype", torch.float32)

    @property
    def device(self) -> torch.device:
        return getattr(self.pipe, "device", torch.device("cpu"))

    def accepts(self, argument: str) -> bool:
        """Whether the pipeline call names this argument (diffusers swallows unknown ones into `**kwargs`)."""
        parameter = self._parameters.get(argument)
        return parameter is not None and parameter.kind not in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL)

    def default(self, argument: str) -> Any:
        parameter = self._parameters.get(argument)
        return None if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default

    def check(self, controls: Control | Iterable[Control] = (), options: Mapping[str, Any] | None = None,
              negative_prompt: str | None = None) -> None:
        """Raise if these controls cannot act on this model (the checks of `attnctl.apply`, nothing left
        installed) or the pipeline call does not take these options."""
        from ..handle import apply

        unknown = [key for key in (options or {}) if not self.accepts(key)]
        if negative_prompt is not None and not self.accepts("negative_prompt"):
            unknown.append("negative_prompt")
        if unknown:
            raise self._unknown_options(unknown)
        controls = _as_controls(controls)
        if controls and not self._is_attached(controls):
            self.release()
            apply(self.pipe, controls, backend=self.backend).remove()

    def resolve(self, prompt: str, *, controls: Control | Iterable[Control] = (), negative_prompt: str | None = None,
                steps: int | None = None, width: int | None = None, height: int | None = None,
                guidance_scale: float | None = None, **options: Any) -> None:
        """Raise what `generate` would raise for these arguments before the first image pixel is computed: the
        call's options (their names, and their values up to the denoiser: a `clip_skip="x"` the prompt encoding
        refuses is a ConfigError naming it), the controls' layers and options (`attnctl.apply`) and their words in
        this prompt (bound at the first denoiser call). Runs the prompt encoding and stops the denoiser before its
        first layer, also without controls; generates nothing and leaves no control attached."""
        controls = _as_controls(controls)
        _check_prompt(prompt)
        self.check(controls, options, negative_prompt)
        kwargs = self._call_kwargs(options, negative_prompt, steps, width, height, guidance_scale)
        _check_seed(0)
        from ..handle import denoiser_of

        _, denoiser = denoiser_of(self.pipe)

        def stop(*_: Any) -> None:
            raise _Resolved

        layout, prompts = call_rows(prompt, controls)
        if layout == "rows":
            self._refuse_video_rows()
        row_kwargs = row_arguments(kwargs, prompts, "Model.generate") if len(prompts) > 1 else kwargs
        self.release()
        hooks = [child.register_forward_pre_hook(stop) for child in denoiser.children()]
        try:
            handle = self._attach(controls)  # None without controls: the stock call still checks the options' values
            # the rows generate would call (a sequence, edits, a reference row): the controls bind as they will there
            rows = prompts if len(prompts) > 1 else prompt
            generators = [torch.Generator(device="cpu").manual_seed(0) for _ in prompts]
            try:
                self._call(options, prompt=rows, generator=generators if len(prompts) > 1 else generators[0],
                           output_type="pil", **row_kwargs)
            except _Resolved:
                pass
            del handle
        finally:
            for hook in hooks:
                hook.remove()
            self.release()

    # -- generation -----------------------------------------------------------------------------------------------
    def generate(self, prompt: str, *, seed: int = 0, controls: Control | Iterable[Control] = (), negative_prompt: str | None = None,
                 steps: int | None = None, width: int | None = None, height: int | None = None,
                 guidance_scale: float | None = None, **options: Any) -> Generation:
        """Generate one image. Unset settings take the pipeline's defaults (and an embedded model's call
        defaults); `options` are further keyword arguments of the pipeline call."""
        controls = _as_controls(controls)
        _check_prompt(prompt)
        seed = _check_seed(seed)
        kwargs = self._call_kwargs(options, negative_prompt, steps, width, height, guidance_scale)
        layout, prompts = call_rows(prompt, controls)
        if layout == "rows":
            self._refuse_video_rows()
        row_kwargs = row_arguments(kwargs, prompts, "Model.generate") if len(prompts) > 1 else kwargs
        handle = self._attach(controls)
        try:
            return self._render(prompt, seed, controls, kwargs, layout, prompts, handle, row_kwargs, options)
        except AttnctlError:  # bad input found while binding (a word not in the prompt, ...): the pipeline is stock again
            self.release()
            raise

    def _render(self, prompt: str, seed: int, controls: tuple[Control, ...], kwargs: dict[str, Any], layout: str,
                prompts: list[str], handle: Any, row_kwargs: dict[str, Any], options: Mapping[str, Any]) -> Generation:
        """`kwargs`: the call's arguments as given (recorded in the parameters); `row_kwargs`: as the call of `prompts` takes
        them (`row_arguments`); `options`: the caller's further options (named by an error of the call)."""
        if layout == "rows":  # AID's sequence or P2P's [prompt, *edits]: frames = the images, image = their strip
            return self._rows(prompts, prompt, seed, controls, kwargs, handle, row_kwargs, options)
        if layout == "reference":  # row 0 carries the reference (with the same prompt, as reference-only); row 1 is kept
            return self._referenced(prompts, prompt, seed, controls, kwargs, handle, row_kwargs, options)
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        start = time.perf_counter()
        result = self._call(options, prompt=prompt, generator=generator, output_type="pil", **kwargs)
        seconds = time.perf_counter() - start
        frames = None
        if hasattr(result, "frames"):  # a video pipeline: per video, its frames as PIL images
            frames = list(result.frames[0])
            image = frames[0]
        else:
            image = result.images[0]
        outputs = handle.outputs if handle is not None else {}
        params = self._params(prompt, seed, controls, kwargs, image)
        if frames is not None:
            from .outputs import VIDEO_FPS

            params.update(frames=len(frames), fps=VIDEO_FPS)
        return Generation(image, params, outputs, seconds, frames)

    def _rows(self, prompts: list[Any], prompt: str, seed: int, controls: tuple[Control, ...], kwargs: dict[str, Any],
              handle: Any, row_kwargs: dict[str, Any], options: Mapping[str, Any]) -> Generation:
        """One call with one row per prompt, each with a CPU generator seeded with `seed`: frames = the images,
        image = their strip."""
        from .outputs import strip

        generators = [torch.Generator(device="cpu").manual_seed(int(seed)) for _ in prompts]
        start = time.perf_counter()
        result = self._call(options, prompt=prompts, generator=generators, output_type="pil", **row_kwargs)
        seconds = time.perf_counter() - start
        frames = list(result.images)  # a video model was refused before the call (_refuse_video_rows)
        image = strip(frames)
        outputs = handle.outputs if handle is not None else {}
        params = self._params(prompt, seed, controls, kwargs, frames[0])  # each image's size, not the strip's
        params.update(frames=len(frames), fps=SEQUENCE_FPS)
        return Generation(image, params, outputs, seconds, frames)

    def _referenced(self, prompts: list[str], prompt: str, seed: int, controls: tuple[Control, ...], kwargs: dict[str, Any],
                    handle: Any, row_kwargs: dict[str, Any], options: Mapping[str, Any]) -> Generation:
        """A ReferenceAttention image: one call of [prompt, prompt] (row 0 carries the reference, with the generation's
        prompt as in reference-only's community pipeline), row 1 from a CPU generator seeded with `seed`; the image is
        row 1's (row 0's is a reconstruction of the reference), and so are the published per-image outputs (attention
        maps); a report of the whole call (TGate's `CacheReport`) counts both rows, as the call ran them."""
        generators = [torch.Generator(device="cpu").manual_seed(int(seed)) for _ in prompts]
        start = time.perf_counter()
        result = self._call(options, prompt=prompts, generator=generators, output_type="pil", **row_kwargs)
        seconds = time.perf_counter() - start
        image = result.images[1]
        outputs = handle.outputs if handle is not None else {}
        for key, value in list(outputs.items()):
            if callable(getattr(value, "select_images", None)):  # per-image outputs: AttentionMapResult
                outputs[key] = value.select_images([1])
        return Generation(image, self._params(prompt, seed, controls, kwargs, image), outputs, seconds)

    def _call(self, options: Mapping[str, Any], **call: Any) -> Any:
        """The pipeline call. A TypeError or ValueError that is not attnctl's (diffusers' TypeError for
        `clip_skip="x"`, its ValueError for a bad `output_type`) is raised as a ConfigError naming the caller's `options`
        and what the pipeline takes for each, with the original as its `__cause__`; without options, and for any
        other error (a device fault, running out of memory: not a value's fault), it is raised as it is."""
        try:
            return self.pipe(**call)
        except (AttnctlError, _Resolved):
            raise
        except (TypeError, ValueError) as error:
            if not options or is_out_of_memory(error):
                raise
            raise self._options_error(options, error) from error

    def _options_error(self, options: Mapping[str, Any], error: Exception) -> ConfigError:
        given = ", ".join(f"{key}={_brief.repr(value)}" for key, value in options.items())
        taken = "; ".join(str(self._parameters[key]) for key in options if key in self._parameters)
        return ConfigError(f"{type(self.pipe).__name__} call with the options {given} failed: {type(error).__name__}: "
                           f"{str(error).strip() or repr(error)}; check these options' values (the pipeline takes "
                           f"{taken})")

    def _refuse_video_rows(self) -> None:
        """An image sequence (interpolation, P2P edits) of a video model is refused before anything runs."""
        from ..families import adapter_for
        from ..handle import denoiser_of

        if adapter_for(denoiser_of(self.pipe)[1]).grid_dims == 3:
            raise ConfigError(f"{type(self.pipe).__name__} makes videos; an interpolation or prompt-to-prompt job renders "
                              "image sequences only (use attnctl.interpolate for interpolation videos)")

    def _unknown_options(self, unknown: list[str]) -> ConfigError:
        """The error for call options the pipeline does not take, with a did-you-mean for near misses ('etaa')."""
        taken = [name for name in self._parameters if self.accepts(name)]
        guesses = [f"{close[0]!r} for {key!r}" for key in unknown if (close := difflib.get_close_matches(key, taken, n=1))]
        hint = f" (did you mean {', '.join(guesses)}?)" if guesses else ""
        return ConfigError(
            f"{type(self.pipe).__name__}.__call__ takes no argument(s) {', '.join(map(repr, unknown))}{hint}; "
            f"it takes: {', '.join(taken)}"
        )

    def _pixel_packing(self) -> int | None:
        """The image side's multiple where the pipeline would otherwise resize a size silently (Flux-like packing:
        `ModelAdapter.latent_packing` x the VAE's factor); None where the pipeline resizes nothing itself."""
        from ..families import adapter_for
        from ..handle import denoiser_of

        packing = adapter_for(denoiser_of(self.pipe)[1]).latent_packing
        factor = getattr(self.pipe, "vae_scale_factor", None)
        if packing == 1 or not isinstance(factor, int) or isinstance(factor, bool) or factor < 1:
            return None
        return packing * factor

    def _call_kwargs(self, options: Mapping[str, Any], negative_prompt: str | None, steps: int | None,
                     width: int | None, height: int | None, guidance_scale: float | None) -> dict[str, Any]:
        """The pipeline call's keyword arguments, validated as the renderer validates a job (ConfigError)."""
        from ..validation import integer, number

        owned = [key for key in ("generator", "output_type", "prompt") if key in options]
        if owned:
            raise ConfigError(f"Model.generate sets {', '.join(owned)} itself (a CPU generator seeded with `seed`, PIL "
                              "images); call the pipeline directly for other outputs")
        if "num_images_per_prompt" in options and plain_scalar(options["num_images_per_prompt"]) != 1:
            raise ConfigError(f"Model.generate makes one image per call, got num_images_per_prompt="
                              f"{options['num_images_per_prompt']!r}; call it once per seed for more images")
        named = {"num_inference_steps": "steps", "negative_prompt": "negative_prompt", "width": "width",
                 "height": "height", "guidance_scale": "guidance_scale"}
        given = {"num_inference_steps": steps, "negative_prompt": negative_prompt, "width": width, "height": height,
                 "guidance_scale": guidance_scale}
        doubled = [key for key in options if key in named and given[key] is not None]
        if doubled:
            raise ConfigError(f"Model.generate: give {', '.join(named[k] + '=' for k in doubled)} instead of "
                              f"{', '.join(doubled)} in the options")
        unknown = [key for key in options if not self.accepts(key)]
        if unknown:
            raise self._unknown_options(unknown)
        not_taken = [named[key] for key, value in given.items() if value is not None and not self.accepts(key)]
        if not_taken:
            raise ConfigError(
                f"{type(self.pipe).__name__}.__call__ takes no {', '.join(name + '=' for name in not_taken)} (an image-to-image pipeline's size "
                f"comes from its image); it takes: {', '.join(name for name in self._parameters if self.accepts(name))}"
            )
        if steps is not None:
            steps = integer(steps, "steps", minimum=1)
        packing = self._pixel_packing()
        for name, value in (("width", width), ("height", height)):
            if value is not None:
                value = integer(value, name, minimum=8)
                if value % 8:
                    raise ConfigError(f"{name} must be a multiple of 8, got {value}")
                if packing is not None and value % packing:
                    raise ConfigError(
                        f"{name} must be a multiple of {packing} for {type(self.pipe).__name__} (it would resize "
                        f"{value} to {value - value % packing} px), got {value}"
                    )
        if guidance_scale is not None:
            guidance_scale = number(guidance_scale, "guidance_scale", minimum=0.0)
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            raise ConfigError(f"negative_prompt must be a string, got {negative_prompt!r}")
        kwargs = {**self.call_defaults, **options}
        for key, value in (("negative_prompt", negative_prompt), ("num_inference_steps", steps), ("width", width),
                           ("height", height), ("guidance_scale", guidance_scale)):
            if value is not None:
                kwargs[key] = value
        return kwargs

    def _params(self, prompt: str, seed: int, controls: tuple[Control, ...], kwargs: dict[str, Any], image: Any
                ) -> dict[str, Any]:
        main = ("negative_prompt", "num_inference_steps", "guidance_scale", "width", "height")
        steps = kwargs.get("num_inference_steps", self.default("num_inference_steps"))
        guidance = kwargs.get("guidance_scale", self.default("guidance_scale"))
        return {
            "prompt": prompt,
            "negative_prompt": kwargs.get("negative_prompt"),
            "seed": int(seed),
            "steps": steps,
            "width": image.width,
            "height": image.height,
            "guidance_scale": float(guidance) if guidance is not None else None,
            "model": self.name,
            "pipeline": type(self.pipe).__name__,
            **sampler_fields(getattr(self.pipe, "scheduler", None)),
            "dtype": dtype_name(self.dtype),
            "controls": [control.to_record() for control in controls],
            "options": {key: _recorded(value) for key, value in sorted(kwargs.items()) if key not in main},
            "backend": self.backend,
            "attnctl": __version__,
        }

    # -- controls -------------------------------------------------------------------------------------------------
    def _is_attached(self, controls: tuple[Control, ...]) -> bool:
        # identity, not equality: controls may hold arrays, and a job reuses its own control objects
        return (self._handle is not None and self._handle.live and len(controls) == len(self._attached)
                and all(a is b for a, b in zip(controls, self._attached)))

    def _attach(self, controls: tuple[Control, ...]) -> Any:
        from ..handle import apply

        if not controls:
            self.release()
            return None
        if not self._is_attached(controls):
            self.release()
            self._handle = apply(self.pipe, controls, backend=self.backend)
            self._attached = controls
        return self._handle

    @property
    def handle(self) -> Any:
        """The live attnctl handle of the last call's controls (None without controls)."""
        return self._handle

    def release(self) -> None:
        """Detach the controls of the last call; the pipeline is stock again."""
        if self._handle is not None:
            self._handle.remove()
        self._handle, self._attached = None, ()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"<attnctl.Model {self.name!r} {type(self.pipe).__name__} on {self.device} ({dtype_name(self.dtype)})>"


def generate(pipe: Any, prompt: str, *, controls: Control | Iterable[Control] = (), seed: int = 0,
             negative_prompt: str | None = None, steps: int | None = None, width: int | None = None,
             height: int | None = None, guidance_scale: float | None = None, backend: str = "auto",
             **options: Any) -> Generation:
    """Generate one image with `controls` attached for this call only (the pipeline is restored after).

    The image depends only on its arguments: batch 1 and a CPU `torch.Generator` seeded with `seed`. On an embedded
    model (`attnctl.load_pipeline("toy-shapes")`, the tiny fixtures) its call defaults apply where not given."""
    with Model(pipe, backend=backend, call_defaults=embedded_pipeline_defaults(pipe)) as model:
        return model.generate(prompt, seed=seed, controls=controls, negative_prompt=negative_prompt, steps=steps,
                              width=width, height=height, guidance_scale=guidance_scale, **options)


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is running out of (GPU) memory: a fault of the size of the work, not of a value."""
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    return (oom is not None and isinstance(error, oom)) or "out of memory" in str(error).lower()


#: How an option's value is shown in an error: briefly (a latents tensor or a long list is not printed whole)
_brief = reprlib.Repr()
_brief.maxstring, _brief.maxother, _brief.maxlist = 80, 80, 8


class _Resolved(Exception):
    """Raised by `Model.resolve` at the denoiser's first layer: the controls are bound, nothing is computed."""


def _checked_path(path: Any, suffixes: tuple[str, ...], what: str) -> str:
    """A save path with one of `suffixes` in an existing folder (ConfigError otherwise, before anything is written)."""
    path = os.fspath(path)
    if not path.lower().endswith(suffixes):
        raise ConfigError(f"{what}; give a path ending in {' or '.join(suffixes)}, got {path!r}")
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        raise ConfigError(f"{what.split(' writes')[0]}: the folder {folder!r} of {path!r} does not exist; create it first")
    return path


def _as_controls(controls: Control | Iterable[Control]) -> tuple[Control, ...]:
    """One control or an iterable of them, as `attnctl.apply` takes them (anything else: ConfigError)."""
    from ..handle import _control_tuple

    return _control_tuple(controls)


def _recorded(value: Any) -> Any:
    """A call option as JSON can hold it in the image's parameters: numpy scalars and 0-d tensors as numbers, lists
    and mappings walked, anything else (a latents tensor, a callback) a description: a record, not replayable."""
    value = plain_scalar(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)):
        return [_recorded(item) for item in value]
    if isinstance(value, Mapping):
        return {str(key): _recorded(item) for key, item in value.items()}
    if isinstance(value, torch.Tensor) or type(value).__module__ == "numpy":
        return f"<{type(value).__name__} {str(value.dtype).removeprefix('torch.')} {tuple(value.shape)}, not saved>"
    if hasattr(value, "size") and hasattr(value, "convert"):
        return f"<PIL image {value.size[0]}x{value.size[1]}, not saved>"
    if callable(value):
        return f"<{describe_callable(value)}, not saved>"
    return f"<{type(value).__name__}, not saved>"


def _check_prompt(prompt: Any) -> None:
    """One image per call: the prompt is one string (diffusers would raise its own ValueError for None or a number,
    and a list would make several images)."""
    if not isinstance(prompt, str):
        raise ConfigError(f"prompt must be one string (one image per call), got {prompt!r}")


def _check_seed(seed: Any) -> int:
    """A seed is an int in [0, SEED_MAX = 2**64 - 1] (what torch.Generator.manual_seed takes without wrapping; job
    files take the same range): floats, bools, negative numbers and larger numbers raise ConfigError rather than being
    truncated or wrapped."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        try:
            import numpy

            if isinstance(seed, numpy.integer):
                seed = int(seed)
        except ImportError:  # pragma: no cover
            pass
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise ConfigError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    return seed


def _interpolation_of(controls: tuple[Control, ...]) -> Any:
    """The AttentionInterpolation among `controls` that names a second prompt (`to`), or None."""
    from ..controls.cross_image.interpolation import AttentionInterpolation

    found = [c for c in controls if isinstance(c, AttentionInterpolation) and c.to is not None]
    if len(found) > 1:
        raise ConfigError("give one AttentionInterpolation with `to` per image (a call renders one sequence)")
    return found[0] if found else None


def _edits_of(controls: tuple[Control, ...]) -> tuple[str, ...] | None:
    """The edited prompts of the PromptToPrompt among `controls` that names them (`edits`), or None."""
    from ..controls.cross_image.p2p import PromptToPrompt

    found = [c for c in controls if isinstance(c, PromptToPrompt) and c.edits is not None]
    if len(found) > 1:
        raise ConfigError("give one PromptToPrompt with `edits` per image (a call renders one base prompt and its edits)")
    return found[0].edits if found else None


#: Each row's own text for a second / third text encoder (Flux: `prompt_2` is the T5 text, the only text its
#: transformer attends to; SDXL: half of the CLIP context; SD3: the T5 tokens)
ROW_TEXTS = ("prompt_2", "prompt_3")
#: Negative prompts: one string is every row's negative, as for a batch of one prompt
NEGATIVES = ("negative_prompt", "negative_prompt_2", "negative_prompt_3")
_ENCODER = {"prompt_2": "second", "prompt_3": "third"}


def row_arguments(kwargs: Mapping[str, Any], prompts: list[str], caller: str) -> dict[str, Any]:
    """The call's keyword arguments for one call of the rows `prompts`. A negative prompt given as one string becomes
    one per row (SD 1.x / 2.x refuse a string beside a list of prompts). `prompt_2` / `prompt_3` as one string becomes
    one per row only where every row has the same prompt (a reference row): where the prompts differ, one string would
    give every row the same text on that encoder (on Flux the edit or the sequence would reach only the pooled vector),
    so it is refused. A list is taken as one string per row. ConfigError, before anything runs, for a string that
    cannot be spread and for a list that is not `len(prompts)` strings."""
    rows = len(prompts)
    differ = len(set(prompts)) > 1
    out = dict(kwargs)
    for key in (*NEGATIVES, *ROW_TEXTS):
        value = out.get(key)
        if isinstance(value, str):
            if key in ROW_TEXTS and differ:
                raise ConfigError(
                    f"{caller}: {key}={value!r} is one string, but the call renders {rows} rows with different prompts "
                    f"{prompts!r}; {key} is each row's text for the pipeline's {_ENCODER[key]} text encoder, so one string "
                    f"would give every row the same text there. Give {key} as a list of {rows} strings, one per row in "
                    f"that order, or leave it out (each row then uses its own prompt)"
                )
            out[key] = [value] * rows
        elif isinstance(value, (list, tuple)):
            if len(value) != rows or not all(isinstance(item, str) for item in value):
                allowed = "one string (every row's) or " if key in NEGATIVES else ""
                raise ConfigError(f"{caller}: {key} must be {allowed}a list of {rows} strings, one per row of {prompts!r}; "
                                  f"got {value!r}")
            out[key] = list(value)
    return out


def call_rows(prompt: str, controls: tuple[Control, ...]) -> tuple[str, list[str]]:
    """How `Model.generate` (and `resolve`, and so `attnctl render`) lays out the one pipeline call of an image:
    ("single", [prompt]); ("rows", prompts) for an AttentionInterpolation with `to` (the sequence from `prompt` to `to`)
    or a PromptToPrompt with `edits` ([prompt, *edits]); ("reference", [prompt, prompt]) for a ReferenceAttention (row 0
    the reference). Raises for controls whose rows one image per call cannot give, and for two controls that would
    each lay out the rows."""
    from ..controls.cross_image.interpolation import sequence_prompts

    sequence = _interpolation_of(controls)
    edits = _edits_of(controls)
    referenced = reference_row_needed(controls)
    chosen = [name for name, given in (("an AttentionInterpolation with `to`", sequence is not None),
                                       ("a PromptToPrompt with `edits`", edits is not None),
                                       ("a ReferenceAttention", referenced)) if given]
    if len(chosen) > 1:
        raise ConfigError(f"{' and '.join(chosen)} each lay out the rows of the image's call (a sequence, the edits, a "
                          "reference row); give one of them")
    if sequence is not None:
        count = len(sequence.points) if sequence.points is not None else sequence.n
        return "rows", sequence_prompts(prompt, sequence.to, sequence.point_list(count))
    if edits is not None:
        return "rows", [prompt, *edits]
    if referenced:
        return "reference", [prompt, prompt]
    return "single", [prompt]


def reference_row_needed(controls: tuple[Control, ...]) -> bool:
    """Whether `controls` hold a ReferenceAttention (it needs a reference row besides the image); raises for the
    cross-image controls whose rows one image per call cannot give."""
    from ..controls.cross_image.consistent import ConsistentSubjects
    from ..controls.cross_image.interpolation import AttentionInterpolation
    from ..controls.cross_image.p2p import PromptToPrompt
    from ..controls.cross_image.reference import ReferenceAttention

    if any(isinstance(c, ConsistentSubjects) for c in controls):
        raise ConfigError("ConsistentSubjects links the images of one pipeline call, and attnctl render / Model.generate make "
                          "one image per call; call the pipeline with a list of prompts (examples/consistent_subjects.py)")
    if any(isinstance(c, PromptToPrompt) and c.edits is None for c in controls):
        raise ConfigError("PromptToPrompt needs its edited prompts (`edits`) in attnctl render / Model.generate: each image "
                          "renders [prompt, *edits] in one call")
    if any(isinstance(c, AttentionInterpolation) and c.to is None for c in controls):
        raise ConfigError("AttentionInterpolation needs its second prompt (`to`) in attnctl render / Model.generate: each "
                          "image renders the sequence from the prompt to `to`")
    found = [c for c in controls if isinstance(c, ReferenceAttention)]
    if len(found) > 1:
        raise ConfigError("give one ReferenceAttention per image (the call has one reference row)")
    if found and found[0].reference_row != 0:
        raise ConfigError(f"ReferenceAttention.reference_row is {found[0].reference_row}; attnctl render / Model.generate "
                          "put the reference in row 0 (leave reference_row at 0)")
    return bool(found)


def _pipeline_name(pipe: Any) -> str:
    config = getattr(pipe, "config", None)
    name = getattr(pipe, "name_or_path", None) or (config.get("_name_or_path") if isinstance(config, Mapping) else None)
    return str(name) if name else type(pipe).__name__
