"""Mixture-of-Experts expert weights: transformers' ``*Experts`` modules (the classes decorated with
``use_experts_implementation``: Qwen2/3-MoE, Mixtral, OLMoE, GPT-OSS, DeepSeek, ...), whose weights are 3-D parameters
``[E, d_out, d_in]`` (``[E, d_in, d_out]`` when ``is_transposed``) applied to the tokens routed to each expert.

The module's forward takes the flattened hidden states ``[N, d]`` (N = rows x positions), the routing indices
``top_k_index [N, k]`` and weights ``top_k_weights [N, k]``. Expert e's weight gradient at row r is a linear layer's,
G_{r,e} = sum over row r's tokens routed to e of gamma a^T, and the parameter's per-pair terms are the sums over
experts of each expert's (docs/math.md section 4.3, a 3-D parameter as E stacked linear maps).

Two paths, both exact:

- **book-kept** (the monitor's default, :class:`BookkeptExperts`): the monitor runs the experts' eager algorithm
  itself (tokens sorted by expert, one linear map per expert and projection, the module's own ``_apply_gate``), and
  each projection's backward forms every expert's weight (and bias) gradient together with its per-pair terms from
  the expert's tokens packed row by row (:func:`entangle_fast.bookkeeping.pair_weight_grad`, ragged rows). Checked
  on the module's first monitored call against the module's own forward; a module that computes something else (a
  post-expert norm, expert parallelism, an override) takes the generic path.
- **per-row replay** (:class:`ExpertsReducer`, inherited from the generic path): with ``bookkeeping=False``, kept
  factors, or when the check fails.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from entangle_fast.monitor import reductions as R
from entangle_fast.monitor.kinds.rowwise import RowwiseReducer

_FLAGS = ("has_gate", "has_bias", "is_transposed", "num_experts")


def is_experts(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers experts module (3-D expert weights, the standard attributes)."""
    down = module._parameters.get("down_proj")
    return (isinstance(down, nn.Parameter) and down.ndim == 3 and all(hasattr(module, a) for a in _FLAGS)
            and callable(getattr(type(module), "_apply_gate", None)))


def projections(module: nn.Module) -> tuple[tuple[str, str | None], tuple[str, str | None]]:
    """``((up weight, up bias), (down weight, down bias))`` attribute names; biases None without ``has_bias``."""
    up = "gate_up_proj" if module.has_gate else "up_proj"
    if module.has_bias:
        return (up, f"{up}_bias"), ("down_proj", "down_proj_bias")
    return (up, None), ("down_proj", None)


_VERIFIED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def refused(module: nn.Module) -> bool:
    """Whether ``module``'s own forward was found to differ from :func:`experts_forward` (:func:`verify`)."""
    return _VERIFIED.get(module) is False


def bookkeepable(module: nn.Module) -> bool:
    """Whether the monitor may run ``module``'s forward itself: its stock forward over the standard attributes, no
    post-expert norm, no expert parallelism, and not found to differ from its own forward on an earlier call."""
    if not is_experts(module) or "forward" in vars(module) or refused(module):
        return False
    if getattr(module, "has_post_expert_norm", False) or getattr(module, "_is_expert_parallel", False):
        return False
    names = [n for pair in projections(module) for n in pair if n is not None]
    return all(isinstance(module._parameters.get(n), nn.Parameter) for n in names)


class ExpertsReducer(RowwiseReducer):
    """The per-row replay of the generic path, for the modules the book-kept path covers when it applies."""

    kind = "experts"

    def classify(self, module):
        return True if is_experts(module) else None


class Routing:
    """The step's routing, shared by an experts module's two projections.

    ``order [S]``: the slots (token, choice) sorted by expert, S = N k; ``token [S]``: each sorted slot's token;
    ``segments``: ``(expert, start, end)`` of the experts that received tokens; ``cu [E, R + 1]`` (host int64): per
    expert, the offsets of its tokens row by row (its tokens are in row order, the sort being stable).
    """

    def __init__(self, top_k_index: Tensor, num_experts: int, rows: int, width: int):
        k = top_k_index.shape[-1]
        expert = top_k_index.reshape(-1)
        self.order = torch.argsort(expert, stable=True)
        self.token = torch.div(self.order, k, rounding_mode="floor")
        counts = torch.bincount(expert[self.order] * rows + torch.div(self.token, width, rounding_mode="floor"),
                                minlength=num_experts * rows).reshape(num_experts, rows).cpu()
        self.cu = torch.zeros(num_experts, rows + 1, dtype=torch.int64)
        self.cu[:, 1:] = counts.cumsum(1)
        ends = counts.sum(1).cumsum(0).tolist()
        starts = [0] + ends[:-1]
        self.segments = [(e, s, t) for e, (s, t) in enumerate(zip(starts, ends)) if t > s]


def _project(x: Tensor, weight: Tensor, bias: Tensor | None, segments, transposed: bool) -> Tensor:
    pieces = []
    for e, s, t in segments:
        w = weight[e]
        b = bias[e] if bias is not None else None
        pieces.append(F.linear(x[s:t], w.T if transposed else w, b))
    return torch.cat(pieces) if pieces else x.new_zeros(0, weight.shape[2 if transposed else 1])


class BookkeptExperts(torch.autograd.Function):
    """One projection of every expert over the expert-sorted tokens ``x [S, d_in]`` -> ``[S, d_out]``, whose backward
    hands ``(x, gamma, routing)`` to ``form`` for the expert weights' (and biases') gradients instead of forming them
    itself. ``form(x, gamma, routing, dtype)`` returns ``(grad_weight, grad_bias)`` in the parameters' layouts."""

    @staticmethod
    def forward(ctx, x, weight, bias, routing, form, transposed):
        ctx.save_for_backward(x, weight)
        ctx.routing, ctx.form, ctx.transposed = routing, form, transposed
        return _project(x, weight, bias, routing.segments, transposed)

    @staticmethod
    def backward(ctx, gamma):
        x, weight = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.zeros_like(x)
            for e, s, t in ctx.routing.segments:
                grad_x[s:t] = gamma[s:t] @ (weight[e].T if ctx.transposed else weight[e])
        grad_w = grad_b = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            grad_w, grad_b = ctx.form(x, gamma, ctx.routing, weight.dtype)
        return grad_x, grad_w, grad_b, None, None, None


def experts_forward(module: nn.Module, hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor, forms,
                    rows: int, width: int) -> Tensor:
    """The experts' eager algorithm with book-kept projections: ``hidden [N, d]`` -> ``[N, d]``. ``forms``: the up
    and down projections' gradient formers (see :class:`BookkeptExperts`)."""
    routing = Routing(top_k_index, module.num_experts, rows, width)
    weights = top_k_weights.reshape(-1)[routing.order]
    x = hidden[routing.token]
    device = hidden.device.type
    cast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    for (w_name, b_name), form in zip(projections(module), forms):
        weight = getattr(module, w_name)
        bias = getattr(module, b_name) if b_name is not None else None
        if cast is not None:  # what autocast does for a linear map: inputs cast, the product in that dtype
            x, weight = x.to(cast), weight.to(cast)
            bias = bias.to(cast) if bias is not None else None
            with torch.autocast(device, enabled=False):
                y = BookkeptExperts.apply(x, weight, bias, routing, form, module.is_transposed)
        else:
            y = BookkeptExperts.apply(x, weight, bias, routing, form, module.is_transposed)
        if w_name == "down_proj":
            x = y
        else:
            x = module._apply_gate(y) if module.has_gate else module.act_fn(y)
    out = torch.zeros_like(hidden)
    return out.index_add_(0, routing.token, (x * weights[:, None]).to(hidden.dtype))


def verify(module: nn.Module, output: Tensor, hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> bool:
    """On a module's first book-kept call: whether its own forward gives ``output`` (to its dtype's rounding).
    Remembered per module; a module that fails is not book-kept again."""
    verdict = _VERIFIED.get(module)
    if verdict is None:
        with torch.no_grad():
            own = type(module).forward(module, hidden, top_k_index, top_k_weights)
        verdict = isinstance(own, Tensor) and own.shape == output.shape
        if verdict and own.numel():
            eps = torch.finfo(own.dtype).eps
            scale = max(own.abs().max().item(), 1.0)
            verdict = bool((own - output.detach()).abs().max().item() <= 64 * eps * scale)
        _VERIFIED[module] = verdict
    return verdict


def bookkeep_experts(x: Tensor, gamma: Tensor, routing: Routing, weight_shape, pairs: Tensor, *, transposed: bool,
                     bias: bool, dtype: torch.dtype) -> tuple[Tensor, Tensor | None, R.Terms]:
    """Every expert's weight (and bias) gradient of one projection and the parameter's per-pair terms, one pass per
    expert over its tokens packed row by row: ``(grad_weight [E, ...] in the parameter's layout, grad_bias [E, d_out]
    | None, Terms)``, gradients in ``dtype``, terms in loss units."""
    from entangle_fast.bookkeeping import pair_weight_grad

    grad_w = torch.zeros(weight_shape, dtype=dtype, device=gamma.device)
    grad_b = torch.zeros(weight_shape[0], gamma.shape[1], dtype=dtype, device=gamma.device) if bias else None
    stats = None
    cu = routing.cu.to(gamma.device)
    pairs = pairs.to(gamma.device)
    for e, s, t in routing.segments:
        got = pair_weight_grad(x[s:t], gamma[s:t], cu[e], pairs, bias=bias, out_dtype=dtype)
        grad_w[e] = got.grad_weight.T if transposed else got.grad_weight
        if bias:
            grad_b[e] = got.grad_bias
        part = torch.stack([got.inner, got.chosen, got.rejected])
        stats = part if stats is None else stats.add_(part)
    if stats is None:
        cdt = R.compute_dtype(x.dtype)
        stats = torch.zeros(3, pairs.shape[0], dtype=cdt, device=gamma.device)
    return grad_w, grad_b, R.Terms.of(stats)
