"""Errors raised by attnctl. Every message names the bad value and what is allowed."""

from __future__ import annotations


class AttnctlError(Exception):
    """Base class of every error attnctl raises on purpose."""


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


class IdleControlWarning(UserWarning):
    """A control was asked to act but does nothing in this pipeline call (its output is the stock one): a step window
    that holds none of the call's steps, a gate after the last step, ... (`Bound.idle_reason`)."""
