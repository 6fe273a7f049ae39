// Llama decoder layers for a few tokens at a time on an x86 CPU (AVX2 + FMA), all in one call:
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
              "decoder_layers: bad ", what);
  return t->data_ptr<float>();
}

constexpr int64_t MAX_HEAD = 512;  // head size up to which RoPE rotates a head on the stack

// The sizes every layer shares.
struct Shape {
  int64_t t, h, d, heads, kv_heads, q_size, kv_size, qkv_n, inter;
};

// One layer's weights: its two norms and four projections, checked against the shape.
struct LayerWeights {
  const float* norm[2];
  Proj proj[4];
};

LayerWeights layer_weights(int64_t l, at::TensorList norms, at::TensorList packed,
                           const c10::List<c10::optional<at::Tensor>>& bias,
                           const c10::List<c10::optional<at::Tensor>>& col_scale,
                           const c10::List<c10::optional<at::Tensor>>& input_scale, const Shape& sh) {
  LayerWeights lw;
  for (int i = 0; i < 2; ++i) {
    const at::Tensor& n = norms[2 * l + i];
    TORCH_CHECK(n.scalar_type() == at::kFloat && n.is_contiguous() && n.numel() == sh.h,
                "decoder_layers: bad norm weight in layer ", l);
    lw.norm[i] = n.data_ptr<float>();
  }
  const int64_t in[4] = {sh.h, sh.q_size, sh.h, sh.inter}, out[4] = {sh.qkv_n, sh.h, 2 * sh.inter, sh.h};
  for (int i = 0; i < 4; ++i) {
    const int64_t j = 4 * l + i;
    const at::Tensor& p = packed[j];
    const auto wt = p.scalar_type();
    TORCH_CHECK(p.dim() == 3 && p.size(2) == 16 && p.is_contiguous() && p.size(1) == in[i] &&
                    p.size(0) == (out[i] + 15) / 16 &&
                    (wt == at::kFloat || wt == at::kBFloat16 || wt == at::kFloat8_e4m3fn) &&
                    reinterpret_cast<uintptr_t>(p.data_ptr()) % 32 == 0,
                "decoder_layers: linear layer ", i, " of layer ", l, " has panels of the wrong shape or type");
    Proj& pr = lw.proj[i];
    pr.packed = &p;
    pr.n = out[i];
    pr.bias = optional_floats(bias.get(j), out[i], "bias");
    pr.fp8 = wt == at::kFloat8_e4m3fn;
    const c10::optional<at::Tensor> cs = col_scale.get(j), is = input_scale.get(j);
    TORCH_CHECK(pr.fp8 == (cs.has_value() && cs->defined()), "decoder_layers: FP8 panels need their scales");
    if (pr.fp8) {
      pr.col = optional_floats(cs, -1, "col_scale");
      TORCH_CHECK(cs->numel() == out[i] || cs->numel() == 1, "decoder_layers: col_scale must be [n] or [1]");
      pr.col_step = cs->numel() == 1 ? 0 : 1;
      pr.input_scale = optional_floats(is, 1, "input_scale");
    }
  }
  return lw;
}

// What a layer works in, allocated once per call for all layers.
struct Scratch {
  std::vector<float> normed, qkv, attn, x1, gu, act, q, s;
  explicit Scratch(const Shape& sh)
      : normed(sh.t * sh.h), qkv(sh.t * sh.qkv_n), attn(sh.t * sh.q_size), x1(sh.t * sh.h),
        gu(sh.t * 2 * sh.inter), act(sh.t * sh.inter) {}
};

// One layer: x [t, h] -> y [t, h]; the t new keys and values go to slots start.. of this layer's
// caches kc, vc ([Hkv, L, D] with strides ks0/ks1, vs0/vs1).
void run_layer(const LayerWeights& lw, const Shape& sh, float eps, const float* xp, float* yp, float* kc,
               int64_t ks0, int64_t ks1, float* vc, int64_t vs0, int64_t vs1, int64_t start, const float* cp,
               const float* sp, const bool* visible, Scratch& sc) {
  const int64_t t = sh.t, h = sh.h, d = sh.d, heads = sh.heads, kv_heads = sh.kv_heads;
  const int64_t q_size = sh.q_size, kv_size = sh.kv_size, qkv_n = sh.qkv_n, inter = sh.inter;

  // attention input: norm, q|k|v, q and k heads rotated (x*cos + roll(x, D/2)*sin), k and v cached
  rms_norm_rows(xp, t, h, lw.norm[0], eps, sc.normed.data());
  project(lw.proj[0], sc.normed.data(), t, sc.qkv.data(), nullptr, sc.q, sc.s);
  const int64_t half = d / 2;
  float tmp[MAX_HEAD];
  for (int64_t i = 0; i < t; ++i) {
    float* row = sc.qkv.data() + i * qkv_n;
    const float* c = cp + i * d;
    const float* s = sp + i * d;
    for (int64_t hd = 0; hd < heads + kv_heads; ++hd) {
      float* v = row + hd * d;
      for (int64_t j = 0; j < d; ++j) tmp[j] = v[j] * c[j] + v[(j + half) % d] * s[j];
      std::copy(tmp, tmp + d, v);
    }
    for (int64_t g = 0; g < kv_heads; ++g) {
      std::copy(row + q_size + g * d, row + q_size + (g + 1) * d, kc + g * ks0 + (start + i) * ks1);
      std::copy(row + q_size + kv_size + g * d, row + q_size + kv_size + (g + 1) * d, vc + g * vs0 + (start + i) * vs1);
    }
  }

  // attention: one task per (token, query head); query head hi reads KV head g = hi / (heads /
  // kv_heads). The tasks go KV head by KV head (then token, then query head): the ones that read
  // the same keys and values run one after the other on a thread, which reads them from memory
  // once and from its cache for the others (a Medusa tree's tokens, the heads of a group)
  const int64_t groups = heads / kv_heads, rows = t * heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> w(start + t);
    std::vector<int64_t> slots(start + t);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t g = r / (t * groups), i = r % (t * groups) / groups, hi = g * groups + r % groups;
      // the slots it sees: every cached one, then the new ones its mask (or the causal order) allows
      int64_t count = 0;
      for (int64_t j = 0; j < start + t; ++j)
        if (j < start || (visible ? visible[i * t + j - start] : j - start <= i)) slots[count++] = j;
      attend(sc.qkv.data() + i * qkv_n + hi * d, SlotRows{kc + g * ks0, ks1, vc + g * vs0, vs1, slots.data()}, count, d,
             scale, w.data(), sc.attn.data() + i * q_size + hi * d);
    }
  });

  // x1 = x + o(attn); y = x1 + down(swiglu(gate_up(norm(x1))))
  project(lw.proj[1], sc.attn.data(), t, sc.x1.data(), xp, sc.q, sc.s);
  rms_norm_rows(sc.x1.data(), t, h, lw.norm[1], eps, sc.normed.data());
  project(lw.proj[2], sc.normed.data(), t, sc.gu.data(), nullptr, sc.q, sc.s);
  for (int64_t i = 0; i < t; ++i)
    swiglu(sc.gu.data() + i * 2 * inter, sc.gu.data() + i * 2 * inter + inter, inter, sc.act.data() + i * inter);
  project(lw.proj[3], sc.act.data(), t, yp, sc.x1.data(), sc.q, sc.s);
}

// L consecutive decoder layers in one call. x [T, H] float32 (contiguous). norms [2 L] = per
// layer (attn_norm [H], mlp_norm [H]); packed [4 L] = per layer the qkv, o, gate_up, down panels
// ([P, K, 16]); bias, col_scale, input_scale [4 L] each (none where a layer has none; col_scale
// for FP8 panels only, [n] or [1]; input_scale [1] or none for per-token activations). k_cache,
// v_cache [L, Hkv, Lmax, D] (innermost dimension contiguous): each layer's T new keys and values
// are written at slots start..start+T-1. cos, sin [T, D] (sin with its first half negated,
// engine/model/rope.py) of the tokens' positions. tree_mask [T, T] bool: which new slots each
// token sees (none: the causal order). Returns [T, H].
at::Tensor decoder_layers(const at::Tensor& x_in, at::TensorList norms, double eps, at::TensorList packed,
                          const c10::List<c10::optional<at::Tensor>>& bias,
                          const c10::List<c10::optional<at::Tensor>>& col_scale,
                          const c10::List<c10::optional<at::Tensor>>& input_scale, int64_t heads, int64_t kv_heads,
                          at::Tensor k_cache, at::Tensor v_cache, int64_t start, const at::Tensor& cos_in,
                          const at::Tensor& sin_in, const c10::optional<at::Tensor>& tree_mask) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat, "decoder_layers: x must be [T, H] float32");
  const int64_t layers = static_cast<int64_t>(packed.size()) / 4;
  TORCH_CHECK(layers >= 1 && static_cast<int64_t>(packed.size()) == 4 * layers &&
                  static_cast<int64_t>(norms.size()) == 2 * layers && static_cast<int64_t>(bias.size()) == 4 * layers &&
                  static_cast<int64_t>(col_scale.size()) == 4 * layers &&
                  static_cast<int64_t>(input_scale.size()) == 4 * layers,
              "decoder_layers: 2 norms and 4 linear layers per layer");
  const at::Tensor x = x_in.contiguous(), cos = cos_in.contiguous(), sin = sin_in.contiguous();
  Shape sh;
  sh.t = x.size(0);
  sh.h = x.size(1);
  sh.d = cos.size(1);
  sh.heads = heads;
  sh.kv_heads = kv_heads;
  TORCH_CHECK(heads > 0 && kv_heads > 0 && heads % kv_heads == 0 && sh.d % 2 == 0, "decoder_layers: bad head counts");
  TORCH_CHECK(sh.d <= MAX_HEAD, "decoder_layers: head size ", sh.d, " above ", MAX_HEAD);
  TORCH_CHECK(cos.dim() == 2 && cos.size(0) == sh.t && sin.sizes() == cos.sizes() &&
                  cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat,
              "decoder_layers: cos, sin must be [T, D] float32");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.size(0) == layers &&
                  k_cache.size(1) == kv_heads && k_cache.size(3) == sh.d && k_cache.stride(3) == 1 &&
                  v_cache.stride(3) == 1 && k_cache.scalar_type() == at::kFloat && v_cache.scalar_type() == at::kFloat,
              "decoder_layers: caches must be [L, Hkv, Lmax, D] float32");
  TORCH_CHECK(start >= 0 && start + sh.t <= k_cache.size(2), "decoder_layers: the tokens do not fit in the cache");
  const bool* visible = nullptr;
  if (tree_mask.has_value() && tree_mask->defined()) {
    TORCH_CHECK(tree_mask->scalar_type() == at::kBool && tree_mask->dim() == 2 && tree_mask->size(0) == sh.t &&
                    tree_mask->size(1) == sh.t && tree_mask->is_contiguous(),
                "decoder_layers: tree_mask must be [T, T] bool");
    visible = tree_mask->data_ptr<bool>();
  }
  sh.q_size = heads * sh.d;
  sh.kv_size = kv_heads * sh.d;
  sh.qkv_n = sh.q_size + 2 * sh.kv_size;
  sh.inter = packed[3].size(1);
  std::vector<LayerWeights> weights;
  for (int64_t l = 0; l < layers; ++l) weights.push_back(layer_weights(l, norms, packed, bias, col_scale, input_scale, sh));

  Scratch scratch(sh);
  at::Tensor y = at::empty({sh.t, sh.h}, x.options());
  std::vector<float> ping(sh.t * sh.h), pong(sh.t * sh.h);
  float* kc = k_cache.data_ptr<float>();
  float* vc = v_cache.data_ptr<float>();
  const float* in = x.data_ptr<float>();
  for (int64_t l = 0; l < layers; ++l) {
    float* out = l + 1 == layers ? y.data_ptr<float>() : (l % 2 ? pong.data() : ping.data());
    run_layer(weights[l], sh, static_cast<float>(eps), in, out, kc + l * k_cache.stride(0), k_cache.stride(1),
              k_cache.stride(2), vc + l * v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), start,
              cos.data_ptr<float>(), sin.data_ptr<float>(), visible, scratch);
    in = out;
  }
  return y;
}

}  // namespace
}  // namespace chatapp_kernels

TORCH_LIBRARY_FRAGMENT(chatapp_cpu, m) {
  m.def("decoder_layers(Tensor x, Tensor[] norms, float eps, Tensor[] packed, Tensor?[] bias, Tensor?[] col_scale, "
        "Tensor?[] input_scale, int heads, int kv_heads, Tensor(a!) k_cache, Tensor(b!) v_cache, int start, "
        "Tensor cos, Tensor sin, Tensor? tree_mask) -> Tensor");
}

TORCH_LIBRARY_IMPL(chatapp_cpu, CPU, m) {
  m.impl("decoder_layers", &chatapp_kernels::decoder_layers);
}
