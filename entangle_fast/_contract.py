"""Argument checks of the device-launcher contracts, shared by every backend's launchers.

The Triton launchers (``kernels/logprob.py``) and the CUDA C++ ones (``entangle_fast/_cuda.py``) promise the same
contract; they validate it here, so the two cannot drift. Each check raises ValueError naming the argument.
Backend-specific placement rules (CPU tensors under the Triton interpreter, CUDA tensors for ``impl="cuda"``) stay with
the launchers.
"""
from __future__ import annotations

import torch
from torch import Tensor

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _shape(t) -> tuple:
    return tuple(getattr(t, "shape", ()))


def check_fp32(name: str, t, shape) -> None:
    if not isinstance(t, Tensor) or t.dtype != torch.float32 or _shape(t) != tuple(shape):
        raise ValueError(f"{name} must be float32 {list(shape)}, got {getattr(t, 'dtype', None)} {list(_shape(t))}")


def check_same_device_contiguous(named: list[tuple[str, Tensor]]) -> torch.device:
    """Every tensor contiguous and on the device of the first; returns that device."""
    device = named[0][1].device
    for name, t in named:
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, expected {device} like {named[0][0]}")
    return device


def check_logprob_inputs(hidden, weight, labels, bias) -> tuple[int, int, int, list[tuple[str, Tensor]]]:
    """The inputs of ``logprob_fwd``/``logprob_bwd``: returns ``(N, V, d, named tensors)``."""
    if not isinstance(hidden, Tensor) or hidden.dim() != 2:
        raise ValueError(f"hidden must be a 2-D tensor [N, d], got {getattr(hidden, 'shape', type(hidden))}")
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D tensor [V, d], got {getattr(weight, 'shape', type(weight))}")
    n, d = hidden.shape
    v = weight.shape[0]
    if weight.shape[1] != d:
        raise ValueError(f"weight must be [V, {d}] to match hidden [N, {d}], got {tuple(weight.shape)}")
    if v == 0 or d == 0:
        raise ValueError(f"weight must have V >= 1 and d >= 1, got {tuple(weight.shape)}")
    if hidden.dtype not in KERNEL_DTYPES:
        raise ValueError(f"hidden must be float32, bfloat16 or float16, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    if not isinstance(labels, Tensor) or labels.dtype != torch.int64 or _shape(labels) != (n,):
        raise ValueError(f"labels must be int64 [{n}], got {getattr(labels, 'dtype', None)} {_shape(labels)}")
    named = [("hidden", hidden), ("weight", weight), ("labels", labels)]
    if bias is not None:
        if not isinstance(bias, Tensor) or _shape(bias) != (v,) or bias.dtype != hidden.dtype:
            raise ValueError(f"bias must be {hidden.dtype} [{v}] or None, got {getattr(bias, 'dtype', None)} "
                             f"{_shape(bias)}")
        named.append(("bias", bias))
    return n, v, d, named


def check_logprob_bwd_buffers(n, v, d, named, *, lse, grad_logprobs, grad_hidden_unscaled, grad_weight, grad_bias,
                              vocab_start, vocab_end, probs_out, delta_out=None) -> int:
    """The buffers and vocabulary range of ``logprob_bwd``; appends them to ``named`` and returns the range width.

    ``grad_weight`` is ``[V, d]`` (row v holds vocabulary entry v) or ``[vocab_end - vocab_start, d]`` (row 0 holds
    ``vocab_start``): a buffer for the range only, so a caller can accumulate a low-precision weight's gradient in
    fp32 one vocabulary chunk at a time (see :func:`grad_weight_row0`). ``probs_out`` and ``delta_out`` (the
    transformed deltas f'(l) (e_y - p)) are ``[N, vocab_end - vocab_start]`` or None."""
    if not (isinstance(vocab_start, int) and isinstance(vocab_end, int) and 0 <= vocab_start <= vocab_end <= v):
        raise ValueError(f"vocab_start, vocab_end must be ints with 0 <= start <= end <= V={v}, "
                         f"got {vocab_start}, {vocab_end}")
    width = vocab_end - vocab_start
    gw_rows = width if grad_weight is not None and grad_weight.ndim == 2 and grad_weight.shape[0] == width else v
    buffers = [("lse", lse, (n,)), ("grad_logprobs", grad_logprobs, (n,)),
               ("grad_hidden_unscaled", grad_hidden_unscaled, (n, d)), ("grad_weight", grad_weight, (gw_rows, d)),
               ("grad_bias", grad_bias, (v,)), ("probs_out", probs_out, (n, width)),
               ("delta_out", delta_out, (n, width))]
    for name, t, shape in buffers:
        if t is None and name in ("grad_weight", "grad_bias", "probs_out", "delta_out"):
            continue
        check_fp32(name, t, shape)
        named.append((name, t))
    return width


def grad_weight_row0(grad_weight, vocab_start: int, vocab_end: int) -> int:
    """The vocabulary entry held by row 0 of a checked ``grad_weight``: ``vocab_start`` for a range-sized buffer,
    else 0 (the two agree when the range is the whole vocabulary)."""
    if grad_weight is None:
        return 0
    return vocab_start if grad_weight.shape[0] == vocab_end - vocab_start else 0
