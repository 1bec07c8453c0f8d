// Pair-by-pair weight-gradient GEMM with the entanglement statistics in its epilogue (CUDA twin of
// kernels/pair_wgrad.py).
//
// A linear layer's weight gradient is dW = sum_tau gamma_tau a_tau^T over all tokens; row r's share is
// G_r = sum_{tau in r} gamma_tau a_tau^T. A block owns one [64 x 64] tile of [dW | db] and runs its K-loop (tokens)
// pair by pair, keeping the chosen row's and the rejected row's partial tiles apart; their tile sums
// <acc_w, acc_l>, ||acc_w||^2, ||acc_l||^2 go to per-pair fp32 scalars with atomics (the tiles of a Frobenius product
// add up to it), then acc_w + acc_l is folded into the tile's accumulator (each row once, see `fold`). Rows in no pair
// are summed afterwards and the tile is written once. A bias is the weight of a constant input 1: with grad_bias the
// columns run over [a | 1], so column d_in is db = sum gamma and the statistics include the bias parts.
// fp32 accumulation: tensor cores (WMMA) for bf16/fp16 operands, FMAs for fp32 (no TF32). See docs/math.md section 4.
#include "pair_wgrad.cuh"

namespace entangle_fast {
namespace {

using namespace dev;

// Shared tiles are [kTileK tokens][64 features]; the K of the tile product is the token axis.
template <class T> constexpr int ld_f() { return kTile + pad<T>(); }

// dst[k][c] = src[(t0 + k) * K + col0 + c] for k < nt and col0 + c < K, 1 at column ones_col (the bias's constant
// input) for k < nt, else 0. Zero rows and columns let partial tiles go through the unmasked tile product.
template <class T>
__device__ __forceinline__ void load_tokens(T* __restrict__ dst, const T* __restrict__ src, int64_t t0, int nt,
                                            int64_t K, int64_t col0, int64_t ones_col, bool vec) {
  constexpr int ld = ld_f<T>();
  const bool has_ones = ones_col >= col0 && ones_col < col0 + kTile;
  if (vec && !has_ones) {
    constexpr int kVec = 16 / sizeof(T);
    constexpr int kPerRow = kTile / kVec;
    // K % kVec == 0 and col0 % kVec == 0: a vector is wholly inside [0, K) or wholly outside.
    for (int i = threadIdx.x; i < kTileK * kPerRow; i += kThreads) {
      const int r = i / kPerRow;
      const int c = (i % kPerRow) * kVec;
      uint4 v = make_uint4(0u, 0u, 0u, 0u);
      if (r < nt && col0 + c < K) v = __ldg(reinterpret_cast<const uint4*>(src + (t0 + r) * K + col0 + c));
      *reinterpret_cast<uint4*>(dst + r * ld + c) = v;
    }
  } else {
    for (int i = threadIdx.x; i < kTileK * kTile; i += kThreads) {
      const int r = i / kTile;
      const int c = i % kTile;
      float v = 0.0f;
      if (r < nt) {
        if (col0 + c < K) v = to_f32(src[(t0 + r) * K + col0 + c]);
        else if (col0 + c == ones_col) v = 1.0f;
      }
      dst[r * ld + c] = from_f32<T>(v);
    }
  }
}

// acc += gamma_r[:, m-tile]^T [a_r | 1][:, n-tile] over row r's tokens. Ends with a barrier.
template <class T>
__device__ __forceinline__ void row_grad(TileAcc<T>& acc, T* Gs, T* As, const PairWgradArgs& p, int64_t row,
                                         int64_t m0, int64_t n0, int64_t ones_col, bool vec_a, bool vec_g) {
  const int64_t start = p.cu_seqlens[row], end = p.cu_seqlens[row + 1];
  const T* gamma = static_cast<const T*>(p.gamma);
  const T* a = static_cast<const T*>(p.a);
  for (int64_t t0 = start; t0 < end; t0 += kTileK) {
    const int nt = static_cast<int>(min(static_cast<int64_t>(kTileK), end - t0));
    load_tokens<T>(Gs, gamma, t0, nt, p.d_out, m0, -1, vec_g);
    load_tokens<T>(As, a, t0, nt, p.d_in, n0, ones_col, vec_a);
    __syncthreads();
    // C[m][n] += sum_k Gs[k][m] As[k][n]: A column-major (k-major) over m, B row-major over n.
    acc.template mma<kCol, kRow>(Gs, ld_f<T>(), As, ld_f<T>(), kTileK);
    __syncthreads();
  }
}

// Per-thread parts of Frobenius products and sums of two accumulators: two accumulators of one type hold the same
// tile elements in the same registers, so elementwise work needs no exchange.
template <class T>
__device__ __forceinline__ float frag_dot(const TileAcc<T>& x, const TileAcc<T>& y) {
  float s = 0.0f;
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int e = 0; e < TileAcc<T>::Frag::num_elements; ++e) s = fmaf(x.f[i][j].x[e], y.f[i][j].x[e], s);
  return s;
}

__device__ __forceinline__ float frag_dot(const TileAcc<float>& x, const TileAcc<float>& y) {
  float s = 0.0f;
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j) s = fmaf(x.v[i][j], y.v[i][j], s);
  return s;
}

template <class T>
__device__ __forceinline__ void frag_axpy(TileAcc<T>& acc, float w, const TileAcc<T>& x) {
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int e = 0; e < TileAcc<T>::Frag::num_elements; ++e) acc.f[i][j].x[e] += w * x.f[i][j].x[e];
}

__device__ __forceinline__ void frag_axpy(TileAcc<float>& acc, float w, const TileAcc<float>& x) {
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j) acc.v[i][j] += w * x.v[i][j];
}

// Grid (d_out tiles, (d_in + bias) tiles), 128 threads.
template <class T, class OutT>
__global__ void __launch_bounds__(kThreads) pair_wgrad_kernel(PairWgradArgs p, bool vec_a, bool vec_g) {
  __shared__ __align__(128) T Gs[kTileK * ld_f<T>()];
  __shared__ __align__(128) T As[kTileK * ld_f<T>()];
  __shared__ __align__(128) float Cs[kTile * kLdC];
  __shared__ float warp_sums[3][kThreads / 32];

  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const bool has_bias = p.grad_bias != nullptr;
  const int64_t ones_col = has_bias ? p.d_in : -1;

  TileAcc<T> total, acc_w, acc_l;
  total.zero();
  for (int64_t q = 0; q < p.n_pairs; ++q) {
    acc_w.zero();
    acc_l.zero();
    row_grad<T>(acc_w, Gs, As, p, p.pairs[2 * q], m0, n0, ones_col, vec_a, vec_g);
    row_grad<T>(acc_l, Gs, As, p, p.pairs[2 * q + 1], m0, n0, ones_col, vec_a, vec_g);
    float part[3] = {frag_dot(acc_w, acc_l), frag_dot(acc_w, acc_w), frag_dot(acc_l, acc_l)};
#pragma unroll
    for (int k = 0; k < 3; ++k) {
      part[k] = warp_sum(part[k]);
      if (threadIdx.x % 32 == 0) warp_sums[k][threadIdx.x / 32] = part[k];
    }
    __syncthreads();
    if (threadIdx.x < 3) {
      float s = 0.0f;
#pragma unroll
      for (int w = 0; w < kThreads / 32; ++w) s += warp_sums[threadIdx.x][w];
      atomicAdd(p.stats + threadIdx.x * p.n_pairs + q, s);
    }
    // A row in several pairs enters dW once: fold is 1 only at its first appearance.
    frag_axpy(total, static_cast<float>(p.fold[2 * q]), acc_w);
    frag_axpy(total, static_cast<float>(p.fold[2 * q + 1]), acc_l);
    __syncthreads();  // warp_sums is rewritten by the next pair, whose rows may be empty (no barrier inside)
  }
  for (int64_t u = 0; u < p.n_unpaired; ++u) {
    row_grad<T>(total, Gs, As, p, p.unpaired[u], m0, n0, ones_col, vec_a, vec_g);
  }

  total.store(Cs, kLdC);
  __syncthreads();
  OutT* gw = static_cast<OutT*>(p.grad_weight);
  OutT* gb = static_cast<OutT*>(p.grad_bias);
  // Consecutive threads take consecutive columns: coalesced stores along d_in.
  for (int e = threadIdx.x; e < kTile * kTile; e += kThreads) {
    const int r = e / kTile, c = e % kTile;
    const int64_t m = m0 + r, n = n0 + c;
    if (m >= p.d_out) continue;
    const float v = Cs[r * kLdC + c];
    if (n < p.d_in) gw[m * p.d_in + n] = from_f32<OutT>(v);
    else if (n == ones_col) gb[m] = from_f32<OutT>(v);
  }
}

template <class T, class OutT>
cudaError_t launch(const PairWgradArgs& a, cudaStream_t stream) {
  const int64_t tiles_m = (a.d_out + kTile - 1) / kTile;
  const int64_t tiles_n = (a.d_in + (a.grad_bias != nullptr ? 1 : 0) + kTile - 1) / kTile;
  if (tiles_m > 0x7fffffff || tiles_n > 65535) return cudaErrorInvalidConfiguration;
  const bool vec_a = vec_ok<T>(a.a, a.d_in);
  const bool vec_g = vec_ok<T>(a.gamma, a.d_out);
  pair_wgrad_kernel<T, OutT><<<dim3(static_cast<unsigned>(tiles_m), static_cast<unsigned>(tiles_n)), kThreads, 0,
                               stream>>>(a, vec_a, vec_g);
  return cudaGetLastError();
}

template <class T>
cudaError_t launch_out(const PairWgradArgs& a, cudaStream_t stream) {
  return a.out_fp32 ? launch<T, float>(a, stream) : launch<T, T>(a, stream);
}

}  // namespace

cudaError_t pair_wgrad(const PairWgradArgs& args, cudaStream_t stream) {
  if (args.d_out <= 0 || args.d_in <= 0) return cudaSuccess;
  switch (args.dtype) {
    case DType::kFloat32: return launch<float, float>(args, stream);
    case DType::kBFloat16: return launch_out<__nv_bfloat16>(args, stream);
    case DType::kFloat16: return launch_out<__half>(args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace entangle_fast
