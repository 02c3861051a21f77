// Who may call and when: bearer tokens (UNAUTHENTICATED, PERMISSION_DENIED for admin RPCs),
// activation handles private to the identity that made them (another token or client name gets
// NOT_FOUND, as for an unknown id), the drain (UNAVAILABLE during the grace period), TLS and mutual TLS with certificates made on the
// fly by the openssl command.
#include <cstdlib>
#include <fstream>
#include <thread>

#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
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
                "this RPC needs an admin token");
  EXPECT_STATUS(user_->LoadWeights("t0", RandomWeights(TinyConfig(), 2)).status(), StatusCode::kPermissionDenied,
                "this RPC needs an admin token");
  EXPECT_STATUS(user_->DeleteBlock("t0").status(), StatusCode::kPermissionDenied, "this RPC needs an admin token");
  EXPECT_STATUS(user_->SaveCheckpoint({}).status(), StatusCode::kPermissionDenied, "this RPC needs an admin token");
  EXPECT_STATUS(user_->RestoreCheckpoint({}).status(), StatusCode::kPermissionDenied, "this RPC needs an admin token");
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

TEST(Tls, MutualTlsNeedsAClientCertificateFromTheClientCa) {
  const Pki pki = MakePki();
  ASSERT_FALSE(pki.ca.empty());
  ServerOptions o = LoopbackOptions();
  o.tls.cert_file = pki.server_cert;
  o.tls.key_file = pki.server_key;
  o.tls.client_ca_file = pki.ca;
  auto server = StartServer(o);
  ASSERT_NE(server, nullptr);

  auto good = ConnectTo(*server, {.tls_ca_file = pki.ca, .tls_cert_file = pki.client_cert, .tls_key_file = pki.client_key});
  ASSERT_OK(good->GetServerInfo().status());
  ASSERT_OK(good->CreateBlock(CreateRequest("m0", TinyConfig(), 1)).status());
  ASSERT_OK(good->DownloadTensors("m0", v1::TENSOR_KIND_WEIGHTS).status());

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
