"""CHES scores against a direct float64 computation; preference_logprobs(ches=True); TRL's token-metric reductions
against plain PyTorch per-token quantities of full logits."""
from __future__ import annotations

import importlib

import pytest
import torch

from entangle_fast import preference_logprobs
from entangle_fast.ches import ches_scores
from entangle_fast.models import BUILTIN_PAIRS, build_tokenizer, encode_pairs, tiny_model
from helpers import assert_exact64

F64 = torch.float64


def ches_direct(hidden, mask, pairs):
    """Razin et al.'s definition, one pair at a time, float64, by explicit loops over positions."""
    out, norm = [], []
    for w, l in pairs:
        h_w = sum((hidden[w, t].double() for t in range(hidden.shape[1]) if mask[w, t]), torch.zeros(hidden.shape[2],
                                                                                                     dtype=F64))
        h_l = sum((hidden[l, t].double() for t in range(hidden.shape[1]) if mask[l, t]), torch.zeros(hidden.shape[2],
                                                                                                     dtype=F64))
        t_w, t_l = int(mask[w].sum()), int(mask[l].sum())
        out.append(torch.dot(h_w, h_l) - torch.dot(h_w, h_w))
        norm.append(torch.dot(h_w, h_l) / (t_w * t_l) - torch.dot(h_w, h_w) / t_w ** 2 if t_w and t_l
                    else torch.tensor(float("nan"), dtype=F64))
    return torch.stack(out), torch.stack(norm)


@pytest.mark.parametrize("rows,width,dim", [(2, 5, 3), (6, 13, 7), (10, 33, 129)])
def test_ches_matches_direct_float64(rows, width, dim):
    g = torch.Generator().manual_seed(rows * 100 + width)
    hidden = torch.randn(rows, width, dim, generator=g, dtype=F64)
    mask = torch.rand(rows, width, generator=g) < 0.6
    mask[:, 0] = True  # no empty response
    b = rows // 2
    ches, norm = ches_scores(hidden, mask)
    want, want_norm = ches_direct(hidden, mask, [(i, b + i) for i in range(b)])
    assert ches.dtype == F64 and ches.shape == (b,) and norm.shape == (b,)
    assert_exact64(ches, want, rtol=1e-12, name="ches")
    assert_exact64(norm, want_norm, rtol=1e-12, name="ches_norm")


def test_ches_explicit_pairs_empty_response_and_errors():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 4, 5, generator=g, dtype=F64)
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[2] = False
    ches, norm = ches_scores(hidden, mask, pairs=[[1, 0], [0, 2]])
    want, _ = ches_direct(hidden, mask, [(1, 0), (0, 2)])
    assert_exact64(ches, want, rtol=1e-12, name="ches")
    assert torch.isnan(norm[1]) and torch.isfinite(norm[0])
    with pytest.raises(ValueError, match="2B rows"):
        ches_scores(hidden, mask)
    with pytest.raises(ValueError, match="loss_mask"):
        ches_scores(hidden, mask[:, :3])
    with pytest.raises(ValueError, match="pairs"):
        ches_scores(hidden, mask, pairs=[[0, 3]])


def test_ches_float32_hidden_accumulates_like_float64_reference():
    g = torch.Generator().manual_seed(5)
    hidden64 = torch.randn(4, 17, 33, generator=g, dtype=F64)
    mask = torch.rand(4, 17, generator=g) < 0.7
    mask[:, 0] = True
    hidden32 = hidden64.float()
    ches32, _ = ches_scores(hidden32, mask)
    truth, _ = ches_direct(hidden32.double(), mask, [(0, 2), (1, 3)])
    # Plain PyTorch in float32 on the same inputs: the error ours may have, up to twice, plus a few ulps.
    sums = (hidden32 * mask[..., None]).sum(1)
    plain = (sums[:2] * sums[2:]).sum(-1) - (sums[:2] * sums[:2]).sum(-1)
    allowed = 2 * (plain.double() - truth).abs() + 8 * torch.finfo(torch.float32).eps * truth.abs().max()
    assert bool(((ches32.double() - truth).abs() <= allowed).all()), (ches32, truth)


def test_preference_logprobs_returns_ches_of_its_hidden_states():
    model = tiny_model("llama", dtype=F64)
    batch = encode_pairs(build_tokenizer(), BUILTIN_PAIRS[:3])
    out = preference_logprobs(model, batch, ches=True)
    assert out.ches.shape == (3,) and not out.ches.requires_grad
    from entangle_fast.preference import backbone_hidden_states, normalize_batch

    ids, mask, labels = normalize_batch(batch)
    with torch.no_grad():
        hidden = backbone_hidden_states(model, ids, mask)[:, :-1]
    want, want_norm = ches_direct(hidden, labels[:, 1:] != -100, [(i, 3 + i) for i in range(3)])
    assert_exact64(out.ches, want, rtol=1e-12, name="ches")
    assert_exact64(out.ches_norm, want_norm, rtol=1e-12, name="ches_norm")
    assert preference_logprobs(model, batch).ches is None


# ----------------------------------------------------------------------------------------------------------------------
# TRL's token-metric reductions


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="requires_trl: pip install entangle-fast[trl]")
def test_token_metric_means_match_trl_reductions_of_full_logits():
    from types import SimpleNamespace

    from entangle_fast.integrations.trl import token_metric_means

    g = torch.Generator().manual_seed(1)
    b, t, v = 3, 9, 37
    logits = torch.randn(2 * b, t, v, generator=g, dtype=F64) * 3
    labels = torch.randint(0, v, (2 * b, t), generator=g)
    labels[torch.rand(2 * b, t, generator=g) < 0.3] = -100
    labels[:b, 0] = logits[:b, 0].argmax(-1)  # some correct predictions
    # Plain-PyTorch per-token quantities (the TokenMetrics fields).
    logp = torch.log_softmax(logits, -1)
    metrics = SimpleNamespace(entropy=-(logp.exp() * logp).sum(-1), logit_sum=logits.sum(-1), argmax=logits.argmax(-1))
    sums = token_metric_means(metrics, labels, v)
    got = {k: (s / c).item() for k, (s, c) in sums.items()}
    # TRL's definitions, directly: masked means over response tokens.
    mask = labels != -100
    want = {
        "entropy": metrics.entropy[mask].mean().item(),
        "logits/chosen": logits[:b][mask[:b]].mean().item(),
        "logits/rejected": logits[b:][mask[b:]].mean().item(),
        "mean_token_accuracy": (logits[:b].argmax(-1) == labels[:b])[mask[:b]].double().mean().item(),
    }
    for key in want:
        assert abs(got[key] - want[key]) <= 1e-6 * max(1.0, abs(want[key])), (key, got[key], want[key])
    assert 0 < got["mean_token_accuracy"] < 1
