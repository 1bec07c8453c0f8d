// Host interface of the pair-by-pair weight-gradient kernel (csrc/pair_wgrad.cu), called by bindings.cpp.
// Contract: kernels/pair_wgrad.py (the binding validates shapes and dtypes).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "common.cuh"

namespace entangle_fast {

struct PairWgradArgs {
  DType dtype;                 // of a and gamma
  bool out_fp32;               // grad_weight / grad_bias are float32 (else the inputs' dtype)
  const void* a;               // [S, d_in]
  const void* gamma;           // [S, d_out]
  const int64_t* cu_seqlens;   // [R + 1]
  const int64_t* pairs;        // [B, 2] (chosen row, rejected row)
  const int32_t* fold;         // [B, 2]: 1 where that side's row gradient is added to grad_weight
  const int64_t* unpaired;     // [U] rows in no pair, added to grad_weight
  void* grad_weight;           // [d_out, d_in] out, written once
  void* grad_bias;             // [d_out] out, or nullptr (no bias)
  float* stats;                // [3, B], added to with atomics: <G_w, G_l>, ||G_w||^2, ||G_l||^2
  int64_t n_pairs, n_unpaired, d_in, d_out;
};

cudaError_t pair_wgrad(const PairWgradArgs& args, cudaStream_t stream);

}  // namespace entangle_fast
