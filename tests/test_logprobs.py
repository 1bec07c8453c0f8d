"""linear_logprobs against the materialised float64 reference, on every backend a CPU run can reach."""
import pytest
import torch

import entangle_fast._torch.logprob as torch_lp
import entangle_fast.logprobs as lp_mod
from entangle_fast import linear_logprobs
from entangle_fast._backend import resolve_impl
from entangle_fast.reference import linear_logprobs_reference
from helpers import assert_close_to_reference, assert_exact64, backends

SHAPES = [(1, 1, 3), (7, 100, 64), (129, 1001, 3), (33, 1001, 64)]  # (N, V, d)


def make_inputs(n, v, d, dtype, *, bias=True, seed=0, ignore=()):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, dtype=torch.float64)
    weight = torch.randn(v, d, generator=g, dtype=torch.float64) / d**0.5
    b = torch.randn(v, generator=g, dtype=torch.float64) if bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    for i in ignore:
        labels[i] = -100
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(hidden), cast(weight), labels, cast(b)


def grads(fn, hidden, weight, bias, upstream):
    leaves = [t.detach().requires_grad_(True) for t in (hidden, weight) + ((bias,) if bias is not None else ())]
    out = fn(*leaves)
    return out, torch.autograd.grad((out.double() * upstream).sum(), leaves)


@pytest.mark.parametrize("n,v,d", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_float64_torch_path_is_exact(n, v, d, bias, monkeypatch):
    # Small tiles so the online log-sum-exp and the tiled backward really span several tiles.
    monkeypatch.setattr(torch_lp, "TORCH_VOCAB_TILE", 64)
    monkeypatch.setattr(torch_lp, "TORCH_TILE_ELEMENTS", 64 * 16)
    hidden, weight, labels, b = make_inputs(n, v, d, torch.float64, bias=bias, ignore=(0,) if n > 2 else ())
    upstream = torch.randn(n, dtype=torch.float64)
    ours, g_ours = grads(lambda h, w, *bb: linear_logprobs(h, w, labels, bias=bb[0] if bb else None, impl="torch"),
                         hidden, weight, b, upstream)
    ref, g_ref = grads(lambda h, w, *bb: linear_logprobs_reference(h, w, labels, bb[0] if bb else None),
                       hidden, weight, b, upstream)
    assert ours.dtype == torch.float64
    assert_exact64(ours, ref, rtol=1e-12, name="logprobs")
    for name, a, e in zip(("hidden", "weight", "bias"), g_ours, g_ref):
        assert_exact64(a, e, rtol=1e-12, name=f"grad {name}")


@pytest.mark.parametrize("impl", backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,v,d", [(7, 100, 64), (129, 1001, 3)])
def test_low_precision_no_worse_than_pytorch(impl, dtype, n, v, d):
    hidden, weight, labels, b = make_inputs(n, v, d, dtype, ignore=(n - 1,))
    upstream = torch.randn(n, dtype=torch.float64)
    up64 = lambda t: t.double()  # noqa: E731  ground truth from the same rounded inputs
    ours, g_ours = grads(lambda h, w, bb: linear_logprobs(h, w, labels, bias=bb, impl=impl), hidden, weight, b, upstream)
    lowp, g_lowp = grads(lambda h, w, bb: linear_logprobs_reference(h, w, labels, bb), hidden, weight, b, upstream)
    exact, g_exact = grads(lambda h, w, bb: linear_logprobs_reference(h, w, labels, bb),
                           up64(hidden), up64(weight), up64(b), upstream)
    assert ours.dtype == torch.float32
    scale = exact.abs().max().item()
    assert_close_to_reference(ours, exact, lowp, margin=4e-7 * scale, name=f"{impl} {dtype} logprobs")
    for name, a, e, p in zip(("hidden", "weight", "bias"), g_ours, g_exact, g_lowp):
        assert a.dtype == dtype, f"grad {name} dtype {a.dtype}"
        assert_close_to_reference(a, e, p, margin=4e-7 * e.abs().max().item(), name=f"{impl} {dtype} grad {name}")


@pytest.mark.parametrize("impl", backends())
def test_ignored_labels(impl):
    hidden, weight, labels, b = make_inputs(9, 50, 16, torch.float32, ignore=(0, 1, 7, 8))
    out = linear_logprobs(hidden, weight, labels, bias=b, impl=impl)
    assert torch.all(out[[0, 1, 7, 8]] == 0.0)
    ref = linear_logprobs_reference(hidden.double(), weight.double(), labels, b.double())
    assert_exact64(out, ref, rtol=1e-5, name="both-ends-ignored logprobs")
    # Every label ignored: zero log-probs and exactly zero gradients.
    labels_all = torch.full_like(labels, -100)
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    out = linear_logprobs(h, w, labels_all, bias=b, impl=impl)
    out.sum().backward()
    assert torch.all(out == 0) and torch.all(h.grad == 0) and torch.all(w.grad == 0)


def test_custom_ignore_index_and_batched_shape():
    hidden, weight, labels, _ = make_inputs(12, 30, 8, torch.float64, bias=False, ignore=(3,))
    labels[3] = 7  # a real label; now 5 is the ignored id
    labels[5] = -1
    out = linear_logprobs(hidden.view(3, 4, 8), weight, labels.view(3, 4), ignore_index=-1)
    ref = linear_logprobs_reference(hidden, weight, labels, ignore_index=-1)
    assert out.shape == (3, 4) and out.view(-1)[5] == 0
    assert_exact64(out.view(-1), ref, name="[3, 4] input")


@pytest.mark.parametrize("impl", backends())
def test_probs_chunk_fully_written_over_nan_poison(impl):
    """The backward's probability chunk is poisoned with NaN first: every element must be written (0 on ignored rows)."""
    hidden, weight, labels, b = make_inputs(13, 70, 16, torch.float32, ignore=(0, 12))
    fwd, bwd = lp_mod._launchers(impl)
    _, lse = fwd(hidden, weight, labels, b, -100)
    probs = torch.full((13, 40), float("nan"))
    r = torch.zeros(13, 16)
    bwd(hidden, weight, labels, b, lse, torch.ones(13), -100, grad_hidden_unscaled=r, grad_weight=None,
        grad_bias=None, vocab_start=20, vocab_end=60, probs_out=probs)
    assert not torch.isnan(probs).any(), "unwritten probability entries"
    expected = torch.softmax(hidden.double() @ weight.double().T + b.double(), -1)[:, 20:60]
    expected[[0, 12]] = 0
    assert_exact64(probs, expected, rtol=1e-5, name="probs chunk")


@pytest.mark.parametrize("gradients", [False, True], ids=["deltas_alone", "with_weight_and_bias_grads"])
def test_torch_deltas_are_unscaled_whatever_else_is_asked(gradients):
    """The PyTorch backward's deltas f'(l) (e_y - p), written whole-tile (formed in place there when nothing else
    needs the tile) or beside the weight and bias gradients (which scale the tile by the upstream gradient): the same
    unscaled deltas either way, against float64."""
    hidden, weight, labels, b = make_inputs(13, 70, 16, torch.float32, ignore=(0, 12))
    _, lse = torch_lp.torch_logprob_fwd(hidden, weight, labels, b, -100)
    upstream = torch.linspace(0.5, 2.0, 13)
    deltas = torch.full((13, 70), float("nan"))
    gw, gb = (torch.zeros(70, 16), torch.zeros(70)) if gradients else (None, None)
    torch_lp.torch_logprob_bwd(hidden, weight, labels, b, lse, upstream, -100, grad_hidden_unscaled=torch.zeros(13, 16),
                               grad_weight=gw, grad_bias=gb, vocab_start=0, vocab_end=70, probs_out=None,
                               delta_out=deltas)
    p = torch.softmax(hidden.double() @ weight.double().T + b.double(), -1)
    onehot = torch.nn.functional.one_hot(labels.clamp(min=0), 70).double()
    expected = onehot - p
    expected[[0, 12]] = 0
    assert_exact64(deltas, expected, rtol=1e-5, name="deltas")
    if gradients:
        assert_exact64(gw, (upstream.double()[:, None] * expected).T @ hidden.double(), rtol=1e-4, name="grad_weight")


def test_empty_input_returns_empty_and_backward_runs():
    hidden = torch.randn(0, 8, requires_grad=True)
    weight = torch.randn(5, 8, requires_grad=True)
    out = linear_logprobs(hidden, weight, torch.zeros(0, dtype=torch.long))
    assert out.shape == (0,)
    out.sum().backward()
    assert weight.grad is not None and torch.all(weight.grad == 0)


def test_peak_memory_is_a_tile_not_the_logits(monkeypatch):
    """No allocation of the PyTorch path reaches the size of the [N, V] logits."""
    monkeypatch.setattr(torch_lp, "TORCH_VOCAB_TILE", 256)
    monkeypatch.setattr(torch_lp, "TORCH_TILE_ELEMENTS", 256 * 32)
    n, v, d = 512, 4096, 16
    hidden, weight, labels, _ = make_inputs(n, v, d, torch.float32, bias=False)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        linear_logprobs(hidden, weight, labels, impl="torch").sum().backward()
    biggest = max(e.cpu_memory_usage for e in prof.events())
    logits_bytes = n * v * 4
    # An event counts its children's allocations too; the largest is the gradient of W ([V, d]) plus one [32, 256]
    # tile, 1/28 of the logits here.
    assert biggest <= (v * d + 256 * 32) * 4 * 1.01, f"largest allocation {biggest} B vs logits {logits_bytes} B"


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(labels=torch.zeros(5, dtype=torch.long)), "labels shape"),
        (dict(weight=torch.randn(10, 7)), "weight must have shape"),
        (dict(weight=torch.randn(10, 8, dtype=torch.float64)), "weight dtype"),
        (dict(labels=torch.full((6,), 10)), r"labels\[0\] = 10"),
        (dict(labels=torch.full((6,), -5)), "ignore_index"),
        (dict(labels=torch.zeros(6)), "labels must be an int64"),
        (dict(bias=torch.randn(9)), "bias must have shape"),
        (dict(bias=torch.randn(10, dtype=torch.float16)), "bias dtype"),
        (dict(weight=torch.randn(10, 8, device="meta")), "weight is on meta"),
        (dict(impl="tpu"), "impl must be one of"),
    ],
)
def test_bad_input_names_the_argument(kwargs, match):
    args = dict(hidden=torch.randn(6, 8), weight=torch.randn(10, 8), labels=torch.zeros(6, dtype=torch.long))
    args.update(kwargs)
    hidden, weight, labels = args.pop("hidden"), args.pop("weight"), args.pop("labels")
    with pytest.raises((ValueError, TypeError), match=match):
        linear_logprobs(hidden, weight, labels, **args)


def test_backend_resolution(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_impl("auto", cpu) == "torch"
    assert resolve_impl("torch", cpu) == "torch"
    with pytest.raises(RuntimeError, match="impl='cuda' needs CUDA"):
        resolve_impl("cuda", cpu)
    with pytest.raises(ValueError, match="float64"):
        resolve_impl("triton", cpu, torch.float64)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1|triton"):
        resolve_impl("triton", cpu)


@pytest.mark.parametrize("impl", [b for b in backends() if b != "torch"])
def test_kernel_weight_gradient_is_staged_by_vocabulary_chunk(impl, monkeypatch):
    """For a bf16 weight the kernels' fp32 weight gradient lives one vocabulary chunk at a time (never [V, d] fp32),
    rounded into the bf16 output after each chunk: the same gradients as a single chunk."""
    monkeypatch.setattr(torch_lp, "TORCH_VOCAB_TILE", 64)
    n, v, d = 9, 300, 16
    hidden, weight, labels, b = make_inputs(n, v, d, torch.bfloat16, bias=True, ignore=(0,))
    upstream = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hidden, weight, labels, b = (t.to(device) for t in (hidden, weight, labels, b))
    upstream = upstream.to(device)

    def run():
        _, g = grads(lambda h, w, bb: linear_logprobs(h, w, labels, bias=bb, impl=impl), hidden, weight, b, upstream)
        return g

    one = run()  # the default cap holds all 300 rows of d = 16 in one chunk
    fwd, bwd = lp_mod._launchers(impl)
    seen = []

    def spy(*args, **kwargs):
        seen.append((tuple(kwargs["grad_weight"].shape), kwargs["grad_weight"].dtype))
        return bwd(*args, **kwargs)

    monkeypatch.setattr(lp_mod, "_launchers", lambda _: (fwd, spy))
    monkeypatch.setattr(lp_mod, "GRAD_WEIGHT_CHUNK_ELEMENTS", 64 * d)
    many = run()
    assert seen == [((64, d), torch.float32)] * 4 + [((44, d), torch.float32)]
    for name, a, c in zip(("hidden", "weight", "bias"), one, many):
        assert c.dtype == torch.bfloat16, name
        torch.testing.assert_close(c, a, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
