"""Controls whose rows read other rows of the same denoiser call (`RowLayout.linked`, issue 20): Prompt-to-Prompt
editing (`p2p.py`)."""

from .p2p import PromptToPrompt

__all__ = ["PromptToPrompt"]
