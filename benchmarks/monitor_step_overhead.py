"""Step overhead of the monitor: a DPO step without it, with it (exact, sketch), and the two-extra-backward baseline.

Run: ``python benchmarks/monitor_step_overhead.py benchmarks/results/monitor-<machine>-<date>.json``. Side by side in
one process, median of 5 steps each, float32 tiny Llama-style configs built in code (CPU-sized; the GPU targets of
docs at 1B scale need the bench presets).
"""
import json
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from entangle_fast import EntanglementMonitor, preference_logprobs
from entangle_fast.models import TinyConfig, tiny_model
from entangle_fast.reference import flat_gradients_reference

torch.manual_seed(0)
CONFIGS = {"tiny": TinyConfig(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128, max_positions=256),
           "small": TinyConfig(vocab_size=4096, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4, intermediate_size=704, max_positions=512)}
B, P, T = 4, 32, 96  # pairs, prompt tokens, response tokens

def batch(v):
    ids = torch.randint(4, v, (2 * B, P + T))
    labels = ids.clone(); labels[:, :P] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

def step(model, b, mode):
    model.zero_grad(set_to_none=True)
    if mode == "off":
        out = preference_logprobs(model, b)
        (-F.logsigmoid(0.1 * (out.chosen_logps - out.rejected_logps))).mean().backward()
    elif mode in ("exact", "sketch"):
        with EntanglementMonitor(model, mode=mode, sketch_dim=32) as mon:
            out = preference_logprobs(model, b)
            (-F.logsigmoid(0.1 * (out.chosen_logps - out.rejected_logps))).mean().backward()
        mon.stats
    else:  # two extra backwards: per-sequence gradients kept, then the loss backward
        out = preference_logprobs(model, b)
        params = [p for p in model.parameters() if p.requires_grad]
        g = flat_gradients_reference(torch.cat([out.chosen_logps, out.rejected_logps]), params)
        gw, gl = g[:B], g[B:]
        ((gw * gl).sum(1), (gw * gw).sum(1), (gl * gl).sum(1))
        (-F.logsigmoid(0.1 * (out.chosen_logps - out.rejected_logps))).mean().backward()

res = {"machine": {"cpu_cores": torch.get_num_threads(), "torch": torch.__version__, "platform": platform.platform()},
       "shape": {"pairs": B, "prompt": P, "response": T, "dtype": "float32"}, "configs": {}}
for name, cfg in CONFIGS.items():
    model = tiny_model("llama", cfg).train()
    b = batch(cfg.vocab_size)
    times = {}
    for mode in ("off", "exact", "sketch", "explicit"):
        step(model, b, mode)
        ts = []
        for _ in range(5):
            t0 = time.perf_counter(); step(model, b, mode); ts.append(time.perf_counter() - t0)
        times[mode] = statistics.median(ts)
    off = times["off"]
    res["configs"][name] = {"params": sum(p.numel() for p in model.parameters()), "median_s": times,
        "overhead_exact": times["exact"] / off - 1, "overhead_sketch": times["sketch"] / off - 1,
        "overhead_two_extra_backwards": times["explicit"] / off - 1,
        "exact_vs_baseline_overhead_ratio": (times["explicit"] / off - 1) / max(times["exact"] / off - 1, 1e-9)}
    print(name, json.dumps(res["configs"][name]), flush=True)
json.dump(res, open(sys.argv[1], "w"), indent=1)
