"""CHES, the centered hidden embedding similarity of a preference pair (Razin et al. 2024, arXiv 2410.08847;
docs/math.md section 2.1).

With h_t the final hidden state (after the final norm) at each loss position of a response (the positions whose
output predicts a response token) and H_w = sum_t h^w_t, H_l = sum_t h^l_t:

    CHES      = <H_w, H_l> - ||H_w||^2
    CHES_norm = <H_w, H_l> / (T_w T_l) - ||H_w||^2 / T_w^2

Larger means more likelihood displacement (the chosen log-prob is predicted to fall under a margin loss). The fused
log-prob head reads exactly these h_t, so both cost one masked sum over ``[T, d]`` per row and two dot products.
"""
from __future__ import annotations

import torch
from torch import Tensor

from entangle_fast.data import default_pairs

__all__ = ["ches_scores"]


def _pairs(pairs, rows: int, device) -> Tensor:
    if pairs is None:
        return default_pairs(rows, device)
    pairs = torch.as_tensor(pairs, device=device)
    if pairs.ndim != 2 or pairs.shape[1] != 2 or pairs.dtype.is_floating_point:
        raise ValueError(f"ches_scores: `pairs` must be integer [P, 2] (chosen row, rejected row), got "
                         f"{tuple(pairs.shape)} {pairs.dtype}")
    if pairs.numel() and (int(pairs.min()) < 0 or int(pairs.max()) >= rows):
        raise ValueError(f"ches_scores: `pairs` index rows outside [0, {rows})")
    return pairs.long()


@torch.no_grad()
def ches_scores(hidden: Tensor, loss_mask: Tensor, pairs: Tensor | list | None = None) -> tuple[Tensor, Tensor]:
    """CHES and its length-normalised form for each pair.

    Args:
        hidden: ``[2B, T, d]`` final hidden states (or ``[R, T, d]`` with ``pairs``), aligned with ``loss_mask``:
            position t is a loss position when its output predicts a response token.
        loss_mask: ``[2B, T]`` bool (or 0/1) loss positions.
        pairs: ``[P, 2]`` (chosen row, rejected row); default row i with row B + i (TRL's concatenated layout).

    Returns:
        ``(ches [P], ches_norm [P])`` in float32 (float64 for float64 hidden), detached. ``ches_norm`` is NaN for a
        pair with an empty response.
    """
    if not isinstance(hidden, Tensor) or hidden.ndim != 3:
        raise ValueError(f"ches_scores: `hidden` must be [R, T, d], got "
                         f"{tuple(hidden.shape) if isinstance(hidden, Tensor) else type(hidden).__name__}")
    if not isinstance(loss_mask, Tensor) or tuple(loss_mask.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"ches_scores: `loss_mask` must be [R, T] = {tuple(hidden.shape[:2])}, got "
                         f"{tuple(loss_mask.shape) if isinstance(loss_mask, Tensor) else type(loss_mask).__name__}")
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    rows = hidden.shape[0]
    mask = loss_mask.to(device=hidden.device, dtype=dtype)
    # One masked sum per row, accumulated in at least fp32: [R, d].
    sums = torch.bmm(mask.unsqueeze(1), hidden if hidden.dtype == dtype else hidden.to(dtype)).squeeze(1)
    counts = mask.sum(1)
    if pairs is None:  # row i with row B + i: halves, no gather
        if rows % 2:
            default_pairs(rows)  # raises, naming the odd row count
        b = rows // 2
        h_w, h_l, t_w, t_l = sums[:b], sums[b:], counts[:b], counts[b:]
    else:
        idx = _pairs(pairs, rows, hidden.device)
        h_w, h_l = sums[idx[:, 0]], sums[idx[:, 1]]
        t_w, t_l = counts[idx[:, 0]], counts[idx[:, 1]]
    cross, own = (h_w * h_l).sum(-1), (h_w * h_w).sum(-1)
    empty = (t_w == 0) | (t_l == 0)
    norm = torch.where(empty, float("nan"), cross / (t_w * t_l).clamp(min=1) - own / (t_w * t_w).clamp(min=1))
    return cross - own, norm
