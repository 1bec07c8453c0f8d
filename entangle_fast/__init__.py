"""entangle_fast: fused kernels that measure gradient entanglement in preference alignment.

Public API:
    linear_logprobs, output_layer_token_stats: the fused log-prob op and its output-layer token statistics.
    preference_logprobs: chosen/rejected log-probs of a Hugging Face causal LM without materialised logits.
"""
from entangle_fast.logprobs import linear_logprobs, output_layer_token_stats
from entangle_fast.preference import PreferenceLogprobs, preference_logprobs
from entangle_fast.token_stats import OutputLayerTokenStats, TokenStatsHandle

__version__ = "0.1.0"

__all__ = [
    "linear_logprobs",
    "output_layer_token_stats",
    "preference_logprobs",
    "PreferenceLogprobs",
    "OutputLayerTokenStats",
    "TokenStatsHandle",
]
