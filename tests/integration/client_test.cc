// blockd::Client against a scripted BlockService on loopback: what the client itself must get
// right whatever the server does. DownloadTensors reassembly (out-of-order and interleaved chunks,
// and DATA_LOSS for holes, overlaps, disagreeing chunks, bytes outside a tensor, missing names),
// LoadWeights chunking, metadata (token, client id), per-call deadlines, status pass-through, and
// the client's own dtype conversions checked against the engine's independent ones.
#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <random>

#include <grpcpp/server.h>
#include <grpcpp/server_builder.h>

#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "base/dtype.h"
#include "tests/integration/harness.h"

namespace blockd::testing {
namespace {

using absl::StatusCode;

v1::TensorChunk MakeChunk(const std::string& name, v1::DType dtype, std::vector<int64_t> shape, int64_t offset,
                          std::string data, const std::string& block = "blk") {
  v1::TensorChunk c;
  c.set_block_id(block);
  c.set_name(name);
  c.set_dtype(dtype);
  for (int64_t d : shape) c.add_shape(d);
  c.set_offset(offset);
  c.set_data(std::move(data));
  return c;
}

std::string Bytes(size_t n, char seed) {
  std::string s(n, '\0');
  for (size_t i = 0; i < n; ++i) s[i] = static_cast<char>(seed + 7 * i);
  return s;
}

// A BlockService whose DownloadTensors sends the chunks a test scripted, and whose LoadWeights
// and GetServerInfo record what came.
class ScriptedService final : public v1::BlockService::Service {
 public:
  grpc::Status DownloadTensors(grpc::ServerContext*, const v1::DownloadTensorsRequest*,
                               grpc::ServerWriter<v1::TensorChunk>* writer) override {
    absl::MutexLock l(&mu);
    for (const v1::TensorChunk& c : script) writer->Write(c);
    return grpc::Status::OK;
  }
  grpc::Status LoadWeights(grpc::ServerContext* ctx, grpc::ServerReader<v1::TensorChunk>* reader,
                           v1::LoadWeightsResponse* resp) override {
    absl::MutexLock l(&mu);
    received.clear();
    v1::TensorChunk c;
    while (reader->Read(&c)) received.push_back(c);
    resp->set_block_id(received.empty() ? "" : received[0].block_id());
    Record(ctx);
    return grpc::Status::OK;
  }
  grpc::Status GetServerInfo(grpc::ServerContext* ctx, const v1::GetServerInfoRequest*,
                             v1::GetServerInfoResponse* resp) override {
    absl::Duration sleep;
    {
      absl::MutexLock l(&mu);
      Record(ctx);
      sleep = info_delay;
    }
    absl::SleepFor(sleep);
    resp->set_version("scripted");
    return grpc::Status::OK;
  }
  // Echoes the input's bytes reversed, once `hold` calls are in at the same time (or 10 s passed),
  // and records which connection (peer address and port) each came on.
  grpc::Status Forward(grpc::ServerContext* ctx, const v1::ForwardRequest* req, v1::ForwardResponse* resp) override {
    absl::MutexLock l(&mu);
    peers.push_back(ctx->peer());
    ++arrived;
    auto all_in = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) { return arrived >= hold; };
    mu.AwaitWithTimeout(absl::Condition(&all_in), absl::Seconds(10));
    *resp->mutable_output() = req->input();
    std::reverse(resp->mutable_output()->mutable_data()->begin(), resp->mutable_output()->mutable_data()->end());
    resp->set_activation_id("echo");
    return grpc::Status::OK;
  }
  grpc::Status GetBlock(grpc::ServerContext*, const v1::GetBlockRequest* req, v1::BlockInfo*) override {
    return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, "scripted: block " + req->block_id() + " is shy");
  }

  void Record(grpc::ServerContext* ctx) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    auto find = [&](const char* key) {
      auto it = ctx->client_metadata().find(key);
      return it == ctx->client_metadata().end() ? std::string("<none>") : std::string(it->second.data(), it->second.size());
    };
    authorization = find("authorization");
    client_id = find("blockd-client");
  }

  absl::Mutex mu;
  std::vector<v1::TensorChunk> script ABSL_GUARDED_BY(mu);
  std::vector<v1::TensorChunk> received ABSL_GUARDED_BY(mu);
  std::string authorization ABSL_GUARDED_BY(mu), client_id ABSL_GUARDED_BY(mu);
  absl::Duration info_delay ABSL_GUARDED_BY(mu) = absl::ZeroDuration();
  std::vector<std::string> peers ABSL_GUARDED_BY(mu);
  int arrived ABSL_GUARDED_BY(mu) = 0;
  int hold ABSL_GUARDED_BY(mu) = 0;
};

class ClientAgainstScript : public ::testing::Test {
 protected:
  void SetUp() override {
    grpc::ServerBuilder b;
    b.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port_);
    b.RegisterService(&service_);
    server_ = b.BuildAndStart();
    ASSERT_NE(server_, nullptr);
    ASSERT_GT(port_, 0);
  }
  void TearDown() override { server_->Shutdown(std::chrono::system_clock::now()); }
  std::unique_ptr<Client> Connect(ClientOptions o = {}) {
    o.target = absl::StrCat("127.0.0.1:", port_);
    auto c = Client::Connect(o);
    EXPECT_TRUE(c.ok()) << c.status().ToString();
    return c.ok() ? *std::move(c) : nullptr;
  }
  void Script(std::vector<v1::TensorChunk> chunks) {
    absl::MutexLock l(&service_.mu);
    service_.script = std::move(chunks);
  }
  absl::StatusOr<std::vector<TensorBytes>> Download(std::vector<std::string> names = {}) {
    v1::DownloadTensorsRequest r;
    r.set_block_id("blk");
    r.set_kind(v1::TENSOR_KIND_WEIGHTS);
    for (const std::string& n : names) r.add_names(n);
    return Connect()->DownloadTensors(r);
  }

  ScriptedService service_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
};

TEST_F(ClientAgainstScript, DownloadReassemblesOutOfOrderInterleavedChunks) {
  const std::string a = Bytes(24, 1), b = Bytes(8, 50);  // a: [2,3] float32, b: [4] bfloat16
  Script({MakeChunk("a", v1::DTYPE_FLOAT32, {2, 3}, 16, a.substr(16)),
          MakeChunk("b", v1::DTYPE_BFLOAT16, {4}, 3, b.substr(3)),
          MakeChunk("a", v1::DTYPE_FLOAT32, {2, 3}, 0, a.substr(0, 5)),
          MakeChunk("a", v1::DTYPE_FLOAT32, {2, 3}, 5, a.substr(5, 11)),
          MakeChunk("b", v1::DTYPE_BFLOAT16, {4}, 0, b.substr(0, 3))});
  auto got = Download({"b", "a"});
  ASSERT_OK(got.status());
  ASSERT_EQ(got->size(), 2u);
  EXPECT_EQ((*got)[0].name, "a");  // in the order the server first sent them
  EXPECT_EQ((*got)[0].shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ((*got)[0].dtype, v1::DTYPE_FLOAT32);
  EXPECT_EQ((*got)[0].data, a);
  EXPECT_EQ((*got)[1].name, "b");
  EXPECT_EQ((*got)[1].dtype, v1::DTYPE_BFLOAT16);
  EXPECT_EQ((*got)[1].data, b);
}

TEST_F(ClientAgainstScript, DownloadRefusesBrokenStreamsWithDataLoss) {
  const std::string a = Bytes(24, 1);
  Script({MakeChunk("a", v1::DTYPE_FLOAT32, {2, 3}, 0, a.substr(0, 8)),
          MakeChunk("a", v1::DTYPE_FLOAT32, {2, 3}, 12, a.substr(12))});
  EXPECT_STATUS(Download().status(), StatusCode::kDataLoss, "tensor a is incomplete: 20 of 24 bytes arrived");
  Script({MakeChunk("a", v1::DTYPE_FLOAT32, {2, 3}, 0, a.substr(0, 16)),
          MakeChunk("a", v1::DTYPE_FLOAT32, {2, 3}, 12, a.substr(12))});
  EXPECT_STATUS(Download().status(), StatusCode::kDataLoss, "tensor a chunk [12, 24) overlaps an earlier chunk");
  Script({MakeChunk("a", v1::DTYPE_FLOAT32, {2, 3}, 20, a.substr(16))});
  EXPECT_STATUS(Download().status(), StatusCode::kDataLoss, "chunk covers bytes [20, 28), outside its 24 bytes");
  Script({MakeChunk("a", v1::DTYPE_FLOAT32, {2, 3}, 0, a.substr(0, 12)),
          MakeChunk("a", v1::DTYPE_FLOAT32, {3, 2}, 12, a.substr(12))});
  EXPECT_STATUS(Download().status(), StatusCode::kDataLoss, "tensor a chunk says float32 [3,2], its first chunk said float32 [2,3]");
  Script({MakeChunk("a", v1::DTYPE_FLOAT32, {2, 3}, 0, a.substr(0, 12)),
          MakeChunk("a", v1::DTYPE_BFLOAT16, {2, 3}, 12, a.substr(12))});
  EXPECT_STATUS(Download().status(), StatusCode::kDataLoss, "chunk says bfloat16 [2,3]");
  Script({MakeChunk("a", v1::DTYPE_UNSPECIFIED, {2, 3}, 0, a)});
  EXPECT_STATUS(Download().status(), StatusCode::kDataLoss, "tensor a has dtype DTYPE_UNSPECIFIED");
  Script({MakeChunk("a", v1::DTYPE_FLOAT32, {2, 3}, 0, a, "other")});
  EXPECT_STATUS(Download().status(), StatusCode::kDataLoss, "a chunk of block \"other\" in the download of block blk");
  Script({MakeChunk("a", v1::DTYPE_FLOAT32, {2, 3}, 0, a)});
  EXPECT_STATUS(Download({"a", "b"}).status(), StatusCode::kDataLoss, "tensor b was asked for but did not arrive");
}

TEST_F(ClientAgainstScript, LoadWeightsSendsContiguousChunksAndMetadata) {
  auto client = Connect({.token = "tok-0123456789abcdef", .client_id = "trainer-7", .chunk_bytes = 10});
  const std::vector<TensorBytes> tensors = {{"w", v1::DTYPE_FLOAT32, {3, 4}, Bytes(48, 3)},
                                            {"n", v1::DTYPE_BFLOAT16, {5}, Bytes(10, 9)}};
  std::vector<int64_t> progress;
  auto r = client->LoadWeights("blk", tensors, [&](int64_t done, int64_t total) {
    EXPECT_EQ(total, 58);
    progress.push_back(done);
  });
  ASSERT_OK(r.status());
  EXPECT_EQ(r->block_id(), "blk");
  EXPECT_EQ(progress, (std::vector<int64_t>{0, 10, 20, 30, 40, 48, 58}));
  absl::MutexLock l(&service_.mu);
  EXPECT_EQ(service_.authorization, "Bearer tok-0123456789abcdef");
  EXPECT_EQ(service_.client_id, "trainer-7");
  ASSERT_EQ(service_.received.size(), 6u);  // 48 bytes in 10s: 5 chunks; 10 bytes: 1 chunk
  std::map<std::string, std::string> rebuilt;
  for (const v1::TensorChunk& c : service_.received) {
    EXPECT_EQ(c.block_id(), "blk");
    EXPECT_LE(c.data().size(), 10u);
    const TensorBytes& t = c.name() == "w" ? tensors[0] : tensors[1];
    EXPECT_EQ(c.dtype(), t.dtype) << c.name();
    EXPECT_EQ(std::vector<int64_t>(c.shape().begin(), c.shape().end()), t.shape) << c.name();
    EXPECT_EQ(c.offset(), static_cast<int64_t>(rebuilt[c.name()].size())) << "chunks of " << c.name() << " not contiguous";
    rebuilt[c.name()] += c.data();
  }
  EXPECT_EQ(rebuilt["w"], tensors[0].data);
  EXPECT_EQ(rebuilt["n"], tensors[1].data);
}

TEST_F(ClientAgainstScript, LoadWeightsChecksTensorSizesBeforeSending) {
  auto client = Connect();
  auto r = client->LoadWeights("blk", {{"w", v1::DTYPE_FLOAT32, {3, 4}, Bytes(47, 3)}});
  EXPECT_STATUS(r.status(), StatusCode::kInvalidArgument, "tensor w has 47 bytes, but shape [3,4] of float32 needs 48");
  absl::MutexLock l(&service_.mu);
  EXPECT_TRUE(service_.received.empty());
}

TEST_F(ClientAgainstScript, DeadlinesAndStatusesPassThrough) {
  {
    absl::MutexLock l(&service_.mu);
    service_.info_delay = absl::Milliseconds(400);
  }
  auto client = Connect({.timeout = absl::Milliseconds(100)});
  const absl::Time start = absl::Now();
  EXPECT_STATUS(client->GetServerInfo().status(), StatusCode::kDeadlineExceeded);
  EXPECT_LT(absl::Now() - start, absl::Milliseconds(350)) << "the client's timeout was not applied";
  auto longer = client->GetServerInfo(CallOptions{absl::Seconds(5)});
  ASSERT_OK(longer.status()) << "a per-call timeout should override the client's";
  EXPECT_EQ(longer->version(), "scripted");
  {
    absl::MutexLock l(&service_.mu);
    EXPECT_EQ(service_.authorization, "<none>");
    EXPECT_EQ(service_.client_id, "<none>");
  }
  EXPECT_STATUS(client->GetBlock("b9").status(), StatusCode::kFailedPrecondition, "scripted: block b9 is shy");
  EXPECT_STATUS(client->ListBlocks().status(), StatusCode::kUnimplemented);
}

// The client sends Forward as a raw message (proto/tensor_wire.h) and reads the reply without
// protobuf: a plain protobuf server reads the one and writes the other. With connections = 0 it
// opens a connection per call in flight, up to kAutoConnections, and no more than it needs.
TEST_F(ClientAgainstScript, ConnectionsAreChosenByTheClient) {
  auto client = Connect();
  ASSERT_NE(client, nullptr);
  const std::string x = Bytes(3 << 20, 5);  // 3 MB: several of gRPC's slices
  auto forward = [&] {
    v1::ForwardRequest req;
    req.add_block_ids("b0");
    v1::Tensor* in = req.mutable_input();
    in->set_dtype(v1::DTYPE_BFLOAT16);
    for (int64_t d : {int64_t{1}, int64_t{1}, static_cast<int64_t>(x.size() / 2)}) in->add_shape(d);
    in->set_data(x);
    auto y = client->Forward(req);
    ASSERT_OK(y.status());
    EXPECT_EQ(y->activation_id(), "echo");
    EXPECT_EQ(y->output().data(), std::string(x.rbegin(), x.rend()));
    EXPECT_EQ(wire::ShapeOf(y->output()), wire::ShapeOf(req.input()));
  };
  auto distinct_peers = [&] {
    absl::MutexLock l(&service_.mu);
    std::set<std::string> p(service_.peers.begin(), service_.peers.end());
    service_.peers.clear();
    service_.arrived = 0;
    return p.size();
  };
  for (int i = 0; i < 3; ++i) forward();  // one at a time: one connection
  EXPECT_EQ(distinct_peers(), 1u);
  for (int at_once : {5, kAutoConnections + 4}) {
    {
      absl::MutexLock l(&service_.mu);
      service_.hold = at_once;
    }
    std::vector<std::thread> calls;
    for (int i = 0; i < at_once; ++i) calls.emplace_back(forward);
    for (std::thread& t : calls) t.join();
    EXPECT_EQ(distinct_peers(), static_cast<size_t>(std::min(at_once, kAutoConnections))) << at_once << " at once";
  }
}

TEST(ClientOptionsCheck, BadOptionsAreRefusedAtConnect) {
  EXPECT_STATUS(Client::Connect({.target = ""}).status(), StatusCode::kInvalidArgument, "target is empty");
  EXPECT_STATUS(Client::Connect({.chunk_bytes = 0}).status(), StatusCode::kInvalidArgument, "chunk_bytes = 0");
  EXPECT_STATUS(Client::Connect({.max_message_bytes = 0}).status(), StatusCode::kInvalidArgument,
                "max_message_bytes = 0");
  EXPECT_STATUS(Client::Connect({.connections = -1}).status(), StatusCode::kInvalidArgument, "connections = -1");
  EXPECT_STATUS(Client::Connect({.connections = 65}).status(), StatusCode::kInvalidArgument, "connections = 65");
}

// The wire helpers map each proto dtype onto base/dtype.h's codecs (the server's own): every
// element encodes and decodes as the codec of its dtype does.
TEST(WireDTypes, EncodeAndDecodeUseTheCodecOfEachDType) {
  std::vector<float> values = {0.f, -0.f, 1.f, -1.f, 65504.f, 65519.f, 65520.f, 1e9f, -1e9f,
                               std::numeric_limits<float>::infinity(), std::ldexp(1.f, -24), 1.00390625f};
  std::mt19937 rng(99);
  std::uniform_int_distribution<uint32_t> bits;
  for (int i = 0; i < 2000; ++i) {
    const uint32_t u = bits(rng) & 0xbfffffffu;  // finite values of every sign and many exponents
    float f;
    std::memcpy(&f, &u, 4);
    values.push_back(f);
  }
  for (v1::DType dtype : {v1::DTYPE_FLOAT32, v1::DTYPE_BFLOAT16, v1::DTYPE_FLOAT16}) {
    const std::string bytes = wire::EncodeFloat32(values.data(), values.size(), dtype);
    ASSERT_EQ(bytes.size(), values.size() * static_cast<size_t>(wire::DTypeBytes(dtype))) << wire::DTypeName(dtype);
    auto decoded = wire::DecodeToFloat32(dtype, bytes);
    ASSERT_TRUE(decoded.ok()) << decoded.status();
    for (size_t i = 0; i < values.size(); ++i) {
      float expected = values[i];
      if (dtype != v1::DTYPE_FLOAT32) {
        uint16_t h;
        std::memcpy(&h, bytes.data() + 2 * i, 2);
        const uint16_t want = dtype == v1::DTYPE_BFLOAT16 ? Float32ToBFloat16(values[i]) : Float32ToFloat16(values[i]);
        ASSERT_EQ(h, want) << wire::DTypeName(dtype) << " of " << values[i];
        expected = dtype == v1::DTYPE_BFLOAT16 ? BFloat16ToFloat32(want) : Float16ToFloat32(want);
      }
      ASSERT_EQ(std::memcmp(&(*decoded)[i], &expected, 4), 0) << wire::DTypeName(dtype) << " of " << values[i];
    }
  }
}

}  // namespace
}  // namespace blockd::testing
