"""The one place where a backend is chosen: ``impl="auto"|"triton"|"cuda"|"torch"`` -> a name -> a launcher.

Callers pass the user's ``impl`` string and the device and dtype of their inputs to :func:`resolve_impl`, then ask
:func:`launcher` for the function of their op on that backend; nothing else in the package branches on backends.
``"auto"`` picks Triton on CUDA devices when Triton imports, and the chunked PyTorch path otherwise (CPU, or a CUDA
machine without Triton). ``TRITON_INTERPRET=1`` lets the Triton backend run on CPU tensors (tests).

The launcher table maps ``(op, impl)`` to ``"module:function"``; each op's public module registers its row with
:func:`register` (its PyTorch path under ``entangle_fast/_torch/``, its Triton launcher under ``kernels/``, its CUDA
C++ launcher in ``entangle_fast/_cuda.py``). Modules are imported on first use, so importing the package never needs
Triton or CUDA. Every launcher of one op shares one contract, checked in ``entangle_fast/_contract.py``.

Ops: ``logprob_fwd``/``logprob_bwd`` (``entangle_fast.logprobs``), ``ghost_gram_fwd`` (``entangle_fast.ghost``),
``pair_wgrad`` (``entangle_fast.bookkeeping``).
"""
from __future__ import annotations

import functools

import importlib
import os
from typing import Callable

import torch

IMPLS = ("auto", "triton", "cuda", "torch")
BACKENDS = ("torch", "triton", "cuda")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of every op for inputs of ``dtype``: float64 for float64 (the reference precision),
    float32 for float32, bfloat16 and float16."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def interpreting() -> bool:
    """True when Triton kernels run under the CPU interpreter (``TRITON_INTERPRET=1``), read at each call."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    """True when ``entangle_fast.kernels`` imported Triton (checked lazily: no CUDA query at import)."""
    from entangle_fast import kernels

    return kernels.HAS_TRITON


def resolve_impl(impl: str, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """Map a user's ``impl`` to ``"triton"``, ``"cuda"`` or ``"torch"`` for tensors on ``device`` of ``dtype``.

    float64 always runs on the PyTorch path (it is the reference precision; the kernels are fp32/bf16/fp16).

    Raises:
        ValueError: unknown ``impl``.
        RuntimeError: an explicit backend that cannot run here, with the reason.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    on_cuda = device.type == "cuda"
    if impl == "auto":
        return "triton" if on_cuda and dtype != torch.float64 and triton_available() else "torch"
    if impl in ("triton", "cuda") and dtype == torch.float64:
        raise ValueError(f"impl={impl!r} supports float32, bfloat16 and float16 inputs; got float64 (use impl='torch')")
    if impl == "triton":
        if not triton_available():
            raise RuntimeError("impl='triton' needs the `triton` package, which is not importable here")
        if not on_cuda and not interpreting():
            raise RuntimeError(
                f"impl='triton' needs CUDA tensors (got device {device}); set TRITON_INTERPRET=1 to run the "
                "kernels on CPU through the Triton interpreter (slow, for tests)"
            )
        return "triton"
    if impl == "cuda":
        if not on_cuda:
            raise RuntimeError(f"impl='cuda' needs CUDA tensors, got device {device}")
        from entangle_fast._cuda import cuda_available

        ok, reason = cuda_available(device)
        if not ok:
            raise RuntimeError(f"impl='cuda' cannot run here: {reason}")
        return "cuda"
    return "torch"


# (op, backend) -> "module:function", filled by register(); the functions, once imported.
_TABLE: dict[tuple[str, str], str] = {}
_LOADED: dict[tuple[str, str], Callable] = {}
# The public modules that register their ops, imported by launcher() when asked for an op not yet registered.
OP_MODULES = ("entangle_fast.logprobs", "entangle_fast.ghost", "entangle_fast.bookkeeping")


def register(op: str, *, torch: str, triton: str, cuda: str) -> None:
    """Record where ``op``'s launcher lives on each backend, as ``"module:function"`` (imported on first use)."""
    for backend, target in (("torch", torch), ("triton", triton), ("cuda", cuda)):
        module, sep, name = target.partition(":")
        if not sep or not module or not name:
            raise ValueError(f"{op} on {backend}: expected 'module:function', got {target!r}")
        _TABLE[(op, backend)] = target


def launcher(op: str, backend: str) -> Callable:
    """The launcher of ``op`` on a resolved ``backend`` (a :func:`resolve_impl` result), importing its module on first
    use.

    Raises:
        KeyError: ``op`` was never registered or ``backend`` is not one of ``BACKENDS``, naming what is.
    """
    key = (op, backend)
    fn = _LOADED.get(key)
    if fn is not None:
        return fn
    if key not in _TABLE:
        for module in OP_MODULES:
            importlib.import_module(module)
    if key not in _TABLE:
        ops = sorted({o for o, _ in _TABLE})
        raise KeyError(f"no launcher for op {op!r} on backend {backend!r}; registered ops: {ops}, "
                       f"backends: {BACKENDS}")
    module, _, name = _TABLE[key].partition(":")
    fn = getattr(importlib.import_module(module), name)
    _LOADED[key] = fn
    return fn


def without_autocast(fn):
    """An autograd Function's ``forward`` or ``backward`` run with autocast off when the caller's region has it on
    (on CPU the backward runs in the caller's thread, inside its autocast region): the op computes in the dtypes of
    its inputs, which callers cast themselves."""
    @functools.wraps(fn)
    def run(ctx, *args):
        device = "cpu"
        for a in args:
            if isinstance(a, torch.Tensor):
                device = a.device.type
                break
        if torch.is_autocast_enabled(device):
            with torch.autocast(device, enabled=False):
                return fn(ctx, *args)
        return fn(ctx, *args)

    return run
