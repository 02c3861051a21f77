// The inference-session RPCs of BlockServiceImpl: OpenSession, InferStep, the Infer stream,
// TrimSession, ForkSession, CloseSession, ListSessions. Sessions belong to the caller's identity
// (reactor->client(), as activation handles do) and need the read role: inference, not training.
#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "server/convert.h"
#include "server/service_internal.h"
#include "server/shared_memory_transport.h"

namespace blockd {
namespace {

void ToProto(const SessionInfo& info, v1::SessionInfo* out) {
  out->set_session_id(info.session_id);
  for (const std::string& id : info.block_ids) out->add_block_ids(id);
  out->set_batch_size(static_cast<int32_t>(info.batch_size));
  out->set_max_length(static_cast<int32_t>(info.max_length));
  out->set_length(static_cast<int32_t>(info.length));
  out->set_kv_bytes(info.kv_bytes);
  out->set_ttl_seconds(absl::ToInt64Seconds(info.ttl));
  out->set_expires_in_seconds(std::max(0.0, absl::ToDoubleSeconds(info.expires - absl::Now())));
}

}  // namespace

absl::Status BlockServiceImpl::RunInferStep(const v1::InferStepRequest& req, const std::string& client,
                                            v1::InferStepResponse* resp) {
  InferStepArgs args;
  args.session_id = req.session_id();
  args.client = client;
  TensorTransport io(shared_memory_.get(), metrics_, client);
  ASSIGN_OR_RETURN(args.hidden_states, io.Input(req.hidden_states(), "hidden_states"));
  args.hypo_ids.assign(req.hypo_ids().begin(), req.hypo_ids().end());
  args.step_id = req.step_id();
  InferStepOutput out;
  ASSIGN_OR_RETURN(out.output.data, io.PrepareOutput(OutputRefOf(req), "output_shared_memory",
                                                     static_cast<int64_t>(args.hidden_states.size),
                                                     resp->mutable_hidden_states()));
  RETURN_IF_ERROR(engine_->InferStep(args, &out));
  RETURN_IF_ERROR(io.FinishOutput());
  resp->mutable_hidden_states()->set_dtype(ToProto(out.output.dtype));
  for (int64_t d : out.output.shape) resp->mutable_hidden_states()->add_shape(d);
  resp->set_length(static_cast<int32_t>(out.length));
  resp->set_step_id(out.step_id);
  metrics_->tokens_generated->Increment(static_cast<double>(out.new_tokens));
  return absl::OkStatus();
}

grpc::ServerUnaryReactor* BlockServiceImpl::OpenSession(grpc::CallbackServerContext* ctx,
                                                        const v1::OpenSessionRequest* req, v1::SessionInfo* resp) {
  return Unary(ctx, "OpenSession", *req, resp, Work::kPool, Role::kRead,
               [this, req, resp](UnaryReactor* reactor) -> absl::Status {
    if (req->ttl_seconds() < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("ttl_seconds = ", req->ttl_seconds(), ", expected >= 0 (0: the server's default)"));
    }
    OpenSessionArgs args;
    args.session_id = req->session_id();
    args.block_ids.assign(req->block_ids().begin(), req->block_ids().end());
    args.batch_size = req->batch_size();
    args.max_length = req->max_length();
    args.ttl = absl::Seconds(req->ttl_seconds());
    args.client = reactor->client();
    ASSIGN_OR_RETURN(SessionInfo info, engine_->OpenSession(args));
    ToProto(info, resp);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* BlockServiceImpl::InferStep(grpc::CallbackServerContext* ctx,
                                                      const v1::InferStepRequest* req, v1::InferStepResponse* resp) {
  return Unary(ctx, "InferStep", *req, resp, Work::kPool, Role::kRead,
               [this, req, resp](UnaryReactor* reactor) { return RunInferStep(*req, reactor->client(), resp); });
}

grpc::ServerUnaryReactor* BlockServiceImpl::TrimSession(grpc::CallbackServerContext* ctx,
                                                        const v1::TrimSessionRequest* req, v1::SessionInfo* resp) {
  return Unary(ctx, "TrimSession", *req, resp, Work::kPool, Role::kRead,
               [this, req, resp](UnaryReactor* reactor) -> absl::Status {
    ASSIGN_OR_RETURN(SessionInfo info, engine_->TrimSession(req->session_id(), reactor->client(), req->length()));
    ToProto(info, resp);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* BlockServiceImpl::ForkSession(grpc::CallbackServerContext* ctx,
                                                        const v1::ForkSessionRequest* req, v1::SessionInfo* resp) {
  return Unary(ctx, "ForkSession", *req, resp, Work::kPool, Role::kRead,
               [this, req, resp](UnaryReactor* reactor) -> absl::Status {
    ASSIGN_OR_RETURN(SessionInfo info,
                     engine_->ForkSession(req->session_id(), reactor->client(), req->new_session_id()));
    ToProto(info, resp);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* BlockServiceImpl::CloseSession(grpc::CallbackServerContext* ctx,
                                                         const v1::CloseSessionRequest* req,
                                                         v1::CloseSessionResponse* resp) {
  return Unary(ctx, "CloseSession", *req, resp, Work::kInline, Role::kRead, [this, req](UnaryReactor* reactor) {
    return engine_->CloseSession(req->session_id(), reactor->client());
  });
}

grpc::ServerUnaryReactor* BlockServiceImpl::ListSessions(grpc::CallbackServerContext* ctx,
                                                         const v1::ListSessionsRequest* req,
                                                         v1::ListSessionsResponse* resp) {
  return Unary(ctx, "ListSessions", *req, resp, Work::kInline, Role::kRead,
               [this, resp](UnaryReactor* reactor) -> absl::Status {
    for (const SessionInfo& info : engine_->ListSessions(reactor->client())) ToProto(info, resp->add_sessions());
    return absl::OkStatus();
  });
}

// Infer: InferStep requests in, one response per request, in order. One step at a time: read,
// compute on the pool, write, read the next. The first failed step ends the stream with its status
// (the session is unchanged by it, so the client can reopen a stream and go on). Watched like the
// other streams: a client that stops sending for --stream_idle_timeout loses the stream, not the
// session.
class BlockServiceImpl::InferReactor
    : public grpc::ServerBidiReactor<v1::InferStepRequest, v1::InferStepResponse> {
 public:
  InferReactor(BlockServiceImpl* service, grpc::CallbackServerContext* ctx)
      : service_(service), ctx_(ctx), call_(service, "Infer") {
    absl::Status admitted = call_.Admit(ctx, Role::kRead);
    if (!admitted.ok()) {
      Finish(call_.Finish(ToGrpcStatus(admitted)));
      return;
    }
    watch_ = service_->watchdog_->Add(ctx, "Infer");
    StartRead(&req_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {
      std::string why;
      if (service_->watchdog_->Expired(watch_, &why)) {
        service_->metrics_->streams_expired->Increment();
        Finish(call_.Finish(grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED, why)));
      } else if (ctx_->IsCancelled()) {
        Finish(call_.Finish(grpc::Status(grpc::StatusCode::CANCELLED, "the client cancelled the stream")));
      } else {
        Finish(call_.Finish(grpc::Status::OK));  // the client closed its side: every step answered
      }
      return;
    }
    service_->watchdog_->Touch(watch_);
    service_->watchdog_->SetBusy(watch_, true);
    service_->metrics_->bytes_received->Increment(static_cast<double>(req_.ByteSizeLong()));
    service_->pool_->Submit([this] {
      resp_.Clear();
      auto step = [this] { return service_->RunInferStep(req_, call_.client(), &resp_); };
      absl::Status s = Guarded(step);
      service_->watchdog_->SetBusy(watch_, false);
      if (!s.ok()) {
        Finish(call_.Finish(ToGrpcStatus(s)));
        return;
      }
      service_->metrics_->bytes_sent->Increment(static_cast<double>(resp_.ByteSizeLong()));
      StartWrite(&resp_);
    });
  }

  void OnWriteDone(bool ok) override {
    if (!ok) {
      Finish(call_.Finish(grpc::Status(grpc::StatusCode::CANCELLED, "the stream broke while sending a step's output")));
      return;
    }
    service_->watchdog_->Touch(watch_);
    StartRead(&req_);
  }

  void OnDone() override {
    if (watch_ != 0) service_->watchdog_->Remove(watch_);
    delete this;
  }

 private:
  BlockServiceImpl* service_;
  grpc::CallbackServerContext* ctx_;
  Call call_;
  uint64_t watch_ = 0;
  v1::InferStepRequest req_;
  v1::InferStepResponse resp_;
};

grpc::ServerBidiReactor<v1::InferStepRequest, v1::InferStepResponse>* BlockServiceImpl::Infer(
    grpc::CallbackServerContext* ctx) {
  return new InferReactor(this, ctx);
}

}  // namespace blockd
