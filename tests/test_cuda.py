"""Tests of the CUDA C++ backend (csrc/, entangle_fast/_cuda.py).

Without a GPU: every .cu file must compile with nvcc for sm_80 and sm_90 (and bindings.cpp must pass the host
compiler against torch's headers); impl="cuda" must fail with a reason; the fake implementations must give the right
shapes so torch.compile can trace the ops. With a GPU (`requires_cuda`): CUDA == Triton == the float64 reference under
STYLE.md's tolerance rule, at odd shapes and vocabulary ranges, with NaN-poisoned outputs.
"""
import subprocess
import sys
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from entangle_fast import _cuda
from entangle_fast._backend import resolve_impl
from entangle_fast.ghost import ghost_gram_reference
from entangle_fast.reference import linear_logprobs_reference
from helpers import assert_close_to_reference, first_index, launcher_inputs, launcher_reference

CSRC = Path(__file__).resolve().parents[1] / "csrc"
CU_FILES = sorted(p.name for p in CSRC.glob("*.cu"))
ARCHS = ["8.0", "9.0"]
IGNORE = -100
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# ---------------------------------------------------------------------------------------------------------------------
# Compilation (CPU machine with nvcc): one nvcc per (file, arch), all started together
# ---------------------------------------------------------------------------------------------------------------------

NVCC = _cuda._nvcc()
requires_nvcc = pytest.mark.skipif(NVCC is None, reason="requires_nvcc: nvcc not found (CUDA_HOME or PATH)")


def _run(cmd):
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr


def _bindings_cmd(tmp: Path):
    """nvcc driving the host compiler over bindings.cpp, syntax only, with torch's and CUDA's include paths."""
    from torch.utils.cpp_extension import include_paths

    incs = [*include_paths(), sysconfig.get_paths()["include"], str(CSRC)]
    torch_inc = Path(include_paths()[0])
    if not (torch_inc / "c10/cuda/impl/cuda_cmake_macros.h").exists():
        # CPU builds of torch ship c10/cuda headers but not this generated one; its only content is a build macro.
        stub = tmp / "stub" / "c10" / "cuda" / "impl"
        stub.mkdir(parents=True, exist_ok=True)
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
        incs.insert(0, str(tmp / "stub"))
    return [NVCC, "-c", "-std=c++20", "-Xcompiler", "-fsyntax-only", "-DTORCH_EXTENSION_NAME=_entangle_fast_check",
            "-DTORCH_API_INCLUDE_EXTENSION_H", *(f"-I{i}" for i in incs), str(CSRC / "bindings.cpp"),
            "-o", str(tmp / "bindings.o")]


@pytest.fixture(scope="module")
def compiled():
    """Start every compile at once (nvcc is mostly single-threaded) and hand each test its own result."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    build = _cuda._build_settings()
    tmp = Path(tempfile.mkdtemp(prefix="entangle_fast_nvcc_"))
    jobs = {}
    with ThreadPoolExecutor(max_workers=len(CU_FILES) * len(ARCHS) + 1) as pool:
        for name in CU_FILES:
            for arch in ARCHS:
                # torch's own nvcc flags (-D__CUDA_NO_HALF_CONVERSIONS__ ...) included: the sources must build under them.
                cmd = [NVCC, "-c", "-std=c++17", *COMMON_NVCC_FLAGS, *build.nvcc_flags([arch]), f"-I{CSRC}",
                       str(CSRC / name), "-o", str(tmp / f"{name}.{arch}.o")]
                jobs[(name, arch)] = pool.submit(_run, cmd)
        jobs["bindings.cpp"] = pool.submit(_run, _bindings_cmd(tmp))
        yield jobs


@requires_nvcc
@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: "sm_" + a.replace(".", ""))
@pytest.mark.parametrize("name", CU_FILES)
def test_cu_compiles(compiled, name, arch):
    rc, out = compiled[(name, arch)].result()
    assert rc == 0, f"nvcc failed on {name} for sm_{arch.replace('.', '')}:\n{out[-4000:]}"


@requires_nvcc
def test_bindings_cpp_compiles(compiled):
    rc, out = compiled["bindings.cpp"].result()
    errors = "\n".join(line for line in out.splitlines() if "error" in line)
    assert rc == 0, f"bindings.cpp does not compile against torch's headers:\n{errors[-4000:] or out[-4000:]}"


def test_cu_sources_exist():
    assert CU_FILES == ["ghost_gram.cu", "logprob.cu", "pair_wgrad.cu"], CU_FILES


def test_arch_list_parsing(monkeypatch):
    build = _cuda._build_settings()
    monkeypatch.delenv("ENTANGLE_FAST_CUDA_ARCH_LIST", raising=False)
    assert build.arch_list() == ["8.0", "9.0"]
    monkeypatch.setenv("ENTANGLE_FAST_CUDA_ARCH_LIST", "9.0a, 8.6+PTX")
    assert build.gencode_flags() == ["-gencode=arch=compute_90a,code=sm_90a", "-gencode=arch=compute_86,code=sm_86",
                                     "-gencode=arch=compute_86,code=compute_86"]
    with pytest.raises(ValueError, match="compute capability"):
        build.arch_list("7.5")
    with pytest.raises(ValueError, match="not of the form"):
        build.arch_list("sm_90")


def test_aot_extension_is_opt_in(monkeypatch):
    build = _cuda._build_settings()
    monkeypatch.delenv("ENTANGLE_FAST_BUILD_CUDA", raising=False)
    assert build.cuda_extension() is None and build.cmdclass(None) == {}
    if torch.version.cuda is None:
        monkeypatch.setenv("ENTANGLE_FAST_BUILD_CUDA", "1")
        with pytest.raises(RuntimeError, match="CUDA build of torch"):
            build.cuda_extension()


# ---------------------------------------------------------------------------------------------------------------------
# Availability: clear errors where the backend cannot run
# ---------------------------------------------------------------------------------------------------------------------


def test_cuda_available_says_why_not_here():
    ok, reason = _cuda.cuda_available()
    if not torch.cuda.is_available():
        assert not ok
        assert "CPU-only" in reason or "no CUDA device" in reason, reason


@pytest.mark.parametrize("case, match", [
    ("cpu_torch", "CPU-only build"),
    ("no_device", "no CUDA device"),
    ("old_gpu", "compute capability >= 8.0"),
    ("no_nvcc", "nvcc was not found"),
    ("cpu_device", "needs CUDA tensors"),
])
def test_cuda_available_reasons(monkeypatch, case, match):
    monkeypatch.setattr(torch.version, "cuda", None if case == "cpu_torch" else "12.8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: case != "no_device")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5) if case == "old_gpu" else (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Test GPU")
    monkeypatch.setattr(_cuda, "_prebuilt_present", lambda: False)
    monkeypatch.setattr(_cuda, "_nvcc", lambda: None if case == "no_nvcc" else "/usr/bin/nvcc")
    ok, reason = _cuda.cuda_available("cpu" if case == "cpu_device" else None)
    assert not ok and match in reason, reason


def test_cuda_available_true_when_buildable(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(_cuda, "_prebuilt_present", lambda: False)
    monkeypatch.setattr(_cuda, "_nvcc", lambda: "/usr/bin/nvcc")
    assert _cuda.cuda_available() == (True, "just-in-time build of csrc/ on first use")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error path of a machine without CUDA")
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_impl_cuda_raises_clearly_without_cuda(device):
    with pytest.raises(RuntimeError, match="impl='cuda'"):
        resolve_impl("cuda", torch.device(device), torch.bfloat16)
    with pytest.raises(RuntimeError, match="CUDA backend cannot run here"):
        _cuda.load_extension()


def test_launchers_reject_cpu_tensors():
    h, w = torch.randn(7, 64), torch.randn(100, 64)
    labels = torch.zeros(7, dtype=torch.int64)
    with pytest.raises(ValueError, match="impl='cuda' needs CUDA tensors"):
        _cuda.cuda_logprob_fwd(h, w, labels, None, IGNORE)
    with pytest.raises(ValueError, match="impl='cuda' needs CUDA tensors"):
        _cuda.cuda_ghost_gram_fwd(None, h, None, torch.tensor([0, 7]), torch.tensor([[0, 0]]))


def test_import_queries_no_device():
    code = ("import torch\ncalls = []\ntorch.cuda.is_available = lambda: calls.append(1)\n"
            "import entangle_fast._cuda\nassert not calls, 'import queried CUDA'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------------------------------------
# Fake implementations: shapes and dtypes without a GPU (what torch.compile traces)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fake_logprob_ops(dtype):
    with FakeTensorMode():
        h = torch.empty(7, 64, dtype=dtype, device="cuda")
        w = torch.empty(1001, 64, dtype=dtype, device="cuda")
        b = torch.empty(1001, dtype=dtype, device="cuda")
        labels = torch.zeros(7, dtype=torch.int64, device="cuda")
        logprobs, lse = _cuda.cuda_logprob_fwd(h, w, labels, b, IGNORE)
        assert logprobs.shape == lse.shape == (7,) and logprobs.dtype == lse.dtype == torch.float32
        assert logprobs.device.type == "cuda"
        gh = torch.zeros(7, 64, device="cuda")
        gw = torch.zeros(1001, 64, device="cuda")
        chunk = torch.empty(7, 501, device="cuda")
        out = _cuda.cuda_logprob_bwd(h, w, labels, b, lse, logprobs, IGNORE, grad_hidden_unscaled=gh,
                                     grad_weight=gw, grad_bias=None, vocab_start=500, vocab_end=1001,
                                     probs_out=chunk)
        assert out is None
        lp, lse, ent, zsum, arg = _cuda.cuda_logprob_fwd(h, w, labels, b, IGNORE, scale=0.5, softcap=30.0,
                                                         metrics=True)
        assert ent.shape == zsum.shape == arg.shape == (7,)
        assert ent.dtype == zsum.dtype == torch.float32 and arg.dtype == torch.int64
        _cuda.cuda_logprob_bwd(h, w, labels, b, lse, lp, IGNORE, grad_hidden_unscaled=gh, grad_weight=gw,
                               grad_bias=None, vocab_start=500, vocab_end=1001, probs_out=None, scale=0.5,
                               softcap=30.0, delta_out=chunk)


@pytest.mark.parametrize("positions", [False, True])
def test_fake_ghost_gram_op(positions):
    with FakeTensorMode():
        gamma = torch.empty(40, 16, dtype=torch.bfloat16, device="cuda")
        a = torch.empty(40, 8, dtype=torch.bfloat16, device="cuda")
        cu = torch.empty(4, dtype=torch.int64, device="cuda")
        pairs = torch.empty(5, 2, dtype=torch.int64, device="cuda")
        values, pos = torch.ops.entangle_fast.ghost_gram(a, gamma, None, cu, pairs, 20, 13, positions)
        assert values.shape == (5,) and values.dtype == torch.float32
        assert pos.shape == ((5, 20, 13) if positions else (0, 0, 0)) and pos.dtype == torch.float32


def test_ops_trace_with_fake_tensors():
    """make_fx in fake mode records the custom ops, the mutation of the backward buffers included."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def step(h, w, labels):
        logprobs, lse = _cuda.cuda_logprob_fwd(h, w, labels, None, IGNORE)
        gh = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
        _cuda.cuda_logprob_bwd(h, w, labels, None, lse, torch.ones_like(logprobs), IGNORE, grad_hidden_unscaled=gh,
                               grad_weight=None, grad_bias=None, vocab_start=0, vocab_end=w.shape[0], probs_out=None)
        return logprobs, gh

    with FakeTensorMode():
        args = (torch.empty(7, 64, dtype=torch.float16, device="cuda"),
                torch.empty(100, 64, dtype=torch.float16, device="cuda"),
                torch.zeros(7, dtype=torch.int64, device="cuda"))
    code = make_fx(step, tracing_mode="fake")(*args).code
    assert "entangle_fast.logprob_fwd" in code and "entangle_fast.logprob_bwd" in code, code


# ---------------------------------------------------------------------------------------------------------------------
# GPU: CUDA == Triton == reference
# ---------------------------------------------------------------------------------------------------------------------

requires_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and _cuda.cuda_available()[0]),
    reason="requires_cuda: no CUDA device (or the CUDA backend cannot be built here)",
)

# (N, V, d): N 1/7/129, V 1/100/1001, d 3/64 around the 64-wide tiles; 129 rows span three row blocks.
SHAPES = [(1, 1, 3), (7, 100, 64), (129, 1001, 3), (7, 1001, 64), (129, 100, 64), (1, 1001, 64), (129, 1, 3)]


def _triton_fns():
    try:
        from entangle_fast.kernels import HAS_TRITON
    except ImportError:
        return None
    if not HAS_TRITON:
        return None
    from entangle_fast.kernels import logprob_bwd, logprob_fwd

    return logprob_fwd, logprob_bwd


def _inputs(N, V, d, dtype, with_bias, seed):
    return launcher_inputs(N, V, d, dtype, with_bias, seed, device="cuda", ignore_index=IGNORE)


def _reference(h, w, b, labels, g):
    """(logprobs, r = dl/dh unscaled, dL/dW, dL/db, p) of L = sum g l through the reference, in h's dtype."""
    out, _, gw, gb, r, p = launcher_reference(h, w, b, labels, g, IGNORE)
    return out, r, gw, gb, p


def _check(name, got, truth, lowp):
    margin = 1e-6 * max(1.0, truth.abs().max().item())
    assert_close_to_reference(got, truth, lowp, factor=2.0, margin=margin, name=name)


def _run_backend(fwd, bwd, h, w, b, labels, g, ranges):
    """Forward, then the backward over `ranges` into zeroed buffers; probs_out NaN-poisoned."""
    N, d = h.shape
    V = w.shape[0]
    logprobs, lse = fwd(h, w, labels, b, IGNORE)
    gh = torch.zeros(N, d, device="cuda")
    gw = torch.zeros(V, d, device="cuda")
    gb = torch.zeros(V, device="cuda") if b is not None else None
    probs = []
    for start, end in ranges:
        p = torch.full((N, end - start), float("nan"), device="cuda")
        bwd(h, w, labels, b, lse, g, IGNORE, grad_hidden_unscaled=gh, grad_weight=gw, grad_bias=gb,
            vocab_start=start, vocab_end=end, probs_out=p)
        probs.append(p)
    torch.cuda.synchronize()
    return logprobs, lse, gh, gw, gb, torch.cat(probs, dim=1)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("N,V,d", SHAPES)
def test_logprob_cuda_matches_reference_and_triton(N, V, d, with_bias, dtype):
    h, w, b, labels, g = _inputs(N, V, d, dtype, with_bias, seed=N * 7919 + V * 31 + d)
    truth = _reference(h.double(), w.double(), None if b is None else b.double(), labels, g.double())
    lowp = _reference(h, w, b, labels, g)
    backends = {"cuda": (_cuda.cuda_logprob_fwd, _cuda.cuda_logprob_bwd)}
    if _triton_fns() is not None:
        backends["triton"] = _triton_fns()
    for name, (fwd, bwd) in backends.items():
        logprobs, lse, gh, gw, gb, probs = _run_backend(fwd, bwd, h, w, b, labels, g, [(0, V)])
        assert torch.isfinite(lse).all(), f"{name} lse: non-finite at {first_index(~torch.isfinite(lse))}"
        _check(f"{name} logprobs", logprobs, truth[0], lowp[0])
        assert (logprobs[labels == IGNORE] == 0).all(), f"{name}: ignored rows must give exactly 0.0"
        _check(f"{name} grad_hidden_unscaled", gh, truth[1], lowp[1])
        _check(f"{name} grad_weight", gw, truth[2], lowp[2])
        if b is not None:
            _check(f"{name} grad_bias", gb, truth[3], lowp[3])
        _check(f"{name} probs_out", probs, truth[4], lowp[4])
        assert (probs[labels == IGNORE] == 0).all(), f"{name}: ignored rows of probs_out must be 0.0"


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_logprob_cuda_vocab_ranges(dtype):
    N, V, d = 129, 1001, 64
    h, w, b, labels, g = _inputs(N, V, d, dtype, True, seed=11)
    labels[1] = 3  # a label outside most ranges: its row still gets -p there
    whole = _run_backend(_cuda.cuda_logprob_fwd, _cuda.cuda_logprob_bwd, h, w, b, labels, g, [(0, V)])
    # Split points off the 64-column tile grid and one empty range (a no-op).
    split = _run_backend(_cuda.cuda_logprob_fwd, _cuda.cuda_logprob_bwd, h, w, b, labels, g,
                         [(0, 37), (37, 37), (37, 600), (600, V)])
    for key, x, y in zip(("grad_hidden_unscaled", "grad_weight", "grad_bias", "probs_out"), whole[2:], split[2:]):
        # Same per-element math; only the order of fp32 atomic additions differs.
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")

    gw = torch.zeros(V, d, device="cuda")
    gb = torch.zeros(V, device="cuda")
    gh = torch.zeros(N, d, device="cuda")
    probs = torch.full((N, 20), float("nan"), device="cuda")
    _cuda.cuda_logprob_bwd(h, w, labels, b, whole[1], g, IGNORE, grad_hidden_unscaled=gh, grad_weight=gw,
                           grad_bias=gb, vocab_start=40, vocab_end=60, probs_out=probs)
    torch.cuda.synchronize()
    outside = torch.ones(V, dtype=torch.bool, device="cuda")
    outside[40:60] = False
    assert (gw[outside] == 0).all() and (gb[outside] == 0).all(), "rows outside [40, 60) were written"
    torch.testing.assert_close(probs, whole[5][:, 40:60], rtol=1e-5, atol=1e-7)
    # A buffer for the range's rows only (row 0 = vocab_start) receives the same sums.
    gw_range = torch.zeros(20, d, device="cuda")
    _cuda.cuda_logprob_bwd(h, w, labels, b, whole[1], g, IGNORE, grad_hidden_unscaled=torch.zeros_like(gh),
                           grad_weight=gw_range, grad_bias=None, vocab_start=40, vocab_end=60, probs_out=None)
    torch.cuda.synchronize()
    torch.testing.assert_close(gw_range, gw[40:60], rtol=1e-5, atol=1e-6)


@requires_cuda
def test_logprob_cuda_all_ignored_and_accumulates():
    N, V, d = 129, 100, 64
    h, w, b, labels, g = _inputs(N, V, d, torch.float16, True, seed=3)
    labels.fill_(IGNORE)
    logprobs, lse, gh, gw, gb, probs = _run_backend(_cuda.cuda_logprob_fwd, _cuda.cuda_logprob_bwd, h, w, b, labels,
                                                    g, [(0, V)])
    assert (logprobs == 0).all() and torch.isfinite(lse).all()
    for key, t in (("grad_hidden_unscaled", gh), ("grad_weight", gw), ("grad_bias", gb), ("probs_out", probs)):
        assert (t == 0).all(), f"{key}: ignored rows contributed, first nonzero at {first_index(t != 0)}"

    h, w, b, labels, g = _inputs(N, V, d, torch.float32, True, seed=23)
    fresh = _run_backend(_cuda.cuda_logprob_fwd, _cuda.cuda_logprob_bwd, h, w, b, labels, g, [(0, V)])
    gen = torch.Generator().manual_seed(1)
    start = [torch.randn(t.shape, generator=gen).cuda() for t in fresh[2:5]]
    bufs = [t.clone() for t in start]
    _cuda.cuda_logprob_bwd(h, w, labels, b, fresh[1], g, IGNORE, grad_hidden_unscaled=bufs[0], grad_weight=bufs[1],
                           grad_bias=bufs[2], vocab_start=0, vocab_end=V, probs_out=None)
    for new, old, want in zip(bufs, start, fresh[2:5]):
        torch.testing.assert_close(new - old, want, rtol=1e-5, atol=1e-5)


# Segment lengths around the 64-wide tiles: 1, 7, 64, 65 and 129 tokens and an empty segment.
LENS = (7, 1, 129, 0, 20, 64, 65)
PAIRS = [[0, 2], [2, 2], [1, 1], [2, 0], [4, 2], [3, 0], [0, 0], [5, 6], [6, 6], [6, 5]]


@requires_cuda
@pytest.mark.parametrize("positions", [False, True], ids=["values", "positions"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["act", "bias", "ids"])
@pytest.mark.parametrize("d_in,d_out", [(3, 64), (64, 3)])
def test_ghost_gram_cuda_matches_reference_and_triton(d_in, d_out, mode, dtype, positions):
    gen = torch.Generator().manual_seed(d_in * 131 + d_out)
    n = sum(LENS)
    a = torch.randn(n, d_in, generator=gen, dtype=torch.float64).to(dtype).cuda() if mode == "act" else None
    gamma = torch.randn(n, d_out, generator=gen, dtype=torch.float64).to(dtype).cuda()
    ids = torch.randint(0, 5, (n,), generator=gen).cuda() if mode == "ids" else None
    cu = torch.tensor([0, *torch.tensor(LENS).cumsum(0).tolist()], dtype=torch.int64, device="cuda")
    pairs = torch.tensor(PAIRS, dtype=torch.int64, device="cuda")
    truth = ghost_gram_reference(None if a is None else a.double(), gamma.double(), cu, pairs, ids=ids,
                                 positions=positions)
    lowp = ghost_gram_reference(a, gamma, cu, pairs, ids=ids, positions=positions)
    backends = {"cuda": _cuda.cuda_ghost_gram_fwd}
    if _triton_fns() is not None:
        from entangle_fast.kernels.ghost_gram import ghost_gram_fwd

        backends["triton"] = ghost_gram_fwd
    for name, fn in backends.items():
        values, pos = fn(a, gamma, ids, cu, pairs, positions=positions)
        _check(f"{name} values", values, truth.values, lowp.values)
        if positions:
            _check(f"{name} position_matrix", pos, truth.position_matrix, lowp.position_matrix)
        else:
            assert pos is None


@requires_cuda
def test_ops_pass_opcheck_and_compile():
    h, w, b, labels, g = _inputs(7, 100, 64, torch.bfloat16, True, seed=5)
    torch.library.opcheck(torch.ops.entangle_fast.logprob_fwd.default, (h, w, labels, b, IGNORE, 1.0, 0.0, False))
    torch.library.opcheck(torch.ops.entangle_fast.logprob_fwd.default, (h, w, labels, b, IGNORE, 0.5, 3.0, True))
    _, lse = _cuda.cuda_logprob_fwd(h, w, labels, b, IGNORE)
    bufs = (torch.zeros(7, 64, device="cuda"), torch.zeros(100, 64, device="cuda"), torch.zeros(100, device="cuda"))
    # Schema and fake checks only: the aot_dispatch check compares reruns bitwise-close, and fp32 atomics reorder.
    torch.library.opcheck(torch.ops.entangle_fast.logprob_bwd.default,
                          (h, w, labels, b, lse, g, IGNORE, *bufs, 10, 90, torch.zeros(7, 80, device="cuda"),
                           0.5, 3.0, torch.zeros(7, 80, device="cuda")),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    cu = torch.tensor([0, 3, 7], dtype=torch.int64, device="cuda")
    pairs = torch.tensor([[0, 1], [1, 1]], dtype=torch.int64, device="cuda")
    torch.library.opcheck(torch.ops.entangle_fast.ghost_gram.default, (None, h, None, cu, pairs, 3, 4, True))

    compiled = torch.compile(lambda *x: _cuda.cuda_logprob_fwd(*x, IGNORE), fullgraph=True)
    eager = _cuda.cuda_logprob_fwd(h, w, labels, b, IGNORE)
    for x, y in zip(compiled(h, w, labels, b), eager):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_linear_logprobs_impl_cuda(dtype):
    """End to end through the autograd op, once resolve_impl and the launcher table dispatch impl='cuda' here."""
    from entangle_fast.logprobs import linear_logprobs

    try:
        resolve_impl("cuda", torch.device("cuda"), dtype)
    except RuntimeError as err:
        pytest.skip(f"requires_cuda_dispatch: resolve_impl does not route impl='cuda' yet ({err})")
    h, w, b, labels, g = _inputs(129, 1001, 64, dtype, True, seed=29)
    truth = _reference(h.double(), w.double(), b.double(), labels, g.double())
    lowp = _reference(h, w, b, labels, g)
    leaves = [t.detach().clone().requires_grad_(True) for t in (h, w, b)]
    out = linear_logprobs(leaves[0], leaves[1], labels, bias=leaves[2], ignore_index=IGNORE, impl="cuda")
    (g * out).sum().backward()
    _check("logprobs", out, truth[0], lowp[0])
    ref64 = [t.detach().clone().requires_grad_(True) for t in (h.double(), w.double(), b.double())]
    (g.double() * linear_logprobs_reference(*ref64[:2], labels, ref64[2], IGNORE)).sum().backward()
    reflp = [t.detach().clone().requires_grad_(True) for t in (h, w, b)]
    (g * linear_logprobs_reference(*reflp[:2], labels, reflp[2], IGNORE)).sum().backward()
    for name, got, t64, tlp in zip(("hidden", "weight", "bias"), leaves, ref64, reflp):
        _check(f"grad {name}", got.grad, t64.grad, tlp.grad)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scale,softcap", [(0.125, 0.0), (1.7, 3.0)])
@pytest.mark.parametrize("N,V,d", [(7, 1001, 64), (129, 100, 3), (1, 1, 3)])
def test_logprob_cuda_transform_and_metrics(dtype, scale, softcap, N, V, d):
    """Transform and metrics on the CUDA kernels against the float64 reference (tolerance rule) and Triton."""
    from entangle_fast.logit_transform import LogitTransform
    from entangle_fast.reference import token_metrics_reference, transformed_logits_reference

    tf = LogitTransform(scale, softcap or None)
    h, w, b, labels, g = _inputs(N, V, d, dtype, True, seed=31)
    lp, lse, ent, zsum, arg = _cuda.cuda_logprob_fwd(h, w, labels, b, IGNORE, scale=scale, softcap=softcap,
                                                     metrics=True)
    exact = token_metrics_reference(h.double(), w.double(), b.double(), transform=tf)
    lowp = token_metrics_reference(h, w, b, transform=tf)
    _check("entropy", ent, exact["entropy"], lowp["entropy"])
    _check("logit_sum", zsum, exact["logit_sum"], lowp["logit_sum"])
    z64 = transformed_logits_reference(h.double(), w.double(), b.double(), transform=tf)
    slack = 2 * (transformed_logits_reference(h, w, b, transform=tf).double() - z64).abs().max().item() + 1e-6
    assert (z64.max(-1).values - z64.gather(-1, arg[:, None]).squeeze(-1) <= slack).all(), "argmax off the maximum"
    lp64 = linear_logprobs_reference(h.double(), w.double(), labels, b.double(), IGNORE, transform=tf)
    _check("logprobs", lp, lp64, linear_logprobs_reference(h, w, labels, b, IGNORE, transform=tf))
    fns = _triton_fns()
    if fns is not None:
        outs = {}
        for name, (fwd, bwd) in (("cuda", (_cuda.cuda_logprob_fwd, _cuda.cuda_logprob_bwd)), ("triton", fns)):
            _, lse_b = fwd(h, w, labels, b, IGNORE, scale=scale, softcap=softcap)
            gh, gw = torch.zeros(N, d, device="cuda"), torch.zeros(V, d, device="cuda")
            delta = torch.full((N, V), float("nan"), device="cuda")
            bwd(h, w, labels, b, lse_b, g, IGNORE, grad_hidden_unscaled=gh, grad_weight=gw, grad_bias=None,
                vocab_start=0, vocab_end=V, probs_out=None, scale=scale, softcap=softcap, delta_out=delta)
            outs[name] = (gh, gw, delta)
        for key, x, y in zip(("grad_hidden_unscaled", "grad_weight", "delta_out"), outs["cuda"], outs["triton"]):
            assert not torch.isnan(x).any(), f"{key}: unwritten elements"
            torch.testing.assert_close(x, y, rtol=2e-2 if dtype != torch.float32 else 1e-4, atol=1e-4,
                                       msg=lambda m: f"cuda vs triton {key}: {m}")


@requires_cuda
def test_linear_logprobs_impl_cuda_transform_metrics():
    """End to end: transform, metrics and soft-capped token statistics through impl='cuda' equal impl='torch'."""
    from entangle_fast.logit_transform import LogitTransform
    from entangle_fast.logprobs import linear_logprobs

    tf = LogitTransform(0.7, 5.0)
    h, w, b, labels, g = _inputs(4 * 33, 1001, 64, torch.float32, True, seed=37)
    h3, lab3 = h.view(4, 33, 64), labels.view(4, 33)
    res = {}
    for impl in ("cuda", "torch"):
        leaves = [t.detach().clone().requires_grad_(True) for t in (h3, w, b)]
        lp, handle, met = linear_logprobs(leaves[0], leaves[1], lab3, bias=leaves[2], impl=impl, transform=tf,
                                          token_stats=True, token_metrics=True)
        (lp * g.view(4, 33)).sum().backward()
        res[impl] = (lp, met.entropy, met.logit_sum, handle.stats.token_matrix, *(t.grad for t in leaves))
    for x, y in zip(res["cuda"], res["torch"]):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
