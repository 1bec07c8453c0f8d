"""Per-token gradient profiler: the full-model token matrix K[t, s] = <grad l^w_t, grad l^l_s> of preference pairs.

docs/math.md section 3.2: through attention, grad l_t reaches every earlier position, so K needs one backward per
response token. The paper's heat-maps take those backwards one at a time with ``retain_graph`` and flatten every
parameter's gradient (:func:`per_token_matrix_baseline`, kept here as the benchmark baseline). This module takes them
batched and never forms a parameter-sized vector:

1. One no-grad forward of the pair keeps every covered module's input a (per row) and the final hidden states h_t at
   the response tokens; one fused log-prob call gives the seeds r_t = d l_t / d h_t = W^T (e_{y_t} - p_t) and the
   exact output-layer statistics (:func:`entangle_fast.output_layer_token_stats`) come from the same h.
2. Per response, the tokens are cut into chunks. A chunk runs the backbone on the prefix its tokens need (a causal
   LM's activations at positions <= p do not depend on later ones) under ``torch.func.vjp``, with a zero perturbation
   added to each covered module's output and the norms' parameters as inputs, then pulls back the seeds of all its
   tokens at once (``torch.func.vmap``). That gives per token t, at every module, gamma^(t)_tau = d l_t / d y_tau
   ``[tokens, positions, d_out]``, and each norm's per-token parameter gradient directly. SDPA runs its math path
   there: its fused kernels have no batching rule, so vmap would fall back to a loop over tokens.
3. The layer identities of docs/math.md section 4 give each module's share of K per token pair:

   - linear / Conv1D weight (+ bias), "ghost": K[t, s] = sum_{tau, sigma} M[tau, sigma] (gamma^(t)_tau .
     gamma^(s)_sigma), M = a^w a^l^T (+ 1 with a bias). Each kept rejected chunk is folded once with the chosen
     row's M (H^(s) = M gamma^(s), ``[T_l, P_w, d_out]``); each chosen chunk is then one Gram with it. About
     T_l P_w P_l d + T_w T_l P d per layer: T^3 d, never T^4, and no [d_out, d_in] matrix;
   - the same map, "explicit" per-token gradients sum_tau gamma^(t)_tau a_tau^T and their Gram, when cheaper
     (small d_in, e.g. LoRA's B);
   - embeddings: the ghost form with M[tau, sigma] = [x_tau == x'_sigma];
   - norms (and classes given to ``register_positionwise``): the per-token parameter gradients of step 2, and
     their Gram;
   - the output embedding: the fused output-layer statistics of step 1;
   - a matrix used twice (tied GPT-2 ``wte``/``lm_head``): both uses plus the cross terms
     sum_tau delta'_s[x_tau] (gamma^(t)_tau . h'_s) and its mirror.

   Rejected-side factors are kept in blocks that fit ``memory_budget`` (a second block runs the chosen side again).
4. ``mode="sketch"`` (long responses): each token's gradient of a matrix parameter is kept only as its Kronecker
   sketch (P_out G P_in^T, ``k x k``, docs/math.md section 5), so memory no longer grows with the layer widths times
   the positions; biases, norms and the output layer stay exact. Sketched shares are unbiased estimates.

:func:`profile_pair` adds the log-probs, the monitor's per-module statistics and position attribution, and the
paper's case; :func:`run_profile` walks a data set and writes the report (:mod:`entangle_fast.report`).
"""
from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn

from entangle_fast.logprobs import linear_logprobs, output_layer_token_stats
from entangle_fast.token_stats import head_delta_at
from entangle_fast.monitor.coverage import Coverage, build_coverage, resolve_params
from entangle_fast.monitor.kinds.base import CaptureError, as_rows, stock_forward
from entangle_fast.monitor.kinds.embedding import _LookupRecorder, lookup_scale
from entangle_fast.monitor.reductions import compute_dtype
from entangle_fast.preference import (
    IGNORE_INDEX,
    backbone_hidden_states,
    collate_rows,
    normalize_batch,
    logit_transform,
    output_head,
)

# Bytes of per-token factors a pair may hold (rejected-side block plus one chosen chunk and its batched backward).
DEFAULT_MEMORY_BUDGET = 2 << 30
# Loss tokens per batched backward, at most; fewer when the budget asks for it.
MAX_CHUNK_TOKENS = 16
# mode="auto" sketches when a response is longer than this.
AUTO_SKETCH_TOKENS = 256
DEFAULT_SKETCH_DIM = 32
MODES = ("auto", "exact", "sketch")
# "auto" picks ghost or explicit per linear layer by cost; tests force one path to exercise both.
LINEAR_PATH = "auto"


# ----------------------------------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class TokenMatrix:
    """The full-model token matrix of one preference pair over the tracked parameters.

    Attributes:
        matrix: ``[T_w, T_l]`` K[t, s] = <grad l^w_t, grad l^l_s>, tokens in position order (log-prob units).
        per_module: module name -> ``[]`` total of that module's share of K (sum over t, s); it equals the module's
            sentence-level inner product <grad_m s_w, grad_m s_l>. A shared matrix adds ``"<x> x <y>"`` for its
            cross terms. The values sum to ``matrix.sum()``.
        module_matrices: module name -> ``[T_w, T_l]`` share of K, when asked for (``module_matrices=True``).
        chosen_positions / rejected_positions: ``[T_w]`` / ``[T_l]`` int64 positions (in the batch rows) whose
            hidden state scores each response token (the token itself sits at position + 1).
        mode: ``"exact"`` or ``"sketch"``. sketched: the modules whose shares are sketch estimates.
        paths: module name -> how its share was computed (``ghost``, ``explicit``, ``vector``, ``sketch``, ``head``,
            ``cross``).
        output_layer: :meth:`entangle_fast.OutputLayerTokenStats.pair` of this pair (None without a tracked head).
        token_backwards: loss tokens back-propagated (T_w + T_l, more when a block had to be recomputed).
        batched_backwards: batched backward calls.
    """

    matrix: Tensor
    per_module: dict[str, Tensor]
    chosen_positions: Tensor
    rejected_positions: Tensor
    mode: str
    sketched: tuple[str, ...] = ()
    paths: dict[str, str] = field(default_factory=dict)
    module_matrices: dict[str, Tensor] | None = None
    output_layer: dict[str, Tensor] | None = None
    token_backwards: int = 0
    batched_backwards: int = 0


# ----------------------------------------------------------------------------------------------------------------------
# One pair's rows
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class _Row:
    """One response row, unpadded: ``ids [P]`` input ids, ``q [T]`` positions scoring the response tokens,
    ``y [T]`` those tokens, ``offset`` where the row starts in the padded batch row."""

    ids: Tensor
    q: Tensor
    y: Tensor
    offset: int


def _pair_rows(batch: dict) -> tuple[tuple[_Row, _Row], tuple[Tensor, Tensor, Tensor]]:
    """Split a ``[2, T]`` one-pair batch (chosen row, rejected row) into unpadded rows."""
    input_ids, mask, labels = normalize_batch(batch)
    if input_ids.shape[0] != 2:
        raise ValueError(f"one pair at a time: input_ids must be [2, T] (chosen row, rejected row), got "
                         f"{tuple(input_ids.shape)}")
    rows = []
    for r, side in enumerate(("chosen", "rejected")):
        kept = torch.nonzero(mask[r].bool()).flatten()
        if kept.numel() == 0:
            raise ValueError(f"the {side} row has no unmasked token")
        start, stop = int(kept[0]), int(kept[-1]) + 1
        if stop - start != kept.numel():
            raise ValueError(f"the attention mask of the {side} row has holes; rows must be contiguous (left or right "
                             "padding only)")
        ids, lab = input_ids[r, start:stop], labels[r, start:stop]
        shifted = lab[1:]
        q = torch.nonzero(shifted != IGNORE_INDEX).flatten()
        if q.numel() == 0:
            raise ValueError(f"the {side} response has no scored token (every label is {IGNORE_INDEX})")
        rows.append(_Row(ids, q, shifted[q], start))
    return (rows[0], rows[1]), (input_ids, mask, labels)


# ----------------------------------------------------------------------------------------------------------------------
# The batched per-token engine
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class _Factors:
    """Per-token factors of one chunk of tokens (or a block of chunks) of one row.

    ``prefix``: positions covered; ``gamma``: entry -> ``[n, prefix, d_out]`` (ghost entries); ``acts``: entry ->
    ``[prefix, d_in]`` inputs or ``[prefix]`` ids (ghost entries); ``feats``: entry -> ``[n, F]`` per-token feature
    vectors whose Gram is the entry's share of K; ``head``: ``(h [n, d], y [n], lse [n])`` at the tokens' positions
    (compute dtype); ``head_sketch``: ``[n, k*k]`` sketches of the head use of a tied matrix (sketch mode);
    ``folded``: entry -> ``[n, P_w, d_out]`` gammas folded with the other row's activation factor."""

    tokens: slice
    prefix: int
    gamma: dict[int, Tensor] = field(default_factory=dict)
    acts: dict[int, Tensor] = field(default_factory=dict)
    feats: dict[int, Tensor] = field(default_factory=dict)
    head: tuple[Tensor, Tensor, Tensor] | None = None
    head_sketch: Tensor | None = None
    folded: dict[int, Tensor] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return self.tokens.stop - self.tokens.start


def _ghost_contract(gw: Tensor, gl: Tensor, m: Tensor) -> Tensor:
    """``[n, k]`` K[t, s] = sum_{tau, sigma} m[tau, sigma] (gw[t, tau] . gl[s, sigma]) for ``gw [n, P_w, d]``,
    ``gl [k, P_l, d]``, ``m [P_w, P_l]``: fold m into the cheaper side first (T P_w P_l d), then one Gram."""
    n, pw, d = gw.shape
    k, pl, _ = gl.shape
    if n * pw * pl + n * k * pl <= k * pw * pl + n * k * pw:
        folded = torch.matmul(m.T, gw)  # [n, P_l, d]
        return folded.reshape(n, -1) @ gl.reshape(k, -1).T
    folded = torch.matmul(m, gl)  # [k, P_w, d]
    return gw.reshape(n, -1) @ folded.reshape(k, -1).T


class _BackboneCall:
    """Make ``model(input_ids=..., attention_mask=...)`` return the backbone's final hidden states for the duration,
    so ``torch.func.functional_call(model, ...)`` runs the backbone (positions counted as
    :func:`entangle_fast.preference.backbone_hidden_states` counts them) without the head."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        model = self.model

        def forward(input_ids, attention_mask):
            return backbone_hidden_states(model, input_ids, attention_mask)

        self.old = vars(model).get("forward")
        model.forward = forward

    def __exit__(self, *exc):
        if self.old is not None:
            self.model.forward = self.old
        else:
            del self.model.forward
        return False


def _tanh_gelu(x: Tensor) -> Tensor:
    return torch.nn.functional.gelu(x, approximate="tanh")


# Activation modules written as chains of elementwise ops, and the one fused op computing the same function. Inside the
# batched backward every op of a chain is a pass over [tokens, positions, 4d] (for GPT-2 small a third of the time);
# the fused op and its fused backward make it one. (transformers' NewGELUActivation: 0.5 x (1 + tanh(sqrt(2/pi)
# (x + 0.044715 x^3))), which is the definition of F.gelu(approximate="tanh").)
FUSED_ACTIVATIONS = {"NewGELUActivation": _tanh_gelu}


class _FusedActivations:
    """Swap the activation modules of :data:`FUSED_ACTIVATIONS` for their fused equivalents for the duration."""

    def __init__(self, model: nn.Module):
        self.modules = [m for m in model.modules() if type(m).__name__ in FUSED_ACTIVATIONS
                        and type(m).__module__.startswith("transformers") and "forward" not in vars(m)]

    def __enter__(self):
        for m in self.modules:
            m.forward = FUSED_ACTIVATIONS[type(m).__name__]

    def __exit__(self, *exc):
        for m in self.modules:
            del m.forward
        return False


class _PairEngine:
    """Computes the full-model token matrix of one pair; see the module docstring for the steps."""

    def __init__(self, model: nn.Module, coverage: Coverage, *, mode: str, sketch_dim: int, seed: int,
                 memory_budget: int, chunk_tokens: int | None, module_matrices: bool):
        self.model, self.cov = model, coverage
        self.mode, self.k, self.seed = mode, sketch_dim, seed
        self.budget, self.chunk_override, self.keep_modules = memory_budget, chunk_tokens, module_matrices
        weight, bias = output_head(model)
        self.transform = logit_transform(model)
        # The head enters the profile as data (seeds, cross terms), never as a graph input.
        self.weight, self.bias = weight.detach(), (bias.detach() if bias is not None else None)
        self.cdt = compute_dtype(self.weight.dtype)
        self.head = coverage.head
        if self.head is not None:
            entry = coverage.entries[self.head]
            covered = {"weight"} | ({"bias"} if self.bias is not None else set())
            if set(entry.tracked) != covered:
                raise ValueError(f"the output layer's statistics cover {sorted(covered)} of {entry.name!r} together; "
                                 f"tracked: {sorted(entry.tracked)}")
        # Every covered module except the head runs inside the backbone. Position-wise modules (norms) give their
        # per-token parameter gradients directly; the others give gamma through a zero perturbation of their output.
        self.captured = [i for i in range(len(coverage.entries)) if i != self.head]
        # Each kind's reducer says how its per-token gradients are taken: factor forms through an output perturbation
        # (linear, Conv1D, embeddings) or the module's parameters as inputs of the batched backward ("vector": norms,
        # the generic per-row kinds).
        self.form = {i: coverage.entries[i].reducer.profile_form for i in self.captured}
        self.perturbed = [i for i in self.captured if self.form[i] != "vector"]
        self.vectors = {i: [f"{coverage.entries[i].name}.{a}" for a in coverage.entries[i].tracked]
                        for i in self.captured if self.form[i] == "vector"}
        self.gamma_scale: dict[int, float] = {}
        self.cross = self._cross_pairs()
        self.sketches: dict[int, object] = {}
        self.token_backwards = 0
        self.batched_backwards = 0

    # -- planning --------------------------------------------------------------------------------------------------

    def _cross_pairs(self) -> list[tuple[int, int, tuple[str, ...]]]:
        """``(x, y, shared attributes)`` for every two entries sharing tracked parameters, in coverage order."""
        shared: dict[tuple[int, int], list[str]] = {}
        for users in self.cov.shared.values():
            for a, (x, attr) in enumerate(users):
                for y, attr_y in users[a + 1:]:
                    if attr != attr_y:
                        raise NotImplementedError(
                            f"{self.cov.entries[x].name}.{attr} is {self.cov.entries[y].name}.{attr_y}: a parameter "
                            "shared under two roles is not supported by the profiler")
                    shared.setdefault((x, y), []).append(attr)
        out = []
        for (x, y), attrs in shared.items():
            kinds = {self.cov.entries[x].kind, self.cov.entries[y].kind}
            with_head = self.head in (x, y)
            if with_head and kinds - {"linear"} != {"embedding"}:
                raise NotImplementedError("the output layer shares a parameter with a module that is not an "
                                          f"nn.Embedding ({sorted(kinds)}); only tied input/output embeddings are "
                                          "supported")
            if not with_head and (len(kinds) != 1 or self.mode == "sketch"):
                raise NotImplementedError(
                    f"{self.cov.entries[x].name} and {self.cov.entries[y].name} share {attrs}: the profiler adds cross "
                    "terms between two uses of one kind in exact mode, and between tied input/output embeddings")
            out.append((x, y, tuple(attrs)))
        return out

    def _plan(self, rows: tuple[_Row, _Row]) -> dict[int, str]:
        tw, tl = (len(r.q) for r in rows)
        pw, pl = (int(r.q[-1]) + 1 for r in rows)
        in_cross = {i for x, y, _ in self.cross for i in (x, y)}
        plan = {}
        for idx in self.captured:
            entry = self.cov.entries[idx]
            if self.form[idx] == "vector":
                plan[idx] = "vector"
            elif self.form[idx] == "embedding":
                plan[idx] = "sketch" if self.mode == "sketch" else "ghost"
            elif "weight" not in entry.tracked:
                plan[idx] = "vector"
            elif self.mode == "sketch":
                plan[idx] = "sketch"
            elif idx in in_cross:
                plan[idx] = "ghost"
            elif LINEAR_PATH != "auto":
                plan[idx] = LINEAR_PATH
            else:
                d_in, d_out = entry.reducer.dims(entry.module)
                ghost = min(tl * pw * pl + tw * tl * pw, tw * pw * pl + tw * tl * pl) * d_out + pw * pl * d_in
                explicit = (tw * pw + tl * pl + tw * tl) * d_in * d_out
                plan[idx] = "ghost" if ghost <= explicit else "explicit"
        return plan

    def _out_width(self, idx: int) -> int:
        entry = self.cov.entries[idx]
        if self.form[idx] == "embedding":
            return entry.module.embedding_dim
        if self.form[idx] in ("linear", "conv1d"):
            return entry.reducer.dims(entry.module)[1]
        return sum(p.numel() for p in entry.module.parameters(recurse=False))

    def _token_bytes(self, plan: dict[int, str], prefix: int) -> int:
        """Bytes of one token's kept factors (the rejected side's per-token cost)."""
        size = torch.finfo(self.cdt).bits // 8
        total = self.weight.shape[1] + 3
        for idx, path in plan.items():
            entry = self.cov.entries[idx]
            if path == "ghost":
                total += prefix * self._out_width(idx)
            elif path == "sketch":
                total += self.k * self.k + (self._out_width(idx) if "bias" in entry.tracked else 0)
            else:
                total += sum(entry.module._parameters[a].numel() for a in entry.tracked)
        return total * size

    def _chunk_size(self, prefix: int) -> int:
        if self.chunk_override is not None:
            return max(1, int(self.chunk_override))
        size = torch.finfo(self.cdt).bits // 8
        width = sum(self._out_width(i) for i in self.captured) + self.weight.shape[1]
        # The batched backward holds about one more activation-sized buffer per token besides the gammas it returns.
        per_token = 2 * max(prefix, 1) * width * size
        return int(max(1, min(MAX_CHUNK_TOKENS, self.budget // 2 // per_token)))

    # -- sketches ---------------------------------------------------------------------------------------------------

    def _sketch(self, idx: int):
        """The Kronecker sketch of entry ``idx``'s weight (a tied matrix: one sketch for both uses)."""
        from entangle_fast.sketch import KroneckerSketch, layer_seed

        key = idx
        for users in self.cov.shared.values():
            if idx in [u for u, _ in users]:
                key = users[0][0]
        if key not in self.sketches:
            entry = self.cov.entries[key]
            d_in, d_out = entry.reducer.dims(entry.module)  # embeddings: the d side is the input, the V side the output
            self.sketches[key] = KroneckerSketch(d_in, d_out, self.k, seed=layer_seed(self.seed, entry.name),
                                                 device=self.weight.device, dtype=self.cdt)
        return self.sketches[key]

    # -- the pair pass: inputs, head factors, seeds, output layer ----------------------------------------------------

    @torch.no_grad()
    def _pair_pass(self, rows: tuple[_Row, _Row], tensors: tuple[Tensor, Tensor, Tensor]):
        """One no-grad forward of the padded pair: every captured module's input per row, the head factors
        ``(h, y, lse)`` and seeds r_t = d l_t / d h_t of all response tokens (one fused log-prob call), and the exact
        output-layer token statistics from the same hidden states."""
        input_ids, mask, labels = tensors
        store: dict[int, Tensor] = {}
        recorders: dict[int, object] = {}
        rows_, width = input_ids.shape

        def before(idx, module, args, kwargs):
            recorders[idx] = _LookupRecorder(module.weight, rows_)
            recorders[idx].__enter__()

        def hook(idx, module, args, kwargs, output):
            name = self.cov.entries[idx].name
            if idx in store:
                raise RuntimeError(f"module {name!r} ran twice in one forward; the profiler needs one call per module")
            try:
                if idx in recorders:  # an embedding subclass: the lookup's own ids, and its output's scale
                    x, self.gamma_scale[idx] = lookup_scale(recorders.pop(idx), output)
                elif not args or not isinstance(args[0], Tensor) or not isinstance(output, Tensor):
                    raise CaptureError("it must take its input as the first positional tensor and return a tensor")
                else:
                    x = args[0]
                store[idx] = as_rows(x, rows_, width, ids=self.form[idx] == "embedding")
            except CaptureError as err:
                raise RuntimeError(f"module {name!r}: {err}") from err

        handles = []
        for i in self.perturbed:
            module = self.cov.entries[i].module
            if self.form[i] == "embedding" and not stock_forward(module, nn.Embedding):
                handles.append(module.register_forward_pre_hook(partial(before, i), with_kwargs=True))
            handles.append(module.register_forward_hook(partial(hook, i), with_kwargs=True))
        try:
            hidden = backbone_hidden_states(self.model, input_ids, mask).to(self.weight.dtype)
        finally:
            for h in handles:
                h.remove()
        acts = []
        for r, row in enumerate(rows):
            span = slice(row.offset, row.offset + int(row.q[-1]) + 1)
            acts.append({i: (x[r, span] if self.form[i] == "embedding" else x[r, span].to(self.cdt))
                         for i, x in store.items()})
        h = torch.cat([hidden[r, row.offset + row.q] for r, row in enumerate(rows)])
        y = torch.cat([row.y for row in rows])
        seeds, lse = self._head_grads(h, y)
        tw = len(rows[0].q)
        heads = [(h[:tw].to(self.cdt), y[:tw], lse[:tw]), (h[tw:].to(self.cdt), y[tw:], lse[tw:])]
        head_stats = None
        if self.head is not None:
            stats = output_layer_token_stats(hidden[:, :-1], self.weight, labels[:, 1:].contiguous(), bias=self.bias,
                                             transform=self.transform)
            head_stats = stats.pair(0)
        return acts, heads, (seeds[:tw], seeds[tw:]), head_stats

    def _head_grads(self, hq: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """``(r [n, d], lse [n])``: d l_t / d h_t through the fused log-prob op's backward, and the log-sum-exp."""
        weight, bias = self.weight, self.bias
        h = hq.detach().requires_grad_(True)
        with torch.enable_grad():
            lp = linear_logprobs(h, weight, y, bias=bias, transform=self.transform)
            (r,) = torch.autograd.grad(lp.sum(), h)
        target = (hq.to(self.cdt) * weight[y].to(self.cdt)).sum(-1)
        if bias is not None:
            target = target + bias[y].to(self.cdt)
        return r, self.transform(target) - lp.detach().to(self.cdt)

    # -- one chunk of tokens ------------------------------------------------------------------------------------------

    def _chunk_forward(self, ids: Tensor, eps: tuple[Tensor, ...], vec: dict[str, Tensor]) -> Tensor:
        """Backbone forward on ``ids [1, P]`` with ``eps`` added to the perturbed modules' outputs and ``vec`` in place
        of the position-wise modules' parameters: ``hidden [1, P, d]``."""
        from torch.func import functional_call
        from torch.nn.attention import SDPBackend, sdpa_kernel

        handles = [self.cov.entries[i].module.register_forward_hook(lambda m, a, o, e=e: o + e.reshape(o.shape))
                   for i, e in zip(self.perturbed, eps)]
        try:
            # SDPA's fused CPU/GPU kernels have no vmap batching rule (the batched backward would loop token by
            # token); the math path computes the same function from batchable ops.
            with sdpa_kernel(SDPBackend.MATH), _BackboneCall(self.model), _FusedActivations(self.model):
                return functional_call(self.model, vec, (ids,), {"attention_mask": torch.ones_like(ids)},
                                       strict=False, tie_weights=False)
        finally:
            for h in handles:
                h.remove()

    def _chunk(self, row: _Row, acts: dict[int, Tensor], head, seeds: Tensor, i0: int, i1: int,
               plan: dict[int, str]) -> _Factors:
        """Factors of the loss tokens ``i0:i1`` of ``row``: one prefix forward under ``torch.func.vjp`` (inputs: the
        zero perturbations and the position-wise parameters) and its pull-back vmapped over the tokens' seeds."""
        from torch.func import vjp, vmap

        n = i1 - i0
        q = row.q[i0:i1]
        prefix = int(q[-1]) + 1
        ids = row.ids[None, :prefix]
        dtype, device = self.weight.dtype, ids.device
        eps = tuple(torch.zeros(1, prefix, self._out_width(i), dtype=dtype, device=device) for i in self.perturbed)
        vec = {f"{self.cov.entries[i].name}.{a}": self.cov.entries[i].module._parameters[a].detach()
               for i in self.vectors for a in self.cov.entries[i].tracked}
        grad_out = torch.zeros(n, 1, prefix, seeds.shape[1], dtype=seeds.dtype, device=device)
        grad_out[torch.arange(n, device=device), 0, q] = seeds[i0:i1]
        # Outside no_grad the parameters' requires_grad would make autograd record the whole batched backward too;
        # torch.func transforms differentiate whatever the outer grad mode is.
        with torch.no_grad():
            _, pull = vjp(lambda e, v: self._chunk_forward(ids, e, v), eps, vec)
            g_eps, g_vec = vmap(pull)(grad_out)
        del pull
        self.token_backwards += n
        self.batched_backwards += 1
        out = _Factors(slice(i0, i1), prefix, head=tuple(t[i0:i1] for t in head))
        for idx, g in zip(self.perturbed, g_eps):
            self._reduce(idx, plan[idx], acts[idx][:prefix], g[:, 0], out)
        for idx, names in self.vectors.items():
            out.feats[idx] = torch.cat([g_vec[name].reshape(n, -1) for name in names], 1).to(self.cdt)
        if self._tied_head_cross() and self.mode == "sketch":
            out.head_sketch = self._head_sketch(*out.head)
        return out

    def _reduce(self, idx: int, path: str, x: Tensor, g: Tensor, out: _Factors) -> None:
        """Keep what entry ``idx``'s share of K needs from its input ``x [P, ...]`` and gammas ``g [n, P, d_out]``."""
        entry = self.cov.entries[idx]
        n = g.shape[0]
        g = g.to(self.cdt)
        if idx in self.gamma_scale:  # the gradient at the module's output, times c, is the one at its lookup
            g = g * self.gamma_scale[idx]
        if path == "ghost":
            out.gamma[idx] = g
            out.acts[idx] = x
            return
        parts = []
        if path == "explicit":
            parts.append(torch.einsum("npo,pi->noi", g, x).reshape(n, -1))
        elif path == "sketch":
            sk = self._sketch(idx)
            if entry.kind == "embedding":
                pv = sk.p_out[:, x].T * self._embedding_keep(entry, x)[:, None]   # [P, k] the V side, by ids
                pd = g @ sk.p_in.T                                               # [n, P, k] the d side
                parts.append(torch.einsum("pk,npj->nkj", pv, pd).reshape(n, -1))
            else:
                pa = x @ sk.p_in.T                                               # [P, k]
                pg = g @ sk.p_out.T                                              # [n, P, k]
                parts.append(torch.einsum("npk,pj->nkj", pg, pa).reshape(n, -1))
        if "bias" in entry.tracked:
            parts.append(g.sum(1))
        out.feats[idx] = torch.cat(parts, 1) if len(parts) > 1 else parts[0]

    @staticmethod
    def _embedding_keep(entry, ids: Tensor) -> Tensor:
        pad = entry.module.padding_idx
        return torch.ones(ids.shape, dtype=torch.bool, device=ids.device) if pad is None else ids != pad

    def _tied_head_cross(self) -> bool:
        return any(self.head in (x, y) for x, y, _ in self.cross)

    def _head_sketch(self, h: Tensor, y: Tensor, lse: Tensor) -> Tensor:
        """``[n, k*k]`` sketches (P_V delta_t)(P_d h_t)^T of the head's per-token gradients delta_t h_t^T."""
        emb = next(x if y_ == self.head else y_ for x, y_, _ in self.cross if self.head in (x, y_))
        sk = self._sketch(emb)
        proj = torch.zeros(h.shape[0], self.k, dtype=self.cdt, device=h.device)
        step = max(1, (1 << 24) // max(h.shape[0], 1))
        for v0 in range(0, self.weight.shape[0], step):
            v1 = min(v0 + step, self.weight.shape[0])
            z = h @ self.weight[v0:v1].to(self.cdt).T
            if self.bias is not None:
                z = z + self.bias[v0:v1].to(self.cdt)
            p = torch.exp(self.transform(z) - lse[:, None])
            if not self.transform.identity:
                p = p * self.transform.derivative(z)
            proj += p @ sk.p_out[:, v0:v1].T
        at_label = 1.0  # f'(l_t[y_t])
        if not self.transform.identity:
            logit = (h * self.weight[y].to(self.cdt)).sum(-1)
            if self.bias is not None:
                logit = logit + self.bias[y].to(self.cdt)
            at_label = self.transform.derivative(logit)[:, None]
        pv = sk.p_out[:, y].T * at_label - proj                   # P_V delta_t
        pd = h @ sk.p_in.T
        return (pv[:, :, None] * pd[:, None, :]).reshape(h.shape[0], -1)

    # -- contraction --------------------------------------------------------------------------------------------------

    def _m(self, x: int, y: int, aw: Tensor, al: Tensor, attrs=("weight", "bias")) -> Tensor:
        """``[P_w, P_l]`` activation factor of the ghost form between use x (chosen side, inputs ``aw``) and use y
        (rejected side, ``al``)."""
        ex, ey = self.cov.entries[x], self.cov.entries[y]
        if ex.kind == "embedding":
            eq = aw[:, None] == al[None, :]
            eq &= self._embedding_keep(ex, aw)[:, None] & self._embedding_keep(ey, al)[None, :]
            return eq.to(self.cdt)
        m = aw @ al.T if "weight" in attrs and "weight" in ex.tracked else torch.zeros(
            aw.shape[0], al.shape[0], dtype=self.cdt, device=aw.device)
        if "bias" in attrs and "bias" in ex.tracked:
            m = m + 1.0
        return m

    def _fold(self, held: _Factors, chosen_acts: dict[int, Tensor]) -> None:
        """Fold a kept rejected chunk's gammas with the chosen row's whole activation factor, once:
        H[s, tau] = sum_sigma M[tau, sigma] gamma^(s)_sigma, ``[k, P_w, d_out]``. Each chosen chunk's share is then
        one Gram over its own prefix. Entries with cross terms keep their raw gammas."""
        in_cross = {i for x, y, _ in self.cross for i in (x, y)}
        for idx in list(held.gamma):
            if idx not in in_cross:
                m = self._m(idx, idx, chosen_acts[idx], held.acts[idx])
                held.folded[idx] = torch.matmul(m, held.gamma.pop(idx))

    def _contract(self, w: _Factors, l: _Factors) -> dict[str, Tensor]:
        out = {}
        for idx in self.captured:
            name = self.cov.entries[idx].name
            if idx in l.folded:
                g = w.gamma[idx]
                n, prefix, d = g.shape
                h = l.folded[idx]
                # The first prefix * d columns of the flattened [k, P_w * d] fold are positions < prefix: a strided
                # view, no copy.
                out[name] = g.reshape(n, -1) @ h.reshape(h.shape[0], -1)[:, : prefix * d].T
            elif idx in w.gamma:
                out[name] = _ghost_contract(w.gamma[idx], l.gamma[idx], self._m(idx, idx, w.acts[idx], l.acts[idx]))
            elif idx in w.feats:
                out[name] = w.feats[idx] @ l.feats[idx].T
        for x, y, attrs in self.cross:
            key = f"{self.cov.entries[x].name} x {self.cov.entries[y].name}"
            if self.head in (x, y):
                emb = y if x == self.head else x
                out[key] = self._head_cross(emb, w, l)
            else:
                out[key] = (_ghost_contract(w.gamma[x], l.gamma[y], self._m(x, y, w.acts[x], l.acts[y], attrs))
                            + _ghost_contract(w.gamma[y], l.gamma[x], self._m(y, x, w.acts[y], l.acts[x], attrs)))
        return out

    def _delta_at(self, head: tuple[Tensor, Tensor, Tensor], ids: Tensor) -> Tensor:
        """``[n, P]`` delta_t[ids_tau] for the head tokens and a row's input ids (:func:`head_delta_at`)."""
        h, y, lse = head
        return head_delta_at(h, y, lse, self.weight, self.bias, ids, self.transform)

    def _head_cross(self, emb: int, w: _Factors, l: _Factors) -> Tensor:
        """Cross terms of a tied matrix: chosen embedding use x rejected head use, plus the mirror."""
        if self.mode == "sketch":
            return w.feats[emb][:, : self.k ** 2] @ l.head_sketch.T + w.head_sketch @ l.feats[emb][:, : self.k ** 2].T
        entry = self.cov.entries[emb]
        ids_w, ids_l = w.acts[emb], l.acts[emb]
        gw, gl = w.gamma[emb], l.gamma[emb]
        d_l = self._delta_at(l.head, ids_w) * self._embedding_keep(entry, ids_w)[None, :]   # [k, P_w]
        d_w = self._delta_at(w.head, ids_l) * self._embedding_keep(entry, ids_l)[None, :]   # [n, P_l]
        emb_head = torch.einsum("npd,sd,sp->ns", gw, l.head[0], d_l)
        head_emb = torch.einsum("td,spd,tp->ts", w.head[0], gl, d_w)
        return emb_head + head_emb

    # -- the pair ------------------------------------------------------------------------------------------------------

    def run(self, rows: tuple[_Row, _Row], tensors: tuple[Tensor, Tensor, Tensor]):
        """``(K [T_w, T_l], per-module totals, per-module matrices | None, paths, output-layer pair stats | None)``."""
        chosen, rejected = rows
        tw, tl = len(chosen.q), len(rejected.q)
        plan = self._plan(rows)
        names = [self.cov.entries[i].name for i in self.captured] + [
            f"{self.cov.entries[x].name} x {self.cov.entries[y].name}" for x, y, _ in self.cross]
        device = self.weight.device
        total = torch.zeros(tw, tl, dtype=self.cdt, device=device)
        sums = {name: torch.zeros((), dtype=self.cdt, device=device) for name in names}
        mats = {name: torch.zeros(tw, tl, dtype=self.cdt, device=device) for name in names} \
            if self.keep_modules else None
        acts, heads, seeds, head_stats = self._pair_pass(rows, tensors)
        if self.perturbed or self.vectors:
            chunk = self._chunk_size(max(int(chosen.q[-1]), int(rejected.q[-1])) + 1)
            per_token = self._token_bytes(plan, int(chosen.q[-1]) + 1)
            block = max(chunk, (self.budget // 2) // max(per_token, 1) // chunk * chunk)
            for b0 in range(0, tl, block):
                b1 = min(b0 + block, tl)
                held = []
                for a in range(b0, b1, chunk):
                    part = self._chunk(rejected, acts[1], heads[1], seeds[1], a, min(a + chunk, b1), plan)
                    self._fold(part, acts[0])
                    held.append(part)
                for c0 in range(0, tw, chunk):
                    part = self._chunk(chosen, acts[0], heads[0], seeds[0], c0, min(c0 + chunk, tw), plan)
                    for other in held:
                        for name, k in self._contract(part, other).items():
                            total[part.tokens, other.tokens] += k
                            sums[name] += k.sum()
                            if mats is not None:
                                mats[name][part.tokens, other.tokens] = k
                    del part
                del held
        paths = {self.cov.entries[i].name: plan[i] for i in self.captured}
        paths.update({f"{self.cov.entries[x].name} x {self.cov.entries[y].name}": "cross" for x, y, _ in self.cross})
        if head_stats is not None:
            head_stats["chosen_positions"], head_stats["rejected_positions"] = (r.q + r.offset for r in rows)
        return total, sums, mats, paths, head_stats


def _resolve_mode(mode: str, rows: tuple[_Row, _Row]) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "auto":
        return "sketch" if max(len(r.q) for r in rows) > AUTO_SKETCH_TOKENS else "exact"
    return mode


class _EvalMode:
    """Dropout off for the duration (the per-token gradients are those of the deterministic model)."""

    def __init__(self, model: nn.Module):
        self.model, self.was = model, model.training

    def __enter__(self):
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was)
        return False


def per_token_matrix(
    model: nn.Module,
    batch: dict,
    *,
    params=None,
    exclude=(),
    mode: str = "exact",
    sketch_dim: int = DEFAULT_SKETCH_DIM,
    seed: int = 0,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    chunk_tokens: int | None = None,
    module_matrices: bool = False,
) -> TokenMatrix:
    """The full-model token matrix K[t, s] = <grad l^w_t, grad l^l_s> of one preference pair.

    Args:
        model: a Hugging Face causal LM (the parameter kinds of :class:`entangle_fast.EntanglementMonitor`).
        batch: one pair, ``[2, T]`` rows (chosen, rejected) in any layout :func:`entangle_fast.preference_logprobs`
            accepts (``input_ids``, ``attention_mask``, ``labels`` with -100 on the prompt and padding).
        params, exclude: the tracked parameters, as for the monitor (default: every parameter with requires_grad).
        mode: ``"exact"``, ``"sketch"`` (matrix parameters by Kronecker sketches of size ``sketch_dim``, seeded by
            ``seed``: unbiased estimates, memory independent of the layer widths) or ``"auto"`` (sketch when a
            response is longer than :data:`AUTO_SKETCH_TOKENS`).
        memory_budget: bytes of per-token factors to hold at once; the rejected side is kept in blocks of that size
            (a second block makes the chosen side run again).
        chunk_tokens: loss tokens per batched backward (default: by the budget, at most :data:`MAX_CHUNK_TOKENS`).
        module_matrices: also return each module's ``[T_w, T_l]`` share.

    Returns:
        :class:`TokenMatrix`, in float64 for a float64 model and float32 otherwise.
    """
    rows, tensors = _pair_rows(batch)
    mode = _resolve_mode(mode, rows)
    if not isinstance(sketch_dim, int) or sketch_dim < 1:
        raise ValueError(f"sketch_dim must be a positive int, got {sketch_dim!r}")
    coverage = build_coverage(model, params, exclude)
    with _EvalMode(model):
        engine = _PairEngine(model, coverage, mode=mode, sketch_dim=sketch_dim, seed=seed,
                             memory_budget=int(memory_budget), chunk_tokens=chunk_tokens,
                             module_matrices=module_matrices)
        total, sums, mats, paths, head = engine.run(rows, tensors)
    if head is not None:
        name = coverage.entries[coverage.head].name
        k_head = head["token_matrix"].to(total.dtype)
        total = total + k_head
        sums, paths = {**sums, name: k_head.sum()}, {**paths, name: "head"}
        if mats is not None:
            mats[name] = k_head
    # Module order (the model's), cross terms last.
    order = {e.name: i for i, e in enumerate(coverage.entries)}
    rank = lambda n: order.get(n, len(order))  # noqa: E731
    paths = dict(sorted(paths.items(), key=lambda kv: rank(kv[0])))
    sums = {n: sums[n] for n in paths}
    if mats is not None:
        mats = {n: mats[n] for n in paths}
    sketched = tuple(n for n, p in paths.items() if p == "sketch"
                     or (p == "cross" and mode == "sketch"))
    return TokenMatrix(
        matrix=total,
        per_module=sums,
        chosen_positions=rows[0].q + rows[0].offset,
        rejected_positions=rows[1].q + rows[1].offset,
        mode=mode,
        sketched=sketched,
        paths=paths,
        module_matrices=mats,
        output_layer=head,
        token_backwards=engine.token_backwards,
        batched_backwards=engine.batched_backwards,
    )


# ----------------------------------------------------------------------------------------------------------------------
# The baseline: the paper's per-token loop
# ----------------------------------------------------------------------------------------------------------------------


def _row_token_logps(model: nn.Module, row: _Row) -> Tensor:
    """``[T]`` response-token log-probs of one unpadded row through the model's full logits (the plain way)."""
    logits = model(input_ids=row.ids[None]).logits[0, :-1]
    logits = logits if logits.dtype == torch.float64 else logits.float()
    return torch.log_softmax(logits, -1)[row.q, row.y]


def per_token_matrix_baseline(model: nn.Module, batch: dict, *, params=None, exclude=(),
                              memory_budget: int | None = None, timings: dict | None = None) -> Tensor:
    """K[t, s] the way the paper's heat-maps compute it: one ``retain_graph`` backward per response token through the
    plain logits, every tracked parameter's gradient flattened into one vector, then dot products. The benchmark
    baseline of :func:`per_token_matrix`; exact, slow, and parameter-sized in memory.

    Streaming: the chosen tokens' flattened gradients are kept (``[T_w, n_params]``), then each rejected token takes
    one backward and a matrix-vector product with them, so at most ``T_w + 1`` gradients are alive. When
    ``memory_budget`` (bytes) cannot hold all chosen gradients they are kept in blocks, and every extra block repeats
    the rejected backwards (``T_w + T_l * blocks`` backwards in all).

    Args:
        timings: when given, filled with ``chosen_block``, ``blocks``, ``backwards`` and the seconds spent in the
            chosen backwards (with the copy into the kept gradients), the rejected backwards (with the flattening)
            and the matrix-vector products (``chosen_seconds``, ``rejected_seconds``, ``dot_seconds``).

    Returns:
        ``[T_w, T_l]`` in float64 for a float64 model, else float32.
    """
    rows, _ = _pair_rows(batch)
    tracked = resolve_params(model, params, exclude)
    if not tracked:
        raise ValueError("no tracked parameters")
    cdt = compute_dtype(tracked[0].dtype)
    device = tracked[0].device
    sizes = [p.numel() for p in tracked]
    n_params = sum(sizes)
    tw, tl = len(rows[0].q), len(rows[1].q)
    row_bytes = n_params * (torch.finfo(cdt).bits // 8)
    block = tw if memory_budget is None else max(1, min(tw, int(memory_budget) // row_bytes))
    out = torch.zeros(tw, tl, dtype=cdt, device=device)
    clock = {"chosen_seconds": 0.0, "rejected_seconds": 0.0, "dot_seconds": 0.0}

    def tick():
        if timings is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    with _EvalMode(model), torch.enable_grad():
        lw = _row_token_logps(model, rows[0])
        ll = _row_token_logps(model, rows[1])
        kept = torch.empty(block, n_params, dtype=cdt, device=device)
        for b0 in range(0, tw, block):
            b1 = min(b0 + block, tw)
            start = tick()
            for i, t in enumerate(range(b0, b1)):
                grads = torch.autograd.grad(lw[t], tracked, retain_graph=True, allow_unused=True)
                offset = 0
                for g, size in zip(grads, sizes):
                    if g is None:
                        kept[i, offset: offset + size] = 0
                    else:
                        kept[i, offset: offset + size] = g.reshape(-1)
                    offset += size
            clock["chosen_seconds"] += tick() - start
            for s in range(tl):
                start = tick()
                grads = torch.autograd.grad(ll[s], tracked, retain_graph=True, allow_unused=True)
                flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).to(cdt)
                                  for g, p in zip(grads, tracked)])
                middle = tick()
                out[b0:b1, s] = kept[: b1 - b0] @ flat
                clock["rejected_seconds"] += middle - start
                clock["dot_seconds"] += tick() - middle
                del grads, flat
        del kept
    if timings is not None:
        blocks = -(-tw // block)
        timings.update(clock, chosen_block=block, blocks=blocks, backwards=tw + tl * blocks)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# One pair, profiled
# ----------------------------------------------------------------------------------------------------------------------

CASE_NAMES = {0: "undefined", 1: "ideal: chosen rises, rejected falls", 2: "both fall", 3: "both rise"}


@dataclass
class PairProfile:
    """Everything the profiler reports about one pair (log-prob units throughout).

    Attributes:
        token: :class:`TokenMatrix` (full model; its ``output_layer`` is the exact output-layer statistics).
        chosen_token_logps / rejected_token_logps: ``[T_w]`` / ``[T_l]`` response-token log-probs.
        chosen_logp / rejected_logp: ``[]`` sequence log-probs s_w, s_l.
        inner, chosen_sq_norm, rejected_sq_norm, cosine: ``[]`` I, N_w, N_l, cos of the whole tracked set, from one
            monitored backward (exact, whatever ``token.mode``).
        case: the paper's case for a DPO-like loss (a_w = -a_l): 1 ideal, 2 both fall, 3 both rise, 0 undefined.
        chosen_falls / rejected_rises: first-order SGD outcome (I > N_w, I > N_l).
        per_module: module name -> ``(inner, chosen_sq_norm, rejected_sq_norm)`` (the monitor's).
        position_attribution: ``[P_w, P_l]`` the monitor's split of I over the positions where layers act (every
            position of the two rows, prompt included; not K). chosen_input_ids / rejected_input_ids: ``[P_w]`` /
            ``[P_l]`` the rows' input ids (its axes).
        chosen_ids / rejected_ids: ``[T_w]`` / ``[T_l]`` response token ids (K's axes).
    """

    token: TokenMatrix
    chosen_token_logps: Tensor
    rejected_token_logps: Tensor
    chosen_logp: Tensor
    rejected_logp: Tensor
    inner: Tensor
    chosen_sq_norm: Tensor
    rejected_sq_norm: Tensor
    cosine: Tensor
    case: int
    chosen_falls: bool
    rejected_rises: bool
    per_module: dict[str, tuple[Tensor, Tensor, Tensor]]
    position_attribution: Tensor
    chosen_input_ids: Tensor
    rejected_input_ids: Tensor
    chosen_ids: Tensor
    rejected_ids: Tensor


def _monitored(model: nn.Module, batch: dict, params, exclude):
    """Log-probs and the monitor's statistics of the pair from one backward of L = s_l - s_w (a_w = -1, a_l = 1)."""
    from entangle_fast.monitor import EntanglementMonitor
    from entangle_fast.preference import preference_logprobs

    coverage_params = resolve_params(model, params, exclude)
    with _EvalMode(model), torch.enable_grad():
        with EntanglementMonitor(model, params=params, exclude=exclude, position_attribution=True) as mon:
            out = preference_logprobs(model, batch)
            loss = (out.rejected_logps - out.chosen_logps).sum()
            # autograd.grad, not backward(): the profiler leaves the parameters' .grad alone.
            torch.autograd.grad(loss, coverage_params, allow_unused=True)
    return out, mon.stats


def profile_pair(model: nn.Module, batch: dict, *, params=None, exclude=(), mode: str = "auto",
                 sketch_dim: int = DEFAULT_SKETCH_DIM, seed: int = 0, memory_budget: int = DEFAULT_MEMORY_BUDGET,
                 chunk_tokens: int | None = None) -> PairProfile:
    """Profile one preference pair: :func:`per_token_matrix` plus log-probs, the monitor's exact per-module
    statistics and position attribution, and the paper's case. Arguments as in :func:`per_token_matrix`."""
    token = per_token_matrix(model, batch, params=params, exclude=exclude, mode=mode, sketch_dim=sketch_dim,
                             seed=seed, memory_budget=memory_budget, chunk_tokens=chunk_tokens)
    rows, (input_ids, mask, labels) = _pair_rows(batch)
    out, stats = _monitored(model, batch, params, exclude)
    keep = out.token_mask
    lw, ll = out.chosen_token_logps[0][keep[0]].detach(), out.rejected_token_logps[0][keep[1]].detach()
    pw, pl = (len(r.ids) for r in rows)
    attribution = stats.position_attribution[0]
    attribution = attribution[rows[0].offset: rows[0].offset + pw, rows[1].offset: rows[1].offset + pl]
    return PairProfile(
        token=token,
        chosen_token_logps=lw,
        rejected_token_logps=ll,
        chosen_logp=out.chosen_logps[0].detach(),
        rejected_logp=out.rejected_logps[0].detach(),
        inner=stats.inner[0],
        chosen_sq_norm=stats.chosen_sq_norm[0],
        rejected_sq_norm=stats.rejected_sq_norm[0],
        cosine=stats.cosine[0],
        case=int(stats.case[0]),
        chosen_falls=bool(stats.chosen_falls[0]),
        rejected_rises=bool(stats.rejected_rises[0]),
        per_module={k: tuple(t[0] for t in v) for k, v in stats.per_module.items()},
        position_attribution=attribution,
        chosen_input_ids=rows[0].ids,
        rejected_input_ids=rows[1].ids,
        chosen_ids=rows[0].y,
        rejected_ids=rows[1].y,
    )


# ----------------------------------------------------------------------------------------------------------------------
# Data, models, and a whole run
# ----------------------------------------------------------------------------------------------------------------------

PAIR_KEYS = ("prompt", "chosen", "rejected")


def _check_pair(pair, where: str) -> dict:
    if not isinstance(pair, dict):
        raise ValueError(f"{where}: a pair must be a JSON object with {list(PAIR_KEYS)}, got {type(pair).__name__}")
    missing = [k for k in PAIR_KEYS if k not in pair]
    if missing:
        raise ValueError(f"{where}: missing {missing} (a pair needs 'prompt', 'chosen' and 'rejected')")
    for key in PAIR_KEYS:
        value = pair[key]
        ok = isinstance(value, str) or (isinstance(value, list) and all(
            isinstance(m, dict) and isinstance(m.get("content"), str) and isinstance(m.get("role"), str)
            for m in value))
        if not ok:
            raise ValueError(f"{where}: {key!r} must be a string or a list of {{'role', 'content'}} messages")
    if not (isinstance(pair["chosen"], str) and pair["chosen"].strip() or isinstance(pair["chosen"], list)
            and pair["chosen"]):
        raise ValueError(f"{where}: 'chosen' is empty")
    if not (isinstance(pair["rejected"], str) and pair["rejected"].strip() or isinstance(pair["rejected"], list)
            and pair["rejected"]):
        raise ValueError(f"{where}: 'rejected' is empty")
    return {k: pair[k] for k in PAIR_KEYS}


def load_pairs(path) -> list[dict]:
    """Preference pairs from a JSON lines file: one object per line with ``prompt``, ``chosen`` and ``rejected``,
    each a string or a list of ``{"role", "content"}`` messages (TRL's conversational format). Blank lines are
    skipped; other keys are ignored.

    Raises:
        FileNotFoundError: no such file. ValueError: a bad line, naming the file and line number.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    pairs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err.msg})") from err
            pairs.append(_check_pair(obj, where))
    if not pairs:
        raise ValueError(f"{path}: no preference pairs in the file")
    return pairs


def pair_hash(pair: dict) -> str:
    """A short digest of a pair's text, to check that resumed records belong to the same data."""
    blob = json.dumps({k: pair[k] for k in PAIR_KEYS}, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def _messages(value, role: str) -> list[dict]:
    return value if isinstance(value, list) else [{"role": role, "content": value}]


def _plain(value) -> str:
    return value if isinstance(value, str) else "\n".join(m["content"] for m in value)


def encode_pair(tokenizer, pair: dict, *, device=None) -> dict:
    """``[2, T]`` ``input_ids``, ``attention_mask`` and ``labels`` of one pair (chosen row, rejected row; right
    padding; labels -100 on the prompt and padding).

    With a chat template, the prompt is rendered with ``add_generation_prompt=True`` and each response is the rest of
    the rendered conversation (prompt + response); strings count as one user turn and one assistant turn. Without
    one, each row is ``[bos] prompt response [eos]`` (the special tokens the tokenizer has).
    """
    rows, labels = [], []
    template = getattr(tokenizer, "chat_template", None)
    for side in ("chosen", "rejected"):
        if template:
            prompt_msgs = _messages(pair["prompt"], "user")
            prompt_text = tokenizer.apply_chat_template(prompt_msgs, tokenize=False, add_generation_prompt=True)
            full = tokenizer.apply_chat_template(prompt_msgs + _messages(pair[side], "assistant"), tokenize=False)
            if not full.startswith(prompt_text):
                raise ValueError("the chat template does not render the prompt as a prefix of prompt + response; "
                                 "pass plain strings or a template that does")
            prompt = tokenizer.encode(prompt_text, add_special_tokens=False)
            response = tokenizer.encode(full[len(prompt_text):], add_special_tokens=False)
        else:
            bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
            prompt = ([bos] if bos is not None else []) + tokenizer.encode(_plain(pair["prompt"]),
                                                                            add_special_tokens=False)
            response = tokenizer.encode(_plain(pair[side]), add_special_tokens=False)
            response += [eos] if eos is not None else []
        if not prompt:
            raise ValueError("the prompt encodes to no token and the tokenizer has no BOS token: nothing scores the "
                             "first response token")
        if not response:
            raise ValueError(f"the {side} response encodes to no token")
        rows.append(prompt + response)
        labels.append([IGNORE_INDEX] * len(prompt) + response)
    batch = collate_rows(rows, labels, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    return {k: v.to(device) for k, v in batch.items()} if device is not None else batch


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"``: the first CUDA device when there is one, else the CPU; otherwise ``torch.device(device)``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"unknown device {device!r}") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available here")
    return dev


def _resolve_dtype(dtype: str) -> torch.dtype | None:
    if dtype == "auto":
        return None
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def load_model(path, *, device: str = "auto", dtype: str = "auto"):
    """``(model, tokenizer)`` from a local Hugging Face folder (``AutoModelForCausalLM``/``AutoTokenizer``, local files
    only), in eval mode on ``device``; ``dtype="auto"`` keeps the checkpoint's dtype.

    Raises:
        FileNotFoundError: the path does not exist. ValueError: it holds no loadable causal LM and tokenizer.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model path {str(path)!r} does not exist (--model takes a local Hugging Face folder)")
    torch_dtype = _resolve_dtype(dtype)
    dev = resolve_device(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True,
                                                     dtype=torch_dtype if torch_dtype is not None else "auto")
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"cannot load a causal LM and its tokenizer from {str(path)!r}: {err}") from err
    return model.to(dev).eval(), tokenizer


def builtin_model(arch: str = "llama", *, device: str = "auto", dtype: str = "auto", seed: int = 0):
    """``(model, tokenizer)``: the tiny model and word-level tokenizer of :mod:`entangle_fast.models` (no download)."""
    from entangle_fast.models import TinyConfig, build_tokenizer, tiny_model

    tokenizer = build_tokenizer()
    torch_dtype = _resolve_dtype(dtype) or torch.float32
    model = tiny_model(arch, TinyConfig(vocab_size=len(tokenizer)), seed=seed, dtype=torch_dtype)
    return model.to(resolve_device(device)).eval(), tokenizer


def decode_tokens(tokenizer, ids) -> list[str]:
    """Each id decoded on its own (what a heat-map axis shows)."""
    return [tokenizer.decode([int(i)]) for i in ids]


@dataclass
class ProfileRun:
    """What :func:`run_profile` did: ``records`` (every finished pair, this run's and resumed ones, by index),
    ``computed`` / ``skipped`` pair indices, and the files."""

    out_dir: Path
    records_path: Path
    html_path: Path | None
    records: list[dict]
    computed: list[int]
    skipped: list[int]


def run_profile(model: nn.Module, tokenizer, pairs: list[dict], out_dir, *, resume: bool = False,
                max_pairs: int | None = None, progress: bool = True, mode: str = "auto",
                sketch_dim: int = DEFAULT_SKETCH_DIM, seed: int = 0, memory_budget: int = DEFAULT_MEMORY_BUDGET,
                chunk_tokens: int | None = None, embed_images: bool = False, meta: dict | None = None,
                params=None, exclude=()) -> ProfileRun:
    """Profile ``pairs`` one by one and write the report into ``out_dir`` (see :mod:`entangle_fast.report`).

    Each finished pair's record is appended to ``profile.jsonl`` (flushed and fsync'ed) before the next pair starts.
    ``resume=True`` keeps the records already there and profiles only the missing pairs (their text must match);
    without it, an existing non-empty ``profile.jsonl`` is an error rather than silently overwritten. The HTML report
    is written at the end, also when the run is interrupted (covering the pairs finished so far).

    Args:
        max_pairs: profile at most the first ``max_pairs`` pairs of ``pairs``.
        meta: facts shown at the top of the HTML (model, data, ...).
        Other arguments: as in :func:`profile_pair`.
    """
    from tqdm.auto import tqdm

    from entangle_fast import report

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records_path = out_dir / report.RECORDS_NAME
    if max_pairs is not None:
        if max_pairs < 1:
            raise ValueError(f"max_pairs must be at least 1, got {max_pairs}")
        pairs = pairs[:max_pairs]
    hashes = [pair_hash(p) for p in pairs]
    done: dict[int, dict] = {}
    if records_path.exists() and records_path.stat().st_size:
        if not resume:
            raise ValueError(f"{records_path} already holds records: pass --resume (resume=True) to continue that "
                             "run, or choose another output folder")
        for record in report.read_records(records_path, repair=True):
            idx = record["index"]
            if idx < len(hashes) and record.get("pair_hash") != hashes[idx]:
                raise ValueError(f"{records_path}: the record of pair {idx} was made from different data (its text "
                                 "differs); resume with the same --data, or choose another output folder")
            done[idx] = record
    todo = [i for i in range(len(pairs)) if i not in done]
    run_id = uuid.uuid4().hex[:12]
    device = next(model.parameters()).device
    computed = []
    bar = tqdm(total=len(pairs), initial=len(pairs) - len(todo), disable=not progress, desc="profile", unit="pair",
               dynamic_ncols=True)
    try:
        for idx in todo:
            start = time.perf_counter()
            batch = encode_pair(tokenizer, pairs[idx], device=device)
            prof = profile_pair(model, batch, params=params, exclude=exclude, mode=mode, sketch_dim=sketch_dim,
                                seed=seed, memory_budget=memory_budget, chunk_tokens=chunk_tokens)
            record = report.write_pair(
                out_dir, idx, pairs[idx], prof,
                chosen_tokens=decode_tokens(tokenizer, prof.chosen_ids),
                rejected_tokens=decode_tokens(tokenizer, prof.rejected_ids),
                chosen_inputs=decode_tokens(tokenizer, prof.chosen_input_ids),
                rejected_inputs=decode_tokens(tokenizer, prof.rejected_input_ids),
                run_id=run_id, pair_hash=hashes[idx], seconds=time.perf_counter() - start)
            report.append_record(records_path, record)
            done[idx] = record
            computed.append(idx)
            bar.set_postfix(I=f"{record['inner']:.3g}" if record["inner"] is not None else "nan",
                            case=record["case"], refresh=False)
            bar.update(1)
    finally:
        bar.close()
        records = [done[i] for i in sorted(done)]
        html_path = report.write_html(out_dir, records, meta, embed_images=embed_images) if records else None
    return ProfileRun(out_dir, records_path, html_path, records, computed, sorted(set(done) - set(computed)))
