#include "engine/cpu/block_infer.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "base/rope.h"
#include "engine/cpu/gemm.h"
#include "engine/cpu/lora.h"
#include "engine/cpu/ops.h"

namespace blockd::cpu {

CpuKvPageStore::CpuKvPageStore(int64_t kv_dim) : page_floats_(2 * kKvPageTokens * kv_dim) {}

absl::Status CpuKvPageStore::Grow(int64_t pages) {
  chunks_.emplace_back(static_cast<size_t>(pages * page_floats_), 0.f);
  chunk_first_.push_back(pages_);
  pages_ += pages;
  return absl::OkStatus();
}

float* CpuKvPageStore::Page(int32_t id) {
  // Chunks are few (one per session of the family): a linear search from the last.
  size_t c = chunks_.size() - 1;
  while (chunk_first_[c] > id) --c;
  return chunks_[c].data() + (id - chunk_first_[c]) * page_floats_;
}

absl::Status CpuKvPageStore::CopyPage(int32_t from, int32_t to) {
  const float* src = Page(from);
  std::copy(src, src + page_floats_, Page(to));
  return absl::OkStatus();
}

namespace {

// K (value: V) of `pos` in row `row`: page layout K [kKvPageTokens, kv_dim], then V.
float* Slot(const KvBlockView& kv, int64_t kv_dim, int64_t row, int64_t pos, bool value) {
  float* page = static_cast<CpuKvPageStore*>(kv.store(row))->Page(kv.page(row, pos));
  return page + (value ? kKvPageTokens * kv_dim : 0) + (pos % kKvPageTokens) * kv_dim;
}

// o [n, H, dh] for row r: softmax over the row's positions 0..start+i of q·k * scale, times v,
// reading every key and value from the cache (the new ones were written there first). Scores and
// sums in double, as AttentionForward's softmax, so a step matches Forward to fp32 rounding.
void CachedAttention(const BlockConfig& c, const float* q, int64_t row, int64_t n, int64_t start,
                     const KvBlockView& kv, float* o) {
  const int64_t H = c.num_attention_heads, Hkv = c.num_kv_heads, dh = c.head_dim, group = H / Hkv;
  const double scale = 1.0 / std::sqrt(double(dh));
  std::vector<double> p(static_cast<size_t>(start + n)), acc(static_cast<size_t>(dh));
  for (int64_t i = 0; i < n; ++i) {
    const int64_t last = start + i;  // causal: up to and including the token itself
    for (int64_t h = 0; h < H; ++h) {
      const float* qh = q + (i * H + h) * dh;
      const int64_t kv_off = (h / group) * dh;
      double mx = -std::numeric_limits<double>::infinity();
      for (int64_t t = 0; t <= last; ++t) {
        const float* kt = Slot(kv, Hkv * dh, row, t, false) + kv_off;
        // Rounded to float like the Gemm that computes Forward's scores.
        float dot = 0.f;
        for (int64_t e = 0; e < dh; ++e) dot += qh[e] * kt[e];
        p[t] = static_cast<double>(static_cast<float>(scale) * dot);
        mx = std::max(mx, p[t]);
      }
      double sum = 0;
      for (int64_t t = 0; t <= last; ++t) sum += std::exp(p[t] - mx);
      const double l = mx + std::log(sum);
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t t = 0; t <= last; ++t) {
        const double pt = static_cast<float>(std::exp(p[t] - l));
        const float* vt = Slot(kv, Hkv * dh, row, t, true) + kv_off;
        for (int64_t e = 0; e < dh; ++e) acc[e] += pt * vt[e];
      }
      float* oh = o + (i * H + h) * dh;
      for (int64_t e = 0; e < dh; ++e) oh[e] = static_cast<float>(acc[e]);
    }
  }
}

// c = a W^T (+ beta c), plus W's LoRA adapter when it has one (as block_math.cc), for `rows`
// rows of n tokens, a [rows * n, in], W = w[id] [out, in]: one product per row. OpenBLAS rounds a
// row differently as the number of rows in a product changes (it picks kernels and tiles by size),
// and a row batched with other sessions' rows (continuous batching) must come out with the bits it
// has when its session steps alone.
void RowLinear(int64_t rows, int64_t n, int64_t in, int64_t out, const float* a, const BlockParamPtrs<const float>& w,
               ParamId id, float beta, float* c) {
  const LoraTarget* lora = nullptr;
  for (const LoraTarget& t : kLoraTargets) {
    if (t.base == id && w[t.a] != nullptr) lora = &t;
  }
  for (int64_t r = 0; r < rows; ++r) {
    Gemm(false, true, n, out, in, 1.f, a + r * n * in, in, w[id], in, beta, c + r * n * out, out);
    if (lora != nullptr) {
      LoraForward(a + r * n * in, w[lora->a], w[lora->b], n, in, out, w.lora_rank, static_cast<float>(w.lora_scale),
                  c + r * n * out);
    }
  }
}

}  // namespace

void BlockInferStep(const BlockConfig& c, const BlockParamPtrs<const float>& w, const float* x, int64_t batch,
                    int64_t n, const int64_t* start, const KvBlockView& kv, float* out) {
  const int64_t tokens = batch * n, d = c.hidden_size, f = c.intermediate_size;
  const int64_t qd = c.q_dim(), kvd = c.kv_dim(), H = c.num_attention_heads, Hkv = c.num_kv_heads, dh = c.head_dim;
  std::vector<float> rstd(tokens), n1(tokens * d);
  RmsNormForward(x, w[ParamId::kInputNorm], tokens, d, c.rms_norm_eps, n1.data(), rstd.data());

  std::vector<float> q(tokens * qd), k(tokens * kvd), v(tokens * kvd);
  RowLinear(batch, n, d, qd, n1.data(), w, ParamId::kQProj, 0.f, q.data());
  RowLinear(batch, n, d, kvd, n1.data(), w, ParamId::kKProj, 0.f, k.data());
  RowLinear(batch, n, d, kvd, n1.data(), w, ParamId::kVProj, 0.f, v.data());
  if (c.attention_bias) {  // Qwen2: the projections' biases, before QK-norm and RoPE (as block_math.cc)
    AddBias(q.data(), w[ParamId::kQBias], tokens, qd);
    AddBias(k.data(), w[ParamId::kKBias], tokens, kvd);
    AddBias(v.data(), w[ParamId::kVBias], tokens, kvd);
  }
  if (c.qk_norm) {
    std::vector<float> raw_q = q, raw_k = k, rq(tokens * H), rk(tokens * Hkv);
    RmsNormForward(raw_q.data(), w[ParamId::kQNorm], tokens * H, dh, c.rms_norm_eps, q.data(), rq.data());
    RmsNormForward(raw_k.data(), w[ParamId::kKNorm], tokens * Hkv, dh, c.rms_norm_eps, k.data(), rk.data());
  }
  std::vector<float> attn(tokens * qd);
  // The block's RoPE, scaled as its config says (base/rope.h), exactly as the training forward.
  const std::vector<double> inv_freq = RopeInvFreq(c);
  const double rope_scale = RopeAttentionScaling(c);
  for (int64_t r = 0; r < batch; ++r) {
    // Each row at its own positions: rows of a beam may have been trimmed or forked apart.
    RopeForward(q.data() + r * n * qd, 1, n, H, dh, start[r], inv_freq.data(), rope_scale);
    RopeForward(k.data() + r * n * kvd, 1, n, Hkv, dh, start[r], inv_freq.data(), rope_scale);
    for (int64_t i = 0; i < n; ++i) {
      std::memcpy(Slot(kv, kvd, r, start[r] + i, false), k.data() + (r * n + i) * kvd, kvd * sizeof(float));
      std::memcpy(Slot(kv, kvd, r, start[r] + i, true), v.data() + (r * n + i) * kvd, kvd * sizeof(float));
    }
    CachedAttention(c, q.data() + r * n * qd, r, n, start[r], kv, attn.data() + r * n * qd);
  }

  // r1 = x + attn Wo^T, then the MLP exactly as BlockForward.
  std::vector<float> r1(x, x + tokens * d);
  RowLinear(batch, n, qd, d, attn.data(), w, ParamId::kOProj, 1.f, r1.data());
  std::vector<float> n2(tokens * d);
  RmsNormForward(r1.data(), w[ParamId::kPostNorm], tokens, d, c.rms_norm_eps, n2.data(), rstd.data());
  std::vector<float> gate(tokens * f), up(tokens * f), h(tokens * f);
  RowLinear(batch, n, d, f, n2.data(), w, ParamId::kGateProj, 0.f, gate.data());
  RowLinear(batch, n, d, f, n2.data(), w, ParamId::kUpProj, 0.f, up.data());
  SwiGluForward(gate.data(), up.data(), tokens * f, h.data());
  std::copy(r1.begin(), r1.end(), out);
  RowLinear(batch, n, f, d, h.data(), w, ParamId::kDownProj, 1.f, out);
}

}  // namespace blockd::cpu
