"""attnctl: training-free attention control for Hugging Face diffusers pipelines.

    import attnctl
    handle = attnctl.apply(pipe, [...controls...])
    image = pipe("a photo of a cat").images[0]
    handle.remove()
"""

from __future__ import annotations

from ._version import __version__
from .control import Bound, Control
from .controls.cross_image.consistent import ConsistentSubjects
from .controls.cross_image.interpolation import AttentionInterpolation, beta_points
from .controls.cross_image.p2p import PromptToPrompt
from .controls.cross_image.reference import ReferenceAttention
from .controls.fastattn import FastAttn, FastAttnPlan
from .controls.guidance import PAG, PLADIS, SAG, SEG, SkipLayer
from .controls.maps.capture import AttentionMapResult, AttentionMaps
from .controls.optimize import AStar, AttendExcite, BoxGuidance
from .controls.regions import Region, Regions
from .controls.reweight import Reweight
from .controls.structured import StructuredGuidance, noun_phrases
from .controls.tgate import TGate
from .controls.token_reduction.controls import AgentAttention, TokenReductionReport, ToMe
from .errors import (
    AttnctlError,
    BackendError,
    CallLayoutError,
    ConfigError,
    HandleError,
    IdleControlWarning,
    PipelineChangedError,
    SelectionError,
    TokenError,
    UnsupportedError,
)
from .handle import Handle, apply
from .interpolate import interpolate
from .prompt_weights import parse_prompt
from .render.calibrate import calibrate
from .render.generate import Generation, Model, generate
from .render.loading import load_pipeline
from .render.readout import read_maps

__all__ = [
    "AttnctlError", "BackendError", "Bound", "CallLayoutError", "ConfigError", "Control", "Handle", "HandleError", "IdleControlWarning",
    "PipelineChangedError", "SelectionError", "TokenError", "UnsupportedError", "__version__", "apply", "load_pipeline",
]
__all__ += ["Generation", "Model", "generate"]
__all__ += ["PAG", "PLADIS", "SAG", "SEG", "SkipLayer"]
__all__ += ["Region", "Regions"]
__all__ += ["AgentAttention", "ToMe", "TokenReductionReport"]
__all__ += ["AttentionMapResult", "AttentionMaps", "Reweight", "parse_prompt"]
__all__ += ["FastAttn", "FastAttnPlan", "TGate", "calibrate"]
__all__ += ["AttentionInterpolation", "beta_points", "interpolate"]
__all__ += ["ConsistentSubjects", "ReferenceAttention"]
__all__ += ["PromptToPrompt"]
__all__ += ["AStar", "AttendExcite", "BoxGuidance"]
__all__ += ["StructuredGuidance", "noun_phrases"]
__all__ += ["read_maps"]


def __getattr__(name: str):
    """`attnctl.toy` (the embedded toy-shapes model's helpers) is imported on first use: `import attnctl` stays
    light, and `attnctl.toy.CALL_DEFAULTS` works as the README shows."""
    if name == "toy":
        import importlib

        return importlib.import_module(".toy", __name__)
    raise AttributeError(f"module 'attnctl' has no attribute {name!r}")
