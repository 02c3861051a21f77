#include "engine/cpu/cpu_backend.h"

#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"
#include "base/finite.h"
#include "base/status_macros.h"
#include "engine/cpu/block_infer.h"
#include "engine/cpu/block_math.h"
#include "engine/cpu/ops.h"

namespace blockd {
namespace {

class CpuActivation : public Activation {
 public:
  CpuActivation(int64_t batch, int64_t seq, int64_t width)
      : Activation(0, batch, seq, width), data(static_cast<size_t>(batch * seq * width)) {}
  std::vector<float> data;
};

class CpuSaved : public SavedActivations {
 public:
  size_t bytes() const override { return acts.bytes(); }
  cpu::BlockActivations<float> acts;
};

const CpuActivation& AsCpu(const Activation& a) { return static_cast<const CpuActivation&>(a); }

// Floats a forward keeps per token, and per (batch, head, position) for the log-sum-exp.
size_t SavedFloats(const BlockConfig& c, int64_t batch, int64_t seq) {
  const int64_t n = batch * seq;
  int64_t per_token = 4 * c.hidden_size + 2 + 2 * c.q_dim() + 2 * c.kv_dim() + 2 * c.intermediate_size;
  if (c.qk_norm) per_token += c.q_dim() + c.kv_dim() + c.num_attention_heads + c.num_kv_heads;
  return static_cast<size_t>(n * per_token + batch * c.num_attention_heads * seq);
}

// The parameters a block trains (TrainsParam) are a suffix of BlockParams order, so its gradients
// and moments are one buffer over [TrainableBegin, end).
size_t TrainableBegin(const BlockSpec& spec, const std::vector<ParamSpec>& params) {
  size_t i = params.size();
  while (i > 0 && TrainsParam(spec, params[i - 1])) --i;
  return i;
}

// Host bytes of a block: fp32 weights, plus gradient and two moments per trained parameter.
size_t CpuBlockBytes(const BlockSpec& spec) {
  const std::vector<ParamSpec> params = BlockParams(spec.config, spec.lora);
  int64_t all = 0, trained = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    all += params[i].numel();
    if (i >= TrainableBegin(spec, params)) trained += params[i].numel();
  }
  return static_cast<size_t>(all + 3 * trained) * sizeof(float);
}

class CpuBlock : public Block {
 public:
  explicit CpuBlock(const BlockSpec& spec) : spec_(spec), params_(BlockParams(spec.config, spec.lora)) {
    int64_t total = 0;
    for (const ParamSpec& p : params_) {
      offsets_.push_back(total);
      total += p.numel();
    }
    offsets_.push_back(total);
    trainable_begin_ = TrainableBegin(spec, params_);
    weights_.assign(static_cast<size_t>(total), 0.f);
    const int64_t trained = total - offsets_[trainable_begin_];
    for (auto* buf : {&grads_, &m_, &v_}) buf->assign(static_cast<size_t>(trained), 0.f);
  }

  size_t memory_bytes() const override {
    return (weights_.size() + grads_.size() + m_.size() + v_.size()) * sizeof(float);
  }
  size_t SavedBytes(int64_t batch, int64_t seq) const override {
    return SavedFloats(spec_.config, batch, seq) * sizeof(float);
  }

  absl::Status WriteTensor(TensorKind kind, int index, const float* host) override {
    ASSIGN_OR_RETURN(float* dst, At(kind, index));
    std::memcpy(dst, host, params_[index].numel() * sizeof(float));
    return absl::OkStatus();
  }
  absl::Status ReadTensor(TensorKind kind, int index, float* host) override {
    ASSIGN_OR_RETURN(float* src, At(kind, index));
    std::memcpy(host, src, params_[index].numel() * sizeof(float));
    return absl::OkStatus();
  }

  absl::StatusOr<std::unique_ptr<Activation>> Forward(std::unique_ptr<Activation> x, int64_t position_offset,
                                                      std::unique_ptr<SavedActivations>* saved) override {
    auto out = std::make_unique<CpuActivation>(x->batch(), x->seq(), x->width());
    auto keep = std::make_unique<CpuSaved>();
    cpu::BlockForward(spec_.config, Ptrs<const float>(weights_), AsCpu(*x).data.data(), x->batch(), x->seq(),
                      position_offset, out->data.data(), &keep->acts);
    if (saved != nullptr) *saved = std::move(keep);
    return std::unique_ptr<Activation>(std::move(out));
  }

  absl::StatusOr<std::unique_ptr<Activation>> Backward(const SavedActivations& saved, const Activation& grad_out,
                                                       bool accumulate) override {
    const auto& acts = static_cast<const CpuSaved&>(saved).acts;
    if (!accumulate) std::fill(grads_.begin(), grads_.end(), 0.f);
    auto dx = std::make_unique<CpuActivation>(grad_out.batch(), grad_out.seq(), grad_out.width());
    cpu::BlockBackward(spec_.config, Ptrs<const float>(weights_), acts, AsCpu(grad_out).data.data(),
                       dx->data.data(), GradPtrs());
    return std::unique_ptr<Activation>(std::move(dx));
  }

  absl::StatusOr<std::unique_ptr<Activation>> InferStep(const Activation& x, const std::vector<int64_t>& start,
                                                        const KvBlockView& kv) override {
    auto out = std::make_unique<CpuActivation>(x.batch(), x.seq(), x.width());
    cpu::BlockInferStep(spec_.config, Ptrs<const float>(weights_), AsCpu(x).data.data(), x.batch(), x.seq(),
                        start.data(), kv, out->data.data());
    return std::unique_ptr<Activation>(std::move(out));
  }

  absl::StatusOr<std::unique_ptr<KvPageStore>> NewKvPageStore() override {
    return std::unique_ptr<KvPageStore>(std::make_unique<cpu::CpuKvPageStore>(spec_.config.kv_dim()));
  }

  absl::StatusOr<double> GradSquaredNorm() override {
    double ss = 0;
    for (float g : grads_) ss += static_cast<double>(g) * g;
    return ss;
  }

  absl::Status AdamWStep(const AdamWUpdate& u) override {
    for (size_t i = trainable_begin_; i < params_.size(); ++i) {
      const bool decay = params_[i].is_matrix || u.hyper.decay_norm_weights;
      const int64_t off = offsets_[i], t = off - offsets_[trainable_begin_];
      cpu::AdamWUpdate(&weights_[off], &grads_[t], &m_[t], &v_[t], params_[i].numel(), u.hyper.lr, u.hyper.beta1,
                       u.hyper.beta2, u.hyper.eps, decay ? u.hyper.weight_decay : 0.0, u.step, u.grad_scale);
    }
    return absl::OkStatus();
  }

 private:
  // Tensor `index` of `kind`; gradients and moments exist for trained parameters only.
  absl::StatusOr<float*> At(TensorKind kind, int index) {
    if (kind == TensorKind::kWeights) return weights_.data() + offsets_[index];
    if (static_cast<size_t>(index) < trainable_begin_) {
      return absl::FailedPreconditionError(absl::StrCat("block ", spec_.id, " is frozen: ", params_[index].name,
                                                        " has no ", TensorKindName(kind)));
    }
    const int64_t t = offsets_[index] - offsets_[trainable_begin_];
    switch (kind) {
      case TensorKind::kGradients: return grads_.data() + t;
      case TensorKind::kAdamM: return m_.data() + t;
      case TensorKind::kAdamV: return v_.data() + t;
      case TensorKind::kWeights: break;
    }
    return absl::InternalError("unknown tensor kind");
  }

  template <class T>
  cpu::BlockParamPtrs<T> Ptrs(std::vector<float>& buf) {
    cpu::BlockParamPtrs<T> p;
    for (size_t i = 0; i < params_.size(); ++i) p.p[static_cast<int>(params_[i].id)] = buf.data() + offsets_[i];
    if (spec_.lora.rank > 0) {
      p.lora_rank = spec_.lora.rank;
      p.lora_scale = spec_.lora.scale();
    }
    return p;
  }
  // Gradients of the trained parameters; null for the frozen ones, which BlockBackward skips.
  cpu::BlockParamPtrs<float> GradPtrs() {
    cpu::BlockParamPtrs<float> p;
    for (size_t i = trainable_begin_; i < params_.size(); ++i) {
      p.p[static_cast<int>(params_[i].id)] = grads_.data() + (offsets_[i] - offsets_[trainable_begin_]);
    }
    return p;
  }

  BlockSpec spec_;
  std::vector<ParamSpec> params_;
  std::vector<int64_t> offsets_;  // by BlockParams index, then the total
  size_t trainable_begin_ = 0;    // BlockParams index of the first trained parameter
  std::vector<float> weights_, grads_, m_, v_;
};

class CpuBackend : public Backend {
 public:
  absl::string_view name() const override { return "cpu"; }

  std::vector<DeviceInfo> devices() const override {
    DeviceInfo d;
    d.index = 0;
    d.kind = "cpu";
    d.name = "host memory";
    d.memory_total_bytes = static_cast<int64_t>(sysconf(_SC_PHYS_PAGES)) * sysconf(_SC_PAGE_SIZE);
    return {d};
  }

  Precision default_precision() const override { return Precision::kFP32; }

  absl::Status Supports(const BlockSpec& spec) const override {
    if (spec.device != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("device ", spec.device, " does not exist: backend cpu has one device, 0"));
    }
    if (spec.precision != Precision::kFP32) {
      return absl::UnimplementedError(absl::StrCat("backend cpu computes in fp32 only; precision ",
                                                   PrecisionName(spec.precision), " needs the cuda backend"));
    }
    return absl::OkStatus();
  }

  size_t BlockBytes(const BlockSpec& spec) const override { return CpuBlockBytes(spec); }

  absl::StatusOr<std::unique_ptr<Block>> CreateBlock(const BlockSpec& spec) override {
    return std::unique_ptr<Block>(std::make_unique<CpuBlock>(spec));
  }

  absl::StatusOr<std::unique_ptr<Activation>> Upload(int device, DType dtype, const void* data, int64_t batch,
                                                     int64_t seq, int64_t width) override {
    auto a = std::make_unique<CpuActivation>(batch, seq, width);
    ConvertToFloat32(dtype, data, a->data.size(), a->data.data());
    RETURN_IF_ERROR(CheckFinite(a->data.data(), a->data.size()));
    return std::unique_ptr<Activation>(std::move(a));
  }

  absl::StatusOr<std::unique_ptr<Activation>> UploadChecked(int device, DType dtype, const void* data, int64_t batch,
                                                            int64_t seq, int64_t width) override {
    auto a = std::make_unique<CpuActivation>(batch, seq, width);
    ConvertToFloat32(dtype, data, a->data.size(), a->data.data());
    return std::unique_ptr<Activation>(std::move(a));
  }

  absl::Status Download(const Activation& a, DType dtype, std::string* dst) override {
    const auto& data = AsCpu(a).data;
    if (dtype == DType::kFloat32) {
      dst->assign(reinterpret_cast<const char*>(data.data()), data.size() * sizeof(float));
      return absl::OkStatus();
    }
    // Converted a slice at a time and appended, so the reply is written once, not zeroed first.
    dst->clear();
    dst->reserve(data.size() * DTypeSize(dtype));
    alignas(16) char slice[16384];
    const size_t per_slice = sizeof(slice) / DTypeSize(dtype);
    for (size_t i = 0; i < data.size(); i += per_slice) {
      const size_t n = std::min(per_slice, data.size() - i);
      ConvertFromFloat32(data.data() + i, n, dtype, slice);
      dst->append(slice, n * DTypeSize(dtype));
    }
    return absl::OkStatus();
  }

  absl::StatusOr<std::unique_ptr<Activation>> ToDevice(const Activation& a, int device) override {
    if (device != 0) return absl::InvalidArgumentError(absl::StrCat("device ", device, " does not exist"));
    auto copy = std::make_unique<CpuActivation>(a.batch(), a.seq(), a.width());
    copy->data = AsCpu(a).data;
    return std::unique_ptr<Activation>(std::move(copy));
  }
};

}  // namespace

std::unique_ptr<Backend> MakeCpuBackend() { return std::make_unique<CpuBackend>(); }

}  // namespace blockd
