// Shared-memory tensors on a real server (CPU backend): Forward, Backward and InferStep (unary and
// on the Infer stream) give bitwise the bytes, gradients and session lengths the inline path gives;
// regions are private to the identity that registered them; a client that dies with regions
// registered leaves nothing once their TTL passes; a daemon without --allow_shared_memory refuses.
// ClientOptions::transport moves inline tensors through the client's own regions by itself.
#include <dirent.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "client/shared_memory_region.h"
#include "tests/integration/harness.h"

namespace blockd::testing {
namespace {

using absl::StatusCode;

ServerOptions ShmOptions() {
  ServerOptions o = LoopbackOptions();
  o.service.shared_memory.allowed = true;
  return o;
}

int64_t Bytes(const v1::Tensor& t) { return static_cast<int64_t>(t.data().size()); }

// The same request with its input moved into `region` at `in_at`, and the reply asked at `out_at`.
v1::Tensor ToRegion(SharedMemoryRegion& region, int64_t at, const v1::Tensor& t) {
  auto r = region.Put(at, t.dtype(), std::vector<int64_t>(t.shape().begin(), t.shape().end()), t.data());
  EXPECT_TRUE(r.ok()) << r.status();
  return r.ok() ? *r : v1::Tensor();
}

// Open file descriptors of this process (the server runs in it) that point at `key`'s object.
int OpenDescriptorsOf(const std::string& key) {
  int n = 0;
  DIR* d = opendir("/proc/self/fd");
  if (d == nullptr) return -1;
  while (dirent* e = readdir(d)) {
    char target[512];
    const std::string link = absl::StrCat("/proc/self/fd/", e->d_name);
    const ssize_t len = readlink(link.c_str(), target, sizeof(target) - 1);
    if (len <= 0) continue;
    target[len] = 0;
    if (absl::StrContains(target, key.substr(1))) ++n;
  }
  closedir(d);
  return n;
}

TEST(SharedMemory, ForwardAndBackwardAreBitwiseTheInlinePath) {
  auto server = StartServer(ShmOptions());
  ASSERT_NE(server, nullptr);
  auto client = ConnectTo(*server);
  // Two blocks from one seed: one trained inline, one through shared memory.
  for (const char* id : {"inline", "shm"}) {
    ASSERT_OK(client->CreateBlock(CreateRequest(id, TinyConfig(true), 11)).status());
  }
  auto region = SharedMemoryRegion::Create(client.get(), 1 << 20);
  ASSERT_TRUE(region.ok()) << region.status();
  for (v1::DType dtype : {v1::DTYPE_FLOAT32, v1::DTYPE_BFLOAT16}) {
    SCOPED_TRACE(v1::DType_Name(dtype));
    const v1::Tensor x = RandomTensor({2, 7, 32}, 100 + dtype, dtype);
    const v1::Tensor g = RandomTensor({2, 7, 32}, 200 + dtype, dtype);
    auto y_inline = client->Forward({"inline"}, x, true);
    ASSERT_TRUE(y_inline.ok()) << y_inline.status();
    auto dx_inline = client->Backward(y_inline->activation_id(), g);
    ASSERT_TRUE(dx_inline.ok()) << dx_inline.status();

    v1::ForwardRequest fwd;
    fwd.add_block_ids("shm");
    *fwd.mutable_input() = ToRegion(**region, 0, x);
    fwd.set_keep_activations(true);
    *fwd.mutable_output_shared_memory() = (*region)->Ref(0, Bytes(x));  // in place
    auto y = client->Forward(fwd);
    ASSERT_TRUE(y.ok()) << y.status();
    EXPECT_TRUE(y->output().data().empty()) << "the reply carried bytes instead of a reference";
    EXPECT_EQ(y->output().shared_memory().byte_size(), Bytes(x));
    EXPECT_EQ(std::vector<int64_t>(y->output().shape().begin(), y->output().shape().end()),
              std::vector<int64_t>({2, 7, 32}));
    auto y_bytes = (*region)->Get(y->output());
    ASSERT_TRUE(y_bytes.ok()) << y_bytes.status();
    EXPECT_TRUE(*y_bytes == y_inline->output().data()) << "Forward output differs from the inline path";

    v1::BackwardRequest bwd;
    bwd.set_activation_id(y->activation_id());
    *bwd.mutable_grad_output() = ToRegion(**region, 4096, g);  // grad_output by reference, grad_input inline
    auto dx = client->Backward(bwd);
    ASSERT_TRUE(dx.ok()) << dx.status();
    EXPECT_TRUE(dx->grad_input().data() == dx_inline->grad_input().data()) << "grad_input differs";
  }
  // Gradients accumulated through both transports are the same bytes.
  EXPECT_EQ(DiffSnapshots(Download(*client, "inline", v1::TENSOR_KIND_GRADIENTS),
                          Download(*client, "shm", v1::TENSOR_KIND_GRADIENTS)),
            "");
}

TEST(SharedMemory, BackwardWritesGradInputIntoTheRegion) {
  auto server = StartServer(ShmOptions());
  ASSERT_NE(server, nullptr);
  auto client = ConnectTo(*server);
  ASSERT_OK(client->CreateBlock(CreateRequest("b", TinyConfig(), 5)).status());
  auto region = SharedMemoryRegion::Create(client.get(), 1 << 16);
  ASSERT_TRUE(region.ok()) << region.status();
  const v1::Tensor x = RandomTensor({1, 5, 32}, 1), g = RandomTensor({1, 5, 32}, 2);
  auto y1 = client->Forward({"b"}, x, true);
  ASSERT_TRUE(y1.ok()) << y1.status();
  auto dx_inline = client->Backward(y1->activation_id(), g);
  ASSERT_TRUE(dx_inline.ok()) << dx_inline.status();
  auto y2 = client->Forward({"b"}, x, true);
  ASSERT_TRUE(y2.ok()) << y2.status();
  v1::BackwardRequest bwd;
  bwd.set_activation_id(y2->activation_id());
  *bwd.mutable_grad_output() = ToRegion(**region, 0, g);
  *bwd.mutable_output_shared_memory() = (*region)->Ref(1000, 8192);  // larger than needed
  auto dx = client->Backward(bwd);
  ASSERT_TRUE(dx.ok()) << dx.status();
  EXPECT_TRUE(dx->grad_input().data().empty());
  auto bytes = (*region)->Get(dx->grad_input());
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  EXPECT_TRUE(*bytes == dx_inline->grad_input().data()) << "grad_input through the region differs";
}

TEST(SharedMemory, InferStepsAreBitwiseTheInlinePath) {
  auto server = StartServer(ShmOptions());
  ASSERT_NE(server, nullptr);
  auto client = ConnectTo(*server);
  ASSERT_OK(client->CreateBlock(CreateRequest("b", TinyConfig(true), 9)).status());
  auto region = SharedMemoryRegion::Create(client.get(), 1 << 16);
  ASSERT_TRUE(region.ok()) << region.status();
  v1::OpenSessionRequest open;
  open.add_block_ids("b");
  open.set_batch_size(2);
  open.set_max_length(16);
  auto a = client->OpenSession(open), b = client->OpenSession(open);
  ASSERT_TRUE(a.ok() && b.ok()) << a.status() << b.status();
  auto stream = client->OpenInferStream();
  ASSERT_TRUE(stream.ok()) << stream.status();
  for (int step = 0; step < 4; ++step) {
    const v1::Tensor x = RandomTensor({2, step == 0 ? 5 : 1, 32}, 300 + step);
    v1::InferStepRequest inline_req;
    inline_req.set_session_id(a->session_id());
    *inline_req.mutable_hidden_states() = x;
    auto ref = client->InferStep(inline_req);
    ASSERT_TRUE(ref.ok()) << ref.status();
    v1::InferStepRequest req;
    req.set_session_id(b->session_id());
    *req.mutable_hidden_states() = ToRegion(**region, 0, x);
    *req.mutable_output_shared_memory() = (*region)->Ref(4096, Bytes(x));
    // Even steps unary, odd ones on the Infer stream.
    auto got = step % 2 == 0 ? client->InferStep(req) : (*stream)->Step(req);
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(got->length(), ref->length());
    auto bytes = (*region)->Get(got->hidden_states());
    ASSERT_TRUE(bytes.ok()) << bytes.status();
    EXPECT_TRUE(*bytes == ref->hidden_states().data()) << "step " << step << " differs from the inline path";
  }
  ASSERT_OK((*stream)->Close());
}

TEST(SharedMemory, RegionsArePrivateToTheirIdentity) {
  auto server = StartServer(ShmOptions());
  ASSERT_NE(server, nullptr);
  auto alice = ConnectTo(*server, {.client_id = "alice"});
  auto bob = ConnectTo(*server, {.client_id = "bob"});
  ASSERT_OK(alice->CreateBlock(CreateRequest("b", TinyConfig(), 3)).status());
  auto region = SharedMemoryRegion::Create(alice.get(), 1 << 16, "acts");
  ASSERT_TRUE(region.ok()) << region.status();
  const v1::Tensor x = RandomTensor({1, 4, 32}, 7);
  v1::ForwardRequest fwd;
  fwd.add_block_ids("b");
  *fwd.mutable_input() = ToRegion(**region, 0, x);
  EXPECT_STATUS(bob->Forward(fwd).status(), StatusCode::kNotFound, "input.shared_memory", "\"acts\" not found");
  v1::ForwardRequest out_only;
  out_only.add_block_ids("b");
  *out_only.mutable_input() = x;
  *out_only.mutable_output_shared_memory() = (*region)->Ref(0, Bytes(x));
  EXPECT_STATUS(bob->Forward(out_only).status(), StatusCode::kNotFound, "output_shared_memory", "not found");
  EXPECT_STATUS(bob->UnregisterSharedMemory("acts"), StatusCode::kNotFound, "\"acts\" not found");
  auto listed = bob->ListSharedMemory();
  ASSERT_TRUE(listed.ok()) << listed.status();
  EXPECT_TRUE(listed->empty());
  // Bob may use the same name for a region of his own.
  auto bobs = SharedMemoryRegion::Create(bob.get(), 4096, "acts");
  EXPECT_TRUE(bobs.ok()) << bobs.status();
  // Alice's region still works for Alice.
  auto y = alice->Forward(fwd);
  EXPECT_TRUE(y.ok()) << y.status();
  auto mine = alice->ListSharedMemory();
  ASSERT_TRUE(mine.ok()) << mine.status();
  ASSERT_EQ(mine->size(), 1u);
  EXPECT_EQ((*mine)[0].name(), "acts");
}

TEST(SharedMemory, ADeadClientLeavesNothingAfterTheTtl) {
  ServerOptions o = ShmOptions();
  o.service.shared_memory.ttl = absl::Seconds(1);
  auto server = StartServer(o);
  ASSERT_NE(server, nullptr);
  auto client = ConnectTo(*server);
  // A client that registers and dies: its process would be gone, so nobody unregisters.
  const std::string key = "/blockd-test-dead-client-" + std::to_string(getpid());
  const int fd = shm_open(key.c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(ftruncate(fd, 1 << 16), 0);
  close(fd);
  v1::RegisterSharedMemoryRequest reg;
  reg.set_name("orphan");
  reg.set_key(key);
  reg.set_byte_size(1 << 16);
  ASSERT_OK(client->RegisterSharedMemory(reg).status());
  shm_unlink(key.c_str());  // as SharedMemoryRegion does right after registering
  EXPECT_EQ(OpenDescriptorsOf(key), 1) << "the server should hold the object open while registered";
  const absl::Time deadline = absl::Now() + absl::Seconds(30);
  bool gone = false;
  while (!gone && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(100));
    auto listed = client->ListSharedMemory();
    ASSERT_TRUE(listed.ok()) << listed.status();
    gone = listed->empty();
  }
  EXPECT_TRUE(gone) << "the region was not unregistered within 30 s of its 1 s TTL";
  EXPECT_EQ(OpenDescriptorsOf(key), 0) << "the server still holds the dead client's object open";
}

// ClientOptions::transport: the client moves inline tensors through its own regions by itself.
std::unique_ptr<Client> ConnectWith(const Server& server, Transport transport, const std::string& id,
                                    int64_t max_message_bytes = 256 << 20) {
  ClientOptions o;
  o.transport = transport;
  o.client_id = id;
  o.max_message_bytes = max_message_bytes;
  return ConnectTo(server, o);
}

TEST(SharedMemory, TheClientsAutoTransportIsBitwiseTheInlinePath) {
  auto server = StartServer(ShmOptions());
  ASSERT_NE(server, nullptr);
  // A 16 KiB message limit: the 64 KiB tensors below can only travel by reference.
  auto viaShm = ConnectWith(*server, Transport::kAuto, "auto", 16 << 10);
  auto viaMsg = ConnectWith(*server, Transport::kGrpc, "inline");
  for (const char* id : {"a", "m"}) ASSERT_OK(viaMsg->CreateBlock(CreateRequest(id, TinyConfig(true), 21)).status());
  const v1::Tensor x = RandomTensor({4, 128, 32}, 31);  // 64 KiB of fp32
  const v1::Tensor g = RandomTensor({4, 128, 32}, 32);
  EXPECT_STATUS(ConnectWith(*server, Transport::kGrpc, "small", 16 << 10)->Forward({"m"}, x, false).status(),
                StatusCode::kResourceExhausted);
  for (int round = 0; round < 2; ++round) {  // the second round reuses the region
    auto y_msg = viaMsg->Forward({"m"}, x, true);
    auto y_shm = viaShm->Forward({"a"}, x, true);
    ASSERT_TRUE(y_msg.ok() && y_shm.ok()) << y_msg.status() << y_shm.status();
    EXPECT_FALSE(y_shm->output().has_shared_memory()) << "the reply comes back inline";
    EXPECT_TRUE(y_shm->output().data() == y_msg->output().data()) << "round " << round << ": Forward differs";
    v1::BackwardRequest back;  // the request form, as built by hand
    back.set_activation_id(y_shm->activation_id());
    *back.mutable_grad_output() = g;
    auto dx_shm = viaShm->Backward(back);
    auto dx_msg = viaMsg->Backward(y_msg->activation_id(), g);
    ASSERT_TRUE(dx_msg.ok() && dx_shm.ok()) << dx_msg.status() << dx_shm.status();
    EXPECT_TRUE(dx_shm->grad_input().data() == dx_msg->grad_input().data()) << "round " << round;
  }
  auto ga = viaMsg->DownloadTensors("a", v1::TENSOR_KIND_GRADIENTS);
  auto gm = viaMsg->DownloadTensors("m", v1::TENSOR_KIND_GRADIENTS);
  ASSERT_TRUE(ga.ok() && gm.ok());
  for (size_t i = 0; i < gm->size(); ++i) EXPECT_EQ((*ga)[i].data, (*gm)[i].data) << (*gm)[i].name;
  // An InferStep the same way.
  v1::OpenSessionRequest open;
  open.add_block_ids("a");
  open.set_batch_size(4);
  open.set_max_length(128);
  auto sa = viaShm->OpenSession(open);
  open.set_block_ids(0, "m");
  auto sm = viaMsg->OpenSession(open);
  ASSERT_TRUE(sa.ok() && sm.ok()) << sa.status() << sm.status();
  v1::InferStepRequest step;
  *step.mutable_hidden_states() = x;
  step.set_session_id(sa->session_id());
  auto ia = viaShm->InferStep(step);
  step.set_session_id(sm->session_id());
  auto im = viaMsg->InferStep(step);
  ASSERT_TRUE(ia.ok() && im.ok()) << ia.status() << im.status();
  EXPECT_TRUE(ia->hidden_states().data() == im->hidden_states().data());
  auto regions = viaShm->ListSharedMemory();
  ASSERT_TRUE(regions.ok());
  EXPECT_EQ(regions->size(), 1u) << "calls one after another share one region";
  auto none = viaMsg->ListSharedMemory();
  ASSERT_TRUE(none.ok());
  EXPECT_TRUE(none->empty());
  viaShm.reset();  // the client's regions go with it
  auto after = ConnectWith(*server, Transport::kGrpc, "auto")->ListSharedMemory();
  ASSERT_TRUE(after.ok());
  EXPECT_TRUE(after->empty()) << "a closed client left its regions registered";
}

TEST(SharedMemory, TheClientsAutoTransportUsesARegionPerCallInFlight) {
  auto server = StartServer(ShmOptions());
  ASSERT_NE(server, nullptr);
  auto client = ConnectWith(*server, Transport::kAuto, "many");
  ASSERT_OK(client->CreateBlock(CreateRequest("b", TinyConfig(), 5)).status());
  const v1::Tensor x = RandomTensor({2, 64, 32}, 41);
  auto want = client->Forward({"b"}, x, false);
  ASSERT_TRUE(want.ok()) << want.status();
  std::vector<std::thread> threads;
  std::atomic<int> wrong{0};
  for (int t = 0; t < 6; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 10; ++i) {
        auto y = client->Forward({"b"}, x, false);
        if (!y.ok() || y->output().data() != want->output().data()) ++wrong;
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(wrong.load(), 0) << "calls in flight at once mixed their regions";
  auto regions = client->ListSharedMemory();
  ASSERT_TRUE(regions.ok());
  EXPECT_GE(regions->size(), 1u);
  EXPECT_LE(regions->size(), 8u);
}

TEST(SharedMemory, TheClientsAutoTransportFallsBackAndInsistingSaysWhy) {
  auto server = StartServer(LoopbackOptions());  // shared memory off
  ASSERT_NE(server, nullptr);
  auto autoClient = ConnectWith(*server, Transport::kAuto, "auto");
  ASSERT_OK(autoClient->CreateBlock(CreateRequest("b", TinyConfig(), 3)).status());
  const v1::Tensor x = RandomTensor({1, 4, 32}, 51);
  for (int i = 0; i < 2; ++i) ASSERT_OK(autoClient->Forward({"b"}, x, false).status());
  auto shmClient = ConnectWith(*server, Transport::kSharedMemory, "auto");
  EXPECT_STATUS(shmClient->Forward({"b"}, x, false).status(), StatusCode::kFailedPrecondition,
                "--allow_shared_memory");
  // A region that expires between calls (--shared_memory_ttl) is replaced and the call sent again.
  ServerOptions o = ShmOptions();
  o.service.shared_memory.ttl = absl::Seconds(1);
  auto short_ttl = StartServer(o);
  ASSERT_NE(short_ttl, nullptr);
  auto c = ConnectWith(*short_ttl, Transport::kSharedMemory, "ttl");
  ASSERT_OK(c->CreateBlock(CreateRequest("b", TinyConfig(), 3)).status());
  auto first = c->Forward({"b"}, x, false);
  ASSERT_TRUE(first.ok()) << first.status();
  const absl::Time deadline = absl::Now() + absl::Seconds(30);
  for (bool gone = false; !gone && absl::Now() < deadline;) {
    absl::SleepFor(absl::Milliseconds(100));
    auto listed = ConnectWith(*short_ttl, Transport::kGrpc, "ttl")->ListSharedMemory();
    ASSERT_TRUE(listed.ok());
    gone = listed->empty();
  }
  auto again = c->Forward({"b"}, x, false);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_TRUE(again->output().data() == first->output().data());
}

TEST(SharedMemory, OffUnlessAllowed) {
  auto server = StartServer(LoopbackOptions());
  ASSERT_NE(server, nullptr);
  auto client = ConnectTo(*server);
  auto info = client->GetServerInfo();
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_FALSE(info->shared_memory().allowed());
  auto region = SharedMemoryRegion::Create(client.get(), 4096);
  EXPECT_STATUS(region.status(), StatusCode::kFailedPrecondition, "--allow_shared_memory");
  ASSERT_OK(client->CreateBlock(CreateRequest("b", TinyConfig(), 3)).status());
  v1::ForwardRequest fwd;
  fwd.add_block_ids("b");
  fwd.mutable_input()->set_dtype(v1::DTYPE_FLOAT32);
  for (int64_t d : {1, 4, 32}) fwd.mutable_input()->add_shape(d);
  fwd.mutable_input()->mutable_shared_memory()->set_region("r");
  fwd.mutable_input()->mutable_shared_memory()->set_byte_size(512);
  EXPECT_STATUS(client->Forward(fwd).status(), StatusCode::kFailedPrecondition, "input.shared_memory",
                "--allow_shared_memory");
  auto allowed = StartServer(ShmOptions());
  ASSERT_NE(allowed, nullptr);
  auto c2 = ConnectTo(*allowed);
  auto info2 = c2->GetServerInfo();
  ASSERT_TRUE(info2.ok()) << info2.status();
  EXPECT_TRUE(info2->shared_memory().allowed());
}

}  // namespace
}  // namespace blockd::testing
