"""The monitor's result: per-pair entanglement statistics of the log-prob gradients (docs/math.md sections 1-2, 4)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


CASE_NAMES = {0: "undefined", 1: "ideal", 2: "both fall", 3: "both rise"}


@dataclass(repr=False)
class EntanglementStats:
    """Gradient-entanglement statistics of B preference pairs over the tracked parameters, from one backward.

    All log-prob statistics are of g_w = grad s_w and g_l = grad s_l, the gradients of the summed response log-probs
    (the loss-gradient pieces a_w g_w, a_l g_l that the backward carries, divided by the coefficients). When the loss
    weights the tokens of a row unequally, they are those of the weighted sum (see ``uniform_upstream``).

    Attributes:
        inner: ``[B]`` I = <g_w, g_l>.
        chosen_sq_norm / rejected_sq_norm: ``[B]`` N_w = ||g_w||^2, N_l = ||g_l||^2.
        cosine: ``[B]`` I / sqrt(N_w N_l).
        a_w / a_l: ``[B]`` dL/ds_w, dL/ds_l, the coefficients the backward carried (for a batch-mean loss they include
            the 1/B).
        case: ``[B]`` int64, the first-order outcome of an SGD step on the pair alone (paper's Table 1, general
            weights): 1 ideal (chosen rises, rejected falls; I < min(N_w, N_l) for DPO), 2 both fall, 3 both rise,
            0 undefined (a zero coefficient or a non-finite statistic).
        chosen_falls: ``[B]`` bool, a_w N_w + a_l I > 0 (with a_w < 0 < a_l: I > (-a_w / a_l) N_w).
        rejected_rises: ``[B]`` bool, a_w I + a_l N_l < 0 (with a_w < 0 < a_l: I > (a_l / -a_w) N_l).
        zero_coefficient: ``[B]`` bool, a_w == 0 or a_l == 0 (hinge satisfied, sigmoid underflow): every statistic
            that divides by a zero coefficient is NaN (inner and cosine; N_w when a_w == 0; N_l when a_l == 0).
        per_module: module name -> ``(inner, chosen_sq_norm, rejected_sq_norm)``, each ``[B]``. A parameter shared by
            two modules (tied embeddings) adds an entry ``"<module> x <module>"`` with the cross terms
            (<g^(1)_w, g^(2)_l> + <g^(2)_w, g^(1)_l>, 2 <g^(1)_w, g^(2)_w>, 2 <g^(1)_l, g^(2)_l>). The entries sum
            to the totals.
        pairs: ``[B, 2]`` int64, the (chosen row, rejected row) of each pair in the model's forward.
        position_attribution: ``[B, T, T]`` or None. Entry [i, tau, sigma] sums, over layers, the terms the positions
            tau of the chosen row and sigma of the rejected row contribute to I; ``position_attribution[i].sum()`` is
            ``inner[i]``. It splits I by where layers act; it is not the token matrix K[t, s] of per-token log-prob
            gradients (:class:`entangle_fast.OutputLayerTokenStats.token_matrix` is that, at the output layer).
        uniform_upstream: ``[B]`` bool or None: with the fused log-prob op, whether every response token of both rows
            received the same upstream gradient (False: the statistics are those of a token-weighted sum).
        sketched: names of the modules whose terms are sketch estimates (``mode="sketch"``), unbiased, not exact.
    """

    inner: Tensor
    chosen_sq_norm: Tensor
    rejected_sq_norm: Tensor
    cosine: Tensor
    a_w: Tensor
    a_l: Tensor
    case: Tensor
    chosen_falls: Tensor
    rejected_rises: Tensor
    zero_coefficient: Tensor
    per_module: dict[str, tuple[Tensor, Tensor, Tensor]]
    pairs: Tensor
    position_attribution: Tensor | None = None
    uniform_upstream: Tensor | None = None
    sketched: tuple[str, ...] = field(default_factory=tuple)

    def predicted_delta(self, lr: float) -> tuple[Tensor, Tensor]:
        """First-order change of ``(s_w, s_l)`` ``[B]`` from one plain SGD step of size ``lr`` on each pair alone:

            ds_w = -lr (a_w N_w + a_l I),    ds_l = -lr (a_w I + a_l N_l)

        Cross-pair terms of a batch step are left out. A zero coefficient removes its term (0 * NaN counts as 0).
        With Adam or any preconditioned optimizer this is an indicator of the direction of the pressure on each
        log-prob, not a forecast of the change.
        """
        changes, _, _ = _first_order(self.inner, self.chosen_sq_norm, self.rejected_sq_norm, self.a_w, self.a_l)
        d_chosen, d_rejected = (changes * -lr).unbind(0)
        return d_chosen, d_rejected

    def summary(self, lr: float | None = None, max_pairs: int = 16) -> str:
        """A short readable table, one line per pair: I, N_w, N_l, cosine, case and the predicted change.

        Args:
            lr: SGD step size for the predicted change columns ``ds_w``, ``ds_l`` (:meth:`predicted_delta`); without
                it they are per unit step size (``ds_w/lr``, ``ds_l/lr``).
            max_pairs: at most this many pairs are listed (the first ones); the line below says how many were left out.

        ``repr(stats)`` is ``stats.summary()``; the tensors themselves are the attributes. For per-step scalars to log
        (means over pairs, case fractions) see ``entangle_fast.integrations.distributed.entanglement_metrics``.
        """
        b = int(self.inner.shape[0])
        step = 1.0 if lr is None else float(lr)
        d_chosen, d_rejected = self.predicted_delta(step)
        cols = [t.detach().to("cpu", torch.float64) for t in (self.inner, self.chosen_sq_norm, self.rejected_sq_norm,
                                                              self.cosine, d_chosen, d_rejected)]
        case = self.case.detach().to("cpu").tolist()
        counts = {name: case.count(c) for c, name in CASE_NAMES.items() if case.count(c)}
        extras = [f"{len(self.per_module)} module terms in per_module"]
        if self.sketched:
            extras.append(f"{len(self.sketched)} sketched (estimates)")
        if self.position_attribution is not None:
            extras.append("position_attribution")
        head = (f"EntanglementStats: {b} pair{'s' if b != 1 else ''}; cases "
                + (", ".join(f"{n} {k}" for n, k in counts.items()) or "none") + f"; {'; '.join(extras)}")
        pred = ("ds_w/lr", "ds_l/lr") if lr is None else ("ds_w", "ds_l")
        names = ("pair", "inner", "N_w", "N_l", "cosine", "case", pred[0], pred[1])
        lines = [head, f"{names[0]:>4} {names[1]:>10} {names[2]:>10} {names[3]:>10} {names[4]:>7} {names[5]:>9} "
                       f"{names[6]:>10} {names[7]:>10}"]
        shown = min(b, max(int(max_pairs), 0))
        for i in range(shown):
            inner, nw, nl, cos, dw, dl = (float(c[i]) for c in cols)
            lines.append(f"{i:>4} {inner:>10.3g} {nw:>10.3g} {nl:>10.3g} {cos:>+7.3f} {CASE_NAMES[case[i]]:>9} "
                         f"{dw:>+10.3g} {dl:>+10.3g}")
        if shown < b:
            lines.append(f"... {b - shown} more pairs (summary(max_pairs=...) lists more)")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.summary()


def _first_order(inner: Tensor, nw: Tensor, nl: Tensor, a_w: Tensor, a_l: Tensor):
    """The first-order SGD changes of docs/math.md section 2 per unit step size, before the minus sign: ``[2, B]``
    a_w N_w + a_l I (chosen) and a_w I + a_l N_l (rejected), [[N_w, I], [I, N_l]] times (a_w, a_l) in one product,
    a zero coefficient's products 0 (0 * NaN counts as 0). Returns ``(changes, grams [2, 2, B], coefs [2, B])``."""
    grams = torch.stack([nw, inner, inner, nl]).view(2, 2, -1)
    coefs = torch.stack([a_w, a_l]).to(grams.dtype)
    return torch.where(coefs == 0, 0, grams * coefs).sum(1), grams, coefs


def classify(inner: Tensor, nw: Tensor, nl: Tensor, a_w: Tensor, a_l: Tensor):
    """``(case, chosen_falls, rejected_rises)`` from the first-order SGD changes of docs/math.md section 2 (their
    signs: the step is minus the changes)."""
    changes, grams, coefs = _first_order(inner, nw, nl, a_w, a_l)
    chosen, rejected = changes.unbind(0)
    chosen_falls, rejected_rises = chosen > 0, rejected < 0
    defined = (coefs != 0).all(0) & torch.isfinite(grams.view(4, -1)).all(0)
    # ideal 1 (neither), both fall 2 (chosen falls only), both rise 3 (rejected rises only); both at once: 0.
    case = torch.where(chosen_falls, torch.where(rejected_rises, 0, 2), torch.where(rejected_rises, 3, 1))
    case = torch.where(defined, case, 0)
    return case, chosen_falls & defined, rejected_rises & defined
