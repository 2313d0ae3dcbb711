"""Attention maps: capture during generation (`capture`) and pictures of them (`heatmap`)."""

from .capture import AttentionMapResult, AttentionMaps

__all__ = ["AttentionMapResult", "AttentionMaps"]
