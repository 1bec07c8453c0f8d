"""The paper's per-token loop: the benchmark baseline of :func:`entangle_fast.profile.per_token_matrix`."""
from __future__ import annotations

import time

import torch
from torch import Tensor, nn

from entangle_fast.monitor.coverage import resolve_params
from entangle_fast.monitor.reductions import compute_dtype
from entangle_fast.profile.engine import _EvalMode, _pair_rows, _Row



def _row_token_logps(model: nn.Module, row: _Row) -> Tensor:
    """``[T]`` response-token log-probs of one unpadded row through the model's full logits (the plain way)."""
    logits = model(input_ids=row.ids[None]).logits[0, :-1]
    logits = logits if logits.dtype == torch.float64 else logits.float()
    return torch.log_softmax(logits, -1)[row.q, row.y]


def per_token_matrix_baseline(model: nn.Module, batch: dict, *, params=None, exclude=(),
                              memory_budget: int | None = None, timings: dict | None = None) -> Tensor:
    """K[t, s] the way the paper's heat-maps compute it: one ``retain_graph`` backward per response token through the
    plain logits, every tracked parameter's gradient flattened into one vector, then dot products. The benchmark
    baseline of :func:`per_token_matrix`; exact, slow, and parameter-sized in memory.

    Streaming: the chosen tokens' flattened gradients are kept (``[T_w, n_params]``), then each rejected token takes
    one backward and a matrix-vector product with them, so at most ``T_w + 1`` gradients are alive. When
    ``memory_budget`` (bytes) cannot hold all chosen gradients they are kept in blocks, and every extra block repeats
    the rejected backwards (``T_w + T_l * blocks`` backwards in all).

    Args:
        timings: when given, filled with ``chosen_block``, ``blocks``, ``backwards`` and the seconds spent in the
            chosen backwards (with the copy into the kept gradients), the rejected backwards (with the flattening)
            and the matrix-vector products (``chosen_seconds``, ``rejected_seconds``, ``dot_seconds``).

    Returns:
        ``[T_w, T_l]`` in float64 for a float64 model, else float32.
    """
    rows, _ = _pair_rows(batch)
    tracked = resolve_params(model, params, exclude)
    if not tracked:
        raise ValueError("no tracked parameters")
    cdt = compute_dtype(tracked[0].dtype)
    device = tracked[0].device
    sizes = [p.numel() for p in tracked]
    n_params = sum(sizes)
    tw, tl = len(rows[0].q), len(rows[1].q)
    row_bytes = n_params * (torch.finfo(cdt).bits // 8)
    block = tw if memory_budget is None else max(1, min(tw, int(memory_budget) // row_bytes))
    out = torch.zeros(tw, tl, dtype=cdt, device=device)
    clock = {"chosen_seconds": 0.0, "rejected_seconds": 0.0, "dot_seconds": 0.0}

    def tick():
        if timings is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    with _EvalMode(model), torch.enable_grad():
        lw = _row_token_logps(model, rows[0])
        ll = _row_token_logps(model, rows[1])
        kept = torch.empty(block, n_params, dtype=cdt, device=device)
        for b0 in range(0, tw, block):
            b1 = min(b0 + block, tw)
            start = tick()
            for i, t in enumerate(range(b0, b1)):
                grads = torch.autograd.grad(lw[t], tracked, retain_graph=True, allow_unused=True)
                offset = 0
                for g, size in zip(grads, sizes):
                    if g is None:
                        kept[i, offset: offset + size] = 0
                    else:
                        kept[i, offset: offset + size] = g.reshape(-1)
                    offset += size
            clock["chosen_seconds"] += tick() - start
            for s in range(tl):
                start = tick()
                grads = torch.autograd.grad(ll[s], tracked, retain_graph=True, allow_unused=True)
                flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).to(cdt)
                                  for g, p in zip(grads, tracked)])
                middle = tick()
                out[b0:b1, s] = kept[: b1 - b0] @ flat
                clock["rejected_seconds"] += middle - start
                clock["dot_seconds"] += tick() - middle
                del grads, flat
        del kept
    if timings is not None:
        blocks = -(-tw // block)
        timings.update(clock, chosen_block=block, blocks=blocks, backwards=tw + tl * blocks)
    return out
