"""Token reduction: ToMe (token merging) and AgentSD (agent attention), with their bipartite matching."""

from .controls import AgentAttention, TokenReductionReport, ToMe

__all__ = ["AgentAttention", "TokenReductionReport", "ToMe"]
