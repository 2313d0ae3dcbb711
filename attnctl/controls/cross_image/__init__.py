"""Controls that link the images of one call: a row's attention reads other rows' keys and values."""

from .consistent import ConsistentSubjects
from .interpolation import AttentionInterpolation, beta_points
from .reference import ReferenceAttention

__all__ = ["AttentionInterpolation", "ConsistentSubjects", "ReferenceAttention", "beta_points"]
