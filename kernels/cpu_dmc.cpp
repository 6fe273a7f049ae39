// DMC kernels for x86 CPUs with AVX2 + FMA, for few tokens at a time: a decode step and the
// verification of a Medusa tree over a DMC cache (engine/decoding/dmc.py). At these sizes the
// cost of PyTorch's path is not the arithmetic but the dozens of operations it takes per layer;
// here each is one call.
//
// dmc_tree_attention: M queries q [B, H, M, D] attend to the first n_cached[b, h] slots of KV
// head h's pages (all visible) and to the N new slots k_new, v_new [B, Hkv, N, D] that visible
// [B, Hkv, M, N] allows; query head h reads KV head h / (H / Hkv). One task per query row,
// reading the pages in place: the scores of every visible slot (fp32 dot products in 8 lanes),
// their max, the exponentials and their sum, then the weighted sum of the values.
//
// dmc_update: one token's DMC cache update for one layer (the decode step's), in place.
//
// dmc_tree_slots: one layer's DMC slots of a tree's N nodes, each as token-by-token decoding of
// its root-to-node path would make it (what DMCForward.tree_hidden computes with PyTorch
// operations; see there and kernels/dmc.py for the rules).

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_kernels.h"

namespace {

using namespace chatapp_kernels;

// A token's importance weight from the sum of its KV head's query-head q[D-1]: the sigmoid of
// their mean plus init_val, plus 2**-7.
inline float importance_weight(float qsum, int64_t groups, float init) {
  return 1.0f / (1.0f + std::exp(-(qsum / static_cast<float>(groups) + init))) + 0.0078125f;
}

// Returns out [B, H, M, D], laid out as [B, M, H, D] in memory (the order the output
// projection reads it in).
at::Tensor dmc_tree_attention(const at::Tensor& q_in, const at::Tensor& k_new_in, const at::Tensor& v_new_in,
                              const at::Tensor& visible, const at::Tensor& k_pages_in, const at::Tensor& v_pages_in,
                              const at::Tensor& block_table_in, const at::Tensor& n_cached_in, double scale) {
  TORCH_CHECK(q_in.dim() == 4 && q_in.scalar_type() == at::kFloat, "dmc_tree_attention: q must be [B, H, M, D] float32");
  TORCH_CHECK(k_new_in.dim() == 4 && k_new_in.sizes() == v_new_in.sizes() && k_new_in.scalar_type() == at::kFloat &&
                  v_new_in.scalar_type() == at::kFloat, "dmc_tree_attention: k_new, v_new must be [B, Hkv, N, D] float32");
  TORCH_CHECK(k_pages_in.dim() == 3 && k_pages_in.sizes() == v_pages_in.sizes() &&
                  k_pages_in.scalar_type() == at::kFloat && v_pages_in.scalar_type() == at::kFloat,
              "dmc_tree_attention: pages must be [num_pages, P, D] float32");
  const int64_t b = q_in.size(0), h = q_in.size(1), m = q_in.size(2), d = q_in.size(3);
  const int64_t hkv = k_new_in.size(1), n = k_new_in.size(2), page = k_pages_in.size(1);
  TORCH_CHECK(k_new_in.size(0) == b && k_new_in.size(3) == d && k_pages_in.size(2) == d && hkv > 0 && h % hkv == 0,
              "dmc_tree_attention: shapes do not fit");
  TORCH_CHECK(visible.scalar_type() == at::kBool && visible.dim() == 4 && visible.size(0) == b &&
                  visible.size(1) == hkv && visible.size(2) == m && visible.size(3) == n,
              "dmc_tree_attention: visible must be [B, Hkv, M, N] bool");
  TORCH_CHECK(block_table_in.dim() == 3 && block_table_in.size(0) == b && block_table_in.size(1) == hkv &&
                  n_cached_in.dim() == 2 && n_cached_in.size(0) == b && n_cached_in.size(1) == hkv,
              "dmc_tree_attention: block_table [B, Hkv, max_pages], n_cached [B, Hkv]");
  // the innermost dimension contiguous (a copy where it is not); any other strides
  const at::Tensor q = inner_contiguous(q_in), k_new = inner_contiguous(k_new_in), v_new = inner_contiguous(v_new_in);
  const at::Tensor k_pages = k_pages_in.contiguous(), v_pages = v_pages_in.contiguous();
  const at::Tensor table = block_table_in.to(at::kInt), n_cached = n_cached_in.to(at::kInt);
  const int64_t groups = h / hkv;
  const int64_t max_pages = table.size(2);

  at::Tensor out = at::empty({b, m, h, d}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* knp = k_new.data_ptr<float>();
  const float* vnp = v_new.data_ptr<float>();
  const float* kpp = k_pages.data_ptr<float>();
  const float* vpp = v_pages.data_ptr<float>();
  const bool* visp = visible.data_ptr<bool>();
  const int32_t* tp = table.data_ptr<int32_t>();
  const int32_t* ncp = n_cached.data_ptr<int32_t>();
  float* op = out.data_ptr<float>();
  const auto qs = q.strides(), ks = k_new.strides(), vs = v_new.strides(), ms = visible.strides();
  const auto ts = table.strides(), cs = n_cached.strides();
  const float sc = static_cast<float>(scale);

  for (int64_t r = 0; r < b * hkv; ++r) {  // counts within the table and the pool: checked before any reading
    const int64_t bi = r / hkv, kv = r % hkv;
    const int64_t len = ncp[bi * cs[0] + kv * cs[1]];
    TORCH_CHECK(len >= 0 && len <= max_pages * page, "dmc_tree_attention: n_cached beyond the block table");
    for (int64_t p = 0; p < (len + page - 1) / page; ++p) {
      const int64_t pg = tp[bi * ts[0] + kv * ts[1] + p * ts[2]];
      TORCH_CHECK(pg >= 0 && pg < k_pages.size(0), "dmc_tree_attention: a cached slot's page is not in the pool");
    }
  }

  const int64_t rows = b * h * m;
  at::parallel_for(0, rows, std::max<int64_t>(1, rows / (2 * at::get_num_threads())), [&](int64_t begin, int64_t end) {
    std::vector<float> weight;  // per visible slot: its score, then its e^(score - max)
    std::vector<const float*> keys, values;
    for (int64_t row = begin; row < end; ++row) {
      const int64_t bi = row / (h * m), hi = (row / m) % h, i = row % m;
      const int64_t kv = hi / groups;
      const float* qrow = qp + bi * qs[0] + hi * qs[1] + i * qs[2];
      const int64_t len = ncp[bi * cs[0] + kv * cs[1]];
      const int32_t* pages = tp + bi * ts[0] + kv * ts[1];
      const bool* seen = visp + bi * ms[0] + kv * ms[1] + i * ms[2];
      keys.clear();
      values.clear();
      for (int64_t s = 0; s < len; ++s) {
        const int64_t at = (static_cast<int64_t>(pages[(s / page) * ts[2]]) * page + s % page) * d;
        keys.push_back(kpp + at);
        values.push_back(vpp + at);
      }
      for (int64_t j = 0; j < n; ++j) {
        if (seen[j * ms[3]]) {
          keys.push_back(knp + bi * ks[0] + kv * ks[1] + j * ks[2]);
          values.push_back(vnp + bi * vs[0] + kv * vs[1] + j * vs[2]);
        }
      }
      const int64_t count = static_cast<int64_t>(keys.size());
      weight.resize(count);
      // no visible slot: zeros (callers give each query one)
      attend(qrow, SlotPointers{keys.data(), values.data()}, count, d, sc, weight.data(),
             op + ((bi * m + i) * h + hi) * d);
    }
  });
  return out.transpose(1, 2);
}

// One token's DMC update for one layer, in place (kernels/dmc.py's dmc_update_reference, whose
// arithmetic it follows operation for operation): q [B, H, D], k, v [B, Hkv, D] float32 (any
// strides but the last); the state ksum, vsum [B, Hkv, D], wsum [B, Hkv], win_k, win_v
// [W, B, Hkv, D], win_w [W, B, Hkv] float32 and run, lens [B, Hkv] int32, all contiguous.
// Returns k_slot, v_slot [B, Hkv, D] (pre-RoPE) and slot [B, Hkv] int32.
std::vector<at::Tensor> dmc_update(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                   at::Tensor ksum, at::Tensor vsum, at::Tensor wsum, at::Tensor win_k,
                                   at::Tensor win_v, at::Tensor win_w, at::Tensor run, at::Tensor lens, int64_t ptr,
                                   bool first, double init_val, int64_t window) {
  TORCH_CHECK(q_in.dim() == 3 && k_in.dim() == 3 && k_in.sizes() == v_in.sizes() &&
                  q_in.scalar_type() == at::kFloat && k_in.scalar_type() == at::kFloat &&
                  v_in.scalar_type() == at::kFloat,
              "dmc_update: q [B, H, D], k, v [B, Hkv, D] float32");
  const at::Tensor q = inner_contiguous(q_in), k = inner_contiguous(k_in), v = inner_contiguous(v_in);
  const int64_t b = q.size(0), h = q.size(1), d = q.size(2), hkv = k.size(1);
  TORCH_CHECK(k.size(0) == b && k.size(2) == d && h % hkv == 0, "dmc_update: q does not fit k");
  for (const at::Tensor* t : {&ksum, &vsum, &wsum, &win_k, &win_v, &win_w})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous(), "dmc_update: sums and window: contiguous float32");
  for (const at::Tensor* t : {&run, &lens})
    TORCH_CHECK(t->scalar_type() == at::kInt && t->is_contiguous() && t->numel() == b * hkv,
                "dmc_update: run, lens: [B, Hkv] int32");
  TORCH_CHECK(ksum.numel() == b * hkv * d && vsum.numel() == b * hkv * d && wsum.numel() == b * hkv &&
                  win_k.numel() == window * b * hkv * d && win_v.numel() == win_k.numel() &&
                  win_w.numel() == window * b * hkv && ptr >= 0 && ptr < window,
              "dmc_update: state shapes do not fit k");
  at::Tensor k_slot = at::empty({b, hkv, d}, k.options()), v_slot = at::empty({b, hkv, d}, v.options());
  at::Tensor slot = at::empty({b, hkv}, lens.options());
  const int64_t groups = h / hkv;
  const float init = static_cast<float>(init_val);
  float* ks = ksum.data_ptr<float>();
  float* vs = vsum.data_ptr<float>();
  float* ws = wsum.data_ptr<float>();
  float* wk = win_k.data_ptr<float>() + ptr * b * hkv * d;
  float* wv = win_v.data_ptr<float>() + ptr * b * hkv * d;
  float* ww = win_w.data_ptr<float>() + ptr * b * hkv;
  int32_t* rn = run.data_ptr<int32_t>();
  int32_t* ln = lens.data_ptr<int32_t>();
  for (int64_t bi = 0; bi < b; ++bi) {
    for (int64_t kv = 0; kv < hkv; ++kv) {
      const int64_t r = bi * hkv + kv;
      const float* kr = k.data_ptr<float>() + bi * k.stride(0) + kv * k.stride(1);
      const float* vr = v.data_ptr<float>() + bi * v.stride(0) + kv * v.stride(1);
      const bool merge = kr[d - 1] > init && !first;
      float qsum = 0.0f;
      for (int64_t g = 0; g < groups; ++g)
        qsum += q.data_ptr<float>()[bi * q.stride(0) + (kv * groups + g) * q.stride(1) + (d - 1)];
      const float w = importance_weight(qsum, groups, init);
      rn[r] = merge ? rn[r] + 1 : 1;
      const float keep = merge ? 1.0f : 0.0f, drop = rn[r] > window ? 1.0f : 0.0f;
      float* ksr = ks + r * d;
      float* vsr = vs + r * d;
      for (int64_t j = 0; j < d; ++j) {
        const float kw = (j == d - 1 ? 0.0f : kr[j]) * w, vw = vr[j] * w;
        ksr[j] = ksr[j] * keep - drop * wk[r * d + j] + kw;
        vsr[j] = vsr[j] * keep - drop * wv[r * d + j] + vw;
        wk[r * d + j] = kw;
        wv[r * d + j] = vw;
      }
      ws[r] = ws[r] * keep - drop * ww[r] + w;
      ww[r] = w;
      slot.data_ptr<int32_t>()[r] = ln[r] - (merge ? 1 : 0);
      ln[r] = slot.data_ptr<int32_t>()[r] + 1;
      float* kso = k_slot.data_ptr<float>() + r * d;
      float* vso = v_slot.data_ptr<float>() + r * d;
      for (int64_t j = 0; j < d; ++j) {
        kso[j] = ksr[j] / ws[r];
        vso[j] = vsr[j] / ws[r];
      }
    }
  }
  return {k_slot, v_slot, slot};
}

// The DMC slots of a tree's N nodes for one layer. qkv [N, H + 2 Hkv, D] float32 (the layer's
// unrotated q | k | v heads per node); cos, sin [N, D] (RoPE at each node's position, the sin
// table signed for rotate-half as a roll by D/2); parents [N] (-1: the root; a parent before
// its children), depth [N]; the layer's window buffer win_k, win_v [W, Hkv, D], win_w [W, Hkv]
// (the weighted keys, values and weights of the last W tokens, at position % W) and open-run
// lengths run [Hkv]; start: the tokens the cache holds (the root's position).
//
// Returns (qk [N, H + Hkv, D]: the rotated queries and slot keys, dim D-1 zeroed; v_slot
// [N, Hkv, D]; merge [N, Hkv] bool; visible [Hkv, N, N] bool: node i sees node j's slot; feat
// [N, Hkv, 2D + 1]: [k w (dim D-1 zeroed) | v w | w]; sums [N, Hkv, 2D + 1]: feat summed over
// the node's slot window; run_start [N, Hkv] int64: the position the node's merge run began).
std::vector<at::Tensor> dmc_tree_slots(const at::Tensor& qkv_in, const at::Tensor& cos_in, const at::Tensor& sin_in,
                                       const at::Tensor& parents_in, const at::Tensor& depth_in,
                                       const at::Tensor& win_k_in, const at::Tensor& win_v_in,
                                       const at::Tensor& win_w_in, const at::Tensor& run_in, int64_t start,
                                       double init_val, int64_t heads) {
  TORCH_CHECK(qkv_in.dim() == 3 && qkv_in.scalar_type() == at::kFloat, "dmc_tree_slots: qkv must be [N, H + 2 Hkv, D] float32");
  const at::Tensor qkv = qkv_in.contiguous(), cosv = cos_in.contiguous(), sinv = sin_in.contiguous();
  const at::Tensor parents = parents_in.to(at::kLong).contiguous(), depth = depth_in.to(at::kLong).contiguous();
  const at::Tensor win_k = win_k_in.contiguous(), win_v = win_v_in.contiguous(), win_w = win_w_in.contiguous();
  const at::Tensor run = run_in.to(at::kLong).contiguous();
  const int64_t n = qkv.size(0), d = qkv.size(2), h = heads, hkv = (qkv.size(1) - heads) / 2;
  const int64_t window = win_k.size(0), f = 2 * d + 1;
  TORCH_CHECK(h > 0 && hkv > 0 && h % hkv == 0 && qkv.size(1) == h + 2 * hkv && d % 2 == 0,
              "dmc_tree_slots: qkv's heads do not split into H queries and Hkv keys and values");
  TORCH_CHECK(cosv.sizes() == at::IntArrayRef({n, d}) && sinv.sizes() == cosv.sizes() &&
                  cosv.scalar_type() == at::kFloat && sinv.scalar_type() == at::kFloat,
              "dmc_tree_slots: cos, sin must be [N, D] float32");
  TORCH_CHECK(parents.numel() == n && depth.numel() == n, "dmc_tree_slots: parents, depth must be [N]");
  TORCH_CHECK(win_k.dim() == 3 && win_k.sizes() == win_v.sizes() && win_k.size(1) == hkv && win_k.size(2) == d &&
                  win_w.dim() == 2 && win_w.size(0) == window && win_w.size(1) == hkv && run.numel() == hkv &&
                  win_k.scalar_type() == at::kFloat && win_v.scalar_type() == at::kFloat &&
                  win_w.scalar_type() == at::kFloat,
              "dmc_tree_slots: win_k, win_v [W, Hkv, D], win_w [W, Hkv] float32, run [Hkv]");
  const int64_t* par = parents.data_ptr<int64_t>();
  const int64_t* dep = depth.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(par[i] < i && (i == 0) == (par[i] < 0) && dep[i] == (i ? dep[par[i]] + 1 : 0),
                "dmc_tree_slots: parents and depth are not a tree rooted at node 0 with parents first");
  TORCH_CHECK(d <= 1024, "dmc_tree_slots: head dim above 1024");
  const int64_t groups = h / hkv, half = d / 2;
  const int64_t back = std::min<int64_t>(start, window - 1);  // cached tokens a window can reach

  auto opts = qkv.options();
  at::Tensor qk = at::empty({n, h + hkv, d}, opts), v_slot = at::empty({n, hkv, d}, opts);
  at::Tensor merge = at::empty({n, hkv}, opts.dtype(at::kBool));
  at::Tensor visible = at::zeros({hkv, n, n}, opts.dtype(at::kBool));
  at::Tensor feat = at::empty({n, hkv, f}, opts), sums = at::zeros({n, hkv, f}, opts);
  at::Tensor run_start = at::empty({n, hkv}, opts.dtype(at::kLong));
  const float* x = qkv.data_ptr<float>();
  const float* cp = cosv.data_ptr<float>();
  const float* sp = sinv.data_ptr<float>();
  const float* wk = win_k.data_ptr<float>();
  const float* wv = win_v.data_ptr<float>();
  const float* ww = win_w.data_ptr<float>();
  const int64_t* rn = run.data_ptr<int64_t>();
  float* qkp = qk.data_ptr<float>();
  float* vsp = v_slot.data_ptr<float>();
  bool* mp = merge.data_ptr<bool>();
  bool* visp = visible.data_ptr<bool>();
  float* fp = feat.data_ptr<float>();
  float* sump = sums.data_ptr<float>();
  int64_t* rsp = run_start.data_ptr<int64_t>();
  const float init = static_cast<float>(init_val);
  const int64_t row = (h + 2 * hkv) * d;  // one node's qkv

  // rotate-half RoPE of a head whose dim D-1 is zeroed before and after
  auto rotate = [&](const float* in, float* out, int64_t node) {
    const float* c = cp + node * d;
    const float* sn = sp + node * d;
    for (int64_t j = 0; j < d; ++j) {
      const int64_t r = j < half ? j + half : j - half;
      const float a = j == d - 1 ? 0.0f : in[j];
      const float b = r == d - 1 ? 0.0f : in[r];
      out[j] = a * c[j] + b * sn[j];
    }
    out[d - 1] = 0.0f;
  };

  // per node and KV head: the decision, the weight, the feature row
  for (int64_t i = 0; i < n; ++i) {
    const float* xi = x + i * row;
    for (int64_t kv = 0; kv < hkv; ++kv) {
      const float* k = xi + (h + kv) * d;
      const float* v = xi + (h + hkv + kv) * d;
      mp[i * hkv + kv] = k[d - 1] > init && !(start == 0 && i == 0);
      float qsum = 0.0f;
      for (int64_t g = 0; g < groups; ++g) qsum += xi[(kv * groups + g) * d + d - 1];
      const float w = importance_weight(qsum, groups, init);
      float* fr = fp + (i * hkv + kv) * f;
      for (int64_t j = 0; j < d; ++j) fr[j] = (j == d - 1 ? 0.0f : k[j]) * w;
      for (int64_t j = 0; j < d; ++j) fr[d + j] = v[j] * w;
      fr[2 * d] = w;
    }
    for (int64_t hq = 0; hq < h; ++hq) rotate(xi + hq * d, qkp + (i * (h + hkv) + hq) * d, i);
  }
  // per node and KV head: its run, its window's sums, its slot; what it sees
  std::vector<float> hist(f);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t pos = start + dep[i];
    for (int64_t kv = 0; kv < hkv; ++kv) {
      int64_t begin = start - rn[kv];  // the cached open run, unless an ancestor-or-self appends
      for (int64_t a = i; a >= 0; a = par[a]) {
        if (!mp[a * hkv + kv]) {
          begin = start + dep[a];
          break;
        }
      }
      rsp[i * hkv + kv] = begin;
      const int64_t lo = std::max(begin, pos - (window - 1));
      float* acc = sump + (i * hkv + kv) * f;
      int64_t a = i;
      for (int64_t o = 0; o < window; ++o) {  // the token o above node i: a node, then the window buffer
        const int64_t p = pos - o;
        if (p < lo || (a < 0 && p < start - back)) break;
        const float* src;
        if (a >= 0) {
          src = fp + (a * hkv + kv) * f;
          a = par[a];
        } else {
          const int64_t at = p % window;
          std::copy(wk + (at * hkv + kv) * d, wk + (at * hkv + kv + 1) * d, hist.begin());
          std::copy(wv + (at * hkv + kv) * d, wv + (at * hkv + kv + 1) * d, hist.begin() + d);
          hist[2 * d] = ww[at * hkv + kv];
          src = hist.data();
        }
        for (int64_t j = 0; j < f; ++j) acc[j] += src[j];
      }
      float k_slot[1024];  // d <= 1024, checked below
      const float wsum = acc[2 * d];
      for (int64_t j = 0; j < d; ++j) k_slot[j] = acc[j] / wsum;
      for (int64_t j = 0; j < d; ++j) vsp[(i * hkv + kv) * d + j] = acc[d + j] / wsum;
      rotate(k_slot, qkp + (i * (h + hkv) + h + kv) * d, i);
      // node i sees its own slot, and ancestor j's iff the child of j on i's path appends
      bool* seen = visp + (kv * n + i) * n;
      seen[i] = true;
      for (int64_t c = i, j = par[i]; j >= 0; c = j, j = par[j]) seen[j] = !mp[c * hkv + kv];
    }
  }
  return {qk, v_slot, merge, visible, feat, sums, run_start};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(chatapp_cpu, m) {
  m.def("dmc_tree_attention(Tensor q, Tensor k_new, Tensor v_new, Tensor visible, Tensor k_pages, Tensor v_pages, "
        "Tensor block_table, Tensor n_cached, float scale) -> Tensor");
  m.def("dmc_update(Tensor q, Tensor k, Tensor v, Tensor(a!) ksum, Tensor(b!) vsum, Tensor(c!) wsum, "
        "Tensor(d!) win_k, Tensor(e!) win_v, Tensor(f!) win_w, Tensor(g!) run, Tensor(h!) lens, int ptr, bool first, "
        "float init_val, int window) -> Tensor[]");
  m.def("dmc_tree_slots(Tensor qkv, Tensor cos, Tensor sin, Tensor parents, Tensor depth, Tensor win_k, "
        "Tensor win_v, Tensor win_w, Tensor run, int start, float init_val, int heads) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(chatapp_cpu, CPU, m) {
  m.impl("dmc_tree_attention", &dmc_tree_attention);
  m.impl("dmc_tree_slots", &dmc_tree_slots);
  m.impl("dmc_update", &dmc_update);
}
