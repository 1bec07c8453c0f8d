"""Kept per-layer factors of one backward, and what they give without a second backward (docs/math.md section 6).

With ``EntanglementMonitor(..., keep_factors=True)`` each covered module keeps what the statistics were reduced from:
its packed inputs and output gradients (linear, Conv1D), ids and output gradients (embedding), per-token parameter
gradients (norms), or the fused head's backward record. At row r the backward carried a_r times the row's log-prob
gradient, so with the row coefficients a_r the kept factors rebuild, for any row weights w_r,

    sum_r w_r grad s_r                       (:func:`weighted_gradients`: a re-weighted weight gradient)
    <grad s_r, D> for every row r            (:func:`gradient_dot`: first-order change of each s_r along D)

per module, each from a product or two over the kept tokens:

    linear   y = x A^T + c:   sum_r w_r grad_A s_r = (lambda gamma)^T a,       <grad_A s_r, D> = sum_tau gamma . (D a)
    Conv1D   y = x A + c:     the same, transposed
    embedding E[ids]:         index_add of lambda gamma at the ids,            sum_tau gamma . D[id]
    norms (position-wise):    sum of lambda times the per-token gradients,     per-token gradients @ D
    fused head W, b:          one head-only fused backward with the upstream lambda g,
                              and sum_t g_t (u_t[y_t] - p_t . u_t) with u_t = D_W h_t + D_b over the vocabulary

where lambda = w_r / a_r on row r's tokens. The head pass walks the vocabulary in tiles as the fused op does; it is
not a backward of the model.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from entangle_fast.monitor.reductions import Tokens


@dataclass
class KeptUse:
    """What one covered module keeps for re-forming its gradients.

    ``kind``: the coverage kind (``linear``, ``conv1d``, ``embedding``, ``positionwise``) or ``head`` (the fused
    log-prob op's record). ``params``: attribute name -> parameter, in the module's tracked order. ``tok``: packed
    tokens in loss units (gamma carries a_r). ``token_grads``: ``[S, n]`` per-token parameter gradients of a
    position-wise module, loss units. ``record``: the fused op's :class:`~entangle_fast.token_stats.BackwardRecord`.
    """

    name: str
    kind: str
    params: dict[str, nn.Parameter]
    tok: Tokens | None = None
    token_grads: Tensor | None = None
    record: object | None = None
    reducer: object | None = None
    module: nn.Module | None = None
    row_grads: Tensor | None = None


def _head_upstream(rec, lam: Tensor) -> Tensor:
    """``[N]`` the fused head's upstream gradient with row r's tokens times ``lam[r]`` (0 off the response)."""
    rows, width = rec.rows_shape
    g = rec.grad_logprobs.reshape(rows, width) * lam.to(rec.grad_logprobs.dtype)[:, None]
    return (g * (rec.labels.reshape(rows, width) != rec.ignore_index)).reshape(-1).contiguous()


def weighted_gradients(kept: list[KeptUse], lam: Tensor) -> dict[nn.Parameter, Tensor]:
    """``sum_r lam[r] * (backward's row-r gradient)`` for every kept parameter (``lam [R]``; with lam = w / a this is
    sum_r w_r grad s_r). A parameter used by two modules (tied embeddings) gets the sum of both uses."""
    out: dict[int, Tensor] = {}
    owners: dict[int, nn.Parameter] = {}

    def add(p: nn.Parameter, g: Tensor) -> None:
        owners[id(p)] = p
        out[id(p)] = out[id(p)] + g if id(p) in out else g

    for use in kept:
        if use.kind == "head":
            from entangle_fast._backend import resolve_impl
            from entangle_fast.logprobs import fused_backward

            rec = use.record
            impl = resolve_impl(rec.impl, rec.hidden.device, rec.hidden.dtype)  # the backend the op ran on
            _, gw, gb = fused_backward(impl, rec.hidden, rec.weight, rec.labels, rec.bias, rec.lse,
                                       _head_upstream(rec, lam), rec.ignore_index, need_weight_grad=True,
                                       need_bias_grad=rec.bias is not None, layout=None, transform=rec.transform)
            add(use.params["weight"], gw)
            if "bias" in use.params:
                add(use.params["bias"], gb)
            continue
        for attr, grad in use.reducer.weighted_gradient(use.module, use, lam).items():
            add(use.params[attr], grad)
    return {owners[k]: v for k, v in out.items()}


def _head_dot(rec, d_weight: Tensor | None, d_bias: Tensor | None, dtype: torch.dtype) -> Tensor:
    """``[N]`` g_t * delta_t . u_t with u_t = D_W h_t + D_b: each token's loss-unit gradient dotted with D, where
    delta_t = f'(l_t) (e_{y_t} - p_t) under the op's logit transform."""
    from entangle_fast._backend import compute_dtype
    from entangle_fast._torch.logprob import row_chunks, tile_logits, vocab_tiles

    transform = rec.transform
    n, v = rec.hidden.shape[0], rec.weight.shape[0]
    h = rec.hidden.to(dtype)
    valid = rec.labels != rec.ignore_index
    safe = torch.where(valid, rec.labels, torch.zeros_like(rec.labels))
    target = torch.zeros(n, dtype=dtype, device=h.device)  # u_t[y_t]
    expected = torch.zeros(n, dtype=dtype, device=h.device)  # p_t . u_t
    if d_weight is not None:
        target = target + (h * d_weight.to(dtype)[safe]).sum(-1)
    if d_bias is not None:
        target = target + d_bias.to(dtype)[safe]
    if not transform.identity:  # f'(l_t[y_t]) u_t[y_t]
        label_logits = (h * rec.weight[safe].to(dtype)).sum(-1)
        if rec.bias is not None:
            label_logits = label_logits + rec.bias[safe].to(dtype)
        target = target * transform.derivative(label_logits)
    cdt = compute_dtype(rec.hidden.dtype)  # the logits as the op computed them
    for c0, c1, w, b in vocab_tiles(rec.weight, rec.bias, 0, v, cdt):
        dw = d_weight[c0:c1].to(dtype) if d_weight is not None else None
        for rows in row_chunks(n):
            logits = tile_logits(rec.hidden[rows].to(cdt), w, b).to(dtype)
            p = torch.exp(transform(logits) - rec.lse[rows, None].to(dtype))
            if not transform.identity:
                p = p * transform.derivative(logits)
            u = torch.zeros_like(p)
            if dw is not None:
                u = u + h[rows] @ dw.T
            if d_bias is not None:
                u = u + d_bias[c0:c1].to(dtype)
            expected[rows] += (p * u).sum(-1)
    return rec.grad_logprobs.to(dtype) * (target - expected) * valid


def gradient_dot(kept: list[KeptUse], direction: dict[int, Tensor], rows: int, dtype: torch.dtype) -> Tensor:
    """``[R]`` <backward's row-r gradient, D> over the kept parameters (loss units: divide by a_r), where
    ``direction`` maps ``id(param)`` to D's block (missing parameters count as zero)."""
    out = None
    for use in kept:
        blocks = {attr: direction.get(id(p)) for attr, p in use.params.items()}
        if all(b is None for b in blocks.values()):
            continue
        if use.kind == "head":
            rec = use.record
            per_token = _head_dot(rec, blocks.get("weight"), blocks.get("bias"), dtype)
            r, w = rec.rows_shape
            part = per_token.reshape(r, w).sum(1)
        else:
            part = use.reducer.row_dot(use.module, use, blocks, dtype)
        if part.shape[0] < rows:
            part = torch.nn.functional.pad(part, (0, rows - part.shape[0]))
        out = part if out is None else out + part.to(out.device)
    if out is None:
        raise ValueError("the direction has no block for any tracked parameter")
    return out
