// Fused linear + log-softmax + gather: token log-probs without the [N, V] logits (CUDA twin of kernels/logprob.py).
//
// For a row n with hidden state h_n, output embedding W [V, D] and bias b [V]:
//
//   z[n, v] = h_n . W[v] + b[v]
//   lse[n]  = log sum_v exp z[n, v]          (online max/sum over 64-column vocabulary tiles, fp32)
//   l[n]    = z[n, y_n] - lse[n]             (0 where y_n == ignore_index)
//
// Backward, over the vocabulary columns [vocab_start, vocab_end) only, with p = exp(z - lse) and du = e_{y_n} - p
// (the delta_t of docs/math.md, section 3.1), g the upstream gradient of l:
//
//   grad_hidden_unscaled[n] += sum_v du[n, v] W[v]      (not scaled by g: grad h = g r, docs/math.md 3.1)
//   grad_weight[v]          += sum_n g_n du[n, v] h_n
//   grad_bias[v]            += sum_n g_n du[n, v]
//   probs_out[n, v - vocab_start] = p[n, v]             (0 on ignored rows)
//
// Logit tiles are recomputed from h and W in both passes, so memory beyond the inputs stays O(N + V) (plus the
// caller's probability chunk). docs/math.md section 3.1 explains why the same p tiles feed the token statistics.
#include "common.cuh"

#include <algorithm>
#include <cmath>

namespace entangle_fast {
namespace {

using namespace dev;

// Forward. Grid (row blocks, vocabulary splits): a block walks the 64-column tiles of its split keeping, per row, a
// running max m, a running sum s of exp(z - m) and the target logit t. Splitting the vocabulary keeps the GPU busy
// when N is small (1024 tokens are only 16 row blocks); a second kernel merges the splits.
template <class T>
__global__ void __launch_bounds__(kThreads)
    logprob_fwd_kernel(const T* __restrict__ hidden, const T* __restrict__ weight, const T* __restrict__ bias,
                       const int64_t* __restrict__ labels, float* __restrict__ part, int64_t N, int64_t V, int64_t D,
                       int64_t chunk, bool vec) {
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
#pragma unroll
  for (int q = 0; q < 16; ++q) {
    m[q] = -INFINITY;
    s[q] = 0.0f;
    t[q] = 0.0f;
  }

  for (int64_t v0 = v_begin; v0 < v_end; v0 += kTile) {
    const int ncols = static_cast<int>(min(static_cast<int64_t>(kTile), v_end - v0));
    TileAcc<T> acc;
    acc.zero();
    gram_nt<T>(acc, As, Bs, hidden, n0, nrows, weight, v0, ncols, D, vec);
    acc.store(Cs, kLdC);
    __syncthreads();

    const float b0 = (bias != nullptr && lane < ncols) ? to_f32(bias[v0 + lane]) : 0.0f;
    const float b1 = (bias != nullptr && lane + 32 < ncols) ? to_f32(bias[v0 + lane + 32]) : 0.0f;
#pragma unroll
    for (int q = 0; q < 16; ++q) {
      const int r = warp * 16 + q;
      const float z0 = lane < ncols ? Cs[r * kLdC + lane] + b0 : -INFINITY;
      const float z1 = lane + 32 < ncols ? Cs[r * kLdC + lane + 32] + b1 : -INFINITY;
      // Every tile has at least one real column, so m_new is finite and exp(m - m_new) never sees inf - inf,
      // even on the first tile where m = -inf.
      const float m_new = fmaxf(m[q], warp_max(fmaxf(z0, z1)));
      const float e = warp_sum(expf(z0 - m_new) + expf(z1 - m_new));
      s[q] = s[q] * expf(m[q] - m_new) + e;
      m[q] = m_new;
      // Exactly one tile of one split holds a row's label; ignored rows (label outside [0, V)) never match.
      const int64_t col = lab_s[r] - v0;
      if (col >= 0 && col < ncols) {
        t[q] = Cs[r * kLdC + col] + (bias != nullptr ? to_f32(bias[v0 + col]) : 0.0f);
      }
    }
    __syncthreads();  // Cs is rewritten by the next tile
  }

  if (lane == 0) {
    float* pm = part + split * N;
    float* ps = pm + static_cast<int64_t>(gridDim.y) * N;
    float* pt = ps + static_cast<int64_t>(gridDim.y) * N;
#pragma unroll
    for (int q = 0; q < 16; ++q) {
      const int r = warp * 16 + q;
      if (r < nrows) {
        pm[n0 + r] = m[q];
        ps[n0 + r] = s[q];
        pt[n0 + r] = t[q];
      }
    }
  }
}

// Merges the splits of each row: lse = M + log sum_k s_k exp(m_k - M), and the one split that saw the label.
__global__ void logprob_combine_kernel(const float* __restrict__ part, const int64_t* __restrict__ labels,
                                       float* __restrict__ logprobs, float* __restrict__ lse, int64_t N, int splits,
                                       int64_t ignore_index) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= N) return;
  const float* pm = part;
  const float* ps = part + splits * N;
  const float* pt = ps + splits * N;
  float mx = -INFINITY;
  for (int k = 0; k < splits; ++k) mx = fmaxf(mx, pm[k * N + n]);
  float sum = 0.0f, target = 0.0f;
  for (int k = 0; k < splits; ++k) {
    sum += ps[k * N + n] * expf(pm[k * N + n] - mx);
    target += pt[k * N + n];
  }
  const float l = mx + logf(sum);
  lse[n] = l;
  logprobs[n] = labels[n] != ignore_index ? target - l : 0.0f;
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
    if (p.probs_out != nullptr) {
      for (int e = threadIdx.x; e < kTile * kTile; e += kThreads) {
        const int r = e / kTile, c = e % kTile;
        if (r < nrows && c < ncols) p.probs_out[(n0 + r) * p.probs_row_stride + (v0 - p.vocab_start) + c] = 0.0f;
      }
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
    const float z = Cs[r * kLdC + c] + (bias != nullptr && c < ncols ? to_f32(bias[v0 + c]) : 0.0f);
    // Zeroing p on ignored rows and padded columns makes every product below ignore them for free.
    const float prob = in ? expf(z - lse_s[r]) : 0.0f;
    const float du = (in && lab_s[r] == v0 + c ? 1.0f : 0.0f) - prob;
    const float gdu = du * g_s[r];
    if (p.probs_out != nullptr && r < nrows && c < ncols) {
      p.probs_out[(n0 + r) * p.probs_row_stride + (v0 - p.vocab_start) + c] = prob;
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
  logprob_fwd_kernel<T><<<dim3(static_cast<unsigned>(row_blocks), splits), kThreads, 0, stream>>>(
      static_cast<const T*>(a.hidden), static_cast<const T*>(a.weight), static_cast<const T*>(a.bias), a.labels,
      a.workspace, a.N, a.V, a.D, chunk, vec);
  const int threads = 256;
  logprob_combine_kernel<<<static_cast<unsigned>(ceil_div(a.N, threads)), threads, 0, stream>>>(
      a.workspace, a.labels, a.logprobs, a.lse, a.N, splits, a.ignore_index);
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

int64_t logprob_fwd_workspace_floats(int64_t N, int64_t V, int num_sms) {
  if (N <= 0 || V <= 0) return 0;
  int splits;
  int64_t chunk;
  fwd_splits(N, V, num_sms, &splits, &chunk);
  return 3 * static_cast<int64_t>(splits) * N;
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
