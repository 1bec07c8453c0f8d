"""Output-layer token statistics: what computing them in the fused backward costs, and what it saves.

At each shape: the full step (fwd+bwd) with ``token_stats`` off and on, the materialised reference step, the
statistics alone (``output_layer_token_stats``), and the LM head's own matmul ``hidden @ W^T`` as the yardstick
(stats-on minus stats-off, in LM-head matmuls). At shapes marked ``loop``, also the per-token backward loop
(``output_layer_token_stats_reference``, the paper's way): the loop / ours speed-up.
"""
from entangle_fast.bench import Ratio

# Each implementation runs at one pass (cases.STATS_IMPLS): the ratios pair them across passes (``at``).
RATIOS = [
    Ratio("token_stats", "stats-on", "stats-off", "time", "stats-on / stats-off time", "lower", True, at="full"),
    Ratio("token_stats", "stats-on", "stats-off", "memory", "stats-on / stats-off peak memory", "lower", True,
          at="full"),
    Ratio("token_stats", "stats-on - stats-off", "lm-head-matmul", "time",
          "(stats-on - stats-off) / LM-head matmul time", "lower", True, at="full"),
    Ratio("token_stats", "stats-on", "reference", "time", "stats-on / reference time", "lower", at="full"),
    Ratio("token_stats", "reference", "stats-on", "memory", "reference / stats-on peak memory", "higher", at="full"),
    Ratio("token_stats", "loop", "stats-only", "time", "per-token loop / stats-only time (speed-up)", "higher", True,
          at="stats"),
    Ratio("token_stats", "loop", "stats-on", "time", "per-token loop / stats-on full step time", "higher",
          at="stats"),
    Ratio("token_stats", "loop", "stats-only", "memory", "per-token loop / stats-only peak memory", "higher",
          at="stats"),
]


def test_token_stats(benchmark, stats_case, bench, record_property):
    bench.run(benchmark, stats_case, record_property)
