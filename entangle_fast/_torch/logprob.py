"""The PyTorch path of the fused log-prob op: the ``logprob_fwd``/``logprob_bwd`` contract of ``kernels/logprob.py``
on ``[rows, vocab]`` logit tiles, for CPU, float64 and the features the kernels lack (logit transform, token metrics).

Forward: online log-sum-exp of z = f(l) over vocabulary tiles plus the target z_y (and, with ``metrics``, the entropy,
sum and argmax of softmax(z)). Backward: each tile is recomputed from ``lse``, delta = f'(l) (e_y - p) gives
``r += delta W``, ``grad_W += (g delta)^T h`` and ``grad_b += sum g delta`` (docs/math.md section 3.1). Registered in
:mod:`entangle_fast._backend` by :mod:`entangle_fast.logprobs`, which also uses :func:`vocab_tiles`,
:func:`row_chunks` and :func:`tile_logits` elsewhere (the monitor's kept head factors recompute tiles the same way).
"""
from __future__ import annotations

import torch
from torch import Tensor

from entangle_fast._backend import compute_dtype

# The PyTorch path works on [rows, vocab] logit tiles of at most this many elements (16 MiB in fp32), whatever N is.
# Vocabulary tiles are the outer loop: each weight tile is read (and, for bf16/fp16, converted) once, and its weight
# gradient is complete after one sweep over the rows, so it is written straight into the output dtype.
TORCH_TILE_ELEMENTS = 1 << 22
TORCH_VOCAB_TILE = 4096


def vocab_tiles(weight: Tensor, bias: Tensor | None, v0: int, v1: int, cdt: torch.dtype):
    """The PyTorch path's vocabulary tiles of ``[v0, v1)``: ``(c0, c1, weight tile, bias tile | None)``, converted to
    ``cdt`` once per tile."""
    for c0 in range(v0, v1, TORCH_VOCAB_TILE):
        c1 = min(c0 + TORCH_VOCAB_TILE, v1)
        yield c0, c1, weight[c0:c1].to(cdt), None if bias is None else bias[c0:c1].to(cdt)


def row_chunks(n: int):
    """Row slices of at most TORCH_TILE_ELEMENTS / TORCH_VOCAB_TILE rows: a logit tile is at most TORCH_TILE_ELEMENTS."""
    rows = max(1, TORCH_TILE_ELEMENTS // TORCH_VOCAB_TILE)
    for r0 in range(0, n, rows):
        yield slice(r0, min(r0 + rows, n))


def tile_logits(h: Tensor, w: Tensor, b: Tensor | None, out: Tensor | None = None) -> Tensor:
    """``h @ w.T + b`` for one tile, all in the compute dtype (into ``out`` when given)."""
    if b is not None:
        return torch.addmm(b, h, w.T, out=out) if out is not None else torch.addmm(b, h, w.T)
    return torch.mm(h, w.T, out=out) if out is not None else h @ w.T


def _transform_tile_(logits: Tensor, scale: float, softcap: float, derivative: bool = False):
    """``z = f(l)`` in place on one logit tile; with ``derivative``, also ``f'(l)``: None for the identity, the float
    ``scale`` for a pure scale, else a tile. Returns ``(z, f')``."""
    if softcap:
        t = logits.mul_(scale / softcap).tanh_()
        fprime = (1 - t * t).mul_(scale) if derivative else None
        return t.mul_(softcap), fprime
    if scale != 1.0:
        logits.mul_(scale)
    return logits, (None if scale == 1.0 else scale)


def torch_logprob_fwd(hidden, weight, labels, bias, ignore_index, *, scale=1.0, softcap=0.0, metrics=False):
    """PyTorch path of the forward contract: returns ``(logprobs [N], lse [N])`` in fp32 (fp64 for fp64 inputs), the
    log-probs and log-sum-exp of ``z = f(l)`` (``scale``, ``softcap``: see :func:`entangle_fast.logprobs.transform_args`).

    With ``metrics``, returns ``(logprobs, lse, entropy [N], logit_sum [N], argmax [N] int64)`` of softmax(z), every
    row included (ignored ones too). Online log-sum-exp over vocabulary tiles; each tile is exponentiated in place, so
    one tile is alive at a time (two with ``metrics``).
    """
    n, v = hidden.shape[0], weight.shape[0]
    cdt = compute_dtype(hidden.dtype)
    dev = hidden.device
    running_max = torch.full((n,), float("-inf"), dtype=cdt, device=dev)
    running_sum = torch.zeros(n, dtype=cdt, device=dev)
    target = torch.zeros(n, dtype=cdt, device=dev)
    if metrics:
        # running_ent = sum_v exp(z_v - m) (z_v - m) with m the running max: entropy = log s - running_ent / s
        # without the cancellation of lse - E[z] when the logits are large.
        running_ent = torch.zeros(n, dtype=cdt, device=dev)
        logit_sum = torch.zeros(n, dtype=cdt, device=dev)
        argmax = torch.zeros(n, dtype=torch.int64, device=dev)
    for c0, c1, w, b in vocab_tiles(weight, bias, 0, v, cdt):
        for rows in row_chunks(n):
            z, _ = _transform_tile_(tile_logits(hidden[rows].to(cdt), w, b), scale, softcap)
            lab = labels[rows]
            inside = (lab >= c0) & (lab < c1)
            picked = z.gather(1, (lab - c0).clamp(0, c1 - c0 - 1)[:, None]).squeeze(1)
            target[rows] = torch.where(inside, picked, target[rows])
            old_max = running_max[rows]
            if not metrics:
                new_max = torch.maximum(old_max, z.amax(dim=1))
                tile_sum = z.sub_(new_max[:, None]).exp_().sum(dim=1)
            else:
                logit_sum[rows] += z.sum(dim=1)
                tile_max, tile_arg = z.max(dim=1)  # first index of the maximum
                new_max = torch.maximum(old_max, tile_max)
                # Strictly greater: on a tie the earlier tile, hence the lower index, keeps the argmax.
                argmax[rows] = torch.where(tile_max > old_max, tile_arg + c0, argmax[rows])
                d = z.sub_(new_max[:, None])
                e = d.exp()
                tile_sum = e.sum(dim=1)
                tile_ent = e.mul_(d).sum(dim=1)
                old_sum, shift = running_sum[rows], old_max - new_max
                # Rebase the old terms on the new max: (z - m_new) = (z - m_old) + shift. Before the first tile the
                # sum is 0 and shift is -inf: keep 0 rather than 0 * inf.
                rebased = torch.exp(shift) * (running_ent[rows] + shift * old_sum)
                running_ent[rows] = torch.where(old_sum > 0, rebased, torch.zeros_like(rebased)) + tile_ent
            running_sum[rows] = running_sum[rows] * torch.exp(old_max - new_max) + tile_sum
            running_max[rows] = new_max
    lse = running_max + torch.log(running_sum)
    logprobs = torch.where(labels != ignore_index, target - lse, torch.zeros_like(lse))
    if not metrics:
        return logprobs, lse
    entropy = torch.log(running_sum) - running_ent / running_sum
    return logprobs, lse, entropy, logit_sum, argmax


def torch_logprob_bwd(
    hidden, weight, labels, bias, lse, grad_logprobs, ignore_index, *,
    grad_hidden_unscaled, grad_weight, grad_bias, vocab_start, vocab_end, probs_out,
    scale=1.0, softcap=0.0, delta_out=None,
):
    """PyTorch path of the backward contract (see ``kernels/logprob.py``): adds into ``grad_hidden_unscaled [N, d]``
    (compute dtype), ``grad_weight [V, d]`` and ``grad_bias [V]`` over vocab ``[vocab_start, vocab_end)``, and writes
    ``probs_out [N, vocab_end - vocab_start]`` (p = softmax(z)) and ``delta_out`` (same shape, f'(l) (e_y - p)) when
    given; both 0 on ignored rows. ``lse`` is that of z = f(l).

    Unlike the kernels, ``grad_weight`` may have the weight's own dtype: each vocabulary tile's weight gradient is
    summed over all rows in the compute dtype and added once, so a zero-filled bf16 buffer receives the rounded sums.
    """
    cdt = compute_dtype(hidden.dtype)
    n = hidden.shape[0]
    valid = labels != ignore_index
    # exp(z - inf) = 0: ignored rows get zero probabilities without a masking pass over every tile.
    lse_masked = torch.where(valid, lse.to(cdt), torch.full_like(lse, float("inf"), dtype=cdt))
    g = grad_logprobs.to(cdt)
    for c0, c1, w, b in vocab_tiles(weight, bias, vocab_start, vocab_end, cdt):
        acc = None
        if grad_weight is not None:
            acc = grad_weight[c0:c1] if grad_weight.dtype == cdt else torch.zeros_like(w)
        cols = slice(c0 - vocab_start, c1 - vocab_start)
        for rows in row_chunks(n):
            h = hidden[rows].to(cdt)
            # The deltas alone are asked for, as one contiguous tile, and nothing scales them afterwards (the weight
            # and bias gradients scale the tile in place): the logits are formed in place there.
            alone = probs_out is None and delta_out is not None and acc is None and grad_bias is None
            into = delta_out[rows, cols] if alone else None
            into = into if into is not None and into.is_contiguous() else None
            logits = tile_logits(h, w, b) if into is None else tile_logits(h, w, b, out=into)
            z, fprime = _transform_tile_(logits, scale, softcap, derivative=True)
            du = z.sub_(lse_masked[rows, None]).exp_()
            if probs_out is not None:
                probs_out[rows, cols] = du
            du.neg_()  # du = e_y - p
            lab = labels[rows]
            # + e_y on the rows whose label lies in this tile (a scatter, no host sync on CUDA).
            inside = valid[rows] & (lab >= c0) & (lab < c1)
            du.scatter_add_(1, (lab - c0).clamp(0, c1 - c0 - 1)[:, None], inside.to(cdt)[:, None])
            if fprime is not None:  # dl/dl_v = f'(l_v) dl/dz_v
                du.mul_(fprime)
            if delta_out is not None and into is None:
                delta_out[rows, cols] = du
            grad_hidden_unscaled[rows].addmm_(du, w)
            if acc is not None or grad_bias is not None:
                gdu = du.mul_(g[rows, None])
                if acc is not None:
                    acc.addmm_(gdu.T, h)
                if grad_bias is not None:
                    grad_bias[c0:c1] += gdu.sum(dim=0)
        if acc is not None and grad_weight.dtype != cdt:
            grad_weight[c0:c1] += acc
