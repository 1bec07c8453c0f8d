"""Per-module reductions of one backward to per-pair gradient inner products (docs/math.md section 4).

Every function here returns :class:`Terms` in *loss units*: the backward carries a_r * d s_r / d(.) at row r, so the
values are a_w a_l I, a_w^2 N_w, a_l^2 N_l; the monitor divides by the coefficients at the end. The exception is the
fused output head, whose statistics arrive in log-prob units (``Terms.logprob_units``).

Tokens are packed row by row, keeping only those whose output gradient is not exactly zero (padding, the last
position): they add nothing to any gradient, and dropping them shortens the ghost sums. Where nearly every token has a
gradient, all are kept as views instead, which saves the copies and costs almost nothing in the sums.

Cost per pair of a linear map with T_w, T_l kept tokens (docs/math.md section 4):
    ghost     ~ (T_w T_l + T_w^2 + T_l^2)(d_in + d_out)      no [d_out, d_in] buffer
    explicit  ~ (T_w + T_l) d_in d_out + 3 d_in d_out         one [d_out, d_in] gradient per row at a time
:func:`choose_linear_path` picks the cheaper; position attribution needs the ghost form.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from entangle_fast._backend import compute_dtype  # noqa: F401  (R.compute_dtype for the monitor and profiler)
from entangle_fast._torch.pair_wgrad import pair_block_index, pair_blocks
from entangle_fast.ghost import ghost_gram
from entangle_fast.token_stats import head_delta_at


class Terms:
    """Per-pair contributions of one module (or one cross term): ``inner``, ``chosen``, ``rejected`` ``[B]``;
    ``attribution``: ``(pair, positions of the chosen row [t_w], positions of the rejected row [t_l], matrix
    [t_w, t_l])`` pieces, summing to ``inner``; ``logprob_units``: already divided by the coefficients;
    ``sketched``: sketch estimates. :meth:`of` makes them from one ``[3, B]`` tensor, split only when read one by
    one (the monitor reads every module's three at once, :meth:`as_stack`)."""

    __slots__ = ("_parts", "_stacked", "attribution", "logprob_units", "sketched")

    def __init__(self, inner: Tensor, chosen: Tensor, rejected: Tensor,
                 attribution: list[tuple[int, Tensor, Tensor, Tensor]] | None = None, logprob_units: bool = False,
                 sketched: bool = False):
        self._parts, self._stacked = (inner, chosen, rejected), None
        self.attribution, self.logprob_units, self.sketched = attribution, logprob_units, sketched

    @classmethod
    def of(cls, stacked: Tensor, **kwargs) -> "Terms":
        """Terms from ``[3, B]`` (inner, chosen, rejected)."""
        terms = cls(None, None, None, **kwargs)
        terms._parts, terms._stacked = None, stacked
        return terms

    def _split(self) -> tuple[Tensor, Tensor, Tensor]:
        if self._parts is None:
            self._parts = tuple(self._stacked.unbind(0))
        return self._parts

    @property
    def inner(self) -> Tensor:
        return self._split()[0]

    @property
    def chosen(self) -> Tensor:
        return self._split()[1]

    @property
    def rejected(self) -> Tensor:
        return self._split()[2]

    def as_stack(self) -> Tensor:
        """``[3, B]`` (inner, chosen, rejected)."""
        if self._stacked is None:
            self._stacked = torch.stack(self._parts)
        return self._stacked

    def __repr__(self) -> str:
        return (f"Terms(inner={self.inner}, chosen={self.chosen}, rejected={self.rejected}, "
                f"logprob_units={self.logprob_units}, sketched={self.sketched})")


@dataclass
class Tokens:
    """The kept tokens of one module use, packed by row. ``cu`` ``[R + 1]`` int64 offsets, ``positions`` ``[S]`` the
    position of each token in its row; ``gamma`` ``[S, d_out]``; ``a`` ``[S, d_in]`` or ``ids`` ``[S]`` as the use
    has; ``extras`` other per-token tensors packed alike."""

    cu: Tensor
    positions: Tensor
    gamma: Tensor
    a: Tensor | None = None
    ids: Tensor | None = None
    extras: tuple = ()
    bounds: list[int] = field(default_factory=list)

    def __post_init__(self):
        self.bounds = self.cu.tolist()

    @property
    def rows(self) -> int:
        return len(self.bounds) - 1

    def seg(self, r: int) -> slice:
        return slice(self.bounds[r], self.bounds[r + 1])

    def length(self, r: int) -> int:
        return self.bounds[r + 1] - self.bounds[r]


# pack() keeps every token, without copying, when at least this fraction has a gradient.
DENSE_FRACTION = 0.9


def pack(gamma: Tensor, *, a: Tensor | None = None, ids: Tensor | None = None, keep: Tensor | None = None,
         extras: tuple = (), dtype: torch.dtype | None = None) -> Tokens:
    """Pack ``gamma [R, T, d_out]`` (and ``a [R, T, d_in]`` or ``ids [R, T]``, and any ``extras [R, T, ...]``) into
    :class:`Tokens`, keeping the tokens whose gradient is not zero and, when given, ``keep [R, T]``; when no ``keep``
    is given and at least DENSE_FRACTION of the tokens have a gradient, all tokens are kept as views. Floats are cast
    to ``dtype`` when given."""
    rows, width = gamma.shape[0], gamma.shape[1]
    lo, hi = torch.aminmax(gamma, dim=-1)  # one vectorised pass; about 8x faster on CPU than ne(0).any(-1)
    mask = (lo != 0) | (hi != 0)
    if keep is None and int(mask.sum()) >= DENSE_FRACTION * rows * width:
        # Nearly every token has a gradient: keep them all (the zero ones add nothing) and skip the copies.
        flat = None
        cu = torch.arange(rows + 1, dtype=torch.int64, device=gamma.device) * width
        positions = torch.arange(width, device=gamma.device).repeat(rows)
    else:
        if keep is not None:
            mask &= keep
        flat = torch.nonzero(mask.reshape(-1)).squeeze(1)
        cu = torch.zeros(rows + 1, dtype=torch.int64, device=gamma.device)
        cu[1:] = torch.cumsum(mask.sum(1), 0)
        positions = flat % width

    def take(t):
        if t is None:
            return None
        t = t.reshape(rows * width, *t.shape[2:])
        t = t.index_select(0, flat) if flat is not None else t
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    return Tokens(cu, positions, take(gamma), take(a), take(ids), tuple(take(e) for e in extras))


def token_rows(tok: Tokens) -> Tensor:
    """``[S]`` the row of every packed token."""
    counts = tok.cu[1:] - tok.cu[:-1]
    return torch.repeat_interleave(torch.arange(tok.rows, device=tok.cu.device), counts)


def per_row(tok: Tokens, per_token: Tensor) -> Tensor:
    """``[R]`` the sums of a per-token quantity ``[S]`` over each row's tokens."""
    out = torch.zeros(tok.rows, dtype=per_token.dtype, device=per_token.device)
    return out.index_add_(0, token_rows(tok), per_token)


def split_flat(flat: Tensor, params: dict) -> dict:
    """``attr -> block``: a flat vector over ``params`` (in their order) cut back into their shapes."""
    out, start = {}, 0
    for attr, p in params.items():
        out[attr] = flat[start : start + p.numel()].reshape(p.shape)
        start += p.numel()
    return out


def all_seg_pairs(pairs: Tensor) -> Tensor:
    """``[3B, 2]``: the B (chosen, rejected) pairs, then (chosen, chosen), then (rejected, rejected)."""
    return torch.cat([pairs, pairs[:, [0, 0]], pairs[:, [1, 1]]])


def _split3(values: Tensor, b: int) -> tuple[Tensor, Tensor, Tensor]:
    return values[:b], values[b : 2 * b], values[2 * b :]


def choose_linear_path(tok: Tokens, pairs: Tensor, d_in: int, d_out: int) -> str:
    """``"ghost"`` or ``"explicit"``, whichever costs fewer multiply-adds for this module's pairs."""
    ghost = explicit = 0
    for w, l in pairs.tolist():
        tw, tl = tok.length(w), tok.length(l)
        ghost += (tw * tl + tw * tw + tl * tl) * (d_in + d_out)
        explicit += (tw + tl + 3) * d_in * d_out
    return "ghost" if ghost <= explicit else "explicit"


def ghost_terms(tok: Tokens, pairs: Tensor, *, weight: bool, bias: bool, positions: bool) -> Terms:
    """Ghost sums of a linear map (``tok.a``) or an embedding (``tok.ids``), plus its bias when ``bias``."""
    b = pairs.shape[0]
    factors = ([(tok.a, tok.ids)] if weight else []) + ([(None, None)] if bias else [])
    cross = pairs.to(tok.cu.device)
    norms = torch.cat([pairs[:, [0, 0]], pairs[:, [1, 1]]]).to(tok.cu.device)
    inner = torch.zeros(b, dtype=compute_dtype(tok.gamma.dtype), device=tok.gamma.device)
    norm_vals = inner.new_zeros(2 * b)
    matrix = None
    for a, ids in factors:
        res = ghost_gram(a, tok.gamma, tok.cu, cross, ids=ids, positions=positions)
        inner = inner + res.values
        if positions:
            matrix = res.position_matrix if matrix is None else matrix + res.position_matrix
        norm_vals = norm_vals + ghost_gram(a, tok.gamma, tok.cu, norms, ids=ids).values
    attribution = None
    if positions and matrix is not None:
        attribution = [(i, tok.positions[tok.seg(w)], tok.positions[tok.seg(l)],
                        matrix[i, : tok.length(w), : tok.length(l)]) for i, (w, l) in enumerate(pairs.tolist())]
    return Terms(inner, norm_vals[:b], norm_vals[b:], attribution)


def _pairwise_from_rows(row_grad, pairs: Tensor, dtype, device) -> Terms:
    """Inner products of explicit per-row gradient vectors ``row_grad(r)`` for every pair, one pair at a time."""
    b = pairs.shape[0]
    out = torch.zeros(3, b, dtype=dtype, device=device)
    for i, (w, l) in enumerate(pairs.tolist()):
        gw, gl = row_grad(w), row_grad(l)
        out[0, i], out[1, i], out[2, i] = gw @ gl, gw @ gw, gl @ gl
    return Terms(out[0], out[1], out[2])


EXPLICIT_CHUNK_ELEMENTS = 1 << 25


def _padded(tok: Tokens, rows: list[int], values: Tensor) -> Tensor:
    """``[len(rows), T_max, n]``: the packed ``values [S, n]`` of ``rows``, zero-padded to the longest of them."""
    lengths = [tok.length(r) for r in rows]
    out = values.new_zeros(len(rows), max(lengths, default=0), values.shape[1])
    for j, r in enumerate(rows):
        out[j, : lengths[j]] = values[tok.seg(r)]
    return out


def explicit_linear_terms(tok: Tokens, pairs: Tensor, *, weight: bool, bias: bool) -> Terms:
    """Per-row gradients sum_tau gamma_tau a_tau^T (and sum_tau gamma_tau) formed explicitly, several rows per batched
    matmul (at most EXPLICIT_CHUNK_ELEMENTS gradient entries alive). The same numbers serve Conv1D (its gradient is
    the transpose)."""
    b = pairs.shape[0]
    out = torch.zeros(3, b, dtype=tok.gamma.dtype, device=tok.gamma.device)
    pair_list = pairs.tolist()
    d_out = tok.gamma.shape[1]
    per_pair = 2 * ((d_out * tok.a.shape[1] if weight else 0) + (d_out if bias else 0))
    step = max(1, EXPLICIT_CHUNK_ELEMENTS // max(per_pair, 1))
    for i0 in range(0, b, step):
        group = pair_list[i0 : i0 + step]
        rows = [w for w, _ in group] + [l for _, l in group]
        gamma = _padded(tok, rows, tok.gamma)
        parts = []
        if weight:
            parts.append(torch.bmm(gamma.transpose(1, 2), _padded(tok, rows, tok.a)).flatten(1))
        if bias:
            parts.append(gamma.sum(1))
        grads = torch.cat(parts, 1) if len(parts) > 1 else parts[0]
        gw, gl = grads[: len(group)], grads[len(group) :]
        sl = slice(i0, i0 + len(group))
        out[0, sl], out[1, sl], out[2, sl] = (gw * gl).sum(1), (gw * gw).sum(1), (gl * gl).sum(1)
    return Terms(out[0], out[1], out[2])


def embedding_sparse_terms(tok: Tokens, pairs: Tensor) -> Terms:
    """Embedding gradients as sparse rows: per row, the summed gamma of each distinct id; pairs meet on shared ids.
    Costs O(T d) per row instead of the ghost's T_w T_l d, for every pair at once (:func:`sparse_row_terms`)."""
    b, d = pairs.shape[0], tok.gamma.shape[1]
    device, dtype = tok.gamma.device, tok.gamma.dtype
    if b == 0 or tok.gamma.shape[0] == 0:
        zero = torch.zeros(b, dtype=dtype, device=device)
        return Terms(zero, zero.clone(), zero.clone())
    ids = tok.ids.to(torch.int64)
    n_ids = int(ids.max()) + 1
    keys, grads = sparse_rows(token_rows(tok) * n_ids + ids, tok.gamma)
    return sparse_row_terms(keys, grads, n_ids, tok.rows, pairs.to(device))


def sparse_rows(keys: Tensor, gamma: Tensor) -> tuple[Tensor, Tensor]:
    """Sparse per-row embedding gradients from the tokens' ``(row, id)`` keys ``row * n_ids + id`` ``[S]`` and their
    output gradients ``[S, d]``: ``(keys [U], grads [U, d])``, the distinct keys sorted (by row, then id) and the
    summed gradient of each."""
    keys, inverse = torch.unique(keys, return_inverse=True)
    grads = torch.zeros(keys.shape[0], gamma.shape[1], dtype=gamma.dtype, device=gamma.device)
    return keys, grads.index_add_(0, inverse, gamma)


def sparse_row_terms(keys: Tensor, grads: Tensor, n_ids: int, n_rows: int, pairs: Tensor, *,
                     ordered: bool = False) -> Terms:
    """Pair terms of sparse per-row gradients: row r's gradient has row ``grads[u]`` ``[d]`` at id ``keys[u] % n_ids``
    for every ``u`` with ``keys[u] // n_ids == r``; ``keys [U]`` sorted and distinct (as ``torch.unique`` gives them).
    Each entry of a pair's chosen row finds the rejected row's entry of the same id by a sorted search. ``ordered``:
    ``pairs`` is the default layout (row i with row R/2 + i, every row once), where every entry's partner key is its
    own key plus R/2 rows."""
    b = pairs.shape[0]
    device, dtype = grads.device, grads.dtype
    key_rows = keys // n_ids
    sq = torch.zeros(n_rows, dtype=dtype, device=device).index_add_(0, key_rows, (grads * grads).sum(1))
    last = max(keys.shape[0] - 1, 0)
    if ordered:
        partner = keys + b * n_ids
        found = torch.searchsorted(keys, partner).clamp_(max=last)
        dots = (grads * grads[found]).sum(1) * ((keys[found] == partner) & (key_rows < b))
        inner = torch.zeros(b, dtype=dtype, device=device).index_add_(0, key_rows % max(b, 1), dots)
        return Terms(inner, sq[:b], sq[b:])
    counts = torch.bincount(key_rows, minlength=n_rows)
    starts = torch.cumsum(counts, 0) - counts
    w, l = pairs[:, 0], pairs[:, 1]
    per_pair = counts[w]
    pair_of = torch.repeat_interleave(torch.arange(b, device=device), per_pair)
    offsets = torch.arange(pair_of.shape[0], device=device) - torch.repeat_interleave(
        torch.cumsum(per_pair, 0) - per_pair, per_pair)
    src = starts[w][pair_of] + offsets
    partner = l[pair_of] * n_ids + keys[src] % n_ids
    found = torch.searchsorted(keys, partner).clamp_(max=last)
    dots = (grads[src] * grads[found]).sum(1) * (keys[found] == partner)
    inner = torch.zeros(b, dtype=dtype, device=device).index_add_(0, pair_of, dots)
    return Terms(inner, sq[w], sq[l])


# embedding_bookkeep forms the rows' gradients densely ([R, V, d], as for a small linear layer) up to this many elements.
DENSE_EMBEDDING_ELEMENTS = 1 << 20


def embedding_bookkeep(ids: Tensor, gamma: Tensor, plan, *, num_embeddings: int, padding_idx: int | None,
                       dtype: torch.dtype, out_dtype: torch.dtype) -> tuple[Tensor, Terms]:
    """An embedding's weight gradient and its per-pair terms from the same per-row gradients (book-keeping,
    docs/math.md section 4.2): ``ids [R, T]``, ``gamma [R, T, d]`` its output gradient, ``plan`` the step's
    :class:`entangle_fast.bookkeeping.PairPlan`. Each row's gradient is the summed gamma of each id it holds
    (``padding_idx`` gets none, as in ``F.embedding``): dense ``[V, d]`` per row when R V d is small and the pairs are
    in the default layout, else sparse (the distinct ids of each row, pairs meeting on shared ids). The weight gradient
    ``[num_embeddings, d]`` in ``out_dtype`` sums them, accumulated in ``dtype``."""
    n_rows, width, d = gamma.shape
    device = gamma.device
    ids = ids.reshape(n_rows, width).to(torch.int64)
    g = gamma.reshape(n_rows * width, d).to(dtype)
    if padding_idx is not None:
        g = torch.where((ids != padding_idx).reshape(-1, 1), g, 0)
    keys = (torch.arange(n_rows, device=device).unsqueeze(1) * num_embeddings + ids).reshape(-1)
    if plan.ordered and 0 < n_rows * num_embeddings * d <= DENSE_EMBEDDING_ELEMENTS:
        rows = torch.zeros(n_rows * num_embeddings, d, dtype=dtype, device=device).index_add_(0, keys, g)
        b = n_rows // 2
        stats = torch.take(pair_blocks(rows.view(n_rows, -1), b), pair_block_index(b, device)).view(3, -1)
        grad_w = rows.view(n_rows, num_embeddings, d).sum(0)
        return (grad_w if out_dtype == dtype else grad_w.to(out_dtype)), Terms.of(stats)
    keys, grads = sparse_rows(keys, g)
    grad_w = torch.zeros(num_embeddings, d, dtype=dtype, device=device).index_add_(0, keys % num_embeddings, grads)
    terms = sparse_row_terms(keys, grads, num_embeddings, n_rows, plan.on(device)[0], ordered=plan.ordered)
    return (grad_w if out_dtype == dtype else grad_w.to(out_dtype)), terms


def sketch_linear_terms(tok: Tokens, pairs: Tensor, sketch, *, weight: bool, bias: bool) -> Terms:
    """Sketch-mode estimate of the weight terms (``sketch`` a :class:`entangle_fast.sketch.KroneckerSketch`); the bias
    terms, a d_out-vector per row, stay exact."""
    from entangle_fast.sketch import sketch_inner

    b = pairs.shape[0]
    values = torch.zeros(3 * b, dtype=tok.gamma.dtype, device=tok.gamma.device)
    if weight:
        sketches = sketch.project(tok.a, tok.gamma, tok.cu)
        values = values + sketch_inner(sketches, all_seg_pairs(pairs).to(tok.cu.device)).to(values.dtype)
    if bias:
        exact = explicit_linear_terms(tok, pairs, weight=False, bias=True)
        values = values + torch.cat([exact.inner, exact.chosen, exact.rejected])
    return Terms(*_split3(values, b), sketched=weight)


def positionwise_token_grads(module, attrs: tuple[str, ...], x: Tensor, gamma: Tensor,
                             chunk_elements: int = 1 << 24) -> Tensor:
    """``[S, n_params]`` gradient of each token's output . gamma w.r.t. the module's parameters ``attrs``, by a vjp of
    the module on that token alone (exact for modules that act position by position). ``x [S, d_in]`` and
    ``gamma [S, d_out]`` in the module's own dtypes, so the vjp repeats the module's arithmetic."""
    from torch.func import functional_call, vjp, vmap

    params = {a: module._parameters[a].detach() for a in attrs}
    n_params = sum(p.numel() for p in params.values())

    def per_token(xt, gt):
        _, pull = vjp(lambda p: functional_call(module, p, (xt[None],)), params)
        (grads,) = pull(gt[None])
        return torch.cat([grads[a].reshape(-1) for a in attrs])

    chunk = max(1, chunk_elements // max(n_params, 1))
    if x.shape[0] == 0:
        return x.new_zeros(0, n_params)
    return vmap(per_token, chunk_size=chunk)(x, gamma)


def positionwise_row_grads(module, attrs: tuple[str, ...], x: Tensor, gamma: Tensor, chunk_elements: int = 1 << 24) -> Tensor:
    """``[R, n_params]`` each row's gradient of sum_items output . gamma w.r.t. the module's parameters ``attrs``: one
    vjp of the module on a row's items ``x [R, P, d_in]`` with ``gamma [R, P, d_out]``, batched over the rows (exact for
    modules that act position by position; the items' own gradients are never formed)."""
    from torch.func import functional_call, vjp, vmap

    params = {a: module._parameters[a].detach() for a in attrs}
    n_params = sum(p.numel() for p in params.values())

    def per_row(xr, gr):
        _, pull = vjp(lambda p: functional_call(module, p, (xr,)), params)
        (grads,) = pull(gr)
        return torch.cat([grads[a].reshape(-1) for a in attrs])

    chunk = max(1, chunk_elements // max(n_params + x.shape[1] * (x.shape[2] + gamma.shape[2]), 1))
    return vmap(per_row, chunk_size=chunk)(x, gamma.to(x.dtype))


def broadcast_row_grads(module, attrs: tuple[str, ...], x: Tensor, gamma: Tensor) -> Tensor:
    """:func:`positionwise_row_grads` by one autograd call instead of a vmap: each parameter ``p`` in ``attrs`` is
    replaced by per-row copies ``[R, 1, ..., 1, *p.shape]`` that broadcast over the row's items, so the gradient of
    ``sum output . gamma`` w.r.t. the copies is each row's gradient. Right only for modules that use their parameters
    elementwise along the features (scale and shift: every norm); callers check it against
    :func:`positionwise_row_grads` before relying on it. Raises whatever the module raises on such parameters."""
    from torch.func import functional_call

    n_rows = x.shape[0]
    copies, views = [], {}
    with torch.enable_grad():  # the views must record their link to the copies
        for a in attrs:
            p = module._parameters[a].detach()
            if x.ndim - 1 < p.ndim:
                raise ValueError(f"parameter {a!r} {tuple(p.shape)} has more dimensions than an item of "
                                 f"{tuple(x.shape)}")
            copy = p.unsqueeze(0).expand(n_rows, *p.shape).clone().requires_grad_(True)
            copies.append(copy)
            views[a] = copy.view(n_rows, *([1] * (x.ndim - 1 - p.ndim)), *p.shape)
        y = functional_call(module, views, (x,))
        if not isinstance(y, Tensor) or y.shape != gamma.shape:
            raise ValueError(f"per-row parameters change the output shape to {tuple(getattr(y, 'shape', ()))}")
        grads = torch.autograd.grad(y, copies, gamma.to(y.dtype), allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(c)).reshape(n_rows, -1)
                      for g, c in zip(grads, copies)], dim=1)


def row_grad_terms(grads: Tensor, pairs: Tensor, *, ordered: bool = False) -> Terms:
    """Pair terms from per-row gradient vectors ``grads [R, n]``. ``ordered``: ``pairs`` is the default layout (row i
    with row R/2 + i, every row once), where each pair's [2, 2] Gram block of its two rows holds its terms."""
    if ordered and grads.shape[0]:
        b = grads.shape[0] // 2
        return Terms.of(torch.take(pair_blocks(grads, b), pair_block_index(b, grads.device)).view(3, -1))
    g = grads[pairs.reshape(-1).to(grads.device)].view(pairs.shape[0], 2, -1)
    gw, gl = g[:, 0], g[:, 1]
    return Terms((gw * gl).sum(1), (gw * gw).sum(1), (gl * gl).sum(1))


def token_grad_terms(tok: Tokens, grads: Tensor, pairs: Tensor, *, positions: bool) -> Terms:
    """Pair terms from explicit per-token gradients ``grads [S, n]`` (the position-wise path)."""
    def row_grad(r):
        return grads[tok.seg(r)].sum(0)

    terms = _pairwise_from_rows(row_grad, pairs, grads.dtype, grads.device)
    if positions:
        terms.attribution = [(i, tok.positions[tok.seg(w)], tok.positions[tok.seg(l)],
                              grads[tok.seg(w)] @ grads[tok.seg(l)].T) for i, (w, l) in enumerate(pairs.tolist())]
    return terms


def fused_head_terms(stats, pairs: Tensor, *, positions: bool) -> Terms:
    """The fused log-prob op's own output-layer statistics (log-prob units), for the monitor's pairs."""
    if stats.pairs.shape != pairs.shape or not torch.equal(stats.pairs.cpu(), pairs.cpu()):
        raise ValueError(
            "the fused log-prob op paired rows (i, R/2 + i) but the monitor was given other pairs: use the default "
            "layout (chosen rows first, then rejected rows) with the fused op"
        )
    attribution = None
    if positions:
        attribution = []
        for i in range(pairs.shape[0]):
            tw, tl = int(stats.chosen_lengths[i]), int(stats.rejected_lengths[i])
            attribution.append((i, stats.chosen_positions[i, :tw], stats.rejected_positions[i, :tl],
                                stats.token_matrix[i, :tw, :tl]))
    return Terms(stats.inner, stats.chosen_sq_norm, stats.rejected_sq_norm, attribution, logprob_units=True)


# ----------------------------------------------------------------------------------------------------------------------
# Cross terms of a parameter used by two modules (tied embeddings)
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class Factors:
    """One use's gradient of one shared parameter: per row r, sum_{tau in r} u_tau v_tau^T over the parameter's
    (dim 0, dim 1); ``v`` is None for a 1-D parameter.

    ``u_kind``: ``"dense"`` (``u [S, n]``), ``"ids"`` (one-hot rows, ``ids [S]``) or ``"delta"``: the fused head's
    g_t f'(l_t) (e_{y_t} - p_t), never materialised: ``head = (h [S, d], y [S], lse [S], g [S], W [V, d],
    b [V] | None, logit transform)``.
    """

    tok: Tokens
    u_kind: str
    u: Tensor | None = None
    v: Tensor | None = None
    head: tuple | None = None


def _u_dot(x: Factors, i: int, y: Factors, j: int) -> Tensor:
    """``[T_i, T_j]`` matrix of u-factor products between row i of use x and row j of use y."""
    si, sj = x.tok.seg(i), y.tok.seg(j)
    kinds = (x.u_kind, y.u_kind)
    if kinds == ("dense", "dense"):
        return x.u[si] @ y.u[sj].T
    if kinds == ("dense", "ids"):
        return x.u[si][:, y.tok.ids[sj]]
    if kinds == ("ids", "ids"):
        return (x.tok.ids[si][:, None] == y.tok.ids[sj][None, :]).to(x.tok.gamma.dtype)
    if kinds == ("delta", "ids"):
        # g_t delta_t[x], delta_t[x] = f'(l_t[x]) ([y_t == x] - p_t[x]): a [T_i, T_j] product over d.
        h, lab, lse, g, weight, bias, transform = x.head
        return g[si][:, None] * head_delta_at(h[si], lab[si], lse[si], weight, bias, y.tok.ids[sj], transform)
    if kinds[::-1] in (("dense", "ids"), ("delta", "ids")):
        return _u_dot(y, j, x, i).T
    raise NotImplementedError(
        f"cross terms between a {x.u_kind} use and a {y.u_kind} use of one parameter are not implemented (the fused "
        "output head and an nn.Linear sharing a weight would need vocabulary-wide products)"
    )


def _cross_matrix(x: Factors, i: int, y: Factors, j: int) -> Tensor:
    m = _u_dot(x, i, y, j)
    if x.v is not None:
        m = m * (x.v[x.tok.seg(i)] @ y.v[y.tok.seg(j)].T)
    return m


def cross_terms(x: Factors, y: Factors, pairs: Tensor, *, positions: bool) -> Terms:
    """Cross terms of two uses x, y of one parameter: <g^x_w, g^y_l> + <g^y_w, g^x_l>, 2 <g^x_w, g^y_w>,
    2 <g^x_l, g^y_l> per pair."""
    b = pairs.shape[0]
    out = torch.zeros(3, b, dtype=x.tok.gamma.dtype, device=x.tok.gamma.device)
    attribution = [] if positions else None
    for k, (w, l) in enumerate(pairs.tolist()):
        m1, m2 = _cross_matrix(x, w, y, l), _cross_matrix(y, w, x, l)
        out[0, k] = m1.sum() + m2.sum()
        out[1, k] = 2 * _cross_matrix(x, w, y, w).sum()
        out[2, k] = 2 * _cross_matrix(x, l, y, l).sum()
        if positions:
            attribution.append((k, x.tok.positions[x.tok.seg(w)], y.tok.positions[y.tok.seg(l)], m1))
            attribution.append((k, y.tok.positions[y.tok.seg(w)], x.tok.positions[x.tok.seg(l)], m2))
    return Terms(out[0], out[1], out[2], attribution)
