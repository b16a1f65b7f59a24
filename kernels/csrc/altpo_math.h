// Per-element and per-row math of the epilogues, shared by the CUDA kernels (epilogues.cu), the host
// build of the same C ABI (epilogues_host.cpp) and the host test program (host_test.cpp). Every
// function is __host__ __device__ under nvcc and a plain inline function under a C++ compiler, so
// the host test checks the very code the GPU runs.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define ALTPO_HD __host__ __device__ __forceinline__
#else
#define ALTPO_HD inline
#endif

namespace altpo {

// Element types of logits tiles and G tiles (the C ABI's dtype codes).
enum Dtype : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

// ------------------------------------------------------------------------------------------------
// 16-bit conversions, bit exact and round-to-nearest-even (the same results as torch's .to()).

ALTPO_HD uint32_t float_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
}

ALTPO_HD float bits_float(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

ALTPO_HD float bf16_to_float(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

ALTPO_HD uint16_t float_to_bf16(float f) {
  uint32_t x = float_bits(f);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((x >> 16) | 0x0040u);  // NaN
  x += 0x7FFFu + ((x >> 16) & 1u);
  return static_cast<uint16_t>(x >> 16);
}

ALTPO_HD float f16_to_float(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t mant = h & 0x3FFu;
  if (exp == 0) {  // zero or subnormal: mant * 2^-24, exact in fp32
    float v = static_cast<float>(mant) * 5.9604644775390625e-8f;
    return sign ? -v : v;
  }
  if (exp == 31) return bits_float(sign | 0x7F800000u | (mant << 13));
  return bits_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

ALTPO_HD uint16_t float_to_f16(float f) {
  uint32_t x = float_bits(f);
  uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t ax = x & 0x7FFFFFFFu;
  if (ax > 0x7F800000u) return static_cast<uint16_t>(sign | 0x7E00u);  // NaN
  if (ax >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // >= 65520 rounds to inf
  if (ax >= 0x38800000u) {  // normal fp16 (>= 2^-14): round at bit 13, re-bias the exponent
    uint32_t r = ax + 0x0FFFu + ((ax >> 13) & 1u);
    return static_cast<uint16_t>(sign | ((r - 0x38000000u) >> 13));
  }
  if (ax <= 0x33000000u) return static_cast<uint16_t>(sign);  // <= 2^-25 rounds to zero
  // Subnormal fp16: the value in units of 2^-24, rounded to nearest even.
  uint32_t e = ax >> 23;
  uint32_t mant = (ax & 0x7FFFFFu) | 0x800000u;
  uint32_t shift = 126u - e;  // 14..24
  uint32_t q = mant >> shift;
  uint32_t rem = mant & ((1u << shift) - 1u);
  uint32_t half = 1u << (shift - 1u);
  if (rem > half || (rem == half && (q & 1u))) ++q;
  return static_cast<uint16_t>(sign | q);
}

template <int DT>
ALTPO_HD float load_as_float(const void* base, int64_t i) {
  if (DT == kF32) return static_cast<const float*>(base)[i];
  if (DT == kBF16) return bf16_to_float(static_cast<const uint16_t*>(base)[i]);
  return f16_to_float(static_cast<const uint16_t*>(base)[i]);
}

template <int DT>
ALTPO_HD void store_from_float(void* base, int64_t i, float v) {
  if (DT == kF32) {
    static_cast<float*>(base)[i] = v;
  } else if (DT == kBF16) {
    static_cast<uint16_t*>(base)[i] = float_to_bf16(v);
  } else {
    static_cast<uint16_t*>(base)[i] = float_to_f16(v);
  }
}

// ------------------------------------------------------------------------------------------------
// Online log-sum-exp. A row's state is (m, s): lse = m + log(s); the empty state is (-inf, 0).

// Fold one logit into (m, s): one exp per element. -inf adds nothing; NaN propagates through s.
ALTPO_HD void lse_push(float& m, float& s, float z) {
  if (z > m) {
    s = s * expf(m - z) + 1.0f;  // m = -inf: s is 0 and exp(-inf) is 0
    m = z;
  } else if (z != -INFINITY) {
    s += expf(z - m);
  }
}

// Merge the state (m2, s2) into (m, s). Merging with an empty state changes nothing.
ALTPO_HD void lse_merge(float& m, float& s, float m2, float s2) {
  float top = fmaxf(m, m2);
  if (top == -INFINITY) return;
  s = s * expf(m - top) + s2 * expf(m2 - top);
  m = top;
}

// ------------------------------------------------------------------------------------------------
// Backward: G = g * (onehot(label) - exp(z - lse)), times the chunk's scale.

// Largest magnitude a scaled fp16 G entry may reach: max|g| * scale lies in [2^14, 2^15).
constexpr int kF16GradExponent = 15;
// The scale exponent is clamped so that both the scale and its inverse are normal fp32 numbers.
constexpr int kMaxScaleExponent = 100;

// The scale a G producer multiplies G by, from the largest |g| of its token chunk. fp16 tiles get
// the power of two 2^(15 - e) where max|g| = f * 2^e with f in [0.5, 1) (frexp), so that
// max|g| * scale = f * 2^15 lies in [2^14, 2^15): the largest entry stays below fp16's 65504
// (|onehot - p| <= 1) and small softmax terms keep 29 binades above fp16's subnormal range.
// bf16 and fp32 tiles have fp32's exponent range and get 1, as do chunks whose max|g| is 0 or not
// finite. A power of two makes the scaling, and dividing it out after the GEMMs, exact.
ALTPO_HD float g_scale(float max_abs_g, int out_dtype) {
  if (out_dtype != kF16 || !(max_abs_g > 0.0f) || max_abs_g == INFINITY) return 1.0f;
  int e = 0;
  frexpf(max_abs_g, &e);
  int k = kF16GradExponent - e;
  k = k > kMaxScaleExponent ? kMaxScaleExponent : (k < -kMaxScaleExponent ? -kMaxScaleExponent : k);
  return ldexpf(1.0f, k);
}

// One entry of the scaled G tile; g_scaled is the row's g times the chunk's scale (exact: a power
// of two), so each entry is rounded once, when it is stored in 16 bit.
ALTPO_HD float grad_entry(float z, float lse, bool is_label, float g_scaled) {
  float p = expf(z - lse);
  return ((is_label ? 1.0f : 0.0f) - p) * g_scaled;
}

// ------------------------------------------------------------------------------------------------
// Head transforms (the *_tf entry points): u = post * tanh(pre * (z + b)) with kSoftcap, else
// u = pre * (z + b) with kScale, else u = z + b; b only with kHasBias. With kEntropy the forward
// also keeps e = sum exp(u - m) (u - m), so that entropy = log(s) - e / s, and the backward adds
// -g_ent p (u - mu). The derivative du/dz is dscale (1 - t^2) with softcap (t the tanh), else
// dscale; the caller folds dscale (and a G scale) into `factor`.

enum TransformFlag : int { kHasBias = 1, kScale = 2, kSoftcap = 4, kEntropy = 8 };

// tanh from one exponential, exactly +-1 once exp overflows or underflows (never NaN).
ALTPO_HD float tanh_exp(float x) { return 1.0f - 2.0f / (expf(2.0f * x) + 1.0f); }

// u of one logit z (column j of the band), and t, the tanh (softcap only; else 0).
ALTPO_HD float head_logit(float z, const float* bias, int64_t j, float pre, float post, int flags,
                          float& t) {
  if (flags & kHasBias) z += bias[j];
  t = 0.0f;
  if (flags & kSoftcap) {
    t = tanh_exp(pre * z);
    return post * t;
  }
  return (flags & kScale) ? pre * z : z;
}

// Fold u into (m, s, e); -inf adds nothing. The old terms move to a new max m': e' = r (e + s (m -
// m')) with r = exp(m - m'); the new term contributes exp(0) * 0.
ALTPO_HD void ent_push(float& m, float& s, float& e, float u) {
  if (u > m) {
    float r = expf(m - u);
    e = s > 0.0f ? (e + s * (m - u)) * r : 0.0f;
    s = s * r + 1.0f;
    m = u;
  } else if (u != -INFINITY) {
    float d = u - m, x = expf(d);
    s += x;
    e += x * d;
  }
}

// Merge (m2, s2, e2) into (m, s, e), both moved to the larger max.
ALTPO_HD void ent_merge(float& m, float& s, float& e, float m2, float s2, float e2) {
  float top = fmaxf(m, m2);
  if (top == -INFINITY) return;
  float r1 = expf(m - top), r2 = expf(m2 - top);
  float a = s > 0.0f ? (e + s * (m - top)) * r1 : 0.0f;
  float b = s2 > 0.0f ? (e2 + s2 * (m2 - top)) * r2 : 0.0f;
  s = s * r1 + s2 * r2;
  e = a + b;
  m = top;
}

// One entry of factor * du/dz-scaled G for the transformed head.
ALTPO_HD float grad_entry_tf(float u, float t, float lse, float mu, bool is_label, float g, float g_ent,
                             float factor, int flags) {
  float p = expf(u - lse);
  float grad = g * ((is_label ? 1.0f : 0.0f) - p);
  if (flags & kEntropy) grad -= g_ent * p * (u - mu);
  return grad * ((flags & kSoftcap) ? factor * (1.0f - t * t) : factor);
}

}  // namespace altpo
