"""linear_logprobs under a logit transform (scale, soft-cap) and its token metrics, against float64 references.

Every quantity is checked against ``entangle_fast.reference`` (materialised logits, autograd gradients, one backward
per token for the token statistics): float64 on the PyTorch path to 1e-12, and on each backend a CPU run reaches
(Triton through ``TRITON_INTERPRET=1``) by the tolerance rule against plain PyTorch in the same precision.
"""
import pytest
import torch

from entangle_fast import linear_logprobs, output_layer_token_stats
from entangle_fast.logit_transform import LogitTransform
from entangle_fast.logprobs import TokenMetrics
from entangle_fast.reference import (
    linear_logprobs_reference,
    output_layer_token_stats_reference,
    token_metrics_reference,
    transformed_logits_reference,
)
from helpers import assert_close_to_reference, assert_exact64, backends, first_index, small_vocab_tiles

# Granite divides by logits_scaling (8), Cohere multiplies by logit_scale (0.0625 in Command-R; 3.0 here makes the
# scale matter at test sizes), Gemma 2/3 soft-cap (30; 2.0 here so tanh is far from linear on logits of a few units).
TRANSFORMS = {
    "granite": LogitTransform(scale=1 / 8),
    "cohere": LogitTransform(scale=3.0),
    "softcap": LogitTransform(softcap=2.0),
    "scale+softcap": LogitTransform(scale=1.7, softcap=3.0),
}
TF_IDS = list(TRANSFORMS)


def make_inputs(n, v, d, dtype, *, bias=True, seed=0, ignore=(), lead=None):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, dtype=torch.float64)
    weight = torch.randn(v, d, generator=g, dtype=torch.float64) * (2.0 / d**0.5)
    b = torch.randn(v, generator=g, dtype=torch.float64) * 0.5 if bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    for i in ignore:
        labels[i] = -100
    if lead is not None:
        hidden, labels = hidden.view(*lead, d), labels.view(*lead)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(hidden), cast(weight), labels, cast(b)


def grads(fn, hidden, weight, bias, upstream):
    leaves = [t.detach().requires_grad_(True) for t in (hidden, weight) + ((bias,) if bias is not None else ())]
    out = fn(*leaves)
    return out, torch.autograd.grad((out.double() * upstream).sum(), leaves)


def ours_fn(labels, impl, tf):
    return lambda h, w, *bb: linear_logprobs(h, w, labels, bias=bb[0] if bb else None, impl=impl, transform=tf)


def ref_fn(labels, tf):
    return lambda h, w, *bb: linear_logprobs_reference(h, w, labels, bb[0] if bb else None, transform=tf)


# ---------------------------------------------------------------------------------------------------------------------
# The transform: log-probs and gradients
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tf", TF_IDS)
@pytest.mark.parametrize("n,v,d,bias", [(7, 100, 16, True), (33, 1001, 3, False), (1, 1, 3, True)])
def test_float64_transform_is_exact(tf, n, v, d, bias, monkeypatch):
    small_vocab_tiles(monkeypatch)
    transform = TRANSFORMS[tf]
    hidden, weight, labels, b = make_inputs(n, v, d, torch.float64, bias=bias, ignore=(0,) if n > 2 else ())
    upstream = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ours, g_ours = grads(ours_fn(labels, "torch", transform), hidden, weight, b, upstream)
    ref, g_ref = grads(ref_fn(labels, transform), hidden, weight, b, upstream)
    plain = linear_logprobs_reference(hidden, weight, labels, b)
    if v > 1:
        assert (ref - plain).abs().max() > 1e-3, "the transform should change the log-probs at this size"
    assert_exact64(ours, ref, rtol=1e-12, name=f"{tf} logprobs")
    for name, a, e in zip(("hidden", "weight", "bias"), g_ours, g_ref):
        assert_exact64(a, e, rtol=1e-12, name=f"{tf} grad {name}")


@pytest.mark.parametrize("impl", backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tf", ["granite", "scale+softcap"])
def test_transform_low_precision_no_worse_than_pytorch(impl, dtype, tf):
    transform = TRANSFORMS[tf]
    n, v, d = 9, 129, 16
    hidden, weight, labels, b = make_inputs(n, v, d, dtype, ignore=(n - 1,), seed=2)
    upstream = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ours, g_ours = grads(lambda h, w, bb: linear_logprobs(h, w, labels, bias=bb, impl=impl, transform=transform),
                         hidden, weight, b, upstream)
    lowp, g_lowp = grads(lambda h, w, bb: linear_logprobs_reference(h, w, labels, bb, transform=transform),
                         hidden, weight, b, upstream)
    exact, g_exact = grads(lambda h, w, bb: linear_logprobs_reference(h, w, labels, bb, transform=transform),
                           hidden.double(), weight.double(), b.double(), upstream)
    assert ours.dtype == torch.float32
    assert_close_to_reference(ours, exact, lowp, margin=4e-7 * exact.abs().max().item(), name=f"{impl} {tf} logprobs")
    for name, a, e, p in zip(("hidden", "weight", "bias"), g_ours, g_exact, g_lowp):
        assert a.dtype == dtype, f"grad {name} dtype {a.dtype}"
        assert_close_to_reference(a, e, p, margin=4e-7 * e.abs().max().item(), name=f"{impl} {tf} grad {name}")


def test_identity_transform_is_the_plain_op():
    hidden, weight, labels, b = make_inputs(7, 100, 16, torch.float32)
    plain = linear_logprobs(hidden, weight, labels, bias=b, impl="torch")
    same = linear_logprobs(hidden, weight, labels, bias=b, impl="torch", transform=LogitTransform())
    assert torch.equal(plain, same)


def test_bad_transform_names_the_argument():
    hidden, weight, labels, b = make_inputs(4, 10, 8, torch.float32)
    with pytest.raises(TypeError, match="transform must be"):
        linear_logprobs(hidden, weight, labels, transform=30.0)
    with pytest.raises(TypeError, match="transform must be"):
        output_layer_token_stats(hidden.view(2, 2, 8), weight, labels.view(2, 2), transform={"softcap": 30.0})


# ---------------------------------------------------------------------------------------------------------------------
# Token metrics
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tf", [None] + TF_IDS)
@pytest.mark.parametrize("n,v,d", [(7, 100, 16), (33, 1001, 3), (1, 1, 3)])
def test_float64_metrics_are_exact(tf, n, v, d, monkeypatch):
    small_vocab_tiles(monkeypatch)
    transform = TRANSFORMS.get(tf)
    hidden, weight, labels, b = make_inputs(n, v, d, torch.float64, ignore=(0,) if n > 2 else (), lead=(1, n))
    logprobs, metrics = linear_logprobs(hidden, weight, labels, bias=b, impl="torch", transform=transform,
                                        token_metrics=True)
    assert isinstance(metrics, TokenMetrics)
    ref = token_metrics_reference(hidden, weight, b, transform=transform)
    assert metrics.entropy.shape == metrics.logit_sum.shape == metrics.argmax.shape == labels.shape
    assert metrics.entropy.dtype == metrics.logit_sum.dtype == torch.float64 and metrics.argmax.dtype == torch.int64
    # Ignored positions (row 0) carry defined values too.
    assert_exact64(metrics.entropy, ref["entropy"], rtol=1e-12, name=f"{tf} entropy")
    assert_exact64(metrics.logit_sum, ref["logit_sum"], rtol=1e-12, name=f"{tf} logit_sum")
    assert torch.equal(metrics.argmax, ref["argmax"]), f"argmax first differs at {first_index(metrics.argmax != ref['argmax'])}"
    assert torch.equal(logprobs, linear_logprobs(hidden, weight, labels, bias=b, impl="torch", transform=transform))


@pytest.mark.parametrize("impl", backends())
def test_argmax_ties_take_the_lowest_index(impl, monkeypatch):
    """Equal maxima in different vocabulary tiles (and splits): the lowest index wins, as in torch.argmax."""
    small_vocab_tiles(monkeypatch)
    n, v, d = 5, 300, 16
    hidden, weight, labels, b = make_inputs(n, v, d, torch.float32, seed=4)
    top = torch.argmax(transformed_logits_reference(hidden, weight, b), dim=-1)
    for i, a in enumerate(top.tolist()):  # copy each row's winner to a lower and a higher index, in other tiles
        for j in ((a + 97) % v, (a + 211) % v):
            weight[j], b[j] = weight[a], b[a]
    z = transformed_logits_reference(hidden.double(), weight.double(), b.double())
    want = torch.argmax(z, dim=-1)
    assert ((z == z.max(-1, keepdim=True).values).sum(-1) >= 2).all(), "the test needs real ties"
    _, metrics = linear_logprobs(hidden, weight, labels, bias=b, impl=impl, token_metrics=True)
    assert metrics.argmax.tolist() == want.tolist()


@pytest.mark.parametrize("impl", backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tf", [None, "scale+softcap"])
def test_metrics_low_precision_no_worse_than_pytorch(impl, dtype, tf):
    transform = TRANSFORMS.get(tf)
    n, v, d = 13, 257, 16
    hidden, weight, labels, b = make_inputs(n, v, d, dtype, ignore=(0, 5), seed=5)
    logprobs, metrics = linear_logprobs(hidden, weight, labels, bias=b, impl=impl, transform=transform,
                                        token_metrics=True)
    exact = token_metrics_reference(hidden.double(), weight.double(), b.double(), transform=transform)
    lowp = token_metrics_reference(hidden, weight, b, transform=transform)
    for key in ("entropy", "logit_sum"):
        got = getattr(metrics, key)
        assert got.dtype == torch.float32, f"{key} dtype {got.dtype}"
        assert_close_to_reference(got, exact[key], lowp[key], margin=1e-6 * exact[key].abs().max().item(),
                                  name=f"{impl} {dtype} {tf} {key}")
    # The argmax picks a maximum of z up to the rounding PyTorch's own logits carry.
    z64 = transformed_logits_reference(hidden.double(), weight.double(), b.double(), transform=transform)
    z_lowp = transformed_logits_reference(hidden, weight, b, transform=transform).double()
    slack = 2 * (z_lowp - z64).abs().max().item() + 1e-6
    shortfall = z64.max(-1).values - z64.gather(-1, metrics.argmax[:, None]).squeeze(-1)
    assert (shortfall <= slack).all(), f"argmax off the maximum by {shortfall.max().item():.3e} > {slack:.3e}"
    plain = linear_logprobs(hidden, weight, labels, bias=b, impl=impl, transform=transform)
    torch.testing.assert_close(logprobs, plain, rtol=1e-6, atol=1e-6)


def test_metrics_carry_no_gradient_and_gradients_are_unchanged():
    hidden, weight, labels, b = make_inputs(6, 50, 8, torch.float32, lead=(2, 3))
    h = hidden.clone().requires_grad_(True)
    logprobs, metrics = linear_logprobs(h, weight, labels, bias=b, impl="torch", token_metrics=True)
    assert logprobs.requires_grad
    assert not any(t.requires_grad for t in (metrics.entropy, metrics.logit_sum, metrics.argmax))
    logprobs.sum().backward()
    h2 = hidden.clone().requires_grad_(True)
    linear_logprobs(h2, weight, labels, bias=b, impl="torch").sum().backward()
    assert torch.equal(h.grad, h2.grad)


def test_return_layout_with_token_stats_and_metrics():
    hidden, weight, labels, b = make_inputs(8, 40, 8, torch.float64, lead=(2, 4))
    out = linear_logprobs(hidden, weight, labels, bias=b, token_stats=True, token_metrics=True)
    assert len(out) == 3 and isinstance(out[2], TokenMetrics) and hasattr(out[1], "ready")
    empty = linear_logprobs(hidden[:, :0], weight, labels[:, :0], token_metrics=True)
    assert empty[0].shape == (2, 0) and empty[1].entropy.shape == (2, 0) and empty[1].argmax.dtype == torch.int64


# ---------------------------------------------------------------------------------------------------------------------
# Output-layer token statistics under a transform
# ---------------------------------------------------------------------------------------------------------------------

KEYS = {"token_matrix": "K_wl", "hidden_gram": "hidden_gram", "chosen_matrix": "K_ww", "rejected_matrix": "K_ll"}
SCALARS = ("inner", "chosen_sq_norm", "rejected_sq_norm", "cosine")


def stats_rows(dtype, seed=0, bias=True):
    hidden, weight, labels, b = make_inputs(6 * 7, 300, 5, dtype, bias=bias, seed=seed, lead=(6, 7))
    labels[0, :3] = -100
    labels[4, 2:] = -100
    return hidden, weight, labels, b


@pytest.mark.parametrize("tf", TF_IDS)
@pytest.mark.parametrize("bias", [True, False])
def test_float64_token_stats_under_transform(tf, bias, monkeypatch):
    small_vocab_tiles(monkeypatch)
    transform = TRANSFORMS[tf]
    hidden, weight, labels, b = stats_rows(torch.float64, bias=bias)
    h = hidden.clone().requires_grad_(True)
    logps, handle = linear_logprobs(h, weight, labels, bias=b, token_stats=True, full_matrices=True, impl="torch",
                                    transform=transform)
    logps.sum().backward()
    stats = handle.stats
    pairs = [(0, 3), (1, 4), (2, 5)]
    ref = output_layer_token_stats_reference(hidden, weight, labels, pairs, b, transform=transform)
    plain = output_layer_token_stats_reference(hidden, weight, labels, pairs, b)
    assert (ref[0]["K_wl"] - plain[0]["K_wl"]).abs().max() > 1e-3 * plain[0]["K_wl"].abs().max()
    for i, r in enumerate(ref):
        p = stats.pair(i)
        for ours, theirs in KEYS.items():
            assert_exact64(p[ours], r[theirs], rtol=1e-11, name=f"{tf} pair {i} {ours}")
        for key in SCALARS:
            assert_exact64(getattr(stats, key)[i], r[key], rtol=1e-11, name=f"{tf} pair {i} {key}")
    standalone = output_layer_token_stats(hidden, weight, labels, bias=b, full_matrices=True, transform=transform)
    for key in list(KEYS) + list(SCALARS):
        assert_exact64(getattr(standalone, key), getattr(stats, key), rtol=1e-13, name=f"standalone {key}")


def test_backward_record_carries_the_transform(monkeypatch):
    from entangle_fast.token_stats import register_stats_listener

    hidden, weight, labels, b = stats_rows(torch.float64)
    seen = []
    handle = register_stats_listener(seen.append)
    try:
        linear_logprobs(hidden.requires_grad_(True), weight, labels, bias=b,
                        transform=TRANSFORMS["softcap"]).sum().backward()
    finally:
        handle.remove()
    assert len(seen) == 1 and seen[0].transform == TRANSFORMS["softcap"]


@pytest.mark.parametrize("impl", backends())
@pytest.mark.parametrize("tf", ["cohere", "scale+softcap"])
def test_float32_token_stats_under_transform(impl, tf, monkeypatch):
    small_vocab_tiles(monkeypatch)
    transform = TRANSFORMS[tf]
    hidden, weight, labels, b = stats_rows(torch.float32, seed=6)
    h = hidden.clone().requires_grad_(True)
    logps, handle = linear_logprobs(h, weight, labels, bias=b, token_stats=True, full_matrices=True, impl=impl,
                                    transform=transform)
    logps.sum().backward()
    pairs = [(0, 3), (1, 4), (2, 5)]
    ref64 = output_layer_token_stats_reference(hidden.double(), weight.double(), labels, pairs, b.double(),
                                               transform=transform)
    ref32 = output_layer_token_stats_reference(hidden, weight, labels, pairs, b, transform=transform)
    for i in range(len(pairs)):
        p = handle.stats.pair(i)
        for ours, theirs in KEYS.items():
            scale = ref64[i][theirs].abs().max().item()
            assert_close_to_reference(p[ours], ref64[i][theirs], ref32[i][theirs], margin=1e-6 * scale,
                                      name=f"{impl} {tf} pair {i} {ours}")
