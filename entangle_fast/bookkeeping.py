"""Book-keeping: each layer's weight gradient formed once, pair by pair, with the entanglement statistics on the side.

For a linear map y = a A^T + c applied at the tokens tau of row r (a chosen or rejected response), with input a_tau
and output gradient gamma_tau (the backward carries a_r * ds_r/dy at row r, docs/math.md section 4), row r's
gradients are

    G_r = grad_A = sum_{tau in r} gamma_tau a_tau^T   [d_out, d_in]        b_r = grad_c = sum_{tau in r} gamma_tau   [d_out]

and the layer's weight gradient is their sum over every row, dW = sum_r G_r, db = sum_r b_r. If the sum runs pair by
pair, each pair (w, l) has G_w and G_l in hand before they are folded into dW, and its statistics cost one more pass
over them (/work/shared/MATH.md sections 4.1-4.2):

    inner    = <G_w, G_l>_F  (+ <b_w, b_l>)
    chosen   = ||G_w||_F^2   (+ ||b_w||^2)
    rejected = ||G_l||_F^2   (+ ||b_l||^2)

With ``bias=True`` the bias parts are added to the same three scalars, so they are the statistics of the layer's whole
parameter set (A, c): the bias is the weight of a constant input 1, i.e. [G_r | b_r] = gamma_r^T [a_r | 1]. Both
backends use exactly that: an extra input column of ones. Because dW is formed here, autograd's own dW for the layer is
not needed; it differs from this one by summation order only (rounding).

A row may appear in several pairs (its statistics are computed for each; its gradient is folded into dW once) and rows
in no pair are added to dW directly. Rows may be empty (G_r = 0).

Vertical slice: ``kernels/pair_wgrad.py`` (``_pair_wgrad_kernel`` -> ``pair_wgrad``), ``csrc/pair_wgrad.cu`` (``pair_wgrad_kernel``
-> ``entangle_fast._cuda.cuda_pair_wgrad``) and :func:`torch_pair_wgrad` below share one launcher contract;
:func:`pair_weight_grad` (packed rows) and :func:`pair_weight_grad_dense` (``[R, T, d]`` rows) call whichever backend
:func:`~entangle_fast._backend.resolve_impl` picked. The materialised reference is
``entangle_fast.reference.pair_weight_grad_reference``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from entangle_fast._backend import resolve_impl

_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

# The PyTorch path keeps at most this many bytes of live per-row gradients [rows, d_out, d_in] (plus the padded
# [rows, T_max, d] input blocks they come from): 256 MiB, whatever the batch.
TORCH_CHUNK_BYTES = 1 << 28


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


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _validate(a, gamma, cu_seqlens, pairs, out_dtype) -> tuple[Tensor, Tensor]:
    """The pair_weight_grad contract; returns host copies of ``(cu_seqlens, pairs)``.

    Raises ValueError / TypeError naming the argument.
    """
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
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dtype != torch.int64 or cu_seqlens.ndim != 1 \
            or cu_seqlens.shape[0] < 1:
        raise ValueError(f"cu_seqlens must be an int64 tensor [R + 1], got {getattr(cu_seqlens, 'dtype', None)} "
                         f"{tuple(getattr(cu_seqlens, 'shape', ()))}")
    if not isinstance(pairs, Tensor) or pairs.dtype != torch.int64 or pairs.ndim != 2 or pairs.shape[1] != 2:
        raise ValueError(f"pairs must be an int64 tensor [B, 2], got {getattr(pairs, 'dtype', None)} "
                         f"{tuple(getattr(pairs, 'shape', ()))}")
    for name, t in (("a", a), ("cu_seqlens", cu_seqlens), ("pairs", pairs)):
        if t.device != gamma.device:
            raise ValueError(f"{name} is on {t.device} but gamma is on {gamma.device}")
    # One host sync for every index check: the kernels trust them.
    cu, pr = cu_seqlens.cpu(), pairs.cpu()
    n_tok = gamma.shape[0]
    if int(cu[0]) != 0 or int(cu[-1]) != n_tok:
        raise ValueError(f"cu_seqlens must start at 0 and end at S = {n_tok}, got {int(cu[0])} ... {int(cu[-1])}")
    steps = cu[1:] - cu[:-1]
    if bool((steps < 0).any()):
        k = int(torch.nonzero(steps < 0)[0])
        raise ValueError(f"cu_seqlens must be non-decreasing; cu_seqlens[{k + 1}] = {int(cu[k + 1])} < "
                         f"cu_seqlens[{k}] = {int(cu[k])}")
    n_rows = cu.shape[0] - 1
    bad = (pr < 0) | (pr >= n_rows)
    if bool(bad.any()):
        p, c = (int(x) for x in torch.nonzero(bad)[0])
        raise ValueError(f"pairs must index rows in [0, R={n_rows}); pairs[{p}, {c}] = {int(pr[p, c])}")
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


# ----------------------------------------------------------------------------------------------------------------------
# PyTorch path
# ----------------------------------------------------------------------------------------------------------------------


def _pairs_per_chunk(d_in: int, d_out: int, t_max: int, itemsize: int, chunk_rows: int | None) -> int:
    if chunk_rows is None:
        # Per row: its [d_out, d_in] gradient and its padded [T_max, d_in + d_out] inputs.
        per_row = (d_out * d_in + t_max * (d_in + d_out)) * itemsize
        chunk_rows = TORCH_CHUNK_BYTES // max(per_row, 1)
    return max(1, chunk_rows // 2)


# The PyTorch path forms the per-row gradients of a slice of d_out at a time, of at most this many elements over the
# chunk's rows (4 MiB in fp32), and reduces each slice while it is still in cache.
CACHE_ELEMENTS = 1 << 20


def _chunked_pairs(blocks, pairs: Tensor, fold: Tensor, gw: Tensor, gb: Tensor | None, stats: Tensor,
                   pairs_per_chunk: int) -> None:
    """The pair loop of the PyTorch path: for each chunk of b pairs, ``blocks(rows)`` gives the rows' zero-padded
    inputs ``([2b, T, d_in], [2b, T, d_out])`` in the compute dtype (chosen rows first, then rejected). Per slice of
    d_out, one bmm forms the rows' gradients ``[2b, s, d_in]``; one Gram product of the flattened slices gives every
    dot product the statistics need, one matrix-vector product folds the rows into ``gw``: two passes over a slice
    that is still in cache, instead of one pass per statistic over the whole ``[2b, d_out, d_in]``."""
    n_pairs = pairs.shape[0]
    d_out, d_in = gw.shape
    for c0 in range(0, n_pairs, pairs_per_chunk):
        c1 = min(c0 + pairs_per_chunk, n_pairs)
        b = c1 - c0
        rows = torch.cat([pairs[c0:c1, 0], pairs[c0:c1, 1]])
        x, g = blocks(rows)
        weights = torch.cat([fold[c0:c1, 0], fold[c0:c1, 1]]).to(gw.dtype)
        gt = g.transpose(1, 2)
        step = max(1, CACHE_ELEMENTS // max(2 * b * d_in, 1))
        idx = torch.arange(b, device=gw.device)
        for o0 in range(0, d_out, step):
            o1 = min(o0 + step, d_out)
            flat = torch.bmm(gt[:, o0:o1], x).view(2 * b, -1)  # the only live per-row gradients
            gram = flat @ flat.T
            stats[0, c0:c1] += gram[idx, b + idx]
            stats[1, c0:c1] += gram[idx, idx]
            stats[2, c0:c1] += gram[b + idx, b + idx]
            gw[o0:o1] += (weights @ flat).view(o1 - o0, d_in)
        if gb is not None:
            sums = g.sum(dim=1)  # [2b, d_out] per-row bias gradients
            gram = sums @ sums.T
            stats[0, c0:c1] += gram[idx, b + idx]
            stats[1, c0:c1] += gram[idx, idx]
            stats[2, c0:c1] += gram[b + idx, b + idx]
            gb.add_(weights @ sums)


def torch_pair_wgrad(a: Tensor, gamma: Tensor, cu_seqlens: Tensor, pairs: Tensor, fold: Tensor, unpaired: Tensor, *,
                     bias: bool, out_dtype: torch.dtype, chunk_rows: int | None = None):
    """PyTorch path of the ``pair_wgrad`` launcher contract (see ``kernels/pair_wgrad.py``), packed rows.

    a ``[S, d_in]``, gamma ``[S, d_out]``; cu_seqlens ``[R + 1]``, pairs ``[B, 2]``, fold ``[B, 2]`` and unpaired
    ``[U]`` as :func:`pair_plan` gives them (host or device). Each chunk of pairs gathers its rows into zero-padded
    ``[2b, T_max, d]`` blocks in fp32 (fp64 for fp64 inputs) and runs one bmm; the unpaired rows' tokens go into
    ``grad_weight`` with one matmul. When every row has the same length the inputs are already ``[R, T, d]`` and the
    dense path runs without padding. Returns ``(grad_weight, grad_bias | None, stats [3, B])``.
    """
    cu = cu_seqlens.cpu()
    lengths = cu[1:] - cu[:-1]
    n_rows, n_tok = lengths.shape[0], a.shape[0]
    if n_rows and bool((lengths == lengths[0]).all()):
        t = int(lengths[0])
        return torch_pair_wgrad_dense(a.reshape(n_rows, t, a.shape[1]), gamma.reshape(n_rows, t, gamma.shape[1]), pairs,
                                      fold, unpaired, bias=bias, out_dtype=out_dtype, chunk_rows=chunk_rows)
    cdt = _compute_dtype(a.dtype)
    device = a.device
    d_in, d_out = a.shape[1], gamma.shape[1]
    pairs, fold = pairs.to(device), fold.to(device)
    gw = torch.zeros(d_out, d_in, dtype=cdt, device=device)
    gb = torch.zeros(d_out, dtype=cdt, device=device) if bias else None
    stats = torch.zeros(3, pairs.shape[0], dtype=cdt, device=device)
    starts, lens_dev = cu[:-1].to(device), lengths.to(device)
    t_max = int(lengths.max()) if n_rows else 0

    def token_index(rows: Tensor):
        """(source token, position in its row, slot in the row list) of every token of ``rows``, in order."""
        lens = lens_dev[rows]
        slot = torch.repeat_interleave(torch.arange(rows.shape[0], device=device), lens)
        pos = torch.arange(slot.shape[0], device=device) - torch.repeat_interleave(lens.cumsum(0) - lens, lens)
        return starts[rows][slot] + pos, pos, slot

    def blocks(rows: Tensor):
        src, pos, slot = token_index(rows)
        dest = slot * t_max + pos
        x = torch.zeros(rows.shape[0] * t_max, d_in, dtype=cdt, device=device)
        g = torch.zeros(rows.shape[0] * t_max, d_out, dtype=cdt, device=device)
        x.index_copy_(0, dest, a.index_select(0, src).to(cdt))
        g.index_copy_(0, dest, gamma.index_select(0, src).to(cdt))
        return x.view(-1, t_max, d_in), g.view(-1, t_max, d_out)

    per_chunk = _pairs_per_chunk(d_in, d_out, t_max, torch.finfo(cdt).bits // 8, chunk_rows)
    _chunked_pairs(blocks, pairs, fold, gw, gb, stats, per_chunk)
    if unpaired.numel() and n_tok:
        src, _, _ = token_index(unpaired.to(device))
        g_u = gamma.index_select(0, src).to(cdt)
        gw.addmm_(g_u.T, a.index_select(0, src).to(cdt))
        if gb is not None:
            gb.add_(g_u.sum(dim=0))
    return gw.to(out_dtype), (gb.to(out_dtype) if gb is not None else None), stats


def torch_pair_wgrad_dense(a: Tensor, gamma: Tensor, pairs: Tensor, fold: Tensor, unpaired: Tensor, *, bias: bool,
                           out_dtype: torch.dtype, chunk_rows: int | None = None):
    """The PyTorch path for rows of one width: a ``[R, T, d_in]``, gamma ``[R, T, d_out]`` (padding positions carry
    zero gradients). Each chunk of pairs indexes its rows out of the ``[R, T, d]`` inputs, no padding to build.
    Same outputs as :func:`torch_pair_wgrad`."""
    cdt = _compute_dtype(a.dtype)
    device = a.device
    n_rows, t, d_in = a.shape
    d_out = gamma.shape[2]
    pairs, fold = pairs.to(device), fold.to(device)
    gw = torch.zeros(d_out, d_in, dtype=cdt, device=device)
    gb = torch.zeros(d_out, dtype=cdt, device=device) if bias else None
    stats = torch.zeros(3, pairs.shape[0], dtype=cdt, device=device)

    def blocks(rows: Tensor):
        if rows.shape[0] == n_rows and bool((rows == torch.arange(n_rows, device=rows.device)).all()):
            return a.to(cdt), gamma.to(cdt)  # every row in order (the default layout): no gather
        return a.index_select(0, rows).to(cdt), gamma.index_select(0, rows).to(cdt)

    per_chunk = _pairs_per_chunk(d_in, d_out, t, torch.finfo(cdt).bits // 8, chunk_rows)
    _chunked_pairs(blocks, pairs, fold, gw, gb, stats, per_chunk)
    if unpaired.numel() and t:
        unpaired = unpaired.to(device)
        g_u = gamma.index_select(0, unpaired).to(cdt).reshape(-1, d_out)
        gw.addmm_(g_u.T, a.index_select(0, unpaired).to(cdt).reshape(-1, d_in))
        if gb is not None:
            gb.add_(g_u.sum(dim=0))
    return gw.to(out_dtype), (gb.to(out_dtype) if gb is not None else None), stats


# ----------------------------------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------------------------------


def _result(gw, gb, stats) -> PairWeightGrad:
    return PairWeightGrad(gw, gb, stats[0], stats[1], stats[2])


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
            :data:`TORCH_CHUNK_BYTES`).

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
    if backend == "torch":
        return _result(*torch_pair_wgrad(a, gamma, cu, pr, fold, unpaired, bias=bias, out_dtype=out_dtype,
                                         chunk_rows=chunk_rows))
    device = gamma.device
    args = (a.contiguous(), gamma.contiguous(), cu_seqlens.contiguous(), pairs.contiguous(), fold.to(device),
            unpaired.to(device))
    if backend == "triton":
        from entangle_fast.kernels import pair_wgrad

        return _result(*pair_wgrad(*args, bias=bias, out_dtype=out_dtype))
    from entangle_fast._cuda import cuda_pair_wgrad

    return _result(*cuda_pair_wgrad(*args, bias=bias, out_dtype=out_dtype))


def pair_weight_grad_dense(
    a: Tensor,
    gamma: Tensor,
    pairs: Tensor,
    *,
    bias: bool = False,
    out_dtype: torch.dtype | None = None,
    impl: str = "auto",
    chunk_rows: int | None = None,
) -> PairWeightGrad:
    """:func:`pair_weight_grad` for rows of one width, without packing.

    Args:
        a: ``[R, T, d_in]`` layer inputs; gamma: ``[R, T, d_out]`` output gradients (zero on padding positions, which
            then add nothing). pairs, bias, out_dtype, impl, chunk_rows: as in :func:`pair_weight_grad`.

    Returns:
        :class:`PairWeightGrad`, equal to :func:`pair_weight_grad` of the packed rows (every row T tokens).
    """
    for name, t in (("a", a), ("gamma", gamma)):
        if not isinstance(t, Tensor) or t.ndim != 3:
            raise ValueError(f"{name} must have shape [R, T, d], got {tuple(getattr(t, 'shape', ()))}")
    if a.shape[:2] != gamma.shape[:2]:
        raise ValueError(f"a [R, T] = {tuple(a.shape[:2])} differs from gamma [R, T] = {tuple(gamma.shape[:2])}")
    n_rows, t = a.shape[:2]
    cu = torch.arange(n_rows + 1, dtype=torch.int64, device=gamma.device) * t
    a2, g2 = a.reshape(n_rows * t, a.shape[2]), gamma.reshape(n_rows * t, gamma.shape[2])
    out_dtype = a.dtype if out_dtype is None else out_dtype
    cu_host, pr = _validate(a2, g2, cu, pairs, out_dtype)
    if resolve_impl(impl, gamma.device, gamma.dtype) != "torch":
        return pair_weight_grad(a2, g2, cu, pairs, bias=bias, out_dtype=out_dtype, impl=impl)
    fold, unpaired = pair_plan(cu_host, pr)
    return _result(*torch_pair_wgrad_dense(a, gamma, pr, fold, unpaired, bias=bias, out_dtype=out_dtype,
                                           chunk_rows=chunk_rows))
