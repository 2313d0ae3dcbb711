"""Controls that link the images of one call: a row's attention reads other rows' keys and values."""

from .interpolation import AttentionInterpolation, beta_points

__all__ = ["AttentionInterpolation", "beta_points"]
