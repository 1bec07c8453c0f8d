"""Tests of the ghost Gram (entangle_fast/ghost.py, kernels/ghost_gram.py).

Chain of trust: per-segment gradients from autograd (float64) -> `ghost_gram_reference` (float64) -> the PyTorch path
and the Triton kernel. The kernel's bar in a low-precision dtype is the reference run plainly in that dtype (the
tolerance rule of STYLE.md). Without CUDA the kernel runs under TRITON_INTERPRET=1 at small shapes.
"""

import os

import pytest
import torch

from helpers import assert_within

if not torch.cuda.is_available():
    # Must precede the first `import triton` in the process; tests/conftest.py does the same.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from entangle_fast.ghost import GhostGramResult, ghost_gram, ghost_gram_reference  # noqa: E402

try:
    import triton  # noqa: F401
except ImportError:
    HAS_TRITON = False
else:
    HAS_TRITON = True

requires_triton = pytest.mark.skipif(not HAS_TRITON, reason="requires_triton: Triton is not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
MODES = ["act", "bias", "ids"]

# Segment lengths around the interpreter's 32 x 32 tiles: 1, 7 and 129 (= 4 tiles + 1) tokens, one empty segment.
LENS = (7, 1, 129, 0, 20)
# Cross pairs both ways, squared norms (the kernel's symmetric shortcut), the empty segment, a repeated pair.
PAIRS = [[0, 2], [2, 2], [1, 1], [2, 0], [4, 2], [3, 0], [0, 0], [0, 2]]
# (d_in, d_out): a masked K-loop of one step and an unmasked one of four, each on both sides.
DIMS = [(3, 64), (64, 3)]


def _cu(lens):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int64, device=DEVICE)


def _inputs(lens, d_in, d_out, mode, dtype, seed, vocab=5):
    """Seeded packed inputs, rounded to `dtype`; a small vocabulary makes ids repeat within and across segments."""
    gen = torch.Generator().manual_seed(seed)
    n = sum(lens)
    a = torch.randn(n, d_in, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE) if mode == "act" else None
    gamma = torch.randn(n, d_out, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)
    ids = torch.randint(0, vocab, (n,), generator=gen).to(DEVICE) if mode == "ids" else None
    return a, gamma, ids


def _pairs(pairs):
    return torch.tensor(pairs, dtype=torch.int64, device=DEVICE)


def _double(t):
    return None if t is None else t.double()


_assert_close = assert_within


# ---------------------------------------------------------------------------------------------------------------------
# The reference against autograd: docs/math.md section 4's identity, in float64
# ---------------------------------------------------------------------------------------------------------------------


def _per_segment_grads(param, out, gamma, lens):
    """Gradient of s_r = sum_{tau in r} gamma_tau . out_tau w.r.t. `param`, one per segment, flattened."""
    grads, start = [], 0
    for n in lens:
        s_r = (gamma[start : start + n] * out[start : start + n]).sum()
        (g,) = torch.autograd.grad(s_r, param, retain_graph=True, allow_unused=True)
        grads.append(torch.zeros_like(param).flatten() if g is None else g.flatten())
        start += n
    return torch.stack(grads)


@pytest.mark.parametrize("mode", MODES)
def test_reference_equals_autograd_inner_products(mode):
    torch.manual_seed(0)
    d_in, d_out = 6, 5
    a, gamma, ids = _inputs(LENS, d_in, d_out, mode, torch.float64, seed=1)
    if mode == "ids":
        emb = torch.nn.Embedding(5, d_out, dtype=torch.float64, device=DEVICE)
        grads = _per_segment_grads(emb.weight, emb(ids), gamma, LENS)
    else:
        lin = torch.nn.Linear(d_in, d_out, dtype=torch.float64, device=DEVICE)
        x = torch.randn(sum(LENS), d_in, dtype=torch.float64, device=DEVICE)
        a = x if mode == "act" else None
        grads = _per_segment_grads(lin.weight if mode == "act" else lin.bias, lin(x), gamma, LENS)
    p = _pairs(PAIRS)
    want = (grads[p[:, 0]] * grads[p[:, 1]]).sum(dim=1)
    got = ghost_gram_reference(a, gamma, _cu(LENS), p, ids=ids).values
    assert got.dtype == torch.float64
    _assert_close(got, want, 1e-10 * want.abs().clamp_min(1e-3), f"reference vs autograd ({mode})")


# ---------------------------------------------------------------------------------------------------------------------
# The PyTorch path and the kernel against the reference
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_torch_path_float64(mode):
    a, gamma, ids = _inputs(LENS, 5, 4, mode, torch.float64, seed=2)
    cu, p = _cu(LENS), _pairs(PAIRS)
    got = ghost_gram(a, gamma, cu, p, ids=ids, positions=True, impl="torch")
    want = ghost_gram_reference(a, gamma, cu, p, ids=ids, positions=True)
    assert isinstance(got, GhostGramResult) and got.values.dtype == torch.float64
    scale = want.position_matrix.abs().sum(dim=(1, 2))
    _assert_close(got.values, want.values, 1e-13 * scale, f"torch path vs reference ({mode})")
    _assert_close(got.position_matrix, want.position_matrix, 1e-13 * scale.max(), f"torch path positions ({mode})")


def _truth_bar_scale(a, gamma, ids, cu, p):
    """(float64 truth, plain PyTorch in the inputs' dtype, sum of |terms| per pair) on the same rounded inputs."""
    truth = ghost_gram_reference(_double(a), _double(gamma), cu, p, ids=ids, positions=True)
    plain = ghost_gram_reference(a, gamma, cu, p, ids=ids).values
    return truth.values, plain, truth.position_matrix.abs().sum(dim=(1, 2))


def _tolerance(truth, plain, scale):
    """STYLE.md's rule: at most 2x plain PyTorch's own error, plus a margin of a few fp32 roundings of the terms."""
    return 2 * (plain.double() - truth).abs() + _fp32_bound(scale)


def _fp32_bound(scale):
    """A few fp32 roundings of the sum of |terms|: what fp32 accumulation of exactly held products allows."""
    return 8 * torch.finfo(torch.float32).eps * scale


# Every dtype x mode; activations also with d_in and d_out swapped (d_in is unused by the bias and ids modes).
TOL_CASES = [(dt, mode, DIMS[0]) for dt in DTYPES for mode in MODES] + [(dt, "act", DIMS[1]) for dt in DTYPES]


@requires_triton
@pytest.mark.parametrize("dtype, mode, dims", TOL_CASES, ids=lambda v: str(v).replace(", ", "x"))
def test_kernel_and_torch_path_within_tolerance(dtype, mode, dims):
    a, gamma, ids = _inputs(LENS, *dims, mode, dtype, seed=3)
    cu, p = _cu(LENS), _pairs(PAIRS)
    truth, plain, scale = _truth_bar_scale(a, gamma, ids, cu, p)
    for impl in ("triton", "torch"):
        got = ghost_gram(a, gamma, cu, p, ids=ids, impl=impl)
        assert got.values.dtype == torch.float32 and got.values.shape == (len(PAIRS),)
        assert got.position_matrix is None
        _assert_close(got.values, truth, _tolerance(truth, plain, scale), f"{impl} {dtype} {mode} {dims} vs float64")
        # Both paths accumulate in fp32 whatever the input dtype, and products of bf16/fp16 inputs are exact in fp32:
        # in low precision they must be far better than the rule's bar.
        _assert_close(got.values, truth, _fp32_bound(scale), f"{impl} {dtype} {mode} {dims}: fp32 accumulation")


@requires_triton
@pytest.mark.parametrize("mode", MODES)
def test_kernel_positions(mode):
    """positions=True: every element written (the launcher NaN-poisons its outputs and partial sums), zero padding,
    the terms match the reference's and total to values; two runs agree bit for bit."""
    a, gamma, ids = _inputs(LENS, 64, 3, mode, torch.float32, seed=4)
    cu, p = _cu(LENS), _pairs(PAIRS)
    got = ghost_gram(a, gamma, cu, p, ids=ids, positions=True, impl="triton")
    truth = ghost_gram_reference(_double(a), _double(gamma), cu, p, ids=ids, positions=True)
    pm = got.position_matrix
    assert pm.shape == truth.position_matrix.shape == (len(PAIRS), 129, 129)
    assert bool(torch.isfinite(pm).all()) and bool(torch.isfinite(got.values).all())
    lens = torch.tensor(LENS)
    for q, (i, j) in enumerate(PAIRS):
        assert bool((pm[q, int(lens[i]) :] == 0).all()) and bool((pm[q, :, int(lens[j]) :] == 0).all())
    scale = truth.position_matrix.abs().sum(dim=(1, 2))
    eps = torch.finfo(torch.float32).eps
    _assert_close(pm, truth.position_matrix, 8 * eps * scale.max(), f"kernel positions ({mode})")
    _assert_close(pm.double().sum(dim=(1, 2)), got.values, 8 * eps * scale, f"positions total vs values ({mode})")
    again = ghost_gram(a, gamma, cu, p, ids=ids, impl="triton")
    _assert_close(again.values, truth.values, 8 * eps * scale, f"kernel values without positions ({mode})")
    assert torch.equal(again.values, ghost_gram(a, gamma, cu, p, ids=ids, impl="triton").values), "not deterministic"


@pytest.mark.parametrize("impl", [pytest.param("triton", marks=requires_triton), "torch"])
def test_no_pairs_and_empty_segments(impl):
    a, gamma, _ = _inputs((0, 3, 0), 4, 4, "act", torch.float32, seed=5)
    cu = _cu((0, 3, 0))
    none = ghost_gram(a, gamma, cu, _pairs([]).reshape(0, 2), positions=True, impl=impl)
    assert none.values.shape == (0,) and none.position_matrix.shape == (0, 0, 0)
    empty = ghost_gram(a, gamma, cu, _pairs([[0, 2], [2, 0]]), positions=True, impl=impl)
    assert torch.equal(empty.values, torch.zeros(2, device=DEVICE)) and empty.position_matrix.shape == (2, 0, 0)


# ---------------------------------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case, name",
    [
        ("a_rows", "a"),
        ("ids_rows", "ids"),
        ("cu_not_monotone", "cu_seqlens"),
        ("cu_not_ending_at_S", "cu_seqlens"),
        ("cu_not_starting_at_0", "cu_seqlens"),
        ("pair_too_big", "seg_pairs"),
        ("pair_negative", "seg_pairs"),
        ("pairs_shape", "seg_pairs"),
        ("a_and_ids", "ids"),
    ],
)
def test_bad_inputs_raise_value_error_naming_the_argument(case, name):
    a, gamma, _ = _inputs((2, 3), 4, 5, "act", torch.float32, seed=6)
    ids = None
    cu, p = _cu((2, 3)), _pairs([[0, 1]])
    if case == "a_rows":
        a = a[:-1]
    elif case == "ids_rows":
        a, ids = None, torch.zeros(4, dtype=torch.int64, device=DEVICE)
    elif case == "cu_not_monotone":
        cu = torch.tensor([0, 4, 2, 5], dtype=torch.int64, device=DEVICE)
    elif case == "cu_not_ending_at_S":
        cu = torch.tensor([0, 2, 4], dtype=torch.int64, device=DEVICE)
    elif case == "cu_not_starting_at_0":
        cu = torch.tensor([1, 2, 5], dtype=torch.int64, device=DEVICE)
    elif case == "pair_too_big":
        p = _pairs([[0, 1], [2, 0]])
    elif case == "pair_negative":
        p = _pairs([[0, -1]])
    elif case == "pairs_shape":
        p = _pairs([0, 1])
    elif case == "a_and_ids":
        ids = torch.zeros(5, dtype=torch.int64, device=DEVICE)
    for fn in (ghost_gram, ghost_gram_reference):
        with pytest.raises(ValueError, match=name):
            fn(a, gamma, cu, p, ids=ids)
