"""The PyTorch path of the ghost Gram: the ``ghost_gram_fwd`` contract of ``kernels/ghost_gram.py`` in bounded tiles.

values[p] = sum_{tau in i, sigma in j} F(tau, sigma) (gamma_tau . gamma_sigma), F as in :mod:`entangle_fast.ghost`,
formed one [TORCH_TILE, TORCH_TILE] block of each pair's (tau, sigma) plane at a time (docs/math.md section 4).
Registered in :mod:`entangle_fast._backend` by :mod:`entangle_fast.ghost`.
"""
from __future__ import annotations

import torch

from entangle_fast._backend import compute_dtype

# The PyTorch path forms [tile, tile] blocks of the (tau, sigma) plane, 16 MiB each in fp32, whatever the lengths.
TORCH_TILE = 2048


def pair_bounds(cu_seqlens: Tensor, seg_pairs: Tensor):
    """Host lists ``[(start_i, end_i, start_j, end_j)]`` per pair and (Tmax_i, Tmax_j)."""
    cu = cu_seqlens.tolist()
    bounds = [(cu[i], cu[i + 1], cu[j], cu[j + 1]) for i, j in seg_pairs.tolist()]
    tmax_i = max((e - s for s, e, _, _ in bounds), default=0)
    tmax_j = max((e - s for _, _, s, e in bounds), default=0)
    return bounds, tmax_i, tmax_j


def torch_ghost_gram_fwd(a, gamma, ids, cu_seqlens, seg_pairs, *, positions: bool = False):
    """PyTorch path of the ``ghost_gram_fwd`` contract (see ``kernels/ghost_gram.py``).

    Walks each pair's (tau, sigma) plane in [TORCH_TILE, TORCH_TILE] blocks in fp32 (fp64 for fp64 inputs), so memory
    stays bounded whatever the segment lengths; no [S, S] Gram of the whole batch is formed.
    Returns ``(values [P], position_matrix [P, Tmax_i, Tmax_j] or None)``.
    """
    cdt = compute_dtype(gamma.dtype)
    bounds, tmax_i, tmax_j = pair_bounds(cu_seqlens, seg_pairs)
    values = torch.zeros(len(bounds), dtype=cdt, device=gamma.device)
    pos = torch.zeros(len(bounds), tmax_i, tmax_j, dtype=cdt, device=gamma.device) if positions else None
    for p, (si, ei, sj, ej) in enumerate(bounds):
        for t0 in range(si, ei, TORCH_TILE):
            t1 = min(t0 + TORCH_TILE, ei)
            for s0 in range(sj, ej, TORCH_TILE):
                s1 = min(s0 + TORCH_TILE, ej)
                prod = gamma[t0:t1].to(cdt) @ gamma[s0:s1].to(cdt).T
                if a is not None:
                    prod *= a[t0:t1].to(cdt) @ a[s0:s1].to(cdt).T
                elif ids is not None:
                    prod *= ids[t0:t1, None] == ids[None, s0:s1]
                values[p] += prod.sum()
                if pos is not None:
                    pos[p, t0 - si : t1 - si, s0 - sj : s1 - sj] = prod
    return values, pos
