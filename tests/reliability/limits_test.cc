// Deadlines and cancellation: a call whose deadline passes while it waits for a worker is never
// run (a Step does not step, a Forward keeps no handle), the client hears DEADLINE_EXCEEDED when
// its deadline passes rather than when the server gets to it, a Forward with keep_activations
// cancelled before its reply leaves never leaves a handle (one whose cancel crosses the reply is
// freed by the TTL), a stream cut by an oversized message applies nothing, the concurrent-call
// limit frees the slots of cancelled streams, and a download that a change to its tensors
// overtakes (it reads one tensor at a time: a Step, LoadWeights, Backward, ZeroGrad, restore, or the
// block re-created) ends with ABORTED rather than mixing two versions. (Each limit's
// RESOURCE_EXHAUSTED is also in the hostile-input battery; the message-size, memory, block and
// handle limits are there.)
#include <grpcpp/channel.h>
#include <grpcpp/client_context.h>
#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>
#include <grpcpp/support/channel_arguments.h>

#include <algorithm>
#include <atomic>
#include <functional>
#include <random>
#include <set>
#include <thread>

#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "tests/integration/harness.h"

namespace blockd::testing {
namespace {

using absl::StatusCode;

class Limits : public ::testing::Test {
 protected:
  void Start(ServerOptions o) {
    server_ = StartServer(std::move(o));
    ASSERT_NE(server_, nullptr);
    client_ = ConnectTo(*server_);
    ASSERT_NE(client_, nullptr);
    stub_ = v1::BlockService::NewStub(grpc::CreateChannel(TargetOf(*server_), grpc::InsecureChannelCredentials()));
  }
  int64_t Handles() {
    auto info = client_->GetServerInfo();
    EXPECT_TRUE(info.ok()) << info.status();
    return info.ok() ? info->activations_held() : -1;
  }
  int64_t MemoryUsed() {
    auto info = client_->GetServerInfo();
    EXPECT_TRUE(info.ok()) << info.status();
    return info.ok() ? info->devices(0).memory_used_bytes() : -1;
  }
  // How long a cancelled or timed-out call may still compute before its handle and memory are
  // free: a generous poll bound for a loaded CI machine (the ASan suite beside it), and still far
  // below the 10-minute activation TTL these tests tell apart from "freed when the call ends".
  static constexpr absl::Duration kSettle = absl::Seconds(60);
  // Polls until the handle count is `n` (or kSettle passed); returns the last count seen.
  int64_t SettleHandles(int64_t n) { return Settle(n, [&] { return Handles(); }); }
  // Polls until at most `n` handles are held (or kSettle passed); returns the last count seen.
  int64_t SettleHandlesAtMost(int64_t n) { return SettleUntil([&] { return Handles(); }, [n](int64_t h) { return h <= n; }); }
  // The fastest of three Forwards of `x` through `ids` (the first also warms the workers and the
  // allocator): what the cancel and deadline tests time their calls against.
  absl::Duration FastestForward(const std::vector<std::string>& ids, const v1::Tensor& x) {
    absl::Duration fastest = absl::InfiniteDuration();
    for (int i = 0; i < 3; ++i) {
      const absl::Time t0 = absl::Now();
      EXPECT_TRUE(client_->Forward(ids, x, false).ok());
      fastest = std::min(fastest, absl::Now() - t0);
    }
    return fastest;
  }
  // The same for the memory in use: a cancelled call may still be computing.
  int64_t SettleMemory(int64_t bytes) { return Settle(bytes, [&] { return MemoryUsed(); }); }
  template <typename F>
  static int64_t Settle(int64_t want, F read) {
    return SettleUntil(read, [want](int64_t got) { return got == want; });
  }
  // Polls `read` until `done` holds for its value (or kSettle passed); returns the last value.
  template <typename F, typename P>
  static int64_t SettleUntil(F read, P done) {
    const absl::Time deadline = absl::Now() + kSettle;
    int64_t got = read();
    while (!done(got) && absl::Now() < deadline) {
      absl::SleepFor(absl::Milliseconds(10));
      got = read();
    }
    return got;
  }


  std::unique_ptr<Server> server_;
  std::unique_ptr<Client> client_;
  std::unique_ptr<v1::BlockService::Stub> stub_;
};

TEST_F(Limits, CallsWhoseDeadlinePassesWhileQueuedAreNeverRun) {
  ServerOptions o = LoopbackOptions();
  o.worker_threads = 1;  // one worker: a slow Forward makes everything after it wait
  Start(o);
  ASSERT_OK(client_->CreateBlock(CreateRequest("slow", TinyConfig(), 1, 8, 4096)).status());
  ASSERT_OK(client_->CreateBlock(CreateRequest("g", TinyConfig(), 2)).status());
  TrainStep(*client_, {"g"}, RandomTensor({1, 4, 32}, 3), 4);
  const BlockState g_before = StateOf(*client_, "g");
  ASSERT_TRUE(g_before.has_gradients);

  // How long the slow Forward takes on this machine, measured, so the deadlines below are a small
  // fraction of it whatever the build (sanitizers make it several times slower).
  const v1::Tensor big = RandomTensor({4, 2048, 32}, 5);
  absl::Time t0 = absl::Now();
  ASSERT_OK(client_->Forward({"slow"}, big, false).status());
  const absl::Duration slow = absl::Now() - t0;
  ASSERT_GT(slow, absl::Milliseconds(100)) << "the slow Forward is too fast to hold the worker";
  const absl::Duration deadline = slow / 5;

  std::thread holder([&] { EXPECT_TRUE(client_->Forward({"slow"}, big, false).ok()); });
  absl::SleepFor(slow / 10);  // the holder is running now
  t0 = absl::Now();
  auto forward = client_->Forward({"g"}, RandomTensor({1, 4, 32}, 6), true, 0, {.timeout = deadline});
  const absl::Duration forward_waited = absl::Now() - t0;
  v1::StepRequest step;
  step.add_block_ids("g");
  auto stepped = client_->Step(step, {.timeout = deadline});
  holder.join();
  EXPECT_STATUS(forward.status(), StatusCode::kDeadlineExceeded);
  EXPECT_STATUS(stepped.status(), StatusCode::kDeadlineExceeded);
  EXPECT_LT(forward_waited, deadline + slow / 4) << "the client waited past its deadline (slow call "
                                                   << absl::FormatDuration(slow) << ")";
  // One more call through the single worker: everything queued before it has been dealt with.
  ASSERT_OK(client_->Forward({"g"}, RandomTensor({1, 4, 32}, 7), false).status());
  EXPECT_EQ(Handles(), 0) << "a Forward whose deadline passed in the queue kept a handle";
  EXPECT_EQ(DiffStates(g_before, StateOf(*client_, "g")), "") << "a Step whose deadline passed in the queue ran";
}

// One Forward(keep_activations) on `ids`, cancelled by the client `cancel_after` after it starts.
grpc::Status CancelledForward(v1::BlockService::Stub& stub, const std::vector<std::string>& ids, const v1::Tensor& x,
                              absl::Duration cancel_after, v1::ForwardResponse* resp) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  v1::ForwardRequest r;
  for (const std::string& id : ids) r.add_block_ids(id);
  *r.mutable_input() = x;
  r.set_keep_activations(true);
  std::thread canceller([&] {
    absl::SleepFor(cancel_after);
    ctx.TryCancel();
  });
  const grpc::Status s = stub.Forward(&ctx, r, resp);
  canceller.join();
  return s;
}

TEST_F(Limits, ForwardsCancelledWhileRunningNeverLeaveAHandle) {
  Start(LoopbackOptions());
  ASSERT_OK(client_->CreateBlock(CreateRequest("c", TinyConfig(), 1, 1, 4096)).status());
  ASSERT_OK(client_->CreateBlock(CreateRequest("d", TinyConfig(), 2, 1, 4096)).status());
  const v1::Tensor x = RandomTensor({1, 1536, 32}, 3);
  const absl::Duration run = FastestForward({"c", "d"}, x);
  ASSERT_GT(run, absl::Milliseconds(40)) << "the Forward is too fast to cancel while it runs";
  std::mt19937_64 rng(std::random_device{}());
  int cancelled = 0;
  for (int i = 0; i < 20; ++i) {
    // Anywhere in the first 60% of the call: before it reaches a worker, or while it computes.
    const absl::Duration after =
        absl::Microseconds(std::uniform_int_distribution<int64_t>(0, absl::ToInt64Microseconds(run) * 6 / 10)(rng));
    v1::ForwardResponse resp;
    const grpc::Status s = CancelledForward(*stub_, {"c", "d"}, x, after, &resp);
    if (s.ok()) {  // it ran faster this time and ended before the cancel: its handle is the client's
      ASSERT_OK(client_->ReleaseActivations(resp.activation_id()));
    } else {
      EXPECT_EQ(s.error_code(), grpc::StatusCode::CANCELLED) << "cancelled after " << after << " of " << run;
      ++cancelled;
    }
    EXPECT_EQ(SettleHandles(0), 0) << "a Forward cancelled after " << absl::FormatDuration(after) << " (of "
                                   << absl::FormatDuration(run) << ") left its activation handle";
  }
  EXPECT_GE(cancelled, 10) << "too few Forwards were cancelled while running for the check to mean anything";
  EXPECT_EQ(SettleMemory(2 * 4 * 4 * ExpectedParameterCount(TinyConfig())), 2 * 4 * 4 * ExpectedParameterCount(TinyConfig()))
      << "memory beyond the two blocks is still reserved";
}

// A Forward(keep_activations) whose deadline passes while it runs can never deliver its handle (the
// client stops waiting at its deadline): the server frees it as soon as the Forward ends, not at the
// 10-minute TTL. As with a cancel (below), a deadline can cross the reply in flight: the server
// answered in time by its clock and kept the handle, and the reply reached the client after its
// deadline. The server's own count of Forwards it answered OK tells those apart; they may be held
// until the TTL (unless the deadline still cancelled the reply on its way out), and only they.
TEST_F(Limits, ForwardsWhoseDeadlinePassesWhileRunningFreeTheirHandleAtOnce) {
  Start(LoopbackOptions(/*with_metrics=*/true));
  ASSERT_EQ(server_->engine().options().activation_ttl, absl::Minutes(10));
  ASSERT_OK(client_->CreateBlock(CreateRequest("c", TinyConfig(), 1, 1, 4096)).status());
  ASSERT_OK(client_->CreateBlock(CreateRequest("d", TinyConfig(), 2, 1, 4096)).status());
  const v1::Tensor x = RandomTensor({1, 1536, 32}, 3);
  const absl::Duration run = FastestForward({"c", "d"}, x);
  ASSERT_GT(run, absl::Milliseconds(40)) << "the Forward is too fast for a deadline to pass while it runs";
  // Forwards the server answered OK, once no call is in flight (a timed-out Forward may still run).
  auto answered = [&] {
    for (int i = 0; i < 6000 && server_->inflight_calls() > 0; ++i) absl::SleepFor(absl::Milliseconds(10));
    EXPECT_EQ(server_->inflight_calls(), 0) << "a Forward is still running";
    const double n = MetricValue(HttpGetBody(server_->metrics_port(), "/metrics"), "blockd_requests_total",
                                 {"method=\"Forward\"", "code=\"OK\""});
    return static_cast<int64_t>(std::max(0.0, n));
  };
  int exceeded = 0;
  int64_t crossed = 0;
  for (int i = 0; i < 10; ++i) {
    // Deadlines from 20% to 74% of the run: the call starts, and its deadline passes mid-way.
    const absl::Duration deadline = run * (0.2 + 0.06 * i);
    const int64_t answered_before = answered();
    auto y = client_->Forward({"c", "d"}, x, true, 0, {.timeout = deadline});
    if (y.ok()) {  // it ran faster this time and ended inside its deadline: its handle is the client's
      ASSERT_OK(client_->ReleaseActivations(y->activation_id()));
      continue;
    }
    EXPECT_STATUS(y.status(), StatusCode::kDeadlineExceeded);
    if (answered() > answered_before) {
      ++crossed;  // the server sent its handle; the client had stopped waiting
      continue;
    }
    ++exceeded;
    // The Forward may still be computing when the client gives up; it must end without a handle,
    // freed when it ends (within kSettle), not kept to the 10-minute TTL. No bound on how soon:
    // that is a timing, and timings belong in benchmarks, not in a suite on a loaded machine.
    EXPECT_LE(SettleHandlesAtMost(crossed), crossed)
        << "a Forward whose deadline (" << absl::FormatDuration(deadline) << " of " << absl::FormatDuration(run)
        << ") passed kept its handle";
  }
  std::cout << "[ limits ] 10 Forwards(keep_activations) with deadlines of 20-74% of " << absl::FormatDuration(run)
            << ": " << exceeded << " timed out while running, " << crossed
            << " answered as their deadline passed (held until the TTL)\n";
  EXPECT_GE(exceeded, 5) << "too few Forwards outlived their deadline for the check to mean anything";
  EXPECT_LE(Handles(), crossed);
  if (Handles() == 0) {
    EXPECT_EQ(SettleMemory(2 * 4 * 4 * ExpectedParameterCount(TinyConfig())),
              2 * 4 * 4 * ExpectedParameterCount(TinyConfig()))
        << "memory beyond the two blocks is still reserved";
  }
}

// A cancel can cross the reply in flight: the server has sent the handle, the client reports
// CANCELLED and never sees it. The server cannot tell that case from a delivered reply (its status
// went out); the activation TTL frees such handles. With cancels at every instant, everything a
// cancelled call held is gone within the TTL.
TEST_F(Limits, ForwardsCancelledAtAnyInstantHoldNothingPastTheTtl) {
  ServerOptions o = LoopbackOptions();
  o.engine.activation_ttl = absl::Seconds(2);
  Start(o);
  ASSERT_OK(client_->CreateBlock(CreateRequest("c", TinyConfig(), 1)).status());
  ASSERT_OK(client_->CreateBlock(CreateRequest("d", TinyConfig(), 2)).status());
  const v1::Tensor x = RandomTensor({2, 64, 32}, 3);
  absl::Time t0 = absl::Now();
  for (int i = 0; i < 5; ++i) ASSERT_OK(client_->Forward({"c", "d"}, x, false).status());
  const int64_t span_us = std::max<int64_t>(200, absl::ToInt64Microseconds(absl::Now() - t0) / 5 * 3 / 2);
  std::mt19937_64 rng(std::random_device{}());
  int completed = 0, cancelled = 0;
  const int kCalls = 300;
  for (int i = 0; i < kCalls; ++i) {
    const int64_t cancel_after = std::uniform_int_distribution<int64_t>(0, span_us)(rng);
    v1::ForwardResponse resp;
    const grpc::Status s = CancelledForward(*stub_, {"c", "d"}, x, absl::Microseconds(cancel_after), &resp);
    if (s.ok()) {
      ++completed;
      ASSERT_FALSE(resp.activation_id().empty());
      ASSERT_OK(client_->ReleaseActivations(resp.activation_id())) << "call " << i;
    } else {
      ASSERT_EQ(s.error_code(), grpc::StatusCode::CANCELLED) << s.error_message();
      ++cancelled;
    }
  }
  const int64_t crossed = Handles();
  std::cout << "[ limits ] " << kCalls << " Forwards(keep_activations) cancelled within " << span_us << " us: "
            << completed << " completed first, " << cancelled << " cancelled, of which " << crossed
            << " crossed their reply in flight (held until the TTL)\n";
  EXPECT_GT(cancelled, 0);
  EXPECT_EQ(SettleHandles(0), 0) << "handles outlived the 2 s TTL";  // SettleHandles waits up to 5 s
  EXPECT_EQ(SettleMemory(2 * 4 * 4 * ExpectedParameterCount(TinyConfig())), 2 * 4 * 4 * ExpectedParameterCount(TinyConfig()))
      << "memory beyond the two blocks is still reserved";
}

TEST_F(Limits, ConcurrentCallLimitRefusesThenFreesSlotsOfCancelledStreams) {
  ServerOptions o = LoopbackOptions();
  o.service.max_concurrent_rpcs = 4;
  // One client fills the whole server here; the per-client share is tested in security_test.
  o.service.max_concurrent_rpcs_per_client = 4;
  Start(o);
  ASSERT_OK(client_->CreateBlock(CreateRequest("b", TinyConfig(), 1)).status());
  for (int round = 0; round < 3; ++round) {
    // A slot is released when the server has finished a call, which can be after its client saw
    // the status: if an earlier call (CreateBlock, the last round's GetBlock or a cancelled stream)
    // still held one, one of the four streams would be refused and the server would never fill.
    for (int i = 0; i < 1500 && server_->inflight_calls() > 0; ++i) absl::SleepFor(absl::Milliseconds(10));
    ASSERT_EQ(server_->inflight_calls(), 0) << "round " << round << ": earlier calls are still served";
    std::vector<std::unique_ptr<grpc::ClientContext>> ctx;
    std::vector<std::unique_ptr<grpc::ClientWriter<v1::TensorChunk>>> streams;
    std::vector<v1::LoadWeightsResponse> resp(4);
    for (int i = 0; i < 4; ++i) {
      ctx.push_back(std::make_unique<grpc::ClientContext>());
      streams.push_back(stub_->LoadWeights(ctx.back().get(), &resp[i]));
    }
    // The four streams are admitted as their headers reach the server, which on a loaded 2-core
    // machine under ASan has taken seconds. Wait for the server to hold all four before asking:
    // a GetBlock sent meanwhile would itself take a slot and could push the last stream out.
    for (int i = 0; i < 1500 && server_->inflight_calls() < 4; ++i) absl::SleepFor(absl::Milliseconds(10));
    ASSERT_EQ(server_->inflight_calls(), 4) << "round " << round << ": the four streams were not all admitted";
    const absl::Status refused = client_->GetBlock("b").status();
    EXPECT_STATUS(refused, StatusCode::kResourceExhausted, "blockd is serving 4 calls already (--max_concurrent_rpcs)");
    for (auto& c : ctx) c->TryCancel();
    for (auto& w : streams) EXPECT_EQ(w->Finish().error_code(), grpc::StatusCode::CANCELLED);
    absl::Status admitted = absl::UnknownError("not tried");
    for (int i = 0; i < 300 && !admitted.ok(); ++i, absl::SleepFor(absl::Milliseconds(10))) {
      admitted = client_->GetBlock("b").status();
    }
    EXPECT_TRUE(admitted.ok()) << "round " << round << ": cancelled streams kept their slots: " << admitted;
  }
}

// A DownloadTensors stream through a channel whose reader window is 64 KiB, so that on a block of
// ~4 MB (ten tensors) the server waits mid-block while the test changes the block.
class SlowDownload {
 public:
  SlowDownload(const Server& server, const std::string& block_id, v1::TensorKind kind) {
    grpc::ChannelArguments args;
    args.SetInt(GRPC_ARG_HTTP2_BDP_PROBE, 0);
    args.SetInt(GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES, 64 << 10);
    stub_ = v1::BlockService::NewStub(
        grpc::CreateCustomChannel(TargetOf(server), grpc::InsecureChannelCredentials(), args));
    v1::DownloadTensorsRequest r;
    r.set_block_id(block_id);
    r.set_kind(kind);
    reader_ = stub_->DownloadTensors(&ctx_, r);
  }
  bool ReadOne() {
    v1::TensorChunk chunk;
    if (!reader_->Read(&chunk)) return false;
    names_.insert(chunk.name());
    return true;
  }
  // Reads what is left; the stream's status.
  absl::Status Finish() {
    while (ReadOne()) {
    }
    return FromGrpcStatus(reader_->Finish());
  }
  size_t tensors_seen() const { return names_.size(); }

 private:
  std::unique_ptr<v1::BlockService::Stub> stub_;
  grpc::ClientContext ctx_;
  std::unique_ptr<grpc::ClientReader<v1::TensorChunk>> reader_;
  std::set<std::string> names_;
};

// ~4 MB of weights in ten tensors: far more than the slow reader's window.
v1::BlockConfig LargeConfig() {
  v1::BlockConfig c = TinyConfig(false, 256);
  c.set_num_attention_heads(4);
  c.set_num_kv_heads(4);
  c.set_head_dim(64);
  c.set_intermediate_size(1024);
  return c;
}

TEST_F(Limits, ADownloadOvertakenByAStepEndsAbortedInsteadOfMixingSteps) {
  Start(LoopbackOptions());
  ASSERT_OK(client_->CreateBlock(CreateRequest("s", LargeConfig(), 1)).status());
  SlowDownload download(*server_, "s", v1::TENSOR_KIND_WEIGHTS);
  ASSERT_TRUE(download.ReadOne());
  // While the download waits, the block takes a step.
  TrainStep(*client_, {"s"}, RandomTensor({1, 4, 256}, 2), 3);
  v1::StepRequest step;
  step.add_block_ids("s");
  ASSERT_OK(client_->Step(step).status());
  EXPECT_STATUS(download.Finish(), StatusCode::kAborted,
                "block s's weights changed while they were downloaded (1 change, the last: an optimizer Step "
                "updated the block), so the tensors sent mix two versions: download again");
  // Downloaded again, it is whole and of one step.
  ASSERT_OK(client_->DownloadTensors("s", v1::TENSOR_KIND_WEIGHTS).status());
}

// Not only a Step: any change to the kind of tensor being downloaded between two tensors ends the
// stream with ABORTED, before the next tensor is sent, saying what changed. A change to another
// kind (a Backward during a weights download) is no reason to stop.
TEST_F(Limits, ADownloadOvertakenByAnyChangeToItsTensorsEndsAbortedBeforeTheNextTensor) {
  ServerOptions o = LoopbackOptions();
  o.checkpoint_dir = MakeTempDir("limits-ckpt");
  Start(o);
  const v1::BlockConfig c = LargeConfig();
  const size_t tensors = ExpectedParams(c).size();
  ASSERT_OK(client_->CreateBlock(CreateRequest("s", c, 1)).status());
  v1::SaveCheckpointRequest save;
  save.set_name("before");
  ASSERT_OK(client_->SaveCheckpoint(save).status());
  const std::vector<TensorBytes> weights = RandomWeights(c, 5);
  const v1::Tensor x = RandomTensor({1, 4, 256}, 6);
  struct Case {
    std::string what;
    v1::TensorKind kind;
    std::function<void()> change;
    std::string message;  // empty: the download succeeds
  };
  const std::vector<Case> cases = {
      {"LoadWeights", v1::TENSOR_KIND_WEIGHTS, [&] { ASSERT_OK(client_->LoadWeights("s", weights).status()); },
       "block s's weights changed while they were downloaded (1 change, the last: a LoadWeights wrote weights)"},
      {"Backward", v1::TENSOR_KIND_GRADIENTS, [&] { TrainStep(*client_, {"s"}, x, 7); },
       "block s's gradients changed while they were downloaded (1 change, the last: a Backward wrote gradients)"},
      {"ZeroGrad", v1::TENSOR_KIND_GRADIENTS, [&] { ASSERT_OK(client_->ZeroGrad({"s"})); },
       "block s's gradients changed while they were downloaded (1 change, the last: a ZeroGrad cleared the "
       "gradients)"},
      {"DeleteBlock and CreateBlock", v1::TENSOR_KIND_WEIGHTS, [&] {
         ASSERT_OK(client_->DeleteBlock("s").status());
         ASSERT_OK(client_->CreateBlock(CreateRequest("s", c, 1)).status());  // the same bytes, another block
       },
       // The download may look between the delete and the create ("block s was deleted while its weights
       // were downloaded") or after both ("... deleted and created again ..."): ABORTED either way.
       "block s was deleted"},
      {"RestoreCheckpoint", v1::TENSOR_KIND_ADAM_M, [&] {
         v1::RestoreCheckpointRequest restore;
         restore.set_name("before");
         ASSERT_OK(client_->RestoreCheckpoint(restore).status());
       },
       "block s was deleted and created again (or restored) while its adam_m were downloaded"},
      {"Backward during a weights download", v1::TENSOR_KIND_WEIGHTS, [&] { TrainStep(*client_, {"s"}, x, 8); }, ""},
  };
  for (const Case& k : cases) {
    SCOPED_TRACE(k.what);
    if (k.kind == v1::TENSOR_KIND_GRADIENTS) TrainStep(*client_, {"s"}, x, 9);  // gradients to download
    SlowDownload download(*server_, "s", k.kind);
    ASSERT_TRUE(download.ReadOne());
    k.change();
    const absl::Status s = download.Finish();
    if (k.message.empty()) {
      EXPECT_TRUE(s.ok()) << s;
      EXPECT_EQ(download.tensors_seen(), tensors);
      continue;
    }
    EXPECT_STATUS(s, StatusCode::kAborted, k.message, "download again");
    EXPECT_LT(download.tensors_seen(), tensors) << "every tensor was sent before the stream noticed the change";
  }
}

// gRPC ends a stream it failed itself (a message over the size limit) with the same ok=false read
// as a clean end of the stream; the chunks before the bad one must not be applied.
TEST_F(Limits, AStreamCutByAnOversizedMessageAppliesNothing) {
  ServerOptions o = LoopbackOptions();
  o.service.max_message_bytes = 256 << 10;
  Start(o);
  ASSERT_OK(client_->CreateBlock(CreateRequest("w", TinyConfig(), 1)).status());
  const Snapshot before = Download(*client_, "w", v1::TENSOR_KIND_WEIGHTS);
  const std::vector<TensorBytes> w = RandomWeights(TinyConfig(), 2);
  for (int i = 0; i < 100; ++i) {
    std::vector<v1::TensorChunk> chunks;
    for (const TensorBytes& t : {w[0], w[7]}) {
      v1::TensorChunk c;
      c.set_block_id("w");
      c.set_name(t.name);
      c.set_dtype(t.dtype);
      for (int64_t d : t.shape) c.add_shape(d);
      c.set_data(t.data);
      chunks.push_back(c);
    }
    chunks.back().mutable_data()->resize(300 << 10);  // over the server's 256 KiB
    EXPECT_STATUS(client_->LoadWeightsChunks(chunks).status(), StatusCode::kResourceExhausted, "larger than max");
    ASSERT_EQ(DiffSnapshots(before, Download(*client_, "w", v1::TENSOR_KIND_WEIGHTS)), "") << "attempt " << i;
  }
}

}  // namespace
}  // namespace blockd::testing
