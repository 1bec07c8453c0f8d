"""What the log-prob, token-statistics and matmul suites run: cases and the implementations side by side.

A :class:`Case` is one (op, pass, implementation, shape). Every implementation of the log-prob op is driven through the
same step so the timings compare like with like: per-token log-probs of ``[rows, seq]`` tokens, summed per row, a DPO
loss over (chosen rows, rejected rows), and its backward. Peers that are not installed, or that cannot run on this
device, are skipped with the reason (the suites call :func:`unavailable`); none is dropped silently.

Timing, peak memory and the result record: ``harness.py``, the same for every suite.

FLOPs of the log-prob op (docs/math.md): forward 2NVd, backward 4NVd plus the 2NVd logit recompute, full step 8NVd.
The same formula is charged to every implementation, so TFLOP/s is work-normalised: higher is faster, whatever an
implementation actually executes.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from entangle_fast import linear_logprobs, output_layer_token_stats
from entangle_fast.reference import linear_logprobs_reference, output_layer_token_stats_reference

from harness import Result, Timer, peak_memory
from presets import PASSES, LogprobShape, MatmulShape, Preset, StatsShape, describe_case

IGNORE_INDEX = -100
BETA = 0.1
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Implementations of the log-prob op, in table order. ``passes``: what each can be timed on; a peer that computes its
# gradients inside the forward (Liger's chunked losses) is only comparable on the full step.
LOGPROB_IMPLS = {
    "ours-torch": ("entangle_fast.linear_logprobs(impl='torch'): chunked PyTorch path", PASSES),
    "ours-triton": ("entangle_fast.linear_logprobs(impl='triton'): fused Triton kernels", PASSES),
    "reference": ("entangle_fast.reference.linear_logprobs_reference: materialised [N, V] logits", PASSES),
    "trl": ("TRL selective_log_softmax over materialised logits (DPOTrainer's log-probs)", PASSES),
    "torch-lce": ("torch.nn.functional.linear_cross_entropy, chunked (LinearCrossEntropyOptions)", PASSES),
    "cce": ("cut_cross_entropy.linear_cross_entropy(reduction='none')", PASSES),
    "liger": ("liger_kernel.chunked_loss.LigerFusedLinearDPOLoss (gradients computed in its forward)", ("full",)),
}
# Token statistics: (pass, description). "loop" runs only at shapes marked loop=True.
STATS_IMPLS = {
    "stats-off": ("full", "linear_logprobs fwd+bwd, token_stats=False"),
    "stats-on": ("full", "linear_logprobs fwd+bwd, token_stats=True"),
    "reference": ("full", "materialised-logits fwd+bwd, no statistics"),
    "stats-only": ("stats", "output_layer_token_stats (fused forward + statistics-only backward)"),
    "loop": ("stats", "output_layer_token_stats_reference: one autograd backward per response token"),
    "lm-head-matmul": ("forward", "the LM head's own matmul hidden @ W^T (the yardstick)"),
}


@dataclass(frozen=True)
class Case:
    """One benchmark: ``kind`` (op) x ``pass_`` x ``impl`` x ``shape``."""

    kind: str  # "logprobs" | "token_stats" | "matmul"
    impl: str
    pass_: str  # "forward" | "backward" | "full" | "stats"
    shape: LogprobShape | StatsShape | MatmulShape
    rounds: int
    warmup_rounds: int

    @property
    def id(self) -> str:
        return f"{self.kind}-{self.pass_}-{self.impl}-{self.shape.name}"

    @property
    def group(self) -> str:
        return f"{self.kind}:{self.pass_} [{self.shape.name}]"

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.shape.dtype]

    def flops(self) -> int | None:
        s = self.shape
        if self.kind == "matmul":
            return 2 * s.m * s.k * s.n
        nvd = s.tokens * s.vocab * s.hidden
        if self.kind == "logprobs":
            return {"forward": 2, "backward": 6, "full": 8}[self.pass_] * nvd
        per_nvd = {"stats-off": 8, "stats-on": 8, "reference": 8, "stats-only": 6, "lm-head-matmul": 2}
        return per_nvd[self.impl] * nvd if self.impl in per_nvd else None

    def describe(self) -> dict:
        """The case as it appears in the run JSON (results and skips alike)."""
        return describe_case(self.kind, self.impl, self.pass_, self.shape.name, self.shape.to_dict(), self.shape.dtype)


def _rounds(preset: Preset, shape) -> tuple[int, int]:
    if shape.rounds is not None:
        return shape.rounds, 0
    return preset.rounds, preset.warmup_rounds


def logprob_cases(preset: Preset) -> list[Case]:
    out = []
    for shape in preset.logprobs:
        r, w = _rounds(preset, shape)
        for pass_ in shape.passes:
            out += [Case("logprobs", impl, pass_, shape, r, w) for impl, (_, ok) in LOGPROB_IMPLS.items()
                    if pass_ in ok and (shape.impls is None or impl in shape.impls)]
    return out


def stats_cases(preset: Preset) -> list[Case]:
    out = []
    for shape in preset.token_stats:
        r, w = _rounds(preset, shape)
        out += [Case("token_stats", impl, pass_, shape, r, w) for impl, (pass_, _) in STATS_IMPLS.items()
                if impl != "loop" or shape.loop]
    return out


def ceiling_cases(preset: Preset) -> list[Case]:
    return [Case("matmul", "matmul", "forward", s, preset.rounds, preset.warmup_rounds) for s in preset.ceiling]


def resolve_device(preset_device: str) -> torch.device:
    """``auto`` -> CUDA when visible; queried at run time, never at import."""
    if preset_device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(preset_device)


# ---------------------------------------------------------------------------------------------------------------------
# Implementations of the log-prob op: each returns a callable (hidden [R, T, d], weight, labels [R, T]) -> DPO loss.


def dpo_from_token_logprobs(logps: torch.Tensor) -> torch.Tensor:
    """Sum per row, DPO loss of the first half of the rows (chosen) against the second half (rejected)."""
    s = logps.float().sum(-1)
    half = s.shape[0] // 2
    return -F.logsigmoid(BETA * (s[:half] - s[half:])).mean()


def _missing(module: str, pip_name: str) -> str | None:
    if importlib.util.find_spec(module.split(".")[0]) is None:
        return f"{pip_name} is not installed (pip install {pip_name})"
    try:
        importlib.import_module(module)
    except Exception as err:  # noqa: BLE001 - any import failure is a reason to skip, reported verbatim
        return f"{pip_name} is installed but `import {module}` failed: {type(err).__name__}: {err}"
    return None


def unavailable(case: Case, device: torch.device) -> str | None:
    """Why ``case`` cannot run on ``device`` here, or None."""
    if case.kind != "logprobs":
        return None
    if case.impl == "ours-triton":
        from entangle_fast._backend import triton_available

        if device.type != "cuda":
            return "needs a CUDA device (Triton on CPU runs only under the test interpreter, which is not timed)"
        if not triton_available():
            return "triton is not importable here"
    if case.impl == "trl":
        return _missing("trl.trainer.utils", "trl")
    if case.impl == "cce":
        reason = _missing("cut_cross_entropy", "cut-cross-entropy")
        if reason is None and device.type != "cuda":
            reason = "Cut Cross-Entropy's kernels need a CUDA device"
        return reason
    if case.impl == "liger":
        return _missing("liger_kernel.chunked_loss", "liger-kernel")
    if case.impl == "torch-lce":
        if not (hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")):
            return f"torch {torch.__version__} has no chunked torch.nn.functional.linear_cross_entropy"
    return None


def _per_token(fn: Callable) -> Callable:
    """Adapt a per-token log-prob function on flat tokens to the [R, T] step."""

    def step(h, w, y):
        r, t, d = h.shape
        return dpo_from_token_logprobs(fn(h.reshape(r * t, d), w, y.reshape(r * t)).reshape(r, t))

    return step


def logprob_step(impl: str, device: torch.device) -> Callable:
    if impl in ("ours-torch", "ours-triton"):
        backend = impl.split("-")[1]
        return lambda h, w, y: dpo_from_token_logprobs(linear_logprobs(h, w, y, impl=backend))
    if impl == "reference":
        return lambda h, w, y: dpo_from_token_logprobs(linear_logprobs_reference(h, w, y))
    if impl == "trl":
        from trl.trainer.utils import selective_log_softmax

        def trl_step(h, w, y):
            # What DPOTrainer does with the model's [rows, seq, V] logits (its loops run over rows, so keep them):
            # gather at the labels, masked positions set to 0.
            logits = h @ w.T
            mask = y != IGNORE_INDEX
            logps = selective_log_softmax(logits, torch.where(mask, y, 0)).masked_fill(~mask, 0.0)
            return dpo_from_token_logprobs(logps)

        return trl_step
    if impl == "torch-lce":
        options = torch.nn.LinearCrossEntropyOptions()
        return _per_token(lambda h, w, y: -F.linear_cross_entropy(
            h, w, y, reduction="none", ignore_index=IGNORE_INDEX, options=options))
    if impl == "cce":
        from cut_cross_entropy import linear_cross_entropy

        return _per_token(lambda h, w, y: -linear_cross_entropy(h, w, y, ignore_index=IGNORE_INDEX, reduction="none"))
    if impl == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        wanted = {"ignore_index": IGNORE_INDEX, "beta": BETA, "compute_nll_loss": False,
                  "compiled": device.type == "cuda", "use_ref_model": False}
        accepted = inspect.signature(LigerFusedLinearDPOLoss.__init__).parameters
        loss_fn = LigerFusedLinearDPOLoss(**{k: v for k, v in wanted.items() if k in accepted})

        def liger_step(h, w, y):
            out = loss_fn(w, h, y)  # (lin_weight, _input [2B, T, d], target [2B, T]); newer versions add metrics
            return out[0] if isinstance(out, tuple) else out

        return liger_step
    raise ValueError(f"unknown log-prob implementation {impl!r}")


# ---------------------------------------------------------------------------------------------------------------------
# Runnable benchmarks: setup() (untimed) -> state, run(state) (timed). Outputs of the last run are kept until the next
# setup so the timed call never pays for freeing them.


def _inputs(rows, seq, hidden, vocab, dtype, device, prompt_frac, seed=0):
    torch.manual_seed(seed)
    h = torch.randn(rows, seq, hidden, device=device, dtype=torch.float32).to(dtype)
    # Logits of standard deviation ~2, as in a trained head: realistic softmax tails (and no CPU denormals).
    w = (torch.randn(vocab, hidden, device=device, dtype=torch.float32) * (2.0 / hidden ** 0.5)).to(dtype)
    y = torch.randint(0, vocab, (rows, seq), device=device)
    y[:, : int(seq * prompt_frac)] = IGNORE_INDEX
    return h, w, y


class Runnable:
    def __init__(self, case: Case, device: torch.device):
        self.case, self.device = case, device
        self.last = None
        s = case.shape
        if case.kind == "matmul":
            torch.manual_seed(0)
            self.a = torch.randn(s.m, s.k, device=device).to(case.dtype)
            self.b = torch.randn(s.k, s.n, device=device).to(case.dtype)
            return
        if case.kind == "logprobs":
            h, w, self.y = _inputs(s.rows, s.seq, s.hidden, s.vocab, case.dtype, device, prompt_frac=1 / 8)
            self.step = logprob_step(case.impl, device)
        else:  # token statistics: every position of a row is a response token
            h, w, self.y = _inputs(s.rows, s.seq, s.hidden, s.vocab, case.dtype, device, prompt_frac=0.0)
        self.grad = case.pass_ in ("forward", "backward", "full") and case.impl != "lm-head-matmul"
        self.h, self.w = h.requires_grad_(self.grad), w.requires_grad_(self.grad)

    def setup(self):
        self.last = None
        if self.case.kind == "matmul":
            return None
        self.h.grad = self.w.grad = None
        if self.case.kind == "logprobs" and self.case.pass_ == "backward":
            return self.step(self.h, self.w, self.y)
        return None

    def run(self, state):
        c = self.case
        if c.kind == "matmul":
            self.last = self.a @ self.b
        elif c.kind == "logprobs":
            if c.pass_ == "forward":
                self.last = self.step(self.h, self.w, self.y)
            elif c.pass_ == "backward":
                state.backward()
            else:
                self.step(self.h, self.w, self.y).backward()
        else:
            self.last = self._token_stats()

    def _token_stats(self):
        impl, h, w, y = self.case.impl, self.h, self.w, self.y
        if impl == "lm-head-matmul":
            with torch.no_grad():
                return h.reshape(-1, h.shape[-1]) @ w.T
        if impl == "stats-only":
            return output_layer_token_stats(h, w, y)
        if impl == "loop":
            p = self.case.shape.pairs
            return output_layer_token_stats_reference(h, w, y, pairs=[(i, p + i) for i in range(p)])
        if impl == "reference":
            dpo_from_token_logprobs(linear_logprobs_reference(h, w, y)).backward()
            return None
        if impl == "stats-off":
            dpo_from_token_logprobs(linear_logprobs(h, w, y)).backward()
            return None
        logps, handle = linear_logprobs(h, w, y, token_stats=True)
        dpo_from_token_logprobs(logps).backward()
        return handle.stats

    def release(self):
        self.last = None
        self.h = self.w = self.a = self.b = None


# ---------------------------------------------------------------------------------------------------------------------
# The suites' one entry point.


class SuiteRunner:
    """Held by the session fixture ``bench``: times a case with pytest-benchmark, measures its memory, records it."""

    def __init__(self, preset: Preset, device: torch.device):
        self.preset, self.device = preset, device

    def run(self, benchmark, case: Case, record_property) -> dict:
        import pytest

        reason = unavailable(case, self.device)
        if reason is not None:
            pytest.skip(f"{case.impl}: {reason}")
        benchmark.group = case.group
        timer = Timer(self.device)
        bench = Runnable(case, self.device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            benchmark.pedantic(lambda state: timer(bench.run, state), setup=lambda: ((bench.setup(),), {}),
                               rounds=case.rounds, warmup_rounds=case.warmup_rounds, iterations=1)
        try:  # one more call, untimed and warm, for the peak memory
            state = bench.setup()
            _, memory = peak_memory(lambda: bench.run(state), self.device)
            del state
        finally:
            bench.release()
        result = Result(case.describe(), self.device.type, timer.samples[-case.rounds:], timer.name, memory,
                        cpu_ms=timer.cpu_ms[-case.rounds:], flops=case.flops(),
                        warnings=sorted({str(w.message)[:300] for w in caught}))
        return result.record(benchmark, record_property)
