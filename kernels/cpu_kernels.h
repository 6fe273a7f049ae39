// What the CPU kernels (cpu_gemm.cpp, cpu_dmc.cpp, cpu_layer.cpp) share: AVX2 helpers for
// attention (exponentials; one query row's softmax-weighted sum over the slots it sees) and the
// small-M GEMM and FP8 activation
// quantizer as functions on raw pointers, for kernels that call them inside one operation.

#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include <ATen/ATen.h>

namespace chatapp_kernels {

// e^x for x <= 0 (scores minus their max), 8 lanes: the Cephes single-precision polynomial on
// x - n ln 2, times 2^n; within 2 ulp of expf, and 0 below -87.
inline __m256 exp_nonpositive(__m256 x) {
  const __m256 lowest = _mm256_set1_ps(-87.0f);
  const __m256 under = _mm256_cmp_ps(x, lowest, _CMP_LT_OQ);
  x = _mm256_max_ps(x, lowest);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(under, _mm256_mul_ps(y, _mm256_castsi256_ps(bits)));
}

// p[i] = e^(p[i] - top) for i < count; returns their sum.
inline float exp_shifted(float* p, int64_t count, float top) {
  const __m256 t = _mm256_set1_ps(top);
  __m256 total = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(p + i), t));
    _mm256_storeu_ps(p + i, e);
    total = _mm256_add_ps(total, e);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, total);
  float sum = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
  if (i < count) {  // the tail, through the same polynomial
    alignas(32) float rest[8];
    for (int j = 0; j < 8; ++j) rest[j] = i + j < count ? p[i + j] - top : -INFINITY;
    _mm256_store_ps(rest, exp_nonpositive(_mm256_load_ps(rest)));
    for (int64_t j = 0; i + j < count; ++j) {
      p[i + j] = rest[j];
      sum += rest[j];
    }
  }
  return sum;
}

// f(std::integral_constant<int, n>{}) for n in 1..MAX (above MAX: MAX; MAX <= 8): a count known at
// run time handed to code that wants it at compile time (how many registers of accumulators).
template <int MAX, class F>
inline void with_count(int64_t n, F&& f) {
  static_assert(MAX >= 1 && MAX <= 8, "with_count: 1 to 8");
  auto call = [&](auto c) { f(std::integral_constant<int, (decltype(c)::value < MAX ? decltype(c)::value : MAX)>{}); };
  switch (n) {
    case 1: call(std::integral_constant<int, 1>{}); break;
    case 2: call(std::integral_constant<int, 2>{}); break;
    case 3: call(std::integral_constant<int, 3>{}); break;
    case 4: call(std::integral_constant<int, 4>{}); break;
    case 5: call(std::integral_constant<int, 5>{}); break;
    case 6: call(std::integral_constant<int, 6>{}); break;
    case 7: call(std::integral_constant<int, 7>{}); break;
    default: call(std::integral_constant<int, 8>{}); break;
  }
}

// Where one query head's attention finds the keys and values it may see, slot j of count:
// rows of its KV head's cache picked by slot numbers (SlotRows, the causal or tree-masked cache
// of cpu_layer.cpp), or pointers gathered beforehand (SlotPointers, cpu_dmc.cpp's pages).
struct SlotRows {
  const float* keys;
  int64_t ks1;  // slot s's key at keys + s * ks1
  const float* values;
  int64_t vs1;
  const int64_t* slots;
  const float* key(int64_t j) const { return keys + slots[j] * ks1; }
  const float* value(int64_t j) const { return values + slots[j] * vs1; }
};

struct SlotPointers {
  const float* const* keys;
  const float* const* values;
  const float* key(int64_t j) const { return keys[j]; }
  const float* value(int64_t j) const { return values[j]; }
};

constexpr int64_t KEYS = 4;  // keys per block of the score loop: 4 sums in flight, reduced together

// w[j] = q . key(j) * scale for j < count, a block of KEYS keys at a time: the 8-lane sums of a
// block's keys are reduced together (two rounds of pairwise adds, then the two halves), the same
// adds in the same order for every key whatever its place in the block; a last, short block
// repeats its last key and keeps only the scores it needs. Any head size d (8-lane chunks, then
// the rest one by one).
template <class KV>
void scores(const float* q, const KV& kv, int64_t count, int64_t d, float scale, float* w) {
  const int64_t chunks = d / 8;
  for (int64_t j = 0; j < count; j += KEYS) {
    const float* k[KEYS];
    for (int64_t b = 0; b < KEYS; ++b) k[b] = kv.key(std::min(j + b, count - 1));
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    for (int64_t c = 0; c < chunks; ++c) {
      const __m256 qc = _mm256_loadu_ps(q + 8 * c);
      a0 = _mm256_fmadd_ps(qc, _mm256_loadu_ps(k[0] + 8 * c), a0);
      a1 = _mm256_fmadd_ps(qc, _mm256_loadu_ps(k[1] + 8 * c), a1);
      a2 = _mm256_fmadd_ps(qc, _mm256_loadu_ps(k[2] + 8 * c), a2);
      a3 = _mm256_fmadd_ps(qc, _mm256_loadu_ps(k[3] + 8 * c), a3);
    }
    const __m256 pairs = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    alignas(16) float sum[KEYS];
    _mm_store_ps(sum, _mm_add_ps(_mm256_castps256_ps128(pairs), _mm256_extractf128_ps(pairs, 1)));
    for (int64_t b = 0; b < KEYS && j + b < count; ++b) {
      float v = sum[b];
      for (int64_t e = 8 * chunks; e < d; ++e) v += q[e] * k[b][e];
      w[j + b] = v * scale;
    }
  }
}

// out[off..off + 8 N) = inv * sum over j of p[j] * value(j)[off..off + 8 N), in order of j, in N
// registers.
template <int N, class KV>
void weighted_values(const float* p, const KV& kv, int64_t count, int64_t off, float inv, float* out) {
  __m256 acc[N];
#pragma GCC unroll 8
  for (int c = 0; c < N; ++c) acc[c] = _mm256_setzero_ps();
  for (int64_t j = 0; j < count; ++j) {
    const __m256 pj = _mm256_set1_ps(p[j]);
    const float* v = kv.value(j) + off;
#pragma GCC unroll 8
    for (int c = 0; c < N; ++c) acc[c] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(v + 8 * c), acc[c]);
  }
#pragma GCC unroll 8
  for (int c = 0; c < N; ++c) _mm256_storeu_ps(out + off + 8 * c, _mm256_mul_ps(acc[c], _mm256_set1_ps(inv)));
}

// out [d] = softmax(scores) @ values for one query row over the count slots of kv (none: zeros);
// w: room for count scores. The weighted sum runs over the slots in order, 64 lanes of the head
// at a time in registers.
template <class KV>
void attend(const float* q, const KV& kv, int64_t count, int64_t d, float scale, float* w, float* out) {
  if (count == 0) {
    std::fill(out, out + d, 0.0f);
    return;
  }
  scores(q, kv, count, d, scale, w);
  float top = -INFINITY;
  for (int64_t j = 0; j < count; ++j) top = std::max(top, w[j]);
  const float total = exp_shifted(w, count, top);
  const float inv = total > 0.0f ? 1.0f / total : 0.0f;
  const int64_t chunks = d / 8;
  for (int64_t c0 = 0; c0 < chunks; c0 += 8) {
    const int64_t off = 8 * c0;
    with_count<8>(chunks - c0, [&](auto n) { weighted_values<decltype(n)::value>(w, kv, count, off, inv, out); });
  }
  for (int64_t e = 8 * chunks; e < d; ++e) {
    float a = 0.0f;
    for (int64_t j = 0; j < count; ++j) a += w[j] * kv.value(j)[e];
    out[e] = a * inv;
  }
}

// The tensor itself when its innermost dimension is contiguous, else a contiguous copy.
inline at::Tensor inner_contiguous(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// The FP8 scales of a product: per row of x ([M], row_step 1) or one ([1], row_step 0), and per
// column of W or one; none for float weights.
struct Scales {
  float unscale = 1.0f;  // what the weights were read as a fraction of (a power of two)
  const float* row = nullptr;
  int64_t row_step = 0;  // 1: one per row; 0: one for all rows
  const float* col = nullptr;
  int64_t col_step = 0;
};

// y [M, n] (row stride ldy) = x [M, K] (row stride ldx) @ W (+ bias) (+ residual [M, n], row
// stride ldr), W in small_gemm's panels (float32, bfloat16 or float8_e4m3fn, checked by the
// caller); FP8 panels take the scales (``col`` and ``row`` set; ``unscale`` is filled in here).
void panel_gemm(const float* x, int64_t ldx, int64_t m, const at::Tensor& packed, int64_t n, float* y, int64_t ldy,
                Scales sc, const float* bias, const float* res, int64_t ldr);

// FP8 activations: rows of x [M, K] -> their e4m3 values as float32 in q [M, K] (contiguous)
// and their scales in scale [M] (dynamic: max(|row|, 1e-12) / 448), or with the given static
// scale (``fixed``, then scale is not written).
void quantize_rows_e4m3(const float* x, int64_t ldx, int64_t m, int64_t k, float* q, float* scale, const float* fixed);

}  // namespace chatapp_kernels
