"""Errors raised by attnctl. Every message names the bad value and what is allowed."""

from __future__ import annotations

from typing import Any


class AttnctlError(Exception):
    """Base class of every error attnctl raises on purpose. `handle`: the live handle the error is about, where one
    stands in the way (a pipeline that still holds a handle whose object was lost: `error.handle.remove()`), else None."""

    def __init__(self, *args: object, handle: Any = None):
        super().__init__(*args)
        self.handle = handle


class ConfigError(AttnctlError, ValueError):
    """A control or option was constructed with an invalid value."""


class SelectionError(ConfigError):
    """A layer or step selection matched nothing, or could not be parsed."""


class TokenError(AttnctlError, ValueError):
    """A word could not be resolved to token positions (absent, prompt too long, no prompt given)."""


class UnsupportedError(AttnctlError, TypeError):
    """The pipeline, denoiser, attention processor or backend is not supported."""


class CallLayoutError(AttnctlError, RuntimeError):
    """A denoiser call did not match any batch layout the pipeline's call protocol knows."""


class PipelineChangedError(AttnctlError, RuntimeError):
    """Something replaced attnctl's processors or wrappers after `attnctl.apply`."""


class HandleError(AttnctlError, RuntimeError):
    """Misuse of a handle: applying twice to one denoiser, using a removed handle."""


class BackendError(AttnctlError, RuntimeError):
    """A kernel backend cannot carry out what a control asks for."""


class KernelCompileError(BackendError):
    """A compiled kernel (a Triton kernel, compiled flex attention) failed to compile for the device: names the
    kernel; `backend="auto"` then runs such calls on the next backend."""

    def __init__(self, kernel: str, device: str, error: BaseException, what: str = "triton kernel"):
        self.kernel, self.device, self.error = kernel, device, error
        inner = error
        while inner.__cause__ is not None:  # a CompilationError in a called jit function wraps the real one
            inner = inner.__cause__
        lines = [line for line in str(inner).strip().splitlines() if line.strip()]
        text = lines[-1][:300] if lines else ""
        super().__init__(f"{what} {kernel} failed to compile on {device}: {type(error).__name__}: {text}")


class UnsupportedInputError(BackendError):
    """A kernel backend cannot take these tensors (their dtype, head dim or shapes): with `backend="auto"` the call
    runs on the next backend that can."""


class IdleControlWarning(UserWarning):
    """A control was asked to act but does nothing in this pipeline call (its output is the stock one): a step window
    that holds none of the call's steps, a gate after the last step, ... (`Bound.idle_reason`); or one part of it asked
    for explicitly does nothing while the rest acts (FastAttn's 'cfg_share' without uncond rows beside cond rows)."""
