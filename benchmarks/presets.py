"""Shape presets of the benchmark suites: ``cpu`` (a few minutes on 2 cores), ``gpu`` (real shapes) and ``smoke``.

A preset is plain data: which shapes each benchmark runs at, on which device, and how many timed rounds. The suites
(``test_bench_logprobs.py``, ``test_bench_token_stats.py``) expand it into cases in ``conftest.py``; no torch here.

Shapes name the tokens as ``rows x seq``: the fused op sees ``N = rows * seq`` tokens, and the preference peers
(Liger's fused DPO loss) need the ``[rows, seq, d]`` layout with chosen rows first, rejected rows second.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

PASSES = ("forward", "backward", "full")
_DTYPE_TAG = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


@dataclass(frozen=True)
class LogprobShape:
    """``hidden [rows, seq, hidden]``, ``weight [vocab, hidden]`` in ``dtype``.

    ``passes``/``impls``/``rounds`` narrow what runs at a shape too big to time fully (the CPU memory target);
    ``impls=None`` means every implementation."""

    rows: int
    seq: int
    hidden: int
    vocab: int
    dtype: str = "float32"
    passes: tuple[str, ...] = PASSES
    impls: tuple[str, ...] | None = None
    rounds: int | None = None

    @property
    def tokens(self) -> int:
        return self.rows * self.seq

    @property
    def name(self) -> str:
        return f"R{self.rows}xT{self.seq}-d{self.hidden}-V{self.vocab}-{_DTYPE_TAG[self.dtype]}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["passes"] = list(self.passes)
        d["impls"] = list(self.impls) if self.impls is not None else None
        return d


@dataclass(frozen=True)
class StatsShape:
    """``pairs`` preference pairs of ``seq``-token responses: ``hidden [2 * pairs, seq, hidden]`` (chosen rows first).

    ``loop`` also runs the per-token backward loop (``output_layer_token_stats_reference``), which keeps one
    ``vocab * hidden`` gradient per token: only for small shapes."""

    pairs: int
    seq: int
    hidden: int
    vocab: int
    dtype: str = "float32"
    loop: bool = False
    rounds: int | None = None

    @property
    def rows(self) -> int:
        return 2 * self.pairs

    @property
    def tokens(self) -> int:
        return self.rows * self.seq

    @property
    def name(self) -> str:
        return f"P{self.pairs}xT{self.seq}-d{self.hidden}-V{self.vocab}-{_DTYPE_TAG[self.dtype]}"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class MatmulShape:
    """A plain ``[m, k] @ [k, n]`` matmul: the device's measured ceiling for ``dtype``."""

    m: int
    k: int
    n: int
    dtype: str = "float32"

    @property
    def name(self) -> str:
        return f"{self.m}x{self.k}x{self.n}-{_DTYPE_TAG[self.dtype]}"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class MonitorShape:
    """A DPO training step of a Llama-style model built in code: ``pairs`` pairs of ``prompt + response`` tokens.

    The monitor suite times the step without the monitor (``off``), with it (``exact``: book-keeping, the monitor
    forming the linear layers' weight gradients; ``exact-autograd``: ``bookkeeping=False``, bit-identical gradients;
    ``sketch``) and with the two-extra-backward baseline (``explicit``: each response's flattened gradient by its
    own backward)."""

    label: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    pairs: int
    prompt: int
    response: int
    dtype: str = "float32"
    sketch_dim: int = 32
    modes: tuple[str, ...] = ("off", "exact", "exact-autograd", "sketch", "explicit")
    rounds: int | None = None  # timed rounds (one step of every mode each), default the preset's

    @property
    def name(self) -> str:
        return f"{self.label}-P{self.pairs}xT{self.response}-{_DTYPE_TAG[self.dtype]}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["modes"] = list(self.modes)
        return d


@dataclass(frozen=True)
class MonitorCase:
    """One (step shape, mode) of the monitor suite; ``describe()`` is what results and skips are filed under."""

    shape: MonitorShape
    mode: str

    @property
    def id(self) -> str:
        return self.describe()["id"]

    def describe(self) -> dict:
        return describe_case("monitor", self.mode, "step", self.shape.name, self.shape.to_dict(), self.shape.dtype)


def describe_case(kind: str, impl: str, pass_: str, shape: str, shape_params: dict, dtype: str) -> dict:
    """What every suite's case is filed under in the run JSON (results and skips alike): one layout for all."""
    return {"id": f"{kind}-{pass_}-{impl}-{shape}", "kind": kind, "group": f"{kind}:{pass_} [{shape}]", "impl": impl,
            "pass": pass_, "shape": shape, "shape_params": shape_params, "dtype": dtype}


@dataclass(frozen=True)
class Preset:
    """device: ``"cpu"``, ``"cuda"`` (skipped, with its reason, where no GPU is visible) or ``"auto"``."""

    name: str
    device: str
    description: str
    logprobs: tuple[LogprobShape, ...]
    token_stats: tuple[StatsShape, ...]
    ceiling: tuple[MatmulShape, ...]
    monitor: tuple[MonitorShape, ...] = ()
    rounds: int = 3
    warmup_rounds: int = 1
    notes: tuple[str, ...] = field(default_factory=tuple)


def _sweep(rows, seqs, hidden, vocabs, dtype, base_seq, base_vocab):
    """Shapes along a sequence-length sweep at ``base_vocab`` and a vocabulary sweep at ``base_seq`` (deduplicated)."""
    shapes = [LogprobShape(rows, s, hidden, base_vocab, dtype) for s in seqs]
    shapes += [LogprobShape(rows, base_seq, hidden, v, dtype) for v in vocabs if v != base_vocab]
    return tuple(shapes)


# The chunked torch peer is pathologically slow on CPU beyond a few million logits (minutes per call): it runs at the
# shapes with N * V <= 2^23 only; everything else runs everywhere.
_CPU_ALL_BUT_LCE = ("ours-torch", "ours-triton", "reference", "trl", "cce", "liger")


def _cpu_shape(seq: int, vocab: int) -> LogprobShape:
    small = 4 * seq * vocab <= 1 << 23
    return LogprobShape(4, seq, 128, vocab, "float32", impls=None if small else _CPU_ALL_BUT_LCE)


CPU = Preset(
    name="cpu",
    device="cpu",
    description="fp32 on CPU at d=128: N 256..8192 at V=8192, V 2048..32768 at N=1024 (the PyTorch path's 2^24-logit "
                "tile is crossed at both ends); plus the memory target N=2048, d=1024, V=32768",
    logprobs=tuple(_cpu_shape(seq, 8192) for seq in (64, 256, 1024, 2048))
    + tuple(_cpu_shape(256, v) for v in (2048, 32768))
    # The memory target: large enough that the [N, V] logits (256 MiB) dominate everything else. Ours against the
    # reference only, one round.
    + (LogprobShape(2, 1024, 1024, 32768, "float32", passes=("forward", "full"), impls=("ours-torch", "reference"),
                    rounds=1),),
    token_stats=(
        StatsShape(pairs=2, seq=128, hidden=128, vocab=8192),
        # The loop keeps a vocab * hidden gradient per token: 2 x 64 tokens x 1M floats = 512 MiB.
        StatsShape(pairs=1, seq=64, hidden=128, vocab=8192, loop=True),
    ),
    ceiling=(MatmulShape(2048, 2048, 2048, "float32"),),
    monitor=(
        # More rounds than the preset's: a 2-core machine's step times spread by 10-30 % from one step to the next.
        MonitorShape("tiny", hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=512, pairs=4,
                     prompt=32, response=96, rounds=15),
        MonitorShape("small", hidden=256, layers=4, heads=8, kv_heads=4, intermediate=704, vocab=4096, pairs=4,
                     prompt=32, response=96, rounds=9),
        # 2 pairs x 256 tokens at GPT-2-small width: where a step's weight gradients dominate.
        MonitorShape("d768", hidden=768, layers=4, heads=12, kv_heads=4, intermediate=2048, vocab=16000, pairs=2,
                     prompt=32, response=224, modes=("off", "exact", "exact-autograd", "sketch"), rounds=9),
    ),
    # Calls take 0.01-5 s: the median of three rounds absorbs a slow first call, no separate warm-up.
    rounds=3,
    warmup_rounds=0,
)

GPU = Preset(
    name="gpu",
    device="cuda",
    description="bf16 on one GPU at Llama-3-8B head shapes (N=8192, d=4096, V=128256); token stats at 4 pairs x 1024",
    logprobs=_sweep(8, (256, 512, 1024), 4096, (32000, 65536, 128256), "bfloat16", base_seq=1024, base_vocab=128256),
    token_stats=(
        StatsShape(pairs=4, seq=1024, hidden=4096, vocab=128256, dtype="bfloat16"),
        # The per-token loop keeps seq * vocab * hidden gradient entries per row: a smaller head.
        StatsShape(pairs=1, seq=64, hidden=1024, vocab=32768, dtype="bfloat16", loop=True),
    ),
    ceiling=(MatmulShape(8192, 8192, 8192, "bfloat16"), MatmulShape(8192, 4096, 128256, "bfloat16")),
    # A 1B-class Llama (Llama-3.2-1B's widths, 16 layers, 1.2B parameters) at 1024 response tokens.
    monitor=(MonitorShape("llama-1b", hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=128256,
                          pairs=2, prompt=128, response=1024, dtype="bfloat16", sketch_dim=64),),
    rounds=10,
    warmup_rounds=2,
)

# The Llama-3-8B head shape on CPU: the fused op's peak-memory target at the shape the GPU preset times, for machines
# without a GPU. One full step per implementation, ours-torch against the materialised reference only (the reference
# holds about 13 GiB of [N, V] buffers here; the machine needs about 20 GiB free). About 15 minutes on 2 cores.
CPU_HEAD = Preset(
    name="cpu-head",
    device="cpu",
    description="the Llama-3-8B head shape (N=8192, d=4096, V=128256) on CPU, bf16 and fp32: full step, ours-torch "
                "against the reference, one round (the memory target without a GPU; ~15 min on 2 cores, ~20 GiB RAM)",
    logprobs=tuple(LogprobShape(8, 1024, 4096, 128256, dtype, passes=("full",), impls=("ours-torch", "reference"),
                                rounds=1) for dtype in ("bfloat16", "float32")),
    token_stats=(),
    ceiling=(MatmulShape(2048, 2048, 2048, "float32"), MatmulShape(2048, 2048, 2048, "bfloat16")),
    rounds=1,
    warmup_rounds=0,
)

SMOKE = Preset(
    name="smoke",
    device="auto",
    description="one tiny shape per benchmark, one round: keeps the benchmark code from rotting (tests)",
    logprobs=(LogprobShape(2, 8, 16, 64, "float32"),),
    token_stats=(StatsShape(pairs=1, seq=6, hidden=8, vocab=32, loop=True),),
    ceiling=(MatmulShape(64, 64, 64, "float32"),),
    monitor=(MonitorShape("toy", hidden=16, layers=1, heads=2, kv_heads=1, intermediate=32, vocab=160, pairs=2,
                          prompt=3, response=5, sketch_dim=8),),
    rounds=1,
    warmup_rounds=0,
)

PRESETS = {p.name: p for p in (CPU, GPU, CPU_HEAD, SMOKE)}
