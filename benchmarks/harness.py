"""The one harness of every benchmark suite: the timer, the memory meter and the result record.

Every suite (log-probs, token statistics, monitor, trainer, profile) times with :class:`Timer`, measures peak memory
with :func:`peak_memory` and writes one :class:`Result` per case, which :meth:`Result.record` puts into
pytest-benchmark's ``extra_info`` and into the ``user_properties`` entry ``entangle-fast bench`` collects
(:data:`entangle_fast.bench.RESULT_KEY`).

Timer: on CUDA, CUDA events recorded around the call inside the timed function (the launch returns before the work
ends; pytest-benchmark's own clock would see only the launches), read after one synchronize; on CPU
``time.perf_counter``, plus the process CPU time of the call (all threads), which a shared machine inflates less
than the wall time.

Memory, measured, never estimated, around one call made after the timed rounds (so lazy imports, thread pools and
kernel compilation are warm and not charged):
- CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus ``memory_allocated()`` just
  before the call;
- CPU (Linux): ``malloc_trim``, reset the peak resident set (``/proc/self/clear_refs`` <- 5), then ``VmHWM`` after
  the call minus ``VmRSS`` just before it, in this process. Elsewhere no peak can be reset: the error says so.
"""
from __future__ import annotations

import ctypes
import gc
import re
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from entangle_fast.bench import RESULT_KEY

CUDA_MEMORY = "cuda-max-memory-allocated"
CPU_MEMORY = "linux-vmhwm-in-process"


class Timer:
    """Milliseconds of timed calls: ``timer(fn, *args)`` (returns ``fn``'s output) or ``start()`` ... ``stop()``
    around work driven by someone else (the trainer's step callbacks). ``samples`` lists one entry per call."""

    def __init__(self, device: torch.device | str):
        self.cuda = torch.device(device).type == "cuda"
        self.name = "cuda-events" if self.cuda else "perf-counter"
        self.cpu_ms: list[float] = []
        self._ms: list[float] = []
        self._pending: list[tuple] = []  # CUDA (start, end) events not read yet
        self._open = None

    def start(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._open = event
        else:
            self._open = (time.perf_counter(), time.process_time())

    def stop(self) -> None:
        if self._open is None:
            raise RuntimeError("Timer.stop() without a start()")
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._pending.append((self._open, end))
        else:
            t0, c0 = self._open
            self._ms.append((time.perf_counter() - t0) * 1e3)
            self.cpu_ms.append((time.process_time() - c0) * 1e3)
        self._open = None

    def __call__(self, fn: Callable, *args) -> Any:
        self.start()
        out = fn(*args)
        self.stop()
        return out

    @property
    def samples(self) -> list[float]:
        if self._pending:
            torch.cuda.synchronize()
            self._ms += [float(s.elapsed_time(e)) for s, e in self._pending]
            self._pending = []
        return list(self._ms)


@dataclass(frozen=True)
class Memory:
    """Peak extra memory of one call: ``bytes`` (None when it could not be measured, ``error`` says why)."""

    bytes: int | None
    method: str
    error: str | None = None


def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field_name}:\s+(\d+)", f.read(), re.M).group(1))


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory(fn: Callable[[], Any], device: torch.device | str) -> tuple[Any, Memory]:
    """``(fn(), Memory)``: the peak of ``fn()`` over what was allocated (CUDA) or resident (CPU) just before it."""
    if torch.device(device).type == "cuda":
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        try:
            out = fn()
        except torch.cuda.OutOfMemoryError as err:
            return None, Memory(None, CUDA_MEMORY, f"out of memory: {err}")
        torch.cuda.synchronize()
        return out, Memory(int(torch.cuda.max_memory_allocated() - before), CUDA_MEMORY)
    _trim()
    if not _reset_peak_rss():
        return fn(), Memory(None, CPU_MEMORY, "no resettable peak resident set here (/proc/self/clear_refs)")
    before = _status_kib("VmRSS")
    out = fn()
    return out, Memory((_status_kib("VmHWM") - before) * 1024, CPU_MEMORY)


def environment() -> dict:
    """GPU name and versions, queried now (never at import): what every result carries."""
    from importlib.metadata import PackageNotFoundError, version

    def _version(dist):
        try:
            return version(dist)
        except PackageNotFoundError:
            return None

    cuda = torch.cuda.is_available()
    return {"gpu": torch.cuda.get_device_name(0) if cuda else None, "torch": torch.__version__,
            "triton": _version("triton"), "cuda": torch.version.cuda if cuda else None,
            "torch_threads": torch.get_num_threads(), "trl": _version("trl")}


@dataclass
class Result:
    """One case's measurement, as every suite records it (``entangle_fast.bench.RESULT_SCHEMA`` lists the keys).

    ``case``: the case's ``describe()`` (id, kind, group, impl, pass, shape, shape_params, dtype); ``samples_ms``: one
    time per timed round; ``extra``: suite-specific fields, kept beside the common ones."""

    case: dict
    device: str
    samples_ms: list[float]
    timer: str
    memory: Memory
    cpu_ms: list[float] = field(default_factory=list)
    flops: int | None = None
    warnings: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        if not self.samples_ms:
            raise ValueError(f"{self.case.get('id')}: no timed sample to record")
        median = statistics.median(self.samples_ms)
        return {
            **self.case,
            "device": self.device,
            "time_ms": median,
            "time_ms_min": min(self.samples_ms),
            "time_ms_max": max(self.samples_ms),
            "rounds": len(self.samples_ms),
            "samples_ms": list(self.samples_ms),
            "timer": self.timer,
            "cpu_time_ms": statistics.median(self.cpu_ms) if self.cpu_ms else None,
            "peak_memory_bytes": self.memory.bytes,
            "memory_method": self.memory.method,
            "memory_error": self.memory.error,
            "flops": self.flops,
            "tflops": self.flops / (median * 1e-3) / 1e12 if self.flops and median > 0 else None,
            "warnings": self.warnings[:5],
            "environment": environment(),
            **self.extra,
        }

    def record(self, benchmark, record_property) -> dict:
        """Into ``benchmark.extra_info`` (all but the samples; ``benchmark`` None: a second result of the same test,
        the run file only) and the user property ``entangle-fast bench`` reads."""
        result = self.to_dict()
        stats = getattr(getattr(benchmark, "stats", None), "stats", None)
        if stats is not None:  # pytest-benchmark's own clock (outer wall time, seconds); absent when disabled
            result["pytest_benchmark"] = {k: getattr(stats, k) for k in ("min", "median", "mean", "stddev", "rounds")}
        if benchmark is not None:
            benchmark.extra_info.update({k: v for k, v in result.items() if k != "samples_ms"})
        record_property(RESULT_KEY, result)
        return result
