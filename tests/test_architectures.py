"""Log-probs, EntanglementMonitor and the per-token profiler on tiny float64 models of transformers' own architectures.

Each model comes from :func:`arch_models.tiny_arch` (transformers' config and model classes, no download), made
float64-exact (its float32 upcasts run in float64), so the bars are float64 ones:

- (a) ``preference_logprobs`` against the model's own forward logits (log_softmax, gather, sum; positions from the
  mask for left padding), 1e-10 relative;
- (b) one DPO step (unequal per-pair coefficients) under ``EntanglementMonitor``: ``inner``, ``chosen_sq_norm`` and
  ``rejected_sq_norm`` against explicit per-response autograd gradients through the plain logits
  (``flat_gradients_reference``), 1e-8 relative; the parameters' ``.grad`` equal to the unmonitored step's, 1e-12;
- (c) ``per_token_matrix`` against ``per_token_matrix_baseline`` (one backward per response token), 1e-8 relative.

Right and left padding; B = 3 pairs of different lengths (built-in pairs).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from arch_models import ARCHS, EXTRA_ARCHS, finite_difference_error, low_precision_ops, tiny_arch
from entangle_fast import EntanglementMonitor, preference_logprobs
from entangle_fast.models import BUILTIN_PAIRS, build_tokenizer, encode_pairs
from entangle_fast.profile import per_token_matrix, per_token_matrix_baseline
from entangle_fast.reference import entanglement_reference, flat_gradients_reference
from helpers import assert_exact64, left_padded

ALL_ARCHS = ARCHS + EXTRA_ARCHS
COEF = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)  # unequal per-pair weights
BETA = 0.1


def make_batch(padding: str, pairs=BUILTIN_PAIRS) -> dict:
    """``[2B, T]`` rows (chosen rows, then rejected rows), padded on the right or on the left."""
    batch = encode_pairs(build_tokenizer(), pairs)
    return left_padded(batch) if padding == "left" else batch


def logits_sequence_logps(model, batch) -> torch.Tensor:
    """``[2B]`` summed response log-probs through the model's own forward logits."""
    mask = batch["attention_mask"]
    logits = model(input_ids=batch["input_ids"], attention_mask=mask,
                   position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    labels = batch["labels"][:, 1:]
    token = torch.log_softmax(logits[:, :-1], -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return (token * (labels != -100)).sum(-1)


def dpo(sw, sl):
    return (COEF[: sw.shape[0]] * -F.logsigmoid(BETA * (sw - sl))).sum()


def fused_step(model, batch):
    out = preference_logprobs(model, batch)
    dpo(out.chosen_logps, out.rejected_logps).backward()


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_model_is_float64_exact(arch):
    """The test model itself: no non-float64 op on the gradient path, and a smooth gradient."""
    model = tiny_arch(arch)
    batch = make_batch("left")
    assert low_precision_ops(model, batch["input_ids"], batch["attention_mask"]) == []
    err = finite_difference_error(model, batch["input_ids"], batch["attention_mask"])
    assert err < 1e-7, f"{arch}: finite difference vs autograd relative error {err:.2e}"


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_logprobs_match_model_logits(arch, padding):
    model, batch = tiny_arch(arch), make_batch(padding)
    out = preference_logprobs(model, batch)
    with torch.no_grad():
        want = logits_sequence_logps(model, batch)
    b = want.shape[0] // 2
    assert_exact64(out.chosen_logps, want[:b], rtol=1e-10, name=f"{arch} chosen_logps")
    assert_exact64(out.rejected_logps, want[b:], rtol=1e-10, name=f"{arch} rejected_logps")


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_monitor_exact_against_per_response_gradients(arch, padding):
    model, batch = tiny_arch(arch), make_batch(padding)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = flat_gradients_reference(logits_sequence_logps(model, batch), params)
    b = grads.shape[0] // 2
    ref = entanglement_reference(grads[:b], grads[b:])

    model.zero_grad(set_to_none=True)
    fused_step(model, batch)
    plain = [p.grad.clone() for p in params]
    # Two steps with one monitor, as in training: on the second, position-wise modules checked on the first take
    # per-row views of their parameters, so their per-row gradients come from the step's own backward.
    mon = EntanglementMonitor(model)
    names = {id(p): n for n, p in model.named_parameters()}
    for step in range(2):
        model.zero_grad(set_to_none=True)
        with mon:
            fused_step(model, batch)
        for name, key in (("inner", "inner"), ("chosen_sq_norm", "chosen_sq_norm"),
                          ("rejected_sq_norm", "rejected_sq_norm")):
            assert_exact64(getattr(mon.stats, name), ref[key], rtol=1e-8, name=f"{arch} step {step} {name}")
        # Book-keeping forms the layers' weight gradients itself: equal to autograd's up to summation order, 1e-12
        # relative. A parameter whose gradient vanishes analytically (a key projection's bias: softmax ignores a
        # shift) holds rounding noise either way, so each parameter is measured against its module's gradient scale.
        module_scale: dict[str, float] = {}
        for p, g in zip(params, plain):
            owner = names[id(p)].rsplit(".", 1)[0]
            module_scale[owner] = max(module_scale.get(owner, 0.0), g.abs().max().item())
        for p, g in zip(params, plain):
            scale = module_scale[names[id(p)].rsplit(".", 1)[0]]
            err = (p.grad - g).abs().max().item()
            assert err <= 1e-12 * max(scale, 1e-300), \
                f"{arch} step {step} {names[id(p)]}: .grad differs by {err:.3e} (scale {scale:.3e})"


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_profile_token_matrix_against_per_token_loop(arch):
    """Pair 1 (chosen and rejected of 6 response tokens), left-padded to the width of all built-in pairs."""
    model, full = tiny_arch(arch), make_batch("left")
    b = full["input_ids"].shape[0] // 2
    batch = {k: v[[1, b + 1]].clone() for k, v in full.items()}
    want = per_token_matrix_baseline(model, batch)
    got = per_token_matrix(model, batch)
    assert_exact64(got.matrix, want, rtol=1e-8, name=f"{arch} K")


@pytest.mark.parametrize("arch", ["gemma3", "qwen3"])
def test_position_attribution_with_per_head_norms(arch):
    """q/k norms see [rows, positions, heads, d] (Qwen3) or [rows, heads, positions, d] (Gemma 3): their items land on
    their own positions, so the attribution sums to I and is zero on left padding."""
    model, batch = tiny_arch(arch), make_batch("left")
    with EntanglementMonitor(model, position_attribution=True) as mon:
        fused_step(model, batch)
    stats = mon.stats
    assert_exact64(stats.position_attribution.sum((1, 2)), stats.inner, rtol=1e-8, name=f"{arch} attribution total")
    b = stats.inner.shape[0]
    mask = batch["attention_mask"].bool()
    width = stats.position_attribution.shape[1]
    for i in range(b):
        pad_w, pad_l = ~mask[i, :width], ~mask[b + i, :width]
        att = stats.position_attribution[i]
        assert att[pad_w].abs().sum() == 0 and att[:, pad_l].abs().sum() == 0, f"{arch}: attribution on padding"
