"""One loader for every model attnctl runs on: embedded names, local diffusers directories and hub ids."""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
from collections.abc import Iterator
from typing import Any

from ..errors import ConfigError, UnsupportedError
from ..validation import seed as valid_seed

DEFAULT_MODEL = "toy-shapes"
#: The embedded toy models (`attnctl.toy.MODEL_NAMES`; named here too so that listing them does not import the toy).
TOY_MODELS = ("toy-shapes", "toy-shapes-grounded")


def embedded_models() -> tuple[str, ...]:
    """`toy-shapes` and `toy-shapes-grounded`, the tiny fixtures, and those of the newer families (issue 19) the
    installed diffusers has."""
    from ..testing import NEW_TINY_MODELS, TINY_MODELS
    from ..testing.new_families import available

    return TOY_MODELS + TINY_MODELS + tuple(name for name in NEW_TINY_MODELS if available(name))


class _TorchvisionNotice(logging.Filter):
    """Drops transformers' "`CLIPImageProcessor` requires torchvision (not installed); falling back to ...Pil"
    notice. attnctl never runs those image processors (they serve safety checkers and IP-Adapter inputs), and the
    PIL fallback transformers takes is the processor diffusers used before; the notice is explained once in the
    README ("Install") instead of printed on every run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision" not in record.getMessage()


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """While loading: no diffusers / transformers progress bars ("Loading pipeline components", "Loading
    weights") and no torchvision notice; the libraries' settings are put back afterwards (nothing is changed
    at import: attnctl leaves the user's logging alone outside its own loading)."""
    logger = logging.getLogger("transformers.utils.import_utils")
    notice = _TorchvisionNotice()
    logger.addFilter(notice)
    try:
        with _progress_bars_off():
            yield
    finally:
        logger.removeFilter(notice)


@contextlib.contextmanager
def _progress_bars_off() -> Iterator[None]:
    try:
        import diffusers.utils.logging as diffusers_logging
        import transformers.utils.logging as transformers_logging
    except ImportError:  # pragma: no cover - both are dependencies
        yield
        return
    enabled = (diffusers_logging.is_progress_bar_enabled(), transformers_logging.is_progress_bar_enabled())
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled[0]:
            diffusers_logging.enable_progress_bar()
        if enabled[1]:
            transformers_logging.enable_progress_bar()


def near_miss(name: str) -> str | None:
    """The embedded model `name` is a typo of, or None. A name with no '/' that is not an existing folder and
    is close to an embedded name (case aside, or by a couple of characters) is taken for a typo, never for a hub id."""
    if not isinstance(name, str) or name in embedded_models() or "/" in name or os.sep in name or os.path.isdir(name):
        return None
    names = embedded_models()
    lowered = {candidate.lower(): candidate for candidate in names}
    folded = name.strip().lower().replace("_", "-").replace(" ", "-")
    if folded in lowered:
        return lowered[folded]
    close = difflib.get_close_matches(folded, list(lowered), n=1, cutoff=0.75)
    return lowered[close[0]] if close else None


def check_model_name(name: Any) -> None:
    """Raise ConfigError for a name that is not usable, or that is a near miss of an embedded name (before any
    attempt to reach a hub)."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"model must be an embedded name, a directory or a hub id, got {name!r}")
    guess = near_miss(name)
    if guess is not None:
        raise ConfigError(f"model {name!r} is not an embedded model: did you mean {guess!r}? "
                          f"(embedded: {', '.join(embedded_models())}; a hub id looks like 'owner/name')")


def load_pipeline(
    name_or_path: str = DEFAULT_MODEL,
    *,
    torch_dtype: Any = None,
    device: str | None = None,
    seed: int = 0,
    **kwargs: Any,
):
    """Load a diffusers pipeline.

    - `toy-shapes`: the shapes model trained by this project and shipped in the package; `toy-shapes-grounded`: the
      same training with grounding losses, whose word attention maps locate their objects (`attnctl.toy`);
    - `tiny-sd`, `tiny-sdxl`, `tiny-sd3`, `tiny-flux`, `tiny-pixart`, and where the installed diffusers has their
      classes `tiny-chroma`, `tiny-qwenimage`, `tiny-zimage`, `tiny-flux2`, `tiny-wan` (video): random-weight
      offline fixtures (`seed`);
    - a local directory in diffusers format, or a hub id (needs network access): loaded with
      `DiffusionPipeline.from_pretrained(..., use_safetensors=True)`, never with remote code.
    Extra keyword arguments go to `from_pretrained` (an embedded model takes none: ConfigError). A name with no '/'
    close to an embedded name is a typo (ConfigError with "did you mean"), never sent to a hub. Loading shows no
    progress bars (`quiet_loading`).
    """
    check_model_name(name_or_path)
    refuse_embedded_options(name_or_path, kwargs, "load_pipeline", "torch_dtype, device and seed")
    seed = valid_seed(seed, "seed")
    torch_dtype, device = _check_dtype_and_device(torch_dtype, device)
    with quiet_loading():
        return _load(name_or_path, torch_dtype=torch_dtype, device=device, seed=seed, **kwargs)


def refuse_embedded_options(name: str, options: dict[str, Any], owner: str, accepted: str) -> None:
    """An embedded model is built here, not by `from_pretrained`: an option for it (or a misspelt one) would be
    dropped, so it is a ConfigError naming it and what the embedded models take."""
    if options and name in embedded_models():
        raise ConfigError(
            f"{owner}: the embedded model {name!r} takes no {', '.join(f'{key}=' for key in sorted(options))} "
            f"(from_pretrained's options apply to local folders and hub ids only); it takes {accepted}"
        )


def _check_dtype_and_device(torch_dtype: Any, device: Any) -> tuple[Any, Any]:
    """`torch_dtype` a torch dtype or its name ("float16"); `device` one torch can use here (ConfigError naming the
    value otherwise, before anything loads)."""
    import torch

    names = ("float32", "float16", "bfloat16")
    if isinstance(torch_dtype, str) and torch_dtype.removeprefix("torch.") in names:
        torch_dtype = getattr(torch, torch_dtype.removeprefix("torch."))
    if torch_dtype is not None and not isinstance(torch_dtype, torch.dtype):
        raise ConfigError(f"torch_dtype must be None, a torch dtype or one of {', '.join(names)}, got {torch_dtype!r}")
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as error:
            raise ConfigError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'mps', got {device!r}") from error
        check_device_available(device)
    return torch_dtype, device


def check_device_available(target: Any) -> None:
    """A CUDA or MPS device this torch cannot use is a ConfigError before anything loads (torch would fail later,
    mid-load, with "Torch not compiled with CUDA enabled")."""
    import torch

    if target.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(
                f"device {str(target)!r}: this torch sees no CUDA device (torch.cuda.is_available() is False: a CPU build "
                "of torch, or no GPU); use device 'auto' or 'cpu'"
            )
        if target.index is not None and target.index >= count:
            raise ConfigError(f"device {str(target)!r}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
    elif target.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ConfigError(f"device {str(target)!r}: MPS is not available here; use device 'auto' or 'cpu'")


def _load(name_or_path: str, *, torch_dtype: Any, device: str | None, seed: int, **kwargs: Any):
    import torch

    if name_or_path in TOY_MODELS:
        pipe = _load_toy_shapes(name_or_path)
    elif name_or_path in embedded_models():
        from ..testing import make_tiny_pipeline

        pipe = make_tiny_pipeline(name_or_path, seed=seed)
    else:
        from diffusers import DiffusionPipeline

        for forbidden in ("trust_remote_code", "custom_pipeline"):
            if kwargs.get(forbidden):
                raise ConfigError(f"attnctl loads models without remote code; {forbidden}= is not allowed")
        local = os.path.isdir(name_or_path)
        if not local and (name_or_path.startswith((".", "/", "~")) or os.sep in name_or_path.strip("/").split("/", 1)[-1]):
            raise ConfigError(
                f"model {name_or_path!r} is neither an embedded model ({', '.join(embedded_models())}) nor an existing "
                "directory; a hub id looks like 'owner/name'"
            )
        options = {"use_safetensors": True, "local_files_only": local, **kwargs}
        if torch_dtype is not None:
            options[_dtype_argument()] = torch_dtype
        pipe = DiffusionPipeline.from_pretrained(name_or_path, **options)
    if torch_dtype is not None and name_or_path in embedded_models():
        pipe = pipe.to(dtype=torch_dtype)
    if device is not None:
        pipe = pipe.to(torch.device(device))
    return pipe


def _load_toy_shapes(name: str):
    try:
        from ..toy import load_toy_shapes
    except ImportError as error:  # pragma: no cover - depends on the package build
        raise UnsupportedError(f"the embedded {name} model is not available in this build: {error}") from error
    return load_toy_shapes(model=name)


def _dtype_argument() -> str:
    """`from_pretrained`'s dtype argument: `dtype` where diffusers takes it (it deprecates `torch_dtype` with a
    FutureWarning at every load), else `torch_dtype`."""
    from diffusers.pipelines import pipeline_utils

    return "dtype" if hasattr(pipeline_utils, "_resolve_dtype") else "torch_dtype"

