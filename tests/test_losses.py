"""Preference losses against independent transcriptions of their published formulas, and a_w/a_l against autograd.

The reference formulas below are written from the papers / TRL definitions in float64 and deliberately use different
primitives from the module (log(sigmoid) instead of softplus, explicit log(1 - exp) and so on).
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import entangle_fast.losses as losses_module
from entangle_fast.losses import (
    LOSSES,
    TRL_LOSS_TYPES,
    PreferenceLossOutput,
    cpo_loss,
    dpo_loss,
    dpop_loss,
    hinge_loss,
    ipo_loss,
    kto_pair_loss,
    loss_coefficients,
    orpo_loss,
    preference_loss,
    rdpo_loss,
    rrhf_loss,
    simpo_loss,
)

F64 = torch.float64


def make_inputs(batch: int, seed: int, dtype: torch.dtype = F64) -> dict[str, torch.Tensor]:
    """Summed log-probs of plausible size, references near the policy, integer lengths; no saturation at beta 0.1."""
    g = torch.Generator().manual_seed(seed)
    chosen_lengths = torch.randint(3, 41, (batch,), generator=g)
    rejected_lengths = torch.randint(3, 41, (batch,), generator=g)
    per_token_w = -(0.2 + 1.3 * torch.rand(batch, generator=g, dtype=F64))
    per_token_l = -(0.2 + 1.3 * torch.rand(batch, generator=g, dtype=F64))
    s_w = per_token_w * chosen_lengths
    s_l = per_token_l * rejected_lengths
    r_w = s_w + 3.0 * torch.randn(batch, generator=g, dtype=F64)
    r_l = s_l + 3.0 * torch.randn(batch, generator=g, dtype=F64)
    return {
        "chosen_logps": s_w.to(dtype),
        "rejected_logps": s_l.to(dtype),
        "ref_chosen_logps": r_w.to(dtype),
        "ref_rejected_logps": r_l.to(dtype),
        "chosen_lengths": chosen_lengths,
        "rejected_lengths": rejected_lengths,
    }


# ---------------------------------------------------------------------------------------------------------------------
# Independent references: (losses, chosen_rewards, rejected_rewards), float64.


def logsig(x):
    return torch.log(torch.sigmoid(x))


def ref_dpo(x, beta=0.1, label_smoothing=0.0, rpo_alpha=None):
    pi = x["chosen_logps"] - x["rejected_logps"]
    ref = x["ref_chosen_logps"] - x["ref_rejected_logps"]
    h = beta * (pi - ref)
    loss = -(1 - label_smoothing) * logsig(h) - label_smoothing * logsig(-h)
    if rpo_alpha is not None:
        loss = loss + rpo_alpha * (-x["chosen_logps"] / x["chosen_lengths"].double())
    rw = beta * (x["chosen_logps"] - x["ref_chosen_logps"])
    return loss, rw, beta * (x["rejected_logps"] - x["ref_rejected_logps"])


def ref_ipo(x, beta=0.1):
    tw, tl = x["chosen_lengths"].double(), x["rejected_lengths"].double()
    pw, pl = x["chosen_logps"] / tw, x["rejected_logps"] / tl
    qw, ql = x["ref_chosen_logps"] / tw, x["ref_rejected_logps"] / tl
    h = (pw - pl) - (qw - ql)
    # Rewards: TRL 1.16 logs beta * (s - r) on the summed log-probs for every loss type, IPO included.
    rw = beta * (x["chosen_logps"] - x["ref_chosen_logps"])
    return (h - 1 / (2 * beta)) ** 2, rw, beta * (x["rejected_logps"] - x["ref_rejected_logps"])


def ref_hinge(x, beta=0.1):
    h = (x["chosen_logps"] - x["ref_chosen_logps"]) - (x["rejected_logps"] - x["ref_rejected_logps"])
    loss = torch.clamp(1 - beta * h, min=0)
    rw = beta * (x["chosen_logps"] - x["ref_chosen_logps"])
    return loss, rw, beta * (x["rejected_logps"] - x["ref_rejected_logps"])


def ref_rdpo(x, beta=0.1, alpha=0.05):
    # Park et al. 2024: -log sigma(beta log-ratio_w - beta log-ratio_l + (alpha |y_w| - alpha |y_l|))
    rw = beta * (x["chosen_logps"] - x["ref_chosen_logps"])
    rl = beta * (x["rejected_logps"] - x["ref_rejected_logps"])
    h = rw - rl + (alpha * x["chosen_lengths"].double() - alpha * x["rejected_lengths"].double())
    return -logsig(h), rw, rl


def ref_simpo(x, beta=0.1, simpo_gamma=0.5, label_smoothing=0.0, cpo_alpha=0.0):
    # Meng et al. 2024: -log sigma(beta/|y_w| log pi(y_w) - beta/|y_l| log pi(y_l) - gamma)
    rw = beta / x["chosen_lengths"].double() * x["chosen_logps"]
    rl = beta / x["rejected_lengths"].double() * x["rejected_logps"]
    h = rw - rl - simpo_gamma
    loss = -(1 - label_smoothing) * logsig(h) - label_smoothing * logsig(-h)
    loss = loss + cpo_alpha * (-x["chosen_logps"] / x["chosen_lengths"].double())
    return loss, rw, rl


def ref_cpo(x, beta=0.1, label_smoothing=0.0, cpo_alpha=1.0):
    # Xu et al. 2024: -log sigma(beta log pi(y_w) - beta log pi(y_l)) - log pi(y_w) (per token here)
    h = beta * x["chosen_logps"] - beta * x["rejected_logps"]
    prefer = -(1 - label_smoothing) * logsig(h) - label_smoothing * logsig(-h)
    bc = -x["chosen_logps"] / x["chosen_lengths"].double()
    return prefer + cpo_alpha * bc, beta * x["chosen_logps"], beta * x["rejected_logps"]


def ref_orpo(x, beta=0.1):
    # Hong et al. 2024: L_SFT + lambda * -log sigma(log(odds(y_w) / odds(y_l))), odds = P / (1 - P), P = exp(mean logp)
    pw = torch.exp(x["chosen_logps"] / x["chosen_lengths"].double())
    pl = torch.exp(x["rejected_logps"] / x["rejected_lengths"].double())
    log_or = torch.log((pw / (1 - pw)) / (pl / (1 - pl)))
    sft = -torch.log(pw)
    return sft - beta * logsig(log_or), beta * torch.log(pw), beta * torch.log(pl)


def ref_dpop(x, beta=0.1, dpop_lambda=50.0):
    # Pal et al. 2024: -log sigma(beta (log-ratio_w - log-ratio_l - lambda max(0, log pi_ref(y_w) / pi(y_w))))
    lw = x["chosen_logps"] - x["ref_chosen_logps"]
    ll = x["rejected_logps"] - x["ref_rejected_logps"]
    penalty = torch.maximum(torch.zeros_like(lw), x["ref_chosen_logps"] - x["chosen_logps"])
    return -logsig(beta * (lw - ll - dpop_lambda * penalty)), beta * lw, beta * ll


def ref_rrhf(x, rrhf_weight=100.0, length_penalty=1.0):
    # Yuan et al. 2023, two candidates: L_rank = max(0, p_l - p_w), p = log-prob / |y|^length_penalty; L_ft = mean NLL.
    pw = x["chosen_logps"] / x["chosen_lengths"].double() ** length_penalty
    pl = x["rejected_logps"] / x["rejected_lengths"].double() ** length_penalty
    rank = torch.where(pl > pw, pl - pw, torch.zeros_like(pw))
    ft = -x["chosen_logps"] / x["chosen_lengths"].double()
    return rrhf_weight * rank + ft, pw, pl


def ref_kto_pair_trl_layout(x, beta=0.1):
    """TRL's kto_pair as laid out there: a [2B] concatenation; KL detached (our documented choice)."""
    cw = x["chosen_logps"] - x["ref_chosen_logps"]
    cl = x["rejected_logps"] - x["ref_rejected_logps"]
    kl_chosen = torch.clamp(cw.mean(), min=0).detach()
    kl_rejected = torch.clamp(cl.mean(), min=0).detach()
    return torch.cat([1 - torch.sigmoid(beta * (cw - kl_rejected)), 1 - torch.sigmoid(beta * (kl_chosen - cl))])


def ref_kto_pair(x, beta=0.1):
    both = ref_kto_pair_trl_layout(x, beta)
    b = x["chosen_logps"].shape[0]
    cw = x["chosen_logps"] - x["ref_chosen_logps"]
    cl = x["rejected_logps"] - x["ref_rejected_logps"]
    return (both[:b] + both[b:]) / 2, beta * cw, beta * cl


# TRL 1.16 DPOTrainer's other loss types, transcribed from their papers' formulas as TRL states them (reverse KL).


def logratios(x):
    return x["chosen_logps"] - x["ref_chosen_logps"], x["rejected_logps"] - x["ref_rejected_logps"]


def trl_rewards(x, beta):
    c, d = logratios(x)
    return beta * c, beta * d


def ref_exo_pair(x, beta=0.1, label_smoothing=1e-3):
    # Ji et al. 2024 eq. 16: KL between softmax over {w, l} of beta * log-ratios and the smoothed target (1 - e, e).
    c, d = logratios(x)
    e = label_smoothing
    q = torch.softmax(torch.stack([beta * c, beta * d]), dim=0)
    loss = q[0] * torch.log(q[0] / (1 - e)) + q[1] * torch.log(q[1] / e)
    return (loss, *trl_rewards(x, beta))


def ref_nca_pair(x, beta=0.1):
    rw, rl = trl_rewards(x, beta)
    return -logsig(rw) - 0.5 * logsig(-rw) - 0.5 * logsig(-rl), rw, rl


def ref_robust(x, beta=0.1, label_smoothing=0.0):
    rw, rl = trl_rewards(x, beta)
    h, e = rw - rl, label_smoothing
    return (-(1 - e) * logsig(h) + e * logsig(-h)) / (1 - 2 * e), rw, rl


def ref_bco_pair(x, beta=0.1):
    rw, rl = trl_rewards(x, beta)
    return -logsig(rw) - logsig(-rl), rw, rl


def ref_sppo_hard(x, beta=0.1):
    c, d = logratios(x)
    return (c - 1 / (2 * beta)) ** 2 + (d + 1 / (2 * beta)) ** 2, beta * c, beta * d


def smoothed(h, e):
    return -(1 - e) * logsig(h) - e * logsig(-h)


def ref_aot(x, beta=0.1, label_smoothing=0.0):
    pi = sorted((x["chosen_logps"] - x["rejected_logps"]).tolist())
    ref = sorted((x["ref_chosen_logps"] - x["ref_rejected_logps"]).tolist())
    h = beta * torch.tensor([p - r for p, r in zip(pi, ref)], dtype=F64)
    return (smoothed(h, label_smoothing), *trl_rewards(x, beta))


def ref_aot_unpaired(x, beta=0.1, label_smoothing=0.0):
    c, d = logratios(x)
    h = beta * torch.tensor([p - r for p, r in zip(sorted(c.tolist()), sorted(d.tolist()))], dtype=F64)
    return (smoothed(h, label_smoothing), *trl_rewards(x, beta))


def ref_apo_zero(x, beta=0.1):
    rw, rl = trl_rewards(x, beta)
    return (1 - torch.sigmoid(rw)) + torch.sigmoid(rl), rw, rl


def ref_apo_down(x, beta=0.1):
    rw, rl = trl_rewards(x, beta)
    return torch.sigmoid(rw) + (1 - torch.sigmoid(rw - rl)), rw, rl


def ref_discopop(x, beta=0.1, discopop_tau=0.05):
    rw, rl = trl_rewards(x, beta)
    h = rw - rl
    m = torch.sigmoid(h / discopop_tau)
    return -logsig(h) * (1 - m) + torch.exp(-h) * m, rw, rl


def ref_sft(x, beta=0.1):
    # Token-weighted NLL of all chosen tokens, expanded to [B]; the references enter the rewards only.
    s_w, t_w = x["chosen_logps"], x["chosen_lengths"].double()
    loss = -(s_w.sum() / t_w.sum()) * torch.ones_like(s_w)
    return (loss, *trl_rewards(x, beta))


def ref_sigmoid_norm(x, beta=0.1):
    c, d = logratios(x)
    h = beta * (c / x["chosen_lengths"].double() - d / x["rejected_lengths"].double())
    return (-logsig(h), beta * c, beta * d)


REFERENCES = {
    "dpo": ref_dpo, "ipo": ref_ipo, "hinge": ref_hinge, "rdpo": ref_rdpo, "simpo": ref_simpo, "cpo": ref_cpo,
    "orpo": ref_orpo, "dpop": ref_dpop, "rrhf": ref_rrhf, "kto_pair": ref_kto_pair,
    "exo_pair": ref_exo_pair, "nca_pair": ref_nca_pair, "robust": ref_robust, "bco_pair": ref_bco_pair,
    "sppo_hard": ref_sppo_hard, "aot": ref_aot, "aot_unpaired": ref_aot_unpaired, "apo_zero": ref_apo_zero,
    "apo_down": ref_apo_down, "discopop": ref_discopop, "sft": ref_sft, "sigmoid_norm": ref_sigmoid_norm,
}

# (name, hyperparameters): defaults first, then non-default settings that switch on every optional term.
CASES = [
    ("dpo", {}),
    ("dpo", {"beta": 0.3, "label_smoothing": 0.1}),
    ("dpo", {"beta": 0.05, "rpo_alpha": 0.7}),
    ("ipo", {}),
    ("ipo", {"beta": 0.5}),
    ("hinge", {}),
    ("hinge", {"beta": 0.25}),
    ("rdpo", {}),
    ("rdpo", {"beta": 0.2, "alpha": 0.01}),
    ("simpo", {}),
    ("simpo", {"beta": 2.0, "simpo_gamma": 1.2, "label_smoothing": 0.15, "cpo_alpha": 1.0}),
    ("cpo", {}),
    ("cpo", {"beta": 0.2, "label_smoothing": 0.2, "cpo_alpha": 0.0}),
    ("orpo", {}),
    ("orpo", {"beta": 0.5}),
    ("dpop", {}),
    ("dpop", {"beta": 0.3, "dpop_lambda": 5.0}),
    ("rrhf", {}),
    ("rrhf", {"rrhf_weight": 1.0, "length_penalty": 0.7}),
    ("kto_pair", {}),
    ("kto_pair", {"beta": 0.4}),
    ("exo_pair", {}),
    ("exo_pair", {"beta": 0.3, "label_smoothing": 0.2}),
    ("nca_pair", {}),
    ("nca_pair", {"beta": 0.5}),
    ("robust", {}),
    ("robust", {"beta": 0.2, "label_smoothing": 0.3}),
    ("bco_pair", {}),
    ("bco_pair", {"beta": 0.05}),
    ("sppo_hard", {}),
    ("sppo_hard", {"beta": 0.7}),
    ("aot", {}),
    ("aot", {"beta": 0.3, "label_smoothing": 0.1}),
    ("aot_unpaired", {}),
    ("aot_unpaired", {"beta": 0.3, "label_smoothing": 0.1}),
    ("apo_zero", {}),
    ("apo_zero", {"beta": 0.4}),
    ("apo_down", {}),
    ("apo_down", {"beta": 0.4}),
    ("discopop", {}),
    ("discopop", {"beta": 0.2, "discopop_tau": 0.5}),
    ("sft", {}),
    ("sft", {"beta": 0.3}),
    ("sigmoid_norm", {}),
    ("sigmoid_norm", {"beta": 2.0}),
]
CASE_IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in h.items()) or 'defaults'}" for n, h in CASES]
FUNCTIONS = {
    "dpo": dpo_loss, "ipo": ipo_loss, "hinge": hinge_loss, "rdpo": rdpo_loss, "simpo": simpo_loss, "cpo": cpo_loss,
    "orpo": orpo_loss, "dpop": dpop_loss, "rrhf": rrhf_loss, "kto_pair": kto_pair_loss,
    **{n: getattr(losses_module, f"{n}_loss") for n in TRL_LOSS_TYPES.values()},
}
SIGMOID_TYPE = ["dpo", "rdpo", "simpo", "cpo", "orpo", "dpop", "kto_pair", "ipo", "robust", "bco_pair", "apo_zero",
                "sigmoid_norm"]


def used_inputs(name: str, x: dict, hyper: dict) -> dict:
    spec = LOSSES[name]
    names = set(spec.inputs)
    if name == "dpo" and hyper.get("rpo_alpha") is not None:
        names.add("chosen_lengths")
    return {k: x[k] for k in names}


def assert_close(actual, expected, *, rtol, atol, what):
    """Fail with the first mismatching index and its error ratio (error / allowed)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual - expected).abs()
    allowed = atol + rtol * expected.abs()
    bad = ~(err <= allowed)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise AssertionError(
            f"{what}: first mismatch at index {i}: got {actual[i].item()!r}, expected {expected[i].item()!r}, "
            f"error/allowed = {(err[i] / allowed[i]).item():.3g}"
        )


# ---------------------------------------------------------------------------------------------------------------------
# Values


@pytest.mark.parametrize("batch", [1, 7])
@pytest.mark.parametrize("name,hyper", CASES, ids=CASE_IDS)
def test_loss_matches_formula(name, hyper, batch):
    x = make_inputs(batch, seed=batch * 101 + len(name))
    out = preference_loss(name, x["chosen_logps"], x["rejected_logps"], **used_inputs(name, x, hyper), **hyper)
    assert isinstance(out, PreferenceLossOutput)
    losses, cr, rr = REFERENCES[name](x, **hyper)
    for got, want, what in ((out.losses, losses, "losses"), (out.chosen_rewards, cr, "chosen_rewards"),
                            (out.rejected_rewards, rr, "rejected_rewards")):
        assert got.dtype == F64 and got.shape == (batch,), f"{name} {what}: {got.dtype} {tuple(got.shape)}"
        assert_close(got, want, rtol=1e-12, atol=1e-13, what=f"{name} {what}")
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad


@pytest.mark.parametrize("name,hyper", CASES, ids=CASE_IDS)
def test_named_function_equals_dispatcher(name, hyper):
    x = make_inputs(5, seed=3)
    a = FUNCTIONS[name](x["chosen_logps"], x["rejected_logps"], **used_inputs(name, x, hyper), **hyper)
    b = LOSSES[name](x["chosen_logps"], x["rejected_logps"], **used_inputs(name, x, hyper), **hyper)
    c = preference_loss(name, x["chosen_logps"], x["rejected_logps"],
                        **{k: v for k, v in x.items() if k not in ("chosen_logps", "rejected_logps")}, **hyper)
    for other in (b, c):
        assert torch.equal(a.losses, other.losses)
        assert torch.equal(a.chosen_rewards, other.chosen_rewards)


def test_nll_field_is_the_per_pair_mean_nll():
    x = make_inputs(7, seed=11)
    nll = -x["chosen_logps"] / x["chosen_lengths"]
    with_nll = {"cpo": {}, "orpo": {}, "rrhf": {}, "dpo": {"rpo_alpha": 1.0}, "simpo": {"cpo_alpha": 2.0}}
    for name, hyper in with_nll.items():
        out = preference_loss(name, x["chosen_logps"], x["rejected_logps"], **used_inputs(name, x, hyper), **hyper)
        assert_close(out.nll, nll, rtol=1e-14, atol=0, what=f"{name} nll")
    for name in ("dpo", "ipo", "hinge", "rdpo", "simpo", "dpop", "kto_pair"):
        out = preference_loss(name, x["chosen_logps"], x["rejected_logps"], **used_inputs(name, x, {}))
        assert out.nll is None, name
    # The CPO BC term enters linearly with weight cpo_alpha.
    a = cpo_loss(x["chosen_logps"], x["rejected_logps"], x["chosen_lengths"], cpo_alpha=2.5).losses
    b = cpo_loss(x["chosen_logps"], x["rejected_logps"], x["chosen_lengths"], cpo_alpha=0.0).losses
    assert_close(a - b, 2.5 * nll, rtol=1e-12, atol=1e-13, what="cpo bc term")


def test_kto_pair_batch_mean_equals_trl_concatenated_mean():
    x = make_inputs(7, seed=5)
    ours = kto_pair_loss(x["chosen_logps"], x["rejected_logps"], x["ref_chosen_logps"], x["ref_rejected_logps"])
    trl = ref_kto_pair_trl_layout(x)
    assert trl.shape == (14,)
    assert math.isclose(ours.losses.mean().item(), trl.mean().item(), rel_tol=1e-13)


def test_low_precision_inputs_compute_in_float32():
    """bf16 log-probs: outputs are float32 and match float64 math on the same (rounded) inputs to float32 accuracy."""
    x16 = make_inputs(7, seed=9, dtype=torch.bfloat16)
    x64 = {k: (v.double() if v.is_floating_point() else v) for k, v in x16.items()}
    for name in LOSSES:
        out = preference_loss(name, x16["chosen_logps"], x16["rejected_logps"], **used_inputs(name, x16, {}))
        want = REFERENCES[name](x64)[0]
        assert out.losses.dtype == torch.float32, name
        # float32 rounding of inputs of size ~60 and of intermediate sums; far below bf16's own 2^-8.
        assert_close(out.losses, want, rtol=1e-5, atol=1e-5, what=f"{name} bf16->fp32")


# ---------------------------------------------------------------------------------------------------------------------
# Coefficients a_w, a_l


@pytest.mark.parametrize("batch", [1, 7])
@pytest.mark.parametrize("name,hyper", CASES, ids=CASE_IDS)
def test_coefficients_match_autograd(name, hyper, batch):
    x = make_inputs(batch, seed=batch * 31 + len(hyper))
    s_w = x["chosen_logps"].clone().requires_grad_(True)
    s_l = x["rejected_logps"].clone().requires_grad_(True)
    extra = used_inputs(name, x, hyper)
    out = preference_loss(name, s_w, s_l, **extra, **hyper)
    g_w, g_l = torch.autograd.grad(out.losses.sum(), (s_w, s_l), allow_unused=True)
    g_l = torch.zeros_like(s_l) if g_l is None else g_l  # sft: the rejected response does not enter
    a_w, a_l = loss_coefficients(name, x["chosen_logps"], x["rejected_logps"], **extra, **hyper)
    assert a_w.shape == (batch,) and a_l.shape == (batch,) and not a_w.requires_grad
    assert_close(a_w, g_w, rtol=1e-12, atol=1e-15, what=f"{name} a_w")
    assert_close(a_l, g_l, rtol=1e-12, atol=1e-15, what=f"{name} a_l")


@pytest.mark.parametrize("name", [n for n, s in LOSSES.items() if s.per_pair])
def test_each_pair_loss_depends_only_on_its_own_pair(name):
    """d losses[i] / d s[j] = 0 for i != j, so the per-pair a_w, a_l are the whole story (kto_pair: KL detached)."""
    x = make_inputs(7, seed=2)
    extra = used_inputs(name, x, {})

    def f(s_w, s_l):
        return preference_loss(name, s_w, s_l, **extra).losses

    j_w, j_l = torch.autograd.functional.jacobian(f, (x["chosen_logps"], x["rejected_logps"]))
    off = ~torch.eye(7, dtype=torch.bool)
    assert torch.count_nonzero(j_w[off]) == 0 and torch.count_nonzero(j_l[off]) == 0


@pytest.mark.parametrize("name", SIGMOID_TYPE)
def test_sigmoid_type_sign_pattern(name):
    x = make_inputs(7, seed=17)
    a_w, a_l = loss_coefficients(name, x["chosen_logps"], x["rejected_logps"], **used_inputs(name, x, {}))
    assert bool((a_w < 0).all()) and bool((a_l > 0).all()), f"{name}: a_w={a_w.tolist()} a_l={a_l.tolist()}"


def test_dpo_coefficients_are_opposite_and_match_math_md():
    x = make_inputs(7, seed=4)
    a_w, a_l = loss_coefficients("dpo", x["chosen_logps"], x["rejected_logps"], **used_inputs("dpo", x, {}), beta=0.2)
    u = (x["chosen_logps"] - x["ref_chosen_logps"]) - (x["rejected_logps"] - x["ref_rejected_logps"])
    assert_close(a_w, -0.2 * torch.sigmoid(-0.2 * u), rtol=1e-14, atol=0, what="dpo a_w")
    assert torch.equal(a_l, -a_w)


def test_hinge_coefficients_vanish_when_margin_met():
    x = make_inputs(6, seed=8)
    # Pairs 0-2 meet the margin (beta * u = 1.5), pairs 3-5 do not (beta * u = 0.5).
    beta = 0.1
    u = torch.tensor([15.0, 15.0, 15.0, 5.0, 5.0, 5.0], dtype=F64)
    ref_chosen = x["chosen_logps"] - x["rejected_logps"] + x["ref_rejected_logps"] - u
    args = (x["chosen_logps"], x["rejected_logps"])
    kw = {"ref_chosen_logps": ref_chosen, "ref_rejected_logps": x["ref_rejected_logps"]}
    a_w, a_l = loss_coefficients("hinge", *args, **kw, beta=beta)
    loss = preference_loss("hinge", *args, **kw, beta=beta).losses
    assert torch.equal(a_w[:3], torch.zeros(3, dtype=F64)) and torch.equal(a_l[:3], torch.zeros(3, dtype=F64))
    assert torch.equal(loss[:3], torch.zeros(3, dtype=F64))
    assert torch.equal(a_w[3:], torch.full((3,), -beta, dtype=F64))
    assert torch.equal(a_l[3:], torch.full((3,), beta, dtype=F64))


def test_dpop_penalty_scales_the_chosen_pull():
    x = make_inputs(2, seed=1)
    s_w = torch.tensor([-20.0, -20.0], dtype=F64)
    r_w = torch.tensor([-22.0, -18.0], dtype=F64)  # pair 0 above the reference, pair 1 below it
    kw = {"ref_chosen_logps": r_w, "ref_rejected_logps": x["ref_rejected_logps"], "beta": 0.1, "dpop_lambda": 5.0}
    a_w, a_l = loss_coefficients("dpop", s_w, x["rejected_logps"], **kw)
    assert math.isclose(a_w[0].item(), -a_l[0].item(), rel_tol=1e-14)
    assert math.isclose(a_w[1].item(), -6.0 * a_l[1].item(), rel_tol=1e-14)


def test_rrhf_rejected_coefficient_vanishes_when_ranked():
    lengths = torch.tensor([10, 10])
    s_w = torch.tensor([-5.0, -20.0], dtype=F64)  # pair 0 ranked right, pair 1 wrong
    s_l = torch.tensor([-10.0, -10.0], dtype=F64)
    a_w, a_l = loss_coefficients("rrhf", s_w, s_l, chosen_lengths=lengths, rejected_lengths=lengths)
    assert a_l[0].item() == 0.0 and a_l[1].item() == pytest.approx(10.0)
    assert a_w[0].item() == pytest.approx(-0.1) and a_w[1].item() == pytest.approx(-10.1)


# ---------------------------------------------------------------------------------------------------------------------
# Properties


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(-200, -0.5), min_size=4, max_size=4),
    st.floats(0.01, 2.0),
    st.floats(0.0, 0.5),
    st.floats(-50, 50),
)
def test_dpo_margin_symmetry(vals, beta, eps, shift):
    s_w, s_l, r_w, r_l = (torch.tensor([v], dtype=F64) for v in vals)
    fwd = dpo_loss(s_w, s_l, r_w, r_l, beta=beta, label_smoothing=eps).losses
    swapped = dpo_loss(s_l, s_w, r_l, r_w, beta=beta, label_smoothing=eps).losses
    z = beta * ((s_w - r_w) - (s_l - r_l))
    # L(-z) - L(z) = (1 - 2 eps) z for the label-smoothed logistic loss.
    assert_close(swapped - fwd, (1 - 2 * eps) * z, rtol=1e-9, atol=1e-9, what="dpo swap")
    # Only the margin matters: shifting both policy log-probs together changes nothing.
    shifted = dpo_loss(s_w + shift, s_l + shift, r_w, r_l, beta=beta, label_smoothing=eps).losses
    assert_close(shifted, fwd, rtol=1e-9, atol=1e-12, what="dpo shift")


# ---------------------------------------------------------------------------------------------------------------------
# Errors


def test_unknown_loss_name_lists_known():
    x = make_inputs(2, seed=0)
    with pytest.raises(ValueError, match="known losses: dpo, ipo, hinge"):
        preference_loss("dpp", x["chosen_logps"], x["rejected_logps"])
    with pytest.raises(ValueError, match="name"):
        loss_coefficients("nope", x["chosen_logps"], x["rejected_logps"])


def test_aliases_resolve():
    x = make_inputs(3, seed=0)
    kw = used_inputs("dpo", x, {})
    assert torch.equal(preference_loss("sigmoid", x["chosen_logps"], x["rejected_logps"], **kw).losses,
                       preference_loss("dpo", x["chosen_logps"], x["rejected_logps"], **kw).losses)


@pytest.mark.parametrize("name", list(LOSSES))
def test_missing_needed_input_is_named(name):
    x = make_inputs(3, seed=0)
    needed = used_inputs(name, x, {})
    assert set(needed) == set(LOSSES[name].inputs)
    preference_loss(name, x["chosen_logps"], x["rejected_logps"], **needed)  # the record is sufficient
    for arg in needed:
        partial = {k: v for k, v in needed.items() if k != arg}
        with pytest.raises(ValueError, match=arg):
            preference_loss(name, x["chosen_logps"], x["rejected_logps"], **partial)
        with pytest.raises(ValueError, match=arg):
            FUNCTIONS[name](x["chosen_logps"], x["rejected_logps"], **partial)


def test_records_describe_inputs():
    trl_pairwise = {"exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired", "apo_zero",
                    "apo_down", "discopop", "sigmoid_norm", "sft"}
    assert {n for n, s in LOSSES.items() if s.needs_reference} == {"dpo", "ipo", "hinge", "rdpo", "dpop",
                                                                   "kto_pair"} | trl_pairwise
    assert {n for n, s in LOSSES.items() if s.needs_lengths} == {"ipo", "rdpo", "simpo", "cpo", "orpo", "rrhf",
                                                                 "sft", "sigmoid_norm"}
    assert LOSSES["cpo"].inputs == ("chosen_lengths",)
    assert LOSSES["dpo"].optional_inputs == ("chosen_lengths",)
    assert LOSSES["simpo"].hyper["simpo_gamma"] == 0.5 and LOSSES["cpo"].hyper["cpo_alpha"] == 1.0


def test_rpo_alpha_needs_chosen_lengths():
    x = make_inputs(3, seed=0)
    with pytest.raises(ValueError, match="chosen_lengths"):
        preference_loss("dpo", x["chosen_logps"], x["rejected_logps"], ref_chosen_logps=x["ref_chosen_logps"],
                        ref_rejected_logps=x["ref_rejected_logps"], rpo_alpha=1.0)


@pytest.mark.parametrize("arg", ["rejected_logps", "ref_chosen_logps", "ref_rejected_logps", "chosen_lengths",
                                 "rejected_lengths"])
def test_mismatched_shapes_are_named(arg):
    x = make_inputs(4, seed=0)
    x[arg] = x[arg][:3]
    kw = {k: v for k, v in x.items() if k not in ("chosen_logps", "rejected_logps")}
    name = "ipo"  # uses every input
    with pytest.raises(ValueError, match=arg):
        preference_loss(name, x["chosen_logps"], x["rejected_logps"], **kw)


def test_non_1d_logps_rejected():
    x = make_inputs(4, seed=0)
    with pytest.raises(ValueError, match="chosen_logps"):
        preference_loss("simpo", x["chosen_logps"][None], x["rejected_logps"][None],
                        chosen_lengths=x["chosen_lengths"][None], rejected_lengths=x["rejected_lengths"][None])


@pytest.mark.parametrize("arg", ["chosen_lengths", "rejected_lengths"])
@pytest.mark.parametrize("bad", [0, -3])
def test_non_positive_lengths_are_named(arg, bad):
    x = make_inputs(4, seed=0)
    x[arg] = x[arg].clone()
    x[arg][2] = bad
    with pytest.raises(ValueError, match=arg):
        simpo_loss(x["chosen_logps"], x["rejected_logps"], x["chosen_lengths"], x["rejected_lengths"])


@pytest.mark.parametrize("name", [n for n, s in LOSSES.items() if "beta" in s.hyper])
@pytest.mark.parametrize("beta", [0.0, -0.1])
def test_non_positive_beta(name, beta):
    x = make_inputs(3, seed=0)
    with pytest.raises(ValueError, match="beta"):
        preference_loss(name, x["chosen_logps"], x["rejected_logps"], **used_inputs(name, x, {}), beta=beta)
    with pytest.raises(ValueError, match="beta"):
        loss_coefficients(name, x["chosen_logps"], x["rejected_logps"], **used_inputs(name, x, {}), beta=beta)


def test_bad_hyperparameters():
    x = make_inputs(3, seed=0)
    kw = used_inputs("dpo", x, {})
    with pytest.raises(ValueError, match="gamma"):
        preference_loss("dpo", x["chosen_logps"], x["rejected_logps"], **kw, gamma=0.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        preference_loss("dpo", x["chosen_logps"], x["rejected_logps"], **kw, label_smoothing=0.7)
    with pytest.raises(ValueError, match="dpop_lambda"):
        dpop_loss(x["chosen_logps"], x["rejected_logps"], **kw, dpop_lambda=-1.0)


def test_orpo_rejects_non_negative_average_logps():
    lengths = torch.tensor([4, 4])
    with pytest.raises(ValueError, match="rejected_logps"):
        orpo_loss(torch.tensor([-3.0, -2.0], dtype=F64), torch.tensor([-1.0, 0.0], dtype=F64), lengths, lengths)
