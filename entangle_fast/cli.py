"""The ``entangle-fast`` command line.

Each subcommand lives in its own module under ``entangle_fast.commands`` with ``configure(parser)`` and ``run(args)``;
this file only lists them. Running ``entangle-fast`` with no subcommand runs the default one.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). The first entry is the default.
COMMANDS = {
    "demo": ("entangle_fast.commands.demo",
             "SFT + DPO on built-in sentiment sets, monitor every step, normalised-update comparison"),
    "bench": ("entangle_fast.commands.bench", "run a benchmark preset (JSON, summary, plots) or --compare two runs"),
    "logprobs": ("entangle_fast.commands.logprobs", "chosen/rejected log-probs of built-in pairs on a tiny model"),
    "profile": ("entangle_fast.commands.profile",
                "per-token gradient profile of preference pairs: JSON lines, heat-maps, HTML report"),
}
DEFAULT = "demo"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="entangle-fast",
        description="Measure gradient entanglement in preference alignment. Without a subcommand: "
        f"`entangle-fast {DEFAULT}` on the built-in tiny model (no downloads).",
    )
    sub = parser.add_subparsers(dest="command")
    for name, (module, help_text) in COMMANDS.items():
        importlib.import_module(module).configure(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = [DEFAULT] + argv
    args = parser.parse_args(argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except (FileNotFoundError, ValueError) as err:  # user errors: one clear line, no traceback
        print(f"entangle-fast {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
