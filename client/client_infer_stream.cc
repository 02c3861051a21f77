// The Client's Infer stream (Client::InferStream): the steps of sessions on one bidirectional
// stream, on a completion queue of its own (gRPC's async API), so that a step's write and read
// are both in flight at once and its answer can be polled for (ClientOptions::busy_wait_steps).
#include <cstdint>
#include <memory>

#include <grpcpp/client_context.h>
#include <grpcpp/completion_queue.h>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "client/client.h"

namespace blockd {
namespace {
enum Op : unsigned { kStarted = 1, kWritten = 2, kRead = 4, kWritesDone = 8, kFinished = 16 };
// busy_wait_steps: how long a step polls for its answer before it sleeps.
constexpr absl::Duration kBusyWaitLimit = absl::Seconds(1);
void* Tag(Op op) { return reinterpret_cast<void*>(static_cast<uintptr_t>(op)); }
}  // namespace

absl::StatusOr<std::unique_ptr<Client::InferStream>> Client::OpenInferStream(const CallOptions& call) {
  std::unique_ptr<InferStream> s(new InferStream());
  s->ctx_ = std::make_unique<grpc::ClientContext>();
  Prepare(s->ctx_.get(), call);
  s->busy_wait_ = options_.busy_wait_steps;
  s->stream_ = NextStub()->PrepareAsyncInfer(s->ctx_.get(), &s->cq_);
  s->stream_->StartCall(Tag(kStarted));
  // A stream that could not start fails its first step with the call's status (Close).
  if (!s->Await(kStarted, /*busy=*/false)) s->failed_ |= kStarted;
  return s;
}

Client::InferStream::~InferStream() {
  if (!done_) Close().IgnoreError();
}

bool Client::InferStream::Await(unsigned ops, bool busy) {
  while ((came_ & ops) != ops) {
    void* tag = nullptr;
    bool ok = false;
    // Busy: polls for up to kBusyWaitLimit (a stalled daemon does not keep a core busy for
    // good), then sleeps like the rest. The queue is shut down only after every operation has
    // come back, so Next returns an event.
    bool got = false;
    if (busy) {
      const absl::Time until = absl::Now() + kBusyWaitLimit;
      for (int i = 0; !got; ++i) {
        got = cq_.AsyncNext(&tag, &ok, gpr_inf_past(GPR_CLOCK_MONOTONIC)) == grpc::CompletionQueue::GOT_EVENT;
        if (!got && i % 1024 == 1023 && absl::Now() > until) break;
      }
    }
    if (!got) cq_.Next(&tag, &ok);
    const unsigned op = static_cast<unsigned>(reinterpret_cast<uintptr_t>(tag));
    came_ |= op;
    if (!ok) failed_ |= op;
  }
  const bool ok = (failed_ & ops) == 0;
  came_ &= ~ops;
  failed_ &= ~ops;
  return ok;
}

absl::StatusOr<v1::InferStepResponse> Client::InferStream::Step(const v1::InferStepRequest& request) {
  if (done_) {
    return absl::FailedPreconditionError(
        absl::StrCat("this Infer stream has ended (", final_.ToString(), "); open a new one"));
  }
  v1::InferStepResponse response;
  // A failed start, write or read means the server ended the stream: its status says why.
  bool ok = (failed_ & kStarted) == 0;
  if (ok) {
    stream_->Write(request, Tag(kWritten));
    stream_->Read(&response, Tag(kRead));
    ok = Await(kWritten | kRead, busy_wait_);
  }
  if (!ok) {
    absl::Status s = Close();
    return s.ok() ? absl::UnavailableError("the server ended the Infer stream without answering the step") : s;
  }
  return response;
}

absl::Status Client::InferStream::Close() {
  if (done_) return final_;
  done_ = true;
  if ((failed_ & kStarted) == 0) {
    stream_->WritesDone(Tag(kWritesDone));
    Await(kWritesDone, /*busy=*/false);
    v1::InferStepResponse extra;
    do {
      stream_->Read(&extra, Tag(kRead));
    } while (Await(kRead, /*busy=*/false));
  }
  grpc::Status status;
  stream_->Finish(&status, Tag(kFinished));
  Await(kFinished, /*busy=*/false);
  final_ = FromGrpcStatus(status);
  cq_.Shutdown();
  void* tag = nullptr;
  bool ok = false;
  while (cq_.Next(&tag, &ok)) {
  }
  return final_;
}

}  // namespace blockd
