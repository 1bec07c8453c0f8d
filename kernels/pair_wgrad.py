"""Pair-by-pair weight-gradient GEMM with the entanglement statistics in its epilogue.

A linear layer y = a A^T + c sees, at the tokens tau of row r, input a_tau and output gradient gamma_tau. Its weight
gradient is a GEMM over all tokens, dW = sum_tau gamma_tau a_tau^T, and row r's share of it is
G_r = sum_{tau in r} gamma_tau a_tau^T. Running the K-loop (over tokens) pair by pair, a program that owns one
[BLOCK_M, BLOCK_N] tile of dW holds, for pair (w, l), the tiles acc_w = G_w[tile] and acc_l = G_l[tile] at once, so

    inner[p]    += sum(acc_w * acc_l)        chosen[p]   += sum(acc_w * acc_w)        rejected[p] += sum(acc_l * acc_l)

summed over the tiles give <G_w, G_l>, ||G_w||^2 and ||G_l||^2 exactly (Frobenius products split over any tiling),
for about 6 FLOPs per weight element per pair against 4 T for the GEMM itself; then acc_w + acc_l is folded into the
tile's dW accumulator. Rows in no pair are summed afterwards and the tile is written once. A bias c is the weight of a
constant input 1: with HAS_BIAS the columns run over [a | 1] (column d_in is all ones on real tokens), so column d_in
of the tile is db = sum gamma and the statistics include <b_w, b_l> etc. automatically.
See docs/math.md section 4 (and section 4.1, "the floor") and entangle_fast/bookkeeping.py.
"""

import torch
import triton
import triton.language as tl

from entangle_fast._backend import interpreting
from entangle_fast._contract import check_pair_wgrad_inputs, check_placement


def _configs():
    if interpreting():
        # One small config: the interpreter runs each tile in numpy. 16 is tl.dot's smallest block; BLOCK_K = 16
        # leaves rows of 7 tokens a masked K-step and rows of 129 tokens nine of them.
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=1, num_stages=1)]
    # Three fp32 [BLOCK_M, BLOCK_N] accumulators live at once (dW, acc_w, acc_l): 128 x 128 would spill, so the
    # largest tile is 128 x 64. Not yet timed on a GPU.
    return [
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    ]


@triton.jit
def _round_bf16_keep_fp32(x):
    """fp32 x rounded to the nearest bf16 (ties to even), as fp32. Interpreter only: its fp32 -> bf16 cast truncates,
    which would make the CPU run's bf16 grad_weight less exact than the GPU's round-to-nearest store."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _row_grad(acc, a_ptr, g_ptr, cu_ptr, row, offs_m, offs_n, mask_m, mask_n, D_IN, D_OUT,
              HAS_BIAS: tl.constexpr, DOT_IN_FP32: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc + gamma_r^T [a_r | 1] on this program's tile: a masked K-loop over row r's tokens."""
    start = tl.load(cu_ptr + row)
    end = tl.load(cu_ptr + row + 1)
    for t0 in range(start, end, BLOCK_K):
        # int64 token offsets (cu is int64): S * d passes 2**31 at LLM sizes.
        offs_t = t0 + tl.arange(0, BLOCK_K)
        mask_t = offs_t < end
        # Tokens past the row's end and padded m / n lanes load 0, so they add nothing to the dot.
        g = tl.load(g_ptr + offs_t[None, :] * D_OUT + offs_m[:, None], mask=mask_m[:, None] & mask_t[None, :],
                    other=0.0)
        x = tl.load(a_ptr + offs_t[:, None] * D_IN + offs_n[None, :], mask=mask_t[:, None] & mask_n[None, :],
                    other=0.0)
        if HAS_BIAS:
            ones = mask_t[:, None] & (offs_n == D_IN)[None, :]
            x = tl.where(ones, tl.full((BLOCK_K, 1), 1.0, x.dtype), x)
        if DOT_IN_FP32:
            # The Triton 3.9 interpreter's bf16 x bf16 dot is wrong; fp32 operands hold bf16 exactly.
            g = g.to(tl.float32)
            x = x.to(tl.float32)
        # "ieee" only matters for fp32 operands: TF32 would be less exact than PyTorch's fp32 matmul.
        acc = tl.dot(g, x, acc, input_precision="ieee")
    return acc


@triton.autotune(configs=_configs(), key=["D_IN", "D_OUT", "HAS_BIAS"], reset_to_zero=["stats_ptr"])
@triton.jit
def _pair_wgrad_kernel(a_ptr, g_ptr, cu_ptr, pairs_ptr, fold_ptr, unpaired_ptr, gw_ptr, gb_ptr, stats_ptr,
                       n_pairs, n_unpaired, D_IN, D_OUT,
                       HAS_BIAS: tl.constexpr, DOT_IN_FP32: tl.constexpr, ROUND_BF16_OUT: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Grid (d_out tiles, (d_in + HAS_BIAS) tiles): one tile of [dW | db] per program, written once.

    Why atomics for the statistics and not a partial-sum slot per (tile, pair): the programs of one pair are spread over
    the whole grid and the adds are three per pair per tile, nothing next to the tile's GEMM; a slot buffer would be
    [n_tiles, 3, B] and need a host reduction. The autotuner re-runs the kernel while timing, hence reset_to_zero.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < D_OUT
    mask_n = offs_n < D_IN  # the input columns; column D_IN is the bias's ones, made inside _row_grad

    total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for p in range(n_pairs):
        row_w = tl.load(pairs_ptr + 2 * p)
        row_l = tl.load(pairs_ptr + 2 * p + 1)
        acc_w = _row_grad(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), a_ptr, g_ptr, cu_ptr, row_w, offs_m,
                          offs_n, mask_m, mask_n, D_IN, D_OUT, HAS_BIAS, DOT_IN_FP32, BLOCK_K)
        acc_l = _row_grad(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), a_ptr, g_ptr, cu_ptr, row_l, offs_m,
                          offs_n, mask_m, mask_n, D_IN, D_OUT, HAS_BIAS, DOT_IN_FP32, BLOCK_K)
        # Padded lanes of acc_w / acc_l are 0 (their loads were), so the tile sums need no mask.
        tl.atomic_add(stats_ptr + p, tl.sum(acc_w * acc_l), sem="relaxed")
        tl.atomic_add(stats_ptr + n_pairs + p, tl.sum(acc_w * acc_w), sem="relaxed")
        tl.atomic_add(stats_ptr + 2 * n_pairs + p, tl.sum(acc_l * acc_l), sem="relaxed")
        # A row in several pairs enters dW once: fold is 1 only at its first appearance.
        fold_w = tl.load(fold_ptr + 2 * p).to(tl.float32)
        fold_l = tl.load(fold_ptr + 2 * p + 1).to(tl.float32)
        total += fold_w * acc_w + fold_l * acc_l
    for u in range(n_unpaired):
        row = tl.load(unpaired_ptr + u)
        total = _row_grad(total, a_ptr, g_ptr, cu_ptr, row, offs_m, offs_n, mask_m, mask_n, D_IN, D_OUT,
                          HAS_BIAS, DOT_IN_FP32, BLOCK_K)

    if ROUND_BF16_OUT:
        total = _round_bf16_keep_fp32(total)
    out = total.to(gw_ptr.dtype.element_ty)
    tl.store(gw_ptr + offs_m[:, None] * D_IN + offs_n[None, :], out, mask=mask_m[:, None] & mask_n[None, :])
    if HAS_BIAS:
        # Only the tile that holds column D_IN writes db; the row sum picks that one column.
        if (pid_n * BLOCK_N <= D_IN) & (D_IN < pid_n * BLOCK_N + BLOCK_N):
            db = tl.sum(tl.where((offs_n == D_IN)[None, :], total, 0.0), axis=1)
            if ROUND_BF16_OUT:
                db = _round_bf16_keep_fp32(db)
            tl.store(gb_ptr + offs_m, db.to(gb_ptr.dtype.element_ty), mask=mask_m)


def pair_wgrad(a, gamma, cu_seqlens, pairs, fold, unpaired, *, bias: bool, out_dtype):
    """Weight gradient of one layer and per-pair statistics of its per-row gradients (Triton).

    a [S, d_in], gamma [S, d_out]: one dtype among fp32/bf16/fp16, contiguous, one device. cu_seqlens int64 [R + 1],
    pairs int64 [B, 2], fold int32 [B, 2], unpaired int64 [U]: already validated and planned
    (entangle_fast.bookkeeping.pair_plan). out_dtype: fp32/bf16/fp16.
    Returns (grad_weight [d_out, d_in] out_dtype, grad_bias [d_out] out_dtype or None, stats fp32 [3, B]) with
    stats[0] = <G_w, G_l>, stats[1] = ||G_w||^2, stats[2] = ||G_l||^2 (bias parts included when ``bias``).
    """
    named = check_pair_wgrad_inputs(a, gamma, cu_seqlens, pairs, fold, unpaired, out_dtype)
    device = check_placement(named, "triton")
    d_in, d_out = a.shape[1], gamma.shape[1]
    n_pairs = pairs.shape[0]
    # NaN-filled rather than empty: an element the kernel failed to write cannot pass as a value. The statistics are
    # accumulated with atomics, so they must start at 0.
    gw = torch.full((d_out, d_in), float("nan"), dtype=out_dtype, device=device)
    gb = torch.full((d_out,), float("nan"), dtype=out_dtype, device=device) if bias else None
    stats = torch.zeros(3, n_pairs, dtype=torch.float32, device=device)
    n_cols = d_in + int(bias)
    grid = lambda meta: (triton.cdiv(d_out, meta["BLOCK_M"]), triton.cdiv(n_cols, meta["BLOCK_N"]))  # noqa: E731
    # Absent grad_bias is replaced by a live pointer; HAS_BIAS keeps it unwritten.
    _pair_wgrad_kernel[grid](
        a, gamma, cu_seqlens, pairs, fold, unpaired, gw, gb if gb is not None else gw, stats,
        n_pairs, unpaired.shape[0], d_in, d_out,
        HAS_BIAS=bias, DOT_IN_FP32=interpreting() and a.dtype == torch.bfloat16,
        ROUND_BF16_OUT=interpreting() and out_dtype == torch.bfloat16,
    )
    return gw, gb, stats
