"""Mitigations (docs/math.md section 6) and the monitor's kept-factor book-keeping they rest on.

Ground truth: per-row gradients from one autograd backward per response (``flat_gradients_reference``), float64 tiny
models whose norms compute in float64 (``tiny_model(dtype=float64)``). The behavioural tests run on the demo's built-in
sentiment sets at a fixed seed; each first checks its own precondition (e.g. that DPO really moves both log-probs down
there) so a failure says which half broke.
"""
from __future__ import annotations

import pytest
import torch

from entangle_fast import preference_logprobs
from entangle_fast.demo import builtin_sets, encode_preference_batch, supervised_finetune
from entangle_fast.losses import dpo_loss
from entangle_fast.mitigations import (
    NormalizedPairwiseUpdate,
    SparseTokenMask,
    entanglement_token_weights,
    masked_sequence_logps,
    normalized_pairwise_gradients,
)
from entangle_fast.models import TinyConfig, build_tokenizer, tiny_model
from entangle_fast.monitor import EntanglementMonitor
from entangle_fast.reference import flat_gradients_reference
from helpers import assert_exact64

SETS = builtin_sets()
WORDS = sorted({w for s in SETS for ex in s.pairs for key in ex for w in ex[key].lower().split()})


def tiny(arch: str = "llama", seed: int = 0):
    tok = build_tokenizer(WORDS)
    size = TinyConfig(vocab_size=len(tok), hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1,
                      intermediate_size=32)
    return tiny_model(arch, size, seed=seed, dtype=torch.float64), tok


def long_suffix_batch(tok, n_pairs: int, set_index: int = 2) -> dict:
    return encode_preference_batch(tok, SETS[set_index].pairs[:n_pairs])


def row_gradients(model, batch, params) -> torch.Tensor:
    out = preference_logprobs(model, batch)
    return flat_gradients_reference(torch.cat([out.chosen_logps, out.rejected_logps]), params)


def dpo_step_with_monitor(model, batch, **kwargs) -> EntanglementMonitor:
    """One DPO forward/backward (reference = the policy itself) inside a keep_factors monitor."""
    model.zero_grad(set_to_none=True)
    mon = EntanglementMonitor(model, keep_factors=True, **kwargs)
    with mon:
        out = preference_logprobs(model, batch)
        dpo_loss(out.chosen_logps, out.rejected_logps, out.chosen_logps.detach(),
                 out.rejected_logps.detach()).losses.mean().backward()
    return mon


def flat(grads: dict, params) -> torch.Tensor:
    return torch.cat([grads[p].reshape(-1) if p in grads else torch.zeros(p.numel(), dtype=p.dtype) for p in params])


# ----------------------------------------------------------------------------------------------------------------------
# Kept factors: re-formed gradients and directional derivatives, exact in float64
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2: Conv1D, tied wte/lm_head through the fused head
def test_weighted_gradients_and_gradient_dot_match_per_row_autograd(arch):
    model, tok = tiny(arch)
    batch = long_suffix_batch(tok, 3, set_index=1)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = row_gradients(model, batch, params)
    b = grads.shape[0] // 2
    gen = torch.Generator().manual_seed(1)
    u, v = torch.randn(b, generator=gen, dtype=torch.float64), torch.randn(b, generator=gen, dtype=torch.float64)
    mon = dpo_step_with_monitor(model, batch)
    assert_exact64(flat(mon.weighted_gradients(u, v), params), u @ grads[:b] + v @ grads[b:], name="weighted")
    direction = {p: torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params}
    dw, dl = mon.gradient_dot(direction)
    assert_exact64(torch.cat([dw, dl]), grads @ flat(direction, params), name="gradient_dot")


def test_reformed_gradients_need_kept_factors_and_nonzero_coefficients():
    model, tok = tiny()
    batch = long_suffix_batch(tok, 2)
    mon = EntanglementMonitor(model)
    with mon:
        out = preference_logprobs(model, batch)
        dpo_loss(out.chosen_logps, out.rejected_logps, out.chosen_logps.detach(),
                 out.rejected_logps.detach()).losses.mean().backward()
    with pytest.raises(RuntimeError, match="keep_factors=True"):
        mon.weighted_gradients(torch.ones(2), torch.ones(2))
    mon = EntanglementMonitor(model, keep_factors=True)
    with mon:
        out = preference_logprobs(model, batch)
        (out.chosen_logps[0] - out.rejected_logps[0]).backward()  # pair 1 gets zero coefficients
    with pytest.raises(ValueError, match="zero loss coefficient"):
        mon.weighted_gradients(torch.ones(2), torch.zeros(2))
    with pytest.warns(UserWarning, match=r"pairs \[1\]"):
        grads = normalized_pairwise_gradients(mon)
    assert all(torch.isfinite(g).all() for g in grads.values())


# ----------------------------------------------------------------------------------------------------------------------
# Pairwise normalised gradient descent
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_normalized_gradient_equals_explicit_sum(arch):
    model, tok = tiny(arch)
    batch = long_suffix_batch(tok, 3)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = row_gradients(model, batch, params)
    b = grads.shape[0] // 2
    gw, gl = grads[:b], grads[b:]
    c = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    unit = gw / gw.norm(dim=1, keepdim=True) - gl / gl.norm(dim=1, keepdim=True)
    want = -(c[:, None] * unit).sum(0)

    mon = dpo_step_with_monitor(model, batch)
    assert_exact64(flat(normalized_pairwise_gradients(mon, c), params), want, name="normalised gradient")

    model.zero_grad(set_to_none=True)
    with NormalizedPairwiseUpdate(model, c=c) as update:
        out = preference_logprobs(model, batch)
        dpo_loss(out.chosen_logps, out.rejected_logps, out.chosen_logps.detach(),
                 out.rejected_logps.detach()).losses.mean().backward()
    assert_exact64(torch.cat([p.grad.reshape(-1) for p in params]), want, name=".grad written by the update")
    assert update.stats.cosine.shape == (b,)


def test_normalized_step_fixes_pairs_where_dpo_lowers_both():
    """Tiny float64 Llama, seed 1, SFT on the chosen long-suffix responses: there one DPO SGD step lowers both
    log-probs of every pair (case 2); one normalised step of the same length raises every chosen log-prob and lowers
    every rejected one, as the first-order prediction from the same backward says."""
    model, tok = tiny(seed=1)
    batch = long_suffix_batch(tok, 2)
    supervised_finetune(model, batch, 30, 1e-2, sides=("chosen",))
    model.eval()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    step_length = 1e-3

    def step(method: str):
        model.load_state_dict(start)
        mon = dpo_step_with_monitor(model, batch)
        with torch.no_grad():
            before = preference_logprobs(model, batch)
        grads = {p: p.grad for p in model.parameters()} if method == "dpo" else normalized_pairwise_gradients(mon)
        lr = step_length / torch.sqrt(sum((g * g).sum() for g in grads.values()))
        predicted = [-lr * d for d in mon.gradient_dot(grads)]
        with torch.no_grad():
            for p, g in grads.items():
                p.sub_(lr * g)
            after = preference_logprobs(model, batch)
        measured = (after.chosen_logps - before.chosen_logps, after.rejected_logps - before.rejected_logps)
        for pred, meas in zip(predicted, measured):
            assert torch.equal(torch.sign(pred), torch.sign(meas)), (method, pred, meas)
        return mon.stats, measured

    stats, (d_chosen, d_rejected) = step("dpo")
    assert stats.case.tolist() == [2, 2], f"precondition: DPO should be in case 2 here, got {stats.case.tolist()}"
    assert (d_chosen < 0).all() and (d_rejected < 0).all(), ("precondition: DPO lowers both", d_chosen, d_rejected)

    _, (d_chosen, d_rejected) = step("normalized")
    assert (d_chosen > 0).all(), f"normalised step: chosen changes {d_chosen.tolist()}"
    assert (d_rejected < 0).all(), f"normalised step: rejected changes {d_rejected.tolist()}"


# ----------------------------------------------------------------------------------------------------------------------
# Sparse token masking
# ----------------------------------------------------------------------------------------------------------------------


def contrastive_and_shared(weights: torch.Tensor, token_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights of the first response token of every row (the differing sentiment word) and of all the others."""
    rows = torch.arange(token_mask.shape[0])
    first = token_mask.float().argmax(1)
    shared = token_mask.clone()
    shared[rows, first] = False
    return weights[rows, first], weights[shared]


def test_masked_sums():
    gen = torch.Generator().manual_seed(0)
    lw, ll = torch.randn(2, 5, generator=gen), torch.randn(2, 5, generator=gen)
    w = torch.rand(4, 5, generator=gen)
    sw, sl = masked_sequence_logps(lw, ll, w)
    assert torch.allclose(sw, (w[:2] * lw).sum(1)) and torch.allclose(sl, (w[2:] * ll).sum(1))
    with pytest.raises(ValueError, match=r"\[2B, T\]"):
        masked_sequence_logps(lw, ll, w[:3])


def test_learned_mask_concentrates_on_the_contrastive_token():
    model, tok = tiny(seed=0)
    batch = long_suffix_batch(tok, 4)
    supervised_finetune(model, batch, 10, 1e-2)
    model.eval()
    with torch.no_grad():
        ref = preference_logprobs(model, batch)
    mask = SparseTokenMask(ref.token_mask, init=0.5, l1=0.02).double()
    assert torch.allclose(mask.weights()[ref.token_mask], torch.tensor(0.5, dtype=torch.float64))
    # Plain SGD; the logits' gradient is small (beta sigma / B times w (1 - w) times a token reward), hence their lr.
    opt = torch.optim.SGD([{"params": model.parameters(), "lr": 0.05}, {"params": mask.parameters(), "lr": 50.0}])
    for _ in range(60):
        out = preference_logprobs(model, batch)
        loss = dpo_loss(*mask.sequence_logps(out), *mask.sequence_logps(ref)).losses.mean() + mask.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
    contrastive, shared = contrastive_and_shared(mask.weights().detach(), ref.token_mask)
    assert contrastive.min() > 0.5, f"contrastive weights {contrastive.tolist()}"
    assert shared.max() < 0.25, f"largest shared-token weight {shared.max().item():.3f}"
    assert (mask.weights()[~ref.token_mask] == 0).all()


def test_entanglement_guided_weights_drop_shared_tokens():
    model, tok = tiny(seed=0)
    batch = long_suffix_batch(tok, 4)
    supervised_finetune(model, batch, 10, 1e-2)
    model.eval()
    out = preference_logprobs(model, batch, token_stats=True, full_matrices=True)
    dpo_loss(out.chosen_logps, out.rejected_logps, out.chosen_logps.detach(),
             out.rejected_logps.detach()).losses.mean().backward()
    st = out.token_stats.stats
    weights = entanglement_token_weights(st, out.chosen_token_logps.shape[1])
    contrastive, shared = contrastive_and_shared(weights, out.token_mask)
    assert contrastive.min() > 0.99, contrastive.tolist()
    assert shared.max() < 0.05, shared.max().item()
    assert (weights[~out.token_mask] == 0).all()
    for i in range(st.pairs.shape[0]):  # the masked cross term sum w_t w'_s K[t, s] turns negative
        p = st.pair(i)
        k = p["token_matrix"]
        masked = (weights[i, p["chosen_positions"]][:, None] * weights[4 + i, p["rejected_positions"]][None, :] * k)
        assert k.sum() > 0 > masked.sum(), (i, k.sum().item(), masked.sum().item())

    plain = preference_logprobs(model, batch, token_stats=True)
    plain.chosen_logps.sum().backward()
    with pytest.raises(ValueError, match="full_matrices=True"):
        entanglement_token_weights(plain.token_stats.stats, 4)
