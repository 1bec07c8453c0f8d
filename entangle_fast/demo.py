"""The demo: gradient entanglement in the paper's sentiment study in miniature, and whether the normalised update
fixes it.

A tiny Llama-style model and the built-in word tokenizer (both built in code, nothing downloaded) are fine-tuned (SFT)
on the responses of three preference sets shaped like the sentiment study of Yuan et al. 2024:

    (a) single token    chosen "positive"            rejected "negative"
    (b) short suffix    chosen "positive" + suffix   rejected "negative" + the same suffix (5 tokens)
    (c) long suffix     the same with a 15-token shared suffix

Each set has 8 pairs (different prompts; pair i's suffix is built from its own clauses). Then, from the same SFT
weights, DPO runs on each set with an :class:`~entangle_fast.EntanglementMonitor` on every step, and again with the
pairwise normalised update (:mod:`entangle_fast.mitigations`) built from the same DPO backward, with DPO's own per-pair
weights c_i = |dL/ds_w,i| (so a pair DPO already separates gets less push) and, by default, the length of the first
DPO step. The optimizer is plain SGD on purpose: the monitor's first-order prediction of each log-prob's change is then
a forecast that the next step measures (under Adam it would only be an indicator). The prediction shown is the batch
one, -lr <grad s, step direction>, cross-pair terms included, from the monitor's kept factors.

Tuned defaults (measured, not assumed): hidden size 32, 2 layers, float64, 10 Adam SFT steps (lr 1e-2) on both
responses of every pair, then 40 SGD steps at lr 0.03, DPO beta 0.1.

Every response is scored as given, with no end-of-sequence token, so set (a) differs in exactly one token.

Library entry point: :func:`run_demo` (:class:`DemoConfig` -> :class:`DemoResult`); ``entangle-fast demo`` is the CLI.
"""
from __future__ import annotations

import json
import math
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from entangle_fast.losses import dpo_loss
from entangle_fast.mitigations import normalized_pairwise_gradients
from entangle_fast.data import encode_pairs, load_pairs, pair_text
from entangle_fast.models import TinyConfig, builtin_model, load_model
from entangle_fast.monitor import EntanglementMonitor
from entangle_fast.preference import preference_logprobs

METHODS = ("dpo", "normalized")


# ----------------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class PreferenceSet:
    """A named list of ``{"prompt", "chosen", "rejected"}`` pairs (strings or message lists, as
    :func:`entangle_fast.data.load_pairs` reads them)."""

    name: str
    title: str
    pairs: list[dict]


_SUBJECTS = ("movie", "book", "film", "story", "plot", "music", "acting", "ending")
# Five-word clauses; pair i's shared suffix is clause i (short) or clauses i, i + 3 and i + 5 (long), so every pair
# has its own continuation and SFT cannot make the suffix a single memorised string.
_CLAUSES = (
    "and the ending was fine", "but the music was okay", "and the plot was good", "so the film was fine",
    "but the acting was bad", "and the story was great", "so the book was okay", "and the scenes felt long",
)


def builtin_sets() -> list[PreferenceSet]:
    """The three built-in sets of 8 pairs: one differing sentiment word, then a short (5-token) and a long
    (15-token) shared suffix after it."""
    def pairs(suffix) -> list[dict[str, str]]:
        out = []
        for i, subject in enumerate(_SUBJECTS):
            tail = f" {suffix(i)}" if suffix(i) else ""
            out.append({"prompt": f"review : the {subject} was", "chosen": f"positive{tail}",
                        "rejected": f"negative{tail}"})
        return out

    n = len(_CLAUSES)
    return [
        PreferenceSet("a", "(a) single differing token", pairs(lambda i: "")),
        PreferenceSet("b", "(b) short shared suffix (5 tokens)", pairs(lambda i: _CLAUSES[i])),
        PreferenceSet("c", "(c) long shared suffix (15 tokens)",
                      pairs(lambda i: " ".join(_CLAUSES[(i + k) % n] for k in (0, 3, 5)))),
    ]


def encode_preference_batch(tokenizer, pairs: list[dict]) -> dict[str, Tensor]:
    """The demo's batches: :func:`entangle_fast.data.encode_pairs` with ``eos=False`` (``[2B, T]``, chosen rows
    first), so every response is scored as given and set (a) differs in exactly one token."""
    return encode_pairs(tokenizer, pairs, eos=False)


# ----------------------------------------------------------------------------------------------------------------------
# Configuration and models
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class DemoConfig:
    """Everything one demo run depends on. The defaults are the tuned built-in run (see the module docstring).

    ``sft_steps=None`` means 10 for the built-in model and 0 for ``model`` (a checkpoint is usually fine-tuned
    already). ``norm_lr=None`` gives the normalised update, per set, the step length of that set's first DPO step
    (the same distance, a different direction). ``dtype`` applies to the model's parameters. ``heatmap_set``: the set
    whose first DPO step's output-layer token matrix is drawn (default the last set). ``full_table``: print one row
    per step of every run (2 x sets x steps rows) instead of one summary row per set and method.
    """

    steps: int = 40
    lr: float = 0.03
    seed: int = 0
    beta: float = 0.1
    sft_steps: int | None = None
    sft_lr: float = 1e-2
    norm_lr: float | None = None
    out: str = "entangle_demo"
    model: str | None = None
    data: str | None = None
    device: str = "cpu"
    dtype: str = "float64"
    hidden_size: int = 32
    num_layers: int = 2
    progress: bool = True
    plots: bool = True
    heatmap_set: str | None = None
    full_table: bool = False


def build_demo(config: DemoConfig):
    """``(model, tokenizer, sets)`` for a configuration: the built-in tiny model and sets, or the user's
    (:func:`entangle_fast.data.load_pairs`, :func:`entangle_fast.models.load_model`)."""
    user_pairs = load_pairs(config.data) if config.data else None
    sets = builtin_sets() if user_pairs is None else \
        [PreferenceSet("data", f"{Path(config.data).name} ({len(user_pairs)} pairs)", user_pairs)]
    if config.model:
        return (*load_model(config.model, device=config.device, dtype=config.dtype), sets)
    # The word tokenizer splits on whitespace and punctuation: give it every word of the data.
    words = sorted({w for st in sets for ex in st.pairs for key in ex
                    for w in re.findall(r"\w+|[^\w\s]", pair_text(ex[key]).lower())})
    size = TinyConfig(hidden_size=config.hidden_size, num_layers=config.num_layers, num_heads=4, num_kv_heads=2,
                      intermediate_size=2 * config.hidden_size)
    model, tokenizer = builtin_model("llama", device=config.device, dtype=config.dtype, seed=config.seed, cfg=size,
                                     extra_words=words)
    return model, tokenizer, sets


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------------


def supervised_finetune(model: nn.Module, batch: dict, steps: int, lr: float,
                        sides: tuple[str, ...] = ("chosen", "rejected")) -> list[float]:
    """SFT with Adam on the responses of ``batch``: mean per-token NLL over the rows of ``sides``. Returns the losses.

    The demo trains both sides, so that DPO starts from a model that finds both responses likely (as a model
    fine-tuned on mixed-sentiment text would); ``sides=("chosen",)`` is the usual SFT on preferred responses only.
    """
    losses = []
    if steps <= 0:
        return losses
    if not sides or set(sides) - {"chosen", "rejected"}:
        raise ValueError(f"sides must name 'chosen' and/or 'rejected', got {sides!r}")
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        out = preference_logprobs(model, batch)
        total = sum(getattr(out, f"{side}_logps").sum() for side in sides)
        tokens = sum(getattr(out, f"{side}_lengths").sum() for side in sides)
        loss = -total / tokens
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    opt.zero_grad(set_to_none=True)
    return losses


@dataclass
class StepLog:
    """One monitored step of one run; per-pair lists of length B (log-probs before the step)."""

    step: int
    loss: float
    chosen_logps: list[float]
    rejected_logps: list[float]
    cosine: list[float]
    inner: list[float]
    chosen_sq_norm: list[float]
    rejected_sq_norm: list[float]
    case: list[int]
    predicted_chosen: list[float]
    predicted_rejected: list[float]
    pair_predicted_chosen: list[float] | None = None
    pair_predicted_rejected: list[float] | None = None
    measured_chosen: list[float] | None = None
    measured_rejected: list[float] | None = None
    step_norm: float = 0.0


def _floats(t: Tensor) -> list[float]:
    return [float(x) for x in t.detach().double().cpu().tolist()]


def preference_run(model: nn.Module, batch: dict, ref: tuple[Tensor, Tensor], *, method: str, steps: int, lr: float,
                   beta: float, on_step: Callable[[StepLog], None] | None = None, token_stats_step: int | None = None):
    """``steps`` plain-SGD steps of DPO (``method="dpo"``) or of the pairwise normalised update (``"normalized"``,
    from the same DPO backward, pair weights c_i = -a_w,i: DPO's own), with the monitor on every step.

    Returns ``(logs, final (chosen, rejected) log-probs, output-layer token statistics of step token_stats_step)``.
    The measured change of step k is the difference of the log-probs before steps k + 1 and k.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    monitor = EntanglementMonitor(model, keep_factors=True)
    logs: list[StepLog] = []
    token_stats = None
    previous: StepLog | None = None

    def measured(prev: StepLog, sw: Tensor, sl: Tensor) -> None:
        prev.measured_chosen = _floats(sw.detach() - torch.tensor(prev.chosen_logps, dtype=sw.dtype))
        prev.measured_rejected = _floats(sl.detach() - torch.tensor(prev.rejected_logps, dtype=sl.dtype))
        if on_step is not None:
            on_step(prev)

    for k in range(steps):
        model.zero_grad(set_to_none=True)
        with monitor:
            want = k == token_stats_step
            out = preference_logprobs(model, batch, token_stats=want, full_matrices=want)
            loss = dpo_loss(out.chosen_logps, out.rejected_logps, ref[0], ref[1], beta=beta).losses.mean()
            loss.backward()
        sw, sl = out.chosen_logps.detach().cpu(), out.rejected_logps.detach().cpu()
        if previous is not None:
            measured(previous, sw, sl)
        st = monitor.stats
        if k == token_stats_step:
            token_stats = out.token_stats.stats
        if method == "dpo":
            direction = {p: p.grad for p in params if p.grad is not None}
        else:
            direction = normalized_pairwise_gradients(monitor, -st.a_w)
        dw, dl = monitor.gradient_dot(direction)
        pw, pl = st.predicted_delta(lr)
        with torch.no_grad():
            for p, d in direction.items():
                p.sub_(lr * d)
        step_norm = math.sqrt(sum(float((d.detach().double() ** 2).sum()) for d in direction.values()))
        previous = StepLog(
            step=k, loss=loss.item(), chosen_logps=_floats(sw), rejected_logps=_floats(sl), cosine=_floats(st.cosine),
            inner=_floats(st.inner), chosen_sq_norm=_floats(st.chosen_sq_norm),
            rejected_sq_norm=_floats(st.rejected_sq_norm), case=[int(c) for c in st.case.tolist()],
            predicted_chosen=_floats(-lr * dw), predicted_rejected=_floats(-lr * dl),
            pair_predicted_chosen=_floats(pw) if method == "dpo" else None,
            pair_predicted_rejected=_floats(pl) if method == "dpo" else None,
            step_norm=lr * step_norm,
        )
        logs.append(previous)
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        out = preference_logprobs(model, batch)
    final = (out.chosen_logps.detach().cpu(), out.rejected_logps.detach().cpu())
    if previous is not None:
        measured(previous, *final)
    return logs, final, token_stats


# ----------------------------------------------------------------------------------------------------------------------
# The whole demo
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class DemoResult:
    """What :func:`run_demo` produced: ``log`` (the JSON written to ``json_path``), the verdict lines, plot paths."""

    log: dict
    verdict: list[str]
    json_path: Path
    plots: list[Path] = field(default_factory=list)
    seconds: float = 0.0


def _mean(xs) -> float:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def _run_summary(logs: list[StepLog], final: tuple[Tensor, Tensor]) -> dict:
    first = logs[0]
    d_chosen = [f - s for f, s in zip(_floats(final[0]), first.chosen_logps)]
    d_rejected = [f - s for f, s in zip(_floats(final[1]), first.rejected_logps)]
    measured = [(mc, mr) for lg in logs for mc, mr in zip(lg.measured_chosen or [], lg.measured_rejected or [])]
    predicted = [(pc, pr) for lg in logs for pc, pr in zip(lg.predicted_chosen, lg.predicted_rejected)]
    sign_agree = [((p > 0) == (m > 0)) for pp, mm in zip(predicted, measured) for p, m in zip(pp, mm)]
    cases = [c for lg in logs for c in lg.case]
    # Mean chosen log-prob relative to the start, before each step and after the last.
    trajectory = [_mean(lg.chosen_logps) - _mean(first.chosen_logps) for lg in logs] + [_mean(d_chosen)]
    return {
        "cosine_first": _mean(first.cosine),
        "cosine_mean": _mean([c for lg in logs for c in lg.cosine]),
        "chosen_change": _mean(d_chosen),
        "rejected_change": _mean(d_rejected),
        "chosen_lowest": min(trajectory),
        "chosen_lowest_step": trajectory.index(min(trajectory)),
        "chosen_change_per_pair": d_chosen,
        "rejected_change_per_pair": d_rejected,
        "margin_change": _mean(d_chosen) - _mean(d_rejected),
        "steps_chosen_fell": sum(_mean(lg.measured_chosen) < 0 for lg in logs),
        "steps_rejected_rose": sum(_mean(lg.measured_rejected) > 0 for lg in logs),
        "case_counts": {str(c): cases.count(c) for c in (0, 1, 2, 3)},
        "prediction_sign_agreement": _mean([float(x) for x in sign_agree]),
    }


def make_verdict(summary: dict, titles: dict[str, str]) -> list[str]:
    """A few plain sentences on the paper's finding and the normalised update, from the measured summary."""
    lines = []
    names = list(titles)
    dpo = {n: summary[n]["dpo"] for n in names}
    cos = ", ".join(f"{n} {dpo[n]['cosine_mean']:+.2f}" for n in names)
    if len(names) >= 2:
        ordered = all(dpo[a]["cosine_mean"] < dpo[b]["cosine_mean"] for a, b in zip(names, names[1:]))
        lines.append(f"Gradient cosine (mean over DPO steps): {cos}. " + (
            "It rises with the length of the shared suffix, as the paper finds." if ordered else
            "It does NOT rise monotonically with the shared suffix here, unlike the paper's finding."))
    else:
        lines.append(f"Gradient cosine (mean over DPO steps): {cos}.")
    for n in names:
        d = dpo[n]
        what = "fell" if d["chosen_change"] < 0 else "rose"
        lowest = f", lowest {d['chosen_lowest']:+.2f} after {d['chosen_lowest_step']} steps" \
            if d["chosen_lowest"] < min(d["chosen_change"], 0) else ""
        lines.append(f"{titles[n]}: under DPO the chosen log-prob {what} by {abs(d['chosen_change']):.2f}{lowest} "
                     f"(rejected {d['rejected_change']:+.2f}; margin {d['margin_change']:+.2f}); it fell on "
                     f"{d['steps_chosen_fell']}/{summary[n]['steps']} steps.")
    last = names[-1]
    if len(names) >= 2:
        falls = dpo[last]["chosen_change"] < 0
        lines.append(("Paper's finding reproduced: " if falls and ordered else "Paper's finding NOT fully reproduced: ")
                     + f"with the longest shared suffix the chosen log-prob {'falls' if falls else 'does not fall'} "
                     "while DPO widens the margin.")
    for n in names:
        norm = summary[n].get("normalized")
        if norm is None:
            continue
        fixed = norm["chosen_change"] > 0 and norm["rejected_change"] < 0
        every = all(c > 0 for c in norm["chosen_change_per_pair"]) and \
            all(r < 0 for r in norm["rejected_change_per_pair"])
        if n == last or dpo[n]["chosen_change"] < 0:
            lines.append(f"Normalised update on {titles[n]} (same start, same step length): chosen "
                         f"{norm['chosen_change']:+.2f}, rejected {norm['rejected_change']:+.2f}: " + (
                             ("fixed: the chosen log-prob rises and the rejected one falls"
                              + (" for every pair." if every else " on average (not for every pair).")) if fixed else
                             "NOT fixed: the chosen log-prob still does not rise (or the rejected one does not fall)."))
    return lines


def _row_tokens(tokenizer, batch: dict, row: int, positions: Tensor) -> list[str]:
    ids = batch["labels"][row, 1:][positions.cpu()].tolist()
    return [str(t) for t in tokenizer.convert_ids_to_tokens(ids)]


def _table_header() -> str:
    return (f"{'set':>4} {'method':>10} {'step':>4} {'log p(w)':>9} {'log p(l)':>9} {'cos':>6} {'cases':>8}  "
            f"{'dw pred':>8} {'dw meas':>8}  {'dl pred':>8} {'dl meas':>8}")


def _cases(case: list[int]) -> str:
    """One digit per pair, or counts per case when there are more than 8 pairs."""
    if len(case) <= 8:
        return "".join(str(c) for c in case)
    return " ".join(f"{case.count(c)}x{c}" for c in (1, 2, 3) if case.count(c))


def _table_row(set_name: str, method: str, lg: StepLog) -> str:
    return (f"{set_name:>4} {method:>10} {lg.step:>4} {_mean(lg.chosen_logps):>9.3f} {_mean(lg.rejected_logps):>9.3f} "
            f"{_mean(lg.cosine):>6.3f} {_cases(lg.case):>8}  {_mean(lg.predicted_chosen):>+8.4f} "
            f"{_mean(lg.measured_chosen):>+8.4f}  {_mean(lg.predicted_rejected):>+8.4f} "
            f"{_mean(lg.measured_rejected):>+8.4f}")


def _summary_header() -> str:
    return (f"{'set':>4} {'method':>10} {'steps':>5} {'cos':>6} {'d log p(w)':>10} {'d log p(l)':>10} "
            f"{'d margin':>9} {'w fell':>7} {'cases 1/2/3':>11} {'pred sign':>9}")


def _summary_row(set_name: str, method: str, summary: dict, steps: int) -> str:
    """One run in one line: mean cosine, the start-to-end change of the mean log-probs and margin, on how many steps
    the chosen log-prob fell, every (step, pair) case, and how often the prediction had the measured sign."""
    counts = summary["case_counts"]
    cases = "/".join(str(counts[c]) for c in ("1", "2", "3"))
    return (f"{set_name:>4} {method:>10} {steps:>5} {summary['cosine_mean']:>6.3f} {summary['chosen_change']:>+10.3f} "
            f"{summary['rejected_change']:>+10.3f} {summary['margin_change']:>+9.3f} "
            f"{summary['steps_chosen_fell']:>3}/{steps:<3} {cases:>11} {100 * summary['prediction_sign_agreement']:>8.0f}%")


def run_demo(config: DemoConfig, *, print_fn: Callable[[str], None] = print) -> DemoResult:
    """SFT, then DPO and the normalised update on every set from the same start; table, JSON log, plots, verdict.

    The built-in run uses one intra-op thread (restored afterwards): its matrices are too small to split, and extra
    threads only add synchronisation, badly so on a busy machine.
    """
    threads = torch.get_num_threads()
    if config.model is None:
        torch.set_num_threads(1)
    try:
        return _run_demo(config, print_fn)
    finally:
        torch.set_num_threads(threads)


def _run_demo(config: DemoConfig, print_fn: Callable[[str], None]) -> DemoResult:
    t0 = time.perf_counter()
    _check_config(config)
    torch.manual_seed(config.seed)
    model, tokenizer, sets = build_demo(config)
    heat_set = config.heatmap_set or sets[-1].name
    if heat_set not in {s.name for s in sets}:
        raise ValueError(f"heatmap_set {heat_set!r} is not one of the sets {[s.name for s in sets]}")
    device = next(model.parameters()).device
    out_dir = Path(config.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    batches = {s.name: _to(encode_preference_batch(tokenizer, s.pairs), device) for s in sets}
    sft_steps = config.sft_steps if config.sft_steps is not None else (0 if config.model else 10)
    all_pairs = [ex for s in sets for ex in s.pairs]
    sft_losses = supervised_finetune(model, _to(encode_preference_batch(tokenizer, all_pairs), device), sft_steps,
                                     config.sft_lr)
    model.eval()  # no dropout: each step's prediction is about the same function the next step measures
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    n_params = sum(p.numel() for p in model.parameters())
    _print_intro(config, n_params, sft_steps, sft_losses, print_fn)
    log = {"config": asdict(config), "sft_steps": sft_steps, "sft_losses": sft_losses, "parameters": n_params,
           "sets": {}, "summary": {}}
    with _Console(print_fn, total=2 * config.steps * len(sets), progress=config.progress) as console:
        console.emit(_table_header() if config.full_table else _summary_header())
        heatmap = _train_sets(model, tokenizer, sets, batches, start, config, heat_set, console, log)
    model.load_state_dict(start)
    return _write_outputs(log, heatmap, sets, config, out_dir, t0, print_fn)


# ----------------------------------------------------------------------------------------------------------------------
# The demo's steps: validation, the runs, the console, the outputs
# ----------------------------------------------------------------------------------------------------------------------


def _check_config(config: DemoConfig) -> None:
    """ValueError for settings no run can use (named as the CLI flags)."""
    if config.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {config.steps}")
    if not config.lr > 0:
        raise ValueError(f"--lr must be > 0, got {config.lr}")


class _Console:
    """The table printer: lines through ``print_fn``, around an optional tqdm bar on stderr."""

    def __init__(self, print_fn: Callable[[str], None], *, total: int, progress: bool):
        self.print_fn, self.total, self.progress, self.bar = print_fn, total, progress, None

    def __enter__(self):
        if self.progress:
            from tqdm.auto import tqdm

            # disable=None: no bar when stderr is not a terminal (logs, pipes), where it would only tear the table.
            self.bar = tqdm(total=self.total, desc="demo", unit="step", file=sys.stderr, leave=False, disable=None)
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
        return False

    def emit(self, line: str) -> None:
        if self.bar is None:
            self.print_fn(line)
            return
        with self.bar.external_write_mode(file=sys.stderr):  # clear the bar, print, redraw it
            self.print_fn(line)

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)


def _print_intro(config: DemoConfig, n_params: int, sft_steps: int, sft_losses: list[float],
                 print_fn: Callable[[str], None]) -> None:
    model = f"model: {config.model or 'built-in tiny Llama'} ({n_params:,} parameters, {config.dtype}); "
    print_fn(model + (f"SFT {sft_steps} Adam steps (loss {sft_losses[0]:.3f} -> {sft_losses[-1]:.3f})"
                      if sft_losses else "no SFT"))
    print_fn(f"optimizer: plain SGD, lr {config.lr} (so the predicted change is a first-order forecast of the next step's, "
             f"cross-pair terms included; under Adam it would only indicate the direction)")
    if config.full_table:
        print_fn("columns: means over the set's pairs of the log-probs before the step and of the gradient cosine; "
                 "each pair's case for a DPO step from there (1 ideal, 2 both fall, 3 both rise); the step's predicted "
                 "(-lr <grad s, step>) and measured change of each log-prob\n")
    else:
        print_fn("one row per set and method (--table: every step): mean gradient cosine over steps and pairs; change "
                 "of the mean chosen / rejected log-prob and of the margin from start to end; steps on which the "
                 "chosen log-prob fell; (step, pair) counts of case 1 ideal / 2 both fall / 3 both rise; how often the "
                 "predicted change had the measured sign\n")


def _train_sets(model: nn.Module, tokenizer, sets: list[PreferenceSet], batches: dict, start: dict,
                config: DemoConfig, heat_set: str, console: _Console, log: dict) -> dict | None:
    """Every set under every method from the same ``start`` weights; fills ``log["sets"]`` and ``log["summary"]``
    and returns the token heat-map of the first DPO step on ``heat_set`` (None when none was recorded)."""
    heatmap = None
    for s in sets:
        batch = batches[s.name]
        entry = {"title": s.title, "pairs": s.pairs}
        summary = {"steps": config.steps}
        for method in METHODS:
            model.load_state_dict(start)
            with torch.no_grad():
                ref_out = preference_logprobs(model, batch)
            ref = (ref_out.chosen_logps.detach(), ref_out.rejected_logps.detach())
            lr = config.lr if method == "dpo" else config.norm_lr

            def on_step(lg: StepLog, _name=s.name, _method=method) -> None:
                if config.full_table:
                    console.emit(_table_row(_name, _method, lg))
                console.step()

            if method == "normalized" and lr is None:
                lr = _matched_lr(model, batch, ref, config.beta, entry["dpo"]["steps"][0]["step_norm"])
            token_step = 0 if (method == "dpo" and s.name == heat_set) else None
            logs, final, tstats = preference_run(model, batch, ref, method=method, steps=config.steps, lr=lr,
                                                 beta=config.beta, on_step=on_step, token_stats_step=token_step)
            entry[method] = {"lr": lr, "steps": [asdict(lg) for lg in logs],
                             "final_chosen_logps": _floats(final[0]), "final_rejected_logps": _floats(final[1])}
            summary[method] = _run_summary(logs, final)
            if not config.full_table:
                console.emit(_summary_row(s.name, method, summary[method], config.steps))
            if tstats is not None:
                p0 = tstats.pair(0)
                heatmap = {
                    "set": s.name, "pair": 0, "step": 0,
                    "matrix": p0["token_matrix"].double().cpu().tolist(),
                    "chosen_tokens": _row_tokens(tokenizer, batch, 0, p0["chosen_positions"]),
                    "rejected_tokens": _row_tokens(tokenizer, batch, len(s.pairs), p0["rejected_positions"]),
                }
        log["sets"][s.name] = entry
        log["summary"][s.name] = summary
    return heatmap


def _write_outputs(log: dict, heatmap: dict | None, sets: list[PreferenceSet], config: DemoConfig, out_dir: Path,
                   t0: float, print_fn: Callable[[str], None]) -> DemoResult:
    """The verdict, the plots and ``demo.json``; prints the verdict and the files written."""
    verdict = make_verdict(log["summary"], {s.name: s.title for s in sets})
    log["verdict"] = verdict
    log["heatmap"] = heatmap
    plots = write_plots(log, out_dir) if config.plots else []
    log["plots"] = [str(p) for p in plots]
    log["seconds"] = time.perf_counter() - t0
    json_path = out_dir / "demo.json"
    json_path.write_text(json.dumps(_finite_or_none(log), indent=1))
    print_fn("")
    for line in verdict:
        print_fn(line)
    print_fn(f"\nwrote {json_path}")
    for p in plots:
        print_fn(f"wrote {p}")
    return DemoResult(log, verdict, json_path, plots, log["seconds"])


def _finite_or_none(obj):
    """NaN and infinities to None, so the log is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj


def _matched_lr(model, batch, ref, beta, target_norm: float) -> float:
    """The lr that gives the normalised update's first step the length ``target_norm`` (the first DPO step's)."""
    monitor = EntanglementMonitor(model, keep_factors=True)
    model.zero_grad(set_to_none=True)
    with monitor:
        out = preference_logprobs(model, batch)
        dpo_loss(out.chosen_logps, out.rejected_logps, ref[0], ref[1], beta=beta).losses.mean().backward()
    g = normalized_pairwise_gradients(monitor, -monitor.stats.a_w)
    model.zero_grad(set_to_none=True)
    norm = math.sqrt(sum(float((d.detach().double() ** 2).sum()) for d in g.values()))
    return target_norm / norm if norm > 0 else 0.0


# ----------------------------------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------------------------------


def write_plots(log: dict, out_dir: Path) -> list[Path]:
    """Log-prob trajectories per set, cosine over steps, and the output-layer token heat-map (when recorded)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = log["sets"]
    paths = []
    fig, axes = plt.subplots(1, len(sets), figsize=(4.2 * len(sets), 3.6), squeeze=False)
    for ax, (name, entry) in zip(axes[0], sets.items()):
        for method, style in (("dpo", "-"), ("normalized", "--")):
            run = entry.get(method)
            if run is None:
                continue
            steps = run["steps"]
            chosen = [_mean(s["chosen_logps"]) for s in steps] + [_mean(run["final_chosen_logps"])]
            rejected = [_mean(s["rejected_logps"]) for s in steps] + [_mean(run["final_rejected_logps"])]
            x = list(range(len(chosen)))
            ax.plot(x, [c - chosen[0] for c in chosen], style, color="tab:green", label=f"chosen ({method})")
            ax.plot(x, [r - rejected[0] for r in rejected], style, color="tab:red", label=f"rejected ({method})")
        ax.axhline(0, color="0.6", lw=0.8)
        ax.set_title(entry["title"], fontsize=9)
        ax.set_xlabel("SGD step")
    axes[0][0].set_ylabel("change of mean log-prob")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle("Sequence log-probs under DPO (solid) and the normalised update (dashed)", fontsize=10)
    fig.tight_layout()
    paths.append(out_dir / "logprobs.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, entry in sets.items():
        ax.plot([_mean(s["cosine"]) for s in entry["dpo"]["steps"]], label=entry["title"])
    ax.set_xlabel("DPO step")
    ax.set_ylabel("cos(grad log p(chosen), grad log p(rejected))")
    ax.set_title("Gradient cosine under DPO (mean over pairs)", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out_dir / "cosine.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    heat = log.get("heatmap")
    if heat is not None:
        from entangle_fast.plots import token_heatmap

        title = (f"Output-layer token matrix K[t, s], set {heat['set']} pair {heat['pair']}, "
                 f"DPO step {heat['step']}")
        paths.append(Path(token_heatmap(torch.tensor(heat["matrix"]), heat["chosen_tokens"], heat["rejected_tokens"],
                                        title=title, path=out_dir / "token_matrix.png",
                                        cbar_label="<grad l_t(chosen), grad l_s(rejected)>")))
    return paths
