"""Exact per-pair gradient entanglement of a training step from its one backward (docs/math.md sections 2 and 4).

- :class:`EntanglementMonitor` (``monitor.py``): hooks, capture, orchestration.
- :class:`EntanglementStats` (``stats.py``): the result and the first-order dynamics.
- ``coverage.py``: which parameters are tracked and how each module kind is covered; :func:`register_positionwise`.
- ``reductions.py``: the per-module math (ghost, explicit, sparse embedding, per-position vjp, fused head, cross terms).
- ``factors.py``: with ``keep_factors=True``, the kept per-module factors and what they re-form without a second
  backward: any per-row weighting of the weight gradient, and each row's directional derivative (docs/math.md
  section 6; used by :mod:`entangle_fast.mitigations`).
"""
from entangle_fast.monitor.coverage import UncoveredParametersError, register_positionwise
from entangle_fast.monitor.monitor import EntanglementMonitor
from entangle_fast.monitor.stats import EntanglementStats

__all__ = ["EntanglementMonitor", "EntanglementStats", "UncoveredParametersError", "register_positionwise"]
