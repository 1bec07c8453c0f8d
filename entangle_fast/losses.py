"""Margin-based preference losses and their log-prob coefficients a_w, a_l (docs/math.md section 2).

Every loss here is a function of per-pair scalars, all ``[B]``:

    s_w, s_l   policy log-probs of the chosen / rejected response, SUMMED over response tokens
    r_w, r_l   reference log-probs (same convention), for the losses that use a reference
    T_w, T_l   response token counts, for the losses that average log-probs or carry an NLL term

``losses`` is ``[B]``; a trainer's scalar loss is ``losses.mean()``. For most losses ``losses[i]`` is pair i's loss
L_i and depends on pair i alone. Three of TRL's DPOTrainer losses use the whole batch, exactly as TRL computes them
(:attr:`LossSpec.per_pair` is False): ``aot`` and ``aot_unpaired`` sort log-ratios across the batch, so ``losses[k]``
is the k-th sorted term, and ``sft`` is one token-weighted NLL over the batch's chosen tokens, repeated B times.

The first-order dynamics of section 2 need a_w = d(sum_i L_i)/ds_w,i and a_l = d(sum_i L_i)/ds_l,i (for a per-pair
loss simply dL_i/ds_w,i, dL_i/ds_l,i); :func:`loss_coefficients` returns them, always with respect to the summed
log-probs (losses that average get the 1/T of the chain rule). The gradient of ``losses.mean()`` is a / B.

Each loss is registered once, by :func:`_register` on one function that computes the loss, its rewards and, from the
same detached intermediates, its closed-form a_w, a_l. The function's keyword defaults are the loss's defaults (read
into :attr:`LossSpec.hyper`); the registration names the inputs it needs and, for TRL's DPOTrainer losses, the
``loss_type`` and the DPOConfig fields it reads. The public ``<name>_loss`` functions are generated from the registry.

| name         | L_i (z is the argument of the sigmoid; c = s_w - r_w, d = s_l - r_l)           | defaults         |
|--------------|--------------------------------------------------------------------------------|------------------|
| dpo          | (1-e) softplus(-z) + e softplus(z), z = beta (c - d) [+ rpo_alpha nll]          | TRL sigmoid      |
| ipo          | (c/T_w - d/T_l - 1/(2 beta))^2                                                  | TRL ipo          |
| hinge        | relu(1 - z), z as dpo (SLiC)                                                   | TRL hinge        |
| rdpo         | softplus(-z), z = beta (c - d) + alpha (T_w - T_l)                             | (not in TRL)     |
| simpo        | smoothed softplus(-z), z = beta (s_w/T_w - s_l/T_l) - simpo_gamma              | TRL CPO simpo    |
| cpo          | smoothed softplus(-z) + cpo_alpha nll, z = beta (s_w - s_l)                     | TRL CPO sigmoid  |
| orpo         | nll - beta logsigmoid(log_odds(s_w/T_w) - log_odds(s_l/T_l))                   | TRL ORPO         |
| dpop         | softplus(-z), z = beta [c - d - lambda relu(-c)]                               | (not in TRL)     |
| rrhf         | rrhf_weight relu(p_l - p_w) + nll, p = s / T^length_penalty                    | (not in TRL)     |
| kto_pair     | [sig(-beta(c - KL_l)) + sig(-beta(KL_w - d))] / 2, batch KL detached           | old TRL kto_pair |
| exo_pair     | KL(softmax of (z, 0) || (1-e, e)), z = beta (c - d)                            | TRL exo_pair     |
| nca_pair     | -logsig(beta c) - logsig(-beta c)/2 - logsig(-beta d)/2                        | TRL nca_pair     |
| robust       | [-(1-e) logsig(z) + e logsig(-z)] / (1 - 2e), z = beta (c - d)                 | TRL robust       |
| bco_pair     | -logsig(beta c) - logsig(-beta d)                                              | TRL bco_pair     |
| sppo_hard    | (c - 1/(2 beta))^2 + (d + 1/(2 beta))^2                                        | TRL sppo_hard    |
| aot          | smoothed softplus(-beta [sort(s_w - s_l) - sort(r_w - r_l)]_k)                 | TRL aot          |
| aot_unpaired | smoothed softplus(-beta [sort(c) - sort(d)]_k)                                 | TRL aot_unpaired |
| apo_zero     | 1 - sig(beta c) + sig(beta d)                                                  | TRL apo_zero     |
| apo_down     | sig(beta c) + 1 - sig(beta (c - d))                                            | TRL apo_down     |
| discopop     | (1 - m) softplus(-z) + m exp(-z), m = sig(z / tau), z = beta (c - d)           | TRL discopop     |
| sft          | -sum_j s_w,j / sum_j T_w,j (the batch's chosen-token NLL)                      | TRL sft          |
| sigmoid_norm | softplus(-z), z = beta (c/T_w - d/T_l)                                         | TRL sigmoid_norm |

Conventions shared by every loss:

- NLL term: ``nll = -s_w / T_w``, the mean negative log-likelihood of the chosen response's tokens, per pair. TRL
  computes the NLL terms of CPO's BC term, ORPO and DPO's ``rpo_alpha`` as one token-weighted cross-entropy over all
  chosen tokens of the batch (ORPO's even includes the prompt tokens); here they are per pair and response-only, so
  the batch mean weights every pair equally. The two agree when all chosen responses have the same length. (``sft``
  is TRL's token-weighted form itself.)
- Rewards (``chosen_rewards``, ``rejected_rewards``) are detached and follow TRL's logging convention: for every
  loss of TRL's DPOTrainer (ipo included) that is beta * (s - r), the log-ratio summed over response tokens.
- Computation runs in at least float32 (float64 stays float64); outputs are in that dtype.
- Only the policy log-probs s carry the coefficients; reference log-probs and lengths are treated as constants.
"""
from __future__ import annotations

import inspect
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
    "TRL_LOSS_TYPES",
    "preference_loss",
    "loss_coefficients",
]  # + one <name>_loss per registered loss, appended by _register


@dataclass
class PreferenceLossOutput:
    """Result of a preference loss on B pairs.

    Attributes:
        losses: ``[B]`` loss terms, differentiable with respect to the policy log-probs (and everything else passed
            in). The training loss is ``losses.mean()``. Per pair, except for the batch losses (module docstring).
        chosen_rewards / rejected_rewards: ``[B]`` detached implicit rewards, TRL's logging convention for the loss.
        nll: ``[B]`` detached mean NLL of the chosen response, ``-s_w / T_w``, for the losses that carry an NLL term
            (cpo, orpo, rrhf, sft; dpo with ``rpo_alpha``; simpo with ``cpo_alpha > 0``); its weighted contribution is
            already inside ``losses``. None otherwise.
    """

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    nll: Tensor | None = None


# --------------------------------------------------------------------------------------------------------------------
# Input and hyperparameter checks

_INPUTS = ("ref_chosen_logps", "ref_rejected_logps", "chosen_lengths", "rejected_lengths")
_WHY = {
    "rejected_logps": "policy log-probs of the rejected responses",
    "ref_chosen_logps": "reference log-probs of the chosen responses",
    "ref_rejected_logps": "reference log-probs of the rejected responses",
    "chosen_lengths": "chosen response-token counts",
    "rejected_lengths": "rejected response-token counts",
}


@dataclass
class _Batch:
    s_w: Tensor
    s_l: Tensor
    r_w: Tensor | None
    r_l: Tensor | None
    T_w: Tensor | None
    T_l: Tensor | None

    def rewards(self, beta: float) -> tuple[Tensor, Tensor]:
        """TRL's DPOTrainer rewards, beta * (s - r) (beta * s without a reference)."""
        if self.r_w is None:
            return beta * self.s_w, beta * self.s_l
        return beta * (self.s_w - self.r_w), beta * (self.s_l - self.r_l)


def _batch(loss: str, chosen_logps: Tensor, rejected_logps: Tensor, given: Mapping[str, Any],
           required: tuple[str, ...], optional: tuple[str, ...]) -> _Batch:
    """Validate the inputs of ``loss``; bring them to one dtype and device. ``required`` must be given; ``optional``
    are validated when given; any other input is ignored."""
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

    def tensor(arg: str, value: Any) -> Tensor | None:
        if value is None:
            if arg in required:
                raise ValueError(f"{loss} needs `{arg}` ({_WHY[arg]}), got None")
            return None
        if arg != "rejected_logps" and arg not in required and arg not in optional:
            return None
        positive = arg.endswith("_lengths")
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

    if rejected_logps is None:
        raise ValueError(f"{loss} needs `rejected_logps` ({_WHY['rejected_logps']}), got None")
    s_l = tensor("rejected_logps", rejected_logps)
    r_w, r_l = tensor("ref_chosen_logps", given.get("ref_chosen_logps")), tensor(
        "ref_rejected_logps", given.get("ref_rejected_logps"))
    if (r_w is None) != (r_l is None):
        raise ValueError(f"{loss}: pass both `ref_chosen_logps` and `ref_rejected_logps`, or neither")
    T_w = tensor("chosen_lengths", given.get("chosen_lengths"))
    T_l = tensor("rejected_lengths", given.get("rejected_lengths"))
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


def _smoothing(value: Any, *, upper_open: bool = False) -> float:
    v = _finite("label_smoothing", value)
    if not (0.0 <= v < 0.5 if upper_open else 0.0 <= v <= 0.5):
        bound = "[0, 0.5)" if upper_open else "[0, 0.5]"
        raise ValueError(f"`label_smoothing` must be in {bound} (the assumed fraction of flipped labels), got {v}")
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
    nll: Tensor | None = None
    a_w: Tensor | None = None  # closed form; None: loss_coefficients takes them from autograd
    a_l: Tensor | None = None

    def output(self) -> PreferenceLossOutput:
        nll = None if self.nll is None else self.nll.detach()
        return PreferenceLossOutput(self.losses, self.chosen_rewards.detach(), self.rejected_rewards.detach(), nll)


# --------------------------------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class LossSpec:
    """One registered loss: the function computing it, the inputs it needs, its hyperparameters with defaults.

    Calling a spec calls its public function (``fn``, e.g. :func:`dpo_loss`). ``inputs`` lists the required inputs
    besides the two policy log-probs, in the public function's positional order; ``optional_inputs`` those used only
    under some hyperparameters (dpo: ``chosen_lengths`` with ``rpo_alpha``).
    ``trl_loss_type`` is TRL DPOTrainer's ``loss_type`` for the same loss (None if it has none) and ``trl_hyper`` the
    DPOConfig fields it reads. ``per_pair`` is False for the batch losses (aot, aot_unpaired, sft).
    ``closed_form``: :func:`loss_coefficients` evaluates a closed form (False: autograd).
    """

    name: str
    fn: Callable[..., PreferenceLossOutput] = field(repr=False, compare=False)
    needs_reference: bool
    needs_chosen_lengths: bool
    needs_rejected_lengths: bool
    hyper: Mapping[str, Any]
    optional_inputs: tuple[str, ...] = ()
    trl_loss_type: str | None = None
    trl_hyper: tuple[str, ...] = ()
    per_pair: bool = True
    closed_form: bool = True
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


LOSSES: dict[str, LossSpec] = {}
TRL_LOSS_TYPES: dict[str, str] = {}
"""TRL DPOTrainer ``loss_type`` -> name in :data:`LOSSES`, for every loss type of the pinned TRL (1.16)."""

_P = inspect.Parameter


def _public_function(spec_name: str, kernel: Callable[..., _Result], inputs: tuple[str, ...],
                     optional: tuple[str, ...], hyper: Mapping[str, Any]) -> Callable[..., PreferenceLossOutput]:
    """``<name>_loss(chosen_logps, rejected_logps, *inputs, *, **hyper, **optional)`` with the kernel's docstring."""
    params = [_P(n, _P.POSITIONAL_OR_KEYWORD) for n in ("chosen_logps", "rejected_logps")]
    params += [_P(n, _P.POSITIONAL_OR_KEYWORD, default=None, annotation="Tensor | None") for n in inputs]
    params += [_P(n, _P.KEYWORD_ONLY, default=v) for n, v in hyper.items()]
    params += [_P(n, _P.KEYWORD_ONLY, default=None, annotation="Tensor | None") for n in optional]
    signature = inspect.Signature(params, return_annotation=PreferenceLossOutput)

    def loss_fn(*args: Any, **kwargs: Any) -> PreferenceLossOutput:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        return _run(LOSSES[spec_name], a["chosen_logps"], a["rejected_logps"], a,
                    {k: a[k] for k in hyper}).output()

    loss_fn.__signature__ = signature  # type: ignore[attr-defined]
    loss_fn.__name__ = loss_fn.__qualname__ = f"{spec_name}_loss"
    loss_fn.__module__ = __name__
    needs = ", ".join(f"``{n}``" for n in inputs) or "nothing else"
    defaults = ", ".join(f"{k}={v!r}" for k, v in hyper.items()) or "none"
    loss_fn.__doc__ = (inspect.getdoc(kernel) or "") + (
        f"\n\nInputs: ``chosen_logps``, ``rejected_logps`` ``[B]`` and {needs}"
        + (f" (optional: {', '.join(optional)})" if optional else "")
        + f". Hyperparameters (defaults): {defaults}. Returns :class:`PreferenceLossOutput`."
    )
    return loss_fn


def _register(name: str, *, reference: bool = False, lengths: tuple[bool, bool] = (False, False),
              optional: tuple[str, ...] = (), trl: str | None = None, trl_hyper: tuple[str, ...] = ("beta",),
              per_pair: bool = True, closed_form: bool = True):
    """Register ``kernel(b: _Batch, *, **hyper) -> _Result`` as loss ``name``; its keyword defaults are the loss's."""

    def wrap(kernel: Callable[..., _Result]) -> Callable[..., _Result]:
        hyper = {p.name: p.default for p in inspect.signature(kernel).parameters.values() if p.kind is _P.KEYWORD_ONLY}
        inputs = (("ref_chosen_logps", "ref_rejected_logps") if reference else ()) + tuple(
            n for n, on in zip(("chosen_lengths", "rejected_lengths"), lengths) if on)
        fn = _public_function(name, kernel, inputs, optional, hyper)
        LOSSES[name] = LossSpec(name, fn, reference, lengths[0], lengths[1], MappingProxyType(hyper), optional,
                                trl, tuple(trl_hyper) if trl else (), per_pair, closed_form, kernel)
        if trl is not None:
            TRL_LOSS_TYPES[trl] = name
        globals()[fn.__name__] = fn
        __all__.append(fn.__name__)
        return kernel

    return wrap


# --------------------------------------------------------------------------------------------------------------------
# The losses: each computes L and, from detached intermediates, its closed-form a_w, a_l.


@_register("dpo", reference=True, optional=("chosen_lengths",), trl="sigmoid")
def _dpo(b: _Batch, *, beta: float = 0.1, label_smoothing: float = 0.0, rpo_alpha: float | None = None) -> _Result:
    """DPO (TRL ``loss_type="sigmoid"``), with conservative label smoothing (cDPO) and TRL's optional RPO NLL term.

    z = beta * [(s_w - r_w) - (s_l - r_l)] on summed log-probs;
    L = (1 - label_smoothing) * softplus(-z) + label_smoothing * softplus(z)  [+ rpo_alpha * (-s_w / T_w)].

    Defaults are TRL's DPOConfig: beta 0.1, label_smoothing 0, rpo_alpha None. TRL 1.16's ``sigmoid`` ignores
    ``label_smoothing`` (its ``robust``, ``exo_pair`` and ``aot`` losses read it). Deviation: the ``rpo_alpha`` NLL is
    the per-pair mean -s_w / T_w (``chosen_lengths`` required), not TRL's token-weighted batch cross-entropy.
    TRL's ``ld_alpha`` (LD-DPO) reweights tokens inside a response and cannot be formed from sums; it is not offered.
    Rewards: beta * (s - r).
    """
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
    return _Result(losses, *b.rewards(beta), nll, a_w, a_l)


@_register("ipo", reference=True, lengths=(True, True), trl="ipo")
def _ipo(b: _Batch, *, beta: float = 0.1) -> _Result:
    """IPO (Azar et al. 2023, eq. 17; TRL ``loss_type="ipo"``): L = (x - 1 / (2 beta))^2.

    Length-normalised as TRL does: x = (s_w - r_w) / T_w - (s_l - r_l) / T_l, i.e. per-token average log-probs of
    policy and reference (TRL's T is the completion-mask count, at least 1). Default beta 0.1 (TRL).
    Rewards: beta * (s - r) on the summed log-probs, what TRL 1.16 logs for every loss type (earlier releases of this
    library returned the averaged beta * (s - r) / T here).
    Inside the target margin (x < 1/(2 beta)) a_w < 0 < a_l; beyond it IPO pulls the margin back and the signs flip.
    """
    beta = _positive("beta", beta)
    chosen = (b.s_w - b.r_w) / b.T_w
    rejected = (b.s_l - b.r_l) / b.T_l
    gap = (chosen - rejected) - 1.0 / (2.0 * beta)
    g = 2.0 * gap.detach()
    return _Result(gap.square(), *b.rewards(beta), None, g / b.T_w, -g / b.T_l)


@_register("hinge", reference=True, trl="hinge")
def _hinge(b: _Batch, *, beta: float = 0.1) -> _Result:
    """Hinge / SLiC (TRL ``loss_type="hinge"``): L = relu(1 - beta * [(s_w - r_w) - (s_l - r_l)]).

    Summed log-probs, default beta 0.1 (TRL; beta is the reciprocal of SLiC's margin delta). Once the margin is
    met the pair contributes nothing: a_w = a_l = 0. Rewards: beta * (s - r).
    """
    beta = _positive("beta", beta)
    z = beta * ((b.s_w - b.r_w) - (b.s_l - b.r_l))
    slack = 1.0 - z
    # relu's derivative at exactly 0 is 0 in PyTorch; the strict comparison keeps autograd and closed form equal.
    active = (slack.detach() > 0).to(z.dtype)
    a_l = beta * active
    return _Result(torch.relu(slack), *b.rewards(beta), None, -a_l, a_l)


@_register("rdpo", reference=True, lengths=(True, True))
def _rdpo(b: _Batch, *, beta: float = 0.1, alpha: float = 0.05) -> _Result:
    """R-DPO, length-regularised DPO (Park et al. 2024, arXiv 2403.19159).

    z = beta * [(s_w - r_w) - (s_l - r_l)] + alpha * (T_w - T_l);  L = softplus(-z).

    The length term enters with a plus sign: a reward penalised by alpha * |y| makes the implicit DPO reward
    r = beta * log-ratio + alpha * |y| (+ const), so a longer chosen response already explains part of the preference
    and that pair's gradient weight sigmoid(-z) shrinks. TRL has no R-DPO (its ``rpo_alpha`` is RPO's NLL term, see
    :func:`dpo_loss`); beta 0.1 follows TRL's DPO default and alpha 0.05 is our choice from the range used in the
    literature (0.005 to 1 depending on the data set): set it explicitly. Lengths are response-token counts.
    Rewards: beta * (s - r), without the length term.
    """
    beta, alpha = _positive("beta", beta), _finite("alpha", alpha)
    z = beta * ((b.s_w - b.r_w) - (b.s_l - b.r_l)) + alpha * (b.T_w - b.T_l)
    w = beta * torch.sigmoid(-z.detach())
    return _Result(-F.logsigmoid(z), *b.rewards(beta), None, -w, w)


@_register("simpo", lengths=(True, True))
def _simpo(b: _Batch, *, beta: float = 0.1, simpo_gamma: float = 0.5, label_smoothing: float = 0.0,
           cpo_alpha: float = 0.0) -> _Result:
    """SimPO (Meng et al. 2024; TRL CPOTrainer ``loss_type="simpo"``), reference-free on average log-probs.

    z = beta * (s_w / T_w - s_l / T_l) - simpo_gamma;  L = (1 - e) softplus(-z) + e softplus(z)  [+ cpo_alpha * nll].

    TRL writes the margin as beta * (avg_w - avg_l - simpo_gamma / beta): the same z. Defaults beta 0.1 and
    simpo_gamma 0.5 are TRL's CPOConfig (the SimPO paper itself tunes beta around 2 to 2.5). Deviation: cpo_alpha
    defaults to 0 (pure SimPO) where CPOConfig defaults to 1.0 (CPO-SimPO); pass cpo_alpha=1.0 for TRL's combination.
    Rewards: beta * s / T.
    """
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


@_register("cpo", lengths=(True, False))
def _cpo(b: _Batch, *, beta: float = 0.1, label_smoothing: float = 0.0, cpo_alpha: float = 1.0) -> _Result:
    """CPO (Xu et al. 2024; TRL CPOTrainer ``loss_type="sigmoid"``): reference-free DPO plus a behaviour-cloning NLL.

    z = beta * (s_w - s_l) on summed log-probs;  L = (1 - e) softplus(-z) + e softplus(z) + cpo_alpha * (-s_w / T_w).

    Defaults are TRL's CPOConfig: beta 0.1, label_smoothing 0, cpo_alpha 1.0. Deviation: the BC term is the per-pair
    mean NLL -s_w / T_w (hence ``chosen_lengths``), not TRL's token-weighted batch cross-entropy. Rewards: beta * s.
    """
    beta, eps, cpo_alpha = _positive("beta", beta), _smoothing(label_smoothing), _non_negative("cpo_alpha", cpo_alpha)
    z = beta * (b.s_w - b.s_l)
    nll = -b.s_w / b.T_w
    g = beta * _smoothed_nll_grad(z.detach(), eps)
    return _Result(_smoothed_nll(z, eps) + cpo_alpha * nll, beta * b.s_w, beta * b.s_l, nll, g - cpo_alpha / b.T_w, -g)


@_register("orpo", lengths=(True, True))
def _orpo(b: _Batch, *, beta: float = 0.1) -> _Result:
    """ORPO (Hong et al. 2024; TRL ORPOTrainer): NLL plus an odds-ratio term on average log-probs.

    With m = s / T and log_odds(m) = m - log(1 - e^m):
    L = -m_w - beta * logsigmoid(log_odds(m_w) - log_odds(m_l)).

    Average log-probs as in TRL; beta 0.1 is TRL's default (the paper's lambda). Average log-probs must be < 0.
    Deviation: the NLL is the per-pair response-token mean -s_w / T_w; TRL's is a token-weighted cross-entropy over
    the batch's chosen prompt AND response tokens. Rewards: beta * s / T.
    """
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


@_register("dpop", reference=True)
def _dpop(b: _Batch, *, beta: float = 0.1, dpop_lambda: float = 50.0) -> _Result:
    """DPO-Positive (Pal et al. 2024, "Smaug", arXiv 2402.13228).

    z = beta * [(s_w - r_w) - (s_l - r_l) - dpop_lambda * relu(r_w - s_w)];  L = softplus(-z).

    The penalty switches on when the policy's chosen log-prob falls below the reference's, and then multiplies the
    pull on the chosen response by (1 + dpop_lambda). TRL has no DPOP; beta 0.1 follows TRL's DPO default and
    dpop_lambda 50 is the Smaug paper's value. Summed log-probs. Rewards: beta * (s - r).
    """
    beta, lam = _positive("beta", beta), _non_negative("dpop_lambda", dpop_lambda)
    drop = b.r_w - b.s_w  # > 0 when the policy has lowered the chosen response below the reference
    z = beta * ((b.s_w - b.r_w) - (b.s_l - b.r_l) - lam * torch.relu(drop))
    w = beta * torch.sigmoid(-z.detach())
    a_w = -w * (1.0 + lam * (drop.detach() > 0).to(z.dtype))
    return _Result(-F.logsigmoid(z), *b.rewards(beta), None, a_w, w)


@_register("rrhf", lengths=(True, True))
def _rrhf(b: _Batch, *, rrhf_weight: float = 100.0, length_penalty: float = 1.0) -> _Result:
    """RRHF (Yuan et al. 2023) for one pair: a ranking hinge on length-normalised scores plus the chosen NLL.

    p = s / T^length_penalty;  L = rrhf_weight * relu(p_l - p_w) + (-s_w / T_w).

    With two candidates RRHF's ranking sum has the single term above. TRL has no RRHF; defaults are the reference
    implementation's (rrhf_weight 100, length_penalty 1). Its SFT term averages over the padded row; here it is the
    response-token mean. No beta. Rewards: the scores p_w, p_l. a_l = 0 once the pair is ranked correctly.
    """
    weight, power = _non_negative("rrhf_weight", rrhf_weight), _finite("length_penalty", length_penalty)
    d_w, d_l = b.T_w.pow(power), b.T_l.pow(power)
    p_w, p_l = b.s_w / d_w, b.s_l / d_l
    gap = p_l - p_w
    nll = -b.s_w / b.T_w
    active = weight * (gap.detach() > 0).to(gap.dtype)
    return _Result(weight * torch.relu(gap) + nll, p_w, p_l, nll, -active / d_w - 1.0 / b.T_w, active / d_l)


@_register("kto_pair", reference=True)
def _kto_pair(b: _Batch, *, beta: float = 0.1) -> _Result:
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


# TRL DPOTrainer's other loss types (TRL 1.16 trainer/dpo_trainer.py, _compute_loss); reverse-KL scores, so the
# margin z = beta * [(s_w - r_w) - (s_l - r_l)] wherever TRL writes beta * delta_score.


def _margin(b: _Batch, beta: float) -> Tensor:
    return beta * ((b.s_w - b.r_w) - (b.s_l - b.r_l))


@_register("exo_pair", reference=True, trl="exo_pair", trl_hyper=("beta", "label_smoothing"))
def _exo_pair(b: _Batch, *, beta: float = 0.1, label_smoothing: float = 1e-3) -> _Result:
    """EXO-pref (Ji et al. 2024, arXiv 2402.00856, eq. 16; TRL ``loss_type="exo_pair"``).

    KL(q || p) between q = (sigmoid(z), sigmoid(-z)), the policy's distribution over {chosen, rejected}, and the
    smoothed target p = (1 - e, e), z = beta * [(s_w - r_w) - (s_l - r_l)]:
    L = q_w (log q_w - log(1 - e)) + q_l (log q_l - log e).

    dL/dz = q_w q_l (z - log((1 - e) / e)): the pull vanishes at z = log((1 - e)/e) and reverses beyond it.
    ``label_smoothing`` must be in (0, 1); TRL's DPOConfig default 0 is refused there too, so the default here is the
    EXO paper's recommendation 1e-3. TRL 1.16 takes log(e) and log(1 - e) of a float32 tensor; here they are exact
    in the computation's dtype (the two differ by float32 rounding of those constants). Rewards: beta * (s - r).
    """
    beta, eps = _positive("beta", beta), _finite("label_smoothing", label_smoothing)
    if not 0.0 < eps < 1.0:
        raise ValueError(f"exo_pair: `label_smoothing` must be in (0, 1) (the target's weight on the rejected "
                         f"response; EXO recommends 1e-3), got {eps}")
    z = _margin(b, beta)
    q_w, q_l = torch.sigmoid(z), torch.sigmoid(-z)
    losses = q_w * (F.logsigmoid(z) - math.log1p(-eps)) + q_l * (F.logsigmoid(-z) - math.log(eps))
    zd = z.detach()
    a_w = beta * torch.sigmoid(zd) * torch.sigmoid(-zd) * (zd - (math.log1p(-eps) - math.log(eps)))
    return _Result(losses, *b.rewards(beta), None, a_w, -a_w)


@_register("nca_pair", reference=True, trl="nca_pair")
def _nca_pair(b: _Batch, *, beta: float = 0.1) -> _Result:
    """NCA, pairwise (Chen et al. 2024, arXiv 2402.05369; TRL ``loss_type="nca_pair"``).

    With rewards u = beta (s_w - r_w), v = beta (s_l - r_l):
    L = -logsigmoid(u) - logsigmoid(-u) / 2 - logsigmoid(-v) / 2.

    Absolute rather than relative: each response's own reward is pushed, so a_w = beta (sigmoid(u)/2 - sigmoid(-u))
    turns positive (chosen pushed down) once u > log 2, and a_l = beta sigmoid(v) / 2 > 0 always. Rewards: u, v.
    """
    beta = _positive("beta", beta)
    u, v = b.rewards(beta)
    losses = -F.logsigmoid(u) - 0.5 * F.logsigmoid(-u) - 0.5 * F.logsigmoid(-v)
    ud, vd = u.detach(), v.detach()
    return _Result(losses, u, v, None, beta * (0.5 * torch.sigmoid(ud) - torch.sigmoid(-ud)),
                   0.5 * beta * torch.sigmoid(vd))


@_register("robust", reference=True, trl="robust", trl_hyper=("beta", "label_smoothing"))
def _robust(b: _Batch, *, beta: float = 0.1, label_smoothing: float = 0.0) -> _Result:
    """Robust DPO (Chowdhury et al. 2024, arXiv 2403.00409; TRL ``loss_type="robust"``): the unbiased loss under labels
    flipped with probability e, z = beta * [(s_w - r_w) - (s_l - r_l)]:
    L = [(1 - e) softplus(-z) - e softplus(z)] / (1 - 2e).

    ``label_smoothing`` e in [0, 0.5) (TRL checks the same); e = 0 is DPO. Unlike cDPO the flipped term enters with a
    minus sign, so L is unbounded below and dL/dz = -[(1 - e) sigmoid(-z) + e sigmoid(z)] / (1 - 2e) < 0 always.
    Rewards: beta * (s - r).
    """
    beta, eps = _positive("beta", beta), _smoothing(label_smoothing, upper_open=True)
    z = _margin(b, beta)
    losses = (-(1.0 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)
    zd = z.detach()
    a_w = -beta * ((1.0 - eps) * torch.sigmoid(-zd) + eps * torch.sigmoid(zd)) / (1.0 - 2.0 * eps)
    return _Result(losses, *b.rewards(beta), None, a_w, -a_w)


@_register("bco_pair", reference=True, trl="bco_pair")
def _bco_pair(b: _Batch, *, beta: float = 0.1) -> _Result:
    """BCO, pairwise (Jung et al. 2024, arXiv 2404.04656; TRL ``loss_type="bco_pair"``): two binary classifiers on the
    rewards u = beta (s_w - r_w), v = beta (s_l - r_l):  L = -logsigmoid(u) - logsigmoid(-v).

    As TRL 1.16 computes it: no reward shift (the paper's running mean of the rewards, delta, is not part of TRL's
    DPOTrainer). a_w = -beta sigmoid(-u), a_l = beta sigmoid(v). Rewards: u, v.
    """
    beta = _positive("beta", beta)
    u, v = b.rewards(beta)
    ud, vd = u.detach(), v.detach()
    return _Result(-F.logsigmoid(u) - F.logsigmoid(-v), u, v, None, -beta * torch.sigmoid(-ud),
                   beta * torch.sigmoid(vd))


@_register("sppo_hard", reference=True, trl="sppo_hard")
def _sppo_hard(b: _Batch, *, beta: float = 0.1) -> _Result:
    """SPPO with hard preferences (Wu et al. 2024, arXiv 2405.00675; TRL ``loss_type="sppo_hard"``): the winner's
    log-ratio regressed to 1/(2 beta), the loser's to -1/(2 beta), on summed log-probs:
    L = (s_w - r_w - 1/(2 beta))^2 + (s_l - r_l + 1/(2 beta))^2.

    a_w = 2 (s_w - r_w - 1/(2 beta)), a_l = 2 (s_l - r_l + 1/(2 beta)): the two responses move independently.
    Rewards: beta * (s - r).
    """
    beta = _positive("beta", beta)
    c = b.s_w - b.r_w - 0.5 / beta
    d = b.s_l - b.r_l + 0.5 / beta
    return _Result(c.square() + d.square(), *b.rewards(beta), None, 2.0 * c.detach(), 2.0 * d.detach())


def _sorted_coefficients(values: Tensor, grads: Tensor) -> Tensor:
    """The coefficient of each pair when ``grads[k]`` is the derivative by the k-th smallest of ``values``."""
    order = torch.sort(values.detach(), dim=0).indices
    return torch.empty_like(grads).scatter_(0, order, grads)


@_register("aot", reference=True, trl="aot", trl_hyper=("beta", "label_smoothing"), per_pair=False)
def _aot(b: _Batch, *, beta: float = 0.1, label_smoothing: float = 0.0) -> _Result:
    """AOT, paired (Melnyk et al. 2024, arXiv 2406.05882; TRL ``loss_type="aot"``): distributional alignment by
    optimal transport in one dimension, i.e. by sorting across the batch.

    With x = sort(s_w - s_l) and y = sort(r_w - r_l) (ascending, over the B pairs), term k is
    L_k = (1 - e) softplus(-beta (x_k - y_k)) + e softplus(beta (x_k - y_k)).

    A batch loss: ``losses[k]`` is the k-th sorted term, not pair k's. Pair j enters the term at its rank in x, so
    a_w,j = -a_l,j = beta * dL_k/dz at that rank (ties broken as torch.sort breaks them, as autograd does).
    Rewards: beta * (s - r) per pair.
    """
    beta, eps = _positive("beta", beta), _smoothing(label_smoothing)
    x = torch.sort(b.s_w - b.s_l, dim=0).values
    y = torch.sort(b.r_w - b.r_l, dim=0).values
    z = beta * (x - y)
    a_w = _sorted_coefficients(b.s_w - b.s_l, beta * _smoothed_nll_grad(z.detach(), eps))
    return _Result(_smoothed_nll(z, eps), *b.rewards(beta), None, a_w, -a_w)


@_register("aot_unpaired", reference=True, trl="aot_unpaired", trl_hyper=("beta", "label_smoothing"), per_pair=False)
def _aot_unpaired(b: _Batch, *, beta: float = 0.1, label_smoothing: float = 0.0) -> _Result:
    """AOT, unpaired (Melnyk et al. 2024; TRL ``loss_type="aot_unpaired"``): the chosen and rejected log-ratio
    distributions aligned by sorting each separately across the batch.

    With x = sort(s_w - r_w), y = sort(s_l - r_l): L_k = (1 - e) softplus(-beta (x_k - y_k)) + e softplus(...).
    A batch loss (``losses[k]`` is the k-th sorted term). Chosen pair j takes the term at its rank in x, rejected pair
    j the term at its rank in y, so a_w and a_l generally come from different terms. Rewards: beta * (s - r).
    """
    beta, eps = _positive("beta", beta), _smoothing(label_smoothing)
    c, d = b.s_w - b.r_w, b.s_l - b.r_l
    z = beta * (torch.sort(c, dim=0).values - torch.sort(d, dim=0).values)
    g = beta * _smoothed_nll_grad(z.detach(), eps)
    return _Result(_smoothed_nll(z, eps), *b.rewards(beta), None, _sorted_coefficients(c, g),
                   _sorted_coefficients(d, -g))


@_register("apo_zero", reference=True, trl="apo_zero")
def _apo_zero(b: _Batch, *, beta: float = 0.1) -> _Result:
    """APO-zero (D'Oosterlinck et al. 2024, arXiv 2408.06266, eq. 7; TRL ``loss_type="apo_zero"``): raise the chosen
    and lower the rejected likelihood, each on its own: with u = beta (s_w - r_w), v = beta (s_l - r_l),
    L = 1 - sigmoid(u) + sigmoid(v).

    a_w = -beta sigmoid(u) sigmoid(-u) < 0 < a_l = beta sigmoid(v) sigmoid(-v). Rewards: u, v.
    """
    beta = _positive("beta", beta)
    u, v = b.rewards(beta)
    ud, vd = u.detach(), v.detach()
    return _Result(1.0 - torch.sigmoid(u) + torch.sigmoid(v), u, v, None,
                   -beta * torch.sigmoid(ud) * torch.sigmoid(-ud), beta * torch.sigmoid(vd) * torch.sigmoid(-vd))


@_register("apo_down", reference=True, trl="apo_down")
def _apo_down(b: _Batch, *, beta: float = 0.1) -> _Result:
    """APO-down (D'Oosterlinck et al. 2024, eq. 8; TRL ``loss_type="apo_down"``): lower the chosen likelihood and the
    rejected one more: with u = beta (s_w - r_w), v = beta (s_l - r_l),  L = sigmoid(u) + 1 - sigmoid(u - v).

    a_w = beta [sigmoid'(u) - sigmoid'(u - v)], a_l = beta sigmoid'(u - v) with sigmoid' = sigmoid (1 - sigmoid).
    Rewards: u, v.
    """
    beta = _positive("beta", beta)
    u, v = b.rewards(beta)
    su, sm = torch.sigmoid(u.detach()), torch.sigmoid((u - v).detach())
    dm = sm * (1.0 - sm)
    return _Result(torch.sigmoid(u) + 1.0 - torch.sigmoid(u - v), u, v, None, beta * (su * (1.0 - su) - dm), beta * dm)


@_register("discopop", reference=True, trl="discopop", trl_hyper=("beta", "discopop_tau"))
def _discopop(b: _Batch, *, beta: float = 0.1, discopop_tau: float = 0.05) -> _Result:
    """DiscoPOP, log-ratio modulated loss (Chris Lu et al. 2024, arXiv 2406.08414, eq. 5; TRL ``loss_type="discopop"``).

    z = beta * [(s_w - r_w) - (s_l - r_l)], m = sigmoid(z / tau):  L = (1 - m) softplus(-z) + m exp(-z).

    dL/dz = -(1 - m) sigmoid(-z) - m exp(-z) + m (1 - m) / tau * (exp(-z) - softplus(-z)). Default tau 0.05 (TRL and
    the paper). exp(-z) overflows for very negative margins, as in TRL. Rewards: beta * (s - r).
    """
    beta, tau = _positive("beta", beta), _positive("discopop_tau", discopop_tau)
    z = _margin(b, beta)
    m = torch.sigmoid(z / tau)
    logistic, exponential = -F.logsigmoid(z), torch.exp(-z)
    losses = logistic * (1.0 - m) + exponential * m
    zd, md = z.detach(), m.detach()
    ld, ed = logistic.detach(), exponential.detach()
    dz = -(1.0 - md) * torch.sigmoid(-zd) - md * ed + md * (1.0 - md) / tau * (ed - ld)
    return _Result(losses, *b.rewards(beta), None, beta * dz, -beta * dz)


@_register("sft", reference=True, lengths=(True, False), trl="sft", per_pair=False)
def _sft(b: _Batch, *, beta: float = 0.1) -> _Result:
    """SFT on the chosen responses (TRL ``loss_type="sft"``, e.g. MPO's third term): the mean NLL over every chosen
    response token of the batch, L = -sum_j s_w,j / sum_j T_w,j, repeated B times (TRL's layout).

    A batch loss: token-weighted, so a_w = -B / sum_j T_w,j for every pair (the gradient of ``losses.mean()`` is
    -1 / sum T_w per token) and a_l = 0: the rejected response does not enter, and its statistics are undefined (the
    monitor reports those pairs as such). TRL counts the scored tokens (its shifted completion mask): pass those as
    ``chosen_lengths``. The references and ``beta`` only enter the rewards, beta * (s - r) as TRL logs them.
    ``nll`` is the per-pair -s_w / T_w.
    """
    beta = _positive("beta", beta)
    total = b.T_w.sum()
    loss = -b.s_w.sum() / total
    n = b.s_w.shape[0]
    a_w = torch.full_like(b.s_w, -float(n)) / total
    return _Result(loss.expand(n), *b.rewards(beta), -b.s_w / b.T_w, a_w, torch.zeros_like(a_w))


@_register("sigmoid_norm", reference=True, lengths=(True, True), trl="sigmoid_norm")
def _sigmoid_norm(b: _Batch, *, beta: float = 0.1) -> _Result:
    """Length-normalised DPO (TRL ``loss_type="sigmoid_norm"``): z = beta * [(s_w - r_w) / T_w - (s_l - r_l) / T_l],
    L = softplus(-z), on the per-token average log-ratios (TRL's T: the completion-mask count, at least 1).

    a_w = -beta sigmoid(-z) / T_w, a_l = beta sigmoid(-z) / T_l. Rewards: beta * (s - r), summed, as TRL logs them.
    """
    beta = _positive("beta", beta)
    z = beta * ((b.s_w - b.r_w) / b.T_w - (b.s_l - b.r_l) / b.T_l)
    w = beta * torch.sigmoid(-z.detach())
    return _Result(-F.logsigmoid(z), *b.rewards(beta), None, -w / b.T_w, w / b.T_l)


# --------------------------------------------------------------------------------------------------------------------
# Dispatch

# Other spellings of the same losses (TRL's loss_type names resolve through TRL_LOSS_TYPES).
_ALIASES = {"slic": "hinge", "r-dpo": "rdpo", "r_dpo": "rdpo", "dpo-positive": "dpop"}


def _resolve(name: str, hyper: Mapping[str, Any]) -> LossSpec:
    key = name
    if isinstance(name, str) and name not in LOSSES:
        key = _ALIASES.get(name, TRL_LOSS_TYPES.get(name, name))
    spec = LOSSES.get(key) if isinstance(key, str) else None
    if spec is None:
        aliases = {**{t: n for t, n in TRL_LOSS_TYPES.items() if t != n}, **_ALIASES}
        raise ValueError(f"unknown loss `name` {name!r}; known losses: {', '.join(LOSSES)} "
                         f"(aliases: {', '.join(f'{a}={t}' for a, t in aliases.items())})")
    unknown = sorted(set(hyper) - set(spec.hyper))
    if unknown:
        raise ValueError(f"{spec.name} does not take hyperparameter(s) {', '.join(map(repr, unknown))}; "
                         f"it takes {', '.join(spec.hyper) or 'none'}")
    return spec


def _run(spec: LossSpec, chosen_logps, rejected_logps, given: Mapping[str, Any], hyper: Mapping[str, Any]) -> _Result:
    b = _batch(spec.name, chosen_logps, rejected_logps, given, spec.inputs, spec.optional_inputs)
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
    """Compute the loss ``name`` (a key of :data:`LOSSES`, a TRL ``loss_type`` such as ``"sigmoid"``, or an alias).

    All tensors are ``[B]``; log-probs are summed over response tokens; lengths are response-token counts (int or
    float, > 0). Inputs the loss does not use are ignored (see ``LOSSES[name].inputs``). ``hyper`` are the loss's
    keyword hyperparameters (``LOSSES[name].hyper`` lists them with their defaults).

    Raises:
        ValueError: unknown name or hyperparameter, a needed input missing, mismatched shapes, non-positive lengths,
            beta <= 0 (each message names the argument).
    """
    given = {"ref_chosen_logps": ref_chosen_logps, "ref_rejected_logps": ref_rejected_logps,
             "chosen_lengths": chosen_lengths, "rejected_lengths": rejected_lengths}
    return _run(_resolve(name, hyper), chosen_logps, rejected_logps, given, hyper).output()


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
    """a_w = d(sum_i L_i)/ds_w,i and a_l = d(sum_i L_i)/ds_l,i (docs/math.md section 2), each ``[B]``, detached.

    For a per-pair loss these are dL_i/ds_w,i and dL_i/ds_l,i; for the batch losses (aot, aot_unpaired, sft) B times
    the gradient of the batch mean. Same arguments as :func:`preference_loss`; with respect to the SUMMED policy
    log-probs (losses defined on averages include the 1/T). For ``losses.mean()`` divide by B.
    Sigmoid-type losses give a_w < 0 < a_l (a_w also carries -weight/T_w from an NLL term). Hinge and RRHF give
    a_l = 0 once the pair's margin is met (hinge also a_w = 0); IPO's signs flip past its target margin.
    At a kink (hinge exactly at the margin, DPOP exactly at the reference) the value is PyTorch's one-sided choice.
    Every registered loss has a closed form (``LossSpec.closed_form``); one without would be differentiated here.
    """
    spec = _resolve(name, hyper)
    given = {"ref_chosen_logps": ref_chosen_logps, "ref_rejected_logps": ref_rejected_logps,
             "chosen_lengths": chosen_lengths, "rejected_lengths": rejected_lengths}
    s_w = chosen_logps.detach() if isinstance(chosen_logps, Tensor) else chosen_logps
    s_l = rejected_logps.detach() if isinstance(rejected_logps, Tensor) else rejected_logps
    if spec.closed_form:
        with torch.no_grad():
            r = _run(spec, s_w, s_l, given, hyper)
        return r.a_w, r.a_l
    with torch.enable_grad():
        s_w, s_l = s_w.clone().requires_grad_(True), s_l.clone().requires_grad_(True)
        r = _run(spec, s_w, s_l, given, hyper)
        a_w, a_l = torch.autograd.grad(r.losses.sum(), (s_w, s_l), allow_unused=True)
    return (torch.zeros_like(s_w) if a_w is None else a_w).detach(), (
        torch.zeros_like(s_l) if a_l is None else a_l).detach()
