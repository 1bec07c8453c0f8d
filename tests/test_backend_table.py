"""The one backend switch: resolve_impl's name -> the launcher table of entangle_fast._backend, and the launcher
contracts of entangle_fast._contract that every device backend checks."""
import subprocess
import sys

import pytest
import torch

from entangle_fast import _backend, _contract
from helpers import requires_triton

OPS = ("logprob_fwd", "logprob_bwd", "ghost_gram_fwd", "pair_wgrad")


def test_every_op_has_a_launcher_on_every_backend():
    from entangle_fast._torch import ghost_gram, logprob, pair_wgrad

    assert _backend.launcher("logprob_fwd", "torch") is logprob.torch_logprob_fwd
    assert _backend.launcher("logprob_bwd", "torch") is logprob.torch_logprob_bwd
    assert _backend.launcher("ghost_gram_fwd", "torch") is ghost_gram.torch_ghost_gram_fwd
    assert _backend.launcher("pair_wgrad", "torch") is pair_wgrad.torch_pair_wgrad
    for op in OPS:
        for backend in _backend.BACKENDS:
            assert (op, backend) in _backend._TABLE, f"{op} has no {backend} launcher"


def test_cuda_launchers_resolve_without_a_device():
    from entangle_fast import _cuda

    assert _backend.launcher("logprob_fwd", "cuda") is _cuda.cuda_logprob_fwd
    assert _backend.launcher("ghost_gram_fwd", "cuda") is _cuda.cuda_ghost_gram_fwd
    assert _backend.launcher("pair_wgrad", "cuda") is _cuda.cuda_pair_wgrad


@requires_triton
def test_triton_launchers_are_the_kernels_package():
    from entangle_fast import kernels

    assert _backend.launcher("logprob_bwd", "triton") is kernels.logprob_bwd
    assert _backend.launcher("ghost_gram_fwd", "triton") is kernels.ghost_gram_fwd
    assert _backend.launcher("pair_wgrad", "triton") is kernels.pair_wgrad


def test_unknown_op_or_backend_names_what_is_registered():
    with pytest.raises(KeyError, match="no launcher for op 'softmax'.*logprob_fwd"):
        _backend.launcher("softmax", "torch")
    with pytest.raises(KeyError, match="backend 'auto'"):
        _backend.launcher("logprob_fwd", "auto")  # a resolved backend is expected, never "auto"
    with pytest.raises(ValueError, match="module:function"):
        _backend.register("broken", torch="no_colon", triton="a:b", cuda="a:b")


def test_importing_the_package_imports_no_backend():
    code = ("import sys, entangle_fast, entangle_fast.logprobs, entangle_fast.ghost, entangle_fast.bookkeeping; "
            "print(sorted(m for m in ('triton', 'entangle_fast._cuda', 'entangle_fast.kernels') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_compute_dtype_and_interpreting(monkeypatch):
    assert _backend.compute_dtype(torch.float64) == torch.float64
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert _backend.compute_dtype(dtype) == torch.float32
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not _backend.interpreting()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _backend.interpreting()


def test_placement_per_backend(monkeypatch):
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="gamma is on cpu: impl='cuda' needs CUDA tensors"):
        _contract.check_placement([("gamma", x)], "cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="gamma is on the CPU: Triton needs a GPU tensor"):
        _contract.check_placement([("gamma", x)], "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _contract.check_placement([("gamma", x), ("a", None)], "triton") == torch.device("cpu")
    with pytest.raises(ValueError, match="a must be contiguous"):
        _contract.check_placement([("gamma", x), ("a", torch.randn(4, 3).T)], "triton")


def _ghost_args(**over):
    args = dict(a=torch.randn(5, 3), gamma=torch.randn(5, 4), ids=None, cu_seqlens=torch.tensor([0, 2, 5]),
                seg_pairs=torch.tensor([[0, 1]]))
    args.update(over)
    return args


@pytest.mark.parametrize("over, match", [
    (dict(gamma=torch.randn(5, 4, dtype=torch.float64)), "gamma must be a 2-D float32"),
    (dict(gamma=torch.randn(5)), "gamma must be a 2-D float32"),
    (dict(a=torch.randn(5, 3, dtype=torch.float16)), "a must be torch.float32 \\[5, d_in\\]"),
    (dict(a=torch.randn(4, 3)), "a must be torch.float32 \\[5, d_in\\]"),
    (dict(ids=torch.zeros(5, dtype=torch.int32)), "ids must be an int64"),
    (dict(cu_seqlens=torch.tensor([[0, 5]])), "cu_seqlens must be an int64 1-D"),
    (dict(seg_pairs=torch.tensor([0, 1])), "seg_pairs must be an int64 2-D"),
])
def test_ghost_gram_contract_names_the_argument(over, match):
    with pytest.raises(ValueError, match=match):
        _contract.check_ghost_gram_inputs(**_ghost_args(**over))
    named = _contract.check_ghost_gram_inputs(**_ghost_args())
    assert [n for n, _ in named] == ["gamma", "a", "ids", "cu_seqlens", "seg_pairs"]


def _wgrad_args(**over):
    args = dict(a=torch.randn(5, 3), gamma=torch.randn(5, 4), cu_seqlens=torch.tensor([0, 2, 5]),
                pairs=torch.tensor([[0, 1]]), fold=torch.ones(1, 2, dtype=torch.int32),
                unpaired=torch.zeros(0, dtype=torch.int64), out_dtype=torch.bfloat16)
    args.update(over)
    return args


@pytest.mark.parametrize("over, match", [
    (dict(gamma=torch.randn(5, 4, dtype=torch.float64)), "gamma must be a 2-D float32"),
    (dict(a=torch.randn(5, 3, dtype=torch.float16)), "a dtype torch.float16 must match gamma"),
    (dict(a=torch.randn(4, 3)), "a has 4 tokens but gamma has 5"),
    (dict(out_dtype=torch.float64), "out_dtype must be float32, bfloat16 or float16"),
    (dict(cu_seqlens=torch.tensor([0, 2, 5], dtype=torch.int32)), "cu_seqlens must be torch.int64"),
    (dict(pairs=torch.tensor([[0, 1, 1]])), "pairs must be torch.int64 \\[1, 2\\]"),
    (dict(fold=torch.ones(1, 2, dtype=torch.int64)), "fold must be torch.int32 \\[1, 2\\]"),
    (dict(fold=torch.ones(2, 2, dtype=torch.int32)), "fold must be torch.int32 \\[1, 2\\]"),
    (dict(unpaired=torch.zeros(1, 1, dtype=torch.int64)), "unpaired must be torch.int64"),
])
def test_pair_wgrad_contract_names_the_argument(over, match):
    with pytest.raises(ValueError, match=match):
        _contract.check_pair_wgrad_inputs(**_wgrad_args(**over))
    named = _contract.check_pair_wgrad_inputs(**_wgrad_args())
    assert [n for n, _ in named] == ["gamma", "a", "cu_seqlens", "pairs", "fold", "unpaired"]


@requires_triton
def test_triton_launchers_check_the_shared_contract(monkeypatch):
    """The Triton launchers reject what the contract rejects, before anything is launched."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from entangle_fast import kernels

    with pytest.raises(ValueError, match="gamma must be a 2-D float32"):
        kernels.ghost_gram_fwd(**{k: v for k, v in _ghost_args(gamma=torch.randn(5, 4).double()).items()})
    with pytest.raises(ValueError, match="fold must be torch.int32"):
        kernels.pair_wgrad(**_wgrad_args(fold=torch.ones(1, 2, dtype=torch.int64)), bias=False)
