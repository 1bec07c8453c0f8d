"""The fused log-prob op against the materialised reference and the peers: forward, backward, full step.

Every implementation runs the same step (per-token log-probs -> per-row sums -> DPO loss -> backward; see cases.py),
time and peak extra memory measured in one run, so the ratios ours/reference (time) and reference/ours (memory) are
read off one machine. ``test_matmul_ceiling`` measures a plain matmul of the preset's dtype: the TFLOP/s ceiling the
op's achieved rate is set against.
"""
from cases import LOGPROB_IMPLS

from entangle_fast.bench import Ratio

OURS = [i for i in LOGPROB_IMPLS if i.startswith("ours-")]
PEERS = [i for i in LOGPROB_IMPLS if i not in OURS]
# Each of ours against each peer: time (below 1: ours faster), peak and working memory (above 1: ours smaller).
# Headline: the full step against the materialised reference.
RATIOS = [
    Ratio("logprobs", num, den, metric, f"{num} / {den} {label}", better,
          headline=passes == ("full",) and x == "reference", passes=passes)
    for passes in (("forward", "backward"), ("full",)) for o in OURS for x in PEERS
    for metric, num, den, label, better in (("time", o, x, "time", "lower"),
                                            ("memory", x, o, "peak memory", "higher"),
                                            ("working-memory", x, o, "working memory", "higher"))
]


def test_logprobs(benchmark, logprob_case, bench, record_property):
    bench.run(benchmark, logprob_case, record_property)


def test_matmul_ceiling(benchmark, ceiling_case, bench, record_property):
    bench.run(benchmark, ceiling_case, record_property)
