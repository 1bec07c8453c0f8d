"""Output-layer token statistics of preference pairs (docs/math.md section 3.1).

For the output embedding W ``[V, d]`` (bias b), final hidden states h_t, probabilities p_t = softmax(W h_t + b) and
delta_t = e_{y_t} - p_t, the per-token gradients are grad_W l_t = delta_t h_t^T and grad_b l_t = delta_t, so

    K[t, s] = (delta_t . delta'_s) (h_t . h'_s + [bias])
    delta_t . delta'_s = [y_t == y'_s] - p_t[y'_s] - p'_s[y_t] + p_t . p'_s

Only ``P_w P_l^T`` needs the vocabulary; it is accumulated chunk by chunk from the probability tiles the fused backward
recomputes anyway (:class:`PairLayout`). The rest are ``[T_w, T_l]`` products over d. The hidden-state token Gram
uses r_t = d l_t / d h_t = W^T delta_t, which the backward produces unscaled for every row.

Under a logit transform z = f(l) (:class:`~entangle_fast.logit_transform.LogitTransform`), p_t = softmax(z_t) and the
head gradient carries delta_t = f'(l_t) * (e_{y_t} - p_t). A pure scale makes f' the constant ``scale``: the closed form
above, with p from z, times scale^2. A soft-cap makes f' vary over the vocabulary, which breaks the closed form; the
backward then hands :class:`PairLayout` the delta chunks themselves and accumulates ``D_w D_l^T`` (and ``D_w D_w^T``,
``D_l D_l^T``) over vocabulary chunks, never holding more than one chunk.
"""
from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, fields
from typing import Callable

import torch
from torch import Tensor

from entangle_fast.data import default_pairs
from entangle_fast.logit_transform import IDENTITY, LogitTransform


@dataclass
class OutputLayerTokenStats:
    """Token-level gradient statistics at the output layer, one entry per pair.

    Response tokens are the positions with ``label != ignore_index``, in position order; matrices are zero-padded to the
    longest response in the batch (use :meth:`pair` for one pair's unpadded view). All values are in log-prob-gradient
    units (gradients of l_t, not of the loss).

    With tied input/output embeddings (GPT-2) these cover only the unembedding use of the shared matrix: the gradient
    that reaches it through the input embedding is not included (:class:`entangle_fast.EntanglementMonitor` adds it).

    Attributes:
        pairs: ``[P, 2]`` int64, (chosen row, rejected row).
        chosen_positions / rejected_positions: ``[P, T_w]`` / ``[P, T_l]`` int64 positions in the row, -1 as padding.
        chosen_lengths / rejected_lengths: ``[P]`` int64 response-token counts.
        token_matrix: ``[P, T_w, T_l]`` K_wl[t, s] = <grad_(W,b) l^w_t, grad_(W,b) l^l_s>.
        hidden_gram: ``[P, T_w, T_l]`` <d l^w_t / d h_t, d l^l_s / d h_s>.
        inner: ``[P]`` I = sum of token_matrix = <grad s_w, grad s_l> at the output layer.
        chosen_sq_norm / rejected_sq_norm: ``[P]`` N_w, N_l at the output layer.
        cosine: ``[P]`` I / sqrt(N_w N_l).
        a_w / a_l: ``[P]`` upstream gradient dL/ds the chosen/rejected sequence log-prob received (mean over its
            response tokens), recorded by the backward; None when no backward ran.
        uniform_upstream: ``[P]`` bool, every response token of both rows received the same upstream gradient (a loss
            linear in the summed or averaged log-prob). When False, a_w/a_l are means of unequal token weights.
        chosen_matrix / rejected_matrix: ``[P, T_w, T_w]`` / ``[P, T_l, T_l]`` within-response K, when asked for.

    From a sums-only request (:class:`PairSums`: a monitor without position attribution) the positions and matrices
    are None; the sums, lengths and coefficients are set.
    """

    pairs: Tensor
    chosen_positions: Tensor
    rejected_positions: Tensor
    chosen_lengths: Tensor
    rejected_lengths: Tensor
    token_matrix: Tensor
    hidden_gram: Tensor
    inner: Tensor
    chosen_sq_norm: Tensor
    rejected_sq_norm: Tensor
    cosine: Tensor
    a_w: Tensor | None = None
    a_l: Tensor | None = None
    uniform_upstream: Tensor | None = None
    chosen_matrix: Tensor | None = None
    rejected_matrix: Tensor | None = None

    def pair(self, i: int) -> dict[str, Tensor]:
        """Unpadded tensors of pair ``i``: matrices cut to ``[T_w, T_l]`` (``[T_w, T_w]``, ``[T_l, T_l]``)."""
        tw, tl = int(self.chosen_lengths[i]), int(self.rejected_lengths[i])
        cut = {"chosen_positions": (tw,), "rejected_positions": (tl,), "token_matrix": (tw, tl),
               "hidden_gram": (tw, tl), "chosen_matrix": (tw, tw), "rejected_matrix": (tl, tl)}
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            value = value[i]
            if f.name in cut:
                value = value[tuple(slice(0, n) for n in cut[f.name])]
            out[f.name] = value
        return out


def resolve_pairs(pairs: Tensor | list | None, num_rows: int, device: torch.device) -> Tensor:
    """``[P, 2]`` int64 pairs of rows; default TRL's layout: row i (chosen) with row B + i (rejected), 2B rows."""
    if pairs is None:
        return default_pairs(num_rows, device)
    pairs = torch.as_tensor(pairs, dtype=torch.long, device=device)
    if pairs.ndim != 2 or pairs.shape[1] != 2:
        raise ValueError(f"pairs must have shape [P, 2] (chosen row, rejected row); got {tuple(pairs.shape)}")
    if pairs.numel() and (pairs.min() < 0 or pairs.max() >= num_rows):
        raise ValueError(f"pairs index rows outside [0, {num_rows}): min {int(pairs.min())}, max {int(pairs.max())}")
    return pairs


class PairLayout:
    """Where each pair's response tokens sit in the flattened ``[R * T]`` token axis, and the accumulated
    vocabulary products ``P_w P_l^T``, ``P_w P_w^T``, ``P_l P_l^T`` of every pair (of the deltas ``D`` instead when
    :attr:`accumulates_deltas`).

    Args:
        labels: ``[R, T]`` aligned labels (the op's own labels, already shifted).
        pairs: ``[P, 2]`` rows.
        compute_dtype: dtype of the accumulators (float32, or float64 for float64 inputs).
        transform: the op's logit transform; with a soft-cap the chunks handed to :meth:`accumulate` are the deltas
            f'(l) (e_y - p), not the probabilities.
    """

    def __init__(self, labels: Tensor, pairs: Tensor, ignore_index: int, compute_dtype: torch.dtype,
                 transform: LogitTransform | None = None):
        self.num_rows, self.seq_len = labels.shape
        self.pairs = pairs
        self.transform = transform if transform is not None else IDENTITY
        self.accumulates_deltas = self.transform.softcap is not None
        self.valid = valid = labels != ignore_index
        self.row_positions = [torch.nonzero(valid[r]).flatten() for r in range(self.num_rows)]
        self.row_tokens = [r * self.seq_len + pos for r, pos in enumerate(self.row_positions)]
        self.products = []
        for w, l in pairs.tolist():
            tw, tl = len(self.row_tokens[w]), len(self.row_tokens[l])
            z = lambda m, n: torch.zeros(m, n, dtype=compute_dtype, device=labels.device)  # noqa: E731
            self.products.append({"wl": z(tw, tl), "ww": z(tw, tw), "ll": z(tl, tl)})

    def accumulate(self, probs: Tensor) -> None:
        """Add one vocabulary chunk's products. probs: ``[R * T, V_chunk]`` probabilities of every token (the deltas
        when :attr:`accumulates_deltas`)."""
        for (w, l), acc in zip(self.pairs.tolist(), self.products):
            pw = probs[self.row_tokens[w]].to(acc["wl"].dtype)
            pl = probs[self.row_tokens[l]].to(acc["wl"].dtype)
            acc["wl"].addmm_(pw, pl.T)
            acc["ww"].addmm_(pw, pw.T)
            acc["ll"].addmm_(pl, pl.T)


def _delta_products(hx, hy, yx, yy, lse_x, lse_y, weight, bias, pp, transform: LogitTransform):
    """(delta_x . delta_y) for every token pair: [y_t == y'_s] - p_t[y'_s] - p'_s[y_t] + p_t . p'_s, times scale^2
    under a pure-scale transform (f' = scale). ``pp`` is the accumulated P_x P_y^T; under a soft-cap it is already
    D_x D_y^T, the answer."""
    if transform.softcap is not None:
        return pp

    def gathered(h, lse, ids):  # p_t[ids_s] = exp(f(h_t . W[ids_s] + b[ids_s]) - lse_t): a [T, T'] product over d
        return torch.exp(transform(head_logits_at(h, weight, bias, ids)) - lse[:, None])

    eq = (yx[:, None] == yy[None, :]).to(hx.dtype)
    closed = eq - gathered(hx, lse_x, yy) - gathered(hy, lse_y, yx).T + pp
    return closed if transform.scale == 1.0 else closed * transform.scale**2


def head_logits_at(h: Tensor, weight: Tensor, bias: Tensor | None, ids: Tensor) -> Tensor:
    """``[T, T']`` the head's raw logits l_t[ids_s] = h_t . W[ids_s] + b[ids_s] (a product over d, in ``h``'s dtype)."""
    logits = h @ weight[ids].to(h.dtype).T
    return logits + bias[ids].to(h.dtype) if bias is not None else logits


def head_delta_at(h: Tensor, y: Tensor, lse: Tensor, weight: Tensor, bias: Tensor | None, ids: Tensor,
                  transform: LogitTransform = IDENTITY) -> Tensor:
    """``[T, T']`` the head's per-token logit gradient at the vocabulary entries ``ids``:
    delta_t[x] = f'(l_t[x]) ([y_t == x] - p_t[x]), p_t = softmax(f(l_t)), for tokens ``h [T, d]``, labels ``y [T]``,
    log-sum-exps ``lse [T]`` (of the transformed logits). The one head gather of the tied-embedding cross terms (the
    monitor's and the profiler's)."""
    logits = head_logits_at(h, weight, bias, ids)
    delta = (y[:, None] == ids[None, :]).to(h.dtype) - torch.exp(transform(logits) - lse[:, None])
    return delta if transform.identity else delta * transform.derivative(logits)


def finalize_token_stats(
    layout: PairLayout,
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    lse: Tensor,
    hidden_grad_unscaled: Tensor,
    grad_logprobs: Tensor | None,
    full_matrices: bool,
) -> OutputLayerTokenStats:
    """Assemble :class:`OutputLayerTokenStats` once every vocabulary chunk was accumulated into ``layout``.

    Args: hidden ``[N, d]``, labels ``[N]``, lse ``[N]``, hidden_grad_unscaled ``[N, d]`` (r_t), grad_logprobs ``[N]``
    or None, all over the flattened ``N = R * T`` token axis of ``layout``.
    """
    cdt = layout.products[0]["wl"].dtype if layout.products else torch.float32
    dev = hidden.device
    num_pairs = len(layout.products)
    lengths = torch.tensor([len(t) for t in layout.row_tokens], dtype=torch.long)
    pw_rows, pl_rows = layout.pairs[:, 0].cpu(), layout.pairs[:, 1].cpu()
    tw_max = int(lengths[pw_rows].max()) if num_pairs else 0
    tl_max = int(lengths[pl_rows].max()) if num_pairs else 0

    def padded(*shape):
        return torch.zeros(num_pairs, *shape, dtype=cdt, device=dev)

    token_matrix, hidden_gram = padded(tw_max, tl_max), padded(tw_max, tl_max)
    chosen_matrix, rejected_matrix = padded(tw_max, tw_max), padded(tl_max, tl_max)
    chosen_pos = torch.full((num_pairs, tw_max), -1, dtype=torch.long, device=dev)
    rejected_pos = torch.full((num_pairs, tl_max), -1, dtype=torch.long, device=dev)
    bias_term = 1.0 if bias is not None else 0.0

    for i, ((w, l), pp) in enumerate(zip(layout.pairs.tolist(), layout.products)):
        tok_w, tok_l = layout.row_tokens[w], layout.row_tokens[l]
        tw, tl = len(tok_w), len(tok_l)
        hw, hl = hidden[tok_w].to(cdt), hidden[tok_l].to(cdt)
        yw, yl = labels[tok_w], labels[tok_l]
        args_w, args_l = (hw, yw, lse[tok_w].to(cdt)), (hl, yl, lse[tok_l].to(cdt))

        def k(x, y, prod):
            d = _delta_products(x[0], y[0], x[1], y[1], x[2], y[2], weight, bias, prod, layout.transform)
            return d * (x[0] @ y[0].T + bias_term)

        token_matrix[i, :tw, :tl] = k(args_w, args_l, pp["wl"])
        chosen_matrix[i, :tw, :tw] = k(args_w, args_w, pp["ww"])
        rejected_matrix[i, :tl, :tl] = k(args_l, args_l, pp["ll"])
        rw, rl = hidden_grad_unscaled[tok_w].to(cdt), hidden_grad_unscaled[tok_l].to(cdt)
        hidden_gram[i, :tw, :tl] = rw @ rl.T
        chosen_pos[i, :tw] = layout.row_positions[w]
        rejected_pos[i, :tl] = layout.row_positions[l]

    inner = token_matrix.sum((1, 2))
    nw, nl = chosen_matrix.sum((1, 2)), rejected_matrix.sum((1, 2))
    traced = grad_logprobs is not None
    a_w = a_l = uniform = None
    if traced:
        a_w, a_l, uniform = upstream_coefficients(layout.valid, grad_logprobs, layout.pairs, cdt)
    return OutputLayerTokenStats(
        pairs=layout.pairs,
        chosen_positions=chosen_pos,
        rejected_positions=rejected_pos,
        chosen_lengths=lengths[pw_rows].to(dev),
        rejected_lengths=lengths[pl_rows].to(dev),
        token_matrix=token_matrix,
        hidden_gram=hidden_gram,
        inner=inner,
        chosen_sq_norm=nw,
        rejected_sq_norm=nl,
        cosine=inner / torch.sqrt(nw * nl),
        a_w=a_w,
        a_l=a_l,
        uniform_upstream=uniform,
        chosen_matrix=chosen_matrix if full_matrices else None,
        rejected_matrix=rejected_matrix if full_matrices else None,
    )


@dataclass
class BackwardRecord:
    """What one fused log-prob backward saw, handed to stats listeners (the monitor) after the backward.

    Shapes over the flattened token axis N = R * T: hidden ``[N, d]``, labels ``[N]``, lse ``[N]``,
    grad_logprobs ``[N]`` (upstream gradient of each token log-prob); ``rows_shape`` is ``(R, T)``. ``lse`` is that of
    the transformed logits z = transform(h W^T + b): a consumer that recomputes probabilities or head gradients from
    the record applies ``transform`` (and its derivative) to the logits first. ``impl`` is the backend the op ran on
    (``"torch"``, ``"triton"`` or ``"cuda"``), so a consumer's own head pass runs on the same one.
    """

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None
    labels: Tensor
    lse: Tensor
    grad_logprobs: Tensor
    ignore_index: int
    rows_shape: tuple[int, int]
    stats: OutputLayerTokenStats
    transform: LogitTransform = IDENTITY
    impl: str = "auto"


class TokenStatsHandle:
    """Filled by the backward pass of :func:`entangle_fast.linear_logprobs` when ``token_stats=True``."""

    def __init__(self):
        self._stats: OutputLayerTokenStats | None = None

    @property
    def ready(self) -> bool:
        return self._stats is not None

    @property
    def stats(self) -> OutputLayerTokenStats:
        if self._stats is None:
            raise RuntimeError(
                "token statistics are computed in the backward pass: call .backward() on a loss built from the "
                "log-probs first (or use entangle_fast.output_layer_token_stats without training)"
            )
        return self._stats


# The statistics requests of the monitors whose ``with`` blocks are active in this context: a fused log-prob call reads
# them in its forward, so calls outside every monitor pay nothing and two monitors in separate contexts never see
# each other's heads.
_LISTENERS: ContextVar[tuple] = ContextVar("entangle_fast_stats_listeners", default=())


class _ListenerHandle:
    def __init__(self, fn, token_matrices: bool):
        self.entry = (fn, token_matrices)
        self.token = _LISTENERS.set(_LISTENERS.get() + (self.entry,))

    def remove(self) -> None:
        try:
            _LISTENERS.reset(self.token)
        except ValueError:  # removed from another context, or out of order: drop this entry alone
            _LISTENERS.set(tuple(e for e in _LISTENERS.get() if e is not self.entry))


def register_stats_listener(fn: Callable[[BackwardRecord], None], *, token_matrices: bool = True) -> _ListenerHandle:
    """Ask the fused log-prob ops on ``[R, T, d]`` inputs run in this context (until ``remove()``) to compute their pair
    statistics in the backward and call ``fn(record)`` with a :class:`BackwardRecord`.

    ``token_matrices=False``: the listener needs the per-pair sums only (inner product and squared norms), which the
    backward then forms from the per-row head weight-gradient tiles (book-keeping, ~3 V d per pair) instead of the
    token matrices (~3 T_w T_l V per pair); ``record.stats`` then has no matrices."""
    return _ListenerHandle(fn, token_matrices)


def active_listeners() -> list[Callable[[BackwardRecord], None]]:
    return [fn for fn, _ in _LISTENERS.get()]


def listeners_need_matrices() -> bool:
    return any(matrices for _, matrices in _LISTENERS.get())


def upstream_coefficients(valid: Tensor, grad_logprobs: Tensor, pairs: Tensor, dtype: torch.dtype):
    """``(a_w, a_l, uniform)`` ``[P]``: the mean upstream gradient over each row's response tokens (NaN for an empty
    row), and whether every response token of both rows received the same one; every pair at once. ``valid [R, T]``
    marks the response tokens, ``grad_logprobs [R * T]``. A row whose response tokens all received the same gradient
    gets exactly that value."""
    n_rows, width = valid.shape
    g = grad_logprobs.reshape(n_rows, width).to(dtype)
    counts = valid.sum(1)
    mean = torch.where(valid, g, 0).sum(1) / counts  # 0 / 0: NaN for an empty row
    first = g.gather(1, valid.to(torch.uint8).argmax(1, keepdim=True))  # the first response token's gradient
    same = ((g == first) | ~valid).all(1)
    mean = torch.where(same & (counts > 0), first.squeeze(1), mean)
    w, l = pairs[:, 0], pairs[:, 1]
    return mean[w], mean[l], same[w] & same[l]


class PairSums:
    """Sums-only statistics of the fused backward (``register_stats_listener(..., token_matrices=False)``): per pair,
    the inner product and squared norms of the rows' head gradients, accumulated in loss units over vocabulary tiles
    from the per-row weight-gradient tiles (:func:`entangle_fast.bookkeeping.pair_weight_grad_dense`)."""

    def __init__(self, labels: Tensor, pairs: Tensor, ignore_index: int, compute_dtype: torch.dtype):
        self.rows, self.width = labels.shape
        self.pairs, self.ignore_index = pairs, ignore_index
        self.labels = labels
        self.values = torch.zeros(3, pairs.shape[0], dtype=compute_dtype, device=labels.device)
        self._plan = None

    @property
    def plan(self):
        """The pairs checked once for the rows (:class:`entangle_fast.bookkeeping.PairPlan`), for every vocabulary
        tile."""
        if self._plan is None:
            from entangle_fast.bookkeeping import PairPlan

            self._plan = PairPlan.of(self.rows, self.pairs)
        return self._plan

    def add(self, stats: Tensor) -> None:
        """Add one vocabulary tile's ``[3, B]`` (inner, chosen, rejected)."""
        self.values += stats

    def finalize(self, grad_logprobs: Tensor) -> OutputLayerTokenStats:
        """Log-prob units (divided by a_w a_l, a_w^2, a_l^2), as :class:`OutputLayerTokenStats` without matrices."""
        valid = self.labels != self.ignore_index
        cdt = self.values.dtype
        a_w, a_l, uniform = upstream_coefficients(valid, grad_logprobs, self.pairs, cdt)
        inner, nw, nl = self.values[0] / (a_w * a_l), self.values[1] / (a_w * a_w), self.values[2] / (a_l * a_l)
        lengths = valid.sum(1)
        w, l = self.pairs[:, 0], self.pairs[:, 1]
        return OutputLayerTokenStats(
            pairs=self.pairs, chosen_positions=None, rejected_positions=None, chosen_lengths=lengths[w],
            rejected_lengths=lengths[l], token_matrix=None, hidden_gram=None, inner=inner, chosen_sq_norm=nw,
            rejected_sq_norm=nl, cosine=inner / torch.sqrt(nw * nl), a_w=a_w, a_l=a_l, uniform_upstream=uniform)
