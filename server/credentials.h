// The gRPC listener's credentials, with authentication at the call's first bytes.
//
// A unary call's handler runs only once its whole request has arrived, so a token checked there
// lets a client with no token make the server buffer up to --max_message_bytes per call. Here the
// token is checked by gRPC's auth metadata processor, which runs on the request headers, before a
// single byte of the body is read: a call without a valid token is refused (UNAUTHENTICATED) and its
// stream reset. gRPC's C++ InsecureServerCredentials() asserts on SetAuthMetadataProcessor, so the
// credentials are built on the core API, which takes a processor for plaintext listeners too.
//
// The processor only lets calls in or not: the AuthContext it sees is the connection's, shared by
// every call on it, so per-call identity cannot live there. PrincipalOf finds it per call: the
// token's principal and role, or with mutual TLS and no tokens the client certificate's CN.
//
//   ASSIGN_OR_RETURN(auto creds, MakeServerCredentials(tls, auth.get(), &auth_log));
//   builder.AddListeningPort(addr, creds);
//   ASSIGN_OR_RETURN(std::optional<Principal> who, PrincipalOf(*ctx, auth.get()));  // in a handler
#pragma once

#include <memory>
#include <optional>
#include <string>

#include <grpcpp/security/server_credentials.h>
#include <grpcpp/server_context.h>

#include "absl/status/statusor.h"
#include "server/auth.h"

namespace blockd {

struct TlsOptions {
  std::string cert_file, key_file;  // both set: serve TLS
  std::string client_ca_file;       // set: require client certificates signed by this CA (mTLS)
};

// Called for every refused call: why, and the method it named.
using AuthFailureHook = std::function<void(absl::string_view method, const absl::Status& why)>;

// Plaintext, TLS or mutual TLS per `tls`; with `auth` enabled or client certificates required,
// every call to a method under `guarded_prefix` (e.g. "/blockd.v1.BlockService/") is
// authenticated from its headers. Health and reflection stay open. A key that does not match its
// certificate, or an unreadable file, is an error naming the file.
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(
    const TlsOptions& tls, std::shared_ptr<const Authenticator> auth, std::string guarded_prefix,
    AuthFailureHook on_failure);

// The caller of this call: its token's principal when `auth` is enabled (UNAUTHENTICATED if the
// token is bad, which the processor already refused), else the client certificate's CN under
// mutual TLS, else nullopt.
absl::StatusOr<std::optional<Principal>> PrincipalOf(const grpc::ServerContextBase& ctx, const Authenticator* auth);

// INVALID_ARGUMENT saying what is wrong when the PEM key is not the certificate's key (or either
// does not parse), so "cannot listen" never stands for a key/certificate mix-up.
// `flags` names the flags in the message: "--tls_" for --tls_cert/--tls_key.
absl::Status CheckKeyMatchesCertificate(const std::string& cert_pem, const std::string& key_pem,
                                        const std::string& cert_file, const std::string& key_file,
                                        absl::string_view flags = "--tls_");

absl::StatusOr<std::string> ReadWholeFile(const std::string& path, absl::string_view what);

}  // namespace blockd
