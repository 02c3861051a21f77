// Who may call and when: bearer tokens (UNAUTHENTICATED, PERMISSION_DENIED for admin RPCs), roles
// (read, train, admin), the identity quotas are keyed by (the token's principal, never the
// `blockd-client` header, when tokens are on), activation handles private to the identity that
// made them (another token or client name gets NOT_FOUND, as for an unknown id), per-identity
// concurrency shares with slots kept for admins, the drain (UNAVAILABLE during the grace period),
// TLS and mutual TLS with certificates made on the fly by the openssl command.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <fstream>
#include <thread>

#include <grpcpp/channel.h>
#include <grpcpp/client_context.h>
#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>
#include <grpcpp/support/channel_arguments.h>
#include <gtest/gtest.h>
#include <prometheus/registry.h>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "engine/cpu/cpu_backend.h"
#include "server/metrics_tls.h"
#include "tests/integration/harness.h"

namespace blockd::testing {
namespace {

using absl::StatusCode;

constexpr char kUserToken[] = "user-token-0123456789abcdef";
constexpr char kAdminToken[] = "admin-token-0123456789abcdef";

std::string WriteFile(const std::string& dir, const std::string& name, const std::string& text) {
  const std::string path = absl::StrCat(dir, "/", name);
  std::ofstream(path) << text;
  return path;
}

class Auth : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::string dir = MakeTempDir("auth");
    ServerOptions o = LoopbackOptions();
    o.auth_token_file = WriteFile(dir, "tokens", absl::StrCat("# users\n", kUserToken, "\n"));
    o.admin_token_file = WriteFile(dir, "admin", absl::StrCat(kAdminToken, "\n"));
    server_ = StartServer(o);
    ASSERT_NE(server_, nullptr);
    anonymous_ = ConnectTo(*server_);
    wrong_ = ConnectTo(*server_, {.token = "not-a-token-of-this-server"});
    user_ = ConnectTo(*server_, {.token = kUserToken});
    admin_ = ConnectTo(*server_, {.token = kAdminToken});
  }
  std::unique_ptr<Server> server_;
  std::unique_ptr<Client> anonymous_, wrong_, user_, admin_;
};

TEST_F(Auth, CallsWithoutAValidTokenAreUnauthenticated) {
  ASSERT_OK(admin_->CreateBlock(CreateRequest("t0", TinyConfig(), 1)).status());
  for (Client* c : {anonymous_.get(), wrong_.get()}) {
    const std::string expected = c == anonymous_.get() ? "missing bearer token" : "unknown bearer token";
    EXPECT_STATUS(c->GetServerInfo().status(), StatusCode::kUnauthenticated, expected);
    EXPECT_STATUS(c->ListBlocks().status(), StatusCode::kUnauthenticated, expected);
    EXPECT_STATUS(c->Forward({"t0"}, RandomTensor({1, 4, 32}, 1), true).status(), StatusCode::kUnauthenticated, expected);
    EXPECT_STATUS(c->DownloadTensors("t0", v1::TENSOR_KIND_WEIGHTS).status(), StatusCode::kUnauthenticated, expected);
    EXPECT_STATUS(c->LoadWeights("t0", RandomWeights(TinyConfig(), 2)).status(), StatusCode::kUnauthenticated, expected);
    EXPECT_STATUS(c->DeleteBlock("t0").status(), StatusCode::kUnauthenticated, expected);
    EXPECT_STATUS(c->CreateBlock(CreateRequest("t1", TinyConfig(), 1)).status(), StatusCode::kUnauthenticated, expected);
  }
  // Health stays open for probes.
  auto health = anonymous_->Health();
  ASSERT_OK(health.status());
  EXPECT_EQ(*health, HealthStatus::kServing);
  auto info = admin_->GetServerInfo();
  ASSERT_OK(info.status());
  EXPECT_EQ(info->blocks(), 1);
  EXPECT_EQ(info->activations_held(), 0) << "an unauthenticated Forward kept a handle";
}

TEST_F(Auth, UserTokensCannotCallAdminRpcs) {
  ASSERT_OK(admin_->CreateBlock(CreateRequest("t0", TinyConfig(), 1)).status());
  const BlockState before = StateOf(*admin_, "t0");
  EXPECT_STATUS(user_->CreateBlock(CreateRequest("t1", TinyConfig(), 1)).status(), StatusCode::kPermissionDenied,
                "needs the admin role; token-1 has the train role");
  EXPECT_STATUS(user_->LoadWeights("t0", RandomWeights(TinyConfig(), 2)).status(), StatusCode::kPermissionDenied,
                "needs the admin role; token-1 has the train role");
  EXPECT_STATUS(user_->DeleteBlock("t0").status(), StatusCode::kPermissionDenied, "needs the admin role; token-1 has the train role");
  EXPECT_STATUS(user_->SaveCheckpoint({}).status(), StatusCode::kPermissionDenied, "needs the admin role; token-1 has the train role");
  EXPECT_STATUS(user_->RestoreCheckpoint({}).status(), StatusCode::kPermissionDenied, "needs the admin role; token-1 has the train role");
  EXPECT_EQ(DiffStates(before, StateOf(*admin_, "t0")), "") << "a denied call changed t0";
  auto blocks = user_->ListBlocks();
  ASSERT_OK(blocks.status());
  ASSERT_EQ(blocks->size(), 1u) << "a denied CreateBlock or DeleteBlock took effect";

  // Training RPCs are open to user tokens.
  TrainStep(*user_, {"t0"}, RandomTensor({1, 4, 32}, 3), 4);
  v1::StepRequest step;
  step.add_block_ids("t0");
  ASSERT_OK(user_->Step(step).status());
  ASSERT_OK(user_->DownloadTensors("t0", v1::TENSOR_KIND_ADAM_M).status());
  // The admin token works for everything.
  ASSERT_OK(admin_->LoadWeights("t0", RandomWeights(TinyConfig(), 2)).status());
  ASSERT_OK(admin_->DeleteBlock("t0").status());
}

// ---- Activation handles belong to their caller ----

// `owner` keeps a handle; `other` (another identity) can neither Backward nor release it, and hears
// the same NOT_FOUND as for an id that never existed; the owner's Backward still works after.
void ExpectHandleIsPrivate(Client& owner, Client& other, Client& observer, const std::string& block) {
  const v1::Tensor x = RandomTensor({1, 4, 32}, 11), dy = RandomTensor({1, 4, 32}, 12);
  auto kept = owner.Forward({block}, x, true);
  ASSERT_OK(kept.status());
  const std::string id = kept->activation_id();
  const std::string unknown = "act-" + std::string(32, '0');
  const BlockState before = StateOf(observer, block);

  const absl::Status stolen = other.Backward(id, dy).status();
  const absl::Status never = other.Backward(unknown, dy).status();
  EXPECT_STATUS(stolen, StatusCode::kNotFound, "not found");
  std::string shown(stolen.message()), shown_unknown(never.message());
  if (shown.find(id) != std::string::npos) shown.replace(shown.find(id), id.size(), "<id>");
  if (shown_unknown.find(unknown) != std::string::npos) {
    shown_unknown.replace(shown_unknown.find(unknown), unknown.size(), "<id>");
  }
  EXPECT_EQ(shown, shown_unknown) << "another identity's handle reads differently from an unknown id";
  EXPECT_STATUS(other.ReleaseActivations(id), StatusCode::kNotFound, "not found");
  EXPECT_EQ(DiffStates(before, StateOf(observer, block)), "") << "another identity's Backward changed " << block;
  auto info = observer.GetServerInfo();
  ASSERT_OK(info.status());
  EXPECT_EQ(info->activations_held(), 1) << "another identity's calls freed the handle";

  ASSERT_OK(owner.Backward(id, dy).status()) << "the owner's Backward after the other identity's attempts";
  info = observer.GetServerInfo();
  ASSERT_OK(info.status());
  EXPECT_EQ(info->activations_held(), 0);
}

TEST(HandleOwnership, AnotherTokensBackwardAndReleaseAreNotFound) {
  const std::string dir = MakeTempDir("owners");
  ServerOptions o = LoopbackOptions();
  o.auth_token_file = WriteFile(dir, "tokens", absl::StrCat(kUserToken, "\n", kUserToken, "-two\n"));
  o.admin_token_file = WriteFile(dir, "admin", absl::StrCat(kAdminToken, "\n"));
  auto server = StartServer(o);
  ASSERT_NE(server, nullptr);
  auto admin = ConnectTo(*server, {.token = kAdminToken});
  auto one = ConnectTo(*server, {.token = kUserToken});
  auto two = ConnectTo(*server, {.token = absl::StrCat(kUserToken, "-two")});
  ASSERT_OK(admin->CreateBlock(CreateRequest("o0", TinyConfig(), 1)).status());
  ExpectHandleIsPrivate(*one, *two, *admin, "o0");
  ExpectHandleIsPrivate(*two, *one, *admin, "o0");
  ExpectHandleIsPrivate(*one, *admin, *admin, "o0");  // an admin token is another identity too
  // A client name sent beside a token does not change whose the handle is.
  auto one_named = ConnectTo(*server, {.token = kUserToken, .client_id = "renamed"});
  auto two_as_one = ConnectTo(*server, {.token = absl::StrCat(kUserToken, "-two"), .client_id = "token-1"});
  ExpectHandleIsPrivate(*one_named, *two_as_one, *admin, "o0");
}

TEST(HandleOwnership, AnotherClientNamesBackwardAndReleaseAreNotFoundWithoutAuth) {
  auto server = StartServer(LoopbackOptions());
  ASSERT_NE(server, nullptr);
  auto a = ConnectTo(*server, {.client_id = "trainer-a"});
  auto b = ConnectTo(*server, {.client_id = "trainer-b"});
  ASSERT_OK(a->CreateBlock(CreateRequest("o0", TinyConfig(), 1)).status());
  ExpectHandleIsPrivate(*a, *b, *a, "o0");
  ExpectHandleIsPrivate(*b, *a, *a, "o0");
}

// ---- Roles ----

constexpr char kReader[] = "reader-token-0123456789abcdef";
constexpr char kTrainer[] = "trainer-token-0123456789abcdef";
constexpr char kRoot[] = "root-token-0123456789abcdef";

class Roles : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::string dir = MakeTempDir("roles");
    ServerOptions o = LoopbackOptions();
    o.token_file = WriteFile(dir, "tokens",
                             absl::StrCat("# NAME ROLE TOKEN\nreader read ", kReader, "\ntrainer train ", kTrainer,
                                          "\n\troot   admin  ", kRoot, "\n"));
    o.checkpoint_dir = dir + "/checkpoints";
    o.engine.max_activations_per_client = 2;
    server_ = StartServer(o);
    ASSERT_NE(server_, nullptr);
    reader_ = ConnectTo(*server_, {.token = kReader});
    trainer_ = ConnectTo(*server_, {.token = kTrainer});
    admin_ = ConnectTo(*server_, {.token = kRoot});
  }
  std::unique_ptr<Server> server_;
  std::unique_ptr<Client> reader_, trainer_, admin_;
};

TEST_F(Roles, EachRoleCallsWhatItsRoleAllowsAndIsDeniedTheRestWithoutAChange) {
  ASSERT_OK(admin_->CreateBlock(CreateRequest("r0", TinyConfig(), 1)).status());
  TrainStep(*admin_, {"r0"}, RandomTensor({1, 4, 32}, 2), 3);
  const v1::Tensor x = RandomTensor({1, 4, 32}, 4);
  const BlockState before = StateOf(*admin_, "r0");
  auto denied = [](const absl::Status& s, const char* role, const char* who) {
    EXPECT_STATUS(s, StatusCode::kPermissionDenied, absl::StrCat("needs the ", role, " role; ", who));
  };
  v1::StepRequest step;
  step.add_block_ids("r0");

  // read: look, run inference, download weights.
  ASSERT_OK(reader_->GetServerInfo().status());
  ASSERT_OK(reader_->ListBlocks().status());
  ASSERT_OK(reader_->GetBlock("r0").status());
  ASSERT_OK(reader_->Forward({"r0"}, x, false).status());
  ASSERT_OK(reader_->DownloadTensors("r0", v1::TENSOR_KIND_WEIGHTS).status());
  denied(reader_->Forward({"r0"}, x, true).status(), "train", "reader has the read role");
  denied(reader_->Backward("act-1", x).status(), "train", "reader has the read role");
  denied(reader_->ReleaseActivations("act-1"), "train", "reader has the read role");
  denied(reader_->ZeroGrad({"r0"}), "train", "reader has the read role");
  denied(reader_->Step(step).status(), "train", "reader has the read role");
  for (v1::TensorKind kind : {v1::TENSOR_KIND_GRADIENTS, v1::TENSOR_KIND_ADAM_M, v1::TENSOR_KIND_ADAM_V}) {
    denied(reader_->DownloadTensors("r0", kind).status(), "train", "reader has the read role");
  }
  for (Client* c : {reader_.get(), trainer_.get()}) {
    const char* who = c == reader_.get() ? "reader has the read role" : "trainer has the train role";
    denied(c->CreateBlock(CreateRequest("r1", TinyConfig(), 1)).status(), "admin", who);
    denied(c->LoadWeights("r0", RandomWeights(TinyConfig(), 5)).status(), "admin", who);
    denied(c->DeleteBlock("r0").status(), "admin", who);
    denied(c->SaveCheckpoint({}).status(), "admin", who);
    denied(c->RestoreCheckpoint({}).status(), "admin", who);
  }
  EXPECT_EQ(DiffStates(before, StateOf(*admin_, "r0")), "") << "a denied call changed r0";
  auto blocks = admin_->ListBlocks();
  ASSERT_OK(blocks.status());
  EXPECT_EQ(blocks->size(), 1u) << "a denied CreateBlock or DeleteBlock took effect";

  // train: the training loop and its state.
  TrainStep(*trainer_, {"r0"}, x, 6);
  ASSERT_OK(trainer_->Step(step).status());
  ASSERT_OK(trainer_->DownloadTensors("r0", v1::TENSOR_KIND_ADAM_V).status());
  ASSERT_OK(trainer_->ZeroGrad({"r0"}));
  // admin: everything.
  ASSERT_OK(admin_->LoadWeights("r0", RandomWeights(TinyConfig(), 7)).status());
  ASSERT_OK(admin_->SaveCheckpoint({}).status());
  ASSERT_OK(admin_->DeleteBlock("r0").status());
}

TEST(TokenFile, MistakesAreNamedWithTheirLine) {
  const std::string dir = MakeTempDir("tokenfile");
  auto start = [&](const std::string& text) {
    ServerOptions o = LoopbackOptions();
    o.token_file = WriteFile(dir, "tokens", text);
    return Server::Start(o, MakeCpuBackend()).status();
  };
  EXPECT_STATUS(start("alice superuser 0123456789abcdef0\n"), StatusCode::kInvalidArgument,
                "line 1: role \"superuser\" is not read, train or admin");
  EXPECT_STATUS(start("# x\nalice train short\n"), StatusCode::kInvalidArgument, "line 2", "at least 16 characters");
  EXPECT_STATUS(start("alice train 0123456789abcdef0 extra\n"), StatusCode::kInvalidArgument,
                "expected `NAME ROLE TOKEN`, got 4 fields");
  EXPECT_STATUS(start("alice train 0123456789abcdef0\nbob read 0123456789abcdef0\n"), StatusCode::kInvalidArgument,
                "the token of bob is also the token of alice");
  EXPECT_STATUS(start("alice train 0123456789abcdef0\nalice read 0123456789abcdef1\n"),
                StatusCode::kInvalidArgument, "principal alice is named twice");
}

// ---- Identity and concurrency shares ----

constexpr char kAlice[] = "alice-token-0123456789abcdef";
constexpr char kBob[] = "bob-token-0123456789abcdef";

TEST(Identity, WithTokensTheQuotaKeyIsTheTokensPrincipalNeverTheHeader) {
  const std::string dir = MakeTempDir("identity");
  ServerOptions o = LoopbackOptions();
  o.token_file = WriteFile(dir, "tokens", absl::StrCat("alice train ", kAlice, "\nbob train ", kBob, "\nroot admin ",
                                                       kRoot, "\n"));
  o.engine.max_activations_per_client = 2;
  auto server = StartServer(o);
  ASSERT_NE(server, nullptr);
  auto admin = ConnectTo(*server, {.token = kRoot});
  ASSERT_OK(admin->CreateBlock(CreateRequest("q", TinyConfig(), 1)).status());
  const v1::Tensor x = RandomTensor({1, 4, 32}, 1);
  // Alice changes her `blockd-client` name on every call, and finally names bob.
  for (const char* name : {"a1", "a2"}) {
    ASSERT_OK(ConnectTo(*server, {.token = kAlice, .client_id = name})->Forward({"q"}, x, true).status());
  }
  for (const char* name : {"a3", "bob"}) {
    EXPECT_STATUS(ConnectTo(*server, {.token = kAlice, .client_id = name})->Forward({"q"}, x, true).status(),
                  StatusCode::kResourceExhausted, "client alice already holds 2 activation handles");
  }
  // Bob's quota is his own: alice naming him took none of it.
  auto bob = ConnectTo(*server, {.token = kBob, .client_id = "alice"});
  ASSERT_OK(bob->Forward({"q"}, x, true).status());
  ASSERT_OK(bob->Forward({"q"}, x, true).status());
  EXPECT_STATUS(bob->Forward({"q"}, x, true).status(), StatusCode::kResourceExhausted, "client bob already holds 2");
}

TEST(Identity, WithoutTokensTheHeaderOnlyNamesAClientBehindThePeersAddress) {
  ServerOptions o = LoopbackOptions();
  o.engine.max_activations_per_client = 1;
  auto server = StartServer(o);
  ASSERT_NE(server, nullptr);
  auto c = ConnectTo(*server, {.client_id = "worker-3"});
  ASSERT_OK(c->CreateBlock(CreateRequest("q", TinyConfig(), 1)).status());
  ASSERT_OK(c->Forward({"q"}, RandomTensor({1, 4, 32}, 1), true).status());
  EXPECT_STATUS(c->Forward({"q"}, RandomTensor({1, 4, 32}, 2), true).status(), StatusCode::kResourceExhausted,
                "client ipv4:127.0.0.1/worker-3 already holds 1");
}

// With max 8: a quarter (2) per identity, and 1 kept for admins. Four identities that each hold
// their share fill the 7 open slots; the 8th call is refused and the admin still gets in.
TEST(Identity, OneIdentityHoldsAShareOfTheSlotsAndAdminsKeepSome) {
  const std::string dir = MakeTempDir("shares");
  std::string tokens = absl::StrCat("root admin ", kRoot, "\n");
  for (int i = 0; i < 4; ++i) absl::StrAppend(&tokens, "user", i, " train user", i, "-token-0123456789abcdef\n");
  ServerOptions o = LoopbackOptions();
  o.token_file = WriteFile(dir, "tokens", tokens);
  o.service.max_concurrent_rpcs = 8;
  auto server = StartServer(o);
  ASSERT_NE(server, nullptr);
  auto admin = ConnectTo(*server, {.token = kRoot});
  // A block of ~4 MB of weights, far more than the stalled readers' 64 KiB windows.
  v1::BlockConfig c = TinyConfig(false, 256);
  c.set_num_attention_heads(4);
  c.set_num_kv_heads(4);
  c.set_head_dim(64);
  c.set_intermediate_size(1024);
  ASSERT_OK(admin->CreateBlock(CreateRequest("s", c, 1)).status());
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_HTTP2_BDP_PROBE, 0);
  args.SetInt(GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES, 64 << 10);
  auto stub = v1::BlockService::NewStub(
      grpc::CreateCustomChannel(TargetOf(*server), grpc::InsecureChannelCredentials(), args));
  // Downloads that read one chunk and stop: each holds its slot.
  struct Held {
    std::unique_ptr<grpc::ClientContext> ctx;
    std::unique_ptr<grpc::ClientReader<v1::TensorChunk>> reader;
    bool admitted = false;
  };
  std::vector<Held> held;
  for (int i = 0; i < 4; ++i) {
    for (int j = 0; j < 2; ++j) {
      Held h;
      h.ctx = std::make_unique<grpc::ClientContext>();
      h.ctx->AddMetadata("authorization", absl::StrCat("Bearer user", i, "-token-0123456789abcdef"));
      v1::DownloadTensorsRequest r;
      r.set_block_id("s");
      r.set_kind(v1::TENSOR_KIND_WEIGHTS);
      h.reader = stub->DownloadTensors(h.ctx.get(), r);
      v1::TensorChunk chunk;
      h.admitted = h.reader->Read(&chunk);
      held.push_back(std::move(h));
    }
    if (i == 0) {  // user0 holds its share while the server has room
      EXPECT_STATUS(ConnectTo(*server, {.token = "user0-token-0123456789abcdef"})->ListBlocks().status(),
                    StatusCode::kResourceExhausted,
                    "client user0 already has 2 calls in flight (--max_concurrent_rpcs_per_client=2)");
    }
  }
  int admitted = 0;
  for (const Held& h : held) admitted += h.admitted;
  EXPECT_EQ(admitted, 7) << "4 identities x 2 calls, with 1 of 8 slots kept for admins";
  EXPECT_FALSE(held.back().admitted);
  if (!held.back().admitted) {
    EXPECT_STATUS(FromGrpcStatus(held.back().reader->Finish()), StatusCode::kResourceExhausted,
                  "blockd is serving 7 calls already (--max_concurrent_rpcs) and keeps 1 of its 8 for admin calls");
  }
  ASSERT_OK(admin->GetServerInfo().status()) << "the users locked the admin out";
  auto user0 = ConnectTo(*server, {.token = "user0-token-0123456789abcdef"});
  for (Held& h : held) h.ctx->TryCancel();
  for (Held& h : held) {
    if (h.admitted) h.reader->Finish();
  }
  absl::Status again = absl::UnknownError("not tried");
  for (int i = 0; i < 300 && !again.ok(); ++i, absl::SleepFor(absl::Milliseconds(10))) again = user0->ListBlocks().status();
  EXPECT_TRUE(again.ok()) << "cancelled streams kept their slots: " << again;
}

TEST(Drain, NewCallsAreUnavailableDuringTheGracePeriod) {
  ServerOptions o = LoopbackOptions();
  o.drain_grace = absl::Seconds(2);
  auto server = StartServer(o);
  ASSERT_NE(server, nullptr);
  auto client = ConnectTo(*server);
  ASSERT_NE(client, nullptr);
  ASSERT_OK(client->CreateBlock(CreateRequest("d0", TinyConfig(), 1)).status());

  const absl::Time start = absl::Now();
  std::thread drainer([&] { server->Drain(); });
  // Health turns NOT_SERVING first; then new calls are refused while the listener still accepts.
  bool not_serving = false;
  while (!not_serving && absl::Now() - start < absl::Milliseconds(1500)) {
    auto h = client->Health();
    not_serving = h.ok() && *h == HealthStatus::kNotServing;
    if (!not_serving) absl::SleepFor(absl::Milliseconds(10));
  }
  EXPECT_TRUE(not_serving) << "health did not turn NOT_SERVING";
  EXPECT_STATUS(client->GetServerInfo().status(), StatusCode::kUnavailable, "blockd is draining");
  EXPECT_STATUS(client->Forward({"d0"}, RandomTensor({1, 4, 32}, 1), false).status(), StatusCode::kUnavailable,
                "blockd is draining");
  EXPECT_STATUS(client->DownloadTensors("d0", v1::TENSOR_KIND_WEIGHTS).status(), StatusCode::kUnavailable,
                "blockd is draining");
  EXPECT_STATUS(client->LoadWeights("d0", RandomWeights(TinyConfig(), 2)).status(), StatusCode::kUnavailable,
                "blockd is draining");
  EXPECT_LT(absl::Now() - start, absl::Seconds(2)) << "the checks ran past the grace period; they prove nothing";
  drainer.join();
  EXPECT_GE(absl::Now() - start, absl::Seconds(2)) << "Drain returned before its grace period";
  EXPECT_FALSE(client->GetServerInfo(CallOptions{absl::Seconds(2)}).ok()) << "the server still answers after Drain";
}

// ---- TLS ----

// A CA, a server certificate for localhost/127.0.0.1 and a client certificate, made by openssl.
struct Pki {
  std::string dir, ca, server_cert, server_key, client_cert, client_key, other_ca, other_cert, other_key;
};

bool Run(const std::string& cmd) {
  const int rc = std::system((cmd + " >/dev/null 2>&1").c_str());
  if (rc != 0) ADD_FAILURE() << "`" << cmd << "` exited with " << rc;
  return rc == 0;
}

bool MakeCa(const std::string& dir, const std::string& name) {
  return Run(absl::StrCat("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2",
                          " -subj '/CN=blockd test ", name, "' -keyout ", dir, "/", name, ".key -out ", dir, "/", name,
                          ".pem -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign"));
}

bool MakeLeaf(const std::string& dir, const std::string& ca, const std::string& name, const std::string& cn,
              const std::string& ext) {
  const std::string ext_file = WriteFile(dir, name + ".ext", ext);
  return Run(absl::StrCat("openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj '/CN=", cn,
                          "' -keyout ", dir, "/", name, ".key -out ", dir, "/", name, ".csr")) &&
         Run(absl::StrCat("openssl x509 -req -days 2 -in ", dir, "/", name, ".csr -CA ", dir, "/", ca, ".pem -CAkey ",
                          dir, "/", ca, ".key -CAcreateserial -out ", dir, "/", name, ".pem -extfile ", ext_file));
}

Pki MakePki() {
  Pki p;
  p.dir = MakeTempDir("pki");
  const bool ok =
      MakeCa(p.dir, "ca") && MakeCa(p.dir, "other-ca") &&
      MakeLeaf(p.dir, "ca", "server", "localhost",
               "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n") &&
      MakeLeaf(p.dir, "ca", "client", "blockd-test-client", "extendedKeyUsage=clientAuth\n") &&
      MakeLeaf(p.dir, "other-ca", "other", "blockd-test-intruder", "extendedKeyUsage=clientAuth\n");
  if (!ok) return p;
  p.ca = p.dir + "/ca.pem";
  p.server_cert = p.dir + "/server.pem";
  p.server_key = p.dir + "/server.key";
  p.client_cert = p.dir + "/client.pem";
  p.client_key = p.dir + "/client.key";
  p.other_ca = p.dir + "/other-ca.pem";
  p.other_cert = p.dir + "/other.pem";
  p.other_key = p.dir + "/other.key";
  return p;
}

TEST(Tls, ServerCertificateIsVerifiedAgainstTheCa) {
  const Pki pki = MakePki();
  ASSERT_FALSE(pki.ca.empty());
  ServerOptions o = LoopbackOptions();
  o.tls.cert_file = pki.server_cert;
  o.tls.key_file = pki.server_key;
  auto server = StartServer(o);
  ASSERT_NE(server, nullptr);

  auto good = ConnectTo(*server, {.tls_ca_file = pki.ca});
  auto info = good->GetServerInfo();
  ASSERT_OK(info.status());
  EXPECT_EQ(info->backend(), "cpu");
  ASSERT_OK(good->CreateBlock(CreateRequest("tls0", TinyConfig(), 1)).status());
  ASSERT_OK(good->Forward({"tls0"}, RandomTensor({1, 4, 32}, 1), false).status());
  auto by_name = ConnectTo(*server, {.tls_ca_file = pki.ca, .tls_server_name = "localhost"});
  ASSERT_OK(by_name->GetServerInfo().status());

  const CallOptions quick{absl::Seconds(5)};
  auto plaintext = ConnectTo(*server);
  EXPECT_STATUS(plaintext->GetServerInfo(quick).status(), StatusCode::kUnavailable);
  auto wrong_ca = ConnectTo(*server, {.tls_ca_file = pki.other_ca});
  EXPECT_STATUS(wrong_ca->GetServerInfo(quick).status(), StatusCode::kUnavailable);
  auto wrong_name = ConnectTo(*server, {.tls_ca_file = pki.ca, .tls_server_name = "blockd.example.com"});
  EXPECT_STATUS(wrong_name->GetServerInfo(quick).status(), StatusCode::kUnavailable);
  EXPECT_STATUS(Client::Connect({.tls_ca_file = pki.dir + "/missing.pem"}).status(), StatusCode::kNotFound,
                "cannot read TLS CA file");
}

TEST(Tls, AKeyThatIsNotTheCertificatesIsNamedAsSuch) {
  const Pki pki = MakePki();
  ASSERT_FALSE(pki.ca.empty());
  ServerOptions o = LoopbackOptions();
  o.tls.cert_file = pki.server_cert;
  o.tls.key_file = pki.client_key;  // a valid key, of another certificate
  EXPECT_STATUS(Server::Start(o, MakeCpuBackend()).status(), StatusCode::kInvalidArgument,
                absl::StrCat("the private key in --tls_key ", pki.client_key,
                             " does not belong to the certificate in --tls_cert ", pki.server_cert));
  o.tls.key_file = pki.server_cert;  // not a key at all
  EXPECT_STATUS(Server::Start(o, MakeCpuBackend()).status(), StatusCode::kInvalidArgument,
                absl::StrCat("--tls_key ", pki.server_cert, " holds no unencrypted PEM private key"));
  o.tls.key_file = pki.server_key;
  o.tls.cert_file = pki.server_key;
  EXPECT_STATUS(Server::Start(o, MakeCpuBackend()).status(), StatusCode::kInvalidArgument,
                absl::StrCat("--tls_cert ", pki.server_key, " holds no PEM certificate"));
}

TEST(Tls, MetricsAreServedOverHttpsOnlyWithMetricsTlsCert) {
  const Pki pki = MakePki();
  ASSERT_FALSE(pki.ca.empty());
  ServerOptions o = LoopbackOptions(/*with_metrics=*/true);
  o.metrics_tls = {pki.server_cert, pki.client_key};
  EXPECT_STATUS(Server::Start(o, MakeCpuBackend()).status(), StatusCode::kInvalidArgument,
                absl::StrCat("the private key in --metrics_tls_key ", pki.client_key, " does not belong"));
  o.metrics_tls = {pki.server_cert, pki.server_key};
  auto server = StartServer(o);
  ASSERT_NE(server, nullptr);
  ASSERT_GT(server->metrics_port(), 0);
  auto client = ConnectTo(*server);
  ASSERT_OK(client->GetServerInfo().status());
  EXPECT_EQ(HttpGetBody(server->metrics_port(), "/metrics"), "") << "plain HTTP was answered";
  const std::string out = pki.dir + "/metrics.txt";
  ASSERT_TRUE(blockd::testing::Run(absl::StrCat("curl -sf -m 10 --cacert ", pki.ca, " -o ", out, " https://127.0.0.1:",
                               server->metrics_port(), "/metrics")));
  std::ifstream in(out);
  const std::string body((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_NE(body.find("blockd_requests_total{code=\"OK\",method=\"GetServerInfo\"} 1"), std::string::npos) << body;
  // A client that connects and says nothing holds the endpoint for at most its 5 s deadline.
  const int silent = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr = {};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(server->metrics_port()));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(connect(silent, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  EXPECT_TRUE(blockd::testing::Run(absl::StrCat("curl -sf -m 10 --cacert ", pki.ca, " -o /dev/null https://127.0.0.1:",
                               server->metrics_port(), "/metrics")));
  close(silent);
}

// The HTTPS endpoint serves one connection at a time, so each has one overall deadline: a client
// that drips a byte every 200 ms (never idle long enough for a per-read timeout) is cut off at the
// deadline, and a scrape queued behind it is answered right after.
TEST(Tls, ASlowDripClientHoldsHttpsMetricsForAtMostTheConnectionDeadline) {
  const Pki pki = MakePki();
  ASSERT_FALSE(pki.ca.empty());
  constexpr absl::Duration kDeadline = absl::Seconds(1);
  auto https = TlsMetricsServer::Start("127.0.0.1:0", pki.server_cert, pki.server_key,
                                       std::make_shared<prometheus::Registry>(), kDeadline);
  ASSERT_TRUE(https.ok()) << https.status();
  const int port = (*https)->port();

  const int drip = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr = {};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(connect(drip, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  const absl::Time connected = absl::Now();
  // A TLS handshake record announcing 16 KiB, then its body a byte at a time, for up to 8 s.
  const unsigned char header[] = {0x16, 0x03, 0x01, 0x40, 0x00};
  ASSERT_EQ(send(drip, header, sizeof(header), MSG_NOSIGNAL), static_cast<ssize_t>(sizeof(header)));
  std::atomic<int64_t> cut_after_ms{-1};
  std::thread dripper([&] {
    while (absl::Now() - connected < absl::Seconds(8)) {
      pollfd p = {drip, POLLIN, 0};
      if (poll(&p, 1, 200) > 0) {  // the server closed it (end of file, or a reset)
        char c;
        if (recv(drip, &c, 1, 0) <= 0) {
          cut_after_ms = absl::ToInt64Milliseconds(absl::Now() - connected);
          return;
        }
      }
      const char zero = 0;
      if (send(drip, &zero, 1, MSG_NOSIGNAL) != 1) {
        cut_after_ms = absl::ToInt64Milliseconds(absl::Now() - connected);
        return;
      }
    }
  });
  absl::SleepFor(absl::Milliseconds(300));
  const absl::Time scrape_start = absl::Now();
  const std::string out = pki.dir + "/drip-metrics.txt";
  EXPECT_TRUE(blockd::testing::Run(absl::StrCat("curl -sf -m 10 --cacert ", pki.ca, " -o ", out, " https://127.0.0.1:",
                                                port, "/metrics")));
  const absl::Duration scrape_took = absl::Now() - scrape_start;
  dripper.join();
  close(drip);
  EXPECT_LT(scrape_took, kDeadline + absl::Seconds(2)) << "a scrape waited " << scrape_took
                                                        << " behind a client dripping its handshake";
  EXPECT_GE(cut_after_ms.load(), 0) << "the dripping client was never cut off";
  EXPECT_LT(cut_after_ms.load(), absl::ToInt64Milliseconds(kDeadline + absl::Seconds(1)))
      << "the dripping client held the endpoint past its deadline";
}

TEST(Tls, MutualTlsNeedsAClientCertificateFromTheClientCa) {
  const Pki pki = MakePki();
  ASSERT_FALSE(pki.ca.empty());
  ServerOptions o = LoopbackOptions();
  o.tls.cert_file = pki.server_cert;
  o.tls.key_file = pki.server_key;
  o.tls.client_ca_file = pki.ca;
  o.engine.max_activations_per_client = 1;
  auto server = StartServer(o);
  ASSERT_NE(server, nullptr);

  auto good = ConnectTo(*server, {.tls_ca_file = pki.ca, .tls_cert_file = pki.client_cert, .tls_key_file = pki.client_key});
  ASSERT_OK(good->GetServerInfo().status());
  ASSERT_OK(good->CreateBlock(CreateRequest("m0", TinyConfig(), 1)).status());
  ASSERT_OK(good->DownloadTensors("m0", v1::TENSOR_KIND_WEIGHTS).status());
  // The certificate's CN is the caller's identity; the blockd-client header does not change it.
  auto renamed = ConnectTo(*server, {.client_id = "someone-else", .tls_ca_file = pki.ca,
                                     .tls_cert_file = pki.client_cert, .tls_key_file = pki.client_key});
  ASSERT_OK(good->Forward({"m0"}, RandomTensor({1, 4, 32}, 1), true).status());
  EXPECT_STATUS(renamed->Forward({"m0"}, RandomTensor({1, 4, 32}, 2), true).status(), StatusCode::kResourceExhausted,
                "client blockd-test-client already holds 1 activation handles");

  const CallOptions quick{absl::Seconds(5)};
  auto no_cert = ConnectTo(*server, {.tls_ca_file = pki.ca});
  EXPECT_STATUS(no_cert->GetServerInfo(quick).status(), StatusCode::kUnavailable);
  auto foreign = ConnectTo(*server, {.tls_ca_file = pki.ca, .tls_cert_file = pki.other_cert, .tls_key_file = pki.other_key});
  EXPECT_STATUS(foreign->GetServerInfo(quick).status(), StatusCode::kUnavailable);
  auto blocks = good->ListBlocks();
  ASSERT_OK(blocks.status());
  EXPECT_EQ(blocks->size(), 1u);
  EXPECT_STATUS(Client::Connect({.tls_ca_file = pki.ca, .tls_cert_file = pki.client_cert}).status(),
                StatusCode::kInvalidArgument, "needs both its certificate and its key file");
}

}  // namespace
}  // namespace blockd::testing
