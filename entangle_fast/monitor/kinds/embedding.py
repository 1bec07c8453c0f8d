"""Embeddings: E[ids], <grad_E s_w, grad_E s_l> = sum_{tau,sigma} [x_tau == x'_sigma] gamma_tau . gamma'_sigma
(docs/math.md section 4), formed as sparse per-row gradients (the summed gamma of each distinct id).

What is reduced is the ``F.embedding(ids, weight)`` call inside the module's forward, found by what the forward does
rather than by its class: a subclass that scales the result (Gemma's ``*ScaledWordEmbedding``), offsets its positions
(OPT's learned positional embedding) or takes other arguments is covered, because the monitor records the lookup's own
ids and the gradient at the lookup's own output while the module's forward runs (a ``TorchFunctionMode`` scoped to
that forward). ``padding_idx`` is honoured; ``max_norm`` and ``scale_grad_by_freq`` are refused: they make the
gradient depend on the whole batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from entangle_fast.monitor import reductions as R
from entangle_fast.monitor.kinds.base import CaptureError, Context, Reducer, Use, as_rows, stock_forward


class _LookupRecorder(TorchFunctionMode):
    """Records the ``F.embedding`` calls on one weight while a module's forward runs; ids of shape ``[1, T]`` are
    expanded to the forward's rows first (the same values; the [1, T, d] result would be broadcast later, where the
    per-row gradients are summed away)."""

    def __init__(self, weight, rows: int):
        super().__init__()
        self.weight, self.rows, self.calls = weight, rows, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.embedding:
            ids = args[0] if args else kwargs["input"]
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            if weight is self.weight:
                if ids.ndim >= 2 and ids.shape[0] == 1 and self.rows > 1:
                    ids = ids.expand(self.rows, *ids.shape[1:])
                    args = (ids, *args[1:]) if args else args
                    kwargs = kwargs if args else {**kwargs, "input": ids}
                out = func(*args, **kwargs)
                names = ("padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse")
                options = dict(zip(names, args[2:]))
                options.update({k: v for k, v in kwargs.items() if k in names})
                self.calls.append((ids, out, options))
                return out
        return func(*args, **kwargs)


def lookup_scale(recorder: _LookupRecorder, output) -> tuple[torch.Tensor, float]:
    """``(ids, c)`` of a subclass's one lookup, where the module's output is ``c`` times the lookup's (Gemma's scaled
    embeddings: c = sqrt(d); OPT's positions: 1). The profiler perturbs the module's output, so its gradient there
    times ``c`` is the gradient at the lookup."""
    recorder.__exit__(None, None, None)
    if len(recorder.calls) != 1:
        raise CaptureError(f"the forward looked its weight up {len(recorder.calls)} times with F.embedding")
    ids, out, _ = recorder.calls[0]
    if not isinstance(output, torch.Tensor) or output.shape != out.shape:
        raise CaptureError("the module's output is not its lookup's shape")
    c = float((output * out).sum() / (out * out).sum().clamp_min(torch.finfo(out.dtype).tiny))
    if not torch.allclose(output, out * c, rtol=1e-5, atol=0):
        raise CaptureError("the module's output is not a constant multiple of its lookup")
    return ids, c


class EmbeddingReducer(Reducer):
    kind = "embedding"
    profile_form = "embedding"
    shares = "ids"
    needs_before = True

    def classify(self, module):
        if not isinstance(module, nn.Embedding):
            return None
        if module.max_norm is not None:
            return "nn.Embedding with max_norm renormalises its weight in the forward"
        if module.scale_grad_by_freq:
            return "nn.Embedding with scale_grad_by_freq scales gradients by batch-wide counts"
        return True

    def before(self, module, args, kwargs, ctx: Context):
        if stock_forward(module, nn.Embedding):
            return None
        mode = _LookupRecorder(module.weight, ctx.rows)
        mode.__enter__()
        return mode

    def capture(self, module, args, kwargs, output, ctx: Context, state=None) -> Use:
        if state is not None:
            state.__exit__(None, None, None)
            if len(state.calls) != 1:
                raise CaptureError(f"{type(module).__name__}'s forward looked its weight up {len(state.calls)} times "
                                   "with F.embedding (the monitor reduces one lookup per call)")
            ids, out, options = state.calls[0]
            if options.get("max_norm") is not None or options.get("scale_grad_by_freq"):
                raise CaptureError("the lookup uses max_norm or scale_grad_by_freq")
            if not out.requires_grad:
                return None
            pad = options.get("padding_idx")
            if pad is not None and pad < 0:
                pad += module.weight.shape[0]
            return Use(as_rows(ids.detach(), ctx.rows, ctx.width, ids=True), (out,), info={"padding_idx": pad})
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or not isinstance(output, torch.Tensor):
            raise CaptureError("the module must take its ids as the first positional tensor")
        replaced = None
        if x.ndim == 2 and x.shape[0] == 1 and ctx.rows > 1:
            # Position ids of shape [1, T] (GPT-2 without position_ids): the [1, T, d] output is broadcast over the
            # rows later, where its per-row gradients are summed away. Expanding it here gives the same values and
            # the same summed gradient, and lets the output hook see every row.
            x = x.expand(ctx.rows, -1)
            output = replaced = output.expand(ctx.rows, *output.shape[1:])
        use = Use(as_rows(x.detach(), ctx.rows, ctx.width, ids=True), (output,),
                  info={"padding_idx": module.padding_idx})
        if replaced is not None:
            use.info["replace"] = replaced
        return use

    def gamma_rows(self, use, ctx):
        g = use.gamma
        return g.reshape(ctx.rows, -1, g.shape[-1])

    def pack(self, use: Use, gamma, cdt) -> R.Tokens:
        pad = use.info.get("padding_idx")
        keep = (use.x != pad) if pad is not None else None  # F.embedding gives padding_idx no gradient
        return R.pack(gamma, ids=use.x.to(torch.int64), keep=keep, dtype=cdt)

    def terms(self, module, tracked, use, pairs, ctx):
        tok = use.info["tok"]
        if ctx.positions:
            return R.ghost_terms(tok, pairs, weight=True, bias=False, positions=True)
        return R.embedding_sparse_terms(tok, pairs)

    def factors(self, module, use, attr, ctx):
        tok = use.info["tok"]
        return R.Factors(tok, "ids", v=tok.gamma)

    def weighted_gradient(self, module, kept, lam):
        tok = kept.tok
        g = tok.gamma * lam.to(tok.gamma.dtype)[R.token_rows(tok)][:, None]
        p = kept.params["weight"]
        return {"weight": torch.zeros(p.shape, dtype=g.dtype, device=g.device).index_add_(0, tok.ids, g)}

    def row_dot(self, module, kept, blocks, dtype):
        tok = kept.tok
        d = blocks.get("weight")
        per_token = (tok.gamma.to(dtype) * d.to(dtype)[tok.ids]).sum(-1)
        return R.per_row(tok, per_token)

    def dims(self, module):
        # weight [V, d]: the d side is the input of the factor form, the V side the output
        return module.embedding_dim, module.num_embeddings


class BookkeptEmbedding(torch.autograd.Function):
    """``F.embedding(ids, weight, padding_idx)`` whose backward hands ``(ids, gamma)`` to ``form`` for the weight
    gradient instead of forming it itself (book-keeping, docs/math.md section 4.2): ``form(ids, gamma, dtype)``
    returns ``grad_weight`` ``[V, d]`` in ``dtype``. For stock ``nn.Embedding`` without ``max_norm``,
    ``scale_grad_by_freq`` or ``sparse``."""

    @staticmethod
    def forward(ctx, ids, weight, padding_idx, form):
        ctx.save_for_backward(ids)
        ctx.form, ctx.dtype = form, weight.dtype
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, gamma):
        (ids,) = ctx.saved_tensors
        grad_w = ctx.form(ids, gamma, ctx.dtype) if ctx.needs_input_grad[1] else None
        return None, grad_w, None, None


def bookkeepable(module: nn.Module) -> bool:
    """Whether an embedding's weight gradient can be formed by :class:`BookkeptEmbedding`: a stock ``nn.Embedding``
    with dense gradients."""
    return (stock_forward(module, nn.Embedding) and module.max_norm is None and not module.scale_grad_by_freq
            and not module.sparse)
