// Independent float64 references for the block's math, written naively from ARCHITECTURE.md and the
// Hugging Face Llama/Qwen3 code (plain loops, no BLAS, nothing shared with engine/cpu), and the
// torch.optim.AdamW update. The engine's float and double code are checked against these.
//
//   std::vector<double> y, rstd;
//   ref::RmsNorm(x, w, rows, d, eps, &y, &rstd);
//   std::vector<double> out = ref::Block(config, weights, x, batch, seq, offset);
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <vector>

#include "base/block_config.h"

namespace blockd::testing::ref {

// y = x / sqrt(mean(x^2) + eps) * w per row of length d.
inline void RmsNorm(const std::vector<double>& x, const std::vector<double>& w, int64_t rows, int64_t d, double eps,
                    std::vector<double>* y, std::vector<double>* rstd) {
  y->assign(rows * d, 0);
  rstd->assign(rows, 0);
  for (int64_t r = 0; r < rows; ++r) {
    double mean_sq = 0;
    for (int64_t i = 0; i < d; ++i) mean_sq += x[r * d + i] * x[r * d + i];
    mean_sq /= static_cast<double>(d);
    (*rstd)[r] = 1.0 / std::sqrt(mean_sq + eps);
    for (int64_t i = 0; i < d; ++i) (*y)[r * d + i] = x[r * d + i] * (*rstd)[r] * w[i];
  }
}

// HF's inverse frequencies for c.rope_scaling, written from modeling_rope_utils.py in its own
// shape (whole-vector steps like its torch.where calls), independently of base/rope.cc.
inline std::vector<double> InvFreq(const BlockConfig& c) {
  const int64_t dim = c.head_dim;
  const double base = c.rope_theta;
  std::vector<double> inv_freq(dim / 2);
  for (int64_t j = 0; j < dim / 2; ++j) inv_freq[j] = 1.0 / std::pow(base, static_cast<double>(2 * j) / dim);
  const RopeScaling& r = c.rope_scaling;
  const double pi = std::acos(-1.0);
  if (r.rope_type == "linear") {
    for (double& f : inv_freq) f = f / r.factor;
  } else if (r.rope_type == "llama3") {
    const double old_context_len = static_cast<double>(r.original_max_position_embeddings);
    const double low_freq_wavelen = old_context_len / r.low_freq_factor;
    const double high_freq_wavelen = old_context_len / r.high_freq_factor;
    std::vector<double> out(inv_freq.size());
    for (size_t j = 0; j < inv_freq.size(); ++j) {
      const double wavelen = 2 * pi / inv_freq[j];
      double llama = wavelen > low_freq_wavelen ? inv_freq[j] / r.factor : inv_freq[j];
      const double smooth_factor =
          (old_context_len / wavelen - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor);
      const double smoothed = (1 - smooth_factor) * llama / r.factor + smooth_factor * llama;
      const bool is_medium = !(wavelen < high_freq_wavelen) && !(wavelen > low_freq_wavelen);
      out[j] = is_medium ? smoothed : llama;
    }
    inv_freq = out;
  } else if (r.rope_type == "yarn") {
    const double beta_fast = r.beta_fast != 0 ? r.beta_fast : 32, beta_slow = r.beta_slow != 0 ? r.beta_slow : 1;
    const double max_pos = static_cast<double>(r.original_max_position_embeddings);
    auto correction_dim = [&](double rot) { return dim * std::log(max_pos / (rot * 2 * pi)) / (2 * std::log(base)); };
    double low = std::max(std::floor(correction_dim(beta_fast)), 0.0);
    double high = std::min(std::ceil(correction_dim(beta_slow)), static_cast<double>(dim - 1));
    if (low == high) high += 0.001;
    for (int64_t j = 0; j < dim / 2; ++j) {
      const double pos_freq = std::pow(base, static_cast<double>(2 * j) / dim);
      const double extrapolation = 1.0 / pos_freq, interpolation = 1.0 / (r.factor * pos_freq);
      const double ramp = std::min(std::max((j - low) / (high - low), 0.0), 1.0);
      const double extrapolation_factor = 1 - ramp;
      inv_freq[j] = interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor;
    }
  }
  return inv_freq;
}

// HF's attention_scaling: yarn's attention_factor, else get_mscale(factor) = 0.1 ln(factor) + 1; 1
// for the other types.
inline double RopeScale(const BlockConfig& c) {
  const RopeScaling& r = c.rope_scaling;
  if (r.rope_type != "yarn") return 1.0;
  if (r.attention_factor != 0) return r.attention_factor;
  return r.factor <= 1 ? 1.0 : 0.1 * std::log(r.factor) + 1.0;
}

// HF apply_rotary_pos_emb on x [batch, seq, heads, dh]: x * cos + rotate_half(x) * sin, with
// cos/sin = cat(freqs, freqs).cos()/.sin() * scale, freqs = position * inv_freq,
// rotate_half(x) = cat(-x[h:], x[:h]), positions offset..offset+seq-1.
inline std::vector<double> Rope(const std::vector<double>& x, int64_t batch, int64_t seq, int64_t heads, int64_t dh,
                                int64_t offset, const std::vector<double>& inv_freq, double scale) {
  const int64_t half = dh / 2;
  std::vector<double> out(x.size());
  std::vector<double> cos_full(dh), sin_full(dh), rot(dh);
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t s = 0; s < seq; ++s) {
      const double position = static_cast<double>(offset + s);
      for (int64_t i = 0; i < dh; ++i) {
        const int64_t f = i % half;
        cos_full[i] = std::cos(position * inv_freq[f]) * scale;
        sin_full[i] = std::sin(position * inv_freq[f]) * scale;
      }
      for (int64_t h = 0; h < heads; ++h) {
        const int64_t base = ((b * seq + s) * heads + h) * dh;
        for (int64_t i = 0; i < half; ++i) {
          rot[i] = -x[base + half + i];
          rot[half + i] = x[base + i];
        }
        for (int64_t i = 0; i < dh; ++i) out[base + i] = x[base + i] * cos_full[i] + rot[i] * sin_full[i];
      }
    }
  }
  return out;
}

// Plain RoPE: inv_freq[i] = 1 / theta^(2i/dh), no scale.
inline std::vector<double> Rope(const std::vector<double>& x, int64_t batch, int64_t seq, int64_t heads, int64_t dh,
                                int64_t offset, double theta) {
  BlockConfig c;
  c.head_dim = dh;
  c.rope_theta = theta;
  return Rope(x, batch, seq, heads, dh, offset, InvFreq(c), 1.0);
}

// Causal GQA attention on q [b, s, H, dh], k/v [b, s, Hkv, dh] (query head h reads kv head
// h / (H / Hkv), as HF repeat_kv); o [b, s, H, dh], lse [b, H, s].
inline void Attention(const std::vector<double>& q, const std::vector<double>& k, const std::vector<double>& v,
                      int64_t batch, int64_t seq, int64_t H, int64_t Hkv, int64_t dh, double scale,
                      std::vector<double>* o, std::vector<double>* lse) {
  o->assign(batch * seq * H * dh, 0);
  lse->assign(batch * H * seq, 0);
  const int64_t group = H / Hkv;
  std::vector<double> score(seq), prob(seq);
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t h = 0; h < H; ++h) {
      const int64_t kvh = h / group;
      for (int64_t i = 0; i < seq; ++i) {
        double mx = -INFINITY;
        for (int64_t j = 0; j <= i; ++j) {  // causal: keys at positions <= i only
          double dot = 0;
          for (int64_t e = 0; e < dh; ++e) {
            dot += q[((b * seq + i) * H + h) * dh + e] * k[((b * seq + j) * Hkv + kvh) * dh + e];
          }
          score[j] = dot * scale;
          mx = std::max(mx, score[j]);
        }
        double sum = 0;
        for (int64_t j = 0; j <= i; ++j) sum += std::exp(score[j] - mx);
        for (int64_t j = 0; j <= i; ++j) prob[j] = std::exp(score[j] - mx) / sum;
        (*lse)[(b * H + h) * seq + i] = mx + std::log(sum);
        for (int64_t e = 0; e < dh; ++e) {
          double acc = 0;
          for (int64_t j = 0; j <= i; ++j) acc += prob[j] * v[((b * seq + j) * Hkv + kvh) * dh + e];
          (*o)[((b * seq + i) * H + h) * dh + e] = acc;
        }
      }
    }
  }
}

inline double Silu(double g) { return g / (1.0 + std::exp(-g)); }

inline std::vector<double> SwiGlu(const std::vector<double>& g, const std::vector<double>& u) {
  std::vector<double> h(g.size());
  for (size_t i = 0; i < g.size(); ++i) h[i] = Silu(g[i]) * u[i];
  return h;
}

// y [n, out] = x [n, in] W^T with W [out, in] (nn.Linear).
inline std::vector<double> Linear(const std::vector<double>& x, const std::vector<double>& w, int64_t n, int64_t in,
                                  int64_t out) {
  std::vector<double> y(n * out, 0);
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t o = 0; o < out; ++o) {
      double acc = 0;
      for (int64_t i = 0; i < in; ++i) acc += x[t * in + i] * w[o * in + i];
      y[t * out + o] = acc;
    }
  }
  return y;
}

// One block's weights by ParamId (q_norm/k_norm empty without qk_norm).
using BlockWeights = std::array<std::vector<double>, kNumParamIds>;

inline const std::vector<double>& W(const BlockWeights& w, ParamId id) { return w[static_cast<int>(id)]; }

// x W^T for the projection `base`, plus PEFT's LoRA term lora_scale (x A^T) B^T when `w` holds
// the projection's adapter (A [r, in], B [out, r]; r read from A's size).
inline std::vector<double> Project(const BlockWeights& w, ParamId base, double lora_scale, const std::vector<double>& x,
                                   int64_t n, int64_t in, int64_t out) {
  std::vector<double> y = Linear(x, W(w, base), n, in, out);
  for (const LoraTarget& t : kLoraTargets) {
    if (t.base != base || W(w, t.a).empty()) continue;
    const int64_t r = static_cast<int64_t>(W(w, t.a).size()) / in;
    const std::vector<double> u = Linear(x, W(w, t.a), n, in, r);
    const std::vector<double> delta = Linear(u, W(w, t.b), n, r, out);
    for (size_t i = 0; i < y.size(); ++i) y[i] += lora_scale * delta[i];
  }
  return y;
}

// The decoder layer of ARCHITECTURE.md ("The block") on x [batch, seq, hidden], returning out
// [batch, seq, hidden]; with LoRA adapters in `w`, scaled by lora_scale = alpha / rank.
inline std::vector<double> Block(const BlockConfig& c, const BlockWeights& w, const std::vector<double>& x,
                                 int64_t batch, int64_t seq, int64_t offset, double lora_scale = 0) {
  const int64_t n = batch * seq, d = c.hidden_size, H = c.num_attention_heads, Hkv = c.num_kv_heads,
                dh = c.head_dim, f = c.intermediate_size;
  std::vector<double> n1, rstd;
  RmsNorm(x, W(w, ParamId::kInputNorm), n, d, c.rms_norm_eps, &n1, &rstd);
  std::vector<double> q = Project(w, ParamId::kQProj, lora_scale, n1, n, d, H * dh);
  std::vector<double> k = Project(w, ParamId::kKProj, lora_scale, n1, n, d, Hkv * dh);
  std::vector<double> v = Project(w, ParamId::kVProj, lora_scale, n1, n, d, Hkv * dh);
  if (c.attention_bias) {  // nn.Linear(bias=True): y = x W^T + b
    for (int64_t t = 0; t < n; ++t) {
      for (int64_t j = 0; j < H * dh; ++j) q[t * H * dh + j] += W(w, ParamId::kQBias)[j];
      for (int64_t j = 0; j < Hkv * dh; ++j) k[t * Hkv * dh + j] += W(w, ParamId::kKBias)[j];
      for (int64_t j = 0; j < Hkv * dh; ++j) v[t * Hkv * dh + j] += W(w, ParamId::kVBias)[j];
    }
  }
  if (c.qk_norm) {
    std::vector<double> qn, kn;
    RmsNorm(q, W(w, ParamId::kQNorm), n * H, dh, c.rms_norm_eps, &qn, &rstd);
    RmsNorm(k, W(w, ParamId::kKNorm), n * Hkv, dh, c.rms_norm_eps, &kn, &rstd);
    q = qn;
    k = kn;
  }
  q = Rope(q, batch, seq, H, dh, offset, InvFreq(c), RopeScale(c));
  k = Rope(k, batch, seq, Hkv, dh, offset, InvFreq(c), RopeScale(c));
  std::vector<double> attn, lse;
  Attention(q, k, v, batch, seq, H, Hkv, dh, 1.0 / std::sqrt(static_cast<double>(dh)), &attn, &lse);
  std::vector<double> r1 = Project(w, ParamId::kOProj, lora_scale, attn, n, H * dh, d);
  for (int64_t i = 0; i < n * d; ++i) r1[i] += x[i];
  std::vector<double> n2;
  RmsNorm(r1, W(w, ParamId::kPostNorm), n, d, c.rms_norm_eps, &n2, &rstd);
  const std::vector<double> h =
      SwiGlu(Project(w, ParamId::kGateProj, lora_scale, n2, n, d, f), Project(w, ParamId::kUpProj, lora_scale, n2, n, d, f));
  std::vector<double> out = Project(w, ParamId::kDownProj, lora_scale, h, n, f, d);
  for (int64_t i = 0; i < n * d; ++i) out[i] += r1[i];
  return out;
}

// torch.optim.AdamW (single tensor, maximize=False, amsgrad=False) in float64, with the gradient
// first multiplied by `grad_scale` as clip_grad_norm_ does. `mag_*` track the sum of the absolute
// values of the terms that make up m and p, the scale a floating-point error bound is relative to
// (m can cancel towards zero when gradients change sign).
struct AdamWState {
  std::vector<double> p, m, v;
  std::vector<double> mag_p, mag_m;

  AdamWState() = default;
  AdamWState(const std::vector<double>& p0, const std::vector<double>& m0, const std::vector<double>& v0)
      : p(p0), m(m0), v(v0), mag_p(p0.size()), mag_m(m0.size()) {
    for (size_t i = 0; i < p.size(); ++i) {
      mag_p[i] = std::fabs(p[i]);
      mag_m[i] = std::fabs(m[i]);
    }
  }
};

template <class G>
void AdamWStep(AdamWState* s, const std::vector<G>& grad, double lr, double beta1, double beta2, double eps,
               double weight_decay, int64_t step, double grad_scale) {
  const double bias1 = 1 - std::pow(beta1, static_cast<double>(step));
  const double bias2 = 1 - std::pow(beta2, static_cast<double>(step));
  for (size_t i = 0; i < s->p.size(); ++i) {
    const double g = static_cast<double>(grad[i]) * grad_scale;
    s->p[i] *= 1 - lr * weight_decay;  // param.mul_(1 - lr * weight_decay)
    s->m[i] = beta1 * s->m[i] + (1 - beta1) * g;
    s->v[i] = beta2 * s->v[i] + (1 - beta2) * g * g;
    const double denom = std::sqrt(s->v[i]) / std::sqrt(bias2) + eps;
    s->p[i] -= lr / bias1 * s->m[i] / denom;  // param.addcdiv_(exp_avg, denom, value=-lr/bias1)
    s->mag_m[i] = beta1 * s->mag_m[i] + (1 - beta1) * std::fabs(g);
    s->mag_p[i] = std::fabs(1 - lr * weight_decay) * s->mag_p[i] + lr / bias1 * s->mag_m[i] / denom;
  }
}

}  // namespace blockd::testing::ref
