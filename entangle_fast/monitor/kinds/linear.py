"""Linear maps: ``nn.Linear`` (PEFT's LoRA ``lora_A``/``lora_B`` included), y = x A^T + c, and transformers' GPT-2
``Conv1D``, y = x A + c (docs/math.md section 4).

Per pair, the ghost form sum_{tau,sigma} (a^w_tau . a^l_sigma)(gamma^w_tau . gamma^l_sigma) or the explicit per-row
gradients sum_tau gamma_tau a_tau^T, whichever costs less (:func:`~entangle_fast.monitor.reductions.choose_linear_path`);
the transpose of Conv1D changes neither. A subclass that overrides ``forward`` (Falcon's ``FalconLinear`` computes
``x @ W.T + b`` itself) is covered when its output is the linear map of its input: checked on its first call against
``F.linear``; a subclass that computes another map falls back to the generic per-row path (:mod:`.rowwise`).
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from entangle_fast._backend import resolve_impl, without_autocast
from entangle_fast.bookkeeping import dense_with_plan
from entangle_fast.monitor import reductions as R
from entangle_fast.monitor.kinds.base import CaptureError, Context, Reducer, Use, as_rows, stock_forward

# "auto" picks ghost or explicit per layer by cost; tests force one path to exercise both.
LINEAR_PATH = "auto"


def _same_map(output: Tensor, expected: Tensor) -> bool:
    """Whether a subclass's output is the linear map, to the rounding of its dtype."""
    if output.shape != expected.shape:
        return False
    eps = torch.finfo(output.dtype).eps
    scale = expected.abs().max().item() if expected.numel() else 0.0
    return bool((output - expected).abs().max().item() <= 64 * eps * max(scale, 1.0)) if expected.numel() else True


class LinearReducer(Reducer):
    kind = "linear"
    profile_form = "linear"
    shares = "dense"

    def __init__(self):
        self._verified: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def classify(self, module):
        return True if isinstance(module, nn.Linear) else None

    def _expected(self, module, x: Tensor) -> Tensor:
        return F.linear(x, module.weight, module.bias)

    def capture(self, module, args, kwargs, output, ctx: Context) -> Use:
        x = args[0] if args else kwargs.get("input")
        if not isinstance(x, Tensor) or not isinstance(output, Tensor):
            raise CaptureError("the module must take its input as the first positional tensor and return a tensor")
        if self.kind == "linear" and not stock_forward(module, nn.Linear):
            if not self._check(module, x, output):
                from entangle_fast.monitor.kinds import ROWWISE

                use = ROWWISE.capture(module, args, kwargs, output, ctx)
                use.info["reducer"] = ROWWISE
                return use
        return Use(as_rows(x.detach(), ctx.rows, ctx.width), (output,))

    def _check(self, module, x: Tensor, output: Tensor) -> bool:
        verdict = self._verified.get(module)
        if verdict is None:
            with torch.no_grad():
                verdict = _same_map(output.detach(), self._expected(module, x.detach()))
            self._verified[module] = verdict
        return verdict

    def pack(self, use: Use, gamma: Tensor, cdt) -> R.Tokens:
        return R.pack(gamma, a=use.x, dtype=cdt)

    def terms(self, module, tracked, use, pairs, ctx: Context):
        tok = use.info["tok"]
        weight, bias = "weight" in tracked, "bias" in tracked
        if ctx.mode == "sketch" and weight:
            return R.sketch_linear_terms(tok, pairs, ctx.sketch(tok), weight=weight, bias=bias)
        path = "ghost" if ctx.positions else LINEAR_PATH
        if path == "auto":
            path = R.choose_linear_path(tok, pairs, tok.a.shape[1], tok.gamma.shape[1])
        if path == "ghost":
            return R.ghost_terms(tok, pairs, weight=weight, bias=bias, positions=ctx.positions)
        return R.explicit_linear_terms(tok, pairs, weight=weight, bias=bias)

    def factors(self, module, use, attr, ctx):
        tok = use.info["tok"]
        if attr == "bias":
            return R.Factors(tok, "dense", u=tok.gamma)
        return R.Factors(tok, "dense", u=tok.gamma, v=tok.a)

    def _weight_grad(self, g: Tensor, a: Tensor) -> Tensor:
        return g.T @ a

    def weighted_gradient(self, module, kept, lam):
        tok = kept.tok
        g = tok.gamma * lam.to(tok.gamma.dtype)[R.token_rows(tok)][:, None]
        return {attr: (g.sum(0) if attr == "bias" else self._weight_grad(g, tok.a)) for attr in kept.params}

    def row_dot(self, module, kept, blocks, dtype):
        tok = kept.tok
        gamma = tok.gamma.to(dtype)
        per_token = torch.zeros(gamma.shape[0], dtype=dtype, device=gamma.device)
        for attr, d in blocks.items():
            if d is None:
                continue
            d = d.to(dtype)
            if attr == "bias":
                per_token = per_token + gamma @ d
            else:
                per_token = per_token + (gamma * self._map(tok.a.to(dtype), d)).sum(-1)
        return R.per_row(tok, per_token)

    def _map(self, a: Tensor, d: Tensor) -> Tensor:
        return a @ d.T

    def dims(self, module):
        return module.in_features, module.out_features


class Conv1DReducer(LinearReducer):
    """transformers' GPT-2 ``Conv1D``: weight ``[d_in, d_out]``, y = x A + c."""

    kind = "conv1d"
    profile_form = "conv1d"

    def classify(self, module):
        return True if type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers") \
            else None

    def factors(self, module, use, attr, ctx):
        tok = use.info["tok"]
        if attr == "bias":
            return R.Factors(tok, "dense", u=tok.gamma)
        return R.Factors(tok, "dense", u=tok.a, v=tok.gamma)

    def _weight_grad(self, g, a):
        return a.T @ g

    def _map(self, a, d):
        return a @ d

    def dims(self, module):
        return module.weight.shape[0], module.weight.shape[1]


# ----------------------------------------------------------------------------------------------------------------------
# Book-keeping (docs/math.md section 4.2): the layer's weight gradient formed by the monitor, pair by pair, with the
# statistics from the same partial sums; autograd's own dW for the layer is then never formed.
# ----------------------------------------------------------------------------------------------------------------------


class BookkeptLinear(torch.autograd.Function):
    """y = x W^T + b (Conv1D: y = x A + c, ``transpose``) whose backward hands ``(x, gamma)`` to ``form`` for the weight
    and bias gradients instead of forming dW itself. ``form(x, gamma, dtype)`` returns ``(grad_weight, grad_bias)`` in
    the parameters' own layouts and ``dtype``."""

    @staticmethod
    def forward(ctx, x, weight, bias, form, transpose):
        ctx.save_for_backward(x, weight)
        ctx.form, ctx.transpose = form, transpose
        return F.linear(x, weight.T if transpose else weight, bias)

    @staticmethod
    @without_autocast  # the inputs' dtype, as in the forward
    def backward(ctx, gamma):
        x, weight = ctx.saved_tensors
        w = weight.T if ctx.transpose else weight
        grad_x = gamma @ w if ctx.needs_input_grad[0] else None
        grad_w = grad_b = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            grad_w, grad_b = ctx.form(x, gamma, weight.dtype)
        return grad_x, grad_w, grad_b, None, None


def bookkeep(x: Tensor, gamma: Tensor, plan, *, transpose: bool, bias: bool, rows: int, width: int,
             dtype: torch.dtype) -> tuple[Tensor, Tensor | None, R.Terms]:
    """The weight (and bias) gradient of one linear-like call and its per-pair terms, in one pass
    (:func:`entangle_fast.bookkeeping.dense_with_plan`): ``(grad_weight, grad_bias | None, Terms)``, the gradients in
    the parameters' layouts and ``dtype``, the terms in loss units. ``x`` and ``gamma`` are the call's input and output
    gradient (one dtype, one device, as autograd hands them over); ``plan``: the step's
    :class:`entangle_fast.bookkeeping.PairPlan`.

    Raises:
        CaptureError: the call's input does not split into the forward's ``rows`` rows.
    """
    a, g = as_rows(x, rows, width), as_rows(gamma, rows, width)
    grad_w, grad_b, stats = dense_with_plan(a, g, plan, bias=bias, out_dtype=dtype,
                                            backend=resolve_impl("auto", g.device, g.dtype))
    return (grad_w.T if transpose else grad_w), grad_b, R.Terms.of(stats)
