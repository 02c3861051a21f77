// blockctl's subcommands beyond moving tensors, against a real server and, for the block lease
// (create --ttl, list --idle, gc), also against a recording fake that answers ListBlocks with
// chosen idle times (hours, which a real server cannot show in a test) and records what blockctl
// sent. The lease itself is tested in lease_test.cc.
// Also: create --config refuses what import-hf refuses, word for word (tests/proto/hf_configs.json),
// and requests over the message limit fail with which limit and what to do.
#include <filesystem>
#include <fstream>
#include <mutex>
#include <set>

#include <grpcpp/server.h>
#include <grpcpp/server_builder.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "nlohmann/json.hpp"
#include "tests/integration/blockctl_harness.h"
#include "tests/proto/hf_config_cases.h"


namespace blockd::testing {
namespace {

using nlohmann::json;

// ---- create --config: the refusals of import-hf ----------------------------------------------

TEST_F(Blockctl, CreateFromConfigRefusesWhatImportHfRefuses) {
  const json all = HfConfigCases();
  int refused = 0, created = 0;
  for (const json& c : all["cases"]) {
    const std::string name = c["name"];
    SCOPED_TRACE(name);
    const std::string path = absl::StrCat(dir_, "/", name, ".json");
    std::ofstream(path) << HfConfigOf(all, c).dump(2);
    Ran r = Ctl(absl::StrCat("create ", name, " --config=", path, " --seed=1"));
    if (c.contains("error")) {
      ++refused;
      EXPECT_RUN(r, 1, absl::StrCat("blockctl: INVALID_ARGUMENT: ", c["error"].get<std::string>(), "\n"));
      EXPECT_EQ(client_->GetBlock(name).status().code(), absl::StatusCode::kNotFound) << "a refused config made a block";
      continue;
    }
    ++created;
    EXPECT_RUN(r, 0, absl::StrCat("block       ", name));
    auto info = client_->GetBlock(name);
    ASSERT_OK(info.status());
    const json& want = c["config"];
    const v1::BlockConfig& got = info->config();
    EXPECT_EQ(got.hidden_size(), want["hidden_size"].get<int64_t>());
    EXPECT_EQ(got.num_kv_heads(), want["num_kv_heads"].get<int64_t>());
    EXPECT_EQ(got.head_dim(), want["head_dim"].get<int64_t>());
    EXPECT_EQ(got.rms_norm_eps(), want["rms_norm_eps"].get<double>());
    EXPECT_EQ(got.rope_theta(), want["rope_theta"].get<double>());
    EXPECT_EQ(got.qk_norm(), want["qk_norm"].get<bool>());
  }
  EXPECT_GE(refused, 10);
  EXPECT_GE(created, 3);
  // Flags still override a config.json that is accepted.
  const std::string qwen3 = dir_ + "/qwen3.json";
  EXPECT_RUN(Ctl(absl::StrCat("create over --config=", qwen3, " --rope_theta=5000 --layer=7 --seed=1")), 0,
             "rope_theta 5000");
  auto info = client_->GetBlock("over");
  ASSERT_OK(info.status());
  EXPECT_EQ(info->layer_index(), 7) << "--layer sets layer_index";
}

// gc against a real server: a block nobody names goes, one in use stays.
TEST_F(Blockctl, GcDeletesWhatTheServerSaysIsIdle) {
  for (const char* id : {"idle", "busy"}) ASSERT_OK(client_->CreateBlock(CreateRequest(id, TinyConfig(), 4)).status());
  for (int i = 0; i < 8; ++i) {  // 1.6 s, naming only "busy" (GetBlock renews its idle time)
    absl::SleepFor(absl::Milliseconds(200));
    ASSERT_OK(client_->GetBlock("busy").status());
  }
  Ran r = Ctl("list --idle=1s");
  EXPECT_RUN(r, 0, "idle");
  EXPECT_EQ(r.output.find("busy"), std::string::npos) << "a block named every 200 ms listed as idle:\n" << r.output;
  EXPECT_RUN(Ctl("gc --idle=1s --yes"), 0, "deleted idle");
  EXPECT_EQ(client_->GetBlock("idle").status().code(), absl::StatusCode::kNotFound) << "gc left the idle block";
  EXPECT_TRUE(client_->GetBlock("busy").ok()) << "gc deleted a block in use";
}

// ---- step, zero-grad, release, forward --keep --------------------------------------------------

TEST_F(Blockctl, StepZeroGradAndReleaseMatchTheClient) {
  // Twins: the same seed, input and grad_output; s1 is stepped by blockctl, s2 by the client.
  for (const char* id : {"s1", "s2"}) ASSERT_OK(client_->CreateBlock(CreateRequest(id, TinyConfig(), 4)).status());
  const v1::Tensor x = RandomTensor({2, 5, 32}, 41);
  const std::string input = dir_ + "/x.safetensors";
  WriteWeights(input, {{"hidden", v1::DTYPE_FLOAT32, {2, 5, 32}, x.data()}}, "");
  EXPECT_RUN(Ctl("step s1"), 1, "FAILED_PRECONDITION: block s1 has no gradients");
  for (const char* id : {"s1", "s2"}) {
    EXPECT_RUN(Ctl(absl::StrCat("forward ", id, " --input=", input, " --backward --seed=9")), 0, "grad_input");
  }
  Ran r = Ctl("step s1 --lr=0.02 --beta1=0.8 --beta2=0.99 --eps=1e-6 --weight_decay=0.1 --max_grad_norm=0.05");
  v1::StepRequest req;
  req.add_block_ids("s2");
  req.mutable_adamw()->set_lr(0.02);
  req.mutable_adamw()->set_beta1(0.8);
  req.mutable_adamw()->set_beta2(0.99);
  req.mutable_adamw()->set_eps(1e-6);
  req.mutable_adamw()->set_weight_decay(0.1);
  req.set_max_grad_norm(0.05);
  auto want = client_->Step(req);
  ASSERT_OK(want.status());
  ASSERT_GT(want->grad_norm(), 0.05) << "the test means to clip";
  EXPECT_RUN(r, 0, absl::StrFormat("grad norm   %.6g (clipped to 0.05", want->grad_norm()));
  EXPECT_NE(r.output.find("skipped     no\n"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("step        s1 1\n"), std::string::npos) << r.output;
  EXPECT_EQ(DiffSnapshots(Download(*client_, "s1", v1::TENSOR_KIND_WEIGHTS),
                          Download(*client_, "s2", v1::TENSOR_KIND_WEIGHTS)),
            "")
      << "blockctl step's flags did not reach the request as given";
  auto info = client_->GetBlock("s1");
  ASSERT_OK(info.status());
  EXPECT_EQ(info->step(), 1);
  EXPECT_FALSE(info->has_gradients()) << "a step clears the gradients it used";

  // zero-grad clears gradients without a step: the next step has nothing to do.
  EXPECT_RUN(Ctl(absl::StrCat("forward s1 --input=", input, " --backward")), 0, "grad_input");
  EXPECT_RUN(Ctl("zero-grad s1,s2"), 0, "zeroed the gradients of s1, s2");
  info = client_->GetBlock("s1");
  ASSERT_OK(info.status());
  EXPECT_FALSE(info->has_gradients());
  EXPECT_RUN(Ctl("step s1"), 1, "FAILED_PRECONDITION: block s1 has no gradients");
  EXPECT_RUN(Ctl(absl::StrCat("forward s1 --input=", input, " --backward")), 0, "grad_input");
  Ran json_step = Ctl("step s1 --json");
  EXPECT_RUN(json_step, 0, "\"skipped\": false");
  EXPECT_NE(json_step.output.find("\"step\": \"2\""), std::string::npos) << json_step.output;
  EXPECT_RUN(Ctl("zero-grad nope"), 1, "NOT_FOUND: block nope not found");
  EXPECT_RUN(Ctl("step"), 2, "step takes at least one BLOCK id");

  // forward --keep holds a handle until release frees it.
  r = Ctl("forward s1 --batch=1 --seq=3 --keep");
  EXPECT_RUN(r, 0, "activation  ");
  const size_t at = r.output.find("activation  ") + 12;
  const std::string id = r.output.substr(at, r.output.find(' ', at) - at);
  ASSERT_FALSE(id.empty()) << r.output;
  auto held = client_->GetServerInfo();
  ASSERT_OK(held.status());
  EXPECT_EQ(held->activations_held(), 1);
  EXPECT_RUN(Ctl("release " + id), 0, "released " + id);
  held = client_->GetServerInfo();
  ASSERT_OK(held.status());
  EXPECT_EQ(held->activations_held(), 0);
  EXPECT_RUN(Ctl("release " + id), 1, "NOT_FOUND");
  EXPECT_RUN(Ctl("forward s1 --keep --backward"), 2, "--keep and --backward");
  EXPECT_RUN(Ctl("release"), 2, "release takes at least one ACTIVATION_ID");
}

// ---- message size ------------------------------------------------------------------------------

TEST_F(Blockctl, ARequestOverTheMessageLimitSaysWhichLimitAndWhatToDo) {
  ASSERT_OK(client_->CreateBlock(CreateRequest("m0", TinyConfig(), 4)).status());
  // 8 x 128 x 32 float32 = 128 KiB of input against a 64 KiB client limit: refused before sending.
  ClientOptions small;
  small.max_message_bytes = 64 << 10;
  auto c = ConnectTo(*server_, small);
  ASSERT_NE(c, nullptr);
  auto y = c->Forward({"m0"}, RandomTensor({8, 128, 32}, 5), false);
  EXPECT_STATUS(y.status(), absl::StatusCode::kResourceExhausted,
                "Forward input [8,128,32] float32 is 128.0 KiB, over the 64 KiB message limit (--max_message_bytes "
                "on the server / ClientOptions.max_message_bytes): split the batch");
  EXPECT_RUN(Ctl("--max_message_bytes=65536 forward m0 --batch=8 --seq=128"), 1,
             "RESOURCE_EXHAUSTED: Forward input [8,128,32] float32 is 128.0 KiB, over the 64 KiB message limit");
  auto dx = c->Backward("no-such-handle", RandomTensor({8, 128, 32}, 6));
  EXPECT_STATUS(dx.status(), absl::StatusCode::kResourceExhausted, "Backward grad_output [8,128,32] float32 is 128.0 KiB");
  // Under the limit the same client works.
  ASSERT_OK(c->Forward({"m0"}, RandomTensor({1, 16, 32}, 7), false).status());
}

TEST(BlockctlTransport, SharedMemoryCarriesWhatTheMessageLimitWouldRefuse) {
  ServerOptions o = LoopbackOptions();
  o.service.shared_memory.allowed = true;
  auto server = StartServer(o);
  ASSERT_NE(server, nullptr);
  ASSERT_OK(ConnectTo(*server)->CreateBlock(CreateRequest("m0", TinyConfig(), 4)).status());
  const std::string ctl = absl::StrCat("--target=", TargetOf(*server), " --max_message_bytes=65536 ");
  // 128 KiB of input over a 64 KiB limit: refused inline, carried by reference through shared memory.
  EXPECT_RUN(RunBlockctl(ctl + "forward m0 --batch=8 --seq=128"), 1, "over the 64 KiB message limit");
  EXPECT_RUN(RunBlockctl(ctl + "--transport=shared_memory forward m0 --batch=8 --seq=128"), 0, "[8,128,32]");
  EXPECT_RUN(RunBlockctl(ctl + "--transport=auto forward m0 --batch=8 --seq=128"), 0, "[8,128,32]");
  EXPECT_RUN(RunBlockctl(ctl + "--transport=ipc forward m0"), 2, "--transport=ipc: expected grpc, auto or shared_memory");
  EXPECT_TRUE(ConnectTo(*server)->ListSharedMemory()->empty()) << "blockctl left its region registered";
}

TEST(BlockctlMessageSize, TheServersSmallerLimitGetsTheSameAdvice) {
  ServerOptions o = LoopbackOptions();
  o.service.max_message_bytes = 64 << 10;
  auto server = StartServer(o);
  ASSERT_NE(server, nullptr);
  auto c = ConnectTo(*server);  // the client's own limit is the default 256 MiB
  ASSERT_NE(c, nullptr);
  ASSERT_OK(c->CreateBlock(CreateRequest("m0", TinyConfig(), 4)).status());
  auto y = c->Forward({"m0"}, RandomTensor({8, 128, 32}, 5), false);
  EXPECT_STATUS(y.status(), absl::StatusCode::kResourceExhausted,
                "Forward input [8,128,32] float32 is 128.0 KiB, over the server's message limit (Received message "
                "larger than max");
  EXPECT_NE(std::string(y.status().message()).find("split the batch, or raise --max_message_bytes on the server"),
            std::string::npos)
      << y.status();
}

// ---- the lease: create --ttl, list --idle, gc ----------------------------------------------------

// Answers CreateBlock, ListBlocks and DeleteBlock from a table of blocks with chosen idle times,
// and records the requests.
class FakeLeaseService final : public v1::BlockService::Service {
 public:
  void Add(const std::string& id, double idle_seconds, int64_t ttl_seconds) {
    std::lock_guard<std::mutex> lock(mu_);
    v1::BlockInfo b;
    b.set_block_id(id);
    *b.mutable_config() = TinyConfig();
    b.set_idle_seconds(idle_seconds);
    b.set_ttl_seconds(ttl_seconds);
    b.set_backend("fake");
    blocks_[id] = b;
  }
  grpc::Status CreateBlock(grpc::ServerContext*, const v1::CreateBlockRequest* req, v1::BlockInfo* out) override {
    std::lock_guard<std::mutex> lock(mu_);
    last_create_ = *req;
    out->set_block_id(req->block_id());
    *out->mutable_config() = req->config();
    out->set_layer_index(req->layer_index());
    out->set_ttl_seconds(req->ttl_seconds());
    return grpc::Status::OK;
  }
  grpc::Status ListBlocks(grpc::ServerContext*, const v1::ListBlocksRequest*, v1::ListBlocksResponse* out) override {
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& [id, b] : blocks_) *out->add_blocks() = b;
    for (const std::string& id : used_after_listing_) blocks_.at(id).set_idle_seconds(0);
    used_after_listing_.clear();
    return grpc::Status::OK;
  }
  // As the server: only_if_idle_seconds > 0 deletes only a block idle at least that long.
  grpc::Status DeleteBlock(grpc::ServerContext*, const v1::DeleteBlockRequest* req, v1::DeleteBlockResponse*) override {
    std::lock_guard<std::mutex> lock(mu_);
    deleted_.push_back(req->block_id());
    only_if_idle_.push_back(req->only_if_idle_seconds());
    if (vanished_.count(req->block_id()) > 0) return grpc::Status(grpc::StatusCode::NOT_FOUND, "gone");
    auto it = blocks_.find(req->block_id());
    if (it == blocks_.end()) return grpc::Status(grpc::StatusCode::NOT_FOUND, "block not found");
    if (req->only_if_idle_seconds() > it->second.idle_seconds()) {
      return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, "block was named by a call 0.0 s ago");
    }
    blocks_.erase(it);
    return grpc::Status::OK;
  }
  // A call names the block right after the next listing (between blockctl's list and its delete).
  void UseAfterListing(const std::string& id) {
    std::lock_guard<std::mutex> lock(mu_);
    used_after_listing_.insert(id);
  }
  std::vector<double> only_if_idle() {
    std::lock_guard<std::mutex> lock(mu_);
    return only_if_idle_;
  }
  // The lease runs out between blockctl's list and its delete.
  void Vanish(const std::string& id) {
    std::lock_guard<std::mutex> lock(mu_);
    vanished_.insert(id);
  }
  v1::CreateBlockRequest last_create() {
    std::lock_guard<std::mutex> lock(mu_);
    return last_create_;
  }
  std::vector<std::string> deleted() {
    std::lock_guard<std::mutex> lock(mu_);
    return deleted_;
  }

 private:
  std::mutex mu_;
  std::map<std::string, v1::BlockInfo> blocks_;
  std::set<std::string> vanished_, used_after_listing_;
  v1::CreateBlockRequest last_create_;
  std::vector<std::string> deleted_;
  std::vector<double> only_if_idle_;
};

class BlockctlLease : public ::testing::Test {
 protected:
  void SetUp() override {
    grpc::ServerBuilder builder;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port_);
    builder.RegisterService(&service_);
    server_ = builder.BuildAndStart();
    ASSERT_NE(server_, nullptr);
    ASSERT_GT(port_, 0);
  }
  void TearDown() override {
    if (server_ != nullptr) server_->Shutdown();
  }
  Ran Ctl(const std::string& args) { return RunBlockctl(absl::StrCat("--target=127.0.0.1:", port_, " ", args)); }

  FakeLeaseService service_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
};

TEST_F(BlockctlLease, CreateTtlSetsTheLease) {
  Ran r = Ctl("create leased --hidden_size=32 --num_attention_heads=4 --intermediate_size=64 --ttl=90m --layer=2");
  EXPECT_RUN(r, 0, "lease       1h30m");
  EXPECT_EQ(service_.last_create().ttl_seconds(), 5400);
  EXPECT_EQ(service_.last_create().layer_index(), 2);
  EXPECT_RUN(Ctl("create plain --hidden_size=32 --num_attention_heads=4 --intermediate_size=64"), 0,
             "lease       none");
  EXPECT_EQ(service_.last_create().ttl_seconds(), 0) << "no --ttl, no lease";
  EXPECT_RUN(Ctl("create odd --hidden_size=32 --num_attention_heads=4 --intermediate_size=64 --ttl=1.5s"), 0, "block");
  EXPECT_EQ(service_.last_create().ttl_seconds(), 2) << "a fraction of a second rounds up, never to no lease";
  EXPECT_RUN(Ctl("create short --hidden_size=32 --num_attention_heads=4 --intermediate_size=64 --ttl=500ms"), 2,
             "--ttl=500ms: expected a duration of at least 1s");
  EXPECT_RUN(Ctl("create bad --hidden_size=32 --num_attention_heads=4 --intermediate_size=64 --ttl=soon"), 2,
             "--ttl=soon: expected a duration");
}

TEST_F(BlockctlLease, ListIdleAndGc) {
  service_.Add("fresh", 30, 0);
  service_.Add("stale-a", 2 * 3600 + 5 * 60, 3600);
  service_.Add("stale-b", 5 * 3600, 0);
  Ran r = Ctl("list --idle=1h");
  EXPECT_RUN(r, 0, "IDLE");
  EXPECT_NE(r.output.find("2h05m"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("5h00m"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("stale-a"), std::string::npos) << r.output;
  EXPECT_EQ(r.output.find("fresh"), std::string::npos) << "a block idle 30s is not idle for 1h:\n" << r.output;
  EXPECT_RUN(Ctl("list --idle=10h"), 0, "no block idle for 10h or longer");
  EXPECT_RUN(Ctl("list"), 0, "fresh");
  r = Ctl("list --idle=1h --json");
  EXPECT_RUN(r, 0, "\"idle_seconds\": 7500");
  EXPECT_EQ(r.output.find("fresh"), std::string::npos) << r.output;
  EXPECT_RUN(Ctl("list --idle=0"), 2, "--idle: expected a duration such as 30m or 2h");

  // gc without --yes only says what it would do.
  r = Ctl("gc --idle=1h");
  EXPECT_RUN(r, 0, "would delete stale-a (idle 2h05m)");
  EXPECT_NE(r.output.find("would delete stale-b (idle 5h00m)"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("run again with --yes"), std::string::npos) << r.output;
  EXPECT_TRUE(service_.deleted().empty()) << "gc without --yes deleted something";
  EXPECT_RUN(Ctl("gc"), 2, "gc needs --idle=DURATION");

  // With --yes: the idle ones go; one whose lease ran out meanwhile is not an error, and one that
  // a call named between the listing and the delete stays: each delete asks the server to check
  // that the block is still idle (only_if_idle_seconds), atomically with the delete.
  service_.Vanish("stale-b");
  service_.Add("stale-c", 3 * 3600, 0);
  service_.UseAfterListing("stale-c");
  r = Ctl("gc --idle=1h --yes");
  EXPECT_RUN(r, 0, "deleted stale-a (idle 2h05m");
  EXPECT_NE(r.output.find("stale-b is already gone"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("kept stale-c: used since it was listed (block was named by a call 0.0 s ago)"),
            std::string::npos)
      << r.output;
  EXPECT_NE(r.output.find("deleted 1 of 3 idle block(s)"), std::string::npos) << r.output;
  EXPECT_EQ(service_.deleted(), (std::vector<std::string>{"stale-a", "stale-b", "stale-c"}));
  EXPECT_EQ(service_.only_if_idle(), (std::vector<double>{3600, 3600, 3600}));
  EXPECT_RUN(Ctl("list"), 0, "fresh");
  EXPECT_NE(Ctl("list").output.find("stale-c"), std::string::npos) << "gc deleted a block used since its listing";
}

TEST(BlockctlUsage, NewSubcommandsInHelp) {
  Ran r = RunBlockctl("--help");
  for (const char* cmd : {"step", "zero-grad", "release", "gc"}) {
    EXPECT_NE(r.output.find(absl::StrCat("  ", cmd, " ")), std::string::npos) << cmd << " missing from --help";
  }
  EXPECT_RUN(RunBlockctl("step --help"), 0, "--max_grad_norm=X");
  EXPECT_RUN(RunBlockctl("create --help"), 0, "--ttl=DURATION");
  EXPECT_RUN(RunBlockctl("list --help"), 0, "--idle=DURATION");
  EXPECT_RUN(RunBlockctl("gc --help"), 0, "--yes");
}

}  // namespace
}  // namespace blockd::testing
