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
