"""Test-time latent optimisation on attention maps (docs/methods.md, "Latent optimisation on attention maps").

    import attnctl
    with attnctl.apply(pipe, [attnctl.AttendExcite(subjects=["cat", "dog"])]):
        image = pipe("a cat and a dog").images[0]

`AttendExcite` (Chefer et al. 2023), `AStar` (Agarwal et al. 2023) and `BoxGuidance` (Chen et al. 2023, BoxDiff's
constraints as an option) share one machinery (`engine`): loss passes through the denoiser's first layers with
gradients, and gradient steps on the latent before the denoiser call of a step.
"""

from __future__ import annotations

from .controls import AStar, AttendExcite, BoxGuidance
from .engine import LatentOptimizerBound

__all__ = ["AStar", "AttendExcite", "BoxGuidance", "LatentOptimizerBound"]
