"""Argument checks of the device-launcher contracts, shared by every backend's launchers.

The Triton launchers (``kernels/``) and the CUDA C++ ones (``entangle_fast/_cuda.py``) promise the same contracts as
the PyTorch paths (``entangle_fast/_torch/``); the device launchers validate them here, so the backends cannot drift:
``logprob_fwd``/``logprob_bwd`` (:func:`check_logprob_inputs`, :func:`check_logprob_bwd_buffers`), ``ghost_gram_fwd``
(:func:`check_ghost_gram_inputs`), ``pair_wgrad`` (:func:`check_pair_wgrad_inputs`), and where each backend needs its
tensors (:func:`check_placement`). Each check raises ValueError naming the argument. Index contents (monotone offsets,
pairs in range) are checked once by the public functions, before any backend is picked.
"""
from __future__ import annotations

import torch
from torch import Tensor

from entangle_fast._backend import interpreting

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


def check_placement(named: list[tuple[str, Tensor | None]], backend: str) -> torch.device:
    """Every given tensor contiguous and on one device that ``backend`` (``"triton"`` or ``"cuda"``) can run on: CUDA,
    or the CPU under the Triton interpreter. ``None`` entries (absent optional tensors) are skipped. Returns the
    device."""
    device = check_same_device_contiguous([(name, t) for name, t in named if t is not None])
    if backend == "cuda" and device.type != "cuda":
        raise ValueError(f"{named[0][0]} is on {device}: impl='cuda' needs CUDA tensors")
    if backend == "triton" and device.type == "cpu" and not interpreting():
        raise ValueError(f"{named[0][0]} is on the CPU: Triton needs a GPU tensor, or TRITON_INTERPRET=1 set before "
                         "triton is imported")
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


def check_transform(scale, softcap) -> tuple[float, float]:
    """The logit transform's launcher scalars (``entangle_fast.logprobs.transform_args``): a finite nonzero scale, a
    finite soft-cap >= 0 (0 = none)."""
    scale, softcap = float(scale), float(softcap)
    if not (scale == scale and abs(scale) != float("inf") and scale != 0.0):
        raise ValueError(f"scale must be a finite nonzero number, got {scale!r}")
    if not (0.0 <= softcap < float("inf")):
        raise ValueError(f"softcap must be a finite number >= 0 (0 = none), got {softcap!r}")
    return scale, softcap


def check_logprob_bwd_call(backend: str, hidden, weight, labels, bias, **buffers) -> tuple[int, int]:
    """The whole contract of one ``logprob_bwd`` launch on ``backend`` (inputs, buffers and range, placement), for
    the Triton and CUDA launchers alike. Returns ``(N, range width)``."""
    n, v, d, named = check_logprob_inputs(hidden, weight, labels, bias)
    width = check_logprob_bwd_buffers(n, v, d, named, **buffers)
    check_placement(named, backend)
    return n, width


def grad_weight_row0(grad_weight, vocab_start: int, vocab_end: int) -> int:
    """The vocabulary entry held by row 0 of a checked ``grad_weight``: ``vocab_start`` for a range-sized buffer,
    else 0 (the two agree when the range is the whole vocabulary)."""
    if grad_weight is None:
        return 0
    return vocab_start if grad_weight.shape[0] == vocab_end - vocab_start else 0


def check_ghost_gram_inputs(a, gamma, ids, cu_seqlens, seg_pairs) -> list[tuple[str, Tensor | None]]:
    """The inputs of ``ghost_gram_fwd``: gamma ``[S, d_out]`` and a ``[S, d_in]`` (or None) in one kernel dtype; ids,
    cu_seqlens and seg_pairs int64 (their values are checked by :func:`entangle_fast.ghost.ghost_gram`). Returns the
    named tensors, gamma first, for :func:`check_placement`."""
    if not isinstance(gamma, Tensor) or gamma.dtype not in KERNEL_DTYPES or gamma.dim() != 2:
        raise ValueError(f"gamma must be a 2-D float32, bfloat16 or float16 tensor [S, d_out], got "
                         f"{getattr(gamma, 'dtype', type(gamma))} {list(_shape(gamma))}")
    n_tok = gamma.shape[0]
    if a is not None and (not isinstance(a, Tensor) or a.dtype != gamma.dtype or _shape(a)[:1] != (n_tok,)
                          or a.dim() != 2):
        raise ValueError(f"a must be {gamma.dtype} [{n_tok}, d_in] like gamma, or None; got "
                         f"{getattr(a, 'dtype', type(a))} {list(_shape(a))}")
    for name, t, ndim in (("ids", ids, 1), ("cu_seqlens", cu_seqlens, 1), ("seg_pairs", seg_pairs, 2)):
        if t is not None and (not isinstance(t, Tensor) or t.dtype != torch.int64 or t.dim() != ndim):
            raise ValueError(f"{name} must be an int64 {ndim}-D tensor, got {getattr(t, 'dtype', type(t))} "
                             f"{list(_shape(t))}")
    if cu_seqlens is None or seg_pairs is None:
        raise ValueError("cu_seqlens and seg_pairs are required")
    return [("gamma", gamma), ("a", a), ("ids", ids), ("cu_seqlens", cu_seqlens), ("seg_pairs", seg_pairs)]


def check_pair_wgrad_inputs(a, gamma, cu_seqlens, pairs, fold, unpaired, out_dtype) -> list[tuple[str, Tensor]]:
    """The inputs of ``pair_wgrad``: a ``[S, d_in]`` and gamma ``[S, d_out]`` in one kernel dtype, ``out_dtype`` a
    kernel dtype; cu_seqlens int64 ``[R + 1]``, pairs int64 ``[B, 2]``, fold int32 ``[B, 2]``, unpaired int64 ``[U]``
    (planned by :func:`entangle_fast.bookkeeping.pair_plan`). Returns the named tensors, gamma first, for
    :func:`check_placement`."""
    for name, t in (("gamma", gamma), ("a", a)):
        if not isinstance(t, Tensor) or t.dtype not in KERNEL_DTYPES or t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D float32, bfloat16 or float16 tensor [S, d], got "
                             f"{getattr(t, 'dtype', type(t))} {list(_shape(t))}")
    if a.dtype != gamma.dtype:
        raise ValueError(f"a dtype {a.dtype} must match gamma dtype {gamma.dtype}")
    if a.shape[0] != gamma.shape[0]:
        raise ValueError(f"a has {a.shape[0]} tokens but gamma has {gamma.shape[0]}")
    if out_dtype not in KERNEL_DTYPES:
        raise ValueError(f"out_dtype must be float32, bfloat16 or float16, got {out_dtype}")
    n_pairs = _shape(pairs)[0] if _shape(pairs) else -1
    index_tensors = (("cu_seqlens", cu_seqlens, torch.int64, None), ("pairs", pairs, torch.int64, (n_pairs, 2)),
                     ("fold", fold, torch.int32, (n_pairs, 2)), ("unpaired", unpaired, torch.int64, None))
    for name, t, dtype, shape in index_tensors:
        if not isinstance(t, Tensor) or t.dtype != dtype or (t.dim() != 1 if shape is None else _shape(t) != shape):
            want = "[n]" if shape is None else list(shape)
            raise ValueError(f"{name} must be {dtype} {want}, got {getattr(t, 'dtype', type(t))} {list(_shape(t))}")
    return [("gamma", gamma), ("a", a), ("cu_seqlens", cu_seqlens), ("pairs", pairs), ("fold", fold),
            ("unpaired", unpaired)]


def check_segments(cu_seqlens, n_tok: int, count: str = "R") -> Tensor:
    """Host copy of ``cu_seqlens [count + 1]``, int64 offsets from 0 to ``n_tok`` (S), non-decreasing: one host sync
    for every check (the kernels trust the offsets). Raises ValueError naming ``cu_seqlens``."""
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dtype != torch.int64 or cu_seqlens.ndim != 1 \
            or cu_seqlens.shape[0] < 1:
        raise ValueError(f"cu_seqlens must be an int64 tensor [{count} + 1], got {getattr(cu_seqlens, 'dtype', None)} "
                         f"{_shape(cu_seqlens)}")
    cu = cu_seqlens.cpu()
    if int(cu[0]) != 0 or int(cu[-1]) != n_tok:
        raise ValueError(f"cu_seqlens must start at 0 and end at S = {n_tok}, got {int(cu[0])} ... {int(cu[-1])}")
    steps = cu[1:] - cu[:-1]
    if bool((steps < 0).any()):
        k = int(torch.nonzero(steps < 0)[0])
        raise ValueError(f"cu_seqlens must be non-decreasing; cu_seqlens[{k + 1}] = {int(cu[k + 1])} < "
                         f"cu_seqlens[{k}] = {int(cu[k])}")
    return cu


def check_index_pairs(pairs, n: int, name: str = "pairs", count: str = "R") -> Tensor:
    """Host copy of ``pairs [P, 2]``, int64 indices in ``[0, n)``. Raises ValueError naming ``name``."""
    if not isinstance(pairs, Tensor) or pairs.dtype != torch.int64 or pairs.ndim != 2 or pairs.shape[1] != 2:
        raise ValueError(f"{name} must be an int64 tensor [P, 2], got {getattr(pairs, 'dtype', None)} "
                         f"{_shape(pairs)}")
    host = pairs.cpu()
    bad = (host < 0) | (host >= n)
    if bool(bad.any()):
        p, c = (int(x) for x in torch.nonzero(bad)[0])
        raise ValueError(f"{name} must index in [0, {count}={n}); {name}[{p}, {c}] = {int(host[p, c])}")
    return host
