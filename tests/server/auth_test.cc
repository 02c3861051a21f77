// server/auth: token files (comments, blank lines, whitespace, too-short tokens, empty or missing
// files), the principals and roles tokens map to, what each role may call, and every refusal with
// its code.
#include "server/auth.h"

#include <unistd.h>

#include <cstdlib>
#include <cctype>
#include <fstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace blockd {
namespace {

using absl::StatusCode;

constexpr char kUser1[] = "user-token-aaaaaaaa-1111";
constexpr char kUser2[] = "user-token-bbbbbbbb-2222";
constexpr char kAdmin1[] = "admin-token-cccccccc-3333";

// Token files under $TMPDIR (or /tmp), removed when the test ends.
class AuthTest : public ::testing::Test {
 protected:
  ~AuthTest() override {
    for (const std::string& path : files_) unlink(path.c_str());
  }

  std::string WriteTemp(const std::string& text) {
    const char* dir = std::getenv("TMPDIR");
    std::string path = absl::StrCat(dir != nullptr ? dir : "/tmp", "/blockd-auth-test-XXXXXX");
    const int fd = mkstemp(path.data());
    EXPECT_GE(fd, 0) << "mkstemp " << path;
    if (fd >= 0) close(fd);
    files_.push_back(path);
    std::ofstream(path) << text;
    return path;
  }

 private:
  std::vector<std::string> files_;
};

// The principal as "name/role", or why it was refused (so a refusal fails the comparison instead
// of crashing).
std::string Who(const absl::StatusOr<Principal>& checked) {
  return checked.ok() ? absl::StrCat(checked->name, "/", RoleName(checked->role))
                      : "refused: " + checked.status().ToString();
}

// Check, then Authorize for an RPC that needs `needed`: what the server does for every call.
absl::StatusOr<Principal> Admit(const Authenticator& a, const std::string& header, Role needed) {
  absl::StatusOr<Principal> who = a.Check(header);
  if (!who.ok()) return who;
  absl::Status allowed = Authorize(*who, needed, "TheRpc");
  if (!allowed.ok()) return allowed;
  return who;
}

std::string Bearer(const std::string& token) { return "Bearer " + token; }

::testing::AssertionResult Refused(const absl::StatusOr<Principal>& got, StatusCode code,
                                   const std::string& message_part) {
  if (got.ok()) return ::testing::AssertionFailure() << "let in as " << got->name;
  if (got.status().code() != code || got.status().message().find(message_part) == std::string::npos) {
    return ::testing::AssertionFailure() << "got " << got.status() << "; expected " << absl::StatusCodeToString(code)
                                         << " containing \"" << message_part << "\"";
  }
  return ::testing::AssertionSuccess();
}

AuthFiles Legacy(const std::string& users, const std::string& admins) {
  AuthFiles files;
  files.auth_token_file = users;
  files.admin_token_file = admins;
  return files;
}

TEST_F(AuthTest, NoTokensLetsEveryoneInAnonymously) {
  Authenticator open;
  EXPECT_FALSE(open.enabled());
  for (const std::string& header : {std::string(), Bearer("whatever"), std::string("garbage")}) {
    for (Role needed : {Role::kRead, Role::kTrain, Role::kAdmin}) {
      EXPECT_EQ(Who(Admit(open, header, needed)), "anonymous/admin");
    }
  }
  auto from_no_files = Authenticator::FromFiles({});
  ASSERT_TRUE(from_no_files.ok()) << from_no_files.status();
  EXPECT_FALSE((*from_no_files)->enabled());
}

TEST_F(AuthTest, TokenFilesSkipCommentsBlankLinesAndSurroundingSpace) {
  const std::string users = WriteTemp(absl::StrCat("# the training team\n\n   ", kUser1, "  \n\t", kUser2,
                                                   "\r\n# retired: old-token-dddddddd-4444\n"));
  auto auth = Authenticator::FromFiles(Legacy(users, ""));
  ASSERT_TRUE(auth.ok()) << auth.status();
  EXPECT_TRUE((*auth)->enabled());
  // Identities number the tokens in file order, so logs name a token without showing it.
  EXPECT_EQ(Who((*auth)->Check(Bearer(kUser1))), "token-1/admin");
  EXPECT_EQ(Who((*auth)->Check(Bearer(kUser2))), "token-2/admin");
  EXPECT_TRUE(Refused((*auth)->Check(Bearer("old-token-dddddddd-4444")), StatusCode::kUnauthenticated,
                      "unknown bearer token"))
      << "a commented-out token still works";
}

TEST_F(AuthTest, BadTokenFilesAreRefusedNamingTheFile) {
  const std::string short_token = WriteTemp(absl::StrCat(kUser1, "\nshort-15-chars!\n"));
  auto a = Authenticator::FromFiles(Legacy(short_token, ""));
  EXPECT_EQ(a.status().code(), StatusCode::kInvalidArgument) << a.status();
  EXPECT_NE(a.status().message().find(short_token), std::string::npos) << a.status();
  EXPECT_NE(a.status().message().find("at least 16 characters"), std::string::npos) << a.status();

  const std::string only_comments = WriteTemp("# nothing here\n\n");
  auto b = Authenticator::FromFiles(Legacy("", only_comments));
  EXPECT_EQ(b.status().code(), StatusCode::kInvalidArgument) << b.status();
  EXPECT_NE(b.status().message().find("holds no tokens"), std::string::npos) << b.status();

  auto c = Authenticator::FromFiles(Legacy("/nonexistent/blockd/tokens", ""));
  EXPECT_EQ(c.status().code(), StatusCode::kNotFound) << c.status();
  EXPECT_NE(c.status().message().find("/nonexistent/blockd/tokens"), std::string::npos) << c.status();
}

TEST_F(AuthTest, MissingMalformedAndUnknownTokensAreUnauthenticated) {
  auto auth = Authenticator::FromFiles(Legacy(WriteTemp(absl::StrCat(kUser1, "\n")), ""));
  ASSERT_TRUE(auth.ok()) << auth.status();
  const Authenticator& a = **auth;
  EXPECT_TRUE(Refused(a.Check(""), StatusCode::kUnauthenticated, "missing bearer token"));
  EXPECT_TRUE(Refused(a.Check(kUser1), StatusCode::kUnauthenticated, "missing bearer token"))
      << "a token without the Bearer scheme";
  EXPECT_TRUE(Refused(a.Check(absl::StrCat("Basic ", kUser1)), StatusCode::kUnauthenticated,
                      "missing bearer token"));
  EXPECT_TRUE(Refused(a.Check(Bearer("")), StatusCode::kUnauthenticated, "unknown bearer token"));
  EXPECT_TRUE(Refused(a.Check(Bearer(std::string(kUser1).substr(1))), StatusCode::kUnauthenticated,
                      "unknown bearer token"))
      << "a suffix of a valid token";
  EXPECT_TRUE(Refused(a.Check(Bearer(std::string(kUser1) + "x")), StatusCode::kUnauthenticated,
                      "unknown bearer token"))
      << "a valid token with a byte more";
  EXPECT_TRUE(Refused(a.Check(Bearer(kUser2)), StatusCode::kUnauthenticated, "unknown bearer token"));
  // The scheme may also be written in lower case (clients differ); the token's case matters.
  EXPECT_EQ(Who(a.Check("bearer " + std::string(kUser1))), "token-1/admin");
  std::string upper = kUser1;
  for (char& ch : upper) ch = static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
  EXPECT_TRUE(Refused(a.Check(Bearer(upper)), StatusCode::kUnauthenticated, "unknown bearer token"));
}

TEST_F(AuthTest, AdminRpcsNeedAnAdminTokenOnceAnAdminFileIsSet) {
  auto auth = Authenticator::FromFiles(Legacy(WriteTemp(absl::StrCat(kUser1, "\n")), WriteTemp(absl::StrCat(kAdmin1, "\n"))));
  ASSERT_TRUE(auth.ok()) << auth.status();
  const Authenticator& a = **auth;
  EXPECT_EQ(Who(Admit(a, Bearer(kUser1), Role::kTrain)), "token-1/train");
  EXPECT_TRUE(Refused(Admit(a, Bearer(kUser1), Role::kAdmin), StatusCode::kPermissionDenied,
                      "TheRpc needs the admin role; token-1 has the train role"));
  EXPECT_EQ(Who(Admit(a, Bearer(kAdmin1), Role::kAdmin)), "admin-1/admin");
  EXPECT_EQ(Who(Admit(a, Bearer(kAdmin1), Role::kRead)), "admin-1/admin") << "an admin may call every RPC";
  EXPECT_TRUE(Refused(Admit(a, Bearer("nobody-token-eeeeeeee"), Role::kAdmin), StatusCode::kUnauthenticated,
                      "unknown bearer token"))
      << "an unknown token on an admin RPC is UNAUTHENTICATED, not PERMISSION_DENIED";
}

TEST_F(AuthTest, WithoutAnAdminFileUserTokensMayCallAdminRpcs) {
  auto auth = Authenticator::FromFiles(Legacy(WriteTemp(absl::StrCat(kUser1, "\n")), ""));
  ASSERT_TRUE(auth.ok()) << auth.status();
  EXPECT_EQ(Who(Admit(**auth, Bearer(kUser1), Role::kAdmin)), "token-1/admin");
}

TEST_F(AuthTest, ATokenInBothFilesIsAnAdmin) {
  auto auth = Authenticator::FromFiles(Legacy(WriteTemp(absl::StrCat(kUser1, "\n", kAdmin1, "\n")),
                                              WriteTemp(absl::StrCat(kAdmin1, "\n"))));
  ASSERT_TRUE(auth.ok()) << auth.status();
  EXPECT_EQ(Who(Admit(**auth, Bearer(kAdmin1), Role::kAdmin)), "admin-1/admin");
}

TEST_F(AuthTest, RolesNest) {
  AuthFiles files;
  files.token_file = WriteTemp(absl::StrCat("reader read ", kUser1, "\ntrainer train ", kUser2, "\n"));
  auto auth = Authenticator::FromFiles(files);
  ASSERT_TRUE(auth.ok()) << auth.status();
  const Authenticator& a = **auth;
  EXPECT_EQ(Who(Admit(a, Bearer(kUser1), Role::kRead)), "reader/read");
  EXPECT_TRUE(Refused(Admit(a, Bearer(kUser1), Role::kTrain), StatusCode::kPermissionDenied,
                      "needs the train role; reader has the read role"));
  EXPECT_EQ(Who(Admit(a, Bearer(kUser2), Role::kRead)), "trainer/train");
  EXPECT_EQ(Who(Admit(a, Bearer(kUser2), Role::kTrain)), "trainer/train");
  EXPECT_TRUE(Refused(Admit(a, Bearer(kUser2), Role::kAdmin), StatusCode::kPermissionDenied,
                      "needs the admin role; trainer has the train role"));
}

TEST_F(AuthTest, ConstantTimeEqualsIsEquality) {
  EXPECT_TRUE(ConstantTimeEquals("", ""));
  EXPECT_TRUE(ConstantTimeEquals(kUser1, kUser1));
  EXPECT_FALSE(ConstantTimeEquals(kUser1, kUser2));
  EXPECT_FALSE(ConstantTimeEquals("abc", "abd"));
  EXPECT_FALSE(ConstantTimeEquals("xbc", "abc")) << "a difference in the first byte";
  EXPECT_FALSE(ConstantTimeEquals("abc", "abcd"));
  EXPECT_FALSE(ConstantTimeEquals("", "a"));
  EXPECT_FALSE(ConstantTimeEquals(absl::string_view("a\0b", 3), absl::string_view("a\0c", 3)))
      << "bytes after a NUL still count";
}

}  // namespace
}  // namespace blockd
