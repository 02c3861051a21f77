// The hostile-input battery's inference-session half (the fixture: hostile_fixture.h): bad
// session requests of every kind, each followed by a probe that the cache still answers the exact
// bytes, and the sessions of two identities kept apart.
#include <grpcpp/client_context.h>

#include <algorithm>
#include <cmath>
#include <iomanip>

#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "tests/reliability/hostile_fixture.h"

namespace blockd::testing {
namespace {

// ---- Inference sessions ----
//
// The user's session "s" over A,B holds 6 tokens per row (its last step had step_id 1); the
// admin holds "adm". Around every case the test compares both identities' session lists (ids,
// lengths, reservations), the sessions open, the KV pages in use and the memory, and then proves
// the cache itself unchanged: a fork of "s" stepped with the same token must answer exactly the
// bytes a fork of the untouched session answered before the battery.
struct SessionState {
  std::vector<std::string> user, admin;
  int64_t open = -1, pages = -1, memory = -1;
  bool operator==(const SessionState& o) const {
    return user == o.user && admin == o.admin && open == o.open && pages == o.pages && memory == o.memory;
  }
};

std::vector<std::string> Describe(Client& c) {
  std::vector<std::string> out;
  auto list = c.ListSessions();
  EXPECT_TRUE(list.ok()) << list.status();
  if (!list.ok()) return out;
  for (const v1::SessionInfo& i : *list) {
    out.push_back(absl::StrCat(i.session_id(), ":", i.length(), "/", i.max_length(), "x", i.batch_size(), ":",
                               i.kv_bytes()));
  }
  std::sort(out.begin(), out.end());
  return out;
}

TEST_F(HostileInput, SessionRequestsGetTheirCodeAndLeaveEverySessionExact) {
  constexpr int64_t kRows = 2, kMaxLen = 64;
  auto open = [&](Client& c, const std::function<void(v1::OpenSessionRequest&)>& f) {
    v1::OpenSessionRequest r;
    r.add_block_ids("A");
    r.add_block_ids("B");
    r.set_batch_size(kRows);
    r.set_max_length(kMaxLen);
    if (f) f(r);
    return c.OpenSession(r).status();
  };
  auto request = [](const std::string& id, v1::Tensor x, int64_t step_id = 0) {
    v1::InferStepRequest r;
    r.set_session_id(id);
    *r.mutable_hidden_states() = std::move(x);
    r.set_step_id(step_id);
    return r;
  };
  const v1::Tensor prompt = RandomTensor({kRows, 6, 32}, 61);
  const v1::Tensor token = RandomTensor({kRows, 1, 32}, 62);
  ASSERT_OK(open(*user_, [](auto& r) { r.set_session_id("s"); }));
  ASSERT_OK(user_->InferStep(request("s", prompt, /*step_id=*/1)).status());
  ASSERT_OK(open(*admin_, [](auto& r) { r.set_session_id("adm"); }));
  // The probe: what the untouched cache answers for the next token.
  auto probe = [&]() -> std::string {
    auto fork = user_->ForkSession("s", "probe");
    EXPECT_TRUE(fork.ok()) << fork.status();
    auto y = user_->InferStep(request("probe", token));
    EXPECT_TRUE(y.ok()) << y.status();
    const absl::Status closed = user_->CloseSession("probe");
    EXPECT_TRUE(closed.ok()) << closed;
    return y.ok() ? y->hidden_states().data() : "";
  };
  const std::string expected = probe();
  ASSERT_FALSE(expected.empty());
  auto snapshot = [&] {
    SessionState st;
    st.user = Describe(*user_);
    st.admin = Describe(*admin_);
    auto info = admin_->GetServerInfo();
    EXPECT_TRUE(info.ok()) << info.status();
    if (info.ok()) {
      st.open = info->sessions_open();
      st.pages = info->kv_cache_pages_in_use();
      st.memory = info->devices(0).memory_used_bytes();
    }
    return st;
  };
  // A raw Infer stream of the user's, for garbage and cancellation.
  auto user_context = [] {
    auto ctx = std::make_unique<grpc::ClientContext>();
    ctx->AddMetadata("authorization", absl::StrCat("Bearer ", kUserToken));
    ctx->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    return ctx;
  };
  auto stream = [&](const std::vector<v1::InferStepRequest>& steps, size_t answered_before_end) {
    auto s = user_->OpenInferStream();
    if (!s.ok()) return s.status();
    for (size_t i = 0; i < steps.size(); ++i) {
      auto y = (*s)->Step(steps[i]);
      if (i < answered_before_end) {
        EXPECT_TRUE(y.ok()) << "step " << i << " of the stream: " << y.status();
        if (y.ok()) {
          EXPECT_EQ(y->length(), 6) << "a replay appended";
        }
      } else if (!y.ok()) {
        break;
      }
    }
    return (*s)->Close();
  };
  v1::Tensor nan = WithValue(token, 5, NAN);
  v1::Tensor unspecified = token;
  unspecified.set_dtype(v1::DTYPE_UNSPECIFIED);
  v1::Tensor short_bytes = token;
  short_bytes.mutable_data()->resize(100);
  v1::Tensor huge_new_tokens = token;
  huge_new_tokens.set_shape(1, int64_t{1} << 40);
  v1::Tensor negative_new = token;
  negative_new.set_shape(1, -1);
  v1::Tensor wrong_rows = RandomTensor({3, 1, 32}, 63);
  v1::Tensor wrong_width = RandomTensor({kRows, 1, 64}, 64);
  auto with_hypo = [&](std::vector<int32_t> ids) {
    v1::InferStepRequest r = request("s", token);
    for (int32_t i : ids) r.add_hypo_ids(i);
    return user_->InferStep(r).status();
  };

  const StatusCode kInvalid = StatusCode::kInvalidArgument, kNotFound = StatusCode::kNotFound,
                   kRange = StatusCode::kOutOfRange;
  std::vector<Case> cases = {
      {"OpenSession", "negative batch_size", kInvalid, {"batch_size = -1, expected 1..65536"},
       [&] { return open(*user_, [](auto& r) { r.set_batch_size(-1); }); }},
      {"OpenSession", "batch_size 2^31-1", kInvalid, {"batch_size = 2147483647, expected 1..65536"},
       [&] { return open(*user_, [](auto& r) { r.set_batch_size(INT32_MAX); }); }},
      {"OpenSession", "batch_size over the block's max_batch_size", kInvalid, {"exceed block A's max_batch_size 8"},
       [&] { return open(*user_, [](auto& r) { r.set_batch_size(9); }); }},
      {"OpenSession", "negative max_length", kInvalid, {"max_length = -5, expected 1..1048576"},
       [&] { return open(*user_, [](auto& r) { r.set_max_length(-5); }); }},
      {"OpenSession", "max_length 2^31-1", kInvalid, {"max_length = 2147483647, expected 1..1048576"},
       [&] { return open(*user_, [](auto& r) { r.set_max_length(INT32_MAX); }); }},
      {"OpenSession", "negative ttl_seconds", kInvalid, {"ttl_seconds = -1, expected >= 0"},
       [&] { return open(*user_, [](auto& r) { r.set_ttl_seconds(-1); }); }},
      {"OpenSession", "the caller's existing session id", StatusCode::kAlreadyExists, {"session s already exists"},
       [&] { return open(*user_, [](auto& r) { r.set_session_id("s"); }); }},
      {"OpenSession", "session id of 200 KiB", kInvalid, {"session_id \"", "(204800 bytes)\" is not valid"},
       [&] { return open(*user_, [](auto& r) { r.set_session_id(std::string(200 << 10, 's')); }); }},
      {"OpenSession", "session id with a newline", kInvalid, {"session_id \"a\\x0ab\" is not valid"},
       [&] { return open(*user_, [](auto& r) { r.set_session_id("a\nb"); }); }},
      {"OpenSession", "an unknown block", kNotFound, {"block ghost not found"},
       [&] { return open(*user_, [](auto& r) { r.set_block_ids(1, "ghost"); }); }},
      {"OpenSession", "no blocks", kInvalid, {"block_ids is empty"},
       [&] { return open(*user_, [](auto& r) { r.clear_block_ids(); }); }},
      {"OpenSession", "a block without weights", StatusCode::kFailedPrecondition, {"block U has weights not loaded"},
       [&] { return open(*user_, [](auto& r) { r.set_block_ids(1, "U"); }); }},
      {"OpenSession", "blocks of two widths", kInvalid, {"block W has hidden_size 64", "a span needs one hidden_size"},
       [&] { return open(*user_, [](auto& r) { r.set_block_ids(1, "W"); }); }},
      {"OpenSession", "anonymous caller", StatusCode::kUnauthenticated, {"missing bearer token"},
       [&] { return open(*anonymous_, nullptr); }},
      {"InferStep", "NaN in hidden_states", kInvalid, {"hidden_states", "non-finite"},
       [&] { return user_->InferStep(request("s", nan)).status(); }},
      {"InferStep", "dtype unspecified", kInvalid, {"hidden_states.dtype"},
       [&] { return user_->InferStep(request("s", unspecified)).status(); }},
      {"InferStep", "100 bytes for [2,1,32] float32", kInvalid, {"hidden_states has 100 bytes of data", "needs 256"},
       [&] { return user_->InferStep(request("s", short_bytes)).status(); }},
      {"InferStep", "3 rows for a 2-row session", kInvalid, {"hidden_states shape [3,1,32], session s expects [2,new_tokens>=1,32]"},
       [&] { return user_->InferStep(request("s", wrong_rows)).status(); }},
      {"InferStep", "hidden 64 for a span of 32", kInvalid, {"expects [2,new_tokens>=1,32]"},
       [&] { return user_->InferStep(request("s", wrong_width)).status(); }},
      {"InferStep", "2^40 new tokens", kRange, {"holds 6 tokens per row", "would pass its max_length 64"},
       [&] { return user_->InferStep(request("s", huge_new_tokens)).status(); }},
      {"InferStep", "new_tokens -1", kInvalid, {"hidden_states.shape has dimension -1"},
       [&] { return user_->InferStep(request("s", negative_new)).status(); }},
      {"InferStep", "59 new tokens past max_length 64", kRange, {"59 more would pass its max_length 64"},
       [&] { return user_->InferStep(request("s", RandomTensor({kRows, 59, 32}, 65))).status(); }},
      {"InferStep", "hypo_ids out of range", kInvalid, {"hypo_ids[1] = 2, expected a row index 0..1"},
       [&] { return with_hypo({0, 2}); }},
      {"InferStep", "negative hypo_ids", kInvalid, {"hypo_ids[0] = -1"}, [&] { return with_hypo({-1, 0}); }},
      {"InferStep", "three hypo_ids for two rows", kInvalid, {"hypo_ids has 3 entries, expected batch_size = 2"},
       [&] { return with_hypo({0, 1, 1}); }},
      {"InferStep", "step_id replay with another shape", kInvalid,
       {"step_id 1 repeats session s's last step", "a retry must repeat the request exactly"},
       [&] { return user_->InferStep(request("s", token, 1)).status(); }},
      {"InferStep", "step_id replay with other bytes", kInvalid, {"step_id 1 repeats session s's last step"},
       [&] { return user_->InferStep(request("s", RandomTensor({kRows, 6, 32}, 66), 1)).status(); }},
      {"InferStep", "another identity's session", kNotFound, {"session adm not found (unknown, closed or expired)"},
       [&] { return user_->InferStep(request("adm", token)).status(); }},
      {"InferStep", "unknown session", kNotFound, {"session nope not found"},
       [&] { return user_->InferStep(request("nope", token)).status(); }},
      {"TrimSession", "past the length", kRange, {"length = 7, but session s holds only 6 tokens per row"},
       [&] { return user_->TrimSession("s", 7).status(); }},
      {"TrimSession", "negative length", kInvalid, {"length = -1, expected 0..6"},
       [&] { return user_->TrimSession("s", -1).status(); }},
      {"TrimSession", "another identity's session", kNotFound, {"session adm not found"},
       [&] { return user_->TrimSession("adm", 0).status(); }},
      {"ForkSession", "onto the caller's existing session", StatusCode::kAlreadyExists, {"session s already exists"},
       [&] { return user_->ForkSession("s", "s").status(); }},
      {"ForkSession", "onto a bad id", kInvalid, {"new_session_id \"a b\" is not valid"},
       [&] { return user_->ForkSession("s", "a b").status(); }},
      {"ForkSession", "another identity's session", kNotFound, {"session adm not found"},
       [&] { return user_->ForkSession("adm", "mine").status(); }},
      {"CloseSession", "another identity's session", kNotFound, {"session adm not found"},
       [&] { return user_->CloseSession("adm"); }},
      {"CloseSession", "unknown session", kNotFound, {"session nope not found"},
       [&] { return user_->CloseSession("nope"); }},
      {"Infer", "a replay, then another identity's session", kNotFound, {"session adm not found"},
       [&] { return stream({request("s", prompt, 1), request("adm", token)}, 1); }},
      {"Infer", "a replay, then garbage", kInvalid, {"hidden_states"},
       [&] { return stream({request("s", prompt, 1), request("s", unspecified)}, 1); }},
      {"Infer", "an empty request", kInvalid, {"hidden_states.dtype"},
       [&] { return stream({v1::InferStepRequest()}, 0); }},
      {"Infer", "cancelled mid-stream", StatusCode::kCancelled, {},  // message: the client's gRPC
       [&] {
         auto ctx = user_context();
         auto rw = stub_->Infer(ctx.get());
         EXPECT_TRUE(rw->Write(request("s", prompt, 1)));
         v1::InferStepResponse y;
         EXPECT_TRUE(rw->Read(&y));
         EXPECT_EQ(y.hidden_states().data().size(), 2 * 6 * 32 * 4u);
         ctx->TryCancel();
         return FromGrpcStatus(rw->Finish());
       }},
  };

  int n = 0;
  for (Case& c : cases) {
    ++n;
    SCOPED_TRACE(absl::StrCat("session case ", n, ": ", c.rpc, " with ", c.what));
    const SessionState before = snapshot();
    const absl::Status s = c.call();
    SessionState after = snapshot();
    // A cancelled stream is finished by the server asynchronously: give it a bounded time.
    for (int i = 0; i < 300 && !(after == before); ++i, absl::SleepFor(absl::Milliseconds(20))) after = snapshot();
    EXPECT_TRUE(StatusIs(s, c.code, c.parts));
    EXPECT_EQ(absl::StrJoin(after.user, " "), absl::StrJoin(before.user, " "));
    EXPECT_EQ(absl::StrJoin(after.admin, " "), absl::StrJoin(before.admin, " "));
    EXPECT_EQ(after.open, before.open);
    EXPECT_EQ(after.pages, before.pages);
    EXPECT_EQ(after.memory, before.memory);
    EXPECT_EQ(probe(), expected) << "the next token's output changed: the cache was touched";
    std::cout << "[hostile session " << std::setw(2) << n << "] " << std::left << std::setw(13) << c.rpc
              << std::setw(46) << c.what << std::right << absl::StatusCodeToString(s.code()) << ": "
              << s.message().substr(0, 120) << "\n";
  }
  EXPECT_GE(n, 40);
}

// Session ids are per identity: the user and the admin each open their own "s1" (different spans
// and rows, so the two cannot be mistaken), step, trim, fork and close them apart; a session of the
// admin's alone reads for the user exactly as an id nobody holds, on every call.
TEST_F(HostileInput, EachIdentityHasItsOwnSessionNamespace) {
  auto open = [](Client& c, const std::string& id, const std::vector<std::string>& blocks, int64_t rows) {
    v1::OpenSessionRequest r;
    r.set_session_id(id);
    for (const std::string& b : blocks) r.add_block_ids(b);
    r.set_batch_size(rows);
    r.set_max_length(32);
    return c.OpenSession(r);
  };
  auto request = [](const std::string& id, v1::Tensor x) {
    v1::InferStepRequest r;
    r.set_session_id(id);
    *r.mutable_hidden_states() = std::move(x);
    return r;
  };
  ASSERT_OK(open(*user_, "s1", {"A", "B"}, 2).status());
  auto admins = open(*admin_, "s1", {"A"}, 1);
  ASSERT_OK(admins.status()) << "another identity's session of the same id must not be in the way";
  EXPECT_EQ(admins->batch_size(), 1);
  EXPECT_EQ(admins->block_ids_size(), 1);
  ASSERT_OK(open(*admin_, "admins-only", {"A"}, 1).status());

  // Each steps its own "s1": the user's two rows over A,B, the admin's one row over A.
  auto user_step = user_->InferStep(request("s1", RandomTensor({2, 5, 32}, 81)));
  ASSERT_OK(user_step.status());
  EXPECT_EQ(user_step->length(), 5);
  auto admin_step = admin_->InferStep(request("s1", RandomTensor({1, 3, 32}, 82)));
  ASSERT_OK(admin_step.status());
  EXPECT_EQ(admin_step->length(), 3) << "the admin's s1 must not hold the user's 5 tokens";
  const std::vector<std::string> users = Describe(*user_);
  ASSERT_EQ(users.size(), 1u);
  EXPECT_EQ(users[0].substr(0, 10), "s1:5/32x2:");
  const std::vector<std::string> admin_list = Describe(*admin_);
  ASSERT_EQ(admin_list.size(), 2u);
  EXPECT_EQ(admin_list[0].substr(0, 19), "admins-only:0/32x1:");
  EXPECT_EQ(admin_list[1].substr(0, 10), "s1:3/32x1:");

  // The user cannot step, trim, fork or close the admin's session: NOT_FOUND, word for word what
  // an id that nobody holds answers.
  const std::string absent = "session admins-only not found (unknown, closed or expired)";
  EXPECT_TRUE(StatusIs(user_->InferStep(request("admins-only", RandomTensor({1, 1, 32}, 83))).status(),
                       StatusCode::kNotFound, {absent}));
  EXPECT_TRUE(StatusIs(user_->TrimSession("admins-only", 0).status(), StatusCode::kNotFound, {absent}));
  EXPECT_TRUE(StatusIs(user_->ForkSession("admins-only", "mine").status(), StatusCode::kNotFound, {absent}));
  EXPECT_TRUE(StatusIs(user_->CloseSession("admins-only"), StatusCode::kNotFound, {absent}));
  // Nor learn that it exists: the id is free in the user's own namespace.
  ASSERT_OK(user_->ForkSession("s1", "admins-only").status());
  ASSERT_OK(user_->CloseSession("admins-only"));

  // Trimming, forking and closing the user's "s1" leaves the admin's as it was.
  ASSERT_OK(user_->TrimSession("s1", 1).status());
  ASSERT_OK(user_->ForkSession("s1", "s1-fork").status());
  ASSERT_OK(user_->CloseSession("s1"));
  ASSERT_OK(user_->CloseSession("s1-fork"));
  EXPECT_TRUE(Describe(*user_).empty());
  EXPECT_EQ(Describe(*admin_), admin_list);
  auto again = admin_->InferStep(request("s1", RandomTensor({1, 1, 32}, 84)));
  ASSERT_OK(again.status());
  EXPECT_EQ(again->length(), 4);
  ASSERT_OK(admin_->CloseSession("s1"));
  ASSERT_OK(admin_->CloseSession("admins-only"));
  auto info = admin_->GetServerInfo();
  ASSERT_OK(info.status());
  EXPECT_EQ(info->sessions_open(), 0);
}

}  // namespace
}  // namespace blockd::testing
