"""The generic exact path: any module that acts row by row (the output of row r depends only on row r's inputs and
the module's own parameters), whatever it computes inside.

Mixture-of-Experts blocks are the main users: experts stored as 3-D parameters and applied to the tokens routed to
them (``Qwen3MoeExperts``, Mixtral's and OLMoE's experts, called on flattened ``[rows * positions, d]`` inputs with the
routing indices and weights), and routers (``*TopKRouter``, several outputs). So is any layer the registry has no
cheaper reducer for.

Per row r, the module's forward is replayed on row r's slice of every argument (``[R, ...]`` or flattened
``[R * T, ...]`` tensors; anything else is passed whole, e.g. rotary tables), with its own parameters as the only
inputs that require gradient, and pulled back with row r's output gradient(s): the per-row gradient G_r of the module's
parameters, exact (docs/math.md section 4.3). The routing weights are inputs of the experts here and carry their own
gradient to the router, which has its own replay. Cost: one forward and one backward of the module over all rows, row
by row, plus two parameter-sized vectors per pair alive at a time; an unknown layer costs time, not correctness.

Modules that mix rows (batch statistics: ``nn.BatchNorm*``, ``SyncBatchNorm``) are refused at construction.

Book-keeping (``EntanglementMonitor(bookkeeping=True)``) also reaches modules of this kind whose parameters are a
``weight`` matrix and maybe a ``bias``, used by one ``F.linear(x, weight, bias)`` inside their forward and nowhere else
(MoE routers: ``*TopKRouter``): :class:`LinearCalls` routes that call through the book-kept linear map while the
module's forward runs, and counts every other use of the parameters. A module found to use them otherwise on its first
monitored call keeps the per-row replay.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from entangle_fast.monitor import reductions as R
from entangle_fast.monitor.kinds.base import CaptureError, Context, Reducer, Use, row_slice

# Row-mixing module classes, refused with the reason.
ROW_MIXING: dict[type, str] = {
    nn.modules.batchnorm._BatchNorm: "batch normalisation mixes the rows of a batch (its statistics are batch-wide)",
}


def _float_outputs(output) -> list:
    """Every floating tensor of a module's output, in order (None where the slot holds something else)."""
    if isinstance(output, Tensor):
        items = [output]
    elif isinstance(output, (tuple, list)):
        items = list(output)
    elif isinstance(output, dict) or hasattr(output, "values"):
        items = list(output.values())
    else:
        items = []
    return [t if isinstance(t, Tensor) and t.is_floating_point() else None for t in items]


class RowwiseReducer(Reducer):
    kind = "rowwise"

    def classify(self, module):
        for cls, why in ROW_MIXING.items():
            if isinstance(module, cls):
                return f"{type(module).__name__}: {why}"
        return True

    def capture(self, module, args, kwargs, output, ctx: Context) -> Use:
        outs = _float_outputs(output)
        slots = [t is not None and t.requires_grad for t in outs]
        if not any(slots):
            return None
        replace = None
        if isinstance(output, (Tensor, tuple, list)):
            # The module's outputs are replaced by views of themselves, and the views are hooked: a hook on an output
            # that another output is computed from inside the module (a router's logits and its routing weights)
            # would also receive the gradient flowing back through that other output, and the replay would count it
            # twice. A view receives only what reaches it from outside.
            views = [t.view_as(t) if slot else t for t, slot in zip(outs, slots)]
            if isinstance(output, Tensor):
                replace = views[0]
            else:
                items = [v if isinstance(o, Tensor) and o.is_floating_point() else o for o, v in zip(output, views)]
                replace = type(output)(items) if isinstance(output, list) or type(output) is tuple \
                    else type(output)(*items)
            outs = views
        hooked = tuple(t for t, slot in zip(outs, slots) if slot)

        def keep(t):
            return t.detach() if isinstance(t, Tensor) else t

        info = {"args": tree_map(keep, tuple(args)), "kwargs": tree_map(keep, dict(kwargs)), "slots": slots}
        if replace is not None:
            info["replace"] = replace
        return Use(None, hooked, info=info)

    def row_grads(self, module, tracked, use: Use, row: int, ctx: Context) -> Tensor:
        """``[n]`` the gradient of the module's tracked parameters carried by row ``row`` (loss units), flattened in
        the order of ``tracked``."""
        params = {a: module._parameters[a].detach().requires_grad_(True) for a in tracked}
        rows, width = ctx.rows, ctx.width

        def cut(t):
            return row_slice(t, row, rows, width)

        gammas = use.gamma if isinstance(use.gamma, tuple) else (use.gamma,)
        with ctx.replay(), torch.enable_grad():
            out = functional_call(module, params, tree_map(cut, use.info["args"]), tree_map(cut, use.info["kwargs"]),
                                  strict=False)
            replayed = _float_outputs(out)
            if len(replayed) != len(use.info["slots"]):
                raise CaptureError(f"{type(module).__name__} returned {len(replayed)} outputs when replayed on one row, "
                                   f"{len(use.info['slots'])} in the step")
            outputs, grads_out = [], []
            hooked = iter(gammas)
            for t, slot in zip(replayed, use.info["slots"]):
                if not slot:
                    continue
                g = next(hooked)
                if g is None or t is None or not t.requires_grad:
                    continue
                g = cut(g)
                if g.shape != t.shape:
                    raise CaptureError(f"{type(module).__name__}'s output on one row has shape {tuple(t.shape)}, its "
                                       f"gradient slice {tuple(g.shape)}: the module does not act row by row")
                outputs.append(t)
                grads_out.append(g.to(t.dtype))
            if not outputs:
                return torch.zeros(sum(p.numel() for p in params.values()), dtype=ctx.cdt,
                                   device=next(iter(params.values())).device)
            grads = torch.autograd.grad(outputs, list(params.values()), grad_outputs=grads_out, allow_unused=True)
        return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).to(ctx.cdt)
                          for g, p in zip(grads, params.values())])

    def terms(self, module, tracked, use, pairs, ctx):
        """Pair terms from per-row replays. Also leaves ``use.info["grad_sum"]``, sum_r G_r over every row, which
        the monitor compares with the gradient autograd gives the parameters: a module that mixes rows fails it."""
        b = pairs.shape[0]
        device = module._parameters[tracked[0]].device
        out = torch.zeros(3, b, dtype=ctx.cdt, device=device)
        keep = use.info.get("keep_rows")
        kept = {} if keep else None
        total = None
        cache: dict[int, Tensor] = {}
        last_use = {r: i for i, pair in enumerate(pairs.tolist()) for r in pair}

        def grad(r):
            nonlocal total
            if r not in cache:
                cache[r] = g = self.row_grads(module, tracked, use, r, ctx)
                total = g.clone() if total is None else total.add_(g)
                if kept is not None:
                    kept[r] = g
            return cache[r]

        for i, (w, l) in enumerate(pairs.tolist()):
            gw, gl = grad(w), grad(l)
            out[0, i], out[1, i], out[2, i] = gw @ gl, gw @ gw, gl @ gl
            for r in (w, l):
                if last_use[r] == i:
                    cache.pop(r, None)
        for r in range(ctx.rows):
            if r not in last_use:
                grad(r)
                cache.pop(r, None)
        use.info["grad_sum"] = total
        if kept is not None:
            use.info["row_grads"] = torch.stack([kept[r] for r in range(ctx.rows)])
        return R.Terms(out[0], out[1], out[2])

    def weighted_gradient(self, module, kept, lam):
        g = kept.row_grads
        return R.split_flat(lam.to(g.dtype)[: g.shape[0]] @ g, kept.params)

    def row_dot(self, module, kept, blocks, dtype):
        flat = torch.cat([(blocks.get(a) if blocks.get(a) is not None else torch.zeros_like(p)).reshape(-1)
                          for a, p in kept.params.items()])
        return kept.row_grads.to(dtype) @ flat.to(dtype)


# ----------------------------------------------------------------------------------------------------------------------
# Book-keeping a linear call inside a module's forward (MoE routers)
# ----------------------------------------------------------------------------------------------------------------------

_LINEAR_CALLS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> its forward was found to qualify


def linear_call_candidate(module: nn.Module) -> bool:
    """Whether ``module`` may be book-kept through :class:`LinearCalls`: its parameters are a 2-D ``weight`` and maybe
    a 1-D ``bias``, and it was not found to use them otherwise on an earlier call."""
    params = {a: p for a, p in module._parameters.items() if p is not None}
    weight, bias = params.get("weight"), params.get("bias")
    return (isinstance(weight, nn.Parameter) and weight.ndim == 2 and set(params) <= {"weight", "bias"}
            and (bias is None or bias.ndim == 1) and _LINEAR_CALLS.get(module) is not False)


def linear_calls_refused(module: nn.Module) -> bool:
    return _LINEAR_CALLS.get(module) is False


class LinearCalls(TorchFunctionMode):
    """While one module's forward runs: its ``F.linear(x, weight, bias)`` calls on its own parameters go through
    ``apply(x, weight, bias)``; ``linear`` counts them and ``other`` counts every other call that takes a parameter
    (or a property of one that carries its gradient, such as ``weight.T``). :meth:`qualifies` is the verdict of the
    call, remembered per module.

    Only a call whose ``x`` is the module's input ``source`` itself or a contiguous view of it in the same memory order
    (``reshape(-1, d)``) is routed, so that its leading dimension is the forward's rows in order; a call on anything
    else counts as another use."""

    def __init__(self, module: nn.Module, apply, source: Tensor):
        super().__init__()
        self.weight, self.bias = module._parameters["weight"], module._parameters.get("bias")
        self.apply, self.source = apply, source
        self.ids = {id(self.weight)} | ({id(self.bias)} if self.bias is not None else set())
        self.linear = self.other = 0

    def _in_order(self, x) -> bool:
        src = self.source
        return isinstance(x, Tensor) and (x is src or (
            x.is_contiguous() and src.is_contiguous() and x.data_ptr() == src.data_ptr() and x.numel() == src.numel()
            and x.shape[-1] == src.shape[-1]))

    def _takes_param(self, values) -> bool:
        for v in values:
            if isinstance(v, (list, tuple)):
                if any(id(u) in self.ids for u in v):
                    return True
            elif id(v) in self.ids:
                return True
        return False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            bound = dict(zip(("input", "weight", "bias"), args))
            bound.update(kwargs)
            x = bound.get("input")
            if bound.get("weight") is self.weight and bound.get("bias") is self.bias and self._in_order(x):
                self.linear += 1
                return self.apply(x, self.weight, self.bias)
        out = func(*args, **kwargs)
        if self._takes_param(args) or self._takes_param(kwargs.values()):
            getter = getattr(func, "__name__", "") == "__get__"
            # A property read (shape, dtype, .data) is no use; one that returns the parameter's gradient path is.
            if not getter or (isinstance(out, Tensor) and out.requires_grad):
                self.other += 1
        return out

    def qualifies(self, module: nn.Module) -> bool:
        verdict = self.linear == 1 and self.other == 0
        if _LINEAR_CALLS.get(module) is None or not verdict:
            _LINEAR_CALLS[module] = verdict
        return verdict
