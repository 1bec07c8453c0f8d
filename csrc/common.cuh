// Shared pieces of entangle_fast's CUDA backend.
//
// Host part (any C++ compiler): the argument structs and entry points implemented in logprob.cu and ghost_gram.cu,
// which bindings.cpp calls with raw pointers. Device part (nvcc only): fp32 conversions of the input dtypes, tile
// staging from global into shared memory, and one 64 x 64 tile product that runs on tensor cores (WMMA, bf16/fp16
// operands, fp32 accumulators) or, for fp32 inputs, on plain FMAs: no TF32, so fp32 results track PyTorch's fp32
// matmul.
//
// Every kernel works on [64 x 64] output tiles with 128 threads (4 warps, each owning a 32 x 32 quarter).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace entangle_fast {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Rows and columns of every output tile; the ghost-Gram partial-sum buffer has one slot per (tau, sigma) tile.
constexpr int kTile = 64;

// ---------------------------------------------------------------------------------------------------------------------
// Entry points (contract: kernels/logprob.py and kernels/ghost_gram.py; the binding validates shapes and dtypes)
// ---------------------------------------------------------------------------------------------------------------------

struct LogprobFwdArgs {
  DType dtype;
  const void* hidden;     // [N, D]
  const void* weight;     // [V, D]
  const void* bias;       // [V] or nullptr
  const int64_t* labels;  // [N]
  float* logprobs;        // [N] out
  float* lse;             // [N] out
  float* workspace;       // logprob_fwd_workspace_floats(N, V, num_sms, metrics) floats, contents irrelevant
  int64_t N, V, D, ignore_index;
  int num_sms;
  // Logit transform z = f(l): scale * l, then softcap * tanh(. / softcap) when softcap > 0.
  float scale, softcap;
  // Token metrics of softmax(z), or all nullptr: entropy [N], logit_sum [N] and argmax [N] out, and
  // arg_workspace, logprob_fwd_splits(N, V, num_sms) * N int64 of scratch.
  float* entropy;
  float* logit_sum;
  int64_t* argmax;
  int64_t* arg_workspace;
};

// Vocabulary splits of the forward, and the floats of scratch it needs: running (max, sum, target) per row for each
// split, plus (entropy sum, logit sum) with metrics.
int64_t logprob_fwd_splits(int64_t N, int64_t V, int num_sms);
int64_t logprob_fwd_workspace_floats(int64_t N, int64_t V, int num_sms, bool metrics);
cudaError_t logprob_fwd(const LogprobFwdArgs& args, cudaStream_t stream);

struct LogprobBwdArgs {
  DType dtype;
  const void* hidden;            // [N, D]
  const void* weight;            // [V, D]
  const void* bias;              // [V] or nullptr
  const int64_t* labels;         // [N]
  const float* lse;              // [N]
  const float* grad_logprobs;    // [N]
  float* grad_hidden_unscaled;   // [N, D], added to
  float* grad_weight;            // rows [grad_weight_row0, vocab_end) of a [V, D] gradient, added to, or nullptr
  float* grad_bias;              // [V], added to, or nullptr
  float* probs_out;              // [N, vocab_end - vocab_start] with row stride probs_row_stride, or nullptr
  int64_t probs_row_stride;
  int64_t N, V, D, vocab_start, vocab_end, ignore_index;
  int64_t grad_weight_row0;      // the vocabulary entry in row 0 of grad_weight (0, or vocab_start for a range buffer)
  float scale, softcap;          // the logit transform of the forward (softcap 0 = none); lse is that of z = f(l)
  float* delta_out;              // [N, vocab_end - vocab_start] f'(l) (e_y - p), row stride delta_row_stride, or nullptr
  int64_t delta_row_stride;
};

cudaError_t logprob_bwd(const LogprobBwdArgs& args, cudaStream_t stream);

struct GhostGramArgs {
  DType dtype;
  const void* a;               // [S, d_in] or nullptr
  const void* gamma;           // [S, d_out]
  const int64_t* ids;          // [S] or nullptr (exclusive with a)
  const int64_t* cu_seqlens;   // [n_seg + 1]
  const int64_t* seg_pairs;    // [P, 2]
  float* partials;             // [P, ceil(tmax_i / kTile) * ceil(tmax_j / kTile)] out
  float* positions;            // [P, tmax_i, tmax_j] out, or nullptr
  int64_t n_pairs, d_in, d_out, tmax_i, tmax_j;
};

cudaError_t ghost_gram(const GhostGramArgs& args, cudaStream_t stream);

}  // namespace entangle_fast

// ---------------------------------------------------------------------------------------------------------------------
// Device helpers
// ---------------------------------------------------------------------------------------------------------------------
#ifdef __CUDACC__

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <type_traits>

namespace entangle_fast {
namespace dev {

constexpr int kThreads = 128;  // 4 warps per block
constexpr int kTileK = 32;     // K step of the products whose K is the model dimension (streamed from global)

// Explicit intrinsics throughout: torch builds extensions with __CUDA_NO_HALF_CONVERSIONS__ and friends.
__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

template <class T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Shared-memory row padding of 16 bytes: breaks bank conflicts and keeps every row 16-byte aligned (vector stores)
// and every 16-row fragment 32-byte aligned (WMMA's pointer requirement) for the leading dimensions used here.
template <class T> constexpr int pad() { return 16 / static_cast<int>(sizeof(T)); }
template <class T> constexpr int ld_k() { return kTileK + pad<T>(); }   // tiles [64][kTileK]
template <class T> constexpr int ld_t() { return kTile + pad<T>(); }    // tiles [64][64]
constexpr int kLdC = kTile + 4;                                          // fp32 result tiles [64][64]

template <class T>
__host__ __device__ constexpr bool vec_ok_shape(int64_t K) { return K % (16 / static_cast<int64_t>(sizeof(T))) == 0; }

// Whether rows of length K starting at `p` can be read with 16-byte vector loads.
template <class T>
inline bool vec_ok(const void* p, int64_t K) {
  return vec_ok_shape<T>(K) && (reinterpret_cast<uintptr_t>(p) % 16 == 0);
}

// dst[r][c] = src[(row0 + r) * K + col0 + c] for r < nrows and col0 + c < K, else 0; r < 64, c < COLS.
// Zero padding is what lets partial tiles go through the unmasked tile product: padded rows and k-columns add 0.
template <class T, int COLS>
__device__ __forceinline__ void load_tile(T* __restrict__ dst, int ld_dst, const T* __restrict__ src, int64_t row0,
                                          int nrows, int64_t K, int64_t col0, bool vec) {
  if (vec) {
    constexpr int kVec = 16 / sizeof(T);
    constexpr int kPerRow = COLS / kVec;
    // With K % kVec == 0 and col0 % kVec == 0 a vector is either wholly inside [0, K) or wholly outside.
    for (int i = threadIdx.x; i < kTile * kPerRow; i += kThreads) {
      const int r = i / kPerRow;
      const int c = (i % kPerRow) * kVec;
      uint4 v = make_uint4(0u, 0u, 0u, 0u);
      if (r < nrows && col0 + c < K) v = __ldg(reinterpret_cast<const uint4*>(src + (row0 + r) * K + col0 + c));
      *reinterpret_cast<uint4*>(dst + r * ld_dst + c) = v;
    }
  } else {
    const T zero = from_f32<T>(0.0f);
    for (int i = threadIdx.x; i < kTile * COLS; i += kThreads) {
      const int r = i / COLS;
      const int c = i % COLS;
      T v = zero;
      if (r < nrows && col0 + c < K) v = src[(row0 + r) * K + col0 + c];
      dst[r * ld_dst + c] = v;
    }
  }
}

// Operand layouts of C[m][n] += sum_k A(m, k) B(k, n), both operands in shared memory:
//   A: kRow -> A[m * lda + k],  kCol -> A[k * lda + m];   B: kRow -> B[k * ldb + n],  kCol -> B[n * ldb + k].
enum Layout { kRow, kCol };

// The 64 x 64 fp32 accumulator of one block. Each warp owns a 32 x 32 quarter (warp_m = warp / 2, warp_n = warp % 2).
template <class T>
struct TileAcc {
  using Frag = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;
  Frag f[2][2];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) nvcuda::wmma::fill_fragment(f[i][j], 0.0f);
  }

  template <Layout LA, Layout LB>
  __device__ __forceinline__ void mma(const T* A, int lda, const T* B, int ldb, int K) {
    namespace wmma = nvcuda::wmma;
    using LayA = std::conditional_t<LA == kRow, wmma::row_major, wmma::col_major>;
    using LayB = std::conditional_t<LB == kRow, wmma::row_major, wmma::col_major>;
    const int warp = threadIdx.x / 32;
    const int m0 = (warp / 2) * 32;
    const int n0 = (warp % 2) * 32;
    for (int k = 0; k < K; k += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, LayA> a[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LayB> b[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int m = m0 + 16 * i;
        wmma::load_matrix_sync(a[i], LA == kRow ? A + m * lda + k : A + k * lda + m, lda);
      }
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int n = n0 + 16 * j;
        wmma::load_matrix_sync(b[j], LB == kRow ? B + k * ldb + n : B + n * ldb + k, ldb);
      }
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(f[i][j], a[i], b[j], f[i][j]);
    }
  }

  // Elementwise product with another accumulator: two fragments of one type map their elements identically.
  __device__ __forceinline__ void mul(const TileAcc& o) {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int e = 0; e < Frag::num_elements; ++e) f[i][j].x[e] *= o.f[i][j].x[e];
  }

  __device__ __forceinline__ void store(float* C, int ldc) const {
    const int warp = threadIdx.x / 32;
    const int m0 = (warp / 2) * 32;
    const int n0 = (warp % 2) * 32;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        nvcuda::wmma::store_matrix_sync(C + (m0 + 16 * i) * ldc + n0 + 16 * j, f[i][j], ldc,
                                        nvcuda::wmma::mem_row_major);
  }
};

// fp32 inputs: FMAs in fp32, no tensor cores (TF32 would round the operands to 10 mantissa bits). Thread t holds
// rows 4 * (t / 8) + i (i < 4) and columns t % 8 + 8 j (j < 8): the B reads of a warp hit 8 distinct banks.
template <>
struct TileAcc<float> {
  float v[4][8];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) v[i][j] = 0.0f;
  }

  template <Layout LA, Layout LB>
  __device__ __forceinline__ void mma(const float* A, int lda, const float* B, int ldb, int K) {
    const int tm = (threadIdx.x / 8) * 4;
    const int tn = threadIdx.x % 8;
#pragma unroll 4
    for (int k = 0; k < K; ++k) {
      float a[4], b[8];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = LA == kRow ? A[(tm + i) * lda + k] : A[k * lda + tm + i];
#pragma unroll
      for (int j = 0; j < 8; ++j) b[j] = LB == kRow ? B[k * ldb + tn + 8 * j] : B[(tn + 8 * j) * ldb + k];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) v[i][j] = fmaf(a[i], b[j], v[i][j]);
    }
  }

  __device__ __forceinline__ void mul(const TileAcc& o) {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) v[i][j] *= o.v[i][j];
  }

  __device__ __forceinline__ void store(float* C, int ldc) const {
    const int tm = (threadIdx.x / 8) * 4;
    const int tn = threadIdx.x % 8;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) C[(tm + i) * ldc + tn + 8 * j] = v[i][j];
  }
};

// acc += X[rows_a .. rows_a + na) . X'[rows_b .. rows_b + nb)^T over the K columns of two row-major [*, K] matrices,
// staged through As/Bs ([64][ld_k<T>()] each). Rows past na / nb are zero. Ends with a barrier, so the caller may
// reuse As/Bs right away.
template <class T>
__device__ __forceinline__ void gram_nt(TileAcc<T>& acc, T* As, T* Bs, const T* X, int64_t rows_a, int na,
                                        const T* Y, int64_t rows_b, int nb, int64_t K, bool vec) {
  for (int64_t k0 = 0; k0 < K; k0 += kTileK) {
    load_tile<T, kTileK>(As, ld_k<T>(), X, rows_a, na, K, k0, vec);
    load_tile<T, kTileK>(Bs, ld_k<T>(), Y, rows_b, nb, K, k0, vec);
    __syncthreads();
    acc.template mma<kRow, kCol>(As, ld_k<T>(), Bs, ld_k<T>(), kTileK);
    __syncthreads();
  }
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

__device__ __forceinline__ int warp_min_int(int x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = min(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

}  // namespace dev
}  // namespace entangle_fast

#endif  // __CUDACC__
