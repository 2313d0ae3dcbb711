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
from .pipelines.generate import Generation, Model, generate
from .pipelines.loading import load_pipeline
from .processors.fastattn import FastAttn, FastAttnPlan
from .processors.guidance import PAG, PLADIS, SAG, SEG, SkipLayer
from .processors.maps import AttentionMapResult, AttentionMaps
from .processors.regions import Region, Regions
from .processors.reweight import Reweight
from .processors.tgate import TGate
from .processors.token_reduction import AgentAttention, TokenReductionReport, ToMe
from .prompt_weights import parse_prompt

__all__ = [
    "AttnctlError", "BackendError", "Bound", "CallLayoutError", "ConfigError", "Control", "Handle", "HandleError",
    "PipelineChangedError", "SelectionError", "TokenError", "UnsupportedError", "__version__", "apply", "load_pipeline",
]
__all__ += ["Generation", "Model", "generate"]
__all__ += ["PAG", "PLADIS", "SAG", "SEG", "SkipLayer"]
__all__ += ["Region", "Regions"]
__all__ += ["AgentAttention", "ToMe", "TokenReductionReport"]
__all__ += ["AttentionMapResult", "AttentionMaps", "Reweight", "parse_prompt"]
__all__ += ["FastAttn", "FastAttnPlan", "TGate"]
