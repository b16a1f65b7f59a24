// Host build of the C ABI (libaltpo_csrc_host.so): the epilogues' math from altpo_math.h run row by
// row on the CPU, for tests of the Python glue on a machine without a GPU. The stream is ignored.
#include "abi_checks.h"
#include "altpo_csrc.h"
#include "altpo_math.h"

namespace {

template <int DT>
void forward_rows(const void* logits, int64_t rows, int64_t cols, int64_t ld, const int32_t* labels,
                  int64_t band_start, float* run_max, float* run_sum, float* label_logit) {
  for (int64_t i = 0; i < rows; ++i) {
    float m = -INFINITY, s = 0.0f;
    for (int64_t j = 0; j < cols; ++j) altpo::lse_push(m, s, altpo::load_as_float<DT>(logits, i * ld + j));
    altpo::lse_merge(run_max[i], run_sum[i], m, s);
    int64_t local = static_cast<int64_t>(labels[i]) - band_start;
    if (local >= 0 && local < cols) label_logit[i] = altpo::load_as_float<DT>(logits, i * ld + local);
  }
}

template <int IN, int OUT>
void backward_rows(const void* logits, int64_t ld_logits, void* out, int64_t ld_out, int64_t rows,
                   int64_t cols, const int32_t* labels, int64_t band_start, const float* lse,
                   const float* g, float scale) {
  for (int64_t i = 0; i < rows; ++i) {
    int64_t local = static_cast<int64_t>(labels[i]) - band_start;
    float g_scaled = g[i] * scale;
    for (int64_t j = 0; j < cols; ++j) {
      float z = altpo::load_as_float<IN>(logits, i * ld_logits + j);
      altpo::store_from_float<OUT>(out, i * ld_out + j, altpo::grad_entry(z, lse[i], j == local, g_scaled));
    }
  }
}

template <int IN>
void backward_dispatch_out(int out_dtype, const void* logits, int64_t ld_logits, void* out, int64_t ld_out,
                           int64_t rows, int64_t cols, const int32_t* labels, int64_t band_start,
                           const float* lse, const float* g, float scale) {
  if (out_dtype == altpo::kF32)
    backward_rows<IN, altpo::kF32>(logits, ld_logits, out, ld_out, rows, cols, labels, band_start, lse, g, scale);
  else if (out_dtype == altpo::kBF16)
    backward_rows<IN, altpo::kBF16>(logits, ld_logits, out, ld_out, rows, cols, labels, band_start, lse, g, scale);
  else
    backward_rows<IN, altpo::kF16>(logits, ld_logits, out, ld_out, rows, cols, labels, band_start, lse, g, scale);
}

void forward_rows_tf(const float* logits, int64_t rows, int64_t cols, int64_t ld, const int32_t* labels,
                     int64_t band_start, const float* bias, float pre, float post, int flags,
                     float* run_max, float* run_sum, float* run_ent, float* label_logit) {
  float t;
  for (int64_t i = 0; i < rows; ++i) {
    float m = -INFINITY, s = 0.0f, e = 0.0f;
    for (int64_t j = 0; j < cols; ++j)
      altpo::ent_push(m, s, e, altpo::head_logit(logits[i * ld + j], bias, j, pre, post, flags, t));
    float rm = run_max[i], rs = run_sum[i], re = (flags & altpo::kEntropy) ? run_ent[i] : 0.0f;
    altpo::ent_merge(rm, rs, re, m, s, e);
    run_max[i] = rm;
    run_sum[i] = rs;
    if (flags & altpo::kEntropy) run_ent[i] = re;
    int64_t local = static_cast<int64_t>(labels[i]) - band_start;
    if (local >= 0 && local < cols)
      label_logit[i] = altpo::head_logit(logits[i * ld + local], bias, local, pre, post, flags, t);
  }
}

template <int OUT>
void backward_rows_tf(const float* logits, int64_t ld_logits, void* out, int64_t ld_out, int64_t rows,
                      int64_t cols, const int32_t* labels, int64_t band_start, const float* bias,
                      float pre, float post, int flags, const float* lse, const float* mu,
                      const float* g, const float* g_ent, float factor) {
  const bool ent = flags & altpo::kEntropy;
  for (int64_t i = 0; i < rows; ++i) {
    int64_t local = static_cast<int64_t>(labels[i]) - band_start;
    for (int64_t j = 0; j < cols; ++j) {
      float t;
      float u = altpo::head_logit(logits[i * ld_logits + j], bias, j, pre, post, flags, t);
      altpo::store_from_float<OUT>(out, i * ld_out + j,
                                   altpo::grad_entry_tf(u, t, lse[i], ent ? mu[i] : 0.0f, j == local, g[i],
                                                        ent ? g_ent[i] : 0.0f, factor, flags));
    }
  }
}

}  // namespace

extern "C" {

int altpo_abi_version(void) { return ALTPO_CSRC_ABI_VERSION; }
int altpo_is_cuda(void) { return 0; }
const char* altpo_last_error(void) { return altpo::last_error_buffer(); }
float altpo_g_scale(float max_abs_g, int out_dtype) { return altpo::g_scale(max_abs_g, out_dtype); }

int altpo_forward_epilogue(const void* logits, int logits_dtype, int64_t rows, int64_t cols, int64_t ld,
                           const int32_t* labels, int64_t band_start, float* run_max, float* run_sum,
                           float* label_logit, uint64_t /*stream*/) {
  if (int rc = altpo::check_forward(logits, logits_dtype, rows, cols, ld, labels, run_max, run_sum, label_logit))
    return rc;
  if (logits_dtype == altpo::kF32)
    forward_rows<altpo::kF32>(logits, rows, cols, ld, labels, band_start, run_max, run_sum, label_logit);
  else if (logits_dtype == altpo::kBF16)
    forward_rows<altpo::kBF16>(logits, rows, cols, ld, labels, band_start, run_max, run_sum, label_logit);
  else
    forward_rows<altpo::kF16>(logits, rows, cols, ld, labels, band_start, run_max, run_sum, label_logit);
  return altpo::clear_error();
}

int altpo_backward_epilogue(const void* logits, int logits_dtype, int64_t ld_logits, void* out, int out_dtype,
                            int64_t ld_out, int64_t rows, int64_t cols, const int32_t* labels,
                            int64_t band_start, const float* lse, const float* g, float scale,
                            uint64_t /*stream*/) {
  if (int rc = altpo::check_backward(logits, logits_dtype, ld_logits, out, out_dtype, ld_out, rows, cols,
                                     labels, lse, g))
    return rc;
  if (logits_dtype == altpo::kF32)
    backward_dispatch_out<altpo::kF32>(out_dtype, logits, ld_logits, out, ld_out, rows, cols, labels, band_start, lse, g, scale);
  else if (logits_dtype == altpo::kBF16)
    backward_dispatch_out<altpo::kBF16>(out_dtype, logits, ld_logits, out, ld_out, rows, cols, labels, band_start, lse, g, scale);
  else
    backward_dispatch_out<altpo::kF16>(out_dtype, logits, ld_logits, out, ld_out, rows, cols, labels, band_start, lse, g, scale);
  return altpo::clear_error();
}

int altpo_forward_epilogue_tf(const float* logits, int64_t rows, int64_t cols, int64_t ld,
                              const int32_t* labels, int64_t band_start, const float* bias_band, float pre,
                              float post, int flags, float* run_max, float* run_sum, float* run_ent,
                              float* label_logit, uint64_t /*stream*/) {
  if (int rc = altpo::check_forward_tf(logits, rows, cols, ld, labels, bias_band, flags, run_max, run_sum,
                                       run_ent, label_logit))
    return rc;
  forward_rows_tf(logits, rows, cols, ld, labels, band_start, bias_band, pre, post, flags, run_max, run_sum,
                  run_ent, label_logit);
  return altpo::clear_error();
}

int altpo_backward_epilogue_tf(const float* logits, int64_t ld_logits, void* out, int out_dtype, int64_t ld_out,
                               int64_t rows, int64_t cols, const int32_t* labels, int64_t band_start,
                               const float* bias_band, float pre, float post, int flags, const float* lse,
                               const float* mu, const float* g, const float* g_ent, float factor,
                               uint64_t /*stream*/) {
  if (int rc = altpo::check_backward_tf(logits, ld_logits, out, out_dtype, ld_out, rows, cols, labels,
                                        bias_band, flags, lse, mu, g, g_ent))
    return rc;
  if (out_dtype == altpo::kF32)
    backward_rows_tf<altpo::kF32>(logits, ld_logits, out, ld_out, rows, cols, labels, band_start, bias_band,
                                  pre, post, flags, lse, mu, g, g_ent, factor);
  else if (out_dtype == altpo::kBF16)
    backward_rows_tf<altpo::kBF16>(logits, ld_logits, out, ld_out, rows, cols, labels, band_start, bias_band,
                                   pre, post, flags, lse, mu, g, g_ent, factor);
  else
    backward_rows_tf<altpo::kF16>(logits, ld_logits, out, ld_out, rows, cols, labels, band_start, bias_band,
                                  pre, post, flags, lse, mu, g, g_ent, factor);
  return altpo::clear_error();
}

}  // extern "C"
