"""Fused linear + logit transform + log-softmax + gather: token log-probs without the [N, V] logits.

For a row n with hidden state h_n, output embedding W [V, d], bias b [V] and the model's logit transform
f(l) = scale * l, or softcap * tanh(scale * l / softcap) (entangle_fast/logit_transform.py; softcap 0 = none):

    l[n, v]  = h_n . W[v] + b[v],      z[n, v] = f(l[n, v])
    lse[n]   = log sum_v exp z[n, v]                  (online max/sum over vocab tiles, fp32)
    lp[n]    = z[n, y_n] - lse[n]                     (0 where y_n == ignore_index)

With metrics, the same walk keeps per row the entropy H = -sum p log p of p = softmax(z), as
H = log s - sum_v exp(z - m)(z - m) / s with the running max m and sum s (rebased with m like s), the sum of z and
its argmax (lowest index on ties). In the backward, with p = exp(z - lse) and du = f'(l) (e_{y_n} - p) (the delta_t
of docs/math.md section 3.1 through the transform):

    dlp[n]/dh_n = sum_v du[n, v] W[v]        dlp[n]/dW[v] = du[n, v] h_n        dlp[n]/db[v] = du[n, v]

See docs/math.md, section 3.1, for why the same p tiles (du tiles under a soft-cap) also feed the token Gram
statistics. Logit tiles are recomputed from h and W in both passes, so memory stays O(N + V) beyond the inputs.
"""

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from entangle_fast._backend import interpreting
from entangle_fast._contract import (
    check_logprob_bwd_call,
    check_logprob_inputs,
    check_placement,
    check_transform,
    grad_weight_row0,
)



# Hopper tiles, compiled offline with ptxas for sm_90a at d % 16 == 0: no register spills, shared
# memory under 228 KB. fp32 operands take the "ieee" FMA path, which keeps its operands in
# registers, hence the smaller fp32 tiles. Not yet timed on a GPU.
_FWD_CONFIGS_16BIT = [
    triton.Config({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_D": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_D": 64}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_N": 128, "BLOCK_V": 256, "BLOCK_D": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 64, "BLOCK_V": 256, "BLOCK_D": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_D": 64}, num_warps=4, num_stages=4),
]
_FWD_CONFIGS_FP32 = [
    triton.Config({"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_D": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_D": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 128, "BLOCK_V": 64, "BLOCK_D": 32}, num_warps=8, num_stages=3),
]
# The backward is NOT autotuned: it accumulates into caller-owned buffers with atomics, and the
# autotuner re-runs the kernel while timing, which would add the gradient several times over.
# reset_to_zero would wipe what earlier vocab-range calls accumulated, and restore_value would
# clone grad_weight ([V, d] fp32: GBs for a large vocabulary). One fixed config per dtype class.
_BWD_CONFIG_16BIT = dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=3)
_BWD_CONFIG_FP32 = dict(BLOCK_N=64, BLOCK_V=64, BLOCK_D=32, num_warps=8, num_stages=2)
# The interpreter runs each tile in numpy: one small config (tl.dot needs every block dim >= 16).
_INTERPRET_BLOCKS = dict(BLOCK_N=16, BLOCK_V=32, BLOCK_D=16)


def _fwd_configs():
    if interpreting():
        return [triton.Config(dict(_INTERPRET_BLOCKS), num_warps=1)]
    return _FWD_CONFIGS_16BIT + _FWD_CONFIGS_FP32


def _prune_fwd_configs(configs, named_args, **kwargs):
    fp32 = named_args["h_ptr"].dtype == torch.float32
    wanted = _FWD_CONFIGS_FP32 if fp32 else _FWD_CONFIGS_16BIT
    return [c for c in configs if any(c is w for w in wanted)] or configs


def _bwd_config(dtype) -> dict:
    if interpreting():
        return dict(_INTERPRET_BLOCKS, num_warps=1, num_stages=1)
    return dict(_BWD_CONFIG_FP32 if dtype == torch.float32 else _BWD_CONFIG_16BIT)


@triton.jit
def _round_bf16_keep_fp32(x):
    """fp32 x rounded to the nearest bf16 (ties to even), returned as fp32.

    Interpreter only: there x.to(tl.bfloat16) truncates (and its "rtne" mode drops mantissa carries),
    which would make the CPU run less exact than the GPU's round-to-nearest cast it stands in for.
    """
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _tanh(x, TANH_IN_FP64: tl.constexpr):
    """tanh of an fp32 tile. On the GPU libdevice's tanhf (CUDA's math library, as PyTorch's CUDA tanh). The
    interpreter has no libdevice: there (1 - e) / (1 + e), e = exp(-2|x|), in fp64, which rounds to within an ulp
    of tanh in fp32 (below |x| = 1e-4, where that form cancels, tanh x = x in fp32)."""
    if TANH_IN_FP64:
        a = tl.abs(x).to(tl.float64)
        e = tl.exp(-2.0 * a)
        t = tl.where(a < 1e-4, a, (1.0 - e) / (1.0 + e)).to(tl.float32)
        return tl.where(x < 0, -t, t)
    else:
        return libdevice.tanh(x)


@triton.jit
def _transform(l, scale, softcap, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, TANH_IN_FP64: tl.constexpr):
    """(z, f'(l)) of the logit transform; f' is a dummy 1.0 without a transform."""
    if HAS_SOFTCAP:
        t = _tanh(l * (scale / softcap), TANH_IN_FP64)
        return t * softcap, (1.0 - t * t) * scale
    elif HAS_SCALE:
        return l * scale, scale
    else:
        return l, 1.0


@triton.jit
def _logit_tile(h_ptr, w_ptr, b_ptr, offs_n, offs_v, mask_n, mask_v, D,
                HAS_BIAS: tl.constexpr, DOT_IN_FP32: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """z[offs_n, offs_v] = h . W^T + b as an fp32 [BLOCK_N, BLOCK_V] tile (K-loop over d)."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        # Masked lanes load 0 so padded d columns add nothing to the dot.
        h = tl.load(h_ptr + offs_n[:, None] * D + offs_d[None, :],
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        w = tl.load(w_ptr + offs_v[:, None] * D + offs_d[None, :],
                    mask=mask_v[:, None] & mask_d[None, :], other=0.0)
        if DOT_IN_FP32:
            # The Triton 3.9 interpreter's bf16 x bf16 dot is wrong; fp32 operands hold bf16 exactly.
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        # "ieee" matters only for fp32 operands: TF32 would be less exact than PyTorch's fp32 matmul.
        acc = tl.dot(h, tl.trans(w), acc, input_precision="ieee")
    if HAS_BIAS:
        b = tl.load(b_ptr + offs_v, mask=mask_v, other=0.0)
        acc += b.to(tl.float32)[None, :]
    return acc


@triton.autotune(configs=_fwd_configs(), key=["D", "V", "num_splits"],
                 prune_configs_by={"early_config_prune": _prune_fwd_configs})
@triton.jit
def _logprob_fwd_kernel(h_ptr, w_ptr, b_ptr, labels_ptr, part_lse_ptr, part_target_ptr,
                        part_ent_ptr, part_sum_ptr, part_max_ptr, part_arg_ptr,
                        N, V, D, num_splits, ignore_index, scale, softcap,
                        HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                        METRICS: tl.constexpr, DOT_IN_FP32: tl.constexpr, INTERPRET: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid (row blocks, vocab splits). Each program walks its split's vocab tiles with a running
    max m and sum s, and writes part_lse[split, n] = m + log s and part_target[split, n] = z[n, y_n]
    (0 when y_n lies in another split). Splitting V keeps the GPU busy when N / BLOCK_N is small.
    With METRICS also the split's own entropy, sum of z, max m and argmax."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    # int64 row offsets: N * d can pass 2**31 at LLM sizes.
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    labels = tl.load(labels_ptr + offs_n, mask=mask_n, other=ignore_index)

    # Splits own whole tiles, so only the last tile of [0, V) is ragged.
    tiles_per_split = tl.cdiv(tl.cdiv(V, BLOCK_V), num_splits)
    v_lo = pid_s * tiles_per_split * BLOCK_V
    v_hi = tl.minimum(V, v_lo + tiles_per_split * BLOCK_V)

    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    target = tl.zeros((BLOCK_N,), dtype=tl.float32)
    ent = tl.zeros((BLOCK_N,), dtype=tl.float32)   # sum exp(z - m) (z - m)
    zsum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    arg = tl.zeros((BLOCK_N,), dtype=tl.int64)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        z = _logit_tile(h_ptr, w_ptr, b_ptr, offs_n, offs_v, mask_n, mask_v, D,
                        HAS_BIAS, DOT_IN_FP32, BLOCK_N, BLOCK_V, BLOCK_D)
        z, _ = _transform(z, scale, softcap, HAS_SCALE, HAS_SOFTCAP, INTERPRET)
        z = tl.where(mask_v[None, :], z, float("-inf"))
        # Every tile visited has a real column (v0 < V), so m_new is finite and the rescale
        # exp(m - m_new) never meets inf - inf, even on the first tile where m = -inf.
        tile_max = tl.max(z, axis=1)
        m_new = tl.maximum(m, tile_max)
        d = z - m_new[:, None]
        e = tl.exp(d)
        if METRICS:
            zsum += tl.sum(tl.where(mask_v[None, :], z, 0.0), axis=1)
            # Strictly greater: on a tie the earlier tile, hence the lower index, keeps the argmax.
            tile_arg = tl.argmax(z, axis=1, tie_break_left=True).to(tl.int64) + v0
            arg = tl.where(tile_max > m, tile_arg, arg)
            # Rebase the old terms on m_new: (z - m_new) = (z - m) + (m - m_new); before the first tile s = 0
            # and m - m_new = -inf: keep 0 rather than 0 * inf. Padded lanes have e = 0 and d = -inf.
            shift = tl.where(s > 0, m - m_new, 0.0)
            ent = tl.where(s > 0, tl.exp(shift) * (ent + shift * s), 0.0)
            ent += tl.sum(e * tl.where(mask_v[None, :], d, 0.0), axis=1)
        s = s * tl.exp(m - m_new) + tl.sum(e, axis=1)
        m = m_new
        # Exactly one tile of [0, V) holds each label; the others add 0.
        hit = offs_v[None, :] == labels[:, None]
        target += tl.sum(tl.where(hit, z, 0.0), axis=1)

    # s >= 1 after any tile (its max term is exp(0)), so the clamp changes nothing there; it only
    # spares log(0) for a split with no tiles (more splits than tiles), whose part_lse = m = -inf
    # then drops out of the log-sum-exp over splits.
    out = pid_s.to(tl.int64) * N + offs_n
    log_s = tl.log(tl.maximum(s, 1.0))
    tl.store(part_lse_ptr + out, m + log_s, mask=mask_n)
    tl.store(part_target_ptr + out, target, mask=mask_n)
    if METRICS:
        tl.store(part_ent_ptr + out, log_s - ent / tl.maximum(s, 1.0), mask=mask_n)
        tl.store(part_sum_ptr + out, zsum, mask=mask_n)
        tl.store(part_max_ptr + out, m, mask=mask_n)
        tl.store(part_arg_ptr + out, arg, mask=mask_n)


@triton.jit
def _logprob_bwd_kernel(h_ptr, w_ptr, b_ptr, labels_ptr, lse_ptr, g_ptr,
                        grad_h_ptr, grad_w_ptr, grad_b_ptr, probs_ptr, delta_ptr,
                        N, D, vocab_start, vocab_end, gw_row0, ignore_index, scale, softcap,
                        HAS_BIAS: tl.constexpr, HAS_GRAD_W: tl.constexpr, HAS_GRAD_B: tl.constexpr,
                        HAS_PROBS: tl.constexpr, HAS_DELTA: tl.constexpr,
                        HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_IN_FP32: tl.constexpr,
                        INTERPRET: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid (row blocks, vocab tiles of [vocab_start, vocab_end)); each program owns one p tile.
    Row r of grad_w holds vocabulary entry gw_row0 + r."""
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = vocab_start + pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_n = offs_n < N
    mask_v = offs_v < vocab_end

    labels = tl.load(labels_ptr + offs_n, mask=mask_n, other=ignore_index)
    live = mask_n & (labels != ignore_index)
    lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
    g = tl.load(g_ptr + offs_n, mask=mask_n, other=0.0)

    z = _logit_tile(h_ptr, w_ptr, b_ptr, offs_n, offs_v, mask_n, mask_v, D,
                    HAS_BIAS, DOT_IN_FP32, BLOCK_N, BLOCK_V, BLOCK_D)
    z, fprime = _transform(z, scale, softcap, HAS_SCALE, HAS_SOFTCAP, INTERPRET)
    live_tile = live[:, None] & mask_v[None, :]
    # Zeroing p on ignored rows and padded lanes makes every product below ignore them for free.
    p = tl.where(live_tile, tl.exp(z - lse[:, None]), 0.0)
    hit = (offs_v[None, :] == labels[:, None]) & live_tile
    du = tl.where(hit, 1.0, 0.0) - p
    if HAS_SCALE or HAS_SOFTCAP:  # dlp/dl = f'(l) dlp/dz
        du = du * fprime

    width = vocab_end - vocab_start
    if HAS_PROBS:
        tl.store(probs_ptr + offs_n[:, None] * width + (offs_v - vocab_start)[None, :], p,
                 mask=mask_n[:, None] & mask_v[None, :])
    if HAS_DELTA:
        tl.store(delta_ptr + offs_n[:, None] * width + (offs_v - vocab_start)[None, :], du,
                 mask=mask_n[:, None] & mask_v[None, :])

    gdu = du * g[:, None]
    # Atomics are "relaxed": the adds commute and nothing reads the buffers inside the kernel.
    if HAS_GRAD_B:
        tl.atomic_add(grad_b_ptr + offs_v, tl.sum(gdu, axis=0), mask=mask_v, sem="relaxed")

    # The deltas go through the dot in the input dtype (tensor cores; PyTorch's own low-precision
    # backward rounds grad_logits the same way); the sums still accumulate in fp32.
    if DOT_IN_FP32:
        du_dot = _round_bf16_keep_fp32(du)
        gdu_dot = _round_bf16_keep_fp32(gdu)
    else:
        du_dot = du.to(w_ptr.dtype.element_ty)
        gdu_dot = gdu.to(w_ptr.dtype.element_ty)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        w = tl.load(w_ptr + offs_v[:, None] * D + offs_d[None, :],
                    mask=mask_v[:, None] & mask_d[None, :], other=0.0)
        if DOT_IN_FP32:
            w = w.to(tl.float32)
        dh = tl.dot(du_dot, w, input_precision="ieee")
        # Ignored rows would only add zeros: skip their atomics.
        tl.atomic_add(grad_h_ptr + offs_n[:, None] * D + offs_d[None, :], dh,
                      mask=live[:, None] & mask_d[None, :], sem="relaxed")
        if HAS_GRAD_W:
            h = tl.load(h_ptr + offs_n[:, None] * D + offs_d[None, :],
                        mask=mask_n[:, None] & mask_d[None, :], other=0.0)
            if DOT_IN_FP32:
                h = h.to(tl.float32)
            dw = tl.dot(tl.trans(gdu_dot), h, input_precision="ieee")
            tl.atomic_add(grad_w_ptr + (offs_v - gw_row0)[:, None] * D + offs_d[None, :], dw,
                          mask=mask_v[:, None] & mask_d[None, :], sem="relaxed")


def _dot_in_fp32(dtype) -> bool:
    return interpreting() and dtype == torch.bfloat16


def _default_num_splits(N, V, device) -> int:
    if device.type != "cuda":
        return 1
    # Enough programs for two waves over the SMs, counting row blocks of the largest BLOCK_N,
    # while each split still spans >= 1024 vocab columns so the extra passes over h stay cheap.
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    row_blocks = triton.cdiv(N, 128)
    return max(1, min(triton.cdiv(2 * sms, row_blocks), triton.cdiv(V, 1024)))


def combine_splits(part_lse, part_target, labels, ignore_index, part_ent=None, part_sum=None, part_max=None,
                   part_arg=None, vocab_size=None):
    """Merge per-split partials ``[S, N]`` into ``(logprobs, lse)`` (``+ (entropy, logit_sum, argmax)`` when the
    metric partials are given). With w_k = exp(lse_k - lse) the share of split k, the entropy is
    sum_k w_k (H_k - log w_k): well conditioned, exactly H_1 for one split."""
    lse = torch.logsumexp(part_lse, dim=0) if part_lse.shape[0] > 1 else part_lse[0]
    target = part_target.sum(dim=0)
    logprobs = torch.where(labels != ignore_index, target - lse, torch.zeros_like(lse))
    if part_ent is None:
        return logprobs, lse
    if part_lse.shape[0] == 1:
        return logprobs, lse, part_ent[0], part_sum[0], part_arg[0]
    log_w = part_lse - lse
    w = torch.exp(log_w)
    # Splits without tiles have w = 0 and log w = -inf: they add nothing.
    entropy = torch.where(w > 0, w * (part_ent - log_w), torch.zeros_like(w)).sum(dim=0)
    top = part_max.max(dim=0, keepdim=True).values
    # Splits are in vocabulary order and each holds its lowest maximising index: the smallest tying one wins.
    argmax = torch.where(part_max == top, part_arg, torch.full_like(part_arg, vocab_size)).min(dim=0).values
    return logprobs, lse, entropy, part_sum.sum(dim=0), argmax


def logprob_fwd(hidden, weight, labels, bias, ignore_index, *, num_splits=None, scale=1.0, softcap=0.0,
                metrics=False):
    """Token log-probs of `labels` under softmax(f(hidden @ weight.T + bias)), never forming [N, V].

    hidden [N, d], weight [V, d], bias [V] or None: one dtype among fp32/bf16/fp16, contiguous, one device.
    labels int64 [N]; rows equal to ignore_index get logprob 0.0. Other labels must lie in [0, V).
    f(l) = scale * l, then softcap * tanh(. / softcap) when softcap > 0 (0 = no soft-cap).
    num_splits: vocab splits run in parallel per row block (default: enough to fill the GPU; 1 on CPU).
    Returns (logprobs, lse), both fp32 [N]; lse (of z = f(l)) is computed for ignored rows too (finite).
    With metrics: (logprobs, lse, entropy fp32 [N], logit_sum fp32 [N], argmax int64 [N]) of softmax(z), every row.
    """
    N, V, d, named = check_logprob_inputs(hidden, weight, labels, bias)
    check_placement(named, "triton")
    scale, softcap = check_transform(scale, softcap)
    if num_splits is None:
        num_splits = _default_num_splits(N, V, hidden.device)
    if not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"num_splits must be a positive int, got {num_splits!r}")
    # NaN-filled rather than empty so that a partial the kernel failed to write cannot pass as a value.
    parts = torch.full((5 if metrics else 2, num_splits, N), float("nan"), dtype=torch.float32,
                       device=hidden.device)
    part_arg = torch.full((num_splits, N) if metrics else (1,), -1, dtype=torch.int64, device=hidden.device)
    if N > 0:
        def grid(meta):
            return (triton.cdiv(N, meta["BLOCK_N"]), num_splits)

        extra = parts[2:] if metrics else [parts[0]] * 3
        _logprob_fwd_kernel[grid](
            hidden, weight, bias if bias is not None else hidden, labels, parts[0], parts[1],
            extra[0], extra[1], extra[2], part_arg,
            N, V, d, num_splits, int(ignore_index), scale, softcap or 1.0,
            HAS_BIAS=bias is not None, HAS_SCALE=scale != 1.0, HAS_SOFTCAP=softcap > 0, METRICS=bool(metrics),
            DOT_IN_FP32=_dot_in_fp32(hidden.dtype), INTERPRET=interpreting(),
        )
    if not metrics:
        return combine_splits(parts[0], parts[1], labels, ignore_index)
    return combine_splits(parts[0], parts[1], labels, ignore_index, parts[2], parts[3], parts[4], part_arg, V)


def logprob_bwd(hidden, weight, labels, bias, lse, grad_logprobs, ignore_index, *,
                grad_hidden_unscaled, grad_weight, grad_bias, vocab_start, vocab_end, probs_out,
                scale=1.0, softcap=0.0, delta_out=None):
    """Accumulate the log-prob gradients of vocab columns [vocab_start, vocab_end) into fp32 buffers.

    hidden [N, d], weight [V, d], bias [V] or None, labels int64 [N], scale and softcap as in `logprob_fwd`;
    lse fp32 [N] from `logprob_fwd` (of z = f(l)); grad_logprobs fp32 [N] (upstream g).
    With l = hidden . weight[v] + bias[v], p = exp(f(l) - lse) and du = f'(l) ([v == label] - p), for non-ignored
    rows:
        grad_hidden_unscaled fp32 [N, d]   += du @ weight[range]          (not scaled by g)
        grad_weight          fp32 [V, d]   += (g * du)^T @ hidden         (rows in range; or None)
                             or [vocab_end - vocab_start, d], its row 0 holding vocab_start
        grad_bias            fp32 [V]      += sum_n g * du                 (or None)
        probs_out            fp32 [N, vocab_end - vocab_start] = p       (0.0 on ignored rows; or None)
        delta_out            fp32 [N, vocab_end - vocab_start] = du      (0.0 on ignored rows; or None)
    Buffers are added to, not overwritten (probs_out excepted): the caller zero-fills them and may
    call once per consecutive vocab range.
    """
    N, width = check_logprob_bwd_call(
        "triton", hidden, weight, labels, bias, lse=lse, grad_logprobs=grad_logprobs,
        grad_hidden_unscaled=grad_hidden_unscaled, grad_weight=grad_weight, grad_bias=grad_bias,
        vocab_start=vocab_start, vocab_end=vocab_end, probs_out=probs_out, delta_out=delta_out)
    scale, softcap = check_transform(scale, softcap)
    if N == 0 or width == 0:
        return
    d = hidden.shape[1]

    cfg = _bwd_config(hidden.dtype)
    grid = (triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(width, cfg["BLOCK_V"]))
    # Absent optional tensors are replaced by a live pointer; the constexpr flags keep it unread.
    _logprob_bwd_kernel[grid](
        hidden, weight, bias if bias is not None else hidden, labels, lse, grad_logprobs,
        grad_hidden_unscaled,
        grad_weight if grad_weight is not None else grad_hidden_unscaled,
        grad_bias if grad_bias is not None else grad_hidden_unscaled,
        probs_out if probs_out is not None else grad_hidden_unscaled,
        delta_out if delta_out is not None else grad_hidden_unscaled,
        N, d, vocab_start, vocab_end, grad_weight_row0(grad_weight, vocab_start, vocab_end), int(ignore_index),
        scale, softcap or 1.0,
        HAS_BIAS=bias is not None, HAS_GRAD_W=grad_weight is not None, HAS_GRAD_B=grad_bias is not None,
        HAS_PROBS=probs_out is not None, HAS_DELTA=delta_out is not None, HAS_SCALE=scale != 1.0,
        HAS_SOFTCAP=softcap > 0, DOT_IN_FP32=_dot_in_fp32(hidden.dtype), INTERPRET=interpreting(),
        **cfg,
    )
