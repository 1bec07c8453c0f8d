"""Book-keeping: the monitor forms the linear layers' weight gradients itself (docs/math.md section 4.2).

Against the unmonitored step: ``.grad`` equal to float64 rounding by default, bit-identical with
``bookkeeping=False``; autograd forms no weight gradient of a book-kept layer; gradient hooks, accumulation over
micro-steps and activation checkpointing keep working; the layers' forwards are restored on exit and on an exception.
"""
from __future__ import annotations

import pytest
import torch

import entangle_fast.monitor.monitor as monitor_mod
from entangle_fast import preference_logprobs
from entangle_fast.models import BUILTIN_PAIRS, TinyConfig, build_tokenizer, encode_pairs, tiny_model
from entangle_fast.monitor import EntanglementMonitor
from helpers import assert_exact64

TINY = TinyConfig(hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=24)
COEF = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)


def _step(model, batch):
    out = preference_logprobs(model, batch)
    (-(COEF * torch.nn.functional.logsigmoid(0.1 * (out.chosen_logps - out.rejected_logps)))).sum().backward()


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_bookkept_gradients_and_statistics(arch, monkeypatch):
    model = tiny_model(arch, TINY, dtype=torch.float64)
    batch = encode_pairs(build_tokenizer(), BUILTIN_PAIRS)
    _step(model, batch)
    plain = _grads(model)

    calls = []
    real = monitor_mod.EntanglementMonitor._bookkeep
    monkeypatch.setattr(monitor_mod.EntanglementMonitor, "_bookkeep", lambda self, idx, *a: calls.append(self.coverage.entries[idx].module) or real(self, idx, *a))
    model.zero_grad(set_to_none=True)
    with EntanglementMonitor(model) as mon:
        _step(model, batch)
    # The output head is book-kept when called as a module (the logits path); here the fused op forms its gradient.
    bookkept = [mon.coverage.entries[i].module for i in sorted(mon._bookkept) if i != mon.coverage.head]
    assert bookkept and sorted(map(id, calls)) == sorted(map(id, bookkept)), \
        "every book-kept layer formed its gradient once"
    for name, g in plain.items():
        assert_exact64(dict(model.named_parameters())[name].grad, g, rtol=1e-12, name=f"{name} .grad")
    booked = mon.stats

    model.zero_grad(set_to_none=True)
    with EntanglementMonitor(model, bookkeeping=False) as mon:
        _step(model, batch)
    assert not mon._bookkept
    for name, g in plain.items():
        assert torch.equal(dict(model.named_parameters())[name].grad, g), f"{name}: bookkeeping=False changed .grad"
    for key in ("inner", "chosen_sq_norm", "rejected_sq_norm"):
        assert_exact64(getattr(booked, key), getattr(mon.stats, key), rtol=1e-10, name=key)


def test_accumulation_hooks_and_restored_forwards():
    model = tiny_model("llama", TINY, dtype=torch.float64)
    batch = encode_pairs(build_tokenizer(), BUILTIN_PAIRS)
    _step(model, batch)
    _step(model, batch)
    twice = _grads(model)

    model.zero_grad(set_to_none=True)
    seen = []
    handle = model.model.layers[0].mlp.down_proj.weight.register_hook(lambda g: seen.append(g.clone()))
    for _ in range(2):  # two micro-steps, one monitor each: .grad accumulates as without it
        with EntanglementMonitor(model) as mon:
            _step(model, batch)
        assert torch.isfinite(mon.stats.inner).all()
    handle.remove()
    assert len(seen) == 2, "a gradient hook on a book-kept weight fires once per backward"
    for name, g in twice.items():
        assert_exact64(dict(model.named_parameters())[name].grad, g, rtol=1e-12, name=f"{name} accumulated .grad")

    mon = EntanglementMonitor(model)
    layers = [mon.coverage.entries[i].module for i in mon._bookkept]
    with pytest.raises(ValueError, match="boom"):
        with mon:
            assert all("forward" in vars(m) for m in layers)
            raise ValueError("boom")
    assert not any("forward" in vars(m) for m in layers), "a book-kept layer's forward was left swapped"


def test_bookkeeping_under_autocast():
    """Under bf16 autocast (TRL's and accelerate's mixed precision) book-kept layers take autocast's dtype, and their
    gradients are no further from the float64 gradient than the unmonitored autocast step's."""
    import copy

    from helpers import assert_close_to_reference

    model = tiny_model("llama", TINY, dtype=torch.float32)
    batch = encode_pairs(build_tokenizer(), BUILTIN_PAIRS)
    model64 = copy.deepcopy(model).double()
    _step(model64, batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _step(model, batch)
    plain = _grads(model)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16), EntanglementMonitor(model) as mon:
        _step(model, batch)
    assert mon._bookkept and torch.isfinite(mon.stats.inner).all()
    params64 = dict(model64.named_parameters())
    for name, p in model.named_parameters():
        assert p.grad.dtype == torch.float32
        assert_close_to_reference(p.grad, params64[name].grad, plain[name], factor=2.0,
                                  margin=1e-3 * params64[name].grad.abs().max().item(), name=name)
