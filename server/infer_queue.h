// The Infer stream served from a completion queue of blockd's own, polled by a thread that
// busy-waits for the next step for a while after each event (--infer_poll_us), instead of gRPC's
// callback API, whose poller sleeps in the kernel between steps. On the GPU host a step reaches a
// busy-polled queue 60-100 us sooner than a callback reactor, beside the callback services of the
// rest of the daemon when gRPC polls with `poll` (bench_grpc_wake, bench/RESULTS.md): the daemon
// sets GRPC_POLL_STRATEGY=poll when the option is on.
//
// The method is taken out of the generated service (MarkMethodGeneric) and served through gRPC's
// async generic service: the queue hands each call of it to a factory, which makes an
// AsyncBidiReactor of it; calls of any other method name get UNIMPLEMENTED, as gRPC would answer.
//
//   InferQueue queue(&builder, "/blockd.v1.BlockService/Infer", absl::Microseconds(1000));
//   auto server = builder.BuildAndStart();
//   queue.Start([&](std::unique_ptr<AsyncCall> call) { new MyReactor(std::move(call)); });
//   ... server->Shutdown(); server->Wait(); queue.Stop();
#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <thread>

#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/support/proto_buffer_reader.h>
#include <grpcpp/support/proto_buffer_writer.h>

#include "absl/time/time.h"

namespace blockd {

// What the queue's thread hands a completion to.
class QueueTag {
 public:
  virtual void Proceed(bool ok) = 0;

 protected:
  ~QueueTag() = default;
};

// One call of the queue's method: its context and stream, made before the call arrives, and the
// tag of its done notification (asked for then too), handed on to its reactor once there is one.
struct AsyncCall {
  struct Forward final : QueueTag {
    void Proceed(bool ok) override { to->Proceed(ok); }
    QueueTag* to = nullptr;
  };
  grpc::GenericServerContext ctx;
  grpc::GenericServerAsyncReaderWriter stream{&ctx};
  Forward done;
};

class InferQueue {
 public:
  using Factory = std::function<void(std::unique_ptr<AsyncCall>)>;
  // Registers the generic service and a completion queue on `builder`, before BuildAndStart.
  InferQueue(grpc::ServerBuilder* builder, std::string method, absl::Duration busy);
  ~InferQueue();
  // After BuildAndStart: the thread that takes calls and completions.
  void Start(Factory factory);
  // After the server has shut down and every call has ended (grpc::Server::Wait).
  void Stop();

 private:
  class Accept;
  void Run();
  void Request();

  std::string method_;
  absl::Duration busy_;
  grpc::AsyncGenericService service_;
  std::unique_ptr<grpc::ServerCompletionQueue> cq_;
  Factory factory_;
  std::thread thread_;
  std::unique_ptr<Accept> accept_;  // the call slot waiting for the next call
};

// The callback API's bidi reactor over an AsyncCall: the same StartRead, StartWrite and Finish,
// and OnReadDone, OnWriteDone and OnDone, so that one reactor's logic serves both APIs. OnDone
// comes once the call is finished and no operation of it is outstanding (a read pending when
// the stream ends completes first, failed). Messages are parsed and serialized here; a message
// that is not a Req ends the stream INVALID_ARGUMENT.
template <class Req, class Resp>
class AsyncBidiReactor {
 public:
  // On the queue's thread, as the call arrives (before any other completion of it).
  explicit AsyncBidiReactor(std::unique_ptr<AsyncCall> call) : call_(std::move(call)) {
    call_->done.to = &done_op_;
    outstanding_.store(1);  // the done notification
  }
  virtual ~AsyncBidiReactor() = default;

  grpc::ServerContextBase* context() { return &call_->ctx; }
  // Whether the client cancelled: known once the done notification came (the async API's rule).
  bool CallCancelled() { return done_seen_.load() && call_->ctx.IsCancelled(); }

  void StartRead(Req* req) {
    read_into_ = req;
    outstanding_.fetch_add(1);
    call_->stream.Read(&read_buf_, &read_op_);
  }
  void StartWrite(const Resp* resp) {
    write_buf_.Clear();
    bool own = false;
    static_cast<void>(grpc::SerializationTraits<Resp>::Serialize(*resp, &write_buf_, &own));  // built here: cannot fail
    outstanding_.fetch_add(1);
    call_->stream.Write(write_buf_, &write_op_);
  }
  void Finish(grpc::Status s) {
    if (s.ok() && !unparsable_.ok()) s = unparsable_;
    outstanding_.fetch_add(1);
    call_->stream.Finish(s, &finish_op_);
  }

  virtual void OnReadDone(bool ok) = 0;
  virtual void OnWriteDone(bool ok) = 0;
  virtual void OnDone() = 0;

 private:
  struct Op final : QueueTag {
    Op(AsyncBidiReactor* r, void (AsyncBidiReactor::*f)(bool)) : reactor(r), fn(f) {}
    void Proceed(bool ok) override { (reactor->*fn)(ok); }
    AsyncBidiReactor* reactor;
    void (AsyncBidiReactor::*fn)(bool);
  };

  void ReadDone(bool ok) {
    if (ok) {
      const grpc::Status parsed = grpc::SerializationTraits<Req>::Deserialize(&read_buf_, read_into_);
      if (!parsed.ok()) {
        unparsable_ = grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                                   "a message of the stream is not a " + Req::descriptor()->full_name());
        ok = false;
      }
    }
    OnReadDone(ok);
    Settle();
  }
  void WriteDone(bool ok) {
    OnWriteDone(ok);
    Settle();
  }
  void FinishDone(bool) {
    finished_.store(true);
    Settle();
  }
  void DoneNotified(bool) {
    done_seen_.store(true);
    Settle();
  }
  // One operation fewer; the last one of a finished call ends it. (A handler that starts an
  // operation counts it before this takes its own away.)
  void Settle() {
    if (outstanding_.fetch_sub(1) == 1 && finished_.load()) OnDone();
  }

  std::unique_ptr<AsyncCall> call_;
  grpc::ByteBuffer read_buf_, write_buf_;
  Req* read_into_ = nullptr;
  grpc::Status unparsable_;  // set by the queue's thread before the read's OnReadDone
  std::atomic<int> outstanding_{0};
  std::atomic<bool> finished_{false}, done_seen_{false};
  Op read_op_{this, &AsyncBidiReactor::ReadDone};
  Op write_op_{this, &AsyncBidiReactor::WriteDone};
  Op finish_op_{this, &AsyncBidiReactor::FinishDone};
  Op done_op_{this, &AsyncBidiReactor::DoneNotified};
};

}  // namespace blockd
