#include "base/rope.h"

#include <algorithm>
#include <cmath>

namespace blockd {
namespace {

constexpr double kPi = 3.14159265358979323846;

// _compute_default_rope_parameters: 1 / theta^(2i / dim).
std::vector<double> DefaultInvFreq(double theta, int64_t dim) {
  std::vector<double> f(dim / 2);
  for (int64_t i = 0; i < dim / 2; ++i) f[i] = 1.0 / std::pow(theta, static_cast<double>(2 * i) / dim);
  return f;
}

// _compute_llama3_parameters: low frequencies (wavelength above old_context / low_freq_factor)
// divided by factor, high ones (below old_context / high_freq_factor) kept, a linear blend between.
void Llama3(const RopeScaling& r, std::vector<double>* inv_freq) {
  const double old_context = static_cast<double>(r.original_max_position_embeddings);
  const double low_freq_wavelen = old_context / r.low_freq_factor;
  const double high_freq_wavelen = old_context / r.high_freq_factor;
  for (double& f : *inv_freq) {
    const double wavelen = 2 * kPi / f;
    if (wavelen > low_freq_wavelen) {
      f = f / r.factor;
    } else if (!(wavelen < high_freq_wavelen)) {  // medium: HF's ~(w < high) & ~(w > low)
      const double smooth = (old_context / wavelen - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor);
      f = (1 - smooth) * f / r.factor + smooth * f;
    }
  }
}

// find_correction_dim: the dimension whose wavelength turns `rotations` times over the context.
double CorrectionDim(double rotations, double dim, double base, double max_pos) {
  return (dim * std::log(max_pos / (rotations * 2 * kPi))) / (2 * std::log(base));
}

// _compute_yarn_parameters with truncate = true (HF's default): interpolation (inv_freq / factor)
// for the low dimensions, extrapolation (inv_freq) for the high ones, a linear ramp between the
// correction range [low, high] of beta_fast and beta_slow.
void Yarn(const RopeScaling& r, double theta, int64_t dim, std::vector<double>* inv_freq) {
  const double beta_fast = r.beta_fast != 0 ? r.beta_fast : 32.0;
  const double beta_slow = r.beta_slow != 0 ? r.beta_slow : 1.0;
  const double max_pos = static_cast<double>(r.original_max_position_embeddings);
  double low = std::floor(CorrectionDim(beta_fast, static_cast<double>(dim), theta, max_pos));
  double high = std::ceil(CorrectionDim(beta_slow, static_cast<double>(dim), theta, max_pos));
  low = std::max(low, 0.0);
  high = std::min(high, static_cast<double>(dim - 1));
  if (low == high) high += 0.001;  // linear_ramp_factor's guard against a zero-width ramp
  for (int64_t i = 0; i < dim / 2; ++i) {
    const double ramp = std::clamp((static_cast<double>(i) - low) / (high - low), 0.0, 1.0);
    const double extrapolation_factor = 1 - ramp;
    const double extrapolation = (*inv_freq)[i];
    const double interpolation = extrapolation / r.factor;
    (*inv_freq)[i] = interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor;
  }
}

}  // namespace

std::vector<double> RopeInvFreq(const BlockConfig& c) {
  std::vector<double> inv_freq = DefaultInvFreq(c.rope_theta, c.head_dim);
  const RopeScaling& r = c.rope_scaling;
  if (r.rope_type == "linear") {
    for (double& f : inv_freq) f /= r.factor;
  } else if (r.rope_type == "llama3") {
    Llama3(r, &inv_freq);
  } else if (r.rope_type == "yarn") {
    Yarn(r, c.rope_theta, c.head_dim, &inv_freq);
  }
  return inv_freq;
}

double RopeAttentionScaling(const BlockConfig& c) {
  const RopeScaling& r = c.rope_scaling;
  if (r.rope_type != "yarn") return 1.0;
  if (r.attention_factor != 0) return r.attention_factor;
  return r.factor <= 1 ? 1.0 : 0.1 * std::log(r.factor) + 1.0;  // get_mscale(factor)
}

}  // namespace blockd
