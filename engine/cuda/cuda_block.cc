#include "engine/cuda/cuda_block.h"

#include <cuda_bf16.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <type_traits>
#include <vector>

#include "engine/cuda/attention_dispatch.h"
#include "engine/cuda/block_layout.h"
#include "engine/cuda/cuda_status.h"
#include "engine/cuda/kv_pages.h"
#include "engine/cuda/lora_gemms.h"
#include "engine/cuda/step_workspace.h"
#include "base/status_macros.h"
#include "kernels/adamw.cuh"
#include "base/rope.h"
#include "kernels/attention.cuh"
#include "kernels/bias.cuh"
#include "kernels/convert.cuh"
#include "kernels/gemm.h"
#include "kernels/gemv.cuh"
#include "kernels/paged_attention.cuh"
#include "kernels/paged_qkv.cuh"
#include "kernels/rmsnorm.cuh"
#include "kernels/rope.cuh"
#include "kernels/swiglu.cuh"

namespace blockd::cuda {
namespace {

using bf16 = __nv_bfloat16;
using kernels::GemmType;

class CudaSaved : public SavedActivations {
 public:
  size_t bytes() const override { return bytes_; }
  int64_t batch = 0, seq = 0;
  DeviceBuffer x, n1, rstd1, qkv, rstd_q, rstd_k, q, k, table, o, lse, r1, rstd2, n2, gu, h, lora_u;
  size_t bytes_ = 0;
};

template <class T>
constexpr GemmType TypeOf() {
  return std::is_same<T, float>::value ? GemmType::kF32 : GemmType::kBF16;
}

class CudaBlock : public Block {
 public:
  CudaBlock(const BlockSpec& spec, DeviceContext* dev)
      : spec_(spec), dev_(dev), layout_(MakeLayout(spec.config, spec.lora)) {}
  ~CudaBlock() override {
    if (norm_done_ == nullptr) return;
    DeviceGuard guard(dev_->index);
    if (norm_started_) cudaEventSynchronize(norm_done_);  // its copy writes into norm_host_
    cudaEventDestroy(norm_done_);
  }

  absl::Status Init(AttentionMode attention) {
    DeviceGuard guard(dev_->index);
    ASSIGN_OR_RETURN(attention_, AttentionRunner::Create(attention, spec_, dev_));
    const size_t p = static_cast<size_t>(layout_.total);
    // A frozen block keeps its base matrices in the compute dtype only (bf16 for BF16: no fp32
    // masters), the adapters and 1-D parameters in fp32, and gradients for those alone (the norm
    // and bias backward kernels write one: a scratch); only the adapters have moments.
    if (spec_.frozen) {
      if (spec_.precision == Precision::kBF16) master_begin_ = layout_.adapter_begin;
      grad_begin_ = train_begin_ = layout_.adapter_begin;
      train_end_ = layout_.adapter_end;
    } else {
      train_end_ = layout_.total;
    }
    const size_t trained = static_cast<size_t>(train_end_ - train_begin_);
    std::vector<std::pair<DeviceBuffer*, size_t>> fp32 = {
        {&weights_, p - master_begin_}, {&grads_, p - grad_begin_}, {&m_, trained}, {&v_, trained}};
    for (auto [b, floats] : fp32) {
      if (floats == 0) continue;
      ASSIGN_OR_RETURN(*b, DeviceBuffer::Allocate(dev_, floats * 4));
      CUDA_RETURN_IF_ERROR(cudaMemsetAsync(b->get(), 0, floats * 4, dev_->Stream()));
    }
    if (spec_.precision == Precision::kBF16) {
      ASSIGN_OR_RETURN(weights_bf16_, DeviceBuffer::Allocate(dev_, p * 2));
      CUDA_RETURN_IF_ERROR(cudaMemsetAsync(weights_bf16_.get(), 0, p * 2, dev_->Stream()));
    }
    ASSIGN_OR_RETURN(adamw_params_, DeviceBuffer::Allocate(dev_, sizeof(kernels::AdamWDeviceParams)));
    ASSIGN_OR_RETURN(sum_ws_, DeviceBuffer::Allocate(dev_, kernels::sum_squares_workspace_doubles() * 8 + 8));
    ASSIGN_OR_RETURN(rms_ws_, DeviceBuffer::Allocate(dev_, RmsWorkspaceFloats(spec_.config) * 4));
    ASSIGN_OR_RETURN(qk_ws_, DeviceBuffer::Allocate(dev_, QkWorkspaceFloats(spec_.config) * 4));
    if (spec_.config.attention_bias) {
      ASSIGN_OR_RETURN(bias_ws_, DeviceBuffer::Allocate(dev_, BiasWorkspaceFloats(spec_.config) * 4));
    }
    // base/rope.h computes every rope_type's frequencies, so the CPU and CUDA tables agree.
    const std::vector<double> inv_freq = RopeInvFreq(spec_.config);
    rope_scale_ = RopeAttentionScaling(spec_.config);
    ASSIGN_OR_RETURN(inv_freq_, DeviceBuffer::Allocate(dev_, InvFreqBytes(spec_.config)));
    CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(inv_freq_.get(), inv_freq.data(), InvFreqBytes(spec_.config),
                                         cudaMemcpyHostToDevice, dev_->Stream()));
    return dev_->Sync();  // before `inv_freq` goes
  }

  size_t memory_bytes() const override { return CudaBlockBytes(spec_); }
  AttentionInfo attention() const override { return attention_.info(); }
  size_t SavedBytes(int64_t batch, int64_t seq) const override {
    return SavedBytesFor(spec_.config, spec_.lora, spec_.precision, batch, seq);
  }

  absl::Status WriteTensor(TensorKind kind, int index, const float* host) override {
    DeviceGuard guard(dev_->index);
    RETURN_IF_ERROR(CheckKind(kind, index));
    const int64_t off = layout_.index_offset[index], n = layout_.params[index].numel();
    if (off < master_begin_) {  // a frozen bf16 matrix: rounded on the host, as launch_float_to_bf16 would
      std::vector<uint16_t> b(static_cast<size_t>(n));
      ConvertFromFloat32(host, b.size(), DType::kBFloat16, b.data());
      CUDA_RETURN_IF_ERROR(
          cudaMemcpyAsync(weights_bf16_.as<bf16>() + off, b.data(), n * 2, cudaMemcpyHostToDevice, dev_->Stream()));
      return dev_->Sync();  // before `b` goes
    }
    float* dst = Tensor(kind) + off - Begin(kind);
    CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dst, host, n * 4, cudaMemcpyHostToDevice, dev_->Stream()));
    if (kind == TensorKind::kWeights && spec_.precision == Precision::kBF16) {
      CUDA_RETURN_IF_ERROR(kernels::launch_float_to_bf16(dst, weights_bf16_.as<bf16>() + off, n, dev_->Stream()));
    }
    return dev_->Sync();
  }

  absl::Status ReadTensor(TensorKind kind, int index, float* host) override {
    DeviceGuard guard(dev_->index);
    RETURN_IF_ERROR(CheckKind(kind, index));
    const int64_t off = layout_.index_offset[index], n = layout_.params[index].numel();
    if (off < master_begin_) {  // a frozen bf16 matrix: widened exactly on the host
      std::vector<uint16_t> b(static_cast<size_t>(n));
      CUDA_RETURN_IF_ERROR(
          cudaMemcpyAsync(b.data(), weights_bf16_.as<bf16>() + off, n * 2, cudaMemcpyDeviceToHost, dev_->Stream()));
      RETURN_IF_ERROR(dev_->Sync());
      ConvertToFloat32(DType::kBFloat16, b.data(), b.size(), host);
      return absl::OkStatus();
    }
    CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(host, Tensor(kind) + off - Begin(kind), n * 4, cudaMemcpyDeviceToHost, dev_->Stream()));
    return dev_->Sync();
  }

  absl::StatusOr<std::unique_ptr<Activation>> Forward(std::unique_ptr<Activation> x, int64_t position_offset,
                                                      std::unique_ptr<SavedActivations>* saved) override {
    DeviceGuard guard(dev_->index);
    if (spec_.precision == Precision::kBF16) return ForwardT<bf16>(std::move(x), position_offset, saved);
    return ForwardT<float>(std::move(x), position_offset, saved);
  }

  absl::StatusOr<std::unique_ptr<Activation>> Backward(const SavedActivations& saved, const Activation& grad_out,
                                                       bool accumulate) override {
    DeviceGuard guard(dev_->index);
    if (spec_.precision == Precision::kBF16) return BackwardT<bf16>(saved, grad_out, accumulate);
    return BackwardT<float>(saved, grad_out, accumulate);
  }

  absl::StatusOr<std::unique_ptr<Activation>> InferStep(const Activation& x, const std::vector<int64_t>& start,
                                                        const KvBlockView& kv) override {
    DeviceGuard guard(dev_->index);
    const auto& xa = static_cast<const CudaActivation&>(x);
    if (spec_.precision == Precision::kBF16) return InferStepT<bf16>(xa, start, kv);
    return InferStepT<float>(xa, start, kv);
  }

  uint64_t launch_generation() const override { return step_ws_.generation(); }
  absl::StatusOr<std::unique_ptr<KvPageStore>> NewKvPageStore() override {
    return std::unique_ptr<KvPageStore>(std::make_unique<CudaKvPageStore>(
        dev_, spec_.config.kv_dim(), static_cast<int64_t>(ActSize(spec_.precision))));
  }

  // Every trained gradient is one range of one fp32 buffer (grads_), in layout order: a replica
  // group's NCCL all-reduce takes it in one call. A frozen block trains its adapters alone; the
  // 1-D scratch after them is not a gradient to reduce.
  DeviceGradients device_gradients() override {
    if (train_end_ == train_begin_) return {};
    return {TrainedGrads(), static_cast<size_t>(train_end_ - train_begin_), dev_->index, dev_->Stream()};
  }

  // The sum comes back into pinned host memory, its copy marked by an event: a read waits for this
  // block's sum alone, and after the first of a span's reads the others find theirs there.
  absl::Status StartGradSquaredNorm() override {
    DeviceGuard guard(dev_->index);
    RETURN_IF_ERROR(CheckTrains());
    if (norm_host_ == nullptr) {
      void* host = nullptr;
      CUDA_RETURN_IF_ERROR(cudaHostAlloc(&host, sizeof(double), cudaHostAllocPortable));
      norm_host_.reset(static_cast<double*>(host));
    }
    if (norm_done_ == nullptr) CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&norm_done_, cudaEventDisableTiming));
    double* out = reinterpret_cast<double*>(sum_ws_.as<char>() + kernels::sum_squares_workspace_doubles() * 8);
    CUDA_RETURN_IF_ERROR(kernels::launch_sum_squares(TrainedGrads(), train_end_ - train_begin_, sum_ws_.as<double>(),
                                                     out, dev_->Stream()));
    CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(norm_host_.get(), out, sizeof(double), cudaMemcpyDeviceToHost, dev_->Stream()));
    CUDA_RETURN_IF_ERROR(cudaEventRecord(norm_done_, dev_->Stream()));
    norm_started_ = true;
    return absl::OkStatus();
  }

  absl::StatusOr<double> GradSquaredNorm() override {
    if (!norm_started_) RETURN_IF_ERROR(StartGradSquaredNorm());
    norm_started_ = false;
    DeviceGuard guard(dev_->index);
    CUDA_RETURN_IF_ERROR(cudaEventSynchronize(norm_done_));
    return *norm_host_;
  }

  absl::Status AdamWStep(const AdamWUpdate& u) override {
    DeviceGuard guard(dev_->index);
    RETURN_IF_ERROR(CheckTrains());
    const AdamWHyper& h = u.hyper;
    // Decay over the trained range's matrices (a prefix of it), or all of it with decay_norm_weights.
    const int64_t decay_end = h.decay_norm_weights ? train_end_ : std::min(layout_.decay_end, train_end_);
    const kernels::AdamWDeviceParams hp = kernels::MakeAdamWParams(h.lr, h.beta1, h.beta2, h.eps, h.weight_decay,
                                                                   u.step, u.grad_scale, decay_end - train_begin_);
    // From pageable memory the copy is staged before cudaMemcpyAsync returns, so `hp` may go.
    CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(adamw_params_.get(), &hp, sizeof(hp), cudaMemcpyHostToDevice, dev_->Stream()));
    CUDA_RETURN_IF_ERROR(kernels::launch_adamw(
        weights_.as<float>() + (train_begin_ - master_begin_), TrainedGrads(), m_.as<float>(), v_.as<float>(),
        spec_.precision == Precision::kBF16 ? weights_bf16_.as<bf16>() + train_begin_ : nullptr,
        train_end_ - train_begin_, adamw_params_.as<kernels::AdamWDeviceParams>(), dev_->Stream()));
    return absl::OkStatus();
  }

 private:
  float* Tensor(TensorKind kind) const {
    switch (kind) {
      case TensorKind::kWeights: return weights_.as<float>();
      case TensorKind::kGradients: return grads_.as<float>();
      case TensorKind::kAdamM: return m_.as<float>();
      case TensorKind::kAdamV: return v_.as<float>();
    }
    return nullptr;
  }

  // Where the buffer of `kind` begins in the layout.
  int64_t Begin(TensorKind kind) const {
    switch (kind) {
      case TensorKind::kWeights: return master_begin_;
      case TensorKind::kGradients: return grad_begin_;
      case TensorKind::kAdamM:
      case TensorKind::kAdamV: return train_begin_;
    }
    return 0;
  }
  float* TrainedGrads() const { return grads_.as<float>() + (train_begin_ - grad_begin_); }

  // A frozen block holds weights, and gradients and moments of its adapters only (the Engine asks
  // for nothing else).
  absl::Status CheckKind(TensorKind kind, int index) const {
    if (kind == TensorKind::kWeights || TrainsParam(spec_, layout_.params[index])) return absl::OkStatus();
    return absl::FailedPreconditionError(absl::StrCat("block ", spec_.id, " is frozen: ",
                                                      layout_.params[index].name, " has no ", TensorKindName(kind)));
  }
  absl::Status CheckTrains() const {
    if (train_end_ > train_begin_) return absl::OkStatus();
    return absl::FailedPreconditionError(absl::StrCat("block ", spec_.id, " is frozen"));
  }

  int64_t Off(ParamId id) const { return layout_.offset[static_cast<int>(id)]; }
  // The fp32 values of a parameter that has them (never a frozen bf16 matrix).
  const float* W32(ParamId id) const { return Off(id) < 0 ? nullptr : weights_.as<float>() + Off(id) - master_begin_; }
  // Null for a frozen block's matrices, whose weight-gradient products are skipped (GemmWeightGrad).
  float* G32(ParamId id) const {
    return Off(id) < grad_begin_ ? nullptr : grads_.as<float>() + Off(id) - grad_begin_;
  }
  // The weights the matrix products read: the fp32 masters, or their bf16 copy.
  template <class T>
  const T* W(ParamId id) const {
    if constexpr (std::is_same<T, float>::value) {
      return W32(id);
    } else {
      return weights_bf16_.as<bf16>() + Off(id);
    }
  }

  kernels::GemmMode Mode() const {
    switch (spec_.precision) {
      case Precision::kFP32: return kernels::GemmMode::kFP32;
      case Precision::kTF32: return kernels::GemmMode::kTF32;
      case Precision::kBF16: return kernels::GemmMode::kBF16;
    }
    return kernels::GemmMode::kFP32;
  }

  // The products of a linear layer with weight [out, in] over `rows` tokens, in this block's mode.
  kernels::LinearGemm Linear(int64_t rows, int64_t in, int64_t out) const { return {Mode(), rows, in, out}; }

  absl::Status Gemm(const kernels::GemmArgs& g) {
    CUDA_RETURN_IF_ERROR(dev_->gemm.Run(g, dev_->Stream()));
    return absl::OkStatus();
  }
  absl::Status Gemms(const std::vector<kernels::GemmArgs>& gs) {
    for (const kernels::GemmArgs& g : gs) RETURN_IF_ERROR(Gemm(g));
    return absl::OkStatus();
  }

  // The LoRA products at `site` over `rows` tokens, reading the adapters in the compute dtype and
  // writing their fp32 gradients; empty where the site has no target (and without lora).
  template <class T>
  LoraSiteGemms Lora(LoraSite site, int64_t rows) const {
    LoraSiteGemms g;
    g.shape = lora_sites_[static_cast<int>(site)];
    if (g.empty()) return g;
    g.mode = Mode();
    g.t = TypeOf<T>();
    g.rows = rows;
    g.rank = spec_.lora.rank;
    g.u_ld = LoraUColumns(spec_.lora);
    g.scale = static_cast<float>(spec_.lora.scale());
    g.a = W<T>(g.shape.targets.front().a);  // the site's A matrices are adjacent (kStorageOrder)
    g.da = G32(g.shape.targets.front().a);
    for (const LoraSiteTarget& t : g.shape.targets) {
      g.b.push_back(W<T>(t.b));
      g.db.push_back(G32(t.b));
    }
    return g;
  }
  // A site's product y = x W^T (+ C) with its adapters' s U B^T (U into lora_u): the adapters
  // write first where they cover y and the product adds no C, so that the product adds onto them
  // in its epilogue (lora_gemms.h); else they add after it.
  template <class T>
  absl::Status ForwardWithLora(LoraSite site, const kernels::GemmArgs& base, T* lora_u) {
    const LoraSiteGemms lora = Lora<T>(site, base.m);
    const bool first = !lora.empty() && base.c == nullptr && lora.Covers(base.n);
    if (first) RETURN_IF_ERROR(Gemms(lora.Forward(base.a, lora_u, base.d, base.ldd, base.d_type, /*add=*/false)));
    RETURN_IF_ERROR(Gemm(first ? base.AddedToD(true) : base));
    if (!first && !lora.empty()) {
      RETURN_IF_ERROR(Gemms(lora.Forward(base.a, lora_u, base.d, base.ldd, base.d_type, /*add=*/true)));
    }
    return absl::OkStatus();
  }
  // A site's input gradient dx = dY W (`base`, a BackwardInput) plus its adapters' dU A, written
  // first, and the adapters' gradients from x and U (the forward's).
  template <class T>
  absl::Status BackwardInputWithLora(LoraSite site, const kernels::GemmArgs& base, const void* x, const void* lora_u,
                                     void* du, bool accumulate) {
    const LoraSiteGemms lora = Lora<T>(site, base.m);
    RETURN_IF_ERROR(Gemms(lora.Backward(x, lora_u, base.a, base.lda, du, base.d, base.d_type, accumulate)));
    return Gemm(base.AddedToD(!lora.empty()));
  }
  // A weight-gradient product into `dw`; nothing for a frozen matrix (dw null).
  absl::Status GemmWeightGrad(const float* dw, const kernels::GemmArgs& g) {
    return dw == nullptr ? absl::OkStatus() : Gemm(g);
  }

  // The attention of a forward's saved q, k (after norm and rope), v (inside q|k|v), o and lse:
  // what the forward writes and the backward reads again.
  template <class T>
  static kernels::AttentionArgs<T> Attention(const CudaSaved& s, const Dims& m, cudaStream_t stream) {
    auto a = kernels::AttentionArgs<T>::Causal(static_cast<int>(m.batch), static_cast<int>(m.seq), m.heads,
                                               m.kv_heads, m.dh, stream);
    a.q = s.q.as<T>();
    a.q_stride = m.qd;
    a.k = s.k.as<T>();
    a.k_stride = m.kvd;
    a.v = s.qkv.as<T>() + m.qd + m.kvd;
    a.v_stride = m.qkv;
    a.o = s.o.as<T>();
    a.o_stride = m.qd;
    a.lse = s.lse.as<float>();
    return a;
  }

  absl::StatusOr<DeviceBuffer> Alloc(size_t bytes) { return DeviceBuffer::Allocate(dev_, bytes); }

  template <class T>
  absl::StatusOr<std::unique_ptr<Activation>> ForwardT(std::unique_ptr<Activation> x_in, int64_t offset,
                                                       std::unique_ptr<SavedActivations>* saved_out) {
    auto& x_act = static_cast<CudaActivation&>(*x_in);
    const BlockConfig& c = spec_.config;
    const Dims m = DimsOf(c, spec_.lora, x_act.batch(), x_act.seq());
    const size_t t = sizeof(T);
    cudaStream_t st = dev_->Stream();
    const float eps = static_cast<float>(c.rms_norm_eps);
    auto s = std::make_unique<CudaSaved>();
    s->batch = m.batch;
    s->seq = m.seq;
    s->bytes_ = SavedBytesFor(c, spec_.lora, spec_.precision, m.batch, m.seq);

    // Backward reads the input again: when keeping activations, the input's memory becomes the
    // saved x. Otherwise x_in frees it, in stream order, when this returns.
    const float* x = x_act.data();
    if (saved_out != nullptr) s->x = x_act.ReleaseData();
    ASSIGN_OR_RETURN(s->n1, Alloc(m.n * m.d * t));
    ASSIGN_OR_RETURN(s->rstd1, Alloc(m.n * 4));
    ASSIGN_OR_RETURN(s->qkv, Alloc(m.n * m.qkv * t));
    if (c.qk_norm) {
      ASSIGN_OR_RETURN(s->rstd_q, Alloc(m.n * m.heads * 4));
      ASSIGN_OR_RETURN(s->rstd_k, Alloc(m.n * m.kv_heads * 4));
    }
    ASSIGN_OR_RETURN(s->q, Alloc(m.n * m.qd * t));
    ASSIGN_OR_RETURN(s->k, Alloc(m.n * m.kvd * t));
    ASSIGN_OR_RETURN(s->table, Alloc(m.seq * (m.dh / 2) * 8));
    ASSIGN_OR_RETURN(s->o, Alloc(m.n * m.qd * t));
    ASSIGN_OR_RETURN(s->lse, Alloc(m.batch * m.heads * m.seq * 4));
    ASSIGN_OR_RETURN(s->r1, Alloc(m.n * m.d * 4));
    ASSIGN_OR_RETURN(s->rstd2, Alloc(m.n * 4));
    ASSIGN_OR_RETURN(s->n2, Alloc(m.n * m.d * t));
    ASSIGN_OR_RETURN(s->gu, Alloc(m.n * 2 * m.f * t));
    ASSIGN_OR_RETURN(s->h, Alloc(m.n * m.f * t));
    if (m.lora_u > 0) {
      ASSIGN_OR_RETURN(s->lora_u, Alloc(m.n * m.lora_u * t));
    }
    ASSIGN_OR_RETURN(std::unique_ptr<CudaActivation> out, NewActivation(dev_, m.batch, m.seq, m.d));

    T* qkv = s->qkv.as<T>();
    RETURN_IF_ERROR(NormAndQkv<T>(x, s->n1.as<T>(), s->rstd1.as<float>(), qkv, s->lora_u.as<T>(), m));
    // QK-norm and RoPE on q and k; v stays in place inside q|k|v.
    auto* table = s->table.as<float2>();
    CUDA_RETURN_IF_ERROR(kernels::launch_rope_table(table, static_cast<int>(m.seq), m.dh, offset,
                                                    inv_freq_.as<double>(), rope_scale_, st));
    CUDA_RETURN_IF_ERROR(kernels::launch_qknorm_rope_fwd<T>(qkv, m.qkv, s->q.as<T>(), s->rstd_q.as<float>(),
                                                            W32(ParamId::kQNorm), table, m.n, static_cast<int>(m.seq),
                                                            m.heads, m.dh, eps, st));
    CUDA_RETURN_IF_ERROR(kernels::launch_qknorm_rope_fwd<T>(qkv + m.qd, m.qkv, s->k.as<T>(), s->rstd_k.as<float>(),
                                                            W32(ParamId::kKNorm), table, m.n, static_cast<int>(m.seq),
                                                            m.kv_heads, m.dh, eps, st));
    RETURN_IF_ERROR(attention_.Forward(Attention<T>(*s, m, st)));
    RETURN_IF_ERROR(OutputAndMlp<T>(x, s->o.as<T>(), s->r1.as<float>(), s->n2.as<T>(), s->rstd2.as<float>(),
                                    s->gu.as<T>(), s->h.as<T>(), out->data(), s->lora_u.as<T>(), m));
    // Unless kept, the buffers go back to the pool in stream order when `s` goes; nothing waits here.
    if (saved_out != nullptr) *saved_out = std::move(s);
    RETURN_IF_ERROR(out->MarkReady(st));
    return std::unique_ptr<Activation>(std::move(out));
  }

  // n1 = rmsnorm(x) * w_in;  q|k|v = n1 [Wq|Wk|Wv]^T (+ [bq|bk|bv]) (+ the adapters', their U into
  // lora_u): the start of Forward and InferStep.
  template <class T>
  absl::Status NormAndQkv(const float* x, T* n1, float* rstd1, T* qkv, T* lora_u, const Dims& m) {
    cudaStream_t st = dev_->Stream();
    CUDA_RETURN_IF_ERROR(kernels::launch_rmsnorm_fwd<T>(x, W32(ParamId::kInputNorm), n1, rstd1, m.n,
                                                        static_cast<int>(m.d),
                                                        static_cast<float>(spec_.config.rms_norm_eps), st));
    RETURN_IF_ERROR(ForwardWithLora<T>(
        LoraSite::kQkv, Linear(m.n, m.d, m.qkv).Forward(n1, W<T>(ParamId::kQProj), qkv, TypeOf<T>()), lora_u));
    if (spec_.config.attention_bias) {  // adjacent in storage; before QK-norm and RoPE as in HF
      CUDA_RETURN_IF_ERROR(
          kernels::launch_add_bias<T>(qkv, m.qkv, W32(ParamId::kQBias), m.n, static_cast<int>(m.qkv), st));
    }
    return absl::OkStatus();
  }

  // From the attention's output o on: r1 = x + o Wo^T, out = r1 + mlp(rmsnorm(r1)), each product
  // with its adapters' (U into lora_u). The end of Forward and InferStep.
  template <class T>
  absl::Status OutputAndMlp(const float* x, const T* o, float* r1, T* n2, float* rstd2, T* gu, T* h, float* out,
                            T* lora_u, const Dims& m) {
    cudaStream_t st = dev_->Stream();
    // r1 = x + o Wo^T (the residual enters as C)
    const kernels::LinearGemm o_proj = Linear(m.n, m.qd, m.d);
    RETURN_IF_ERROR(
        ForwardWithLora<T>(LoraSite::kO, o_proj.Forward(o, W<T>(ParamId::kOProj), r1, GemmType::kF32).PlusC(x), lora_u));
    CUDA_RETURN_IF_ERROR(kernels::launch_rmsnorm_fwd<T>(r1, W32(ParamId::kPostNorm), n2, rstd2, m.n,
                                                        static_cast<int>(m.d),
                                                        static_cast<float>(spec_.config.rms_norm_eps), st));
    const kernels::GemmArgs gate_up = Linear(m.n, m.d, 2 * m.f).Forward(n2, W<T>(ParamId::kGateProj), gu, TypeOf<T>());
    // A decode step's few rows without adapters here: h in the gate|up product's epilogue (gemv.cuh).
    const bool fused = std::is_same<T, bf16>::value && lora_sites_[static_cast<int>(LoraSite::kGateUp)].targets.empty() &&
                       kernels::gemv_swiglu_applies(gate_up);
    if (fused) {
      CUDA_RETURN_IF_ERROR(kernels::launch_gemv_swiglu(gate_up, reinterpret_cast<bf16*>(h), m.f, st));
    } else {
      RETURN_IF_ERROR(ForwardWithLora<T>(LoraSite::kGateUp, gate_up, lora_u));
      CUDA_RETURN_IF_ERROR(kernels::launch_swiglu_fwd<T>(gu, h, m.n, m.f, st));
    }
    // out = r1 + h Wdown^T
    const kernels::LinearGemm down = Linear(m.n, m.f, m.d);
    return ForwardWithLora<T>(LoraSite::kDown, down.Forward(h, W<T>(ParamId::kDownProj), out, GemmType::kF32).PlusC(r1),
                              lora_u);
  }

  // One inference step (Block::InferStep): Forward's math with RoPE at each row's positions, the
  // new K/V written into their pages and attention over the row's cached prefix read through the
  // page table. A fresh batch (every row at position 0) attends only among its new tokens, so it
  // runs Forward's attention (flash or cuDNN) instead.
  template <class T>
  absl::StatusOr<std::unique_ptr<Activation>> InferStepT(const CudaActivation& xa, const std::vector<int64_t>& start,
                                                         const KvBlockView& view) {
    const BlockConfig& c = spec_.config;
    const Dims m = DimsOf(c, spec_.lora, xa.batch(), xa.seq());
    const size_t t = sizeof(T);
    cudaStream_t st = dev_->Stream();
    const float eps = static_cast<float>(c.rms_norm_eps);
    const auto& store = static_cast<const CudaKvPageStore&>(*view.pages);

    // start [batch] then the page tables [batch, width], int32, for the kernels; when the rows
    // come from several stores (a batch of session families), then row_chunk [batch],
    // row_chunk_pages [batch] and, 8-byte aligned, every store's chunk pointers (PagedKv).
    std::vector<const CudaKvPageStore*> stores;  // distinct, in row order
    std::vector<int32_t> store_chunk;             // each one's first chunk in chunk_ptrs
    std::vector<void*> chunk_ptrs;
    std::vector<int32_t> row_chunk(static_cast<size_t>(m.batch)), row_chunk_pages(static_cast<size_t>(m.batch));
    for (int64_t r = 0; r < m.batch; ++r) {
      const auto* rs = static_cast<const CudaKvPageStore*>(view.store(r));
      const size_t i = static_cast<size_t>(std::find(stores.begin(), stores.end(), rs) - stores.begin());
      if (i == stores.size()) {
        stores.push_back(rs);
        store_chunk.push_back(static_cast<int32_t>(chunk_ptrs.size()));
        chunk_ptrs.insert(chunk_ptrs.end(), rs->chunk_ptrs().begin(), rs->chunk_ptrs().end());
      }
      row_chunk[r] = store_chunk[i];
      row_chunk_pages[r] = static_cast<int32_t>(rs->chunk_pages());
    }
    const bool several_stores = stores.size() > 1;
    bool fresh = true;
    int64_t max_len = 0;
    for (int64_t r = 0; r < m.batch; ++r) {
      fresh = fresh && start[r] == 0;
      max_len = std::max(max_len, start[r] + m.seq);
    }
    const size_t row_chunk_at = static_cast<size_t>(m.batch + m.batch * view.table_width);
    const size_t ptrs_at = (row_chunk_at + 2 * m.batch + 1) / 2 * 2;
    const int32_t* meta_d = view.device_meta;
    if (meta_d != nullptr && !several_stores) {
      // The span's one copy (StepGraph::StageMeta); the attention planned per bucket of lengths.
      max_len = (max_len + kStepGraphPositions - 1) / kStepGraphPositions * kStepGraphPositions;
    } else {
      std::vector<int32_t> meta(row_chunk_at);
      for (int64_t r = 0; r < m.batch; ++r) meta[r] = static_cast<int32_t>(start[r]);
      std::copy(view.table, view.table + m.batch * view.table_width, meta.begin() + m.batch);
      if (several_stores) {
        meta.insert(meta.end(), row_chunk.begin(), row_chunk.end());
        meta.insert(meta.end(), row_chunk_pages.begin(), row_chunk_pages.end());
        meta.resize(ptrs_at + 2 * chunk_ptrs.size());
        std::memcpy(meta.data() + ptrs_at, chunk_ptrs.data(), chunk_ptrs.size() * sizeof(void*));
      }
      // One async copy from pinned memory (StepWorkspace), no allocation once warmed.
      ASSIGN_OR_RETURN(const void* meta_ptr, step_ws_.Upload(meta.data(), meta.size() * 4));
      meta_d = static_cast<const int32_t*>(meta_ptr);
    }

    // The step's buffers, carved from one piece: the block's kept scratch for a decode-sized step
    // (no allocation once warmed), a stream-ordered allocation for a prefill.
    const int splits = fresh ? 1
                             : kernels::paged_attention_splits<T>(m.batch, m.seq, m.heads, m.kv_heads, m.dh, max_len,
                                                               dev_->props.multiProcessorCount);
    const int64_t ws_floats = kernels::paged_attention_workspace_floats(m.batch, m.seq, m.heads, m.dh, splits);
    struct StepBuffers {
      T *n1, *qkv, *q, *k, *o, *gu, *h, *lora_u;
      float *rstd, *r1, *lse, *ws;
      float2* table;
    } b;
    auto carve = [&](Carver cv) {
      b.n1 = cv.Take<T>(m.n * m.d * t);  // also n2
      b.rstd = cv.Take<float>(m.n * std::max(m.heads, 1) * 4);
      b.qkv = cv.Take<T>(m.n * m.qkv * t);
      b.q = cv.Take<T>(m.n * m.qd * t);
      b.k = cv.Take<T>(fresh ? m.n * m.kvd * t : 0);  // a fresh batch's attention reads K from here
      b.table = cv.Take<float2>(fresh ? m.seq * (m.dh / 2) * 8 : 0);
      b.o = cv.Take<T>(m.n * m.qd * t);
      b.lse = cv.Take<float>(fresh ? m.batch * m.heads * m.seq * 4 : 0);
      b.ws = cv.Take<float>(static_cast<size_t>(ws_floats) * 4);
      b.r1 = cv.Take<float>(m.n * m.d * 4);
      b.gu = cv.Take<T>(m.n * 2 * m.f * t);
      b.h = cv.Take<T>(m.n * m.f * t);
      b.lora_u = cv.Take<T>(m.n * m.lora_u * t);
      return cv.used();
    };
    const size_t step_bytes = carve(Carver());
    DeviceBuffer prefill_scratch;  // freed in stream order when the step returns
    char* base = nullptr;
    if (m.n <= std::max<int64_t>(spec_.max_batch_size, 1)) {
      ASSIGN_OR_RETURN(base, step_ws_.Scratch(step_bytes));
    } else {
      ASSIGN_OR_RETURN(prefill_scratch, Alloc(step_bytes));
      base = prefill_scratch.as<char>();
    }
    carve(Carver(base));
    ASSIGN_OR_RETURN(std::unique_ptr<CudaActivation> out, NewActivation(dev_, m.batch, m.seq, m.d));

    RETURN_IF_ERROR(NormAndQkv<T>(xa.data(), b.n1, b.rstd, b.qkv, b.lora_u, m));
    kernels::PagedKv<T> kv;
    kv.chunks = store.chunks<T>();
    kv.chunk_pages = store.chunk_pages();
    if (several_stores) {
      kv.chunks = reinterpret_cast<T* const*>(meta_d + ptrs_at);
      kv.row_chunk = meta_d + row_chunk_at;
      kv.row_chunk_pages = kv.row_chunk + m.batch;
    }
    kv.start = meta_d;
    kv.table = meta_d + m.batch;
    kv.table_width = view.table_width;
    kv.kv_dim = m.kvd;
    if (fresh) {
      // Every row at position 0: one rotation table, QK-norm and RoPE as Forward's, K/V into the
      // pages, then Forward's attention among the new tokens.
      const int seq = static_cast<int>(m.seq);
      CUDA_RETURN_IF_ERROR(kernels::launch_rope_table(b.table, seq, m.dh, 0, inv_freq_.as<double>(), rope_scale_, st));
      CUDA_RETURN_IF_ERROR(kernels::launch_qknorm_rope_fwd<T>(b.qkv, m.qkv, b.q, b.rstd, W32(ParamId::kQNorm), b.table,
                                                              m.n, seq, m.heads, m.dh, eps, st));
      CUDA_RETURN_IF_ERROR(kernels::launch_qknorm_rope_fwd<T>(b.qkv + m.qd, m.qkv, b.k, b.rstd, W32(ParamId::kKNorm),
                                                              b.table, m.n, seq, m.kv_heads, m.dh, eps, st));
      const T* v = b.qkv + m.qd + m.kvd;
      CUDA_RETURN_IF_ERROR(kernels::launch_paged_kv_write<T>(kv, b.k, m.kvd, v, m.qkv, m.batch, m.seq, st));
      auto a = kernels::AttentionArgs<T>::Causal(static_cast<int>(m.batch), seq, m.heads, m.kv_heads, m.dh, st);
      a.q = b.q;
      a.q_stride = m.qd;
      a.k = b.k;
      a.k_stride = m.kvd;
      a.v = v;
      a.v_stride = m.qkv;
      a.o = b.o;
      a.o_stride = m.qd;
      a.lse = b.lse;
      RETURN_IF_ERROR(attention_.Forward(a));
    } else {
      // Onto a cached prefix: q, k and v at each row's own positions in one launch (k and v
      // straight into the pages), then attention over the pages.
      CUDA_RETURN_IF_ERROR(kernels::launch_paged_qkv<T>(b.qkv, m.qkv, b.q, W32(ParamId::kQNorm), W32(ParamId::kKNorm),
                                                        inv_freq_.as<double>(), rope_scale_, kv, m.batch, m.seq,
                                                        m.heads, m.kv_heads, m.dh, eps, st));
      CUDA_RETURN_IF_ERROR(kernels::launch_paged_attention<T>(kv, b.q, m.qd, b.o, m.qd, m.batch, m.seq, m.heads,
                                                              m.kv_heads, m.dh, max_len, splits, b.ws, st));
    }
    // n1's memory serves as n2.
    RETURN_IF_ERROR(OutputAndMlp<T>(xa.data(), b.o, b.r1, b.n1, b.rstd, b.gu, b.h, out->data(), b.lora_u, m));
    // The scratch is reused by the next step in stream order; nothing waits here.
    RETURN_IF_ERROR(out->MarkReady(st));
    return std::unique_ptr<Activation>(std::move(out));
  }

  template <class T>
  absl::StatusOr<std::unique_ptr<Activation>> BackwardT(const SavedActivations& saved_in, const Activation& grad_out,
                                                        bool accumulate) {
    const auto& s = static_cast<const CudaSaved&>(saved_in);
    const auto& dy_act = static_cast<const CudaActivation&>(grad_out);
    const BlockConfig& c = spec_.config;
    const Dims m = DimsOf(c, spec_.lora, s.batch, s.seq);
    const size_t t = sizeof(T);
    const GemmType tt = TypeOf<T>();
    cudaStream_t st = dev_->Stream();
    const float* dy = dy_act.data();

    // The matrix products read the output gradient as T.
    DeviceBuffer dy_t_buf;
    const void* dy_t = dy;
    if constexpr (!std::is_same<T, float>::value) {
      ASSIGN_OR_RETURN(dy_t_buf, Alloc(m.n * m.d * t));
      CUDA_RETURN_IF_ERROR(kernels::launch_float_to_bf16(dy, dy_t_buf.as<bf16>(), m.n * m.d, st));
      dy_t = dy_t_buf.get();
    }
    ASSIGN_OR_RETURN(DeviceBuffer dh, Alloc(m.n * m.f * t));
    ASSIGN_OR_RETURN(DeviceBuffer dgu, Alloc(m.n * 2 * m.f * t));
    ASSIGN_OR_RETURN(DeviceBuffer dn, Alloc(m.n * m.d * 4));  // dn2, later dn1
    ASSIGN_OR_RETURN(DeviceBuffer dr1, Alloc(m.n * m.d * 4));
    ASSIGN_OR_RETURN(DeviceBuffer d_o, Alloc(m.n * m.qd * t));
    ASSIGN_OR_RETURN(DeviceBuffer dqkv, Alloc(m.n * m.qkv * t));
    DeviceBuffer du;  // the adapters' dU, site by site in U's columns
    if (m.lora_u > 0) {
      ASSIGN_OR_RETURN(du, Alloc(m.n * m.lora_u * t));
    }

    // MLP: out = r1 + h Wd^T, h = silu(gate) * up (kept by the forward).
    const kernels::LinearGemm down = Linear(m.n, m.f, m.d);
    RETURN_IF_ERROR(GemmWeightGrad(G32(ParamId::kDownProj),
                                        down.BackwardWeight(dy_t, s.h.get(), G32(ParamId::kDownProj), accumulate)));
    RETURN_IF_ERROR(BackwardInputWithLora<T>(LoraSite::kDown,
                                             down.BackwardInput(dy_t, W<T>(ParamId::kDownProj), dh.get(), tt),
                                             s.h.get(), s.lora_u.get(), du.get(), accumulate));
    CUDA_RETURN_IF_ERROR(kernels::launch_swiglu_bwd<T>(dh.as<T>(), s.gu.as<T>(), dgu.as<T>(), m.n, m.f, st));
    const kernels::LinearGemm gate_up = Linear(m.n, m.d, 2 * m.f);
    RETURN_IF_ERROR(GemmWeightGrad(G32(ParamId::kGateProj),
                                        gate_up.BackwardWeight(dgu.get(), s.n2.get(), G32(ParamId::kGateProj), accumulate)));
    RETURN_IF_ERROR(BackwardInputWithLora<T>(
        LoraSite::kGateUp, gate_up.BackwardInput(dgu.get(), W<T>(ParamId::kGateProj), dn.get(), GemmType::kF32),
        s.n2.get(), s.lora_u.get(), du.get(), accumulate));
    // dr1 = dy + the post-attention norm's backward (and its bf16 copy for the products below).
    DeviceBuffer dr1_t_buf;
    const void* dr1_t = dr1.get();
    if constexpr (!std::is_same<T, float>::value) {
      ASSIGN_OR_RETURN(dr1_t_buf, Alloc(m.n * m.d * t));
      dr1_t = dr1_t_buf.get();
    }
    CUDA_RETURN_IF_ERROR(kernels::launch_rmsnorm_bwd(
        dn.as<float>(), s.r1.as<float>(), W32(ParamId::kPostNorm), s.rstd2.as<float>(), dy, dr1.as<float>(),
        std::is_same<T, float>::value ? nullptr : dr1_t_buf.as<bf16>(), G32(ParamId::kPostNorm), accumulate,
        rms_ws_.as<float>(), m.n, static_cast<int>(m.d), st));
    // Attention output projection.
    const kernels::LinearGemm o_proj = Linear(m.n, m.qd, m.d);
    RETURN_IF_ERROR(GemmWeightGrad(G32(ParamId::kOProj),
                                        o_proj.BackwardWeight(dr1_t, s.o.get(), G32(ParamId::kOProj), accumulate)));
    RETURN_IF_ERROR(BackwardInputWithLora<T>(LoraSite::kO,
                                             o_proj.BackwardInput(dr1_t, W<T>(ParamId::kOProj), d_o.get(), tt),
                                             s.o.get(), s.lora_u.get(), du.get(), accumulate));
    T* dqkv_t = dqkv.as<T>();
    kernels::AttentionArgs<T> attn = Attention<T>(s, m, st);
    attn.d_o = d_o.as<T>();
    attn.do_stride = m.qd;
    attn.dv = dqkv_t + m.qd + m.kvd;  // dv goes straight into its part of dq|dk|dv
    attn.dv_stride = m.qkv;
    ASSIGN_OR_RETURN(QkGrads dqk, attention_.Backward(attn));
    // RoPE and QK-norm backward into the q and k parts of dqkv, from fp32 or (cuDNN) bf16 dq, dk.
    if constexpr (!std::is_same<T, float>::value) {
      if (dqk.bf16) {
        return QkBackwardAndInput<T>(s, m, dqk.dq.as<bf16>(), dqk.dk.as<bf16>(), dqkv, dn, dr1, du, accumulate);
      }
    }
    return QkBackwardAndInput<T>(s, m, dqk.dq.as<float>(), dqk.dk.as<float>(), dqkv, dn, dr1, du, accumulate);
  }

  // The rest of BackwardT from the attention's dq and dk (G: their dtype) on: QK-norm and RoPE
  // backward, the q|k|v projection's gradients (and its adapters', dU into du) and the input norm's
  // backward into dx.
  template <class T, class G>
  absl::StatusOr<std::unique_ptr<Activation>> QkBackwardAndInput(const CudaSaved& s, const Dims& m, const G* dq,
                                                                 const G* dk, const DeviceBuffer& dqkv,
                                                                 const DeviceBuffer& dn, const DeviceBuffer& dr1,
                                                                 const DeviceBuffer& du, bool accumulate) {
    cudaStream_t st = dev_->Stream();
    T* dqkv_t = dqkv.as<T>();
    const auto* table = s.table.as<float2>();
    CUDA_RETURN_IF_ERROR(kernels::launch_qknorm_rope_bwd<T>(
        dq, s.qkv.as<T>(), m.qkv, s.rstd_q.as<float>(), W32(ParamId::kQNorm), table, dqkv_t,
        G32(ParamId::kQNorm), accumulate, qk_ws_.as<float>(), m.n, static_cast<int>(m.seq), m.heads, m.dh, st));
    CUDA_RETURN_IF_ERROR(kernels::launch_qknorm_rope_bwd<T>(
        dk, s.qkv.as<T>() + m.qd, m.qkv, s.rstd_k.as<float>(), W32(ParamId::kKNorm), table,
        dqkv_t + m.qd, G32(ParamId::kKNorm), accumulate, qk_ws_.as<float>(), m.n, static_cast<int>(m.seq),
        m.kv_heads, m.dh, st));
    if (spec_.config.attention_bias) {  // d[bq|bk|bv] = column sums of dq|dk|dv
      CUDA_RETURN_IF_ERROR(kernels::launch_bias_bwd<T>(dqkv_t, m.qkv, m.n, static_cast<int>(m.qkv),
                                                       G32(ParamId::kQBias), accumulate, bias_ws_.as<float>(), st));
    }
    ASSIGN_OR_RETURN(std::unique_ptr<CudaActivation> dx, NewActivation(dev_, m.batch, m.seq, m.d));
    // q|k|v = n1 W^T (+ b)
    const kernels::LinearGemm qkv_proj = Linear(m.n, m.d, m.qkv);
    RETURN_IF_ERROR(GemmWeightGrad(G32(ParamId::kQProj),
                                        qkv_proj.BackwardWeight(dqkv.get(), s.n1.get(), G32(ParamId::kQProj), accumulate)));
    RETURN_IF_ERROR(BackwardInputWithLora<T>(
        LoraSite::kQkv, qkv_proj.BackwardInput(dqkv.get(), W<T>(ParamId::kQProj), dn.get(), GemmType::kF32),
        s.n1.get(), s.lora_u.get(), du.get(), accumulate));
    // dx = dr1 + the input norm's backward.
    CUDA_RETURN_IF_ERROR(kernels::launch_rmsnorm_bwd(dn.as<float>(), s.x.as<float>(), W32(ParamId::kInputNorm),
                                                     s.rstd1.as<float>(), dr1.as<float>(), dx->data(), nullptr,
                                                     G32(ParamId::kInputNorm), accumulate, rms_ws_.as<float>(), m.n,
                                                     static_cast<int>(m.d), st));
    RETURN_IF_ERROR(dx->MarkReady(st));
    return std::unique_ptr<Activation>(std::move(dx));
  }

  BlockSpec spec_;
  DeviceContext* dev_;
  Layout layout_;
  DeviceBuffer weights_, grads_, m_, v_, weights_bf16_;
  DeviceBuffer adamw_params_, sum_ws_, rms_ws_, qk_ws_, bias_ws_;
  // StartGradSquaredNorm's readback: made by the first one (a frozen block without adapters never asks).
  struct FreeHost {
    void operator()(double* p) const { cudaFreeHost(p); }
  };
  std::unique_ptr<double, FreeHost> norm_host_;
  cudaEvent_t norm_done_ = nullptr;
  bool norm_started_ = false;
  DeviceBuffer inv_freq_;  // RopeInvFreq(config), head_dim / 2 doubles
  StepWorkspace step_ws_{dev_};  // InferStep's kept scratch and pinned table upload
  // Where weights_ and grads_ begin in the layout: 0, or for a frozen block adapter_begin (weights_:
  // only with BF16, whose base matrices live in weights_bf16_ alone; grads_: always, the adapters'
  // gradients and the 1-D scratch). m_ and v_ hold [train_begin_, train_end_): everything, or a
  // frozen block's adapters.
  int64_t master_begin_ = 0, grad_begin_ = 0, train_begin_ = 0, train_end_ = 0;
  std::array<LoraSiteShape, 4> lora_sites_ = {LoraSiteOf(LoraSite::kQkv, spec_.config, spec_.lora),
                                              LoraSiteOf(LoraSite::kO, spec_.config, spec_.lora),
                                              LoraSiteOf(LoraSite::kGateUp, spec_.config, spec_.lora),
                                              LoraSiteOf(LoraSite::kDown, spec_.config, spec_.lora)};
  double rope_scale_ = 1;  // RopeAttentionScaling(config)
  AttentionRunner attention_;
};

}  // namespace

absl::Status CudaActivation::MarkReady(cudaStream_t stream) {
  if (ready_ == nullptr) CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&ready_, cudaEventDisableTiming));
  CUDA_RETURN_IF_ERROR(cudaEventRecord(ready_, stream));
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<CudaActivation>> NewActivation(DeviceContext* dev, int64_t batch, int64_t seq,
                                                               int64_t width) {
  ASSIGN_OR_RETURN(DeviceBuffer buf, DeviceBuffer::Allocate(dev, static_cast<size_t>(batch * seq * width) * 4));
  return std::make_unique<CudaActivation>(dev->index, batch, seq, width, std::move(buf));
}

absl::StatusOr<std::unique_ptr<Block>> CreateCudaBlock(const BlockSpec& spec, DeviceContext* dev,
                                                       AttentionMode attention) {
  auto block = std::make_unique<CudaBlock>(spec, dev);
  RETURN_IF_ERROR(block->Init(attention));
  return std::unique_ptr<Block>(std::move(block));
}

}  // namespace blockd::cuda
