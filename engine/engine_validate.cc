// The validators declared at the end of engine.h (block ids, a spec's ranges, AdamW
// hyperparameters): pure functions of a request that the Engine calls before it changes anything.
#include "engine/engine.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "base/echo.h"

namespace blockd {

absl::Status ValidateBlockId(absl::string_view id) {
  const bool ok_chars = std::all_of(id.begin(), id.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' || c == '_' ||
           c == ':' || c == '/' || c == '-';
  });
  if (id.empty() || id.size() > 128 || !ok_chars) {
    return absl::InvalidArgumentError(absl::StrCat("block_id \"", Echo(id),
                                                   "\" is not valid: expected 1-128 characters of [A-Za-z0-9._:/-]"));
  }
  return absl::OkStatus();
}

absl::Status ValidateSpecRanges(const BlockSpec& spec) {
  if (spec.layer_index < 0 || spec.layer_index > 1000000) {
    return absl::InvalidArgumentError(absl::StrCat("layer_index = ", spec.layer_index, ", expected 0..1000000"));
  }
  if (spec.max_seq_len < 1 || spec.max_seq_len > (1 << 20)) {
    return absl::InvalidArgumentError(absl::StrCat("max_seq_len = ", spec.max_seq_len, ", expected 1..1048576"));
  }
  if (spec.max_batch_size < 1 || spec.max_batch_size > 65536) {
    return absl::InvalidArgumentError(absl::StrCat("max_batch_size = ", spec.max_batch_size, ", expected 1..65536"));
  }
  return absl::OkStatus();
}

absl::Status ValidateAdamW(const AdamWHyper& h, double max_grad_norm) {
  auto bad = [](absl::string_view field, double v, absl::string_view expected) {
    return absl::InvalidArgumentError(absl::StrCat(field, " = ", v, ", expected ", expected));
  };
  if (!std::isfinite(h.lr) || h.lr < 0) return bad("adamw.lr", h.lr, "a finite number >= 0");
  if (!(h.beta1 >= 0 && h.beta1 < 1)) return bad("adamw.beta1", h.beta1, "a number in [0, 1)");
  if (!(h.beta2 >= 0 && h.beta2 < 1)) return bad("adamw.beta2", h.beta2, "a number in [0, 1)");
  if (!std::isfinite(h.eps) || h.eps <= 0) return bad("adamw.eps", h.eps, "a finite number > 0");
  if (!std::isfinite(h.weight_decay) || h.weight_decay < 0) {
    return bad("adamw.weight_decay", h.weight_decay, "a finite number >= 0");
  }
  if (!std::isfinite(max_grad_norm) || max_grad_norm < 0) {
    return bad("max_grad_norm", max_grad_norm, "a finite number >= 0 (0: no clipping)");
  }
  return absl::OkStatus();
}

absl::Status ValidateClipCoefficient(double clip_coefficient, double max_grad_norm) {
  if (!std::isfinite(clip_coefficient) || clip_coefficient < 0 || clip_coefficient > 1) {
    return absl::InvalidArgumentError(absl::StrCat("clip_coefficient = ", clip_coefficient,
                                                   ", expected a number in (0, 1] (0: not given)"));
  }
  if (clip_coefficient > 0 && max_grad_norm > 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "both clip_coefficient (", clip_coefficient, ") and max_grad_norm (", max_grad_norm,
        ") are given: clip_coefficient is the clipping a client computed with GradNorm, give one of them"));
  }
  return absl::OkStatus();
}

}  // namespace blockd
