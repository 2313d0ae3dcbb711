"""Controls whose rows read other rows of the same denoiser call (`RowLayout.linked`, issue 20): Prompt-to-Prompt
editing (`p2p.py`: queries, keys and attention of a base row), and the controls whose rows attend to other rows' keys
and values (`interpolation.py`, `consistent.py`, `reference.py`)."""

from .consistent import ConsistentSubjects
from .interpolation import AttentionInterpolation, beta_points
from .p2p import PromptToPrompt
from .reference import ReferenceAttention

__all__ = ["AttentionInterpolation", "ConsistentSubjects", "PromptToPrompt", "ReferenceAttention", "beta_points"]
