"""attnctl: training-free attention control for Hugging Face diffusers pipelines.

    import attnctl
    handle = attnctl.apply(pipe, [...controls...])
    image = pipe("a photo of a cat").images[0]
    handle.remove()
"""

from __future__ import annotations

from ._version import __version__
from .control import Bound, Control
from .errors import (
    AttnctlError,
    BackendError,
    CallLayoutError,
    ConfigError,
    HandleError,
    PipelineChangedError,
    SelectionError,
    TokenError,
    UnsupportedError,
)
from .handle import Handle, apply
from .pipelines.loading import load_pipeline
from .processors.fastattn import FastAttn, FastAttnPlan
from .processors.tgate import TGate

__all__ = [
    "AttnctlError", "BackendError", "Bound", "CallLayoutError", "ConfigError", "Control", "Handle", "HandleError",
    "PipelineChangedError", "SelectionError", "TokenError", "UnsupportedError", "__version__", "apply", "load_pipeline",
]
__all__ += ["FastAttn", "FastAttnPlan", "TGate"]
