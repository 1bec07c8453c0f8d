"""``entangle-fast bench``: run a benchmark preset and write its JSON, summary and plots, or compare two runs.

    entangle-fast bench                          # the cpu preset, into ./entangle-bench/
    entangle-fast bench --preset gpu --out runs/ # real shapes on a GPU (skipped, with the reason, without one)
    entangle-fast bench --compare A.json B.json  # B against A, measurement by measurement and ratio by ratio
"""
from __future__ import annotations

import argparse
import sys

PRESETS = ("cpu", "gpu", "cpu-head", "smoke")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="cpu", choices=PRESETS,
                        help="cpu: a few minutes on 2 cores; gpu: Llama-3-8B head shapes, bf16; cpu-head: the "
                             "Llama-3-8B head shape's memory target on CPU (~15 min, ~20 GiB RAM); smoke: one tiny "
                             "shape per benchmark, run once")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="where to write the run (default: ./entangle-bench under the current directory; "
                             "the committed runs live in the checkout's benchmarks/results)")
    parser.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), default=None,
                        help="print B against A instead of running anything")
    parser.add_argument("-k", dest="keyword", metavar="EXPR", default=None,
                        help="only the cases matching this pytest -k expression (e.g. 'full and reference')")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for CPU runs (default: torch's; 1 keeps timings steady on a busy machine)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from entangle_fast import bench

    if args.compare:
        print(bench.compare_markdown(bench.compare(*args.compare)), end="")
        return 0
    out = args.out or bench.default_results_dir()
    try:
        extra = (f"--bench-threads={args.threads}",) if args.threads else ()
        files = bench.run_preset(args.preset, out, keyword=args.keyword, progress=not args.no_progress,
                                 pytest_args=extra)
    except ImportError as err:
        print(f"entangle-fast bench: error: {err}", file=sys.stderr)
        return 2
    c = files.counts
    note = f" ({bench.SMOKE_LABEL})" if args.preset == "smoke" else ""
    print(f"preset {args.preset}: {c['results']} measured, {c['skipped']} skipped, {c['failed']} failed{note}")
    print(f"wrote {files.json}")
    print(f"wrote {files.markdown}")
    for plot in files.plots:
        print(f"wrote {plot}")
    print(f"pytest log: {files.log}")
    if not files.ok:
        print(f"entangle-fast bench: pytest exited with {files.exit_code}; see the log and the 'failed' entries",
              file=sys.stderr)
    return 0 if files.ok else 1
