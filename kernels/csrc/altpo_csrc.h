// The C ABI of the epilogue library: raw pointers, sizes, dtype codes and a cudaStream_t passed as
// an integer, so that Python loads it with ctypes and no torch header is involved.
//
// Two builds implement it: libaltpo_csrc.so (CUDA kernels, pointers on the GPU, launched on the
// given stream) and libaltpo_csrc_host.so (the same math on the CPU, host pointers, stream
// ignored; used by the tests). Every function returns 0 on success, or a nonzero code with a
// message that altpo_last_error() returns.
//
// Layouts: tiles are row-major [rows, cols] with a row stride (ld, in elements) >= cols. Labels are
// absolute vocabulary ids (int32); the tile holds the vocabulary band [band_start, band_start+cols).
// dtype codes: 0 = float32, 1 = bfloat16, 2 = float16.
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define ALTPO_CSRC_ABI_VERSION 2

// The libraries are built with hidden visibility; only these functions are exported.
#define ALTPO_API __attribute__((visibility("default")))

// ABI version (ALTPO_CSRC_ABI_VERSION) and whether this build runs on CUDA (1) or the host (0).
ALTPO_API int altpo_abi_version(void);
ALTPO_API int altpo_is_cuda(void);

// Message of the last failed call in this thread ("" when none).
ALTPO_API const char* altpo_last_error(void);

// The scale a G producer applies for a chunk whose largest |g| is max_abs_g (see altpo_math.h).
ALTPO_API float altpo_g_scale(float max_abs_g, int out_dtype);

// Forward epilogue: fold the logits tile into each row's running log-sum-exp state
// (run_max, run_sum; start from -inf and 0) and copy the label's logit into label_logit for
// rows whose label lies in the band (other rows' label_logit is left as it is).
ALTPO_API int altpo_forward_epilogue(const void* logits, int logits_dtype, int64_t rows, int64_t cols,
                           int64_t ld, const int32_t* labels, int64_t band_start, float* run_max,
                           float* run_sum, float* label_logit, uint64_t stream);

// Backward epilogue: out[i, j] = g[i] * scale * (onehot(labels[i] == band_start + j)
//                                               - exp(logits[i, j] - lse[i]))
// rounded to out_dtype. out may be the logits buffer itself (in place) when both dtypes match and
// the strides are equal; any other overlap is an error.
ALTPO_API int altpo_backward_epilogue(const void* logits, int logits_dtype, int64_t ld_logits, void* out,
                            int out_dtype, int64_t ld_out, int64_t rows, int64_t cols,
                            const int32_t* labels, int64_t band_start, const float* lse,
                            const float* g, float scale, uint64_t stream);

// Head transforms (version 2): the fp32 logits tile [rows, cols] of the band starting at band_start;
// bias_band (fp32, cols entries, the band's slice; read only with flag 1) and the flags of
// altpo_math.h (1 bias, 2 scale, 4 softcap, 8 entropy) with pre / post. The forward folds u into
// (run_max, run_sum) and, with flag 8, run_ent (sum exp(u - max) (u - max)), and picks u of the
// label. The backward writes factor * (1 - t^2 with softcap, t the tanh) * (g (onehot - p) -
// g_ent p (u - mu)), the last term only with flag 8 (mu and g_ent are read only then); pass
// factor = logit_scale / temperature * the G scale. out may be the logits tile itself (fp32).
ALTPO_API int altpo_forward_epilogue_tf(const float* logits, int64_t rows, int64_t cols, int64_t ld,
                                        const int32_t* labels, int64_t band_start,
                                        const float* bias_band, float pre, float post, int flags,
                                        float* run_max, float* run_sum, float* run_ent,
                                        float* label_logit, uint64_t stream);

ALTPO_API int altpo_backward_epilogue_tf(const float* logits, int64_t ld_logits, void* out, int out_dtype,
                                         int64_t ld_out, int64_t rows, int64_t cols,
                                         const int32_t* labels, int64_t band_start,
                                         const float* bias_band, float pre, float post, int flags,
                                         const float* lse, const float* mu, const float* g,
                                         const float* g_ent, float factor, uint64_t stream);

#ifdef __cplusplus
}
#endif
