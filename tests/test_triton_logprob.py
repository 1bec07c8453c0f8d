"""Tests of the Triton launchers `logprob_fwd` / `logprob_bwd` (kernels/logprob.py).

Ground truth is `entangle_fast.reference.linear_logprobs_reference` in float64 (gradients through torch autograd);
the bar is plain PyTorch in the same dtype: the same reference on low-precision inputs (logits from one matmul in
that dtype, log-softmax in fp32). Without CUDA the kernels run under TRITON_INTERPRET=1 at small shapes.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must precede the first `import triton` in the process; tests/conftest.py does the same.
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton", reason="requires_triton: Triton is not installed")

from entangle_fast.kernels import HAS_TRITON, logprob_bwd, logprob_fwd  # noqa: E402
from helpers import assert_close_to_reference, launcher_inputs, launcher_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IGNORE = -100
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# (N, V, d, bias): odd sizes around the interpreter's 16 x 32 x 16 tiles, V = 1 included; bias
# toggled per shape rather than crossed with every shape, to keep the interpreter run short.
CASES = [
    (1, 1, 3, True),
    (7, 100, 64, True),
    (7, 100, 64, False),
    (129, 1001, 3, True),
    (7, 1001, 64, False),
    (129, 100, 64, True),
]


def _inputs(N, V, d, dtype, with_bias, seed, ignore_index=IGNORE):
    return launcher_inputs(N, V, d, dtype, with_bias, seed, device=DEVICE, ignore_index=ignore_index)


def _reference_grads(h, w, b, labels, g, ignore_index):
    """(logprobs, dL/dh, dL/dW, dL/db, R) of L = sum g * logprobs through the reference, in h's dtype."""
    out, gh, gw, gb, r, _ = launcher_reference(h, w, b, labels, g, ignore_index)
    return out, gh, gw, gb, r


def _truth_and_torch(h, w, b, labels, g, ignore_index=IGNORE):
    truth = _reference_grads(h.double(), w.double(), None if b is None else b.double(), labels, g.double(),
                             ignore_index)
    torch_same = _reference_grads(h, w, b, labels, g, ignore_index)
    return truth, torch_same


def _probs64(h, w, b, labels, ignore_index=IGNORE):
    logits = h.double() @ w.double().T
    if b is not None:
        logits = logits + b.double()
    p = torch.softmax(logits, dim=-1)
    return torch.where((labels != ignore_index)[:, None], p, torch.zeros_like(p))


def _probs_torch(h, w, b, labels, ignore_index=IGNORE):
    logits = h @ w.T
    if b is not None:
        logits = logits + b
    p = torch.softmax(logits.float(), dim=-1)
    return torch.where((labels != ignore_index)[:, None], p, torch.zeros_like(p))


def _zeros_like_grads(N, V, d, width, bias_grad=True, probs=True):
    z = dict(device=DEVICE, dtype=torch.float32)
    return dict(
        grad_hidden_unscaled=torch.zeros(N, d, **z),
        grad_weight=torch.zeros(V, d, **z),
        grad_bias=torch.zeros(V, **z) if bias_grad else None,
        # probs_out is overwritten, not accumulated: poison it so an unwritten element fails.
        probs_out=torch.full((N, width), float("nan"), **z) if probs else None,
    )


def _run_bwd(h, w, b, labels, lse, g, ranges, ignore_index=IGNORE):
    N, d = h.shape
    V = w.shape[0]
    out = _zeros_like_grads(N, V, d, V, bias_grad=b is not None, probs=False)
    del out["probs_out"]
    probs = []
    for start, end in ranges:
        p = torch.full((N, end - start), float("nan"), device=DEVICE, dtype=torch.float32)
        logprob_bwd(h, w, labels, b, lse, g, ignore_index, vocab_start=start, vocab_end=end, probs_out=p, **out)
        probs.append(p)
    out["probs_out"] = torch.cat(probs, dim=1)
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).removeprefix("torch."))
@pytest.mark.parametrize("N,V,d,with_bias", CASES,
                         ids=lambda c: ("bias" if c else "nobias") if isinstance(c, bool) else str(c))
def test_fwd_bwd_match_reference(N, V, d, with_bias, dtype):
    h, w, b, labels, g = _inputs(N, V, d, dtype, with_bias, seed=N * 7919 + V * 31 + d)
    truth, torch_same = _truth_and_torch(h, w, b, labels, g)

    logprobs, lse = logprob_fwd(h, w, labels, b, IGNORE)
    assert logprobs.dtype == torch.float32 and lse.dtype == torch.float32
    assert not torch.isnan(lse).any(), f"lse: NaN at {torch.nonzero(torch.isnan(lse))[0].tolist()}"
    assert_close_to_reference(logprobs, truth[0], torch_same[0], name="logprobs")
    assert (logprobs[labels == IGNORE] == 0).all(), "ignored rows must give exactly 0.0"

    out = _run_bwd(h, w, b, labels, lse, g, [(0, V)])
    assert_close_to_reference(out["grad_hidden_unscaled"], truth[4], torch_same[4], name="grad_hidden_unscaled")
    assert_close_to_reference(out["grad_weight"], truth[2], torch_same[2], name="grad_weight")
    if with_bias:
        assert_close_to_reference(out["grad_bias"], truth[3], torch_same[3], name="grad_bias")
    p64, p_torch = _probs64(h, w, b, labels), _probs_torch(h, w, b, labels)
    assert_close_to_reference(out["probs_out"], p64, p_torch, name="probs_out")
    assert (out["probs_out"][labels == IGNORE] == 0).all(), "ignored rows of probs_out must be 0.0"


@pytest.mark.parametrize("num_splits", [2, 5, 40])
def test_fwd_vocab_splits(num_splits):
    # 1001 columns are 32 interpreter tiles: 5 splits are uneven, 40 leave some splits empty.
    N, V, d = 33, 1001, 3
    h, w, b, labels, g = _inputs(N, V, d, torch.bfloat16, True, seed=num_splits)
    truth, torch_same = _truth_and_torch(h, w, b, labels, g)
    one_lp, one_lse = logprob_fwd(h, w, labels, b, IGNORE, num_splits=1)
    logprobs, lse = logprob_fwd(h, w, labels, b, IGNORE, num_splits=num_splits)
    assert_close_to_reference(logprobs, truth[0], torch_same[0], name="logprobs")
    torch.testing.assert_close(lse, one_lse, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logprobs, one_lp, rtol=1e-6, atol=1e-6)
    assert (logprobs[labels == IGNORE] == 0).all(), "ignored rows must give exactly 0.0"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda t: str(t).removeprefix("torch."))
def test_split_vocab_ranges_equal_one_call(dtype):
    N, V, d = 7, 1001, 64
    h, w, b, labels, g = _inputs(N, V, d, dtype, True, seed=11)
    _, lse = logprob_fwd(h, w, labels, b, IGNORE)
    whole = _run_bwd(h, w, b, labels, lse, g, [(0, V)])
    # Split points off the 32-column tile grid, and one empty range (a no-op).
    split = _run_bwd(h, w, b, labels, lse, g, [(0, 37), (37, 37), (37, 600), (600, V)])
    for key in whole:
        a, c = whole[key], split[key]
        # Same per-element math; only the order of fp32 atomic additions differs.
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")


def test_partial_range_touches_only_its_columns():
    N, V, d = 7, 100, 64
    h, w, b, labels, g = _inputs(N, V, d, torch.float32, True, seed=5)
    labels[1] = 3  # a label outside the range: its row still gets -p over the range
    _, lse = logprob_fwd(h, w, labels, b, IGNORE)
    out = _zeros_like_grads(N, V, d, 60 - 40)
    logprob_bwd(h, w, labels, b, lse, g, IGNORE, vocab_start=40, vocab_end=60, **out)
    outside = torch.ones(V, dtype=torch.bool, device=DEVICE)
    outside[40:60] = False
    assert (out["grad_weight"][outside] == 0).all(), "grad_weight rows outside [40, 60) were written"
    assert (out["grad_bias"][outside] == 0).all(), "grad_bias entries outside [40, 60) were written"
    p = _probs64(h, w, b, labels)[:, 40:60]
    torch.testing.assert_close(out["probs_out"].double(), p, rtol=1e-5, atol=1e-7)
    onehot = torch.zeros(N, V, dtype=torch.float64, device=DEVICE)
    live = labels != IGNORE
    onehot[live.nonzero()[:, 0], labels[live]] = 1.0
    du = (onehot[:, 40:60] - p) * live[:, None]
    torch.testing.assert_close(out["grad_hidden_unscaled"].double(), du @ w[40:60].double(), rtol=1e-5, atol=1e-6)


def test_range_sized_grad_weight_buffer():
    """grad_weight may hold only the range's rows (row 0 = vocab_start): the same sums as the [V, d] buffer's rows."""
    N, V, d = 7, 100, 64
    h, w, b, labels, g = _inputs(N, V, d, torch.float32, True, seed=6)
    labels[2] = 45
    _, lse = logprob_fwd(h, w, labels, b, IGNORE)
    full = _zeros_like_grads(N, V, d, 20)
    logprob_bwd(h, w, labels, b, lse, g, IGNORE, vocab_start=40, vocab_end=60, **full)
    ranged = dict(_zeros_like_grads(N, V, d, 20), grad_weight=torch.zeros(20, d, device=DEVICE))
    logprob_bwd(h, w, labels, b, lse, g, IGNORE, vocab_start=40, vocab_end=60, **ranged)
    torch.testing.assert_close(ranged["grad_weight"], full["grad_weight"][40:60], rtol=0, atol=0)
    torch.testing.assert_close(ranged["grad_hidden_unscaled"], full["grad_hidden_unscaled"], rtol=0, atol=0)
    with pytest.raises(ValueError, match="grad_weight"):
        logprob_bwd(h, w, labels, b, lse, g, IGNORE, vocab_start=40, vocab_end=60,
                    **dict(_zeros_like_grads(N, V, d, 20), grad_weight=torch.zeros(21, d, device=DEVICE)))


def test_all_labels_ignored():
    N, V, d = 7, 100, 3
    h, w, b, labels, g = _inputs(N, V, d, torch.float16, True, seed=3)
    labels.fill_(IGNORE)
    logprobs, lse = logprob_fwd(h, w, labels, b, IGNORE)
    assert (logprobs == 0).all(), f"logprobs of ignored rows: {logprobs.tolist()}"
    assert torch.isfinite(lse).all(), f"lse of ignored rows: {lse.tolist()}"
    out = _zeros_like_grads(N, V, d, V)
    logprob_bwd(h, w, labels, b, lse, g, IGNORE, vocab_start=0, vocab_end=V, **out)
    for key, t in out.items():
        assert (t == 0).all(), f"{key}: ignored rows contributed, first nonzero at {torch.nonzero(t)[0].tolist()}"


def test_custom_ignore_index_and_optional_outputs():
    N, V, d = 129, 100, 64
    h, w, b, labels, g = _inputs(N, V, d, torch.float32, False, seed=17, ignore_index=-1)
    truth, torch_same = _truth_and_torch(h, w, b, labels, g, ignore_index=-1)
    logprobs, lse = logprob_fwd(h, w, labels, b, -1)
    assert_close_to_reference(logprobs, truth[0], torch_same[0], name="logprobs")
    gh = torch.zeros(N, d, device=DEVICE)
    logprob_bwd(h, w, labels, b, lse, g, -1, grad_hidden_unscaled=gh, grad_weight=None, grad_bias=None,
                vocab_start=0, vocab_end=V, probs_out=None)
    assert_close_to_reference(gh, truth[4], torch_same[4], name="grad_hidden_unscaled")


def test_bwd_accumulates_into_existing_values():
    N, V, d = 7, 100, 64
    h, w, b, labels, g = _inputs(N, V, d, torch.float32, True, seed=23)
    _, lse = logprob_fwd(h, w, labels, b, IGNORE)
    fresh = _run_bwd(h, w, b, labels, lse, g, [(0, V)])
    gen = torch.Generator().manual_seed(1)
    start = {k: torch.randn(fresh[k].shape, generator=gen).to(DEVICE) for k in ("grad_hidden_unscaled", "grad_weight",
                                                                              "grad_bias")}
    bufs = {k: v.clone() for k, v in start.items()}
    logprob_bwd(h, w, labels, b, lse, g, IGNORE, vocab_start=0, vocab_end=V, probs_out=None, **bufs)
    for k in bufs:
        torch.testing.assert_close(bufs[k] - start[k], fresh[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")


def _bwd_kwargs(N, V, d):
    return _zeros_like_grads(N, V, d, V) | dict(vocab_start=0, vocab_end=V)


@pytest.mark.parametrize(
    "case, match",
    [
        ("hidden_noncontig", "hidden"),
        ("weight_dtype", "weight"),
        ("labels_int32", "labels"),
        ("bias_shape", "bias"),
        ("hidden_fp64", "hidden"),
        ("num_splits_zero", "num_splits"),
    ],
)
def test_fwd_rejects_bad_inputs(case, match):
    h, w, b, labels, _ = _inputs(7, 100, 64, torch.float32, True, seed=1)
    kw = {}
    if case == "hidden_noncontig":
        h = torch.randn(64, 7, device=DEVICE).T
    elif case == "weight_dtype":
        w = w.half()
    elif case == "labels_int32":
        labels = labels.int()
    elif case == "bias_shape":
        b = b[:-1]
    elif case == "hidden_fp64":
        h, w, b = h.double(), w.double(), b.double()
    elif case == "num_splits_zero":
        kw["num_splits"] = 0
    with pytest.raises(ValueError, match=match):
        logprob_fwd(h, w, labels, b, IGNORE, **kw)


@pytest.mark.parametrize(
    "case, match",
    [
        ("grad_weight_shape", "grad_weight"),
        ("grad_hidden_dtype", "grad_hidden_unscaled"),
        ("probs_width", "probs_out"),
        ("lse_dtype", "lse"),
        ("range_past_V", "vocab_start, vocab_end"),
        ("range_reversed", "vocab_start, vocab_end"),
    ],
)
def test_bwd_rejects_bad_inputs(case, match):
    N, V, d = 7, 100, 64
    h, w, b, labels, g = _inputs(N, V, d, torch.float32, True, seed=1)
    lse = torch.zeros(N, device=DEVICE)
    kw = _bwd_kwargs(N, V, d)
    if case == "grad_weight_shape":
        kw["grad_weight"] = kw["grad_weight"][:, :-1].contiguous()
    elif case == "grad_hidden_dtype":
        kw["grad_hidden_unscaled"] = kw["grad_hidden_unscaled"].half()
    elif case == "probs_width":
        kw["probs_out"] = kw["probs_out"][:, :-1].contiguous()
    elif case == "lse_dtype":
        lse = lse.double()
    elif case == "range_past_V":
        kw["vocab_end"] = V + 1
    elif case == "range_reversed":
        kw["vocab_start"], kw["vocab_end"] = 50, 40
    with pytest.raises(ValueError, match=match):
        logprob_bwd(h, w, labels, b, lse, g, IGNORE, **kw)


def test_has_triton_flag():
    assert HAS_TRITON


# ---------------------------------------------------------------------------------------------------------------------
# Logit transform (scale, softcap) and token metrics at the launcher level
# ---------------------------------------------------------------------------------------------------------------------


def _transform_truth(h, w, b, labels, g, scale, softcap):
    """(logprobs, dL/dW, r, p, du, entropy, logit_sum, argmax) through the float64 reference with the transform; and
    the same through plain PyTorch in h's dtype."""
    from entangle_fast.logit_transform import LogitTransform
    from entangle_fast.reference import linear_logprobs_reference, token_metrics_reference, transformed_logits_reference

    tf = LogitTransform(scale, softcap or None)

    def run(h, w, b):
        leaves = [t.detach().clone().requires_grad_(True) for t in (h, w, b)]
        out = linear_logprobs_reference(*leaves[:2], labels, leaves[2], IGNORE, transform=tf)
        gw = torch.autograd.grad((g.to(out.dtype) * out).sum(), leaves[1], retain_graph=True)[0]
        r = torch.autograd.grad(out.sum(), leaves[0], retain_graph=True)[0]
        # du = dlp/dl for every row at once: the gradient of sum lp w.r.t. the pre-transform logits.
        logits = (leaves[0] @ leaves[1].T + leaves[2]).to(out.dtype).detach().requires_grad_(True)
        z = tf(logits)
        lp = torch.log_softmax(z, -1).gather(-1, labels.clamp(min=0)[:, None]).squeeze(-1) * (labels != IGNORE)
        (du,) = torch.autograd.grad(lp.sum(), logits)
        p = torch.softmax(z, -1).detach() * (labels != IGNORE)[:, None]
        met = token_metrics_reference(h, w, b, transform=tf)
        return out.detach(), gw, r, p, du, met["entropy"], met["logit_sum"], transformed_logits_reference(h, w, b,
                                                                                                         transform=tf)

    return run(h.double(), w.double(), b.double()), run(h, w, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda t: str(t).removeprefix("torch."))
@pytest.mark.parametrize("scale,softcap", [(0.125, 0.0), (1.7, 3.0)])
@pytest.mark.parametrize("num_splits", [1, 5, 40])
def test_transform_and_metrics_match_reference(dtype, scale, softcap, num_splits):
    N, V, d = 33, 1001, 16
    h, w, b, labels, g = _inputs(N, V, d, dtype, True, seed=int(scale * 10) + num_splits)
    truth, lowp = _transform_truth(h, w, b, labels, g, scale, softcap)
    lp, lse, ent, zsum, arg = logprob_fwd(h, w, labels, b, IGNORE, num_splits=num_splits, scale=scale,
                                          softcap=softcap, metrics=True)
    assert_close_to_reference(lp, truth[0], lowp[0], name="logprobs")
    assert_close_to_reference(ent, truth[5], lowp[5], margin=1e-6, name="entropy")
    assert_close_to_reference(zsum, truth[6], lowp[6], margin=1e-6 * truth[6].abs().max().item(), name="logit_sum")
    z64, z_low = truth[7], lowp[7].double()
    slack = 2 * (z_low - z64).abs().max().item() + 1e-6
    shortfall = z64.max(-1).values - z64.gather(-1, arg[:, None]).squeeze(-1)
    assert arg.dtype == torch.int64 and (shortfall <= slack).all(), f"argmax off by {shortfall.max().item():.3e}"
    plain_lp, plain_lse = logprob_fwd(h, w, labels, b, IGNORE, num_splits=num_splits, scale=scale, softcap=softcap)
    torch.testing.assert_close(plain_lse, lse, rtol=0, atol=0)

    out = _zeros_like_grads(N, V, d, V)
    delta = torch.full((N, V), float("nan"), device=DEVICE)
    logprob_bwd(h, w, labels, b, lse, g, IGNORE, vocab_start=0, vocab_end=V, scale=scale, softcap=softcap,
                delta_out=delta, **out)
    assert_close_to_reference(out["grad_weight"], truth[1], lowp[1], name="grad_weight")
    assert_close_to_reference(out["grad_hidden_unscaled"], truth[2], lowp[2], name="grad_hidden_unscaled")
    assert_close_to_reference(out["probs_out"], truth[3], lowp[3], name="probs_out")
    assert_close_to_reference(delta, truth[4], lowp[4], name="delta_out")
    assert (delta[labels == IGNORE] == 0).all(), "ignored rows of delta_out must be 0.0"


def test_metrics_argmax_ties_across_splits():
    """The same maximum in several splits: the lowest index wins, as torch.argmax."""
    N, V, d = 4, 1001, 16
    h, w, b, labels, _ = _inputs(N, V, d, torch.float32, True, seed=8)
    top = torch.argmax(h @ w.T + b, dim=-1)
    for a in top.tolist():
        for j in ((a + 300) % V, (a + 700) % V):
            w[j], b[j] = w[a], b[a]
    want = torch.argmax(h.double() @ w.double().T + b.double(), dim=-1)
    for splits in (1, 7, 40):
        *_, arg = logprob_fwd(h, w, labels, b, IGNORE, num_splits=splits, metrics=True)
        assert arg.tolist() == want.tolist(), f"{splits} splits"


@pytest.mark.parametrize("kw, match", [(dict(scale=0.0), "scale"), (dict(softcap=-1.0), "softcap"),
                                       (dict(scale=float("nan")), "scale")])
def test_transform_scalars_are_checked(kw, match):
    h, w, b, labels, _ = _inputs(7, 100, 16, torch.float32, True, seed=1)
    with pytest.raises(ValueError, match=match):
        logprob_fwd(h, w, labels, b, IGNORE, **kw)
