// blockctl's frame: a table of subcommands and one runner that does what every subcommand needs
// (its flags plus the global ones, --help, counting the arguments, connecting, printing a failure
// as "blockctl: CODE: message" with exit 1, or a usage error with exit 2), so a subcommand is only
// its own flags and logic:
//
//   class GetCommand : public Command {
//    public:
//     absl::Status Run(Invocation& in) override {
//       ASSIGN_OR_RETURN(Client* c, in.Connect());
//       ASSIGN_OR_RETURN(v1::BlockInfo info, c->GetBlock(in.arg(0)));
//       in.Print(info, [&] { PrintBlock(info); });  // or JSON with --json
//       return absl::OkStatus();
//     }
//   };
//   CommandSpec{"get", "show one block", "blockctl get BLOCK", "Show one block.", {1, 1, "get takes one BLOCK id"},
//               [] { return std::make_unique<GetCommand>(); }}
//
// The subcommands live by theme: blockctl_blocks.cc (info, health, create, list, get, delete, gc,
// save, restore, metrics), blockctl_tensors.cc (load, forward, download), blockctl_train.cc (step,
// zero-grad, release), blockctl_groups.cc (collective-id, join-group, leave-group, groups,
// grad-norm), blockctl_hf.cc (import-hf), blockctl_export.cc (export-hf, export-peft) and
// blockctl_generate.cc (generate).
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "client/cli_flags.h"
#include "client/client.h"

namespace google::protobuf {
class Message;
}

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
  std::string transport = "grpc";
  bool busy_wait = false;  // ClientOptions::busy_wait_steps
  bool json = false;
};

void AddGlobalFlags(FlagSet* flags, GlobalFlags* g);
absl::StatusOr<std::unique_ptr<Client>> ConnectWith(const GlobalFlags& g, int64_t chunk_bytes = 1 << 20);

// A Status that makes the runner print a usage error (exit 2) instead of a failure (exit 1):
// for a flag value or argument that is wrong on its face, before anything was sent.
absl::Status Usage(std::string message);

// What a subcommand's Run sees once its command line is parsed.
class Invocation {
 public:
  Invocation(const GlobalFlags& g, const FlagSet& flags, std::vector<std::string> args)
      : global_(g), flags_(flags), args_(std::move(args)) {}

  const GlobalFlags& global() const { return global_; }
  const std::vector<std::string>& args() const { return args_; }
  const std::string& arg(size_t i) const { return args_.at(i); }
  // Whether a flag was given (as opposed to left at its default).
  bool IsSet(const std::string& flag) const { return flags_.IsSet(flag); }
  // The client, connected on first use (commands that fail on a file never dial the server).
  absl::StatusOr<Client*> Connect(int64_t chunk_bytes = 1 << 20);
  // With --json the message as JSON (proto field names, defaults included); else `text()`.
  void Print(const google::protobuf::Message& m, const std::function<void()>& text) const;
  // Exit status when Run returns OK (health: 1 when not SERVING).
  void set_exit_code(int code) { exit_code_ = code; }
  int exit_code() const { return exit_code_; }

 private:
  const GlobalFlags& global_;
  const FlagSet& flags_;
  std::vector<std::string> args_;
  std::unique_ptr<Client> client_;
  int exit_code_ = kExitOk;
};

class Command {
 public:
  virtual ~Command() = default;
  // Declares the command's own flags, bound to its members.
  virtual void AddFlags(FlagSet* /*flags*/) {}
  // Runs after parsing and the argument count check. Usage(...) exits 2, any other error 1.
  virtual absl::Status Run(Invocation& in) = 0;
};

// How many positional arguments a command takes, and what to say otherwise.
struct Arity {
  int min = 0;
  int max = 0;  // -1: no upper bound
  const char* message = "";
};

struct CommandSpec {
  const char* name;
  const char* summary;      // one line in `blockctl --help`
  const char* usage;        // "blockctl get BLOCK"
  const char* description;  // the text of `blockctl get --help`
  Arity arity;
  std::function<std::unique_ptr<Command>()> make;
};

// Parses `args` for `spec`, runs it, and turns the outcome into an exit status.
int RunCommand(const CommandSpec& spec, const std::vector<std::string>& args);

// Prints "blockctl: CODE: message" to stderr and returns kExitFailed.
int Fail(const absl::Status& s);
// Prints "blockctl: message" and the hint to see --help; returns kExitUsage.
int UsageError(const std::string& command, const std::string& message);

// "--NAME=TEXT: expected a duration of at least 1s" unless `d` is a finite whole number of
// seconds >= 1; returns the seconds (rounded up).
absl::StatusOr<int64_t> WholeSeconds(const std::string& flag, absl::Duration d);

// --lora_rank, --lora_alpha, --lora_targets of create and import-hf (--lora-rank works too):
// LoRA adapters on every block the command creates.
struct LoraFlags {
  int64_t rank = 0;
  double alpha = 0;
  std::string targets;  // comma list; empty: all seven projections
  void Add(FlagSet* f);
  // Sets req->lora when --lora_rank is given (the server checks the values); a usage error when
  // --lora_alpha is missing, or alpha or targets come without a rank.
  absl::Status Apply(const Invocation& in, v1::CreateBlockRequest* req) const;
};
// "2h03m", "4m10s", "12s": an idle time or lease for tables.
std::string ShortDuration(double seconds);

std::vector<CommandSpec> BlockCommands();   // blockctl_blocks.cc
std::vector<CommandSpec> TensorCommands();  // blockctl_tensors.cc
std::vector<CommandSpec> TrainCommands();   // blockctl_train.cc
std::vector<CommandSpec> GroupCommands();   // blockctl_groups.cc
CommandSpec ImportHfCommand();              // blockctl_hf.cc
std::vector<CommandSpec> ExportCommands();  // blockctl_export.cc (export-hf, export-peft)
CommandSpec GenerateCommandSpec();          // blockctl_generate.cc

}  // namespace blockd
