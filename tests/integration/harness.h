// Integration-test support: a real blockd (Server::Start on the CPU backend) on loopback ports,
// blockd::Client connections to it, tiny block configs, fresh random tensors, byte snapshots of a
// block's state, and a status matcher that names the code and message that came.
//
//   auto server = StartServer(LoopbackOptions());
//   auto client = ConnectTo(*server);
//   ASSERT_OK(client->CreateBlock(CreateRequest("b0", TinyConfig(), /*seed=*/7)).status());
//   EXPECT_STATUS(client->GetBlock("nope").status(), absl::StatusCode::kNotFound, "block nope not found");
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "absl/status/status.h"
#include "client/client.h"
#include "server/server.h"

namespace blockd::testing {

// 127.0.0.1:0 for gRPC, a short housekeeping period, a few workers, a 1 GiB budget. The metrics
// endpoint (127.0.0.1:0) only when asked: stopping its HTTP server takes up to 2 s (civetweb polls
// its listener with a 2 s timeout), which would dominate the suite's time.
ServerOptions LoopbackOptions(bool with_metrics = false);
// Starts the server or fails the test (ASSERT in the caller with `ASSERT_NE(server, nullptr)`).
std::unique_ptr<Server> StartServer(ServerOptions options);
std::string TargetOf(const Server& server);  // "127.0.0.1:PORT"
// A client for `server`; `base` supplies everything but the target.
std::unique_ptr<Client> ConnectTo(const Server& server, ClientOptions base = {});

// hidden 32, 4 heads of 8, 2 kv heads, intermediate 64 (and qk_norm when asked).
v1::BlockConfig TinyConfig(bool qk_norm = false, int64_t hidden = 32);
v1::CreateBlockRequest CreateRequest(const std::string& id, const v1::BlockConfig& config,
                                     std::optional<uint64_t> seed, int64_t max_batch_size = 0,
                                     int64_t max_seq_len = 0);

// The HF names and shapes of a block's parameters, in the server's order (computed here from the
// config, independently of the engine).
struct ParamShape {
  std::string name;
  std::vector<int64_t> shape;
};
std::vector<ParamShape> ExpectedParams(const v1::BlockConfig& c);
int64_t ExpectedParameterCount(const v1::BlockConfig& c);

std::vector<float> RandomNormal(size_t n, uint64_t seed, float scale = 1.f);
v1::Tensor RandomTensor(std::vector<int64_t> shape, uint64_t seed, v1::DType dtype = v1::DTYPE_FLOAT32);
// Whole random tensors for every parameter of `c` (norm weights near 1), in `dtype`.
std::vector<TensorBytes> RandomWeights(const v1::BlockConfig& c, uint64_t seed, v1::DType dtype = v1::DTYPE_FLOAT32);
// The chunk of `t` for `block` covering bytes [offset, offset + size), as LoadWeights streams it.
v1::TensorChunk Chunk(const std::string& block, const TensorBytes& t, int64_t offset, int64_t size);

// name -> bytes of every tensor of `kind` (float32), or fails the test.
using Snapshot = std::map<std::string, std::string>;
Snapshot Download(Client& client, const std::string& block_id, v1::TensorKind kind,
                  v1::DType dtype = v1::DTYPE_FLOAT32);
// Weights, gradients, adam_m and adam_v, plus the BlockInfo's step and has_gradients.
struct BlockState {
  Snapshot weights, gradients, adam_m, adam_v;
  int64_t step = -1;
  bool has_gradients = false;
};
BlockState StateOf(Client& client, const std::string& block_id);
// Empty when equal; else which tensor (or field) differs and where.
std::string DiffSnapshots(const Snapshot& before, const Snapshot& after);
std::string DiffStates(const BlockState& before, const BlockState& after);

// Checks a status's code and that its message contains every one of `parts`.
::testing::AssertionResult StatusIs(const absl::Status& s, absl::StatusCode code,
                                    const std::vector<std::string>& parts);

// One Forward(keep_activations) + Backward with random grad_output on `ids`; returns grad_input.
v1::Tensor TrainStep(Client& client, const std::vector<std::string>& ids, const v1::Tensor& input,
                     uint64_t grad_seed);

std::vector<float> Floats(const std::string& bytes);                   // float32 bytes -> floats
std::vector<float> Floats(const v1::Tensor& t);                        // any dtype -> floats (or fails)
std::string MakeTempDir(const std::string& tag);                       // under $TMPDIR, removed by nobody
std::string HttpGetBody(int port, const std::string& path);            // GET on 127.0.0.1, "" on failure
// In a Prometheus text body, the value of the first sample of `family` whose labels contain every
// one of `labels` (a family without labels: pass none); -1 when there is none.
double MetricValue(const std::string& body, const std::string& family, const std::vector<std::string>& labels);

}  // namespace blockd::testing

// ASSERT_OK(status) << "more context";
#define ASSERT_OK(expr)                                                 \
  switch (0)                                                            \
  case 0:                                                               \
  default:                                                              \
    if (const ::absl::Status blockd_s_ = (expr); blockd_s_.ok()) {      \
    } else                                                              \
      FAIL() << #expr << " failed: " << blockd_s_.ToString() << " "

#define EXPECT_STATUS(status, code, ...) \
  EXPECT_TRUE(::blockd::testing::StatusIs((status), (code), {__VA_ARGS__}))
