"""``entangle-fast demo``: the paper's sentiment study in miniature, on CPU, with nothing downloaded.

    entangle-fast demo                                   # built-in tiny Llama and the three built-in sets
    entangle-fast demo --out runs/demo --steps 40 --lr 0.05 --seed 1
    entangle-fast demo --model ./my-llama --data prefs.jsonl --sft-steps 0 --lr 1e-4

SFT, then DPO with the entanglement monitor on every step and the pairwise normalised update from the same start;
prints one summary row per set and method (``--table``: every step) and a verdict, writes ``demo.json`` and PNG plots under ``--out``. Plain SGD throughout, so the
predicted change of each log-prob is a first-order forecast the next step measures.
"""
from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    from entangle_fast.demo import DemoConfig

    d = DemoConfig()
    parser.add_argument("--out", metavar="DIR", default=d.out, help=f"where to write demo.json and the plots "
                        f"(default: ./{d.out})")
    parser.add_argument("--steps", type=int, default=d.steps, help=f"SGD steps per set and method (default {d.steps})")
    parser.add_argument("--lr", type=float, default=d.lr, help=f"DPO learning rate, plain SGD (default {d.lr})")
    parser.add_argument("--seed", type=int, default=d.seed, help="model initialisation seed (default 0)")
    parser.add_argument("--beta", type=float, default=d.beta, help=f"DPO beta (default {d.beta})")
    parser.add_argument("--sft-steps", type=int, default=None,
                        help="Adam SFT steps on the responses before DPO (default 10 built-in, 0 with --model)")
    parser.add_argument("--model", metavar="PATH", default=None,
                        help="a local Hugging Face causal LM directory (loaded with local_files_only; no download)")
    parser.add_argument("--data", metavar="FILE.jsonl", default=None,
                        help="preference pairs, one JSON object per line with prompt, chosen, rejected")
    parser.add_argument("--device", default=d.device, help="torch device (default cpu)")
    parser.add_argument("--dtype", default=None, choices=["float64", "float32", "bfloat16"],
                        help="parameter dtype (default float64 built-in, float32 with --model)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--table", action="store_true",
                        help="print every step of every run (default: one summary row per set and method)")


def run(args: argparse.Namespace) -> int:
    from entangle_fast.demo import DemoConfig, run_demo

    dtype = args.dtype or ("float32" if args.model else "float64")
    config = DemoConfig(steps=args.steps, lr=args.lr, seed=args.seed, beta=args.beta, sft_steps=args.sft_steps,
                        out=args.out, model=args.model, data=args.data, device=args.device, dtype=dtype,
                        progress=not args.no_progress, plots=not args.no_plots, full_table=args.table)
    run_demo(config)
    return 0
