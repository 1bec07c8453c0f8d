"""Output-layer token statistics: what computing them in the fused backward costs, and what it saves.

At each shape: the full step (fwd+bwd) with ``token_stats`` off and on, the materialised reference step, the
statistics alone (``output_layer_token_stats``), and the LM head's own matmul ``hidden @ W^T`` as the yardstick
(stats-on minus stats-off, in LM-head matmuls). At shapes marked ``loop``, also the per-token backward loop
(``output_layer_token_stats_reference``, the paper's way): the loop / ours speed-up.
"""


def test_token_stats(benchmark, stats_case, bench, record_property):
    bench.run(benchmark, stats_case, record_property)
