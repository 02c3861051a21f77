// Inference sessions over gRPC on a real server: prefill by InferStep and decode on the Infer
// stream equal Forward of the whole sequence; step_id retries; sessions private to the identity
// that opened them (two client names); trim, fork, close, list; DeleteBlock closing sessions; the
// codes NOT_FOUND, OUT_OF_RANGE and INVALID_ARGUMENT, on unary calls and on the stream.
#include <algorithm>
#include <cmath>
#include <string>
#include <thread>
#include <vector>

#include <grpcpp/client_context.h>
#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>
#include <grpcpp/support/channel_arguments.h>
#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "engine/cpu/cpu_backend.h"
#include "tests/integration/harness.h"

namespace blockd::testing {
namespace {

constexpr int64_t kHidden = 32, kBatch = 2, kSeq = 20, kMaxLen = 32;

// Tokens [t0, t1) of a float32 tensor [batch, seq, hidden].
v1::Tensor Slice(const v1::Tensor& x, int64_t t0, int64_t t1) {
  const std::vector<float> v = Floats(x);
  const int64_t seq = x.shape(1);
  std::string bytes;
  for (int64_t b = 0; b < x.shape(0); ++b) {
    bytes.append(reinterpret_cast<const char*>(v.data() + (b * seq + t0) * kHidden), (t1 - t0) * kHidden * 4);
  }
  v1::Tensor out;
  out.set_dtype(v1::DTYPE_FLOAT32);
  out.add_shape(x.shape(0));
  out.add_shape(t1 - t0);
  out.add_shape(kHidden);
  out.set_data(std::move(bytes));
  return out;
}

v1::InferStepRequest StepRequest(const std::string& id, v1::Tensor x, int64_t step_id = 0) {
  v1::InferStepRequest r;
  r.set_session_id(id);
  *r.mutable_hidden_states() = std::move(x);
  r.set_step_id(step_id);
  return r;
}

// fp32: within 1e-5 of the output's scale, elementwise; names the worst element.
::testing::AssertionResult Close(const std::string& what, const std::vector<float>& got,
                                 const std::vector<float>& ref) {
  if (got.size() != ref.size()) return ::testing::AssertionFailure() << what << ": " << got.size() << " vs " << ref.size();
  float scale = 0;
  for (float v : ref) scale = std::max(scale, std::fabs(v));
  for (size_t i = 0; i < got.size(); ++i) {
    const double tol = 1e-5 * scale + 1e-5 * std::fabs(ref[i]);
    if (!(std::fabs(got[i] - ref[i]) <= tol)) {
      return ::testing::AssertionFailure() << what << ": element " << i << " is " << got[i] << ", Forward gave "
                                           << ref[i] << " (tolerance " << tol << ")";
    }
  }
  return ::testing::AssertionSuccess();
}

// Each test on a daemon whose idle workers sleep at once, with clients whose Infer streams
// busy-wait for their answers (ClientOptions::busy_wait_steps), and on one whose idle worker
// watches for the next call (--worker_spin_us, server/thread_pool.h), with sleeping clients: the
// steps come out the same.
class SessionRpc : public ::testing::TestWithParam<int> {
 protected:
  void SetUp() override {
    ServerOptions o = LoopbackOptions();
    o.worker_spin_us = GetParam();
    server_ = StartServer(o);
    ASSERT_NE(server_, nullptr);
    const bool busy = GetParam() == 0;
    alice_ = ConnectTo(*server_, {.client_id = "alice", .busy_wait_steps = busy});
    bob_ = ConnectTo(*server_, {.client_id = "bob", .busy_wait_steps = busy});
    ASSERT_TRUE(alice_ && bob_);
    for (int i = 0; i < 2; ++i) {
      ASSERT_OK(alice_->CreateBlock(CreateRequest(absl::StrCat("b", i), TinyConfig(/*qk_norm=*/true), 7 + i,
                                                  /*max_batch_size=*/4, /*max_seq_len=*/kMaxLen))
                    .status());
    }
  }

  absl::StatusOr<v1::SessionInfo> Open(Client& c, const std::string& id = "") {
    v1::OpenSessionRequest r;
    r.set_session_id(id);
    r.add_block_ids("b0");
    r.add_block_ids("b1");
    r.set_batch_size(kBatch);
    r.set_max_length(kMaxLen);
    return c.OpenSession(r);
  }

  std::unique_ptr<Server> server_;
  std::unique_ptr<Client> alice_, bob_;
};

TEST_P(SessionRpc, PrefillThenTheInferStreamEqualsForward) {
  const v1::Tensor x = RandomTensor({kBatch, kSeq, kHidden}, 31);
  auto ref = alice_->Forward({"b0", "b1"}, x, /*keep_activations=*/false);
  ASSERT_OK(ref.status());
  const std::vector<float> want = Floats(ref->output());

  auto info = Open(*alice_);
  ASSERT_OK(info.status());
  EXPECT_EQ(info->batch_size(), kBatch);
  EXPECT_EQ(info->max_length(), kMaxLen);
  EXPECT_EQ(info->length(), 0);
  EXPECT_GT(info->kv_bytes(), 0);
  EXPECT_EQ(info->block_ids_size(), 2);
  const std::string id = info->session_id();

  auto prefill = alice_->InferStep(StepRequest(id, Slice(x, 0, 12), /*step_id=*/1));
  ASSERT_OK(prefill.status());
  EXPECT_EQ(prefill->length(), 12);
  EXPECT_EQ(prefill->step_id(), 1);
  EXPECT_TRUE(Close("prefill", Floats(prefill->hidden_states()), Floats(Slice(ref->output(), 0, 12))));
  // A retry of step 1 answers the same bytes and appends nothing.
  auto retry = alice_->InferStep(StepRequest(id, Slice(x, 0, 12), 1));
  ASSERT_OK(retry.status());
  EXPECT_EQ(retry->length(), 12);
  EXPECT_EQ(retry->hidden_states().data(), prefill->hidden_states().data());

  auto stream = alice_->OpenInferStream();
  ASSERT_OK(stream.status());
  for (int64_t t = 12; t < kSeq; ++t) {
    auto y = (*stream)->Step(StepRequest(id, Slice(x, t, t + 1), t + 1));
    ASSERT_OK(y.status()) << "token " << t;
    EXPECT_EQ(y->length(), t + 1);
    EXPECT_EQ(y->hidden_states().shape(1), 1);
    EXPECT_TRUE(Close(absl::StrCat("token ", t, " on the stream"), Floats(y->hidden_states()),
                      Floats(Slice(ref->output(), t, t + 1))));
  }
  // A step past max_length ends the stream with OUT_OF_RANGE and leaves the session as it was.
  auto past = (*stream)->Step(StepRequest(id, RandomTensor({kBatch, kMaxLen, kHidden}, 5)));
  EXPECT_STATUS(past.status(), absl::StatusCode::kOutOfRange, "max_length 32");
  EXPECT_STATUS((*stream)->Close(), absl::StatusCode::kOutOfRange, "max_length 32");

  auto list = alice_->ListSessions();
  ASSERT_OK(list.status());
  ASSERT_EQ(list->size(), 1u);
  EXPECT_EQ((*list)[0].length(), kSeq);
  ASSERT_OK(alice_->CloseSession(id));
  EXPECT_STATUS(alice_->InferStep(StepRequest(id, Slice(x, 0, 1))).status(), absl::StatusCode::kNotFound,
                "not found");
}

TEST_P(SessionRpc, SessionsArePrivateToTheIdentityThatOpenedThem) {
  auto info = Open(*alice_, "alices");
  ASSERT_OK(info.status());
  const v1::Tensor x = RandomTensor({kBatch, 3, kHidden}, 8);
  ASSERT_OK(alice_->InferStep(StepRequest("alices", x)).status());
  // Bob gets exactly what an unknown id gets, for every call.
  EXPECT_STATUS(bob_->InferStep(StepRequest("alices", x)).status(), absl::StatusCode::kNotFound,
                "session alices not found");
  EXPECT_STATUS(bob_->TrimSession("alices", 0).status(), absl::StatusCode::kNotFound, "session alices not found");
  EXPECT_STATUS(bob_->ForkSession("alices", "mine").status(), absl::StatusCode::kNotFound, "not found");
  EXPECT_STATUS(bob_->CloseSession("alices"), absl::StatusCode::kNotFound, "not found");
  auto stream = bob_->OpenInferStream();
  ASSERT_OK(stream.status());
  EXPECT_STATUS((*stream)->Step(StepRequest("alices", x)).status(), absl::StatusCode::kNotFound, "not found");
  auto bobs = bob_->ListSessions();
  ASSERT_OK(bobs.status());
  EXPECT_TRUE(bobs->empty());
  // Alice's session went on untouched.
  auto list = alice_->ListSessions();
  ASSERT_OK(list.status());
  ASSERT_EQ(list->size(), 1u);
  EXPECT_EQ((*list)[0].length(), 3);
}

TEST_P(SessionRpc, TrimForkAndTheErrorCodes) {
  auto info = Open(*alice_);
  ASSERT_OK(info.status());
  const std::string id = info->session_id();
  const v1::Tensor x = RandomTensor({kBatch, 10, kHidden}, 9);
  ASSERT_OK(alice_->InferStep(StepRequest(id, x)).status());

  EXPECT_STATUS(alice_->InferStep(StepRequest("nope", x)).status(), absl::StatusCode::kNotFound,
                "session nope not found");
  EXPECT_STATUS(alice_->InferStep(StepRequest(id, RandomTensor({kBatch, 23, kHidden}, 1))).status(),
                absl::StatusCode::kOutOfRange, "holds 10 tokens");
  EXPECT_STATUS(alice_->InferStep(StepRequest(id, RandomTensor({1, 1, kHidden}, 1))).status(),
                absl::StatusCode::kInvalidArgument, "expects [2,new_tokens>=1,32]");
  v1::InferStepRequest bad_hypo = StepRequest(id, RandomTensor({kBatch, 1, kHidden}, 2));
  bad_hypo.add_hypo_ids(0);
  bad_hypo.add_hypo_ids(5);
  EXPECT_STATUS(alice_->InferStep(bad_hypo).status(), absl::StatusCode::kInvalidArgument, "hypo_ids[1] = 5");
  v1::OpenSessionRequest neg;
  neg.add_block_ids("b0");
  neg.set_batch_size(1);
  neg.set_max_length(4);
  neg.set_ttl_seconds(-3);
  EXPECT_STATUS(alice_->OpenSession(neg).status(), absl::StatusCode::kInvalidArgument, "ttl_seconds = -3");

  auto trimmed = alice_->TrimSession(id, 4);
  ASSERT_OK(trimmed.status());
  EXPECT_EQ(trimmed->length(), 4);
  EXPECT_STATUS(alice_->TrimSession(id, 5).status(), absl::StatusCode::kOutOfRange, "only 4");
  auto fork = alice_->ForkSession(id, "");
  ASSERT_OK(fork.status());
  EXPECT_NE(fork->session_id(), id);
  EXPECT_EQ(fork->length(), 4);
  // Both go on from position 4 with the same token: the same output.
  const v1::Tensor next = RandomTensor({kBatch, 1, kHidden}, 10);
  auto a = alice_->InferStep(StepRequest(id, next));
  auto b = alice_->InferStep(StepRequest(fork->session_id(), next));
  ASSERT_OK(a.status());
  ASSERT_OK(b.status());
  EXPECT_EQ(a->hidden_states().data(), b->hidden_states().data());
  EXPECT_EQ(b->length(), 5);

  // Deleting a block of the span closes both.
  ASSERT_OK(alice_->DeleteBlock("b1").status());
  EXPECT_STATUS(alice_->InferStep(StepRequest(id, next)).status(), absl::StatusCode::kNotFound, "not found");
  auto list = alice_->ListSessions();
  ASSERT_OK(list.status());
  EXPECT_TRUE(list->empty());
}

// A client may send steps ahead of their replies: the server reads the next step while it still
// writes the last reply, and a step that finishes before that write is done waits for it. Every
// step is answered, in order, as if sent one at a time; a bad step among them ends the stream
// with its code after the replies of the steps before it, and leaves the session where they did.
TEST_P(SessionRpc, StepsSentAheadOfTheirRepliesAreAnsweredInOrder) {
  const v1::Tensor x = RandomTensor({kBatch, kSeq, kHidden}, 41);
  auto ref = alice_->Forward({"b0", "b1"}, x, /*keep_activations=*/false);
  ASSERT_OK(ref.status());
  auto info = Open(*alice_);
  ASSERT_OK(info.status());
  const std::string id = info->session_id();
  ASSERT_OK(alice_->InferStep(StepRequest(id, Slice(x, 0, 8))).status());

  auto stub = v1::BlockService::NewStub(grpc::CreateChannel(TargetOf(*server_), grpc::InsecureChannelCredentials()));
  {
    grpc::ClientContext ctx;
    ctx.AddMetadata("blockd-client", "alice");
    auto stream = stub->Infer(&ctx);
    for (int64_t t = 8; t < 16; ++t) ASSERT_TRUE(stream->Write(StepRequest(id, Slice(x, t, t + 1), t + 1)));
    ASSERT_TRUE(stream->WritesDone());
    for (int64_t t = 8; t < 16; ++t) {
      v1::InferStepResponse y;
      ASSERT_TRUE(stream->Read(&y)) << "token " << t;
      EXPECT_EQ(y.step_id(), t + 1);
      EXPECT_EQ(y.length(), t + 1);
      EXPECT_TRUE(Close(absl::StrCat("token ", t, " sent ahead"), Floats(y.hidden_states()),
                        Floats(Slice(ref->output(), t, t + 1))));
    }
    v1::InferStepResponse extra;
    EXPECT_FALSE(stream->Read(&extra));
    const grpc::Status end = stream->Finish();
    EXPECT_TRUE(end.ok()) << end.error_message();
  }
  {
    grpc::ClientContext ctx;
    ctx.AddMetadata("blockd-client", "alice");
    auto stream = stub->Infer(&ctx);
    ASSERT_TRUE(stream->Write(StepRequest(id, Slice(x, 16, 17))));
    ASSERT_TRUE(stream->Write(StepRequest(id, RandomTensor({1, 1, kHidden}, 2))));  // the wrong batch
    stream->Write(StepRequest(id, Slice(x, 17, 18)));  // may find the stream ended
    stream->WritesDone();
    v1::InferStepResponse y;
    ASSERT_TRUE(stream->Read(&y));
    EXPECT_EQ(y.length(), 17);
    EXPECT_TRUE(Close("token 16 before a bad step", Floats(y.hidden_states()), Floats(Slice(ref->output(), 16, 17))));
    EXPECT_FALSE(stream->Read(&y));
    const grpc::Status end = stream->Finish();
    EXPECT_EQ(end.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << end.error_message();
    EXPECT_NE(end.error_message().find("expects [2,new_tokens>=1,32]"), std::string::npos) << end.error_message();
  }
  auto list = alice_->ListSessions();
  ASSERT_OK(list.status());
  ASSERT_EQ(list->size(), 1u);
  EXPECT_EQ((*list)[0].length(), 17);
}

INSTANTIATE_TEST_SUITE_P(Workers, SessionRpc, ::testing::Values(0, 1000),
                         [](const ::testing::TestParamInfo<int>& p) {
                           return p.param > 0 ? std::string("Spinning") : std::string("Sleeping");
                         });

TEST(SessionOps, AWorkerSpinOutOfRangeIsRefusedAtStart) {
  for (int spin : {-2, 1000001}) {
    ServerOptions o = LoopbackOptions();
    o.worker_spin_us = spin;
    EXPECT_STATUS(Server::Start(o, MakeCpuBackend()).status(), absl::StatusCode::kInvalidArgument,
                  absl::StrCat("worker_spin_us = ", spin, ", expected -1 (auto)"));
  }
}

// An Infer stream to where no daemon listens fails its first step with UNAVAILABLE, sleeping or
// busy-waiting, and says so again on Close and on any later step.
TEST(SessionOps, AnInferStreamWithNoDaemonFailsItsFirstStepWithUnavailable) {
  for (bool busy : {false, true}) {
    ClientOptions o;
    o.target = "127.0.0.1:1";
    o.timeout = absl::Seconds(5);
    o.busy_wait_steps = busy;
    auto c = Client::Connect(o);
    ASSERT_OK(c.status());
    auto stream = (*c)->OpenInferStream();
    ASSERT_OK(stream.status());
    EXPECT_STATUS((*stream)->Step(StepRequest("s", RandomTensor({1, 1, kHidden}, 1))).status(),
                  absl::StatusCode::kUnavailable, "") << "busy_wait_steps " << busy;
    EXPECT_STATUS((*stream)->Close(), absl::StatusCode::kUnavailable, "");
    EXPECT_STATUS((*stream)->Step(StepRequest("s", RandomTensor({1, 1, kHidden}, 1))).status(),
                  absl::StatusCode::kFailedPrecondition, "this Infer stream has ended");
  }
}

// The operational view of sessions: GetServerInfo's KV capacity and the /metrics families, through
// opens, a prefill, decode steps, a replayed retry (not counted), a fork sharing its pages until it
// writes, refused opens by reason, and the close that gives everything back.
TEST(SessionOps, ServerInfoAndMetricsFollowSessionsAndTheirCache) {
  ServerOptions o = LoopbackOptions(/*with_metrics=*/true);
  o.engine.max_sessions_per_client = 2;
  auto server = StartServer(o);
  ASSERT_NE(server, nullptr);
  auto c = ConnectTo(*server, {.client_id = "ops"});
  ASSERT_NE(c, nullptr);
  ASSERT_OK(c->CreateBlock(CreateRequest("b0", TinyConfig(), 7, /*max_batch_size=*/4, /*max_seq_len=*/kMaxLen)).status());
  ASSERT_OK(c->CreateBlock(CreateRequest("long", TinyConfig(), 8, 4, /*max_seq_len=*/1 << 20)).status());
  auto info0 = c->GetServerInfo();
  ASSERT_OK(info0.status());
  ASSERT_EQ(info0->devices_size(), 1);
  const int64_t budget = info0->devices(0).memory_budget_bytes();
  EXPECT_EQ(info0->devices(0).kv_cache_reserved_bytes(), 0);
  EXPECT_EQ(info0->devices(0).kv_cache_available_bytes(), budget - info0->devices(0).memory_used_bytes());
  EXPECT_EQ(info0->sessions_open(), 0);
  EXPECT_EQ(info0->limits().max_sessions_per_client(), 2);
  EXPECT_GT(info0->limits().session_ttl_seconds(), 0);

  v1::OpenSessionRequest open;
  open.set_session_id("s");
  open.add_block_ids("b0");
  open.set_batch_size(kBatch);
  open.set_max_length(kMaxLen);
  auto s = c->OpenSession(open);
  ASSERT_OK(s.status());
  const int64_t kv = s->kv_bytes();
  // One block: a page is K and V of 16 tokens; a session reserves its rows' pages plus one spare
  // per row (KvCache::PagesFor).
  const int64_t page_bytes = kv / (kBatch * (kMaxLen / 16 + 1));
  ASSERT_GT(page_bytes, 0);
  ASSERT_OK(c->InferStep(StepRequest("s", RandomTensor({kBatch, 5, kHidden}, 1), /*step_id=*/1)).status());
  ASSERT_OK(c->InferStep(StepRequest("s", RandomTensor({kBatch, 5, kHidden}, 1), 1)).status());  // a replay
  for (int t = 0; t < 3; ++t) ASSERT_OK(c->InferStep(StepRequest("s", RandomTensor({kBatch, 1, kHidden}, 2 + t))).status());
  auto fork = c->ForkSession("s", "f");
  ASSERT_OK(fork.status());
  auto info1 = c->GetServerInfo();
  ASSERT_OK(info1.status());
  EXPECT_EQ(info1->sessions_open(), 2);
  EXPECT_EQ(info1->kv_cache_pages_in_use(), kBatch) << "one page per row, shared with the fork";
  EXPECT_EQ(info1->kv_cache_bytes_in_use(), kBatch * page_bytes);
  EXPECT_EQ(info1->devices(0).kv_cache_reserved_bytes(), 2 * kv);
  EXPECT_EQ(info1->devices(0).kv_cache_available_bytes(), budget - info1->devices(0).memory_used_bytes());
  ASSERT_OK(c->InferStep(StepRequest("f", RandomTensor({kBatch, 1, kHidden}, 9))).status());  // copies its pages

  // Refused: the per-client cap, a bad size, and a cache the budget cannot hold.
  open.set_session_id("");
  EXPECT_STATUS(c->OpenSession(open).status(), absl::StatusCode::kResourceExhausted, "--max_sessions_per_client=2");
  ASSERT_OK(c->CloseSession("f"));
  open.set_batch_size(0);
  EXPECT_STATUS(c->OpenSession(open).status(), absl::StatusCode::kInvalidArgument, "batch_size = 0");
  open.set_batch_size(4);
  open.set_max_length(1 << 20);
  open.set_block_ids(0, "long");  // three times: 3 x 512 MiB of cache at 2^20 tokens, past the 1 GiB budget
  open.add_block_ids("long");
  open.add_block_ids("long");
  EXPECT_STATUS(c->OpenSession(open).status(), absl::StatusCode::kResourceExhausted, "KV cache");

  // The gauges are polled by the housekeeping thread: wait (bounded) until they show the state.
  std::string body;
  const absl::Time deadline = absl::Now() + absl::Seconds(30);
  while (absl::Now() < deadline) {
    body = HttpGetBody(server->metrics_port(), "/metrics");
    if (MetricValue(body, "blockd_sessions_open", {}) == 1 && MetricValue(body, "blockd_kv_cache_pages_used", {}) == kBatch) break;
    absl::SleepFor(absl::Milliseconds(50));
  }
  ASSERT_FALSE(body.empty()) << "no 200 reply from the metrics port " << server->metrics_port();
  EXPECT_EQ(MetricValue(body, "blockd_sessions_open", {}), 1) << body;
  EXPECT_EQ(MetricValue(body, "blockd_kv_cache_pages_used", {}), kBatch) << body;
  EXPECT_EQ(MetricValue(body, "blockd_kv_cache_used_bytes", {}), kBatch * page_bytes) << body;
  EXPECT_EQ(MetricValue(body, "blockd_kv_cache_reserved_bytes", {"device=\"cpu:0\""}), kv) << body;
  auto info2 = c->GetServerInfo();
  ASSERT_OK(info2.status());
  EXPECT_EQ(MetricValue(body, "blockd_kv_cache_available_bytes", {"device=\"cpu:0\""}),
            budget - info2->devices(0).memory_used_bytes()) << body;
  // 2 rows x 5 prompt tokens; 2 rows x 1 token in each of 4 decode steps (3 on s, 1 on the fork).
  EXPECT_EQ(MetricValue(body, "blockd_session_tokens_total", {"phase=\"prefill\""}), 10) << body;
  EXPECT_EQ(MetricValue(body, "blockd_session_tokens_total", {"phase=\"decode\""}), 8) << body;
  EXPECT_EQ(MetricValue(body, "blockd_session_step_seconds_count", {"batch=\"2-4\""}), 5) << body;
  EXPECT_EQ(MetricValue(body, "blockd_session_step_seconds_count", {"batch=\"1\""}), 0) << body;
  EXPECT_EQ(MetricValue(body, "blockd_session_opens_refused_total", {"reason=\"client_limit\""}), 1) << body;
  EXPECT_EQ(MetricValue(body, "blockd_session_opens_refused_total", {"reason=\"invalid_argument\""}), 1) << body;
  EXPECT_EQ(MetricValue(body, "blockd_session_opens_refused_total", {"reason=\"memory\""}), 1) << body;
  EXPECT_NE(body.find("# TYPE blockd_session_step_seconds histogram"), std::string::npos);

  ASSERT_OK(c->CloseSession("s"));
  auto info3 = c->GetServerInfo();
  ASSERT_OK(info3.status());
  EXPECT_EQ(info3->sessions_open(), 0);
  EXPECT_EQ(info3->kv_cache_pages_in_use(), 0);
  EXPECT_EQ(info3->kv_cache_bytes_in_use(), 0);
  EXPECT_EQ(info3->devices(0).kv_cache_reserved_bytes(), 0);
  EXPECT_EQ(info3->devices(0).memory_used_bytes(), info0->devices(0).memory_used_bytes());
}

// Waits (up to 15 s) until the daemon refuses unary calls UNAVAILABLE: draining has begun.
void ExpectDrainingRefuses(Client& c) {
  absl::Status refused;
  for (int i = 0; i < 1500 && refused.code() != absl::StatusCode::kUnavailable; ++i) {
    refused = c.GetServerInfo().status();
    if (refused.code() != absl::StatusCode::kUnavailable) absl::SleepFor(absl::Milliseconds(10));
  }
  EXPECT_EQ(refused.code(), absl::StatusCode::kUnavailable) << refused;
}

// A step that finishes while the reply before it is still being sent waits for that write (its
// reply is parked), and no later step is read meanwhile. Forced here with replies larger than the
// client's flow-control window (no BDP probe) and a client that reads nothing yet: of three steps
// sent, two run and the third stays unread until the client reads. Then every reply arrives, in
// order, bitwise as the same steps sent as unary calls; or, when the daemon drains while a reply
// is parked, both replies are sent before the stream ends UNAVAILABLE, and the unread step is not
// run.
void ParkAReply(bool drain) {
  constexpr int64_t kWide = 256, kTokens = 512;  // 512 KiB of float32 a step
  ServerOptions o = LoopbackOptions();
  if (drain) o.drain_grace = absl::Seconds(2);  // the listener still accepts while the stream ends
  auto server = StartServer(o);
  ASSERT_NE(server, nullptr);
  auto c = ConnectTo(*server, {.client_id = "carol"});
  ASSERT_NE(c, nullptr);
  ASSERT_OK(c->CreateBlock(CreateRequest("p0", TinyConfig(false, kWide), 7, 1, 4 * kTokens)).status());
  for (const char* id : {"ref", "s"}) {
    v1::OpenSessionRequest open;
    open.set_session_id(id);
    open.add_block_ids("p0");
    open.set_batch_size(1);
    open.set_max_length(4 * kTokens);
    ASSERT_OK(c->OpenSession(open).status());
  }
  const std::vector<v1::Tensor> x = {RandomTensor({1, kTokens, kWide}, 50), RandomTensor({1, kTokens, kWide}, 51),
                                     RandomTensor({1, 1, kWide}, 52)};  // the third fits in any window
  std::vector<std::string> ref;
  for (const v1::Tensor& t : x) {
    auto y = c->InferStep(StepRequest("ref", t));
    ASSERT_OK(y.status());
    ref.push_back(y->hidden_states().data());
  }
  auto length = [&]() -> int64_t {
    auto list = c->ListSessions();
    if (!list.ok()) return -1;
    for (const v1::SessionInfo& s : *list) {
      if (s.session_id() == "s") return s.length();
    }
    return -1;
  };

  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_HTTP2_BDP_PROBE, 0);
  auto stub = v1::BlockService::NewStub(
      grpc::CreateCustomChannel(TargetOf(*server), grpc::InsecureChannelCredentials(), args));
  grpc::ClientContext ctx;
  ctx.AddMetadata("blockd-client", "carol");
  auto stream = stub->Infer(&ctx);
  for (const v1::Tensor& t : x) ASSERT_TRUE(stream->Write(StepRequest("s", t)));
  ASSERT_TRUE(stream->WritesDone());
  // Two steps run; the second's reply waits behind the first's, and the third step is not read.
  for (int i = 0; i < 1000 && length() < 2 * kTokens; ++i) absl::SleepFor(absl::Milliseconds(10));
  ASSERT_EQ(length(), 2 * kTokens) << "the first two steps did not run";
  absl::SleepFor(absl::Milliseconds(300));
  ASSERT_EQ(length(), 2 * kTokens) << "the third step ran before the client read a reply: nothing was parked";

  std::thread drainer;
  if (drain) {
    drainer = std::thread([&] { server->Drain(); });
    ExpectDrainingRefuses(*c);
  }
  const size_t answered = drain ? 2 : 3;
  for (size_t i = 0; i < answered; ++i) {
    v1::InferStepResponse y;
    if (!stream->Read(&y)) {  // not an ASSERT: the drainer is joined below
      ADD_FAILURE() << "reply " << i << " never came";
      break;
    }
    EXPECT_EQ(y.length(), i < 2 ? (i + 1) * kTokens : 2 * kTokens + 1) << "reply " << i;
    EXPECT_TRUE(y.hidden_states().data() == ref[i]) << "reply " << i << " differs from the unary step's";
  }
  v1::InferStepResponse extra;
  EXPECT_FALSE(stream->Read(&extra));
  const grpc::Status end = stream->Finish();
  if (drain) {
    EXPECT_EQ(end.error_code(), grpc::StatusCode::UNAVAILABLE) << end.error_message();
    EXPECT_NE(end.error_message().find("blockd is draining"), std::string::npos) << end.error_message();
    EXPECT_NE(end.error_message().find("was not run"), std::string::npos) << end.error_message();
    drainer.join();
  } else {
    EXPECT_TRUE(end.ok()) << end.error_message();
    EXPECT_EQ(length(), 2 * kTokens + 1);
  }
}

TEST(SessionOps, AStepDoneWhileTheLastReplyIsStillSentWaitsForItAndHoldsTheNextRead) { ParkAReply(false); }

TEST(SessionOps, DrainingWhileAReplyWaitsSendsItThenEndsTheStream) { ParkAReply(true); }

// Draining (SIGTERM) ends an Infer stream that waits for its next step with UNAVAILABLE, saying
// why, instead of leaving it to be cut when the server stops; the steps it answered stand.
TEST(SessionOps, DrainingEndsAnOpenInferStreamWithUnavailable) {
  ServerOptions o = LoopbackOptions();
  o.drain_grace = absl::Seconds(2);  // the listener still accepts while the stream learns why it ends
  auto server = StartServer(o);
  ASSERT_NE(server, nullptr);
  auto c = ConnectTo(*server);
  ASSERT_NE(c, nullptr);
  ASSERT_OK(c->CreateBlock(CreateRequest("b0", TinyConfig(), 7, 4, kMaxLen)).status());
  v1::OpenSessionRequest open;
  open.set_session_id("s");
  open.add_block_ids("b0");
  open.set_batch_size(1);
  open.set_max_length(kMaxLen);
  ASSERT_OK(c->OpenSession(open).status());
  auto stream = c->OpenInferStream();
  ASSERT_OK(stream.status());
  auto first = (*stream)->Step(StepRequest("s", RandomTensor({1, 2, kHidden}, 3)));
  ASSERT_OK(first.status());
  EXPECT_EQ(first->length(), 2);

  std::thread drainer([&] { server->Drain(); });
  // Once unary calls are refused, draining has begun: the stream is finished (or its next step
  // refused unrun), and the next step learns why.
  ExpectDrainingRefuses(*c);
  auto next = (*stream)->Step(StepRequest("s", RandomTensor({1, 1, kHidden}, 4)));
  EXPECT_STATUS(next.status(), absl::StatusCode::kUnavailable, "blockd is draining");
  drainer.join();
}

}  // namespace
}  // namespace blockd::testing
