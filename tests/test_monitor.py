"""EntanglementMonitor against explicit per-sequence gradients (one autograd backward per response), in float64.

Tiny Llama, Qwen2 (q/k/v biases) and GPT-2 (Conv1D, tied embeddings) from entangle_fast.models; log-probs from the
fused op (preference_logprobs) and from plain logits + mon.watch(); left and right padding; B = 3 pairs.

Hugging Face's eager attention takes its softmax in float32 whatever the dtype, so a "float64" Llama/Qwen2 with eager
attention is float32-accurate in its backward: the tests run those models with SDPA, which stays in float64.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import entangle_fast.monitor.kinds.linear as linear_kind
import entangle_fast.monitor.monitor as monitor_mod
from entangle_fast import preference_logprobs
from entangle_fast.models import BUILTIN_PAIRS, TinyConfig, build_tokenizer, encode_pairs, tiny_model
from entangle_fast.monitor import EntanglementMonitor, UncoveredParametersError
from entangle_fast.token_stats import active_listeners
from entangle_fast.reference import entanglement_reference, flat_gradients_reference
from helpers import assert_exact64, left_padded

TINY = TinyConfig(hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=24)
COEF = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)  # unequal per-pair weights: a_w, a_l differ per pair
BETA = 0.1


def make_model(arch: str, seed: int = 0) -> nn.Module:
    return tiny_model(arch, TINY, seed=seed, dtype=torch.float64)


def make_batch(padding: str = "right", pairs=BUILTIN_PAIRS) -> dict:
    batch = encode_pairs(build_tokenizer(), pairs)
    return left_padded(batch) if padding == "left" else batch


def sequence_logps(model, batch, path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(chosen [B], rejected [B])`` summed response log-probs, through the fused op or through plain logits."""
    if path == "fused":
        out = preference_logprobs(model, batch)
        return out.chosen_logps, out.rejected_logps
    kwargs = {}
    if bool((batch["attention_mask"][:, 0] == 0).any()):  # left padding needs positions counted from the mask
        kwargs["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs).logits
    labels = batch["labels"][:, 1:]
    token = torch.log_softmax(logits[:, :-1], -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    sums = (token * (labels != -100)).sum(-1)
    b = sums.shape[0] // 2
    return sums[:b], sums[b:]


def dpo(sw, sl, coef=None):
    coef = COEF[: sw.shape[0]] if coef is None else coef
    return (coef * -F.logsigmoid(BETA * (sw - sl))).sum()


def monitored_step(model, batch, path, **monitor_kwargs):
    with EntanglementMonitor(model, **monitor_kwargs) as mon:
        sw, sl = sequence_logps(model, batch, path)
        if path == "logits":
            mon.watch(sw, sl)
        dpo(sw, sl).backward()
    return mon.stats


def per_row_gradients(model, batch, path, params) -> torch.Tensor:
    """``[2B, n]`` flattened gradients of every row's summed log-prob, one backward per response."""
    sw, sl = sequence_logps(model, batch, path)
    return flat_gradients_reference(torch.cat([sw, sl]), params)


def reference_stats(grads: torch.Tensor, columns=slice(None)) -> tuple[torch.Tensor, ...]:
    b = grads.shape[0] // 2
    ref = entanglement_reference(grads[:b, columns], grads[b:, columns])
    return ref["inner"], ref["chosen_sq_norm"], ref["rejected_sq_norm"]


def param_columns(params) -> dict[int, torch.Tensor]:
    out, start = {}, 0
    for p in params:
        out[id(p)] = torch.arange(start, start + p.numel())
        start += p.numel()
    return out


def module_groups(model, per_module, tracked) -> list[tuple[list[str], set[int]]]:
    """Group per-module keys that share a parameter (a tied matrix and its cross term), with their parameters."""
    modules = dict(model.named_modules())
    tracked = {id(p) for p in tracked}

    def params_of(key):
        names = key.split(" x ")
        return {id(p) for n in names for p in modules[n].parameters(recurse=False) if id(p) in tracked}

    groups: list[tuple[list[str], set[int]]] = []
    for key in per_module:
        ids = params_of(key)
        merged = [g for g in groups if g[1] & ids]
        keys = [key] + [k for g in merged for k in g[0]]
        ids = ids.union(*(g[1] for g in merged))
        groups = [g for g in groups if g not in merged] + [(keys, ids)]
    return groups


def check_against_reference(model, stats, grads, params, *, attribution: bool):
    ref = reference_stats(grads)
    for name, got, want in zip(("inner", "chosen_sq_norm", "rejected_sq_norm"),
                               (stats.inner, stats.chosen_sq_norm, stats.rejected_sq_norm), ref):
        assert_exact64(got, want, name=name)
    assert_exact64(stats.cosine, ref[0] / torch.sqrt(ref[1] * ref[2]), name="cosine")
    columns = param_columns(params)
    covered = set()
    for keys, ids in module_groups(model, stats.per_module, params):
        cols = torch.cat([columns[i] for i in sorted(ids, key=lambda i: columns[i][0].item())])
        want = reference_stats(grads, cols)
        got = [sum(stats.per_module[k][j] for k in keys) for j in range(3)]
        for j, part in enumerate(("inner", "chosen", "rejected")):
            assert_exact64(got[j], want[j], name=f"per_module {keys} {part}")
        covered |= ids
    assert covered == {id(p) for p in params}, "per_module misses parameters"
    if attribution:
        assert stats.position_attribution.shape[0] == stats.inner.shape[0]
        assert_exact64(stats.position_attribution.sum((1, 2)), ref[0], name="position_attribution total")


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("path", ["fused", "logits"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_exact_against_per_sequence_gradients(arch, path, padding, monkeypatch):
    model, batch = make_model(arch), make_batch(padding)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = per_row_gradients(model, batch, path, params)

    model.zero_grad(set_to_none=True)
    sw, sl = sequence_logps(model, batch, path)
    dpo(sw, sl).backward()
    plain = [p.grad.clone() for p in params]

    model.zero_grad(set_to_none=True)
    # Every token kept, zero-gradient ones (padding, last positions) included, as views: the same numbers.
    monkeypatch.setattr(monitor_mod.R, "DENSE_FRACTION", 0.0)
    stats = monitored_step(model, batch, path, position_attribution=True)  # ghost form everywhere
    for p, g in zip(params, plain):
        assert torch.equal(p.grad, g), "the monitor changed a gradient"
    check_against_reference(model, stats, grads, params, attribution=True)
    assert stats.case.tolist() and all(c in (1, 2, 3) for c in stats.case.tolist())
    # Only the tokens with a gradient kept (packed copies).
    monkeypatch.setattr(monitor_mod.R, "DENSE_FRACTION", 2.0)
    model.zero_grad(set_to_none=True)
    check_against_reference(model, monitored_step(model, batch, path, position_attribution=True), grads, params,
                            attribution=True)

    monkeypatch.setattr(linear_kind, "LINEAR_PATH", "explicit")

    def no_ghost(*args, **kwargs):
        raise AssertionError("ghost form used on the explicit path")

    monkeypatch.setattr(monitor_mod.R, "ghost_terms", no_ghost)
    model.zero_grad(set_to_none=True)
    check_against_reference(model, monitored_step(model, batch, path), grads, params, attribution=False)
    # One pair per batched matmul: the chunking over pairs gives the same numbers.
    monkeypatch.setattr(monitor_mod.R, "EXPLICIT_CHUNK_ELEMENTS", 1)
    model.zero_grad(set_to_none=True)
    check_against_reference(model, monitored_step(model, batch, path), grads, params, attribution=False)


def test_explicit_row_pairs_through_watch():
    """Rows interleaved (chosen, rejected, chosen, ...) with pairs given to watch()."""
    model, batch = make_model("qwen2"), make_batch("right")
    order = torch.tensor([0, 3, 1, 4, 2, 5])
    batch = {k: v[order] for k, v in batch.items()}
    pairs = torch.tensor([[0, 1], [2, 3], [4, 5]])
    params = [p for p in model.parameters() if p.requires_grad]
    sw, sl = sequence_logps(model, batch, "logits")  # rows 0..2 / 3..5 of the permuted batch
    rows = torch.cat([sw, sl])
    grads = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(rows[r], params, retain_graph=True)])
                         for r in range(6)])
    with EntanglementMonitor(model) as mon:
        sw, sl = sequence_logps(model, batch, "logits")
        rows = torch.cat([sw, sl])
        chosen, rejected = rows[pairs[:, 0]], rows[pairs[:, 1]]
        mon.watch(chosen, rejected, pairs=pairs)
        dpo(chosen, rejected).backward()
    gw, gl = grads[pairs[:, 0]], grads[pairs[:, 1]]
    assert_exact64(mon.stats.inner, (gw * gl).sum(1), name="inner")
    assert_exact64(mon.stats.chosen_sq_norm, (gw * gw).sum(1), name="chosen_sq_norm")


def test_first_order_dynamics_of_one_sgd_step():
    """B = 1: the measured change of each log-prob after a plain SGD step matches predicted_delta(lr) to first order,
    and the error shrinks quadratically with lr."""
    model, batch = make_model("llama"), make_batch("right", BUILTIN_PAIRS[1:2])
    stats = monitored_step(model, batch, "fused")
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        before = torch.cat(sequence_logps(model, batch, "fused"))
    originals = {n: p.detach().clone() for n, p in model.named_parameters()}
    errors = []
    for lr in (1e-3, 1e-4):
        # In place (a deepcopy would keep the float64 norms' forwards bound to the original modules).
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(originals[n] - lr * grads[n])
            after = torch.cat(sequence_logps(model, batch, "fused"))
        predicted = torch.cat(stats.predicted_delta(lr))
        measured = after - before
        assert torch.all(torch.sign(predicted) == torch.sign(measured)), (predicted, measured)
        errors.append(((measured - predicted).abs() / predicted.abs()).max().item())
    assert errors[0] < 0.05, errors
    ratio = errors[0] / errors[1]  # relative error ~ lr: 10x per decade of lr (absolute error 100x)
    assert 7 < ratio < 14, (errors, ratio)


def test_zero_coefficient_gives_nan_and_flag():
    model, batch = make_model("gpt2"), make_batch("right")
    with EntanglementMonitor(model) as mon:
        sw, sl = sequence_logps(model, batch, "fused")
        dpo(sw, sl, coef=torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)).backward()
    st = mon.stats
    assert st.zero_coefficient.tolist() == [False, True, False]
    assert torch.isnan(st.inner[1]) and torch.isnan(st.cosine[1]) and torch.isnan(st.chosen_sq_norm[1])
    assert torch.isfinite(st.inner[[0, 2]]).all() and st.case[1] == 0 and st.case[0] != 0
    assert not st.chosen_falls[1] and not st.rejected_rises[1]
    d_chosen, d_rejected = st.predicted_delta(1e-3)
    assert d_chosen[1] == 0 and d_rejected[1] == 0 and torch.isfinite(d_chosen).all()

    with EntanglementMonitor(model) as mon:  # a hinge already satisfied by every pair
        sw, sl = sequence_logps(model, batch, "logits")
        mon.watch(sw, sl)
        torch.relu(-1e6 - (sw - sl)).sum().backward()
    assert mon.stats.zero_coefficient.all() and torch.isnan(mon.stats.inner).all()


def _hook_counts(model):
    return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()] + \
           [len(p._backward_hooks or {}) for p in model.parameters()]


def test_hooks_removed_on_exit_and_on_exception():
    model, batch = make_model("gpt2"), make_batch("right")
    before = _hook_counts(model)
    monitored_step(model, batch, "fused")
    assert _hook_counts(model) == before and active_listeners() == []
    with pytest.raises(ZeroDivisionError):
        with EntanglementMonitor(model) as mon:
            sw, sl = sequence_logps(model, batch, "logits")
            mon.watch(sw, sl)
            raise ZeroDivisionError
    assert _hook_counts(model) == before and active_listeners() == []
    with pytest.raises(RuntimeError, match="no statistics|no backward"):
        mon.stats


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing(reentrant):
    model, batch = make_model("llama"), make_batch("left")
    model.train()
    plain = monitored_step(model, batch, "fused")
    kwargs = {"use_reentrant": reentrant}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 renamed it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    ckpt = monitored_step(model, batch, "fused")
    for name in ("inner", "chosen_sq_norm", "rejected_sq_norm"):
        assert_exact64(getattr(ckpt, name), getattr(plain, name), name=name)


def test_two_forwards_in_one_step_are_refused():
    model, batch = make_model("llama"), make_batch("right")
    with EntanglementMonitor(model) as mon:
        sequence_logps(model, batch, "fused")
        sw, sl = sequence_logps(model, batch, "fused")
        dpo(sw, sl).backward()
    with pytest.raises(RuntimeError, match="called 2 times"):
        mon.stats


class _PositionMixer(nn.Module):
    """A parameter that mixes positions within a row (not rows): covered by the generic per-row path."""

    def __init__(self, d):
        super().__init__()
        self.mix = nn.Parameter(torch.randn(d, d, dtype=torch.float64) / d)

    def forward(self, x):
        return x + torch.einsum("rtd,rsd->rtd", x, x) @ self.mix


class _RowMixer(nn.Module):
    """A parameter applied to the batch mean: the rows' gradients cannot be told apart."""

    def __init__(self, d):
        super().__init__()
        self.mix = nn.Parameter(torch.randn(d, d, dtype=torch.float64) / d)

    def forward(self, x):
        return x + x.mean(0, keepdim=True) @ self.mix


class _Toy(nn.Module):
    def __init__(self, vocab=11, d=6, bare=True, mixer=True):
        super().__init__()
        self.embed = nn.Embedding(vocab, d, dtype=torch.float64)
        self.mixer = (mixer if isinstance(mixer, nn.Module) else _PositionMixer(d)) if mixer else nn.Identity()
        self.scale = nn.Parameter(torch.ones(d, dtype=torch.float64) + 0.1) if bare else None
        self.head = nn.Linear(d, vocab, dtype=torch.float64)

    def forward(self, ids, bare_head=False):
        h = self.mixer(self.embed(ids))
        if self.scale is not None:
            h = h * self.scale
        return F.linear(h, self.head.weight, self.head.bias) if bare_head else self.head(h)


def _toy_step(toy, ids, monitor=None, **kwargs):
    mon = monitor if monitor is not None else EntanglementMonitor(toy, **kwargs)
    with mon:
        lp = torch.log_softmax(toy(ids), -1)[..., 0].sum(-1)
        b = ids.shape[0] // 2
        chosen, rejected = lp[:b], lp[b:]
        mon.watch(chosen, rejected)
        (chosen * COEF[:b] - rejected).sum().backward()
    return mon


def test_generic_path_is_exact_and_row_mixing_is_refused():
    """Modules the registry has no cheaper kind for take the generic per-row path, exactly; a module that mixes rows
    is refused at construction (batch norm) or by the per-row gradient check after the step."""
    torch.manual_seed(0)
    toy, ids = _Toy(), torch.randint(0, 11, (6, 5))
    assert {e.name: e.kind for e in EntanglementMonitor(toy).coverage.entries}[""] == "rowwise"  # the root's scale
    params = [p for p in toy.parameters()]
    rows = []
    for r in range(6):
        lp = torch.log_softmax(toy(ids), -1)[r, :, 0].sum()
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(lp, params)]))
    stats = _toy_step(toy, ids).stats
    assert_exact64(stats.inner, torch.stack([rows[i] @ rows[3 + i] for i in range(3)]), name="inner")
    assert_exact64(stats.chosen_sq_norm, torch.stack([rows[i] @ rows[i] for i in range(3)]), name="N_w")
    assert_exact64(stats.rejected_sq_norm, torch.stack([rows[3 + i] @ rows[3 + i] for i in range(3)]), name="N_l")

    bn = nn.Sequential(nn.Embedding(11, 4, dtype=torch.float64), nn.BatchNorm1d(5, dtype=torch.float64))
    with pytest.raises(UncoveredParametersError, match=r"1\.weight.*batch normalisation"):
        EntanglementMonitor(bn)
    EntanglementMonitor(bn, exclude=("1",))  # the explicit opt-out

    mixing = _Toy(mixer=_RowMixer(6), bare=False)
    mon = _toy_step(mixing, ids)
    with pytest.raises(RuntimeError, match="'mixer'.*does not act row by row"):
        mon.stats


def test_parameter_used_outside_its_module_is_named():
    toy = _Toy(bare=False, mixer=False)  # the head's weight used outside its module: caught after the backward
    ids = torch.randint(0, 11, (4, 5))
    with EntanglementMonitor(toy) as mon:
        lp = torch.log_softmax(toy(ids, bare_head=True), -1)[..., 0].sum(-1)
        mon.watch(lp[:2], lp[2:])
        (lp[:2] - lp[2:]).sum().backward()
    with pytest.raises(RuntimeError, match="head.weight"):
        mon.stats


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lm_head_and_explicit_subset(arch):
    model, batch = make_model(arch), make_batch("left")
    head = model.get_output_embeddings()
    layer = model.model.layers[0] if arch == "llama" else model.transformer.h[0]
    subsets = [("lm_head", [head.weight]),
               ([layer.mlp.down_proj.weight if arch == "llama" else layer.mlp.c_proj.weight,
                 layer.input_layernorm.weight if arch == "llama" else layer.ln_1.bias], None)]
    for params, tracked in subsets:
        tracked = tracked or list(params)
        grads = per_row_gradients(model, batch, "fused", tracked)
        model.zero_grad(set_to_none=True)
        stats = monitored_step(model, batch, "fused", params=params)
        check_against_reference(model, stats, grads, tracked, attribution=False)


def test_sketch_mode_is_unbiased_and_leaves_other_kinds_exact():
    model, batch = make_model("llama"), make_batch("right")
    layer = model.model.layers[1]
    params = [layer.mlp.up_proj.weight, layer.post_attention_layernorm.weight]
    exact = monitored_step(model, batch, "fused", params=params)
    samples = []
    for seed in range(40):
        st = monitored_step(model, batch, "fused", params=params, mode="sketch", sketch_dim=8, seed=seed)
        assert st.sketched == ("model.layers.1.mlp.up_proj",)
        norm = "model.layers.1.post_attention_layernorm"
        assert_exact64(st.per_module[norm][0], exact.per_module[norm][0], name="norm stays exact")
        samples.append(st.per_module["model.layers.1.mlp.up_proj"][0])
    samples = torch.stack(samples)
    spread = samples.std(0) / len(samples) ** 0.5
    assert (samples.std(0) > 0).all()
    assert ((samples.mean(0) - exact.per_module["model.layers.1.mlp.up_proj"][0]).abs() < 5 * spread).all()


def test_peft_lora_layers_are_covered():
    peft = pytest.importorskip("peft", reason="requires_peft: peft is not installed")
    model = make_model("llama")
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                        lora_dropout=0.0))
    for n, p in model.named_parameters():  # LoRA B starts at zero; make both factors non-trivial
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    batch = make_batch("right")
    params = [p for p in model.parameters() if p.requires_grad]
    for path in ("fused", "logits"):
        grads = per_row_gradients(model, batch, path, params)
        model.zero_grad(set_to_none=True)
        stats = monitored_step(model, batch, path, position_attribution=True)
        check_against_reference(model, stats, grads, params, attribution=True)


# ----------------------------------------------------------------------------------------------------------------------
# Reductions from per-row gradients, against float64 dense ones


def _dense_pair_terms(rows: torch.Tensor, pairs: torch.Tensor):
    gw, gl = rows[pairs[:, 0]], rows[pairs[:, 1]]
    return (gw * gl).sum(1), (gw * gw).sum(1), (gl * gl).sum(1)


@pytest.mark.parametrize("layout", ["default", "repeated", "none"])
def test_embedding_sparse_terms_match_dense_row_gradients(layout):
    from entangle_fast.monitor import reductions as R

    gen = torch.Generator().manual_seed(3)
    n_rows, width, vocab, d = 6, 7, 5, 4
    gamma = torch.randn(n_rows, width, d, generator=gen, dtype=torch.float64)
    gamma[torch.rand(n_rows, width, generator=gen) < 0.3] = 0
    gamma[2] = 0  # a row with no kept token
    ids = torch.randint(0, vocab, (n_rows, width), generator=gen)
    keep = torch.rand(n_rows, width, generator=gen) > 0.2
    pairs = {"default": torch.tensor([[0, 3], [1, 4], [2, 5]]), "repeated": torch.tensor([[0, 1], [0, 5], [4, 0], [2, 2]]),
             "none": torch.zeros(0, 2, dtype=torch.int64)}[layout]
    tok = R.pack(gamma, ids=ids, keep=keep, dtype=torch.float64)
    dense = torch.zeros(n_rows, vocab, d, dtype=torch.float64)
    for r in range(n_rows):
        m = keep[r]
        dense[r].index_add_(0, ids[r][m], gamma[r][m])
    got = R.embedding_sparse_terms(tok, pairs)
    for value, want in zip((got.inner, got.chosen, got.rejected), _dense_pair_terms(dense.reshape(n_rows, -1), pairs)):
        assert_exact64(value, want)


def test_row_grad_terms_default_layout_by_gram():
    from entangle_fast.monitor import reductions as R

    rows = torch.randn(8, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    pairs = torch.stack([torch.arange(4), torch.arange(4) + 4], 1)
    want = _dense_pair_terms(rows, pairs)
    for ordered in (False, True):
        got = R.row_grad_terms(rows, pairs, ordered=ordered)
        for value, w in zip((got.inner, got.chosen, got.rejected), want):
            assert_exact64(value, w)


@pytest.mark.parametrize("layout", ["default", "repeated"])
@pytest.mark.parametrize("dense", [True, False])
def test_embedding_bookkeep_matches_dense_row_gradients(layout, dense, monkeypatch):
    """The book-kept embedding's weight gradient and terms, dense [R, V, d] rows and sparse ones, padding id
    excluded, against float64 dense per-row gradients."""
    from entangle_fast.bookkeeping import PairPlan
    from entangle_fast.monitor import reductions as R

    if not dense:
        monkeypatch.setattr(R, "DENSE_EMBEDDING_ELEMENTS", 0)
    gen = torch.Generator().manual_seed(5)
    n_rows, width, vocab, d, pad = 6, 7, 5, 4, 1
    gamma = torch.randn(n_rows, width, d, generator=gen, dtype=torch.float64)
    ids = torch.randint(0, vocab, (n_rows, width), generator=gen)
    ids[:, -1] = pad
    pairs = {"default": torch.tensor([[0, 3], [1, 4], [2, 5]]), "repeated": torch.tensor([[0, 1], [0, 5], [4, 0]])}[layout]
    grad_w, got = R.embedding_bookkeep(ids, gamma, PairPlan.of(n_rows, pairs), num_embeddings=vocab, padding_idx=pad,
                                       dtype=torch.float64, out_dtype=torch.float64)
    dense_rows = torch.zeros(n_rows, vocab, d, dtype=torch.float64)
    for r in range(n_rows):
        keep = ids[r] != pad
        dense_rows[r].index_add_(0, ids[r][keep], gamma[r][keep])
    assert_exact64(grad_w, dense_rows.sum(0), rtol=1e-12, name="grad_weight")
    assert grad_w[pad].abs().max() == 0
    for value, want in zip((got.inner, got.chosen, got.rejected),
                           _dense_pair_terms(dense_rows.reshape(n_rows, -1), pairs)):
        assert_exact64(value, want)
