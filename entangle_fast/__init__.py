"""entangle_fast: fused kernels that measure gradient entanglement in preference alignment.

Public API:
    linear_logprobs, output_layer_token_stats: the fused log-prob op and its output-layer token statistics.
    preference_logprobs: chosen/rejected log-probs of a Hugging Face causal LM without materialised logits.
    EntanglementMonitor: exact per-pair entanglement statistics of every trainable parameter, from one backward.
    losses: margin-based preference losses (DPO, IPO, SimPO, ...).
"""
from entangle_fast import losses
from entangle_fast.logprobs import linear_logprobs, output_layer_token_stats
from entangle_fast.monitor import EntanglementMonitor, EntanglementStats, UncoveredParametersError, register_positionwise
from entangle_fast.preference import PreferenceLogprobs, preference_logprobs
from entangle_fast.token_stats import OutputLayerTokenStats, TokenStatsHandle

__version__ = "0.1.0"

__all__ = [
    "EntanglementMonitor",
    "EntanglementStats",
    "UncoveredParametersError",
    "register_positionwise",
    "losses",
    "linear_logprobs",
    "output_layer_token_stats",
    "preference_logprobs",
    "PreferenceLogprobs",
    "OutputLayerTokenStats",
    "TokenStatsHandle",
]
