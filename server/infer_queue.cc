#include "server/infer_queue.h"

#include <utility>

#include "base/log.h"

namespace blockd {

// The slot for the next call: when it arrives, a call of the queue's method goes to the factory,
// any other gets UNIMPLEMENTED (and deletes itself once that is sent); then a new slot waits.
class InferQueue::Accept final : public QueueTag {
 public:
  explicit Accept(InferQueue* queue) : queue_(queue), call_(std::make_unique<AsyncCall>()) {}
  AsyncCall* call() { return call_.get(); }

  void Proceed(bool ok) override {
    if (!ok) {  // the server shuts down: no call came, and none will
      queue_->accept_.reset();
      return;
    }
    std::unique_ptr<Accept> self = std::move(queue_->accept_);
    queue_->Request();
    if (call_->ctx.method() == queue_->method_) {
      queue_->factory_(std::move(call_));
      return;
    }
    // Another method: refused as gRPC refuses one it does not know. The done notification and
    // the finish both come back to this object, which goes after the second.
    call_->done.to = &refused_;
    refused_.owner = std::move(self);
    call_->stream.Finish(grpc::Status(grpc::StatusCode::UNIMPLEMENTED, "unknown method " + call_->ctx.method()),
                         &refused_);
  }

 private:
  struct Refused final : QueueTag {
    void Proceed(bool) override {
      if (++seen == 2) owner.reset();  // the finish and the done notification
    }
    int seen = 0;
    std::unique_ptr<Accept> owner;
  };

  InferQueue* queue_;
  std::unique_ptr<AsyncCall> call_;
  Refused refused_;
};

InferQueue::InferQueue(grpc::ServerBuilder* builder, std::string method, absl::Duration busy)
    : method_(std::move(method)), busy_(busy) {
  builder->RegisterAsyncGenericService(&service_);
  cq_ = builder->AddCompletionQueue();
}

InferQueue::~InferQueue() { Stop(); }

void InferQueue::Start(Factory factory) {
  factory_ = std::move(factory);
  Request();
  thread_ = std::thread([this] { Run(); });
}

void InferQueue::Request() {
  accept_ = std::make_unique<Accept>(this);
  AsyncCall* call = accept_->call();
  call->ctx.AsyncNotifyWhenDone(&call->done);
  service_.RequestCall(&call->ctx, &call->stream, cq_.get(), cq_.get(), accept_.get());
}

void InferQueue::Run() {
  absl::Time busy_until = absl::InfinitePast();
  for (;;) {
    void* tag = nullptr;
    bool ok = false;
    grpc::CompletionQueue::NextStatus got;
    if (absl::Now() < busy_until) {
      got = cq_->AsyncNext(&tag, &ok, gpr_inf_past(GPR_CLOCK_MONOTONIC));
      if (got == grpc::CompletionQueue::TIMEOUT) continue;
    } else {
      got = cq_->Next(&tag, &ok) ? grpc::CompletionQueue::GOT_EVENT : grpc::CompletionQueue::SHUTDOWN;
    }
    if (got == grpc::CompletionQueue::SHUTDOWN) return;
    static_cast<QueueTag*>(tag)->Proceed(ok);
    busy_until = absl::Now() + busy_;
  }
}

void InferQueue::Stop() {
  if (!thread_.joinable()) return;
  cq_->Shutdown();
  thread_.join();
  accept_.reset();
}

}  // namespace blockd
