// What service.cc, service_streams.cc and service_sessions.cc share: one RPC's admission and
// accounting (Call), the guard that turns an allocation failure into this call's
// RESOURCE_EXHAUSTED, and the unary reactor with the Unary helper every unary RPC goes through.
#pragma once

#include <chrono>
#include <exception>
#include <functional>
#include <memory>
#include <type_traits>
#include <new>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "base/status_macros.h"
#include "server/convert.h"
#include "server/service.h"

namespace blockd {

// One RPC's admission, timing and metrics: Finish() records its code and duration exactly once
// and gives back the concurrency slot the call took.
class BlockServiceImpl::Call {
 public:
  Call(BlockServiceImpl* service, const char* method) : service_(service), method_(method), start_(absl::Now()) {
    service_->metrics_->RequestStarted();
    ++service_->inflight_;
  }
  ~Call() {
    if (!done_) Finish(grpc::Status(grpc::StatusCode::CANCELLED, "call dropped"));
  }
  Call(const Call&) = delete;
  Call& operator=(const Call&) = delete;

  // Draining, the deadline, who asks, whether its role allows the RPC, then a slot.
  absl::Status Admit(grpc::CallbackServerContext* ctx, Role needed) {
    if (service_->draining_) return absl::UnavailableError("blockd is draining: it finishes the calls in flight and stops");
    if (ctx->deadline() <= std::chrono::system_clock::now()) {
      return absl::DeadlineExceededError("the call's deadline passed before it started");
    }
    ASSIGN_OR_RETURN(Principal who, service_->Identify(ctx));
    RETURN_IF_ERROR(Authorize(who, needed, method_));
    RETURN_IF_ERROR(service_->TakeSlot(who));
    client_ = std::move(who.name);
    admitted_ = true;
    return absl::OkStatus();
  }
  const std::string& client() const { return client_; }

  // Returns the status to hand to the reactor's Finish.
  grpc::Status Finish(grpc::Status s) {
    if (!done_) {
      done_ = true;
      if (admitted_) service_->ReleaseSlot(client_);
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
  bool admitted_ = false;
  std::string client_;
};

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
  // The admitted caller's identity: the key of its quotas and of what it owns.
  const std::string& client() const { return client_; }
  void set_client(std::string client) { client_ = std::move(client); }
  void OnCancel() override {}
  void OnDone() override {
    if (undo_ && ctx_->IsCancelled()) undo_();
    delete this;
  }

 private:
  grpc::CallbackServerContext* ctx_;
  std::function<void()> undo_;
  std::string client_;
};


// A message's size on the wire, for the byte counters.
inline size_t WireSize(const google::protobuf::Message& m) { return m.ByteSizeLong(); }
inline size_t WireSize(const grpc::ByteBuffer& b) { return b.Length(); }

template <class Req, class Resp, class Fn>
grpc::ServerUnaryReactor* BlockServiceImpl::Unary(grpc::CallbackServerContext* ctx, const char* method, const Req& req,
                                                  const Resp* resp, Work work, Role needed, Fn fn) {
  auto* reactor = new UnaryReactor(ctx);
  auto call = std::make_shared<Call>(this, method);
  metrics_->bytes_received->Increment(static_cast<double>(WireSize(req)));
  absl::Status admitted = call->Admit(ctx, needed);
  if (!admitted.ok()) {
    reactor->Finish(call->Finish(ToGrpcStatus(admitted)));
    return reactor;
  }
  reactor->set_client(call->client());
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
    if (s.ok()) metrics_->bytes_sent->Increment(static_cast<double>(WireSize(*resp)));
    reactor->Finish(call->Finish(ToGrpcStatus(s)));
  };
  if (work == Work::kPool) {
    pool_->Submit(std::move(run));
  } else {
    run();
  }
  return reactor;
}

}  // namespace blockd
