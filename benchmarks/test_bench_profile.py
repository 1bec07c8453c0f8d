"""The per-token profiler's full-model token matrix against the paper's per-token loop, on one model and one pair.

Ours: :func:`entangle_fast.profile.per_token_matrix` (batched backwards through ``torch.func``, the layer identities
of docs/math.md section 4 per token pair). Baseline: :func:`entangle_fast.profile.per_token_matrix_baseline`, the
paper's procedure: one ``retain_graph`` backward per response token through the full logits, every parameter's
gradient flattened. It streams: the chosen tokens' flattened gradients are kept (T_w x n_params floats), then each
rejected token takes one backward and a matrix-vector product with them. Where memory cannot hold all chosen
gradients (half of MemAvailable, less a margin), they are kept in blocks and the rejected backwards repeat per block;
``baseline_backwards`` in the result says how many ran, and the baseline's ``time_ms`` is its single-pass time, the
measured time (``measured_ms``) less the repeated rejected backwards (what one block would have cost; the dot
products total the same).

Shapes: ``smoke`` (``--benchmark-disable``) a tiny GPT-2, float64, checked against the float64 baseline to 1e-9;
``cpu``/``gpu`` a GPT-2-small-shaped model (n_embd 768, 12 layers, 12 heads, vocab 50257, random init from a
config), a 16-token prompt and 32-token responses, float32. Ours runs ``rounds`` times around the single baseline
run (before and after it, so a change of machine load shows). Both are recorded with the suites' one harness
(``harness.py``) as results of kind ``profile`` in the run file: ``per-token-matrix`` (ours) and ``paper-loop``
(``time_ms`` its single-pass time; the measured time, the blocks and the agreement ride along), and ``RATIOS``
declares the speed-up, paper-loop / per-token-matrix time.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import pytest
import torch
from harness import Result, Timer, peak_memory
from presets import describe_case

from entangle_fast.bench import Ratio

OURS, BASELINE = "per-token-matrix", "paper-loop"
RATIOS = [Ratio("profile", BASELINE, OURS, "time", "paper's per-token loop / per_token_matrix time (speed-up)",
                "higher", True),
          Ratio("profile", BASELINE, OURS, "memory", "paper's per-token loop / per_token_matrix peak memory",
                "higher")]


@dataclass(frozen=True)
class ProfileShape:
    n_embd: int
    n_layer: int
    n_head: int
    vocab: int
    prompt: int
    response: int
    dtype: str
    rounds: int

    @property
    def name(self) -> str:
        return (f"gpt2-d{self.n_embd}-L{self.n_layer}-V{self.vocab}-prompt{self.prompt}-resp{self.response}-"
                f"{self.dtype}")


SHAPES = {
    "smoke": ProfileShape(64, 2, 4, 1000, 6, 7, "float64", 1),
    "cpu": ProfileShape(768, 12, 12, 50257, 16, 32, "float32", 5),
    "gpu": ProfileShape(768, 12, 12, 50257, 16, 32, "float32", 5),
}


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _build(shape: ProfileShape, device: torch.device):
    import transformers as tf

    config = tf.GPT2Config(n_embd=shape.n_embd, n_layer=shape.n_layer, n_head=shape.n_head, vocab_size=shape.vocab,
                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=shape.vocab - 1,
                           eos_token_id=shape.vocab - 1)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(config).to(getattr(torch, shape.dtype)).to(device).eval()
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, shape.vocab, (shape.prompt,), generator=gen)
    rows = [torch.cat([prompt, torch.randint(0, shape.vocab, (shape.response,), generator=gen)]) for _ in range(2)]
    ids = torch.stack(rows)
    labels = ids.clone()
    labels[:, : shape.prompt] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    return model, {k: v.to(device) for k, v in batch.items()}


def test_profile_token_matrix_vs_paper_loop(benchmark, bench_preset, record_property):
    from entangle_fast.profile import per_token_matrix, per_token_matrix_baseline

    preset = bench_preset.name
    if preset not in SHAPES:
        pytest.skip(f"preset {preset!r} has no profiler shape (it measures the log-prob op only)")
    shape = SHAPES[preset]
    device = torch.device("cuda" if preset == "gpu" else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("requires_cuda: the gpu preset needs a CUDA device")
    model, batch = _build(shape, device)
    n_params = sum(p.numel() for p in model.parameters())
    row_bytes = n_params * (8 if shape.dtype == "float64" else 4)
    budget = None
    if device.type == "cpu":
        available = _mem_available()
        if available is not None:
            budget = max(row_bytes, available // 2 - (2 << 30))

    ours_timer, base_timer = Timer(device), Timer(device)
    if preset != "smoke":  # warm-up, not timed
        per_token_matrix(model, batch)
    half = max(1, shape.rounds // 2)
    fast = benchmark.pedantic(lambda: ours_timer(per_token_matrix, model, batch), rounds=half, iterations=1)
    timings: dict = {}
    base, base_memory = peak_memory(lambda: base_timer(lambda: per_token_matrix_baseline(
        model, batch, memory_budget=budget, timings=timings)), device)
    for _ in range(shape.rounds - half):
        ours_timer(per_token_matrix, model, batch)
    _, ours_memory = peak_memory(lambda: per_token_matrix(model, batch), device)

    err = ((fast.matrix - base).abs().max() / base.abs().max()).item()
    tw, tl = base.shape
    blocks = timings["blocks"]
    # With several chosen blocks the rejected backwards ran once per block; the paper's single pass would have run
    # them once (the dot products total the same either way).
    (base_ms,) = base_timer.samples
    single_pass_ms = base_ms - 1e3 * timings["rejected_seconds"] * (blocks - 1) / blocks
    params = asdict(shape) | {"n_params": n_params, "chosen_tokens": tw, "rejected_tokens": tl}
    agreement = {"max_rel_error": err}
    if shape.dtype != "float64":
        agreement["float64_check"] = _float64_check(model, batch, fast.matrix, base, budget)

    def describe(impl):
        return describe_case("profile", impl, "token-matrix", shape.name, params, shape.dtype)

    Result(describe(OURS), device.type, ours_timer.samples, ours_timer.name, ours_memory, cpu_ms=ours_timer.cpu_ms,
           extra={"batched_backwards": fast.batched_backwards, "token_backwards": fast.token_backwards, **agreement}
           ).record(benchmark, record_property)
    Result(describe(BASELINE), device.type, [single_pass_ms], base_timer.name, base_memory, cpu_ms=base_timer.cpu_ms,
           extra={"measured_ms": base_ms, "memory_budget_bytes": budget,
                  "held_gradient_bytes": timings["chosen_block"] * row_bytes,
                  "baseline_backwards": timings["backwards"],
                  "timings": timings, "speedup_vs_min": single_pass_ms / min(ours_timer.samples), **agreement}
           ).record(None, record_property)  # the run file; extra_info holds ours
    if shape.dtype == "float64":
        assert err <= 1e-9, f"token matrices differ: max relative error {err:.3e}"
    else:  # STYLE.md's rule: against a float64 truth, ours may err at most 2x the plain PyTorch computation's error
        check = agreement["float64_check"]
        assert check["ours_error"] <= 2 * check["baseline_error"] + 1e-6 * check["scale"], check


def _float64_check(model, batch, ours, base, budget, tokens: int = 4) -> dict:
    """Errors of the float32 matrices on the last ``tokens`` x ``tokens`` block against the float64 baseline there
    (the same model in float64, only those response tokens labelled: K[t, s] depends on tokens t and s alone)."""
    import copy

    from entangle_fast.profile import per_token_matrix_baseline

    model64 = copy.deepcopy(model).double()
    sub = {k: v.clone() for k, v in batch.items()}
    for r in range(2):
        keep = torch.nonzero(sub["labels"][r] != -100).flatten()
        sub["labels"][r, keep[:-tokens]] = -100
    truth = per_token_matrix_baseline(model64, sub, memory_budget=budget)
    del model64
    ours_block, base_block = ours[-tokens:, -tokens:].double(), base[-tokens:, -tokens:].double()
    return {"tokens": tokens, "scale": truth.abs().max().item(),
            "ours_error": (ours_block - truth).abs().max().item(),
            "baseline_error": (base_block - truth).abs().max().item()}
