// blockctl's shared pieces: the global flags every subcommand takes, how a subcommand reports a
// failure (exit 1 with the server's code and message, exit 2 for usage errors), and the
// subcommands that move tensors (load, forward, download), which live in blockctl_tensors.cc, and
// import-hf (a whole Hugging Face checkpoint, one block per layer) in blockctl_hf.cc.
//
//   GlobalFlags g;
//   FlagSet flags("blockctl load BLOCK FILE", "...");
//   AddGlobalFlags(&flags, &g);
//   ... parse ...
//   ASSIGN_OR_RETURN(std::unique_ptr<Client> client, ConnectWith(g));
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "client/cli_flags.h"
#include "client/client.h"
#include "nlohmann/json_fwd.hpp"

namespace blockd {

inline constexpr int kExitOk = 0;
inline constexpr int kExitFailed = 1;  // the server (or a file) said no
inline constexpr int kExitUsage = 2;   // the command line is wrong

struct GlobalFlags {
  std::string target = "localhost:50051";
  std::string metrics = "localhost:9464";
  std::string token, token_file;
  bool tls = false;
  std::string tls_ca, tls_cert, tls_key, tls_server_name;
  std::string client_id = "blockctl";
  absl::Duration timeout = absl::Seconds(60);
  int64_t max_message_bytes = 256 << 20;
  bool json = false;
};

void AddGlobalFlags(FlagSet* flags, GlobalFlags* g);
absl::StatusOr<std::unique_ptr<Client>> ConnectWith(const GlobalFlags& g, int64_t chunk_bytes = 1 << 20);

// Prints "blockctl: CODE: message" to stderr and returns kExitFailed.
int Fail(const absl::Status& s);
// Prints "blockctl: message" and the hint to see --help; returns kExitUsage.
int UsageError(const std::string& command, const std::string& message);

// Parses `args` into `flags` (with the global flags added), handling --help. Returns -1 to go on,
// or the exit code to return now.
int ParseCommandLine(FlagSet* flags, GlobalFlags* g, const std::vector<std::string>& args,
                     std::vector<std::string>* positional, const std::string& command);

// "fp32", "tf32", "bf16"; "" or "default" for PRECISION_UNSPECIFIED (the backend's). Any case.
absl::StatusOr<v1::Precision> PrecisionFlag(const std::string& text);

// A Hugging Face config.json: the object itself, or its "text_config" when it has one.
absl::StatusOr<nlohmann::json> ReadHfConfig(const std::string& path);
// The BlockConfig of one decoder layer of such a config (Llama/Qwen2/Qwen3 field names): head_dim
// defaults to hidden_size / num_attention_heads, num_key_value_heads to num_attention_heads,
// rms_norm_eps to 1e-6, rope_theta to rope_parameters.rope_theta or 10000; qk_norm for qwen3*.
// `path` names the file in messages.
absl::StatusOr<v1::BlockConfig> BlockConfigFromHf(const nlohmann::json& config, const std::string& path);

int CmdLoad(const std::vector<std::string>& args);
int CmdForward(const std::vector<std::string>& args);
int CmdDownload(const std::vector<std::string>& args);
int CmdImportHf(const std::vector<std::string>& args);  // blockctl_hf.cc

}  // namespace blockd
