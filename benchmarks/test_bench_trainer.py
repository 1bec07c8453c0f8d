"""Stock TRL ``DPOTrainer`` against ``EntangledDPOTrainer`` on the same model and data: time per step and peak memory.

Implementations, side by side in one run (``impl`` in the results, ``kind`` is ``"trainer"``):
    trl              stock ``trl.DPOTrainer`` (TRL's own chunked fused LM head)
    entangled_off    ``EntangledDPOTrainer(entangle_every=0)``: entangle_fast's fused log-probs, no monitor
    entangled        ``EntangledDPOTrainer(entangle_every=1)``: the monitor on every step (exact mode)

Shapes: ``cpu-tiny`` (the built-in tiny Llama and pairs, float32, seconds) and ``gpu`` (a 0.3B-parameter Llama-shaped
model in bfloat16 on 512-token pairs), skipped with its reason where no CUDA device is visible.

Measured, and recorded like the other suites' results (``extra_info`` and the ``entangle_fast_bench_result`` user
property, which ``entangle-fast bench`` writes to ``benchmarks/results/``):
- ``time_ms``: median over rounds of the mean optimizer-step time, from the steps after the first ``warmup`` of each
  ``trainer.train()`` round, timed by a callback at step begin/end (CUDA synchronised), so trainer start-up is not
  counted; ``steps_per_s`` is its inverse.
- ``peak_memory_bytes``: CUDA, ``max_memory_allocated`` over one ``train()`` minus what was allocated before it. CPU
  (Linux), the peak resident set (``/proc/self/clear_refs``, ``VmHWM``) over one ``train()`` minus the resident set
  before it: in a fresh subprocess per implementation (this file as a script) when timing, in this process (after a
  warm-up ``train()``) under ``--benchmark-disable``.
"""
from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest

pytest.importorskip("trl", reason="requires_trl: pip install entangle-fast[trl]")

import torch  # noqa: E402
from cases import rss_peak_extra  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULT_KEY = "entangle_fast_bench_result"  # the suites' user_properties key (benchmarks/cases.py)
IMPLS = ("trl", "entangled_off", "entangled")


@dataclass(frozen=True)
class TrainerShape:
    name: str
    device: str
    dtype: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int            # at least the built-in tokenizer's
    prompt_words: int     # 0: the built-in pairs
    completion_words: int
    pairs: int            # per device batch
    steps: int
    warmup: int


SHAPES = (
    TrainerShape("cpu-tiny", "cpu", "float32", hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64, vocab=160,
                 prompt_words=0, completion_words=0, pairs=3, steps=6, warmup=2),
    TrainerShape("gpu", "cuda", "bfloat16", hidden=1024, layers=16, heads=16, kv_heads=8, intermediate=2816,
                 vocab=32000, prompt_words=256, completion_words=256, pairs=4, steps=12, warmup=3),
)


@dataclass(frozen=True)
class TrainerCase:
    """One (shape, implementation); ``describe()`` is what the suites' collector files skips and results under."""

    shape: TrainerShape
    impl: str

    @property
    def id(self) -> str:
        return f"trainer-{self.shape.name}-{self.impl}"

    def describe(self) -> dict:
        return {"id": self.id, "kind": "trainer", "group": f"trainer-{self.shape.name}", "impl": self.impl,
                "pass": "train_step", "shape": self.shape.name, "shape_params": asdict(self.shape),
                "dtype": self.shape.dtype}


def _records(shape: TrainerShape) -> list[dict]:
    from entangle_fast.models import BASE_WORDS, BUILTIN_PAIRS

    if shape.prompt_words == 0:
        return [{"prompt": p["prompt"], "chosen": " " + p["chosen"], "rejected": " " + p["rejected"]}
                for p in BUILTIN_PAIRS]
    rng = random.Random(0)
    words = [w for w in BASE_WORDS if w.isalpha()]

    def text(n):
        return " ".join(rng.choice(words) for _ in range(n))

    return [{"prompt": text(shape.prompt_words), "chosen": " " + text(shape.completion_words),
             "rejected": " " + text(shape.completion_words)} for _ in range(4 * shape.pairs)]


class StepTimer:
    """Per optimizer step wall time (CUDA synchronised), through the public callback API."""

    def __init__(self, device: str):
        from transformers import TrainerCallback

        timer = self

        class _Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                timer._sync()
                timer._start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                timer._sync()
                timer.times.append((state.global_step, time.perf_counter() - timer._start))

        self.device, self.times, self.callback = device, [], _Callback()

    def _sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()


def build_trainer(case: TrainerCase, outdir: str):
    import transformers as tf
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from entangle_fast.integrations.trl import EntangledDPOTrainer
    from entangle_fast.models import TinyConfig, build_tokenizer, tiny_model

    shape = case.shape
    cfg = TinyConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, num_layers=shape.layers,
                     num_heads=shape.heads, num_kv_heads=shape.kv_heads, intermediate_size=shape.intermediate,
                     max_positions=max(128, 2 * (shape.prompt_words + shape.completion_words) + 16))
    dtype = getattr(torch, shape.dtype)
    model = tiny_model("llama", cfg, dtype=dtype).to(shape.device)
    ref = tiny_model("llama", cfg, seed=1, dtype=dtype).to(shape.device)
    if shape.device == "cuda":
        for m in (model, ref):
            m.config._attn_implementation = "sdpa"
    timer = StepTimer(shape.device)
    args = DPOConfig(output_dir=outdir, max_steps=shape.steps, per_device_train_batch_size=shape.pairs,
                     learning_rate=1e-5, logging_steps=shape.steps, report_to="none", save_strategy="no",
                     use_cpu=shape.device == "cpu", bf16=shape.dtype == "bfloat16", gradient_checkpointing=False,
                     disable_tqdm=True, seed=0, dataloader_num_workers=0, max_length=None)
    cls, extra = DPOTrainer, {}
    if case.impl != "trl":
        cls, extra = EntangledDPOTrainer, {"entangle_every": 1 if case.impl == "entangled" else 0,
                                           "entangle_images_every": 0}
    tf.logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = cls(model=model, ref_model=ref, args=args, train_dataset=Dataset.from_list(_records(shape)),
                      processing_class=build_tokenizer(), callbacks=[timer.callback], **extra)
    return trainer, timer


def measure_peak(case: TrainerCase, trainer, fresh_process: bool) -> tuple[int | None, str, str | None]:
    """``(peak extra bytes, method, error)`` of one ``train()``."""
    if case.shape.device == "cuda":
        trainer.train()  # warm: kernels, allocator pools
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        trainer.train()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before, "cuda-max-memory-allocated", None
    if not Path("/proc/self/clear_refs").exists():
        return None, "linux-vmhwm", "no resettable peak resident set on this platform"
    if not fresh_process:
        trainer.train()  # warm: lazy imports, thread pools and allocator growth are not charged
        return rss_peak_extra(trainer.train), "linux-vmhwm-in-process", None
    out = subprocess.run([sys.executable, __file__, "--peak", case.shape.name, case.impl], capture_output=True,
                         text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    if out.returncode != 0:
        return None, "linux-vmhwm", f"probe failed: {out.stderr[-500:]}"
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"], "linux-vmhwm", None


def _probe(shape_name: str, impl: str) -> None:
    import tempfile

    case = TrainerCase(next(s for s in SHAPES if s.name == shape_name), impl)
    with tempfile.TemporaryDirectory() as outdir:
        trainer, _ = build_trainer(case, outdir)
        trainer.train()
        print(json.dumps({"peak_bytes": rss_peak_extra(trainer.train)}))


def _environment() -> dict:
    import trl

    cuda = torch.cuda.is_available()
    return {"gpu": torch.cuda.get_device_name(0) if cuda else None, "torch": torch.__version__,
            "cuda": torch.version.cuda if cuda else None, "torch_threads": torch.get_num_threads(),
            "trl": trl.__version__}


def _cases():
    for shape in SHAPES:
        marks = []
        if shape.device == "cuda":
            marks = [pytest.mark.skipif(not torch.cuda.is_available(),
                                        reason="requires_cuda: the gpu shape needs a CUDA device (none is visible)")]
        for impl in IMPLS:
            case = TrainerCase(shape, impl)
            yield pytest.param(case, id=case.id, marks=marks)


@pytest.mark.parametrize("case", list(_cases()))
def test_trainer_step(benchmark, case, tmp_path, record_property):
    trainer, timer = build_trainer(case, str(tmp_path))
    benchmark.group = f"trainer-{case.shape.name}"
    peak, method, error = measure_peak(case, trainer, fresh_process=not benchmark.disabled)
    timer.times.clear()
    rounds = 1 if benchmark.disabled else 3
    benchmark.pedantic(trainer.train, rounds=rounds, iterations=1)
    samples = []  # per round: mean time of the steps past the warm-up ones, ms
    for r in range(rounds):
        steps = timer.times[r * case.shape.steps:(r + 1) * case.shape.steps]
        steady = [t for step, t in steps if step > case.shape.warmup]
        samples.append(1e3 * sum(steady) / len(steady))
    median = statistics.median(samples)
    result = {
        **case.describe(),
        "device": case.shape.device,
        "time_ms": median,
        "time_ms_min": min(samples),
        "time_ms_max": max(samples),
        "rounds": len(samples),
        "samples_ms": samples,
        "timer": "cuda-synchronize" if case.shape.device == "cuda" else "perf-counter",
        "peak_memory_bytes": peak,
        "memory_method": method,
        "memory_error": error,
        "flops": None,
        "tflops": None,
        "steps_per_s": 1e3 / median,
        "environment": _environment(),
    }
    benchmark.extra_info.update({k: v for k, v in result.items() if k != "samples_ms"})
    record_property(RESULT_KEY, result)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--peak":
        _probe(sys.argv[2], sys.argv[3])
    else:
        sys.exit("usage: pytest benchmarks/test_bench_trainer.py   (internally: --peak SHAPE IMPL)")
