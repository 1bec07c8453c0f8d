"""The fused log-prob op against the materialised reference and the peers: forward, backward, full step.

Every implementation runs the same step (per-token log-probs -> per-row sums -> DPO loss -> backward; see cases.py),
time and peak extra memory measured in one run, so the ratios ours/reference (time) and reference/ours (memory) are
read off one machine. ``test_matmul_ceiling`` measures a plain matmul of the preset's dtype: the TFLOP/s ceiling the
op's achieved rate is set against.
"""


def test_logprobs(benchmark, logprob_case, bench, record_property):
    bench.run(benchmark, logprob_case, record_property)


def test_matmul_ceiling(benchmark, ceiling_case, bench, record_property):
    bench.run(benchmark, ceiling_case, record_property)
