#include "server/credentials.h"

#include <fstream>
#include <sstream>

#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/slice.h>
#include <grpcpp/security/auth_context.h>
#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace blockd {
namespace {

absl::string_view ViewOf(const grpc_slice& s) {
  return absl::string_view(reinterpret_cast<const char*>(GRPC_SLICE_START_PTR(s)), GRPC_SLICE_LENGTH(s));
}

// Core credentials behind the C++ interface: the core API accepts an auth metadata processor on
// plaintext credentials, which the C++ InsecureServerCredentials() does not.
class CoreServerCredentials final : public grpc::ServerCredentials {
 public:
  explicit CoreServerCredentials(grpc_server_credentials* creds) : creds_(creds) {}
  ~CoreServerCredentials() override { grpc_server_credentials_release(creds_); }
  // The processor is installed on the core credentials by MakeServerCredentials; nothing in blockd
  // calls this, and a second processor would silently replace the token check, so it is ignored.
  void SetAuthMetadataProcessor(const std::shared_ptr<grpc::AuthMetadataProcessor>&) override {}

 private:
  int AddPortToServer(const std::string& addr, grpc_server* server) override {
    return grpc_server_add_http2_port(server, addr.c_str(), creds_);
  }
  grpc_server_credentials* creds_;
};

struct ProcessorState {
  std::shared_ptr<const Authenticator> auth;
  std::string guarded_prefix;
  AuthFailureHook on_failure;
};

// Runs on the request headers of every call, on a gRPC thread, before the call reaches a handler.
void ProcessMetadata(void* state, grpc_auth_context* /*connection*/, const grpc_metadata* md, size_t num_md,
                     grpc_process_auth_metadata_done_cb done, void* user_data) {
  const auto* s = static_cast<const ProcessorState*>(state);
  absl::string_view path, authorization;
  for (size_t i = 0; i < num_md; ++i) {
    const absl::string_view key = ViewOf(md[i].key);
    if (key == ":path") path = ViewOf(md[i].value);
    if (key == "authorization") authorization = ViewOf(md[i].value);
  }
  // Health and reflection stay open for probes and `grpcurl list`.
  if (!absl::StartsWith(path, s->guarded_prefix)) {
    done(user_data, nullptr, 0, nullptr, 0, GRPC_STATUS_OK, nullptr);
    return;
  }
  absl::StatusOr<Principal> who = s->auth->Check(authorization);
  if (!who.ok()) {
    if (s->on_failure) s->on_failure(path, who.status());
    const std::string message(who.status().message());
    done(user_data, nullptr, 0, nullptr, 0, GRPC_STATUS_UNAUTHENTICATED, message.c_str());
    return;
  }
  // The context is the connection's, shared by all its calls, so nothing per call is stored in
  // it: the handler checks the token again (PrincipalOf) to learn who this call is.
  done(user_data, nullptr, 0, nullptr, 0, GRPC_STATUS_OK, nullptr);
}

void DestroyProcessor(void* state) { delete static_cast<ProcessorState*>(state); }

std::string OpenSslError() {
  const unsigned long e = ERR_get_error();
  ERR_clear_error();
  if (e == 0) return "no details";
  char buf[256];
  ERR_error_string_n(e, buf, sizeof(buf));
  return buf;
}

}  // namespace

absl::StatusOr<std::string> ReadWholeFile(const std::string& path, absl::string_view what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", what, " ", path));
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

absl::Status CheckKeyMatchesCertificate(const std::string& cert_pem, const std::string& key_pem,
                                        const std::string& cert_file, const std::string& key_file,
                                        absl::string_view flags) {
  ERR_clear_error();
  BIO* cert_bio = BIO_new_mem_buf(cert_pem.data(), static_cast<int>(cert_pem.size()));
  X509* cert = PEM_read_bio_X509(cert_bio, nullptr, nullptr, nullptr);
  BIO_free(cert_bio);
  if (cert == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat(flags, "cert ", cert_file, " holds no PEM certificate (", OpenSslError(), ")"));
  }
  BIO* key_bio = BIO_new_mem_buf(key_pem.data(), static_cast<int>(key_pem.size()));
  // An empty passphrase callback: an encrypted key fails here instead of prompting on a terminal.
  EVP_PKEY* key = PEM_read_bio_PrivateKey(key_bio, nullptr, [](char*, int, int, void*) { return 0; }, nullptr);
  BIO_free(key_bio);
  absl::Status s;
  if (key == nullptr) {
    s = absl::InvalidArgumentError(absl::StrCat(flags, "key ", key_file, " holds no unencrypted PEM private key (", OpenSslError(), ")"));
  } else if (X509_check_private_key(cert, key) != 1) {
    ERR_clear_error();
    s = absl::InvalidArgumentError(absl::StrCat("the private key in ", flags, "key ", key_file,
                                                " does not belong to the certificate in ", flags, "cert ", cert_file,
                                                ": their public keys differ (a key from another certificate?)"));
  } else if (X509_cmp_current_time(X509_get0_notAfter(cert)) < 0) {
    s = absl::InvalidArgumentError(absl::StrCat("the certificate in ", flags, "cert ", cert_file, " has expired"));
  }
  EVP_PKEY_free(key);
  X509_free(cert);
  return s;
}

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(
    const TlsOptions& tls, std::shared_ptr<const Authenticator> auth, std::string guarded_prefix,
    AuthFailureHook on_failure) {
  grpc_server_credentials* core = nullptr;
  if (tls.cert_file.empty() && tls.key_file.empty()) {
    if (!tls.client_ca_file.empty()) return absl::InvalidArgumentError("--tls_client_ca needs --tls_cert and --tls_key");
    core = grpc_insecure_server_credentials_create();
  } else {
    if (tls.cert_file.empty() || tls.key_file.empty()) {
      return absl::InvalidArgumentError("TLS needs both --tls_cert and --tls_key");
    }
    auto cert = ReadWholeFile(tls.cert_file, "TLS certificate");
    if (!cert.ok()) return cert.status();
    auto key = ReadWholeFile(tls.key_file, "TLS key");
    if (!key.ok()) return key.status();
    if (auto s = CheckKeyMatchesCertificate(*cert, *key, tls.cert_file, tls.key_file); !s.ok()) return s;
    std::string client_ca;
    if (!tls.client_ca_file.empty()) {
      auto ca = ReadWholeFile(tls.client_ca_file, "TLS client CA");
      if (!ca.ok()) return ca.status();
      client_ca = std::move(*ca);
      if (!absl::StrContains(client_ca, "-----BEGIN CERTIFICATE-----")) {
        return absl::InvalidArgumentError(absl::StrCat("--tls_client_ca ", tls.client_ca_file, " holds no PEM certificate"));
      }
    }
    grpc_ssl_pem_key_cert_pair pair = {key->c_str(), cert->c_str()};
    core = grpc_ssl_server_credentials_create_ex(
        client_ca.empty() ? nullptr : client_ca.c_str(), &pair, 1,
        client_ca.empty() ? GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE
                          : GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY,
        nullptr);
    if (core == nullptr) return absl::InvalidArgumentError("gRPC refused the TLS certificate and key");
  }
  if (auth != nullptr && auth->enabled()) {
    auto* state = new ProcessorState{std::move(auth), std::move(guarded_prefix), std::move(on_failure)};
    grpc_server_credentials_set_auth_metadata_processor(core, {ProcessMetadata, DestroyProcessor, state});
  }
  return std::make_shared<CoreServerCredentials>(core);
}

absl::StatusOr<std::optional<Principal>> PrincipalOf(const grpc::ServerContextBase& ctx, const Authenticator* auth) {
  if (auth != nullptr && auth->enabled()) {
    const auto& md = ctx.client_metadata();
    auto it = md.find("authorization");
    const absl::string_view authorization =
        it == md.end() ? absl::string_view() : absl::string_view(it->second.data(), it->second.size());
    absl::StatusOr<Principal> who = auth->Check(authorization);
    if (!who.ok()) return who.status();
    return std::optional<Principal>(*std::move(who));
  }
  // Mutual TLS without tokens: the verified client certificate names the caller. Its subject CN is
  // the identity; every certificate the CA signed may call everything (as before roles).
  std::shared_ptr<const grpc::AuthContext> context = ctx.auth_context();
  if (context != nullptr && context->IsPeerAuthenticated()) {
    const std::vector<grpc::string_ref> cn = context->FindPropertyValues("x509_common_name");
    if (!cn.empty()) return std::optional<Principal>(Principal{std::string(cn[0].data(), cn[0].size()), Role::kAdmin});
  }
  return std::optional<Principal>();
}

}  // namespace blockd
