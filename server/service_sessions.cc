// The inference-session RPCs of BlockServiceImpl: OpenSession, InferStep, the Infer stream,
// TrimSession, ForkSession, CloseSession, ListSessions. Sessions belong to the caller's identity
// (reactor->client(), as activation handles do) and need the read role: inference, not training.
#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "base/echo.h"
#include "base/log.h"
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
  const absl::Time t_in = absl::Now();
  InferStepArgs args;
  args.session_id = req.session_id();
  args.client = client;
  TensorTransport io(shared_memory_.get(), metrics_, client);
  ASSIGN_OR_RETURN(args.hidden_states, io.Input(req.hidden_states(), "hidden_states"));
  args.hypo_ids.assign(req.hypo_ids().begin(), req.hypo_ids().end());
  args.step_id = req.step_id();
  InferStepOutput out;
  RETURN_IF_ERROR(io.PrepareOutput(OutputRefOf(req), "output_shared_memory",
                                   static_cast<int64_t>(args.hidden_states.size), resp->mutable_hidden_states(),
                                   &out.output));
  const absl::Time start = absl::Now();
  RETURN_IF_ERROR(engine_->InferStep(args, &out));
  const double seconds = absl::ToDoubleSeconds(absl::Now() - start);
  RETURN_IF_ERROR(io.FinishOutput());
  resp->mutable_hidden_states()->set_dtype(ToProto(out.output.dtype));
  for (int64_t d : out.output.shape) resp->mutable_hidden_states()->add_shape(d);
  resp->set_length(static_cast<int32_t>(out.length));
  resp->set_step_id(out.step_id);
  if (!out.replayed) metrics_->SessionStep(out.output.shape[0], out.output.shape[1], seconds);
  BLOCKD_LOG(kDebug, "InferStep of session ", Echo(args.session_id), ": input ",
             absl::ToDoubleMicroseconds(start - t_in), " us, engine ", seconds * 1e6, " us, reply ",
             absl::ToDoubleMicroseconds(absl::Now() - start) - seconds * 1e6, " us");
  return absl::OkStatus();
}

grpc::ServerUnaryReactor* BlockServiceImpl::OpenSession(grpc::CallbackServerContext* ctx,
                                                        const v1::OpenSessionRequest* req, v1::SessionInfo* resp) {
  return Unary(ctx, "OpenSession", *req, resp, Work::kPool, Role::kRead,
               [this, req, resp](UnaryReactor* reactor) -> absl::Status {
    if (req->ttl_seconds() < 0) {
      absl::Status bad = absl::InvalidArgumentError(
          absl::StrCat("ttl_seconds = ", req->ttl_seconds(), ", expected >= 0 (0: the server's default)"));
      metrics_->SessionOpenRefused(bad);
      return bad;
    }
    OpenSessionArgs args;
    args.session_id = req->session_id();
    args.block_ids.assign(req->block_ids().begin(), req->block_ids().end());
    args.batch_size = req->batch_size();
    args.max_length = req->max_length();
    args.ttl = absl::Seconds(req->ttl_seconds());
    args.client = reactor->client();
    absl::StatusOr<SessionInfo> info = engine_->OpenSession(args);
    if (!info.ok()) {
      metrics_->SessionOpenRefused(info.status());
      return info.status();
    }
    ToProto(*info, resp);
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
    absl::StatusOr<SessionInfo> info =
        engine_->ForkSession(req->session_id(), reactor->client(), req->new_session_id());
    if (!info.ok()) {
      metrics_->SessionOpenRefused(info.status());
      return info.status();
    }
    ToProto(*info, resp);
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
// session. Draining ends the stream with UNAVAILABLE: at once when it waits for the client's next
// step, else after the step it runs has been answered (a step read but not started is not run).
// `mu_` guards that choice; Finish is always called outside it, exactly once.
class BlockServiceImpl::InferReactor
    : public grpc::ServerBidiReactor<v1::InferStepRequest, v1::InferStepResponse> {
 public:
  InferReactor(BlockServiceImpl* service, grpc::CallbackServerContext* ctx)
      : service_(service), ctx_(ctx), call_(service, "Infer") {
    absl::Status admitted = call_.Admit(ctx, Role::kRead);
    if (!admitted.ok()) {
      FinishOnce(ToGrpcStatus(admitted));
      return;
    }
    watch_ = service_->watchdog_->Add(ctx, "Infer");
    {
      absl::MutexLock lock(&service_->infer_mu_);
      service_->infer_streams_.insert(this);
    }
    StartRead(&req_);
    // Draining began after admission but before the registration above: end it here.
    if (service_->draining_ && MarkDraining()) FinishDraining();
  }

  // For EndInferStreams, under the service's infer_mu_: true when the caller must call
  // FinishDraining (the stream waits for a read); false when the running step will end it.
  bool MarkDraining() {
    absl::MutexLock lock(&mu_);
    draining_ = true;
    if (finished_ || busy_) return false;
    finished_ = true;
    return true;
  }
  void FinishDraining() {
    Finish(call_.Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE,
                                     "blockd is draining: the Infer stream ends here, every step sent before "
                                     "was answered; go on with the session on another stream or daemon")));
  }

  void OnReadDone(bool ok) override {
    enum { kEnd, kRun, kDrained } next = kEnd;
    {
      absl::MutexLock lock(&mu_);
      if (finished_) return;  // draining finished the stream while this read was pending
      draining_ = draining_ || service_->draining_;  // set before EndInferStreams reaches this stream
      if (ok && draining_) {
        finished_ = true;
        next = kDrained;
      } else if (ok) {
        busy_ = true;
        next = kRun;
      }
    }
    if (next == kDrained) {  // read while draining: not run
      Finish(call_.Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE,
                                       "blockd is draining: this step was not run (the session is as the last "
                                       "answered step left it); send it on another stream or daemon")));
      return;
    }
    if (next == kEnd) {
      std::string why;
      grpc::Status end = grpc::Status::OK;  // the client closed its side: every step answered
      if (service_->watchdog_->Expired(watch_, &why)) {
        service_->metrics_->streams_expired->Increment();
        end = grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED, why);
      } else if (ctx_->IsCancelled()) {
        end = grpc::Status(grpc::StatusCode::CANCELLED, "the client cancelled the stream");
      }
      FinishOnce(end);
      return;
    }
    service_->watchdog_->Touch(watch_);
    service_->watchdog_->SetBusy(watch_, true);
    service_->metrics_->bytes_received->Increment(static_cast<double>(req_.ByteSizeLong()));
    read_at_ = absl::Now();
    service_->pool_->Submit([this] {
      run_at_ = absl::Now();
      resp_.Clear();
      auto step = [this] { return service_->RunInferStep(req_, call_.client(), &resp_); };
      absl::Status s = Guarded(step);
      service_->watchdog_->SetBusy(watch_, false);
      if (!s.ok()) {
        FinishOnce(ToGrpcStatus(s));
        return;
      }
      service_->metrics_->bytes_sent->Increment(static_cast<double>(resp_.ByteSizeLong()));
      write_at_ = absl::Now();
      StartWrite(&resp_);
    });
  }

  void OnWriteDone(bool ok) override {
    BLOCKD_LOG(kDebug, "Infer stream step: waited for a pool thread ", absl::ToDoubleMicroseconds(run_at_ - read_at_),
               " us, ran ", absl::ToDoubleMicroseconds(write_at_ - run_at_), " us, written in ",
               absl::ToDoubleMicroseconds(absl::Now() - write_at_), " us");
    bool drain = false;
    {
      absl::MutexLock lock(&mu_);
      busy_ = false;
      drain = draining_ || service_->draining_;
    }
    if (!ok) {
      FinishOnce(grpc::Status(grpc::StatusCode::CANCELLED, "the stream broke while sending a step's output"));
      return;
    }
    service_->watchdog_->Touch(watch_);
    if (drain) {
      if (FinishOnceLater()) FinishDraining();
      return;
    }
    StartRead(&req_);
  }

  void OnDone() override {
    {
      absl::MutexLock lock(&service_->infer_mu_);
      service_->infer_streams_.erase(this);
    }
    if (watch_ != 0) service_->watchdog_->Remove(watch_);
    delete this;
  }

 private:
  // True the first time: the caller finishes the stream. Later calls (a pending read failing after
  // draining finished it) do nothing.
  bool FinishOnceLater() {
    absl::MutexLock lock(&mu_);
    if (finished_) return false;
    finished_ = true;
    return true;
  }
  void FinishOnce(const grpc::Status& s) {
    if (FinishOnceLater()) Finish(call_.Finish(s));
  }

  BlockServiceImpl* service_;
  grpc::CallbackServerContext* ctx_;
  Call call_;
  uint64_t watch_ = 0;
  v1::InferStepRequest req_;
  v1::InferStepResponse resp_;
  absl::Time read_at_, run_at_, write_at_;  // the step's, for the debug log's times
  absl::Mutex mu_;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;  // Finish called or about to be
  bool busy_ ABSL_GUARDED_BY(mu_) = false;      // a step is running or its output being written
  bool draining_ ABSL_GUARDED_BY(mu_) = false;
};

void BlockServiceImpl::EndInferStreams() {
  std::vector<InferReactor*> waiting;
  {
    absl::MutexLock lock(&infer_mu_);
    for (InferReactor* r : infer_streams_) {
      if (r->MarkDraining()) waiting.push_back(r);
    }
  }
  // Outside infer_mu_: a finished stream's OnDone takes it. Each of these is marked finished but
  // not yet Finished, so none reaches OnDone before its Finish below.
  for (InferReactor* r : waiting) r->FinishDraining();
}

grpc::ServerBidiReactor<v1::InferStepRequest, v1::InferStepResponse>* BlockServiceImpl::Infer(
    grpc::CallbackServerContext* ctx) {
  return new InferReactor(this, ctx);
}

}  // namespace blockd
