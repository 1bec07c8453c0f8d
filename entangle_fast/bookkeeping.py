"""Book-keeping: each layer's weight gradient formed once, pair by pair, with the entanglement statistics on the side.

For a linear map y = a A^T + c applied at the tokens tau of row r (a chosen or rejected response), with input a_tau
and output gradient gamma_tau (the backward carries a_r * ds_r/dy at row r, docs/math.md section 4), row r's
gradients are

    G_r = grad_A = sum_{tau in r} gamma_tau a_tau^T   [d_out, d_in]        b_r = grad_c = sum_{tau in r} gamma_tau   [d_out]

and the layer's weight gradient is their sum over every row, dW = sum_r G_r, db = sum_r b_r. If the sum runs pair by
pair, each pair (w, l) has G_w and G_l in hand before they are folded into dW, and its statistics cost one more pass
over them (docs/math.md sections 4.1-4.2):

    inner    = <G_w, G_l>_F  (+ <b_w, b_l>)
    chosen   = ||G_w||_F^2   (+ ||b_w||^2)
    rejected = ||G_l||_F^2   (+ ||b_l||^2)

With ``bias=True`` the bias parts are added to the same three scalars, so they are the statistics of the layer's whole
parameter set (A, c): the bias is the weight of a constant input 1, i.e. [G_r | b_r] = gamma_r^T [a_r | 1]. Both
backends use exactly that: an extra input column of ones. Because dW is formed here, autograd's own dW for the layer is
not needed; it differs from this one by summation order only (rounding).

A row may appear in several pairs (its statistics are computed for each; its gradient is folded into dW once) and rows
in no pair are added to dW directly. Rows may be empty (G_r = 0).

Vertical slice: ``kernels/pair_wgrad.py`` (``_pair_wgrad_kernel`` -> ``pair_wgrad``), ``csrc/pair_wgrad.cu``
(``pair_wgrad_kernel`` -> ``entangle_fast._cuda.cuda_pair_wgrad``) and the PyTorch path
``entangle_fast/_torch/pair_wgrad.py`` (``torch_pair_wgrad``) share one launcher contract, checked in
``entangle_fast/_contract.py``;
:func:`pair_weight_grad` (packed rows) and :func:`pair_weight_grad_dense` (``[R, T, d]`` rows) call whichever backend
:func:`~entangle_fast._backend.resolve_impl` picked. The materialised reference is
``entangle_fast.reference.pair_weight_grad_reference``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from entangle_fast import _backend
from entangle_fast._backend import launcher, resolve_impl
from entangle_fast._contract import check_index_pairs, check_segments
from entangle_fast._torch.pair_wgrad import gram_index, is_default_layout, torch_pair_wgrad, torch_pair_wgrad_dense

_backend.register("pair_wgrad", torch="entangle_fast._torch.pair_wgrad:torch_pair_wgrad",
                  triton="entangle_fast.kernels.pair_wgrad:pair_wgrad", cuda="entangle_fast._cuda:cuda_pair_wgrad")

_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

@dataclass
class PairWeightGrad:
    """One layer's weight gradient and the per-pair statistics of its per-row gradients.

    grad_weight: ``[d_out, d_in]`` sum over every row (paired or not) of ``G_r = gamma_r^T a_r``, in ``out_dtype``.
    grad_bias: ``[d_out]`` sum of gamma over every row, in ``out_dtype``; None unless ``bias=True``.
    inner: ``[B]`` ``<G_w, G_l>`` of each pair (w, l).
    chosen: ``[B]`` ``||G_w||^2``.
    rejected: ``[B]`` ``||G_l||^2``.
    The three statistics are float32 (float64 for float64 inputs) and include the bias parts ``<b_w, b_l>``,
    ``||b_w||^2``, ``||b_l||^2`` when ``bias=True``.
    """

    grad_weight: Tensor
    grad_bias: Tensor | None
    inner: Tensor
    chosen: Tensor
    rejected: Tensor


def _check_tensors(a, gamma, out_dtype) -> None:
    """The tensor part of the pair_weight_grad contract. Raises ValueError / TypeError naming the argument."""
    for name, t in (("a", a), ("gamma", gamma)):
        if not isinstance(t, Tensor) or t.dtype not in _FLOATS:
            raise TypeError(f"{name} must be a float32/bfloat16/float16/float64 tensor, got "
                            f"{getattr(t, 'dtype', type(t))}")
        if t.ndim != 2 or t.shape[1] == 0:
            raise ValueError(f"{name} must have shape [S, d] with d >= 1, got {tuple(t.shape)}")
    if a.shape[0] != gamma.shape[0]:
        raise ValueError(f"a has {a.shape[0]} tokens but gamma has {gamma.shape[0]}: they must share the packing")
    if a.dtype != gamma.dtype:
        raise TypeError(f"a dtype {a.dtype} differs from gamma dtype {gamma.dtype}")
    if out_dtype not in _FLOATS:
        raise TypeError(f"out_dtype must be a floating dtype among {_FLOATS}, got {out_dtype}")
    if a.device != gamma.device:
        raise ValueError(f"a is on {a.device} but gamma is on {gamma.device}")


def _validate(a, gamma, cu_seqlens, pairs, out_dtype) -> tuple[Tensor, Tensor]:
    """The pair_weight_grad contract; returns host copies of ``(cu_seqlens, pairs)``.

    Raises ValueError / TypeError naming the argument.
    """
    _check_tensors(a, gamma, out_dtype)
    for name, t in (("cu_seqlens", cu_seqlens), ("pairs", pairs)):
        if isinstance(t, Tensor) and t.device != gamma.device:
            raise ValueError(f"{name} is on {t.device} but gamma is on {gamma.device}")
    cu = check_segments(cu_seqlens, gamma.shape[0])
    pr = check_index_pairs(pairs, cu.shape[0] - 1)
    return cu, pr


def pair_plan(cu_seqlens: Tensor, pairs: Tensor) -> tuple[Tensor, Tensor]:
    """Which per-row gradients each backend folds into dW, from host ``cu_seqlens [R + 1]`` and ``pairs [B, 2]``.

    Returns ``(fold, unpaired)``: ``fold`` int32 ``[B, 2]`` is 1 where that side of the pair is its row's first
    appearance in ``pairs`` (row-major order), so a row in several pairs enters dW once; ``unpaired`` int64 ``[U]``
    lists the non-empty rows in no pair, in order (empty ones add nothing).
    """
    n_rows = cu_seqlens.shape[0] - 1
    flat = pairs.reshape(-1)
    n = flat.shape[0]
    first = torch.full((n_rows,), n, dtype=torch.int64)
    first.scatter_reduce_(0, flat, torch.arange(n), reduce="amin")
    fold = (first[flat] == torch.arange(n)).to(torch.int32).reshape(-1, 2)
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    unpaired = torch.nonzero((first == n) & (lengths > 0)).reshape(-1)
    return fold, unpaired


_PLANS: dict = {}  # PairPlan.of's plans, oldest first
_MAX_PLANS = 64


class PairPlan:
    """``pairs`` checked once for ``rows`` rows of one width, with :func:`pair_plan`'s fold and unpaired rows: what
    every layer of a step shares (the monitor builds one per step and hands it to :func:`pair_weight_grad_dense`).

    Attributes: ``rows``; ``pairs [B, 2]`` int64, ``fold [B, 2]`` int32, ``unpaired [U]`` int64 on the host;
    ``ordered``: the default layout (row i with row B + i, every row paired once). :meth:`on` gives device copies,
    made once per device.
    """

    def __init__(self, rows: int, pairs: Tensor):
        self.rows = int(rows)
        self.pairs = check_index_pairs(pairs, self.rows)
        self.fold, self.unpaired = pair_plan(torch.arange(self.rows + 1, dtype=torch.int64), self.pairs)
        self.ordered = is_default_layout(self.pairs, self.rows)
        self._copies: dict = {}

    @classmethod
    def of(cls, rows: int, pairs: Tensor) -> "PairPlan":
        """The plan for ``rows`` rows and ``pairs``, shared by every caller that asks for the same ones (a training
        loop asks for the same pairs at every step)."""
        host = pairs.detach().cpu() if isinstance(pairs, Tensor) else torch.as_tensor(pairs)
        key = (int(rows), tuple(host.shape), tuple(host.reshape(-1).tolist()))
        plan = _PLANS.get(key)
        if plan is None:
            if len(_PLANS) >= _MAX_PLANS:
                _PLANS.pop(next(iter(_PLANS)))
            plan = _PLANS[key] = cls(rows, host)
        return plan

    def on(self, device) -> tuple[Tensor, Tensor, Tensor]:
        """``(pairs, fold, unpaired)`` on ``device``."""
        copies = self._copies.get(device)
        if copies is None:
            copies = self._copies[device] = tuple(t.to(device) for t in (self.pairs, self.fold, self.unpaired))
        return copies

    def gram_index(self, device) -> Tensor:
        """:func:`~entangle_fast._torch.pair_wgrad.gram_index` of the pairs, on ``device``."""
        key = ("gram", device)
        index = self._copies.get(key)
        if index is None:
            index = self._copies[key] = gram_index(self.pairs, self.rows).to(device)
        return index


# ----------------------------------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------------------------------


def _result(gw, gb, stats) -> PairWeightGrad:
    return PairWeightGrad(gw, gb, *stats.unbind(0))


def pair_weight_grad(
    a: Tensor,
    gamma: Tensor,
    cu_seqlens: Tensor,
    pairs: Tensor,
    *,
    bias: bool = False,
    out_dtype: torch.dtype | None = None,
    impl: str = "auto",
    chunk_rows: int | None = None,
) -> PairWeightGrad:
    """One layer's weight gradient from packed rows, and each pair's ``<G_w, G_l>``, ``||G_w||^2``, ``||G_l||^2``.

    Args:
        a: ``[S, d_in]`` layer inputs of the kept tokens, packed row by row.
        gamma: ``[S, d_out]`` output gradients of the same tokens (the backward carries ``a_r ds_r/dy`` at row r);
            a's dtype. fp32/bf16/fp16 on every backend, fp64 on the PyTorch path.
        cu_seqlens: ``[R + 1]`` int64 offsets: row r owns tokens ``cu_seqlens[r]:cu_seqlens[r + 1]`` (may be empty).
        pairs: ``[B, 2]`` int64 (chosen row, rejected row). A row may be in several pairs, or in none.
        bias: also return ``grad_bias`` and add the bias parts to the statistics (module docstring).
        out_dtype: dtype of ``grad_weight`` / ``grad_bias`` (default a's dtype).
        impl: ``"auto"`` (Triton on CUDA, PyTorch otherwise), ``"torch"``, ``"triton"``, ``"cuda"``.
        chunk_rows: PyTorch path only: per-row gradients alive at once (default: what fits
            :data:`entangle_fast._torch.pair_wgrad.TORCH_CHUNK_BYTES`).

    Returns:
        :class:`PairWeightGrad`; accumulated in fp32 (fp64 for fp64 inputs) whatever the input dtype.

    Raises:
        ValueError / TypeError naming the argument: mismatched S or dtypes, cu_seqlens not from 0 to S or decreasing,
        pairs out of range; RuntimeError from :func:`resolve_impl` when the backend cannot run here.
    """
    out_dtype = a.dtype if out_dtype is None and isinstance(a, Tensor) else out_dtype
    cu, pr = _validate(a, gamma, cu_seqlens, pairs, out_dtype)
    fold, unpaired = pair_plan(cu, pr)
    backend = resolve_impl(impl, gamma.device, gamma.dtype)
    if backend == "torch":  # host index copies and the chunk_rows memory cap, which the kernels do not take
        return _result(*torch_pair_wgrad(a, gamma, cu, pr, fold, unpaired, bias=bias, out_dtype=out_dtype,
                                         chunk_rows=chunk_rows))
    device = gamma.device
    args = (a.contiguous(), gamma.contiguous(), cu_seqlens.contiguous(), pairs.contiguous(), fold.to(device),
            unpaired.to(device))
    return _result(*launcher("pair_wgrad", backend)(*args, bias=bias, out_dtype=out_dtype))


def pair_weight_grad_dense(
    a: Tensor,
    gamma: Tensor,
    pairs: Tensor | None = None,
    *,
    bias: bool = False,
    out_dtype: torch.dtype | None = None,
    impl: str = "auto",
    chunk_rows: int | None = None,
    plan: PairPlan | None = None,
) -> PairWeightGrad:
    """:func:`pair_weight_grad` for rows of one width, without packing.

    Args:
        a: ``[R, T, d_in]`` layer inputs; gamma: ``[R, T, d_out]`` output gradients (zero on padding positions, which
            then add nothing). pairs, bias, out_dtype, impl, chunk_rows: as in :func:`pair_weight_grad`.
        plan: a :class:`PairPlan` for these R rows instead of ``pairs`` (checked once, shared by the layers of a step).

    Returns:
        :class:`PairWeightGrad`, equal to :func:`pair_weight_grad` of the packed rows (every row T tokens).
    """
    for name, t in (("a", a), ("gamma", gamma)):
        if not isinstance(t, Tensor) or t.ndim != 3:
            raise ValueError(f"{name} must have shape [R, T, d], got {tuple(getattr(t, 'shape', ()))}")
    if a.shape[:2] != gamma.shape[:2]:
        raise ValueError(f"a [R, T] = {tuple(a.shape[:2])} differs from gamma [R, T] = {tuple(gamma.shape[:2])}")
    n_rows, t = a.shape[:2]
    if (plan is None) == (pairs is None):
        raise ValueError("pass exactly one of pairs and plan")
    if plan is None:
        if isinstance(pairs, Tensor) and pairs.device != gamma.device:
            raise ValueError(f"pairs is on {pairs.device} but gamma is on {gamma.device}")
        plan = PairPlan.of(n_rows, pairs)
    elif plan.rows != n_rows:
        raise ValueError(f"the plan is for {plan.rows} rows but a has {n_rows}")
    out_dtype = a.dtype if out_dtype is None else out_dtype
    _check_tensors(a.reshape(n_rows * t, a.shape[2]), gamma.reshape(n_rows * t, gamma.shape[2]), out_dtype)
    return _result(*dense_with_plan(a, gamma, plan, bias=bias, out_dtype=out_dtype,
                                    backend=resolve_impl(impl, gamma.device, gamma.dtype), chunk_rows=chunk_rows))


def dense_with_plan(a: Tensor, gamma: Tensor, plan: PairPlan, *, bias: bool, out_dtype: torch.dtype, backend: str,
                    chunk_rows: int | None = None, grad_weight: Tensor | None = None
                    ) -> tuple[Tensor, Tensor | None, Tensor]:
    """:func:`pair_weight_grad_dense` without its checks, on a resolved ``backend``, returning the launcher's
    ``(grad_weight, grad_bias | None, stats [3, B])``: for callers that hold the contract by construction (the
    monitor's book-kept layers and the fused head: ``a`` and ``gamma`` are a linear map's input and output gradient,
    ``[R, T, d]`` of one floating dtype on one device, and ``plan`` is for their R rows). ``grad_weight``: a
    ``[d_out, d_in]`` buffer of ``out_dtype`` that receives the weight gradient (the fused head's slice of its whole
    gradient), returned in its place."""
    n_rows, t = a.shape[:2]
    device = gamma.device
    pr, fold, unpaired = plan.on(device)
    if t == 0:
        unpaired = unpaired[:0]
    if backend == "torch":
        return torch_pair_wgrad_dense(a, gamma, pr, fold, unpaired, bias=bias, out_dtype=out_dtype,
                                      chunk_rows=chunk_rows, ordered=plan.ordered, grad_weight=grad_weight,
                                      index=None if plan.ordered else plan.gram_index(device))
    cu = torch.arange(n_rows + 1, dtype=torch.int64, device=device) * t
    args = (a.reshape(n_rows * t, a.shape[2]).contiguous(), gamma.reshape(n_rows * t, gamma.shape[2]).contiguous(), cu,
            pr.contiguous(), fold, unpaired)
    gw, gb, stats = launcher("pair_wgrad", backend)(*args, bias=bias, out_dtype=out_dtype)
    return (gw if grad_weight is None else grad_weight.copy_(gw)), gb, stats
