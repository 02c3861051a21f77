#include "server/service.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <exception>
#include <functional>
#include <new>
#include <type_traits>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "base/echo.h"
#include "base/status_macros.h"
#include "engine/checkpoint.h"
#include "server/convert.h"

namespace blockd {

// One RPC's admission, timing and metrics: Finish() records its code and duration exactly once.
class BlockServiceImpl::Call {
 public:
  Call(BlockServiceImpl* service, const char* method) : service_(service), method_(method), start_(absl::Now()) {
    service_->metrics_->RequestStarted();
    ++service_->inflight_;
  }
  ~Call() {
    if (!done_) Finish(grpc::Status(grpc::StatusCode::CANCELLED, "call dropped"));
  }
  // Returns the status to hand to the reactor's Finish.
  grpc::Status Finish(grpc::Status s) {
    if (!done_) {
      done_ = true;
      --service_->inflight_;
      service_->metrics_->RequestDone(method_, s.error_code(), absl::ToDoubleSeconds(absl::Now() - start_));
    }
    return s;
  }

 private:
  BlockServiceImpl* service_;
  const char* method_;
  absl::Time start_;
  bool done_ = false;
};

// A unary reactor that can take back what a call handed out when its reply never reached the
// client: OnDone runs after everything else, and IsCancelled() then says whether the RPC failed
// before its status got back (client cancel, deadline, broken connection). Without this, a Forward
// whose client cancelled just after the engine finished would leave its activation handle until
// the TTL.
class BlockServiceImpl::UnaryReactor : public grpc::ServerUnaryReactor {
 public:
  explicit UnaryReactor(grpc::CallbackServerContext* ctx) : ctx_(ctx) {}
  // Set before Finish (on the thread that calls Finish).
  void UndoIfCancelled(std::function<void()> undo) { undo_ = std::move(undo); }
  void OnCancel() override {}
  void OnDone() override {
    if (undo_ && ctx_->IsCancelled()) undo_();
    delete this;
  }

 private:
  grpc::CallbackServerContext* ctx_;
  std::function<void()> undo_;
};

namespace {

// The engine reports what it can foresee as a Status; an allocation that fails anyway (a backend's
// scratch memory the budget does not model) must not take the daemon down with every other
// client's blocks: it becomes RESOURCE_EXHAUSTED for this call only.
template <class Fn>
absl::Status Guarded(Fn& fn) {
  try {
    return fn();
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError("the server ran out of host memory serving this call; try a smaller input");
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("unexpected exception: ", e.what()));
  }
}

}  // namespace

BlockServiceImpl::BlockServiceImpl(Engine* engine, Metrics* metrics, ThreadPool* pool, const Authenticator* auth,
                                   Checkpointer* checkpointer, ServiceOptions options)
    : engine_(engine),
      metrics_(metrics),
      pool_(pool),
      auth_(auth),
      checkpointer_(checkpointer),
      options_(std::move(options)) {}

absl::Status BlockServiceImpl::Admit(grpc::CallbackServerContext* ctx, Access access) {
  if (draining_) return absl::UnavailableError("blockd is draining: it finishes the calls in flight and stops");
  if (inflight_ > options_.max_concurrent_rpcs) {
    return absl::ResourceExhaustedError(absl::StrCat("blockd is serving ", options_.max_concurrent_rpcs,
                                                     " calls already (--max_concurrent_rpcs); retry later"));
  }
  if (ctx->deadline() <= std::chrono::system_clock::now()) {
    return absl::DeadlineExceededError("the call's deadline passed before it started");
  }
  if (auth_ != nullptr && auth_->enabled()) {
    std::string authorization;
    auto it = ctx->client_metadata().find("authorization");
    if (it != ctx->client_metadata().end()) authorization.assign(it->second.data(), it->second.size());
    auto who = auth_->Check(authorization, /*admin=*/access == Access::kAdmin);
    if (!who.ok()) return who.status();
  }
  return absl::OkStatus();
}

std::string BlockServiceImpl::ClientOf(grpc::CallbackServerContext* ctx) const {
  const auto& md = ctx->client_metadata();
  if (auth_ != nullptr && auth_->enabled()) {
    auto it = md.find("authorization");
    if (it != md.end()) {
      auto who = auth_->Check(absl::string_view(it->second.data(), it->second.size()), false);
      if (who.ok()) return *who;
    }
  }
  auto it = md.find("blockd-client");
  if (it != md.end() && it->second.size() <= 64) return std::string(it->second.data(), it->second.size());
  std::string peer = ctx->peer();  // "ipv4:127.0.0.1:5555": the address without the port
  const size_t colon = peer.rfind(':');
  if (colon != std::string::npos && peer.find(':') != colon) peer.resize(colon);
  return peer;
}

template <class Fn>
grpc::ServerUnaryReactor* BlockServiceImpl::Unary(grpc::CallbackServerContext* ctx, const char* method,
                                                  const google::protobuf::Message& req,
                                                  const google::protobuf::Message* resp, Work work,
                                                  Access access, Fn fn) {
  auto* reactor = new UnaryReactor(ctx);
  auto call = std::make_shared<Call>(this, method);
  metrics_->bytes_received->Increment(static_cast<double>(req.ByteSizeLong()));
  absl::Status admitted = Admit(ctx, access);
  if (!admitted.ok()) {
    reactor->Finish(call->Finish(ToGrpcStatus(admitted)));
    return reactor;
  }
  auto run = [this, ctx, reactor, call, resp, fn = std::move(fn)]() mutable {
    absl::Status s;
    if (ctx->IsCancelled()) {
      s = absl::CancelledError("the client cancelled the call (or its deadline passed) before it ran");
    } else if constexpr (std::is_invocable_v<Fn&, UnaryReactor*>) {
      auto with_reactor = [&] { return fn(reactor); };
      s = Guarded(with_reactor);
    } else {
      s = Guarded(fn);
    }
    if (s.ok()) metrics_->bytes_sent->Increment(static_cast<double>(resp->ByteSizeLong()));
    reactor->Finish(call->Finish(ToGrpcStatus(s)));
  };
  if (work == Work::kPool) {
    pool_->Submit(std::move(run));
  } else {
    run();
  }
  return reactor;
}

grpc::ServerUnaryReactor* BlockServiceImpl::GetServerInfo(grpc::CallbackServerContext* ctx,
                                                          const v1::GetServerInfoRequest* req,
                                                          v1::GetServerInfoResponse* resp) {
  return Unary(ctx, "GetServerInfo", *req, resp, Work::kInline, Access::kUser, [this, resp] {
    Backend& backend = engine_->backend();
    const EngineStats stats = engine_->Stats();
    resp->set_version(options_.version);
    resp->set_backend(std::string(backend.name()));
    resp->set_backend_reason(options_.backend_reason);
    resp->set_attention_backend(options_.attention_backend);
    resp->set_attention_reason(options_.attention_reason);
    for (const DeviceInfo& d : backend.devices()) {
      v1::DeviceInfo* out = resp->add_devices();
      out->set_index(d.index);
      out->set_kind(d.kind);
      out->set_name(d.name);
      out->set_memory_total_bytes(d.memory_total_bytes);
      out->set_memory_budget_bytes(stats.memory_budget.at(d.index));
      out->set_memory_used_bytes(stats.memory_used.at(d.index));
      out->set_compute_capability(d.compute_capability);
    }
    const EngineOptions& eo = engine_->options();
    v1::ServerLimits* limits = resp->mutable_limits();
    limits->set_max_message_bytes(options_.max_message_bytes);
    limits->set_max_blocks(eo.max_blocks);
    limits->set_activation_ttl_seconds(absl::ToDoubleSeconds(eo.activation_ttl));
    limits->set_max_activations_per_client(eo.max_activations_per_client);
    limits->set_max_chunk_bytes(options_.max_chunk_bytes);
    limits->set_max_concurrent_rpcs(options_.max_concurrent_rpcs);
    resp->set_blocks(stats.blocks);
    resp->set_activations_held(stats.activations_held);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* BlockServiceImpl::CreateBlock(grpc::CallbackServerContext* ctx,
                                                        const v1::CreateBlockRequest* req, v1::BlockInfo* resp) {
  return Unary(ctx, "CreateBlock", *req, resp, Work::kPool, Access::kAdmin, [this, req, resp]() -> absl::Status {
    CreateBlockParams p;
    p.spec.id = req->block_id();
    p.spec.config = FromProto(req->config());
    p.spec.layer_index = req->layer_index();
    p.spec.max_seq_len = req->max_seq_len();
    p.spec.max_batch_size = req->max_batch_size();
    p.spec.device = req->device();
    ASSIGN_OR_RETURN(p.precision, FromProto(req->precision()));
    if (req->has_seed()) p.seed = req->seed();
    if (req->ttl_seconds() < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("ttl_seconds = ", req->ttl_seconds(), ", expected >= 0 (0: no lease)"));
    }
    p.ttl = absl::Seconds(req->ttl_seconds());
    ASSIGN_OR_RETURN(BlockInfo info, engine_->CreateBlock(p));
    ToProto(info, engine_->backend().name(), resp);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* BlockServiceImpl::ListBlocks(grpc::CallbackServerContext* ctx,
                                                       const v1::ListBlocksRequest* req,
                                                       v1::ListBlocksResponse* resp) {
  return Unary(ctx, "ListBlocks", *req, resp, Work::kInline, Access::kUser, [this, req, resp]() -> absl::Status {
    const double min_idle = req->min_idle_seconds();
    if (!(std::isfinite(min_idle) && min_idle >= 0)) {
      return absl::InvalidArgumentError(
          absl::StrCat("min_idle_seconds = ", min_idle, ", expected a finite number >= 0 (0: every block)"));
    }
    for (const BlockInfo& info : engine_->ListBlocks()) {
      if (absl::ToDoubleSeconds(info.idle) < min_idle) continue;
      ToProto(info, engine_->backend().name(), resp->add_blocks());
    }
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* BlockServiceImpl::GetBlock(grpc::CallbackServerContext* ctx, const v1::GetBlockRequest* req,
                                                     v1::BlockInfo* resp) {
  return Unary(ctx, "GetBlock", *req, resp, Work::kInline, Access::kUser, [this, req, resp]() -> absl::Status {
    ASSIGN_OR_RETURN(BlockInfo info, engine_->GetBlock(req->block_id()));
    ToProto(info, engine_->backend().name(), resp);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* BlockServiceImpl::DeleteBlock(grpc::CallbackServerContext* ctx,
                                                        const v1::DeleteBlockRequest* req,
                                                        v1::DeleteBlockResponse* resp) {
  return Unary(ctx, "DeleteBlock", *req, resp, Work::kPool, Access::kAdmin, [this, req, resp]() -> absl::Status {
    ASSIGN_OR_RETURN(int64_t released, engine_->DeleteBlock(req->block_id()));
    resp->set_activations_released(released);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* BlockServiceImpl::Forward(grpc::CallbackServerContext* ctx, const v1::ForwardRequest* req,
                                                    v1::ForwardResponse* resp) {
  return Unary(ctx, "Forward", *req, resp, Work::kPool, Access::kUser,
               [this, ctx, req, resp](UnaryReactor* reactor) -> absl::Status {
    ForwardArgs args;
    args.block_ids.assign(req->block_ids().begin(), req->block_ids().end());
    ASSIGN_OR_RETURN(args.input, TensorArgOf(req->input(), "input"));
    args.keep_activations = req->keep_activations();
    args.position_offset = req->position_offset();
    args.client = ClientOf(ctx);
    ForwardOutput out;
    out.output.data = resp->mutable_output()->mutable_data();
    RETURN_IF_ERROR(engine_->Forward(args, &out));
    resp->mutable_output()->set_dtype(req->input().dtype());
    for (int64_t d : out.output.shape) resp->mutable_output()->add_shape(d);
    metrics_->tokens_forward->Increment(static_cast<double>(out.tokens));
    if (!out.activation_id.empty()) {
      // Nobody will ever see this id when the call was cancelled or its deadline passed while it
      // ran: free what it holds now rather than at its TTL. The deadline is checked here too
      // because gRPC's own deadline timer may not have cancelled the call yet, and a reply sent
      // after the client's deadline is dropped by the client.
      const bool cancelled = ctx->IsCancelled();
      if (cancelled || ctx->deadline() <= std::chrono::system_clock::now()) {
        engine_->ReleaseActivations(out.activation_id, args.client).IgnoreError();
        return cancelled ? absl::CancelledError("the client cancelled the call")
                         : absl::DeadlineExceededError("the call's deadline passed before its reply was sent");
      }
      // ... and the same when the cancel comes after this point, before the reply arrives.
      reactor->UndoIfCancelled([engine = engine_, id = out.activation_id, owner = args.client] {
        engine->ReleaseActivations(id, owner).IgnoreError();
      });
    }
    resp->set_activation_id(out.activation_id);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* BlockServiceImpl::Backward(grpc::CallbackServerContext* ctx,
                                                     const v1::BackwardRequest* req, v1::BackwardResponse* resp) {
  return Unary(ctx, "Backward", *req, resp, Work::kPool, Access::kUser, [this, ctx, req, resp]() -> absl::Status {
    ASSIGN_OR_RETURN(TensorArg grad, TensorArgOf(req->grad_output(), "grad_output"));
    TensorOut out;
    out.data = resp->mutable_grad_input()->mutable_data();
    // Handles belong to the identity that ran the Forward (engine/owned.h).
    RETURN_IF_ERROR(engine_->Backward(req->activation_id(), ClientOf(ctx), grad, &out));
    resp->mutable_grad_input()->set_dtype(req->grad_output().dtype());
    for (int64_t d : out.shape) resp->mutable_grad_input()->add_shape(d);
    metrics_->tokens_backward->Increment(static_cast<double>(out.tokens));
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* BlockServiceImpl::ReleaseActivations(grpc::CallbackServerContext* ctx,
                                                               const v1::ReleaseActivationsRequest* req,
                                                               v1::ReleaseActivationsResponse* resp) {
  return Unary(ctx, "ReleaseActivations", *req, resp, Work::kPool, Access::kUser,
               [this, ctx, req] { return engine_->ReleaseActivations(req->activation_id(), ClientOf(ctx)); });
}

grpc::ServerUnaryReactor* BlockServiceImpl::ZeroGrad(grpc::CallbackServerContext* ctx, const v1::ZeroGradRequest* req,
                                                     v1::ZeroGradResponse* resp) {
  return Unary(ctx, "ZeroGrad", *req, resp, Work::kPool, Access::kUser, [this, req] {
    return engine_->ZeroGrad(std::vector<std::string>(req->block_ids().begin(), req->block_ids().end()));
  });
}

grpc::ServerUnaryReactor* BlockServiceImpl::Step(grpc::CallbackServerContext* ctx, const v1::StepRequest* req,
                                                 v1::StepResponse* resp) {
  return Unary(ctx, "Step", *req, resp, Work::kPool, Access::kUser, [this, req, resp]() -> absl::Status {
    const std::vector<std::string> ids(req->block_ids().begin(), req->block_ids().end());
    ASSIGN_OR_RETURN(StepResult r, engine_->Step(ids, FromProto(req->adamw()), req->max_grad_norm()));
    resp->set_grad_norm(r.grad_norm);
    resp->set_skipped(r.skipped);
    resp->set_clip_coefficient(r.clip_coefficient);
    for (const auto& [id, step] : r.steps) {
      v1::BlockStep* s = resp->add_steps();
      s->set_block_id(id);
      s->set_step(step);
    }
    if (!r.skipped) metrics_->optimizer_steps->Increment(static_cast<double>(r.steps.size()));
    if (!r.skipped && checkpointer_ != nullptr) checkpointer_->AfterStep(ids);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* BlockServiceImpl::SaveCheckpoint(grpc::CallbackServerContext* ctx,
                                                           const v1::SaveCheckpointRequest* req,
                                                           v1::SaveCheckpointResponse* resp) {
  return Unary(ctx, "SaveCheckpoint", *req, resp, Work::kPool, Access::kAdmin, [this, req, resp]() -> absl::Status {
    if (checkpointer_ == nullptr) {
      return absl::FailedPreconditionError("checkpoints are disabled: start blockd with --checkpoint_dir=DIR");
    }
    ASSIGN_OR_RETURN(CheckpointResult r,
                     checkpointer_->Save(std::vector<std::string>(req->block_ids().begin(), req->block_ids().end()),
                                         req->name()));
    resp->set_path(r.path);
    for (const std::string& id : r.block_ids) resp->add_block_ids(id);
    resp->set_bytes(r.bytes);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* BlockServiceImpl::RestoreCheckpoint(grpc::CallbackServerContext* ctx,
                                                              const v1::RestoreCheckpointRequest* req,
                                                              v1::RestoreCheckpointResponse* resp) {
  return Unary(ctx, "RestoreCheckpoint", *req, resp, Work::kPool, Access::kAdmin, [this, req, resp]() -> absl::Status {
    if (checkpointer_ == nullptr) {
      return absl::FailedPreconditionError("checkpoints are disabled: start blockd with --checkpoint_dir=DIR");
    }
    ASSIGN_OR_RETURN(CheckpointResult r,
                     checkpointer_->Restore(req->name(), std::vector<std::string>(req->block_ids().begin(),
                                                                                   req->block_ids().end())));
    resp->set_path(r.path);
    for (const std::string& id : r.block_ids) resp->add_block_ids(id);
    return absl::OkStatus();
  });
}

// LoadWeights: chunks are validated and staged as they arrive; the block changes only when the
// whole stream was good.
class BlockServiceImpl::LoadWeightsReactor : public grpc::ServerReadReactor<v1::TensorChunk> {
 public:
  LoadWeightsReactor(BlockServiceImpl* service, grpc::CallbackServerContext* ctx, v1::LoadWeightsResponse* resp)
      : service_(service), ctx_(ctx), resp_(resp), call_(service, "LoadWeights") {
    absl::Status admitted = service_->Admit(ctx, Access::kAdmin);
    if (!admitted.ok()) {
      Finish(call_.Finish(ToGrpcStatus(admitted)));
      return;
    }
    StartRead(&chunk_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {
      if (ctx_->IsCancelled()) {
        Finish(call_.Finish(grpc::Status(grpc::StatusCode::CANCELLED, "the client cancelled the stream")));
        return;
      }
      // ok=false is also how a read ends when gRPC itself failed the stream, e.g. for a message
      // over the size limit, and IsCancelled() may not say so yet: committing then would apply
      // the chunks before the bad one while the client hears RESOURCE_EXHAUSTED. gRPC cancels the
      // call before it completes the read, so an operation started now fails on a failed stream
      // and succeeds only on a clean end of the stream: send the initial metadata as that probe.
      StartSendInitialMetadata();
      return;
    }
    service_->metrics_->bytes_received->Increment(static_cast<double>(chunk_.ByteSizeLong()));
    auto take = [this] { return Take(); };
    absl::Status s = Guarded(take);
    if (!s.ok()) {
      Finish(call_.Finish(ToGrpcStatus(s)));
      return;
    }
    StartRead(&chunk_);
  }

  void OnSendInitialMetadataDone(bool ok) override {
    if (!ok) {
      Finish(call_.Finish(grpc::Status(grpc::StatusCode::CANCELLED, "the stream failed before it ended cleanly")));
      return;
    }
    service_->pool_->Submit([this] {
      auto commit = [this] { return Commit(); };
      Finish(call_.Finish(ToGrpcStatus(Guarded(commit))));
    });
  }

  void OnDone() override { delete this; }

 private:
  absl::Status Take() {
    if (chunk_.block_id().empty()) {
      return absl::InvalidArgumentError(absl::StrCat("chunk of tensor \"", Echo(chunk_.name()), "\" has no block_id"));
    }
    if (assembler_ == nullptr) {
      ASSIGN_OR_RETURN(std::vector<ParamSpec> params, service_->engine_->BlockParamsOf(chunk_.block_id()));
      block_id_ = chunk_.block_id();
      assembler_ = std::make_unique<TensorAssembler>(block_id_, std::move(params));
    } else if (chunk_.block_id() != block_id_) {
      return absl::InvalidArgumentError(absl::StrCat("chunk for block ", Echo(chunk_.block_id()), " in a LoadWeights stream for block ",
                                                     block_id_, ": one stream loads one block"));
    }
    if (static_cast<int64_t>(chunk_.data().size()) > service_->options_.max_chunk_bytes) {
      return absl::InvalidArgumentError(absl::StrCat("chunk of ", chunk_.data().size(), " bytes exceeds the ",
                                                     service_->options_.max_chunk_bytes, "-byte chunk limit"));
    }
    ASSIGN_OR_RETURN(DType dtype, FromProto(chunk_.dtype(), absl::StrCat("tensor ", Echo(chunk_.name()), " dtype")));
    const std::vector<int64_t> shape(chunk_.shape().begin(), chunk_.shape().end());
    return assembler_->Add(chunk_.name(), dtype, shape, chunk_.offset(), chunk_.data().data(), chunk_.data().size());
  }

  absl::Status Commit() {
    if (assembler_ == nullptr) return absl::InvalidArgumentError("LoadWeights stream carried no chunks");
    ASSIGN_OR_RETURN(std::vector<AssembledTensor> tensors, assembler_->Finish());
    ASSIGN_OR_RETURN(std::vector<std::string> loaded, service_->engine_->LoadWeights(block_id_, std::move(tensors)));
    resp_->set_block_id(block_id_);
    for (const std::string& name : loaded) resp_->add_loaded(name);
    return absl::OkStatus();
  }

  BlockServiceImpl* service_;
  grpc::CallbackServerContext* ctx_;
  v1::LoadWeightsResponse* resp_;
  Call call_;
  v1::TensorChunk chunk_;
  std::string block_id_;
  std::unique_ptr<TensorAssembler> assembler_;
};

grpc::ServerReadReactor<v1::TensorChunk>* BlockServiceImpl::LoadWeights(grpc::CallbackServerContext* ctx,
                                                                         v1::LoadWeightsResponse* resp) {
  return new LoadWeightsReactor(this, ctx, resp);
}

// DownloadTensors: a consistent snapshot is taken on the pool, then written chunk by chunk.
class BlockServiceImpl::DownloadReactor : public grpc::ServerWriteReactor<v1::TensorChunk> {
 public:
  DownloadReactor(BlockServiceImpl* service, grpc::CallbackServerContext* ctx, const v1::DownloadTensorsRequest* req)
      : service_(service), call_(service, "DownloadTensors") {
    service_->metrics_->bytes_received->Increment(static_cast<double>(req->ByteSizeLong()));
    absl::Status admitted = service_->Admit(ctx, Access::kUser);
    if (!admitted.ok()) {
      Finish(call_.Finish(ToGrpcStatus(admitted)));
      return;
    }
    service_->pool_->Submit([this, req] {
      auto snapshot = [this, req] { return Snapshot(*req); };
      absl::Status s = Guarded(snapshot);
      if (!s.ok()) {
        Finish(call_.Finish(ToGrpcStatus(s)));
        return;
      }
      WriteNext();
    });
  }

  void OnWriteDone(bool ok) override {
    if (!ok) {
      Finish(call_.Finish(grpc::Status(grpc::StatusCode::CANCELLED, "the client went away")));
      return;
    }
    WriteNext();
  }

  void OnDone() override { delete this; }

 private:
  absl::Status Snapshot(const v1::DownloadTensorsRequest& req) {
    ASSIGN_OR_RETURN(TensorKind kind, FromProto(req.kind()));
    DType dtype = DType::kFloat32;
    if (req.dtype() != v1::DTYPE_UNSPECIFIED) {
      ASSIGN_OR_RETURN(dtype, FromProto(req.dtype(), "dtype"));
    }
    chunk_bytes_ = req.chunk_bytes() == 0 ? service_->options_.default_chunk_bytes : req.chunk_bytes();
    if (chunk_bytes_ < 1024 || chunk_bytes_ > service_->options_.max_chunk_bytes) {
      return absl::InvalidArgumentError(absl::StrCat("chunk_bytes = ", chunk_bytes_, ", expected 1024..",
                                                     service_->options_.max_chunk_bytes, " (0: the default)"));
    }
    block_id_ = req.block_id();
    ASSIGN_OR_RETURN(tensors_, service_->engine_->ReadTensors(
                                   block_id_, kind, dtype, std::vector<std::string>(req.names().begin(), req.names().end())));
    return absl::OkStatus();
  }

  void WriteNext() {
    // Block tensors are never empty, so each tensor is one or more chunks.
    while (tensor_ < tensors_.size() && offset_ >= tensors_[tensor_].bytes.size()) {
      ++tensor_;
      offset_ = 0;
    }
    if (tensor_ >= tensors_.size()) {
      Finish(call_.Finish(grpc::Status::OK));
      return;
    }
    const NamedTensor& t = tensors_[tensor_];
    const size_t n = std::min<size_t>(static_cast<size_t>(chunk_bytes_), t.bytes.size() - offset_);
    chunk_.Clear();
    chunk_.set_block_id(block_id_);
    chunk_.set_name(t.name);
    chunk_.set_dtype(ToProto(t.dtype));
    for (int64_t d : t.shape) chunk_.add_shape(d);
    chunk_.set_offset(static_cast<int64_t>(offset_));
    chunk_.set_data(t.bytes.data() + offset_, n);
    offset_ += n;
    service_->metrics_->bytes_sent->Increment(static_cast<double>(chunk_.ByteSizeLong()));
    StartWrite(&chunk_);
  }

  BlockServiceImpl* service_;
  Call call_;
  std::string block_id_;
  int64_t chunk_bytes_ = 0;
  std::vector<NamedTensor> tensors_;
  size_t tensor_ = 0, offset_ = 0;
  v1::TensorChunk chunk_;
};

grpc::ServerWriteReactor<v1::TensorChunk>* BlockServiceImpl::DownloadTensors(grpc::CallbackServerContext* ctx,
                                                                             const v1::DownloadTensorsRequest* req) {
  return new DownloadReactor(this, ctx, req);
}

}  // namespace blockd
