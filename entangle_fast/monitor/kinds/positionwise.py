"""Position-wise modules: norms (``nn.LayerNorm``, ``nn.RMSNorm``, any class named ``*LayerNorm``/``*RMSNorm``) and
classes given to :func:`register_positionwise`: the output at a position depends only on the input at that position.

The input may have any rank ``[rows, positions, ..., features]`` (per-head q/k norms see ``[rows, positions, heads,
head_dim]``) or be flattened ``[rows * positions, features]``; every vector along the last dimension is one item. Each
item's parameter gradient comes from a vjp of the module on that item alone (batched with ``vmap``), in the module's
own dtypes so the vjp repeats its arithmetic; a row's gradient is the sum over its items (docs/math.md section 4.3).
"""
from __future__ import annotations

import weakref

import torch
from torch import nn

from entangle_fast.monitor import reductions as R
from entangle_fast.monitor.kinds.base import CaptureError, Context, Reducer, Use, as_rows

_POSITIONWISE: set[type] = set()

# Per module: whether per-row parameter copies broadcast through its forward and give the per-row vjp's gradients
# (checked on its first reduction against the vjp, to the dtype's rounding).
_BROADCASTS: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()
_BROADCAST_RTOL = {torch.float64: 1e-10, torch.float32: 1e-4}


def register_positionwise(cls: type) -> type:
    """Declare that modules of class ``cls`` act position by position (the output at a position depends only on the
    input at that position and the module's own parameters), so the monitor covers their parameters exactly by a
    per-position vjp instead of the generic per-row path. The module must take its input as the one positional tensor
    argument, features last. Usable as a class decorator."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_positionwise expects an nn.Module subclass, got {cls!r}")
    _POSITIONWISE.add(cls)
    return cls


class PositionwiseReducer(Reducer):
    kind = "positionwise"

    def classify(self, module):
        name = type(module).__name__
        if isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or name.endswith(("LayerNorm", "RMSNorm")) \
                or isinstance(module, tuple(_POSITIONWISE)):
            return True
        return None

    def capture(self, module, args, kwargs, output, ctx: Context) -> Use:
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or len(args) != 1 or kwargs or not isinstance(output, torch.Tensor):
            raise CaptureError("a position-wise module must be called with its input as the one positional tensor "
                               "argument and return one tensor")
        if output.shape != x.shape[:-1] + output.shape[-1:]:
            raise CaptureError(f"input {tuple(x.shape)} and output {tuple(output.shape)} do not match position by "
                               "position")
        rows = as_rows(x.detach(), ctx.rows, ctx.width)
        # Items per row are flattened in the input's order; the position of item i is i // heads when positions come
        # first ([R, T, heads, d]) and i % T when heads do ([R, heads, T, d], Gemma 3's q/k norms).
        layout = (1, 1)
        if x.shape[0] == ctx.rows and x.ndim == 4:
            layout = (x.shape[2], 1) if x.shape[1] == ctx.width or x.shape[2] != ctx.width else (1, x.shape[2])
        elif x.shape[0] == ctx.rows and x.ndim > 4:
            raise CaptureError(f"a position-wise input of shape {tuple(x.shape)} has more than one axis between the "
                               "rows and the features besides the positions")
        return Use(rows, (output,), info={"layout": layout})

    def pack(self, use: Use, gamma, cdt) -> R.Tokens:
        tok = R.pack(gamma, a=use.x)  # the module's own dtypes: the vjp repeats its arithmetic
        per, modulo = use.info["layout"]
        if per > 1:  # [R, T, heads, d]: several items at each position
            tok.positions = tok.positions // per
        elif modulo > 1:  # [R, heads, T, d]
            tok.positions = tok.positions % modulo
        return tok

    def needs_tokens(self, positions: bool, keep: bool) -> bool:
        """Whether :meth:`terms` reads the packed tokens: only for per-position terms or kept factors."""
        return positions or keep

    def terms(self, module, tracked, use, pairs, ctx):
        if not ctx.positions and not use.info.get("keep_rows"):
            # The statistics need each row's gradient only.
            with ctx.replay():
                grads = self._row_grads(module, tracked, use.x, self.gamma_rows(use, ctx))
            return R.row_grad_terms(grads.to(ctx.cdt), pairs)
        tok = use.info["tok"]
        with ctx.replay():
            grads = R.positionwise_token_grads(module, tracked, tok.a, tok.gamma)
        use.info["token_grads"] = grads
        return R.token_grad_terms(tok, grads.to(ctx.cdt), pairs, positions=ctx.positions)

    @staticmethod
    def takes_row_params(module) -> bool:
        """Whether the module has been seen to take per-row parameter copies and give the per-row vjp's gradients
        (so the step's own forward can run on per-row views of its parameters: :func:`row_param_forward`)."""
        return bool(_BROADCASTS.get(module))

    @staticmethod
    def _row_grads(module, tracked, x, gamma):
        """Each row's gradient ``[R, n_params]``: by per-row copies of the parameters that broadcast over the row's
        items (one autograd call, :func:`~entangle_fast.monitor.reductions.broadcast_row_grads`) where the module has
        been seen to take them and give the vjp's answer, else one vjp per row, batched over the rows."""
        verdict = _BROADCASTS.get(module)
        if verdict:
            return R.broadcast_row_grads(module, tracked, x, gamma)
        grads = R.positionwise_row_grads(module, tracked, x, gamma)
        if verdict is None:
            try:
                fast = R.broadcast_row_grads(module, tracked, x, gamma)
                scale = grads.abs().max() if grads.numel() else grads.new_zeros(())
                _BROADCASTS[module] = fast.shape == grads.shape and bool(
                    ((fast - grads).abs().max() <= _BROADCAST_RTOL.get(grads.dtype, 1e-2) * scale).item()
                    if grads.numel() else True)
            except Exception:  # noqa: BLE001 - the module does not take per-row parameters: the vjp stays
                _BROADCASTS[module] = False
        return grads

    def weighted_gradient(self, module, kept, lam):
        tok = kept.tok
        scale = lam.to(tok.gamma.dtype)[R.token_rows(tok)]
        total = (scale[:, None] * kept.token_grads.to(scale.dtype)).sum(0)
        return R.split_flat(total, kept.params)

    def row_dot(self, module, kept, blocks, dtype):
        flat = torch.cat([(blocks.get(a) if blocks.get(a) is not None else torch.zeros_like(p)).reshape(-1)
                          for a, p in kept.params.items()])
        return R.per_row(kept.tok, kept.token_grads.to(dtype) @ flat.to(dtype))



def row_param_forward(module: nn.Module, tracked: tuple[str, ...], x: torch.Tensor, forward=None):
    """The module's own forward (``forward``, default the class's) on ``x [R, ..., d]`` with each parameter in ``tracked`` replaced by a per-row view
    ``p.expand(R, 1, ..., 1, *p.shape)`` of itself: the output and the parameters' gradients are the step's own, and
    the gradient reaching each view is every row's gradient of that parameter (``[R, 1, ..., *p.shape]``), formed by
    the step's own backward. For modules that :meth:`PositionwiseReducer.takes_row_params`. Returns
    ``(output, views)``."""
    saved = {a: module._parameters[a] for a in tracked}
    n, lead = x.shape[0], x.ndim - 1
    views = []
    for a, p in saved.items():
        ones = [1] * (lead - p.ndim)
        views.append(p.view(1, *ones, *p.shape).expand(n, *ones, *p.shape))
    try:
        for a, v in zip(saved, views):
            module._parameters[a] = v
        out = forward(x) if forward is not None else type(module).forward(module, x)
    finally:
        for a, p in saved.items():
            module._parameters[a] = p
    return out, views
