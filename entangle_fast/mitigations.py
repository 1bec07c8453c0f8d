"""The paper's two mitigations of gradient entanglement (docs/math.md section 6).

Pairwise normalised gradient descent
    Step along ``sum_i c_i (g_w,i / ||g_w,i|| - g_l,i / ||g_l,i||)`` instead of the loss gradient. For a pair alone the
    first-order changes are ``ds_w = eta c ||g_w|| (1 - cos) >= 0`` and ``ds_l = -eta c ||g_l|| (1 - cos) <= 0``:
    the chosen log-prob rises and the rejected one falls whatever the norms. In a batch each log-prob also moves with
    the other pairs' directions, so "every pair" holds to first order when those cross terms are smaller.

    Built from ONE backward of an ordinary margin loss: an :class:`~entangle_fast.EntanglementMonitor` with
    ``keep_factors=True`` measures ``||g_w,i||``, ``||g_l,i||`` and keeps each layer's factors, from which
    :meth:`~entangle_fast.EntanglementMonitor.weighted_gradients` re-forms any per-row weighting of the weight gradient
    (the fused head takes one head-only pass over the vocabulary; the model is not run backward again).

Sparse token masking
    Weights w_t in [0, 1] on the token log-probs, s = sum_t w_t l_t, so the cross term becomes
    ``sum_{t,s} w_t w'_s K[t, s]``. Two ways to set them:

    - learned (:class:`SparseTokenMask`): w = sigmoid(z) per response token, z trained with the policy on the masked
      preference loss plus an L1 penalty ``l1 * sum w`` (w >= 0, so the L1 norm is the plain sum). The sigmoid keeps
      every weight inside (0, 1) for any optimizer; weights approach 0 but never reach it, so "kept" means w > 1/2.
    - entanglement-guided (:func:`entanglement_token_weights`): from the output-layer token matrix of a step, a token
      whose gradient has a near-copy on the other side (positive normalised K, a shared token) is turned down by that
      similarity; contrastive tokens (negative K) keep weight 1.
"""
from __future__ import annotations

import warnings
from typing import Iterable

import torch
from torch import Tensor, nn

from entangle_fast.data import default_pairs
from entangle_fast.monitor import EntanglementMonitor
from entangle_fast.token_stats import OutputLayerTokenStats

__all__ = [
    "normalized_pairwise_gradients",
    "NormalizedPairwiseUpdate",
    "SparseTokenMask",
    "masked_sequence_logps",
    "entanglement_token_weights",
]


# ----------------------------------------------------------------------------------------------------------------------
# Pairwise normalised gradient descent
# ----------------------------------------------------------------------------------------------------------------------


def normalized_pairwise_gradients(monitor: EntanglementMonitor, c: Tensor | Iterable[float] | None = None
                                  ) -> dict[nn.Parameter, Tensor]:
    """The descent gradient ``G = -sum_i c_i (g_w,i / ||g_w,i|| - g_l,i / ||g_l,i||)`` of the monitored step.

    ``theta -= lr * G`` is the normalised update (G has the sign of a loss gradient, so it drops into ``.grad``).

    Args:
        monitor: an :class:`~entangle_fast.EntanglementMonitor` built with ``keep_factors=True`` whose with-block ran
            one forward and backward of any margin loss of the log-probs (DPO, IPO, ...): the loss only has to give
            every row a nonzero coefficient; its own gradient is not used.
        c: ``[B]`` positive pair weights; default ``1 / B`` each (the scale of a batch-mean loss). ``c = -stats.a_w``
            keeps the loss's own per-pair weights (DPO: beta sigmoid(-beta u_i) / B), so a pair the loss already
            separates gets less push and the step shrinks as the margins grow, as DPO's does; the demo uses that.

    Returns:
        parameter -> gradient, for every tracked parameter.

    Pairs whose direction is undefined (a zero loss coefficient, or a zero gradient norm) are left out with a warning.
    With ``mode="sketch"`` the norms are the sketch's estimates; the re-formed gradient itself is exact either way.
    """
    st = monitor.stats
    b = st.inner.shape[0]
    dtype, device = st.chosen_sq_norm.dtype, st.chosen_sq_norm.device
    c = torch.full((b,), 1.0 / max(b, 1), dtype=dtype, device=device) if c is None else \
        torch.as_tensor(c, dtype=dtype, device=device)
    if c.shape != (b,):
        raise ValueError(f"c must have shape [B] = [{b}], got {tuple(c.shape)}")
    nw, nl = st.chosen_sq_norm, st.rejected_sq_norm
    ok = torch.isfinite(nw) & torch.isfinite(nl) & (nw > 0) & (nl > 0) & ~st.zero_coefficient
    if not bool(ok.all()):
        warnings.warn(f"pairs {torch.nonzero(~ok).flatten().tolist()} have no defined normalised direction (zero "
                      "loss coefficient or zero gradient); they are left out of the update", stacklevel=2)
    one = torch.ones_like(nw)
    chosen = torch.where(ok, -c / torch.sqrt(torch.where(ok, nw, one)), 0)
    rejected = torch.where(ok, c / torch.sqrt(torch.where(ok, nl, one)), 0)
    return monitor.weighted_gradients(chosen, rejected)


class NormalizedPairwiseUpdate:
    """Drop-in normalised update: run the step as usual inside the with-block; at exit the ``.grad`` of every tracked
    parameter is replaced by :func:`normalized_pairwise_gradients` (untracked parameters keep theirs).

    Usage::

        update = NormalizedPairwiseUpdate(model)             # builds EntanglementMonitor(model, keep_factors=True)
        with update:
            out = entangle_fast.preference_logprobs(model, batch)
            dpo_loss(out.chosen_logps, out.rejected_logps, ref_w, ref_l).losses.mean().backward()
        optimizer.step()                                      # steps along -sum_i c_i (g_w/|g_w| - g_l/|g_l|)
        update.stats                                          # EntanglementStats of the step (norms, cosine, ...)

    Args:
        model: the policy. c: pair weights (see :func:`normalized_pairwise_gradients`).
        **monitor_kwargs: passed to :class:`~entangle_fast.EntanglementMonitor` (``params``, ``exclude``, ...).
    """

    def __init__(self, model: nn.Module, c=None, **monitor_kwargs):
        self.monitor = EntanglementMonitor(model, keep_factors=True, **monitor_kwargs)
        self.c = c
        self.gradients: dict[nn.Parameter, Tensor] = {}

    def __enter__(self) -> "NormalizedPairwiseUpdate":
        self.monitor.__enter__()
        self.gradients = {}
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.monitor.__exit__(exc_type, exc, tb)
        if exc_type is None:
            self.gradients = normalized_pairwise_gradients(self.monitor, self.c)
            for p, g in self.gradients.items():
                p.grad = g
        return False

    @property
    def stats(self):
        return self.monitor.stats


# ----------------------------------------------------------------------------------------------------------------------
# Sparse token masking
# ----------------------------------------------------------------------------------------------------------------------


def masked_sequence_logps(chosen_token_logps: Tensor, rejected_token_logps: Tensor, weights: Tensor
                          ) -> tuple[Tensor, Tensor]:
    """``(sum_t w_t l^w_t, sum_s w_s l^l_s)`` ``[B]`` from per-token log-probs ``[B, T]`` (0 off the response, as
    :class:`~entangle_fast.PreferenceLogprobs` gives them) and ``weights [2B, T]`` (chosen rows first)."""
    b = chosen_token_logps.shape[0]
    if weights.shape != (2 * b, chosen_token_logps.shape[1]):
        raise ValueError(f"weights must have shape [2B, T] = [{2 * b}, {chosen_token_logps.shape[1]}], got "
                         f"{tuple(weights.shape)}")
    w = weights.to(chosen_token_logps.dtype)
    return (w[:b] * chosen_token_logps).sum(-1), (w[b:] * rejected_token_logps).sum(-1)


class SparseTokenMask(nn.Module):
    """Learned token weights w = sigmoid(z) on the response tokens of a fixed set of rows, with an L1 penalty.

    Train the logits with the policy: ``loss = preference_loss(*mask.sequence_logps(out), ...) + mask.penalty()``.
    The masked sums apply to the reference log-probs too (``mask.sequence_logps(ref_out)``), so the margin is
    ``sum_t w_t (l_t - r_t)`` per side. For a data set, keep one mask per batch of fixed examples (or index rows).

    Args:
        token_mask: ``[2B, T]`` bool, the response tokens (``PreferenceLogprobs.token_mask``).
        init: initial weight of every token, in (0, 1).
        l1: penalty per unit of weight, averaged over the B pairs: ``l1 * sum(w) / B``.
    """

    def __init__(self, token_mask: Tensor, *, init: float = 0.5, l1: float = 1e-2):
        super().__init__()
        if not 0 < init < 1:
            raise ValueError(f"init must lie in (0, 1), got {init}")
        if l1 < 0:
            raise ValueError(f"l1 must be >= 0, got {l1}")
        if token_mask.ndim != 2 or token_mask.shape[0] % 2:
            raise ValueError(f"token_mask must be [2B, T] (chosen rows, then rejected rows), got "
                             f"{tuple(token_mask.shape)}")
        self.register_buffer("token_mask", token_mask.bool().clone())
        z0 = torch.logit(torch.tensor(float(init), dtype=torch.float64)).item()
        self.logits = nn.Parameter(torch.full(token_mask.shape, z0))
        self.l1 = float(l1)

    def weights(self) -> Tensor:
        """``[2B, T]`` w in (0, 1) on response tokens, 0 elsewhere."""
        return torch.sigmoid(self.logits) * self.token_mask

    def sequence_logps(self, out) -> tuple[Tensor, Tensor]:
        """Masked ``(chosen [B], rejected [B])`` sums of a :class:`~entangle_fast.PreferenceLogprobs`."""
        return masked_sequence_logps(out.chosen_token_logps, out.rejected_token_logps, self.weights())

    def penalty(self) -> Tensor:
        """``l1 * sum(w) / B``."""
        return self.l1 * self.weights().sum() / (self.token_mask.shape[0] // 2)


def entanglement_token_weights(stats: OutputLayerTokenStats, width: int) -> Tensor:
    """Token weights set from the output-layer token matrix of a step: ``[2B, width]`` (chosen rows first, the
    per-token layout of :class:`~entangle_fast.PreferenceLogprobs`; 0 off the response).

    With the token gradients' cosine C[t, s] = K[t, s] / sqrt(K_ww[t, t] K_ll[s, s]), a chosen token gets
    ``w_t = 1 - max(0, max_s C[t, s])`` and a rejected token ``w'_s = 1 - max(0, max_t C[t, s])``: a token whose
    gradient has a near-copy on the other side (a shared token: large positive K) is turned down by that similarity,
    a contrastive token (its best match has C <= 0) keeps weight 1. The masked cross term is sum w_t w'_s K[t, s].

    Args:
        stats: from ``preference_logprobs(..., token_stats=True, full_matrices=True)`` after its backward (or
            :func:`entangle_fast.output_layer_token_stats` with ``full_matrices=True`` for a step without training):
            the diagonals of the within-response matrices are the token gradients' squared norms. Pairs must be the
            default layout (row i with row B + i).
        width: the per-token width T of the rows (``out.chosen_token_logps.shape[1]``).
    """
    if stats.chosen_matrix is None or stats.rejected_matrix is None:
        raise ValueError("entanglement_token_weights needs the token norms: compute the statistics with "
                         "full_matrices=True")
    b = stats.pairs.shape[0]
    if not torch.equal(stats.pairs.cpu(), default_pairs(2 * b)):
        raise ValueError("entanglement_token_weights expects the default pairs (row i with row B + i)")
    weights = torch.zeros(2 * b, width, dtype=stats.token_matrix.dtype, device=stats.token_matrix.device)
    for i in range(b):
        tw, tl = int(stats.chosen_lengths[i]), int(stats.rejected_lengths[i])
        if tw == 0 or tl == 0:
            continue
        k = stats.token_matrix[i, :tw, :tl]
        nw = torch.diagonal(stats.chosen_matrix[i, :tw, :tw]).clamp(min=0)
        nl = torch.diagonal(stats.rejected_matrix[i, :tl, :tl]).clamp(min=0)
        den = torch.sqrt(nw[:, None] * nl[None, :])
        cos = torch.where(den > 0, k / torch.where(den > 0, den, 1), 0)
        weights[i, stats.chosen_positions[i, :tw]] = 1 - cos.max(1).values.clamp(0, 1)
        weights[b + i, stats.rejected_positions[i, :tl]] = 1 - cos.max(0).values.clamp(0, 1)
    return weights
