// blockctl against a real server: each subcommand's output and exit status (0 ok, 1 refused with
// the server's code and message, 2 usage), and safetensors in and out (one layer of a whole
// model, a sharded checkpoint with its index json).
#include <sys/wait.h>

#include <cstdio>
#include <fstream>

#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/safetensors.h"
#include "tests/integration/harness.h"

#ifndef BLOCKCTL_PATH
#error "BLOCKCTL_PATH must name the blockctl executable"
#endif

namespace blockd::testing {
namespace {

struct Ran {
  int exit_code = -1;
  std::string output;  // stdout and stderr together
};

Ran RunBlockctl(const std::string& args) {
  Ran r;
  const std::string cmd = absl::StrCat(BLOCKCTL_PATH, " ", args, " 2>&1");
  FILE* p = popen(cmd.c_str(), "r");
  if (p == nullptr) {
    ADD_FAILURE() << "popen(" << cmd << ") failed";
    return r;
  }
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) r.output.append(buf, n);
  const int status = pclose(p);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

#define EXPECT_RUN(ran, code, text)                                                                   \
  do {                                                                                                \
    const Ran& r_ = (ran);                                                                            \
    EXPECT_EQ(r_.exit_code, code) << r_.output;                                                       \
    EXPECT_NE(r_.output.find(text), std::string::npos) << "output lacks \"" << (text) << "\":\n" << r_.output; \
  } while (0)

class Blockctl : public ::testing::Test {
 protected:
  void SetUp() override {
    server_ = StartServer(LoopbackOptions(WithMetrics()));
    ASSERT_NE(server_, nullptr);
    client_ = ConnectTo(*server_);
    ASSERT_NE(client_, nullptr);
    dir_ = MakeTempDir("blockctl");
  }
  virtual bool WithMetrics() const { return false; }
  // blockctl with --target (and --metrics) of this server.
  Ran Ctl(const std::string& args) {
    return RunBlockctl(absl::StrCat("--target=", TargetOf(*server_), " --metrics=127.0.0.1:", server_->metrics_port(),
                                    " ", args));
  }
  // `prefix + name` for every parameter of TinyConfig(), random values.
  void WriteWeights(const std::string& path, const std::vector<TensorBytes>& tensors, const std::string& prefix) {
    std::vector<SafetensorsTensorRef> refs;
    for (const TensorBytes& t : tensors) {
      refs.push_back({prefix + t.name, t.dtype == v1::DTYPE_BFLOAT16 ? DType::kBFloat16 : DType::kFloat32, t.shape,
                      absl::string_view(t.data)});
    }
    ASSERT_OK(WriteSafetensorsFile(path, refs, {}));
  }

  std::unique_ptr<Server> server_;
  std::unique_ptr<Client> client_;
  std::string dir_;
};

TEST(BlockctlUsage, HelpAndUsageErrors) {
  Ran r = RunBlockctl("--help");
  EXPECT_RUN(r, 0, "commands:");
  for (const char* cmd : {"info", "health", "create", "load", "list", "get", "delete", "forward", "download", "metrics"}) {
    EXPECT_NE(r.output.find(absl::StrCat("  ", cmd, " ")), std::string::npos) << cmd << " missing from --help";
  }
  EXPECT_RUN(RunBlockctl("create --help"), 0, "--hidden_size=N");
  EXPECT_RUN(RunBlockctl("load --help"), 0, "--layer=N");
  EXPECT_RUN(RunBlockctl("download --help"), 0, "--kind=STR");
  EXPECT_RUN(RunBlockctl("help forward"), 0, "--backward");
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
