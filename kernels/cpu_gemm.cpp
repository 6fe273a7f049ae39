// Small-M float32 GEMM for x86 CPUs with AVX2 + FMA: y[M, N] = x[M, K] @ W[K, N] (+ bias)
// (+ residual), for M from 1 to a few dozen rows: decoding (M = 1) and verifying a Medusa tree
// (M = its nodes). At these M the product is bound by reading W, so W is read once, in the
// order it is stored: packed as [N / 16][K][16] column panels, each panel streamed a block of
// k at a time, and every group of up to ROWS rows of x uses the block while it is in L1. The
// GEMM libraries' small-M paths read W several times over or use one core; this one costs
// about the same at M = 8 as at M = 1.
//
// Every output element is one sum over k in increasing order, whatever M is: a row's result
// does not depend on how many other rows were multiplied with it.

#include <immintrin.h>

#include <algorithm>

#include <ATen/Parallel.h>
#include <torch/library.h>
#include <ATen/ATen.h>

namespace {

constexpr int PANEL = 16;  // columns per panel: two AVX registers
constexpr int ROWS = 6;    // rows per group: 12 accumulators + 2 weights + 1 broadcast = 15 registers
constexpr int KBLOCK = 64;  // k per block: 4 KB of the panel, read from memory once and used by every row group
constexpr int PREFETCH = 32;  // panel lines (k) ahead that are asked for while the current ones are used
constexpr int MAX_ROWS = 64;  // rows whose accumulators are parked per task (more rows: another sweep of the panel)

// The accumulators are named variables, not an array: compilers keep them in registers then
// (with an array, GCC stores them to the stack at every k).
#define CHATAPP_LOAD(r)                                                                  \
  if constexpr (R > r) {                                                                 \
    a##r##0 = _mm256_load_ps(acc + (r) * PANEL);                                         \
    a##r##1 = _mm256_load_ps(acc + (r) * PANEL + 8);                                     \
  }
#define CHATAPP_ROW(r)                                              \
  if constexpr (R > r) {                                            \
    const __m256 xb = _mm256_broadcast_ss(x + (r) * ldx + k);       \
    a##r##0 = _mm256_fmadd_ps(xb, w0, a##r##0);                     \
    a##r##1 = _mm256_fmadd_ps(xb, w1, a##r##1);                     \
  }
#define CHATAPP_PARK(r)                                             \
  if constexpr (R > r) {                                            \
    _mm256_store_ps(acc + (r) * PANEL, a##r##0);                    \
    _mm256_store_ps(acc + (r) * PANEL + 8, a##r##1);                \
  }

// R rows times the panel's k in [k0, k1), added to the R rows of accumulators parked at acc
// ([R][16], 32-byte aligned). Each sum still runs over k in increasing order: parking a float
// in memory and loading it back changes nothing.
template <int R>
void block_rows(const float* x, int64_t ldx, const float* w, int64_t k0, int64_t k1, float* acc, bool prefetch) {
  __m256 a00, a01, a10, a11, a20, a21, a30, a31, a40, a41, a50, a51;
  CHATAPP_LOAD(0) CHATAPP_LOAD(1) CHATAPP_LOAD(2) CHATAPP_LOAD(3) CHATAPP_LOAD(4) CHATAPP_LOAD(5)
  for (int64_t k = k0; k < k1; ++k) {
    // the first row group of a block streams the panel from memory: keep lines on the way
    // (within the panel and on into the next, which the same task takes next; a prefetch past
    // the end of the weights is harmless)
    if (prefetch) _mm_prefetch(reinterpret_cast<const char*>(w + (k + PREFETCH) * PANEL), _MM_HINT_T0);
    const __m256 w0 = _mm256_load_ps(w + k * PANEL);
    const __m256 w1 = _mm256_load_ps(w + k * PANEL + 8);
    CHATAPP_ROW(0) CHATAPP_ROW(1) CHATAPP_ROW(2) CHATAPP_ROW(3) CHATAPP_ROW(4) CHATAPP_ROW(5)
  }
  CHATAPP_PARK(0) CHATAPP_PARK(1) CHATAPP_PARK(2) CHATAPP_PARK(3) CHATAPP_PARK(4) CHATAPP_PARK(5)
}

void rows_block(int rows, const float* x, int64_t ldx, const float* w, int64_t k0, int64_t k1, float* acc,
                bool prefetch) {
  switch (rows) {
    case 1: block_rows<1>(x, ldx, w, k0, k1, acc, prefetch); break;
    case 2: block_rows<2>(x, ldx, w, k0, k1, acc, prefetch); break;
    case 3: block_rows<3>(x, ldx, w, k0, k1, acc, prefetch); break;
    case 4: block_rows<4>(x, ldx, w, k0, k1, acc, prefetch); break;
    case 5: block_rows<5>(x, ldx, w, k0, k1, acc, prefetch); break;
    default: block_rows<6>(x, ldx, w, k0, k1, acc, prefetch); break;
  }
}

void finish(const float* acc, float* y, int cols, const float* bias, const float* res) {
  for (int c = 0; c < cols; ++c) {
    float v = acc[c];
    if (bias) v += bias[c];
    if (res) v += res[c];
    y[c] = v;
  }
}

// One panel times ``rows`` rows of x: the panel is walked once, a block of KBLOCK k at a
// time, and every row group (as even as possible: 8 rows as 4 + 4, not 6 + 2) uses the block
// while it is in L1.
void panel_times_rows(const float* x, int64_t ldx, const float* w, int64_t k_len, int64_t rows, float* acc,
                      float* y, int64_t ldy, int cols, const float* bias, const float* res, int64_t ldr) {
  const int64_t groups = (rows + ROWS - 1) / ROWS, per_group = (rows + groups - 1) / groups;
  // with one row the loop waits on memory anyway and the hardware prefetcher keeps up; with
  // more, the arithmetic between loads would let the stream stall (measured with the weights of
  // the embedded model streamed from memory: 20 % at M = 3, 10-25 % at M = 8)
  const bool prefetch = per_group >= 2;
  std::fill(acc, acc + rows * PANEL, 0.0f);
  for (int64_t k0 = 0; k0 < k_len; k0 += KBLOCK) {
    const int64_t k1 = std::min<int64_t>(k_len, k0 + KBLOCK);
    for (int64_t g = 0; g < rows; g += per_group) {
      const int n = static_cast<int>(std::min<int64_t>(per_group, rows - g));
      rows_block(n, x + g * ldx, ldx, w, k0, k1, acc + g * PANEL, prefetch && g == 0);
    }
  }
  for (int64_t r = 0; r < rows; ++r)
    finish(acc + r * PANEL, y + r * ldy, cols, bias, res ? res + r * ldr : nullptr);
}

// x [M, K] float32 (rows contiguous), packed [P, K, 16] float32, n <= 16 P; bias [n] or
// undefined; residual [M, n] (rows contiguous) or undefined. Returns y [M, n].
at::Tensor small_gemm(const at::Tensor& x, const at::Tensor& packed, int64_t n, const c10::optional<at::Tensor>& bias,
                      const c10::optional<at::Tensor>& residual) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.stride(1) == 1, "small_gemm: x must be [M, K] float32");
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == PANEL && packed.is_contiguous() &&
                  packed.scalar_type() == at::kFloat && packed.size(1) == x.size(1),
              "small_gemm: packed weight must be [P, K, 16] float32 with K = x.size(1)");
  TORCH_CHECK(n > 0 && n <= packed.size(0) * PANEL && n > (packed.size(0) - 1) * PANEL, "small_gemm: bad n");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(packed.data_ptr<float>()) % 32 == 0, "small_gemm: packed weight not aligned");
  const int64_t m = x.size(0), k_len = x.size(1), panels = packed.size(0);
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
  at::Tensor y = at::empty({m, n}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = packed.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t ldx = x.stride(0);
  // panels per task: enough work per task that scheduling costs little, and a few tasks per thread
  const int64_t grain = std::max<int64_t>(1, panels / (8 * at::get_num_threads()));
  at::parallel_for(0, panels, grain, [&](int64_t begin, int64_t end) {
    alignas(32) float acc[MAX_ROWS * PANEL];
    for (int64_t p = begin; p < end; ++p) {
      const int64_t c0 = p * PANEL;
      const int cols = static_cast<int>(std::min<int64_t>(PANEL, n - c0));
      const float* w = wp + p * k_len * PANEL;
      for (int64_t r0 = 0; r0 < m; r0 += MAX_ROWS) {
        const int64_t rows = std::min<int64_t>(MAX_ROWS, m - r0);
        panel_times_rows(xp + r0 * ldx, ldx, w, k_len, rows, acc, yp + r0 * n + c0, n, cols, bp ? bp + c0 : nullptr,
                         rp ? rp + r0 * ldr + c0 : nullptr, ldr);
      }
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(chatapp_cpu, m) {
  m.def("small_gemm(Tensor x, Tensor packed, int n, Tensor? bias, Tensor? residual) -> Tensor");
}

TORCH_LIBRARY_IMPL(chatapp_cpu, CPU, m) {
  m.impl("small_gemm", &small_gemm);
}
