"""Tests of the pair-by-pair weight gradient (entangle_fast/bookkeeping.py, kernels/pair_wgrad.py, csrc/pair_wgrad.cu).

Chain of trust: per-row gradients of an nn.Linear from autograd (float64) -> `pair_weight_grad_reference` (float64) ->
the PyTorch path, the Triton kernel (TRITON_INTERPRET=1 without a GPU) and the CUDA kernel (`requires_cuda`). In a low
precision the bar is the reference run plainly in that dtype (STYLE.md's tolerance rule). The CUDA source is
compile-checked with nvcc for sm_80 and sm_90 on any machine that has nvcc.
"""
import os
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Must precede the first `import triton` in the process; tests/conftest.py does the same.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from entangle_fast import _cuda  # noqa: E402
from entangle_fast.bookkeeping import (  # noqa: E402
    PairWeightGrad,
    pair_plan,
    pair_weight_grad,
    pair_weight_grad_dense,
)
from entangle_fast.reference import pair_weight_grad_reference  # noqa: E402
from helpers import assert_within, requires_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
STATS = ("inner", "chosen", "rejected")

requires_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and _cuda.cuda_available()[0]),
    reason="requires_cuda: no CUDA device (or the CUDA backend cannot be built here)",
)

# Rows of 7, 0, 129 (= 8 interpreter K-steps + 1), 1, 20, 3, 11 and 0 tokens.
LENS = (7, 0, 129, 1, 20, 3, 11, 0)
# Row 2 in three pairs (once against itself), row 0 in two, the empty row 1 paired; rows 6 and 7 in no pair.
PAIRS = [[0, 2], [2, 4], [1, 3], [2, 2], [5, 0]]
# (d_in, d_out): 7 and 129 on both sides; with a bias, d_in = 7 puts the ones column inside the first tile and
# d_in = 129 inside a partial last one.
DIMS = [(7, 129), (129, 7)]


def _cu(lens):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int64, device=DEVICE)


def _pairs(pairs):
    return torch.tensor(pairs, dtype=torch.int64, device=DEVICE).reshape(-1, 2)


def _inputs(lens, d_in, d_out, dtype, seed):
    """Seeded packed (a, gamma), rounded to `dtype` first so a float64 truth measures the computation, not the cast."""
    gen = torch.Generator().manual_seed(seed)
    n = sum(lens)
    a = torch.randn(n, d_in, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)
    gamma = torch.randn(n, d_out, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)
    return a, gamma


_assert_close = assert_within


# ---------------------------------------------------------------------------------------------------------------------
# The reference against autograd (float64)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_reference_equals_autograd(bias):
    """Per-row gradients of s_r = sum_{tau in r} gamma_tau . (W a_tau + c) from autograd: their sum is grad_weight and
    their inner products (W and c together when bias) the three statistics."""
    d_in, d_out = 6, 5
    a, gamma = _inputs(LENS, d_in, d_out, torch.float64, seed=1)
    lin = torch.nn.Linear(d_in, d_out, dtype=torch.float64, device=DEVICE)
    out = lin(a)
    params = [lin.weight, lin.bias] if bias else [lin.weight]
    cu = _cu(LENS).tolist()
    rows = []
    for s, e in zip(cu[:-1], cu[1:]):
        grads = torch.autograd.grad((gamma[s:e] * out[s:e]).sum(), params, retain_graph=True)
        rows.append(torch.cat([g.flatten() for g in grads]))
    rows = torch.stack(rows)
    p = _pairs(PAIRS)
    got = pair_weight_grad_reference(a, gamma, _cu(LENS), p, bias=bias)
    assert isinstance(got, PairWeightGrad) and got.inner.dtype == torch.float64
    total = rows.sum(dim=0)
    scale = rows.abs().max()
    _assert_close(got.grad_weight.flatten(), total[: d_in * d_out], 1e-12 * scale, "reference grad_weight")
    if bias:
        _assert_close(got.grad_bias, total[d_in * d_out:], 1e-12 * scale, "reference grad_bias")
    else:
        assert got.grad_bias is None
    w, l = rows[p[:, 0]], rows[p[:, 1]]
    for name, want in zip(STATS, ((w * l).sum(1), (w * w).sum(1), (l * l).sum(1))):
        _assert_close(getattr(got, name), want, 1e-12 * want.abs().clamp_min(1.0), f"reference {name}")


def test_pair_plan_folds_each_row_once():
    fold, unpaired = pair_plan(torch.tensor([0, *torch.tensor(LENS).cumsum(0).tolist()]), torch.tensor(PAIRS))
    # Flattened pairs 0,2 | 2,4 | 1,3 | 2,2 | 5,0: first appearances of 0, 2, 4, 1, 3, 5.
    assert fold.tolist() == [[1, 1], [0, 1], [1, 1], [0, 0], [1, 0]]
    assert unpaired.tolist() == [6]  # row 7 is empty: nothing to add


# ---------------------------------------------------------------------------------------------------------------------
# Every backend against the reference
# ---------------------------------------------------------------------------------------------------------------------


def _truth_plain_scale(a, gamma, cu, p, bias):
    """(float64 truth, plain PyTorch in the inputs' dtype, the same quantities over |a|, |gamma|): the last bounds
    every sum's terms in absolute value, the scale of fp32 rounding."""
    truth = pair_weight_grad_reference(a.double(), gamma.double(), cu, p, bias=bias)
    plain = pair_weight_grad_reference(a, gamma, cu, p, bias=bias)
    scale = pair_weight_grad_reference(a.double().abs(), gamma.double().abs(), cu, p, bias=bias)
    return truth, plain, scale


def _check(got: PairWeightGrad, truth, plain, scale, out_dtype, what):
    """STYLE.md's rule elementwise: at most 2x plain PyTorch's own error plus a margin of a few fp32 roundings of the
    sums' absolute terms (and the rounding of grad_weight to out_dtype, which plain PyTorch does as well)."""
    eps32 = torch.finfo(torch.float32).eps
    half_ulp = torch.finfo(out_dtype).eps / 2
    parts = [("grad_weight", got.grad_weight, truth.grad_weight, plain.grad_weight, scale.grad_weight)]
    if truth.grad_bias is not None:
        parts.append(("grad_bias", got.grad_bias, truth.grad_bias, plain.grad_bias, scale.grad_bias))
    for name, value, want, bar, sc in parts:
        assert value.dtype == out_dtype and value.shape == want.shape, f"{what} {name}: {value.dtype} {value.shape}"
        tol = 2 * (bar.double() - want).abs() + 8 * eps32 * sc + half_ulp * want.abs()
        _assert_close(value, want, tol, f"{what} {name}")
    for name in STATS:
        value, want = getattr(got, name), getattr(truth, name)
        assert value.dtype == torch.float32 and value.shape == want.shape, f"{what} {name}: {value.dtype}"
        tol = 2 * (getattr(plain, name).double() - want).abs() + 8 * eps32 * getattr(scale, name)
        _assert_close(value, want, tol, f"{what} {name}")


def _backends():
    return ["torch", pytest.param("triton", marks=requires_triton), pytest.param("cuda", marks=requires_cuda)]


@pytest.mark.parametrize("impl", _backends())
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backend_within_tolerance(dtype, bias, impl):
    d_in, d_out = DIMS[0] if dtype != torch.bfloat16 else DIMS[1]
    a, gamma = _inputs(LENS, d_in, d_out, dtype, seed=2)
    cu, p = _cu(LENS), _pairs(PAIRS)
    truth, plain, scale = _truth_plain_scale(a, gamma, cu, p, bias)
    got = pair_weight_grad(a, gamma, cu, p, bias=bias, impl=impl)
    assert got.inner.dtype == torch.float32 and got.inner.shape == (len(PAIRS),)
    _check(got, truth, plain, scale, dtype, f"{impl} {dtype} bias={bias}")


@pytest.mark.parametrize("impl", _backends())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_backend_fp32_gradient_of_low_precision_inputs(dtype, impl):
    """out_dtype=float32: the gradient keeps the fp32 accumulation, so it must be far better than the bar."""
    a, gamma = _inputs(LENS, 129, 7, dtype, seed=3)
    cu, p = _cu(LENS), _pairs(PAIRS)
    truth, plain, scale = _truth_plain_scale(a, gamma, cu, p, True)
    got = pair_weight_grad(a, gamma, cu, p, bias=True, out_dtype=torch.float32, impl=impl)
    _check(got, truth, plain, scale, torch.float32, f"{impl} {dtype} -> fp32")
    eps32 = torch.finfo(torch.float32).eps
    _assert_close(got.grad_weight, truth.grad_weight, 8 * eps32 * scale.grad_weight, f"{impl}: fp32 accumulation")
    _assert_close(got.inner, truth.inner, 8 * eps32 * scale.inner, f"{impl}: fp32 accumulation of inner")


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("chunk_rows", [None, 2, 3], ids=["one_chunk", "chunk2", "chunk3"])
def test_torch_path_float64(bias, chunk_rows):
    """fp64 inputs stay fp64; chunks of one pair, an odd chunk size and one chunk for all agree with the reference."""
    a, gamma = _inputs(LENS, 7, 129, torch.float64, seed=4)
    cu, p = _cu(LENS), _pairs(PAIRS)
    got = pair_weight_grad(a, gamma, cu, p, bias=bias, impl="torch", chunk_rows=chunk_rows)
    want = pair_weight_grad_reference(a, gamma, cu, p, bias=bias)
    scale = pair_weight_grad_reference(a.abs(), gamma.abs(), cu, p, bias=bias)
    assert got.grad_weight.dtype == got.inner.dtype == torch.float64
    _assert_close(got.grad_weight, want.grad_weight, 1e-14 * scale.grad_weight, "fp64 grad_weight")
    if bias:
        _assert_close(got.grad_bias, want.grad_bias, 1e-14 * scale.grad_bias, "fp64 grad_bias")
    for name in STATS:
        _assert_close(getattr(got, name), getattr(want, name), 1e-14 * getattr(scale, name), f"fp64 {name}")


# ---------------------------------------------------------------------------------------------------------------------
# The dense form, edge cases, NaN poisoning
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["default", "shuffled"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("cache", [None, 64], ids=["one_slice", "slices"])
@pytest.mark.parametrize("chunk_rows", [None, 2], ids=["one_chunk", "chunk2"])
def test_dense_torch_path_float64_with_plan(monkeypatch, layout, bias, cache, chunk_rows):
    """The dense PyTorch path in float64, given a PairPlan: the default layout (row i with row B + i: no gather, dW a
    plain sum) and a shuffled one, d_out in one slice and in many, pairs in one chunk and in several, all agree with
    the reference; the plan is the pairs' own."""
    import entangle_fast._torch.pair_wgrad as tp
    from entangle_fast.bookkeeping import PairPlan
    from entangle_fast.data import default_pairs

    if cache is not None:
        monkeypatch.setattr(tp, "CACHE_ELEMENTS", cache)
    n_rows, t, d_in, d_out = 6, 5, 7, 9
    gen = torch.Generator().manual_seed(11)
    a = torch.randn(n_rows, t, d_in, generator=gen, dtype=torch.float64).to(DEVICE)
    gamma = torch.randn(n_rows, t, d_out, generator=gen, dtype=torch.float64).to(DEVICE)
    pairs = default_pairs(n_rows) if layout == "default" else torch.tensor([[4, 1], [0, 5], [2, 3]])
    plan = PairPlan(n_rows, pairs)
    assert plan.ordered == (layout == "default")
    got = pair_weight_grad_dense(a, gamma, plan=plan, bias=bias, impl="torch", chunk_rows=chunk_rows)
    cu = torch.arange(n_rows + 1, device=DEVICE) * t
    want = pair_weight_grad_reference(a.reshape(-1, d_in), gamma.reshape(-1, d_out), cu, pairs.to(DEVICE), bias=bias)
    scale = pair_weight_grad_reference(a.abs().reshape(-1, d_in), gamma.abs().reshape(-1, d_out), cu,
                                       pairs.to(DEVICE), bias=bias)
    for name in ("grad_weight", *STATS) + (("grad_bias",) if bias else ()):
        _assert_close(getattr(got, name), getattr(want, name), 1e-14 * getattr(scale, name), f"fp64 {name}")
    with pytest.raises(ValueError, match="plan is for 6 rows"):
        pair_weight_grad_dense(a[:4], gamma[:4], plan=plan)
    with pytest.raises(ValueError, match="exactly one of pairs and plan"):
        pair_weight_grad_dense(a, gamma, pairs.to(DEVICE), plan=plan)


@pytest.mark.parametrize("cache", [None, 64], ids=["small", "slices"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_dense_with_plan_into_a_buffer_any_layout(monkeypatch, cache, bias):
    """``dense_with_plan`` on the PyTorch path, the small-layer form (every row at once, one Gram matrix) and the
    sliced one, for a layout with a row in two pairs and rows in none: equal to the float64 reference, and the weight
    gradient written into a given buffer (a slice of a larger gradient, as the fused head passes) is that buffer."""
    import entangle_fast._torch.pair_wgrad as tp
    from entangle_fast.bookkeeping import PairPlan, dense_with_plan

    if cache is not None:
        monkeypatch.setattr(tp, "CACHE_ELEMENTS", cache)
    n_rows, t, d_in, d_out = 6, 4, 5, 7
    assert tp.is_small(n_rows, d_out, d_in) == (cache is None)
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(n_rows, t, d_in, generator=gen, dtype=torch.float64)
    gamma = torch.randn(n_rows, t, d_out, generator=gen, dtype=torch.float64)
    pairs = torch.tensor([[0, 3], [0, 4]])  # row 0 twice; rows 1, 2 and 5 in no pair
    plan = PairPlan(n_rows, pairs)
    whole = torch.full((d_out + 3, d_in), float("nan"), dtype=torch.float64)
    for into in (None, whole[2: 2 + d_out]):
        gw, gb, stats = dense_with_plan(a, gamma, plan, bias=bias, out_dtype=torch.float64, backend="torch",
                                        grad_weight=into)
        if into is not None:
            assert gw.data_ptr() == into.data_ptr()
        cu = torch.arange(n_rows + 1) * t
        want = pair_weight_grad_reference(a.reshape(-1, d_in), gamma.reshape(-1, d_out), cu, pairs, bias=bias)
        _assert_close(gw, want.grad_weight, 1e-13 * want.grad_weight.abs().max(), "grad_weight")
        for i, name in enumerate(STATS):
            _assert_close(stats[i], getattr(want, name), 1e-12 * getattr(want, name).abs().max(), name)
        if bias:
            _assert_close(gb, want.grad_bias, 1e-13 * want.grad_bias.abs().max(), "grad_bias")
    assert whole[:2].isnan().all() and whole[2 + d_out:].isnan().all()


@pytest.mark.parametrize("impl", _backends())
def test_dense_form_equals_packed(impl):
    """Rows of one width T = 20 padded from the variable lengths: gamma is 0 on the padding (a is not), so the dense
    form must give the packed form's results; and a packed batch whose rows all have T tokens takes the dense path."""
    lens = (7, 20, 0, 13, 1)
    pairs = [[0, 1], [3, 2], [1, 4], [1, 1]]
    d_in, d_out, t = 7, 20, 20
    a, gamma = _inputs(lens, d_in, d_out, torch.float32, seed=5)
    gen = torch.Generator().manual_seed(6)
    a3 = torch.randn(len(lens), t, d_in, generator=gen).to(DEVICE)
    g3 = torch.zeros(len(lens), t, d_out, device=DEVICE)
    cu = _cu(lens)
    for r, n in enumerate(lens):
        a3[r, :n] = a[cu[r] : cu[r] + n]
        g3[r, :n] = gamma[cu[r] : cu[r] + n]
    p = _pairs(pairs)
    packed = pair_weight_grad(a, gamma, cu, p, bias=True, impl=impl)
    dense = pair_weight_grad_dense(a3, g3, p, bias=True, impl=impl)
    truth = pair_weight_grad_reference(a3.double().reshape(-1, d_in), g3.double().reshape(-1, d_out),
                                       torch.arange(len(lens) + 1, device=DEVICE) * t, p, bias=True)
    scale = pair_weight_grad_reference(a.double().abs(), gamma.double().abs(), cu, p, bias=True)
    eps32 = torch.finfo(torch.float32).eps
    for name in ("grad_weight", "grad_bias", *STATS):
        tol = 8 * eps32 * getattr(scale, name)
        _assert_close(getattr(dense, name), getattr(truth, name), tol, f"{impl} dense {name}")
        _assert_close(getattr(packed, name), getattr(truth, name), tol, f"{impl} packed {name}")
    # The same [R, T, d] rows packed: every row has T tokens.
    equal = pair_weight_grad(a3.reshape(-1, d_in), g3.reshape(-1, d_out), torch.arange(len(lens) + 1, device=DEVICE) * t,
                             p, bias=True, impl=impl)
    for name in ("grad_weight", "grad_bias", *STATS):
        _assert_close(getattr(equal, name), getattr(truth, name), 8 * eps32 * getattr(scale, name),
                      f"{impl} equal-length packed {name}")


@pytest.mark.parametrize("impl", _backends())
def test_no_pairs_all_rows_unpaired_and_empty(impl):
    a, gamma = _inputs((0, 3, 0, 5), 7, 20, torch.float32, seed=7)
    cu = _cu((0, 3, 0, 5))
    none = pair_weight_grad(a, gamma, cu, _pairs([]), bias=True, impl=impl)
    want = pair_weight_grad_reference(a.double(), gamma.double(), cu, _pairs([]), bias=True)
    scale = pair_weight_grad_reference(a.double().abs(), gamma.double().abs(), cu, _pairs([]), bias=True)
    assert none.inner.shape == none.chosen.shape == none.rejected.shape == (0,)
    eps32 = torch.finfo(torch.float32).eps
    _assert_close(none.grad_weight, want.grad_weight, 8 * eps32 * scale.grad_weight, f"{impl} unpaired grad_weight")
    _assert_close(none.grad_bias, want.grad_bias, 8 * eps32 * scale.grad_bias, f"{impl} unpaired grad_bias")
    empty = pair_weight_grad(a, gamma, cu, _pairs([[0, 2], [2, 2]]), impl=impl)
    assert torch.equal(empty.inner, torch.zeros(2, device=DEVICE)) and torch.equal(empty.chosen, empty.inner)
    _assert_close(empty.grad_weight, want.grad_weight, 8 * eps32 * scale.grad_weight, f"{impl} empty pairs")
    no_tokens = pair_weight_grad(a[:0], gamma[:0], torch.zeros(3, dtype=torch.int64, device=DEVICE),
                                 _pairs([[0, 1]]), bias=True, impl=impl)
    assert torch.equal(no_tokens.grad_weight, torch.zeros(20, 7, device=DEVICE))
    assert torch.equal(no_tokens.grad_bias, torch.zeros(20, device=DEVICE))


@requires_triton
def test_triton_launcher_poisons_then_writes_everything(monkeypatch):
    """The launcher's outputs start as NaN (a tile left unwritten fails loudly) and come back finite, twice alike."""
    import importlib

    # The package attribute `pair_wgrad` is the launcher; the module is looked up by its full name.
    kernel_module = importlib.import_module("entangle_fast.kernels.pair_wgrad")
    a, gamma = _inputs(LENS, 129, 7, torch.float16, seed=8)
    cu, p = _cu(LENS), _pairs(PAIRS)
    fold, unpaired = pair_plan(cu.cpu(), p.cpu())
    launched = {}
    real_full = torch.full

    def spy_full(size, fill_value, **kwargs):
        out = real_full(size, fill_value, **kwargs)
        launched.setdefault("poisoned", []).append(bool(torch.isnan(out).all()))
        return out

    monkeypatch.setattr(kernel_module.torch, "full", spy_full)
    first = kernel_module.pair_wgrad(a, gamma, cu, p, fold.to(DEVICE), unpaired.to(DEVICE), bias=True,
                                     out_dtype=torch.float16)
    assert launched["poisoned"] == [True, True], launched
    for t in (first[0], first[1], first[2]):
        assert bool(torch.isfinite(t).all()), f"unwritten or non-finite element at {torch.nonzero(~torch.isfinite(t))[0]}"
    monkeypatch.undo()
    second = kernel_module.pair_wgrad(a, gamma, cu, p, fold.to(DEVICE), unpaired.to(DEVICE), bias=True,
                                      out_dtype=torch.float16)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    # Atomic adds may land in any order on a GPU; under the interpreter they are sequential.
    torch.testing.assert_close(first[2], second[2], rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------------------------------------------------
# Bad inputs and backend selection
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case, name",
    [
        ("a_rows", "a has"),
        ("dtype_mismatch", "dtype"),
        ("cu_not_monotone", "cu_seqlens"),
        ("cu_not_ending_at_S", "cu_seqlens"),
        ("pair_too_big", "pairs"),
        ("pair_negative", "pairs"),
        ("pairs_shape", "pairs"),
        ("out_dtype", "out_dtype"),
    ],
)
def test_bad_inputs_raise_naming_the_argument(case, name):
    a, gamma = _inputs((2, 3), 4, 5, torch.float32, seed=9)
    cu, p = _cu((2, 3)), _pairs([[0, 1]])
    out_dtype = None
    if case == "a_rows":
        a = a[:-1]
    elif case == "dtype_mismatch":
        a = a.half()
    elif case == "cu_not_monotone":
        cu = torch.tensor([0, 4, 2, 5], dtype=torch.int64, device=DEVICE)
    elif case == "cu_not_ending_at_S":
        cu = torch.tensor([0, 2, 4], dtype=torch.int64, device=DEVICE)
    elif case == "pair_too_big":
        p = _pairs([[0, 1], [2, 0]])
    elif case == "pair_negative":
        p = _pairs([[0, -1]])
    elif case == "pairs_shape":
        p = torch.tensor([0, 1], device=DEVICE)
    elif case == "out_dtype":
        out_dtype = torch.int32
    with pytest.raises((ValueError, TypeError), match=name):
        pair_weight_grad(a, gamma, cu, p, out_dtype=out_dtype, impl="torch")
    if case not in ("out_dtype",):
        with pytest.raises((ValueError, TypeError), match=name):
            pair_weight_grad_reference(a, gamma, cu, p)


def test_dense_bad_shapes():
    with pytest.raises(ValueError, match=r"a must have shape \[R, T, d\]"):
        pair_weight_grad_dense(torch.zeros(6, 4), torch.zeros(2, 3, 5), _pairs([[0, 1]]))
    with pytest.raises(ValueError, match="differs from gamma"):
        pair_weight_grad_dense(torch.zeros(2, 3, 4), torch.zeros(2, 4, 5), _pairs([[0, 1]]))


def test_backend_selection_errors():
    a, gamma = _inputs((2, 3), 4, 5, torch.float64, seed=10)
    with pytest.raises(ValueError, match="got float64"):
        pair_weight_grad(a, gamma, _cu((2, 3)), _pairs([[0, 1]]), impl="triton")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="impl='cuda'"):
            pair_weight_grad(a.float(), gamma.float(), _cu((2, 3)), _pairs([[0, 1]]), impl="cuda")


# ---------------------------------------------------------------------------------------------------------------------
# CUDA C++: compile check (any machine with nvcc), fake implementation (any machine), launcher contract
# ---------------------------------------------------------------------------------------------------------------------

CSRC = Path(__file__).resolve().parents[1] / "csrc"
NVCC = _cuda._nvcc()
requires_nvcc = pytest.mark.skipif(NVCC is None, reason="requires_nvcc: nvcc not found (CUDA_HOME or PATH)")


@requires_nvcc
@pytest.mark.parametrize("arch", ["8.0", "9.0"], ids=lambda a: "sm_" + a.replace(".", ""))
def test_pair_wgrad_cu_compiles(arch):
    """With torch's own nvcc flags (-D__CUDA_NO_HALF_CONVERSIONS__ ...) and the build's, as tests/test_cuda.py does."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    flags = _cuda._build_settings().nvcc_flags([arch])
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [NVCC, "-c", "-std=c++17", *COMMON_NVCC_FLAGS, *flags, f"-I{CSRC}", str(CSRC / "pair_wgrad.cu"),
               "-o", str(Path(tmp) / "pair_wgrad.o")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"nvcc failed on pair_wgrad.cu for sm_{arch}:\n{(proc.stdout + proc.stderr)[-4000:]}"


def test_pair_wgrad_cu_is_built():
    assert "pair_wgrad.cu" in _cuda._build_settings().SOURCES


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_fake_pair_wgrad_op(bias):
    """The op's fake implementation lets torch.compile trace it on a machine without the extension."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        a = torch.empty(40, 7, dtype=torch.bfloat16, device="cuda")
        gamma = torch.empty(40, 129, dtype=torch.bfloat16, device="cuda")
        cu = torch.empty(5, dtype=torch.int64, device="cuda")
        pairs = torch.empty(3, 2, dtype=torch.int64, device="cuda")
        fold = torch.empty(3, 2, dtype=torch.int32, device="cuda")
        unpaired = torch.empty(1, dtype=torch.int64, device="cuda")
        gw = torch.empty(129, 7, dtype=torch.float32, device="cuda")
        gb = torch.empty(129, dtype=torch.float32, device="cuda") if bias else None
        stats = torch.empty(3, 3, dtype=torch.float32, device="cuda")
        assert torch.ops.entangle_fast.pair_wgrad(a, gamma, cu, pairs, fold, unpaired, gw, gb, stats) is None


def test_cuda_launcher_rejects_cpu_tensors():
    a, gamma = _inputs((2, 3), 4, 5, torch.float32, seed=11)
    with pytest.raises(ValueError, match="impl='cuda' needs CUDA tensors"):
        _cuda.cuda_pair_wgrad(a.cpu(), gamma.cpu(), torch.tensor([0, 2, 5]), torch.tensor([[0, 1]]),
                              torch.ones(1, 2, dtype=torch.int32), torch.zeros(0, dtype=torch.int64), bias=False,
                              out_dtype=torch.float32)


@requires_cuda
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_cuda_matches_triton_at_larger_shapes(out_dtype):
    """Several 64-wide tiles on both sides, tile-edge lengths (64, 65), every out_dtype from bf16 inputs."""
    lens = (64, 65, 1, 0, 300, 129, 7)
    pairs = [[0, 1], [4, 5], [2, 3], [6, 4], [1, 1]]
    a, gamma = _inputs(lens, 200, 129, torch.bfloat16, seed=12)
    cu, p = _cu(lens), _pairs(pairs)
    truth, plain, scale = _truth_plain_scale(a, gamma, cu, p, True)
    for impl in ("cuda", "triton"):
        got = pair_weight_grad(a, gamma, cu, p, bias=True, out_dtype=out_dtype, impl=impl)
        torch.cuda.synchronize()
        _check(got, truth, plain, scale, out_dtype, f"{impl} bf16 -> {out_dtype}")
