"""The registry of module kinds: one reducer object per kind, asked in order; the first that claims a module covers it.

| kind | modules | per-pair terms | cost per pair |
|---|---|---|---|
| ``linear`` | ``nn.Linear`` (LoRA's A and B; subclasses computing the same map, e.g. ``FalconLinear``) | ghost or explicit | min(ghost, explicit) |
| ``conv1d`` | transformers' ``Conv1D`` (GPT-2) | as linear | as linear |
| ``embedding`` | ``nn.Embedding`` and subclasses (scaled, offset positions): the ``F.embedding`` call inside | sparse per-row | O(T d) |
| ``positionwise`` | norms, per-head q/k norms, ``register_positionwise`` classes | per-item vjp | the module's backward |
| ``experts`` | transformers' MoE ``*Experts`` (3-D expert weights) | book-kept per expert, else per-row replay | one pass per expert over its tokens |
| ``rowwise`` | anything else that acts row by row: MoE routers, unknown layers | per-row replay + vjp | the module's forward + backward |

The output head, when the fused log-prob op computes it, takes the op's own statistics instead of its kind's
(:mod:`entangle_fast.token_stats`). :func:`register` adds a kind ahead of the generic ``rowwise`` path.
"""
from __future__ import annotations

from torch import nn

from entangle_fast.monitor.kinds.base import CaptureError, Context, Reducer, Use
from entangle_fast.monitor.kinds.embedding import EmbeddingReducer
from entangle_fast.monitor.kinds.experts import ExpertsReducer
from entangle_fast.monitor.kinds.linear import Conv1DReducer, LinearReducer
from entangle_fast.monitor.kinds.positionwise import PositionwiseReducer, register_positionwise
from entangle_fast.monitor.kinds.rowwise import ROW_MIXING, RowwiseReducer

ROWWISE = RowwiseReducer()
REGISTRY: list[Reducer] = [LinearReducer(), Conv1DReducer(), EmbeddingReducer(), PositionwiseReducer(), ExpertsReducer(),
                           ROWWISE]


def register(reducer: Reducer) -> Reducer:
    """Add a kind, asked before every built-in kind (so it can take over a class the built-ins would claim)."""
    if not isinstance(reducer, Reducer):
        raise TypeError(f"register expects a Reducer instance, got {type(reducer).__name__}")
    REGISTRY.insert(0, reducer)
    return reducer


def reducer_for(module: nn.Module) -> tuple[Reducer | None, str]:
    """``(reducer, "")`` for a module owning tracked parameters, or ``(None, why not)``."""
    for reducer in REGISTRY:
        verdict = reducer.classify(module)
        if verdict is True:
            return reducer, ""
        if isinstance(verdict, str):
            return None, verdict
    return None, f"{type(module).__name__} is not a module kind the monitor reduces exactly"


__all__ = ["CaptureError", "Context", "REGISTRY", "ROWWISE", "ROW_MIXING", "Reducer", "Use", "register",
           "register_positionwise", "reducer_for"]
