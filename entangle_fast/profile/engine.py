"""The batched per-token engine of :func:`per_token_matrix` (steps 1-4 of :mod:`entangle_fast.profile`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor, nn

from entangle_fast.logprobs import linear_logprobs, output_layer_token_stats
from entangle_fast.token_stats import head_delta_at
from entangle_fast.monitor.coverage import Coverage, build_coverage
from entangle_fast.monitor.kinds.base import CaptureError, as_rows, stock_forward
from entangle_fast.monitor.kinds.embedding import _LookupRecorder, lookup_scale
from entangle_fast.monitor.reductions import compute_dtype
from entangle_fast.sketch import SketchCache
from entangle_fast.preference import (
    IGNORE_INDEX,
    backbone_hidden_states,
    normalize_batch,
    logit_transform,
    output_head,
)
from entangle_fast.profile.results import TokenMatrix

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
        self.sketches = SketchCache(seed, sketch_dim)
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
        key = idx
        for users in self.cov.shared.values():
            if idx in [u for u, _ in users]:
                key = users[0][0]
        entry = self.cov.entries[key]
        d_in, d_out = entry.reducer.dims(entry.module)  # embeddings: the d side is the input, the V side the output
        return self.sketches.get(entry.name, d_in, d_out, device=self.weight.device, dtype=self.cdt)

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
