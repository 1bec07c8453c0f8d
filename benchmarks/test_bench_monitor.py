"""The monitor's cost: one DPO training step without it, with it, and with the two-extra-backward baseline.

Modes, side by side in one run (``impl`` in the results, ``kind`` is ``"monitor"``):
    off       ``preference_logprobs`` + sigmoid DPO loss + ``backward()``: the step the monitor rides on
    exact     the same step inside ``EntanglementMonitor(model, mode="exact")``, statistics read at the end
    sketch    the same with ``mode="sketch"`` (``sketch_dim`` from the shape)
    explicit  the baseline: each response's flattened gradient by its own ``retain_graph`` backward
              (``flat_gradients_reference``), the three dot products per pair, then the loss backward

Shapes come from the preset (``monitor`` field of ``presets.py``): ``cpu`` a tiny and a small Llama-style config,
``gpu`` a 1B-class Llama at 1024 response tokens in bf16 (skipped where no CUDA device is visible), ``smoke`` a toy
config run once. The modes of a shape share one seeded model and batch, and each monitored mode one monitor, made
before the timed steps and used at every step (as a training loop keeps it).

Timed, measured and recorded with the suites' one harness (``harness.py``): ``time_ms`` the median step time,
``peak_memory_bytes`` the peak over one warm step minus what was allocated (CUDA) or resident (CPU) before it. The
first case of a shape to run times every mode of the shape, side by side: each round takes one step of each mode, in
an order that rotates from round to round, so that a machine whose speed drifts during the run weighs on every mode
alike; each case records its own mode.
``RATIOS`` below: exact / off, exact-autograd / off, sketch / off, and the baseline's overhead over the monitor's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from harness import Result, Timer, peak_memory

from entangle_fast.bench import Ratio

BETA = 0.1
MONITORED = ("exact", "exact-autograd", "sketch")
RATIOS = [
    r for mode in MONITORED for r in (
        Ratio("monitor", mode, "off", "time", f"{mode} / off step time", "lower", True),
        Ratio("monitor", mode, "off", "memory", f"{mode} / off peak memory", "lower"),
        Ratio("monitor", "explicit - off", f"{mode} - off", "time", f"two-extra-backward overhead / {mode} overhead",
              "higher", mode == "exact"),
    )
] + [Ratio("monitor", "explicit", "off", "time", "explicit / off step time", "lower")]


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


def step(model, batch, mode: str, sketch_dim: int, monitors: dict | None = None):
    """One training step's forward and backward in ``mode``; returns what the mode measured (kept alive, so no work
    is skipped). A monitored mode takes its monitor from ``monitors`` (made there on first use)."""
    from entangle_fast import EntanglementMonitor, preference_logprobs
    from entangle_fast.reference import flat_gradients_reference

    model.zero_grad(set_to_none=True)
    if mode == "off":
        _dpo(preference_logprobs(model, batch)).backward()
        return None
    if mode in ("exact", "exact-autograd", "sketch"):
        monitors = {} if monitors is None else monitors
        mon = monitors.get(mode)
        if mon is None:
            kwargs = {"bookkeeping": False} if mode == "exact-autograd" else {}
            mon = monitors[mode] = EntanglementMonitor(model, mode=mode.split("-")[0], sketch_dim=sketch_dim, **kwargs)
        with mon:
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


# (shape name, device, rounds) -> mode -> (timer, peak memory, parameter count): every mode of a shape, timed side by
# side by the first of its cases to run.
_TAKEN: dict = {}


def _side_by_side(shape, device, rounds: int, benchmark) -> dict:
    model, batch = _build(shape, device)
    monitors: dict = {}
    for mode in shape.modes:  # warm-up: lazy imports, allocator growth, kernel compilation, the monitors' first step
        step(model, batch, mode, shape.sketch_dim, monitors)
    timers = {mode: Timer(device) for mode in shape.modes}
    order = list(shape.modes)

    def one_round():
        for mode in order:
            measured = timers[mode](step, model, batch, mode, shape.sketch_dim, monitors)
            if measured is not None:
                assert torch.isfinite(measured).all(), f"{mode}: non-finite cosine {measured}"
        order.append(order.pop(0))

    benchmark.pedantic(one_round, rounds=rounds, iterations=1)
    params = sum(p.numel() for p in model.parameters())
    taken = {}
    for mode in shape.modes:
        _, memory = peak_memory(lambda: step(model, batch, mode, shape.sketch_dim, monitors), device)
        taken[mode] = (timers[mode], memory, params)
    return taken


def test_monitor_step(benchmark, monitor_case, bench_preset, bench_device, record_property):
    shape, mode, device = monitor_case.shape, monitor_case.mode, bench_device
    rounds = 1 if benchmark.disabled else max(3, shape.rounds or bench_preset.rounds)
    benchmark.group = monitor_case.describe()["group"]
    key = (shape.name, str(device), rounds)
    first = key not in _TAKEN
    if first:
        _TAKEN[key] = _side_by_side(shape, device, rounds, benchmark)
    timer, memory, params = _TAKEN[key][mode]
    Result(monitor_case.describe(), device.type, timer.samples, timer.name, memory, cpu_ms=timer.cpu_ms,
           extra={"params": params, "side_by_side": True}).record(benchmark if first else None, record_property)
