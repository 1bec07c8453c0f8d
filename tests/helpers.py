"""Shared test helpers: STYLE.md's tolerance rule and the named skips.

A kernel in a low precision must be no less exact than plain PyTorch in that precision: both are compared against a
float64 ground truth, and the kernel's error may be at most ``factor`` times PyTorch's own plus a small margin.
"""
from __future__ import annotations

import pytest
import torch

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="requires_cuda: no CUDA device")


def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


requires_triton = pytest.mark.skipif(not triton_importable(), reason="requires_triton: triton is not installed")


def backends():
    """Backends a CPU run can exercise: the PyTorch path always, Triton through the interpreter (or compiled on CUDA)."""
    return ["torch", pytest.param("triton", marks=requires_triton)]



def assert_close_to_reference(actual, expected64, torch_lowp, *, factor: float = 2.0, margin: float = 1e-6, name="value"):
    """Assert ``|actual - expected64| <= factor * |torch_lowp - expected64| + margin`` in the max norm.

    Prints the first index where ``actual`` deviates most and the error ratio when it fails.
    """
    actual, expected64, torch_lowp = (t.detach().double() for t in (actual, expected64, torch_lowp))
    if actual.shape != expected64.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected64.shape)}")
    if actual.numel() == 0:
        return
    assert not torch.isnan(actual).any(), f"{name}: NaN at {first_index(torch.isnan(actual))}"
    err = (actual - expected64).abs()
    ours, theirs = err.max().item(), (torch_lowp - expected64).abs().max().item()
    bound = factor * theirs + margin
    if ours > bound:
        idx = first_index(err == err.max())
        raise AssertionError(
            f"{name}: max error {ours:.3e} at {idx} exceeds {factor}x PyTorch's own error {theirs:.3e} + {margin:g} "
            f"(ratio {ours / max(theirs, 1e-300):.2f})"
        )


def assert_exact64(actual, expected, *, rtol: float = 1e-9, name="value"):
    """float64 agreement to ``rtol`` relative to the largest magnitude of ``expected``."""
    actual, expected = actual.detach().double(), expected.detach().double()
    scale = max(expected.abs().max().item() if expected.numel() else 0.0, 1e-12)
    err = (actual - expected).abs()
    if err.numel() and err.max().item() > rtol * scale:
        idx = first_index(err == err.max())
        raise AssertionError(f"{name}: max error {err.max().item():.3e} at {idx} > {rtol:g} x scale {scale:.3e}")


def first_index(mask: torch.Tensor):
    nz = torch.nonzero(mask)
    return tuple(nz[0].tolist()) if len(nz) else None
