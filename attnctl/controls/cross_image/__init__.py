"""Controls that link the images of one call: a row's attention reads other rows' keys and values."""

from .consistent import ConsistentSubjects
from .interpolation import AttentionInterpolation, beta_points

__all__ = ["AttentionInterpolation", "ConsistentSubjects", "beta_points"]
