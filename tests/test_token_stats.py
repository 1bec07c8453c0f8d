"""Output-layer token statistics from the fused backward against one autograd backward per token."""
import pytest
import torch

from entangle_fast import linear_logprobs, output_layer_token_stats, preference_logprobs
from entangle_fast.models import BUILTIN_PAIRS, TinyConfig, build_tokenizer, encode_pairs, tiny_model
from entangle_fast.preference import backbone_hidden_states, output_head
from entangle_fast.reference import output_layer_token_stats_reference
from helpers import assert_close_to_reference, assert_exact64, backends, small_vocab_tiles

KEYS = {"token_matrix": "K_wl", "hidden_gram": "hidden_gram", "chosen_matrix": "K_ww", "rejected_matrix": "K_ll"}
SCALARS = ("inner", "chosen_sq_norm", "rejected_sq_norm", "cosine")


def rows(r, t, d, v, dtype=torch.float64, *, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(r, t, d, generator=g, dtype=torch.float64)
    weight = torch.randn(v, d, generator=g, dtype=torch.float64) / d**0.5
    b = torch.randn(v, generator=g, dtype=torch.float64) if bias else None
    labels = torch.randint(0, v, (r, t), generator=g)
    cast = lambda x: None if x is None else x.to(dtype)  # noqa: E731
    return cast(hidden), cast(weight), labels, cast(b)


def stats_by_backward(hidden, weight, labels, bias, pairs=None, impl="torch", upstream=None):
    h = hidden.detach().requires_grad_(True)
    w = weight.detach().requires_grad_(True)
    b = bias.detach().requires_grad_(True) if bias is not None else None
    logps, handle = linear_logprobs(h, w, labels, bias=b, pairs=pairs, token_stats=True, full_matrices=True, impl=impl)
    upstream = torch.ones_like(logps) if upstream is None else upstream
    (logps * upstream).sum().backward()
    return handle.stats, (h.grad, w.grad, None if b is None else b.grad)


def check_against_reference(stats, ref, *, rtol=1e-9):
    for i, r in enumerate(ref):
        p = stats.pair(i)
        for ours, theirs in KEYS.items():
            assert_exact64(p[ours], r[theirs], rtol=rtol, name=f"pair {i} {ours}")
        for key in SCALARS:
            assert_exact64(getattr(stats, key)[i], r[key], rtol=rtol, name=f"pair {i} {key}")


@pytest.mark.parametrize("bias", [True, False])
def test_float64_matches_per_token_backward(bias, monkeypatch):
    small_vocab_tiles(monkeypatch)
    hidden, weight, labels, b = rows(6, 9, 5, 1001, bias=bias)
    labels[0, :4] = -100      # prompt
    labels[3, 7:] = -100      # right padding -> T_w != T_l
    labels[4, :8] = -100      # a response of length 1
    labels[2, 0] = labels[5, 0] = -100
    stats, _ = stats_by_backward(hidden, weight, labels, b)
    ref = output_layer_token_stats_reference(hidden, weight, labels, [(0, 3), (1, 4), (2, 5)], b)
    check_against_reference(stats, ref)
    assert stats.chosen_lengths.tolist() == [5, 9, 8] and stats.rejected_lengths.tolist() == [7, 1, 8]
    assert stats.chosen_positions[0, :5].tolist() == [4, 5, 6, 7, 8]


def test_explicit_pairs_and_identical_responses(monkeypatch):
    small_vocab_tiles(monkeypatch)
    hidden, weight, labels, b = rows(3, 7, 4, 300)
    hidden[2], labels[2] = hidden[0], labels[0]   # row 2 repeats row 0 token for token
    pairs = [(0, 2), (1, 0), (2, 1)]
    stats, _ = stats_by_backward(hidden, weight, labels, b, pairs=pairs)
    check_against_reference(stats, output_layer_token_stats_reference(hidden, weight, labels, pairs, b))
    # Responses sharing every token: K_wl = K_ww, so I = N_w = N_l and cos = 1.
    assert_exact64(stats.inner[0], stats.chosen_sq_norm[0], name="shared-token inner")
    assert abs(stats.cosine[0].item() - 1) < 1e-12


def test_standalone_equals_backward(monkeypatch):
    small_vocab_tiles(monkeypatch)
    hidden, weight, labels, b = rows(4, 6, 8, 129)
    via_backward, _ = stats_by_backward(hidden, weight, labels, b)
    standalone = output_layer_token_stats(hidden, weight, labels, bias=b, full_matrices=True)
    for key in list(KEYS) + list(SCALARS):
        assert torch.equal(getattr(standalone, key), getattr(via_backward, key)), key
    assert standalone.a_w is None and via_backward.a_w is not None


def test_recorded_upstream_is_dl_ds(monkeypatch):
    """a_w, a_l are the gradients the summed (or averaged) sequence log-probs received from the loss."""
    small_vocab_tiles(monkeypatch)
    hidden, weight, labels, b = rows(4, 5, 6, 77)
    labels[1, :2] = -100
    h = hidden.clone().requires_grad_(True)
    logps, handle = linear_logprobs(h, weight, labels, bias=b, token_stats=True)
    sums = logps.sum(-1)
    sums.retain_grad()
    margin = (sums[:2] - sums[2:]) * 0.1
    loss = -torch.nn.functional.logsigmoid(margin).sum()
    loss.backward()
    st = handle.stats
    assert_exact64(st.a_w, sums.grad[:2], name="a_w")
    assert_exact64(st.a_l, sums.grad[2:], name="a_l")
    assert bool(st.uniform_upstream.all())
    assert (st.a_w < 0).all() and (st.a_l > 0).all()


def test_gradients_unchanged_by_statistics(monkeypatch):
    small_vocab_tiles(monkeypatch)
    hidden, weight, labels, b = rows(4, 7, 8, 1001, dtype=torch.float32)
    upstream = torch.randn(4, 7)
    _, with_stats = stats_by_backward(hidden, weight, labels, b, upstream=upstream)
    leaves = [t.detach().requires_grad_(True) for t in (hidden, weight, b)]
    (linear_logprobs(leaves[0], leaves[1], labels, bias=leaves[2], impl="torch") * upstream).sum().backward()
    for name, a, e in zip(("hidden", "weight", "bias"), with_stats, leaves):
        assert torch.equal(a, e.grad), f"grad {name} changed by token_stats (torch path must be bit-identical)"


@pytest.mark.parametrize("impl", backends())
def test_float32_no_worse_than_pytorch(impl, monkeypatch):
    small_vocab_tiles(monkeypatch)
    hidden, weight, labels, b = rows(4, 6, 16, 300, dtype=torch.float32)
    labels[0, :2] = -100
    pairs = [(0, 2), (1, 3)]
    stats, grads_on = stats_by_backward(hidden, weight, labels, b, impl=impl)
    ref64 = output_layer_token_stats_reference(hidden.double(), weight.double(), labels, pairs, b.double())
    ref32 = output_layer_token_stats_reference(hidden, weight, labels, pairs, b)
    for i in range(2):
        p = stats.pair(i)
        for ours, theirs in KEYS.items():
            scale = ref64[i][theirs].abs().max().item()
            assert_close_to_reference(p[ours], ref64[i][theirs], ref32[i][theirs], margin=1e-6 * scale,
                                      name=f"{impl} pair {i} {ours}")
    if impl == "triton":  # gradients within rounding of the statistics-free run
        leaves = [t.detach().requires_grad_(True) for t in (hidden, weight, b)]
        linear_logprobs(leaves[0], leaves[1], labels, bias=leaves[2], impl=impl).sum().backward()
        for a, e in zip(grads_on, leaves):
            torch.testing.assert_close(a, e.grad, rtol=1e-5, atol=1e-6)


def test_token_stats_needs_rows_and_valid_pairs():
    hidden, weight, labels, b = rows(3, 4, 5, 11)
    with pytest.raises(ValueError, match="even number of rows"):
        linear_logprobs(hidden, weight, labels, token_stats=True)
    with pytest.raises(ValueError, match=r"\[R, T, d\]"):
        linear_logprobs(hidden[0], weight, labels[0], token_stats=True)
    with pytest.raises(ValueError, match="outside"):
        linear_logprobs(hidden, weight, labels, token_stats=True, pairs=[(0, 3)])
    _, handle = linear_logprobs(hidden, weight, labels, token_stats=True, pairs=[(0, 1)])
    with pytest.raises(RuntimeError, match="backward"):
        handle.stats


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_tiny_hf_model_head_statistics(arch):
    """On a real (tiny) model: the statistics of the fused backward equal per-token gradients of the head.

    GPT-2 ties wte and lm_head: the statistics cover the unembedding use only, i.e. gradients w.r.t. W with the hidden
    states held fixed; the full gradient of the tied matrix (embedding use included) differs.
    """
    tok = build_tokenizer()
    model = tiny_model(arch, TinyConfig(vocab_size=len(tok), hidden_size=16, num_layers=1), dtype=torch.float64)
    batch = encode_pairs(tok, BUILTIN_PAIRS)
    out = preference_logprobs(model, batch, token_stats=True, full_matrices=True)
    (out.chosen_logps.sum() - 0.5 * out.rejected_logps.sum()).backward()
    stats = out.token_stats.stats
    weight, bias = output_head(model)
    with torch.no_grad():
        hidden = backbone_hidden_states(model, batch["input_ids"], batch["attention_mask"])[:, :-1]
    labels = batch["labels"][:, 1:]
    b = len(BUILTIN_PAIRS)
    ref = output_layer_token_stats_reference(hidden, weight.detach(), labels, [(i, b + i) for i in range(b)], bias)
    check_against_reference(stats, ref)
    assert_exact64(stats.a_w, torch.ones(b, dtype=torch.float64), name="a_w")
    assert_exact64(stats.a_l, torch.full((b,), -0.5, dtype=torch.float64), name="a_l")
    if arch == "gpt2":
        assert model.transformer.wte.weight is weight
        model.zero_grad()
        out = preference_logprobs(model, {k: v[[0, b]] for k, v in batch.items()})
        g_w = torch.autograd.grad(out.chosen_logps.sum(), weight, retain_graph=True)[0]
        g_l = torch.autograd.grad(out.rejected_logps.sum(), weight)[0]
        tied_inner = (g_w * g_l).sum()
        assert abs(tied_inner.item() - stats.inner[0].item()) > 1e-6 * abs(stats.inner[0].item())


@pytest.mark.parametrize("bias", [True, False])
def test_sums_only_listener_float64_over_many_vocabulary_tiles(bias, monkeypatch):
    """A listener that asks for the pair sums only (``token_matrices=False``): the backward book-keeps the head's
    weight and bias gradients vocabulary tile by tile, its deltas formed in place in one tile-wide buffer. Over 16
    tiles the sums equal the float64 reference, and every gradient equals the plain backward's."""
    from entangle_fast.token_stats import register_stats_listener

    small_vocab_tiles(monkeypatch)
    hidden, weight, labels, b = rows(6, 7, 5, 1001, bias=bias)
    labels[0, :3] = -100
    labels[4, 5:] = -100
    upstream = torch.linspace(0.5, 1.5, 6, dtype=torch.float64)[:, None].expand(6, 7)
    _, plain = stats_by_backward(hidden, weight, labels, b, upstream=upstream)

    seen = []
    h = hidden.detach().requires_grad_(True)
    w = weight.detach().requires_grad_(True)
    bb = b.detach().requires_grad_(True) if b is not None else None
    handle = register_stats_listener(seen.append, token_matrices=False)
    try:
        logps = linear_logprobs(h, w, labels, bias=bb, impl="torch")
        (logps * upstream).sum().backward()
    finally:
        handle.remove()
    stats = seen[-1].stats
    assert stats.token_matrix is None
    ref = output_layer_token_stats_reference(hidden, weight, labels, [(0, 3), (1, 4), (2, 5)], b)
    for i, r in enumerate(ref):
        for key in ("inner", "chosen_sq_norm", "rejected_sq_norm"):
            assert_exact64(getattr(stats, key)[i], r[key], rtol=1e-10, name=f"pair {i} {key}")
    for got, want in zip((h.grad, w.grad, None if bb is None else bb.grad), plain):
        if want is not None:
            assert (got - want).abs().max() <= 1e-12 * want.abs().max()
