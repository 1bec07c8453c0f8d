"""pytest plumbing of the benchmark suites: the preset option, case parametrisation, the GPU-only skip.

    pytest benchmarks --bench-preset cpu          # the CPU preset, timed (a few minutes on 2 cores)
    pytest benchmarks --benchmark-disable         # no preset given and timing disabled: the `smoke` preset, run once
    entangle-fast bench --preset gpu              # the same through the CLI, which also writes JSON, summary, plots

Without ``--bench-preset`` the preset is ``$ENTANGLE_FAST_BENCH_PRESET``, else ``smoke`` when pytest-benchmark is
disabled (one execution per case: only the smoke shapes make sense) and ``cpu`` otherwise. A preset whose device is
CUDA is skipped as a whole, with the reason, where no GPU is visible; the device is queried here at run time, never
at import.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # the suites import presets/cases as top-level modules (also under --import-mode=importlib)
    sys.path.insert(0, _HERE)

import cases  # noqa: E402
import presets  # noqa: E402

_PRESET = pytest.StashKey[presets.Preset]()
_RUNNER = pytest.StashKey[cases.SuiteRunner]()
CASE_FIXTURES = {"logprob_case": cases.logprob_cases, "stats_case": cases.stats_cases,
                 "ceiling_case": cases.ceiling_cases,
                 "monitor_case": lambda p: [presets.MonitorCase(s, m) for s in p.monitor for m in s.modes]}


def pytest_addoption(parser):
    group = parser.getgroup("entangle-fast benchmarks")
    group.addoption("--bench-preset", choices=sorted(presets.PRESETS), default=None,
                    help="shape preset of the benchmark suites (default: see benchmarks/conftest.py)")
    group.addoption("--bench-threads", type=int, default=None,
                    help="torch intra-op threads on CPU (default: torch's). One thread keeps CPU timings steady on a "
                         "shared machine, where a busy core stalls every parallel region of a multi-threaded op")


def pytest_configure(config):
    name = config.getoption("--bench-preset") or os.environ.get("ENTANGLE_FAST_BENCH_PRESET")
    if not name:
        name = "smoke" if config.getoption("benchmark_disable", default=False) else "cpu"
    if name not in presets.PRESETS:
        raise pytest.UsageError(f"unknown benchmark preset {name!r}; choose one of {sorted(presets.PRESETS)}")
    config.stash[_PRESET] = presets.PRESETS[name]
    threads = config.getoption("--bench-threads")
    if threads is not None:
        if threads < 1:
            raise pytest.UsageError(f"--bench-threads must be at least 1, got {threads}")
        import torch

        torch.set_num_threads(threads)


def pytest_generate_tests(metafunc):
    preset = metafunc.config.stash[_PRESET]
    for fixture, build in CASE_FIXTURES.items():
        if fixture in metafunc.fixturenames:
            built = build(preset)
            metafunc.parametrize(fixture, built, ids=[c.id for c in built])


def _cuda_missing(preset: presets.Preset) -> str | None:
    if preset.device != "cuda":
        return None
    import torch

    if torch.cuda.is_available():
        return None
    return (f"preset {preset.name!r} runs on CUDA only and no CUDA device is visible here "
            "(torch.cuda.is_available() is False); use --bench-preset cpu")


def pytest_collection_modifyitems(config, items):
    reason = _cuda_missing(config.stash[_PRESET])
    if reason:
        for item in items:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def bench_preset(request) -> presets.Preset:
    """The preset this session runs."""
    return request.config.stash[_PRESET]


@pytest.fixture(scope="session")
def bench_device(bench_preset) -> torch.device:
    """Where the preset runs (``auto``: CUDA when visible), queried at run time."""
    return cases.resolve_device(bench_preset.device)


@pytest.fixture(scope="session")
def bench(request) -> cases.SuiteRunner:
    """Times, measures and records one case: ``bench.run(benchmark, case, record_property)``."""
    config = request.config
    if _RUNNER not in config.stash:
        preset = config.stash[_PRESET]
        config.stash[_RUNNER] = cases.SuiteRunner(preset, cases.resolve_device(preset.device))
    return config.stash[_RUNNER]
