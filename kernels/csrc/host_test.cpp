// Host test of the epilogue math: the __host__ __device__ functions of altpo_math.h, driven through
// the host build of the C ABI, against float64 computations written out here. Run by ctest:
//
//   altpo_csrc_host_test <case>      case: conversions | g_scale | forward | backward | errors | all
//
// Exits 0 when every check of the case passes; prints each failure.
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <algorithm>
#include <random>
#include <string>
#include <vector>

#include "altpo_csrc.h"
#include "altpo_math.h"

namespace {

int failures = 0;
int checks = 0;

void expect(bool ok, const char* what, double got = 0, double want = 0) {
  ++checks;
  if (!ok) {
    ++failures;
    if (failures <= 20) printf("FAIL %s: got %.9g want %.9g\n", what, got, want);
  }
}

std::mt19937_64 rng(20240613);

double uniform(double lo, double hi) { return std::uniform_real_distribution<double>(lo, hi)(rng); }
double normal() { return std::normal_distribution<double>(0.0, 1.0)(rng); }

// Nearest fp16 / bf16 value to x by exhaustive search over the finite codes of that sign, in
// float64, ties to the even code: the reference for the bit-level conversions.
double decode(uint16_t code, int dtype) {
  return dtype == altpo::kF16 ? altpo::f16_to_float(code) : altpo::bf16_to_float(code);
}

uint16_t nearest_code(double x, int dtype) {
  uint16_t sign = x < 0 ? 0x8000 : 0;
  double ax = fabs(x);
  uint16_t top = dtype == altpo::kF16 ? 0x7BFF : 0x7F7F;  // largest finite magnitude
  uint16_t lo = 0, hi = top;
  while (lo < hi) {  // first code whose value is >= ax (values grow with the code)
    uint16_t mid = static_cast<uint16_t>((lo + hi) / 2);
    if (decode(mid, dtype) >= ax) hi = mid; else lo = static_cast<uint16_t>(mid + 1);
  }
  if (decode(lo, dtype) < ax) {  // beyond the largest finite value: inf past the rounding midpoint
    double next_ulp = decode(top, dtype) - decode(static_cast<uint16_t>(top - 1), dtype);
    double midpoint = decode(top, dtype) + next_ulp / 2;
    uint16_t inf = dtype == altpo::kF16 ? 0x7C00 : 0x7F80;
    return static_cast<uint16_t>(sign | (ax >= midpoint ? inf : top));
  }
  if (lo == 0) return sign;
  double up = decode(lo, dtype) - ax, down = ax - decode(static_cast<uint16_t>(lo - 1), dtype);
  uint16_t pick = up < down ? lo : (down < up ? static_cast<uint16_t>(lo - 1) : ((lo & 1) ? static_cast<uint16_t>(lo - 1) : lo));
  return static_cast<uint16_t>(sign | pick);
}

void test_conversions() {
  // Every finite fp16 and bf16 code survives decode then encode.
  for (uint32_t c = 0; c < 0x10000; ++c) {
    uint16_t code = static_cast<uint16_t>(c);
    if ((code & 0x7C00) != 0x7C00)
      expect(altpo::float_to_f16(altpo::f16_to_float(code)) == code, "fp16 round trip", code, code);
    if ((code & 0x7F80) != 0x7F80)
      expect(altpo::float_to_bf16(altpo::bf16_to_float(code)) == code, "bf16 round trip", code, code);
  }
  // Random floats over the whole range, and the edges: ties, the overflow point, subnormals.
  std::vector<float> xs = {65504.0f, 65519.99f, 65520.0f, 65536.0f, 1e30f, 5.9604644775390625e-8f,
                           2.98023223876953125e-8f, 2.9802326e-8f, 4.4703484e-8f, 8.940697e-8f,
                           6.097555e-5f, 6.1035156e-5f, 1.0009765625f, 1.00048828125f, 1.00146484375f,
                           3.3895314e38f, 1.0f + 1.0f / 256.0f, 1.0f + 3.0f / 256.0f, 0.0f, 1e-45f};
  for (int i = 0; i < 200000; ++i) {
    double mag = pow(2.0, uniform(-30.0, 20.0));
    xs.push_back(static_cast<float>(i % 2 ? mag : -mag));
  }
  for (int i = 0; i < 20000; ++i) xs.push_back(static_cast<float>(pow(2.0, uniform(-140.0, 128.0))));
  for (float x : xs) {
    uint16_t want16 = nearest_code(x, altpo::kF16);
    expect(altpo::float_to_f16(x) == want16, "float -> fp16 rounds to nearest even", x, decode(want16, altpo::kF16));
    uint16_t want_b = nearest_code(x, altpo::kBF16);
    expect(altpo::float_to_bf16(x) == want_b, "float -> bf16 rounds to nearest even", x, decode(want_b, altpo::kBF16));
    expect(altpo::float_to_f16(-x) == (altpo::float_to_f16(x) ^ 0x8000), "fp16 sign symmetry", x, -x);
  }
  expect(altpo::float_to_f16(INFINITY) == 0x7C00, "fp16 inf");
  expect((altpo::float_to_f16(NAN) & 0x7FFF) > 0x7C00, "fp16 NaN stays NaN");
  expect((altpo::float_to_bf16(NAN) & 0x7FFF) > 0x7F80, "bf16 NaN stays NaN");
}

double g_scale_expected(double x, int dtype) {
  // 2^(14 - floor(log2 x)) so that x * scale lies in [2^14, 2^15); exponent clamped to +-100.
  if (dtype != altpo::kF16 || !(x > 0) || isinf(x)) return 1.0;
  double k = 14.0 - floor(log2(x));
  k = k > 100 ? 100 : (k < -100 ? -100 : k);
  return pow(2.0, k);
}

void test_g_scale() {
  struct Case { float x; int dtype; double want; };
  const Case cases[] = {{1.0f, altpo::kF16, 16384.0}, {0.75f, altpo::kF16, 32768.0},
                        {1e-4f, altpo::kF16, 268435456.0}, {65504.0f, altpo::kF16, 0.5},
                        {0.0f, altpo::kF16, 1.0}, {INFINITY, altpo::kF16, 1.0}, {NAN, altpo::kF16, 1.0},
                        {1e-38f, altpo::kF16, pow(2.0, 100)}, {1e-4f, altpo::kBF16, 1.0},
                        {1e-4f, altpo::kF32, 1.0}};
  for (const Case& c : cases) expect(altpo_g_scale(c.x, c.dtype) == c.want, "g_scale fixed case", altpo_g_scale(c.x, c.dtype), c.want);
  for (int i = 0; i < 100000; ++i) {
    float x = static_cast<float>(pow(2.0, uniform(-84.0, 114.0)));
    double s = altpo_g_scale(x, altpo::kF16);
    expect(s == g_scale_expected(x, altpo::kF16), "g_scale against 2^(14 - floor(log2 x))", s, g_scale_expected(x, altpo::kF16));
    double top = static_cast<double>(x) * s;
    expect(top >= 16384.0 && top < 32768.0, "max|g| * scale in [2^14, 2^15)", top, 16384.0);
  }
}

// A [rows, ld] tile of random logits of a given spread and offset, stored in dtype; returns the
// stored values decoded to float64 (what the epilogue sees).
std::vector<double> make_tile(std::vector<uint8_t>& storage, int dtype, int64_t rows, int64_t cols, int64_t ld,
                              double spread, double offset) {
  int64_t esize = dtype == altpo::kF32 ? 4 : 2;
  storage.assign(static_cast<size_t>(rows * ld * esize), 0xFF);  // padding columns hold NaN bytes
  std::vector<double> values(static_cast<size_t>(rows * cols));
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) {
      float z = static_cast<float>(offset + spread * normal());
      int64_t at = i * ld + j;
      if (dtype == altpo::kF32) memcpy(&storage[at * 4], &z, 4);
      else {
        uint16_t code = dtype == altpo::kBF16 ? altpo::float_to_bf16(z) : altpo::float_to_f16(z);
        memcpy(&storage[at * 2], &code, 2);
      }
      values[i * cols + j] = dtype == altpo::kF32 ? z : decode(dtype == altpo::kBF16 ? altpo::float_to_bf16(z) : altpo::float_to_f16(z), dtype);
    }
  return values;
}

// The forward kernel's reduction order, replayed on the host: 256 threads fold strided slices of a
// row, each warp merges its lanes with xor shuffles (offsets 16, 8, 4, 2, 1), then warp 0 merges
// the 8 warp results the same way (lanes 8..31 empty). Threads past the row's end stay empty,
// which is what narrow bands exercise.
void device_order_row(const float* z, int64_t cols, float& m_out, float& s_out) {
  const int threads = 256;
  float m[256], s[256];
  for (int t = 0; t < threads; ++t) {
    m[t] = -INFINITY;
    s[t] = 0.0f;
    for (int64_t j = t; j < cols; j += threads) altpo::lse_push(m[t], s[t], z[j]);
  }
  auto warp_merge = [](float* wm, float* ws) {
    for (int offset = 16; offset > 0; offset >>= 1) {
      float m2[32], s2[32];
      for (int lane = 0; lane < 32; ++lane) { m2[lane] = wm[lane ^ offset]; s2[lane] = ws[lane ^ offset]; }
      for (int lane = 0; lane < 32; ++lane) altpo::lse_merge(wm[lane], ws[lane], m2[lane], s2[lane]);
    }
  };
  for (int w = 0; w < threads / 32; ++w) warp_merge(m + 32 * w, s + 32 * w);
  float wm[32], ws[32];
  for (int lane = 0; lane < 32; ++lane) {
    wm[lane] = lane < threads / 32 ? m[32 * lane] : -INFINITY;
    ws[lane] = lane < threads / 32 ? s[32 * lane] : 0.0f;
  }
  warp_merge(wm, ws);
  m_out = wm[0];
  s_out = ws[0];
}

void test_forward() {
  struct Case { const char* name; int dtype; int64_t rows, vocab, band; double spread, offset; };
  const Case cases[] = {
      {"fp32 unit logits, odd bands", altpo::kF32, 7, 301, 64, 1.0, 0.0},
      {"fp32 large logits (|z| ~ 3e4)", altpo::kF32, 5, 257, 100, 30.0, 3e4},
      {"fp32 very negative logits", altpo::kF32, 5, 130, 33, 5.0, -8e3},
      {"fp32 small logits (|z| ~ 1e-3)", altpo::kF32, 6, 99, 10, 1e-3, 0.0},
      {"fp32 wide spread (exp underflows)", altpo::kF32, 4, 512, 128, 60.0, 0.0},
      {"bf16 tile", altpo::kBF16, 5, 200, 64, 3.0, 1.0},
      {"fp16 tile", altpo::kF16, 5, 200, 48, 3.0, -2.0},
      {"one-column bands", altpo::kF32, 3, 9, 1, 2.0, 0.0},
      {"bands wider than a block (600 columns)", altpo::kF32, 3, 1500, 600, 3.0, 0.0},
  };
  for (const Case& c : cases) {
    int fails_before = failures;
    int64_t ld = c.band + 3;
    // Labels at the band edges: first and last column of a band, vocabulary ends, random.
    std::vector<int32_t> labels(c.rows);
    for (int64_t i = 0; i < c.rows; ++i) {
      int64_t pick[] = {0, c.vocab - 1, c.band - 1, std::min<int64_t>(c.band, c.vocab - 1),
                        std::min<int64_t>(2 * c.band - 1, c.vocab - 1)};
      labels[i] = static_cast<int32_t>(i < 5 ? pick[i] : static_cast<int64_t>(uniform(0, static_cast<double>(c.vocab))));
    }
    std::vector<float> run_max(c.rows, -INFINITY), run_sum(c.rows, 0.0f), picked(c.rows, -12345.0f);
    std::vector<double> ref_label(c.rows, 0);
    std::vector<float> dev_max(c.rows, -INFINITY), dev_sum(c.rows, 0.0f);  // the kernel's order
    std::vector<std::vector<double>> all(c.rows);
    std::vector<uint8_t> storage;
    for (int64_t v0 = 0; v0 < c.vocab; v0 += c.band) {
      int64_t cols = std::min(c.band, c.vocab - v0);
      std::vector<double> vals = make_tile(storage, c.dtype, c.rows, cols, ld, c.spread, c.offset);
      int rc = altpo_forward_epilogue(storage.data(), c.dtype, c.rows, cols, ld, labels.data(), v0,
                                      run_max.data(), run_sum.data(), picked.data(), 0);
      expect(rc == 0, "forward epilogue returns 0", rc, 0);
      for (int64_t i = 0; i < c.rows; ++i) {
        std::vector<float> row32(cols);
        for (int64_t j = 0; j < cols; ++j) row32[j] = static_cast<float>(vals[i * cols + j]);
        float tm, ts;
        device_order_row(row32.data(), cols, tm, ts);
        altpo::lse_merge(dev_max[i], dev_sum[i], tm, ts);
        for (int64_t j = 0; j < cols; ++j) all[i].push_back(vals[i * cols + j]);
        if (labels[i] >= v0 && labels[i] < v0 + cols) ref_label[i] = vals[i * cols + (labels[i] - v0)];
      }
    }
    for (int64_t i = 0; i < c.rows; ++i) {
      double m = -INFINITY;
      for (double z : all[i]) m = std::max(m, z);
      double s = 0;
      for (double z : all[i]) s += exp(z - m);
      double lse = m + log(s);
      double got = run_max[i] + log(static_cast<double>(run_sum[i]));
      double tol = 2e-6 * (fabs(lse) + 1.0) + 1e-6 * log(static_cast<double>(c.vocab));
      expect(fabs(got - lse) <= tol, c.name, got, lse);
      double dev = dev_max[i] + log(static_cast<double>(dev_sum[i]));
      expect(fabs(dev - lse) <= tol, "kernel reduction order", dev, lse);
      expect(picked[i] == static_cast<float>(ref_label[i]), "label logit picked exactly", picked[i], ref_label[i]);
    }
    printf("%s forward: %s\n", failures == fails_before ? "ok  " : "FAIL", c.name);
  }
}

void test_backward() {
  struct Case { const char* name; int in_dtype, out_dtype; int64_t rows, cols, band_start; double g_mag; bool in_place; };
  const Case cases[] = {
      {"fp32 -> fp32", altpo::kF32, altpo::kF32, 6, 77, 0, 1.0, false},
      {"fp32 -> bf16", altpo::kF32, altpo::kBF16, 6, 130, 64, 0.3, false},
      {"fp32 -> fp16, g ~ 1", altpo::kF32, altpo::kF16, 6, 130, 64, 1.0, false},
      {"fp32 -> fp16, g ~ 1e-6 (scaled)", altpo::kF32, altpo::kF16, 6, 257, 256, 1e-6, false},
      {"fp32 -> fp16, g ~ 3e3", altpo::kF32, altpo::kF16, 6, 100, 0, 3e3, false},
      {"fp32 -> fp16, g ~ 1e6 (scaled down)", altpo::kF32, altpo::kF16, 6, 100, 0, 1e6, false},
      {"bf16 in place", altpo::kBF16, altpo::kBF16, 5, 90, 30, 0.5, true},
      {"fp16 in place, g ~ 1e-5", altpo::kF16, altpo::kF16, 5, 90, 30, 1e-5, true},
      {"fp32 in place", altpo::kF32, altpo::kF32, 4, 33, 5, 2.0, true},
  };
  for (const Case& c : cases) {
    int fails_before = failures;
    int64_t ld_in = c.cols + 2;
    std::vector<uint8_t> logits;
    std::vector<double> z = make_tile(logits, c.in_dtype, c.rows, c.cols, ld_in, 2.0, 0.5);
    std::vector<int32_t> labels(c.rows);
    std::vector<float> lse(c.rows), g(c.rows);
    double max_g = 0;
    for (int64_t i = 0; i < c.rows; ++i) {
      int64_t edge[] = {c.band_start, c.band_start + c.cols - 1, c.band_start - 1, c.band_start + c.cols};
      labels[i] = static_cast<int32_t>(i < 4 ? edge[i] : c.band_start + static_cast<int64_t>(uniform(0, static_cast<double>(c.cols))));
      if (labels[i] < 0) labels[i] = static_cast<int32_t>(c.band_start + c.cols + 7);
      // lse of a wider vocabulary than the tile, so the tile's probabilities are below 1.
      lse[i] = static_cast<float>(log(static_cast<double>(c.cols) * 40.0) + 2.5 + uniform(0, 1));
      g[i] = i == 1 ? 0.0f : static_cast<float>(c.g_mag * uniform(0.2, 1.0) * (i % 2 ? 1 : -1));
      max_g = std::max(max_g, fabs(static_cast<double>(g[i])));
    }
    float scale = altpo_g_scale(static_cast<float>(max_g), c.out_dtype);
    std::vector<uint8_t> out_separate;
    void* out = logits.data();
    int64_t ld_out = ld_in;
    if (!c.in_place) {
      ld_out = c.cols + 5;
      out_separate.assign(static_cast<size_t>(c.rows * ld_out * (c.out_dtype == altpo::kF32 ? 4 : 2)), 0);
      out = out_separate.data();
    }
    int rc = altpo_backward_epilogue(logits.data(), c.in_dtype, ld_in, out, c.out_dtype, ld_out, c.rows, c.cols,
                                     labels.data(), c.band_start, lse.data(), g.data(), scale, 0);
    expect(rc == 0, "backward epilogue returns 0", rc, 0);
    int64_t nonzero = 0;
    for (int64_t i = 0; i < c.rows; ++i)
      for (int64_t j = 0; j < c.cols; ++j) {
        double onehot = labels[i] == c.band_start + j ? 1.0 : 0.0;
        double want = static_cast<double>(g[i]) * scale * (onehot - exp(z[i * c.cols + j] - lse[i]));
        double got = c.out_dtype == altpo::kF32
                         ? static_cast<const float*>(out)[i * ld_out + j]
                         : decode(static_cast<const uint16_t*>(out)[i * ld_out + j], c.out_dtype);
        // One rounding to the output type (relative 2^-8 bf16, 2^-11 fp16, 2^-24 fp32) plus fp32 math,
        // and fp16's subnormal spacing 2^-24 as an absolute floor.
        double rel = c.out_dtype == altpo::kBF16 ? 0.0040 : (c.out_dtype == altpo::kF16 ? 5e-4 : 4e-6);
        double floor_abs = c.out_dtype == altpo::kF16 ? 3e-8 : 1e-30;
        expect(fabs(got - want) <= rel * fabs(want) + floor_abs + 1e-6 * fabs(static_cast<double>(g[i]) * scale),
               c.name, got, want);
        if (i == 1) expect(got == 0.0, "zero gradient row gives exact zeros", got, 0.0);
        expect(fabs(got) <= 32768.0 || c.out_dtype != altpo::kF16, "scaled fp16 entries stay below 2^15", got, 32768.0);
        nonzero += got != 0.0;
      }
    // The scaling keeps the small entries: at least all entries of nonzero-g rows survive.
    expect(nonzero == (c.rows - 1) * c.cols, "no entry of a nonzero-g row flushes to zero", static_cast<double>(nonzero),
           static_cast<double>((c.rows - 1) * c.cols));
    printf("%s backward: %s (scale %g)\n", failures == fails_before ? "ok  " : "FAIL", c.name, scale);
  }
  // Without the scale, g ~ 1e-6 times softmax entries ~ 1e-4 is below fp16's smallest subnormal:
  // the case above would lose those entries. Shown here so the rule's purpose is checked too.
  expect(altpo::float_to_f16(1e-6f * 1e-4f) == 0, "unscaled tiny G entries flush to zero in fp16");
}

void test_errors() {
  float buf[16] = {0};
  int32_t labels[4] = {0, 1, 2, 3};
  float m[4], s[4], p[4];
  auto check = [](int rc, const char* needle) {
    expect(rc != 0, "bad input returns nonzero", rc, 1);
    expect(strstr(altpo_last_error(), needle) != nullptr, needle);
  };
  check(altpo_forward_epilogue(buf, 7, 2, 4, 4, labels, 0, m, s, p, 0), "dtype code 7");
  check(altpo_forward_epilogue(buf, 0, 2, 4, 3, labels, 0, m, s, p, 0), "row stride 3");
  check(altpo_forward_epilogue(nullptr, 0, 2, 4, 4, labels, 0, m, s, p, 0), "null pointer");
  check(altpo_forward_epilogue(buf, 0, 2, 4, 4, labels, 0, nullptr, s, p, 0), "run_max");
  check(altpo_backward_epilogue(buf, 0, 4, buf, 1, 4, 2, 4, labels, 0, m, s, 1.0f, 0), "dtype or row stride differs");
  check(altpo_backward_epilogue(buf, 0, 4, buf + 2, 0, 4, 2, 4, labels, 0, m, s, 1.0f, 0), "partly overlaps");
  check(altpo_backward_epilogue(buf, 0, 4, buf + 8, 0, 4, 2, 4, labels, 0, nullptr, s, 1.0f, 0), "lse");
  expect(altpo_forward_epilogue(buf, 0, 0, 4, 4, nullptr, 0, nullptr, nullptr, nullptr, 0) == 0, "zero rows is a no-op");
  expect(altpo_last_error()[0] == '\0', "success clears the error");
  expect(altpo_abi_version() == ALTPO_CSRC_ABI_VERSION && altpo_is_cuda() == 0, "host build identifies itself");
  printf("%s errors\n", failures ? "FAIL" : "ok  ");
}

}  // namespace

int main(int argc, char** argv) {
  std::string which = argc > 1 ? argv[1] : "all";
  bool all = which == "all", known = false;
  if (all || which == "conversions") { known = true; test_conversions(); }
  if (all || which == "g_scale") { known = true; test_g_scale(); }
  if (all || which == "forward") { known = true; test_forward(); }
  if (all || which == "backward") { known = true; test_backward(); }
  if (all || which == "errors") { known = true; test_errors(); }
  if (!known) {
    printf("unknown case %s; use conversions, g_scale, forward, backward, errors or all\n", which.c_str());
    return 2;
  }
  printf("%s: %d checks, %d failures\n", which.c_str(), checks, failures);
  return failures ? 1 : 0;
}
