"""Guidance by attention perturbation: PAG, SEG, SAG, PLADIS and skip-layer guidance (docs/methods.md).

PAG, SEG and skip-layer guidance add perturbed copies of the cond rows, batched with the pipeline's rows in
one forward (or run separately with `separate=True`), and add `scale (cond - perturbed)` to every row the
pipeline combines. SAG runs a second forward on a degraded input. PLADIS adds no rows: it changes the
cross-attention operator.
"""

from .pag import PAG
from .pladis import PLADIS
from .sag import SAG
from .seg import SEG
from .skip import SkipLayer

__all__ = ["PAG", "PLADIS", "SAG", "SEG", "SkipLayer"]
