// Hostile and broken requests about LoRA adapters (CreateBlockRequest.lora, adapter tensors in
// LoadWeights and DownloadTensors), in the style of hostile_input_test: each case names the RPC, what
// is wrong, the code ARCHITECTURE.md ("Errors") documents and words the message must contain; around
// each case every block's weights, gradients, moments, step and has_gradients, the block list and
// the memory in use must stay bitwise the same, and the server must keep answering. Printed as a table.
#include <cmath>
#include <functional>
#include <iomanip>
#include <iostream>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "tests/integration/harness.h"

namespace blockd::testing {
namespace {

using absl::StatusCode;

// TinyConfig(): q_proj/o_proj [32,32], k_proj/v_proj [16,32], gate/up [64,32], down [32,64].
v1::LoraConfig Lora(int32_t rank, double alpha, std::vector<std::string> targets) {
  v1::LoraConfig l;
  l.set_rank(rank);
  l.set_alpha(alpha);
  for (const std::string& t : targets) l.add_target_modules(t);
  return l;
}

struct State {
  std::map<std::string, BlockState> blocks;
  std::vector<std::string> ids;
  int64_t memory = -1;
};

TEST(HostileLora, EveryBadLoraRequestGetsItsCodeAndChangesNothing) {
  auto server = StartServer(LoopbackOptions());
  ASSERT_NE(server, nullptr);
  auto client = ConnectTo(*server, {.client_id = "hostile-lora"});
  ASSERT_NE(client, nullptr);
  const v1::BlockConfig config = TinyConfig();
  // L: a frozen base with trained adapters on q and down; T: a trainable block without adapters.
  v1::CreateBlockRequest l = CreateRequest("L", config, 1, 2, 16);
  l.set_frozen(true);
  *l.mutable_lora() = Lora(4, 8, {"down_proj", "q_proj"});
  auto info = client->CreateBlock(l);
  ASSERT_OK(info.status());
  EXPECT_EQ(std::vector<std::string>(info->lora().target_modules().begin(), info->lora().target_modules().end()),
            (std::vector<std::string>{"q_proj", "down_proj"}));
  ASSERT_OK(client->CreateBlock(CreateRequest("T", config, 2, 2, 16)).status());
  for (const char* id : {"L", "T"}) TrainStep(*client, {id}, RandomTensor({2, 4, 32}, 3), 4);
  v1::StepRequest step;
  step.add_block_ids("L");
  step.add_block_ids("T");
  ASSERT_OK(client->Step(step).status());
  for (const char* id : {"L", "T"}) TrainStep(*client, {id}, RandomTensor({2, 4, 32}, 5), 6);

  auto snapshot = [&] {
    State s;
    for (const char* id : {"L", "T"}) s.blocks[id] = StateOf(*client, id);
    auto blocks = client->ListBlocks();
    if (blocks.ok()) {
      for (const v1::BlockInfo& b : *blocks) s.ids.push_back(b.block_id());
    }
    auto server_info = client->GetServerInfo();
    if (server_info.ok()) s.memory = server_info->devices(0).memory_used_bytes();
    return s;
  };
  auto create = [&](const std::string& id, const v1::LoraConfig& lora) {
    v1::CreateBlockRequest r = CreateRequest(id, config, 1);
    r.set_frozen(true);
    *r.mutable_lora() = lora;
    return client->CreateBlock(r).status();
  };
  auto load = [&](const std::string& block, const std::string& name, std::vector<int64_t> shape) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    TensorBytes t{name, v1::DTYPE_FLOAT32, shape, std::string(static_cast<size_t>(4 * n), '\0')};
    return client->LoadWeightsChunks({Chunk(block, t, 0, 4 * n)}).status();
  };
  auto download = [&](const std::string& block, v1::TensorKind kind, const std::string& name) {
    v1::DownloadTensorsRequest r;
    r.set_block_id(block);
    r.set_kind(kind);
    r.add_names(name);
    return client->DownloadTensors(r).status();
  };
  const double nan = std::numeric_limits<double>::quiet_NaN(), inf = std::numeric_limits<double>::infinity();
  const std::string long_name(200 << 10, 'q');

  struct Case {
    std::string rpc, what;
    StatusCode code;
    std::vector<std::string> parts;
    std::function<absl::Status()> call;
  };
  const std::vector<Case> cases = {
      {"CreateBlock", "lora present but empty (rank 0)", StatusCode::kInvalidArgument,
       {"lora.rank = 0, expected >= 1"}, [&] { return create("N", v1::LoraConfig()); }},
      {"CreateBlock", "negative rank", StatusCode::kInvalidArgument, {"lora.rank = -5, expected 1..16"},
       [&] { return create("N", Lora(-5, 8, {"q_proj", "k_proj"})); }},
      {"CreateBlock", "rank 2^31-1", StatusCode::kInvalidArgument, {"lora.rank = 2147483647, expected 1..32"},
       [&] { return create("N", Lora(std::numeric_limits<int32_t>::max(), 8, {"q_proj"})); }},
      {"CreateBlock", "rank above min(out, in) of a target", StatusCode::kInvalidArgument,
       {"lora.rank = 17, expected 1..16", "v_proj [16,32]"},
       [&] { return create("N", Lora(17, 8, {"q_proj", "v_proj"})); }},
      {"CreateBlock", "alpha 0", StatusCode::kInvalidArgument, {"lora.alpha = 0, expected a finite number > 0"},
       [&] { return create("N", Lora(4, 0, {"q_proj"})); }},
      {"CreateBlock", "alpha negative", StatusCode::kInvalidArgument, {"lora.alpha = -2"},
       [&] { return create("N", Lora(4, -2, {"q_proj"})); }},
      {"CreateBlock", "alpha NaN", StatusCode::kInvalidArgument, {"lora.alpha = nan"},
       [&] { return create("N", Lora(4, nan, {"q_proj"})); }},
      {"CreateBlock", "alpha +inf", StatusCode::kInvalidArgument, {"lora.alpha = inf"},
       [&] { return create("N", Lora(4, inf, {"q_proj"})); }},
      {"CreateBlock", "alpha -inf", StatusCode::kInvalidArgument, {"lora.alpha = -inf"},
       [&] { return create("N", Lora(4, -inf, {"q_proj"})); }},
      {"CreateBlock", "no targets", StatusCode::kInvalidArgument,
       {"lora.target_modules is empty, expected one or more of q_proj k_proj v_proj o_proj gate_proj up_proj "
        "down_proj"},
       [&] { return create("N", Lora(4, 8, {})); }},
      {"CreateBlock", "unknown target", StatusCode::kInvalidArgument,
       {"lora.target_modules[1] = \"lm_head\", expected one of q_proj"},
       [&] { return create("N", Lora(4, 8, {"q_proj", "lm_head"})); }},
      {"CreateBlock", "target in the wrong case", StatusCode::kInvalidArgument,
       {"lora.target_modules[0] = \"Q_PROJ\""}, [&] { return create("N", Lora(4, 8, {"Q_PROJ"})); }},
      {"CreateBlock", "target with a NUL and control bytes", StatusCode::kInvalidArgument,
       {"lora.target_modules[0] = \"q_proj\\x00\\x01\""},
       [&] { return create("N", Lora(4, 8, {std::string("q_proj\0\1", 8)})); }},
      {"CreateBlock", "a 200 KiB target (echoed truncated)", StatusCode::kInvalidArgument,
       {"lora.target_modules[0] = \"qqqq", "... (204800 bytes)"}, [&] { return create("N", Lora(4, 8, {long_name})); }},
      {"CreateBlock", "a target twice", StatusCode::kInvalidArgument,
       {"lora.target_modules names v_proj twice (at 0 and 2)"},
       [&] { return create("N", Lora(4, 8, {"v_proj", "up_proj", "v_proj"})); }},
      {"CreateBlock", "100000 targets, all q_proj", StatusCode::kInvalidArgument,
       {"lora.target_modules names q_proj twice (at 0 and 1)"},
       [&] { return create("N", Lora(4, 8, std::vector<std::string>(100000, "q_proj"))); }},
      {"CreateBlock", "valid lora on an id in use", StatusCode::kAlreadyExists, {"block L already exists"},
       [&] { return create("L", Lora(4, 8, {"q_proj"})); }},
      {"LoadWeights", "adapter of the wrong shape", StatusCode::kInvalidArgument,
       {"self_attn.q_proj.lora_A.weight", "[5,32]", "[4,32]"},
       [&] { return load("L", "self_attn.q_proj.lora_A.weight", {5, 32}); }},
      {"LoadWeights", "adapter of a projection the block does not target", StatusCode::kInvalidArgument,
       {"mlp.up_proj.lora_A.weight"}, [&] { return load("L", "mlp.up_proj.lora_A.weight", {4, 32}); }},
      {"LoadWeights", "adapter on a block without lora", StatusCode::kInvalidArgument,
       {"self_attn.q_proj.lora_B.weight"}, [&] { return load("T", "self_attn.q_proj.lora_B.weight", {32, 4}); }},
      {"DownloadTensors", "gradient of a frozen base weight", StatusCode::kFailedPrecondition,
       {"block L is frozen", "mlp.up_proj.weight has no gradients"},
       [&] { return download("L", v1::TENSOR_KIND_GRADIENTS, "mlp.up_proj.weight"); }},
      {"DownloadTensors", "moment of an adapter the block lacks", StatusCode::kInvalidArgument,
       {"block L has no tensor \"self_attn.k_proj.lora_A.weight\""},
       [&] { return download("L", v1::TENSOR_KIND_ADAM_M, "self_attn.k_proj.lora_A.weight"); }},
  };

  std::ostringstream table;
  table << std::left << std::setw(16) << "rpc" << std::setw(52) << "request" << "outcome\n";
  for (const Case& c : cases) {
    SCOPED_TRACE(c.rpc + ": " + c.what);
    const State before = snapshot();
    const absl::Status s = c.call();
    EXPECT_TRUE(StatusIs(s, c.code, c.parts));
    const State after = snapshot();
    for (const auto& [id, st] : before.blocks) {
      const std::string diff = DiffStates(st, after.blocks.at(id));
      EXPECT_TRUE(diff.empty()) << "block " << id << " changed: " << diff;
    }
    EXPECT_EQ(after.ids, before.ids) << "the block list changed";
    EXPECT_EQ(after.memory, before.memory) << "memory in use changed";
    ASSERT_OK(client->GetServerInfo().status());  // still answering
    table << std::setw(16) << c.rpc << std::setw(52) << c.what << absl::StatusCodeToString(s.code()) << "\n";
  }
  std::cout << table.str();
}

}  // namespace
}  // namespace blockd::testing
