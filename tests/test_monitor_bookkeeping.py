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


def _against_autograd(model, batch, plain: dict, booked):
    """The step with ``bookkeeping=False``: ``.grad`` bit-identical to the unmonitored step's ``plain``, statistics
    equal to the book-kept step's ``booked`` (1e-10). Returns the monitor."""
    model.zero_grad(set_to_none=True)
    with EntanglementMonitor(model, bookkeeping=False) as mon:
        _step(model, batch)
    for name, g in plain.items():
        assert torch.equal(dict(model.named_parameters())[name].grad, g), f"{name}: bookkeeping=False changed .grad"
    for key in ("inner", "chosen_sq_norm", "rejected_sq_norm"):
        assert_exact64(getattr(booked, key), getattr(mon.stats, key), rtol=1e-10, name=key)
    return mon


def _autocast_steps(model, batch, steps: int = 1):
    """Under bf16 autocast: the unmonitored step, then ``steps`` monitored ones with one monitor (the model's float64
    copy gives the reference gradient). Checks that the monitor's own reductions stayed float32 (``backward()`` ran
    inside the autocast region) and that every ``.grad`` is float32 and no further from the float64 gradient than the
    unmonitored step's. Returns the monitor."""
    import copy

    from helpers import assert_close_to_reference

    model64 = copy.deepcopy(model).double()
    _step(model64, batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _step(model, batch)
    plain = _grads(model)
    mon = EntanglementMonitor(model)
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16), mon:
            _step(model, batch)
    assert torch.isfinite(mon.stats.inner).all()
    assert {t.as_stack().dtype for t in mon._results.values()} == {torch.float32}
    params64 = dict(model64.named_parameters())
    for name, p in model.named_parameters():
        assert p.grad.dtype == torch.float32
        assert_close_to_reference(p.grad, params64[name].grad, plain[name], factor=2.0,
                                  margin=1e-3 * params64[name].grad.abs().max().item(), name=name)
    return mon


class _Watched:
    """A toy model's step on ``ids [6, T]`` (3 pairs; each row's log-prob of token 0, summed), watched by the
    monitor: ``ref`` the float64 reference of its statistics, ``plain`` the unmonitored step's ``.grad``."""

    def __init__(self, model, ids):
        from entangle_fast.reference import entanglement_reference, flat_gradients_reference

        self.model, self.ids = model, ids
        params = list(model.parameters())
        self.ref = entanglement_reference(*flat_gradients_reference(torch.cat(self.logps()), params).split(3))
        model.zero_grad(set_to_none=True)
        self._backward(*self.logps())
        self.plain = _grads(model)

    def logps(self):
        lp = torch.log_softmax(self.model(self.ids), -1)[..., 0].sum(-1)
        return lp[:3], lp[3:]

    @staticmethod
    def _backward(chosen, rejected):
        (chosen * COEF - rejected).sum().backward()

    def step(self, mon):
        """One monitored step; returns ``mon``."""
        self.model.zero_grad(set_to_none=True)
        with mon:
            chosen, rejected = self.logps()
            mon.watch(chosen, rejected)
            self._backward(chosen, rejected)
        return mon

    def check(self, mon, label: str = "") -> None:
        """Statistics exact (1e-10) and ``.grad`` equal to the unmonitored step's to float64 rounding (1e-12)."""
        for key in ("inner", "chosen_sq_norm", "rejected_sq_norm"):
            assert_exact64(getattr(mon.stats, key), self.ref[key], rtol=1e-10, name=f"{label}{key}")
        params = dict(self.model.named_parameters())
        for name, g in self.plain.items():
            assert_exact64(params[name].grad, g, rtol=1e-12, name=f"{label}{name} .grad")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_bookkept_gradients_and_statistics(arch, monkeypatch):
    model = tiny_model(arch, TINY, dtype=torch.float64)
    batch = encode_pairs(build_tokenizer(), BUILTIN_PAIRS)
    _step(model, batch)
    plain = _grads(model)

    calls = []
    for method in ("_bookkeep", "_bookkeep_embedding"):  # linear-like layers, embeddings
        real = getattr(monitor_mod.EntanglementMonitor, method)
        monkeypatch.setattr(monitor_mod.EntanglementMonitor, method,
                            lambda self, idx, *a, real=real: calls.append(self.coverage.entries[idx].module)
                            or real(self, idx, *a))
    model.zero_grad(set_to_none=True)
    with EntanglementMonitor(model) as mon:
        _step(model, batch)
    # The output head is book-kept when called as a module (the logits path); here the fused op forms its gradient.
    bookkept = [mon.coverage.entries[i].module for i in sorted(mon._bookkept) if i != mon.coverage.head]
    assert bookkept and sorted(map(id, calls)) == sorted(map(id, bookkept)), \
        "every book-kept layer formed its gradient once"
    assert any(isinstance(m, torch.nn.Embedding) for m in bookkept), "the token embedding is book-kept"
    for name, g in plain.items():
        assert_exact64(dict(model.named_parameters())[name].grad, g, rtol=1e-12, name=f"{name} .grad")
    assert not _against_autograd(model, batch, plain, mon.stats)._bookkept


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
    modules = list(model.modules())
    before = [vars(m).get("forward") for m in modules]  # the tiny model's norms have their own forward
    with pytest.raises(ValueError, match="boom"):
        with mon:
            # The norms, checked on the steps above, run on per-row views of their weights.
            swapped = [mon.coverage.entries[i].module for i in sorted(mon._bookkept | mon._row_param)]
            assert len(mon._row_param) == 2 * TINY.num_layers + 1
            assert all(vars(m).get("forward") is not old for m, old in zip(modules, before) if m in swapped)
            raise ValueError("boom")
    assert all(vars(m).get("forward") is old for m, old in zip(modules, before)), "a layer's forward was left swapped"


def test_bookkeeping_under_autocast():
    """Under bf16 autocast (TRL's and accelerate's mixed precision) book-kept layers take autocast's dtype, and their
    gradients are no further from the float64 gradient than the unmonitored autocast step's."""
    model = tiny_model("llama", TINY, dtype=torch.float32)
    mon = _autocast_steps(model, encode_pairs(build_tokenizer(), BUILTIN_PAIRS))
    assert mon._bookkept


class _ScaleShift(torch.nn.Module):
    """Position-wise, parameters used elementwise: per-row views of them broadcast correctly."""

    def __init__(self, d):
        super().__init__()
        self.weight = torch.nn.Parameter(1 + 0.1 * torch.randn(d, dtype=torch.float64))
        self.bias = torch.nn.Parameter(0.1 * torch.randn(d, dtype=torch.float64))

    def forward(self, x):
        return torch.tanh(x) * (1 + self.weight) + self.bias


class _MeanShift(torch.nn.Module):
    """Position-wise, but a parameter enters through its mean: per-row views would mix the rows' copies, so the
    first reduction's check must keep it on the per-row vjp."""

    def __init__(self, d):
        super().__init__()
        self.weight = torch.nn.Parameter(1 + 0.1 * torch.randn(d, dtype=torch.float64))

    def forward(self, x):
        return x * self.weight + self.weight.mean()


@pytest.mark.parametrize("cls", [_ScaleShift, _MeanShift, torch.nn.LayerNorm])
def test_positionwise_modules_on_per_row_views(cls):
    """From the second monitored step on, a position-wise module that was checked to take per-row copies of its
    parameters runs the step's own forward on per-row views of them, and its per-row gradients come out of the step's
    own backward; modules that fail the check (a parameter's mean, F.layer_norm's shape check) keep the vjp. The
    statistics stay exact and .grad stays equal to the unmonitored step's to float64 rounding either way."""
    from entangle_fast.monitor import register_positionwise
    from entangle_fast.monitor.kinds.positionwise import PositionwiseReducer

    if cls is not torch.nn.LayerNorm:
        register_positionwise(cls)
    torch.manual_seed(0)
    d, vocab = 6, 11
    model = torch.nn.Sequential(torch.nn.Embedding(vocab, d, dtype=torch.float64),
                                cls(d) if cls is not torch.nn.LayerNorm else cls(d, dtype=torch.float64),
                                torch.nn.Linear(d, vocab, dtype=torch.float64))
    norm = model[1]
    run = _Watched(model, torch.randint(0, vocab, (6, 5)))
    mon = EntanglementMonitor(model)
    for step in range(2):
        run.step(mon)
        on_views = mon.coverage.entries.index(next(e for e in mon.coverage.entries if e.module is norm)) in mon._row_param
        assert on_views == (step == 1 and cls is _ScaleShift)
        run.check(mon, f"step {step} ")
    assert PositionwiseReducer.takes_row_params(norm) == (cls is _ScaleShift)


class _TwoLookups(torch.nn.Module):
    """Token embedding with a padding id, plus a position embedding called with ``[1, T]`` ids (GPT-2's ``wpe``
    without position_ids): the first is book-kept, the second is captured by the hooks' path."""

    def __init__(self, vocab, d, width):
        super().__init__()
        self.tok = torch.nn.Embedding(vocab, d, padding_idx=2, dtype=torch.float64)
        self.pos = torch.nn.Embedding(width, d, dtype=torch.float64)
        self.head = torch.nn.Linear(d, vocab, dtype=torch.float64)

    def forward(self, ids):
        return self.head(torch.tanh(self.tok(ids) + self.pos(torch.arange(ids.shape[1]).unsqueeze(0))))


def test_bookkept_embeddings_padding_and_broadcast_positions(monkeypatch):
    """A stock nn.Embedding forms its weight gradient in the monitor (sparse per-row gradients, the padding id
    getting none, as in F.embedding); one called on [1, T] ids falls back to the hooks' path. Statistics exact,
    .grad equal to the unmonitored step's to float64 rounding (the padding row's stays zero)."""
    torch.manual_seed(0)
    vocab, d, width = 9, 5, 6
    model = _TwoLookups(vocab, d, width)
    ids = torch.randint(0, vocab, (6, width))
    ids[:, -2:] = 2  # padding positions, and a repeated id within rows
    ids[0, 0] = ids[3, 1] = 7  # an id the chosen and the rejected row of pair 0 share
    run = _Watched(model, ids)
    assert run.plain["tok.weight"][2].abs().max() == 0

    formed = []
    real = monitor_mod.EntanglementMonitor._bookkeep_embedding
    monkeypatch.setattr(monitor_mod.EntanglementMonitor, "_bookkeep_embedding",
                        lambda self, idx, *a: formed.append(self.coverage.entries[idx].name) or real(self, idx, *a))
    mon = run.step(EntanglementMonitor(model))
    assert {"tok", "pos", "head"} <= {mon.coverage.entries[i].name for i in mon._bookkept}
    assert formed == ["tok"], "the [2B, T] lookup is book-kept, the broadcast [1, T] one is not"
    run.check(mon)
    assert model.tok.weight.grad[2].abs().max() == 0


def _moe(arch: str):
    from arch_models import _build_generic, keep_float64, tiny_arch

    if arch == "gpt_oss":  # transposed expert weights, biases, its own clamped gate
        model = _build_generic(arch, 0)
        keep_float64(model)
        return model.eval()
    return tiny_arch(arch)


@pytest.mark.parametrize("at_once", [True, False], ids=["all_experts_at_once", "expert_by_expert"])
@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_bookkept_experts(arch, at_once, monkeypatch):
    """transformers' experts modules (3-D expert weights) form their weight and bias gradients in the monitor, with
    the statistics from the same pass (every expert at once for small parameters, else expert by expert over ragged
    rows): ``.grad`` equal to the unmonitored step's to float64 rounding, statistics equal to the per-row replay's
    (``bookkeeping=False``)."""
    from entangle_fast.monitor.kinds import experts as X

    if not at_once:
        monkeypatch.setattr(X, "ALL_AT_ONCE", 0)
    model = _moe(arch)
    batch = encode_pairs(build_tokenizer(), BUILTIN_PAIRS)
    _step(model, batch)
    plain = _grads(model)
    experts = [m for m in model.modules() if X.is_experts(m)]
    assert len(experts) == 2

    formed = []
    real = monitor_mod.EntanglementMonitor._bookkeep_experts
    monkeypatch.setattr(monitor_mod.EntanglementMonitor, "_bookkeep_experts",
                        lambda self, idx, which, *a: formed.append((self.coverage.entries[idx].module, which))
                        or real(self, idx, which, *a))
    mon = EntanglementMonitor(model)
    for step in range(2):
        formed.clear()
        model.zero_grad(set_to_none=True)
        with mon:
            _step(model, batch)
        kept = {id(mon.coverage.entries[i].module) for i in mon._bookkept}
        assert all(id(m) in kept for m in experts), f"step {step}: the experts are book-kept"
        assert sorted((id(m), w) for m, w in formed) == sorted((id(m), w) for m in experts for w in (0, 1)), \
            "each expert projection formed its gradients once"
        for name, g in plain.items():
            assert_exact64(dict(model.named_parameters())[name].grad, g, rtol=1e-12, name=f"step {step} {name} .grad")
    booked = mon.stats
    replayed = _against_autograd(model, batch, plain, booked)
    for m in experts:
        name = next(n for n, mod in model.named_modules() if mod is m)
        assert_exact64(booked.per_module[name][0], replayed.stats.per_module[name][0], rtol=1e-10, name=f"{name} inner")


def test_experts_that_compute_otherwise_take_the_generic_path(monkeypatch):
    """An experts implementation whose output is not the eager algorithm's is found on the first monitored call: the
    module takes the per-row replay from then on, and the statistics stay exact."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, batched_mm_experts_forward

    from entangle_fast.monitor.kinds import experts as X
    from entangle_fast.reference import entanglement_reference, flat_gradients_reference

    monkeypatch.setitem(ALL_EXPERTS_FUNCTIONS._global_mapping, "halved",
                        lambda self, *args: 0.5 * batched_mm_experts_forward(self, *args))
    model = _moe("qwen3_moe")
    model.config._experts_implementation = "halved"
    batch = encode_pairs(build_tokenizer(), BUILTIN_PAIRS)
    out = preference_logprobs(model, batch)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = flat_gradients_reference(torch.cat([out.chosen_logps, out.rejected_logps]), params)
    ref = entanglement_reference(*grads.split(grads.shape[0] // 2))
    model.zero_grad(set_to_none=True)
    _step(model, batch)
    plain = _grads(model)

    mon = EntanglementMonitor(model)
    experts = [i for i, e in enumerate(mon.coverage.entries) if e.kind == "experts"]
    assert experts and all(i in mon._bookkept for i in experts), "book-kept until checked"
    for step in range(2):
        model.zero_grad(set_to_none=True)
        with mon:
            _step(model, batch)
        assert not any(i in mon._bookkept for i in experts)
        assert all(X.refused(mon.coverage.entries[i].module) for i in experts)
        for key in ("inner", "chosen_sq_norm", "rejected_sq_norm"):
            assert_exact64(getattr(mon.stats, key), ref[key], rtol=1e-8, name=f"step {step} {key}")
        for name, g in plain.items():
            assert_exact64(dict(model.named_parameters())[name].grad, g, rtol=1e-12, name=f"step {step} {name} .grad")


class _OneLinearCall(torch.nn.Module):
    """A generic module (no kind of its own) whose parameters enter through one F.linear call: book-kept."""

    def __init__(self, d):
        super().__init__()
        self.weight = torch.nn.Parameter(0.3 * torch.randn(d, d, dtype=torch.float64))
        self.bias = torch.nn.Parameter(0.1 * torch.randn(d, dtype=torch.float64))

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])  # flattened rows, as MoE routers take them
        return torch.tanh(torch.nn.functional.linear(flat, self.weight, self.bias)).view_as(x), self.weight.shape


class _TwoUses(_OneLinearCall):
    """One F.linear call, and the weight used again through a property that carries its gradient: refused."""

    def forward(self, x):
        y = torch.nn.functional.linear(x, self.weight, self.bias)
        return y + 0.1 * x * self.weight.T.diagonal()


class _Generic(torch.nn.Module):
    def __init__(self, vocab, d):
        super().__init__()
        self.tok = torch.nn.Embedding(vocab, d, dtype=torch.float64)
        self.one, self.two = _OneLinearCall(d), _TwoUses(d)
        self.head = torch.nn.Linear(d, vocab, dtype=torch.float64)

    def forward(self, ids):
        return self.head(self.two(self.one(self.tok(ids))[0]))


def test_linear_calls_of_generic_modules():
    """A generic module whose weight and bias enter only through one F.linear call (MoE routers) is book-kept through
    that call; one that also uses its weight otherwise is found on its first call and keeps the per-row replay.
    Statistics exact, .grad equal to the unmonitored step's to float64 rounding, on two steps."""
    from entangle_fast.monitor.kinds import rowwise as RW

    torch.manual_seed(0)
    vocab, d = 11, 6
    model = _Generic(vocab, d)
    run = _Watched(model, torch.randint(0, vocab, (6, 5)))
    mon = EntanglementMonitor(model)
    kinds = {e.name: e.kind for e in mon.coverage.entries}
    assert kinds["one"] == kinds["two"] == "rowwise"
    for step in range(2):
        run.step(mon)
        bookkept = {mon.coverage.entries[i].name for i in mon._bookkept}
        assert "one" in bookkept and "two" not in bookkept, f"step {step}: {sorted(bookkept)}"
        run.check(mon, f"step {step} ")
    assert RW._LINEAR_CALLS.get(model.one) is True and RW._LINEAR_CALLS.get(model.two) is False


def test_bookkept_experts_and_routers_under_autocast():
    """Under bf16 autocast the book-kept experts and routers take autocast's dtype in their products, and their
    gradients are no further from the float64 gradient than the unmonitored autocast step's."""
    from arch_models import _build

    model = _build("qwen3_moe", 0).float().eval()
    # Two steps: the second runs every module on its checked path.
    mon = _autocast_steps(model, encode_pairs(build_tokenizer(), BUILTIN_PAIRS), steps=2)
    names = {mon.coverage.entries[i].name for i in mon._bookkept}
    assert any(n.endswith("experts") for n in names) and any(n.endswith("mlp.gate") for n in names), sorted(names)


class _Reordered(_OneLinearCall):
    """One F.linear call, on its input reordered position-major ([T, R, d] with T = R): not routed, so refused."""

    def forward(self, x):
        return torch.nn.functional.linear(x.transpose(0, 1), self.weight, self.bias).transpose(0, 1), None


def test_linear_calls_need_the_rows_in_order():
    """A linear call on the module's input in another order (here [T, R, d] with T = R, which would split into rows
    all the same) is not routed: the module keeps the per-row replay and the statistics stay exact."""
    from entangle_fast.monitor.kinds import rowwise as RW

    torch.manual_seed(0)
    model = _Generic(11, 6)
    model.one = _Reordered(6)
    run = _Watched(model, torch.randint(0, 11, (6, 6)))  # as many positions as rows: a transposed input would split
    mon = EntanglementMonitor(model)
    for step in range(2):
        run.step(mon)
        run.check(mon, f"step {step} ")
    assert RW._LINEAR_CALLS.get(model.one) is False
    assert "one" not in {mon.coverage.entries[i].name for i in mon._bookkept}
