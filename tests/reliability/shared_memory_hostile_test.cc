// The hostile-input battery for shared-memory tensors (the rest of the battery is
// hostile_input_test.cc): bad region names and keys, hostile offsets and sizes (negative, past the
// region, overflowing int64), objects too small or truncated after registering, both bytes and a
// reference, output slices too small. Each case gets the code ARCHITECTURE.md documents and words
// of its message, and the server's state (the block's weights, gradients and moments, activation
// handles, the session's length, the caller's regions) is bitwise unchanged after it.
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <climits>
#include <optional>
#include <functional>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "client/shared_memory_region.h"
#include "tests/integration/harness.h"

namespace blockd::testing {
namespace {

using absl::StatusCode;

constexpr int64_t kObjectBytes = 1 << 16;

struct State {
  BlockState block;
  int64_t activations = -1;
  int32_t session_length = -1;
  std::vector<std::string> regions;
};

class SharedMemoryHostile : public ::testing::Test {
 protected:
  void SetUp() override {
    ServerOptions o = LoopbackOptions();
    o.service.shared_memory.allowed = true;
    o.service.shared_memory.max_regions_per_client = 3;
    o.service.shared_memory.max_bytes_per_client = 1 << 20;
    o.service.max_message_bytes = 8 << 20;
    server_ = StartServer(o);
    ASSERT_NE(server_, nullptr);
    client_ = ConnectTo(*server_);
    ASSERT_OK(client_->CreateBlock(CreateRequest("b", TinyConfig(), 1)).status());
    TrainStep(*client_, {"b"}, RandomTensor({1, 4, 32}, 2), 3);
    auto y = client_->Forward({"b"}, RandomTensor({1, 4, 32}, 4), true);
    ASSERT_TRUE(y.ok()) << y.status();
    handle_ = y->activation_id();
    v1::OpenSessionRequest open;
    open.add_block_ids("b");
    open.set_batch_size(1);
    open.set_max_length(16);
    auto s = client_->OpenSession(open);
    ASSERT_TRUE(s.ok()) << s.status();
    session_ = s->session_id();
    // A region the test can shrink behind the server's back: the name stays linked until TearDown.
    key_ = absl::StrCat("/blockd-hostile-", getpid());
    shm_unlink(key_.c_str());
    fd_ = shm_open(key_.c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
    ASSERT_GE(fd_, 0);
    ASSERT_EQ(ftruncate(fd_, kObjectBytes), 0);
    v1::RegisterSharedMemoryRequest reg = Register("r", key_, kObjectBytes, 0);
    ASSERT_OK(client_->RegisterSharedMemory(reg).status());
    x_ = RandomTensor({1, 4, 32}, 5);
    ASSERT_EQ(pwrite(fd_, x_.data().data(), x_.data().size(), 0), static_cast<ssize_t>(x_.data().size()));
  }
  void TearDown() override {
    if (fd_ >= 0) close(fd_);
    shm_unlink(key_.c_str());
  }

  static v1::RegisterSharedMemoryRequest Register(const std::string& name, const std::string& key, int64_t size,
                                                  int64_t offset) {
    v1::RegisterSharedMemoryRequest r;
    r.set_name(name);
    r.set_key(key);
    r.set_byte_size(size);
    r.set_offset(offset);
    return r;
  }
  static v1::SharedMemoryRef Ref(const std::string& region, int64_t offset, int64_t size) {
    v1::SharedMemoryRef r;
    r.set_region(region);
    r.set_offset(offset);
    r.set_byte_size(size);
    return r;
  }
  // x_ by reference at `ref`.
  v1::Tensor Input(const v1::SharedMemoryRef& ref) const {
    v1::Tensor t;
    t.set_dtype(v1::DTYPE_FLOAT32);
    for (int64_t d : {1, 4, 32}) t.add_shape(d);
    *t.mutable_shared_memory() = ref;
    return t;
  }
  absl::Status Forward(const v1::Tensor& input, const v1::SharedMemoryRef* out = nullptr, bool keep = true) {
    v1::ForwardRequest r;
    r.add_block_ids("b");
    *r.mutable_input() = input;
    r.set_keep_activations(keep);
    if (out != nullptr) *r.mutable_output_shared_memory() = *out;
    return client_->Forward(r).status();
  }
  State Snapshot() {
    State s;
    s.block = StateOf(*client_, "b");
    auto info = client_->GetServerInfo();
    EXPECT_TRUE(info.ok()) << info.status();
    if (info.ok()) s.activations = info->activations_held();
    auto sessions = client_->ListSessions();
    EXPECT_TRUE(sessions.ok()) << sessions.status();
    if (sessions.ok() && !sessions->empty()) s.session_length = (*sessions)[0].length();
    auto regions = client_->ListSharedMemory();
    EXPECT_TRUE(regions.ok()) << regions.status();
    if (regions.ok()) {
      for (const auto& r : *regions) s.regions.push_back(absl::StrCat(r.name(), "=", r.key(), ":", r.byte_size()));
    }
    return s;
  }
  void Expect(const std::string& what, StatusCode code, const std::vector<std::string>& parts,
              const std::function<absl::Status()>& call) {
    SCOPED_TRACE(what);
    const State before = Snapshot();
    EXPECT_TRUE(StatusIs(call(), code, parts));
    const State after = Snapshot();
    EXPECT_EQ(DiffStates(before.block, after.block), "");
    EXPECT_EQ(before.activations, after.activations);
    EXPECT_EQ(before.session_length, after.session_length);
    EXPECT_EQ(absl::StrJoin(before.regions, ","), absl::StrJoin(after.regions, ","));
  }

  std::unique_ptr<Server> server_;
  std::unique_ptr<Client> client_;
  std::string handle_, session_, key_;
  int fd_ = -1;
  v1::Tensor x_;
};

TEST_F(SharedMemoryHostile, BadRegistrationsAreRefusedAndChangeNothing) {
  auto reg = [this](v1::RegisterSharedMemoryRequest r) {
    return [this, r] { return client_->RegisterSharedMemory(r).status(); };
  };
  const int64_t k = kObjectBytes;
  Expect("empty name", StatusCode::kInvalidArgument, {"region name", "expected 1-128"}, reg(Register("", key_, k, 0)));
  Expect("200 KiB name", StatusCode::kInvalidArgument, {"(204800 bytes)"},
         reg(Register(std::string(200 << 10, 'n'), key_, k, 0)));
  Expect("name with a slash", StatusCode::kInvalidArgument, {"a/b"}, reg(Register("a/b", key_, k, 0)));
  Expect("key of another program", StatusCode::kInvalidArgument, {"\"/postgres\"", "\"/blockd\" followed by"},
         reg(Register("n", "/postgres", k, 0)));
  Expect("key leaving /dev/shm", StatusCode::kInvalidArgument, {"/blockd/../etc"},
         reg(Register("n", "/blockd/../etc", k, 0)));
  Expect("key that is only the prefix", StatusCode::kInvalidArgument, {"\"/blockd\""}, reg(Register("n", "/blockd", k, 0)));
  Expect("unknown key", StatusCode::kNotFound, {"no shared-memory object", "/blockd-nobody-made-this"},
         reg(Register("n", "/blockd-nobody-made-this", k, 0)));
  Expect("zero size", StatusCode::kInvalidArgument, {"byte_size = 0", "expected > 0"}, reg(Register("n", key_, 0, 0)));
  Expect("negative size", StatusCode::kInvalidArgument, {"byte_size = -1"}, reg(Register("n", key_, -1, 0)));
  Expect("negative offset", StatusCode::kInvalidArgument, {"offset = -5"}, reg(Register("n", key_, 16, -5)));
  Expect("size over the client's bytes", StatusCode::kResourceExhausted, {"--max_shared_memory_bytes_per_client"},
         reg(Register("n", key_, INT64_MAX, 0)));
  Expect("offset + size overflows", StatusCode::kInvalidArgument, {"overflows"},
         reg(Register("n", key_, 16, INT64_MAX - 8)));
  Expect("object smaller than the region", StatusCode::kInvalidArgument, {"holds 65536 bytes", "65537"},
         reg(Register("n", key_, k, 1)));
  Expect("name in use", StatusCode::kAlreadyExists, {"\"r\" is already registered"}, reg(Register("r", key_, k, 0)));
  ASSERT_OK(client_->RegisterSharedMemory(Register("r2", key_, 1024, 0)).status());
  ASSERT_OK(client_->RegisterSharedMemory(Register("r3", key_, 1024, 0)).status());
  Expect("a fourth region", StatusCode::kResourceExhausted, {"--max_shared_memory_regions_per_client=3"},
         reg(Register("r4", key_, 1024, 0)));
  Expect("unregister an unknown region", StatusCode::kNotFound, {"\"zz\" not found"},
         [this] { return client_->UnregisterSharedMemory("zz"); });
}

TEST_F(SharedMemoryHostile, BadSlicesAreRefusedAndChangeNothing) {
  const int64_t n = static_cast<int64_t>(x_.data().size());
  auto fwd = [this](v1::Tensor t, std::optional<v1::SharedMemoryRef> out = std::nullopt) {
    return [this, t, out] { return Forward(t, out ? &*out : nullptr); };
  };
  Expect("unknown region", StatusCode::kNotFound, {"input.shared_memory", "\"nope\" not found"},
         fwd(Input(Ref("nope", 0, n))));
  Expect("negative offset", StatusCode::kInvalidArgument, {"offset -1", "outside region \"r\" of 65536 bytes"},
         fwd(Input(Ref("r", -1, n))));
  Expect("negative size", StatusCode::kInvalidArgument, {"byte_size -4"}, fwd(Input(Ref("r", 0, -4))));
  Expect("past the end", StatusCode::kInvalidArgument, {"offset 65436"}, fwd(Input(Ref("r", kObjectBytes - 100, n))));
  Expect("offset + size overflows", StatusCode::kInvalidArgument, {"outside region"},
         fwd(Input(Ref("r", INT64_MAX - 8, 16))));
  Expect("size overflowing with the offset", StatusCode::kInvalidArgument, {"outside region"},
         fwd(Input(Ref("r", 16, INT64_MAX))));
  Expect("size not the shape's", StatusCode::kInvalidArgument, {"input"}, fwd(Input(Ref("r", 0, n - 4))));
  v1::Tensor both = Input(Ref("r", 0, n));
  both.set_data(x_.data());
  Expect("bytes and a reference", StatusCode::kInvalidArgument, {"both", "set one of them"}, fwd(both));
  Expect("output slice too small", StatusCode::kInvalidArgument, {"output_shared_memory.byte_size = 100", "needs 512"},
         fwd(x_, Ref("r", 0, 100)));
  Expect("output slice past the end", StatusCode::kInvalidArgument, {"output_shared_memory", "outside region"},
         fwd(x_, Ref("r", kObjectBytes, n)));
  Expect("output in an unknown region", StatusCode::kNotFound, {"output_shared_memory", "not found"},
         fwd(x_, Ref("nope", 0, n)));
  Expect("Backward with a bad output slice (the handle stays)", StatusCode::kInvalidArgument,
         {"output_shared_memory.byte_size = 8"}, [this] {
           v1::BackwardRequest r;
           r.set_activation_id(handle_);
           *r.mutable_grad_output() = RandomTensor({1, 4, 32}, 9);
           *r.mutable_output_shared_memory() = Ref("r", 0, 8);
           return client_->Backward(r).status();
         });
  Expect("InferStep with a bad input slice (the session keeps its length)", StatusCode::kInvalidArgument,
         {"hidden_states.shared_memory", "outside region"}, [this] {
           v1::InferStepRequest r;
           r.set_session_id(session_);
           *r.mutable_hidden_states() = Input(Ref("r", -8, 512));
           return client_->InferStep(r).status();
         });
  // The handle survived the refused Backward: it still works.
  v1::BackwardRequest ok;
  ok.set_activation_id(handle_);
  *ok.mutable_grad_output() = RandomTensor({1, 4, 32}, 9);
  EXPECT_TRUE(client_->Backward(ok).ok());
}

TEST_F(SharedMemoryHostile, ATruncatedObjectIsRefusedNeverFaults) {
  const int64_t n = static_cast<int64_t>(x_.data().size());
  ASSERT_EQ(ftruncate(fd_, 100), 0);  // the client shrinks its object behind the server's back
  Expect("input from a truncated object", StatusCode::kFailedPrecondition, {"was truncated", "register it again"},
         [&] { return Forward(Input(Ref("r", 0, n))); });
  Expect("output into a truncated object", StatusCode::kFailedPrecondition, {"now holds 100 bytes", "truncated"},
         [&] {
           v1::SharedMemoryRef out = Ref("r", 0, n);
           return Forward(x_, &out);
         });
  ASSERT_EQ(ftruncate(fd_, 0), 0);
  Expect("InferStep from an emptied object", StatusCode::kFailedPrecondition, {"truncated"}, [&] {
    v1::InferStepRequest r;
    r.set_session_id(session_);
    *r.mutable_hidden_states() = Input(Ref("r", 0, n));
    return client_->InferStep(r).status();
  });
  // Grown back, the region serves again: the server never lost it.
  ASSERT_EQ(ftruncate(fd_, kObjectBytes), 0);
  ASSERT_EQ(pwrite(fd_, x_.data().data(), x_.data().size(), 0), n);
  EXPECT_TRUE(Forward(Input(Ref("r", 0, n)), nullptr, false).ok());
}

// CUDA IPC registrations on this CPU daemon: a malformed handle is refused as such (as a CUDA
// daemon refuses it, before any device call), bounds as for POSIX regions, and a well-formed
// handle because only the CUDA backend opens device memory.
TEST_F(SharedMemoryHostile, CudaIpcRegistrationsOnACpuDaemonAreRefused) {
  auto ipc = [](const std::string& name, const std::string& handle, int64_t size, int64_t offset) {
    v1::RegisterSharedMemoryRequest r;
    r.set_name(name);
    r.set_cuda_ipc_handle(handle);
    r.set_byte_size(size);
    r.set_offset(offset);
    return r;
  };
  auto reg = [this](v1::RegisterSharedMemoryRequest r) {
    return [this, r] { return client_->RegisterSharedMemory(r).status(); };
  };
  const std::string handle(64, '\x5a');
  Expect("well-formed handle, CPU backend", StatusCode::kFailedPrecondition, {"CUDA backend", "on the CPU"},
         reg(ipc("g", handle, 4096, 0)));
  Expect("short handle", StatusCode::kInvalidArgument, {"cuda_ipc_handle has 63 bytes", "expected 64"},
         reg(ipc("g", std::string(63, 'h'), 4096, 0)));
  Expect("200 KiB handle", StatusCode::kInvalidArgument, {"cuda_ipc_handle has 204800 bytes"},
         reg(ipc("g", std::string(200 << 10, 'h'), 4096, 0)));
  v1::RegisterSharedMemoryRequest bad_event = ipc("g", handle, 4096, 0);
  bad_event.set_cuda_ipc_event_handle(std::string(7, 'e'));
  Expect("malformed event handle", StatusCode::kInvalidArgument, {"cuda_ipc_event_handle has 7 bytes"}, reg(bad_event));
  v1::RegisterSharedMemoryRequest both = ipc("g", handle, 4096, 0);
  both.set_key(key_);
  Expect("a key and a handle", StatusCode::kInvalidArgument, {"key and cuda_ipc_handle are both set"}, reg(both));
  Expect("negative size", StatusCode::kInvalidArgument, {"byte_size = -1"}, reg(ipc("g", handle, -1, 0)));
  Expect("negative offset", StatusCode::kInvalidArgument, {"offset = -3"}, reg(ipc("g", handle, 16, -3)));
  Expect("offset + size overflows", StatusCode::kInvalidArgument, {"overflows"},
         reg(ipc("g", handle, 16, INT64_MAX - 8)));
  v1::RegisterSharedMemoryRequest bad_device = ipc("g", handle, 4096, 0);
  bad_device.set_device(-1);
  Expect("negative device", StatusCode::kInvalidArgument, {"device = -1"}, reg(bad_device));
  Expect("name in use", StatusCode::kAlreadyExists, {"\"r\" is already registered"}, reg(ipc("r", handle, 16, 0)));
}

// Without --allow_shared_memory a CUDA IPC registration is refused naming the flag.
TEST(SharedMemoryOff, CudaIpcRegistrationNamesTheFlag) {
  auto server = StartServer(LoopbackOptions());
  ASSERT_NE(server, nullptr);
  auto client = ConnectTo(*server);
  v1::RegisterSharedMemoryRequest r;
  r.set_name("g");
  r.set_cuda_ipc_handle(std::string(64, 'h'));
  r.set_byte_size(4096);
  EXPECT_TRUE(StatusIs(client->RegisterSharedMemory(r).status(), StatusCode::kFailedPrecondition,
                       {"--allow_shared_memory"}));
  auto regions = client->ListSharedMemory();
  ASSERT_TRUE(regions.ok()) << regions.status();
  EXPECT_TRUE(regions->empty());
}

}  // namespace
}  // namespace blockd::testing
