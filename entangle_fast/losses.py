"""Margin-based preference losses and their closed-form log-prob coefficients (docs/math.md section 2).

Every loss here is a function of per-pair scalars, all ``[B]``:

    s_w, s_l   policy log-probs of the chosen / rejected response, SUMMED over response tokens
    r_w, r_l   reference log-probs (same convention), for the losses that use a reference
    T_w, T_l   response token counts, for the losses that average log-probs or carry an NLL term

``losses`` is the per-pair loss L_i; a trainer's scalar loss is ``losses.mean()``. The first-order dynamics of section 2
need a_w = dL_i/ds_w and a_l = dL_i/ds_l; :func:`loss_coefficients` returns them in closed form, always with respect
to the summed log-probs (losses that average get the 1/T of the chain rule). The gradient of ``losses.mean()`` with
respect to s is a / B.

| name     | L_i (z is the argument of the sigmoid)                                   | TRL defaults matched          |
|----------|--------------------------------------------------------------------------|-------------------------------|
| dpo      | (1-e) softplus(-z) + e softplus(z), z = beta [(s_w-r_w) - (s_l-r_l)]     | beta 0.1, label_smoothing 0   |
|          | + rpo_alpha * nll (optional)                                             | rpo_alpha None                |
| ipo      | (x - 1/(2 beta))^2, x = (s_w-r_w)/T_w - (s_l-r_l)/T_l                    | beta 0.1                      |
| hinge    | relu(1 - z), z as dpo (SLiC)                                             | beta 0.1                      |
| rdpo     | softplus(-z), z = beta [(s_w-r_w) - (s_l-r_l)] + alpha (T_w - T_l)       | (not in TRL) beta 0.1         |
| simpo    | smoothed softplus(-z), z = beta (s_w/T_w - s_l/T_l) - simpo_gamma        | beta 0.1, simpo_gamma 0.5     |
| cpo      | smoothed softplus(-z) + cpo_alpha * nll, z = beta (s_w - s_l)            | beta 0.1, cpo_alpha 1.0       |
| orpo     | nll - beta logsigmoid(log_odds(s_w/T_w) - log_odds(s_l/T_l))             | beta 0.1                      |
| dpop     | softplus(-z), z = beta [(s_w-r_w) - (s_l-r_l) - lambda relu(r_w - s_w)]  | (not in TRL) beta 0.1         |
| rrhf     | rrhf_weight relu(p_l - p_w) + nll, p = s / T^length_penalty              | (not in TRL) RRHF's own       |
| kto_pair | [1 - sig(beta(s_w-r_w - KL_l))] / 2 + [1 - sig(beta(KL_w - (s_l-r_l)))] / 2 | beta 0.1                   |

Conventions shared by every loss:

- NLL term: ``nll = -s_w / T_w``, the mean negative log-likelihood of the chosen response's tokens, per pair. TRL
  computes its NLL terms (CPO's BC term, ORPO's NLL, DPO's ``rpo_alpha``) as one token-weighted cross-entropy over all
  chosen tokens of the batch (ORPO's even includes the prompt tokens); here it is per pair and response-only, so the
  batch mean weights every pair equally. The two agree when all chosen responses have the same length.
- Rewards (``chosen_rewards``, ``rejected_rewards``) follow TRL's logging conventions and are detached.
- Computation runs in at least float32 (float64 stays float64); outputs are in that dtype.
- Only the policy log-probs s carry the coefficients; reference log-probs and lengths are treated as constants.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "PreferenceLossOutput",
    "LossSpec",
    "LOSSES",
    "preference_loss",
    "loss_coefficients",
    "dpo_loss",
    "ipo_loss",
    "hinge_loss",
    "rdpo_loss",
    "simpo_loss",
    "cpo_loss",
    "orpo_loss",
    "dpop_loss",
    "rrhf_loss",
    "kto_pair_loss",
]


@dataclass
class PreferenceLossOutput:
    """Per-pair result of a preference loss.

    Attributes:
        losses: ``[B]`` per-pair loss L_i, differentiable with respect to the policy log-probs (and everything else
            passed in). The training loss is ``losses.mean()``.
        chosen_rewards / rejected_rewards: ``[B]`` detached implicit rewards, TRL's logging convention for the loss.
        nll: ``[B]`` detached mean NLL of the chosen response, ``-s_w / T_w``, for the losses that carry an NLL term
            (cpo, orpo, rrhf; dpo with ``rpo_alpha``; simpo with ``cpo_alpha > 0``); its weighted contribution is
            already inside ``losses``. None otherwise.
    """

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    nll: Tensor | None = None


# --------------------------------------------------------------------------------------------------------------------
# Input and hyperparameter checks


@dataclass
class _Batch:
    s_w: Tensor
    s_l: Tensor
    r_w: Tensor | None
    r_l: Tensor | None
    T_w: Tensor | None
    T_l: Tensor | None


def _batch(
    loss: str,
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    *,
    reference: bool = False,
    lengths: tuple[bool, bool] = (False, False),
) -> _Batch:
    """Validate the inputs of ``loss``; bring them to one dtype and device. ``lengths``: (chosen, rejected) needed."""
    if not isinstance(chosen_logps, Tensor):
        raise ValueError(
            f"{loss}: `chosen_logps` must be a torch.Tensor of shape [B], got {type(chosen_logps).__name__}"
        )
    if chosen_logps.dim() != 1:
        raise ValueError(f"{loss}: `chosen_logps` must have shape [B], got {tuple(chosen_logps.shape)}")
    if not chosen_logps.is_floating_point():
        raise ValueError(f"{loss}: `chosen_logps` must be floating point, got {chosen_logps.dtype}")
    shape = tuple(chosen_logps.shape)
    dtype = torch.promote_types(chosen_logps.dtype, torch.float32)
    device = chosen_logps.device

    def tensor(arg: str, value: Any, needed: bool, why: str, positive: bool = False) -> Tensor | None:
        if value is None:
            if needed:
                raise ValueError(f"{loss} needs `{arg}` ({why}), got None")
            return None
        if not needed:
            return None
        t = torch.as_tensor(value, device=device)
        if tuple(t.shape) != shape:
            raise ValueError(
                f"{loss}: `{arg}` has shape {tuple(t.shape)}, expected {shape} (the shape of `chosen_logps`)"
            )
        if not positive and not t.is_floating_point():
            raise ValueError(f"{loss}: `{arg}` must be a floating-point tensor, got {t.dtype}")
        t = t.to(dtype)
        # A length of zero would divide by zero; NaN fails the comparison too.
        if positive and t.numel() and not bool((t > 0).all()):
            raise ValueError(f"{loss}: `{arg}` must be positive response-token counts, got minimum {t.min().item()}")
        return t

    s_l = tensor("rejected_logps", rejected_logps, True, "policy log-probs of the rejected responses")
    r_w = tensor("ref_chosen_logps", ref_chosen_logps, reference, "reference log-probs of the chosen responses")
    r_l = tensor("ref_rejected_logps", ref_rejected_logps, reference, "reference log-probs of the rejected responses")
    T_w = tensor("chosen_lengths", chosen_lengths, lengths[0], "chosen response-token counts", positive=True)
    T_l = tensor("rejected_lengths", rejected_lengths, lengths[1], "rejected response-token counts", positive=True)
    return _Batch(chosen_logps.to(dtype), s_l, r_w, r_l, T_w, T_l)


def _finite(arg: str, value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"`{arg}` must be a real number, got {value!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"`{arg}` must be finite, got {v}")
    return v


def _positive(arg: str, value: Any) -> float:
    v = _finite(arg, value)
    if v <= 0:
        raise ValueError(f"`{arg}` must be > 0, got {v}")
    return v


def _non_negative(arg: str, value: Any) -> float:
    v = _finite(arg, value)
    if v < 0:
        raise ValueError(f"`{arg}` must be >= 0, got {v}")
    return v


def _smoothing(value: Any) -> float:
    v = _finite("label_smoothing", value)
    if not 0.0 <= v <= 0.5:
        raise ValueError(f"`label_smoothing` must be in [0, 0.5] (the assumed fraction of flipped labels), got {v}")
    return v


# --------------------------------------------------------------------------------------------------------------------
# Shared pieces


def _smoothed_nll(z: Tensor, eps: float) -> Tensor:
    """-(1-eps) log sigmoid(z) - eps log sigmoid(-z): the conservative (label-smoothed) logistic loss of a margin z."""
    # logsigmoid, not softplus: F.softplus switches to the identity above 20 and drops terms of order e^-20.
    loss = -F.logsigmoid(z)
    if eps:
        loss = (1.0 - eps) * loss - eps * F.logsigmoid(-z)
    return loss


def _smoothed_nll_grad(z: Tensor, eps: float) -> Tensor:
    """d/dz of :func:`_smoothed_nll`: -(1-eps) sigmoid(-z) + eps sigmoid(z); negative while z < log((1-eps)/eps)."""
    return -(1.0 - eps) * torch.sigmoid(-z) + eps * torch.sigmoid(z)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, switching form at -log 2 to keep precision at both ends."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


@dataclass
class _Result:
    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    nll: Tensor | None
    a_w: Tensor
    a_l: Tensor

    def output(self) -> PreferenceLossOutput:
        nll = None if self.nll is None else self.nll.detach()
        return PreferenceLossOutput(self.losses, self.chosen_rewards.detach(), self.rejected_rewards.detach(), nll)


# Each _name(b, **hyper) computes the loss and, next to it, its closed-form a_w, a_l from detached intermediates.


def _dpo(b: _Batch, beta: float = 0.1, label_smoothing: float = 0.0, rpo_alpha: float | None = None) -> _Result:
    beta, eps = _positive("beta", beta), _smoothing(label_smoothing)
    if rpo_alpha is not None:
        rpo_alpha = _non_negative("rpo_alpha", rpo_alpha)
        if b.T_w is None:
            raise ValueError("dpo with `rpo_alpha` needs `chosen_lengths` (the NLL term is -s_w / T_w), got None")
    z = beta * ((b.s_w - b.r_w) - (b.s_l - b.r_l))
    losses = _smoothed_nll(z, eps)
    a_w = beta * _smoothed_nll_grad(z.detach(), eps)
    a_l = -a_w
    nll = None
    if rpo_alpha is not None:
        nll = -b.s_w / b.T_w
        losses = losses + rpo_alpha * nll
        a_w = a_w - rpo_alpha / b.T_w
    return _Result(losses, beta * (b.s_w - b.r_w), beta * (b.s_l - b.r_l), nll, a_w, a_l)


def _ipo(b: _Batch, beta: float = 0.1) -> _Result:
    beta = _positive("beta", beta)
    chosen = (b.s_w - b.r_w) / b.T_w
    rejected = (b.s_l - b.r_l) / b.T_l
    gap = (chosen - rejected) - 1.0 / (2.0 * beta)
    g = 2.0 * gap.detach()
    return _Result(gap.square(), beta * chosen, beta * rejected, None, g / b.T_w, -g / b.T_l)


def _hinge(b: _Batch, beta: float = 0.1) -> _Result:
    beta = _positive("beta", beta)
    z = beta * ((b.s_w - b.r_w) - (b.s_l - b.r_l))
    slack = 1.0 - z
    # relu's derivative at exactly 0 is 0 in PyTorch; the strict comparison keeps autograd and closed form equal.
    active = (slack.detach() > 0).to(z.dtype)
    a_l = beta * active
    return _Result(torch.relu(slack), beta * (b.s_w - b.r_w), beta * (b.s_l - b.r_l), None, -a_l, a_l)


def _rdpo(b: _Batch, beta: float = 0.1, alpha: float = 0.05) -> _Result:
    beta, alpha = _positive("beta", beta), _finite("alpha", alpha)
    z = beta * ((b.s_w - b.r_w) - (b.s_l - b.r_l)) + alpha * (b.T_w - b.T_l)
    w = beta * torch.sigmoid(-z.detach())
    return _Result(-F.logsigmoid(z), beta * (b.s_w - b.r_w), beta * (b.s_l - b.r_l), None, -w, w)


def _simpo(
    b: _Batch, beta: float = 0.1, simpo_gamma: float = 0.5, label_smoothing: float = 0.0, cpo_alpha: float = 0.0
) -> _Result:
    beta, gamma = _positive("beta", beta), _finite("simpo_gamma", simpo_gamma)
    eps, cpo_alpha = _smoothing(label_smoothing), _non_negative("cpo_alpha", cpo_alpha)
    m_w, m_l = b.s_w / b.T_w, b.s_l / b.T_l
    z = beta * (m_w - m_l) - gamma
    losses = _smoothed_nll(z, eps)
    g = beta * _smoothed_nll_grad(z.detach(), eps)
    a_w, a_l = g / b.T_w, -g / b.T_l
    nll = None
    if cpo_alpha > 0:
        nll = -m_w
        losses = losses + cpo_alpha * nll
        a_w = a_w - cpo_alpha / b.T_w
    return _Result(losses, beta * m_w, beta * m_l, nll, a_w, a_l)


def _cpo(b: _Batch, beta: float = 0.1, label_smoothing: float = 0.0, cpo_alpha: float = 1.0) -> _Result:
    beta, eps, cpo_alpha = _positive("beta", beta), _smoothing(label_smoothing), _non_negative("cpo_alpha", cpo_alpha)
    z = beta * (b.s_w - b.s_l)
    nll = -b.s_w / b.T_w
    g = beta * _smoothed_nll_grad(z.detach(), eps)
    return _Result(_smoothed_nll(z, eps) + cpo_alpha * nll, beta * b.s_w, beta * b.s_l, nll, g - cpo_alpha / b.T_w, -g)


def _orpo(b: _Batch, beta: float = 0.1) -> _Result:
    beta = _positive("beta", beta)
    m_w, m_l = b.s_w / b.T_w, b.s_l / b.T_l
    for arg, m in (("chosen_logps", m_w), ("rejected_logps", m_l)):
        if m.numel() and not bool((m < 0).all()):
            raise ValueError(
                f"orpo: `{arg}` must be negative (the odds p / (1 - p) of an average log-prob >= 0 are infinite), "
                f"got maximum {m.max().item()} per token"
            )
    log_odds = (m_w - m_l) - (_log1mexp(m_w) - _log1mexp(m_l))
    nll = -m_w
    losses = nll - beta * F.logsigmoid(log_odds)
    # d log_odds / d m = 1 / (1 - e^m) = -1 / expm1(m) for the chosen side, minus that for the rejected side.
    q = beta * torch.sigmoid(-log_odds.detach())
    a_w = (-1.0 + q / torch.expm1(m_w.detach())) / b.T_w
    a_l = (-q / torch.expm1(m_l.detach())) / b.T_l
    return _Result(losses, beta * m_w, beta * m_l, nll, a_w, a_l)


def _dpop(b: _Batch, beta: float = 0.1, dpop_lambda: float = 50.0) -> _Result:
    beta, lam = _positive("beta", beta), _non_negative("dpop_lambda", dpop_lambda)
    drop = b.r_w - b.s_w  # > 0 when the policy has lowered the chosen response below the reference
    z = beta * ((b.s_w - b.r_w) - (b.s_l - b.r_l) - lam * torch.relu(drop))
    w = beta * torch.sigmoid(-z.detach())
    a_w = -w * (1.0 + lam * (drop.detach() > 0).to(z.dtype))
    return _Result(-F.logsigmoid(z), beta * (b.s_w - b.r_w), beta * (b.s_l - b.r_l), None, a_w, w)


def _rrhf(b: _Batch, rrhf_weight: float = 100.0, length_penalty: float = 1.0) -> _Result:
    weight, power = _non_negative("rrhf_weight", rrhf_weight), _finite("length_penalty", length_penalty)
    d_w, d_l = b.T_w.pow(power), b.T_l.pow(power)
    p_w, p_l = b.s_w / d_w, b.s_l / d_l
    gap = p_l - p_w
    nll = -b.s_w / b.T_w
    active = weight * (gap.detach() > 0).to(gap.dtype)
    return _Result(weight * torch.relu(gap) + nll, p_w, p_l, nll, -active / d_w - 1.0 / b.T_w, active / d_l)


def _kto_pair(b: _Batch, beta: float = 0.1) -> _Result:
    beta = _positive("beta", beta)
    chosen, rejected = b.s_w - b.r_w, b.s_l - b.r_l
    # Batch KL estimates, detached as in KTO (the paper and TRL's KTOTrainer do not backpropagate through them).
    kl_w = chosen.detach().mean().clamp(min=0)
    kl_l = rejected.detach().mean().clamp(min=0)
    u = beta * (chosen - kl_l)
    v = beta * (kl_w - rejected)
    losses = 0.5 * (torch.sigmoid(-u) + torch.sigmoid(-v))  # 1 - sigmoid(x) == sigmoid(-x)
    su, sv = torch.sigmoid(u.detach()), torch.sigmoid(v.detach())
    a_w = -0.5 * beta * su * (1.0 - su)
    a_l = 0.5 * beta * sv * (1.0 - sv)
    return _Result(losses, beta * chosen, beta * rejected, None, a_w, a_l)


# --------------------------------------------------------------------------------------------------------------------
# Public per-loss functions


def dpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    rpo_alpha: float | None = None,
    chosen_lengths: Tensor | None = None,
) -> PreferenceLossOutput:
    """DPO (TRL ``loss_type="sigmoid"``), with conservative label smoothing (cDPO) and TRL's optional RPO NLL term.

    z = beta * [(s_w - r_w) - (s_l - r_l)] on summed log-probs;
    L = (1 - label_smoothing) * softplus(-z) + label_smoothing * softplus(z)  [+ rpo_alpha * (-s_w / T_w)].

    Defaults are TRL's DPOConfig: beta 0.1, label_smoothing 0, rpo_alpha None. Deviation: the ``rpo_alpha`` NLL is
    the per-pair mean -s_w / T_w (``chosen_lengths`` required), not TRL's token-weighted batch cross-entropy.
    TRL's ``ld_alpha`` (LD-DPO) reweights tokens inside a response and cannot be formed from sums; it is not offered.
    Rewards: beta * (s - r).
    """
    b = _batch("dpo", chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_lengths,
               reference=True, lengths=(rpo_alpha is not None, False))
    return _dpo(b, beta=beta, label_smoothing=label_smoothing, rpo_alpha=rpo_alpha).output()


def ipo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    *,
    beta: float = 0.1,
) -> PreferenceLossOutput:
    """IPO (Azar et al. 2023, eq. 17; TRL ``loss_type="ipo"``): L = (x - 1 / (2 beta))^2.

    Length-normalised as TRL does: x = (s_w - r_w) / T_w - (s_l - r_l) / T_l, i.e. per-token average log-probs of
    policy and reference. Default beta 0.1 (TRL). Rewards: beta * (s - r) / T, the averaged log-ratios TRL logs.
    Inside the target margin (x < 1/(2 beta)) a_w < 0 < a_l; beyond it IPO pulls the margin back and the signs flip.
    """
    b = _batch("ipo", chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_lengths,
               rejected_lengths, reference=True, lengths=(True, True))
    return _ipo(b, beta=beta).output()


def hinge_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    beta: float = 0.1,
) -> PreferenceLossOutput:
    """Hinge / SLiC (TRL ``loss_type="hinge"``): L = relu(1 - beta * [(s_w - r_w) - (s_l - r_l)]).

    Summed log-probs, default beta 0.1 (TRL; beta is the reciprocal of SLiC's margin delta). Once the margin is
    met the pair contributes nothing: a_w = a_l = 0. Rewards: beta * (s - r).
    """
    b = _batch("hinge", chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, reference=True)
    return _hinge(b, beta=beta).output()


def rdpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    *,
    beta: float = 0.1,
    alpha: float = 0.05,
) -> PreferenceLossOutput:
    """R-DPO, length-regularised DPO (Park et al. 2024, arXiv 2403.19159).

    z = beta * [(s_w - r_w) - (s_l - r_l)] + alpha * (T_w - T_l);  L = softplus(-z).

    The length term enters with a plus sign: a reward penalised by alpha * |y| makes the implicit DPO reward
    r = beta * log-ratio + alpha * |y| (+ const), so a longer chosen response already explains part of the preference
    and that pair's gradient weight sigmoid(-z) shrinks. TRL has no R-DPO (its ``rpo_alpha`` is RPO's NLL term, see
    :func:`dpo_loss`); beta 0.1 follows TRL's DPO default and alpha 0.05 is our choice from the range used in the
    literature (0.005 to 1 depending on the data set): set it explicitly. Lengths are response-token counts.
    Rewards: beta * (s - r), without the length term.
    """
    b = _batch("rdpo", chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_lengths,
               rejected_lengths, reference=True, lengths=(True, True))
    return _rdpo(b, beta=beta, alpha=alpha).output()


def simpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    *,
    beta: float = 0.1,
    simpo_gamma: float = 0.5,
    label_smoothing: float = 0.0,
    cpo_alpha: float = 0.0,
) -> PreferenceLossOutput:
    """SimPO (Meng et al. 2024; TRL CPOTrainer ``loss_type="simpo"``), reference-free on average log-probs.

    z = beta * (s_w / T_w - s_l / T_l) - simpo_gamma;  L = (1 - e) softplus(-z) + e softplus(z)  [+ cpo_alpha * nll].

    TRL writes the margin as beta * (avg_w - avg_l - simpo_gamma / beta): the same z. Defaults beta 0.1 and
    simpo_gamma 0.5 are TRL's CPOConfig (the SimPO paper itself tunes beta around 2 to 2.5). Deviation: cpo_alpha
    defaults to 0 (pure SimPO) where CPOConfig defaults to 1.0 (CPO-SimPO); pass cpo_alpha=1.0 for TRL's combination.
    Rewards: beta * s / T.
    """
    b = _batch("simpo", chosen_logps, rejected_logps, chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
               lengths=(True, True))
    return _simpo(b, beta=beta, simpo_gamma=simpo_gamma, label_smoothing=label_smoothing, cpo_alpha=cpo_alpha).output()


def cpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    chosen_lengths: Tensor | None = None,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    cpo_alpha: float = 1.0,
) -> PreferenceLossOutput:
    """CPO (Xu et al. 2024; TRL CPOTrainer ``loss_type="sigmoid"``): reference-free DPO plus a behaviour-cloning NLL.

    z = beta * (s_w - s_l) on summed log-probs;  L = (1 - e) softplus(-z) + e softplus(z) + cpo_alpha * (-s_w / T_w).

    Defaults are TRL's CPOConfig: beta 0.1, label_smoothing 0, cpo_alpha 1.0. Deviation: the BC term is the per-pair
    mean NLL -s_w / T_w (hence ``chosen_lengths``), not TRL's token-weighted batch cross-entropy. Rewards: beta * s.
    """
    b = _batch("cpo", chosen_logps, rejected_logps, chosen_lengths=chosen_lengths, lengths=(True, False))
    return _cpo(b, beta=beta, label_smoothing=label_smoothing, cpo_alpha=cpo_alpha).output()


def orpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    *,
    beta: float = 0.1,
) -> PreferenceLossOutput:
    """ORPO (Hong et al. 2024; TRL ORPOTrainer): NLL plus an odds-ratio term on average log-probs.

    With m = s / T and log_odds(m) = m - log(1 - e^m):
    L = -m_w - beta * logsigmoid(log_odds(m_w) - log_odds(m_l)).

    Average log-probs as in TRL; beta 0.1 is TRL's default (the paper's lambda). Average log-probs must be < 0.
    Deviation: the NLL is the per-pair response-token mean -s_w / T_w; TRL's is a token-weighted cross-entropy over
    the batch's chosen prompt AND response tokens. Rewards: beta * s / T.
    """
    b = _batch("orpo", chosen_logps, rejected_logps, chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
               lengths=(True, True))
    return _orpo(b, beta=beta).output()


def dpop_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    beta: float = 0.1,
    dpop_lambda: float = 50.0,
) -> PreferenceLossOutput:
    """DPO-Positive (Pal et al. 2024, "Smaug", arXiv 2402.13228).

    z = beta * [(s_w - r_w) - (s_l - r_l) - dpop_lambda * relu(r_w - s_w)];  L = softplus(-z).

    The penalty switches on when the policy's chosen log-prob falls below the reference's, and then multiplies the
    pull on the chosen response by (1 + dpop_lambda). TRL has no DPOP; beta 0.1 follows TRL's DPO default and
    dpop_lambda 50 is the Smaug paper's value. Summed log-probs. Rewards: beta * (s - r).
    """
    b = _batch("dpop", chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, reference=True)
    return _dpop(b, beta=beta, dpop_lambda=dpop_lambda).output()


def rrhf_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    *,
    rrhf_weight: float = 100.0,
    length_penalty: float = 1.0,
) -> PreferenceLossOutput:
    """RRHF (Yuan et al. 2023) for one pair: a ranking hinge on length-normalised scores plus the chosen NLL.

    p = s / T^length_penalty;  L = rrhf_weight * relu(p_l - p_w) + (-s_w / T_w).

    With two candidates RRHF's ranking sum has the single term above. TRL has no RRHF; defaults are the reference
    implementation's (rrhf_weight 100, length_penalty 1). Its SFT term averages over the padded row; here it is the
    response-token mean. No beta. Rewards: the scores p_w, p_l. a_l = 0 once the pair is ranked correctly.
    """
    b = _batch("rrhf", chosen_logps, rejected_logps, chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
               lengths=(True, True))
    return _rrhf(b, rrhf_weight=rrhf_weight, length_penalty=length_penalty).output()


def kto_pair_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    beta: float = 0.1,
) -> PreferenceLossOutput:
    """Paired KTO, TRL's historical DPOTrainer ``loss_type="kto_pair"`` (HALOs eq. 7).

    With c = s_w - r_w, d = s_l - r_l and batch KL estimates KL_w = mean(c).clamp(min=0), KL_l = mean(d).clamp(min=0)
    (each half's reference point comes from the other half):
    L_i = 0.5 * [1 - sigmoid(beta * (c_i - KL_l))] + 0.5 * [1 - sigmoid(beta * (KL_w - d_i))].

    Default beta 0.1 (TRL). Deviations from TRL's kto_pair: (1) TRL concatenated the two halves into a [2B] loss; the
    per-pair mean of the halves here has the same batch mean. (2) The KL estimates are detached (as in the KTO paper
    and TRL's KTOTrainer); TRL's kto_pair let gradients flow through the batch means, which couples every pair to
    every other. Detached, L_i depends only on pair i's log-probs given the batch, so a_w, a_l are exact per pair.
    Rewards: beta * (s - r).
    """
    b = _batch("kto_pair", chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, reference=True)
    return _kto_pair(b, beta=beta).output()


# --------------------------------------------------------------------------------------------------------------------
# Registry and dispatch


@dataclass(frozen=True)
class LossSpec:
    """One loss: its function, the inputs it needs, and its hyperparameters with their defaults.

    Calling a spec calls its function. ``inputs`` lists the required inputs besides the two policy log-probs;
    ``optional_inputs`` those used only under some hyperparameters (dpo: ``chosen_lengths`` with ``rpo_alpha``).
    """

    name: str
    fn: Callable[..., PreferenceLossOutput]
    needs_reference: bool
    needs_chosen_lengths: bool
    needs_rejected_lengths: bool
    hyper: Mapping[str, Any]
    optional_inputs: tuple[str, ...] = ()
    _kernel: Callable[..., _Result] = field(default=None, repr=False, compare=False)  # type: ignore[assignment]

    @property
    def needs_lengths(self) -> bool:
        return self.needs_chosen_lengths or self.needs_rejected_lengths

    @property
    def inputs(self) -> tuple[str, ...]:
        names = ("ref_chosen_logps", "ref_rejected_logps") if self.needs_reference else ()
        if self.needs_chosen_lengths:
            names += ("chosen_lengths",)
        if self.needs_rejected_lengths:
            names += ("rejected_lengths",)
        return names

    def __call__(self, *args: Any, **kwargs: Any) -> PreferenceLossOutput:
        return self.fn(*args, **kwargs)


def _spec(name, fn, kernel, reference, lengths, hyper, optional=()) -> LossSpec:
    return LossSpec(name, fn, reference, lengths[0], lengths[1], MappingProxyType(dict(hyper)), tuple(optional), kernel)


LOSSES: dict[str, LossSpec] = {
    s.name: s
    for s in (
        _spec("dpo", dpo_loss, _dpo, True, (False, False),
              {"beta": 0.1, "label_smoothing": 0.0, "rpo_alpha": None}, optional=("chosen_lengths",)),
        _spec("ipo", ipo_loss, _ipo, True, (True, True), {"beta": 0.1}),
        _spec("hinge", hinge_loss, _hinge, True, (False, False), {"beta": 0.1}),
        _spec("rdpo", rdpo_loss, _rdpo, True, (True, True), {"beta": 0.1, "alpha": 0.05}),
        _spec("simpo", simpo_loss, _simpo, False, (True, True),
              {"beta": 0.1, "simpo_gamma": 0.5, "label_smoothing": 0.0, "cpo_alpha": 0.0}),
        _spec("cpo", cpo_loss, _cpo, False, (True, False), {"beta": 0.1, "label_smoothing": 0.0, "cpo_alpha": 1.0}),
        _spec("orpo", orpo_loss, _orpo, False, (True, True), {"beta": 0.1}),
        _spec("dpop", dpop_loss, _dpop, True, (False, False), {"beta": 0.1, "dpop_lambda": 50.0}),
        _spec("rrhf", rrhf_loss, _rrhf, False, (True, True), {"rrhf_weight": 100.0, "length_penalty": 1.0}),
        _spec("kto_pair", kto_pair_loss, _kto_pair, True, (False, False), {"beta": 0.1}),
    )
}

# TRL's loss_type spellings for the same losses.
_ALIASES = {"sigmoid": "dpo", "slic": "hinge", "r-dpo": "rdpo", "r_dpo": "rdpo", "dpo-positive": "dpop"}


def _resolve(name: str, hyper: Mapping[str, Any]) -> LossSpec:
    key = _ALIASES.get(name, name) if isinstance(name, str) else name
    spec = LOSSES.get(key) if isinstance(key, str) else None
    if spec is None:
        raise ValueError(f"unknown loss `name` {name!r}; known losses: {', '.join(LOSSES)} "
                         f"(aliases: {', '.join(f'{a}={t}' for a, t in _ALIASES.items())})")
    unknown = sorted(set(hyper) - set(spec.hyper))
    if unknown:
        raise ValueError(f"{spec.name} does not take hyperparameter(s) {', '.join(map(repr, unknown))}; "
                         f"it takes {', '.join(spec.hyper) or 'none'}")
    return spec


def _dispatch(name, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_lengths,
              rejected_lengths, hyper) -> _Result:
    spec = _resolve(name, hyper)
    lengths = (spec.needs_chosen_lengths, spec.needs_rejected_lengths)
    if spec.name == "dpo" and hyper.get("rpo_alpha") is not None:
        lengths = (True, False)
    b = _batch(spec.name, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_lengths,
               rejected_lengths, reference=spec.needs_reference, lengths=lengths)
    return spec._kernel(b, **hyper)


def preference_loss(
    name: str,
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    *,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    **hyper: Any,
) -> PreferenceLossOutput:
    """Compute the loss ``name`` (a key of :data:`LOSSES`, or a TRL alias such as ``"sigmoid"``).

    All tensors are ``[B]``; log-probs are summed over response tokens; lengths are response-token counts (int or
    float, > 0). Inputs the loss does not use are ignored (see ``LOSSES[name].inputs``). ``hyper`` are the loss's
    keyword hyperparameters (``LOSSES[name].hyper`` lists them with their defaults).

    Raises:
        ValueError: unknown name or hyperparameter, a needed input missing, mismatched shapes, non-positive lengths,
            beta <= 0 (each message names the argument).
    """
    return _dispatch(name, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_lengths,
                     rejected_lengths, hyper).output()


def loss_coefficients(
    name: str,
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    *,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    **hyper: Any,
) -> tuple[Tensor, Tensor]:
    """Closed-form a_w = dL_i/ds_w,i and a_l = dL_i/ds_l,i (docs/math.md section 2), each ``[B]``, detached.

    Derivatives of the per-pair loss ``losses[i]`` of :func:`preference_loss` (same arguments) with respect to the
    SUMMED policy log-probs; losses defined on averages include the 1/T. For ``losses.mean()`` divide by B.
    Sigmoid-type losses give a_w < 0 < a_l (a_w also carries -weight/T_w from an NLL term). Hinge and RRHF give
    a_l = 0 once the pair's margin is met (hinge also a_w = 0); IPO's signs flip past its target margin.
    At a kink (hinge exactly at the margin, DPOP exactly at the reference) the value is PyTorch's one-sided choice.
    """
    with torch.no_grad():
        r = _dispatch(
            name,
            chosen_logps.detach() if isinstance(chosen_logps, Tensor) else chosen_logps,
            rejected_logps.detach() if isinstance(rejected_logps, Tensor) else rejected_logps,
            ref_chosen_logps, ref_rejected_logps, chosen_lengths, rejected_lengths, hyper,
        )
    return r.a_w, r.a_l
