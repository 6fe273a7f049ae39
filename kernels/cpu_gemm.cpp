// Small-M float32 GEMM for x86 CPUs with AVX2 + FMA: y[M, N] = x[M, K] @ W[K, N] (+ bias)
// (+ residual), for M from 1 to a few dozen rows: decoding (M = 1) and verifying a Medusa tree
// (M = its nodes). At these M the product is bound by reading W, so W is read once, in the
// order it is stored: packed as [N / 16][K][16] column panels, each panel streamed a block of
// k at a time, and every group of up to ROWS rows of x uses the block while it is in L1. The
// GEMM libraries' small-M paths read W several times over or use one core; this one costs
// about the same at M = 8 as at M = 1.
//
// Every output element is the same two sums whatever M is, over the even and over the odd k, each
// in increasing k, added at the end (two chains: one row alone keeps four sums in flight, not two
// that wait on the FMA latency): a row's result does not depend on how many other rows were
// multiplied with it.
//
// The panels hold float32, bfloat16, FP8 (e4m3) or int8 weights: narrow ones are read as they are
// stored (2 or 1 bytes per weight, the bytes decode is bound by) and widened to float32 in
// registers, exactly (every bf16 and e4m3 value is a float32); the arithmetic is float32.
// Needs AVX2, FMA and F16C (every AVX2 CPU has F16C). FP8
// products take the per-row (activation) and per-column (weight) scales in the epilogue, int8
// ones (activations in float32) the per-column scales.

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>
#include <cstdlib>

#include <ATen/Parallel.h>
#include <torch/library.h>
#include <ATen/ATen.h>

#include "cpu_kernels.h"

namespace chatapp_kernels {
namespace {

constexpr int PANEL = 16;  // columns per panel: two AVX registers
constexpr int ROWS = 6;    // rows per group: 12 accumulators + 2 weights + 1 broadcast = 15 registers
constexpr int KBLOCK = 64;  // k per block: 4 KB of the panel, read from memory once and used by every row group
constexpr int PREFETCH_BYTES = 1024;  // one row: how far ahead of the loads the stream is asked for
constexpr int PREFETCH = 32;  // panel lines (k) ahead that are asked for while the current ones are used
constexpr int CHAINS = 2;  // each output is two sums, over the even and over the odd k, added at the end
constexpr int MAX_ROWS = 64;  // rows whose accumulators are parked per task (more rows: another sweep of the panel)

// The accumulators are named variables, not an array: compilers keep them in registers then
// (with an array, GCC stores them to the stack at every k).
#define CHATAPP_LOAD(r)                                                                  \
  if constexpr (R > r) {                                                                 \
    a##r##0 = _mm256_load_ps(acc + (r) * CHAINS * PANEL);                                \
    a##r##1 = _mm256_load_ps(acc + (r) * CHAINS * PANEL + 8);                            \
  }
#define CHATAPP_ROW(r)                                              \
  if constexpr (R > r) {                                            \
    const __m256 xb = _mm256_broadcast_ss(x + (r) * ldx + k);       \
    a##r##0 = _mm256_fmadd_ps(xb, w0, a##r##0);                     \
    a##r##1 = _mm256_fmadd_ps(xb, w1, a##r##1);                     \
  }
#define CHATAPP_PARK(r)                                             \
  if constexpr (R > r) {                                            \
    _mm256_store_ps(acc + (r) * CHAINS * PANEL, a##r##0);           \
    _mm256_store_ps(acc + (r) * CHAINS * PANEL + 8, a##r##1);       \
  }

// How a panel's row k (16 weights) becomes two registers of 8 float32, per stored type.
struct F32Weights {
  using T = float;
  static inline void load(const float* w, __m256& w0, __m256& w1) {
    w0 = _mm256_load_ps(w);
    w1 = _mm256_load_ps(w + 8);
  }
};

struct Bf16Weights {
  // bf16 is the top half of a float32. A panel row is stored as 8 dwords (column j | column
  // j + 8 << 16) (cpu_gemm.py's PAIR_ORDER): shifting left gives columns 0-7, masking the low
  // half off gives columns 8-15, one operation each.
  using T = uint16_t;
  static inline void load(const uint16_t* w, __m256& w0, __m256& w1) {
    const __m256i v = _mm256_load_si256(reinterpret_cast<const __m256i*>(w));
    w0 = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    w1 = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
};

struct E4m3Weights {
  // e4m3 (sign, 4 exponent bits of bias 7, 3 mantissa bits) moved into a float16's fields (5
  // exponent bits of bias 15) reads as the value times 2^-8, normal and subnormal alike; the
  // hardware widens float16 to float32 exactly (F16C), and the epilogue multiplies by 2^8
  // (exact). Finite values only: the quantizer saturates at +-448 (e4m3's NaN would read 480).
  // A panel row is stored as 8 words (column j | column j + 8 << 8) (cpu_gemm.py's PAIR_ORDER).
  // A byte in a word's top half, shifted right by one with its sign copied, is the float16
  // after one mask (the copy of the sign lands on the float16's top exponent bit, which the mask
  // clears): columns 8-15 in two operations, and columns 0-7, shifted to the top first, in three.
  using T = uint8_t;
  static constexpr float UNSCALE = 256.0f;
  static inline void load(const uint8_t* w, __m256& w0, __m256& w1) {
    const __m128i v = _mm_load_si128(reinterpret_cast<const __m128i*>(w));
    const __m128i keep = _mm_set1_epi16(static_cast<short>(0xBF80));  // sign, 4 low exponent bits, 3 mantissa bits
    w0 = _mm256_cvtph_ps(_mm_and_si128(_mm_srai_epi16(_mm_slli_epi16(v, 8), 1), keep));
    w1 = _mm256_cvtph_ps(_mm_and_si128(_mm_srai_epi16(v, 1), keep));
  }
};

struct Int8Weights {
  // int8 (per-channel scaled, as a weight kind of its own) in the natural column order: 8 bytes
  // sign-extended to 8 int32 and converted, exactly, twice
  using T = int8_t;
  static inline void load(const int8_t* w, __m256& w0, __m256& w1) {
    w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w))));
    w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + 8))));
  }
};

// R rows times the panel's rows k0 + CHAIN, k0 + CHAIN + 2, ... below k1 (one of the two chains),
// added to that chain's accumulators of the R rows parked at acc ([R][CHAINS][16], 32-byte
// aligned). Each sum runs in increasing k: parking a float in memory and loading it back changes
// nothing. With ``widened`` set, the weights are also stored there as float32 ([KBLOCK][16], row
// k at k - k0) for the other row groups of the block.
template <int R, int CHAIN, class W>
void block_rows(const float* x, int64_t ldx, const typename W::T* w, int64_t k0, int64_t k1, float* acc,
                bool prefetch, float* widened) {
  __m256 a00, a01, a10, a11, a20, a21, a30, a31, a40, a41, a50, a51;
  acc += CHAIN * PANEL;
  CHATAPP_LOAD(0) CHATAPP_LOAD(1) CHATAPP_LOAD(2) CHATAPP_LOAD(3) CHATAPP_LOAD(4) CHATAPP_LOAD(5)
  for (int64_t k = k0 + CHAIN; k < k1; k += CHAINS) {
    // the first row group of a block streams the panel from memory: keep lines on the way
    // (within the panel and on into the next, which the same task takes next; a prefetch past
    // the end of the weights is harmless)
    if (prefetch) _mm_prefetch(reinterpret_cast<const char*>(w + (k + PREFETCH) * PANEL), _MM_HINT_T0);
    __m256 w0, w1;
    W::load(w + k * PANEL, w0, w1);
    if (widened) {
      _mm256_store_ps(widened + (k - k0) * PANEL, w0);
      _mm256_store_ps(widened + (k - k0) * PANEL + 8, w1);
    }
    CHATAPP_ROW(0) CHATAPP_ROW(1) CHATAPP_ROW(2) CHATAPP_ROW(3) CHATAPP_ROW(4) CHATAPP_ROW(5)
  }
  CHATAPP_PARK(0) CHATAPP_PARK(1) CHATAPP_PARK(2) CHATAPP_PARK(3) CHATAPP_PARK(4) CHATAPP_PARK(5)
}

// One row, both chains at once: four independent sums keep both FMA units busy, where one row's
// two would wait on the FMA latency. The same sums, in the same order, as block_rows computes.
template <class W>
void block_one(const float* x, const typename W::T* w, int64_t k0, int64_t k1, float* acc) {
  __m256 e0 = _mm256_load_ps(acc), e1 = _mm256_load_ps(acc + 8);
  __m256 o0 = _mm256_load_ps(acc + PANEL), o1 = _mm256_load_ps(acc + PANEL + 8);
  int64_t k = k0;
  for (; k + 1 < k1; k += 2) {
    // ask for the lines PREFETCH_BYTES ahead (on into the next panel, which this task takes next)
    const char* line = reinterpret_cast<const char*>(w + k * PANEL) + PREFETCH_BYTES;
    for (size_t b = 0; b < 2 * PANEL * sizeof(typename W::T); b += 64) _mm_prefetch(line + b, _MM_HINT_T0);
    __m256 w0, w1, v0, v1;
    W::load(w + k * PANEL, w0, w1);
    W::load(w + (k + 1) * PANEL, v0, v1);
    const __m256 xe = _mm256_broadcast_ss(x + k), xo = _mm256_broadcast_ss(x + k + 1);
    e0 = _mm256_fmadd_ps(xe, w0, e0);
    e1 = _mm256_fmadd_ps(xe, w1, e1);
    o0 = _mm256_fmadd_ps(xo, v0, o0);
    o1 = _mm256_fmadd_ps(xo, v1, o1);
  }
  if (k < k1) {  // an odd k1 - k0 (only at the end of K): its last row is an even chain's
    __m256 w0, w1;
    W::load(w + k * PANEL, w0, w1);
    const __m256 xe = _mm256_broadcast_ss(x + k);
    e0 = _mm256_fmadd_ps(xe, w0, e0);
    e1 = _mm256_fmadd_ps(xe, w1, e1);
  }
  _mm256_store_ps(acc, e0);
  _mm256_store_ps(acc + 8, e1);
  _mm256_store_ps(acc + PANEL, o0);
  _mm256_store_ps(acc + PANEL + 8, o1);
}

template <int R, class W>
void both_chains(const float* x, int64_t ldx, const typename W::T* w, int64_t k0, int64_t k1, float* acc,
                 bool prefetch, float* widened) {
  block_rows<R, 0, W>(x, ldx, w, k0, k1, acc, prefetch, widened);
  block_rows<R, 1, W>(x, ldx, w, k0, k1, acc, prefetch, widened);
}


// y = (even chain + odd chain) (* row scale * column scale, as the reference orders them; int8:
// * column scale) (+ bias) (+ residual)
void finish(const float* acc, float* y, int cols, float unscale, const float* row_scale, const float* col_scale,
            int64_t col_step, const float* bias, const float* res) {
  for (int c = 0; c < cols; ++c) {
    float v = (acc[c] + acc[PANEL + c]) * unscale;
    if (row_scale) v = v * row_scale[0] * col_scale[c * col_step];
    else if (col_scale) v = v * col_scale[c * col_step];
    if (bias) v += bias[c];
    if (res) v += res[c];
    y[c] = v;
  }
}

// One panel times ``rows`` rows of x, the two sums of each row left at acc ([rows][CHAINS][16]):
// the panel is walked once, a block of KBLOCK k at a time, and every row group (as even as
// possible: 8 rows as 4 + 4, not 6 + 2) uses the block while it is in L1; narrow weights are
// widened once per block, by the first group, for all.
template <class W>
void panel_times_rows(const float* x, int64_t ldx, const typename W::T* w, int64_t k_len, int64_t rows, float* acc) {
  alignas(32) float widened[KBLOCK * PANEL];
  const int64_t groups = (rows + ROWS - 1) / ROWS, per_group = (rows + groups - 1) / groups;
  // the first group of a block streams it from memory and asks for the lines ahead: the arithmetic
  // between loads would let the stream stall (measured with the weights of the embedded model
  // streamed from memory: 20 % at M = 3, 10-25 % at M = 8); one row (block_one) asks on its own
  const bool prefetch = per_group >= 2;
  const bool reuse = groups > 1 && !std::is_same<W, F32Weights>::value;
  std::fill(acc, acc + rows * CHAINS * PANEL, 0.0f);
  if (rows == 1) {  // one row: nothing to keep in L1, the panel in one sweep
    block_one<W>(x, w, 0, k_len, acc);
  } else {
    for (int64_t k0 = 0; k0 < k_len; k0 += KBLOCK) {
      const int64_t k1 = std::min<int64_t>(k_len, k0 + KBLOCK);
      for (int64_t g = 0; g < rows; g += per_group) {
        const int n = static_cast<int>(std::min<int64_t>(per_group, rows - g));
        if (!reuse)
          with_count<ROWS>(n, [&](auto r) {
            both_chains<decltype(r)::value, W>(x + g * ldx, ldx, w, k0, k1, acc + g * CHAINS * PANEL,
                                               prefetch && g == 0, nullptr);
          });
        else if (g == 0)
          with_count<ROWS>(n, [&](auto r) {
            both_chains<decltype(r)::value, W>(x, ldx, w, k0, k1, acc, prefetch, widened);
          });
        else  // the block's float32 copy, indexed from k0
          with_count<ROWS>(n, [&](auto r) {
            both_chains<decltype(r)::value, F32Weights>(x + g * ldx + k0, ldx, widened, 0, k1 - k0,
                                                        acc + g * CHAINS * PANEL, false, nullptr);
          });
      }
    }
  }
}

// The tasks of a GEMM over packed panels, and its epilogue: the panels split among the threads
// (enough panels per task that scheduling costs little, and a few tasks per thread), each panel
// times the rows of x MAX_ROWS at a time: ``rows_times_panel(p, r0, rows, acc)`` leaves the two
// sums of each of rows r0.. at acc ([rows][CHAINS][16]), which ``finish`` makes outputs.
template <class F>
void for_each_panel(int64_t m, int64_t panels, int64_t n, float* yp, int64_t ldy, const Scales& sc, const float* bp,
                    const float* rp, int64_t ldr, const F& rows_times_panel) {
  const int64_t grain = std::max<int64_t>(1, panels / (8 * at::get_num_threads()));
  at::parallel_for(0, panels, grain, [&](int64_t begin, int64_t end) {
    alignas(64) float acc[MAX_ROWS * CHAINS * PANEL];
    for (int64_t p = begin; p < end; ++p) {
      const int64_t c0 = p * PANEL;
      const int cols = static_cast<int>(std::min<int64_t>(PANEL, n - c0));
      for (int64_t r0 = 0; r0 < m; r0 += MAX_ROWS) {
        const int64_t rows = std::min<int64_t>(MAX_ROWS, m - r0);
        rows_times_panel(p, r0, rows, acc);
        for (int64_t r = r0; r < r0 + rows; ++r)
          finish(acc + (r - r0) * CHAINS * PANEL, yp + r * ldy + c0, cols, sc.unscale,
                 sc.row ? sc.row + r * sc.row_step : nullptr, sc.col ? sc.col + c0 * sc.col_step : nullptr,
                 sc.col_step, bp ? bp + c0 : nullptr, rp ? rp + r * ldr + c0 : nullptr);
      }
    }
  });
}

template <class W>
void run_panels(const float* xp, int64_t ldx, const typename W::T* wp, int64_t m, int64_t k_len, int64_t panels,
                int64_t n, float* yp, int64_t ldy, const Scales& sc, const float* bp, const float* rp, int64_t ldr) {
  for_each_panel(m, panels, n, yp, ldy, sc, bp, rp, ldr, [&](int64_t p, int64_t r0, int64_t rows, float* acc) {
    panel_times_rows<W>(xp + r0 * ldx, ldx, wp + p * k_len * PANEL, k_len, rows, acc);
  });
}

// ---- FP8 weights on CPUs with AVX-512 BF16 and VBMI (AMD Zen 4, Intel Sapphire Rapids): every
// e4m3 value, and every e4m3 activation value, is a bfloat16, so a bf16 dot product
// (vdpbf16ps: two products added to a float32 lane, each product exact) computes the same
// float32 sums as the widening FMA loop above, 32 products per instruction instead of 8. A
// byte becomes its bf16 by a 128-entry table lookup (vpermi2b) of its magnitude for each of the
// two bytes of the bf16, the sign copied in, and one interleave: five operations per 64 weights
// instead of seven per 16.
//
// The panels of this layout (cpu_gemm.py's QUAD_ORDER) hold groups of 4 k by 16 columns as 64
// bytes, ordered so that the interleave's two results are the pairs (k, k + 1) and (k + 2,
// k + 3) of the 16 columns: the dot products' operands as they are. Every output is two sums,
// over the pairs (4g, 4g + 1) and over the pairs (4g + 2, 4g + 3), each in increasing g, added
// at the end, whatever M is. Used where the CPU has the instructions and K is a multiple of 4
// (CHATAPP_CPU_ISA=avx2 turns it off); cpu_gemm.py packs accordingly.

// The bf16 bits of e4m3's magnitudes (0x7F, a NaN never stored, reads 480), by byte.
struct QuadTables {
  alignas(64) uint8_t lo[128];
  alignas(64) uint8_t hi[128];
  QuadTables() {
    for (int i = 0; i < 128; ++i) {
      const int e = i >> 3, f = i & 7;
      const float v = i == 0x7F ? 480.0f : e == 0 ? f / 512.0f : std::ldexp(1.0f + f / 8.0f, e - 7);
      uint32_t bits;
      std::memcpy(&bits, &v, 4);
      lo[i] = static_cast<uint8_t>(bits >> 16);
      hi[i] = static_cast<uint8_t>(bits >> 24);
    }
  }
};
const QuadTables quad_tables;

bool detect_quads() {
  const char* isa = std::getenv("CHATAPP_CPU_ISA");
  if (isa && std::strcmp(isa, "avx2") == 0) return false;
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("avx512bf16");
}
const bool quads_here = detect_quads();

constexpr int QUAD = 4;           // k per 64-byte group
constexpr int QROWS = 8;          // rows per group: 16 accumulators + 2 weights + 4 tables
constexpr int QPREFETCH = 2048;   // bytes ahead of the widening that the stream is asked for
// ... and into L2, further ahead: with only the near requests, the arithmetic of a few rows
// between loads lets the stream stall (the embedded model's FP8 layers, medians of three
// interleaved runs on Zen 4: a 9-token step 14.0 -> 12.5 ms, 3 tokens 7.1 -> 5.7 ms, one token
// 4.9 -> 4.3 ms)
constexpr int QPREFETCH_L2 = 8192;

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vbmi,avx512bf16")

struct Quads {
  __m512i lo0, lo1, hi0, hi1;
  Quads()
      : lo0(_mm512_load_si512(quad_tables.lo)), lo1(_mm512_load_si512(quad_tables.lo + 64)),
        hi0(_mm512_load_si512(quad_tables.hi)), hi1(_mm512_load_si512(quad_tables.hi + 64)) {}
  // 64 stored bytes -> the bf16 pairs (k, k + 1) and (k + 2, k + 3) of 16 columns
  inline void widen(const uint8_t* w, __m512i& a, __m512i& b) const {
    const __m512i v = _mm512_load_si512(w);
    const __m512i lo = _mm512_permutex2var_epi8(lo0, v, lo1);
    const __m512i hi = _mm512_ternarylogic_epi32(_mm512_permutex2var_epi8(hi0, v, hi1), v,
                                                 _mm512_set1_epi8(static_cast<char>(0x80)), 0xF8);  // | sign
    a = _mm512_unpacklo_epi8(lo, hi);
    b = _mm512_unpackhi_epi8(lo, hi);
  }
};

inline __m512 dot_pairs(__m512 acc, __m512i w, const uint16_t* x) {  // x: a pair of bf16
  uint32_t pair;
  std::memcpy(&pair, x, 4);
  return _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh>(w), reinterpret_cast<__m512bh>(_mm512_set1_epi32(pair)));
}

#define CHATAPP_QZERO(r)                                         \
  if constexpr (R > r) {                                         \
    e##r = _mm512_setzero_ps();                                  \
    o##r = _mm512_setzero_ps();                                  \
  }
#define CHATAPP_QROW(r)                                          \
  if constexpr (R > r) {                                         \
    e##r = dot_pairs(e##r, a, x + (r) * ldx + k);                \
    o##r = dot_pairs(o##r, b, x + (r) * ldx + k + 2);            \
  }
#define CHATAPP_QPARK(r)                                         \
  if constexpr (R > r) {                                         \
    _mm512_store_ps(acc + (r) * CHAINS * PANEL, e##r);           \
    _mm512_store_ps(acc + (r) * CHAINS * PANEL + PANEL, o##r);   \
  }

// R rows (x as bf16, [R][ldx]) times a whole panel of ``groups`` groups, each group widened in
// registers once for all R rows (a buffer of widened weights would cost more in stores and
// loads than the widening: measured on Zen 4), the two sums of each row parked at acc
// ([R][CHAINS][16]). ``prefetch``: the panel streams from memory (the first row group).
template <int R>
void quad_rows(const Quads& q, const uint16_t* x, int64_t ldx, const uint8_t* w, int64_t groups, float* acc,
               bool prefetch) {
  __m512 e0, o0, e1, o1, e2, o2, e3, o3, e4, o4, e5, o5, e6, o6, e7, o7;
  CHATAPP_QZERO(0) CHATAPP_QZERO(1) CHATAPP_QZERO(2) CHATAPP_QZERO(3)
  CHATAPP_QZERO(4) CHATAPP_QZERO(5) CHATAPP_QZERO(6) CHATAPP_QZERO(7)
  for (int64_t g = 0; g < groups; ++g) {
    // ask for the lines ahead (on into the next panel, which this task takes next)
    if (prefetch) {
      _mm_prefetch(reinterpret_cast<const char*>(w + g * 64) + QPREFETCH, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(w + g * 64) + QPREFETCH_L2, _MM_HINT_T1);
    }
    __m512i a, b;
    q.widen(w + g * 64, a, b);
    const int64_t k = g * QUAD;
    CHATAPP_QROW(0) CHATAPP_QROW(1) CHATAPP_QROW(2) CHATAPP_QROW(3)
    CHATAPP_QROW(4) CHATAPP_QROW(5) CHATAPP_QROW(6) CHATAPP_QROW(7)
  }
  CHATAPP_QPARK(0) CHATAPP_QPARK(1) CHATAPP_QPARK(2) CHATAPP_QPARK(3)
  CHATAPP_QPARK(4) CHATAPP_QPARK(5) CHATAPP_QPARK(6) CHATAPP_QPARK(7)
}


// Rows of x (float32 e4m3 values) as bf16 (their top halves, exact for them), [m][k].
void rows_to_bf16(const float* x, int64_t ldx, int64_t m, int64_t k, uint16_t* out) {
  for (int64_t r = 0; r < m; ++r) {
    const float* row = x + r * ldx;
    uint16_t* o = out + r * k;
    int64_t c = 0;
    for (; c + 16 <= k; c += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + c),
                          _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(_mm512_loadu_ps(row + c)), 16)));
    for (; c < k; ++c) {
      uint32_t bits;
      std::memcpy(&bits, row + c, 4);
      o[c] = static_cast<uint16_t>(bits >> 16);
    }
  }
}

void run_quads(const float* xp, int64_t ldx, const uint8_t* wp, int64_t m, int64_t k_len, int64_t panels, int64_t n,
               float* yp, int64_t ldy, const Scales& sc, const float* bp, const float* rp, int64_t ldr) {
  std::vector<uint16_t> xb(m * k_len);
  rows_to_bf16(xp, ldx, m, k_len, xb.data());
  const int64_t groups = k_len / QUAD;
  for_each_panel(m, panels, n, yp, ldy, sc, bp, rp, ldr, [&](int64_t p, int64_t r0, int64_t rows, float* acc) {
    const Quads q;
    const uint8_t* w = wp + p * k_len * PANEL;
    const uint16_t* x = xb.data() + r0 * k_len;
    // row groups as even as possible (9 rows as 5 + 4); the first streams the panel from memory,
    // the others read it from the cache
    const int64_t row_groups = (rows + QROWS - 1) / QROWS, per_group = (rows + row_groups - 1) / row_groups;
    for (int64_t r = 0; r < rows; r += per_group)
      with_count<QROWS>(std::min<int64_t>(per_group, rows - r), [&](auto n) {
        quad_rows<decltype(n)::value>(q, x + r * k_len, k_len, w, groups, acc + r * CHAINS * PANEL, r == 0);
      });
  });
}

#pragma GCC pop_options

// v (within +-448) rounded to the nearest e4m3 value, ties to even, as float32 (exact): normal
// values keep 3 of float32's 23 mantissa bits; below e4m3's smallest normal (2^-6) the step is
// 2^-9. The same rounding as PyTorch's float8_e4m3fn conversion and our Triton quantizer.
inline float round_to_e4m3(float v) {
  if (std::fabs(v) < 0.015625f) return std::nearbyint(v * 512.0f) * (1.0f / 512.0f);
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  bits = (bits + 0x7FFFFu + ((bits >> 20) & 1u)) & ~0xFFFFFu;
  std::memcpy(&v, &bits, 4);
  return v;
}

}  // namespace

void panel_gemm(const float* x, int64_t ldx, int64_t m, const at::Tensor& packed, int64_t n, float* y, int64_t ldy,
                Scales sc, const float* bias, const float* res, int64_t ldr) {
  const int64_t k_len = packed.size(1), panels = packed.size(0);
  const void* wp = packed.data_ptr();
  const auto wt = packed.scalar_type();
  if (wt == at::kFloat) {
    run_panels<F32Weights>(x, ldx, static_cast<const float*>(wp), m, k_len, panels, n, y, ldy, sc, bias, res, ldr);
  } else if (wt == at::kBFloat16) {
    run_panels<Bf16Weights>(x, ldx, static_cast<const uint16_t*>(wp), m, k_len, panels, n, y, ldy, sc, bias, res, ldr);
  } else if (wt == at::kChar) {
    run_panels<Int8Weights>(x, ldx, static_cast<const int8_t*>(wp), m, k_len, panels, n, y, ldy, sc, bias, res, ldr);
  } else if (quads_here && k_len % QUAD == 0) {
    run_quads(x, ldx, static_cast<const uint8_t*>(wp), m, k_len, panels, n, y, ldy, sc, bias, res, ldr);
  } else {
    sc.unscale = E4m3Weights::UNSCALE;
    run_panels<E4m3Weights>(x, ldx, static_cast<const uint8_t*>(wp), m, k_len, panels, n, y, ldy, sc, bias, res, ldr);
  }
}

// round_to_e4m3 on 8 lanes: the same two cases, chosen per lane.
inline __m256 round_to_e4m3(__m256 v) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256 small = _mm256_cmp_ps(_mm256_and_ps(v, abs_mask), _mm256_set1_ps(0.015625f), _CMP_LT_OQ);
  const __m256 sub = _mm256_mul_ps(
      _mm256_round_ps(_mm256_mul_ps(v, _mm256_set1_ps(512.0f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC),
      _mm256_set1_ps(1.0f / 512.0f));
  __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 20), _mm256_set1_epi32(1));
  bits = _mm256_add_epi32(bits, _mm256_add_epi32(_mm256_set1_epi32(0x7FFFF), odd));
  bits = _mm256_and_si256(bits, _mm256_set1_epi32(static_cast<int>(~0xFFFFFu)));
  return _mm256_blendv_ps(_mm256_castsi256_ps(bits), sub, small);
}

void quantize_rows_e4m3(const float* x, int64_t ldx, int64_t m, int64_t k, float* q, float* scale, const float* fixed) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  for (int64_t r = 0; r < m; ++r) {
    const float* row = x + r * ldx;
    float* out = q + r * k;
    float sc;
    if (fixed) {
      sc = fixed[0];
    } else {
      __m256 top = _mm256_setzero_ps();
      int64_t c = 0;
      for (; c + 8 <= k; c += 8) top = _mm256_max_ps(top, _mm256_and_ps(_mm256_loadu_ps(row + c), abs_mask));
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, top);
      float amax = 0.0f;
      for (float l : lanes) amax = std::max(amax, l);
      for (; c < k; ++c) amax = std::max(amax, std::fabs(row[c]));
      sc = std::max(amax, 1e-12f) / 448.0f;
      scale[r] = sc;
    }
    const __m256 vs = _mm256_set1_ps(sc), hi = _mm256_set1_ps(448.0f), lo = _mm256_set1_ps(-448.0f);
    int64_t c = 0;
    for (; c + 8 <= k; c += 8) {
      const __m256 v = _mm256_min_ps(hi, _mm256_max_ps(lo, _mm256_div_ps(_mm256_loadu_ps(row + c), vs)));
      _mm256_storeu_ps(out + c, round_to_e4m3(v));
    }
    for (; c < k; ++c) out[c] = round_to_e4m3(std::min(448.0f, std::max(-448.0f, row[c] / sc)));
  }
}

namespace {

// x [M, K] float32 (rows contiguous); packed [P, K, 16] float32, bfloat16, float8_e4m3fn or int8,
// n <= 16 P; bias [n] or undefined; residual [M, n] (rows contiguous) or undefined; for FP8
// weights row_scale [M] or [1] and col_scale [n] or [1] (float32), for int8 weights col_scale
// only. Returns y [M, n] float32.
at::Tensor small_gemm(const at::Tensor& x, const at::Tensor& packed, int64_t n, const c10::optional<at::Tensor>& bias,
                      const c10::optional<at::Tensor>& residual, const c10::optional<at::Tensor>& row_scale,
                      const c10::optional<at::Tensor>& col_scale) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.stride(1) == 1, "small_gemm: x must be [M, K] float32");
  const auto wt = packed.scalar_type();
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == PANEL && packed.is_contiguous() &&
                  (wt == at::kFloat || wt == at::kBFloat16 || wt == at::kFloat8_e4m3fn || wt == at::kChar) &&
                  packed.size(1) == x.size(1),
              "small_gemm: packed weight must be [P, K, 16] float32, bfloat16, float8_e4m3fn or int8 with K = x.size(1)");
  TORCH_CHECK(n > 0 && n <= packed.size(0) * PANEL && n > (packed.size(0) - 1) * PANEL, "small_gemm: bad n");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(packed.data_ptr()) % 32 == 0, "small_gemm: packed weight not aligned");
  const int64_t m = x.size(0);
  const float* bp = nullptr;
  const float* rp = nullptr;
  int64_t ldr = 0;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->is_contiguous() && bias->numel() == n && bias->scalar_type() == at::kFloat, "small_gemm: bad bias");
    bp = bias->data_ptr<float>();
  }
  if (residual.has_value() && residual->defined()) {
    TORCH_CHECK(residual->dim() == 2 && residual->size(0) == m && residual->size(1) == n && residual->stride(1) == 1 &&
                    residual->scalar_type() == at::kFloat, "small_gemm: bad residual");
    rp = residual->data_ptr<float>();
    ldr = residual->stride(0);
  }
  Scales sc;
  const bool rows_scaled = row_scale.has_value() && row_scale->defined();
  const bool cols_scaled = col_scale.has_value() && col_scale->defined();
  TORCH_CHECK(rows_scaled == (wt == at::kFloat8_e4m3fn) && cols_scaled == (wt == at::kFloat8_e4m3fn || wt == at::kChar),
              "small_gemm: FP8 weights take both scales, int8 weights the column scale, float weights none");
  if (rows_scaled) {
    TORCH_CHECK(row_scale->is_contiguous() && row_scale->scalar_type() == at::kFloat &&
                    (row_scale->numel() == m || row_scale->numel() == 1), "small_gemm: row_scale must be [M] or [1] float32");
    sc.row = row_scale->data_ptr<float>();
    sc.row_step = row_scale->numel() == 1 ? 0 : 1;
  }
  if (cols_scaled) {
    TORCH_CHECK(col_scale->is_contiguous() && col_scale->scalar_type() == at::kFloat &&
                    (col_scale->numel() == n || col_scale->numel() == 1), "small_gemm: col_scale must be [n] or [1] float32");
    sc.col = col_scale->data_ptr<float>();
    sc.col_step = col_scale->numel() == 1 ? 0 : 1;
  }
  at::Tensor y = at::empty({m, n}, x.options());
  panel_gemm(x.data_ptr<float>(), x.stride(0), m, packed, n, y.data_ptr<float>(), n, sc, bp, rp, ldr);
  return y;
}

// FP8 activations for small_gemm: x [M, K] float32 -> (e4m3 values as float32 [M, K], scale),
// the scale per row, max(|row|, 1e-12) / 448 ([M]), or the given static one ([1]); q =
// round(clamp(x / scale, +-448)), in the order of the PyTorch reference (kernels/fp8_quant.py),
// so both give the same values.
std::tuple<at::Tensor, at::Tensor> quantize_e4m3(const at::Tensor& x, const c10::optional<at::Tensor>& scale) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.stride(1) == 1, "quantize_e4m3: x must be [M, K] float32");
  const bool fixed = scale.has_value() && scale->defined();
  if (fixed)
    TORCH_CHECK(scale->numel() == 1 && scale->scalar_type() == at::kFloat, "quantize_e4m3: scale must be [1] float32");
  const int64_t m = x.size(0), k = x.size(1);
  at::Tensor q = at::empty({m, k}, x.options());
  at::Tensor s = fixed ? scale->reshape({1}).contiguous() : at::empty({m}, x.options());
  quantize_rows_e4m3(x.data_ptr<float>(), x.stride(0), m, k, q.data_ptr<float>(), s.data_ptr<float>(),
                     fixed ? s.data_ptr<float>() : nullptr);
  return {q, s};
}

}  // namespace
}  // namespace chatapp_kernels

TORCH_LIBRARY(chatapp_cpu, m) {
  m.def("small_gemm(Tensor x, Tensor packed, int n, Tensor? bias, Tensor? residual, Tensor? row_scale=None, "
        "Tensor? col_scale=None) -> Tensor");
  m.def("quantize_e4m3(Tensor x, Tensor? scale=None) -> (Tensor, Tensor)");
  // whether FP8 panels with K a multiple of 4 are in QUAD_ORDER here
  m.def("fp8_quads() -> bool", [] { return chatapp_kernels::quads_here; });
}

TORCH_LIBRARY_IMPL(chatapp_cpu, CPU, m) {
  m.impl("small_gemm", &chatapp_kernels::small_gemm);
  m.impl("quantize_e4m3", &chatapp_kernels::quantize_e4m3);
}
