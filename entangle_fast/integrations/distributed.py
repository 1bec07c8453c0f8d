"""Rank-aware helpers for data-parallel training (DDP, FSDP2): calling the model through its wrapper, and reducing the
logged entanglement means across ranks.

Why nothing is gathered: the monitor works from what each rank's own backward exposes, the inputs of its layers and
the gradients at their outputs for the rows that rank holds (docs/math.md section 4). Under DDP every rank has the full
weights anyway; under FSDP2 the weights are sharded but the activations and output gradients of a rank's rows are
complete, and the layer identities never touch a weight. So the per-pair statistics of a pair are computed on the rank
that owns the pair, and stay there.

Only the logged scalars cross ranks. For every metric each rank contributes ``(sum over its valid pairs, number of
valid pairs)``; a single all-reduce of one ``[K, 2]`` tensor adds them up and the mean is ``sum / count``. Ranks with
different numbers of valid pairs therefore average correctly (each valid pair of the world weighs the same), a pair
whose statistic is NaN (zero loss coefficient) is left out, and a rank with no valid pair at all (or no statistics:
the monitor failed there) still joins the same single collective with zeros, so no rank waits for another.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from entangle_fast.preference import PreferenceLogprobs, normalize_batch, preference_logprobs

if TYPE_CHECKING:
    from entangle_fast.monitor import EntanglementStats

__all__ = [
    "METRICS",
    "dist_ready",
    "world_size",
    "rank",
    "is_main_process",
    "local_sums",
    "all_reduce_sums",
    "entanglement_metrics",
    "unwrap_model",
    "wrapped_preference_logprobs",
]

# The logged means, in the order of the rows of the reduced [K, 2] tensor (every rank must agree on it).
METRICS = (
    "cosine",                    # mean over pairs with finite statistics
    "inner",
    "chosen_sq_norm",
    "rejected_sq_norm",
    "case_ideal",                # fractions of all pairs: the four cases sum to 1
    "case_both_fall",
    "case_both_rise",
    "case_undefined",
    "zero_coefficient",          # fraction of all pairs whose loss coefficient is zero (statistics undefined)
    "predicted_delta_chosen",    # mean first-order change of s_w from this step's SGD step, per pair alone
    "predicted_delta_rejected",
)


# ----------------------------------------------------------------------------------------------------------------------
# Process group


def dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size(group=None) -> int:
    return torch.distributed.get_world_size(group) if dist_ready() else 1


def rank(group=None) -> int:
    return torch.distributed.get_rank(group) if dist_ready() else 0


def is_main_process() -> bool:
    """Global rank 0, or no process group at all."""
    return rank() == 0


def _reduce_device(group=None) -> torch.device:
    """NCCL reduces CUDA tensors only; every other backend (gloo) gets CPU tensors."""
    if dist_ready() and "nccl" in str(torch.distributed.get_backend(group)).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ----------------------------------------------------------------------------------------------------------------------
# Metric sums


def local_sums(stats: "EntanglementStats | None", *, lr: float, grad_divisor: float = 1.0,
               device: torch.device | None = None) -> Tensor:
    """``[len(METRICS), 2]`` float64: per metric, (sum over this rank's valid pairs, their number).

    Uses only the per-pair fields ``inner``, ``chosen_sq_norm``, ``rejected_sq_norm``, ``cosine``, ``case``,
    ``zero_coefficient`` and ``predicted_delta(lr)`` of :class:`~entangle_fast.monitor.EntanglementStats`.

    Args:
        stats: this rank's statistics, or None (the monitor did not run or failed here): zeros, so the rank can still
            join the reduction.
        lr: the learning rate of the step the statistics belong to.
        grad_divisor: the factor the gradient is divided by before the optimizer sees it beyond the loss itself (the
            data-parallel world size under DDP/FSDP, which average gradients): the predicted change of a pair is that
            of the step actually taken.
        device: where the result lives (the reduction's device).
    """
    device = device or torch.device("cpu")
    out = torch.zeros(len(METRICS), 2, dtype=torch.float64)
    if stats is not None and stats.inner.numel():
        d_chosen, d_rejected = stats.predicted_delta(lr / grad_divisor)
        case = stats.case.detach()
        values = torch.stack([stats.cosine, stats.inner, stats.chosen_sq_norm, stats.rejected_sq_norm, d_chosen,
                              d_rejected]).detach().to(device="cpu", dtype=torch.float64)
        flags = torch.stack([case == 1, case == 2, case == 3, case == 0, stats.zero_coefficient.detach()]).to(
            device="cpu", dtype=torch.float64)
        # One [K, B] float64 block in METRICS order: each metric's sum over its finite entries, and their number.
        v = torch.cat([values[:4], flags, values[4:]])
        finite = torch.isfinite(v)
        out = torch.stack([torch.where(finite, v, 0.0).sum(1), finite.sum(1, dtype=torch.float64)], dim=1)
    return out.to(device)


def all_reduce_sums(sums: Tensor, group=None) -> Tensor:
    """Sum ``[K, 2]`` (sum, count) rows over the ranks of ``group``; the identity without a process group."""
    if not dist_ready():
        return sums
    reduced = sums.to(_reduce_device(group)).clone()
    torch.distributed.all_reduce(reduced, op=torch.distributed.ReduceOp.SUM, group=group)
    return reduced.cpu()


def entanglement_metrics(stats: "EntanglementStats | None", *, lr: float, prefix: str = "entangle/", group=None,
                         grad_divisor: float | None = None) -> dict[str, float]:
    """The logged means of one step, reduced over the ranks of ``group``: ``{prefix + name: mean}`` for :data:`METRICS`.

    A collective when a process group is initialised: every rank of ``group`` must call it at the same step (with
    ``stats=None`` where it has none). A metric with no valid pair anywhere is NaN.

    ``grad_divisor`` defaults to the group's world size (DDP and FSDP2 average gradients over data-parallel ranks);
    pass the data-parallel size when some ranks of the group share a batch (tensor parallelism), or 1 for a
    summed-gradient setup.
    """
    if grad_divisor is None:
        grad_divisor = float(world_size(group))
    sums = all_reduce_sums(local_sums(stats, lr=lr, grad_divisor=grad_divisor), group)
    return {prefix + name: (float(s / c) if c > 0 else math.nan) for name, (s, c) in zip(METRICS, sums.tolist())}


# ----------------------------------------------------------------------------------------------------------------------
# The model call through its wrapper


def unwrap_model(model: nn.Module) -> nn.Module:
    """The Hugging Face causal LM inside DDP / DataParallel / FSDP1 / torch.compile / PEFT wrappers.

    FSDP2 (``fully_shard``) wraps nothing (it changes the module's class in place), so such a model is returned as is.
    """
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        inner = getattr(model, "_orig_mod", None)  # torch.compile
        if isinstance(inner, nn.Module):
            model = inner
            continue
        inner = getattr(model, "module", None)  # DDP, DataParallel, FSDP1, DeepSpeed engines
        if isinstance(inner, nn.Module) and not hasattr(model, "get_output_embeddings"):
            model = inner
            continue
        if hasattr(model, "peft_config") and callable(getattr(model, "get_base_model", None)):
            model = model.get_base_model()
            continue
    return model


def _pack(out: PreferenceLogprobs) -> dict:
    # A dict of tensors: DDP (find_unused_parameters) and FSDP2 walk the output pytree for tensors; a dataclass would
    # be an opaque leaf to them. Views (the chosen/rejected halves) are copied: FSDP2 hooks its pre-backward onto the
    # outputs, and warns that an in-place op on a view would bypass that hook.
    packed = {}
    for f in dataclasses.fields(out):
        value = getattr(out, f.name)
        packed[f.name] = value.clone() if isinstance(value, Tensor) and value._base is not None else value
    return packed


def wrapped_preference_logprobs(model: nn.Module, batch: dict, *, impl: str = "auto", token_stats: bool = False,
                                full_matrices: bool = False, **options) -> PreferenceLogprobs:
    """:func:`~entangle_fast.preference_logprobs` called *through* whatever wraps the model.

    DDP prepares its gradient reduction in its own ``forward``; FSDP2 gathers the root module's parameters in the root's
    forward pre-hook and reshards in its post-hook; PEFT routes through its own forward. Calling the backbone and the
    output head directly, as :func:`preference_logprobs` does on a bare model, would skip all of that. So the inner
    causal LM's ``forward`` is swapped, for the duration of one call, for a function that computes the preference
    log-probs, and the outermost wrapper is called; the original ``forward`` (also one that TRL or accelerate
    installed on the instance) is put back whatever happens.

    Autocast that a wrapper applies inside its replaced ``forward`` (accelerate's mixed precision) is not applied here:
    callers that train in mixed precision enter their autocast context around this call.

    Args:
        model: the model as the training loop holds it (wrapped or not).
        batch: ``[2B, T]`` tensors in a layout :func:`~entangle_fast.preference_logprobs` accepts.
        impl, token_stats, full_matrices, options: as for :func:`~entangle_fast.preference_logprobs` (``ches=True``).
    """
    inner = unwrap_model(model)
    input_ids = normalize_batch(batch)[0]
    missing = object()
    saved = inner.__dict__.get("forward", missing)

    own = saved if saved is not missing else functools.partial(type(inner).forward, inner)

    def forward(*args, **kwargs):
        return _pack(preference_logprobs(inner, batch, impl=impl, token_stats=token_stats,
                                         full_matrices=full_matrices, parity_forward=own, **options))

    inner.forward = forward
    try:
        packed = model(input_ids=input_ids)
    finally:
        if saved is missing:
            del inner.forward
        else:
            inner.forward = saved
    return PreferenceLogprobs(**packed)

