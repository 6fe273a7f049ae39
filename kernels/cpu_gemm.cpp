// Small-M float32 GEMM for x86 CPUs with AVX2 + FMA: y[M, N] = x[M, K] @ W[K, N] (+ bias)
// (+ residual), for M from 1 to a few dozen rows: decoding (M = 1) and verifying a Medusa tree
// (M = its nodes). At these M the product is bound by reading W, so W is read once, in the
// order it is stored: packed as [N / 16][K][16] column panels, each panel streamed while up
// to ROWS rows of x (from L1) are multiplied with it. The GEMM libraries' small-M paths read
// W several times over or use one core; this one costs about the same at M = 8 as at M = 1.
//
// Every output element is one sum over k in increasing order, whatever M is: a row's result
// does not depend on how many other rows were multiplied with it.

#include <immintrin.h>

#include <ATen/Parallel.h>
#include <torch/library.h>
#include <ATen/ATen.h>

namespace {

constexpr int PANEL = 16;  // columns per panel: two AVX registers
constexpr int ROWS = 6;    // rows per pass: 12 accumulators + 2 weights + 1 broadcast = 15 registers

// The accumulators are named variables, not an array: compilers keep them in registers then
// (with an array, GCC stores them to the stack at every k).
#define CHATAPP_ROW(r)                                              \
  if constexpr (R > r) {                                            \
    const __m256 xb = _mm256_broadcast_ss(x + (r) * ldx + k);       \
    a##r##0 = _mm256_fmadd_ps(xb, w0, a##r##0);                     \
    a##r##1 = _mm256_fmadd_ps(xb, w1, a##r##1);                     \
  }
#define CHATAPP_STORE(r)                                            \
  if constexpr (R > r) {                                            \
    _mm256_store_ps(out, a##r##0);                                  \
    _mm256_store_ps(out + 8, a##r##1);                              \
    finish(out, y + (r) * ldy, cols, bias, res ? res + (r) * ldr : nullptr); \
  }

inline void finish(const float* out, float* y, int cols, const float* bias, const float* res) {
  for (int c = 0; c < cols; ++c) {
    float v = out[c];
    if (bias) v += bias[c];
    if (res) v += res[c];
    y[c] = v;
  }
}

template <int R>
void panel_rows(const float* x, int64_t ldx, const float* w, int64_t k_len, float* y, int64_t ldy, int cols,
                const float* bias, const float* res, int64_t ldr) {
  __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00, a30 = a00, a31 = a00,
         a40 = a00, a41 = a00, a50 = a00, a51 = a00;
  for (int64_t k = 0; k < k_len; ++k) {
    const __m256 w0 = _mm256_load_ps(w + k * PANEL);
    const __m256 w1 = _mm256_load_ps(w + k * PANEL + 8);
    CHATAPP_ROW(0) CHATAPP_ROW(1) CHATAPP_ROW(2) CHATAPP_ROW(3) CHATAPP_ROW(4) CHATAPP_ROW(5)
  }
  alignas(32) float out[PANEL];
  CHATAPP_STORE(0) CHATAPP_STORE(1) CHATAPP_STORE(2) CHATAPP_STORE(3) CHATAPP_STORE(4) CHATAPP_STORE(5)
}

void rows_block(int rows, const float* x, int64_t ldx, const float* w, int64_t k_len, float* y, int64_t ldy,
                int cols, const float* bias, const float* res, int64_t ldr) {
  switch (rows) {
    case 1: panel_rows<1>(x, ldx, w, k_len, y, ldy, cols, bias, res, ldr); break;
    case 2: panel_rows<2>(x, ldx, w, k_len, y, ldy, cols, bias, res, ldr); break;
    case 3: panel_rows<3>(x, ldx, w, k_len, y, ldy, cols, bias, res, ldr); break;
    case 4: panel_rows<4>(x, ldx, w, k_len, y, ldy, cols, bias, res, ldr); break;
    case 5: panel_rows<5>(x, ldx, w, k_len, y, ldy, cols, bias, res, ldr); break;
    default: panel_rows<6>(x, ldx, w, k_len, y, ldy, cols, bias, res, ldr); break;
  }
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
  // rows per pass over a panel: as even as possible (8 rows as 4 + 4, not 6 + 2)
  const int64_t passes = (m + ROWS - 1) / ROWS, per_pass = (m + passes - 1) / passes;
  // panels per task: enough work per task that scheduling costs little, and a few tasks per thread
  const int64_t grain = std::max<int64_t>(1, panels / (8 * at::get_num_threads()));
  at::parallel_for(0, panels, grain, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t c0 = p * PANEL;
      const int cols = static_cast<int>(std::min<int64_t>(PANEL, n - c0));
      const float* w = wp + p * k_len * PANEL;
      for (int64_t r0 = 0; r0 < m; r0 += per_pass) {
        const int rows = static_cast<int>(std::min<int64_t>(per_pass, m - r0));
        rows_block(rows, xp + r0 * ldx, ldx, w, k_len, yp + r0 * n + c0, n, cols, bp ? bp + c0 : nullptr,
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
