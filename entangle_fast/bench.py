"""Benchmark runs: presets through pytest-benchmark, one JSON per run, a Markdown summary of ratios, plots, comparison.

The suites are the pytest files of ``benchmarks/`` (installed with the package as ``entangle_fast/benchmarks/``,
:func:`benchmarks_dir`); each declares its ratios beside its cases (a ``RATIOS`` list of :class:`Ratio`).
:func:`run_preset` runs them in this process with ``pytest.main`` and a collector plugin that gathers each case's
result (recorded by the suite as a ``user_properties`` entry), every skip with its reason and every failure. The run
file written from that is the unit everything else reads:

    {"schema_version", "preset", "created", "device", "machine": {...}, "methods": {...}, "ours_auto",
     "ceiling": {dtype: TFLOP/s}, "results": [...], "skipped": [...], "failed": [...], "ratios": [...], "label"}

``label`` is :data:`SMOKE_LABEL` for the ``smoke`` preset (each case runs once, untimed warm-up included: a check that
every suite runs, whose times and ratios mean nothing) and None otherwise. By default runs are written to
``./entangle-bench/`` under the current working directory (:func:`default_results_dir`), never beside the committed
results in the checkout's ``benchmarks/results/``.

(:data:`RUN_SCHEMA` spells out keys and types; :func:`check_run` checks a run against it.) Every figure that matters
is a ratio of two measurements of the same run (:func:`compute_ratios`); :func:`compare` sets two runs side by side.
Needs pytest and pytest-benchmark (the ``test`` extra) to run presets, matplotlib for plots; reading, summarising and
comparing run files needs neither.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

SCHEMA_VERSION = 1
RESULT_KEY = "entangle_fast_bench_result"  # the user_properties key every suite records its results under
FLOPS_FORMULA = ("log-prob op: forward 2NVd, backward 4NVd + 2NVd logit recompute, full step 8NVd, charged to every "
                 "implementation alike (work-normalised TFLOP/s); token stats: full step 8NVd, statistics only 6NVd, "
                 "LM-head matmul 2NVd, per-token loop none; matmul 2mkn")
_NUM = (int, float)
_OPT_NUM = (int, float, type(None))
_OPT_STR = (str, type(None))

# key -> (accepted types, required). Hand-checked (no jsonschema dependency): see check_run.
RUN_SCHEMA = {
    "schema_version": (int, True), "preset": (str, True), "created": (str, True), "device": (str, True),
    "machine": (dict, True), "methods": (dict, True), "ours_auto": (str, True), "ceiling": (dict, True),
    "results": (list, True), "skipped": (list, True), "failed": (list, True), "ratios": (list, True),
    "pytest_exit_code": (int, False), "label": (_OPT_STR, False),
}
RESULT_SCHEMA = {
    "id": (str, True), "kind": (str, True), "group": (str, True), "impl": (str, True), "pass": (str, True),
    "shape": (str, True), "shape_params": (dict, True), "dtype": (str, True), "device": (str, True),
    "time_ms": (_NUM, True), "time_ms_min": (_NUM, True), "time_ms_max": (_NUM, True), "rounds": (int, True),
    "samples_ms": (list, True), "timer": (str, True), "peak_memory_bytes": ((int, type(None)), True),
    "memory_method": (str, True), "memory_error": (_OPT_STR, True), "flops": ((int, type(None)), True),
    "tflops": (_OPT_NUM, True), "ceiling_fraction": (_OPT_NUM, False), "cpu_time_ms": (_OPT_NUM, False),
    "warnings": (list, False),
    "environment": (dict, False), "pytest_benchmark": (dict, False),
}
SKIP_SCHEMA = {"id": (str, True), "reason": (str, True), "kind": (str, False), "impl": (str, False),
               "pass": (str, False), "shape": (str, False), "nodeid": (str, False)}
FAIL_SCHEMA = {"nodeid": (str, True), "when": (str, True), "message": (str, True)}
RATIO_SCHEMA = {
    "kind": (str, True), "shape": (str, True), "pass": (str, True), "metric": (str, True), "name": (str, True),
    "numerator": (str, True), "denominator": (str, True), "value": (_NUM, True), "better": (str, True),
    "headline": (bool, True),
}
SMOKE_LABEL = "smoke: not a measurement"
DEFAULT_OUT = "entangle-bench"
MACHINE_KEYS = ("cpu", "cores", "gpu", "torch", "triton", "cuda", "python", "platform")


def _check(obj, schema: dict, where: str) -> list[str]:
    if not isinstance(obj, dict):
        return [f"{where}: expected an object, got {type(obj).__name__}"]
    problems = []
    for key, (types, required) in schema.items():
        if key not in obj:
            if required:
                problems.append(f"{where}: missing key {key!r}")
        elif isinstance(obj[key], bool) and bool not in (types if isinstance(types, tuple) else (types,)):
            problems.append(f"{where}.{key}: expected {types}, got bool")
        elif not isinstance(obj[key], types):
            problems.append(f"{where}.{key}: expected {types}, got {type(obj[key]).__name__}")
    return problems


def check_run(run) -> list[str]:
    """Problems of ``run`` against :data:`RUN_SCHEMA` and the entry schemas (empty list: valid)."""
    problems = _check(run, RUN_SCHEMA, "run")
    if problems:
        return problems
    problems += [f"run.machine: missing key {k!r}" for k in MACHINE_KEYS if k not in run["machine"]]
    for name, schema in (("results", RESULT_SCHEMA), ("skipped", SKIP_SCHEMA), ("failed", FAIL_SCHEMA),
                         ("ratios", RATIO_SCHEMA)):
        for i, entry in enumerate(run[name]):
            problems += _check(entry, schema, f"run.{name}[{i}]")
    return problems


def load_run(path_or_run) -> dict:
    """A run from a JSON file (or an already loaded dict), checked against the schema."""
    if isinstance(path_or_run, dict):
        run = path_or_run
    else:
        path = Path(path_or_run)
        if not path.is_file():
            raise FileNotFoundError(f"no such benchmark run file: {path}")
        run = json.loads(path.read_text())
    problems = check_run(run)
    if problems:
        raise ValueError(f"{path_or_run if not isinstance(path_or_run, dict) else 'run'} is not a benchmark run: "
                         + "; ".join(problems[:5]))
    return run


# ---------------------------------------------------------------------------------------------------------------------
# Machine.


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def machine_info() -> dict:
    """CPU model and cores, memory, GPU name if any, torch/triton/CUDA and peer versions (queried now, not at import).

    ``load_average`` (1, 5, 15 min) is recorded because CPU timings on a shared machine are only as good as its
    quiet."""
    import torch

    cuda = torch.cuda.is_available()
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = None
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_bytes": ram,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "gpu_memory_bytes": torch.cuda.get_device_properties(0).total_memory if cuda else None,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "entangle_fast": _version("entangle-fast"),
        "pytest_benchmark": _version("pytest-benchmark"),
        "peers": {d: _version(d) for d in ("trl", "liger-kernel", "cut-cross-entropy")},
        "load_average": _loadavg(),
    }


def _slug(text: str) -> str:
    text = re.sub(r"\((R|TM|tm|r)\)", "", text)
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def machine_slug(machine: dict, device: str) -> str:
    """``cpu-2core`` on CPU runs, ``gpu-nvidia-h200`` on GPU runs: goes into file names."""
    if device == "cuda" and machine.get("gpu"):
        return "gpu-" + _slug(machine["gpu"])
    return f"cpu-{machine.get('cores') or 0}core"


# ---------------------------------------------------------------------------------------------------------------------
# Ratios.


@dataclass(frozen=True)
class Ratio:
    """One ratio a suite reports, declared beside its cases (the suite's ``RATIOS`` list): ``numerator /
    denominator`` of one ``metric`` between two implementations measured at the same (op, shape, pass) of one run.

    ``numerator``/``denominator``: an implementation (``impl`` of the results), or ``"a - b"``, the difference of two
    implementations' measurements (an overhead). ``metric``: ``"time"`` (median ms), ``"memory"`` (peak extra bytes)
    or ``"working-memory"`` (peak extra bytes less the gradients of hidden ``[N, d]`` and weight ``[V, d]`` that
    every log-prob implementation returns alike; backward and full step only). ``better``: ``"lower"`` or
    ``"higher"``. ``headline``: the summary leads with it (never for an ``ours-*`` implementation other than the one
    ``impl='auto'`` picks on the run's device). ``passes``: only in these pass groups (None: every pass). ``at``:
    match the two implementations across the passes of a shape (each measured at one pass, e.g. the token
    statistics' full step against the LM head's forward) and report the ratio at this pass."""

    kind: str
    numerator: str
    denominator: str
    metric: str
    name: str
    better: str
    headline: bool = False
    passes: tuple[str, ...] | None = None
    at: str | None = None

    def impls(self) -> list[str]:
        return [i.strip() for side in (self.numerator, self.denominator) for i in side.split(" - ")]


SUITE_GLOB = "test_bench_*.py"


def suite_ratios(folder: str | Path | None = None) -> list[Ratio]:
    """Every suite's declared ``RATIOS``, in suite order (the suites in :func:`benchmarks_dir` by default)."""
    import importlib.util

    folder = Path(folder) if folder is not None else benchmarks_dir()
    if str(folder) not in sys.path:  # the suites import their helpers (cases, presets, harness) as top-level modules
        sys.path.insert(0, str(folder))
    out: list[Ratio] = []
    for path in sorted(folder.glob(SUITE_GLOB)):
        name = f"_entangle_fast_suite_{path.stem}"
        module = sys.modules.get(name)
        if module is None:
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        out += list(getattr(module, "RATIOS", ()))
    return out


def _measure(r: dict | None, metric: str, pass_: str) -> float | None:
    if r is None:
        return None
    if metric == "time":
        return r["time_ms"] if r.get("time_ms", 0) > 0 else None
    peak = r.get("peak_memory_bytes") or None
    if metric == "memory":
        return peak
    if metric == "working-memory":
        grads = _gradient_bytes(r, pass_)
        return peak - grads if peak and grads and peak > grads else None
    raise ValueError(f"unknown ratio metric {metric!r} (time, memory, working-memory)")


def _side(expr: str, impls: dict, metric: str, pass_: str) -> float | None:
    values = [_measure(impls.get(i.strip()), metric, pass_) for i in expr.split(" - ")]
    if any(v is None for v in values):
        return None
    return values[0] - sum(values[1:])


def round_ratios(d: Ratio, impls: dict) -> list[float] | None:
    """The per-round time ratios of ``d``, where both implementations were timed side by side (``side_by_side`` in
    their results: round i of each was taken in the same turn, one after the other); None otherwise."""
    if d.metric != "time" or " - " in d.numerator or " - " in d.denominator:
        return None
    a, b = impls.get(d.numerator), impls.get(d.denominator)
    if not a or not b or not (a.get("side_by_side") and b.get("side_by_side")):
        return None
    sa, sb = a.get("samples_ms") or [], b.get("samples_ms") or []
    if not sa or len(sa) != len(sb) or min(sb) <= 0:
        return None
    return [x / y for x, y in zip(sa, sb)]


def _paired(d: Ratio, impls: dict) -> float | None:
    """The median over rounds of the per-round time ratio (:func:`round_ratios`), so that the machine's drift
    between rounds cancels; None where the two were not timed side by side."""
    rounds = round_ratios(d, impls)
    return None if rounds is None else statistics.median(rounds)


def compute_ratios(results: list[dict], ours_auto: str, declared: list[Ratio] | None = None) -> list[dict]:
    """Every declared ratio (:func:`suite_ratios` by default) at each (op, shape, pass) of one run where both sides
    were measured and the denominator is positive; sorted by op, shape and pass, declaration order within. Time
    ratios between implementations timed side by side are the median of their per-round ratios (:func:`_paired`),
    others the ratio of the medians."""
    declared = suite_ratios() if declared is None else declared
    groups: dict[tuple, dict[str, dict]] = {}
    shapes: dict[tuple, dict[str, dict]] = {}
    for r in results:
        groups.setdefault((r["kind"], r["shape"], r["pass"]), {})[r["impl"]] = r
    for (kind, shape, _), impls in sorted(groups.items()):
        shapes.setdefault((kind, shape), {}).update(impls)
    out = []
    for d in declared:
        if d.at is not None:
            targets = [((kind, shape, d.at), impls) for (kind, shape), impls in sorted(shapes.items())
                       if kind == d.kind]
        else:
            targets = [(key, impls) for key, impls in sorted(groups.items())
                       if key[0] == d.kind and (d.passes is None or key[2] in d.passes)]
        for (kind, shape, pass_), impls in targets:
            paired = _paired(d, impls)
            num = _side(d.numerator, impls, d.metric, pass_) if paired is None else paired
            den = _side(d.denominator, impls, d.metric, pass_) if paired is None else 1.0
            if num is None or den is None or not den > 0 or num / den != num / den:
                continue
            headline = d.headline and not any(i.startswith("ours-") and i != ours_auto for i in d.impls())
            out.append({"kind": kind, "shape": shape, "pass": pass_, "metric": d.metric, "name": d.name,
                        "numerator": d.numerator, "denominator": d.denominator, "value": float(num / den),
                        "better": d.better, "headline": headline})
    out.sort(key=lambda r: (r["kind"], r["shape"], r["pass"]))
    return out


_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}


def _gradient_bytes(result: dict, pass_: str) -> int | None:
    """Bytes of the gradients a log-prob step returns, ``[N, d]`` for hidden and ``[V, d]`` for the weight in the
    inputs' dtype: the same for every implementation, so "working memory" (peak extra memory less these) compares
    what each needs beyond its outputs. None for the forward pass (no gradients)."""
    p = result.get("shape_params") or {}
    if pass_ == "forward" or not {"rows", "seq", "hidden", "vocab"} <= p.keys():
        return None
    return (p["rows"] * p["seq"] + p["vocab"]) * p["hidden"] * _ITEMSIZE.get(p.get("dtype", "float32"), 4)


def ceilings(results: list[dict]) -> dict[str, float]:
    """Measured matmul TFLOP/s per dtype: the best plain matmul of the run."""
    out: dict[str, float] = {}
    for r in results:
        if r["kind"] == "matmul" and r.get("tflops"):
            out[r["dtype"]] = max(out.get(r["dtype"], 0.0), r["tflops"])
    return out


def build_run(preset: str, results: list[dict], skipped: list[dict], failed: list[dict], *, machine: dict | None = None,
              created: str | None = None, exit_code: int | None = None) -> dict:
    """Assemble the run dict from what the suites recorded; adds ceiling fractions and ratios."""
    machine = machine if machine is not None else machine_info()
    device = "cuda" if any(r.get("device") == "cuda" for r in results) else "cpu"
    methods = {"timer": sorted({r["timer"] for r in results}) or ["perf-counter"],
               "memory": sorted({r["memory_method"] for r in results}),
               "memory_descriptions": _memory_descriptions(),
               "flops": FLOPS_FORMULA}
    ceiling = ceilings(results)
    for r in results:
        c = ceiling.get(r["dtype"])
        r["ceiling_fraction"] = r["tflops"] / c if r.get("tflops") and c else None
    ours_auto = "ours-triton" if device == "cuda" and machine.get("triton") else "ours-torch"
    run = {"schema_version": SCHEMA_VERSION, "preset": preset,
           "created": created or datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "device": device, "machine": machine, "methods": methods, "ours_auto": ours_auto, "ceiling": ceiling,
           "results": results, "skipped": skipped, "failed": failed, "ratios": compute_ratios(results, ours_auto),
           "label": SMOKE_LABEL if preset == "smoke" else None}
    if exit_code is not None:
        run["pytest_exit_code"] = int(exit_code)
    return run


def _memory_descriptions() -> dict:
    return {
        "cuda-max-memory-allocated": "torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus "
        "memory_allocated() just before the op",
        "linux-vmhwm-in-process": "one warm call after the timed rounds, in the benchmark process: malloc_trim, reset "
        "peak RSS (/proc/self/clear_refs), VmHWM minus VmRSS just before the op",
        # Runs written before the suites shared one meter (benchmarks/results/ keeps some):
        "linux-vmhwm": "fresh CPU subprocess per shape; per op: malloc_trim, reset peak RSS (/proc/self/clear_refs), "
        "VmHWM minus VmRSS just before the op",
    }


# ---------------------------------------------------------------------------------------------------------------------
# Summary and plots.


def _mib(b) -> str:
    return "-" if b is None else f"{b / 2**20:,.1f}"


def _fmt(x, spec=".3g") -> str:
    return "-" if x is None else format(x, spec)


def summary_markdown(run: dict) -> str:
    """The run as Markdown: machine, methods, headline ratios, every ratio, every measurement, skips, failures."""
    mach = run["machine"]
    label = run.get("label")
    lines = [f"# entangle_fast benchmarks: preset `{run['preset']}` on {machine_slug(mach, run['device'])}"
             + (f" ({label})" if label else ""), "",
             f"- run: {run['created']}, device `{run['device']}`",
             f"- CPU: {mach.get('cpu')} ({mach.get('cores')} cores, {mach.get('torch_threads', '?')} torch threads)",
             f"- load average (1/5/15 min) at start {mach.get('load_average_start') or '-'}, at end "
             f"{mach.get('load_average') or '-'}",
             f"- GPU: {mach.get('gpu') or 'none'}; torch {mach.get('torch')}, triton {mach.get('triton') or '-'}, "
             f"CUDA {mach.get('cuda') or '-'}",
             f"- timer: {', '.join(run['methods']['timer'])}; peak memory: "
             + (", ".join(f"{m} ({run['methods'].get('memory_descriptions', {}).get(m, '')})"
                          for m in run["methods"]["memory"]) or "-"),
             f"- FLOPs: {run['methods'].get('flops', FLOPS_FORMULA)}",
             "- matmul ceiling (measured this run): "
             + (", ".join(f"{d} {v:.3g} TFLOP/s" for d, v in run["ceiling"].items()) or "-"),
             f"- ours on this device (impl='auto'): `{run['ours_auto']}`", ""]
    lines += ["## Headline ratios", ""]
    if label:
        lines += [f"**{label}**: every case ran once, untimed warm-up included, to check that the suites run; these "
                  "times and ratios are not results. Run the `cpu` or `gpu` preset to measure.", ""]
    lines += ["| op | shape | pass | ratio | value | better |", "|---|---|---|---|---:|---|"]
    lines += [f"| {r['kind']} | {r['shape']} | {r['pass']} | {r['name']} | {r['value']:.3g} | {r['better']} |"
              for r in run["ratios"] if r["headline"]]
    lines += ["", "## All ratios", "", "| op | shape | pass | ratio | value |", "|---|---|---|---|---:|"]
    lines += [f"| {r['kind']} | {r['shape']} | {r['pass']} | {r['name']} | {r['value']:.3g} |" for r in run["ratios"]]
    lines += ["", "## Measurements", "",
              "| group | impl | time ms (median) | CPU ms | rounds | peak extra MiB | TFLOP/s | of ceiling |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(run["results"], key=lambda r: (r["group"], r["impl"])):
        frac = r.get("ceiling_fraction")
        mem = _mib(r["peak_memory_bytes"]) if r["memory_error"] is None else f"error: {r['memory_error'][:60]}"
        lines.append(f"| {r['group']} | {r['impl']} | {r['time_ms']:.4g} | {_fmt(r.get('cpu_time_ms'), '.4g')} | "
                     f"{r['rounds']} | {mem} | "
                     f"{_fmt(r['tflops'])} | {'-' if frac is None else f'{100 * frac:.0f}%'} |")
    lines += ["", "## Skipped", ""]
    if run["skipped"]:
        reasons: dict[str, list[str]] = {}
        for s in run["skipped"]:
            reasons.setdefault(s["reason"], []).append(s["id"])
        lines += ["| reason | cases |", "|---|---|"]
        lines += [f"| {reason} | {len(ids)}: {', '.join(ids[:4])}{' ...' if len(ids) > 4 else ''} |"
                  for reason, ids in reasons.items()]
    else:
        lines.append("none")
    if run["failed"]:
        lines += ["", "## Failed", ""]
        lines += [f"- `{f['nodeid']}` ({f['when']}): {f['message'][:300]}" for f in run["failed"]]
    return "\n".join(lines) + "\n"


def _sweeps(results: list[dict], varying: str) -> tuple[dict, list[dict]]:
    """The log-prob results of the longest sweep of ``varying`` (``seq`` or ``vocab``) with all else fixed."""
    series: dict[tuple, list[dict]] = {}
    for r in results:
        if r["kind"] != "logprobs":
            continue
        p = r["shape_params"]
        fixed = tuple((k, p[k]) for k in ("rows", "seq", "hidden", "vocab", "dtype") if k != varying)
        series.setdefault(fixed, []).append(r)
    if not series:
        return {}, []
    fixed, rows = max(series.items(), key=lambda kv: (len({r["shape_params"][varying] for r in kv[1]}), len(kv[1])))
    return dict(fixed), rows


def plot_run(run: dict, prefix: str | Path) -> list[Path]:
    """The run's plots, for what it measured:

    - ``<prefix>-time.png`` and ``<prefix>-memory.png`` when it has log-prob results: the op's time and peak memory
      against sequence length (tokens N) and vocabulary size, one line per implementation and pass (full step solid,
      forward dashed);
    - ``<prefix>-rounds.png`` when it has time ratios taken side by side (the monitor and trainer suites): every
      round's ratio and their median (:func:`plot_round_ratios`)."""
    prefix = Path(prefix)
    written = _plot_logprobs(run, prefix) if any(r["kind"] == "logprobs" for r in run["results"]) else []
    rounds = plot_round_ratios(run, prefix.parent / f"{prefix.name}-rounds.png")
    return written + ([rounds] if rounds is not None else [])


def plot_round_ratios(run: dict, path: str | Path, declared: list[Ratio] | None = None) -> Path | None:
    """Every time ratio of ``run`` taken side by side, one column each: a dot per round and a bar at their median
    (the value the summary reports), against a line at 1, so that a ratio's spread over the run is in view beside its
    value. Returns the path, or None when the run has no such ratio."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    declared = suite_ratios() if declared is None else declared
    shapes: dict[tuple, dict[str, dict]] = {}
    for r in run["results"]:
        shapes.setdefault((r["kind"], r["shape"]), {})[r["impl"]] = r
    columns = []  # (label, per-round ratios)
    for d in declared:
        for (kind, shape), impls in sorted(shapes.items()):
            rounds = round_ratios(d, impls) if kind == d.kind else None
            if rounds:
                columns.append((f"{shape}\n{d.numerator} / {d.denominator}", rounds))
    if not columns:
        return None
    fig = Figure(figsize=(max(6.0, 0.9 * len(columns) + 1.5), 4.6))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for i, (_, rounds) in enumerate(columns):
        median = statistics.median(rounds)
        ax.scatter([i] * len(rounds), rounds, s=14, alpha=0.6, color="C0")
        ax.hlines(median, i - 0.3, i + 0.3, color="C3", linewidth=2)
        ax.annotate(f"{median:.2f}", (i, max(rounds)), textcoords="offset points", xytext=(0, 4), ha="center",
                    fontsize=7)
    ax.axhline(1.0, color="0.5", linewidth=0.8, linestyle="--")
    ax.set_yscale("log")  # ratios from ~1 (the monitor) to ~10 (the two-extra-backward baseline) on one axis
    ax.set_xticks(range(len(columns)), [label for label, _ in columns], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("time ratio, log scale (dots: rounds; bar: median)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_title(f"side-by-side time ratios: preset {run['preset']}, {machine_slug(run['machine'], run['device'])}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return Path(path)


def _plot_logprobs(run: dict, prefix: Path) -> list[Path]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    written = []
    impls = sorted({r["impl"] for r in run["results"] if r["kind"] == "logprobs"})
    colour = {impl: f"C{i % 10}" for i, impl in enumerate(impls)}  # one colour per implementation in both figures
    for metric, label, value in (("time", "time per call (ms)", lambda r: r["time_ms"]),
                                 ("memory", "peak extra memory (MiB)",
                                  lambda r: r["peak_memory_bytes"] / 2**20 if r["peak_memory_bytes"] else None)):
        fig = Figure(figsize=(11, 4.2))
        FigureCanvasAgg(fig)
        for ax, varying, xlabel in zip(fig.subplots(1, 2), ("seq", "vocab"),
                                       ("tokens N = rows x seq", "vocabulary size V")):
            fixed, rows = _sweeps(run["results"], varying)
            lines: dict[tuple, list] = {}
            for r in rows:
                if r["pass"] in ("full", "forward") and value(r) is not None:
                    p = r["shape_params"]
                    x = p["rows"] * p["seq"] if varying == "seq" else p["vocab"]
                    lines.setdefault((r["impl"], r["pass"]), []).append((x, value(r)))
            for (impl, pass_), pts in sorted(lines.items()):
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if pass_ == "full" else "x",
                        color=colour[impl], linestyle="-" if pass_ == "full" else "--", label=f"{impl} ({pass_})")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(label)
            ax.set_title(", ".join(f"{k}={v}" for k, v in fixed.items()), fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            if lines:
                ax.legend(fontsize=7)
        fig.suptitle(f"linear_logprobs {metric}: preset {run['preset']}, "
                     f"{machine_slug(run['machine'], run['device'])}", fontsize=10)
        fig.tight_layout()
        path = prefix.parent / f"{prefix.name}-{metric}.png"
        fig.savefig(path, dpi=110)
        written.append(path)
    return written


# ---------------------------------------------------------------------------------------------------------------------
# Comparing two runs.


def compare(a_json, b_json) -> dict:
    """Runs A and B side by side: per measurement (same op, shape, pass, impl) ``B / A`` time and peak memory, and
    per ratio of the same name the two values and ``B / A``. Arguments are paths or loaded run dicts."""
    a, b = load_run(a_json), load_run(b_json)

    def key(r):
        return (r["kind"], r["shape"], r["pass"], r["impl"])

    b_results = {key(r): r for r in b["results"]}
    rows = []
    for ra in a["results"]:
        rb = b_results.get(key(ra))
        if rb is None:
            continue
        ma, mb = ra["peak_memory_bytes"], rb["peak_memory_bytes"]
        rows.append({"kind": ra["kind"], "shape": ra["shape"], "pass": ra["pass"], "impl": ra["impl"],
                     "time_ms_a": ra["time_ms"], "time_ms_b": rb["time_ms"],
                     "time_b_over_a": rb["time_ms"] / ra["time_ms"] if ra["time_ms"] else None,
                     "memory_a": ma, "memory_b": mb, "memory_b_over_a": mb / ma if ma and mb is not None else None})
    b_ratios = {(r["kind"], r["shape"], r["pass"], r["name"]): r for r in b["ratios"]}
    ratios = []
    for ra in a["ratios"]:
        rb = b_ratios.get((ra["kind"], ra["shape"], ra["pass"], ra["name"]))
        if rb is not None:
            ratios.append({"kind": ra["kind"], "shape": ra["shape"], "pass": ra["pass"], "name": ra["name"],
                           "a": ra["value"], "b": rb["value"],
                           "b_over_a": rb["value"] / ra["value"] if ra["value"] else None})

    def label(run):
        note = f", {run['label']}" if run.get("label") else ""
        return f"{run['preset']} @ {machine_slug(run['machine'], run['device'])} ({run['created']}{note})"

    return {"a": label(a), "b": label(b), "measurements": rows, "ratios": ratios}


def compare_markdown(cmp: dict) -> str:
    lines = [f"A: {cmp['a']}", f"B: {cmp['b']}", "",
             "| op | shape | pass | impl | A ms | B ms | B/A time | A MiB | B MiB | B/A memory |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['kind']} | {r['shape']} | {r['pass']} | {r['impl']} | {r['time_ms_a']:.4g} | {r['time_ms_b']:.4g} "
              f"| {_fmt(r['time_b_over_a'])} | {_mib(r['memory_a'])} | {_mib(r['memory_b'])} | "
              f"{_fmt(r['memory_b_over_a'])} |" for r in cmp["measurements"]]
    lines += ["", "| op | shape | pass | ratio | A | B | B/A |", "|---|---|---|---|---:|---:|---:|"]
    lines += [f"| {r['kind']} | {r['shape']} | {r['pass']} | {r['name']} | {r['a']:.3g} | {r['b']:.3g} | "
              f"{_fmt(r['b_over_a'])} |" for r in cmp["ratios"]]
    if not cmp["measurements"] and not cmp["ratios"]:
        lines.append("\n(no measurement or ratio in common)")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------------
# Running a preset.


def benchmarks_dir() -> Path:
    """The benchmark suites: ``entangle_fast/benchmarks/`` of an installed package (setup.py installs the checkout's
    ``benchmarks/`` there), else the source checkout's ``benchmarks/`` (editable installs, a checkout on the path)."""
    here = Path(__file__).resolve().parent
    candidates = (here / "benchmarks", here.parent / "benchmarks")
    for path in candidates:
        if (path / "conftest.py").is_file():
            return path
    raise FileNotFoundError("the benchmark suites are in neither " + " nor ".join(map(str, candidates)))


def default_results_dir() -> Path:
    """``./entangle-bench/`` under the current working directory: a run never lands beside the committed results in
    the checkout's ``benchmarks/results/`` unless ``--out`` says so."""
    return Path.cwd() / DEFAULT_OUT


class _Collector:
    """pytest plugin: results from the suites' user_properties, skips with reasons, failures, a tqdm progress bar."""

    def __init__(self, progress: bool, stream):
        self.results: list[dict] = []
        self.skipped: list[dict] = []
        self.failed: list[dict] = []
        self.cases: dict[str, dict] = {}
        self.progress, self.stream, self.bar = progress, stream, None

    def pytest_collection_finish(self, session):
        for item in session.items:
            params = getattr(getattr(item, "callspec", None), "params", {})
            found = [v.describe() for v in params.values() if hasattr(v, "describe")]
            self.cases[item.nodeid] = found[0] if found else {"id": item.name}
        if self.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=len(session.items), desc="benchmarks", unit="case", file=self.stream,
                            dynamic_ncols=True)

    def pytest_runtest_logreport(self, report):
        if report.when == "call" and report.passed:
            self.results += [v for k, v in report.user_properties if k == RESULT_KEY]
        elif report.skipped and report.when in ("setup", "call"):
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            reason = reason[len("Skipped: "):] if reason.startswith("Skipped: ") else reason
            self.skipped.append({**self.cases.get(report.nodeid, {"id": report.nodeid}), "nodeid": report.nodeid,
                                 "reason": reason})
        elif report.failed:
            self.failed.append({"nodeid": report.nodeid, "when": report.when, "message": report.longreprtext[-3000:]})

    def pytest_runtest_logfinish(self, nodeid, location):
        if self.bar is not None:
            self.bar.set_postfix_str(self.cases.get(nodeid, {}).get("id", nodeid)[-60:], refresh=False)
            self.bar.update(1)

    def close(self):
        if self.bar is not None:
            self.bar.close()


@dataclass
class RunFiles:
    """What :func:`run_preset` wrote; ``ok`` when pytest passed and nothing failed."""

    json: Path
    markdown: Path
    plots: list[Path]
    log: Path
    exit_code: int
    counts: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


def run_preset(preset: str, out_dir: str | Path, *, keyword: str | None = None, progress: bool = True,
               pytest_args: tuple[str, ...] = ()) -> RunFiles:
    """Run the suites at ``preset`` through pytest-benchmark in this process, then write into ``out_dir``:
    ``<machine>-<date>.json`` (the run; ``<machine>-<preset>-<date>`` for the smoke preset), ``.md`` (summary) and
    the plots of :func:`plot_run`. pytest's own output goes to a log file (its path is returned). ``smoke`` runs each
    case once (``--benchmark-disable``). Call it once per process: pytest caches the suites' modules."""
    import importlib.util

    if importlib.util.find_spec("pytest") is None or importlib.util.find_spec("pytest_benchmark") is None:
        raise ImportError("running benchmarks needs pytest and pytest-benchmark: pip install 'entangle-fast[test]'")
    import pytest

    suites = benchmarks_dir()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [str(suites), "-q", "-s", "-p", "no:cacheprovider", f"--bench-preset={preset}", *pytest_args]
    if preset == "smoke":
        args.append("--benchmark-disable")
    if keyword:
        args += ["-k", keyword]
    progress_stream = sys.stderr
    collector = _Collector(progress, progress_stream)
    load_start = _loadavg()
    fd, log_name = tempfile.mkstemp(prefix="entangle-fast-bench-", suffix=".log")
    log = Path(log_name)
    with os.fdopen(fd, "w") as log_file, contextlib.redirect_stdout(log_file):
        try:
            code = int(pytest.main(args, plugins=[collector]))
        finally:
            collector.close()
    machine = machine_info()  # torch_threads: what the suites ran with (--bench-threads sets it in this process)
    machine["load_average_start"] = load_start
    run = build_run(preset, collector.results, collector.skipped, collector.failed, machine=machine, exit_code=code)
    stamp = datetime.now().strftime("%Y-%m-%dT%H%M")
    slug = machine_slug(run["machine"], run["device"])
    stem = f"{slug}-{stamp}" if preset in ("cpu", "gpu") else f"{slug}-{preset}-{stamp}"
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(run, indent=1) + "\n")
    md_path = out_dir / f"{stem}.md"
    md_path.write_text(summary_markdown(run))
    plots = plot_run(run, out_dir / stem) if run["results"] else []
    counts = {"results": len(run["results"]), "skipped": len(run["skipped"]), "failed": len(run["failed"])}
    return RunFiles(json_path, md_path, plots, log, code, counts)
