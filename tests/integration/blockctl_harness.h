// What the blockctl integration tests share: running the blockctl executable and a fixture with
// a real server (CPU backend) on a loopback port.
//
//   Ran r = Ctl("create b0 --hidden_size=32 --num_attention_heads=4 --intermediate_size=64 --seed=1");
//   EXPECT_RUN(r, 0, "block       b0");   // exit status and a piece of stdout+stderr
#pragma once

#include <sys/wait.h>

#include <cstdio>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "base/safetensors.h"
#include "tests/integration/harness.h"

#ifndef BLOCKCTL_PATH
#error "BLOCKCTL_PATH must name the blockctl executable"
#endif

namespace blockd::testing {

struct Ran {
  int exit_code = -1;
  std::string output;  // stdout and stderr together
};

inline Ran RunBlockctl(const std::string& args) {
  Ran r;
  const std::string cmd = absl::StrCat(BLOCKCTL_PATH, " ", args, " 2>&1");
  FILE* p = popen(cmd.c_str(), "r");
  if (p == nullptr) {
    ADD_FAILURE() << "popen(" << cmd << ") failed";
    return r;
  }
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) r.output.append(buf, n);
  const int status = pclose(p);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

#define EXPECT_RUN(ran, code, text)                                                                   \
  do {                                                                                                \
    const Ran& r_ = (ran);                                                                            \
    EXPECT_EQ(r_.exit_code, code) << r_.output;                                                       \
    EXPECT_NE(r_.output.find(text), std::string::npos) << "output lacks \"" << (text) << "\":\n" << r_.output; \
  } while (0)

class Blockctl : public ::testing::Test {
 protected:
  void SetUp() override {
    server_ = StartServer(LoopbackOptions(WithMetrics()));
    ASSERT_NE(server_, nullptr);
    client_ = ConnectTo(*server_);
    ASSERT_NE(client_, nullptr);
    dir_ = MakeTempDir("blockctl");
  }
  virtual bool WithMetrics() const { return false; }
  // blockctl with --target (and --metrics) of this server.
  Ran Ctl(const std::string& args) {
    return RunBlockctl(absl::StrCat("--target=", TargetOf(*server_), " --metrics=127.0.0.1:", server_->metrics_port(),
                                    " ", args));
  }
  // `prefix + name` for every parameter of TinyConfig(), random values.
  void WriteWeights(const std::string& path, const std::vector<TensorBytes>& tensors, const std::string& prefix) {
    std::vector<SafetensorsTensorRef> refs;
    for (const TensorBytes& t : tensors) {
      refs.push_back({prefix + t.name, t.dtype == v1::DTYPE_BFLOAT16 ? DType::kBFloat16 : DType::kFloat32, t.shape,
                      absl::string_view(t.data)});
    }
    ASSERT_OK(WriteSafetensorsFile(path, refs, {}));
  }

  std::unique_ptr<Server> server_;
  std::unique_ptr<Client> client_;
  std::string dir_;
};

}  // namespace blockd::testing
