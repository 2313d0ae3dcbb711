"""The controlled attention processors, one per kind of attention module, and the edits and hook chain they apply.

Each processor reproduces the stock processor of its modules operation for operation and sends the attention
op through attnctl's backends (`base.ControlledProcessor`). `PROCESSORS` registers them per model family
(the families' names come from `attnctl.families`); `processor_for` is what `attnctl.apply` reads.
"""

from __future__ import annotations

from ..errors import UnsupportedError
from .base import ControlledProcessor
from .flux import FluxAttnProcessor
from .flux2 import Flux2Processor
from .joint import JointAttnProcessor
from .qwen import QwenDoubleStreamProcessor
from .self_cross import SelfCrossAttnProcessor
from .wan import WanProcessor
from .zimage import ZImageProcessor

#: Per model family: the controlled processor class and the stock processor classes it reproduces.
PROCESSORS: dict[str, tuple[type[ControlledProcessor], tuple[str, ...]]] = {
    "unet": (SelfCrossAttnProcessor, SelfCrossAttnProcessor.reproduces),
    "pixart": (SelfCrossAttnProcessor, SelfCrossAttnProcessor.reproduces),
    "sd3": (JointAttnProcessor, JointAttnProcessor.reproduces),
    "flux": (FluxAttnProcessor, FluxAttnProcessor.reproduces),
    "chroma": (FluxAttnProcessor, FluxAttnProcessor.reproduces),
    "qwenimage": (QwenDoubleStreamProcessor, QwenDoubleStreamProcessor.reproduces),
    "flux2": (Flux2Processor, Flux2Processor.reproduces),
    "wan": (WanProcessor, WanProcessor.reproduces),
    "zimage": (ZImageProcessor, ZImageProcessor.reproduces),
}


def processor_for(family: str) -> tuple[type[ControlledProcessor], tuple[str, ...]]:
    """The controlled processor class of a model family and the stock processors it can stand in for."""
    try:
        return PROCESSORS[family]
    except KeyError:
        raise UnsupportedError(f"attnctl: no controlled processor for model family {family!r}; known: {', '.join(PROCESSORS)}") from None


__all__ = ["PROCESSORS", "ControlledProcessor", "processor_for"]
