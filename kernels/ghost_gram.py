"""Ghost Gram: inner products of per-segment weight gradients without forming any gradient.

For a linear map y = a W^T + c applied at the positions tau of segment r, with output gradient gamma_tau,
grad_W s_r = sum_tau gamma_tau a_tau^T, hence for a pair of segments (i, j):

    values[p] = sum_{tau in i, sigma in j} F(tau, sigma) * (gamma_tau . gamma_sigma)

    F(tau, sigma) = a_tau . a_sigma          weight W               (MODE_ACT)
                  = 1                        bias c                 (MODE_BIAS)
                  = [ids_tau == ids_sigma]   embedding rows E[ids]  (MODE_IDS)

Each program takes one [BLOCK_T, BLOCK_S] tile of the (tau, sigma) plane of one pair, forms the two tile Grams
A_tau A_sigma^T and G_tau G_sigma^T with fp32 K-loops over d_in and d_out, multiplies them elementwise, and writes
the tile's sum to its own slot of a partial-sum buffer that the host reduces. See docs/math.md, section 4 (the
"ghost" form), for the identity and for how the per-(tau, sigma) terms add up to a per-position attribution.
"""

import torch
import triton
import triton.language as tl

from entangle_fast._backend import interpreting
from entangle_fast._contract import check_ghost_gram_inputs, check_placement

MODE_ACT = 0
MODE_BIAS = 1
MODE_IDS = 2


def _tile_shape() -> tuple[int, int]:
    """(BLOCK_T, BLOCK_S), fixed per platform and shared by every autotune config.

    The partial-sum buffer has one slot per tile, so its size depends on the tile shape; keeping the shape out of the
    tuned parameters lets the launcher allocate (and NaN-poison) it before the autotuner has chosen. 64 x 64 suits
    preference data (responses of a few hundred tokens): a bigger tile wastes lanes on short segments and yields fewer
    programs when there are few pairs. The interpreter uses 32 x 32: its cost is per program, and 32 still leaves
    segments of 1, 7 and 129 tokens partial tiles.
    """
    return (32, 32) if interpreting() else (64, 64)


def _configs():
    if interpreting():
        # One small config: the interpreter runs each tile in numpy, tuning would only cost time. BLOCK_K = 16 keeps
        # d = 64 a multi-step K-loop and d = 3 a masked one.
        return [triton.Config({"BLOCK_K": 16}, num_warps=1, num_stages=1)]
    # Two [64, 64] fp32 accumulators live in registers; BLOCK_K is the step streamed through shared memory. Re-running
    # during tuning is harmless: every program overwrites its partial-sum slot and its positions tile, nothing is
    # accumulated in place.
    return [
        triton.Config({"BLOCK_K": 32}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_K": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_K": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_K": 128}, num_warps=8, num_stages=2),
    ]


@triton.jit
def _tile_gram(x_ptr, rows_t, rows_s, mask_t, mask_s, D,
               DOT_IN_FP32: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr):
    """X[rows_t] X[rows_s]^T as an fp32 [BLOCK_T, BLOCK_S] tile, K-loop over the D columns of X [S, D]."""
    acc = tl.zeros((BLOCK_T, BLOCK_S), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < D
        # Padded rows and columns load 0, so they add nothing to the dot.
        xt = tl.load(x_ptr + rows_t[:, None] * D + offs_k[None, :], mask=mask_t[:, None] & mask_k[None, :], other=0.0)
        xs = tl.load(x_ptr + rows_s[:, None] * D + offs_k[None, :], mask=mask_s[:, None] & mask_k[None, :], other=0.0)
        if DOT_IN_FP32:
            # The Triton 3.9 interpreter's bf16 x bf16 dot is wrong; fp32 operands hold bf16 exactly.
            xt = xt.to(tl.float32)
            xs = xs.to(tl.float32)
        # "ieee" only matters for fp32 operands: TF32 would be less exact than PyTorch's fp32 matmul.
        acc = tl.dot(xt, tl.trans(xs), acc, input_precision="ieee")
    return acc


@triton.autotune(configs=_configs(), key=["D_IN", "D_OUT", "MODE"])
@triton.jit
def _ghost_gram_kernel(a_ptr, ids_ptr, g_ptr, cu_ptr, pairs_ptr, partials_ptr, pos_ptr,
                       D_IN, D_OUT, TMAX_I, TMAX_J,
                       MODE: tl.constexpr, STORE_POS: tl.constexpr, DOT_IN_FP32: tl.constexpr,
                       BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr):
    """Grid (pair, tau block, sigma block), one tile per program.

    Why not (pair, tau block) looping over sigma: the loop would reuse nothing (the A_tau and G_tau tiles do not fit in
    registers for d ~ 4096, so they are re-streamed per sigma block either way), while the 3-D grid gives a P x T x T
    problem enough programs even for one long pair. Why partial sums and not an atomic add per pair: the cost is one
    fp32 store per tile (against 2 BLOCK_T BLOCK_S (d_in + d_out) FLOPs) plus a tiny host sum, and the result is then
    bitwise reproducible.
    """
    pid_p = tl.program_id(0).to(tl.int64)
    pid_t = tl.program_id(1)
    pid_s = tl.program_id(2)
    seg_i = tl.load(pairs_ptr + 2 * pid_p)
    seg_j = tl.load(pairs_ptr + 2 * pid_p + 1)
    start_i = tl.load(cu_ptr + seg_i)
    len_i = tl.load(cu_ptr + seg_i + 1) - start_i
    start_j = tl.load(cu_ptr + seg_j)
    len_j = tl.load(cu_ptr + seg_j + 1) - start_j

    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    mask_t = offs_t < len_i
    mask_s = offs_s < len_j
    # int64 rows (start_* are int64): S * d passes 2**31 at LLM sizes.
    rows_t = start_i + offs_t
    rows_s = start_j + offs_s

    # A squared norm (i == j) is symmetric in (tau, sigma): without the positions output, tiles below the block
    # diagonal are skipped and those above it count twice (an exact factor), a third less work for the monitor's
    # usual (w, l), (w, w), (l, l) triples.
    in_range = (pid_t * BLOCK_T < len_i) & (pid_s * BLOCK_S < len_j)
    if STORE_POS:
        active = in_range
        weight = 1.0
    else:
        same = seg_i == seg_j
        active = in_range & ((pid_t <= pid_s) | (seg_i != seg_j))
        weight = tl.where(same & (pid_t < pid_s), 2.0, 1.0)

    prod = tl.zeros((BLOCK_T, BLOCK_S), dtype=tl.float32)
    if active:
        gg = _tile_gram(g_ptr, rows_t, rows_s, mask_t, mask_s, D_OUT, DOT_IN_FP32, BLOCK_T, BLOCK_S, BLOCK_K)
        if MODE == 0:  # MODE_ACT: F = a_tau . a_sigma
            f = _tile_gram(a_ptr, rows_t, rows_s, mask_t, mask_s, D_IN, DOT_IN_FP32, BLOCK_T, BLOCK_S, BLOCK_K)
            prod = f * gg
        elif MODE == 1:  # MODE_BIAS: F = 1
            prod = gg
        else:  # MODE_IDS: F = [ids_tau == ids_sigma]
            ids_t = tl.load(ids_ptr + rows_t, mask=mask_t, other=-1)
            ids_s = tl.load(ids_ptr + rows_s, mask=mask_s, other=-2)
            prod = tl.where(ids_t[:, None] == ids_s[None, :], gg, 0.0)
        # Padded lanes are already 0 (their loads were); the explicit mask keeps it so whatever F is.
        prod = tl.where(mask_t[:, None] & mask_s[None, :], prod, 0.0)

    if STORE_POS:
        # Every in-bounds element of position_matrix belongs to exactly one program, padding included (written 0),
        # so the launcher need not zero-fill it.
        base = pos_ptr + pid_p * TMAX_I * TMAX_J
        tl.store(base + offs_t[:, None] * TMAX_J + offs_s[None, :], prod,
                 mask=(offs_t < TMAX_I)[:, None] & (offs_s < TMAX_J)[None, :])
    slot = (pid_p * tl.num_programs(1) + pid_t) * tl.num_programs(2) + pid_s
    tl.store(partials_ptr + slot, tl.sum(prod) * weight)


def _dot_in_fp32(dtype) -> bool:
    return interpreting() and dtype == torch.bfloat16


def ghost_gram_fwd(a, gamma, ids, cu_seqlens, seg_pairs, *, positions: bool = False):
    """Ghost Gram values (and optionally the per-(tau, sigma) terms) of segment pairs.

    a [S, d_in] or None, gamma [S, d_out]: one dtype among fp32/bf16/fp16, contiguous, one device.
    ids int64 [S] or None (exclusive with a). cu_seqlens int64 [n_seg + 1], seg_pairs int64 [P, 2]: already validated
    (monotone offsets ending at S, indices in range; see entangle_fast.ghost.ghost_gram).
    Returns (values fp32 [P], position_matrix fp32 [P, Tmax_i, Tmax_j] or None), Tmax_i (Tmax_j) the longest first
    (second) segment over the pairs; the padding of position_matrix is 0.
    """
    device = check_placement(check_ghost_gram_inputs(a, gamma, ids, cu_seqlens, seg_pairs), "triton")

    n_pairs = seg_pairs.shape[0]
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    if n_pairs:
        tmax_i = int(lengths[seg_pairs[:, 0]].max())
        tmax_j = int(lengths[seg_pairs[:, 1]].max())
    else:
        tmax_i = tmax_j = 0
    block_t, block_s = _tile_shape()
    nb_t, nb_s = triton.cdiv(tmax_i, block_t), triton.cdiv(tmax_j, block_s)
    # NaN-filled rather than empty: a slot or position the kernel failed to write cannot pass as a value. Both cost
    # O(P * Tmax^2 / tile) or the positions output itself, nothing next to the kernel.
    partials = torch.full((n_pairs, nb_t * nb_s), float("nan"), dtype=torch.float32, device=device)
    pos = None
    if positions:
        pos = torch.full((n_pairs, tmax_i, tmax_j), float("nan"), dtype=torch.float32, device=device)
    if n_pairs == 0 or nb_t == 0 or nb_s == 0:
        values = torch.zeros(n_pairs, dtype=torch.float32, device=device)
        return values, pos.zero_() if pos is not None else None

    mode = MODE_ACT if a is not None else (MODE_IDS if ids is not None else MODE_BIAS)
    # Absent optional tensors are replaced by a live pointer; MODE / STORE_POS keep it unread.
    _ghost_gram_kernel[(n_pairs, nb_t, nb_s)](
        a if a is not None else gamma, ids if ids is not None else cu_seqlens, gamma, cu_seqlens, seg_pairs,
        partials, pos if pos is not None else partials,
        a.shape[1] if a is not None else 0, gamma.shape[1], tmax_i, tmax_j,
        MODE=mode, STORE_POS=positions, DOT_IN_FP32=_dot_in_fp32(gamma.dtype),
        BLOCK_T=block_t, BLOCK_S=block_s,
    )
    # A fixed-order sum over one pair's tiles: deterministic, unlike an atomic add per pair.
    return partials.sum(dim=1), pos
