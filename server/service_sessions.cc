// The inference-session RPCs of BlockServiceImpl: OpenSession, InferStep, the Infer stream,
// TrimSession, ForkSession, CloseSession, ListSessions. Sessions belong to the caller's identity
// (reactor->client(), as activation handles do) and need the read role: inference, not training.
#include <algorithm>
#include <cmath>
#include <utility>

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

// A time for the debug log; no clock read at other levels.
absl::Time Stamp() { return LogEnabled(LogLevel::kDebug) ? absl::Now() : absl::InfinitePast(); }

}  // namespace

absl::Status BlockServiceImpl::RunInferStep(const v1::InferStepRequest& req, const std::string& client,
                                            v1::InferStepResponse* resp) {
  const absl::Time t_in = Stamp();
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

// Infer: InferStep requests in, one response per request, in order. One step runs at a time: read,
// compute on the pool, write. The next read is started as soon as the step is done with its
// request, beside the reply's write: the client's next step is read while gRPC still finishes
// sending the last reply (its OnWriteDone came 80-85 us after StartWrite on the GPU host, after the
// client already had the bytes), so it runs on arrival. A step that finishes while the previous
// reply is still being written waits for that write (one write at a time); its reply has a buffer
// of its own, and no read starts until its write does, so at most two replies are ever held.
// The first failed step ends the stream with its status (the session is unchanged by it, so the
// client can reopen a stream and go on). Watched like the other streams: a client that stops
// sending for --stream_idle_timeout loses the stream, not the session. Draining ends the stream
// with UNAVAILABLE: at once when it waits for the client's next step, else after the step it runs
// has been answered (a step read but not started is not run).
// `mu_` guards those choices. The stream is finished exactly once, outside `mu_`, and only when no
// step runs and no write is in flight (End: whoever leaves it idle finishes it), so that nothing
// touches the reactor after its OnDone; a read may be pending then, and fails.
class BlockServiceImpl::InferReactor
    : public grpc::ServerBidiReactor<v1::InferStepRequest, v1::InferStepResponse> {
 public:
  InferReactor(BlockServiceImpl* service, grpc::CallbackServerContext* ctx)
      : service_(service), ctx_(ctx), call_(service, "Infer") {
    absl::Status admitted = call_.Admit(ctx, Role::kRead);
    if (!admitted.ok()) {
      End(ToGrpcStatus(admitted));
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
  // FinishDraining (the stream waits for a read); false when the running step or the write in
  // flight will end it.
  bool MarkDraining() {
    absl::MutexLock lock(&mu_);
    draining_ = true;
    if (finished_ || running_ || writing_) return false;
    finished_ = true;
    ended_ = true;
    return true;
  }
  void FinishDraining() { Finish(call_.Finish(Drained())); }

  void OnReadDone(bool ok) override {
    bool drained = false;
    {
      absl::MutexLock lock(&mu_);
      if (finished_) return;  // the stream is ending while this read was pending
      draining_ = draining_ || service_->draining_;  // set before EndInferStreams reaches this stream
      drained = ok && draining_;
      if (ok && !drained) running_ = true;
    }
    if (drained) {  // read while draining: not run
      End(grpc::Status(grpc::StatusCode::UNAVAILABLE,
                       "blockd is draining: this step was not run (the session is as the last answered step left "
                       "it); send it on another stream or daemon"));
      return;
    }
    if (!ok) {
      std::string why;
      grpc::Status end = grpc::Status::OK;  // the client closed its side: every step answered
      if (service_->watchdog_->Expired(watch_, &why)) {
        service_->metrics_->streams_expired->Increment();
        end = grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED, why);
      } else if (ctx_->IsCancelled()) {
        end = grpc::Status(grpc::StatusCode::CANCELLED, "the client cancelled the stream");
      }
      End(end);
      return;
    }
    service_->watchdog_->Touch(watch_);
    service_->watchdog_->SetBusy(watch_, true);
    service_->metrics_->bytes_received->Increment(static_cast<double>(req_.ByteSizeLong()));
    Reply* r = &replies_[next_reply_];
    next_reply_ ^= 1;
    r->read_at = Stamp();
    service_->pool_->Submit([this, r] { RunStep(r); });
  }

  void OnWriteDone(bool ok) override {
    BLOCKD_LOG(kDebug, "Infer stream step: waited for a pool thread ",
               absl::ToDoubleMicroseconds(written_->run_at - written_->read_at), " us, ran ",
               absl::ToDoubleMicroseconds(written_->write_at - written_->run_at), " us, written in ",
               absl::ToDoubleMicroseconds(absl::Now() - written_->write_at), " us (read at unix ",
               absl::ToUnixMicros(written_->read_at), ", written from unix ", absl::ToUnixMicros(written_->write_at),
               ")");
    if (ok) service_->watchdog_->Touch(watch_);
    Reply* next = nullptr;
    bool read = false, due = false;
    grpc::Status end;
    {
      absl::MutexLock lock(&mu_);
      writing_ = false;
      // A broken write ends the stream CANCELLED, also when the client had already closed its side
      // (an OK end): that step's answer never reached it.
      if (!ok && (!finished_ || end_.ok())) {
        finished_ = true;
        end_ = grpc::Status(grpc::StatusCode::CANCELLED, "the stream broke while sending a step's output");
      }
      const bool drain = draining_ || service_->draining_;
      if (!finished_ && pending_ != nullptr) {  // the step that finished during this write
        next = std::exchange(pending_, nullptr);
        writing_ = true;
        written_ = next;
        read = !drain;
      } else if (!finished_ && drain && !running_) {  // every step read has been answered
        finished_ = true;
        end_ = Drained();
      }
      due = Due();
      if (due) end = end_;
    }
    if (due) {
      Finish(call_.Finish(end));
      return;
    }
    // The read first: once the write is started, its OnWriteDone may end the stream.
    if (read) StartRead(&req_);
    if (next != nullptr) Write(next);
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
  // A step's reply and its times (for the debug log).
  struct Reply {
    v1::InferStepResponse resp;
    absl::Time read_at, run_at, write_at;
  };

  // On the pool: runs the step read into req_, then writes its reply (or holds it for the write in
  // flight) and starts the next read.
  void RunStep(Reply* r) {
    r->run_at = Stamp();
    r->resp.Clear();
    auto step = [this, r] { return service_->RunInferStep(req_, call_.client(), &r->resp); };
    const absl::Status s = Guarded(step);
    service_->watchdog_->SetBusy(watch_, false);
    bool write = false, read = false, due = false;
    grpc::Status end;
    {
      absl::MutexLock lock(&mu_);
      running_ = false;
      if (!s.ok() && !finished_) {
        finished_ = true;
        end_ = ToGrpcStatus(s);
      }
      if (finished_) {  // a failed step, or the stream broke while it ran: its reply is not sent
        due = Due();
        if (due) end = end_;
      } else {
        // Counted here: once the lock goes, a parked reply's stream may end (and its reactor go)
        // before this thread runs again.
        service_->metrics_->bytes_sent->Increment(static_cast<double>(r->resp.ByteSizeLong()));
        if (writing_) {
          pending_ = r;  // OnWriteDone writes it
        } else {
          write = true;
          writing_ = true;
          written_ = r;
          read = !(draining_ || service_->draining_);
        }
      }
    }
    if (due) {
      Finish(call_.Finish(end));
      return;
    }
    // Nothing here touches the reactor unless this thread holds a write it has yet to start.
    if (read) StartRead(&req_);
    if (write) Write(r);
  }

  void Write(Reply* r) {
    r->write_at = Stamp();
    StartWrite(&r->resp);
  }

  // Ends the stream with `s` unless it has an end already: now when it is idle, else through the
  // running step or the write in flight, whichever is done last (Due).
  void End(const grpc::Status& s) {
    {
      absl::MutexLock lock(&mu_);
      if (finished_) return;
      finished_ = true;
      end_ = s;
      if (!Due()) return;
    }
    Finish(call_.Finish(s));
  }
  // Under mu_, after running_ or writing_ fell: true once when the ending stream became idle, and
  // the caller then finishes it with end_.
  bool Due() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (!finished_ || ended_ || running_ || writing_) return false;
    ended_ = true;
    return true;
  }
  static grpc::Status Drained() {
    return grpc::Status(grpc::StatusCode::UNAVAILABLE,
                        "blockd is draining: the Infer stream ends after its last reply; a step sent after the one "
                        "that reply answers was not run (the session is as that reply left it); go on with the "
                        "session on another stream or daemon");
  }

  BlockServiceImpl* service_;
  grpc::CallbackServerContext* ctx_;
  Call call_;
  uint64_t watch_ = 0;
  v1::InferStepRequest req_;  // the read's, then the running step's
  Reply replies_[2];          // the running step's and the one being written
  int next_reply_ = 0;        // OnReadDone's (one read at a time)
  Reply* written_ = nullptr;  // the reply of the write in flight
  absl::Mutex mu_;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;  // the stream ends with end_ (once Due)
  bool ended_ ABSL_GUARDED_BY(mu_) = false;     // Finish called or about to be
  grpc::Status end_ ABSL_GUARDED_BY(mu_);       // set with finished_ (a broken write replaces OK); read after Due
  bool running_ ABSL_GUARDED_BY(mu_) = false;   // a step runs on the pool
  bool writing_ ABSL_GUARDED_BY(mu_) = false;   // a reply is being written
  Reply* pending_ ABSL_GUARDED_BY(mu_) = nullptr;  // a finished step's reply, written after the one in flight
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
