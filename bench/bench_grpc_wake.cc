// What it costs a step on a gRPC stream that the server's receiving thread sleeps between steps
// (issue 17's decode target). A decode step over the Infer stream takes ~0.1 ms to reach the
// daemon's OnReadDone on the GPU host against ~0.04 ms for its answer to reach a busy-waiting
// client; the daemon's side is gRPC's callback poller waking in epoll_wait. This bench asks whether
// a server thread of our own that polls a completion queue takes the step sooner. (It does here, by
// 60-100 us with GRPC_POLL_STRATEGY=poll; the daemon built that way, f886271, did not gain: see
// bench/RESULTS.md.)
//
// A server process (this binary, re-run with --serve=MODE) echoes a bidi stream's messages of
// --bytes: each message is handed to a worker thread that spins for --work_us (as the daemon's step
// runs on a pool thread while gRPC's threads sleep), then echoes it and reads the next one. The
// client (this process) busy-polls its own completion queue, as ClientOptions::busy_wait_steps
// does, and times each step from its write to the echo. Modes:
//   callback          gRPC's callback API (CallbackGenericService): how the daemon serves Infer;
//   async_busy        the async API, one thread busy-polling the server's completion queue;
//   async_busy_mixed  the same beside a callback service (the default health service), as the
//                     daemon's other methods would be;
//   async_sleep       the async API, one thread sleeping in the completion queue's Next;
//   async_sleep_mixed the same beside a callback service.
// --idle_connections=N opens N connections that carry no call before the stream's own: gRPC's
// server hands accepted connections to its pollsets in turn, so the stream's may land on another
// pollset than the first. Prints each mode's median, 10th and 90th percentile of the step less
// --work_us.
//
//   bench_grpc_wake [--target=127.0.0.1:0 | unix:/tmp/blockd-wake.sock] [--bytes=8192]
//                   [--work_us=4000] [--steps=300] [--rounds=2] [--idle_connections=0]
//                   [--modes=callback,async_busy,async_busy_mixed,async_sleep,async_sleep_mixed]
#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_split.h"

namespace {

constexpr char kMethod[] = "/blockd.bench.Echo/Stream";

using Clock = std::chrono::steady_clock;

void Spin(int64_t us) {
  const auto until = Clock::now() + std::chrono::microseconds(us);
  while (Clock::now() < until) {
  }
}

[[noreturn]] void Fail(const std::string& what) {
  std::fprintf(stderr, "bench_grpc_wake: %s\n", what.c_str());
  std::exit(1);
}

// One message at a time from the receiving side to a spinning worker and back: the worker waits
// for a message (Post), "computes" for work_us, then runs `reply`.
class Worker {
 public:
  Worker(int64_t work_us, std::function<void()> reply)
      : work_us_(work_us), reply_(std::move(reply)), thread_([this] { Run(); }) {}
  ~Worker() {
    stop_.store(true);
    thread_.join();
  }
  void Post() { ready_.store(true, std::memory_order_release); }

 private:
  void Run() {
    while (!stop_.load(std::memory_order_relaxed)) {
      if (!ready_.exchange(false, std::memory_order_acquire)) continue;
      Spin(work_us_);
      reply_();
    }
  }
  int64_t work_us_;
  std::function<void()> reply_;
  std::atomic<bool> ready_{false}, stop_{false};
  std::thread thread_;
};

// --- callback server ---------------------------------------------------------------------------

class EchoReactor : public grpc::ServerGenericBidiReactor {
 public:
  explicit EchoReactor(int64_t work_us)
      : worker_(work_us, [this] {
          while (writing_.load(std::memory_order_acquire)) {  // one write at a time
          }
          out_ = in_;
          writing_.store(true);
          StartRead(&in_);  // the next read beside the write, as the daemon does
          StartWrite(&out_);
        }) {
    StartRead(&in_);
  }
  void OnReadDone(bool ok) override {
    if (!ok) {
      Finish(grpc::Status::OK);
      return;
    }
    worker_.Post();
  }
  void OnWriteDone(bool) override { writing_.store(false, std::memory_order_release); }
  void OnDone() override { delete this; }

 private:
  grpc::ByteBuffer in_, out_;
  std::atomic<bool> writing_{false};
  Worker worker_;
};

class EchoCallbackService : public grpc::CallbackGenericService {
 public:
  explicit EchoCallbackService(int64_t work_us) : work_us_(work_us) {}
  grpc::ServerGenericBidiReactor* CreateReactor(grpc::GenericCallbackServerContext*) override {
    return new EchoReactor(work_us_);
  }

 private:
  int64_t work_us_;
};

// --- async server ------------------------------------------------------------------------------

// One stream at a time (the client opens one per round). Tags: 1 the call arrived, 2 a read done,
// 3 a write done, 4 finished.
void ServeAsync(grpc::AsyncGenericService* service, grpc::ServerCompletionQueue* cq, bool busy, int64_t work_us) {
  for (;;) {
    grpc::GenericServerContext ctx;
    grpc::GenericServerAsyncReaderWriter stream(&ctx);
    grpc::ByteBuffer in, out;
    std::atomic<bool> writing{false};
    Worker worker(work_us, [&] {
      while (writing.load(std::memory_order_acquire)) {  // one write at a time
      }
      out = in;
      writing.store(true);
      stream.Read(&in, reinterpret_cast<void*>(2));
      stream.Write(out, reinterpret_cast<void*>(3));
    });
    service->RequestCall(&ctx, &stream, cq, cq, reinterpret_cast<void*>(1));
    bool done = false;
    while (!done) {
      void* tag = nullptr;
      bool ok = false;
      grpc::CompletionQueue::NextStatus got;
      if (busy) {
        got = cq->AsyncNext(&tag, &ok, gpr_inf_past(GPR_CLOCK_MONOTONIC));
        if (got == grpc::CompletionQueue::TIMEOUT) continue;
      } else {
        got = cq->Next(&tag, &ok) ? grpc::CompletionQueue::GOT_EVENT : grpc::CompletionQueue::SHUTDOWN;
      }
      if (got == grpc::CompletionQueue::SHUTDOWN) return;
      switch (reinterpret_cast<intptr_t>(tag)) {
        case 1:
          if (!ok) return;
          stream.Read(&in, reinterpret_cast<void*>(2));
          break;
        case 2:
          if (ok) {
            worker.Post();
          } else {
            stream.Finish(grpc::Status::OK, reinterpret_cast<void*>(4));
          }
          break;
        case 3:
          writing.store(false, std::memory_order_release);
          break;
        case 4:
          done = true;
          break;
      }
    }
  }
}

int Serve(const std::string& mode, const std::string& target, int64_t work_us) {
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(target, grpc::InsecureServerCredentials(), &port);
  std::unique_ptr<EchoCallbackService> callback;
  grpc::AsyncGenericService async;
  std::unique_ptr<grpc::ServerCompletionQueue> cq;
  if (mode == "callback") {
    callback = std::make_unique<EchoCallbackService>(work_us);
    builder.RegisterCallbackGenericService(callback.get());
  } else if (mode == "async_busy" || mode == "async_busy_mixed" || mode == "async_sleep" ||
             mode == "async_sleep_mixed") {
    grpc::EnableDefaultHealthCheckService(mode == "async_busy_mixed" || mode == "async_sleep_mixed");
    builder.RegisterAsyncGenericService(&async);
    cq = builder.AddCompletionQueue();
  } else {
    Fail("unknown mode " + mode);
  }
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr) Fail("cannot serve on " + target);
  std::printf("READY %d\n", port);
  std::fflush(stdout);
  if (cq != nullptr) {
    ServeAsync(&async, cq.get(), mode.rfind("async_busy", 0) == 0, work_us);
  } else {
    server->Wait();
  }
  return 0;
}

// --- client ------------------------------------------------------------------------------------

struct Child {
  pid_t pid = -1;
  std::string target;
};

Child StartServer(const char* self, const std::string& mode, const std::string& target, int64_t work_us) {
  int fds[2];
  if (pipe(fds) != 0) Fail("pipe");
  const pid_t pid = fork();
  if (pid < 0) Fail("fork");
  if (pid == 0) {
    dup2(fds[1], 1);
    close(fds[0]);
    const std::string m = "--serve=" + mode, t = "--target=" + target, w = "--work_us=" + std::to_string(work_us);
    execl(self, self, m.c_str(), t.c_str(), w.c_str(), static_cast<char*>(nullptr));
    _exit(127);
  }
  close(fds[1]);
  std::string line;
  char c;
  while (read(fds[0], &c, 1) == 1 && c != '\n') line.push_back(c);
  close(fds[0]);
  int port = 0;
  if (std::sscanf(line.c_str(), "READY %d", &port) != 1) Fail("the " + mode + " server did not start: " + line);
  Child child{pid, target};
  if (target.rfind("unix:", 0) != 0) child.target = target.substr(0, target.rfind(':') + 1) + std::to_string(port);
  return child;
}

// Busy-polls `cq` until every tag of `want` (a bit each) has come back; false when one failed.
bool AwaitTags(grpc::CompletionQueue* cq, unsigned want) {
  bool all_ok = true;
  while (want != 0) {
    void* tag = nullptr;
    bool ok = false;
    if (cq->AsyncNext(&tag, &ok, gpr_inf_past(GPR_CLOCK_MONOTONIC)) != grpc::CompletionQueue::GOT_EVENT) continue;
    want &= ~static_cast<unsigned>(reinterpret_cast<uintptr_t>(tag));
    all_ok = all_ok && ok;
  }
  return all_ok;
}

// A connection of its own to `target` (a channel argument apart from every other channel's).
std::shared_ptr<grpc::Channel> Connect(const std::string& target, int id) {
  grpc::ChannelArguments args;
  args.SetInt("blockd.bench.connection", id);
  auto channel = grpc::CreateCustomChannel(target, grpc::InsecureChannelCredentials(), args);
  if (!channel->WaitForConnected(gpr_time_add(gpr_now(GPR_CLOCK_REALTIME), gpr_time_from_seconds(30, GPR_TIMESPAN)))) {
    Fail("cannot connect to " + target);
  }
  return channel;
}

// The steps' times less the work, in microseconds. `idle` connections are opened first and kept
// open without calls, so that the stream's is the server's idle+1st.
std::vector<double> Run(const std::string& target, int64_t bytes, int64_t work_us, int steps, int idle) {
  std::vector<std::shared_ptr<grpc::Channel>> idle_channels;
  for (int i = 0; i < idle; ++i) idle_channels.push_back(Connect(target, i + 1));
  auto channel = Connect(target, 0);
  grpc::GenericStub stub(channel);
  grpc::CompletionQueue cq;
  grpc::ClientContext ctx;
  auto stream = stub.PrepareCall(&ctx, kMethod, &cq);
  stream->StartCall(reinterpret_cast<void*>(1));
  if (!AwaitTags(&cq, 1)) Fail("the stream did not start");
  const std::string payload(static_cast<size_t>(bytes), 'x');
  std::vector<double> times;
  for (int i = 0; i < steps + 16; ++i) {  // the first 16 warm up
    grpc::Slice slice(payload);
    grpc::ByteBuffer request(&slice, 1), reply;
    const auto start = Clock::now();
    stream->Write(request, reinterpret_cast<void*>(2));
    stream->Read(&reply, reinterpret_cast<void*>(4));
    if (!AwaitTags(&cq, 2 | 4)) Fail("a step failed");
    const double us = std::chrono::duration<double, std::micro>(Clock::now() - start).count();
    if (reply.Length() != static_cast<size_t>(bytes)) Fail("the echo has the wrong size");
    if (i >= 16) times.push_back(us - static_cast<double>(work_us));
  }
  stream->WritesDone(reinterpret_cast<void*>(8));
  grpc::Status status;
  stream->Finish(&status, reinterpret_cast<void*>(16));
  AwaitTags(&cq, 8 | 16);
  if (!status.ok()) Fail("the stream ended with " + status.error_message());
  cq.Shutdown();
  void* tag;
  bool ok;
  while (cq.Next(&tag, &ok)) {
  }
  return times;
}

double Percentile(std::vector<double> v, double p) {
  std::sort(v.begin(), v.end());
  return v[static_cast<size_t>(p * static_cast<double>(v.size() - 1))];
}

}  // namespace

int main(int argc, char** argv) {
  std::string target = "127.0.0.1:0", serve, modes = "callback,async_busy,async_busy_mixed,async_sleep,async_sleep_mixed";
  int64_t bytes = 8192, work_us = 4000;
  int steps = 300, rounds = 2, idle = 0;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a.rfind("--target=", 0) == 0) target = a.substr(9);
    if (a.rfind("--serve=", 0) == 0) serve = a.substr(8);
    if (a.rfind("--modes=", 0) == 0) modes = a.substr(8);
    if (a.rfind("--bytes=", 0) == 0) bytes = std::stoll(a.substr(8));
    if (a.rfind("--work_us=", 0) == 0) work_us = std::stoll(a.substr(10));
    if (a.rfind("--steps=", 0) == 0) steps = std::stoi(a.substr(8));
    if (a.rfind("--rounds=", 0) == 0) rounds = std::stoi(a.substr(9));
    if (a.rfind("--idle_connections=", 0) == 0) idle = std::stoi(a.substr(19));
  }
  if (!serve.empty()) return Serve(serve, target, work_us);
  std::printf("gRPC round trip less the work: %s, %lld-byte messages, %lld us of work a step, %d steps, %d idle "
              "connections first\n",
              target.c_str(), static_cast<long long>(bytes), static_cast<long long>(work_us), steps, idle);
  for (int round = 1; round <= rounds; ++round) {
    for (const std::string& mode : std::vector<std::string>(absl::StrSplit(modes, ','))) {
      if (target.rfind("unix:", 0) == 0) unlink(target.substr(5).c_str());
      Child child = StartServer("/proc/self/exe", mode, target, work_us);
      const std::vector<double> t = Run(child.target, bytes, work_us, steps, idle);
      kill(child.pid, SIGKILL);
      waitpid(child.pid, nullptr, 0);
      std::printf("round %d %-17s median %7.1f us  p10 %7.1f  p90 %7.1f\n", round, mode.c_str(), Percentile(t, 0.5),
                  Percentile(t, 0.1), Percentile(t, 0.9));
      std::fflush(stdout);
    }
  }
  return 0;
}
