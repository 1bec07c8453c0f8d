"""The PyTorch path of the pair weight gradient: the ``pair_wgrad`` contract of ``kernels/pair_wgrad.py``.

Row r's gradient G_r = sum_{tau in r} gamma_tau a_tau^T is formed for a chunk of pairs at a time, a slice of d_out at a
time, and reduced to <G_w, G_l>, ||G_w||^2, ||G_l||^2 and to dW while the slice is in cache (docs/math.md section 4.2;
the math is in :mod:`entangle_fast.bookkeeping`, which registers these launchers in :mod:`entangle_fast._backend`).
"""
from __future__ import annotations

import torch
from torch import Tensor

from entangle_fast._backend import compute_dtype

# The PyTorch path keeps at most this many bytes of live per-row gradients [rows, d_out, d_in] (plus the padded
# [rows, T_max, d] input blocks they come from): 256 MiB, whatever the batch.
TORCH_CHUNK_BYTES = 1 << 28


def _pairs_per_chunk(d_in: int, d_out: int, t_max: int, itemsize: int, chunk_rows: int | None) -> int:
    if chunk_rows is None:
        # Per row: its [d_out, d_in] gradient and its padded [T_max, d_in + d_out] inputs.
        per_row = (d_out * d_in + t_max * (d_in + d_out)) * itemsize
        chunk_rows = TORCH_CHUNK_BYTES // max(per_row, 1)
    return max(1, chunk_rows // 2)


# The PyTorch path forms the per-row gradients of a slice of d_out at a time, of at most this many elements over the
# chunk's rows (4 MiB in fp32), and reduces each slice while it is still in cache.
CACHE_ELEMENTS = 1 << 20


# Layers whose rows' gradients [R, d_out, d_in] together are at most CACHE_ELEMENTS, over at most SMALL_ROWS rows, take
# one product for every row's gradient at once (:func:`small_pair_wgrad`); outside the default layout their statistics
# come from the R x R Gram matrix of the rows (R^2 dot products, cheap while R is small).
SMALL_ROWS = 16


def is_small(n_rows: int, d_out: int, d_in: int) -> bool:
    """Whether a layer takes :func:`small_pair_wgrad`."""
    return 0 < n_rows <= SMALL_ROWS and n_rows * d_out * d_in <= CACHE_ELEMENTS


def gram_index(pairs: Tensor, n_rows: int) -> Tensor:
    """Flat positions in an ``[R, R]`` Gram matrix of ``<G_w, G_l>``, ``||G_w||^2`` and ``||G_l||^2`` for every pair
    ``(w, l)`` of ``pairs [B, 2]``: ``[3, B]`` int64."""
    w, l = pairs[:, 0], pairs[:, 1]
    return torch.stack([w * n_rows + l, w * (n_rows + 1), l * (n_rows + 1)])


def small_pair_wgrad(a: Tensor, gamma: Tensor, index: Tensor | None, *, bias: bool, out_dtype: torch.dtype,
                     grad_weight: Tensor | None = None):
    """Every row's gradient at once (a small layer, :func:`is_small`): a ``[R, T, d_in]``, gamma ``[R, T, d_out]``.
    dW is the sum over every row (each row's gradient enters it once, whatever the pairs), written into
    ``grad_weight`` when given. The statistics come from the ``[R, R]`` Gram matrix of the rows at ``index``
    (:func:`gram_index`), or, with ``index=None`` for the default layout (row i with row R/2 + i, every row once), from
    each pair's [2, 2] block alone (:func:`pair_blocks`, a quarter of the products at R = 8). Same outputs as
    :func:`torch_pair_wgrad`."""
    cdt = compute_dtype(a.dtype)
    x = a if a.dtype == cdt else a.to(cdt)
    g = gamma if gamma.dtype == cdt else gamma.to(cdt)
    n_rows = x.shape[0]
    rows = torch.bmm(g.transpose(1, 2), x)  # [R, d_out, d_in]
    flat = rows.view(n_rows, -1)
    b = n_rows // 2
    gram = pair_blocks(flat, b) if index is None else torch.mm(flat, flat.T)
    if grad_weight is None:
        gw = rows.sum(0)
    elif grad_weight.dtype == cdt:
        gw = torch.sum(rows, 0, out=grad_weight)
    else:
        gw = grad_weight.copy_(rows.sum(0))
    gb = None
    if bias:
        sums = g.sum(dim=1)  # [R, d_out] per-row bias gradients
        if index is None:
            pair_blocks(sums, b, gram)
        else:
            gram.addmm_(sums, sums.T)
        gb = sums.sum(0) if out_dtype == cdt else sums.sum(0).to(out_dtype)
    stats = torch.take(gram, pair_block_index(b, gram.device) if index is None else index).view(3, -1)
    return (gw if gw.dtype == out_dtype else gw.to(out_dtype)), gb, stats


_BLOCK_INDEX: dict = {}


def pair_block_index(b: int, device) -> Tensor:
    """Flat positions in ``[b, 2, 2]`` per-pair Gram blocks (:func:`pair_blocks`) of ``<G_w, G_l>``, ``||G_w||^2`` and
    ``||G_l||^2`` for each of the b pairs: ``[3b]``."""
    key = (b, device)
    index = _BLOCK_INDEX.get(key)
    if index is None:
        i = 4 * torch.arange(b, device=device)
        index = _BLOCK_INDEX[key] = torch.cat([i + 1, i, i + 3])
    return index


def pair_blocks(flat: Tensor, b: int, acc: Tensor | None = None) -> Tensor:
    """``[b, 2, 2]`` Gram blocks of each pair's two rows of ``flat [2b, n]`` (row i with row b + i), added to ``acc``
    when given: the 3 dot products per pair the statistics need (and one repeated), half the work of the whole
    ``[2b, 2b]`` Gram matrix and one batched product."""
    p = flat.view(2, b, -1).transpose(0, 1)  # [b, 2, n]
    return torch.bmm(p, p.transpose(1, 2)) if acc is None else acc.baddbmm_(p, p.transpose(1, 2))


def _chunked_pairs(blocks, pairs: Tensor, fold: Tensor, gw: Tensor, gb: Tensor | None, stats: Tensor,
                   pairs_per_chunk: int, ordered: bool = False) -> None:
    """The pair loop of the PyTorch path: for each chunk of b pairs, ``blocks(rows)`` gives the rows' zero-padded
    inputs ``([2b, T, d_in], [2b, T, d_out])`` in the compute dtype (chosen rows first, then rejected). Per slice of
    d_out, one bmm forms the rows' gradients ``[2b, s, d_in]``; one Gram product of the flattened slices accumulates
    every dot product the statistics need, one matrix-vector product folds the rows into ``gw`` (a plain sum over the
    rows when ``ordered``: every row in one pair): two passes over a slice that is still in cache, instead of one pass
    per statistic over the whole ``[2b, d_out, d_in]``. The Gram products are those of each pair's two rows
    (:func:`pair_blocks`), and the statistics are read off them once per chunk.

    ``gw``, ``gb`` and ``stats`` may be uninitialised (``torch.empty``): the first chunk writes them, later ones add.
    """
    n_pairs = pairs.shape[0]
    d_out, d_in = gw.shape
    for c0 in range(0, n_pairs, pairs_per_chunk):
        c1 = min(c0 + pairs_per_chunk, n_pairs)
        b = c1 - c0
        x, g = blocks(pairs[c0:c1].T.reshape(-1))  # chosen rows, then rejected rows
        weights = None if ordered else fold[c0:c1].T.reshape(1, -1).to(gw.dtype)
        gt = g.transpose(1, 2)
        step = max(1, CACHE_ELEMENTS // max(2 * b * d_in, 1))
        gram = None
        # The slices' per-row gradients, one buffer for every slice: [2b, s, d_in] each.
        scratch = torch.empty(2 * b * min(step, d_out) * d_in, dtype=gw.dtype, device=gw.device)
        for o0 in range(0, d_out, step):
            o1 = min(o0 + step, d_out)
            rows = torch.bmm(gt[:, o0:o1], x, out=scratch[: 2 * b * (o1 - o0) * d_in].view(2 * b, o1 - o0, d_in))
            flat = rows.view(2 * b, -1)
            gram = pair_blocks(flat, b, gram)
            if ordered:
                torch.sum(rows, 0, out=gw[o0:o1])
            elif c0 == 0:
                torch.mm(weights, flat, out=gw[o0:o1].view(1, -1))
            else:
                gw[o0:o1].view(1, -1).addmm_(weights, flat)
        if gb is not None:
            sums = g.sum(dim=1)  # [2b, d_out] per-row bias gradients
            gram = pair_blocks(sums, b, gram)
            if ordered:
                torch.sum(sums, 0, out=gb)
            elif c0 == 0:
                torch.mm(weights, sums, out=gb.view(1, -1))
            else:
                gb.view(1, -1).addmm_(weights, sums)
        if gram is None:  # d_out == 0
            stats[:, c0:c1] = 0
        elif c0 == 0 and c1 == n_pairs:
            torch.take(gram, pair_block_index(b, gram.device), out=stats.view(-1))
        else:
            stats[:, c0:c1] = torch.take(gram, pair_block_index(b, gram.device)).view(3, b)


def _outputs(d_out: int, d_in: int, n_pairs: int, bias: bool, cdt: torch.dtype, device):
    """``(grad_weight, grad_bias | None, stats)`` buffers: written by the first chunk of pairs, so left uninitialised
    unless there is none."""
    new = torch.empty if n_pairs else torch.zeros
    return (new(d_out, d_in, dtype=cdt, device=device), new(d_out, dtype=cdt, device=device) if bias else None,
            new(3, n_pairs, dtype=cdt, device=device))


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
    cdt = compute_dtype(a.dtype)
    device = a.device
    d_in, d_out = a.shape[1], gamma.shape[1]
    pairs, fold = pairs.to(device), fold.to(device)
    gw, gb, stats = _outputs(d_out, d_in, pairs.shape[0], bias, cdt, device)
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
                           out_dtype: torch.dtype, chunk_rows: int | None = None, ordered: bool | None = None,
                           grad_weight: Tensor | None = None, index: Tensor | None = None):
    """The PyTorch path for rows of one width: a ``[R, T, d_in]``, gamma ``[R, T, d_out]`` (padding positions carry
    zero gradients). Each chunk of pairs indexes its rows out of the ``[R, T, d]`` inputs, no padding to build; a small
    layer (:func:`is_small`) takes every row at once. ``ordered``: whether ``pairs`` is the default layout (row i with
    row B + i, every row paired once), which needs no gather; None works it out. ``grad_weight``: a ``[d_out, d_in]``
    buffer of ``out_dtype`` to write the weight gradient into (returned as such). ``index``: the pairs'
    :func:`gram_index` where the caller keeps it (made here otherwise). Same outputs as :func:`torch_pair_wgrad`."""
    cdt = compute_dtype(a.dtype)
    n_rows, t, d_in = a.shape
    d_out = gamma.shape[2]
    if ordered is None:
        ordered = is_default_layout(pairs, n_rows)
    if is_small(n_rows, d_out, d_in) and chunk_rows is None:
        if not ordered and index is None:
            index = gram_index(pairs.to(a.device), n_rows)
        return small_pair_wgrad(a, gamma, None if ordered else index, bias=bias, out_dtype=out_dtype,
                                grad_weight=grad_weight)
    device = a.device
    pairs, fold = pairs.to(device), fold.to(device)
    per_chunk = _pairs_per_chunk(d_in, d_out, t, torch.finfo(cdt).bits // 8, chunk_rows)
    ordered = ordered and per_chunk >= pairs.shape[0]
    gw, gb, stats = _outputs(d_out, d_in, pairs.shape[0], bias, cdt, device)
    if grad_weight is not None and grad_weight.dtype == cdt and pairs.shape[0]:
        gw = grad_weight  # written by the first chunk of pairs

    def blocks(rows: Tensor):
        if ordered:  # every row in order (the default layout): no gather
            return a.to(cdt), gamma.to(cdt)
        return a.index_select(0, rows).to(cdt), gamma.index_select(0, rows).to(cdt)

    _chunked_pairs(blocks, pairs, fold, gw, gb, stats, per_chunk, ordered)
    if unpaired.numel() and t:
        unpaired = unpaired.to(device)
        g_u = gamma.index_select(0, unpaired).to(cdt).reshape(-1, d_out)
        gw.addmm_(g_u.T, a.index_select(0, unpaired).to(cdt).reshape(-1, d_in))
        if gb is not None:
            gb.add_(g_u.sum(dim=0))
    if grad_weight is not None and gw is not grad_weight:
        gw = grad_weight.copy_(gw)
    return gw.to(out_dtype), (gb.to(out_dtype) if gb is not None else None), stats


def is_default_layout(pairs: Tensor, n_rows: int) -> bool:
    """Whether ``pairs [B, 2]`` is row i with row B + i for every i, over exactly ``n_rows = 2B`` rows."""
    b = pairs.shape[0]
    if n_rows != 2 * b:
        return False
    expected = torch.arange(n_rows, device=pairs.device).view(2, b).T
    return bool(torch.equal(pairs, expected))
