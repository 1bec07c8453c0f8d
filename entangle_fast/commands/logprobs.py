"""``entangle-fast logprobs``: chosen and rejected log-probs of the built-in pairs on a tiny model built in code."""
from __future__ import annotations

import argparse

import torch

from entangle_fast._backend import IMPLS


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", default="llama", choices=["llama", "qwen2", "gpt2"], help="tiny model family")
    parser.add_argument("--seed", type=int, default=0, help="model initialisation seed")
    parser.add_argument("--impl", default="auto", choices=IMPLS, help="fused op backend (see entangle_fast._backend)")


def run(args: argparse.Namespace) -> int:
    from entangle_fast.data import BUILTIN_PAIRS, encode_pairs
    from entangle_fast.models import TinyConfig, build_tokenizer, tiny_model
    from entangle_fast.preference import preference_logprobs

    tokenizer = build_tokenizer()
    model = tiny_model(args.arch, TinyConfig(vocab_size=len(tokenizer)), seed=args.seed)
    batch = encode_pairs(tokenizer, BUILTIN_PAIRS)
    with torch.no_grad():
        out = preference_logprobs(model, batch, impl=args.impl)
    print(f"tiny {args.arch} (vocab {len(tokenizer)}, {sum(p.numel() for p in model.parameters()):,} parameters), "
          f"fused log-probs, no logits materialised\n")
    print(f"{'pair':>4}  {'chosen':<28} {'rejected':<28} {'log p(chosen)':>14} {'log p(rejected)':>16}")
    for i, ex in enumerate(BUILTIN_PAIRS):
        print(f"{i:>4}  {ex['chosen'][:28]:<28} {ex['rejected'][:28]:<28} "
              f"{out.chosen_logps[i].item():>14.4f} {out.rejected_logps[i].item():>16.4f}")
    return 0
