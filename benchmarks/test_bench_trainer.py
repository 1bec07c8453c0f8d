"""Stock TRL ``DPOTrainer`` against ``EntangledDPOTrainer`` on the same model and data: time per step and peak memory.

Implementations, side by side in one run (``impl`` in the results, ``kind`` is ``"trainer"``):
    trl              stock ``trl.DPOTrainer`` (TRL's own chunked fused LM head)
    entangled_off    ``EntangledDPOTrainer(entangle_every=0)``: entangle_fast's fused log-probs, no monitor
    entangled        ``EntangledDPOTrainer(entangle_every=1)``: the monitor on every step (exact mode)

Shapes: ``cpu-tiny`` (the built-in tiny Llama and pairs, float32, seconds) and ``gpu`` (a 0.3B-parameter Llama-shaped
model in bfloat16 on 512-token pairs), skipped with its reason where no CUDA device is visible.

Timed, measured and recorded with the suites' one harness (``harness.py``):
- ``time_ms``: median over rounds of the mean optimizer-step time, from the steps after the first ``warmup`` of each
  ``trainer.train()`` round, timed by a callback at step begin/end (CUDA events on a GPU), so trainer start-up is not
  counted; ``steps_per_s`` is its inverse. Each round trains all three implementations one after another (the first
  case of a shape to run takes every implementation's rounds, and each case records its own), so that a machine
  whose speed drifts during the run weighs on the three alike and the ratios compare steps taken side by side.
- ``peak_memory_bytes``: the peak over one warm ``train()`` minus what was allocated (CUDA) or resident (CPU) before.
"""
from __future__ import annotations

import random
import statistics
import warnings
from dataclasses import asdict, dataclass

import pytest
import torch
from harness import Result, Timer, peak_memory
from presets import describe_case

from entangle_fast.bench import Ratio

IMPLS = ("trl", "entangled_off", "entangled")
RATIOS = [
    r for ours in ("entangled", "entangled_off") for r in (
        Ratio("trainer", ours, "trl", "time", f"{ours} / trl time per step", "lower", ours == "entangled"),
        Ratio("trainer", "trl", ours, "memory", f"trl / {ours} peak memory", "higher", ours == "entangled"),
    )
]


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
                 prompt_words=0, completion_words=0, pairs=3, steps=12, warmup=2),
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
        return self.describe()["id"]

    def describe(self) -> dict:
        return describe_case("trainer", self.impl, "train_step", self.shape.name, asdict(self.shape), self.shape.dtype)


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
    """Times each optimizer step with the harness's :class:`Timer`, through the public callback API; ``steps`` holds
    the global step of each sample."""

    def __init__(self, device: str):
        from transformers import TrainerCallback

        timer = self

        class _Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                timer.timer.start()

            def on_step_end(self, args, state, control, **kwargs):
                timer.timer.stop()
                timer.steps.append(state.global_step)

        self.timer, self.steps, self.callback = Timer(device), [], _Callback()


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


def _cases():
    for shape in SHAPES:
        marks = []
        if shape.device == "cuda":
            marks = [pytest.mark.skipif(not torch.cuda.is_available(),
                                        reason="requires_cuda: the gpu shape needs a CUDA device (none is visible)")]
        for impl in IMPLS:
            case = TrainerCase(shape, impl)
            yield pytest.param(case, id=case.id, marks=marks)


# shape name -> impl -> (per-round samples in ms, timer name, peak memory): every implementation's rounds of a shape
# are taken once, side by side, by the first of its cases to run; the others record theirs.
_TAKEN: dict = {}


def _side_by_side(shape: TrainerShape, benchmark, tmp_path, rounds: int) -> dict:
    """Train every implementation in turn, ``rounds`` times (one round: each ``trainer.train()`` once, in an order
    that rotates), so that a machine whose speed drifts during the run weighs on all of them alike; then one more warm
    ``train()`` of each for its peak memory."""
    built = {impl: build_trainer(TrainerCase(shape, impl), str(tmp_path / impl)) for impl in IMPLS}

    order = list(built.values())

    def one_round():  # each round starts with the next implementation, so none is always first
        for trainer, _ in order:
            trainer.train()
        order.append(order.pop(0))

    benchmark.pedantic(one_round, rounds=rounds, iterations=1)
    taken = {}
    for impl, (trainer, timer) in built.items():
        times, steps = timer.timer.samples, timer.steps
        samples = []  # per round: mean time of the steps past the warm-up ones, ms
        for r in range(rounds):
            window = range(r * shape.steps, (r + 1) * shape.steps)
            steady = [times[i] for i in window if steps[i] > shape.warmup]
            samples.append(sum(steady) / len(steady))
        taken[impl] = (samples, timer.timer.name)
    for impl, (trainer, _) in built.items():
        _, memory = peak_memory(trainer.train, shape.device)
        taken[impl] += (memory,)
    return taken


@pytest.mark.parametrize("case", list(_cases()))
def test_trainer_step(benchmark, case, tmp_path, record_property):
    pytest.importorskip("trl", reason="requires_trl: pip install entangle-fast[trl]")
    benchmark.group = case.describe()["group"]
    rounds = 1 if benchmark.disabled else 12  # four turns of the rotating order
    key = (case.shape.name, rounds)
    first = key not in _TAKEN
    if first:
        _TAKEN[key] = _side_by_side(case.shape, benchmark, tmp_path, rounds)
    samples, timer_name, memory = _TAKEN[key][case.impl]
    Result(case.describe(), case.shape.device, samples, timer_name, memory,
           extra={"steps_per_s": 1e3 / statistics.median(samples), "side_by_side": True}).record(benchmark if first else None,
                                                                          record_property)
