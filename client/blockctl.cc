// blockctl: the command-line client of blockd. `blockctl --help` lists the subcommands,
// `blockctl <command> --help` their flags. This file is the frame (global flags, the runner, the
// table of subcommands); the subcommands themselves are in blockctl_*.cc.
//
//   blockctl --target=gpu-0:50051 info
//   blockctl create b3 --config=config.json --layer=3 --ttl=2h
//   blockctl load b3 model.safetensors.index.json --layer=3
//   blockctl import-hf /models/Qwen3-0.6B --layers=0:4          # prints Qwen3-0.6B/layer0 ... layer3
//   blockctl forward b3 --batch=2 --seq=128 --backward --keep
//   blockctl step b3 --lr=1e-4 --max_grad_norm=1
//   blockctl download b3 --kind=adam_m -o b3-adam_m.safetensors
//   blockctl gc --idle=1h --yes
#include "client/blockctl.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <cstdio>
#include <fstream>
#include <iostream>

#include <google/protobuf/util/json_util.h>

#include "absl/strings/cord.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "base/block_config.h"

namespace blockd {

void AddGlobalFlags(FlagSet* flags, GlobalFlags* g) {
  flags->Section("global flags");
  flags->String("target", &g->target, "blockd gRPC address HOST:PORT");
  flags->String("metrics", &g->metrics, "blockd metrics address HOST:PORT (for `metrics`)");
  flags->String("token", &g->token, "bearer token (authorization metadata)");
  flags->String("token_file", &g->token_file, "file holding the bearer token");
  flags->Bool("tls", &g->tls, "connect with TLS (on when any --tls_* file is given)");
  flags->String("tls_ca", &g->tls_ca, "PEM CA certificates to verify the server with");
  flags->String("tls_cert", &g->tls_cert, "PEM client certificate for mutual TLS");
  flags->String("tls_key", &g->tls_key, "PEM private key of --tls_cert");
  flags->String("tls_server_name", &g->tls_server_name, "name to check the server's certificate against");
  flags->String("client_id", &g->client_id, "blockd-client metadata (per-client limits)");
  flags->Duration("timeout", &g->timeout, "deadline of each call (30s, 2m, inf)");
  flags->Int("max_message_bytes", &g->max_message_bytes,
             "largest gRPC message sent or received (keep it at or below the server's --max_message_bytes)");
  flags->String("transport", &g->transport,
                "how forward and generate move tensors: grpc (in the messages), auto (shared memory when the "
                "daemon is on this host and allows it), shared_memory");
  flags->Bool("busy_wait", &g->busy_wait,
              "generate: wait for each token's step on a busy core instead of sleeping (its answer is taken "
              "sooner, at the cost of a core)");
  flags->Bool("json", &g->json, "print replies as JSON (info, list, get, create, step)");
  flags->Section("");
}

absl::StatusOr<std::unique_ptr<Client>> ConnectWith(const GlobalFlags& g, int64_t chunk_bytes) {
  ClientOptions o;
  o.target = g.target;
  o.timeout = g.timeout;
  o.max_message_bytes = g.max_message_bytes;
  o.client_id = g.client_id;
  o.busy_wait_steps = g.busy_wait;
  if (g.transport == "grpc") {
    o.transport = Transport::kGrpc;
  } else if (g.transport == "auto") {
    o.transport = Transport::kAuto;
  } else if (g.transport == "shared_memory") {
    o.transport = Transport::kSharedMemory;
  } else {
    return Usage(absl::StrCat("--transport=", g.transport, ": expected grpc, auto or shared_memory"));
  }
  o.token = g.token;
  if (!g.token_file.empty()) {
    std::ifstream in(g.token_file);
    if (!in) return absl::NotFoundError(absl::StrCat("cannot read --token_file ", g.token_file));
    std::string line;
    while (std::getline(in, line)) {  // the first line that is not blank or a comment
      absl::string_view t = absl::StripAsciiWhitespace(line);
      if (!t.empty() && t[0] != '#') {
        o.token = std::string(t);
        break;
      }
    }
    if (o.token.empty()) return absl::InvalidArgumentError(absl::StrCat("--token_file ", g.token_file, " holds no token"));
  }
  o.tls = g.tls;
  o.tls_ca_file = g.tls_ca;
  o.tls_cert_file = g.tls_cert;
  o.tls_key_file = g.tls_key;
  o.tls_server_name = g.tls_server_name;
  o.chunk_bytes = chunk_bytes;
  return Client::Connect(std::move(o));
}

namespace {
constexpr char kUsagePayload[] = "blockctl/usage";
}  // namespace

absl::Status Usage(std::string message) {
  absl::Status s = absl::InvalidArgumentError(std::move(message));
  s.SetPayload(kUsagePayload, absl::Cord("1"));
  return s;
}

absl::StatusOr<Client*> Invocation::Connect(int64_t chunk_bytes) {
  if (client_ == nullptr) {
    auto c = ConnectWith(global_, chunk_bytes);
    if (!c.ok()) return c.status();
    client_ = *std::move(c);
  }
  return client_.get();
}

void Invocation::Print(const google::protobuf::Message& m, const std::function<void()>& text) const {
  if (!global_.json) {
    text();
    return;
  }
  std::string out;
  google::protobuf::util::JsonPrintOptions o;
  o.add_whitespace = true;
  o.always_print_primitive_fields = true;
  o.preserve_proto_field_names = true;
  (void)google::protobuf::util::MessageToJsonString(m, &out, o);
  std::cout << out;
}

int Fail(const absl::Status& s) {
  std::fprintf(stderr, "blockctl: %s: %s\n", absl::StatusCodeToString(s.code()).c_str(),
               std::string(s.message()).c_str());
  return kExitFailed;
}

int UsageError(const std::string& command, const std::string& message) {
  std::fprintf(stderr, "blockctl: %s\nrun `blockctl %s--help` for usage\n", message.c_str(),
               command.empty() ? "" : (command + " ").c_str());
  return kExitUsage;
}

int RunCommand(const CommandSpec& spec, const std::vector<std::string>& args) {
  GlobalFlags g;
  FlagSet flags(spec.usage, spec.description);
  std::unique_ptr<Command> command = spec.make();
  command->AddFlags(&flags);
  AddGlobalFlags(&flags, &g);
  std::vector<std::string> positional;
  absl::Status parsed = flags.Parse(args, &positional);
  if (flags.help_requested()) {
    std::cout << flags.Help();
    return kExitOk;
  }
  if (!parsed.ok()) return UsageError(spec.name, std::string(parsed.message()));
  const int n = static_cast<int>(positional.size());
  if (n < spec.arity.min || (spec.arity.max >= 0 && n > spec.arity.max)) return UsageError(spec.name, spec.arity.message);
  Invocation in(g, flags, std::move(positional));
  absl::Status s = command->Run(in);
  std::cout.flush();
  if (s.ok()) return in.exit_code();
  if (s.GetPayload(kUsagePayload).has_value()) return UsageError(spec.name, std::string(s.message()));
  return Fail(s);
}

absl::StatusOr<int64_t> WholeSeconds(const std::string& flag, absl::Duration d) {
  if (d == absl::InfiniteDuration() || d < absl::Seconds(1)) {
    return Usage(absl::StrCat("--", flag, "=", absl::FormatDuration(d), ": expected a duration of at least 1s"));
  }
  return absl::ToInt64Seconds(absl::Ceil(d, absl::Seconds(1)));
}

void LoraFlags::Add(FlagSet* f) {
  f->Int("lora_rank", &rank, "add LoRA adapters of this rank (PEFT's math; trained even with --frozen)");
  f->Double("lora_alpha", &alpha, "LoRA alpha, with --lora_rank: the adapters' scale is alpha / rank");
  f->String("lora_targets", &targets,
            "LoRA targets, a comma list of q_proj k_proj v_proj o_proj gate_proj up_proj down_proj "
            "(default: all seven)");
}

absl::Status LoraFlags::Apply(const Invocation& in, v1::CreateBlockRequest* req) const {
  if (!in.IsSet("lora_rank")) {
    if (in.IsSet("lora_alpha") || in.IsSet("lora_targets")) {
      return Usage("--lora_alpha and --lora_targets need --lora_rank");
    }
    return absl::OkStatus();
  }
  if (!in.IsSet("lora_alpha")) return Usage("--lora_rank needs --lora_alpha (the adapters' scale is alpha / rank)");
  if (rank < 1 || rank > std::numeric_limits<int32_t>::max()) {
    return Usage(absl::StrCat("--lora_rank=", rank, ": expected a positive number"));
  }
  v1::LoraConfig* lora = req->mutable_lora();
  lora->set_rank(static_cast<int32_t>(rank));
  lora->set_alpha(alpha);
  if (targets.empty()) {
    for (const LoraTarget& t : kLoraTargets) lora->add_target_modules(t.module);
  } else {
    for (absl::string_view t : absl::StrSplit(targets, ',', absl::SkipEmpty())) lora->add_target_modules(std::string(t));
  }
  return absl::OkStatus();
}

std::string ShortDuration(double seconds) {
  const int64_t s = static_cast<int64_t>(std::floor(std::max(0.0, seconds)));
  if (s >= 3600) return absl::StrFormat("%dh%02dm", s / 3600, s % 3600 / 60);
  if (s >= 60) return absl::StrFormat("%dm%02ds", s / 60, s % 60);
  return absl::StrFormat("%ds", s);
}

namespace {

const std::vector<CommandSpec>& Commands() {
  static const auto* commands = [] {
    auto* all = new std::vector<CommandSpec>(BlockCommands());
    for (CommandSpec& c : TensorCommands()) all->push_back(std::move(c));
    for (CommandSpec& c : TrainCommands()) all->push_back(std::move(c));
    for (CommandSpec& c : GroupCommands()) all->push_back(std::move(c));
    all->push_back(ImportHfCommand());
    for (CommandSpec& c : ExportCommands()) all->push_back(std::move(c));
    all->push_back(GenerateCommandSpec());
    return all;
  }();
  return *commands;
}

std::string TopLevelHelp() {
  GlobalFlags g;
  FlagSet globals("blockctl [global flags] <command> [flags] [args]",
                  "blockctl talks to blockd, a server of transformer decoder blocks.");
  AddGlobalFlags(&globals, &g);
  std::string out = globals.Help();
  absl::StrAppend(&out, "\ncommands:\n");
  for (const CommandSpec& c : Commands()) absl::StrAppend(&out, absl::StrFormat("  %-10s %s\n", c.name, c.summary));
  absl::StrAppend(&out,
                  "\nRun `blockctl <command> --help` for a command's flags. Exit status: 0 ok, 1 the server or a file\n"
                  "refused (the gRPC code and message are printed), 2 a usage error.\n");
  return out;
}

}  // namespace
}  // namespace blockd

int main(int argc, char** argv) {
  using namespace blockd;
  std::vector<std::string> args(argv + 1, argv + argc);
  // The command is the first argument that is neither a flag nor a global flag's value.
  GlobalFlags scratch;
  FlagSet globals("", "");
  AddGlobalFlags(&globals, &scratch);
  size_t command_at = args.size();
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (a == "--") break;
    if (a.size() > 1 && a[0] == '-') {
      std::string name = a.substr(a[1] == '-' ? 2 : 1);
      if (name.find('=') == std::string::npos && globals.TakesValue(name)) ++i;
      continue;
    }
    command_at = i;
    break;
  }
  if (command_at == args.size()) {
    const bool wants_help = std::any_of(args.begin(), args.end(), [](const std::string& a) {
      return a == "--help" || a == "-help" || a == "-h";
    });
    (wants_help ? std::cout : std::cerr) << TopLevelHelp();
    return wants_help ? kExitOk : kExitUsage;
  }
  std::string name = args[command_at];
  std::vector<std::string> rest;
  for (size_t i = 0; i < args.size(); ++i) {
    if (i != command_at) rest.push_back(args[i]);
  }
  if (name == "help") {
    if (rest.empty()) {
      std::cout << TopLevelHelp();
      return kExitOk;
    }
    name = rest[0];
    rest = {"--help"};
  }
  for (const CommandSpec& c : Commands()) {
    if (name == c.name) return RunCommand(c, rest);
  }
  return UsageError("", absl::StrCat("unknown command \"", name, "\""));
}
