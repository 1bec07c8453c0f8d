"""``entangle-fast profile``: per-token gradient entanglement of preference pairs, written as JSON lines, heat-maps and
one HTML report.

    entangle-fast profile                                         # built-in tiny model and pairs (no downloads)
    entangle-fast profile --model ./my-model --data pairs.jsonl --out runs/profile
    entangle-fast profile --model ./my-model --data pairs.jsonl --out runs/profile --resume
"""
from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="PATH", default=None,
                        help="local Hugging Face causal LM folder (AutoModelForCausalLM + AutoTokenizer, no download); "
                             "default: the built-in tiny model")
    parser.add_argument("--arch", default="llama", choices=["llama", "qwen2", "gpt2"],
                        help="family of the built-in tiny model (without --model)")
    parser.add_argument("--data", metavar="PAIRS.jsonl", default=None,
                        help="JSON lines, one {'prompt', 'chosen', 'rejected'} per line (strings or chat messages); "
                             "default: the built-in pairs")
    parser.add_argument("--out", metavar="DIR", default="entangle-profile",
                        help="output folder: profile.jsonl, report.html, images/, matrices/ (default: %(default)s)")
    parser.add_argument("--resume", action="store_true", help="keep the records already in DIR and profile the rest")
    parser.add_argument("--max-pairs", type=int, default=None, metavar="N", help="profile only the first N pairs")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16", "float64"],
                        help="model dtype (auto: the checkpoint's; float32 for the built-in model)")
    parser.add_argument("--mode", default="auto", choices=["auto", "exact", "sketch"],
                        help="full-model token matrix: exact, Kronecker sketches of the matrix parameters (long "
                             "responses), or auto (sketch above 256 response tokens)")
    parser.add_argument("--sketch-dim", type=int, default=32, metavar="K", help="sketch size (default: %(default)s)")
    parser.add_argument("--memory-gib", type=float, default=2.0, metavar="GIB",
                        help="per-token factors held at once, GiB (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="built-in model and sketch seed")
    parser.add_argument("--embed-images", action="store_true",
                        help="embed the PNGs in report.html as base64 instead of linking them")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from entangle_fast.data import BUILTIN_PAIRS, load_pairs
    from entangle_fast.models import builtin_model, load_model
    from entangle_fast.profile import run_profile

    if args.max_pairs is not None and args.max_pairs < 1:
        raise ValueError(f"--max-pairs must be at least 1, got {args.max_pairs}")
    if args.sketch_dim < 1:
        raise ValueError(f"--sketch-dim must be at least 1, got {args.sketch_dim}")
    if args.memory_gib <= 0:
        raise ValueError(f"--memory-gib must be positive, got {args.memory_gib}")
    pairs = load_pairs(args.data) if args.data else list(BUILTIN_PAIRS)
    if args.model:
        model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
        model_name = args.model
    else:
        model, tokenizer = builtin_model(args.arch, device=args.device, dtype=args.dtype, seed=args.seed)
        model_name = f"built-in tiny {args.arch}"
    parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    param = next(model.parameters())
    meta = {"model": model_name, "data": args.data or "built-in pairs", "device": str(param.device),
            "dtype": str(param.dtype).replace("torch.", ""), "trainable parameters": f"{parameters:,}",
            "mode": args.mode}
    result = run_profile(model, tokenizer, pairs, args.out, resume=args.resume, max_pairs=args.max_pairs,
                         progress=not args.no_progress, mode=args.mode, sketch_dim=args.sketch_dim, seed=args.seed,
                         memory_budget=int(args.memory_gib * (1 << 30)), embed_images=args.embed_images, meta=meta)
    print(f"profiled {len(result.computed)} pair(s)" + (f", {len(result.skipped)} already done" if result.skipped
                                                        else ""))
    print(f"wrote {result.records_path}")
    if result.html_path is not None:
        print(f"wrote {result.html_path}")
    return 0
