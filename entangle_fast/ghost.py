"""Ghost Gram: inner products of per-segment parameter gradients of one layer, from activations and output gradients.

For a layer applied at the positions tau of packed segments (sequences), with input a_tau and output gradient
gamma_tau, the gradient a segment r puts on the weight is sum_tau gamma_tau a_tau^T; its inner product with another
segment's never needs that [d_out, d_in] matrix (docs/math.md, section 4):

    values[p] = sum_{tau in i, sigma in j} F(tau, sigma) (gamma_tau . gamma_sigma),
    F = a_tau . a_sigma (weight) | 1 (bias, ``a=None``) | [ids_tau == ids_sigma] (embedding, ``ids=``).

Vertical slice: ``kernels/ghost_gram.py`` (``_ghost_gram_kernel`` -> ``ghost_gram_fwd``), ``csrc/ghost_gram.cu``
(``entangle_fast._cuda.cuda_ghost_gram_fwd``) and the PyTorch path ``entangle_fast/_torch/ghost_gram.py``
(``torch_ghost_gram_fwd``) share one launcher contract, checked in ``entangle_fast/_contract.py``; :func:`ghost_gram`
calls the launcher that :func:`~entangle_fast._backend.resolve_impl` picked.
The plain reference :func:`ghost_gram_reference` sits at the end of this file.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from entangle_fast import _backend
from entangle_fast._backend import compute_dtype, launcher, resolve_impl
from entangle_fast._contract import check_index_pairs, check_segments
from entangle_fast._torch.ghost_gram import pair_bounds

_backend.register("ghost_gram_fwd", torch="entangle_fast._torch.ghost_gram:torch_ghost_gram_fwd",
                  triton="entangle_fast.kernels.ghost_gram:ghost_gram_fwd",
                  cuda="entangle_fast._cuda:cuda_ghost_gram_fwd")

_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclass
class GhostGramResult:
    """Ghost Gram values of P segment pairs.

    values: ``[P]`` float32 (float64 for float64 inputs): ``<grad s_i, grad s_j>`` of the layer for pair p = (i, j).
    position_matrix: ``[P, Tmax_i, Tmax_j]`` the per-(tau, sigma) terms ``F(tau, sigma) (gamma_tau . gamma_sigma)``
        (tau, sigma counted from each segment's start), zero beyond each pair's lengths; Tmax_i (Tmax_j) is the
        longest first (second) segment over the pairs. Its total over (tau, sigma) is ``values``. None unless
        ``positions=True``.
    """

    values: Tensor
    position_matrix: Tensor | None = None


def _validate(a, gamma, cu_seqlens, seg_pairs, ids) -> None:
    """Shapes, dtypes, devices and index ranges of the ghost_gram contract; ValueError/TypeError naming the argument."""
    if not isinstance(gamma, Tensor) or gamma.dtype not in _FLOATS:
        raise TypeError("gamma must be a float32/bfloat16/float16/float64 tensor, got "
                        f"{getattr(gamma, 'dtype', type(gamma))}")
    if gamma.ndim != 2:
        raise ValueError(f"gamma must have shape [S, d_out], got {tuple(gamma.shape)}")
    n_tok = gamma.shape[0]
    if a is not None and ids is not None:
        raise ValueError("a and ids are exclusive: pass a (linear weight), ids (embedding) or neither (bias)")
    if a is not None:
        if not isinstance(a, Tensor) or a.ndim != 2:
            raise ValueError(f"a must have shape [S, d_in], got {getattr(a, 'shape', type(a))}")
        if a.shape[0] != n_tok:
            raise ValueError(f"a has {a.shape[0]} rows but gamma has S = {n_tok}: they must share the packing")
        if a.dtype != gamma.dtype:
            raise TypeError(f"a dtype {a.dtype} differs from gamma dtype {gamma.dtype}")
    if ids is not None:
        if not isinstance(ids, Tensor) or ids.dtype != torch.int64 or ids.ndim != 1:
            raise ValueError(f"ids must be an int64 tensor [S], got {getattr(ids, 'dtype', type(ids))} "
                             f"{tuple(getattr(ids, 'shape', ()))}")
        if ids.shape[0] != n_tok:
            raise ValueError(f"ids has {ids.shape[0]} entries but gamma has S = {n_tok}: they must share the packing")
    for name, t in (("a", a), ("ids", ids), ("cu_seqlens", cu_seqlens), ("seg_pairs", seg_pairs)):
        if isinstance(t, Tensor) and t.device != gamma.device:
            raise ValueError(f"{name} is on {t.device} but gamma is on {gamma.device}")
    cu = check_segments(cu_seqlens, n_tok, count="n_seg")
    check_index_pairs(seg_pairs, cu.shape[0] - 1, name="seg_pairs", count="n_seg")


def ghost_gram(
    a: Tensor | None,
    gamma: Tensor,
    cu_seqlens: Tensor,
    seg_pairs: Tensor,
    *,
    ids: Tensor | None = None,
    positions: bool = False,
    impl: str = "auto",
) -> GhostGramResult:
    """Inner products ``<grad s_i, grad s_j>`` of one layer's per-segment gradients, for each pair (i, j).

    Args:
        a: ``[S, d_in]`` layer inputs of the packed segments, or None for a bias (the a-factor is 1).
        gamma: ``[S, d_out]`` gradients of the segment scores w.r.t. the layer outputs, same packing.
            fp32/bf16/fp16 (fp64 on the PyTorch path); a has gamma's dtype.
        cu_seqlens: ``[n_seg + 1]`` int64 offsets of the segments along S, from 0 to S.
        seg_pairs: ``[P, 2]`` int64 segment indices (i, j); i == j gives a squared norm.
        ids: ``[S]`` int64 token ids of an embedding, instead of ``a`` (factor ``[ids_tau == ids_sigma]``).
        positions: also return the per-(tau, sigma) terms (``[P, Tmax_i, Tmax_j]``, memory ``P Tmax^2``).
        impl: ``"auto"`` (Triton on CUDA, PyTorch otherwise), ``"triton"``, ``"cuda"``, ``"torch"``.

    Returns:
        :class:`GhostGramResult` with fp32 values (fp64 for fp64 inputs), accumulated in fp32 whatever the input
        dtype. Peak extra memory is the optional positions output plus, on the PyTorch path, two
        ``[TORCH_TILE, TORCH_TILE]`` tiles.

    Raises:
        ValueError / TypeError naming the argument: mismatched S, cu_seqlens not from 0 to S or decreasing,
        seg_pairs out of range, both ``a`` and ``ids``, bad dtypes.
    """
    _validate(a, gamma, cu_seqlens, seg_pairs, ids)
    backend = resolve_impl(impl, gamma.device, gamma.dtype)
    args = (
        a.contiguous() if a is not None else None,
        gamma.contiguous(),
        ids.contiguous() if ids is not None else None,
        cu_seqlens.contiguous(),
        seg_pairs.contiguous(),
    )
    values, pos = launcher("ghost_gram_fwd", backend)(*args, positions=positions)
    return GhostGramResult(values, pos)


# ----------------------------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------------------------


def ghost_gram_reference(
    a: Tensor | None,
    gamma: Tensor,
    cu_seqlens: Tensor,
    seg_pairs: Tensor,
    *,
    ids: Tensor | None = None,
    positions: bool = False,
) -> GhostGramResult:
    """The ghost Gram written plainly: materialised per-segment Grams, one pair at a time.

    Computes in the dtype of its inputs, with no upcast: float64 inputs give the ground truth of the tests; low
    precision inputs give plain PyTorch's own error in that dtype (the bar of the tolerance rule). Same arguments and
    result as :func:`ghost_gram` (values cast to fp32 for low-precision inputs). Memory ``T_i T_j`` per pair.
    """
    _validate(a, gamma, cu_seqlens, seg_pairs, ids)
    bounds, tmax_i, tmax_j = pair_bounds(cu_seqlens, seg_pairs)
    vals, terms = [], []
    for si, ei, sj, ej in bounds:
        g_gram = gamma[si:ei] @ gamma[sj:ej].T
        if a is not None:
            f = a[si:ei] @ a[sj:ej].T
        elif ids is not None:
            f = (ids[si:ei, None] == ids[None, sj:ej]).to(gamma.dtype)
        else:
            f = torch.ones_like(g_gram)
        term = f * g_gram
        vals.append(term.sum())
        terms.append(term)
    cdt = compute_dtype(gamma.dtype)
    values = torch.stack(vals).to(cdt) if vals else torch.zeros(0, dtype=cdt, device=gamma.device)
    pos = None
    if positions:
        pos = torch.zeros(len(terms), tmax_i, tmax_j, dtype=cdt, device=gamma.device)
        for p, term in enumerate(terms):
            pos[p, : term.shape[0], : term.shape[1]] = term
    return GhostGramResult(values, pos)
