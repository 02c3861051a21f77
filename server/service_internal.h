// What service.cc and service_streams.cc share: one RPC's admission and accounting (Call) and the
// guard that turns an allocation failure into this call's RESOURCE_EXHAUSTED.
#pragma once

#include <chrono>
#include <exception>
#include <new>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "base/status_macros.h"
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

}  // namespace blockd
