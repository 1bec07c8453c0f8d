"""EntanglementMonitor: exact per-pair gradient entanglement of a training step, from its one backward.

Forward hooks keep each covered module's input; a tensor hook on its output receives the gradient there (gamma). At
row r that gradient is a_r * d s_r / d(output), because chosen and rejected rows never meet inside the network
(docs/math.md section 4), so per-row gradient inner products of every layer follow from (input, gamma) alone. How is
each module kind's business: the reducer registry of :mod:`entangle_fast.monitor.kinds` (linear maps, embeddings by
their lookup, position-wise modules, the generic per-row path); the output head takes the fused op's own statistics,
and a parameter two modules share adds its cross terms. Covered linear layers are book-kept by default: they run
through :class:`~entangle_fast.monitor.kinds.linear.BookkeptLinear`, whose backward forms their weight gradients
pair by pair with the statistics from the same partial sums (docs/math.md section 4.2). Single-module reductions run
inside the backward, as each gamma arrives, and release the module's tensors; units that share a parameter (tied
embeddings) are reduced once the backward is over.
"""
from __future__ import annotations

import contextlib
import warnings
from collections import Counter
from functools import partial

import torch
from torch import Tensor, nn

from entangle_fast._backend import resolve_impl
from entangle_fast.data import default_pairs
from entangle_fast.monitor import factors as F
from entangle_fast.monitor import reductions as R
from entangle_fast.monitor.coverage import UncoveredParametersError, build_coverage
from entangle_fast.monitor.kinds import CaptureError, Context, Use
from entangle_fast.monitor.kinds.base import as_rows, stock_forward
from entangle_fast.monitor.kinds import experts as X
from entangle_fast.monitor.kinds.embedding import BookkeptEmbedding, bookkeepable
from entangle_fast.monitor.kinds.linear import BookkeptLinear, bookkeep
from entangle_fast.monitor.kinds.positionwise import PositionwiseReducer, row_param_forward
from entangle_fast.monitor.kinds.rowwise import LinearCalls, linear_call_candidate, linear_calls_refused
from entangle_fast.monitor.preflight import check_model, dropout_modules, warn_if_dropout
from entangle_fast.monitor.stats import EntanglementStats, classify
from entangle_fast.sketch import SketchCache
from entangle_fast.token_stats import BackwardRecord, register_stats_listener

def _in_backward() -> bool:
    """True while an autograd backward runs (activation checkpointing re-runs forwards then)."""
    return torch._C._current_graph_task_id() != -1


_FLAGS: dict = {}


def _nan(dtype, device) -> Tensor:
    """A NaN scalar tensor of ``dtype`` on ``device``, made once."""
    key = ("nan", dtype, device)
    out = _FLAGS.get(key)
    if out is None:
        out = _FLAGS[key] = torch.tensor(float("nan"), dtype=dtype, device=device)
    return out


def _flags(values: tuple, device) -> Tensor:
    """``torch.tensor(values)`` on ``device``, made once per distinct tuple (the same at every step)."""
    key = (values, device)
    out = _FLAGS.get(key)
    if out is None:
        if len(_FLAGS) >= 64:
            _FLAGS.pop(next(iter(_FLAGS)))
        out = _FLAGS[key] = torch.tensor(values, device=device)
    return out


class _ForwardSwap:
    """Replace a module's forward by an instance attribute for the duration; ``remove()`` restores it. ``forward``
    is called with the call's arguments. The attribute is set in the instance's ``__dict__``, as ``nn.Module`` sets
    a plain attribute, without its ``__setattr__`` (swaps are made at every monitored step)."""

    __slots__ = ("attrs", "old")

    def __init__(self, module: nn.Module, forward):
        self.attrs = vars(module)
        self.old = self.attrs.get("forward")
        self.attrs["forward"] = forward

    def remove(self) -> None:
        if self.old is not None:
            self.attrs["forward"] = self.old
        else:
            self.attrs.pop("forward", None)


class EntanglementMonitor:
    """Measure, from one ordinary backward, the gradient entanglement of every preference pair in a batch.

    Usage::

        with EntanglementMonitor(model) as mon:
            out = entangle_fast.preference_logprobs(model, batch)     # or: logits -> log-probs, then mon.watch(...)
            loss = dpo_loss(out.chosen_logps, out.rejected_logps, ...).mean()
            loss.backward()
        stats = mon.stats                                             # EntanglementStats

    The rows of the model's forward are TRL's concatenated layout: rows 0..B-1 chosen, rows B..2B-1 rejected, one
    forward of ``[2B, T]`` per step (each covered module called once). The loss must reach the model only through the
    per-sequence log-probs (any function of them: DPO, IPO, hinge, ...).

    Each covered module's input is kept from its forward until its output gradient arrives (the size of the
    activations autograd keeps anyway); activation checkpointing, reentrant or not, is supported. Linear layers are
    book-kept (``bookkeeping``); otherwise they take the ghost form or the explicit per-row gradient, whichever costs
    less for the batch's kept token counts (:func:`entangle_fast.monitor.reductions.choose_linear_path`); position
    attribution needs the ghost form. Coverage and costs of every kind: docs/monitor.md.

    Args:
        model: the policy (a Hugging Face causal LM, PEFT-wrapped or not, or any module of covered kinds).
        params: ``None`` (every parameter with requires_grad), ``"lm_head"`` (the output embedding's parameters; with
            tied embeddings that is the shared matrix, input use included) or an iterable of parameters.
        mode: ``"exact"``, or ``"sketch"``: linear weights estimated by seeded Kronecker sketches of size
            ``sketch_dim`` (docs/math.md section 5); every other parameter kind stays exact.
        seed: sketch seed (per layer: ``layer_seed(seed, module name)``).
        exclude: parameters, modules or their names to leave out of the statistics (the explicit opt-out for
            parameters the monitor cannot cover exactly).
        position_attribution: also return ``stats.position_attribution`` ``[B, T, T]`` (exact mode only).
        bookkeeping: linear layers, Conv1D, embeddings, MoE expert weights and routers (a module's one ``F.linear``
            call on its own weight) form their own weight gradients in the monitor, pair by pair, with the statistics
            from the same partial sums (docs/math.md section 4.2), and autograd does not form them a second time:
            monitoring then costs about what those weight gradients cost (norms, checked once to take per-row
            parameters, get their per-row gradients from the step's backward through per-row views of their
            parameters; docs/monitor.md, "Book-keeping"). ``.grad`` then equals the unmonitored step's up to
            summation order (rounding: float64 agrees to ~1e-15 relative; fp32/bf16 are no further from the float64
            gradient than the unmonitored step). ``False`` leaves every gradient to autograd, bit-identical to the
            unmonitored step, at the price of a second pass over each layer. Applies in exact mode without position
            attribution or kept factors, to modules whose parameters are not shared and whose forward is the stock
            one or is checked once to compute the same (experts, linear calls).
        keep_factors: keep every module's packed factors after the step (about the size of the activations) so that
            :meth:`weighted_gradients` and :meth:`gradient_dot` can re-form gradients without a second backward
            (docs/math.md section 6). They are released when the monitor is entered again.

    Raises:
        UncoveredParametersError: at construction, listing tracked parameters of module kinds the monitor cannot
            reduce exactly. Problems found during the step (a module called twice, rows broadcast across the batch, a
            parameter that received a gradient through a use no hook saw) are raised by :attr:`stats`, so a training
            step never fails inside its backward because of the monitor.
    """

    def __init__(self, model: nn.Module, params=None, mode: str = "exact", sketch_dim: int = 64, seed: int = 0,
                 exclude=(), position_attribution: bool = False, keep_factors: bool = False,
                 bookkeeping: bool = True):
        if mode not in ("exact", "sketch"):
            raise ValueError(f"mode must be 'exact' or 'sketch', got {mode!r}")
        if mode == "sketch" and position_attribution:
            raise ValueError("position_attribution needs mode='exact' (sketched layers have no per-position terms)")
        if not isinstance(sketch_dim, int) or sketch_dim < 1:
            raise ValueError(f"sketch_dim must be a positive int, got {sketch_dim!r}")
        self.model, self.mode, self.sketch_dim, self.seed = model, mode, sketch_dim, int(seed)
        self.position_attribution = bool(position_attribution)
        self.keep_factors = bool(keep_factors)
        self.coverage = build_coverage(model, params, exclude)
        check_model(model, self.coverage.params)
        self._dropouts = dropout_modules(model)  # the structure is fixed with the coverage
        self._device_type = self.coverage.params[0].device.type if self.coverage.params else "cpu"
        if self.position_attribution:
            generic = [e.name for e in self.coverage.entries if e.kind in ("rowwise", "experts")]
            if generic:
                raise UncoveredParametersError(
                    f"position_attribution needs per-position terms, which the generic per-row path does not give; "
                    f"these modules take it: {generic}. Exclude them, or leave position_attribution off.")
        self._sketches = SketchCache(self.seed, sketch_dim)
        self.bookkeeping = bool(bookkeeping)
        self._bookkept = self._bookkept_entries() if self.bookkeeping else set()
        self._forms = {idx: self._form(idx) for idx in self._bookkept}
        self._row_param: set[int] = set()
        # Parameters of modules on the generic per-row path, checked against autograd's gradient (a shared parameter
        # sums several uses, so only parameters of one module are checked).
        self._row_checked: set[int] = set()
        for idx, e in enumerate(self.coverage.entries):
            if e.kind in ("rowwise", "experts") and idx not in self._bookkept:
                self._check_rows_of(idx)
        self._handles: list = []
        self._swaps: dict = {}
        self._active = False
        # The default pairs and their book-keeping plan, kept across steps of one batch size.
        self._default_pairs = self._checked_pairs = None
        self._pair_plan = self._pair_plan_pairs = None
        self._reset()

    # ------------------------------------------------------------------------------------------------------------------
    # Context manager and hooks
    # ------------------------------------------------------------------------------------------------------------------

    def __enter__(self) -> "EntanglementMonitor":
        if self._active:
            raise RuntimeError("this EntanglementMonitor is already active")
        warn_if_dropout(self.model, self._dropouts)
        self._reset()
        try:
            for idx in sorted(self._bookkept):
                module = self.coverage.entries[idx].module
                self._handles.append(_ForwardSwap(module, self._swapped_forward(idx, module)))
            self._row_param = self._row_param_entries() if self.bookkeeping else set()
            for idx in sorted(self._row_param):
                module = self.coverage.entries[idx].module
                self._handles.append(_ForwardSwap(module, self._around_own(idx, module, self._row_param_forward)))
            swapped = self._bookkept | self._row_param  # their swapped forwards note their calls themselves
            for idx, entry in enumerate(self.coverage.entries):
                if idx in swapped:
                    continue
                if getattr(entry.reducer, "needs_before", False):
                    self._handles.append(entry.module.register_forward_pre_hook(partial(self._on_before, idx),
                                                                                with_kwargs=True))
                self._handles.append(entry.module.register_forward_hook(partial(self._on_forward, idx),
                                                                        with_kwargs=True))
            for p in self.coverage.params:
                self._handles.append(p.register_hook(partial(self._on_param_grad, id(p))))
            roots = {id(self.model): self.model}
            inner = self.model.get_base_model() if callable(getattr(self.model, "get_base_model", None)) else None
            for candidate in (getattr(self.model, "base_model", None), inner, getattr(inner, "base_model", None)):
                if isinstance(candidate, nn.Module):
                    roots[id(candidate)] = candidate
            for root in roots.values():
                self._handles.append(root.register_forward_pre_hook(self._on_root_forward, with_kwargs=True))
            self._handles.append(register_stats_listener(self._on_record, token_matrices=self.position_attribution or not self.bookkeeping))
        except BaseException:
            self._remove_hooks()
            raise
        self._active = True
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._remove_hooks()
        self._active = False
        if exc_type is not None:
            self._reset()
            return False
        try:
            self._finalize()
        except Exception as err:  # surfaced by .stats, not by the with-statement
            self._final_error = err
        self._uses.clear()
        self._record = None
        return False

    def _bookkept_entries(self) -> set[int]:
        """Entries whose weight gradients the monitor forms itself (see ``bookkeeping``)."""
        if self.mode != "exact" or self.position_attribution or self.keep_factors:
            return set()
        out = set()
        for idx, e in enumerate(self.coverage.entries):
            module = e.module
            if e.kind == "linear":
                stock = stock_forward(module, nn.Linear)
            elif e.kind == "conv1d":
                stock = "forward" not in vars(module)  # the reducer claims transformers' own Conv1D class only
            elif e.kind == "embedding":
                stock = bookkeepable(module)
            elif e.kind == "experts":
                stock = X.bookkeepable(module)
            elif e.kind == "rowwise":
                stock = linear_call_candidate(module)
            else:
                continue
            trainable = {a for a, p in module._parameters.items() if p is not None and p.requires_grad}
            if stock and ("weight" in e.tracked or e.kind == "experts") and set(e.tracked) == trainable \
                    and len(self.coverage.units[self.coverage.unit_of[idx]]) == 1:
                out.add(idx)
        return out

    def _swapped_forward(self, idx: int, module: nn.Module):
        """The forward a book-kept entry runs inside the with-block, made once per entry."""
        key = ("bookkept", idx)
        forward = self._swaps.get(key)
        if forward is None:
            kind = self.coverage.entries[idx].kind
            if kind == "rowwise":  # around the forward the module has now
                return self._around_own(idx, module, self._bookkept_linear_calls)
            method = {"embedding": self._bookkept_lookup, "experts": self._bookkept_experts}.get(
                kind, self._bookkept_forward)
            forward = self._swaps[key] = partial(method, idx, module)
        return forward

    def _around_own(self, idx: int, module: nn.Module, method):
        """``method(idx, forward, module, *args, **kwargs)`` bound to the forward the module has now (its instance
        forward, else its class's): what a position-wise entry on per-row views, or a generic entry book-kept through
        its linear call, runs inside the with-block (made once per entry and forward)."""
        own = vars(module).get("forward")
        key = (method.__name__, idx)
        cached = self._swaps.get(key)
        if cached is None or cached[0] is not own:
            inner = own if own is not None else partial(type(module).forward, module)
            cached = self._swaps[key] = (own, partial(method, idx, inner, module))
        return cached[1]

    def _form(self, idx: int):
        """The gradient former(s) a book-kept entry's swapped forward hands to its autograd function."""
        kind = self.coverage.entries[idx].kind
        if kind == "embedding":
            return partial(self._bookkeep_embedding, idx)
        if kind == "experts":
            return partial(self._bookkeep_experts, idx, 0), partial(self._bookkeep_experts, idx, 1)
        return partial(self._bookkeep, idx)

    def _check_rows_of(self, idx: int) -> None:
        """Check entry ``idx``'s per-row gradients (generic path) against the gradient autograd gives them."""
        e = self.coverage.entries[idx]
        self._row_checked.update(id(getattr(e.module, a)) for a in e.tracked
                                 if id(getattr(e.module, a)) not in self.coverage.shared)

    def _bookkept_forward(self, idx: int, module: nn.Module, x: Tensor) -> Tensor:
        if self._replaying or not torch.is_grad_enabled():
            return type(module).forward(module, x)
        out = self._bookkept_linear(idx, x, module.weight, module.bias)
        self._note_call(idx, module, out)
        return out

    def _bookkept_linear(self, idx: int, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """Entry ``idx``'s linear map of ``x`` through :class:`~entangle_fast.monitor.kinds.linear.BookkeptLinear`."""
        transpose = self.coverage.entries[idx].kind == "conv1d"
        device = x.device.type
        form = self._forms[idx]
        if torch.is_autocast_enabled(device):
            # What autocast does for a linear map: inputs cast to its dtype (the casts stay in the graph and carry the
            # gradients back to the parameters' dtype), the product in that dtype.
            dtype = torch.get_autocast_dtype(device)
            x, weight = x.to(dtype), weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
            with torch.autocast(device, enabled=False):
                return BookkeptLinear.apply(x, weight, bias, form, transpose)
        return BookkeptLinear.apply(x, weight, bias, form, transpose)

    def _bookkept_linear_calls(self, idx: int, own, module: nn.Module, *args, **kwargs):
        """The swapped forward of a generic module book-kept through its one ``F.linear`` call
        (:class:`~entangle_fast.monitor.kinds.rowwise.LinearCalls`: MoE routers). A call whose input does not split
        into the step's rows, or a module found to use its parameters otherwise, is captured as a forward hook would
        capture it (the generic per-row path, from then on for such a module)."""
        if self._replaying or not torch.is_grad_enabled():
            return own(*args, **kwargs)
        x = args[0] if args else None
        rows, width = self._rows_hint, self._width_hint
        if not linear_calls_refused(module) and isinstance(x, Tensor) and x.ndim >= 2 and rows \
                and x.shape[0] in (rows, rows * width):
            mode = LinearCalls(module, partial(self._bookkept_linear, idx), x)
            with mode:
                out = own(*args, **kwargs)
            if mode.qualifies(module):
                self._note_call(idx, module, out)
                return out
        return self._generic_call(idx, module, own, args, kwargs)

    def _generic_call(self, idx: int, module: nn.Module, own, args, kwargs):
        """A call that a book-kept generic or experts module's swapped forward does not take: captured as a forward
        hook would capture it, the module on the generic per-row path from then on (checked like it)."""
        if idx in self._bookkept:
            self._bookkept.discard(idx)
            self._check_rows_of(idx)
        out = own(*args, **kwargs)
        replaced = self._on_forward(idx, module, args, kwargs, out)
        return out if replaced is None else replaced

    def _bookkept_lookup(self, idx: int, module: nn.Module, ids, *args, **kwargs) -> Tensor:
        """The swapped forward of a book-kept ``nn.Embedding``: ids ``[R, T]`` of the step's rows go through
        :class:`~entangle_fast.monitor.kinds.embedding.BookkeptEmbedding`; any other call is captured as the forward
        hooks of an embedding would capture it."""
        if self._replaying or not torch.is_grad_enabled():
            return type(module).forward(module, ids, *args, **kwargs)
        if args or kwargs or not isinstance(ids, Tensor) or ids.ndim != 2 or not self._rows_hint \
                or ids.shape[0] != self._rows_hint:
            self._on_before(idx, module, (ids, *args), kwargs)
            out = type(module).forward(module, ids, *args, **kwargs)
            replaced = self._on_forward(idx, module, (ids, *args), kwargs, out)
            return out if replaced is None else replaced
        out = BookkeptEmbedding.apply(ids, module.weight, module.padding_idx, self._forms[idx])
        self._note_call(idx, module, out)
        return out

    def _bookkept_experts(self, idx: int, module: nn.Module, *args, **kwargs) -> Tensor:
        """The swapped forward of a book-kept experts module: the step's flattened ``[R * T, d]`` hidden states go
        through :func:`~entangle_fast.monitor.kinds.experts.experts_forward` (checked once against the module's own
        forward); any other call, or a module that fails the check, is captured as a forward hook would capture it."""
        own = partial(type(module).forward, module)
        if self._replaying or not torch.is_grad_enabled():
            return own(*args, **kwargs)
        call = args if len(args) == 3 and not kwargs else None
        rows, width = self._rows_hint, self._width_hint
        if call is not None and not X.refused(module) and all(isinstance(t, Tensor) for t in call) \
                and call[0].ndim == 2 and rows and call[0].shape[0] == rows * width:
            out = X.experts_forward(module, *call, self._forms[idx], rows, width)
            if X.verify(module, out, *call):
                self._note_call(idx, module, out)
                return out
        return self._generic_call(idx, module, own, args, kwargs)

    def _bookkeep_experts(self, idx: int, which: int, x: Tensor, gamma: Tensor, routing, dtype: torch.dtype):
        """Backward of a book-kept experts projection (``which``: 0 up, 1 down): every expert's weight and bias
        gradients and the parameter's per-pair terms."""
        entry = self.coverage.entries[idx]
        module = entry.module
        w_name, b_name = X.projections(module)[which]
        weight = getattr(module, w_name)
        bias = b_name is not None and b_name in entry.tracked
        self._backward_seen = True
        self._done_units.add(self.coverage.unit_of[idx])
        try:
            with self._reduction_mode():
                grad_w, grad_b, terms = X.bookkeep_experts(
                    x, gamma, routing, weight.shape, self._plan(self._rows_hint), transposed=module.is_transposed,
                    bias=bias, dtype=dtype, backend=resolve_impl("auto", gamma.device, gamma.dtype))
            self._store(entry.name, terms)
            return grad_w, grad_b
        except Exception as err:  # the step goes on with plainly formed gradients; stats reports the problem
            self._fail(f"module {entry.name!r}: {err}", err)
            grad_w = torch.zeros(weight.shape, dtype=dtype, device=gamma.device)
            grad_b = torch.zeros(weight.shape[0], gamma.shape[1], dtype=dtype, device=gamma.device) if bias else None
            for e, s, t in routing.segments:
                g = gamma[s:t].T @ x[s:t]
                grad_w[e] = g.T if module.is_transposed else g
                if bias:
                    grad_b[e] = gamma[s:t].sum(0)
            return grad_w, grad_b

    def _bookkeep_embedding(self, idx: int, ids: Tensor, gamma: Tensor, dtype: torch.dtype) -> Tensor:
        """Backward of a book-kept embedding: its weight gradient and its per-pair terms, from the same sparse rows."""
        entry = self.coverage.entries[idx]
        module = entry.module
        self._backward_seen = True
        self._done_units.add(self.coverage.unit_of[idx])
        try:
            with self._reduction_mode():
                rows = self._rows_hint or ids.shape[0]
                ids2, g = as_rows(ids, rows, self._width_hint, ids=True), as_rows(gamma, rows, self._width_hint)
                grad_w, terms = R.embedding_bookkeep(ids2, g, self._plan(rows), num_embeddings=module.num_embeddings,
                                                     padding_idx=module.padding_idx, dtype=self._cdt(), out_dtype=dtype)
            self._store(entry.name, terms)
            return grad_w
        except Exception as err:  # the step goes on with a plainly formed gradient; stats reports the problem
            self._fail(f"module {entry.name!r}: {err}", err)
            g = gamma.reshape(-1, gamma.shape[-1])
            flat = ids.reshape(-1)
            if module.padding_idx is not None:
                g = torch.where((flat != module.padding_idx).unsqueeze(1), g, 0)
            return torch.zeros(module.weight.shape, dtype=g.dtype, device=g.device).index_add_(0, flat, g).to(dtype)

    def _note_call(self, idx: int, module: nn.Module, output) -> None:
        """A call of a module whose swapped forward forms its terms from the step's own backward (book-kept, per-row
        parameter views): counted, and its parameters marked as seen; what :meth:`_on_forward` does for the others,
        which have a forward hook instead. A recomputation under activation checkpointing is not a new call."""
        if not isinstance(output, Tensor):  # several outputs (a router's logits, weights, indices): any with a gradient
            output = next((t for t in (output if isinstance(output, (tuple, list)) else ())
                           if isinstance(t, Tensor) and t.requires_grad), None)
        if output is None or not output.requires_grad or (_in_backward() and idx in self._captured):
            return
        entry = self.coverage.entries[idx]
        self._captured.add(idx)
        self._calls[idx] += 1
        if self._calls[idx] > 1:
            self._fail(f"module {entry.name!r} was called {self._calls[idx]} times in one step; the monitor "
                       "expects one [2B, T] forward per step (chosen rows, then rejected rows)")
        params = module._parameters  # the parameters as they are now (FSDP2 swaps them around forward)
        self._used.update([id(params[a]) for a in entry.tracked])
        if self._width_hint > self._width:
            self._width = self._width_hint

    def _bookkeep(self, idx: int, x: Tensor, gamma: Tensor, dtype: torch.dtype):
        """Backward of a book-kept layer: its weight and bias gradients and its per-pair terms, in one pass."""
        entry = self.coverage.entries[idx]
        transpose, bias = entry.kind == "conv1d", "bias" in entry.tracked
        self._backward_seen = True
        self._done_units.add(self.coverage.unit_of[idx])
        try:
            with self._reduction_mode():
                rows = self._rows_hint or x.shape[0]
                grad_w, grad_b, terms = bookkeep(x, gamma, self._plan(rows), transpose=transpose, bias=bias,
                                                 rows=rows, width=self._width_hint, dtype=dtype)
            self._store(entry.name, terms)
            return grad_w, grad_b
        except Exception as err:  # the step goes on with plainly formed gradients; stats reports the problem
            module = entry.module
            self._fail(f"module {entry.name!r}: {err}", err)
            g2, x2 = gamma.reshape(-1, gamma.shape[-1]), x.reshape(-1, x.shape[-1])
            grad_w = (x2.T @ g2) if transpose else (g2.T @ x2)
            return grad_w, (g2.sum(0) if module.bias is not None and module.bias.requires_grad else None)

    def _row_param_entries(self) -> set[int]:
        """Position-wise entries whose per-row gradients come from the step's own backward, through per-row views of
        their parameters (:func:`~entangle_fast.monitor.kinds.positionwise.row_param_forward`): exact mode without
        position attribution or kept factors, modules checked to take per-row parameters (on their first monitored
        step, through the forward they have), parameters of this module alone."""
        if self.mode != "exact" or self.position_attribution or self.keep_factors:
            return set()
        out = set()
        for idx, e in enumerate(self.coverage.entries):
            if isinstance(e.reducer, PositionwiseReducer) and e.reducer.takes_row_params(e.module) \
                    and len(self.coverage.units[self.coverage.unit_of[idx]]) == 1:
                out.add(idx)
        return out

    def _row_param_forward(self, idx: int, forward, module: nn.Module, *args, **kwargs):
        if self._replaying or not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        x = args[0] if len(args) == 1 and not kwargs else None
        if not isinstance(x, Tensor) or x.ndim < 3 or not self._rows_hint or x.shape[0] != self._rows_hint:
            out = forward(*args, **kwargs)  # captured as a forward hook would
            replaced = self._on_forward(idx, module, args, kwargs, out)
            return out if replaced is None else replaced
        entry = self.coverage.entries[idx]
        out, views = row_param_forward(module, entry.tracked, x, forward)
        if not (_in_backward() and idx in self._captured):
            n = x.shape[0]
            if len(views) == 1:  # a norm's scale alone: a pre-hook of the view's node receives its gradient
                views[0].grad_fn.register_prehook(partial(self._on_row_param_grads, idx, n))
            else:
                torch.autograd.graph.register_multi_grad_hook(views, partial(self._on_row_param_grads, idx, n))
            self._note_call(idx, module, out)
        return out

    def _on_row_param_grads(self, idx: int, n_rows: int, grads) -> None:
        """Backward of a position-wise module on per-row views: each row's gradient is the views' gradient."""
        entry = self.coverage.entries[idx]
        self._backward_seen = True
        self._done_units.add(self.coverage.unit_of[idx])
        try:
            with self._reduction_mode():
                cdt = self._cdt()
                rows = [g.detach().reshape(n_rows, -1).to(cdt) if g is not None
                        else torch.zeros(n_rows, getattr(entry.module, a).numel(), dtype=cdt,
                                         device=self.coverage.params[0].device)
                        for a, g in zip(entry.tracked, grads)]
                rows = rows[0] if len(rows) == 1 else torch.cat(rows, dim=1)
                plan = self._plan(n_rows)
                self._store(entry.name, R.row_grad_terms(rows, plan.pairs, ordered=plan.ordered))
        except Exception as err:  # noqa: BLE001 - surfaced by .stats
            self._fail(f"module {entry.name!r}: {err}", err)

    def _remove_hooks(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def _reset(self) -> None:
        self._uses: dict[int, Use] = {}
        self._before: dict[int, object] = {}
        self._calls: Counter = Counter()
        self._record: BackwardRecord | None = None
        self._results: dict[str, R.Terms] = {}
        self._done_units: set[int] = set()
        self._used: set[int] = set()
        self._captured: set[int] = set()
        self._width = 0
        self._grad_seen: set[int] = set()
        self._errors: list[tuple[str, BaseException | None]] = []
        self._watch: dict | None = None
        self._rows: int | None = None
        self._rows_hint = 0
        self._width_hint = 0
        self._replaying = False
        self._attr = {False: None, True: None}  # loss units, log-prob units
        self._stats: EntanglementStats | None = None
        self._final_error: BaseException | None = None
        self._backward_seen = False
        self._kept: list[F.KeptUse] = []
        self._row_sums: dict[int, Tensor] = {}
        self._param_grads: dict[int, Tensor] = {}

    def _fail(self, message: str, err: BaseException | None = None) -> None:
        self._errors.append((message, err))

    def _on_root_forward(self, module, args, kwargs):
        x = kwargs.get("input_ids", kwargs.get("inputs_embeds", args[0] if args else None))
        if isinstance(x, Tensor) and x.ndim >= 2:
            self._rows_hint = max(self._rows_hint, x.shape[0])
            self._width_hint = max(self._width_hint, x.shape[1])

    def _context(self) -> Context:
        return Context(rows=self._rows_hint, width=self._width_hint, cdt=self._cdt(), mode=self.mode,
                       positions=self.position_attribution, replay=self._replay)

    @contextlib.contextmanager
    def _replay(self):
        """Forward calls a reducer makes itself (per-row and per-item replays) are not captured."""
        old, self._replaying = self._replaying, True
        try:
            yield
        finally:
            self._replaying = old

    def _on_before(self, idx, module, args, kwargs):
        if self._replaying or not torch.is_grad_enabled() or (_in_backward() and idx in self._captured):
            return None
        state = self.coverage.entries[idx].reducer.before(module, args, kwargs, self._context())
        if state is not None:
            self._before[idx] = state
        return None

    def _on_forward(self, idx, module, args, kwargs, output):
        state = self._before.pop(idx, None)
        if self._replaying or not torch.is_grad_enabled():
            # Replays, and forwards without grad (no gradient comes back: evaluation, the parity probe, the first
            # pass of reentrant checkpointing).
            if state is not None:
                state.__exit__(None, None, None)
            return None
        if _in_backward() and idx in self._captured:
            # Activation checkpointing recomputing a forward the first pass already captured (non-reentrant). The
            # reentrant kind ran its first pass without grad, so its recomputation is the capture.
            if state is not None:
                state.__exit__(None, None, None)
            return None
        entry = self.coverage.entries[idx]
        reducer = entry.reducer
        if not self._rows_hint and args and isinstance(args[0], Tensor) and args[0].ndim >= 2:
            # No root forward seen (a submodule called directly): the first captured input gives the layout.
            self._rows_hint, self._width_hint = args[0].shape[0], args[0].shape[1]
        try:
            kw = {"state": state} if getattr(reducer, "needs_before", False) else {}
            use = reducer.capture(module, args, kwargs, output, self._context(), **kw)
        except CaptureError as err:
            self._fail(f"module {entry.name!r}: {err}", err)
            return None
        if use is None or not all(t.requires_grad for t in use.outputs):
            return None  # no gradient will come back (no_grad, or the first pass of reentrant checkpointing)
        self._captured.add(idx)
        self._calls[idx] += 1
        if self._calls[idx] > 1:
            self._fail(f"module {entry.name!r} was called {self._calls[idx]} times in one step; the monitor expects "
                       "one [2B, T] forward per step (chosen rows, then rejected rows)")
            return None
        self._width = max(self._width, self._width_hint)
        self._uses[idx] = use
        self._used.update(id(getattr(module, a)) for a in entry.tracked)
        if len(use.outputs) == 1:
            use.outputs[0].register_hook(partial(self._on_output_grad, idx))
        else:
            torch.autograd.graph.register_multi_grad_hook(use.outputs, partial(self._on_output_grads, idx))
        replaced = use.info.pop("replace", None)
        use.outputs = ()
        return replaced

    def _on_output_grads(self, idx, grads):
        self._on_output_grad(idx, tuple(g.detach() if g is not None else None for g in grads))

    def _on_output_grad(self, idx, grad):
        use = self._uses.get(idx)
        if use is None:
            return None
        use.gamma = grad.detach() if isinstance(grad, Tensor) else grad
        self._backward_seen = True
        unit = self.coverage.unit_of[idx]
        if len(self.coverage.units[unit]) == 1:
            self._reduce_unit_safely(unit)
        return None

    def _on_param_grad(self, pid, grad):
        self._grad_seen.add(pid)
        if pid in self._row_checked:
            self._param_grads[pid] = grad.detach().clone()
        return None

    def _check_rowwise(self) -> None:
        """A module on the generic path must act row by row: its per-row gradients sum to the gradient autograd gave
        its parameters (to rounding), unless it mixes rows."""
        for idx, total in self._row_sums.items():
            entry = self.coverage.entries[idx]
            grads = [self._param_grads.get(id(getattr(entry.module, a))) for a in entry.tracked]
            if any(g is None for g in grads):
                continue
            actual = torch.cat([g.reshape(-1).to(total.dtype) for g in grads])
            err = (actual - total).abs().max().item() if actual.numel() else 0.0
            scale = max(actual.abs().max().item() if actual.numel() else 0.0, 1e-30)
            low = grads[0].dtype in (torch.bfloat16, torch.float16)
            tol = (1e-9 if total.dtype == torch.float64 else 5e-2 if low else 1e-3) * scale
            if err > tol:
                self._fail(f"module {entry.name!r} ({type(entry.module).__name__}) does not act row by row: its per-row "
                           f"gradients sum to a different gradient than the step's (max difference {err:.3e}, scale "
                           f"{scale:.3e}); it mixes the rows of the batch, so the monitor cannot split its gradient "
                           "by pair. Exclude it.")

    def _current_head_weight(self) -> Tensor | None:
        """The output embedding's weight as it is now: looked up at backward time, because wrappers such as FSDP2
        swap the module's parameters (sharded at rest, gathered around forward and backward)."""
        get = getattr(self.model, "get_output_embeddings", None)
        head = get() if callable(get) else None
        return getattr(head, "weight", None)

    def _on_record(self, record: BackwardRecord) -> None:
        w = self._current_head_weight()
        if w is None or record.weight.data_ptr() != w.data_ptr() or record.weight.shape != w.shape:
            return
        if self._record is not None:
            self._fail("the fused log-prob op ran twice on the model's head in one step; the monitor expects one "
                       "[2B, T] forward per step")
            return
        self._record = record
        self._backward_seen = True
        self._width = max(self._width, record.rows_shape[1])
        head = self.coverage.head
        if head is not None:
            self._used.update(id(getattr(self.coverage.entries[head].module, a))
                              for a in self.coverage.entries[head].tracked)
            unit = self.coverage.unit_of[head]
            if len(self.coverage.units[unit]) == 1:
                self._reduce_unit_safely(unit)

    def watch(self, chosen_logps: Tensor, rejected_logps: Tensor, pairs=None) -> None:
        """Hook the per-sequence log-probs the loss is built from, so their upstream gradients give a_w, a_l.

        Needed when the log-probs do not come from the fused op (e.g. ``model(...).logits`` + ``log_softmax`` +
        gather + sum); call it after the forward and before ``backward()``. With the fused op
        (:func:`entangle_fast.preference_logprobs`) the op records the coefficients itself and they win.

        The statistics are then those of the watched tensors' gradients (watch per-token means and they are of the
        means).

        Args:
            chosen_logps, rejected_logps: ``[B]`` sequence log-probs (their gradients must flow).
            pairs: ``[B, 2]`` (chosen row, rejected row) of the model's forward; default row i with row B + i.
        """
        if not self._active:
            raise RuntimeError("watch() is for inside the with-block, before backward()")
        for name, t in (("chosen_logps", chosen_logps), ("rejected_logps", rejected_logps)):
            if not isinstance(t, Tensor) or t.ndim != 1 or not t.requires_grad:
                raise ValueError(f"{name} must be a [B] tensor that requires grad, got "
                                 f"{getattr(t, 'shape', type(t))}")
        if chosen_logps.shape != rejected_logps.shape:
            raise ValueError(f"chosen_logps {tuple(chosen_logps.shape)} and rejected_logps "
                             f"{tuple(rejected_logps.shape)} differ in shape")
        b = chosen_logps.shape[0]
        if pairs is None:
            pairs = default_pairs(2 * b)
        pairs = torch.as_tensor(pairs, dtype=torch.int64).cpu()
        if pairs.shape != (b, 2):
            raise ValueError(f"pairs must have shape [B, 2] = [{b}, 2], got {tuple(pairs.shape)}")
        self._watch = {"pairs": pairs, "chosen": torch.zeros_like(chosen_logps.detach()),
                       "rejected": torch.zeros_like(rejected_logps.detach()), "fired": 0}

        def store(key, g):
            self._watch[key] = g.detach().clone()
            self._watch["fired"] += 1
            self._backward_seen = True

        chosen_logps.register_hook(partial(store, "chosen"))
        rejected_logps.register_hook(partial(store, "rejected"))

    # ------------------------------------------------------------------------------------------------------------------
    # Reduction
    # ------------------------------------------------------------------------------------------------------------------

    def _pairs(self, rows: int) -> Tensor:
        """The (chosen row, rejected row) pairs, checked against the rows a module saw."""
        if self._rows is None:
            self._rows = rows
        if rows != self._rows:
            raise ValueError(
                f"saw {rows} rows where other modules saw {self._rows}: its output is broadcast across the rows (or "
                "rows came from separate forwards). Pass position_ids of shape [2B, T] and run one forward per step."
            )
        if self._watch is not None:
            pairs = self._watch["pairs"]
        else:
            if self._default_pairs is None or self._default_pairs.shape[0] * 2 != rows:
                self._default_pairs = default_pairs(rows)
            pairs = self._default_pairs
        if pairs is not self._checked_pairs:
            if pairs.numel() and int(pairs.max()) >= rows:
                raise ValueError(f"pairs index row {int(pairs.max())} but the forward has {rows} rows")
            self._checked_pairs = pairs
        return pairs

    def _plan(self, rows: int):
        """The step's pairs for book-kept layers, checked once (:class:`entangle_fast.bookkeeping.PairPlan`)."""
        plan = self._pair_plan
        if plan is not None and rows == plan.rows == self._rows and self._watch is None \
                and self._pair_plan_pairs is self._default_pairs:
            return plan  # the default pairs, already checked against this step's rows
        pairs = self._pairs(rows)
        if self._pair_plan is None or self._pair_plan.rows != rows or self._pair_plan_pairs is not pairs:
            from entangle_fast.bookkeeping import PairPlan

            self._pair_plan, self._pair_plan_pairs = PairPlan.of(rows, pairs), pairs
        return self._pair_plan

    def _cdt(self) -> torch.dtype:
        return R.compute_dtype(self.coverage.params[0].dtype) if self.coverage.params else torch.float32

    def _reduce_unit_safely(self, unit: int) -> None:
        if unit in self._done_units:
            return
        self._done_units.add(unit)
        members = self.coverage.units[unit]
        try:
            with self._reduction_mode():
                self._reduce_unit(members)
        except Exception as err:
            names = ", ".join(self.coverage.entries[i].name for i in members)
            self._fail(f"module(s) {names}: {err}", err)
        finally:
            for i in members:
                self._uses.pop(i, None)

    def _reduce_unit(self, members: list[int]) -> None:
        packed: dict[int, R.Tokens] = {}
        for idx in members:
            terms = self._own_terms(idx, packed)
            if terms is not None:
                self._store(self.coverage.entries[idx].name, terms)
        if len(members) > 1:
            self._reduce_shared(members, packed)
        if self.keep_factors:
            for idx in members:
                self._keep(idx, packed)

    def _keep(self, idx: int, packed: dict) -> None:
        entry = self.coverage.entries[idx]
        params = {a: getattr(entry.module, a) for a in entry.tracked}
        if self._is_fused_head(idx):
            self._kept.append(F.KeptUse(entry.name, "head", params, record=self._record))
            return
        use = self._uses.get(idx)
        tok = self._pack(idx, packed)
        if use is None or (tok is None and "row_grads" not in use.info):
            return
        reducer = use.info.get("reducer", entry.reducer)
        self._kept.append(F.KeptUse(entry.name, reducer.kind, params, tok=tok,
                                    token_grads=use.info.get("token_grads"), reducer=reducer, module=entry.module,
                                    row_grads=use.info.get("row_grads")))

    def _store(self, name: str, terms: R.Terms) -> None:
        if terms.attribution:
            self._add_attribution(terms.attribution, terms.logprob_units)
            terms.attribution = None
        old = self._results.get(name)
        if old is not None:
            terms = R.Terms.of(old.as_stack() + terms.as_stack(), logprob_units=terms.logprob_units,
                               sketched=old.sketched or terms.sketched)
        self._results[name] = terms

    def _add_attribution(self, pieces, logprob_units: bool) -> None:
        """Add ``(pair, positions_w, positions_l, matrix)`` pieces to a ``[B, T, T]`` buffer grown on demand."""
        pieces = [piece for piece in pieces if piece[3].numel()]
        if not pieces:
            return
        size = 1 + max(int(max(pw.max(), pl.max())) for _, pw, pl, _ in pieces)
        n_pairs = 1 + max(i for i, *_ in pieces)
        buf = self._attr[logprob_units]
        if buf is None or buf.shape[1] < size or buf.shape[0] < n_pairs:
            size = max(size, buf.shape[1] if buf is not None else 0)
            n_pairs = max(n_pairs, buf.shape[0] if buf is not None else 0)
            grown = torch.zeros(n_pairs, size, size, dtype=self._cdt(), device=pieces[0][3].device)
            if buf is not None:
                grown[: buf.shape[0], : buf.shape[1], : buf.shape[2]] = buf
            buf = self._attr[logprob_units] = grown
        for i, pw, pl, m in pieces:
            buf[i].index_put_((pw[:, None], pl[None, :]), m.to(buf.dtype), accumulate=True)

    def _is_fused_head(self, idx: int) -> bool:
        return idx == self.coverage.head and idx not in self._uses and self._record is not None

    def _pack(self, idx: int, packed: dict) -> R.Tokens | None:
        """Pack the captured use of entry ``idx`` (None when its module ran without a gradient coming back, or when
        its kind keeps no packed tokens)."""
        if idx in packed:
            return packed[idx]
        use, entry = self._uses.get(idx), self.coverage.entries[idx]
        if use is None or use.gamma is None:
            return None
        reducer = use.info.get("reducer", entry.reducer)
        if not hasattr(reducer, "pack"):
            return None
        ctx = self._context()
        gamma = reducer.gamma_rows(use, ctx)
        want = use.x.shape if entry.kind == "embedding" else use.x.shape[:-1]
        if tuple(want) != tuple(gamma.shape[:-1]):
            raise CaptureError(f"input {tuple(use.x.shape)} and output gradient {tuple(gamma.shape)} do not match "
                               "position by position")
        tok = use.info["tok"] = reducer.pack(use, gamma, self._cdt())
        packed[idx] = tok
        return tok

    def _own_terms(self, idx: int, packed: dict) -> R.Terms | None:
        entry = self.coverage.entries[idx]
        positions = self.position_attribution
        if self._is_fused_head(idx):
            rec = self._record
            covered = {"weight"} | ({"bias"} if rec.bias is not None else set())
            if set(entry.tracked) != covered:
                raise ValueError(f"the fused op's statistics cover {sorted(covered)} of the head together; tracked "
                                 f"{sorted(entry.tracked)}")
            return R.fused_head_terms(rec.stats, self._pairs(rec.rows_shape[0]), positions=positions)
        use = self._uses.get(idx)
        if use is None or use.gamma is None:
            return None
        reducer = use.info.get("reducer", entry.reducer)
        needs = getattr(reducer, "needs_tokens", None)
        if needs is not None and not needs(self.position_attribution, self.keep_factors):
            pairs = self._pairs(use.x.shape[0])  # the row layout the reducer captured
        else:
            tok = self._pack(idx, packed)
            pairs = self._pairs(tok.rows if tok is not None else self._rows_hint)
        ctx = self._context()
        ctx.sketch = partial(self._sketch, idx)
        if self.keep_factors:
            use.info["keep_rows"] = True
        terms = reducer.terms(entry.module, entry.tracked, use, pairs, ctx)
        if use.info.get("grad_sum") is not None and all(id(getattr(entry.module, a)) in self._row_checked
                                                        for a in entry.tracked):
            self._row_sums[idx] = use.info.pop("grad_sum")
        return terms

    def _sketch(self, idx: int, tok: R.Tokens):
        entry = self.coverage.entries[idx]
        d_in, d_out = entry.reducer.dims(entry.module)
        return self._sketches.get(entry.name, d_in, d_out, device=tok.gamma.device, dtype=tok.gamma.dtype)

    def _factors(self, idx: int, attr: str, packed: dict) -> R.Factors | None:
        """The factors of entry ``idx``'s use of its shared parameter ``attr`` (None when it was not used)."""
        entry = self.coverage.entries[idx]
        if self._is_fused_head(idx):
            rec = self._record
            rows, width = rec.rows_shape
            cdt = self._cdt()
            valid = (rec.labels != rec.ignore_index).reshape(rows, width)
            g = (rec.grad_logprobs.to(cdt) * valid.reshape(-1)).reshape(rows, width, 1)
            tok = R.pack(g, a=rec.hidden.reshape(rows, width, -1), ids=rec.labels.reshape(rows, width),
                         extras=(rec.lse.reshape(rows, width),), dtype=cdt)
            head = (tok.a, tok.ids, tok.extras[0], tok.gamma[:, 0], rec.weight, rec.bias, rec.transform)
            return R.Factors(tok, "delta", v=tok.a if attr == "weight" else None, head=head)
        if self._pack(idx, packed) is None:
            return None
        return entry.reducer.factors(entry.module, self._uses[idx], attr, self._context())

    def _reduce_shared(self, members: list[int], packed: dict) -> None:
        member_set = set(members)
        for pid, users in self.coverage.shared.items():
            if users[0][0] not in member_set:
                continue
            factors = [(self.coverage.entries[i].name, self._factors(i, a, packed)) for i, a in users]
            factors = [(n, f) for n, f in factors if f is not None]
            for k, (name_x, fx) in enumerate(factors):
                for name_y, fy in factors[k + 1 :]:
                    pairs = self._pairs(fx.tok.rows)
                    self._pairs(fy.tok.rows)
                    terms = R.cross_terms(fx, fy, pairs, positions=self.position_attribution)
                    self._store(f"{name_x} x {name_y}", terms)

    # ------------------------------------------------------------------------------------------------------------------
    # Result
    # ------------------------------------------------------------------------------------------------------------------

    def _coefficients(self, pairs: Tensor):
        """``(a_w, a_l, uniform)`` ``[B]``: from the fused op's record when there is one, else from watch()."""
        cdt, dev = self._cdt(), self.coverage.params[0].device if self.coverage.params else None
        if self._record is not None:
            st = self._record.stats
            if not torch.equal(st.pairs.cpu(), pairs.cpu()):
                raise ValueError("the fused op's pairs differ from the monitor's; use the default row layout")
            return st.a_w.to(cdt), st.a_l.to(cdt), st.uniform_upstream
        if self._watch is None:
            raise RuntimeError(
                "no log-prob coefficients: the fused log-prob op did not run on the model's head, so call "
                "mon.watch(chosen_logps, rejected_logps) on the [B] sequence log-probs before backward()"
            )
        if not self._watch["fired"]:
            raise RuntimeError("the log-probs given to watch() received no gradient: pass the very tensors the loss "
                               "is computed from (slicing again makes new tensors)")
        return self._watch["chosen"].to(device=dev, dtype=cdt), self._watch["rejected"].to(device=dev, dtype=cdt), None

    def _reduction_mode(self):
        """What the monitor's reductions run under: no graph, and no autocast (they keep their own dtypes; on CPU the
        backward and its hooks run in the caller's thread, inside its autocast region when there is one). Either is
        entered only where it is on: autograd runs a backward hook with grad mode off already, and entering a mode
        costs microseconds on every hook of every step."""
        device = self._device_type
        grad, cast = torch.is_grad_enabled(), torch.is_autocast_enabled(device)
        if not cast:
            return torch.no_grad() if grad else contextlib.nullcontext()
        if not grad:
            return torch.autocast(device, enabled=False)
        both = contextlib.ExitStack()
        both.enter_context(torch.no_grad())
        both.enter_context(torch.autocast(device, enabled=False))
        return both

    def _finalize(self) -> None:
        with self._reduction_mode():
            self._finalize_stats()

    def _finalize_stats(self) -> None:
        if not self._backward_seen:
            raise RuntimeError("EntanglementMonitor: no backward reached the monitored model inside the with-block "
                               "(run forward, loss and backward inside it)")
        for unit in range(len(self.coverage.units)):
            self._reduce_unit_safely(unit)
        self._check_rowwise()
        if self._errors:
            message, err = self._errors[0]
            more = "".join(f"\n  also: {m}" for m, _ in self._errors[1:])
            raise RuntimeError(f"EntanglementMonitor: {message}{more}") from err
        unseen = [self.coverage.names[pid] for pid in self._grad_seen - self._used]
        if unseen:
            raise RuntimeError(
                "EntanglementMonitor: these parameters received a gradient through a use no hook saw (a bare "
                f"parameter in a forward, or a module's weight used outside its forward): {sorted(unseen)}; exclude "
                "them or compute with the module itself"
            )
        if self._rows is None and self._watch is None and self._record is None:
            raise RuntimeError("EntanglementMonitor: nothing was captured: run the forward and backward inside the "
                               "with-block")
        pairs = self._watch["pairs"] if self._watch is not None else self._pairs(self._rows or 0)
        b = pairs.shape[0]
        a_w, a_l, uniform = self._coefficients(pairs)
        if uniform is not None and not bool(uniform.all()):
            warnings.warn("the loss weights the response tokens of a row unequally: the monitor's statistics are "
                          "those of the token-weighted log-prob sums (with position_attribution the fused head's are of the plain sums)",
                          stacklevel=3)
        # Every module's three terms at once: [M, 3, B], divided by a_w a_l, a_w^2, a_l^2 where in loss units.
        den = torch.stack([a_w * a_l, a_w * a_w, a_l * a_l])
        nan = _nan(a_w.dtype, a_w.device)
        names = list(self._results)
        if names:
            stacks = [t.as_stack() for t in self._results.values()]
            raw = torch.stack([t if t.dtype == a_w.dtype else t.to(a_w.dtype) for t in stacks])
            in_loss = _flags(tuple(not t.logprob_units for t in self._results.values()), a_w.device)
            terms = torch.where(den != 0, torch.where(in_loss[:, None, None], raw / den, raw), nan)
            totals = terms.sum(0)  # NaN where den is 0, as each module's terms
        else:
            terms, totals = None, torch.where(den != 0, 0, nan)
        # name -> (inner, chosen, rejected) [B] views: three unbinds of [3, M, B] rather than one per module
        per_module = dict(zip(names, zip(*(t.unbind(0) for t in terms.transpose(0, 1).unbind(0))))) if names else {}
        inner, nw, nl = totals.unbind(0)
        den = dict(zip(("inner", "chosen", "rejected"), den.unbind(0)))
        case, falls, rises = classify(inner, nw, nl, a_w, a_l)
        attribution = None
        if self.position_attribution:
            bufs = [(self._attr[False], False), (self._attr[True], True)]
            size = max([buf.shape[1] for buf, _ in bufs if buf is not None] + [self._width])
            attribution = torch.zeros(b, size, size, dtype=a_w.dtype, device=a_w.device)
            for buf, lp in bufs:
                if buf is not None:
                    n = buf.shape[0]
                    attribution[:n, : buf.shape[1], : buf.shape[2]] += buf if lp else buf / den["inner"][:n, None, None]
            attribution[den["inner"] == 0] = float("nan")
        self._stats = EntanglementStats(
            inner=inner,
            chosen_sq_norm=nw,
            rejected_sq_norm=nl,
            cosine=inner / torch.sqrt(nw * nl),
            a_w=a_w,
            a_l=a_l,
            case=case,
            chosen_falls=falls,
            rejected_rises=rises,
            zero_coefficient=(a_w == 0) | (a_l == 0),
            per_module=per_module,
            pairs=pairs,
            position_attribution=attribution,
            uniform_upstream=uniform,
            sketched=tuple(n for n, t in self._results.items() if t.sketched),
        )

    @property
    def stats(self) -> EntanglementStats:
        """The statistics of the step run inside the with-block (computed at exit, or here when read inside it)."""
        if self._final_error is not None:
            raise self._final_error
        if self._stats is None:
            if not self._active:
                raise RuntimeError("no statistics: run one step (forward, loss, backward) inside the with-block")
            self._finalize()
        return self._stats

    # ------------------------------------------------------------------------------------------------------------------
    # Re-formed gradients from the kept factors (keep_factors=True)
    # ------------------------------------------------------------------------------------------------------------------

    def _row_coefficients(self) -> tuple[Tensor, Tensor]:
        """``(pairs [B, 2], coefficient of every row [R])``: the a_w, a_l the backward carried (0 off the pairs)."""
        if not self.keep_factors:
            raise RuntimeError("re-formed gradients need EntanglementMonitor(..., keep_factors=True)")
        st = self.stats
        if not self._kept:
            raise RuntimeError("no factors were kept: run one step (forward, loss, backward) inside the with-block")
        pairs = st.pairs.cpu()
        rows = max([int(pairs.max()) + 1 if pairs.numel() else 0]
                   + [u.tok.rows if u.tok is not None else u.record.rows_shape[0] for u in self._kept])
        if len(set(pairs.reshape(-1).tolist())) != pairs.numel():
            raise ValueError("a row belongs to two pairs: its coefficient is ambiguous, so gradients cannot be "
                             "re-formed per row")
        coef = torch.zeros(rows, dtype=st.a_w.dtype, device=st.a_w.device)
        coef[pairs[:, 0]] = st.a_w
        coef[pairs[:, 1]] = st.a_l
        return pairs, coef

    def weighted_gradients(self, chosen_weights: Tensor, rejected_weights: Tensor) -> dict[nn.Parameter, Tensor]:
        """``sum_i (u_i grad s_w,i + v_i grad s_l,i)`` for every tracked parameter, re-formed from the kept factors of
        the step (no second backward of the model; the fused head takes one head-only pass over the vocabulary).

        Args:
            chosen_weights / rejected_weights: ``[B]`` u and v, per pair.

        Returns:
            parameter -> tensor of its shape and dtype. Gradients of the summed log-probs, not of the loss.

        Raises:
            ValueError: a nonzero weight on a row whose coefficient was 0 (that row's gradient never reached the
                backward, see ``stats.zero_coefficient``).
        """
        pairs, coef = self._row_coefficients()
        weights = torch.zeros_like(coef)
        weights[pairs[:, 0]] = torch.as_tensor(chosen_weights, dtype=coef.dtype, device=coef.device)
        weights[pairs[:, 1]] = torch.as_tensor(rejected_weights, dtype=coef.dtype, device=coef.device)
        lost = (weights != 0) & ~((coef != 0) & torch.isfinite(coef))
        if bool(lost.any()):
            raise ValueError(f"rows {torch.nonzero(lost).flatten().tolist()} have a zero loss coefficient, so the "
                             "backward carried none of their gradient: give them weight 0")
        lam = torch.where(weights != 0, weights / torch.where(coef != 0, coef, 1), 0)
        grads = F.weighted_gradients(self._kept, lam)
        return {p: g.to(p.dtype) for p, g in grads.items()}

    def gradient_dot(self, direction) -> tuple[Tensor, Tensor]:
        """``(<grad s_w,i, D>, <grad s_l,i, D>)``, each ``[B]``, for a direction D over the tracked parameters.

        One plain SGD step theta -= lr * D changes each log-prob by ``-lr * <grad s, D>`` to first order, cross-pair
        terms included (``D`` = the step's whole gradient gives the batch prediction that ``stats.predicted_delta``
        gives per pair alone). NaN for a row whose coefficient was 0.

        Args:
            direction: mapping parameter -> tensor of its shape (e.g. ``{p: p.grad}``); missing parameters count as 0.
        """
        pairs, coef = self._row_coefficients()
        blocks = {id(p): d.detach() for p, d in dict(direction).items() if d is not None}
        dots = F.gradient_dot(self._kept, blocks, coef.shape[0], coef.dtype).to(coef.device)
        dots = torch.where(coef != 0, dots / torch.where(coef != 0, coef, 1), float("nan"))
        return dots[pairs[:, 0]], dots[pairs[:, 1]]
