"""Region control: regional prompts, soft masks, subject isolation (docs/methods.md "Regions").

    import attnctl
    regions = attnctl.Regions([
        attnctl.Region("a red circle", box=(0.05, 0.25, 0.45, 0.75)),
        attnctl.Region("a blue square", box=(0.55, 0.25, 0.95, 0.75)),
    ], base_ratio=0.2, isolate=True)
    with attnctl.apply(pipe, [regions]):
        image = pipe("a red circle and a blue square").images[0]
"""

from __future__ import annotations

from .control import Regions, RegionsBound
from .layout import PNG_KEY, draw_layout, save_layout, save_mask, save_picture
from .masks import GridLayout, area_matrix, box_coverage, grid_layout, load_mask, resize_mask
from .region import Region

load_layout = Regions.from_layout  # a layout file (or its data) -> Regions

__all__ = [
    "PNG_KEY", "GridLayout", "Region", "Regions", "RegionsBound", "area_matrix", "box_coverage", "draw_layout",
    "grid_layout", "load_layout", "load_mask", "resize_mask", "save_layout", "save_mask", "save_picture",
]
