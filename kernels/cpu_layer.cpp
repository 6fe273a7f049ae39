// One Llama decoder layer for a few tokens at a time on an x86 CPU (AVX2 + FMA), in one call:
// RMSNorm, the fused q|k|v projection, RoPE, the KV-cache write, grouped-query attention
// (causal, or under a Medusa tree's mask), the output projection and its residual, RMSNorm,
// gate|up, SwiGLU, the down projection and its residual. A decode step (1 token) or a tree's
// verify pass (a few dozen) is bound by reading the weights, plus, when each of these is its own
// PyTorch operation, by their dispatch: about 40 operations per layer, a large part of a step.
// Here the projections are the small-M GEMM of cpu_gemm.cpp over the same panels (float32,
// bfloat16 or FP8 weights; FP8 activations quantized per token or with a static scale, as
// Fp8Linear does), and everything between them is a loop over a few rows.
//
// Every row's result depends on that row's inputs (and on the keys and values it may see)
// only: a token gets the same hidden state in a one-token step as in a tree of many.

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_kernels.h"

namespace chatapp_kernels {
namespace {

// y[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w, for m rows of h.
void rms_norm_rows(const float* x, int64_t m, int64_t h, const float* w, float eps, float* y) {
  for (int64_t r = 0; r < m; ++r) {
    const float* xr = x + r * h;
    float* yr = y + r * h;
    double ss = 0.0;
    for (int64_t c = 0; c < h; ++c) ss += static_cast<double>(xr[c]) * xr[c];
    const float inv = 1.0f / std::sqrt(static_cast<float>(ss / static_cast<double>(h)) + eps);
    for (int64_t c = 0; c < h; ++c) yr[c] = xr[c] * inv * w[c];
  }
}

// out[i] = silu(gate[i]) * up[i] = gate[i] * sigmoid(gate[i]) * up[i], for n values.
void swiglu(const float* gate, const float* up, int64_t n, float* out) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 sign = _mm256_set1_ps(-0.0f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 g = _mm256_loadu_ps(gate + i);
    const __m256 e = exp_nonpositive(_mm256_or_ps(g, sign));  // e^-|g|
    const __m256 inv = _mm256_div_ps(one, _mm256_add_ps(one, e));
    const __m256 neg = _mm256_cmp_ps(g, _mm256_setzero_ps(), _CMP_LT_OQ);
    const __m256 sig = _mm256_blendv_ps(inv, _mm256_mul_ps(e, inv), neg);  // sigmoid(g), from the side that is exact
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(g, sig), _mm256_loadu_ps(up + i)));
  }
  for (; i < n; ++i) out[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
}

// One linear layer's weights and scales, as Fp8Linear / Linear hold them for the CPU kernel.
struct Proj {
  const at::Tensor* packed;
  int64_t n;
  const float* bias = nullptr;
  const float* col = nullptr;  // FP8: the weight scales, [n] (step 1) or [1] (step 0)
  int64_t col_step = 0;
  const float* input_scale = nullptr;  // FP8: a static activation scale; none: per token
  bool fp8 = false;
};

// y [m, n] = x [m, k] @ W (+ bias) (+ res [m, n]); FP8 weights quantize x first.
void project(const Proj& p, const float* x, int64_t m, float* y, const float* res, std::vector<float>& q,
             std::vector<float>& s) {
  const int64_t k = p.packed->size(1);
  Scales sc;
  if (p.fp8) {
    q.resize(m * k);
    s.resize(m);
    quantize_rows_e4m3(x, k, m, k, q.data(), s.data(), p.input_scale);
    sc.row = p.input_scale ? p.input_scale : s.data();
    sc.row_step = p.input_scale ? 0 : 1;
    sc.col = p.col;
    sc.col_step = p.col_step;
    x = q.data();
  }
  panel_gemm(x, k, m, *p.packed, p.n, y, p.n, sc, p.bias, res, p.n);
}

const float* optional_floats(const c10::optional<at::Tensor>& t, int64_t numel, const char* what) {
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && (t->numel() == numel || numel < 0),
              "decoder_layer: bad ", what);
  return t->data_ptr<float>();
}

// x [T, H] float32 (contiguous). norms [2] = (attn_norm [H], mlp_norm [H]); packed [4] = the
// qkv, o, gate_up, down panels ([P, K, 16]); bias, col_scale, input_scale [4] each (none where
// a layer has none; col_scale for FP8 panels only, [n] or [1]; input_scale [1] or none for
// per-token activations). k_cache, v_cache [Hkv, L, D] (this layer's, innermost dimension
// contiguous): the T new keys and values are written at slots start..start+T-1. cos, sin [T, D]
// (sin with its first half negated, engine/model/rope.py) of the tokens' positions. tree_mask
// [T, T] bool: which new slots each token sees (none: the causal order). Returns [T, H].
at::Tensor decoder_layer(const at::Tensor& x_in, at::TensorList norms, double eps, at::TensorList packed,
                         const c10::List<c10::optional<at::Tensor>>& bias,
                         const c10::List<c10::optional<at::Tensor>>& col_scale,
                         const c10::List<c10::optional<at::Tensor>>& input_scale, int64_t heads, int64_t kv_heads,
                         at::Tensor k_cache, at::Tensor v_cache, int64_t start, const at::Tensor& cos_in,
                         const at::Tensor& sin_in, const c10::optional<at::Tensor>& tree_mask) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat, "decoder_layer: x must be [T, H] float32");
  TORCH_CHECK(norms.size() == 2 && packed.size() == 4 && bias.size() == 4 && col_scale.size() == 4 &&
                  input_scale.size() == 4, "decoder_layer: 2 norms and 4 linear layers");
  const at::Tensor x = x_in.contiguous(), cos = cos_in.contiguous(), sin = sin_in.contiguous();
  const int64_t t = x.size(0), h = x.size(1), d = cos.size(1);
  TORCH_CHECK(heads > 0 && kv_heads > 0 && heads % kv_heads == 0 && d % 2 == 0, "decoder_layer: bad head counts");
  TORCH_CHECK(cos.dim() == 2 && cos.size(0) == t && sin.sizes() == cos.sizes() && cos.scalar_type() == at::kFloat &&
                  sin.scalar_type() == at::kFloat, "decoder_layer: cos, sin must be [T, D] float32");
  TORCH_CHECK(k_cache.dim() == 3 && k_cache.sizes() == v_cache.sizes() && k_cache.size(0) == kv_heads &&
                  k_cache.size(2) == d && k_cache.stride(2) == 1 && v_cache.stride(2) == 1 &&
                  k_cache.scalar_type() == at::kFloat && v_cache.scalar_type() == at::kFloat,
              "decoder_layer: caches must be [Hkv, L, D] float32");
  TORCH_CHECK(start >= 0 && start + t <= k_cache.size(1), "decoder_layer: the tokens do not fit in the cache");
  const bool* visible = nullptr;
  if (tree_mask.has_value() && tree_mask->defined()) {
    TORCH_CHECK(tree_mask->scalar_type() == at::kBool && tree_mask->dim() == 2 && tree_mask->size(0) == t &&
                    tree_mask->size(1) == t && tree_mask->is_contiguous(), "decoder_layer: tree_mask must be [T, T] bool");
    visible = tree_mask->data_ptr<bool>();
  }
  for (const auto& n : norms)
    TORCH_CHECK(n.scalar_type() == at::kFloat && n.is_contiguous() && n.numel() == h, "decoder_layer: bad norm weight");

  const int64_t q_size = heads * d, kv_size = kv_heads * d, qkv_n = q_size + 2 * kv_size;
  const int64_t inter = packed[3].size(1);
  const int64_t in[4] = {h, q_size, h, inter}, out[4] = {qkv_n, h, 2 * inter, h};
  Proj proj[4];
  for (int i = 0; i < 4; ++i) {
    const at::Tensor& p = packed[i];
    const auto wt = p.scalar_type();
    TORCH_CHECK(p.dim() == 3 && p.size(2) == 16 && p.is_contiguous() && p.size(1) == in[i] &&
                    p.size(0) == (out[i] + 15) / 16 &&
                    (wt == at::kFloat || wt == at::kBFloat16 || wt == at::kFloat8_e4m3fn) &&
                    reinterpret_cast<uintptr_t>(p.data_ptr()) % 32 == 0,
                "decoder_layer: linear layer ", i, " has panels of the wrong shape or type");
    proj[i].packed = &p;
    proj[i].n = out[i];
    proj[i].bias = optional_floats(bias.get(i), out[i], "bias");
    proj[i].fp8 = wt == at::kFloat8_e4m3fn;
    const c10::optional<at::Tensor> cs = col_scale.get(i), is = input_scale.get(i);
    TORCH_CHECK(proj[i].fp8 == (cs.has_value() && cs->defined()), "decoder_layer: FP8 panels need their scales");
    if (proj[i].fp8) {
      proj[i].col = optional_floats(cs, -1, "col_scale");
      TORCH_CHECK(cs->numel() == out[i] || cs->numel() == 1, "decoder_layer: col_scale must be [n] or [1]");
      proj[i].col_step = cs->numel() == 1 ? 0 : 1;
      proj[i].input_scale = optional_floats(is, 1, "input_scale");
    }
  }

  const float* xp = x.data_ptr<float>();
  std::vector<float> normed(t * h), qkv(t * qkv_n), attn(t * q_size), x1(t * h), gu(t * 2 * inter), act(t * inter);
  std::vector<float> qbuf, sbuf;
  const float epsf = static_cast<float>(eps);

  // attention input: norm, q|k|v, q and k heads rotated (x*cos + roll(x, D/2)*sin), k and v cached
  rms_norm_rows(xp, t, h, norms[0].data_ptr<float>(), epsf, normed.data());
  project(proj[0], normed.data(), t, qkv.data(), nullptr, qbuf, sbuf);
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  float* kc = k_cache.data_ptr<float>();
  float* vc = v_cache.data_ptr<float>();
  const int64_t ks0 = k_cache.stride(0), ks1 = k_cache.stride(1), vs0 = v_cache.stride(0), vs1 = v_cache.stride(1);
  const int64_t half = d / 2;
  std::vector<float> tmp(d);
  for (int64_t i = 0; i < t; ++i) {
    float* row = qkv.data() + i * qkv_n;
    const float* c = cp + i * d;
    const float* s = sp + i * d;
    for (int64_t hd = 0; hd < heads + kv_heads; ++hd) {
      float* v = row + hd * d;
      for (int64_t j = 0; j < d; ++j) tmp[j] = v[j] * c[j] + v[(j + half) % d] * s[j];
      std::copy(tmp.begin(), tmp.end(), v);
    }
    for (int64_t g = 0; g < kv_heads; ++g) {
      std::copy(row + q_size + g * d, row + q_size + (g + 1) * d, kc + g * ks0 + (start + i) * ks1);
      std::copy(row + q_size + kv_size + g * d, row + q_size + kv_size + (g + 1) * d, vc + g * vs0 + (start + i) * vs1);
    }
  }

  // attention: one task per (token, query head); query head hi reads KV head hi / (heads / kv_heads)
  const int64_t groups = heads / kv_heads, rows = t * heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> w;
    std::vector<int64_t> slots;
    std::vector<float> acc(d);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t i = r / heads, hi = r % heads, g = hi / groups;
      const float* qrow = qkv.data() + i * qkv_n + hi * d;
      const float* keys = kc + g * ks0;
      const float* values = vc + g * vs0;
      slots.clear();
      for (int64_t sl = 0; sl < start; ++sl) slots.push_back(sl);
      for (int64_t j = 0; j < t; ++j)
        if (visible ? visible[i * t + j] : j <= i) slots.push_back(start + j);
      const int64_t count = static_cast<int64_t>(slots.size());
      w.resize(count);
      float top = -INFINITY;
      for (int64_t sI = 0; sI < count; ++sI) {
        w[sI] = dot(qrow, keys + slots[sI] * ks1, d) * scale;
        top = std::max(top, w[sI]);
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      const float total = count ? exp_shifted(w.data(), count, top) : 0.0f;
      for (int64_t sI = 0; sI < count; ++sI) axpy(w[sI], values + slots[sI] * vs1, acc.data(), d);
      const float inv = total > 0.0f ? 1.0f / total : 0.0f;
      float* orow = attn.data() + i * q_size + hi * d;
      for (int64_t c = 0; c < d; ++c) orow[c] = acc[c] * inv;
    }
  });

  // x1 = x + o(attn); out = x1 + down(swiglu(gate_up(norm(x1))))
  project(proj[1], attn.data(), t, x1.data(), xp, qbuf, sbuf);
  rms_norm_rows(x1.data(), t, h, norms[1].data_ptr<float>(), epsf, normed.data());
  project(proj[2], normed.data(), t, gu.data(), nullptr, qbuf, sbuf);
  for (int64_t i = 0; i < t; ++i)
    swiglu(gu.data() + i * 2 * inter, gu.data() + i * 2 * inter + inter, inter, act.data() + i * inter);
  at::Tensor y = at::empty({t, h}, x.options());
  project(proj[3], act.data(), t, y.data_ptr<float>(), x1.data(), qbuf, sbuf);
  return y;
}

}  // namespace
}  // namespace chatapp_kernels

TORCH_LIBRARY_FRAGMENT(chatapp_cpu, m) {
  m.def("decoder_layer(Tensor x, Tensor[] norms, float eps, Tensor[] packed, Tensor?[] bias, Tensor?[] col_scale, "
        "Tensor?[] input_scale, int heads, int kv_heads, Tensor(a!) k_cache, Tensor(b!) v_cache, int start, "
        "Tensor cos, Tensor sin, Tensor? tree_mask) -> Tensor");
}

TORCH_LIBRARY_IMPL(chatapp_cpu, CPU, m) {
  m.impl("decoder_layer", &chatapp_kernels::decoder_layer);
}
