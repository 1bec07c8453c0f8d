"""Every loss type of the pinned TRL DPOTrainer through EntangledDPOTrainer, against TRL's own loss code in float64.

Stock TRL scores log-probs with its chunked fused head, which accumulates in float32 whatever the model's dtype. To
compare at float64 rounding, the stock trainer's head is swapped for :class:`Float64Head`, the same per-token
quantities from the full float64 logits; everything else (the loss formulas, batch sorting, rewards, metrics, the
gradients through the float64 model) is TRL's own code. Ours runs the fused op's PyTorch path in float64. Both share
the tiny model's hidden states bit for bit, so loss, rewards and gradients agree to float64 rounding (rtol 1e-9 of the
compared quantity's scale; summation orders differ).
"""
from __future__ import annotations

import importlib
import math

import pytest
import torch

from entangle_fast.models import tiny_model
from helpers import assert_exact64
from test_integrations import ENTANGLE_KEYS, dpo_trainer, entangle_logs, one_step, trainer_environment  # noqa: F401

requires_trl = pytest.mark.skipif(importlib.util.find_spec("trl") is None,
                                  reason="requires_trl: pip install entangle-fast[trl]")
F64 = torch.float64


class Float64Head:
    """Stand-in for TRL's ``ChunkedLogProbFunction`` (same ``apply`` arguments and outputs) from full logits in the
    inputs' dtype: the float64 ground truth of what the chunked function computes in float32."""

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size, softcap=None, logit_scale=1.0,
              outputs=("log_probs",)):
        z = hidden @ weight.t()
        if bias is not None:
            z = z + bias
        z = z * logit_scale
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        z = z / temperature
        logp = torch.log_softmax(z, dim=-1)
        log_probs = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        entropy = -(logp.exp() * logp).sum(-1) if "entropy" in outputs else None
        sq = torch.logsumexp(2 * logp, dim=-1).detach() if "log_sum_sq_probs" in outputs else None
        mean = z.mean(-1).detach() if "mean_logits" in outputs else None
        top1 = (z.argmax(-1) == targets) if "is_top1" in outputs else None
        return log_probs, entropy, sq, mean, top1


@pytest.fixture
def float64_stock_head(monkeypatch):
    import trl.trainer.utils as trl_utils

    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", Float64Head)


# (loss_type list, extra DPOConfig fields); label_smoothing > 0 where TRL's loss reads it.
CASES = [([t], {}) for t in ("sigmoid", "hinge", "ipo", "nca_pair", "bco_pair", "sppo_hard", "apo_zero", "apo_down",
                             "discopop", "sft", "sigmoid_norm")]
CASES += [
    (["exo_pair"], {"label_smoothing": 1e-3}),
    (["robust"], {"label_smoothing": 0.1}),
    (["aot"], {"label_smoothing": 0.1}),
    (["aot_unpaired"], {"label_smoothing": 0.1}),
    (["aot"], {}),
    (["aot_unpaired"], {}),
    (["sigmoid", "bco_pair", "sft"], {"loss_weights": [0.8, 0.2, 1.0]}),  # MPO
    (["ipo", "aot", "robust", "exo_pair"], {"loss_weights": [0.5, 2.0, 1.0, 0.3], "label_smoothing": 0.2}),
    (["discopop", "sigmoid_norm"], {"discopop_tau": 0.4}),
]
IDS = ["+".join(t) + "".join(f"-{k}={v}" for k, v in c.items()) for t, c in CASES]
REWARD_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
               "logps/rejected")


@requires_trl
@pytest.mark.parametrize("loss_types,config", CASES, ids=IDS)
def test_every_trl_loss_type_matches_stock_in_float64(loss_types, config, float64_stock_head):
    from trl import DPOTrainer

    from entangle_fast.integrations.trl import EntangledDPOTrainer

    # A large learning rate moves the policy away from the reference, so no loss sits at a special point.
    policy = tiny_model("llama", dtype=F64, seed=3)
    stock = dpo_trainer(DPOTrainer, loss_type=loss_types, dtype=F64, config=config, model=policy)
    ours = dpo_trainer(EntangledDPOTrainer, loss_type=loss_types, dtype=F64, config=config,
                       model=tiny_model("llama", dtype=F64, seed=3), warn=True)
    assert not ours.entangle_fallback
    batch, loss_s, grads_s, metrics_s = one_step(stock)
    batch_o, loss_o, grads_o, metrics_o = one_step(ours)
    assert all(torch.equal(batch[k], batch_o[k]) for k in batch)
    assert math.isfinite(loss_s.item())
    # TRL's exo_pair forms its constants log(e), log(1 - e) from a float32 tensor of e: that loss (and so its
    # gradients) carries float32 rounding of two O(|log e|) constants in TRL, the one difference from float64 here.
    rtol = 2.0 ** -22 if "exo_pair" in loss_types else 1e-9
    assert_exact64(loss_o, loss_s, rtol=rtol, name="loss")
    for name, g in grads_s.items():
        assert_exact64(grads_o[name], g, rtol=rtol, name=f"grad {name}")
    for key in REWARD_KEYS:
        assert_exact64(metrics_o[key], metrics_s[key], name=key)
    assert metrics_o["num_tokens"] == metrics_s["num_tokens"]


@requires_trl
@pytest.mark.parametrize("loss_type,config", [(t, c) for (t,), c in CASES[:15]], ids=IDS[:15])
def test_every_trl_loss_type_trains_with_the_monitor(loss_type, config):
    from entangle_fast.integrations.trl import EntangledDPOTrainer

    with _no_fallback_warning():
        trainer = dpo_trainer(EntangledDPOTrainer, loss_type=loss_type, steps=1, config=config, warn=True)
    trainer.train()
    monitored = entangle_logs(trainer.state.log_history)
    assert len(monitored) == 1
    logged = monitored[0]
    assert {"entangle/ches", "entangle/ches_norm"} <= logged.keys()
    assert {"entangle/case_ideal", "entangle/case_undefined"} <= logged.keys() & ENTANGLE_KEYS
    fractions = sum(logged[f"entangle/case_{c}"] for c in ("ideal", "both_fall", "both_rise", "undefined"))
    assert math.isclose(fractions, 1.0)
    if loss_type == "sft":  # the rejected responses carry no gradient: every pair's statistics are undefined
        assert logged["entangle/case_undefined"] == 1.0
    else:
        assert math.isfinite(logged["entangle/inner"])


class _no_fallback_warning:
    """Fails if the trainer warns that it falls back to TRL's loss."""

    def __enter__(self):
        import warnings

        self._catch = warnings.catch_warnings(record=True)
        self._records = self._catch.__enter__()
        warnings.simplefilter("always")

    def __exit__(self, *exc):
        self._catch.__exit__(*exc)
        fallback = [str(w.message) for w in self._records if "without entanglement monitoring" in str(w.message)]
        assert not fallback, fallback


# ----------------------------------------------------------------------------------------------------------------------
# TRL's chunked log-prob seam


@requires_trl
@pytest.mark.parametrize("n,v,d", [(7, 129, 16), (33, 1001, 24)])
def test_seam_log_probs_match_trl_chunked_function(n, v, d):
    from trl.kernels import ChunkedLogProbFunction

    from entangle_fast.integrations.trl import FusedLogProbSeam

    g = torch.Generator().manual_seed(n + v)
    h64 = torch.randn(n, d, generator=g, dtype=F64)
    w64 = torch.randn(v, d, generator=g, dtype=F64) / d ** 0.5
    b64 = torch.randn(v, generator=g, dtype=F64)
    targets = torch.randint(0, v, (n,), generator=g)
    upstream = torch.randn(n, generator=g, dtype=F64)

    def run(fn, dtype):
        h, w, b = (t.detach().to(dtype).clone().requires_grad_(True) for t in (h64, w64, b64))
        out = fn.apply(h, w, b, targets, 1.0, 256, None, 1.0, ("log_probs",))
        assert all(x is None for x in out[1:])
        (out[0].to(F64) * upstream).sum().backward()
        return [out[0].detach(), h.grad, w.grad, b.grad]

    FusedLogProbSeam.original = ChunkedLogProbFunction
    calls = FusedLogProbSeam.calls
    truth = run(Float64Head, F64)
    ours, trl_own = run(FusedLogProbSeam, torch.float32), run(ChunkedLogProbFunction, torch.float32)
    assert FusedLogProbSeam.calls == calls + 1
    for name, o, t, ref in zip(("log_probs", "grad hidden", "grad weight", "grad bias"), ours, trl_own, truth):
        # The tolerance rule: no further from the float64 truth than twice TRL's own float32 error, plus 16 ulps.
        err, err_trl = (o.double() - ref).abs().max().item(), (t.double() - ref).abs().max().item()
        assert err <= 2 * err_trl + 16 * torch.finfo(torch.float32).eps * ref.abs().max().item(), (name, err, err_trl)


@requires_trl
def test_seam_passes_what_it_cannot_serve_to_trl():
    from trl.kernels import ChunkedLogProbFunction

    from entangle_fast.integrations.trl import FusedLogProbSeam

    FusedLogProbSeam.original = ChunkedLogProbFunction
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(5, 8, generator=g), torch.randn(11, 8, generator=g)
    targets = torch.randint(0, 11, (5,), generator=g)
    calls = FusedLogProbSeam.calls
    wpo = (1.0, 64, None, 1.0, ("log_probs", "log_sum_sq_probs"))
    ours = FusedLogProbSeam.apply(h, w, None, targets, *wpo)
    stock = ChunkedLogProbFunction.apply(h, w, None, targets, *wpo)
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(ours, stock))
    assert FusedLogProbSeam.calls == calls  # WPO's output went to TRL's own function
    # A temperature and soft-cap with every metric TRL's trainers request: served by the op where it takes
    # `transform` and `token_metrics`, equal to TRL's to float32 accuracy either way.
    args = (0.7, 64, 3.0, 1.0, ("log_probs", "entropy", "mean_logits", "is_top1"))
    ours = FusedLogProbSeam.apply(h, w, None, targets, *args)
    stock = ChunkedLogProbFunction.apply(h, w, None, targets, *args)
    for a, b in zip(ours, stock):
        assert (a is None) == (b is None)
        if a is not None and a.dtype == torch.bool:
            assert torch.equal(a, b)
        elif a is not None:
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), (a, b)


@requires_trl
def test_patch_trl_without_the_seam_logs_one_info_line(monkeypatch, caplog):
    import logging

    import trl.trainer.utils as trl_utils

    from entangle_fast.integrations.trl import patch_trl, unpatch_trl

    monkeypatch.delattr(trl_utils, "_ChunkedLogProbFunction")
    try:
        with caplog.at_level(logging.INFO, logger="entangle_fast.integrations.trl"):
            patch_trl()
    finally:
        unpatch_trl()
    lines = [r.getMessage() for r in caplog.records if "seam" in r.getMessage()]
    assert len(lines) == 1 and "no chunked log-prob seam" in lines[0]
    assert not hasattr(trl_utils, "_ChunkedLogProbFunction")


@requires_trl
def test_script_that_only_adds_patch_trl_logs_entangle_and_trains_the_same(float64_stock_head):
    import trl
    import trl.trainer.utils as trl_utils

    from entangle_fast.integrations.trl import EntangledDPOTrainer, FusedLogProbSeam, patch_trl, unpatch_trl

    def script():  # an existing TRL script: it builds `trl.DPOTrainer` and trains
        trainer = dpo_trainer(trl.DPOTrainer, dtype=F64, steps=3, model=tiny_model("llama", dtype=F64, seed=3))
        trainer.train()
        return trainer

    stock = script()
    try:
        patch_trl()
        assert trl_utils._ChunkedLogProbFunction is FusedLogProbSeam
        assert FusedLogProbSeam.original is Float64Head
        patched = script()
    finally:
        unpatch_trl()
    assert trl_utils._ChunkedLogProbFunction is Float64Head and trl.DPOTrainer is not EntangledDPOTrainer
    assert isinstance(patched, EntangledDPOTrainer) and not isinstance(stock, EntangledDPOTrainer)
    losses = [[h["loss"] for h in t.state.log_history if "loss" in h] for t in (stock, patched)]
    assert len(losses[0]) == 3
    assert_exact64(torch.tensor(losses[1], dtype=F64), torch.tensor(losses[0], dtype=F64), name="losses")
    monitored = entangle_logs(patched.state.log_history)
    assert len(monitored) == 3 and all(ENTANGLE_KEYS <= h.keys() for h in monitored)
    assert not entangle_logs(stock.state.log_history)


@requires_trl
def test_token_metrics_logged_with_the_monitor_equal_stock_trl_in_float32():
    from trl import DPOTrainer

    from entangle_fast.integrations.trl import HAS_TOKEN_METRICS, EntangledDPOTrainer

    if not HAS_TOKEN_METRICS:
        pytest.skip("needs TokenMetrics")
    stock = dpo_trainer(DPOTrainer, steps=2)
    ours = dpo_trainer(EntangledDPOTrainer, steps=2, entangle_every=1)
    for trainer in (stock, ours):
        trainer.train()
    keys = ("entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy")
    logs = [[h for h in t.state.log_history if "loss" in h] for t in (stock, ours)]
    assert len(logs[0]) == len(logs[1]) == 2
    for h_stock, h_ours in zip(*logs):
        assert ENTANGLE_KEYS <= h_ours.keys()
        for key in keys:
            assert abs(h_ours[key] - h_stock[key]) <= 1e-5 * max(1.0, abs(h_stock[key])), (key, h_ours[key],
                                                                                         h_stock[key])
