// Fused linear + logit transform + log-softmax + gather: token log-probs without the [N, V] logits (CUDA twin of
// kernels/logprob.py).
//
// For a row n with hidden state h_n, output embedding W [V, D], bias b [V] and the logit transform
// f(l) = scale * l, or softcap * tanh(scale * l / softcap) when softcap > 0 (entangle_fast/logit_transform.py):
//
//   l[n, v] = h_n . W[v] + b[v],   z[n, v] = f(l[n, v])
//   lse[n]  = log sum_v exp z[n, v]          (online max/sum over 64-column vocabulary tiles, fp32)
//   lp[n]   = z[n, y_n] - lse[n]             (0 where y_n == ignore_index)
//
// With metrics the same walk keeps, per row, the entropy of p = softmax(z) as log s - sum_v exp(z - m)(z - m) / s
// (running max m and sum s, the second sum rebased with m like s), the sum of z and its argmax (lowest index on ties).
//
// Backward, over the vocabulary columns [vocab_start, vocab_end) only, with p = exp(z - lse) and
// du = f'(l) (e_{y_n} - p) (the delta_t of docs/math.md, section 3.1, through the transform), g the upstream
// gradient of lp:
//
//   grad_hidden_unscaled[n] += sum_v du[n, v] W[v]      (not scaled by g: grad h = g r, docs/math.md 3.1)
//   grad_weight[v]          += sum_n g_n du[n, v] h_n
//   grad_bias[v]            += sum_n g_n du[n, v]
//   probs_out[n, v - vocab_start] = p[n, v]             (0 on ignored rows)
//   delta_out[n, v - vocab_start] = du[n, v]            (0 on ignored rows)
//
// Logit tiles are recomputed from h and W in both passes, so memory beyond the inputs stays O(N + V) (plus the
// caller's probability chunk). docs/math.md section 3.1 explains why the same p tiles feed the token statistics.
#include "common.cuh"

#include <algorithm>
#include <cmath>

namespace entangle_fast {
namespace {

using namespace dev;

// z = f(l) of the logit transform, and f'(l) into *fprime when given.
__device__ __forceinline__ float transform_logit(float l, float scale, float softcap, float* fprime = nullptr) {
  if (softcap > 0.0f) {
    const float t = tanhf(l * (scale / softcap));
    if (fprime != nullptr) *fprime = scale * (1.0f - t * t);
    return softcap * t;
  }
  if (fprime != nullptr) *fprime = scale;
  return l * scale;
}

// Forward. Grid (row blocks, vocabulary splits): a block walks the 64-column tiles of its split keeping, per row, a
// running max m, a running sum s of exp(z - m) and the target logit t. Splitting the vocabulary keeps the GPU busy
// when N is small (1024 tokens are only 16 row blocks); a second kernel merges the splits.
template <class T, bool kMetrics>
__global__ void __launch_bounds__(kThreads)
    logprob_fwd_kernel(const T* __restrict__ hidden, const T* __restrict__ weight, const T* __restrict__ bias,
                       const int64_t* __restrict__ labels, float* __restrict__ part, int64_t* __restrict__ part_arg,
                       int64_t N, int64_t V, int64_t D, int64_t chunk, bool vec, float scale, float softcap) {
  __shared__ __align__(128) T As[kTile * ld_k<T>()];
  __shared__ __align__(128) T Bs[kTile * ld_k<T>()];
  __shared__ __align__(128) float Cs[kTile * kLdC];
  __shared__ int64_t lab_s[kTile];

  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int nrows = static_cast<int>(min(static_cast<int64_t>(kTile), N - n0));
  const int split = blockIdx.y;
  const int64_t v_begin = split * chunk;
  const int64_t v_end = min(V, v_begin + chunk);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (threadIdx.x < kTile) lab_s[threadIdx.x] = threadIdx.x < nrows ? labels[n0 + threadIdx.x] : -1;

  // Warp w owns rows 16 w .. 16 w + 15 for the whole walk, so their running state stays in registers (every lane
  // holds the same copy after the butterfly reductions).
  float m[16], s[16], t[16];
  float ent[16], zsum[16];  // metrics only: sum exp(z - m)(z - m), sum z
  int64_t arg[16];
#pragma unroll
  for (int q = 0; q < 16; ++q) {
    m[q] = -INFINITY;
    s[q] = 0.0f;
    t[q] = 0.0f;
    ent[q] = 0.0f;
    zsum[q] = 0.0f;
    arg[q] = 0;
  }

  for (int64_t v0 = v_begin; v0 < v_end; v0 += kTile) {
    const int ncols = static_cast<int>(min(static_cast<int64_t>(kTile), v_end - v0));
    TileAcc<T> acc;
    acc.zero();
    gram_nt<T>(acc, As, Bs, hidden, n0, nrows, weight, v0, ncols, D, vec);
    acc.store(Cs, kLdC);
    __syncthreads();

    const bool in0 = lane < ncols, in1 = lane + 32 < ncols;
    const float b0 = (bias != nullptr && in0) ? to_f32(bias[v0 + lane]) : 0.0f;
    const float b1 = (bias != nullptr && in1) ? to_f32(bias[v0 + lane + 32]) : 0.0f;
#pragma unroll
    for (int q = 0; q < 16; ++q) {
      const int r = warp * 16 + q;
      const float z0 = in0 ? transform_logit(Cs[r * kLdC + lane] + b0, scale, softcap) : -INFINITY;
      const float z1 = in1 ? transform_logit(Cs[r * kLdC + lane + 32] + b1, scale, softcap) : -INFINITY;
      // Every tile has at least one real column, so m_new is finite and exp(m - m_new) never sees inf - inf,
      // even on the first tile where m = -inf.
      const float tile_max = warp_max(fmaxf(z0, z1));
      const float m_new = fmaxf(m[q], tile_max);
      const float e0 = expf(z0 - m_new), e1 = expf(z1 - m_new);
      if (kMetrics) {
        zsum[q] += warp_sum((in0 ? z0 : 0.0f) + (in1 ? z1 : 0.0f));
        // The lowest column of the tile holding its maximum; strictly greater than the running max, so that on a
        // tie the earlier tile, hence the lower index, keeps the argmax.
        const int cand = warp_min_int(z0 == tile_max ? lane : (z1 == tile_max ? lane + 32 : kTile));
        if (tile_max > m[q]) arg[q] = v0 + cand;
        // Rebase on m_new: (z - m_new) = (z - m) + (m - m_new); before the first tile s = 0 and m - m_new = -inf.
        const float shift = m[q] - m_new;
        const float rebased = s[q] > 0.0f ? expf(shift) * (ent[q] + shift * s[q]) : 0.0f;
        ent[q] = rebased + warp_sum((in0 ? e0 * (z0 - m_new) : 0.0f) + (in1 ? e1 * (z1 - m_new) : 0.0f));
      }
      s[q] = s[q] * expf(m[q] - m_new) + warp_sum(e0 + e1);
      m[q] = m_new;
      // Exactly one tile of one split holds a row's label; ignored rows (label outside [0, V)) never match.
      const int64_t col = lab_s[r] - v0;
      if (col >= 0 && col < ncols) {
        t[q] = transform_logit(Cs[r * kLdC + col] + (bias != nullptr ? to_f32(bias[v0 + col]) : 0.0f), scale,
                               softcap);
      }
    }
    __syncthreads();  // Cs is rewritten by the next tile
  }

  if (lane == 0) {
    const int64_t stride = static_cast<int64_t>(gridDim.y) * N;
    float* pm = part + split * N;
    float* ps = pm + stride;
    float* pt = ps + stride;
#pragma unroll
    for (int q = 0; q < 16; ++q) {
      const int r = warp * 16 + q;
      if (r < nrows) {
        pm[n0 + r] = m[q];
        ps[n0 + r] = s[q];
        pt[n0 + r] = t[q];
        if (kMetrics) {
          pt[stride + n0 + r] = ent[q];
          pt[2 * stride + n0 + r] = zsum[q];
          part_arg[split * N + n0 + r] = arg[q];
        }
      }
    }
  }
}

// Merges the splits of each row: lse = M + log sum_k s_k exp(m_k - M), and the one split that saw the label. With
// metrics: with w_k = exp(lse_k - lse) the share of split k and H_k = log s_k - ent_k / s_k its own entropy,
// H = sum_k w_k (H_k - log w_k) (well conditioned; H_1 for one split); the sums of z add; the argmax is that of the
// first split holding the maximum (splits are in vocabulary order).
__global__ void logprob_combine_kernel(const float* __restrict__ part, const int64_t* __restrict__ part_arg,
                                       const int64_t* __restrict__ labels, float* __restrict__ logprobs,
                                       float* __restrict__ lse, float* __restrict__ entropy,
                                       float* __restrict__ logit_sum, int64_t* __restrict__ argmax, int64_t N,
                                       int splits, int64_t ignore_index) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= N) return;
  const float* pm = part;
  const float* ps = part + splits * N;
  const float* pt = ps + splits * N;
  const float* pe = pt + splits * N;
  const float* pz = pe + splits * N;
  float mx = -INFINITY;
  int top = 0;
  for (int k = 0; k < splits; ++k) {
    if (pm[k * N + n] > mx) {  // strictly: the first split holding the maximum
      mx = pm[k * N + n];
      top = k;
    }
  }
  float sum = 0.0f, target = 0.0f;
  for (int k = 0; k < splits; ++k) {
    sum += ps[k * N + n] * expf(pm[k * N + n] - mx);
    target += pt[k * N + n];
  }
  const float l = mx + logf(sum);
  lse[n] = l;
  logprobs[n] = labels[n] != ignore_index ? target - l : 0.0f;
  if (entropy != nullptr) {
    float h = 0.0f, zs = 0.0f;
    for (int k = 0; k < splits; ++k) {
      const float sk = ps[k * N + n];  // >= 1: every split has a column
      const float log_w = pm[k * N + n] + logf(sk) - l;
      h += expf(log_w) * (logf(sk) - pe[k * N + n] / sk - log_w);
      zs += pz[k * N + n];
    }
    entropy[n] = h;
    logit_sum[n] = zs;
    argmax[n] = part_arg[top * N + n];
  }
}

// Shared-memory plan of the backward, in bytes. Phase 1 (logit tile) stages h/W K-slices in region AB; phase 2
// (gradient products) reuses AB for [64][64] slices of W and h. C holds fp32 tiles (logits, then products on their
// way to the atomics); DU holds du and g du in the input dtype, the tensor-core operands.
template <class T>
struct BwdSmem {
  static constexpr int kAB1 = 2 * kTile * ld_k<T>() * static_cast<int>(sizeof(T));
  static constexpr int kAB2 = 2 * kTile * ld_t<T>() * static_cast<int>(sizeof(T));
  static constexpr int kAB = kAB1 > kAB2 ? kAB1 : kAB2;
  static constexpr int kC = kTile * kLdC * static_cast<int>(sizeof(float));
  static constexpr int kDU = 2 * kTile * ld_t<T>() * static_cast<int>(sizeof(T));
  static constexpr int kBytes = kAB + kC + kDU;
  static_assert(kAB % 128 == 0 && kC % 128 == 0, "regions must stay 128-byte aligned");
};

// Backward. Grid (vocabulary tiles of [vocab_start, vocab_end), row blocks): each block owns one [64 rows x 64 vocab]
// probability tile, recomputes its logits, forms du, and adds its share of every gradient with fp32 atomics.
template <class T>
__global__ void __launch_bounds__(kThreads)
    logprob_bwd_kernel(LogprobBwdArgs p, int64_t row_block0, bool vec) {
  extern __shared__ __align__(128) unsigned char smem[];
  using S = BwdSmem<T>;
  T* As = reinterpret_cast<T*>(smem);
  T* Bs = As + kTile * ld_k<T>();
  T* Ws = reinterpret_cast<T*>(smem);
  T* Hs = Ws + kTile * ld_t<T>();
  float* Cs = reinterpret_cast<float*>(smem + S::kAB);
  T* DU = reinterpret_cast<T*>(smem + S::kAB + S::kC);
  T* GDU = DU + kTile * ld_t<T>();
  __shared__ float lse_s[kTile], g_s[kTile];
  __shared__ int64_t lab_s[kTile];
  __shared__ int live_s[kTile];

  const T* hidden = static_cast<const T*>(p.hidden);
  const T* weight = static_cast<const T*>(p.weight);
  const T* bias = static_cast<const T*>(p.bias);
  const int64_t N = p.N, D = p.D;
  const int64_t n0 = (row_block0 + blockIdx.y) * kTile;
  const int nrows = static_cast<int>(min(static_cast<int64_t>(kTile), N - n0));
  const int64_t v0 = p.vocab_start + static_cast<int64_t>(blockIdx.x) * kTile;
  const int ncols = static_cast<int>(min(static_cast<int64_t>(kTile), p.vocab_end - v0));

  int live = 0;
  if (threadIdx.x < kTile) {
    const int r = threadIdx.x;
    const int64_t lab = r < nrows ? p.labels[n0 + r] : p.ignore_index;
    live = r < nrows && lab != p.ignore_index;
    lab_s[r] = lab;
    live_s[r] = live;
    lse_s[r] = r < nrows ? p.lse[n0 + r] : 0.0f;
    g_s[r] = r < nrows ? p.grad_logprobs[n0 + r] : 0.0f;
  }
  // Prompt and padding rows (ignored) contribute nothing but zeros to probs_out: a block of only those skips the work.
  if (!__syncthreads_or(live)) {
    for (int e = threadIdx.x; e < kTile * kTile; e += kThreads) {
      const int r = e / kTile, c = e % kTile;
      if (r >= nrows || c >= ncols) continue;
      if (p.probs_out != nullptr) p.probs_out[(n0 + r) * p.probs_row_stride + (v0 - p.vocab_start) + c] = 0.0f;
      if (p.delta_out != nullptr) p.delta_out[(n0 + r) * p.delta_row_stride + (v0 - p.vocab_start) + c] = 0.0f;
    }
    return;
  }

  // Phase 1: logits of the tile, then p, du = onehot - p and g du.
  {
    TileAcc<T> acc;
    acc.zero();
    gram_nt<T>(acc, As, Bs, hidden, n0, nrows, weight, v0, ncols, D, vec);
    acc.store(Cs, kLdC);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < kTile * kTile; e += kThreads) {
    const int r = e / kTile, c = e % kTile;
    const bool in = live_s[r] && c < ncols;
    float fprime;
    const float z = transform_logit(Cs[r * kLdC + c] + (bias != nullptr && c < ncols ? to_f32(bias[v0 + c]) : 0.0f),
                                    p.scale, p.softcap, &fprime);
    // Zeroing p on ignored rows and padded columns makes every product below ignore them for free.
    const float prob = in ? expf(z - lse_s[r]) : 0.0f;
    const float du = ((in && lab_s[r] == v0 + c ? 1.0f : 0.0f) - prob) * fprime;  // dlp/dl = f'(l) dlp/dz
    const float gdu = du * g_s[r];
    if (r < nrows && c < ncols) {
      if (p.probs_out != nullptr) p.probs_out[(n0 + r) * p.probs_row_stride + (v0 - p.vocab_start) + c] = prob;
      if (p.delta_out != nullptr) p.delta_out[(n0 + r) * p.delta_row_stride + (v0 - p.vocab_start) + c] = du;
    }
    // The deltas enter the tensor-core products in the input dtype, as PyTorch's own low-precision backward rounds
    // grad_logits; the sums still accumulate in fp32.
    DU[r * ld_t<T>() + c] = from_f32<T>(du);
    GDU[r * ld_t<T>() + c] = from_f32<T>(gdu);
    Cs[r * kLdC + c] = gdu;
  }
  __syncthreads();
  if (p.grad_bias != nullptr && threadIdx.x < ncols) {
    const int c = threadIdx.x;
    float sum = 0.0f;
    for (int r = 0; r < kTile; ++r) sum += Cs[r * kLdC + c];
    atomicAdd(p.grad_bias + v0 + c, sum);
  }
  __syncthreads();  // Cs is reused below

  // Phase 2: per 64-column slice of d, dh = du . W[tile] and dW = (g du)^T . h, each added with atomics.
  const bool want_w = p.grad_weight != nullptr;
  for (int64_t d0 = 0; d0 < D; d0 += kTile) {
    load_tile<T, kTile>(Ws, ld_t<T>(), weight, v0, ncols, D, d0, vec);
    if (want_w) load_tile<T, kTile>(Hs, ld_t<T>(), hidden, n0, nrows, D, d0, vec);
    __syncthreads();
    {
      TileAcc<T> acc;
      acc.zero();
      acc.template mma<kRow, kRow>(DU, ld_t<T>(), Ws, ld_t<T>(), kTile);
      acc.store(Cs, kLdC);
    }
    __syncthreads();
    for (int e = threadIdx.x; e < kTile * kTile; e += kThreads) {
      const int r = e / kTile, c = e % kTile;
      // Ignored rows would only add zeros: skip their atomics.
      if (live_s[r] && d0 + c < D) atomicAdd(p.grad_hidden_unscaled + (n0 + r) * D + d0 + c, Cs[r * kLdC + c]);
    }
    if (want_w) {
      __syncthreads();
      {
        TileAcc<T> acc;
        acc.zero();
        // (g du)^T: GDU is stored [row][vocab], read as a column-major [vocab][row] operand.
        acc.template mma<kCol, kRow>(GDU, ld_t<T>(), Hs, ld_t<T>(), kTile);
        acc.store(Cs, kLdC);
      }
      __syncthreads();
      for (int e = threadIdx.x; e < kTile * kTile; e += kThreads) {
        const int r = e / kTile, c = e % kTile;
        if (r < ncols && d0 + c < D) {
          atomicAdd(p.grad_weight + (v0 + r - p.grad_weight_row0) * D + d0 + c, Cs[r * kLdC + c]);
        }
      }
    }
    __syncthreads();  // Ws, Hs and Cs are rewritten by the next slice
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Vocabulary splits of the forward: enough blocks for about four per SM, never a split without a column.
void fwd_splits(int64_t N, int64_t V, int num_sms, int* splits, int64_t* chunk) {
  const int64_t row_blocks = ceil_div(N, kTile);
  const int64_t tiles = ceil_div(V, kTile);
  const int64_t want = std::max<int64_t>(1, ceil_div(4 * static_cast<int64_t>(std::max(num_sms, 1)), row_blocks));
  const int64_t per_split = ceil_div(tiles, std::min(want, tiles));
  *chunk = per_split * kTile;
  *splits = static_cast<int>(ceil_div(tiles, per_split));
}

template <class T>
cudaError_t launch_fwd(const LogprobFwdArgs& a, cudaStream_t stream) {
  int splits;
  int64_t chunk;
  fwd_splits(a.N, a.V, a.num_sms, &splits, &chunk);
  const int64_t row_blocks = ceil_div(a.N, kTile);
  const bool vec = vec_ok<T>(a.hidden, a.D) && vec_ok<T>(a.weight, a.D);
  const bool metrics = a.entropy != nullptr;
  const dim3 grid(static_cast<unsigned>(row_blocks), splits);
  if (metrics) {
    logprob_fwd_kernel<T, true><<<grid, kThreads, 0, stream>>>(
        static_cast<const T*>(a.hidden), static_cast<const T*>(a.weight), static_cast<const T*>(a.bias), a.labels,
        a.workspace, a.arg_workspace, a.N, a.V, a.D, chunk, vec, a.scale, a.softcap);
  } else {
    logprob_fwd_kernel<T, false><<<grid, kThreads, 0, stream>>>(
        static_cast<const T*>(a.hidden), static_cast<const T*>(a.weight), static_cast<const T*>(a.bias), a.labels,
        a.workspace, nullptr, a.N, a.V, a.D, chunk, vec, a.scale, a.softcap);
  }
  const int threads = 256;
  logprob_combine_kernel<<<static_cast<unsigned>(ceil_div(a.N, threads)), threads, 0, stream>>>(
      a.workspace, a.arg_workspace, a.labels, a.logprobs, a.lse, a.entropy, a.logit_sum, a.argmax, a.N, splits,
      a.ignore_index);
  return cudaGetLastError();
}

template <class T>
cudaError_t launch_bwd(const LogprobBwdArgs& a, cudaStream_t stream) {
  const int bytes = BwdSmem<T>::kBytes;
  cudaError_t err = cudaFuncSetAttribute(logprob_bwd_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err != cudaSuccess) return err;
  const int64_t vocab_tiles = ceil_div(a.vocab_end - a.vocab_start, kTile);
  const int64_t row_blocks = ceil_div(a.N, kTile);
  const bool vec = vec_ok<T>(a.hidden, a.D) && vec_ok<T>(a.weight, a.D);
  // gridDim.y is capped at 65535: launch the row blocks in slabs.
  constexpr int64_t kMaxY = 65535;
  for (int64_t rb = 0; rb < row_blocks; rb += kMaxY) {
    const unsigned ny = static_cast<unsigned>(std::min(kMaxY, row_blocks - rb));
    logprob_bwd_kernel<T><<<dim3(static_cast<unsigned>(vocab_tiles), ny), kThreads, bytes, stream>>>(a, rb, vec);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace

int64_t logprob_fwd_splits(int64_t N, int64_t V, int num_sms) {
  if (N <= 0 || V <= 0) return 0;
  int splits;
  int64_t chunk;
  fwd_splits(N, V, num_sms, &splits, &chunk);
  return splits;
}

int64_t logprob_fwd_workspace_floats(int64_t N, int64_t V, int num_sms, bool metrics) {
  return (metrics ? 5 : 3) * logprob_fwd_splits(N, V, num_sms) * N;
}

cudaError_t logprob_fwd(const LogprobFwdArgs& args, cudaStream_t stream) {
  if (args.N <= 0) return cudaSuccess;
  if (args.V <= 0 || args.D <= 0) return cudaErrorInvalidValue;
  switch (args.dtype) {
    case DType::kFloat32: return launch_fwd<float>(args, stream);
    case DType::kBFloat16: return launch_fwd<__nv_bfloat16>(args, stream);
    case DType::kFloat16: return launch_fwd<__half>(args, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t logprob_bwd(const LogprobBwdArgs& args, cudaStream_t stream) {
  if (args.N <= 0 || args.vocab_end <= args.vocab_start) return cudaSuccess;
  if (args.vocab_start < 0 || args.vocab_end > args.V || args.D <= 0) return cudaErrorInvalidValue;
  switch (args.dtype) {
    case DType::kFloat32: return launch_bwd<float>(args, stream);
    case DType::kBFloat16: return launch_bwd<__nv_bfloat16>(args, stream);
    case DType::kFloat16: return launch_bwd<__half>(args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace entangle_fast
