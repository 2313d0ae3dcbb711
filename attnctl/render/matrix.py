"""The support matrix (control x model family), generated from the code's own declarations.

For every family, the adapter of its tiny offline model (`attnctl.testing`) is built and each control's
apply-time checks run on it exactly as `attnctl.apply` runs them (`validate_for`, then the layer selection):
an `UnsupportedError` is a refusal, and its message (the family-level reason) goes into the matrix. Nothing
here is written by hand, so the README's table (`python -m attnctl.render.matrix`) cannot drift from the code.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from ..control import Control
from ..controls.cross_image.consistent import ConsistentSubjects
from ..controls.cross_image.interpolation import AttentionInterpolation
from ..controls.cross_image.p2p import PromptToPrompt
from ..controls.cross_image.reference import ReferenceAttention
from ..controls.fastattn import FastAttn
from ..controls.guidance import PAG, PLADIS, SAG, SEG, SkipLayer
from ..controls.maps.capture import AttentionMaps
from ..controls.optimize import AStar, AttendExcite, BoxGuidance
from ..controls.regions import Region, Regions
from ..controls.reweight import Reweight
from ..controls.structured import StructuredGuidance
from ..controls.tgate import TGate
from ..controls.token_reduction.controls import AgentAttention, ToMe
from ..errors import SelectionError, UnsupportedError
from ..families import ModelAdapter, adapter_for

#: One representative configuration per control (defaults wherever a control has them).
CONTROLS: tuple[tuple[str, Callable[[], Control]], ...] = (
    ("Reweight", lambda: Reweight({"cat": 2.0})),
    ("AttentionMaps", lambda: AttentionMaps(("cat",))),
    ("Regions", lambda: Regions([Region("a cat", box=(0.0, 0.0, 0.5, 1.0))])),
    ("PAG", lambda: PAG()),
    ("SEG", lambda: SEG()),
    ("SAG", lambda: SAG()),
    ("PLADIS", lambda: PLADIS()),
    ("SkipLayer", lambda: SkipLayer(blocks=(0,))),
    ("ToMe", lambda: ToMe()),
    ("AgentAttention", lambda: AgentAttention()),
    ("TGate", lambda: TGate()),
    ("FastAttn", lambda: FastAttn()),
    ("AttentionInterpolation", lambda: AttentionInterpolation()),
    ("ConsistentSubjects", lambda: ConsistentSubjects()),
    ("ReferenceAttention", lambda: ReferenceAttention(_grey())),
    ("PromptToPrompt", lambda: PromptToPrompt()),
    ("AttendExcite", lambda: AttendExcite(subjects=("cat",))),
    ("AStar", lambda: AStar(subjects=("cat", "street"))),
    ("BoxGuidance", lambda: BoxGuidance({"cat": (0.0, 0.0, 0.5, 1.0)})),
    ("StructuredGuidance", lambda: StructuredGuidance()),
)


def _grey():
    """A plain grey picture: the reference ReferenceAttention's matrix entry is checked (and run) with."""
    from PIL import Image

    return Image.new("RGB", (32, 32), (128, 128, 128))

#: The families in the matrix, each with its tiny offline model.
FAMILIES: tuple[tuple[str, str], ...] = (
    ("unet", "tiny-sd"), ("sd3", "tiny-sd3"), ("flux", "tiny-flux"), ("pixart", "tiny-pixart"),
    ("chroma", "tiny-chroma"), ("qwenimage", "tiny-qwenimage"), ("flux2", "tiny-flux2"), ("wan", "tiny-wan"),
    ("zimage", "tiny-zimage"),
)


#: A cell: ("yes", None), ("select", why: the family needs an explicit layer / block choice) or ("refused", why).
Cell = tuple[str, str | None]


def support(control: Control, adapter: ModelAdapter) -> Cell:
    """Whether `control` (as configured) passes `attnctl.apply`'s checks on `adapter`'s family, and if not, why."""
    try:
        control.validate_traits(adapter)
        control.validate_for(adapter)
        control.select(adapter)
    except UnsupportedError as error:
        return "refused", str(error)
    except SelectionError as error:
        return "select", str(error)
    return "yes", None


def _adapter(tiny: str) -> ModelAdapter | None:
    from ..testing import make_tiny_pipeline
    from ..testing.new_families import NEW_TINY_MODELS, available

    if tiny in NEW_TINY_MODELS and not available(tiny):
        return None
    pipe = make_tiny_pipeline(tiny)
    return adapter_for(pipe.unet if hasattr(pipe, "unet") else pipe.transformer)


def matrix(families: tuple[tuple[str, str], ...] = FAMILIES) -> dict[str, dict[str, Cell]]:
    """{control: {family: cell}} for the families the installed diffusers has."""
    adapters = {family: _adapter(tiny) for family, tiny in families}
    return {
        name: {family: support(make(), adapter) for family, adapter in adapters.items() if adapter is not None}
        for name, make in CONTROLS
    }


def _short(reason: str, family: str) -> str:
    """The reason without the `attnctl:` prefix, the family's name as `<family>` (one note serves several
    families), one line, pipes escaped."""
    text = re.sub(r"^attnctl:\s*", "", reason.strip()).replace("\n", " ").replace("|", "\\|")
    return re.sub(rf"\b{re.escape(family)}\b", "<family>", text)


def markdown(table: dict[str, dict[str, Cell]] | None = None) -> str:
    """The matrix as a Markdown table (yes / refused), then the reasons, numbered."""
    table = matrix() if table is None else table
    families = list(next(iter(table.values())))
    reasons: list[str] = []
    lines = ["| control | " + " | ".join(families) + " |", "| --- |" + " --- |" * len(families)]
    for name, row in table.items():
        cells = []
        for family in families:
            status, reason = row[family]
            if reason is None:
                cells.append("yes")
                continue
            text = _short(reason, family)
            if text not in reasons:
                reasons.append(text)
            label = "refused" if status == "refused" else "yes, explicit selection"
            cells.append(f"{label} ({reasons.index(text) + 1})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.extend(f"{i}. {text}" for i, text in enumerate(reasons, 1))
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover - `python -m attnctl.render.matrix`
    print(markdown())
