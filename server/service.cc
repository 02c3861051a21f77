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
#include "server/credentials.h"
#include "server/service_internal.h"
#include "server/shared_memory_transport.h"

namespace blockd {

BlockServiceImpl::BlockServiceImpl(Engine* engine, Metrics* metrics, ThreadPool* pool, const Authenticator* auth,
                                   Checkpointer* checkpointer, ServiceOptions options)
    : engine_(engine),
      metrics_(metrics),
      pool_(pool),
      auth_(auth),
      checkpointer_(checkpointer),
      options_(std::move(options)) {
  const int64_t max = std::max<int64_t>(1, options_.max_concurrent_rpcs);
  per_client_limit_ = options_.max_concurrent_rpcs_per_client > 0 ? options_.max_concurrent_rpcs_per_client
                                                                   : std::max<int64_t>(1, max / 4);
  // Admin callers keep some slots only where roles exist: without credentials everyone is admin.
  admin_reserve_ = options_.identity_from_credentials && max >= 2 ? std::max<int64_t>(1, max / 8) : 0;
  watchdog_ = std::make_unique<StreamWatchdog>(options_.stream_idle_timeout, options_.stream_max_duration);
  SharedMemoryOptions shm = options_.shared_memory;
  shm.max_tensor_bytes = options_.max_message_bytes;  // a tensor by reference is bounded as inline
  // CUDA IPC regions are opened and POSIX ones pinned by the backend (a CPU backend refuses both);
  // the registry is destroyed before the engine, so every mapping closes while the device is there.
  shared_memory_ = std::make_unique<SharedMemoryRegistry>(
      shm,
      [engine](int device, absl::string_view mem_handle, absl::string_view event_handle) {
        return engine->backend().OpenPeerMemory(device, mem_handle, event_handle);
      },
      [engine](void* ptr, size_t bytes) { return engine->backend().PinHostMemory(ptr, bytes); });
}

absl::StatusOr<Principal> BlockServiceImpl::Identify(grpc::CallbackServerContext* ctx) const {
  if (options_.identity_from_credentials) {
    ASSIGN_OR_RETURN(std::optional<Principal> who, PrincipalOf(*ctx, auth_));
    if (who.has_value()) return *std::move(who);
    // The metadata processor refuses such calls before they get here; never fall back to a
    // client-chosen name when credentials are in force.
    return absl::UnauthenticatedError("the call carries no verified credential");
  }
  // No credentials: the peer's address ("ipv4:127.0.0.1:5555" without the port) keeps clients on
  // different hosts apart; the `blockd-client` name, which any client may choose, only splits one
  // address between cooperating clients. It is advisory: it cannot name another host's quota.
  std::string who = ctx->peer();
  const size_t colon = who.rfind(':');
  if (colon != std::string::npos && who.find(':') != colon) who.resize(colon);
  const auto& md = ctx->client_metadata();
  auto it = md.find("blockd-client");
  if (it != md.end() && !it->second.empty() && it->second.size() <= 64) {
    absl::StrAppend(&who, "/", absl::string_view(it->second.data(), it->second.size()));
  }
  return Principal{std::move(who), Role::kAdmin};
}

absl::Status BlockServiceImpl::TakeSlot(const Principal& who) {
  absl::MutexLock lock(&slots_mu_);
  // The server-wide limit first: when both are full, it is the one that will not free up by
  // this client waiting for its own calls.
  const int64_t limit = options_.max_concurrent_rpcs - (who.role == Role::kAdmin ? 0 : admin_reserve_);
  if (admitted_ >= limit) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "blockd is serving ", admitted_, " calls already (--max_concurrent_rpcs)",
        admin_reserve_ > 0 && who.role != Role::kAdmin
            ? absl::StrCat(" and keeps ", admin_reserve_, " of its ", options_.max_concurrent_rpcs, " for admin calls")
            : std::string(),
        "; retry later"));
  }
  auto it = per_client_.find(who.name);
  if (it != per_client_.end() && it->second >= per_client_limit_) {
    return absl::ResourceExhaustedError(absl::StrCat("client ", Echo(who.name), " already has ", per_client_limit_,
                                                     " calls in flight (--max_concurrent_rpcs_per_client=",
                                                     per_client_limit_, "); retry later"));
  }
  ++per_client_[who.name];
  ++admitted_;
  return absl::OkStatus();
}

void BlockServiceImpl::ReleaseSlot(const std::string& client) {
  absl::MutexLock lock(&slots_mu_);
  --admitted_;
  auto it = per_client_.find(client);
  if (it != per_client_.end() && --it->second <= 0) per_client_.erase(it);
}

grpc::ServerUnaryReactor* BlockServiceImpl::GetServerInfo(grpc::CallbackServerContext* ctx,
                                                          const v1::GetServerInfoRequest* req,
                                                          v1::GetServerInfoResponse* resp) {
  return Unary(ctx, "GetServerInfo", *req, resp, Work::kInline, Role::kRead, [this, resp] {
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
      out->set_kv_cache_reserved_bytes(stats.kv_reserved.at(d.index));
      out->set_kv_cache_available_bytes(
          std::max<int64_t>(0, stats.memory_budget.at(d.index) - stats.memory_used.at(d.index)));
    }
    const EngineOptions& eo = engine_->options();
    v1::ServerLimits* limits = resp->mutable_limits();
    limits->set_max_message_bytes(options_.max_message_bytes);
    limits->set_max_blocks(eo.max_blocks);
    limits->set_activation_ttl_seconds(absl::ToDoubleSeconds(eo.activation_ttl));
    limits->set_max_activations_per_client(eo.max_activations_per_client);
    limits->set_max_chunk_bytes(options_.max_chunk_bytes);
    limits->set_max_concurrent_rpcs(options_.max_concurrent_rpcs);
    limits->set_max_sessions_per_client(eo.max_sessions_per_client);
    limits->set_session_ttl_seconds(absl::ToDoubleSeconds(eo.default_session_ttl));
    resp->set_blocks(stats.blocks);
    resp->set_activations_held(stats.activations_held);
    resp->set_sessions_open(stats.sessions_open);
    resp->set_kv_cache_pages_in_use(stats.kv_pages_in_use);
    resp->set_kv_cache_bytes_in_use(stats.kv_bytes_in_use);
    FillSharedMemoryInfo(resp->mutable_shared_memory());
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* BlockServiceImpl::CreateBlock(grpc::CallbackServerContext* ctx,
                                                        const v1::CreateBlockRequest* req, v1::BlockInfo* resp) {
  return Unary(ctx, "CreateBlock", *req, resp, Work::kPool, Role::kAdmin, [this, req, resp]() -> absl::Status {
    CreateBlockParams p;
    p.spec.id = req->block_id();
    p.spec.config = FromProto(req->config());
    p.spec.layer_index = req->layer_index();
    p.spec.max_seq_len = req->max_seq_len();
    p.spec.max_batch_size = req->max_batch_size();
    p.spec.device = req->device();
    p.spec.frozen = req->frozen();
    if (req->has_lora()) {
      p.spec.lora = FromProto(req->lora());
      if (!p.spec.lora.requested()) {  // an empty message is a request with rank 0, not "no adapters"
        return absl::InvalidArgumentError("lora.rank = 0, expected >= 1 (leave lora unset for no adapters)");
      }
    }
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
  return Unary(ctx, "ListBlocks", *req, resp, Work::kInline, Role::kRead, [this, req, resp]() -> absl::Status {
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
  return Unary(ctx, "GetBlock", *req, resp, Work::kInline, Role::kRead, [this, req, resp]() -> absl::Status {
    ASSIGN_OR_RETURN(BlockInfo info, engine_->GetBlock(req->block_id()));
    ToProto(info, engine_->backend().name(), resp);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* BlockServiceImpl::DeleteBlock(grpc::CallbackServerContext* ctx,
                                                        const v1::DeleteBlockRequest* req,
                                                        v1::DeleteBlockResponse* resp) {
  return Unary(ctx, "DeleteBlock", *req, resp, Work::kPool, Role::kAdmin, [this, req, resp]() -> absl::Status {
    const double only_if_idle = req->only_if_idle_seconds();
    if (!(std::isfinite(only_if_idle) && only_if_idle >= 0)) {
      return absl::InvalidArgumentError(absl::StrCat("only_if_idle_seconds = ", only_if_idle,
                                                     ", expected a finite number >= 0 (0: delete whether idle or not)"));
    }
    ASSIGN_OR_RETURN(int64_t released, engine_->DeleteBlock(req->block_id(), absl::Seconds(only_if_idle)));
    resp->set_activations_released(released);
    return absl::OkStatus();
  });
}

namespace {

// A raw Forward or Backward call's request (its tensor's bytes still in gRPC's slices, kept
// until the call ends) and the reply's tensor, whose bytes the engine writes into a slice.
template <class Req>
struct WireCall {
  Req req;
  WireBytes in;
  absl::Status parsed;
  v1::Tensor out;
};

template <class Req>
std::shared_ptr<WireCall<Req>> ParseWireCall(const grpc::ByteBuffer& wire, int tensor_field) {
  auto call = std::make_shared<WireCall<Req>>();
  call->parsed = ParseWithTensorBytes(wire, tensor_field, &call->req, &call->in);
  return call;
}

}  // namespace

grpc::ServerUnaryReactor* BlockServiceImpl::Forward(grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* wire,
                                                    grpc::ByteBuffer* reply) {
  auto call = ParseWireCall<v1::ForwardRequest>(*wire, v1::ForwardRequest::kInputFieldNumber);
  const v1::ForwardRequest* req = &call->req;
  return Unary(ctx, "Forward", *wire, reply, Work::kPool, req->keep_activations() ? Role::kTrain : Role::kRead,
               [this, ctx, call, req, reply](UnaryReactor* reactor) -> absl::Status {
    RETURN_IF_ERROR(call->parsed);
    ForwardArgs args;
    args.block_ids.assign(req->block_ids().begin(), req->block_ids().end());
    TensorTransport io(shared_memory_.get(), metrics_, reactor->client(), /*direct=*/true);
    ASSIGN_OR_RETURN(args.input, io.Input(req->input(), "input", &call->in));
    args.keep_activations = req->keep_activations();
    args.position_offset = req->position_offset();
    args.client = reactor->client();
    ForwardOutput out;
    RETURN_IF_ERROR(io.PrepareOutput(OutputRefOf(*req), "output_shared_memory", static_cast<int64_t>(args.input.size),
                                     &call->out, &out.output, /*wire_out=*/true));
    RETURN_IF_ERROR(engine_->Forward(args, &out));
    if (absl::Status written = io.FinishOutput(); !written.ok()) {
      if (!out.activation_id.empty()) engine_->ReleaseActivations(out.activation_id, args.client).IgnoreError();
      return written;
    }
    call->out.set_dtype(req->input().dtype());
    for (int64_t d : out.output.shape) call->out.add_shape(d);
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
    v1::ForwardResponse resp;
    resp.set_activation_id(out.activation_id);
    *reply = SerializeWithTensorBytes(resp, v1::ForwardResponse::kOutputFieldNumber, call->out, io.TakeWireOutput());
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* BlockServiceImpl::Backward(grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* wire,
                                                     grpc::ByteBuffer* reply) {
  auto call = ParseWireCall<v1::BackwardRequest>(*wire, v1::BackwardRequest::kGradOutputFieldNumber);
  return Unary(ctx, "Backward", *wire, reply, Work::kPool, Role::kTrain,
               [this, call, reply](UnaryReactor* reactor) -> absl::Status {
    RETURN_IF_ERROR(call->parsed);
    const v1::BackwardRequest* req = &call->req;
    TensorTransport io(shared_memory_.get(), metrics_, reactor->client(), /*direct=*/true);
    ASSIGN_OR_RETURN(TensorArg grad, io.Input(req->grad_output(), "grad_output", &call->in));
    TensorOut out;
    RETURN_IF_ERROR(io.PrepareOutput(OutputRefOf(*req), "output_shared_memory", static_cast<int64_t>(grad.size),
                                     &call->out, &out, /*wire_out=*/true));
    // Handles belong to the identity that ran the Forward (engine/owned.h).
    RETURN_IF_ERROR(engine_->Backward(req->activation_id(), reactor->client(), grad, &out, req->group_id()));
    RETURN_IF_ERROR(io.FinishOutput());
    call->out.set_dtype(req->grad_output().dtype());
    for (int64_t d : out.shape) call->out.add_shape(d);
    metrics_->tokens_backward->Increment(static_cast<double>(out.tokens));
    *reply = SerializeWithTensorBytes(v1::BackwardResponse(), v1::BackwardResponse::kGradInputFieldNumber, call->out,
                                      io.TakeWireOutput());
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* BlockServiceImpl::ReleaseActivations(grpc::CallbackServerContext* ctx,
                                                               const v1::ReleaseActivationsRequest* req,
                                                               v1::ReleaseActivationsResponse* resp) {
  return Unary(ctx, "ReleaseActivations", *req, resp, Work::kPool, Role::kTrain,
               [this, req](UnaryReactor* reactor) {
                 return engine_->ReleaseActivations(req->activation_id(), reactor->client());
               });
}

grpc::ServerUnaryReactor* BlockServiceImpl::ZeroGrad(grpc::CallbackServerContext* ctx, const v1::ZeroGradRequest* req,
                                                     v1::ZeroGradResponse* resp) {
  return Unary(ctx, "ZeroGrad", *req, resp, Work::kPool, Role::kTrain, [this, req] {
    return engine_->ZeroGrad(std::vector<std::string>(req->block_ids().begin(), req->block_ids().end()));
  });
}

grpc::ServerUnaryReactor* BlockServiceImpl::Step(grpc::CallbackServerContext* ctx, const v1::StepRequest* req,
                                                 v1::StepResponse* resp) {
  return Unary(ctx, "Step", *req, resp, Work::kPool, Role::kTrain,
               [this, req, resp](UnaryReactor* reactor) -> absl::Status {
    std::vector<std::string> ids(req->block_ids().begin(), req->block_ids().end());
    absl::StatusOr<StepResult> stepped =
        req->group_id().empty()
            ? engine_->Step(ids, FromProto(req->adamw()), req->max_grad_norm(), req->clip_coefficient())
            : engine_->GroupStep(req->group_id(), reactor->client(), ids, FromProto(req->adamw()),
                                 req->max_grad_norm(), req->clip_coefficient());
    if (!req->group_id().empty()) {
      metrics_->GroupCollectives("Step", stepped.ok() ? stepped->collectives
                                                      : CollectiveUse{.aborted = absl::IsAborted(stepped.status())});
    }
    RETURN_IF_ERROR(stepped.status());
    const StepResult& r = *stepped;
    if (ids.empty()) {
      for (const auto& [id, step] : r.steps) ids.push_back(id);
    }
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
  return Unary(ctx, "SaveCheckpoint", *req, resp, Work::kPool, Role::kAdmin, [this, req, resp]() -> absl::Status {
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
  return Unary(ctx, "RestoreCheckpoint", *req, resp, Work::kPool, Role::kAdmin, [this, req, resp]() -> absl::Status {
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

}  // namespace blockd
