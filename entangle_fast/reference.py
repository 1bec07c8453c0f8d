"""Plain-PyTorch references for every quantity entangle_fast computes.

These materialise what the fused ops avoid materialising (the ``[N, V]`` logits, per-token gradient vectors), so they
are for tests, benchmarks and documentation, not for training at scale. Every test, benchmark and fallback imports
them from here: there is no second copy of the math.

Shapes: ``N`` tokens, ``d`` hidden size, ``V`` vocabulary size, ``T_w``/``T_l`` response tokens of a chosen/rejected row.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from entangle_fast._backend import compute_dtype
from entangle_fast.logit_transform import LogitTransform


def linear_logprobs_reference(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    *,
    upcast: bool = True,
    transform: LogitTransform | None = None,
) -> Tensor:
    """Per-token ``log_softmax(f(hidden @ weight.T + bias))[label]`` with materialised logits.

    Same semantics as TRL's ``selective_log_softmax`` on masked labels: 0 where ``label == ignore_index``.

    Args:
        hidden: ``[..., d]``. weight: ``[V, d]``. labels: ``[...]`` int64. bias: ``[V]`` or None.
        upcast: compute the log-softmax in at least float32 (the logits are produced by one matmul in the input dtype,
            which is what plain PyTorch does in low precision). float64 inputs stay float64.
        transform: ``f`` (scale, soft-cap), applied to the (upcast) logits by autograd; None is the identity.

    Returns:
        ``[...]`` log-probs, float64 for float64 inputs, else float32.
    """
    logits = transformed_logits_reference(hidden, weight, bias, upcast=upcast, transform=transform)
    out_dtype = compute_dtype(hidden.dtype)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    logp = torch.log_softmax(logits, dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, logp, torch.zeros_like(logp)).to(out_dtype)


def transformed_logits_reference(hidden: Tensor, weight: Tensor, bias: Tensor | None = None, *, upcast: bool = True,
                                 transform: LogitTransform | None = None) -> Tensor:
    """The materialised ``[..., V]`` logits z = f(hidden @ weight.T + bias): one matmul in the input dtype, upcast to
    at least float32 when ``upcast``, then the transform."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    if upcast:
        logits = logits.to(compute_dtype(hidden.dtype))
    return transform(logits) if transform is not None else logits


def token_metrics_reference(hidden: Tensor, weight: Tensor, bias: Tensor | None = None, *, upcast: bool = True,
                            transform: LogitTransform | None = None) -> dict[str, Tensor]:
    """Per-token ``entropy`` (-sum p log p of softmax(z)), ``logit_sum`` (sum_v z_v) and ``argmax`` (first index of
    the maximum, int64) from the materialised z of :func:`transformed_logits_reference`; each ``[...]``."""
    z = transformed_logits_reference(hidden, weight, bias, upcast=upcast, transform=transform)
    logp = torch.log_softmax(z, dim=-1)
    return {"entropy": -(logp.exp() * logp).sum(-1), "logit_sum": z.sum(-1), "argmax": torch.argmax(z, dim=-1)}


def sequence_logprobs_reference(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Per-token log-probs of a causal LM from its full ``logits [R, T, V]`` and unshifted ``labels [R, T]``.

    Applies the Hugging Face causal-LM shift (logits at position t predict labels at t + 1) and returns ``[R, T - 1]``,
    0 where the shifted label is ``ignore_index``.
    """
    logits = logits[:, :-1].to(compute_dtype(logits.dtype))
    shifted = labels[:, 1:]
    valid = shifted != ignore_index
    safe = torch.where(valid, shifted, torch.zeros_like(shifted))
    logp = torch.log_softmax(logits, dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, logp, torch.zeros_like(logp))


def per_token_gradients_reference(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    transform: LogitTransform | None = None,
) -> tuple[list[Tensor], list[Tensor]]:
    """Explicit per-token gradients of each row's response-token log-probs, one autograd backward per token.

    For every row r and every response position t (``labels[r, t] != ignore_index``, in position order):
    ``grad_{(W, b)} l_{r,t}`` flattened, and ``d l_{r,t} / d h_{r,t}``.

    Args:
        hidden: ``[R, T, d]``; weight ``[V, d]``; labels ``[R, T]``; bias ``[V]`` or None.

    Returns:
        ``(param_grads, hidden_grads)``: lists over rows of ``[T_r, V*d (+V)]`` and ``[T_r, d]``.
    """
    hidden = hidden.detach().requires_grad_(True)
    weight = weight.detach().requires_grad_(True)
    params = [weight] + ([bias.detach().requires_grad_(True)] if bias is not None else [])
    logp = linear_logprobs_reference(hidden, params[0], labels, params[1] if bias is not None else None, ignore_index,
                                     transform=transform)
    param_grads, hidden_grads = [], []
    for r in range(hidden.shape[0]):
        rows_p, rows_h = [], []
        for t in torch.nonzero(labels[r] != ignore_index).flatten().tolist():
            grads = torch.autograd.grad(logp[r, t], params + [hidden], retain_graph=True)
            rows_p.append(torch.cat([g.reshape(-1) for g in grads[:-1]]))
            rows_h.append(grads[-1][r, t])
        d = hidden.shape[-1]
        n_param = sum(p.numel() for p in params)
        param_grads.append(torch.stack(rows_p) if rows_p else hidden.new_zeros(0, n_param))
        hidden_grads.append(torch.stack(rows_h) if rows_h else hidden.new_zeros(0, d))
    return param_grads, hidden_grads


def output_layer_token_stats_reference(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    pairs: Sequence[tuple[int, int]],
    bias: Tensor | None = None,
    ignore_index: int = -100,
    transform: LogitTransform | None = None,
) -> list[dict[str, Tensor]]:
    """Output-layer token matrices from explicit per-token gradients (the slow, obviously-right way).

    For each pair ``(w, l)`` of rows, with ``G_r`` the stacked per-token gradients w.r.t. ``(W, b)`` of row r and
    ``R_r`` those w.r.t. the hidden state at the token's own position:

    - ``K_wl = G_w G_l^T`` ``[T_w, T_l]``, ``K_ww``, ``K_ll`` (within-response matrices),
    - ``inner = sum K_wl``, ``chosen_sq_norm = sum K_ww``, ``rejected_sq_norm = sum K_ll``, ``cosine``,
    - ``hidden_gram = R_w R_l^T`` ``[T_w, T_l]``.
    """
    param_grads, hidden_grads = per_token_gradients_reference(hidden, weight, labels, bias, ignore_index, transform)
    out = []
    for w, l in pairs:
        gw, gl = param_grads[w], param_grads[l]
        k_wl, k_ww, k_ll = gw @ gl.T, gw @ gw.T, gl @ gl.T
        inner, nw, nl = k_wl.sum(), k_ww.sum(), k_ll.sum()
        out.append(
            dict(
                K_wl=k_wl,
                K_ww=k_ww,
                K_ll=k_ll,
                inner=inner,
                chosen_sq_norm=nw,
                rejected_sq_norm=nl,
                cosine=inner / torch.sqrt(nw * nl),
                hidden_gram=hidden_grads[w] @ hidden_grads[l].T,
            )
        )
    return out


def flat_gradients_reference(outputs: Tensor, params: Sequence[Tensor]) -> Tensor:
    """Flattened gradients of every scalar in ``outputs`` w.r.t. ``params``, one autograd backward each.

    The explicit baseline of the monitor: ``outputs [R]`` (e.g. the summed log-prob of each row) -> ``[R, n]`` with n
    the total size of ``params`` (in order); a parameter an output does not reach contributes zeros.
    """
    rows = []
    for r in range(outputs.shape[0]):
        grads = torch.autograd.grad(outputs[r], list(params), retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)]))
    return torch.stack(rows)


def entanglement_reference(chosen_grads: Tensor, rejected_grads: Tensor) -> dict[str, Tensor]:
    """``inner``, ``chosen_sq_norm``, ``rejected_sq_norm``, ``cosine`` ``[B]`` from explicit ``[B, n]`` gradients."""
    inner = (chosen_grads * rejected_grads).sum(1)
    nw, nl = (chosen_grads * chosen_grads).sum(1), (rejected_grads * rejected_grads).sum(1)
    return {"inner": inner, "chosen_sq_norm": nw, "rejected_sq_norm": nl, "cosine": inner / torch.sqrt(nw * nl)}


def pair_weight_grad_reference(a: Tensor, gamma: Tensor, cu_seqlens: Tensor, pairs: Tensor, *, bias: bool = False):
    """One layer's weight gradient and per-pair statistics with every per-row gradient materialised.

    Row r's gradients are ``G_r = gamma_r^T a_r`` ``[d_out, d_in]`` and ``b_r = sum gamma_r`` ``[d_out]`` (tokens
    ``cu_seqlens[r]:cu_seqlens[r + 1]``); ``grad_weight = sum_r G_r`` over every row, and for each pair (w, l)
    ``inner = <G_w, G_l>``, ``chosen = ||G_w||^2``, ``rejected = ||G_l||^2`` (plus the b parts when ``bias``).
    Computes in the inputs' dtype with no upcast: float64 inputs give the tests' ground truth, low-precision inputs
    plain PyTorch's own error in that dtype (the bar of the tolerance rule). Same arguments and result as
    ``entangle_fast.bookkeeping.pair_weight_grad`` (grad_weight in a's dtype; statistics cast to fp32, or fp64).
    """
    from entangle_fast.bookkeeping import PairWeightGrad, _validate

    cu, pr = _validate(a, gamma, cu_seqlens, pairs, a.dtype)
    bounds = cu.tolist()
    grads = [gamma[s:e].T @ a[s:e] for s, e in zip(bounds[:-1], bounds[1:])]
    sums = [gamma[s:e].sum(dim=0) for s, e in zip(bounds[:-1], bounds[1:])]
    stat_dtype = compute_dtype(a.dtype)

    def dot(i: int, j: int) -> Tensor:
        value = (grads[i] * grads[j]).sum()
        return value + (sums[i] * sums[j]).sum() if bias else value

    pl = pr.tolist()
    inner = [dot(w, l) for w, l in pl]
    chosen = [dot(w, w) for w, _ in pl]
    rejected = [dot(l, l) for _, l in pl]
    stats = [torch.stack(s).to(stat_dtype) if s else torch.zeros(0, dtype=stat_dtype, device=a.device)
             for s in (inner, chosen, rejected)]
    grad_weight = torch.stack(grads).sum(dim=0) if grads else a.new_zeros(gamma.shape[1], a.shape[1])
    grad_bias = (torch.stack(sums).sum(dim=0) if sums else gamma.new_zeros(gamma.shape[1])) if bias else None
    return PairWeightGrad(grad_weight, grad_bias, *stats)
