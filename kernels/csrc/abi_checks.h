// Argument checks and the last-error message shared by both builds of the C ABI (host code only).
#pragma once

#include <stdint.h>
#include <stdio.h>
#include <stdarg.h>

#include "altpo_math.h"

namespace altpo {

inline char* last_error_buffer() {
  static thread_local char buffer[512] = "";
  return buffer;
}

// Records a message for altpo_last_error() and returns the error code 1.
inline int fail(const char* fmt, ...) {
  va_list args;
  va_start(args, fmt);
  vsnprintf(last_error_buffer(), 512, fmt, args);
  va_end(args);
  return 1;
}

inline int clear_error() {
  last_error_buffer()[0] = '\0';
  return 0;
}

inline int64_t dtype_size(int dtype) { return dtype == kF32 ? 4 : 2; }

inline bool valid_dtype(int dtype) { return dtype == kF32 || dtype == kBF16 || dtype == kF16; }

inline int check_tile(const char* name, const void* ptr, int dtype, int64_t rows, int64_t cols,
                      int64_t ld) {
  if (!valid_dtype(dtype)) return fail("%s: dtype code %d is not 0 (f32), 1 (bf16) or 2 (f16)", name, dtype);
  if (rows < 0 || cols < 0) return fail("%s: negative size [%lld, %lld]", name, (long long)rows, (long long)cols);
  if (ld < cols) return fail("%s: row stride %lld is smaller than its %lld columns", name, (long long)ld, (long long)cols);
  if (rows > 0 && cols > 0 && ptr == nullptr) return fail("%s: null pointer", name);
  return 0;
}

inline int check_vector(const char* name, const void* ptr, int64_t rows) {
  if (rows > 0 && ptr == nullptr) return fail("%s: null pointer for %lld rows", name, (long long)rows);
  return 0;
}

// out may alias logits only exactly (same start, dtype and stride): each element is read and then
// written by one thread. Partial overlap would let one element's store clobber another's input.
inline int check_alias(const void* logits, int logits_dtype, int64_t ld_logits, const void* out,
                       int out_dtype, int64_t ld_out, int64_t rows) {
  if (rows == 0) return 0;
  if (logits == out) {
    if (logits_dtype != out_dtype || ld_logits != ld_out)
      return fail("backward epilogue: out is the logits buffer but its dtype or row stride differs; "
                  "pass a separate out tile");
    return 0;
  }
  const char* a0 = static_cast<const char*>(logits);
  const char* a1 = a0 + rows * ld_logits * dtype_size(logits_dtype);
  const char* b0 = static_cast<const char*>(out);
  const char* b1 = b0 + rows * ld_out * dtype_size(out_dtype);
  if (a0 < b1 && b0 < a1)
    return fail("backward epilogue: out partly overlaps the logits tile; use the same buffer "
                "(in place) or disjoint ones");
  return 0;
}

inline int check_forward(const void* logits, int logits_dtype, int64_t rows, int64_t cols, int64_t ld,
                         const int32_t* labels, const float* run_max, const float* run_sum,
                         const float* label_logit) {
  if (int rc = check_tile("forward epilogue logits", logits, logits_dtype, rows, cols, ld)) return rc;
  if (int rc = check_vector("forward epilogue labels", labels, rows)) return rc;
  if (int rc = check_vector("forward epilogue run_max", run_max, rows)) return rc;
  if (int rc = check_vector("forward epilogue run_sum", run_sum, rows)) return rc;
  return check_vector("forward epilogue label_logit", label_logit, rows);
}

inline int check_backward(const void* logits, int logits_dtype, int64_t ld_logits, const void* out,
                          int out_dtype, int64_t ld_out, int64_t rows, int64_t cols,
                          const int32_t* labels, const float* lse, const float* g) {
  if (int rc = check_tile("backward epilogue logits", logits, logits_dtype, rows, cols, ld_logits)) return rc;
  if (int rc = check_tile("backward epilogue out", out, out_dtype, rows, cols, ld_out)) return rc;
  if (int rc = check_alias(logits, logits_dtype, ld_logits, out, out_dtype, ld_out, rows)) return rc;
  if (int rc = check_vector("backward epilogue labels", labels, rows)) return rc;
  if (int rc = check_vector("backward epilogue lse", lse, rows)) return rc;
  return check_vector("backward epilogue g", g, rows);
}

// The *_tf entry points: fp32 logits, the flag-dependent vectors present.
inline int check_transform(const char* what, int64_t rows, int64_t cols, const float* bias_band,
                           int flags) {
  if (flags & ~(kHasBias | kScale | kSoftcap | kEntropy))
    return fail("%s: unknown transform flags 0x%x", what, flags);
  if ((flags & kHasBias) && cols > 0 && rows > 0 && bias_band == nullptr)
    return fail("%s: the bias flag is set but bias_band is null", what);
  return 0;
}

inline int check_forward_tf(const float* logits, int64_t rows, int64_t cols, int64_t ld,
                            const int32_t* labels, const float* bias_band, int flags,
                            const float* run_max, const float* run_sum, const float* run_ent,
                            const float* label_logit) {
  if (int rc = check_forward(logits, kF32, rows, cols, ld, labels, run_max, run_sum, label_logit)) return rc;
  if (int rc = check_transform("forward epilogue", rows, cols, bias_band, flags)) return rc;
  return (flags & kEntropy) ? check_vector("forward epilogue run_ent", run_ent, rows) : 0;
}

inline int check_backward_tf(const float* logits, int64_t ld_logits, const void* out, int out_dtype,
                             int64_t ld_out, int64_t rows, int64_t cols, const int32_t* labels,
                             const float* bias_band, int flags, const float* lse, const float* mu,
                             const float* g, const float* g_ent) {
  if (int rc = check_backward(logits, kF32, ld_logits, out, out_dtype, ld_out, rows, cols, labels, lse, g))
    return rc;
  if (int rc = check_transform("backward epilogue", rows, cols, bias_band, flags)) return rc;
  if (!(flags & kEntropy)) return 0;
  if (int rc = check_vector("backward epilogue mu", mu, rows)) return rc;
  return check_vector("backward epilogue g_ent", g_ent, rows);
}

}  // namespace altpo
