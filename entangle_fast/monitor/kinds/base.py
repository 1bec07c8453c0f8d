"""The reducer protocol: what the monitor, the mitigations and the profiler ask of one module kind.

A reducer knows, for the modules of its kind,

- whether it covers a module exactly (:meth:`Reducer.classify`);
- what to keep from a forward call (:meth:`Reducer.capture`: the input, normalised to rows) and which output tensors'
  gradients to wait for;
- the per-pair terms of one backward (:meth:`Reducer.terms`, loss units, docs/math.md section 4);
- the factors of its use of a parameter shared with another module (:meth:`Reducer.factors`, tied embeddings);
- what the mitigations re-form from the kept factors without a second backward (:meth:`Reducer.weighted_gradient`,
  :meth:`Reducer.token_dot`, docs/math.md section 6);
- how the profiler takes its per-token gradients (:attr:`Reducer.profile_form`).

Rows. The monitor's forward is ``[R, T]`` (R = 2B rows, T positions). Modules see their inputs as ``[R, T, ...]``,
as ``[R, T, heads, features]`` (per-head norms) or flattened ``[R * T, features]`` (OPT's MLP, MoE blocks);
:func:`as_rows` brings each to ``[R, P, features]`` so that row r's tokens are ``[r]``. A tensor whose leading size is
neither R nor R * T cannot be assigned to rows, and the monitor says so.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn


class CaptureError(ValueError):
    """A forward call the monitor cannot reduce exactly (reported by ``stats``, naming the module)."""


@dataclass
class Use:
    """One captured module call.

    ``x``: the input as ``[R, P, d_in]`` (ids ``[R, P]`` for an embedding); ``gamma``: the gradient at the output(s),
    filled by the backward (``[R, P, d_out]``, or a tuple for several outputs); ``info``: what else the kind keeps (the
    call's arguments for a replayed module, a scale for a scaled embedding).
    """

    x: Tensor | None
    outputs: tuple[Tensor, ...] = ()
    gamma: Any = None
    info: dict = field(default_factory=dict)


@dataclass
class Context:
    """What a reduction needs from the monitor: ``rows`` R and ``width`` T of the step's forward, the statistics'
    compute dtype, the options of the monitor, and ``replay`` (a context manager under which the monitor ignores the
    forward calls a reducer makes itself)."""

    rows: int
    width: int
    cdt: torch.dtype
    mode: str = "exact"
    positions: bool = False
    replay: Any = None
    sketch: Any = None  # callable(Tokens) -> KroneckerSketch of this module


def as_rows(t: Tensor, rows: int, width: int, *, ids: bool = False) -> Tensor:
    """``t`` as ``[rows, P, features]`` (``[rows, P]`` for ids), from ``[rows, ...]`` or a flattened
    ``[rows * width, ...]``; every dimension between the first and the features folds into P.

    Raises:
        CaptureError: the leading size is neither ``rows`` nor ``rows * width``.
    """
    if t.ndim >= 1 and t.shape[0] == rows and rows > 0 and (ids or t.ndim >= 2):
        out = t
    elif t.ndim >= 1 and width and rows > 0 and t.shape[0] == rows * width:
        out = t.reshape(rows, width, *t.shape[1:])
    else:
        raise CaptureError(f"an input of shape {tuple(t.shape)} cannot be split into the forward's {rows} rows "
                           f"of {width} positions")
    if ids:
        return out.reshape(rows, -1)
    return out if out.ndim == 3 else out.reshape(rows, -1, out.shape[-1])


def row_slice(t: Tensor, r: int, rows: int, width: int) -> Tensor:
    """Row ``r`` of a tensor laid out ``[rows, ...]`` or flattened ``[rows * width, ...]``; other tensors whole."""
    if not isinstance(t, Tensor) or t.ndim == 0:
        return t
    if t.shape[0] == rows:
        return t[r : r + 1]
    if width and t.shape[0] == rows * width:
        return t[r * width : (r + 1) * width]
    return t


def stock_forward(module: nn.Module, base: type) -> bool:
    return type(module).forward is base.forward and "forward" not in vars(module)


class Reducer:
    """One module kind. Subclasses override what differs; see the module docstring for the protocol."""

    kind = "base"
    # How the profiler takes the per-token gradients of this kind: "linear", "conv1d", "embedding" (factor forms
    # through an output perturbation) or "vector" (the module's parameters as inputs of the batched backward).
    profile_form = "vector"
    # The factor role of this kind's use of a shared parameter ("dense" u-v factors, "ids" one-hot rows), or None
    # when this kind cannot share a parameter with another module.
    shares = None

    def classify(self, module: nn.Module):
        """``None`` (not this kind), ``True`` (covered exactly) or a string (this kind, refused: the reason)."""
        return None

    def capture(self, module: nn.Module, args: tuple, kwargs: dict, output, ctx: Context) -> Use:
        """What to keep from one forward call; ``Use.outputs`` are the tensors whose gradients complete it."""
        x = args[0] if args else None
        if not isinstance(x, Tensor) or not isinstance(output, Tensor):
            raise CaptureError("the module must take its input as the first positional tensor and return a tensor")
        return Use(as_rows(x.detach(), ctx.rows, ctx.width), (output,))

    def gamma_rows(self, use: Use, ctx: Context) -> Tensor:
        """The output gradient as ``[R, P, d_out]``."""
        return as_rows(use.gamma, ctx.rows, ctx.width)

    def terms(self, module: nn.Module, tracked: tuple[str, ...], use: Use, pairs: Tensor, ctx: Context):
        raise NotImplementedError

    def factors(self, module: nn.Module, use: Use, attr: str, ctx: Context):
        raise NotImplementedError(f"a {self.kind} module cannot share a parameter with another module")

    # -- mitigations: re-formed gradients from the kept factors (loss units) -------------------------------------------

    def weighted_gradient(self, module: nn.Module, kept, lam: Tensor) -> dict[str, Tensor]:
        """``attr -> sum_r lam[r] * (row r's gradient of that parameter)`` from the kept factors."""
        raise NotImplementedError

    def row_dot(self, module: nn.Module, kept, blocks: dict[str, Tensor], dtype: torch.dtype) -> Tensor:
        """``[R]`` the dot product of each row's gradient with the direction ``blocks`` (attr -> tensor)."""
        raise NotImplementedError

    def dims(self, module: nn.Module) -> tuple[int, int]:
        """``(d_in, d_out)`` of the factor forms (profiler, sketches)."""
        raise NotImplementedError
