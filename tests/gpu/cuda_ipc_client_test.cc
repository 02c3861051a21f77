// The C++ client's CUDA IPC regions (client/cuda_ipc_region.h) against a real CUDA daemon on this
// GPU, its own process (tests/reliability/daemon_process.h; BLOCKD_BINARY on the GPU host), so the
// daemon opens this process's device memory as a client's:
// - Forward and Backward of a span through a region give bitwise what the inline path gives, with
//   fp32 and bf16 on the wire, and the reply lands in the region in place of the input.
// - Four micro-batches from four threads, a region and a stream each, all in flight at once, give
//   bitwise the inline results.
// - Hostile use is refused with the region still working: a Put that does not fit, a Forward
//   naming a slice past the region's end (INVALID_ARGUMENT from the daemon, no block changed), a
//   reply naming another region (DATA_LOSS from Get); a region of the same name twice is refused.
// - Destroying the region unregisters it.
// - CudaActivations (client/cuda_activations.h) chooses by itself: by CUDA IPC from a kAuto client
//   of a daemon that allows it, through host memory from a kGrpc client or a daemon without
//   --allow_shared_memory (kSharedMemory then fails saying why), bitwise the inline path each way;
//   bad tensors are refused before anything is sent.
#include <cuda_runtime.h>

#include <cstdlib>
#include <iostream>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "client/cuda_activations.h"
#include "client/cuda_ipc_region.h"
#include "tests/integration/harness.h"
#include "tests/reliability/daemon_process.h"

namespace blockd::testing {
namespace {

std::string BlockdPath() {
  const char* env = std::getenv("BLOCKD_BINARY");
  return env != nullptr && env[0] != '\0' ? env : BLOCKD_PATH;
}

// Device memory holding a copy of `bytes`, freed with the object; from cudaMalloc, or with
// `pool` from the device's stream-ordered pool (cudaMallocAsync), which CUDA IPC cannot name.
struct DeviceBytes {
  explicit DeviceBytes(const std::string& bytes, bool pool = false)
      : size(static_cast<int64_t>(bytes.size())), pool(pool) {
    Allocate();
    EXPECT_EQ(cudaMemcpy(ptr, bytes.data(), bytes.size(), cudaMemcpyHostToDevice), cudaSuccess);
  }
  explicit DeviceBytes(int64_t n, bool pool = false) : size(n), pool(pool) { Allocate(); }
  ~DeviceBytes() {
    if (!pool) {
      cudaFree(ptr);
    } else {
      cudaFreeAsync(ptr, nullptr);
      cudaStreamSynchronize(nullptr);
    }
  }
  void Allocate() {
    if (!pool) {
      EXPECT_EQ(cudaMalloc(&ptr, static_cast<size_t>(size)), cudaSuccess);
    } else {
      EXPECT_EQ(cudaMallocAsync(&ptr, static_cast<size_t>(size), nullptr), cudaSuccess);
      EXPECT_EQ(cudaStreamSynchronize(nullptr), cudaSuccess);
    }
  }
  DeviceBytes(const DeviceBytes&) = delete;
  DeviceBytes& operator=(const DeviceBytes&) = delete;
  std::string Host() const {
    std::string out(static_cast<size_t>(size), '\0');
    EXPECT_EQ(cudaMemcpy(out.data(), ptr, out.size(), cudaMemcpyDeviceToHost), cudaSuccess);
    return out;
  }
  void* ptr = nullptr;
  int64_t size = 0;
  bool pool = false;
};

class CudaIpcClientTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) return;
    auto d = DaemonProcess::Start(BlockdPath(), {"--backend=cuda", "--allow_shared_memory"},
                                  MakeTempDir("cuda_ipc_client") + "/blockd.log");
    ASSERT_TRUE(d.ok()) << d.status();
    daemon_ = d->release();
    auto c = Client::Connect({.target = daemon_->target(), .timeout = absl::Seconds(120)});
    ASSERT_TRUE(c.ok()) << c.status();
    client_ = c->release();
    v1::BlockConfig cfg = TinyConfig(/*qk_norm=*/true, /*hidden=*/64);
    for (int i = 0; i < 2; ++i) {
      v1::CreateBlockRequest req = CreateRequest(absl::StrCat("ipc", i), cfg, 7 + i);
      req.set_layer_index(i);
      ASSERT_TRUE(client_->CreateBlock(req).ok());
    }
  }
  static void TearDownTestSuite() {
    delete client_;
    delete daemon_;
    client_ = nullptr;
    daemon_ = nullptr;
  }
  void SetUp() override {
    if (client_ == nullptr) GTEST_SKIP() << "no GPU";
  }
  void TearDown() override {
    if (HasFailure() && daemon_ != nullptr) {
      const std::string log = daemon_->Log();
      std::cout << "---- daemon log (tail)\n" << log.substr(log.size() > 3000 ? log.size() - 3000 : 0);
    }
  }

  static std::vector<std::string> Span() { return {"ipc0", "ipc1"}; }

  // Forward(keep) then Backward of the span through `region` on `stream`: output and grad_input
  // bytes, copied back to the host. The input and then the output at byte `at` of the region, the
  // gradient and then grad_input right after them.
  static absl::StatusOr<std::pair<std::string, std::string>> ThroughRegion(CudaIpcRegion& region, cudaStream_t stream,
                                                                         const v1::Tensor& x, const v1::Tensor& dy,
                                                                         int64_t at = 0) {
    const int64_t n = static_cast<int64_t>(x.data().size());
    DeviceBytes xd(x.data()), dyd(dy.data()), out(n), dx(n);
    std::vector<int64_t> shape(x.shape().begin(), x.shape().end());
    v1::ForwardRequest fwd;
    for (const std::string& id : Span()) fwd.add_block_ids(id);
    fwd.set_keep_activations(true);
    ASSIGN_OR_RETURN(*fwd.mutable_input(), region.Put(at, x.dtype(), shape, xd.ptr, n, stream));
    *fwd.mutable_output_shared_memory() = region.Ref(at, n);
    ASSIGN_OR_RETURN(v1::ForwardResponse y, client_->Forward(fwd));
    RETURN_IF_ERROR(region.Get(y.output(), out.ptr, n, stream));
    v1::BackwardRequest bwd;
    bwd.set_activation_id(y.activation_id());
    ASSIGN_OR_RETURN(*bwd.mutable_grad_output(), region.Put(at + n, dy.dtype(), shape, dyd.ptr, n, stream));
    *bwd.mutable_output_shared_memory() = region.Ref(at + n, n);
    ASSIGN_OR_RETURN(v1::BackwardResponse g, client_->Backward(bwd));
    RETURN_IF_ERROR(region.Get(g.grad_input(), dx.ptr, n, stream));
    if (cudaStreamSynchronize(stream) != cudaSuccess) return absl::InternalError("cudaStreamSynchronize");
    return std::make_pair(out.Host(), dx.Host());
  }

  // The same through `calls`, from device memory to device memory.
  static absl::StatusOr<std::pair<std::string, std::string>> ThroughCalls(CudaActivations& calls,
                                                                         cudaStream_t stream, const v1::Tensor& x,
                                                                         const v1::Tensor& dy, bool pool = false) {
    const int64_t n = static_cast<int64_t>(x.data().size());
    DeviceBytes xd(x.data(), pool), dyd(dy.data(), pool), out(n, pool), dx(n, pool);
    v1::ForwardRequest fwd;
    for (const std::string& id : Span()) fwd.add_block_ids(id);
    fwd.set_keep_activations(true);
    fwd.mutable_input()->set_dtype(x.dtype());
    *fwd.mutable_input()->mutable_shape() = x.shape();
    ASSIGN_OR_RETURN(v1::ForwardResponse y, calls.Forward(fwd, xd.ptr, out.ptr, stream));
    if (!y.output().data().empty() || y.output().has_shared_memory()) {
      return absl::InternalError("the response's output names more than dtype and shape");
    }
    v1::BackwardRequest bwd;
    bwd.set_activation_id(y.activation_id());
    bwd.mutable_grad_output()->set_dtype(dy.dtype());
    *bwd.mutable_grad_output()->mutable_shape() = dy.shape();
    ASSIGN_OR_RETURN(v1::BackwardResponse g, calls.Backward(bwd, dyd.ptr, dx.ptr, stream));
    if (cudaStreamSynchronize(stream) != cudaSuccess) return absl::InternalError("cudaStreamSynchronize");
    return std::make_pair(out.Host(), dx.Host());
  }

  // The same through the messages.
  static std::pair<std::string, std::string> Inline(const v1::Tensor& x, const v1::Tensor& dy, Client* via = nullptr) {
    Client* c = via != nullptr ? via : client_;
    auto y = c->Forward(Span(), x, true);
    EXPECT_TRUE(y.ok()) << y.status();
    if (!y.ok()) return {};
    auto g = c->Backward(y->activation_id(), dy);
    EXPECT_TRUE(g.ok()) << g.status();
    if (!g.ok()) return {};
    return {y->output().data(), g->grad_input().data()};
  }

  static DaemonProcess* daemon_;
  static Client* client_;
};

DaemonProcess* CudaIpcClientTest::daemon_ = nullptr;
Client* CudaIpcClientTest::client_ = nullptr;

TEST_F(CudaIpcClientTest, ForwardAndBackwardAreBitwiseTheInlinePath) {
  auto region = CudaIpcRegion::Create(client_, 0, 1 << 20);
  ASSERT_TRUE(region.ok()) << region.status();
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreate(&stream), cudaSuccess);
  for (v1::DType dtype : {v1::DTYPE_FLOAT32, v1::DTYPE_BFLOAT16}) {
    SCOPED_TRACE(v1::DType_Name(dtype));
    const v1::Tensor x = RandomTensor({2, 16, 64}, 11, dtype), dy = RandomTensor({2, 16, 64}, 12, dtype);
    auto ipc = ThroughRegion(**region, stream, x, dy);
    ASSERT_TRUE(ipc.ok()) << ipc.status();
    const auto msg = Inline(x, dy);
    EXPECT_TRUE(ipc->first == msg.first) << "Forward output differs from the inline path";
    EXPECT_TRUE(ipc->second == msg.second) << "grad_input differs from the inline path";
  }
  cudaStreamDestroy(stream);
}

// A region may hold a tensor at any offset its element size divides, on and off the 16 bytes the
// daemon's conversions read and write in vectors: for both dtypes, bitwise the inline path.
TEST_F(CudaIpcClientTest, TensorsAtOffsetsOnAndOffSixteenBytesAreBitwiseTheInlinePath) {
  auto region = CudaIpcRegion::Create(client_, 0, 1 << 20);
  ASSERT_TRUE(region.ok()) << region.status();
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreate(&stream), cudaSuccess);
  for (v1::DType dtype : {v1::DTYPE_FLOAT32, v1::DTYPE_BFLOAT16}) {
    // Tensors of 3 x 8 x 64 values; the element size divides every offset.
    const v1::Tensor x = RandomTensor({3, 8, 64}, 13, dtype), dy = RandomTensor({3, 8, 64}, 14, dtype);
    const auto msg = Inline(x, dy);
    for (int64_t at : {16, 48, 4, 12, 1028}) {
      SCOPED_TRACE(absl::StrCat(v1::DType_Name(dtype), " at byte ", at));
      auto ipc = ThroughRegion(**region, stream, x, dy, at);
      ASSERT_TRUE(ipc.ok()) << ipc.status();
      EXPECT_TRUE(ipc->first == msg.first) << "Forward output differs from the inline path";
      EXPECT_TRUE(ipc->second == msg.second) << "grad_input differs from the inline path";
    }
  }
  cudaStreamDestroy(stream);
}

TEST_F(CudaIpcClientTest, MicroBatchesInFlightFromThreadsAreBitwiseTheInlinePath) {
  constexpr int kThreads = 4;
  std::vector<std::unique_ptr<CudaIpcRegion>> regions;
  std::vector<cudaStream_t> streams(kThreads);
  std::vector<v1::Tensor> xs, dys;
  for (int i = 0; i < kThreads; ++i) {
    auto r = CudaIpcRegion::Create(client_, 0, 1 << 20);
    ASSERT_TRUE(r.ok()) << r.status();
    regions.push_back(*std::move(r));
    ASSERT_EQ(cudaStreamCreateWithFlags(&streams[i], cudaStreamNonBlocking), cudaSuccess);
    xs.push_back(RandomTensor({2, 16, 64}, 20 + i, v1::DTYPE_BFLOAT16));
    dys.push_back(RandomTensor({2, 16, 64}, 40 + i, v1::DTYPE_BFLOAT16));
  }
  std::vector<absl::StatusOr<std::pair<std::string, std::string>>> got(kThreads, absl::UnknownError("not run"));
  std::vector<std::thread> threads;
  for (int i = 0; i < kThreads; ++i) {
    threads.emplace_back([&, i] {
      cudaSetDevice(0);
      got[i] = ThroughRegion(*regions[i], streams[i], xs[i], dys[i]);
    });
  }
  for (std::thread& t : threads) t.join();
  for (int i = 0; i < kThreads; ++i) {
    SCOPED_TRACE(absl::StrCat("micro-batch ", i));
    ASSERT_TRUE(got[i].ok()) << got[i].status();
    const auto msg = Inline(xs[i], dys[i]);
    EXPECT_TRUE(got[i]->first == msg.first) << "Forward output differs from the inline path";
    EXPECT_TRUE(got[i]->second == msg.second) << "grad_input differs from the inline path";
    cudaStreamDestroy(streams[i]);
  }
}

TEST_F(CudaIpcClientTest, HostileUseIsRefusedAndTheRegionStillWorks) {
  auto region = CudaIpcRegion::Create(client_, 0, 64 << 10, "hostile-ipc");
  ASSERT_TRUE(region.ok()) << region.status();
  CudaIpcRegion& r = **region;
  EXPECT_EQ(CudaIpcRegion::Create(client_, 0, 4096, "hostile-ipc").status().code(), absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(CudaIpcRegion::Create(client_, 99, 4096).status().code(), absl::StatusCode::kInvalidArgument);
  const v1::Tensor x = RandomTensor({2, 16, 64}, 31);
  const int64_t n = static_cast<int64_t>(x.data().size());
  DeviceBytes xd(x.data());
  EXPECT_EQ(r.Put(r.size() - n + 4, x.dtype(), {2, 16, 64}, xd.ptr, n, nullptr).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(r.Put(-4, x.dtype(), {2, 16, 64}, xd.ptr, n, nullptr).status().code(), absl::StatusCode::kInvalidArgument);
  const BlockState before = StateOf(*client_, "ipc0");
  v1::ForwardRequest fwd;
  for (const std::string& id : Span()) fwd.add_block_ids(id);
  fwd.set_keep_activations(true);
  ASSERT_TRUE(r.Put(0, x.dtype(), {2, 16, 64}, xd.ptr, n, nullptr).ok());
  *fwd.mutable_input() = x;
  fwd.mutable_input()->clear_data();
  *fwd.mutable_input()->mutable_shared_memory() = r.Ref(r.size() - n + 4, n);  // past the end
  EXPECT_EQ(client_->Forward(fwd).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(DiffStates(before, StateOf(*client_, "ipc0")), "");
  v1::Tensor foreign;
  *foreign.mutable_shared_memory() = r.Ref(0, n);
  foreign.mutable_shared_memory()->set_region("someone-else");
  DeviceBytes out(n);
  EXPECT_EQ(r.Get(foreign, out.ptr, n, nullptr).code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(r.Get(v1::Tensor(), out.ptr, n, nullptr).code(), absl::StatusCode::kDataLoss);
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreate(&stream), cudaSuccess);
  auto ipc = ThroughRegion(r, stream, x, RandomTensor({2, 16, 64}, 32));
  ASSERT_TRUE(ipc.ok()) << ipc.status();
  EXPECT_EQ(ipc->first, Inline(x, RandomTensor({2, 16, 64}, 32)).first);
  cudaStreamDestroy(stream);
  region->reset();
  auto listed = client_->ListSharedMemory();
  ASSERT_TRUE(listed.ok()) << listed.status();
  for (const v1::SharedMemoryRegion& reg : *listed) EXPECT_NE(reg.name(), "hostile-ipc");
}

// This identity's regions whose names start with `prefix`: CudaActivations' copying regions
// ("cuda-") and its registrations of the caller's allocations ("alloc-").
int RegionsOf(Client& c, const std::string& prefix) {
  auto listed = c.ListSharedMemory();
  EXPECT_TRUE(listed.ok()) << listed.status();
  int n = 0;
  if (listed.ok()) {
    for (const v1::SharedMemoryRegion& reg : *listed) n += reg.name().rfind(prefix, 0) == 0;
  }
  return n;
}

TEST_F(CudaIpcClientTest, CudaActivationsGoByCudaIpcByThemselvesAndMatchTheInlinePath) {
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreate(&stream), cudaSuccess);
  // kAuto with cudaMalloc memory: read and written in place (the allocations registered, no
  // copying region); kAuto with stream-ordered pool memory: copied through one region, reused;
  // kGrpc: through host memory.
  struct Case {
    const char* name;
    Transport transport;
    bool pool;
  };
  for (const Case& k : {Case{"kAuto, cudaMalloc", Transport::kAuto, false},
                        Case{"kAuto, cudaMallocAsync", Transport::kAuto, true},
                        Case{"kGrpc", Transport::kGrpc, false}}) {
    SCOPED_TRACE(k.name);
    auto c = Client::Connect({.target = daemon_->target(), .timeout = absl::Seconds(120), .transport = k.transport});
    ASSERT_TRUE(c.ok()) << c.status();
    const int copying = RegionsOf(**c, "cuda-"), in_place = RegionsOf(**c, "alloc-");
    {
      CudaActivations calls(c->get());
      EXPECT_EQ(calls.UsesCudaIpc(0), std::nullopt);
      for (int round = 0; round < 3; ++round) {  // fresh allocations each round, maybe at the same addresses
        for (v1::DType dtype : {v1::DTYPE_FLOAT32, v1::DTYPE_BFLOAT16}) {
          SCOPED_TRACE(absl::StrCat(v1::DType_Name(dtype), ", round ", round));
          const v1::Tensor x = RandomTensor({2, 16, 64}, 51 + round, dtype);
          const v1::Tensor dy = RandomTensor({2, 16, 64}, 61 + round, dtype);
          auto got = ThroughCalls(calls, stream, x, dy, k.pool);
          ASSERT_TRUE(got.ok()) << got.status();
          const auto msg = Inline(x, dy);
          EXPECT_TRUE(got->first == msg.first) << "Forward output differs from the inline path";
          EXPECT_TRUE(got->second == msg.second) << "grad_input differs from the inline path";
        }
      }
      if (k.transport == Transport::kAuto) {
        EXPECT_EQ(calls.UsesCudaIpc(0), std::optional<bool>(true));
        if (!k.pool) {
          EXPECT_EQ(RegionsOf(**c, "cuda-"), copying) << "no copying region for cudaMalloc memory";
          const int registered = RegionsOf(**c, "alloc-") - in_place;
          EXPECT_GE(registered, 1);
          EXPECT_LE(registered, CudaActivations::kMaxAllocations);
        } else {
          EXPECT_EQ(RegionsOf(**c, "cuda-"), copying + 1) << "one copying region, reused by every call";
        }
      } else {
        EXPECT_EQ(calls.UsesCudaIpc(0), std::nullopt);
        EXPECT_EQ(RegionsOf(**c, "cuda-"), copying);
        EXPECT_EQ(RegionsOf(**c, "alloc-"), in_place);
      }
    }
    EXPECT_EQ(RegionsOf(**c, "cuda-"), copying) << "destroying CudaActivations unregisters its regions";
    EXPECT_EQ(RegionsOf(**c, "alloc-"), in_place) << "destroying CudaActivations unregisters its allocations";
  }
  cudaStreamDestroy(stream);
}

TEST_F(CudaIpcClientTest, CudaActivationsRefuseBadTensorsBeforeSendingAnything) {
  auto c = Client::Connect({.target = daemon_->target(), .timeout = absl::Seconds(120), .transport = Transport::kAuto});
  ASSERT_TRUE(c.ok()) << c.status();
  CudaActivations calls(c->get());
  const v1::Tensor x = RandomTensor({2, 16, 64}, 61);
  DeviceBytes xd(x.data()), out(static_cast<int64_t>(x.data().size()));
  std::string host(x.data().size(), '\0');
  v1::ForwardRequest fwd;
  for (const std::string& id : Span()) fwd.add_block_ids(id);
  fwd.mutable_input()->set_dtype(x.dtype());
  *fwd.mutable_input()->mutable_shape() = x.shape();
  const BlockState before = StateOf(*client_, "ipc0");
  EXPECT_EQ(calls.Forward(fwd, host.data(), out.ptr, nullptr).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(calls.Forward(fwd, xd.ptr, host.data(), nullptr).status().code(), absl::StatusCode::kInvalidArgument);
  v1::ForwardRequest with_bytes = fwd;
  with_bytes.mutable_input()->set_data(x.data());
  EXPECT_EQ(calls.Forward(with_bytes, xd.ptr, out.ptr, nullptr).status().code(), absl::StatusCode::kInvalidArgument);
  v1::ForwardRequest no_dtype = fwd;
  no_dtype.mutable_input()->clear_dtype();
  EXPECT_EQ(calls.Forward(no_dtype, xd.ptr, out.ptr, nullptr).status().code(), absl::StatusCode::kInvalidArgument);
  v1::ForwardRequest bad_shape = fwd;
  bad_shape.mutable_input()->set_shape(0, -2);
  EXPECT_EQ(calls.Forward(bad_shape, xd.ptr, out.ptr, nullptr).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(calls.UsesCudaIpc(0), std::nullopt) << "nothing was sent, so nothing was registered";
  EXPECT_EQ(DiffStates(before, StateOf(*client_, "ipc0")), "");
  // The same object still works.
  auto y = calls.Forward(fwd, xd.ptr, out.ptr, nullptr);
  ASSERT_TRUE(y.ok()) << y.status();
  EXPECT_EQ(out.Host(), Inline(x, RandomTensor({2, 16, 64}, 62)).first);
}

TEST_F(CudaIpcClientTest, CudaActivationsOfADaemonWithoutSharedMemoryGoThroughHostMemoryOrAreRefused) {
  auto d = DaemonProcess::Start(BlockdPath(), {"--backend=cuda"}, MakeTempDir("cuda_ipc_fallback") + "/blockd.log");
  ASSERT_TRUE(d.ok()) << d.status();
  auto plain = Client::Connect({.target = (*d)->target(), .timeout = absl::Seconds(120)});
  ASSERT_TRUE(plain.ok()) << plain.status();
  v1::BlockConfig cfg = TinyConfig(/*qk_norm=*/true, /*hidden=*/64);
  for (int i = 0; i < 2; ++i) {
    v1::CreateBlockRequest req = CreateRequest(absl::StrCat("ipc", i), cfg, 7 + i);
    req.set_layer_index(i);
    ASSERT_TRUE((*plain)->CreateBlock(req).ok());
  }
  const v1::Tensor x = RandomTensor({2, 16, 64}, 71, v1::DTYPE_BFLOAT16);
  const v1::Tensor dy = RandomTensor({2, 16, 64}, 72, v1::DTYPE_BFLOAT16);
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreate(&stream), cudaSuccess);
  auto c = Client::Connect({.target = (*d)->target(), .timeout = absl::Seconds(120), .transport = Transport::kAuto});
  ASSERT_TRUE(c.ok()) << c.status();
  {
    CudaActivations calls(c->get());
    for (int i = 0; i < 2; ++i) {  // the second call falls back at once
      auto got = ThroughCalls(calls, stream, x, dy);
      ASSERT_TRUE(got.ok()) << got.status();
      const auto msg = Inline(x, dy, plain->get());
      EXPECT_TRUE(got->first == msg.first) << "Forward output differs from the inline path";
      EXPECT_TRUE(got->second == msg.second) << "grad_input differs from the inline path";
      EXPECT_EQ(calls.UsesCudaIpc(0), std::optional<bool>(false));
    }
  }
  auto strict = Client::Connect(
      {.target = (*d)->target(), .timeout = absl::Seconds(120), .transport = Transport::kSharedMemory});
  ASSERT_TRUE(strict.ok()) << strict.status();
  CudaActivations insisting(strict->get());
  auto refused = ThroughCalls(insisting, stream, x, dy);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition) << refused.status();
  auto listed = (*plain)->ListSharedMemory();
  ASSERT_TRUE(listed.ok()) << listed.status();
  EXPECT_TRUE(listed->empty());
  cudaStreamDestroy(stream);
}

}  // namespace
}  // namespace blockd::testing
