// Thin torch binding of the CUDA kernels: argument checks, raw pointers, the current stream, the launch.
//
// The ops are registered with torch.library in entangle_fast/_cuda.py (schemas and fake implementations live there,
// so torch.compile can trace them on a machine that has not built this module); these pybind functions are their
// CUDA implementations. Shapes follow kernels/logprob.py and kernels/ghost_gram.py.
#include <torch/extension.h>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cmath>
#include <limits>
#include <optional>
#include <tuple>

#include "common.cuh"
#include "pair_wgrad.cuh"

namespace ef = entangle_fast;

namespace {

ef::DType dtype_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return ef::DType::kFloat32;
    case at::kBFloat16: return ef::DType::kBFloat16;
    case at::kHalf: return ef::DType::kFloat16;
    default: TORCH_CHECK(false, name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
  return ef::DType::kFloat32;  // unreachable
}

void check_cuda(const at::Tensor& t, const at::Tensor& like, const char* name, bool contiguous = true) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == like.device(), name, " is on ", t.device(), ", expected ", like.device());
  TORCH_CHECK(!contiguous || t.is_contiguous(), name, " must be contiguous");
}

void check_fp32(const at::Tensor& t, const at::Tensor& like, const char* name, at::IntArrayRef shape) {
  check_cuda(t, like, name);
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.sizes() == shape, name, " must be float32 ", shape, ", got ",
              t.scalar_type(), " ", t.sizes());
}

// hidden [N, D], weight [V, D], labels int64 [N], bias [V] or none; returns (N, V, D).
std::tuple<int64_t, int64_t, int64_t> check_logprob_inputs(const at::Tensor& hidden, const at::Tensor& weight,
                                                           const at::Tensor& labels,
                                                           const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2, "hidden [N, d] and weight [V, d] must be 2-D, got ",
              hidden.sizes(), " and ", weight.sizes());
  const int64_t N = hidden.size(0), D = hidden.size(1), V = weight.size(0);
  TORCH_CHECK(weight.size(1) == D && V >= 1 && D >= 1, "weight must be [V >= 1, ", D, "], got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == hidden.scalar_type(), "weight dtype must match hidden");
  dtype_of(hidden, "hidden");
  check_cuda(hidden, hidden, "hidden");
  check_cuda(weight, hidden, "weight");
  check_cuda(labels, hidden, "labels");
  TORCH_CHECK(labels.scalar_type() == at::kLong && labels.dim() == 1 && labels.size(0) == N,
              "labels must be int64 [", N, "], got ", labels.scalar_type(), " ", labels.sizes());
  if (bias.has_value()) {
    check_cuda(*bias, hidden, "bias");
    TORCH_CHECK(bias->scalar_type() == hidden.scalar_type() && bias->dim() == 1 && bias->size(0) == V,
                "bias must be ", hidden.scalar_type(), " [", V, "], got ", bias->scalar_type(), " ", bias->sizes());
  }
  return {N, V, D};
}

const void* opt_ptr(const std::optional<at::Tensor>& t) { return t.has_value() ? t->data_ptr() : nullptr; }

}  // namespace

void check_transform(double scale, double softcap) {
  TORCH_CHECK(std::isfinite(scale) && scale != 0.0, "scale must be a finite nonzero number, got ", scale);
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0.0, "softcap must be a finite number >= 0 (0 = none), got ",
              softcap);
}

// Returns (logprobs, lse, entropy, logit_sum, argmax); the three metrics are [N] when metrics is true, else empty [0].
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> logprob_fwd(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
    const std::optional<at::Tensor>& bias, int64_t ignore_index, double scale, double softcap, bool metrics) {
  const auto [N, V, D] = check_logprob_inputs(hidden, weight, labels, bias);
  check_transform(scale, softcap);
  const c10::cuda::CUDAGuard guard(hidden.device());
  const auto f32 = hidden.options().dtype(at::kFloat);
  const auto i64 = hidden.options().dtype(at::kLong);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  // NaN-filled rather than empty: a row the kernels failed to write cannot pass as a value (argmax: -1).
  at::Tensor logprobs = at::full({N}, nan, f32);
  at::Tensor lse = at::full({N}, nan, f32);
  const int64_t M = metrics ? N : 0;
  at::Tensor entropy = at::full({M}, nan, f32);
  at::Tensor logit_sum = at::full({M}, nan, f32);
  at::Tensor argmax = at::full({M}, -1, i64);
  if (N == 0) return {logprobs, lse, entropy, logit_sum, argmax};
  int num_sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, hidden.get_device()));
  at::Tensor workspace = at::empty({ef::logprob_fwd_workspace_floats(N, V, num_sms, metrics)}, f32);
  at::Tensor arg_workspace = at::empty({metrics ? ef::logprob_fwd_splits(N, V, num_sms) * N : 0}, i64);
  ef::LogprobFwdArgs args{dtype_of(hidden, "hidden"), hidden.data_ptr(), weight.data_ptr(), opt_ptr(bias),
                          labels.data_ptr<int64_t>(), logprobs.data_ptr<float>(), lse.data_ptr<float>(),
                          workspace.data_ptr<float>(), N, V, D, ignore_index, num_sms,
                          static_cast<float>(scale), static_cast<float>(softcap),
                          metrics ? entropy.data_ptr<float>() : nullptr,
                          metrics ? logit_sum.data_ptr<float>() : nullptr,
                          metrics ? argmax.data_ptr<int64_t>() : nullptr,
                          metrics ? arg_workspace.data_ptr<int64_t>() : nullptr};
  C10_CUDA_CHECK(ef::logprob_fwd(args, c10::cuda::getCurrentCUDAStream().stream()));
  return {logprobs, lse, entropy, logit_sum, argmax};
}

// A [N, width] fp32 chunk buffer with unit column stride (a column slice of a wider buffer is fine); its row stride.
int64_t check_chunk(const at::Tensor& t, const at::Tensor& like, const char* name, int64_t N, int64_t width) {
  check_cuda(t, like, name, /*contiguous=*/false);
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 2 && t.size(0) == N && t.size(1) == width &&
                  (width <= 1 || t.stride(1) == 1) && (N <= 1 || t.stride(0) >= width),
              name, " must be float32 [", N, ", ", width, "] with unit column stride, got ", t.scalar_type(), " ",
              t.sizes(), " strides ", t.strides());
  return N > 1 ? t.stride(0) : width;
}

void logprob_bwd(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
                 const std::optional<at::Tensor>& bias, const at::Tensor& lse, const at::Tensor& grad_logprobs,
                 int64_t ignore_index, const at::Tensor& grad_hidden_unscaled,
                 const std::optional<at::Tensor>& grad_weight, const std::optional<at::Tensor>& grad_bias,
                 int64_t vocab_start, int64_t vocab_end, const std::optional<at::Tensor>& probs_out, double scale,
                 double softcap, const std::optional<at::Tensor>& delta_out) {
  const auto [N, V, D] = check_logprob_inputs(hidden, weight, labels, bias);
  check_transform(scale, softcap);
  TORCH_CHECK(0 <= vocab_start && vocab_start <= vocab_end && vocab_end <= V,
              "vocab_start, vocab_end must satisfy 0 <= start <= end <= V=", V, ", got ", vocab_start, ", ", vocab_end);
  const int64_t width = vocab_end - vocab_start;
  check_fp32(lse, hidden, "lse", {N});
  check_fp32(grad_logprobs, hidden, "grad_logprobs", {N});
  check_fp32(grad_hidden_unscaled, hidden, "grad_hidden_unscaled", {N, D});
  // grad_weight: the whole [V, D] gradient, or a [width, D] buffer for the range (row 0 holds vocab_start).
  const bool gw_range = grad_weight.has_value() && grad_weight->dim() == 2 && grad_weight->size(0) == width;
  if (grad_weight.has_value()) check_fp32(*grad_weight, hidden, "grad_weight", {gw_range ? width : V, D});
  if (grad_bias.has_value()) check_fp32(*grad_bias, hidden, "grad_bias", {V});
  const int64_t probs_stride = probs_out.has_value() ? check_chunk(*probs_out, hidden, "probs_out", N, width) : width;
  const int64_t delta_stride = delta_out.has_value() ? check_chunk(*delta_out, hidden, "delta_out", N, width) : width;
  if (N == 0 || width == 0) return;
  const c10::cuda::CUDAGuard guard(hidden.device());
  auto opt_f32 = [](const std::optional<at::Tensor>& t) { return t.has_value() ? t->data_ptr<float>() : nullptr; };
  ef::LogprobBwdArgs args{dtype_of(hidden, "hidden"),
                          hidden.data_ptr(),
                          weight.data_ptr(),
                          opt_ptr(bias),
                          labels.data_ptr<int64_t>(),
                          lse.data_ptr<float>(),
                          grad_logprobs.data_ptr<float>(),
                          grad_hidden_unscaled.data_ptr<float>(),
                          opt_f32(grad_weight),
                          opt_f32(grad_bias),
                          opt_f32(probs_out),
                          probs_stride,
                          N,
                          V,
                          D,
                          vocab_start,
                          vocab_end,
                          ignore_index,
                          gw_range ? vocab_start : 0,
                          static_cast<float>(scale),
                          static_cast<float>(softcap),
                          opt_f32(delta_out),
                          delta_stride};
  C10_CUDA_CHECK(ef::logprob_bwd(args, c10::cuda::getCurrentCUDAStream().stream()));
}

// Returns (values fp32 [P], positions fp32 [P, tmax_i, tmax_j] or an empty [0, 0, 0] when positions is false).
// tmax_i / tmax_j (longest first / second segment over the pairs) come from the caller, which already synced to
// validate cu_seqlens; passing them keeps the output shapes known to torch.compile.
std::tuple<at::Tensor, at::Tensor> ghost_gram(const std::optional<at::Tensor>& a, const at::Tensor& gamma,
                                              const std::optional<at::Tensor>& ids, const at::Tensor& cu_seqlens,
                                              const at::Tensor& seg_pairs, int64_t tmax_i, int64_t tmax_j,
                                              bool positions) {
  TORCH_CHECK(gamma.dim() == 2, "gamma must be [S, d_out], got ", gamma.sizes());
  const ef::DType dt = dtype_of(gamma, "gamma");
  check_cuda(gamma, gamma, "gamma");
  const int64_t S = gamma.size(0);
  TORCH_CHECK(!(a.has_value() && ids.has_value()), "a and ids are exclusive");
  if (a.has_value()) {
    check_cuda(*a, gamma, "a");
    TORCH_CHECK(a->dim() == 2 && a->size(0) == S && a->scalar_type() == gamma.scalar_type(), "a must be ",
                gamma.scalar_type(), " [", S, ", d_in], got ", a->scalar_type(), " ", a->sizes());
  }
  if (ids.has_value()) {
    check_cuda(*ids, gamma, "ids");
    TORCH_CHECK(ids->scalar_type() == at::kLong && ids->dim() == 1 && ids->size(0) == S, "ids must be int64 [", S,
                "], got ", ids->scalar_type(), " ", ids->sizes());
  }
  check_cuda(cu_seqlens, gamma, "cu_seqlens");
  check_cuda(seg_pairs, gamma, "seg_pairs");
  TORCH_CHECK(cu_seqlens.scalar_type() == at::kLong && cu_seqlens.dim() == 1 && cu_seqlens.size(0) >= 1,
              "cu_seqlens must be int64 [n_seg + 1]");
  TORCH_CHECK(seg_pairs.scalar_type() == at::kLong && seg_pairs.dim() == 2 && seg_pairs.size(1) == 2,
              "seg_pairs must be int64 [P, 2]");
  TORCH_CHECK(tmax_i >= 0 && tmax_j >= 0, "tmax_i, tmax_j must be >= 0");
  const int64_t P = seg_pairs.size(0);
  const c10::cuda::CUDAGuard guard(gamma.device());
  const auto f32 = gamma.options().dtype(at::kFloat);
  const int64_t nb_t = (tmax_i + ef::kTile - 1) / ef::kTile, nb_s = (tmax_j + ef::kTile - 1) / ef::kTile;
  // NaN-filled rather than empty: a slot or position the kernel failed to write cannot pass as a value.
  at::Tensor partials = at::full({P, nb_t * nb_s}, std::numeric_limits<float>::quiet_NaN(), f32);
  at::Tensor pos = positions ? at::full({P, tmax_i, tmax_j}, std::numeric_limits<float>::quiet_NaN(), f32)
                             : at::empty({0, 0, 0}, f32);
  if (P == 0 || nb_t == 0 || nb_s == 0) {
    if (positions) pos.zero_();
    return {at::zeros({P}, f32), pos};
  }
  ef::GhostGramArgs args{dt,
                         a.has_value() ? a->data_ptr() : nullptr,
                         gamma.data_ptr(),
                         ids.has_value() ? ids->data_ptr<int64_t>() : nullptr,
                         cu_seqlens.data_ptr<int64_t>(),
                         seg_pairs.data_ptr<int64_t>(),
                         partials.data_ptr<float>(),
                         positions ? pos.data_ptr<float>() : nullptr,
                         P,
                         a.has_value() ? a->size(1) : 0,
                         gamma.size(1),
                         tmax_i,
                         tmax_j};
  const cudaError_t err = ef::ghost_gram(args, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err != cudaErrorInvalidConfiguration, "ghost_gram: segments of more than 65535 x ", ef::kTile,
              " tokens or more than 2^31 - 1 pairs are not supported");
  C10_CUDA_CHECK(err);
  // A fixed-order sum over each pair's tiles: deterministic, unlike an atomic add per pair.
  return {partials.sum(1), pos};
}

// Pair-by-pair weight gradient (kernels/pair_wgrad.py's contract): fills grad_weight [d_out, d_in] and grad_bias
// [d_out] (or none) in float32 or the inputs' dtype, and adds the per-pair statistics to stats float32 [3, B].
void pair_wgrad(const at::Tensor& a, const at::Tensor& gamma, const at::Tensor& cu_seqlens, const at::Tensor& pairs,
                const at::Tensor& fold, const at::Tensor& unpaired, const at::Tensor& grad_weight,
                const std::optional<at::Tensor>& grad_bias, const at::Tensor& stats) {
  TORCH_CHECK(a.dim() == 2 && gamma.dim() == 2 && a.size(0) == gamma.size(0) &&
                  a.scalar_type() == gamma.scalar_type(),
              "a [S, d_in] and gamma [S, d_out] must share S and dtype, got ", a.sizes(), " ", gamma.sizes());
  const ef::DType dt = dtype_of(gamma, "gamma");
  const int64_t d_in = a.size(1), d_out = gamma.size(1), B = pairs.size(0);
  check_cuda(a, gamma, "a");
  check_cuda(gamma, gamma, "gamma");
  check_cuda(cu_seqlens, gamma, "cu_seqlens");
  check_cuda(pairs, gamma, "pairs");
  check_cuda(fold, gamma, "fold");
  check_cuda(unpaired, gamma, "unpaired");
  check_cuda(grad_weight, gamma, "grad_weight");
  TORCH_CHECK(cu_seqlens.scalar_type() == at::kLong && cu_seqlens.dim() == 1, "cu_seqlens must be int64 [R + 1]");
  TORCH_CHECK(pairs.scalar_type() == at::kLong && pairs.dim() == 2 && pairs.size(1) == 2, "pairs must be int64 [B, 2]");
  TORCH_CHECK(fold.scalar_type() == at::kInt && fold.sizes() == pairs.sizes(), "fold must be int32 [B, 2]");
  TORCH_CHECK(unpaired.scalar_type() == at::kLong && unpaired.dim() == 1, "unpaired must be int64 [U]");
  const bool out_fp32 = grad_weight.scalar_type() == at::kFloat;
  TORCH_CHECK((out_fp32 || grad_weight.scalar_type() == gamma.scalar_type()) &&
                  grad_weight.sizes() == at::IntArrayRef({d_out, d_in}),
              "grad_weight must be float32 or ", gamma.scalar_type(), " [", d_out, ", ", d_in, "], got ",
              grad_weight.scalar_type(), " ", grad_weight.sizes());
  if (grad_bias.has_value()) {
    check_cuda(*grad_bias, gamma, "grad_bias");
    TORCH_CHECK(grad_bias->scalar_type() == grad_weight.scalar_type() && grad_bias->dim() == 1 &&
                    grad_bias->size(0) == d_out,
                "grad_bias must be ", grad_weight.scalar_type(), " [", d_out, "]");
  }
  check_fp32(stats, gamma, "stats", {3, B});
  const c10::cuda::CUDAGuard guard(gamma.device());
  ef::PairWgradArgs args{dt, out_fp32, a.data_ptr(), gamma.data_ptr(), cu_seqlens.data_ptr<int64_t>(),
                         pairs.data_ptr<int64_t>(), fold.data_ptr<int32_t>(), unpaired.data_ptr<int64_t>(),
                         grad_weight.data_ptr(), grad_bias.has_value() ? grad_bias->data_ptr() : nullptr,
                         stats.data_ptr<float>(), B, unpaired.size(0), d_in, d_out};
  const cudaError_t err = ef::pair_wgrad(args, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err != cudaErrorInvalidConfiguration, "pair_wgrad: d_in of more than 65535 x ", ef::kTile,
              " columns is not supported");
  C10_CUDA_CHECK(err);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "entangle_fast CUDA kernels (register through entangle_fast._cuda, not directly)";
  m.def("logprob_fwd", &logprob_fwd, "fused log-prob forward -> (logprobs, lse, entropy, logit_sum, argmax)");
  m.def("logprob_bwd", &logprob_bwd, "fused log-prob backward, accumulating in place");
  m.def("ghost_gram", &ghost_gram, "ghost Gram of segment pairs -> (values, positions)");
  m.def("pair_wgrad", &pair_wgrad, "pair-by-pair weight gradient with per-pair statistics, in place");
}
