"""Fused, vocabulary-chunked per-token statistics of causal-LM heads (no ``[N, V]`` logits)."""

from .fused_stats import POLICY_STATS, STATS, token_stats, two_model_token_stats

__all__ = ["POLICY_STATS", "STATS", "token_stats", "two_model_token_stats"]
