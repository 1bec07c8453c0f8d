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

from entangle_fast._backend import without_autocast
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
    expert, the offsets of its tokens row by row (its tokens are in row order, the sort being stable); ``slot [S]``:
    each sorted slot's place in a ``[E, R, width_max]`` layout (expert, row, position among that row's tokens routed
    to that expert), ``width_max`` the most tokens of one row routed to one expert.
    """

    def __init__(self, top_k_index: Tensor, num_experts: int, rows: int, width: int):
        k = top_k_index.shape[-1]
        expert = top_k_index.reshape(-1)
        self.order = torch.argsort(expert, stable=True)
        self.token = torch.div(self.order, k, rounding_mode="floor")
        key = expert[self.order] * rows + torch.div(self.token, width, rounding_mode="floor")  # nondecreasing
        counts = torch.bincount(key, minlength=num_experts * rows)
        host = counts.reshape(num_experts, rows).cpu()
        self.rows, self.width_max = rows, int(host.max()) if host.numel() else 0
        self.cu = torch.zeros(num_experts, rows + 1, dtype=torch.int64)
        self.cu[:, 1:] = host.cumsum(1)
        ends = host.sum(1).cumsum(0).tolist()
        starts = [0] + ends[:-1]
        self.segments = [(e, s, t) for e, (s, t) in enumerate(zip(starts, ends)) if t > s]
        first = torch.cumsum(counts, 0) - counts
        self.slot = key * self.width_max + torch.arange(key.shape[0], device=key.device) - first[key]


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
    @without_autocast  # the inputs' dtype, as in the forward
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


# Per-row gradients of a whole expert parameter formed at once, in elements (R x the parameter), on the PyTorch path;
# above it, one pass per expert.
ALL_AT_ONCE = 1 << 22


def bookkeep_experts(x: Tensor, gamma: Tensor, routing: Routing, weight_shape, plan, *, transposed: bool,
                     bias: bool, dtype: torch.dtype, backend: str) -> tuple[Tensor, Tensor | None, R.Terms]:
    """Every expert's weight (and bias) gradient of one projection and the parameter's per-pair terms:
    ``(grad_weight [E, ...] in the parameter's layout, grad_bias [E, d_out] | None, Terms)``, gradients in ``dtype``,
    terms in loss units. ``plan``: the step's :class:`~entangle_fast.bookkeeping.PairPlan`.

    On the PyTorch path, for the default pair layout and parameters up to :data:`ALL_AT_ONCE` per-row elements, every
    expert at once: the tokens scattered into ``[E * R, width_max, d]`` blocks, one batched product for every
    (expert, row) gradient, and each pair's terms from the rows' whole-parameter gradients. Otherwise one pass per
    expert over its tokens packed row by row (:func:`entangle_fast.bookkeeping.pair_weight_grad`, ragged rows).
    """
    from entangle_fast.bookkeeping import pair_weight_grad

    n_experts, rows = weight_shape[0], routing.rows
    d_in, d_out = x.shape[1], gamma.shape[1]
    if backend == "torch" and plan.ordered and rows * n_experts * d_in * d_out <= ALL_AT_ONCE:
        return _all_experts(x, gamma, routing, n_experts, transposed=transposed, bias=bias, dtype=dtype)
    pairs = plan.pairs

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


def _all_experts(x: Tensor, gamma: Tensor, routing: Routing, n_experts: int, *, transposed: bool, bias: bool,
                 dtype: torch.dtype) -> tuple[Tensor, Tensor | None, R.Terms]:
    from entangle_fast._torch.pair_wgrad import pair_block_index, pair_blocks

    cdt = R.compute_dtype(x.dtype)
    rows, width, blocks = routing.rows, routing.width_max, n_experts * routing.rows
    d_in, d_out = x.shape[1], gamma.shape[1]
    a = torch.zeros(blocks * width, d_in, dtype=cdt, device=x.device).index_copy_(0, routing.slot, x.to(cdt))
    g = torch.zeros(blocks * width, d_out, dtype=cdt, device=x.device).index_copy_(0, routing.slot, gamma.to(cdt))
    g = g.view(n_experts, rows, width, d_out)
    per_row = torch.bmm(g.view(blocks, width, d_out).transpose(1, 2), a.view(blocks, width, d_in))
    per_row = per_row.view(n_experts, rows, d_out, d_in)
    grad_w = per_row.sum(1)  # every row once: the default layout
    b = rows // 2
    # Row r's gradient of the whole parameter: its [d_out, d_in] block of every expert.
    gram = pair_blocks(per_row.transpose(0, 1).reshape(rows, -1), b)
    grad_b = None
    if bias:
        sums = g.sum(2)  # [E, R, d_out]
        pair_blocks(sums.transpose(0, 1).reshape(rows, -1), b, gram)
        grad_b = sums.sum(1).to(dtype)
    stats = torch.take(gram, pair_block_index(b, gram.device)).view(3, -1)
    grad_w = grad_w.transpose(1, 2) if transposed else grad_w
    return grad_w.to(dtype), grad_b, R.Terms.of(stats)
