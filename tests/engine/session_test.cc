// Inference sessions over the CPU backend: prefill and decode steps against Forward of the whole
// sequence (qk_norm, GQA, a two-block span, rows spanning several KV pages), trim, fork,
// beam reordering (hypo_ids), step_id retries, every error with the session unchanged after it,
// the memory budget, per-client limits, TTL expiry and DeleteBlock closing sessions; the paged
// cache's copy-on-write on its own.
#include <cstring>
#include <string>
#include <vector>

#include "absl/time/clock.h"
#include "engine/engine.h"
#include "engine/kv_cache.h"
#include "gtest/gtest.h"
#include "tests/engine/engine_fixture.h"

namespace blockd::testing {
namespace {

using absl::StatusCode;

constexpr int64_t kMaxLen = 48;  // three KV pages of 16 tokens

class SessionTest : public EngineFixture {
 protected:
  void CreateSpan(const BlockConfig& c, const std::vector<std::string>& ids) {
    for (size_t i = 0; i < ids.size(); ++i) {
      CreateBlockParams p;
      p.spec = Spec(ids[i], c);
      p.spec.max_seq_len = kMaxLen;
      p.seed = 11 + i;
      ASSERT_TRUE(engine_->CreateBlock(p).ok());
    }
  }

  absl::StatusOr<SessionInfo> Open(const std::vector<std::string>& ids, int64_t batch, int64_t max_length,
                                   const std::string& client = "alice", const std::string& id = "") {
    OpenSessionArgs a;
    a.session_id = id;
    a.block_ids = ids;
    a.batch_size = batch;
    a.max_length = max_length;
    a.client = client;
    return engine_->OpenSession(a);
  }

  struct StepResult {
    std::vector<float> out;
    int64_t length = 0;
    bool replayed = false;
  };
  absl::StatusOr<StepResult> Step(const std::string& id, const std::vector<float>& x, int64_t batch, int64_t n,
                                  std::vector<int32_t> hypo = {}, int64_t step_id = 0,
                                  const std::string& client = "alice") {
    InferStepArgs a;
    a.session_id = id;
    a.client = client;
    const int64_t hidden = n > 0 ? static_cast<int64_t>(x.size()) / (batch * n) : 0;
    a.hidden_states = TensorArg{DType::kFloat32, {batch, n, hidden}, x.data(), x.size() * 4};
    a.hypo_ids = std::move(hypo);
    a.step_id = step_id;
    std::string bytes;
    InferStepOutput o;
    o.output.data = &bytes;
    absl::Status s = engine_->InferStep(a, &o);
    if (!s.ok()) return s;
    StepResult r;
    r.out.resize(bytes.size() / 4);
    std::memcpy(r.out.data(), bytes.data(), bytes.size());
    r.length = o.length;
    r.replayed = o.replayed;
    return r;
  }

  // Tokens [t0, t1) of x [batch, seq, d].
  static std::vector<float> Slice(const std::vector<float>& x, int64_t batch, int64_t seq, int64_t d, int64_t t0,
                                  int64_t t1) {
    std::vector<float> out;
    for (int64_t b = 0; b < batch; ++b) {
      out.insert(out.end(), x.begin() + (b * seq + t0) * d, x.begin() + (b * seq + t1) * d);
    }
    return out;
  }
  // Appends y [batch, n, d] to acc [batch, *, d] along the sequence.
  static void Append(std::vector<float>* acc, int64_t acc_seq, const std::vector<float>& y, int64_t batch,
                     int64_t n, int64_t d) {
    std::vector<float> out;
    for (int64_t b = 0; b < batch; ++b) {
      out.insert(out.end(), acc->begin() + b * acc_seq * d, acc->begin() + (b + 1) * acc_seq * d);
      out.insert(out.end(), y.begin() + b * n * d, y.begin() + (b + 1) * n * d);
    }
    *acc = std::move(out);
  }

  std::vector<float> Random(int64_t n) { return Cast<float>(rng_.Vec(n, -1, 1)); }

  // fp32: 1e-5 of the output's scale, elementwise.
  static ::testing::AssertionResult Close(const std::string& what, const std::vector<float>& got,
                                          const std::vector<float>& ref) {
    double scale = 0;
    for (float v : ref) scale = std::max(scale, static_cast<double>(std::fabs(v)));
    return AllClose(what, got, ref, 1e-5 * scale, 1e-5);
  }

  // Prefill `prefill` tokens, then decode the rest one at a time; returns all outputs in order.
  std::vector<float> Generate(const std::string& id, const std::vector<float>& x, int64_t batch, int64_t seq,
                              int64_t d, int64_t prefill) {
    std::vector<float> acc;
    int64_t have = 0;
    for (int64_t t = 0; t < seq;) {
      const int64_t n = t == 0 ? prefill : 1;
      auto r = Step(id, Slice(x, batch, seq, d, t, t + n), batch, n);
      EXPECT_TRUE(r.ok()) << r.status();
      if (!r.ok()) return {};
      EXPECT_EQ(r->length, t + n);
      Append(&acc, have, r->out, batch, n, d);
      have += n;
      t += n;
    }
    return acc;
  }
};

TEST_F(SessionTest, PrefillAndDecodeEqualForwardOfTheWholeSequence) {
  struct Case {
    bool qk_norm;
    int64_t kv_heads;
  };
  for (Case k : {Case{true, 2}, Case{false, 1}, Case{true, 4}, Case{false, 2}}) {
    SCOPED_TRACE(absl::StrCat("qk_norm ", k.qk_norm, ", kv_heads ", k.kv_heads));
    Reset({});
    const BlockConfig c = Config(k.qk_norm, k.kv_heads);
    CreateSpan(c, {"b0", "b1"});
    const int64_t batch = 2, seq = 37, d = c.hidden_size;  // 37 tokens: three pages per row
    const std::vector<float> x = Random(batch * seq * d);
    auto ref = Forward({"b0", "b1"}, x, batch, seq, /*keep=*/false);
    ASSERT_TRUE(ref.ok()) << ref.status();
    auto info = Open({"b0", "b1"}, batch, kMaxLen);
    ASSERT_TRUE(info.ok()) << info.status();
    EXPECT_EQ(info->length, 0);
    EXPECT_EQ(info->kv_bytes, 2 * KvCache::ReservedBytes(KvCache::PageBytes(c.kv_dim(), 4), batch, kMaxLen));
    EXPECT_EQ(info->session_id.rfind("sess-", 0), 0u) << info->session_id;
    EXPECT_TRUE(Close("prefill 20 + 17 decode steps vs Forward", Generate(info->session_id, x, batch, seq, d, 20),
                      ref->out));
  }
}

// Real checkpoints' configs: Qwen2's q/k/v biases (loaded non-zero: seeded biases are zero) and
// scaled RoPE (llama3, yarn) decode exactly as the training forward computes them.
TEST_F(SessionTest, BiasesAndScaledRopeDecodeAsForward) {
  struct Case {
    const char* name;
    bool bias;
    RopeScaling rope;
  };
  RopeScaling llama3;
  llama3.rope_type = "llama3";
  llama3.factor = 8;
  llama3.low_freq_factor = 1;
  llama3.high_freq_factor = 4;
  llama3.original_max_position_embeddings = 16;
  RopeScaling yarn;
  yarn.rope_type = "yarn";
  yarn.factor = 4;
  yarn.original_max_position_embeddings = 16;
  for (const Case& k : {Case{"qwen2 biases", true, RopeScaling{}}, Case{"llama3 rope", false, llama3},
                        Case{"yarn rope + biases", true, yarn}}) {
    SCOPED_TRACE(k.name);
    Reset({});
    BlockConfig c = Config(!k.bias, 2);
    c.attention_bias = k.bias;
    c.rope_scaling = k.rope;
    CreateSpan(c, {"b0", "b1"});
    for (const char* id : {"b0", "b1"}) ASSERT_TRUE(Load(id, RandomWeights(c)).ok());
    const int64_t batch = 2, seq = 37, d = c.hidden_size;
    const std::vector<float> x = Random(batch * seq * d);
    auto ref = Forward({"b0", "b1"}, x, batch, seq, /*keep=*/false);
    ASSERT_TRUE(ref.ok()) << ref.status();
    auto info = Open({"b0", "b1"}, batch, kMaxLen);
    ASSERT_TRUE(info.ok()) << info.status();
    EXPECT_TRUE(Close(absl::StrCat(k.name, ": prefill 5 + 32 decode steps vs Forward"),
                      Generate(info->session_id, x, batch, seq, d, 5), ref->out));
  }
}

TEST_F(SessionTest, TrimThenDecodeAgainEqualsForward) {
  const BlockConfig c = Config(true, 2);
  CreateSpan(c, {"b0", "b1"});
  const int64_t batch = 2, seq = 30, d = c.hidden_size;
  const std::vector<float> x = Random(batch * seq * d);
  auto ref = Forward({"b0", "b1"}, x, batch, seq, false);
  ASSERT_TRUE(ref.ok());
  auto info = Open({"b0", "b1"}, batch, kMaxLen);
  ASSERT_TRUE(info.ok());
  const std::string id = info->session_id;
  // Run past position 22 with other tokens, then rewind to 18 (inside the second page) and go on.
  std::vector<float> wrong = x;
  for (size_t i = Slice(x, 1, seq, d, 0, 18).size(); i < wrong.size(); ++i) wrong[i] = -wrong[i];
  ASSERT_TRUE(Step(id, Slice(x, batch, seq, d, 0, 18), batch, 18).ok());
  ASSERT_TRUE(Step(id, Slice(wrong, batch, seq, d, 18, 23), batch, 5).ok());
  auto trimmed = engine_->TrimSession(id, "alice", 18);
  ASSERT_TRUE(trimmed.ok()) << trimmed.status();
  EXPECT_EQ(trimmed->length, 18);
  auto rest = Step(id, Slice(x, batch, seq, d, 18, seq), batch, seq - 18);
  ASSERT_TRUE(rest.ok()) << rest.status();
  EXPECT_TRUE(Close("positions 18..29 after a trim", rest->out, Slice(ref->out, batch, seq, d, 18, seq)));
  EXPECT_TRUE(HasError(engine_->TrimSession(id, "alice", 31).status(), StatusCode::kOutOfRange, "only 30"));
  EXPECT_TRUE(HasError(engine_->TrimSession(id, "alice", -1).status(), StatusCode::kInvalidArgument, "length"));
}

TEST_F(SessionTest, ForkSharesThePrefixAndDivergesIndependently) {
  const BlockConfig c = Config(false, 2);
  CreateSpan(c, {"b0"});
  const int64_t batch = 1, seq = 34, d = c.hidden_size, prefix = 20;
  const std::vector<float> xa = Random(batch * seq * d);
  std::vector<float> xb = xa;
  for (size_t i = prefix * d; i < xb.size(); ++i) xb[i] = static_cast<float>(rng_.Uniform(-1, 1));
  auto ref_a = Forward({"b0"}, xa, batch, seq, false);
  auto ref_b = Forward({"b0"}, xb, batch, seq, false);
  ASSERT_TRUE(ref_a.ok() && ref_b.ok());

  auto a = Open({"b0"}, batch, kMaxLen);
  ASSERT_TRUE(a.ok());
  ASSERT_TRUE(Step(a->session_id, Slice(xa, batch, seq, d, 0, prefix), batch, prefix).ok());
  auto b = engine_->ForkSession(a->session_id, "alice", "beam-b");
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(b->session_id, "beam-b");
  EXPECT_EQ(b->length, prefix);
  // Interleaved, one token at a time: a write of one must never show in the other.
  std::vector<float> out_a, out_b;
  for (int64_t t = prefix; t < seq; ++t) {
    auto ya = Step(a->session_id, Slice(xa, batch, seq, d, t, t + 1), batch, 1);
    auto yb = Step("beam-b", Slice(xb, batch, seq, d, t, t + 1), batch, 1);
    ASSERT_TRUE(ya.ok() && yb.ok());
    out_a.insert(out_a.end(), ya->out.begin(), ya->out.end());
    out_b.insert(out_b.end(), yb->out.begin(), yb->out.end());
  }
  EXPECT_TRUE(Close("original after fork", out_a, Slice(ref_a->out, batch, seq, d, prefix, seq)));
  EXPECT_TRUE(Close("fork", out_b, Slice(ref_b->out, batch, seq, d, prefix, seq)));
  EXPECT_TRUE(HasError(engine_->ForkSession(a->session_id, "alice", "beam-b").status(), StatusCode::kAlreadyExists,
                       "beam-b"));
  EXPECT_TRUE(HasError(engine_->ForkSession(a->session_id, "bob", "x").status(), StatusCode::kNotFound, "not found"));
}

TEST_F(SessionTest, HypoIdsMoveRowsAsIfEachRowHadItsOwnHistory) {
  const BlockConfig c = Config(true, 1);
  CreateSpan(c, {"b0", "b1"});
  const int64_t batch = 3, prefix = 17, d = c.hidden_size;
  const std::vector<float> prompt = Random(batch * prefix * d);
  const std::vector<float> next = Random(batch * 2 * d);
  const std::vector<int32_t> hypo = {2, 0, 0};
  auto s = Open({"b0", "b1"}, batch, kMaxLen);
  ASSERT_TRUE(s.ok());
  ASSERT_TRUE(Step(s->session_id, prompt, batch, prefix).ok());
  auto y = Step(s->session_id, next, batch, 2, hypo);
  ASSERT_TRUE(y.ok()) << y.status();
  EXPECT_EQ(y->length, prefix + 2);
  for (int64_t i = 0; i < batch; ++i) {
    // Row i, run alone: the prompt of row hypo[i], then row i's new tokens.
    std::vector<float> seq(prompt.begin() + hypo[i] * prefix * d, prompt.begin() + (hypo[i] + 1) * prefix * d);
    seq.insert(seq.end(), next.begin() + i * 2 * d, next.begin() + (i + 1) * 2 * d);
    auto ref = Forward({"b0", "b1"}, seq, 1, prefix + 2, false);
    ASSERT_TRUE(ref.ok());
    const std::vector<float> got(y->out.begin() + i * 2 * d, y->out.begin() + (i + 1) * 2 * d);
    EXPECT_TRUE(Close(absl::StrCat("row ", i, " continuing row ", hypo[i]), got,
                      Slice(ref->out, 1, prefix + 2, d, prefix, prefix + 2)));
  }
}

TEST_F(SessionTest, RepeatingTheLastStepIdReplaysItsBytesWithoutAppending) {
  const BlockConfig c = Config(true, 2);
  CreateSpan(c, {"b0"});
  const int64_t d = c.hidden_size;
  auto s = Open({"b0"}, 2, kMaxLen);
  ASSERT_TRUE(s.ok());
  const std::vector<float> x1 = Random(2 * 4 * d), x2 = Random(2 * 1 * d);
  auto first = Step(s->session_id, x1, 2, 4, {}, /*step_id=*/7);
  ASSERT_TRUE(first.ok());
  // A retry (the same request again) is answered from the step it repeats; another request under
  // the same step_id is refused (AStepIdRepeatedWithAnotherRequestIsRefused).
  auto again = Step(s->session_id, x1, 2, 4, {}, 7);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_TRUE(again->replayed);
  EXPECT_EQ(again->length, 4);
  EXPECT_TRUE(BitwiseEqual("replayed output", again->out.data(), again->out.size() * 4, first->out.data(),
                           first->out.size() * 4));
  auto next = Step(s->session_id, x2, 2, 1, {}, 8);
  ASSERT_TRUE(next.ok());
  EXPECT_FALSE(next->replayed);
  EXPECT_EQ(next->length, 5);
}

TEST_F(SessionTest, EveryErrorLeavesTheSessionAsItWas) {
  const BlockConfig c = Config(true, 2);
  CreateSpan(c, {"b0", "b1"});
  const int64_t batch = 2, seq = 12, d = c.hidden_size;
  const std::vector<float> x = Random(batch * seq * d);
  auto ref = Forward({"b0", "b1"}, x, batch, seq, false);
  ASSERT_TRUE(ref.ok());
  auto s = Open({"b0", "b1"}, batch, seq, "alice", "mine");
  ASSERT_TRUE(s.ok()) << s.status();
  ASSERT_TRUE(Step("mine", Slice(x, batch, seq, d, 0, 6), batch, 6, {}, 1).ok());

  const std::vector<float> one = Slice(x, batch, seq, d, 6, 7);
  EXPECT_TRUE(HasError(Step("nope", one, batch, 1).status(), StatusCode::kNotFound, "session nope not found"));
  EXPECT_TRUE(HasError(Step("mine", one, batch, 1, {}, 0, "bob").status(), StatusCode::kNotFound,
                       "session mine not found"));
  EXPECT_TRUE(HasError(Step("mine", Random(batch * 7 * d), batch, 7).status(), StatusCode::kOutOfRange,
                       "max_length 12"));
  EXPECT_TRUE(HasError(Step("mine", Random(1 * 1 * d), 1, 1).status(), StatusCode::kInvalidArgument,
                       "expects [2,new_tokens>=1,16]"));
  EXPECT_TRUE(HasError(Step("mine", Random(batch * 1 * 8), batch, 1).status(), StatusCode::kInvalidArgument,
                       "expects [2,new_tokens>=1,16]"));
  EXPECT_TRUE(HasError(Step("mine", one, batch, 1, {0}).status(), StatusCode::kInvalidArgument, "hypo_ids has 1"));
  EXPECT_TRUE(HasError(Step("mine", one, batch, 1, {0, 2}).status(), StatusCode::kInvalidArgument,
                       "hypo_ids[1] = 2"));
  std::vector<float> nan = one;
  nan[3] = std::nanf("");
  EXPECT_TRUE(HasError(Step("mine", nan, batch, 1).status(), StatusCode::kInvalidArgument, "non-finite"));
  EXPECT_TRUE(HasError(engine_->TrimSession("mine", "bob", 0).status(), StatusCode::kNotFound, "not found"));
  EXPECT_TRUE(HasError(engine_->CloseSession("mine", "bob"), StatusCode::kNotFound, "not found"));
  EXPECT_TRUE(engine_->ListSessions("bob").empty());

  // Still at length 6 and the same cache: the rest matches Forward.
  auto rest = Step("mine", Slice(x, batch, seq, d, 6, seq), batch, seq - 6);
  ASSERT_TRUE(rest.ok()) << rest.status();
  EXPECT_EQ(rest->length, seq);
  EXPECT_TRUE(Close("after the errors", rest->out, Slice(ref->out, batch, seq, d, 6, seq)));
}

TEST_F(SessionTest, OpenRefusesBadArgumentsAndWhatTheBudgetCannotHold) {
  const BlockConfig c = Config(false, 2);
  const int64_t block_bytes = static_cast<int64_t>(engine_->backend().BlockBytes(Spec("x", c)));
  const int64_t cache_bytes = KvCache::ReservedBytes(KvCache::PageBytes(c.kv_dim(), 4), 2, 32);
  EngineOptions o;
  o.memory_budget_bytes = block_bytes + cache_bytes + cache_bytes / 2;  // one session, not two
  Reset(o);
  CreateSpan(c, {"b0"});
  EXPECT_TRUE(HasError(Open({"b0"}, 0, 8).status(), StatusCode::kInvalidArgument, "batch_size = 0"));
  EXPECT_TRUE(HasError(Open({"b0"}, 2, 0).status(), StatusCode::kInvalidArgument, "max_length = 0"));
  EXPECT_TRUE(HasError(Open({"b0"}, 5, 8).status(), StatusCode::kInvalidArgument, "max_batch_size 4"));
  EXPECT_TRUE(HasError(Open({"b0"}, 2, kMaxLen + 1).status(), StatusCode::kInvalidArgument, "max_seq_len 48"));
  EXPECT_TRUE(HasError(Open({"nope"}, 2, 8).status(), StatusCode::kNotFound, "block nope"));
  EXPECT_TRUE(HasError(Open({"b0"}, 2, 8, "alice", "bad id!").status(), StatusCode::kInvalidArgument,
                       "session_id"));
  auto first = Open({"b0"}, 2, 32);
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_EQ(engine_->Stats().memory_used[0], block_bytes + cache_bytes);
  EXPECT_TRUE(HasError(Open({"b0"}, 2, 32).status(), StatusCode::kResourceExhausted, "KV cache"));
  EXPECT_TRUE(HasError(engine_->ForkSession(first->session_id, "alice", "f").status(),
                       StatusCode::kResourceExhausted, "KV cache"));
  EXPECT_EQ(engine_->Stats().memory_used[0], block_bytes + cache_bytes) << "a refused open holds nothing";
  EXPECT_EQ(engine_->SessionCount(), 1);
  ASSERT_OK(engine_->CloseSession(first->session_id, "alice"));
  EXPECT_EQ(engine_->Stats().memory_used[0], block_bytes);
  EXPECT_TRUE(HasError(engine_->CloseSession(first->session_id, "alice"), StatusCode::kNotFound, "not found"));
  EXPECT_TRUE(Open({"b0"}, 2, 32).ok());
}

TEST_F(SessionTest, PerClientLimitCountsEachIdentity) {
  EngineOptions o;
  o.max_sessions_per_client = 2;
  Reset(o);
  CreateSpan(Config(false), {"b0"});
  ASSERT_TRUE(Open({"b0"}, 1, 8).ok());
  ASSERT_TRUE(Open({"b0"}, 1, 8).ok());
  EXPECT_TRUE(HasError(Open({"b0"}, 1, 8).status(), StatusCode::kResourceExhausted, "--max_sessions_per_client=2"));
  EXPECT_TRUE(Open({"b0"}, 1, 8, "bob").ok());
  EXPECT_EQ(engine_->ListSessions("alice").size(), 2u);
  EXPECT_EQ(engine_->ListSessions("bob").size(), 1u);
}

TEST_F(SessionTest, DeleteBlockClosesTheSessionsThatUseIt) {
  const BlockConfig c = Config(false);
  CreateSpan(c, {"b0", "b1"});
  const int64_t block_bytes = static_cast<int64_t>(engine_->backend().BlockBytes(Spec("x", c)));
  auto both = Open({"b0", "b1"}, 1, 8);
  auto only0 = Open({"b0"}, 1, 8);
  ASSERT_TRUE(both.ok() && only0.ok());
  ASSERT_TRUE(engine_->DeleteBlock("b1").ok());
  EXPECT_TRUE(HasError(Step(both->session_id, Random(c.hidden_size), 1, 1).status(), StatusCode::kNotFound,
                       "not found"));
  EXPECT_TRUE(Step(only0->session_id, Random(c.hidden_size), 1, 1).ok());
  EXPECT_EQ(engine_->ListSessions("alice").size(), 1u);
  EXPECT_EQ(engine_->Stats().memory_used[0], block_bytes + KvCache::ReservedBytes(KvCache::PageBytes(c.kv_dim(), 4), 1, 8));
  // A new block under the same id is not the session's old one.
  CreateSpan(c, {"b1"});
  EXPECT_TRUE(HasError(Step(both->session_id, Random(c.hidden_size), 1, 1).status(), StatusCode::kNotFound,
                       "not found"));
}

TEST_F(SessionTest, ExpiredSessionsAreNotFoundAndSwept) {
  CreateSpan(Config(false), {"b0"});
  OpenSessionArgs a;
  a.block_ids = {"b0"};
  a.batch_size = 1;
  a.max_length = 8;
  a.client = "alice";
  a.ttl = absl::Milliseconds(20);
  const int64_t before = engine_->Stats().memory_used[0];
  auto s = engine_->OpenSession(a);
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(engine_->Stats().memory_used[0], before + s->kv_bytes);
  EXPECT_EQ(engine_->Stats().kv_reserved[0], s->kv_bytes);
  EXPECT_EQ(engine_->ExpireSessions(), 0);
  absl::SleepFor(absl::Milliseconds(40));  // at least the TTL: an expiry, not a timing assertion
  EXPECT_TRUE(HasError(Step(s->session_id, Random(16), 1, 1).status(), StatusCode::kNotFound, "not found"));
  EXPECT_EQ(engine_->ExpireSessions(), 1);
  EXPECT_EQ(engine_->SessionCount(), 0);
  // The sweep gave the whole reservation back.
  EXPECT_EQ(engine_->Stats().memory_used[0], before);
  EXPECT_EQ(engine_->Stats().kv_reserved[0], 0);
  a.ttl = absl::Seconds(-1);
  EXPECT_TRUE(HasError(engine_->OpenSession(a).status(), StatusCode::kInvalidArgument, "ttl"));
}

// EngineStats' KV figures: reserved per device at open, pages counted once however many rows,
// forks or scratch copies share them, and all returned at close.
TEST_F(SessionTest, StatsCountReservedBytesAndSharedPagesOnce) {
  const BlockConfig c = Config(false, 2);
  CreateSpan(c, {"b0"});
  const int64_t d = c.hidden_size, page_bytes = 2 * KvCache::kPageTokens * c.kv_dim() * 4;
  auto s = Open({"b0"}, 2, 32, "alice", "s");
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(engine_->Stats().kv_reserved[0], s->kv_bytes);
  EXPECT_EQ(engine_->Stats().kv_pages_in_use, 0) << "pages are written by steps, not by the open";
  ASSERT_TRUE(Step("s", Random(2 * 18 * d), 2, 18).ok());  // two pages per row
  EXPECT_EQ(engine_->Stats().kv_pages_in_use, 4);
  EXPECT_EQ(engine_->Stats().kv_bytes_in_use, 4 * page_bytes);
  auto f = engine_->ForkSession("s", "alice", "f");
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(engine_->Stats().kv_pages_in_use, 4) << "a fork shares every page";
  EXPECT_EQ(engine_->Stats().kv_reserved[0], 2 * s->kv_bytes);
  ASSERT_TRUE(Step("f", Random(2 * d), 2, 1).ok());  // writes each row's second page: copies
  EXPECT_EQ(engine_->Stats().kv_pages_in_use, 6);
  ASSERT_TRUE(Step("s", Random(2 * d), 2, 1, {0, 0}).ok());  // both rows from row 0: row 1's pages go
  // s's rows both take row 0's pages and each writes a second page of its own; s's old second
  // pages go (f has copies), row 1's first stays for f. Alive: row 0's first page (in both of s's
  // rows and in f), s's two new second pages, f's row-1 first page and its two second pages.
  EXPECT_EQ(engine_->Stats().kv_pages_in_use, 6);
  ASSERT_OK(engine_->CloseSession("s", "alice"));
  ASSERT_OK(engine_->CloseSession("f", "alice"));
  EXPECT_EQ(engine_->Stats().kv_pages_in_use, 0);
  EXPECT_EQ(engine_->Stats().kv_bytes_in_use, 0);
  EXPECT_EQ(engine_->Stats().kv_reserved[0], 0);
}

// A retry must repeat its step exactly: the same step_id with another shape, other bytes or other
// hypo_ids is refused, and the session goes on as if it had not come.
TEST_F(SessionTest, AStepIdRepeatedWithAnotherRequestIsRefused) {
  const BlockConfig c = Config(true, 2);
  CreateSpan(c, {"b0"});
  const int64_t batch = 2, seq = 8, d = c.hidden_size;
  const std::vector<float> x = Random(batch * seq * d);
  auto ref = Forward({"b0"}, x, batch, seq, false);
  ASSERT_TRUE(ref.ok());
  ASSERT_TRUE(Open({"b0"}, batch, seq, "alice", "s").ok());
  const std::vector<float> prompt = Slice(x, batch, seq, d, 0, 4);
  ASSERT_TRUE(Step("s", prompt, batch, 4, {}, 7).ok());
  EXPECT_TRUE(HasError(Step("s", Slice(x, batch, seq, d, 4, 5), batch, 1, {}, 7).status(), StatusCode::kInvalidArgument,
                       "a retry must repeat the request exactly"));
  std::vector<float> other = prompt;
  other[0] += 1;
  EXPECT_TRUE(HasError(Step("s", other, batch, 4, {}, 7).status(), StatusCode::kInvalidArgument, "step_id 7 repeats"));
  EXPECT_TRUE(HasError(Step("s", prompt, batch, 4, {1, 0}, 7).status(), StatusCode::kInvalidArgument, "step_id 7"));
  auto replay = Step("s", prompt, batch, 4, {}, 7);
  ASSERT_TRUE(replay.ok()) << replay.status();
  EXPECT_TRUE(replay->replayed);
  auto rest = Step("s", Slice(x, batch, seq, d, 4, seq), batch, seq - 4, {}, 8);
  ASSERT_TRUE(rest.ok()) << rest.status();
  EXPECT_TRUE(Close("after the refused retries", rest->out, Slice(ref->out, batch, seq, d, 4, seq)));
}

// A store that records the copies the cache asks for, so the test sees what moved.
class RecordingStore : public KvPageStore {
 public:
  explicit RecordingStore(std::vector<std::pair<int32_t, int32_t>>* copies) : copies_(copies) {}
  int64_t page_bytes() const override { return 64; }
  int64_t pages() const override { return pages_; }
  absl::Status Grow(int64_t pages) override {
    pages_ += pages;
    return absl::OkStatus();
  }
  absl::Status CopyPage(int32_t from, int32_t to) override {
    copies_->push_back({from, to});
    return absl::OkStatus();
  }

 private:
  std::vector<std::pair<int32_t, int32_t>>* copies_;
  int64_t pages_ = 0;
};

TEST(KvCacheTest, CopiesShareTheirPagesUntilOneSideWrites) {
  std::vector<std::pair<int32_t, int32_t>> copies;
  std::vector<std::unique_ptr<KvPageStore>> stores;
  stores.push_back(std::make_unique<RecordingStore>(&copies));
  stores.push_back(std::make_unique<RecordingStore>(&copies));
  auto a_or = KvCache::Create(std::move(stores), /*batch=*/2, /*max_length=*/40, {});
  ASSERT_TRUE(a_or.ok()) << a_or.status();
  KvCache a = std::move(a_or).value();
  EXPECT_EQ(KvCache::PagesFor(2, 40), 2 * (3 + 1));
  {
    KvCache first = a;
    ASSERT_OK(first.PrepareWrite(a, 0, 20));
    a = std::move(first);
  }
  EXPECT_EQ(a.DistinctPages(), 4);  // two rows of two pages, all new: nothing copied
  EXPECT_TRUE(copies.empty());

  // A step continuing the session writes its own partial page in place: the committed cache
  // holds it too but never reads past its length.
  {
    KvCache step = a;
    ASSERT_OK(step.PrepareWrite(a, 20, 1));
    EXPECT_EQ(step.PageId(1, 20), a.PageId(1, 20));
    EXPECT_TRUE(copies.empty());
  }

  // A fork shares the pages: the next write of either side copies the shared partial page.
  {
    KvCache fork = a;
    ASSERT_OK(fork.GrowFamily(2, 40, {}));
    KvCache fork_step = fork;
    ASSERT_OK(fork_step.PrepareWrite(fork, 20, 1));
    EXPECT_NE(fork_step.PageId(1, 20), a.PageId(1, 20));
    EXPECT_EQ(fork_step.PageId(1, 0), a.PageId(1, 0)) << "the full first page should still be shared";
    ASSERT_EQ(copies.size(), 4u);  // the second page of each row, in each of the two blocks
    EXPECT_EQ(copies[0].first, a.PageId(0, 16));
    EXPECT_EQ(copies[0].second, fork_step.PageId(0, 16));
  }

  // Both rows continue from row 1: tables move, pages stay; the write then copies row 0's page.
  copies.clear();
  KvCache beam = a;
  beam.Reorder({1, 1});
  EXPECT_EQ(beam.PageId(0, 0), beam.PageId(1, 0));
  EXPECT_EQ(beam.DistinctPages(), 2);
  ASSERT_OK(beam.PrepareWrite(a, 20, 1));
  EXPECT_NE(beam.PageId(0, 16), beam.PageId(1, 16));
  EXPECT_EQ(copies.size(), 2u) << "one shared page, copied in each block";
  EXPECT_EQ(beam.PageId(0, 0), beam.PageId(1, 0)) << "pages this step does not write stay shared";
  beam.Trim(10);
  EXPECT_EQ(beam.DistinctPages(), 1);  // each row keeps its first page, still the shared one
  EXPECT_EQ(KvCache::ReservedBytes(KvCache::PageBytes(12, 4), 2, 17), 2 * (2 + 1) * (2 * 16 * 12) * 4);
}

}  // namespace
}  // namespace blockd::testing
