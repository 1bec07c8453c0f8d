"""Gradient entanglement in a plain PyTorch DPO loop: the monitor, the loss module, nothing else.

Runs on CPU in seconds with the built-in tiny model and pairs (built in code, nothing is downloaded):

    python examples/plain_pytorch_loop.py --steps 8            # --quiet: no per-step lines

Each step runs forward, loss and backward inside ``EntanglementMonitor``; the statistics come out of that one
backward. With plain SGD the monitor's first-order prediction of how each log-prob moves (``predicted_delta``) can be
checked against the change the step actually makes; it leaves out the pull of the other pairs in the batch
(docs/math.md section 2), so the two agree in sign more often than in size. With Adam the prediction only indicates
the direction of the pressure on each log-prob.
"""
from __future__ import annotations

import argparse

import torch

from entangle_fast import preference_logprobs
from entangle_fast.integrations.distributed import entanglement_metrics
from entangle_fast.losses import preference_loss
from entangle_fast.data import BUILTIN_PAIRS, encode_pairs
from entangle_fast.models import build_tokenizer, tiny_model
from entangle_fast.monitor import EntanglementMonitor


def main(steps: int = 8, lr: float = 0.05, loss_name: str = "dpo", beta: float = 0.1, quiet: bool = False) -> list:
    """Train the tiny policy on the built-in pairs; returns one dict of scalars per step."""
    batch = encode_pairs(build_tokenizer(), BUILTIN_PAIRS)
    policy = tiny_model("llama", seed=0).train()
    reference = tiny_model("llama", seed=0).requires_grad_(False)
    with torch.no_grad():
        ref = preference_logprobs(reference, batch)
    optimizer = torch.optim.SGD(policy.parameters(), lr=lr)
    monitor = EntanglementMonitor(policy)  # tracks every trainable parameter; build it once, enter it every step

    history = []
    for step in range(steps):
        with monitor:
            out = preference_logprobs(policy, batch)
            loss = preference_loss(loss_name, out.chosen_logps, out.rejected_logps, ref_chosen_logps=ref.chosen_logps,
                                   ref_rejected_logps=ref.rejected_logps, chosen_lengths=out.chosen_lengths,
                                   rejected_lengths=out.rejected_lengths, beta=beta).losses.mean()
            loss.backward()
        stats = monitor.stats
        predicted_w, predicted_l = stats.predicted_delta(lr)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            after = preference_logprobs(policy, batch)
        row = {"step": step, "loss": loss.item(), **entanglement_metrics(stats, lr=lr),
               "actual_delta_chosen": (after.chosen_logps - out.chosen_logps).mean().item(),
               "actual_delta_rejected": (after.rejected_logps - out.rejected_logps).mean().item(),
               "cases": stats.case.tolist()}
        history.append(row)
        if not quiet:
            print(f"step {step}  loss {row['loss']:.4f}  cos {row['entangle/cosine']:+.3f}  cases {row['cases']}  "
                  f"d s_w predicted {predicted_w.mean().item():+.4f} actual {row['actual_delta_chosen']:+.4f}  "
                  f"d s_l predicted {predicted_l.mean().item():+.4f} actual {row['actual_delta_rejected']:+.4f}")
    return history


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--loss", default="dpo", help="a name of entangle_fast.losses.LOSSES (dpo, ipo, hinge, ...)")
    parser.add_argument("--beta", type=float, default=0.1, help="the loss's beta (default 0.1)")
    parser.add_argument("--quiet", action="store_true", help="print nothing per step (main() still returns the history)")
    cli = parser.parse_args()
    main(cli.steps, cli.lr, cli.loss, beta=cli.beta, quiet=cli.quiet)
