#include "engine/cpu/ops.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "engine/cpu/gemm.h"

namespace blockd::cpu {

template <class T>
void RmsNormForward(const T* x, const T* w, int64_t rows, int64_t d, double eps, T* y, T* rstd) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * d;
    double ss = 0;
    for (int64_t i = 0; i < d; ++i) ss += static_cast<double>(xr[i]) * xr[i];
    const T rs = static_cast<T>(1.0 / std::sqrt(ss / d + eps));
    rstd[r] = rs;
    T* yr = y + r * d;
    for (int64_t i = 0; i < d; ++i) yr[i] = (xr[i] * rs) * w[i];
  }
}

template <class T>
void RmsNormBackward(const T* dy, const T* x, const T* w, const T* rstd, int64_t rows, int64_t d, T* dx, T* dw) {
  // With xhat = x * rstd and gy = dy * w:  dx = rstd * (gy - xhat * mean(gy * xhat)),  dw = sum_rows dy * xhat.
  std::vector<double> dw_acc(d, 0.0);
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * d;
    const T* dyr = dy + r * d;
    const double rs = rstd[r];
    double dot = 0;
    for (int64_t i = 0; i < d; ++i) {
      const double xhat = xr[i] * rs;
      dot += static_cast<double>(dyr[i]) * w[i] * xhat;
      dw_acc[i] += static_cast<double>(dyr[i]) * xhat;
    }
    const double mean = dot / d;
    T* dxr = dx + r * d;
    for (int64_t i = 0; i < d; ++i) {
      const double xhat = xr[i] * rs;
      dxr[i] += static_cast<T>(rs * (static_cast<double>(dyr[i]) * w[i] - xhat * mean));
    }
  }
  if (dw != nullptr) {  // null: a frozen block's norm weight has no gradient
    for (int64_t i = 0; i < d; ++i) dw[i] += static_cast<T>(dw_acc[i]);
  }
}

namespace {

// scale * cos/sin of position * inv_freq for the `seq` positions from `offset`, [seq, head_dim / 2].
void RopeTables(int64_t seq, int64_t head_dim, int64_t offset, const double* inv_freq, double scale,
                std::vector<double>* cos_t, std::vector<double>* sin_t) {
  const int64_t half = head_dim / 2;
  cos_t->resize(seq * half);
  sin_t->resize(seq * half);
  for (int64_t i = 0; i < half; ++i) {
    for (int64_t s = 0; s < seq; ++s) {
      const double angle = static_cast<double>(offset + s) * inv_freq[i];
      (*cos_t)[s * half + i] = scale * std::cos(angle);
      (*sin_t)[s * half + i] = scale * std::sin(angle);
    }
  }
}

// Rotates each (i, i + half) pair by +angle (sign = 1) or -angle (sign = -1), times the scale.
template <class T>
void Rotate(T* x, int64_t batch, int64_t seq, int64_t heads, int64_t head_dim, int64_t offset,
            const double* inv_freq, double scale, double sign) {
  std::vector<double> cos_t, sin_t;
  RopeTables(seq, head_dim, offset, inv_freq, scale, &cos_t, &sin_t);
  const int64_t half = head_dim / 2;
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t s = 0; s < seq; ++s) {
      const double* c = &cos_t[s * half];
      const double* sn = &sin_t[s * half];
      for (int64_t h = 0; h < heads; ++h) {
        T* v = x + ((b * seq + s) * heads + h) * head_dim;
        for (int64_t i = 0; i < half; ++i) {
          const double a = v[i], bb = v[i + half];
          v[i] = static_cast<T>(a * c[i] - sign * bb * sn[i]);
          v[i + half] = static_cast<T>(bb * c[i] + sign * a * sn[i]);
        }
      }
    }
  }
}

}  // namespace

template <class T>
void RopeForward(T* x, int64_t batch, int64_t seq, int64_t heads, int64_t head_dim, int64_t offset,
                 const double* inv_freq, double scale) {
  Rotate(x, batch, seq, heads, head_dim, offset, inv_freq, scale, 1.0);
}

template <class T>
void RopeBackward(T* dx, int64_t batch, int64_t seq, int64_t heads, int64_t head_dim, int64_t offset,
                  const double* inv_freq, double scale) {
  Rotate(dx, batch, seq, heads, head_dim, offset, inv_freq, scale, -1.0);
}

template <class T>
void AddBias(T* out, const T* bias, int64_t rows, int64_t width) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < width; ++j) out[r * width + j] += bias[j];
  }
}

template <class T>
void BiasBackward(const T* dy, int64_t rows, int64_t width, T* dbias) {
  std::vector<double> acc(width, 0.0);  // double, as RmsNormBackward sums its weight gradient
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < width; ++j) acc[j] += dy[r * width + j];
  }
  for (int64_t j = 0; j < width; ++j) dbias[j] += static_cast<T>(acc[j]);
}

template <class T>
void AttentionForward(const T* q, const T* k, const T* v, int64_t batch, int64_t seq, int64_t heads,
                      int64_t kv_heads, int64_t head_dim, double scale, T* o, T* lse) {
  const int64_t group = heads / kv_heads;
  const int64_t q_stride = heads * head_dim, kv_stride = kv_heads * head_dim;
  std::vector<T> p(seq * seq);
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t h = 0; h < heads; ++h) {
      const T* qh = q + b * seq * q_stride + h * head_dim;
      const T* kh = k + b * seq * kv_stride + (h / group) * head_dim;
      const T* vh = v + b * seq * kv_stride + (h / group) * head_dim;
      // p = q k^T * scale, then a causal softmax per row (entries above the diagonal are zero).
      Gemm(false, true, seq, seq, head_dim, static_cast<T>(scale), qh, q_stride, kh, kv_stride, T(0), p.data(), seq);
      for (int64_t i = 0; i < seq; ++i) {
        T* row = &p[i * seq];
        double mx = -std::numeric_limits<double>::infinity();
        for (int64_t j = 0; j <= i; ++j) mx = std::max(mx, static_cast<double>(row[j]));
        double sum = 0;
        for (int64_t j = 0; j <= i; ++j) sum += std::exp(static_cast<double>(row[j]) - mx);
        const double l = mx + std::log(sum);
        lse[(b * heads + h) * seq + i] = static_cast<T>(l);
        for (int64_t j = 0; j <= i; ++j) row[j] = static_cast<T>(std::exp(static_cast<double>(row[j]) - l));
        for (int64_t j = i + 1; j < seq; ++j) row[j] = T(0);
      }
      Gemm(false, false, seq, head_dim, seq, T(1), p.data(), seq, vh, kv_stride, T(0),
           o + b * seq * q_stride + h * head_dim, q_stride);
    }
  }
}

template <class T>
void AttentionBackward(const T* q, const T* k, const T* v, const T* o, const T* lse, const T* d_o, int64_t batch,
                       int64_t seq, int64_t heads, int64_t kv_heads, int64_t head_dim, double scale, T* dq, T* dk,
                       T* dv) {
  const int64_t group = heads / kv_heads;
  const int64_t q_stride = heads * head_dim, kv_stride = kv_heads * head_dim;
  std::fill(dk, dk + batch * seq * kv_stride, T(0));
  std::fill(dv, dv + batch * seq * kv_stride, T(0));
  std::vector<T> p(seq * seq), dp(seq * seq);
  std::vector<double> delta(seq);
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t h = 0; h < heads; ++h) {
      const int64_t q_off = b * seq * q_stride + h * head_dim;
      const int64_t kv_off = b * seq * kv_stride + (h / group) * head_dim;
      // Recompute p from q, k and the saved log-sum-exp.
      Gemm(false, true, seq, seq, head_dim, static_cast<T>(scale), q + q_off, q_stride, k + kv_off, kv_stride, T(0),
           p.data(), seq);
      const T* lse_h = lse + (b * heads + h) * seq;
      for (int64_t i = 0; i < seq; ++i) {
        T* row = &p[i * seq];
        for (int64_t j = 0; j <= i; ++j) row[j] = static_cast<T>(std::exp(static_cast<double>(row[j]) - lse_h[i]));
        for (int64_t j = i + 1; j < seq; ++j) row[j] = T(0);
        // delta_i = sum_e do_ie * o_ie  (= sum_j p_ij dp_ij)
        double acc = 0;
        for (int64_t e = 0; e < head_dim; ++e) {
          acc += static_cast<double>(d_o[q_off + i * q_stride + e]) * o[q_off + i * q_stride + e];
        }
        delta[i] = acc;
      }
      // dv += p^T do
      Gemm(true, false, seq, head_dim, seq, T(1), p.data(), seq, d_o + q_off, q_stride, T(1), dv + kv_off, kv_stride);
      // dp = do v^T;  ds = p * (dp - delta)
      Gemm(false, true, seq, seq, head_dim, T(1), d_o + q_off, q_stride, v + kv_off, kv_stride, T(0), dp.data(), seq);
      for (int64_t i = 0; i < seq; ++i) {
        for (int64_t j = 0; j < seq; ++j) {
          dp[i * seq + j] = static_cast<T>(p[i * seq + j] * (static_cast<double>(dp[i * seq + j]) - delta[i]));
        }
      }
      // dq = ds k * scale;  dk += ds^T q * scale
      Gemm(false, false, seq, head_dim, seq, static_cast<T>(scale), dp.data(), seq, k + kv_off, kv_stride, T(0),
           dq + q_off, q_stride);
      Gemm(true, false, seq, head_dim, seq, static_cast<T>(scale), dp.data(), seq, q + q_off, q_stride, T(1),
           dk + kv_off, kv_stride);
    }
  }
}

template <class T>
void SwiGluForward(const T* g, const T* u, int64_t n, T* h) {
  for (int64_t i = 0; i < n; ++i) {
    const double gi = g[i];
    const double sig = 1.0 / (1.0 + std::exp(-gi));
    h[i] = static_cast<T>(gi * sig * u[i]);
  }
}

template <class T>
void SwiGluBackward(const T* dh, const T* g, const T* u, int64_t n, T* dg, T* du) {
  for (int64_t i = 0; i < n; ++i) {
    const double gi = g[i];
    const double sig = 1.0 / (1.0 + std::exp(-gi));
    const double silu = gi * sig;
    const double dsilu = sig * (1.0 + gi * (1.0 - sig));
    dg[i] = static_cast<T>(static_cast<double>(dh[i]) * u[i] * dsilu);
    du[i] = static_cast<T>(static_cast<double>(dh[i]) * silu);
  }
}

void AdamWUpdate(float* p, const float* g, float* m, float* v, int64_t n, double lr, double beta1, double beta2,
                 double eps, double weight_decay, int64_t step, float grad_scale) {
  // The same sequence of fp32 operations as torch.optim.AdamW's single-tensor path.
  const float decay = static_cast<float>(1.0 - lr * weight_decay);
  const float b1 = static_cast<float>(beta1), one_minus_b1 = static_cast<float>(1.0 - beta1);
  const float b2 = static_cast<float>(beta2), one_minus_b2 = static_cast<float>(1.0 - beta2);
  const double bias1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bias2 = 1.0 - std::pow(beta2, static_cast<double>(step));
  const float neg_step_size = static_cast<float>(-lr / bias1);
  const float bias2_sqrt = static_cast<float>(std::sqrt(bias2));
  const float eps_f = static_cast<float>(eps);
  for (int64_t i = 0; i < n; ++i) {
    const float gi = g[i] * grad_scale;
    p[i] *= decay;
    m[i] = m[i] * b1 + gi * one_minus_b1;
    v[i] = v[i] * b2 + one_minus_b2 * gi * gi;
    const float denom = std::sqrt(v[i]) / bias2_sqrt + eps_f;
    p[i] += neg_step_size * (m[i] / denom);
  }
}

#define BLOCKD_INSTANTIATE_OPS(T)                                                                          \
  template void RmsNormForward<T>(const T*, const T*, int64_t, int64_t, double, T*, T*);                  \
  template void RmsNormBackward<T>(const T*, const T*, const T*, const T*, int64_t, int64_t, T*, T*);     \
  template void RopeForward<T>(T*, int64_t, int64_t, int64_t, int64_t, int64_t, const double*, double);   \
  template void RopeBackward<T>(T*, int64_t, int64_t, int64_t, int64_t, int64_t, const double*, double);  \
  template void AddBias<T>(T*, const T*, int64_t, int64_t);                                               \
  template void BiasBackward<T>(const T*, int64_t, int64_t, T*);                                          \
  template void AttentionForward<T>(const T*, const T*, const T*, int64_t, int64_t, int64_t, int64_t,     \
                                    int64_t, double, T*, T*);                                             \
  template void AttentionBackward<T>(const T*, const T*, const T*, const T*, const T*, const T*, int64_t, \
                                     int64_t, int64_t, int64_t, int64_t, double, T*, T*, T*);             \
  template void SwiGluForward<T>(const T*, const T*, int64_t, T*);                                        \
  template void SwiGluBackward<T>(const T*, const T*, const T*, int64_t, T*, T*);

BLOCKD_INSTANTIATE_OPS(float)
BLOCKD_INSTANTIATE_OPS(double)

}  // namespace blockd::cpu
