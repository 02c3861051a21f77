// blockctl: the command-line client of blockd. `blockctl --help` lists the subcommands,
// `blockctl <command> --help` their flags.
//
//   blockctl --target=gpu-0:50051 info
//   blockctl create b3 --config=config.json --layer_index=3
//   blockctl load b3 model.safetensors.index.json --layer=3
//   blockctl import-hf /models/Qwen3-0.6B --layers=0:4          # prints Qwen3-0.6B/layer0 ... layer3
//   blockctl forward b3 --batch=2 --seq=128
//   blockctl download b3 --kind=adam_m -o b3-adam_m.safetensors
#include "client/blockctl.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <functional>
#include <iostream>

#include <google/protobuf/util/json_util.h>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "client/blockctl_util.h"
#include "nlohmann/json.hpp"

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
  flags->Int("max_message_bytes", &g->max_message_bytes, "largest gRPC message sent or received");
  flags->Bool("json", &g->json, "print replies as JSON (info, list, get, create)");
  flags->Section("");
}

absl::StatusOr<std::unique_ptr<Client>> ConnectWith(const GlobalFlags& g, int64_t chunk_bytes) {
  ClientOptions o;
  o.target = g.target;
  o.timeout = g.timeout;
  o.max_message_bytes = g.max_message_bytes;
  o.client_id = g.client_id;
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

int ParseCommandLine(FlagSet* flags, GlobalFlags* g, const std::vector<std::string>& args,
                     std::vector<std::string>* positional, const std::string& command) {
  AddGlobalFlags(flags, g);
  absl::Status s = flags->Parse(args, positional);
  if (flags->help_requested()) {
    std::cout << flags->Help();
    return kExitOk;
  }
  if (!s.ok()) return UsageError(command, std::string(s.message()));
  return -1;
}

absl::StatusOr<v1::Precision> PrecisionFlag(const std::string& text) {
  const std::string p = absl::AsciiStrToLower(text);
  if (p.empty() || p == "default") return v1::PRECISION_UNSPECIFIED;
  if (p == "fp32") return v1::PRECISION_FP32;
  if (p == "tf32") return v1::PRECISION_TF32;
  if (p == "bf16") return v1::PRECISION_BF16;
  return absl::InvalidArgumentError(absl::StrCat("--precision=", text, ": expected fp32, tf32 or bf16"));
}

absl::StatusOr<nlohmann::json> ReadHfConfig(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", path));
  nlohmann::json j;
  try {
    in >> j;
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(path, " is not JSON: ", e.what()));
  }
  if (!j.is_object()) return absl::InvalidArgumentError(absl::StrCat(path, " is not a JSON object"));
  if (j.contains("text_config") && j["text_config"].is_object()) return nlohmann::json(j["text_config"]);
  return j;
}

absl::StatusOr<v1::BlockConfig> BlockConfigFromHf(const nlohmann::json& j, const std::string& path) {
  // A field that is absent, null (or 0, where 0 means "unset") takes its default.
  auto given = [&](const char* key) { return j.contains(key) && !j[key].is_null(); };
  v1::BlockConfig c;
  try {
    c.set_hidden_size(j.at("hidden_size").get<int64_t>());
    c.set_num_attention_heads(j.at("num_attention_heads").get<int64_t>());
    const int64_t kv = given("num_key_value_heads") ? j["num_key_value_heads"].get<int64_t>() : 0;
    c.set_num_kv_heads(kv != 0 ? kv : c.num_attention_heads());
    const int64_t head_dim = given("head_dim") ? j["head_dim"].get<int64_t>() : 0;
    c.set_head_dim(head_dim != 0 ? head_dim : c.hidden_size() / std::max<int64_t>(1, c.num_attention_heads()));
    c.set_intermediate_size(j.at("intermediate_size").get<int64_t>());
    c.set_rms_norm_eps(given("rms_norm_eps") ? j["rms_norm_eps"].get<double>() : 1e-6);
    double theta = 10000.0;
    if (given("rope_theta")) {
      theta = j["rope_theta"].get<double>();
    } else if (given("rope_parameters") && j["rope_parameters"].is_object() &&
               j["rope_parameters"].contains("rope_theta") && !j["rope_parameters"]["rope_theta"].is_null()) {
      theta = j["rope_parameters"]["rope_theta"].get<double>();  // transformers >= 5
    }
    c.set_rope_theta(theta);
    c.set_qk_norm(absl::StartsWith(j.value("model_type", ""), "qwen3"));
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": ", e.what()));
  }
  return c;
}

namespace {

std::string Json(const google::protobuf::Message& m) {
  std::string out;
  google::protobuf::util::JsonPrintOptions o;
  o.add_whitespace = true;
  o.always_print_primitive_fields = true;
  o.preserve_proto_field_names = true;
  (void)google::protobuf::util::MessageToJsonString(m, &out, o);
  return out;
}

std::string PrecisionText(v1::Precision p) {
  switch (p) {
    case v1::PRECISION_FP32: return "fp32";
    case v1::PRECISION_TF32: return "tf32";
    case v1::PRECISION_BF16: return "bf16";
    default: return "default";
  }
}

void PrintBlock(const v1::BlockInfo& b) {
  const v1::BlockConfig& c = b.config();
  std::cout << absl::StrFormat("block       %s\n", b.block_id())
            << absl::StrFormat("layer       %d\n", b.layer_index())
            << absl::StrFormat("config      hidden %d, heads %d (kv %d) x head_dim %d, intermediate %d, eps %g, "
                               "rope_theta %g, qk_norm %s\n",
                               c.hidden_size(), c.num_attention_heads(), c.num_kv_heads(), c.head_dim(),
                               c.intermediate_size(), c.rms_norm_eps(), c.rope_theta(), c.qk_norm() ? "yes" : "no")
            << absl::StrFormat("precision   %s on %s device %d\n", PrecisionText(b.precision()), b.backend(), b.device())
            << absl::StrFormat("parameters  %d (%s resident)\n", b.parameter_count(), HumanBytesString(b.memory_bytes()))
            << absl::StrFormat("limits      max_batch_size %d, max_seq_len %d\n", b.max_batch_size(), b.max_seq_len())
            << absl::StrFormat("weights     %s\n", b.weights_loaded()
                                                       ? "loaded"
                                                       : absl::StrCat("missing ", absl::StrJoin(b.missing_weights(), ", ")))
            << absl::StrFormat("gradients   %s\n", b.has_gradients() ? "yes" : "none")
            << absl::StrFormat("step        %d\n", b.step());
}

int CmdInfo(const std::vector<std::string>& args) {
  GlobalFlags g;
  FlagSet flags("blockctl info", "Show the server: version, backend, devices and memory, limits, counts.");
  std::vector<std::string> pos;
  if (int rc = ParseCommandLine(&flags, &g, args, &pos, "info"); rc >= 0) return rc;
  if (!pos.empty()) return UsageError("info", "info takes no arguments");
  auto client = ConnectWith(g);
  if (!client.ok()) return Fail(client.status());
  auto info = (*client)->GetServerInfo();
  if (!info.ok()) return Fail(info.status());
  if (g.json) {
    std::cout << Json(*info);
    return kExitOk;
  }
  std::cout << absl::StrFormat("server      blockd %s at %s\n", info->version(), g.target)
            << absl::StrFormat("backend     %s%s\n", info->backend(),
                               info->backend_reason().empty() ? "" : absl::StrCat(" (", info->backend_reason(), ")"));
  for (const v1::DeviceInfo& d : info->devices()) {
    std::cout << absl::StrFormat("device %-4d %s %s%s: %s total, budget %s, used %s\n", d.index(), d.kind(), d.name(),
                                 d.compute_capability().empty() ? "" : absl::StrCat(" (sm ", d.compute_capability(), ")"),
                                 HumanBytesString(d.memory_total_bytes()), HumanBytesString(d.memory_budget_bytes()),
                                 HumanBytesString(d.memory_used_bytes()));
  }
  const v1::ServerLimits& l = info->limits();
  std::cout << absl::StrFormat("limits      max_message %s, max_chunk %s, max_blocks %d, max_concurrent_rpcs %d,\n"
                               "            activation_ttl %gs, max_activations_per_client %d\n",
                               HumanBytesString(l.max_message_bytes()), HumanBytesString(l.max_chunk_bytes()),
                               l.max_blocks(), l.max_concurrent_rpcs(), l.activation_ttl_seconds(),
                               l.max_activations_per_client())
            << absl::StrFormat("held        %d blocks, %d activation handles\n", info->blocks(), info->activations_held());
  return kExitOk;
}

int CmdHealth(const std::vector<std::string>& args) {
  GlobalFlags g;
  std::string service;
  FlagSet flags("blockctl health [--service=NAME]",
                "grpc.health.v1 Check. Prints SERVING / NOT_SERVING; exits 0 only when SERVING.");
  flags.String("service", &service, "service to ask about (\"\" the server, blockd.v1.BlockService the service)");
  std::vector<std::string> pos;
  if (int rc = ParseCommandLine(&flags, &g, args, &pos, "health"); rc >= 0) return rc;
  if (!pos.empty()) return UsageError("health", "health takes no arguments");
  auto client = ConnectWith(g);
  if (!client.ok()) return Fail(client.status());
  auto status = (*client)->Health(service);
  if (!status.ok()) return Fail(status.status());
  std::cout << HealthStatusName(*status) << "\n";
  return *status == HealthStatus::kServing ? kExitOk : kExitFailed;
}

int CmdCreate(const std::vector<std::string>& args) {
  GlobalFlags g;
  v1::BlockConfig c;
  int64_t hidden = 0, heads = 0, kv_heads = 0, head_dim = 0, intermediate = 0;
  double eps = 1e-6, theta = 10000;
  bool qk_norm = false;
  std::string config_file, precision;
  int64_t seed = 0, device = 0, max_seq_len = 0, max_batch_size = 0, layer_index = 0;
  FlagSet flags("blockctl create BLOCK [--config=config.json] [--hidden_size=N ...] [--seed=N]",
                "Create a block. Its config comes from a Hugging Face config.json and/or the flags (flags win).\n"
                "With --seed the block is initialised at random and usable at once; without it, weights\n"
                "must be loaded (blockctl load) before Forward.");
  flags.String("config", &config_file, "Hugging Face config.json (Llama/Qwen2/Qwen3)");
  flags.Int("hidden_size", &hidden, "model width");
  flags.Int("num_attention_heads", &heads, "query heads");
  flags.Int("num_kv_heads", &kv_heads, "key/value heads (default: num_attention_heads)");
  flags.Int("head_dim", &head_dim, "per-head width (default: hidden_size / num_attention_heads)");
  flags.Int("intermediate_size", &intermediate, "MLP width");
  flags.Double("rms_norm_eps", &eps, "RMSNorm epsilon");
  flags.Double("rope_theta", &theta, "RoPE base");
  flags.Bool("qk_norm", &qk_norm, "per-head RMSNorm of q and k (Qwen3)");
  flags.Int("seed", &seed, "deterministic random initialisation (omit: weights must be loaded)");
  flags.String("precision", &precision, "fp32, tf32 or bf16 (default: the backend's)");
  flags.Int("device", &device, "device index on the server");
  flags.Int("max_seq_len", &max_seq_len, "longest sequence (0: the server's default)");
  flags.Int("max_batch_size", &max_batch_size, "largest batch (0: the server's default)");
  flags.Int("layer_index", &layer_index, "which layer of the model this block is");
  std::vector<std::string> pos;
  if (int rc = ParseCommandLine(&flags, &g, args, &pos, "create"); rc >= 0) return rc;
  if (pos.size() != 1) return UsageError("create", "create takes one BLOCK id");
  if (!config_file.empty()) {
    auto j = ReadHfConfig(config_file);
    if (!j.ok()) return Fail(j.status());
    auto from_file = BlockConfigFromHf(*j, config_file);
    if (!from_file.ok()) return Fail(from_file.status());
    c = *from_file;
  } else {
    c.set_rms_norm_eps(eps);
    c.set_rope_theta(theta);
  }
  if (flags.IsSet("hidden_size")) c.set_hidden_size(hidden);
  if (flags.IsSet("num_attention_heads")) c.set_num_attention_heads(heads);
  if (flags.IsSet("num_kv_heads")) c.set_num_kv_heads(kv_heads);
  if (flags.IsSet("head_dim")) c.set_head_dim(head_dim);
  if (flags.IsSet("intermediate_size")) c.set_intermediate_size(intermediate);
  if (flags.IsSet("rms_norm_eps")) c.set_rms_norm_eps(eps);
  if (flags.IsSet("rope_theta")) c.set_rope_theta(theta);
  if (flags.IsSet("qk_norm")) c.set_qk_norm(qk_norm);
  if (c.hidden_size() == 0 || c.num_attention_heads() == 0 || c.intermediate_size() == 0) {
    return UsageError("create", "give --config or at least --hidden_size, --num_attention_heads and --intermediate_size");
  }
  if (c.num_kv_heads() == 0) c.set_num_kv_heads(c.num_attention_heads());
  if (c.head_dim() == 0) c.set_head_dim(c.hidden_size() / c.num_attention_heads());

  v1::CreateBlockRequest req;
  req.set_block_id(pos[0]);
  *req.mutable_config() = c;
  req.set_layer_index(layer_index);
  req.set_max_seq_len(max_seq_len);
  req.set_max_batch_size(max_batch_size);
  req.set_device(static_cast<int32_t>(device));
  if (flags.IsSet("seed")) req.set_seed(static_cast<uint64_t>(seed));
  auto p = PrecisionFlag(precision);
  if (!p.ok()) return UsageError("create", std::string(p.status().message()));
  req.set_precision(*p);
  auto client = ConnectWith(g);
  if (!client.ok()) return Fail(client.status());
  auto info = (*client)->CreateBlock(req);
  if (!info.ok()) return Fail(info.status());
  if (g.json) {
    std::cout << Json(*info);
  } else {
    PrintBlock(*info);
  }
  return kExitOk;
}

int CmdList(const std::vector<std::string>& args) {
  GlobalFlags g;
  FlagSet flags("blockctl list", "List the blocks on the server.");
  std::vector<std::string> pos;
  if (int rc = ParseCommandLine(&flags, &g, args, &pos, "list"); rc >= 0) return rc;
  if (!pos.empty()) return UsageError("list", "list takes no arguments");
  auto client = ConnectWith(g);
  if (!client.ok()) return Fail(client.status());
  auto blocks = (*client)->ListBlocks();
  if (!blocks.ok()) return Fail(blocks.status());
  if (g.json) {
    v1::ListBlocksResponse r;
    for (const v1::BlockInfo& b : *blocks) *r.add_blocks() = b;
    std::cout << Json(r);
    return kExitOk;
  }
  std::cout << absl::StrFormat("%-24s %6s %6s %5s %6s %12s %11s %7s %5s %8s\n", "BLOCK", "LAYER", "HIDDEN", "PREC",
                               "DEVICE", "PARAMS", "MEMORY", "WEIGHTS", "GRADS", "STEP");
  for (const v1::BlockInfo& b : *blocks) {
    std::cout << absl::StrFormat("%-24s %6d %6d %5s %6s %12d %11s %7s %5s %8d\n", b.block_id(), b.layer_index(),
                                 b.config().hidden_size(), PrecisionText(b.precision()),
                                 absl::StrCat(b.backend(), ":", b.device()), b.parameter_count(),
                                 HumanBytesString(b.memory_bytes()), b.weights_loaded() ? "loaded" : "missing",
                                 b.has_gradients() ? "yes" : "no", b.step());
  }
  return kExitOk;
}

int CmdGet(const std::vector<std::string>& args) {
  GlobalFlags g;
  FlagSet flags("blockctl get BLOCK", "Show one block.");
  std::vector<std::string> pos;
  if (int rc = ParseCommandLine(&flags, &g, args, &pos, "get"); rc >= 0) return rc;
  if (pos.size() != 1) return UsageError("get", "get takes one BLOCK id");
  auto client = ConnectWith(g);
  if (!client.ok()) return Fail(client.status());
  auto info = (*client)->GetBlock(pos[0]);
  if (!info.ok()) return Fail(info.status());
  if (g.json) {
    std::cout << Json(*info);
  } else {
    PrintBlock(*info);
  }
  return kExitOk;
}

int CmdDelete(const std::vector<std::string>& args) {
  GlobalFlags g;
  FlagSet flags("blockctl delete BLOCK...", "Delete blocks (and the activation handles that run through them).");
  std::vector<std::string> pos;
  if (int rc = ParseCommandLine(&flags, &g, args, &pos, "delete"); rc >= 0) return rc;
  if (pos.empty()) return UsageError("delete", "delete takes at least one BLOCK id");
  auto client = ConnectWith(g);
  if (!client.ok()) return Fail(client.status());
  for (const std::string& id : pos) {
    auto r = (*client)->DeleteBlock(id);
    if (!r.ok()) return Fail(r.status());
    std::cout << "deleted " << id << " (" << r->activations_released() << " activation handles released)\n";
  }
  return kExitOk;
}

int CmdSave(const std::vector<std::string>& args) {
  GlobalFlags g;
  std::string name;
  FlagSet flags("blockctl save [BLOCK...] [--name=NAME]",
                "SaveCheckpoint: write blocks (all when none named) under the server's --checkpoint_dir.");
  flags.String("name", &name, "checkpoint name (default: the server picks ckpt-N)");
  std::vector<std::string> pos;
  if (int rc = ParseCommandLine(&flags, &g, args, &pos, "save"); rc >= 0) return rc;
  v1::SaveCheckpointRequest req;
  for (const std::string& id : pos) req.add_block_ids(id);
  req.set_name(name);
  auto client = ConnectWith(g);
  if (!client.ok()) return Fail(client.status());
  auto r = (*client)->SaveCheckpoint(req);
  if (!r.ok()) return Fail(r.status());
  std::cout << "saved " << absl::StrJoin(r->block_ids(), ", ") << " to " << r->path() << " ("
            << HumanBytesString(r->bytes()) << ")\n";
  return kExitOk;
}

int CmdRestore(const std::vector<std::string>& args) {
  GlobalFlags g;
  std::string name;
  FlagSet flags("blockctl restore [BLOCK...] [--name=NAME]",
                "RestoreCheckpoint: bring blocks (all in the checkpoint when none named) back, replacing blocks "
                "of the same ids.");
  flags.String("name", &name, "checkpoint name (default: the latest)");
  std::vector<std::string> pos;
  if (int rc = ParseCommandLine(&flags, &g, args, &pos, "restore"); rc >= 0) return rc;
  v1::RestoreCheckpointRequest req;
  for (const std::string& id : pos) req.add_block_ids(id);
  req.set_name(name);
  auto client = ConnectWith(g);
  if (!client.ok()) return Fail(client.status());
  auto r = (*client)->RestoreCheckpoint(req);
  if (!r.ok()) return Fail(r.status());
  std::cout << "restored " << absl::StrJoin(r->block_ids(), ", ") << " from " << r->path() << "\n";
  return kExitOk;
}

int CmdMetrics(const std::vector<std::string>& args) {
  GlobalFlags g;
  std::string filter;
  FlagSet flags("blockctl metrics [--filter=TEXT]",
                "GET the Prometheus metrics of the server at --metrics (HOST:PORT or http://HOST:PORT/PATH).");
  flags.String("filter", &filter, "print only the lines containing TEXT");
  std::vector<std::string> pos;
  if (int rc = ParseCommandLine(&flags, &g, args, &pos, "metrics"); rc >= 0) return rc;
  if (!pos.empty()) return UsageError("metrics", "metrics takes no arguments");
  auto body = HttpGet(g.metrics, g.timeout);
  if (!body.ok()) return Fail(body.status());
  if (filter.empty()) {
    std::cout << *body;
    return kExitOk;
  }
  for (absl::string_view line : absl::StrSplit(*body, '\n')) {
    if (absl::StrContains(line, filter)) std::cout << line << "\n";
  }
  return kExitOk;
}

struct Command {
  const char* name;
  const char* summary;
  std::function<int(const std::vector<std::string>&)> run;
};

const std::vector<Command>& Commands() {
  static const auto* commands = new std::vector<Command>{
      {"info", "server version, backend, devices, memory and limits", CmdInfo},
      {"health", "grpc.health.v1 check (exit 0 when SERVING)", CmdHealth},
      {"create", "create a block (config flags or a config.json; --seed for random init)", CmdCreate},
      {"load", "load a block's weights from safetensors (--layer N takes model.layers.N.*)", CmdLoad},
      {"import-hf", "import a Hugging Face Llama/Qwen2/Qwen3 checkpoint dir: one block per layer", CmdImportHf},
      {"list", "list blocks", CmdList},
      {"get", "show one block", CmdGet},
      {"delete", "delete blocks", CmdDelete},
      {"forward", "run a span on random or given input and summarise the output", CmdForward},
      {"download", "download weights, gradients or AdamW moments to safetensors", CmdDownload},
      {"save", "SaveCheckpoint under the server's --checkpoint_dir", CmdSave},
      {"restore", "RestoreCheckpoint", CmdRestore},
      {"metrics", "print the Prometheus metrics endpoint", CmdMetrics},
  };
  return *commands;
}

std::string TopLevelHelp() {
  GlobalFlags g;
  FlagSet globals("blockctl [global flags] <command> [flags] [args]",
                  "blockctl talks to blockd, a server of transformer decoder blocks.");
  AddGlobalFlags(&globals, &g);
  std::string out = globals.Help();
  absl::StrAppend(&out, "\ncommands:\n");
  for (const Command& c : Commands()) absl::StrAppend(&out, absl::StrFormat("  %-10s %s\n", c.name, c.summary));
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
  for (const Command& c : Commands()) {
    if (name == c.name) return c.run(rest);
  }
  return UsageError("", absl::StrCat("unknown command \"", name, "\""));
}
