"""What the benchmark suites run: cases, the implementations side by side, the timer and the memory meter.

A :class:`Case` is one (op, pass, implementation, shape). Every implementation of the log-prob op is driven through the
same step so the timings compare like with like: per-token log-probs of ``[rows, seq]`` tokens, summed per row, a DPO
loss over (chosen rows, rejected rows), and its backward. Peers that are not installed, or that cannot run on this
device, are skipped with the reason (the suites call :func:`unavailable`); none is dropped silently.

Timing (:class:`Clock`): on CUDA, CUDA events around the call inside the timed function (pytest-benchmark's own
clock would see only the kernel launches); on CPU, ``time.perf_counter``. The per-round milliseconds are returned to
the suite, which records them in ``extra_info``.

Peak memory (:class:`MemoryMeter`), measured, never estimated:
- CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus the memory allocated just
  before the op (inputs, and for the backward pass the forward's graph, are not counted).
- CPU, Linux: a fresh subprocess per shape (this file run as a script) measures each op in turn: ``malloc_trim``, reset
  the peak resident set size (``/proc/self/clear_refs`` <- 5), run the op, and take ``VmHWM`` minus ``VmRSS`` just
  before it. Each op first runs once at a tiny shape so thread pools and lazy imports are not charged to it.
- CPU elsewhere (no resettable peak): one subprocess per op, ``ru_maxrss`` minus that of a baseline subprocess doing
  the same setup without the op.

FLOPs of the log-prob op (docs/math.md): forward 2NVd, backward 4NVd plus the 2NVd logit recompute, full step 8NVd.
The same formula is charged to every implementation, so TFLOP/s is work-normalised: higher is faster, whatever an
implementation actually executes.
"""
from __future__ import annotations

import ctypes
import gc
import importlib
import importlib.util
import inspect
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from entangle_fast import linear_logprobs, output_layer_token_stats
from entangle_fast.reference import linear_logprobs_reference, output_layer_token_stats_reference

from presets import PASSES, LogprobShape, MatmulShape, Preset, StatsShape, shape_from_dict

IGNORE_INDEX = -100
BETA = 0.1
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
RESULT_KEY = "entangle_fast_bench_result"  # the user_properties key the suites record results under

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
        return {"id": self.id, "kind": self.kind, "group": self.group, "impl": self.impl, "pass": self.pass_,
                "shape": self.shape.name, "shape_params": self.shape.to_dict(), "dtype": self.shape.dtype}

    def to_spec(self) -> dict:
        return {"kind": self.kind, "impl": self.impl, "pass": self.pass_, "shape": self.shape.to_dict(),
                "rounds": self.rounds, "warmup_rounds": self.warmup_rounds}

    @classmethod
    def from_spec(cls, spec: dict) -> "Case":
        return cls(spec["kind"], spec["impl"], spec["pass"], shape_from_dict(spec["kind"], spec["shape"]),
                   spec["rounds"], spec["warmup_rounds"])

    def tiny(self) -> "Case":
        """The same implementation and pass at a toy shape (warms a process up without charging its memory)."""
        shape = {
            "logprobs": LogprobShape(2, 4, 8, 16, self.shape.dtype),
            "token_stats": StatsShape(1, 4, 8, 16, self.shape.dtype, loop=True),
            "matmul": MatmulShape(8, 8, 8, self.shape.dtype),
        }[self.kind]
        return Case(self.kind, self.impl, self.pass_, shape, 1, 0)


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


class Clock:
    """Milliseconds of one call: CUDA events on CUDA (the launch returns before the work ends), wall time on CPU.

    On CPU it also keeps the process CPU time of the call (``cpu_ms``, all threads): on a shared machine the wall time
    is inflated by other processes, the CPU time much less so."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.name = "cuda-events" if self.cuda else "perf-counter"
        self.cpu_ms: list[float] = []

    def __call__(self, fn, *args) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*args)
            end.record()
            end.synchronize()
            return float(start.elapsed_time(end))
        c0, t0 = time.process_time(), time.perf_counter()
        fn(*args)
        wall = (time.perf_counter() - t0) * 1e3
        self.cpu_ms.append((time.process_time() - c0) * 1e3)
        return wall


# ---------------------------------------------------------------------------------------------------------------------
# Peak memory.

MEMORY_METHODS = {
    "cuda-max-memory-allocated": "torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus "
    "memory_allocated() just before the op; in the benchmark process",
    "linux-vmhwm": "fresh subprocess per shape; per op: malloc_trim, reset the peak RSS (/proc/self/clear_refs <- 5), "
    "run once, VmHWM minus VmRSS just before the op (each op warmed up at a toy shape first)",
    "ru-maxrss-vs-baseline": "one subprocess per op: ru_maxrss minus ru_maxrss of a baseline subprocess that does the "
    "same setup without the op",
}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+)", f.read(), re.M).group(1))


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def rss_peak_extra(fn) -> int:
    """Peak resident set during ``fn()`` minus the resident set just before it, in bytes (Linux: the peak is reset
    through ``/proc/self/clear_refs`` and read from ``VmHWM``); raises OSError where the peak cannot be reset."""
    _trim()
    if not _reset_peak_rss():
        raise OSError("the peak resident set cannot be reset here (/proc/self/clear_refs)")
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) * 1024


def _maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def cuda_peak_extra(case: Case, device: torch.device) -> int:
    bench, state = Runnable(case, device), None
    try:
        state = bench.setup()
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        bench.run(state)
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated(device) - base)
    finally:
        del state
        bench.release()


def probe(spec: dict) -> dict:
    """Run in a fresh CPU process: peak extra memory of each case in ``spec['cells']`` (see the module docstring)."""
    torch.set_num_threads(spec["threads"])
    device = torch.device("cpu")
    cells = [Case.from_spec(c) for c in spec["cells"]]
    mode = spec.get("mode") or ("linux-vmhwm" if os.path.exists("/proc/self/status") and _reset_peak_rss()
                                else "ru-maxrss-vs-baseline")
    out = {"mode": mode, "peak_extra_bytes": {}}
    if mode == "ru-maxrss-vs-baseline":  # one cell per process (or none: the baseline)
        for case in cells:
            bench = Runnable(case, device)
            state = bench.setup()
            if not spec.get("baseline"):
                bench.run(state)
        out["maxrss_bytes"] = _maxrss_bytes()
        return out
    for case in cells:
        warm = Runnable(case.tiny(), device)
        warm.run(warm.setup())
        warm.release()
        bench = Runnable(case, device)
        state = bench.setup()
        _trim()
        _reset_peak_rss()
        before = _status_kib("VmRSS")
        bench.run(state)
        out["peak_extra_bytes"][case.id] = (_status_kib("VmHWM") - before) * 1024
        del state
        bench.release()
        del bench
        _trim()
    return out


class MemoryMeter:
    """Peak extra memory per case; on CPU one probe subprocess per shape, cached, covering the run's selected cases."""

    def __init__(self, device: torch.device, selected: list[Case]):
        self.device, self.selected = device, selected
        self.cache: dict[str, int] = {}
        self.errors: dict[str, str] = {}
        self.method = "cuda-max-memory-allocated" if device.type == "cuda" else None

    def peak(self, case: Case) -> tuple[int | None, str, str | None]:
        """``(bytes or None, method, error or None)``."""
        if self.device.type == "cuda":
            try:
                return cuda_peak_extra(case, self.device), self.method, None
            except torch.cuda.OutOfMemoryError as err:
                return None, self.method, f"out of memory: {err}"
        if case.id not in self.cache and case.id not in self.errors:
            siblings = [c for c in self.selected if (c.kind, c.shape) == (case.kind, case.shape)
                        and unavailable(c, self.device) is None] or [case]
            self._probe_cpu(siblings if case in siblings else siblings + [case])
        return self.cache.get(case.id), self.method or "linux-vmhwm", self.errors.get(case.id)

    def _spawn(self, cells: list[Case], **extra) -> dict:
        spec = {"threads": torch.get_num_threads(), "cells": [c.to_spec() for c in cells], **extra}
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve())], input=json.dumps(spec),
                              capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"memory probe exited with {proc.returncode}: {proc.stderr.strip()[-800:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def _probe_cpu(self, cells: list[Case]) -> None:
        try:
            out = self._spawn(cells)
            self.method = out["mode"]
            if out["mode"] == "linux-vmhwm":
                self.cache.update(out["peak_extra_bytes"])
                return
            for case in cells:  # no resettable peak here: one process per op against a baseline process
                base = self._spawn([case], mode=out["mode"], baseline=True)["maxrss_bytes"]
                self.cache[case.id] = max(0, self._spawn([case], mode=out["mode"])["maxrss_bytes"] - base)
        except (RuntimeError, ValueError, OSError) as err:
            for case in cells:
                self.errors.setdefault(case.id, str(err))


# ---------------------------------------------------------------------------------------------------------------------
# The suites' one entry point.


def environment() -> dict:
    """GPU name, versions: what every result's extra_info carries (queried at run time)."""
    try:
        from importlib.metadata import version

        triton_version = version("triton")
    except Exception:  # noqa: BLE001 - not installed
        triton_version = None
    cuda = torch.cuda.is_available()
    return {"gpu": torch.cuda.get_device_name(0) if cuda else None, "torch": torch.__version__,
            "triton": triton_version, "cuda": torch.version.cuda if cuda else None,
            "torch_threads": torch.get_num_threads()}


class SuiteRunner:
    """Held by the session fixture ``bench``: times a case with pytest-benchmark, measures its memory, records it."""

    def __init__(self, preset: Preset, device: torch.device, selected: list[Case]):
        self.preset, self.device = preset, device
        self.clock = Clock(device)
        self.memory = MemoryMeter(device, selected)
        self.env = environment()

    def run(self, benchmark, case: Case, record_property) -> dict:
        import pytest

        reason = unavailable(case, self.device)
        if reason is not None:
            pytest.skip(f"{case.impl}: {reason}")
        benchmark.group = case.group
        samples: list[float] = []
        self.clock.cpu_ms = []
        bench = Runnable(case, self.device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            benchmark.pedantic(lambda state: samples.append(self.clock(bench.run, state)),
                               setup=lambda: ((bench.setup(),), {}), rounds=case.rounds,
                               warmup_rounds=case.warmup_rounds, iterations=1)
        bench.release()
        samples = samples[-case.rounds:]
        cpu_ms = self.clock.cpu_ms[-case.rounds:]
        peak, method, error = self.memory.peak(case)
        median = statistics.median(samples)
        flops = case.flops()
        result = {
            **case.describe(),
            "device": self.device.type,
            "time_ms": median,
            "time_ms_min": min(samples),
            "time_ms_max": max(samples),
            "rounds": len(samples),
            "samples_ms": samples,
            "timer": self.clock.name,
            "cpu_time_ms": statistics.median(cpu_ms) if cpu_ms else None,
            "peak_memory_bytes": peak,
            "memory_method": method,
            "memory_error": error,
            "flops": flops,
            "tflops": flops / (median * 1e-3) / 1e12 if flops and median > 0 else None,
            "warnings": sorted({str(w.message)[:300] for w in caught})[:5],
            "environment": self.env,
        }
        stats = getattr(getattr(benchmark, "stats", None), "stats", None)
        if stats is not None:  # pytest-benchmark's own clock (outer wall time, seconds); absent when disabled
            result["pytest_benchmark"] = {k: getattr(stats, k) for k in ("min", "median", "mean", "stddev", "rounds")}
        benchmark.extra_info.update({k: v for k, v in result.items() if k != "samples_ms"})
        record_property(RESULT_KEY, result)
        return result


if __name__ == "__main__":  # the CPU memory probe: spec JSON on stdin, result JSON on the last stdout line
    print(json.dumps(probe(json.loads(sys.stdin.read()))))
