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



def small_vocab_tiles(monkeypatch) -> None:
    """Several vocabulary tiles, row chunks and statistics chunks of the PyTorch log-prob path even at test sizes
    (V = 1001 is a multiple of none of them)."""
    import entangle_fast._torch.logprob as torch_lp
    import entangle_fast.logprobs as lp_mod

    monkeypatch.setattr(torch_lp, "TORCH_VOCAB_TILE", 64)
    monkeypatch.setattr(torch_lp, "TORCH_TILE_ELEMENTS", 64 * 8)
    monkeypatch.setattr(lp_mod, "STATS_CHUNK_ELEMENTS", 64 * 40)


def left_padded(batch: dict) -> dict:
    """The rows of a right-padded batch rolled so that their padding comes first (in place; returned)."""
    for r in range(batch["input_ids"].shape[0]):
        shift = int((batch["attention_mask"][r] == 0).sum())
        for key in batch:
            batch[key][r] = torch.roll(batch[key][r], shift)
    return batch


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


def assert_within(got, want, tol, what):
    """|got - want| <= tol elementwise (tol a scalar or a tensor); the message names the first failing index and the
    error ratio."""
    err = (got.double() - want.double()).abs()
    tol = torch.as_tensor(tol, dtype=torch.float64, device=err.device).expand_as(err)
    bad = ~(err <= tol)  # NaN fails
    if bool(bad.any()):
        idx = tuple(int(i) for i in torch.nonzero(bad)[0])
        raise AssertionError(f"{what}: first mismatch at {list(idx)}: got {float(got[idx])}, want {float(want[idx])}, "
                             f"error {float(err[idx]):.3e} = {float(err[idx] / tol[idx]):.2f} x tolerance "
                             f"{float(tol[idx]):.3e}")


def first_index(mask: torch.Tensor):
    nz = torch.nonzero(mask)
    return tuple(nz[0].tolist()) if len(nz) else None


def launcher_inputs(n, v, d, dtype, with_bias, seed, *, device, ignore_index=-100):
    """Seeded inputs of the ``logprob_fwd``/``logprob_bwd`` launcher contract, logits of a few units.

    Returns ``(hidden [N, d], weight [V, d], bias [V] | None, labels [N], grad fp32 [N])`` on ``device``; rows 0,
    N // 2 and N - 1 are ignored when N > 2. The float inputs are rounded to ``dtype`` first, so a float64 truth built
    from them measures the computation, not the cast.
    """
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen, dtype=torch.float64)
    weight = torch.randn(v, d, generator=gen, dtype=torch.float64) * (2.0 / d**0.5)
    bias = torch.randn(v, generator=gen, dtype=torch.float64) * 0.5 if with_bias else None
    labels = torch.randint(0, v, (n,), generator=gen)
    if n > 2:
        labels[[0, n // 2, n - 1]] = ignore_index
    grad = torch.randn(n, generator=gen, dtype=torch.float64)

    def cast(t):
        return None if t is None else t.to(dtype).to(device).contiguous()

    return cast(hidden), cast(weight), cast(bias), labels.to(device), grad.to(torch.float32).to(device)


def launcher_reference(h, w, b, labels, g, ignore_index=-100):
    """The launcher contract's outputs through ``linear_logprobs_reference``, in ``h``'s dtype (upcast to fp32).

    Returns ``(logprobs, dL/dh, dL/dW, dL/db | None, r = dl/dh unscaled, p)`` for L = sum g * logprobs, with ``p`` the
    softmax probabilities, zero on ignored rows.
    """
    from entangle_fast.reference import linear_logprobs_reference

    leaves = [t.detach().clone().requires_grad_(True) for t in (h, w, b) if t is not None]
    out = linear_logprobs_reference(leaves[0], leaves[1], labels, leaves[2] if b is not None else None, ignore_index)
    grads = torch.autograd.grad((g.to(out.dtype) * out).sum(), leaves, retain_graph=True)
    (r,) = torch.autograd.grad(out.sum(), leaves[:1])
    logits = (h @ w.T + (b if b is not None else 0)).to(out.dtype)
    p = torch.softmax(logits, dim=-1) * (labels != ignore_index)[:, None]
    return out.detach(), grads[0], grads[1], grads[2] if b is not None else None, r, p
