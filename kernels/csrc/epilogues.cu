// CUDA build of the C ABI (libaltpo_csrc.so): the forward and backward epilogues as small kernels
// on a logits tile that cuBLAS (torch.mm) produced. The math is altpo_math.h's, shared with the
// host build and the host test.
#include <cuda_runtime.h>

#include "abi_checks.h"
#include "altpo_csrc.h"
#include "altpo_math.h"

namespace {

constexpr int kForwardThreads = 256;        // one block per row; 8 warps reduce (m, s) pairs
constexpr int kBackwardThreads = 256;
constexpr int kBackwardPerThread = 8;       // a block covers 2048 columns of one row
constexpr int kBackwardCols = kBackwardThreads * kBackwardPerThread;
constexpr unsigned kFullMask = 0xFFFFFFFFu;

__device__ __forceinline__ void warp_merge(float& m, float& s) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    float m2 = __shfl_xor_sync(kFullMask, m, offset);
    float s2 = __shfl_xor_sync(kFullMask, s, offset);
    altpo::lse_merge(m, s, m2, s2);
  }
}

template <int DT>
__global__ void __launch_bounds__(kForwardThreads)
forward_epilogue_kernel(const void* __restrict__ logits, int64_t cols, int64_t ld,
                        const int32_t* __restrict__ labels, int64_t band_start,
                        float* __restrict__ run_max, float* __restrict__ run_sum,
                        float* __restrict__ label_logit) {
  __shared__ float part_m[kForwardThreads / 32];
  __shared__ float part_s[kForwardThreads / 32];
  const int64_t row = blockIdx.x;
  const int64_t base = row * ld;
  float m = -INFINITY, s = 0.0f;
  for (int64_t j = threadIdx.x; j < cols; j += kForwardThreads)
    altpo::lse_push(m, s, altpo::load_as_float<DT>(logits, base + j));
  warp_merge(m, s);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    part_m[warp] = m;
    part_s[warp] = s;
  }
  __syncthreads();
  if (warp != 0) return;
  m = lane < kForwardThreads / 32 ? part_m[lane] : -INFINITY;
  s = lane < kForwardThreads / 32 ? part_s[lane] : 0.0f;
  warp_merge(m, s);
  if (lane == 0) {
    float rm = run_max[row], rs = run_sum[row];
    altpo::lse_merge(rm, rs, m, s);
    run_max[row] = rm;
    run_sum[row] = rs;
    const int64_t local = static_cast<int64_t>(labels[row]) - band_start;
    if (local >= 0 && local < cols) label_logit[row] = altpo::load_as_float<DT>(logits, base + local);
  }
}

template <int IN, int OUT>
__global__ void __launch_bounds__(kBackwardThreads)
backward_epilogue_kernel(const void* logits, int64_t ld_logits, void* out, int64_t ld_out, int64_t cols,
                         const int32_t* __restrict__ labels, int64_t band_start,
                         const float* __restrict__ lse, const float* __restrict__ g, float scale) {
  // logits and out may be the same buffer (in place), so neither is __restrict__.
  const int64_t row = blockIdx.x;
  const int64_t local = static_cast<int64_t>(labels[row]) - band_start;
  const float row_lse = lse[row];
  const float g_scaled = g[row] * scale;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * kBackwardCols + threadIdx.x;
#pragma unroll
  for (int k = 0; k < kBackwardPerThread; ++k) {
    const int64_t j = j0 + static_cast<int64_t>(k) * kBackwardThreads;
    if (j < cols) {
      const float z = altpo::load_as_float<IN>(logits, row * ld_logits + j);
      altpo::store_from_float<OUT>(out, row * ld_out + j, altpo::grad_entry(z, row_lse, j == local, g_scaled));
    }
  }
}

__device__ __forceinline__ void warp_merge_ent(float& m, float& s, float& e) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    float m2 = __shfl_xor_sync(kFullMask, m, offset);
    float s2 = __shfl_xor_sync(kFullMask, s, offset);
    float e2 = __shfl_xor_sync(kFullMask, e, offset);
    altpo::ent_merge(m, s, e, m2, s2, e2);
  }
}

// The transformed forward: one block per row, as forward_epilogue_kernel, with the (m, s, e) state.
__global__ void __launch_bounds__(kForwardThreads)
forward_epilogue_tf_kernel(const float* __restrict__ logits, int64_t cols, int64_t ld,
                           const int32_t* __restrict__ labels, int64_t band_start,
                           const float* __restrict__ bias, float pre, float post, int flags,
                           float* __restrict__ run_max, float* __restrict__ run_sum,
                           float* __restrict__ run_ent, float* __restrict__ label_logit) {
  __shared__ float part_m[kForwardThreads / 32];
  __shared__ float part_s[kForwardThreads / 32];
  __shared__ float part_e[kForwardThreads / 32];
  const int64_t row = blockIdx.x;
  const int64_t base = row * ld;
  float m = -INFINITY, s = 0.0f, e = 0.0f, t;
  for (int64_t j = threadIdx.x; j < cols; j += kForwardThreads)
    altpo::ent_push(m, s, e, altpo::head_logit(logits[base + j], bias, j, pre, post, flags, t));
  warp_merge_ent(m, s, e);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    part_m[warp] = m;
    part_s[warp] = s;
    part_e[warp] = e;
  }
  __syncthreads();
  if (warp != 0) return;
  m = lane < kForwardThreads / 32 ? part_m[lane] : -INFINITY;
  s = lane < kForwardThreads / 32 ? part_s[lane] : 0.0f;
  e = lane < kForwardThreads / 32 ? part_e[lane] : 0.0f;
  warp_merge_ent(m, s, e);
  if (lane == 0) {
    const bool ent = flags & altpo::kEntropy;
    float rm = run_max[row], rs = run_sum[row], re = ent ? run_ent[row] : 0.0f;
    altpo::ent_merge(rm, rs, re, m, s, e);
    run_max[row] = rm;
    run_sum[row] = rs;
    if (ent) run_ent[row] = re;
    const int64_t local = static_cast<int64_t>(labels[row]) - band_start;
    if (local >= 0 && local < cols)
      label_logit[row] = altpo::head_logit(logits[base + local], bias, local, pre, post, flags, t);
  }
}

template <int OUT>
__global__ void __launch_bounds__(kBackwardThreads)
backward_epilogue_tf_kernel(const float* logits, int64_t ld_logits, void* out, int64_t ld_out, int64_t cols,
                            const int32_t* __restrict__ labels, int64_t band_start,
                            const float* __restrict__ bias, float pre, float post, int flags,
                            const float* __restrict__ lse, const float* __restrict__ mu,
                            const float* __restrict__ g, const float* __restrict__ g_ent, float factor) {
  // logits and out may be the same buffer (in place), so neither is __restrict__.
  const int64_t row = blockIdx.x;
  const int64_t local = static_cast<int64_t>(labels[row]) - band_start;
  const bool ent = flags & altpo::kEntropy;
  const float row_lse = lse[row], row_mu = ent ? mu[row] : 0.0f;
  const float row_g = g[row], row_g_ent = ent ? g_ent[row] : 0.0f;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * kBackwardCols + threadIdx.x;
#pragma unroll
  for (int k = 0; k < kBackwardPerThread; ++k) {
    const int64_t j = j0 + static_cast<int64_t>(k) * kBackwardThreads;
    if (j < cols) {
      float t;
      const float u = altpo::head_logit(logits[row * ld_logits + j], bias, j, pre, post, flags, t);
      altpo::store_from_float<OUT>(out, row * ld_out + j,
                                   altpo::grad_entry_tf(u, t, row_lse, row_mu, j == local, row_g, row_g_ent,
                                                        factor, flags));
    }
  }
}

// The backward epilogues' grid: a block per row and kBackwardCols columns. Returns 0 with the grid
// set, -1 for an empty tile (nothing to launch), or 1 with the message set when it exceeds a launch.
int backward_grid(int64_t rows, int64_t cols, dim3& grid) {
  const int64_t col_blocks = (cols + kBackwardCols - 1) / kBackwardCols;
  if (rows > 0x7FFFFFFF || col_blocks > 65535)
    return altpo::fail("backward epilogue: tile [%lld, %lld] exceeds one launch; use smaller chunks",
                       (long long)rows, (long long)cols);
  if (rows == 0 || cols == 0) return -1;
  grid = dim3(static_cast<unsigned>(rows), static_cast<unsigned>(col_blocks));
  return 0;
}

int launch_status(const char* what) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return altpo::fail("%s: CUDA launch failed: %s", what, cudaGetErrorString(err));
  return altpo::clear_error();
}

template <int IN>
void launch_backward(int out_dtype, dim3 grid, cudaStream_t stream, const void* logits, int64_t ld_logits,
                     void* out, int64_t ld_out, int64_t cols, const int32_t* labels, int64_t band_start,
                     const float* lse, const float* g, float scale) {
  if (out_dtype == altpo::kF32)
    backward_epilogue_kernel<IN, altpo::kF32><<<grid, kBackwardThreads, 0, stream>>>(
        logits, ld_logits, out, ld_out, cols, labels, band_start, lse, g, scale);
  else if (out_dtype == altpo::kBF16)
    backward_epilogue_kernel<IN, altpo::kBF16><<<grid, kBackwardThreads, 0, stream>>>(
        logits, ld_logits, out, ld_out, cols, labels, band_start, lse, g, scale);
  else
    backward_epilogue_kernel<IN, altpo::kF16><<<grid, kBackwardThreads, 0, stream>>>(
        logits, ld_logits, out, ld_out, cols, labels, band_start, lse, g, scale);
}

}  // namespace

extern "C" {

int altpo_abi_version(void) { return ALTPO_CSRC_ABI_VERSION; }
int altpo_is_cuda(void) { return 1; }
const char* altpo_last_error(void) { return altpo::last_error_buffer(); }
float altpo_g_scale(float max_abs_g, int out_dtype) { return altpo::g_scale(max_abs_g, out_dtype); }

int altpo_forward_epilogue(const void* logits, int logits_dtype, int64_t rows, int64_t cols, int64_t ld,
                           const int32_t* labels, int64_t band_start, float* run_max, float* run_sum,
                           float* label_logit, uint64_t stream) {
  if (int rc = altpo::check_forward(logits, logits_dtype, rows, cols, ld, labels, run_max, run_sum, label_logit))
    return rc;
  if (rows > 0x7FFFFFFF) return altpo::fail("forward epilogue: %lld rows exceed one launch; split the chunk", (long long)rows);
  if (rows == 0) return altpo::clear_error();
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  dim3 grid(static_cast<unsigned>(rows));
  if (logits_dtype == altpo::kF32)
    forward_epilogue_kernel<altpo::kF32><<<grid, kForwardThreads, 0, s>>>(logits, cols, ld, labels, band_start, run_max, run_sum, label_logit);
  else if (logits_dtype == altpo::kBF16)
    forward_epilogue_kernel<altpo::kBF16><<<grid, kForwardThreads, 0, s>>>(logits, cols, ld, labels, band_start, run_max, run_sum, label_logit);
  else
    forward_epilogue_kernel<altpo::kF16><<<grid, kForwardThreads, 0, s>>>(logits, cols, ld, labels, band_start, run_max, run_sum, label_logit);
  return launch_status("forward epilogue");
}

int altpo_backward_epilogue(const void* logits, int logits_dtype, int64_t ld_logits, void* out, int out_dtype,
                            int64_t ld_out, int64_t rows, int64_t cols, const int32_t* labels,
                            int64_t band_start, const float* lse, const float* g, float scale,
                            uint64_t stream) {
  if (int rc = altpo::check_backward(logits, logits_dtype, ld_logits, out, out_dtype, ld_out, rows, cols,
                                     labels, lse, g))
    return rc;
  dim3 grid;
  if (int rc = backward_grid(rows, cols, grid)) return rc < 0 ? altpo::clear_error() : rc;
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  if (logits_dtype == altpo::kF32)
    launch_backward<altpo::kF32>(out_dtype, grid, s, logits, ld_logits, out, ld_out, cols, labels, band_start, lse, g, scale);
  else if (logits_dtype == altpo::kBF16)
    launch_backward<altpo::kBF16>(out_dtype, grid, s, logits, ld_logits, out, ld_out, cols, labels, band_start, lse, g, scale);
  else
    launch_backward<altpo::kF16>(out_dtype, grid, s, logits, ld_logits, out, ld_out, cols, labels, band_start, lse, g, scale);
  return launch_status("backward epilogue");
}

int altpo_forward_epilogue_tf(const float* logits, int64_t rows, int64_t cols, int64_t ld,
                              const int32_t* labels, int64_t band_start, const float* bias_band, float pre,
                              float post, int flags, float* run_max, float* run_sum, float* run_ent,
                              float* label_logit, uint64_t stream) {
  if (int rc = altpo::check_forward_tf(logits, rows, cols, ld, labels, bias_band, flags, run_max, run_sum,
                                       run_ent, label_logit))
    return rc;
  if (rows > 0x7FFFFFFF) return altpo::fail("forward epilogue: %lld rows exceed one launch; split the chunk", (long long)rows);
  if (rows == 0) return altpo::clear_error();
  forward_epilogue_tf_kernel<<<dim3(static_cast<unsigned>(rows)), kForwardThreads, 0,
                               reinterpret_cast<cudaStream_t>(stream)>>>(
      logits, cols, ld, labels, band_start, bias_band, pre, post, flags, run_max, run_sum, run_ent, label_logit);
  return launch_status("forward epilogue (transformed)");
}

int altpo_backward_epilogue_tf(const float* logits, int64_t ld_logits, void* out, int out_dtype, int64_t ld_out,
                               int64_t rows, int64_t cols, const int32_t* labels, int64_t band_start,
                               const float* bias_band, float pre, float post, int flags, const float* lse,
                               const float* mu, const float* g, const float* g_ent, float factor,
                               uint64_t stream) {
  if (int rc = altpo::check_backward_tf(logits, ld_logits, out, out_dtype, ld_out, rows, cols, labels,
                                        bias_band, flags, lse, mu, g, g_ent))
    return rc;
  dim3 grid;
  if (int rc = backward_grid(rows, cols, grid)) return rc < 0 ? altpo::clear_error() : rc;
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  if (out_dtype == altpo::kF32)
    backward_epilogue_tf_kernel<altpo::kF32><<<grid, kBackwardThreads, 0, s>>>(
        logits, ld_logits, out, ld_out, cols, labels, band_start, bias_band, pre, post, flags, lse, mu, g, g_ent, factor);
  else if (out_dtype == altpo::kBF16)
    backward_epilogue_tf_kernel<altpo::kBF16><<<grid, kBackwardThreads, 0, s>>>(
        logits, ld_logits, out, ld_out, cols, labels, band_start, bias_band, pre, post, flags, lse, mu, g, g_ent, factor);
  else
    backward_epilogue_tf_kernel<altpo::kF16><<<grid, kBackwardThreads, 0, s>>>(
        logits, ld_logits, out, ld_out, cols, labels, band_start, bias_band, pre, post, flags, lse, mu, g, g_ent, factor);
  return launch_status("backward epilogue (transformed)");
}

}  // extern "C"
