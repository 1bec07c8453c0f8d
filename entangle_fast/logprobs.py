"""Fused per-token log-probs ``log_softmax(f(h W^T + b))[y]`` without materialising the ``[N, V]`` logits.

``f`` is the model's logit transform (:class:`~entangle_fast.logit_transform.LogitTransform`: a scale, then an
optional soft-cap; the identity by default); write l = h W^T + b and z = f(l).
Forward: online log-sum-exp of z over vocabulary tiles plus the target z_y; saves ``lse [N]``. With
``token_metrics`` the same walk also keeps, per row, the entropy of softmax(z) (online, rescaled with the running max
like the sum), the sum of z and its argmax (:class:`TokenMetrics`).
Backward: recomputes each logit tile from ``lse`` and forms delta = f'(l) (e_y - p), giving
``r = delta W`` (the unscaled hidden gradient, ``grad_h = g * r``), ``grad_W += (g delta)^T h`` and
``grad_b += sum g delta``. When token statistics are asked for, the same backward runs vocabulary chunk by chunk and
adds each chunk's probability products to every pair's ``P_w P_l^T`` (docs/math.md sections 3.1 and 7); under a
soft-cap f'(l) varies over the vocabulary, so the chunks hold the deltas themselves and their products are
accumulated instead (:class:`~entangle_fast.token_stats.PairLayout`).

Vertical slice: ``kernels/logprob.py`` (Triton), ``csrc/logprob.cu`` (CUDA C++, ``entangle_fast/_cuda.py``) and the
chunked PyTorch path ``entangle_fast/_torch/logprob.py`` share one launcher contract (``logprob_fwd``/``logprob_bwd``,
checked in ``entangle_fast/_contract.py``); :class:`LinearLogprobFunction` calls the launcher that
:func:`~entangle_fast._backend.resolve_impl` picked, from the table of :mod:`entangle_fast._backend`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from entangle_fast import _backend
from entangle_fast._backend import compute_dtype, launcher, resolve_impl, without_autocast
from entangle_fast._torch import logprob as _torch_logprob
from entangle_fast.logit_transform import IDENTITY, LogitTransform
from entangle_fast.token_stats import (
    BackwardRecord,
    OutputLayerTokenStats,
    PairLayout,
    PairSums,
    TokenStatsHandle,
    active_listeners,
    listeners_need_matrices,
    finalize_token_stats,
    resolve_pairs,
)

_backend.register("logprob_fwd", torch="entangle_fast._torch.logprob:torch_logprob_fwd",
                  triton="entangle_fast.kernels.logprob:logprob_fwd", cuda="entangle_fast._cuda:cuda_logprob_fwd")
_backend.register("logprob_bwd", torch="entangle_fast._torch.logprob:torch_logprob_bwd",
                  triton="entangle_fast.kernels.logprob:logprob_bwd", cuda="entangle_fast._cuda:cuda_logprob_bwd")

# The statistics path holds one [N, V_chunk] probability chunk; V_chunk is a multiple of the PyTorch path's
# vocabulary tile (entangle_fast._torch.logprob.TORCH_VOCAB_TILE) so the
# PyTorch backend's gradients are bit-identical with and without statistics.
STATS_CHUNK_ELEMENTS = 1 << 26
# The kernels' fp32 weight-gradient buffer for bf16/fp16 weights: one vocabulary chunk of at most this many elements
# (128 MiB), rounded into the output after each chunk.
GRAD_WEIGHT_CHUNK_ELEMENTS = 1 << 25


def transform_args(transform: LogitTransform | None) -> tuple[float, float]:
    """The scalars every backend takes for ``transform``: ``(scale, softcap)``, softcap 0.0 meaning none."""
    if transform is None:
        return 1.0, 0.0
    return float(transform.scale), float(transform.softcap or 0.0)


def _launchers(backend: str):
    """The ``(fwd, bwd)`` launchers of a resolved backend, from the table of :mod:`entangle_fast._backend` (every
    backend takes the logit transform and the token metrics)."""
    return launcher("logprob_fwd", backend), launcher("logprob_bwd", backend)


def _vocab_chunks(n: int, v: int, with_stats: bool, max_cols: int | None = None):
    """Vocabulary ranges of the backward: one range, unless statistics are asked for (chunks holding at most
    STATS_CHUNK_ELEMENTS probabilities) or ``max_cols`` caps the width; widths are multiples of TORCH_VOCAB_TILE."""
    tile = _torch_logprob.TORCH_VOCAB_TILE
    cols = v
    if with_stats:
        cols = (STATS_CHUNK_ELEMENTS // max(n, 1)) // tile * tile
    if max_cols is not None:
        cols = min(cols, max_cols // tile * tile)
    cols = max(tile, cols) if cols < v else v
    return [(c0, min(c0 + cols, v)) for c0 in range(0, v, cols)]


def fused_backward(
    impl, hidden, weight, labels, bias, lse, grad_logprobs, ignore_index, *,
    need_weight_grad: bool, need_bias_grad: bool, layout: PairLayout | None,
    transform: LogitTransform | None = None, sums: PairSums | None = None,
):
    """One pass of the fused backward over the whole vocabulary, ``lse`` being that of ``z = transform(l)``.

    Returns ``(r [N, d], grad_weight [V, d] | None, grad_bias [V] | None)``: ``r`` and ``grad_bias`` in the compute
    dtype, ``grad_weight`` in the weight's dtype. When ``layout`` is given, each vocabulary chunk's probabilities (or,
    when ``layout.accumulates_deltas``, its deltas f'(l) (e_y - p)) are added to its pair products before the next
    chunk overwrites them.

    The kernels add into fp32 with atomics. For a bf16/fp16 weight they do so one vocabulary chunk at a time into an
    fp32 buffer of at most GRAD_WEIGHT_CHUNK_ELEMENTS, rounded into the output after each chunk, rather than into a
    [V, d] fp32 copy of the gradient (2 GiB at V = 128256, d = 4096). The PyTorch path completes each vocabulary
    tile over all rows before adding it, so it writes any dtype directly.

    With ``sums`` (book-keeping, docs/math.md section 4.2) the weight and bias gradients of each vocabulary chunk are
    formed row by row from the chunk's deltas (:func:`entangle_fast.bookkeeping.pair_weight_grad_dense`) and the
    pairs' inner products and squared norms come from the same partial sums: about 3 V d per pair instead of the
    token matrices' 3 T_w T_l V.
    """
    if sums is not None:
        return _fused_backward_sums(impl, hidden, weight, labels, bias, lse, grad_logprobs, ignore_index,
                                    need_bias_grad=need_bias_grad, transform=transform, sums=sums)
    _, bwd = _launchers(impl)
    scale, softcap = transform_args(transform)
    n, v = hidden.shape[0], weight.shape[0]
    cdt = compute_dtype(hidden.dtype)
    r = torch.zeros(n, hidden.shape[1], dtype=cdt, device=hidden.device)
    gw = torch.zeros(v, weight.shape[1], dtype=weight.dtype, device=hidden.device) if need_weight_grad else None
    gb = torch.zeros(v, dtype=cdt, device=hidden.device) if need_bias_grad else None
    staged = gw is not None and impl != "torch" and weight.dtype != cdt
    max_cols = max(1, GRAD_WEIGHT_CHUNK_ELEMENTS // max(weight.shape[1], 1)) if staged else None
    chunks = _vocab_chunks(n, v, layout is not None, max_cols)
    widest = max(c1 - c0 for c0, c1 in chunks)
    probs = stage = None
    if layout is not None:  # one flat buffer, so that every chunk, the shorter last one too, is a contiguous [N, cols]
        probs = torch.empty(n * widest, dtype=cdt, device=hidden.device)
    if staged:
        stage = torch.empty(widest, weight.shape[1], dtype=cdt, device=hidden.device)
    for v0, v1 in chunks:
        chunk_probs = probs[: n * (v1 - v0)].view(n, v1 - v0) if probs is not None else None
        chunk_gw = gw
        if staged:
            chunk_gw = stage[: v1 - v0].zero_()
        deltas = layout is not None and layout.accumulates_deltas
        bwd(hidden, weight, labels, bias, lse, grad_logprobs, ignore_index,
            grad_hidden_unscaled=r, grad_weight=chunk_gw, grad_bias=gb, vocab_start=v0, vocab_end=v1,
            probs_out=None if deltas else chunk_probs, scale=scale, softcap=softcap,
            delta_out=chunk_probs if deltas else None)
        if staged:
            gw[v0:v1] = chunk_gw
        if layout is not None:
            layout.accumulate(chunk_probs)
    return r, gw, gb


def _fused_backward_sums(impl, hidden, weight, labels, bias, lse, grad_logprobs, ignore_index, *, need_bias_grad,
                         transform, sums: PairSums):
    """:func:`fused_backward` with book-kept head gradients: per vocabulary chunk the backward contract writes the deltas
    f'(l) (e_y - p) and r, and the chunk's weight-gradient tile is summed row by row, the pair sums beside it."""
    from entangle_fast.bookkeeping import dense_with_plan

    _, bwd = _launchers(impl)
    scale, softcap = transform_args(transform)
    n, v, d = hidden.shape[0], weight.shape[0], hidden.shape[1]
    cdt = compute_dtype(hidden.dtype)
    r = torch.zeros(n, d, dtype=cdt, device=hidden.device)
    # The PyTorch path takes one vocabulary tile at a time: its deltas are formed in place in one reused buffer and
    # book-kept while they are still in cache (the kernels write wider chunks).
    chunks = _vocab_chunks(n, v, True, _torch_logprob.TORCH_VOCAB_TILE if impl == "torch" else None)
    # One chunk: the book-kept gradients are the outputs themselves, no copy.
    gw = torch.empty(v, d, dtype=weight.dtype, device=hidden.device) if len(chunks) > 1 else None
    gb = torch.empty(v, dtype=cdt, device=hidden.device) if need_bias_grad and len(chunks) > 1 else None
    buf = torch.empty(n * max(c1 - c0 for c0, c1 in chunks), dtype=cdt, device=hidden.device)
    rows = hidden.view(sums.rows, sums.width, d)
    if rows.dtype != cdt:
        rows = rows.to(cdt)  # the delta tiles are in the compute dtype
    backend = resolve_impl(impl, hidden.device, cdt)
    g = grad_logprobs.to(cdt)[:, None]
    for v0, v1 in chunks:
        delta = buf[: n * (v1 - v0)].view(n, v1 - v0)
        bwd(hidden, weight, labels, bias, lse, grad_logprobs, ignore_index,
            grad_hidden_unscaled=r, grad_weight=None, grad_bias=None, vocab_start=v0, vocab_end=v1,
            probs_out=None, scale=scale, softcap=softcap, delta_out=delta)
        delta.mul_(g)  # loss units: the head gradient's factor at each token
        # hidden [R, T, d] and its delta tile [R, T, v1 - v0] share dtype, device and layout by construction.
        tile_gw, tile_gb, stats = dense_with_plan(rows, delta.view(sums.rows, sums.width, v1 - v0), sums.plan,
                                                  bias=need_bias_grad, out_dtype=weight.dtype, backend=backend,
                                                  grad_weight=None if gw is None else gw[v0:v1])
        if len(chunks) == 1:
            gw, gb = tile_gw, (tile_gb.to(cdt) if need_bias_grad else None)
        elif gb is not None:
            gb[v0:v1] = tile_gb
        sums.add(stats)
    return r, gw, gb


@dataclass
class TokenMetrics:
    """Per-token metrics of softmax(z), z = f(h W^T + b), from the forward's own walk over the vocabulary.

    Every tensor has the shape of ``labels``. Values are computed on every position, ignored ones
    (``labels == ignore_index``) included: they are defined there, and callers average over the positions they want
    (TRL averages over completion tokens itself). No gradient flows through them.

    Attributes:
        entropy: ``-sum_v p_v log p_v``, float32 (float64 for float64 inputs).
        logit_sum: ``sum_v z_v`` (the transformed logits), float32 (float64 for float64 inputs).
        argmax: ``argmax_v z_v``, int64, the lowest index on ties.
    """

    entropy: Tensor
    logit_sum: Tensor
    argmax: Tensor


class _StatsRequest:
    """What the forward needs to remember for the statistics of the backward. ``sums_only``: no caller needs the
    token matrices (a monitor without position attribution), so the backward forms the pair sums by book-keeping."""

    def __init__(self, labels_2d, pairs, ignore_index, full_matrices, handle, listeners, sums_only=False):
        self.labels_2d, self.pairs, self.ignore_index = labels_2d, pairs, ignore_index
        self.full_matrices, self.handle, self.listeners = full_matrices, handle, listeners
        self.sums_only = sums_only


class LinearLogprobFunction(torch.autograd.Function):
    """Autograd node of :func:`linear_logprobs` on flattened ``hidden [N, d]``, ``labels [N]``.

    Outputs ``(logprobs, lse)``, plus ``(entropy, logit_sum, argmax)`` when ``metrics``; only the log-probs are
    differentiable."""

    @staticmethod
    @without_autocast
    def forward(ctx, hidden, weight, bias, labels, ignore_index, impl, stats_request, transform, metrics):
        fwd, _ = _launchers(impl)
        scale, softcap = transform_args(transform)
        out = fwd(hidden, weight, labels, bias, ignore_index, scale=scale, softcap=softcap, metrics=metrics)
        logprobs, lse = out[0], out[1]
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.ignore_index, ctx.impl, ctx.stats_request, ctx.transform = ignore_index, impl, stats_request, transform
        ctx.mark_non_differentiable(*out[1:])
        return (logprobs.float() if hidden.dtype != torch.float64 else logprobs, *out[1:])

    @staticmethod
    @without_autocast
    def backward(ctx, grad_logprobs, *_grad_rest):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        req: _StatsRequest | None = ctx.stats_request
        transform = ctx.transform or IDENTITY
        cdt = compute_dtype(hidden.dtype)
        g = grad_logprobs.to(cdt).contiguous()
        layout = sums = None
        if req is not None and req.sums_only and ctx.needs_input_grad[1]:
            sums = PairSums(req.labels_2d, req.pairs, req.ignore_index, cdt)
        elif req is not None:
            layout = PairLayout(req.labels_2d, req.pairs, req.ignore_index, cdt, transform)
        r, gw, gb = fused_backward(
            ctx.impl, hidden, weight, labels, bias, lse, g, ctx.ignore_index,
            need_weight_grad=ctx.needs_input_grad[1], need_bias_grad=bias is not None and ctx.needs_input_grad[2],
            layout=layout, transform=transform, sums=sums,
        )
        if req is not None:
            stats = sums.finalize(g) if sums is not None else \
                finalize_token_stats(layout, hidden, weight, bias, labels, lse, r, g, req.full_matrices)
            if req.handle is not None:
                req.handle._stats = stats
            for listener in req.listeners:
                listener(BackwardRecord(hidden, weight, bias, labels, lse, g, ctx.ignore_index,
                                        tuple(req.labels_2d.shape), stats, transform, ctx.impl))
        # r is not read after this point: scale it in place (an [N, d] fp32 buffer less at the peak).
        grad_hidden = r.mul_(g[:, None]).to(hidden.dtype) if ctx.needs_input_grad[0] else None
        grad_weight = gw
        grad_bias = gb.to(bias.dtype) if gb is not None else None
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None


def _validate(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None, ignore_index: int,
              transform=None) -> None:
    if transform is not None and not isinstance(transform, LogitTransform):
        raise TypeError(f"transform must be an entangle_fast.logit_transform.LogitTransform or None, got "
                        f"{type(transform).__name__}")
    floats = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    if not isinstance(hidden, Tensor) or hidden.dtype not in floats:
        raise TypeError(f"hidden must be a float32/bfloat16/float16/float64 tensor, got {getattr(hidden, 'dtype', type(hidden))}")
    if hidden.ndim < 1:
        raise ValueError("hidden must have shape [..., d]")
    if weight.ndim != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must have shape [V, d] with d = hidden.shape[-1] = {hidden.shape[-1]}; got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be an int64 tensor, got {labels.dtype}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal hidden.shape[:-1] = {tuple(hidden.shape[:-1])}")
    if bias is not None:
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias dtype {bias.dtype} differs from hidden dtype {hidden.dtype}")
    for name, t in (("weight", weight), ("labels", labels), ("bias", bias)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")
    if labels.numel():
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= weight.shape[0]))
        if bool(bad.any()):
            idx = tuple(int(i) for i in torch.nonzero(bad)[0])
            raise ValueError(
                f"labels must lie in [0, V={weight.shape[0]}) or equal ignore_index={ignore_index}; "
                f"labels{list(idx)} = {int(labels[idx])}"
            )


def linear_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    impl: str = "auto",
    pairs: Tensor | list | None = None,
    token_stats: bool = False,
    full_matrices: bool = False,
    transform: LogitTransform | None = None,
    token_metrics: bool = False,
):
    """Per-token ``log_softmax(f(hidden @ weight.T + bias))[labels]`` without materialising the logits.

    Differentiable w.r.t. ``hidden``, ``weight`` and ``bias`` under any upstream gradient. Peak extra memory is one
    ``[rows, vocab]`` tile (PyTorch path) or none beyond ``[N]`` (Triton), independent of N.

    Args:
        hidden: ``[..., d]`` final hidden states (after the final norm), fp32/bf16/fp16 (fp64 on the PyTorch path).
        weight: ``[V, d]`` output embedding, same dtype. bias: ``[V]`` or None.
        labels: ``[...]`` int64 targets aligned with ``hidden`` (no shift here); ``ignore_index`` marks skipped tokens.
        impl: ``"auto"`` (Triton on CUDA, PyTorch otherwise), ``"triton"``, ``"cuda"`` (CUDA C++ kernels of csrc/),
            ``"torch"``; every backend takes the logit transform and the token metrics.
        pairs: with ``token_stats``: ``[P, 2]`` (chosen row, rejected row) over the rows of ``hidden [R, T, d]``;
            default row i with row R/2 + i (TRL's concatenated layout).
        token_stats: also compute :class:`~entangle_fast.token_stats.OutputLayerTokenStats` in the backward; requires
            ``hidden [R, T, d]``. Adds a :class:`TokenStatsHandle` to the result; ``handle.stats`` is filled by
            ``.backward()``.
        full_matrices: with ``token_stats``, also keep the within-response ``[T_w, T_w]``/``[T_l, T_l]`` matrices.
        transform: the model's :class:`~entangle_fast.logit_transform.LogitTransform` ``f`` (scale, soft-cap), applied
            to the head's logits before the softmax; gradients and token statistics go through ``f'``. None: identity.
        token_metrics: also return :class:`TokenMetrics` (entropy, sum and argmax of z per token, shaped like
            ``labels``), computed in the same forward walk over the vocabulary; no gradient flows through them.

    Returns:
        ``[...]`` float32 log-probs (float64 for float64 inputs), exactly 0 where ``labels == ignore_index``; with
        ``token_stats`` and/or ``token_metrics`` a tuple ``(logprobs, handle)``, ``(logprobs, metrics)`` or
        ``(logprobs, handle, metrics)``.
    """
    _validate(hidden, weight, labels, bias, ignore_index, transform)
    backend = resolve_impl(impl, hidden.device, hidden.dtype)
    if transform is not None and transform.identity:
        transform = None
    listeners = active_listeners()
    request = None
    handle = TokenStatsHandle() if token_stats else None
    if token_stats or (listeners and hidden.ndim == 3):
        if hidden.ndim != 3:
            raise ValueError(f"token_stats needs hidden of shape [R, T, d] (rows of sequences); got {tuple(hidden.shape)}")
        request = _StatsRequest(labels, resolve_pairs(pairs, hidden.shape[0], hidden.device), ignore_index,
                                full_matrices, handle, listeners,
                                sums_only=not token_stats and not listeners_need_matrices())
    elif pairs is not None:
        raise ValueError("pairs= only matters with token_stats=True")
    lead = hidden.shape[:-1]

    def result(logprobs, metrics):
        extra = ((handle,) if token_stats else ()) + ((metrics,) if token_metrics else ())
        return (logprobs, *extra) if extra else logprobs

    if hidden.numel() == 0 or labels.numel() == 0:
        cdt = compute_dtype(hidden.dtype)
        empty = hidden.new_zeros(lead, dtype=cdt) + 0 * hidden.sum() + 0 * weight.sum()
        metrics = TokenMetrics(hidden.new_zeros(lead, dtype=cdt), hidden.new_zeros(lead, dtype=cdt),
                               torch.zeros(lead, dtype=torch.int64, device=hidden.device)) if token_metrics else None
        return result(empty, metrics)
    h2 = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    out = LinearLogprobFunction.apply(
        h2, weight.contiguous(), bias.contiguous() if bias is not None else None,
        labels.reshape(-1).to(torch.int64).contiguous(), ignore_index, backend, request, transform, token_metrics,
    )
    metrics = TokenMetrics(*(t.reshape(lead) for t in out[2:])) if token_metrics else None
    return result(out[0].reshape(lead), metrics)


@torch.no_grad()
def output_layer_token_stats(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    pairs: Tensor | list | None = None,
    ignore_index: int = -100,
    impl: str = "auto",
    full_matrices: bool = False,
    transform: LogitTransform | None = None,
) -> OutputLayerTokenStats:
    """The output-layer token statistics without training: the fused forward and one statistics-only backward.

    For profiling and checkpoints where no backward runs. ``hidden [R, T, d]``, ``labels [R, T]``; other arguments as
    in :func:`linear_logprobs` (``transform``: the gradients are those of log_softmax(f(l))). ``a_w``/``a_l`` are None
    (no loss, no upstream gradient).
    """
    _validate(hidden, weight, labels, bias, ignore_index, transform)
    if hidden.ndim != 3:
        raise ValueError(f"hidden must have shape [R, T, d]; got {tuple(hidden.shape)}")
    backend = resolve_impl(impl, hidden.device, hidden.dtype)
    transform = transform if transform is not None and not transform.identity else IDENTITY
    fwd, _ = _launchers(backend)
    h2 = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    lab = labels.reshape(-1).to(torch.int64).contiguous()
    weight = weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    scale, softcap = transform_args(transform)
    _, lse = fwd(h2, weight, lab, bias, ignore_index, scale=scale, softcap=softcap)
    cdt = compute_dtype(hidden.dtype)
    layout = PairLayout(labels, resolve_pairs(pairs, hidden.shape[0], hidden.device), ignore_index, cdt, transform)
    zeros = torch.zeros(h2.shape[0], dtype=cdt, device=hidden.device)
    r, _, _ = fused_backward(backend, h2, weight, lab, bias, lse, zeros, ignore_index,
                             need_weight_grad=False, need_bias_grad=False, layout=layout, transform=transform)
    return finalize_token_stats(layout, h2, weight, bias, lab, lse, r, None, full_matrices)
