// Ghost Gram: inner products of per-segment weight gradients without forming any gradient (CUDA twin of
// kernels/ghost_gram.py).
//
// For a linear map y = a W^T + c applied at the positions tau of segment r, with output gradient gamma_tau,
// grad_W s_r = sum_tau gamma_tau a_tau^T, hence for a pair of segments (i, j):
//
//   values[p] = sum_{tau in i, sigma in j} F(tau, sigma) (gamma_tau . gamma_sigma)
//   F = a_tau . a_sigma (weight) | 1 (bias: no a) | [ids_tau == ids_sigma] (embedding rows E[ids])
//
// One block per [64 x 64] tile of one pair's (tau, sigma) plane: both tile Grams come from fp32 K-loops (tensor
// cores for bf16/fp16, FMAs for fp32), their elementwise product is reduced in a fixed order, and the block writes
// its sum to its own slot of a partial-sum buffer that the host sums per pair (reproducible, no atomics).
// See docs/math.md, section 4, for the identity and the per-position attribution the optional positions output is.
#include "common.cuh"

namespace entangle_fast {
namespace {

using namespace dev;

// Grid (pair, tau tile, sigma tile).
template <class T>
__global__ void __launch_bounds__(kThreads)
    ghost_gram_kernel(GhostGramArgs p, int64_t nb_t, int64_t nb_s, bool vec_a, bool vec_g) {
  __shared__ __align__(128) T As[kTile * ld_k<T>()];
  __shared__ __align__(128) T Bs[kTile * ld_k<T>()];
  __shared__ __align__(128) float Cs[kTile * kLdC];
  __shared__ int64_t ids_t[kTile], ids_s[kTile];
  __shared__ float warp_sums[kThreads / 32];

  const int64_t pair = blockIdx.x;
  const int tile_t = blockIdx.y;
  const int tile_s = blockIdx.z;
  const int64_t seg_i = p.seg_pairs[2 * pair];
  const int64_t seg_j = p.seg_pairs[2 * pair + 1];
  const int64_t start_i = p.cu_seqlens[seg_i];
  const int64_t len_i = p.cu_seqlens[seg_i + 1] - start_i;
  const int64_t start_j = p.cu_seqlens[seg_j];
  const int64_t len_j = p.cu_seqlens[seg_j + 1] - start_j;
  const int64_t t0 = static_cast<int64_t>(tile_t) * kTile;
  const int64_t s0 = static_cast<int64_t>(tile_s) * kTile;
  const bool store_pos = p.positions != nullptr;

  // A squared norm (i == j) is symmetric in (tau, sigma): without the positions output, tiles below the block
  // diagonal are skipped and those above it count twice (an exact factor of 2).
  const bool in_range = t0 < len_i && s0 < len_j;
  const bool same = seg_i == seg_j;
  const bool active = in_range && (store_pos || !same || tile_t <= tile_s);
  const float weight = (!store_pos && same && tile_t < tile_s) ? 2.0f : 1.0f;
  const int nt = active ? static_cast<int>(min(static_cast<int64_t>(kTile), len_i - t0)) : 0;
  const int ns = active ? static_cast<int>(min(static_cast<int64_t>(kTile), len_j - s0)) : 0;

  if (active) {  // uniform over the block
    TileAcc<T> gg;
    gg.zero();
    const T* gamma = static_cast<const T*>(p.gamma);
    gram_nt<T>(gg, As, Bs, gamma, start_i + t0, nt, gamma, start_j + s0, ns, p.d_out, vec_g);
    if (p.a != nullptr) {
      TileAcc<T> aa;
      aa.zero();
      const T* a = static_cast<const T*>(p.a);
      gram_nt<T>(aa, As, Bs, a, start_i + t0, nt, a, start_j + s0, ns, p.d_in, vec_a);
      gg.mul(aa);
    }
    gg.store(Cs, kLdC);
    if (p.ids != nullptr && threadIdx.x < kTile) {
      const int r = threadIdx.x;
      ids_t[r] = r < nt ? p.ids[start_i + t0 + r] : -1;
      ids_s[r] = r < ns ? p.ids[start_j + s0 + r] : -2;
    }
    __syncthreads();
  }

  float local = 0.0f;
  for (int e = threadIdx.x; e < kTile * kTile; e += kThreads) {
    const int r = e / kTile, c = e % kTile;
    float v = 0.0f;
    // Padded lanes are already 0 (their rows loaded as 0); the explicit mask keeps it so whatever F is.
    if (r < nt && c < ns) {
      v = Cs[r * kLdC + c];
      if (p.ids != nullptr && ids_t[r] != ids_s[c]) v = 0.0f;
    }
    local += v;
    if (store_pos && t0 + r < p.tmax_i && s0 + c < p.tmax_j) {
      // Every in-bounds element of the positions output belongs to exactly one block, padding included (written 0).
      p.positions[(pair * p.tmax_i + t0 + r) * p.tmax_j + s0 + c] = v;
    }
  }
  local = warp_sum(local);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = local;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.0f;
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) total += warp_sums[w];
    p.partials[(pair * nb_t + tile_t) * nb_s + tile_s] = total * weight;
  }
}

template <class T>
cudaError_t launch(const GhostGramArgs& a, cudaStream_t stream) {
  const int64_t nb_t = (a.tmax_i + kTile - 1) / kTile;
  const int64_t nb_s = (a.tmax_j + kTile - 1) / kTile;
  // gridDim.y and .z are capped at 65535 tiles (segments of about 4 M tokens).
  if (nb_t > 65535 || nb_s > 65535 || a.n_pairs > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const bool vec_a = a.a != nullptr && vec_ok<T>(a.a, a.d_in);
  const bool vec_g = vec_ok<T>(a.gamma, a.d_out);
  ghost_gram_kernel<T><<<dim3(static_cast<unsigned>(a.n_pairs), static_cast<unsigned>(nb_t),
                              static_cast<unsigned>(nb_s)),
                         kThreads, 0, stream>>>(a, nb_t, nb_s, vec_a, vec_g);
  return cudaGetLastError();
}

}  // namespace

cudaError_t ghost_gram(const GhostGramArgs& args, cudaStream_t stream) {
  if (args.n_pairs <= 0 || args.tmax_i <= 0 || args.tmax_j <= 0) return cudaSuccess;
  switch (args.dtype) {
    case DType::kFloat32: return launch<float>(args, stream);
    case DType::kBFloat16: return launch<__nv_bfloat16>(args, stream);
    case DType::kFloat16: return launch<__half>(args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace entangle_fast
