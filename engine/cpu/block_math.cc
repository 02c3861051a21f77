#include "engine/cpu/block_math.h"

#include <cmath>

#include "base/rope.h"
#include "engine/cpu/gemm.h"
#include "engine/cpu/lora.h"
#include "engine/cpu/ops.h"

namespace blockd::cpu {

template <class T>
size_t BlockActivations<T>::bytes() const {
  size_t n = 0;
  for (const std::vector<T>* v : {&x, &rstd1, &n1, &q_raw, &k_raw, &rstd_q, &rstd_k, &q, &k, &v, &attn, &lse, &r1,
                                  &rstd2, &n2, &gate, &up}) {
    n += v->size();
  }
  return n * sizeof(T);
}

namespace {

const LoraTarget& TargetOf(ParamId base) {
  for (const LoraTarget& t : kLoraTargets) {
    if (t.base == base) return t;
  }
  return kLoraTargets[0];  // unreachable: every caller names a projection
}

// y += the adapter of projection `base` applied to x [n, in] (nothing when it has none).
template <class T>
void AddLora(const BlockParamPtrs<const T>& w, ParamId base, const T* x, int64_t n, int64_t in, int64_t out, T* y) {
  const LoraTarget& t = TargetOf(base);
  if (w[t.a] == nullptr) return;
  LoraForward(x, w[t.a], w[t.b], n, in, out, w.lora_rank, static_cast<T>(w.lora_scale), y);
}

// dx += the adapter's input gradient for dy, and its A/B gradients into g (when set).
template <class T>
void LoraGrad(const BlockParamPtrs<const T>& w, const BlockParamPtrs<T>& g, ParamId base, const T* x, const T* dy,
              int64_t n, int64_t in, int64_t out, T* dx) {
  const LoraTarget& t = TargetOf(base);
  if (w[t.a] == nullptr) return;
  LoraBackward(x, w[t.a], w[t.b], dy, n, in, out, w.lora_rank, static_cast<T>(w.lora_scale), dx, g[t.a], g[t.b]);
}

}  // namespace

template <class T>
void BlockForward(const BlockConfig& c, const BlockParamPtrs<const T>& w, const T* x, int64_t batch, int64_t seq,
                  int64_t offset, T* out, BlockActivations<T>* s) {
  const int64_t n = batch * seq, d = c.hidden_size, f = c.intermediate_size;
  const int64_t qd = c.q_dim(), kvd = c.kv_dim(), H = c.num_attention_heads, Hkv = c.num_kv_heads, dh = c.head_dim;
  s->batch = batch;
  s->seq = seq;
  s->offset = offset;
  s->x.assign(x, x + n * d);
  s->rstd1.resize(n);
  s->n1.resize(n * d);
  RmsNormForward(x, w[ParamId::kInputNorm], n, d, c.rms_norm_eps, s->n1.data(), s->rstd1.data());

  s->q.resize(n * qd);
  s->k.resize(n * kvd);
  s->v.resize(n * kvd);
  Gemm(false, true, n, qd, d, T(1), s->n1.data(), d, w[ParamId::kQProj], d, T(0), s->q.data(), qd);
  Gemm(false, true, n, kvd, d, T(1), s->n1.data(), d, w[ParamId::kKProj], d, T(0), s->k.data(), kvd);
  Gemm(false, true, n, kvd, d, T(1), s->n1.data(), d, w[ParamId::kVProj], d, T(0), s->v.data(), kvd);
  AddLora(w, ParamId::kQProj, s->n1.data(), n, d, qd, s->q.data());
  AddLora(w, ParamId::kKProj, s->n1.data(), n, d, kvd, s->k.data());
  AddLora(w, ParamId::kVProj, s->n1.data(), n, d, kvd, s->v.data());
  if (c.attention_bias) {  // Qwen2: the projections' biases, before QK-norm and RoPE
    AddBias(s->q.data(), w[ParamId::kQBias], n, qd);
    AddBias(s->k.data(), w[ParamId::kKBias], n, kvd);
    AddBias(s->v.data(), w[ParamId::kVBias], n, kvd);
  }
  if (c.qk_norm) {
    s->q_raw = s->q;
    s->k_raw = s->k;
    s->rstd_q.resize(n * H);
    s->rstd_k.resize(n * Hkv);
    RmsNormForward(s->q_raw.data(), w[ParamId::kQNorm], n * H, dh, c.rms_norm_eps, s->q.data(), s->rstd_q.data());
    RmsNormForward(s->k_raw.data(), w[ParamId::kKNorm], n * Hkv, dh, c.rms_norm_eps, s->k.data(), s->rstd_k.data());
  }
  // head_dim / 2 pows per call, as the plain table cost before scaling existed.
  const std::vector<double> inv_freq = RopeInvFreq(c);
  const double rope_scale = RopeAttentionScaling(c);
  RopeForward(s->q.data(), batch, seq, H, dh, offset, inv_freq.data(), rope_scale);
  RopeForward(s->k.data(), batch, seq, Hkv, dh, offset, inv_freq.data(), rope_scale);

  s->attn.resize(n * qd);
  s->lse.resize(batch * H * seq);
  AttentionForward(s->q.data(), s->k.data(), s->v.data(), batch, seq, H, Hkv, dh, 1.0 / std::sqrt(double(dh)),
                   s->attn.data(), s->lse.data());

  // r1 = x + attn Wo^T
  s->r1.assign(x, x + n * d);
  Gemm(false, true, n, d, qd, T(1), s->attn.data(), qd, w[ParamId::kOProj], qd, T(1), s->r1.data(), d);
  AddLora(w, ParamId::kOProj, s->attn.data(), n, qd, d, s->r1.data());
  s->rstd2.resize(n);
  s->n2.resize(n * d);
  RmsNormForward(s->r1.data(), w[ParamId::kPostNorm], n, d, c.rms_norm_eps, s->n2.data(), s->rstd2.data());

  s->gate.resize(n * f);
  s->up.resize(n * f);
  Gemm(false, true, n, f, d, T(1), s->n2.data(), d, w[ParamId::kGateProj], d, T(0), s->gate.data(), f);
  Gemm(false, true, n, f, d, T(1), s->n2.data(), d, w[ParamId::kUpProj], d, T(0), s->up.data(), f);
  AddLora(w, ParamId::kGateProj, s->n2.data(), n, d, f, s->gate.data());
  AddLora(w, ParamId::kUpProj, s->n2.data(), n, d, f, s->up.data());
  std::vector<T> h(n * f);
  SwiGluForward(s->gate.data(), s->up.data(), n * f, h.data());
  // out = r1 + h Wdown^T
  std::copy(s->r1.begin(), s->r1.end(), out);
  Gemm(false, true, n, d, f, T(1), h.data(), f, w[ParamId::kDownProj], f, T(1), out, d);
  AddLora(w, ParamId::kDownProj, h.data(), n, f, d, out);
}

template <class T>
void BlockBackward(const BlockConfig& c, const BlockParamPtrs<const T>& w, const BlockActivations<T>& s, const T* dy,
                   T* dx, const BlockParamPtrs<T>& g) {
  const int64_t batch = s.batch, seq = s.seq, n = batch * seq, d = c.hidden_size, f = c.intermediate_size;
  const int64_t qd = c.q_dim(), kvd = c.kv_dim(), H = c.num_attention_heads, Hkv = c.num_kv_heads, dh = c.head_dim;

  // MLP: out = r1 + h Wd^T with h = silu(gate) * up.
  std::vector<T> h(n * f), dh_(n * f), dgate(n * f), dup(n * f);
  SwiGluForward(s.gate.data(), s.up.data(), n * f, h.data());
  if (g[ParamId::kDownProj] != nullptr) {
    Gemm(true, false, d, f, n, T(1), dy, d, h.data(), f, T(1), g[ParamId::kDownProj], f);  // dWd += dy^T h
  }
  Gemm(false, false, n, f, d, T(1), dy, d, w[ParamId::kDownProj], f, T(0), dh_.data(), f);  // dh = dy Wd
  LoraGrad(w, g, ParamId::kDownProj, h.data(), dy, n, f, d, dh_.data());
  SwiGluBackward(dh_.data(), s.gate.data(), s.up.data(), n * f, dgate.data(), dup.data());
  if (g[ParamId::kGateProj] != nullptr) {
    Gemm(true, false, f, d, n, T(1), dgate.data(), f, s.n2.data(), d, T(1), g[ParamId::kGateProj], d);
  }
  if (g[ParamId::kUpProj] != nullptr) {
    Gemm(true, false, f, d, n, T(1), dup.data(), f, s.n2.data(), d, T(1), g[ParamId::kUpProj], d);
  }
  std::vector<T> dn2(n * d);
  Gemm(false, false, n, d, f, T(1), dgate.data(), f, w[ParamId::kGateProj], d, T(0), dn2.data(), d);
  Gemm(false, false, n, d, f, T(1), dup.data(), f, w[ParamId::kUpProj], d, T(1), dn2.data(), d);
  LoraGrad(w, g, ParamId::kGateProj, s.n2.data(), dgate.data(), n, d, f, dn2.data());
  LoraGrad(w, g, ParamId::kUpProj, s.n2.data(), dup.data(), n, d, f, dn2.data());

  // dr1 = dy (residual) + post-attention norm's backward.
  std::vector<T> dr1(dy, dy + n * d);
  RmsNormBackward(dn2.data(), s.r1.data(), w[ParamId::kPostNorm], s.rstd2.data(), n, d, dr1.data(),
                  g[ParamId::kPostNorm]);

  // Attention: r1 = x + attn Wo^T.
  std::vector<T> dattn(n * qd);
  if (g[ParamId::kOProj] != nullptr) {
    Gemm(true, false, d, qd, n, T(1), dr1.data(), d, s.attn.data(), qd, T(1), g[ParamId::kOProj], qd);
  }
  Gemm(false, false, n, qd, d, T(1), dr1.data(), d, w[ParamId::kOProj], qd, T(0), dattn.data(), qd);
  LoraGrad(w, g, ParamId::kOProj, s.attn.data(), dr1.data(), n, qd, d, dattn.data());
  std::vector<T> dq(n * qd), dk(n * kvd), dv(n * kvd);
  AttentionBackward(s.q.data(), s.k.data(), s.v.data(), s.attn.data(), s.lse.data(), dattn.data(), batch, seq, H, Hkv,
                    dh, 1.0 / std::sqrt(double(dh)), dq.data(), dk.data(), dv.data());
  const std::vector<double> inv_freq = RopeInvFreq(c);
  const double rope_scale = RopeAttentionScaling(c);
  RopeBackward(dq.data(), batch, seq, H, dh, s.offset, inv_freq.data(), rope_scale);
  RopeBackward(dk.data(), batch, seq, Hkv, dh, s.offset, inv_freq.data(), rope_scale);
  if (c.qk_norm) {
    std::vector<T> dq_raw(n * qd, T(0)), dk_raw(n * kvd, T(0));
    RmsNormBackward(dq.data(), s.q_raw.data(), w[ParamId::kQNorm], s.rstd_q.data(), n * H, dh, dq_raw.data(),
                    g[ParamId::kQNorm]);
    RmsNormBackward(dk.data(), s.k_raw.data(), w[ParamId::kKNorm], s.rstd_k.data(), n * Hkv, dh, dk_raw.data(),
                    g[ParamId::kKNorm]);
    dq.swap(dq_raw);
    dk.swap(dk_raw);
  }
  // q, k, v = n1 W^T (+ b): dq, dk, dv are now the gradients of the projections' outputs.
  if (c.attention_bias && g[ParamId::kQBias] != nullptr) {
    BiasBackward(dq.data(), n, qd, g[ParamId::kQBias]);
    BiasBackward(dk.data(), n, kvd, g[ParamId::kKBias]);
    BiasBackward(dv.data(), n, kvd, g[ParamId::kVBias]);
  }
  if (g[ParamId::kQProj] != nullptr) {
    Gemm(true, false, qd, d, n, T(1), dq.data(), qd, s.n1.data(), d, T(1), g[ParamId::kQProj], d);
  }
  if (g[ParamId::kKProj] != nullptr) {
    Gemm(true, false, kvd, d, n, T(1), dk.data(), kvd, s.n1.data(), d, T(1), g[ParamId::kKProj], d);
  }
  if (g[ParamId::kVProj] != nullptr) {
    Gemm(true, false, kvd, d, n, T(1), dv.data(), kvd, s.n1.data(), d, T(1), g[ParamId::kVProj], d);
  }
  std::vector<T> dn1(n * d);
  Gemm(false, false, n, d, qd, T(1), dq.data(), qd, w[ParamId::kQProj], d, T(0), dn1.data(), d);
  Gemm(false, false, n, d, kvd, T(1), dk.data(), kvd, w[ParamId::kKProj], d, T(1), dn1.data(), d);
  Gemm(false, false, n, d, kvd, T(1), dv.data(), kvd, w[ParamId::kVProj], d, T(1), dn1.data(), d);
  LoraGrad(w, g, ParamId::kQProj, s.n1.data(), dq.data(), n, d, qd, dn1.data());
  LoraGrad(w, g, ParamId::kKProj, s.n1.data(), dk.data(), n, d, kvd, dn1.data());
  LoraGrad(w, g, ParamId::kVProj, s.n1.data(), dv.data(), n, d, kvd, dn1.data());

  // dx = dr1 (residual) + input norm's backward.
  std::copy(dr1.begin(), dr1.end(), dx);
  RmsNormBackward(dn1.data(), s.x.data(), w[ParamId::kInputNorm], s.rstd1.data(), n, d, dx, g[ParamId::kInputNorm]);
}

template struct BlockActivations<float>;
template struct BlockActivations<double>;
template void BlockForward<float>(const BlockConfig&, const BlockParamPtrs<const float>&, const float*, int64_t,
                                  int64_t, int64_t, float*, BlockActivations<float>*);
template void BlockForward<double>(const BlockConfig&, const BlockParamPtrs<const double>&, const double*, int64_t,
                                   int64_t, int64_t, double*, BlockActivations<double>*);
template void BlockBackward<float>(const BlockConfig&, const BlockParamPtrs<const float>&,
                                   const BlockActivations<float>&, const float*, float*, const BlockParamPtrs<float>&);
template void BlockBackward<double>(const BlockConfig&, const BlockParamPtrs<const double>&,
                                    const BlockActivations<double>&, const double*, double*,
                                    const BlockParamPtrs<double>&);

}  // namespace blockd::cpu
