// blockctl against a real server: each subcommand's output and exit status (0 ok, 1 refused with
// the server's code and message, 2 usage), safetensors in and out (one layer of a whole model, a
// sharded checkpoint with its index json), and import-hf of synthetic Hugging Face checkpoints
// (config.json, bf16 shards, model.safetensors.index.json) that the tests write themselves.
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <set>

#include <gtest/gtest.h>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "base/safetensors.h"
#include "nlohmann/json.hpp"
#include "tests/integration/blockctl_harness.h"

namespace blockd::testing {
namespace {

TEST(BlockctlUsage, HelpAndUsageErrors) {
  Ran r = RunBlockctl("--help");
  EXPECT_RUN(r, 0, "commands:");
  for (const char* cmd :
       {"info", "health", "create", "load", "import-hf", "export-hf", "export-peft", "list", "get", "delete", "forward",
        "download", "metrics"}) {
    EXPECT_NE(r.output.find(absl::StrCat("  ", cmd, " ")), std::string::npos) << cmd << " missing from --help";
  }
  EXPECT_RUN(RunBlockctl("create --help"), 0, "--hidden_size=N");
  EXPECT_RUN(RunBlockctl("load --help"), 0, "--layer=N");
  EXPECT_RUN(RunBlockctl("download --help"), 0, "--kind=STR");
  EXPECT_RUN(RunBlockctl("help forward"), 0, "--backward");
  EXPECT_RUN(RunBlockctl("import-hf --help"), 0, "--layers=STR");
  EXPECT_RUN(RunBlockctl("import-hf"), 2, "import-hf takes one checkpoint DIR");
  EXPECT_RUN(RunBlockctl("import-hf /nonexistent --precision=fp64"), 2, "--precision=fp64: expected fp32, tf32 or bf16");
  EXPECT_RUN(RunBlockctl("import-hf /nonexistent"), 1, "NOT_FOUND: /nonexistent: not a directory");
  // export-hf / export-peft: usage errors before anything is sent (the exports themselves:
  // tests/client_python/hf_export_test.py, against a daemon and Python's export).
  EXPECT_RUN(RunBlockctl("export-hf --help"), 0, "--first_layer=N");
  EXPECT_RUN(RunBlockctl("export-hf -o /tmp/x"), 2, "export-hf takes one or more BLOCK ids");
  EXPECT_RUN(RunBlockctl("export-hf b0"), 2, "export-hf needs -o DIR");
  EXPECT_RUN(RunBlockctl("export-hf b0 -o /tmp/x --dtype=fp16"), 2, "--dtype=fp16: expected bf16 or fp32");
  EXPECT_RUN(RunBlockctl("export-hf b0 -o /tmp/x --max_shard_bytes=0"), 2, "--max_shard_bytes=0: expected > 0");
  EXPECT_RUN(RunBlockctl("export-peft b0 -o /tmp/x --first_layer=-1"), 2, "--first_layer=-1: expected >= 0");
  EXPECT_RUN(RunBlockctl(""), 2, "usage: blockctl");
  EXPECT_RUN(RunBlockctl("frobnicate"), 2, "unknown command \"frobnicate\"");
  EXPECT_RUN(RunBlockctl("list --frob=1"), 2, "unknown flag --frob");
  EXPECT_RUN(RunBlockctl("get"), 2, "get takes one BLOCK id");
  EXPECT_RUN(RunBlockctl("create b0 --hidden_size=abc"), 2, "--hidden_size=abc: expected an integer");
  EXPECT_RUN(RunBlockctl("--target=127.0.0.1:1 --timeout=3s list"), 1, "UNAVAILABLE");
}

TEST_F(Blockctl, CreateListGetForwardDeleteAndServerErrors) {
  Ran r = Ctl("create b0 --hidden_size=32 --num_attention_heads=4 --num_kv_heads=2 --intermediate_size=64 "
              "--qk_norm --seed=5 --layer_index=3 --max_seq_len=128");
  EXPECT_RUN(r, 0, "block       b0");
  EXPECT_NE(r.output.find("heads 4 (kv 2) x head_dim 8"), std::string::npos) << r.output;
  auto info = client_->GetBlock("b0");
  ASSERT_OK(info.status());
  EXPECT_EQ(info->layer_index(), 3);
  EXPECT_EQ(info->max_seq_len(), 128);
  EXPECT_TRUE(info->config().qk_norm());
  EXPECT_TRUE(info->weights_loaded()) << "--seed should initialise the weights";

  EXPECT_RUN(Ctl("list"), 0, "b0");
  EXPECT_RUN(Ctl("get b0"), 0, "weights     loaded");
  EXPECT_RUN(Ctl("get b0 --json"), 0, "\"block_id\": \"b0\"");
  EXPECT_RUN(Ctl("info"), 0, "backend     cpu");
  EXPECT_RUN(Ctl("health"), 0, "SERVING");
  r = Ctl("forward b0 --batch=2 --seq=5 --seed=1");
  EXPECT_RUN(r, 0, "output      [2,5,32] float32 mean=");
  EXPECT_NE(r.output.find("forward "), std::string::npos) << r.output;
  r = Ctl("forward b0,b0 --batch=1 --seq=3 --dtype=bf16 --backward");
  EXPECT_RUN(r, 0, "grad_input  [1,3,32] bfloat16 mean=");
  info = client_->GetBlock("b0");
  ASSERT_OK(info.status());
  EXPECT_TRUE(info->has_gradients()) << "forward --backward should leave gradients";

  // The server's refusals: exit 1, code and message.
  EXPECT_RUN(Ctl("create b0 --hidden_size=32 --num_attention_heads=4 --intermediate_size=64 --seed=1"), 1,
             "ALREADY_EXISTS: block b0 already exists");
  EXPECT_RUN(Ctl("create bf --hidden_size=32 --num_attention_heads=4 --intermediate_size=64 --precision=bf16"), 1,
             "UNIMPLEMENTED: backend cpu computes in fp32 only");
  EXPECT_RUN(Ctl("create u0 --hidden_size=32 --num_attention_heads=4 --num_kv_heads=3 --intermediate_size=64"), 1,
             "INVALID_ARGUMENT: config.num_attention_heads = 4 is not a multiple of config.num_kv_heads = 3");
  EXPECT_RUN(Ctl("forward nope"), 1, "NOT_FOUND: block nope not found");
  EXPECT_RUN(Ctl("delete b0"), 0, "deleted b0");
  EXPECT_RUN(Ctl("get b0"), 1, "NOT_FOUND: block b0 not found");
  EXPECT_RUN(Ctl("save"), 1, "FAILED_PRECONDITION: checkpoints are disabled");
}

// info shows the KV capacity; sessions lists the caller's sessions (blockctl --client_id=chat and
// a client of that name are one identity: the same host and name); close-session frees them.
TEST_F(Blockctl, SessionsInfoAndCloseSession) {
  ASSERT_OK(client_->CreateBlock(CreateRequest("s0", TinyConfig(), 3, 4, 64)).status());
  auto chat = ConnectTo(*server_, {.client_id = "chat"});
  ASSERT_NE(chat, nullptr);
  v1::OpenSessionRequest open;
  open.set_session_id("chat-1");
  open.add_block_ids("s0");
  open.set_batch_size(2);
  open.set_max_length(64);
  ASSERT_OK(chat->OpenSession(open).status());
  Ran r = Ctl("info");
  EXPECT_RUN(r, 0, "1 inference sessions");
  EXPECT_NE(r.output.find(" reserved by sessions, "), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("max_sessions_per_client 64"), std::string::npos) << r.output;
  r = Ctl("--client_id=chat sessions");
  EXPECT_RUN(r, 0, "chat-1");
  EXPECT_NE(r.output.find("s0  batch 2  length 0/64"), std::string::npos) << r.output;
  EXPECT_RUN(Ctl("--client_id=chat sessions --json"), 0, "\"session_id\": \"chat-1\"");
  EXPECT_RUN(Ctl("--client_id=chat close-session chat-1"), 0, "closed chat-1");
  EXPECT_RUN(Ctl("--client_id=chat close-session chat-1"), 1, "NOT_FOUND: session chat-1 not found");
  EXPECT_RUN(Ctl("close-session"), 2, "close-session takes at least one SESSION_ID");
  EXPECT_RUN(Ctl("--client_id=chat sessions"), 0, "no inference sessions of yours");
}

TEST_F(Blockctl, DownloadThenLoadRoundTripsAndLayerSelection) {
  ASSERT_OK(client_->CreateBlock(CreateRequest("src", TinyConfig(), 8)).status());
  TrainStep(*client_, {"src"}, RandomTensor({1, 4, 32}, 1), 2);
  const std::string file = dir_ + "/src.safetensors";
  Ran r = Ctl(absl::StrCat("download src -o ", file));
  EXPECT_RUN(r, 0, "wrote 9 tensors");
  auto f = SafetensorsFile::Open(file);
  ASSERT_OK(f.status());
  EXPECT_EQ(f->tensors().size(), 9u);
  EXPECT_EQ(f->metadata().at("block_id"), "src");
  EXPECT_RUN(Ctl("download src --kind=gradients"), 0, "mlp.down_proj.weight");
  EXPECT_RUN(Ctl(absl::StrCat("download src --kind=adam_m --dtype=bf16 -o ", dir_, "/m.safetensors")), 0, "wrote");
  EXPECT_RUN(Ctl("download src --kind=moments"), 2, "expected weights, gradients, adam_m or adam_v");

  // A block without weights, loaded from the downloaded file, equals the source bitwise.
  ASSERT_OK(client_->CreateBlock(CreateRequest("dst", TinyConfig(), std::nullopt)).status());
  EXPECT_RUN(Ctl(absl::StrCat("load dst ", file, " --chunk_bytes=3000")), 0, "loaded 9 tensors");
  EXPECT_EQ(DiffSnapshots(Download(*client_, "src", v1::TENSOR_KIND_WEIGHTS),
                          Download(*client_, "dst", v1::TENSOR_KIND_WEIGHTS)),
            "");

  // One layer of a whole model, as bf16.
  const std::vector<TensorBytes> layer0 = RandomWeights(TinyConfig(), 30, v1::DTYPE_BFLOAT16);
  const std::vector<TensorBytes> layer1 = RandomWeights(TinyConfig(), 31, v1::DTYPE_BFLOAT16);
  const std::string model = dir_ + "/model.safetensors";
  std::vector<TensorBytes> both = layer0;
  for (TensorBytes& t : both) t.name = "model.layers.0." + t.name;
  for (TensorBytes t : layer1) {
    t.name = "model.layers.1." + t.name;
    both.push_back(t);
  }
  WriteWeights(model, both, "");
  EXPECT_RUN(Ctl(absl::StrCat("load dst ", model)), 2, "pick one layer with --layer=N");
  EXPECT_RUN(Ctl(absl::StrCat("load dst ", model, " --layer=1")), 0, "loaded 9 tensors");
  Snapshot got = Download(*client_, "dst", v1::TENSOR_KIND_WEIGHTS, v1::DTYPE_BFLOAT16);
  for (const TensorBytes& t : layer1) EXPECT_EQ(got.at(t.name), t.data) << t.name << " is not layer 1's";
  EXPECT_RUN(Ctl(absl::StrCat("load dst ", model, " --layer=7")), 1, "NOT_FOUND");

  // A sharded checkpoint: layer 0 in one shard, layer 1 in another, and the index json.
  WriteWeights(dir_ + "/shard-1.safetensors", layer0, "model.layers.0.");
  WriteWeights(dir_ + "/shard-2.safetensors", layer1, "model.layers.1.");
  std::vector<std::string> map;
  for (const TensorBytes& t : layer0) map.push_back(absl::StrCat("\"model.layers.0.", t.name, "\": \"shard-1.safetensors\""));
  for (const TensorBytes& t : layer1) map.push_back(absl::StrCat("\"model.layers.1.", t.name, "\": \"shard-2.safetensors\""));
  std::ofstream(dir_ + "/model.safetensors.index.json")
      << "{\"metadata\": {}, \"weight_map\": {" << absl::StrJoin(map, ", ") << "}}";
  EXPECT_RUN(Ctl(absl::StrCat("load dst ", dir_, "/model.safetensors.index.json --layer=0")), 0, "loaded 9 tensors");
  got = Download(*client_, "dst", v1::TENSOR_KIND_WEIGHTS, v1::DTYPE_BFLOAT16);
  for (const TensorBytes& t : layer0) EXPECT_EQ(got.at(t.name), t.data) << t.name << " is not layer 0's";

  // A tensor of the wrong shape: the server's message comes through.
  std::vector<TensorBytes> wrong = RandomWeights(TinyConfig(false, 64), 32);
  WriteWeights(dir_ + "/wrong.safetensors", wrong, "");
  EXPECT_RUN(Ctl(absl::StrCat("load dst ", dir_, "/wrong.safetensors")), 1,
             "INVALID_ARGUMENT: tensor input_layernorm.weight shape [64], block dst expects [32]");
}

// ---- import-hf -------------------------------------------------------------------------------

// A small Qwen3: head_dim 24 is set explicitly (not hidden / heads = 16), 2 kv heads, and a
// sliding_window that is off (use_sliding_window false), as real Qwen3 configs have.
nlohmann::json Qwen3Config() {
  return {{"architectures", {"Qwen3ForCausalLM"}}, {"model_type", "qwen3"}, {"hidden_size", 64},
          {"num_attention_heads", 4}, {"num_key_value_heads", 2}, {"head_dim", 24}, {"intermediate_size", 96},
          {"num_hidden_layers", 3}, {"rms_norm_eps", 1e-5}, {"rope_theta", 1000000.0}, {"vocab_size", 50},
          {"hidden_act", "silu"}, {"tie_word_embeddings", false}, {"torch_dtype", "bfloat16"},
          {"rope_scaling", nullptr}, {"attention_bias", false}, {"use_sliding_window", false},
          {"sliding_window", 4096}, {"max_position_embeddings", 4096}};
}

// The BlockConfig config.json implies (computed here, independently of blockctl).
v1::BlockConfig BlockConfigOf(const nlohmann::json& c) {
  v1::BlockConfig b;
  b.set_hidden_size(c["hidden_size"].get<int64_t>());
  b.set_num_attention_heads(c["num_attention_heads"].get<int64_t>());
  b.set_num_kv_heads(c["num_key_value_heads"].get<int64_t>());
  b.set_head_dim(c.contains("head_dim") ? c["head_dim"].get<int64_t>() : b.hidden_size() / b.num_attention_heads());
  b.set_intermediate_size(c["intermediate_size"].get<int64_t>());
  b.set_rms_norm_eps(c["rms_norm_eps"].get<double>());
  b.set_rope_theta(c.value("rope_theta", 10000.0));
  b.set_qk_norm(c["model_type"] == "qwen3");
  b.set_attention_bias(c["model_type"] == "qwen2");  // HF's Qwen2Attention always has q/k/v biases
  return b;
}

class BlockctlImportHf : public Blockctl {
 protected:
  // Writes a whole model in the Hugging Face layout under dir_/name: config.json, random bf16
  // weights for the embedding, every layer (model.layers.N.*, the block's names and shapes),
  // the final norm and the LM head, less the names in `drop`, then `extra`; split in order into
  // `shards` files (so layers straddle shards) with model.safetensors.index.json, or one
  // model.safetensors. Returns the directory; tensors_ holds every tensor written by full name.
  std::string WriteCheckpoint(const std::string& name, const nlohmann::json& config, int shards, uint64_t seed,
                              std::vector<TensorBytes> extra = {}, const std::set<std::string>& drop = {}) {
    const std::string dir = dir_ + "/" + name;
    std::filesystem::create_directories(dir);
    std::ofstream(dir + "/config.json") << config.dump(2);
    const v1::BlockConfig block = BlockConfigOf(config);
    const int64_t hidden = block.hidden_size(), vocab = config["vocab_size"].get<int64_t>();
    auto whole = [](const std::string& n, const v1::Tensor& t) {
      return TensorBytes{n, t.dtype(), wire::ShapeOf(t), t.data()};
    };
    std::vector<TensorBytes> all = {whole("model.embed_tokens.weight", RandomTensor({vocab, hidden}, seed, v1::DTYPE_BFLOAT16))};
    for (int64_t i = 0; i < config["num_hidden_layers"].get<int64_t>(); ++i) {
      for (TensorBytes t : RandomWeights(block, seed * 10 + static_cast<uint64_t>(i) + 1, v1::DTYPE_BFLOAT16)) {
        t.name = absl::StrCat("model.layers.", i, ".", t.name);
        all.push_back(std::move(t));
      }
    }
    all.push_back(whole("model.norm.weight", RandomTensor({hidden}, seed + 7, v1::DTYPE_BFLOAT16)));
    all.push_back(whole("lm_head.weight", RandomTensor({vocab, hidden}, seed + 8, v1::DTYPE_BFLOAT16)));
    all.erase(std::remove_if(all.begin(), all.end(), [&](const TensorBytes& t) { return drop.count(t.name) > 0; }),
              all.end());
    for (TensorBytes& t : extra) all.push_back(std::move(t));
    tensors_.clear();
    for (const TensorBytes& t : all) tensors_[t.name] = t;
    if (shards == 1) {
      WriteWeights(dir + "/model.safetensors", all, "");
      return dir;
    }
    nlohmann::ordered_json weight_map = nlohmann::ordered_json::object();
    const size_t per = (all.size() + static_cast<size_t>(shards) - 1) / static_cast<size_t>(shards);
    int64_t total = 0;
    for (int s = 0; s < shards; ++s) {
      const std::string file = absl::StrFormat("model-%05d-of-%05d.safetensors", s + 1, shards);
      std::vector<TensorBytes> part(all.begin() + static_cast<long>(std::min(all.size(), s * per)),
                                    all.begin() + static_cast<long>(std::min(all.size(), (s + 1) * per)));
      WriteWeights(dir + "/" + file, part, "");
      for (const TensorBytes& t : part) {
        weight_map[t.name] = file;
        total += static_cast<int64_t>(t.data.size());
      }
    }
    nlohmann::ordered_json index = {{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}};
    std::ofstream(dir + "/model.safetensors.index.json") << index.dump(2);
    return dir;
  }

  std::vector<std::string> BlockIds() {
    std::vector<std::string> ids;
    auto blocks = client_->ListBlocks();
    EXPECT_TRUE(blocks.ok()) << blocks.status();
    if (blocks.ok()) {
      for (const v1::BlockInfo& b : *blocks) ids.push_back(b.block_id());
    }
    std::sort(ids.begin(), ids.end());
    return ids;
  }

  // The block holds layer `layer` of the checkpoint last written: its config, and weights equal to
  // the checkpoint's bf16 values exactly (as fp32, and bit for bit as bf16).
  void ExpectBlockHoldsLayer(const std::string& id, const nlohmann::json& config, int64_t layer) {
    SCOPED_TRACE(id);
    auto info = client_->GetBlock(id);
    ASSERT_OK(info.status());
    EXPECT_EQ(info->layer_index(), layer);
    EXPECT_TRUE(info->weights_loaded());
    const v1::BlockConfig want = BlockConfigOf(config);
    const v1::BlockConfig& got = info->config();
    EXPECT_EQ(got.hidden_size(), want.hidden_size());
    EXPECT_EQ(got.num_attention_heads(), want.num_attention_heads());
    EXPECT_EQ(got.num_kv_heads(), want.num_kv_heads());
    EXPECT_EQ(got.head_dim(), want.head_dim());
    EXPECT_EQ(got.intermediate_size(), want.intermediate_size());
    EXPECT_EQ(got.rms_norm_eps(), want.rms_norm_eps());
    EXPECT_EQ(got.rope_theta(), want.rope_theta());
    EXPECT_EQ(got.qk_norm(), want.qk_norm());
    EXPECT_EQ(info->parameter_count(), ExpectedParameterCount(want));

    const Snapshot fp32 = Download(*client_, id, v1::TENSOR_KIND_WEIGHTS);
    const Snapshot bf16 = Download(*client_, id, v1::TENSOR_KIND_WEIGHTS, v1::DTYPE_BFLOAT16);
    std::set<std::string> names;
    for (const ParamShape& p : ExpectedParams(want)) {
      names.insert(p.name);
      const TensorBytes& stored = tensors_.at(absl::StrCat("model.layers.", layer, ".", p.name));
      ASSERT_EQ(stored.dtype, v1::DTYPE_BFLOAT16);
      auto expected = wire::DecodeToFloat32(v1::DTYPE_BFLOAT16, stored.data);
      ASSERT_OK(expected.status());
      ASSERT_EQ(fp32.count(p.name), 1u) << p.name << " not downloaded";
      EXPECT_EQ(Floats(fp32.at(p.name)), *expected) << p.name << " (fp32) is not the checkpoint's bf16 values";
      EXPECT_EQ(bf16.at(p.name), stored.data) << p.name << " (bf16) is not the checkpoint's bits";
    }
    std::set<std::string> downloaded;
    for (const auto& [name, bytes] : fp32) downloaded.insert(name);
    EXPECT_EQ(downloaded, names);
  }

  std::map<std::string, TensorBytes> tensors_;
};

TEST_F(BlockctlImportHf, ShardedBf16Qwen3CheckpointOneBlockPerLayer) {
  const nlohmann::json config = Qwen3Config();
  const std::string dir = WriteCheckpoint("Qwen3-tiny", config, 4, 11);
  // The layers straddle the shards: layer 1's tensors are in more than one file.
  std::set<std::string> layer1_shards;
  {
    std::ifstream in(dir + "/model.safetensors.index.json");
    nlohmann::json index;
    in >> index;
    for (const auto& [name, file] : index["weight_map"].items()) {
      if (absl::StartsWith(name, "model.layers.1.")) layer1_shards.insert(file.get<std::string>());
    }
  }
  ASSERT_GT(layer1_shards.size(), 1u);

  Ran r = Ctl(absl::StrCat("import-hf ", dir, " --prefix=q3/layer --max-seq-len=64"));
  EXPECT_RUN(r, 0, "q3/layer0\nq3/layer1\nq3/layer2\n");
  EXPECT_NE(r.output.find("imported 3 layers"), std::string::npos) << r.output;
  EXPECT_EQ(r.output.find('\r'), std::string::npos) << "no progress bar when stderr is not a terminal:\n" << r.output;
  EXPECT_EQ(BlockIds(), (std::vector<std::string>{"q3/layer0", "q3/layer1", "q3/layer2"}));
  for (int64_t i = 0; i < 3; ++i) ExpectBlockHoldsLayer(absl::StrCat("q3/layer", i), config, i);
  auto info = client_->GetBlock("q3/layer2");
  ASSERT_OK(info.status());
  EXPECT_EQ(info->max_seq_len(), 64) << "--max-seq-len (Python's spelling of --max_seq_len)";
  // The imported span runs.
  ASSERT_OK(client_->Forward({"q3/layer0", "q3/layer1", "q3/layer2"}, RandomTensor({1, 5, 64}, 3), false).status());

  // Default ids "<dir name>/layer<N>", a layer range.
  r = Ctl(absl::StrCat("import-hf ", dir, "/ --layers=1:3"));
  EXPECT_RUN(r, 0, "Qwen3-tiny/layer1\nQwen3-tiny/layer2\n");
  EXPECT_EQ(r.output.find("Qwen3-tiny/layer0"), std::string::npos) << r.output;
  ExpectBlockHoldsLayer("Qwen3-tiny/layer1", config, 1);
  ExpectBlockHoldsLayer("Qwen3-tiny/layer2", config, 2);

  // Again: the ids are taken; nothing changes, and the message points at --replace.
  EXPECT_RUN(Ctl(absl::StrCat("import-hf ", dir, " --layers=1:3")), 1,
             "ALREADY_EXISTS: block Qwen3-tiny/layer1 already exists (import with --replace to overwrite it)");
  EXPECT_EQ(BlockIds().size(), 5u);
  // --replace, and a progress bar forced on.
  r = Ctl(absl::StrCat("import-hf ", dir, " --layers=1:3 --replace --progress"));
  EXPECT_RUN(r, 0, "100%");
  EXPECT_NE(r.output.find("import Qwen3-tiny"), std::string::npos) << r.output;
  EXPECT_EQ(BlockIds().size(), 5u);
  ExpectBlockHoldsLayer("Qwen3-tiny/layer2", config, 2);

  // A comma list.
  EXPECT_RUN(Ctl(absl::StrCat("import-hf ", dir, " --layers=2,0 --prefix=pick-")), 0, "pick-2\npick-0\n");
  ExpectBlockHoldsLayer("pick-0", config, 0);
  ExpectBlockHoldsLayer("pick-2", config, 2);
  EXPECT_EQ(BlockIds().size(), 7u);

  // Bad selections create nothing.
  EXPECT_RUN(Ctl(absl::StrCat("import-hf ", dir, " --layers=2:5 --prefix=x")), 1,
             "OUT_OF_RANGE: layer 3: the checkpoint has layers 0..2");
  EXPECT_RUN(Ctl(absl::StrCat("import-hf ", dir, " --layers=a:b --prefix=x")), 2, "--layers=a:b: expected A:B");
  EXPECT_RUN(Ctl(absl::StrCat("import-hf ", dir, " --layers=1,1 --prefix=x")), 2, "names layer 1 twice");
  EXPECT_EQ(BlockIds().size(), 7u);

  // `load` takes the directory too (one layer of it).
  ASSERT_OK(client_->CreateBlock(CreateRequest("one", BlockConfigOf(config), std::nullopt)).status());
  EXPECT_RUN(Ctl(absl::StrCat("load one ", dir, " --layer=1")), 0, "loaded 11 tensors");
  EXPECT_RUN(Ctl(absl::StrCat("load one ", dir)), 2, "pick one layer with --layer=N");
  EXPECT_EQ(DiffSnapshots(Download(*client_, "one", v1::TENSOR_KIND_WEIGHTS),
                          Download(*client_, "q3/layer1", v1::TENSOR_KIND_WEIGHTS)),
            "");
}

TEST_F(BlockctlImportHf, RefusalsCreateNothing) {
  struct Case {
    std::string name;
    nlohmann::json config;
    std::vector<TensorBytes> extra;
    std::set<std::string> drop;
    std::string message;
  };
  nlohmann::json qwen2 = Qwen3Config();
  qwen2["model_type"] = "qwen2";
  qwen2.erase("head_dim");
  qwen2.erase("attention_bias");  // Qwen2 configs do not say; HF's Qwen2 always has q/k/v biases
  // A bias on a model that has none (Qwen3 here) is a tensor no block holds.
  const int64_t q_dim = 4 * 24;
  const std::vector<float> zeros(static_cast<size_t>(q_dim), 0.f);
  const TensorBytes bias{"model.layers.2.self_attn.q_proj.bias", v1::DTYPE_BFLOAT16, {q_dim},
                         wire::EncodeFloat32(zeros.data(), zeros.size(), v1::DTYPE_BFLOAT16)};
  nlohmann::json scaled = Qwen3Config();
  scaled["rope_scaling"] = {{"rope_type", "llama3"}, {"factor", 8.0}};
  nlohmann::json dynamic = Qwen3Config();  // transformers 5 spells rope_scaling rope_parameters
  dynamic.erase("rope_theta");
  dynamic["rope_parameters"] = {{"rope_type", "dynamic"}, {"rope_theta", 1000000.0}, {"factor", 4.0}};
  nlohmann::json gelu = Qwen3Config();
  gelu["hidden_act"] = "gelu";
  nlohmann::json moe = Qwen3Config();
  moe["model_type"] = "qwen3_moe";
  nlohmann::json biased = Qwen3Config();
  biased["attention_bias"] = true;
  nlohmann::json sliding = Qwen3Config();
  sliding["use_sliding_window"] = true;
  const std::vector<Case> cases = {
      {"qwen3-bias", Qwen3Config(), {bias}, {},
       "INVALID_ARGUMENT: layer 2 has tensors a blockd block cannot hold: self_attn.q_proj.bias\n"},
      {"qwen2-without-biases", qwen2, {}, {"model.layers.1.self_attn.k_proj.bias"},
       "INVALID_ARGUMENT: layer 1 lacks model.layers.1.self_attn.k_proj.bias"},
      {"rope-scaling", scaled, {}, {}, "INVALID_ARGUMENT: rope_scaling has no low_freq_factor"},
      {"gelu", gelu, {}, {}, "INVALID_ARGUMENT: hidden_act \"gelu\": blockd blocks compute a SiLU-gated MLP"},
      {"moe", moe, {}, {}, "INVALID_ARGUMENT: model_type \"qwen3_moe\": blockd blocks are llama, qwen2 or qwen3"},
      {"rope-parameters", dynamic, {}, {},
       "INVALID_ARGUMENT: rope_parameters {\"factor\":4.0,\"rope_theta\":1000000.0,\"rope_type\":\"dynamic\"}: "
       "blockd blocks compute default, linear, llama3 or yarn RoPE"},
      {"attention-bias", biased, {}, {}, "INVALID_ARGUMENT: attention_bias is true"},
      {"sliding", sliding, {}, {}, "INVALID_ARGUMENT: use_sliding_window is true"},
      {"missing", Qwen3Config(), {}, {"model.layers.2.mlp.up_proj.weight"},
       "INVALID_ARGUMENT: layer 2 lacks model.layers.2.mlp.up_proj.weight"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    const std::string dir = WriteCheckpoint(c.name, c.config, 2, 21, c.extra, c.drop);
    EXPECT_RUN(Ctl(absl::StrCat("import-hf ", dir)), 1, c.message);
    EXPECT_EQ(BlockIds(), std::vector<std::string>{});
  }

  // A Qwen2 checkpoint with its q/k/v biases imports (no qk_norm, head_dim = hidden / heads), and
  // a Llama 3.2-style one with llama3 RoPE scaling.
  const std::string qwen2_dir = WriteCheckpoint("qwen2", qwen2, 2, 22);
  EXPECT_RUN(Ctl(absl::StrCat("import-hf ", qwen2_dir)), 0, "qwen2/layer2\n");
  ExpectBlockHoldsLayer("qwen2/layer0", qwen2, 0);
  auto qwen2_info = client_->GetBlock("qwen2/layer1");
  ASSERT_OK(qwen2_info.status());
  EXPECT_TRUE(qwen2_info->config().attention_bias());
  for (int i = 0; i < 3; ++i) ASSERT_OK(client_->DeleteBlock(absl::StrCat("qwen2/layer", i)).status());
  nlohmann::json llama32 = Qwen3Config();
  llama32["model_type"] = "llama";
  llama32["rope_scaling"] = {{"rope_type", "llama3"}, {"factor", 32.0}, {"low_freq_factor", 1.0},
                             {"high_freq_factor", 4.0}, {"original_max_position_embeddings", 8192}};
  const std::string llama_dir = WriteCheckpoint("llama32", llama32, 1, 26);
  EXPECT_RUN(Ctl(absl::StrCat("import-hf ", llama_dir)), 0, "llama32/layer2\n");
  ExpectBlockHoldsLayer("llama32/layer1", llama32, 1);
  auto llama_info = client_->GetBlock("llama32/layer1");
  ASSERT_OK(llama_info.status());
  EXPECT_EQ(llama_info->config().rope_scaling().rope_type(), "llama3");
  EXPECT_EQ(llama_info->config().rope_scaling().factor(), 32.0);
  EXPECT_EQ(llama_info->config().rope_scaling().original_max_position_embeddings(), 8192);
  for (int i = 0; i < 3; ++i) ASSERT_OK(client_->DeleteBlock(absl::StrCat("llama32/layer", i)).status());

  // A tensor whose shape disagrees with config.json.
  nlohmann::json wide = Qwen3Config();
  const std::vector<float> ones(100, 1.f);
  const std::string bad_shape = WriteCheckpoint(
      "bad-shape", wide, 1, 23,
      {TensorBytes{"model.layers.1.self_attn.k_norm.weight", v1::DTYPE_BFLOAT16, {100},
                   wire::EncodeFloat32(ones.data(), ones.size(), v1::DTYPE_BFLOAT16)}},
      {"model.layers.1.self_attn.k_norm.weight"});
  EXPECT_RUN(Ctl(absl::StrCat("import-hf ", bad_shape)), 1,
             "model.layers.1.self_attn.k_norm.weight has shape [100], config.json implies [24]");

  // An index naming a shard that is not there; a directory without config.json.
  const std::string broken = WriteCheckpoint("broken-index", Qwen3Config(), 2, 24);
  std::filesystem::remove(broken + "/model-00002-of-00002.safetensors");
  EXPECT_RUN(Ctl(absl::StrCat("import-hf ", broken)), 1, "model-00002-of-00002.safetensors\", which is not a file here");
  std::filesystem::remove(broken + "/config.json");
  EXPECT_RUN(Ctl(absl::StrCat("import-hf ", broken)), 1, "no config.json");
  EXPECT_EQ(BlockIds(), std::vector<std::string>{});

  // A refusal by the server midway (layer 2's id is taken by another block): the blocks the
  // import created for layers 0 and 1 are deleted again, and the other block is untouched.
  const std::string dir = WriteCheckpoint("Qwen3-mid", Qwen3Config(), 3, 25);
  ASSERT_OK(client_->CreateBlock(CreateRequest("mid/layer2", TinyConfig(), 5)).status());
  const Snapshot before = Download(*client_, "mid/layer2", v1::TENSOR_KIND_WEIGHTS);
  EXPECT_RUN(Ctl(absl::StrCat("import-hf ", dir, " --prefix=mid/layer")), 1,
             "ALREADY_EXISTS: block mid/layer2 already exists (import with --replace to overwrite it)");
  EXPECT_EQ(BlockIds(), std::vector<std::string>{"mid/layer2"});
  auto info = client_->GetBlock("mid/layer2");
  ASSERT_OK(info.status());
  EXPECT_EQ(info->config().hidden_size(), 32);
  EXPECT_EQ(DiffSnapshots(before, Download(*client_, "mid/layer2", v1::TENSOR_KIND_WEIGHTS)), "");
}

class BlockctlWithMetrics : public Blockctl {
 protected:
  bool WithMetrics() const override { return true; }
};

TEST_F(BlockctlWithMetrics, ForwardFromAFileAndMetrics) {
  ASSERT_OK(client_->CreateBlock(CreateRequest("f0", TinyConfig(), 8)).status());
  const v1::Tensor x = RandomTensor({1, 6, 32}, 77);
  const std::string in = dir_ + "/x.safetensors";
  WriteWeights(in, {{"hidden", v1::DTYPE_FLOAT32, {1, 6, 32}, x.data()}}, "");
  const std::string out = dir_ + "/y.safetensors";
  EXPECT_RUN(Ctl(absl::StrCat("forward f0 --input=", in, " --output=", out)), 0, "output      [1,6,32] float32");
  auto expected = client_->Forward({"f0"}, x, false);
  ASSERT_OK(expected.status());
  auto y = SafetensorsFile::Open(out);
  ASSERT_OK(y.status());
  const SafetensorsEntry* e = y->Find("output");
  ASSERT_NE(e, nullptr);
  EXPECT_EQ(std::string(y->data(*e)), expected->output().data()) << "blockctl forward --output differs from Forward";

  Ran r = Ctl("metrics --filter=blockd_requests_total");
  EXPECT_RUN(r, 0, "blockd_requests_total{");
  EXPECT_NE(r.output.find("method=\"Forward\""), std::string::npos) << r.output;
  EXPECT_RUN(RunBlockctl("--metrics=127.0.0.1:1 --timeout=3s metrics"), 1, "UNAVAILABLE: cannot connect");
}

TEST(BlockctlAuth, TokenFileAndTlsFlagsReachTheClient) {
  const std::string dir = MakeTempDir("blockctl-auth");
  const std::string token = "blockctl-admin-token-0123456789";
  std::ofstream(dir + "/admin") << token << "\n";
  std::ofstream(dir + "/mine") << "# my token\n\n  " << token << "  \n";
  ServerOptions o = LoopbackOptions();
  o.auth_token_file = dir + "/admin";
  o.admin_token_file = dir + "/admin";
  auto server = StartServer(o);
  ASSERT_NE(server, nullptr);
  const std::string target = absl::StrCat("--target=", TargetOf(*server), " ");
  EXPECT_RUN(RunBlockctl(target + "list"), 1, "UNAUTHENTICATED: missing bearer token");
  EXPECT_RUN(RunBlockctl(target + "--token=wrong-token-0123456789 list"), 1, "UNAUTHENTICATED: unknown bearer token");
  EXPECT_RUN(RunBlockctl(target + "--token_file=" + dir + "/mine create t0 --hidden_size=32 --num_attention_heads=4 "
                                  "--intermediate_size=64 --seed=1"),
             0, "block       t0");
  EXPECT_RUN(RunBlockctl(target + "--token_file=" + dir + "/missing list"), 1, "NOT_FOUND: cannot read --token_file");
  EXPECT_RUN(RunBlockctl(target + "--tls_ca=" + dir + "/missing.pem list"), 1, "NOT_FOUND: cannot read TLS CA file");
  // A TLS client against this plaintext server cannot connect.
  EXPECT_RUN(RunBlockctl(target + "--tls --timeout=5s list"), 1, "UNAVAILABLE");
}

}  // namespace
}  // namespace blockd::testing
