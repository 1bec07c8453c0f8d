"""The monitor's cost: one DPO training step without it, with it, and with the two-extra-backward baseline.

Modes, side by side in one run (``impl`` in the results, ``kind`` is ``"monitor"``):
    off       ``preference_logprobs`` + sigmoid DPO loss + ``backward()``: the step the monitor rides on
    exact     the same step inside ``EntanglementMonitor(model, mode="exact")``, statistics read at the end
    sketch    the same with ``mode="sketch"`` (``sketch_dim`` from the shape)
    explicit  the baseline: each response's flattened gradient by its own ``retain_graph`` backward
              (``flat_gradients_reference``), the three dot products per pair, then the loss backward

Shapes come from the preset (``monitor`` field of ``presets.py``): ``cpu`` a tiny and a small Llama-style config,
``gpu`` a 1B-class Llama at 1024 response tokens in bf16 (skipped where no CUDA device is visible), ``smoke`` a toy
config run once. Every mode of a shape builds the same seeded model and batch.

Measured and recorded like the other suites (``extra_info`` and the ``entangle_fast_bench_result`` user property):
``time_ms``, the median step time (CUDA synchronised; on CPU also the process CPU time), and ``peak_memory_bytes``,
the peak over one step minus what was allocated before it (CUDA ``max_memory_allocated``; on Linux CPUs the peak
resident set after a warm-up step, in this process). ``entangle-fast bench`` turns them into the ratios exact / off,
sketch / off and the baseline's overhead over the monitor's.
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from cases import rss_peak_extra

RESULT_KEY = "entangle_fast_bench_result"  # the suites' user_properties key (benchmarks/cases.py)
BETA = 0.1


def _build(shape, device):
    from entangle_fast.models import TinyConfig, tiny_model

    cfg = TinyConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, num_layers=shape.layers,
                     num_heads=shape.heads, num_kv_heads=shape.kv_heads, intermediate_size=shape.intermediate,
                     max_positions=shape.prompt + shape.response + 8)
    model = tiny_model("llama", cfg, dtype=getattr(torch, shape.dtype)).to(device).train()
    if device.type == "cuda":
        model.config._attn_implementation = "sdpa"
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, shape.vocab, (2 * shape.pairs, shape.prompt + shape.response), generator=gen)
    labels = ids.clone()
    labels[:, : shape.prompt] = -100
    batch = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
             "labels": labels.to(device)}
    return model, batch


def _dpo(out):
    return (-F.logsigmoid(BETA * (out.chosen_logps - out.rejected_logps))).mean()


def step(model, batch, mode: str, sketch_dim: int):
    """One training step's forward and backward in ``mode``; returns what the mode measured (kept alive, so no work
    is skipped)."""
    from entangle_fast import EntanglementMonitor, preference_logprobs
    from entangle_fast.reference import flat_gradients_reference

    model.zero_grad(set_to_none=True)
    if mode == "off":
        _dpo(preference_logprobs(model, batch)).backward()
        return None
    if mode in ("exact", "exact-autograd", "sketch"):
        kwargs = {"bookkeeping": False} if mode == "exact-autograd" else {}
        with EntanglementMonitor(model, mode=mode.split("-")[0], sketch_dim=sketch_dim, **kwargs) as mon:
            _dpo(preference_logprobs(model, batch)).backward()
        return mon.stats.cosine
    if mode == "explicit":
        out = preference_logprobs(model, batch)
        params = [p for p in model.parameters() if p.requires_grad]
        grads = flat_gradients_reference(torch.cat([out.chosen_logps, out.rejected_logps]), params).float()
        b = out.chosen_logps.shape[0]
        gw, gl = grads[:b], grads[b:]
        inner, nw, nl = (gw * gl).sum(1), (gw * gw).sum(1), (gl * gl).sum(1)
        del grads, gw, gl
        _dpo(out).backward()
        return inner / (nw * nl).sqrt()
    raise ValueError(f"unknown monitor benchmark mode {mode!r}")


def peak_extra(fn, device) -> tuple[int | None, str, str | None]:
    """``(bytes, method, error)``: the peak of ``fn()`` over what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before, "cuda-max-memory-allocated", None
    try:
        return rss_peak_extra(fn), "linux-vmhwm-in-process", None
    except (OSError, KeyError) as exc:
        return None, "linux-vmhwm-in-process", f"no resettable peak resident set here: {exc}"


def _environment(device) -> dict:
    cuda = device.type == "cuda"
    return {"gpu": torch.cuda.get_device_name(0) if cuda else None, "torch": torch.__version__,
            "cuda": torch.version.cuda if cuda else None, "torch_threads": torch.get_num_threads()}


def test_monitor_step(benchmark, monitor_case, bench_preset, record_property):
    shape, mode = monitor_case.shape, monitor_case.mode
    device = torch.device("cuda" if bench_preset.device == "cuda" else "cpu")
    if bench_preset.device == "auto" and torch.cuda.is_available():
        device = torch.device("cuda")
    model, batch = _build(shape, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    step(model, batch, mode, shape.sketch_dim)  # warm-up: lazy imports, allocator growth, kernel compilation
    peak, method, error = peak_extra(lambda: step(model, batch, mode, shape.sketch_dim), device)

    wall, cpu = [], []

    def timed():
        sync()
        c0, t0 = time.process_time(), time.perf_counter()
        measured = step(model, batch, mode, shape.sketch_dim)
        sync()
        wall.append(1e3 * (time.perf_counter() - t0))
        cpu.append(1e3 * (time.process_time() - c0))
        return measured

    rounds = 1 if benchmark.disabled else max(3, bench_preset.rounds)
    benchmark.group = monitor_case.describe()["group"]
    measured = benchmark.pedantic(timed, rounds=rounds, iterations=1)
    if measured is not None:
        assert torch.isfinite(measured).all(), f"{mode}: non-finite cosine {measured}"
    result = {
        **monitor_case.describe(),
        "device": device.type,
        "time_ms": statistics.median(wall),
        "time_ms_min": min(wall),
        "time_ms_max": max(wall),
        "rounds": len(wall),
        "samples_ms": wall,
        "timer": "cuda-synchronize" if device.type == "cuda" else "perf-counter",
        "cpu_time_ms": statistics.median(cpu) if device.type == "cpu" else None,
        "peak_memory_bytes": peak,
        "memory_method": method,
        "memory_error": error,
        "flops": None,
        "tflops": None,
        "params": sum(p.numel() for p in model.parameters()),
        "environment": _environment(device),
    }
    benchmark.extra_info.update({k: v for k, v in result.items() if k != "samples_ms"})
    record_property(RESULT_KEY, result)

