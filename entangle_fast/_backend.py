"""The one place where ``impl="auto"|"triton"|"cuda"|"torch"`` is resolved to a backend.

Callers pass the user's ``impl`` string and the device of their inputs; nothing else in the package branches on
backends. ``"auto"`` picks Triton on CUDA devices when Triton imports, and the chunked PyTorch path otherwise (CPU,
or a CUDA machine without Triton). ``TRITON_INTERPRET=1`` lets the Triton backend run on CPU tensors (tests).
"""
from __future__ import annotations

import os

import torch

IMPLS = ("auto", "triton", "cuda", "torch")


def triton_available() -> bool:
    """True when ``entangle_fast.kernels`` imported Triton (checked lazily: no CUDA query at import)."""
    from entangle_fast import kernels

    return kernels.HAS_TRITON


def triton_interpreting() -> bool:
    """True when Triton kernels run under the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


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
        if not on_cuda and not triton_interpreting():
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
