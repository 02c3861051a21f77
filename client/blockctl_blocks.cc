// blockctl's subcommands about blocks and the server: info, health, create, list, get, delete,
// gc, save, restore, metrics; and the caller's inference sessions: sessions, close-session.
#include <algorithm>
#include <iostream>
#include <optional>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "base/status_macros.h"
#include "client/blockctl.h"
#include "client/blockctl_util.h"
#include "proto/config_convert.h"
#include "proto/hf_config.h"

namespace blockd {
namespace {

std::string LeaseText(const v1::BlockInfo& b) {
  std::string out = b.ttl_seconds() > 0 ? ShortDuration(static_cast<double>(b.ttl_seconds())) : "none";
  if (b.idle_seconds() > 0) absl::StrAppend(&out, ", idle ", ShortDuration(b.idle_seconds()));
  return out;
}

void PrintBlock(const v1::BlockInfo& b) {
  const v1::BlockConfig& c = b.config();
  std::cout << absl::StrFormat("block       %s\n", b.block_id())
            << absl::StrFormat("layer       %d\n", b.layer_index())
            << absl::StrFormat("config      hidden %d, heads %d (kv %d) x head_dim %d, intermediate %d, eps %g, "
                               "rope_theta %g, qk_norm %s\n",
                               c.hidden_size(), c.num_attention_heads(), c.num_kv_heads(), c.head_dim(),
                               c.intermediate_size(), c.rms_norm_eps(), c.rope_theta(), c.qk_norm() ? "yes" : "no")
            << absl::StrFormat("precision   %s on %s device %d\n", PrecisionName(b.precision()), b.backend(), b.device())
            << absl::StrFormat("parameters  %d (%s resident%s)\n", b.parameter_count(), HumanBytesString(b.memory_bytes()),
                               b.frozen() ? ", frozen: weights only" : "")
            << (b.has_lora() ? absl::StrFormat("lora        rank %d, alpha %g on %s\n", b.lora().rank(), b.lora().alpha(),
                                               absl::StrJoin(b.lora().target_modules(), " "))
                             : "")
            << absl::StrFormat("limits      max_batch_size %d, max_seq_len %d\n", b.max_batch_size(), b.max_seq_len())
            << absl::StrFormat("weights     %s\n", b.weights_loaded()
                                                       ? "loaded"
                                                       : absl::StrCat("missing ", absl::StrJoin(b.missing_weights(), ", ")))
            << absl::StrFormat("gradients   %s\n", b.has_gradients() ? "yes" : "none")
            << absl::StrFormat("step        %d\n", b.step())
            << absl::StrFormat("lease       %s\n", LeaseText(b));
}

class InfoCommand : public Command {
 public:
  absl::Status Run(Invocation& in) override {
    ASSIGN_OR_RETURN(Client * client, in.Connect());
    ASSIGN_OR_RETURN(v1::GetServerInfoResponse info, client->GetServerInfo());
    in.Print(info, [&] {
      std::cout << absl::StrFormat("server      blockd %s at %s\n", info.version(), in.global().target)
                << absl::StrFormat("backend     %s%s\n", info.backend(),
                                   info.backend_reason().empty() ? "" : absl::StrCat(" (", info.backend_reason(), ")"));
      for (const v1::DeviceInfo& d : info.devices()) {
        std::cout << absl::StrFormat("device %-4d %s %s%s: %s total, budget %s, used %s\n", d.index(), d.kind(), d.name(),
                                     d.compute_capability().empty() ? "" : absl::StrCat(" (sm ", d.compute_capability(), ")"),
                                     HumanBytesString(d.memory_total_bytes()), HumanBytesString(d.memory_budget_bytes()),
                                     HumanBytesString(d.memory_used_bytes()))
                  << absl::StrFormat("            KV cache: %s reserved by sessions, %s more may be reserved\n",
                                     HumanBytesString(d.kv_cache_reserved_bytes()),
                                     HumanBytesString(d.kv_cache_available_bytes()));
      }
      const v1::ServerLimits& l = info.limits();
      std::cout << absl::StrFormat("limits      max_message %s, max_chunk %s, max_blocks %d, max_concurrent_rpcs %d,\n"
                                   "            activation_ttl %gs, max_activations_per_client %d,\n"
                                   "            session_ttl %gs, max_sessions_per_client %d\n",
                                   HumanBytesString(l.max_message_bytes()), HumanBytesString(l.max_chunk_bytes()),
                                   l.max_blocks(), l.max_concurrent_rpcs(), l.activation_ttl_seconds(),
                                   l.max_activations_per_client(), l.session_ttl_seconds(), l.max_sessions_per_client())
                << absl::StrFormat("held        %d blocks, %d activation handles, %d inference sessions\n",
                                   info.blocks(), info.activations_held(), info.sessions_open())
                << absl::StrFormat("KV cache    %d pages written (%s)\n", info.kv_cache_pages_in_use(),
                                   HumanBytesString(info.kv_cache_bytes_in_use()));
    });
    return absl::OkStatus();
  }
};

class HealthCommand : public Command {
 public:
  void AddFlags(FlagSet* f) override {
    f->String("service", &service_, "service to ask about (\"\" the server, blockd.v1.BlockService the service)");
  }
  absl::Status Run(Invocation& in) override {
    ASSIGN_OR_RETURN(Client * client, in.Connect());
    ASSIGN_OR_RETURN(HealthStatus status, client->Health(service_));
    std::cout << HealthStatusName(status) << "\n";
    in.set_exit_code(status == HealthStatus::kServing ? kExitOk : kExitFailed);
    return absl::OkStatus();
  }

 private:
  std::string service_;
};

class CreateCommand : public Command {
 public:
  void AddFlags(FlagSet* f) override {
    f->String("config", &config_file_, "Hugging Face config.json (Llama/Qwen2/Qwen3; refused as import-hf refuses)");
    f->Int("hidden_size", &hidden_, "model width");
    f->Int("num_attention_heads", &heads_, "query heads");
    f->Int("num_kv_heads", &kv_heads_, "key/value heads (default: num_attention_heads)");
    f->Int("head_dim", &head_dim_, "per-head width (default: hidden_size / num_attention_heads)");
    f->Int("intermediate_size", &intermediate_, "MLP width");
    f->Double("rms_norm_eps", &eps_, "RMSNorm epsilon");
    f->Double("rope_theta", &theta_, "RoPE base");
    f->Bool("qk_norm", &qk_norm_, "per-head RMSNorm of q and k (Qwen3)");
    f->Int("seed", &seed_, "deterministic random initialisation (omit: weights must be loaded)");
    f->String("precision", &precision_, "fp32, tf32 or bf16 (default: the backend's)");
    f->Int("device", &device_, "device index on the server");
    f->Int("max_seq_len", &max_seq_len_, "longest sequence (0: the server's default)");
    f->Int("max_batch_size", &max_batch_size_, "largest batch (0: the server's default)");
    f->Int("layer", &layer_index_, "which layer of the model this block is (BlockInfo.layer_index)");
    f->Int("layer_index", &layer_index_, "the same as --layer");
    f->Duration("ttl", &ttl_, "lease: the server deletes the block after this long without a call naming it "
                              "(30m, 2h; default: no lease)");
    f->Bool("frozen", &frozen_, "weights only, in the compute dtype: no gradients or AdamW state (serving, "
                                "or a frozen part of a model)");
    lora_.Add(f);
  }

  absl::Status Run(Invocation& in) override {
    v1::BlockConfig c;
    if (!config_file_.empty()) {
      ASSIGN_OR_RETURN(nlohmann::json hf, ReadHfConfig(config_file_));
      ASSIGN_OR_RETURN(BlockConfig from_file, BlockConfigFromHf(hf));
      c = ToProto(from_file);
    } else {
      c.set_rms_norm_eps(eps_);
      c.set_rope_theta(theta_);
    }
    if (in.IsSet("hidden_size")) c.set_hidden_size(hidden_);
    if (in.IsSet("num_attention_heads")) c.set_num_attention_heads(heads_);
    if (in.IsSet("num_kv_heads")) c.set_num_kv_heads(kv_heads_);
    if (in.IsSet("head_dim")) c.set_head_dim(head_dim_);
    if (in.IsSet("intermediate_size")) c.set_intermediate_size(intermediate_);
    if (in.IsSet("rms_norm_eps")) c.set_rms_norm_eps(eps_);
    if (in.IsSet("rope_theta")) c.set_rope_theta(theta_);
    if (in.IsSet("qk_norm")) c.set_qk_norm(qk_norm_);
    if (c.hidden_size() == 0 || c.num_attention_heads() == 0 || c.intermediate_size() == 0) {
      return Usage("give --config or at least --hidden_size, --num_attention_heads and --intermediate_size");
    }
    if (c.num_kv_heads() == 0) c.set_num_kv_heads(c.num_attention_heads());
    if (c.head_dim() == 0) c.set_head_dim(c.hidden_size() / c.num_attention_heads());

    v1::CreateBlockRequest req;
    req.set_block_id(in.arg(0));
    *req.mutable_config() = c;
    req.set_layer_index(layer_index_);
    req.set_max_seq_len(max_seq_len_);
    req.set_max_batch_size(max_batch_size_);
    req.set_device(static_cast<int32_t>(device_));
    req.set_frozen(frozen_);
    RETURN_IF_ERROR(lora_.Apply(in, &req));
    if (in.IsSet("seed")) req.set_seed(static_cast<uint64_t>(seed_));
    auto p = ParsePrecisionName(precision_);
    if (!p.ok()) return Usage(std::string(p.status().message()));
    req.set_precision(*p);
    // --ttl=0 or inf: no lease, as when the flag is left out.
    if (in.IsSet("ttl") && ttl_ != absl::InfiniteDuration()) {
      ASSIGN_OR_RETURN(int64_t ttl, WholeSeconds("ttl", ttl_));
      req.set_ttl_seconds(ttl);
    }
    ASSIGN_OR_RETURN(Client * client, in.Connect());
    ASSIGN_OR_RETURN(v1::BlockInfo info, client->CreateBlock(req));
    in.Print(info, [&] { PrintBlock(info); });
    return absl::OkStatus();
  }

 private:
  int64_t hidden_ = 0, heads_ = 0, kv_heads_ = 0, head_dim_ = 0, intermediate_ = 0;
  double eps_ = 1e-6, theta_ = 10000;
  bool qk_norm_ = false, frozen_ = false;
  LoraFlags lora_;
  std::string config_file_, precision_;
  int64_t seed_ = 0, device_ = 0, max_seq_len_ = 0, max_batch_size_ = 0, layer_index_ = 0;
  absl::Duration ttl_ = absl::ZeroDuration();
};

// The blocks idle at least `idle` (every block when nullopt). The server filters
// (ListBlocksRequest.min_idle_seconds); blockctl filters on BlockInfo.idle_seconds again, so an
// older server that ignores the field (and reports 0 idle) never has a block collected.
absl::StatusOr<std::vector<v1::BlockInfo>> BlocksIdleFor(Client* client, std::optional<absl::Duration> idle) {
  ASSIGN_OR_RETURN(std::vector<v1::BlockInfo> blocks, client->ListBlocks(idle.value_or(absl::ZeroDuration())));
  if (!idle.has_value()) return blocks;
  const double min_idle = absl::ToDoubleSeconds(*idle);
  blocks.erase(std::remove_if(blocks.begin(), blocks.end(),
                              [&](const v1::BlockInfo& b) { return b.idle_seconds() < min_idle; }),
               blocks.end());
  return blocks;
}

// --idle: a finite duration > 0 ("0" means "no limit" to FlagSet, which makes no sense here).
absl::Status CheckIdle(absl::Duration idle) {
  if (idle == absl::InfiniteDuration()) return Usage("--idle: expected a duration such as 30m or 2h (> 0)");
  return absl::OkStatus();
}

class ListCommand : public Command {
 public:
  void AddFlags(FlagSet* f) override {
    f->Duration("idle", &idle_, "only blocks that no call has named for at least this long (30m, 2h), "
                                "with their idle time");
  }
  absl::Status Run(Invocation& in) override {
    const bool by_idle = in.IsSet("idle");
    if (by_idle) RETURN_IF_ERROR(CheckIdle(idle_));
    ASSIGN_OR_RETURN(Client * client, in.Connect());
    ASSIGN_OR_RETURN(std::vector<v1::BlockInfo> blocks,
                     BlocksIdleFor(client, by_idle ? std::optional<absl::Duration>(idle_) : std::nullopt));
    v1::ListBlocksResponse r;
    for (const v1::BlockInfo& b : blocks) *r.add_blocks() = b;
    in.Print(r, [&] {
      std::cout << absl::StrFormat("%-24s %6s %6s %5s %6s %12s %11s %7s %5s %8s", "BLOCK", "LAYER", "HIDDEN", "PREC",
                                   "DEVICE", "PARAMS", "MEMORY", "WEIGHTS", "GRADS", "STEP")
                << (by_idle ? absl::StrFormat(" %8s %8s", "IDLE", "LEASE") : "") << "\n";
      for (const v1::BlockInfo& b : blocks) {
        std::cout << absl::StrFormat("%-24s %6d %6d %5s %6s %12d %11s %7s %5s %8d", b.block_id(), b.layer_index(),
                                     b.config().hidden_size(), PrecisionName(b.precision()),
                                     absl::StrCat(b.backend(), ":", b.device()), b.parameter_count(),
                                     HumanBytesString(b.memory_bytes()), b.weights_loaded() ? "loaded" : "missing",
                                     b.has_gradients() ? "yes" : "no", b.step())
                  << (by_idle ? absl::StrFormat(" %8s %8s", ShortDuration(b.idle_seconds()),
                                                b.ttl_seconds() > 0 ? ShortDuration(static_cast<double>(b.ttl_seconds()))
                                                                    : "none")
                              : "")
                  << "\n";
      }
      if (by_idle && blocks.empty()) std::cout << "no block idle for " << absl::FormatDuration(idle_) << " or longer\n";
    });
    return absl::OkStatus();
  }

 private:
  absl::Duration idle_ = absl::ZeroDuration();
};

class GcCommand : public Command {
 public:
  void AddFlags(FlagSet* f) override {
    f->Duration("idle", &idle_, "delete the blocks that no call has named for at least this long (required)");
    f->Bool("yes", &yes_, "delete them (without it, only list what would be deleted)");
  }
  absl::Status Run(Invocation& in) override {
    if (!in.IsSet("idle")) return Usage("gc needs --idle=DURATION (e.g. --idle=2h)");
    RETURN_IF_ERROR(CheckIdle(idle_));
    ASSIGN_OR_RETURN(Client * client, in.Connect());
    ASSIGN_OR_RETURN(std::vector<v1::BlockInfo> blocks, BlocksIdleFor(client, idle_));
    const std::string idle_text = absl::FormatDuration(idle_);
    if (blocks.empty()) {
      std::cout << "no block idle for " << idle_text << " or longer\n";
      return absl::OkStatus();
    }
    if (!yes_) {
      for (const v1::BlockInfo& b : blocks) {
        std::cout << "would delete " << b.block_id() << " (idle " << ShortDuration(b.idle_seconds()) << ")\n";
      }
      std::cout << blocks.size() << " block(s) idle for " << idle_text
                << " or longer; run again with --yes to delete them\n";
      return absl::OkStatus();
    }
    // A block may have been used (or its lease may have run out) since the list: each delete asks
    // the server to check, atomically, that the block is still idle (only_if_idle_seconds), and the
    // server's answer is the truth. One failure does not stop the others.
    absl::Status first_failure;
    int deleted = 0;
    for (const v1::BlockInfo& b : blocks) {
      v1::DeleteBlockRequest request;
      request.set_block_id(b.block_id());
      request.set_only_if_idle_seconds(absl::ToDoubleSeconds(idle_));
      auto r = client->DeleteBlock(request);
      if (r.ok()) {
        ++deleted;
        std::cout << "deleted " << b.block_id() << " (idle " << ShortDuration(b.idle_seconds()) << ", "
                  << r->activations_released() << " activation handles released)\n";
      } else if (r.status().code() == absl::StatusCode::kNotFound) {
        std::cout << b.block_id() << " is already gone\n";
      } else if (r.status().code() == absl::StatusCode::kFailedPrecondition) {
        std::cout << "kept " << b.block_id() << ": used since it was listed (" << r.status().message() << ")\n";
      } else {
        std::cerr << "blockctl: " << b.block_id() << ": " << absl::StatusCodeToString(r.status().code()) << ": "
                  << r.status().message() << "\n";
        if (first_failure.ok()) first_failure = r.status();
      }
    }
    std::cout << "deleted " << deleted << " of " << blocks.size() << " idle block(s)\n";
    return first_failure;
  }

 private:
  absl::Duration idle_ = absl::ZeroDuration();
  bool yes_ = false;
};

class GetCommand : public Command {
 public:
  absl::Status Run(Invocation& in) override {
    ASSIGN_OR_RETURN(Client * client, in.Connect());
    ASSIGN_OR_RETURN(v1::BlockInfo info, client->GetBlock(in.arg(0)));
    in.Print(info, [&] { PrintBlock(info); });
    return absl::OkStatus();
  }
};

class DeleteCommand : public Command {
 public:
  absl::Status Run(Invocation& in) override {
    ASSIGN_OR_RETURN(Client * client, in.Connect());
    for (const std::string& id : in.args()) {
      ASSIGN_OR_RETURN(v1::DeleteBlockResponse r, client->DeleteBlock(id));
      std::cout << "deleted " << id << " (" << r.activations_released() << " activation handles released)\n";
    }
    return absl::OkStatus();
  }
};

class SaveCommand : public Command {
 public:
  void AddFlags(FlagSet* f) override { f->String("name", &name_, "checkpoint name (default: the server picks ckpt-N)"); }
  absl::Status Run(Invocation& in) override {
    v1::SaveCheckpointRequest req;
    for (const std::string& id : in.args()) req.add_block_ids(id);
    req.set_name(name_);
    ASSIGN_OR_RETURN(Client * client, in.Connect());
    ASSIGN_OR_RETURN(v1::SaveCheckpointResponse r, client->SaveCheckpoint(req));
    std::cout << "saved " << absl::StrJoin(r.block_ids(), ", ") << " to " << r.path() << " ("
              << HumanBytesString(r.bytes()) << ")\n";
    return absl::OkStatus();
  }

 private:
  std::string name_;
};

class RestoreCommand : public Command {
 public:
  void AddFlags(FlagSet* f) override { f->String("name", &name_, "checkpoint name (default: the latest)"); }
  absl::Status Run(Invocation& in) override {
    v1::RestoreCheckpointRequest req;
    for (const std::string& id : in.args()) req.add_block_ids(id);
    req.set_name(name_);
    ASSIGN_OR_RETURN(Client * client, in.Connect());
    ASSIGN_OR_RETURN(v1::RestoreCheckpointResponse r, client->RestoreCheckpoint(req));
    std::cout << "restored " << absl::StrJoin(r.block_ids(), ", ") << " from " << r.path() << "\n";
    return absl::OkStatus();
  }

 private:
  std::string name_;
};

class MetricsCommand : public Command {
 public:
  void AddFlags(FlagSet* f) override { f->String("filter", &filter_, "print only the lines containing TEXT"); }
  absl::Status Run(Invocation& in) override {
    ASSIGN_OR_RETURN(std::string body, HttpGet(in.global().metrics, in.global().timeout));
    if (filter_.empty()) {
      std::cout << body;
      return absl::OkStatus();
    }
    for (absl::string_view line : absl::StrSplit(body, '\n')) {
      if (absl::StrContains(line, filter_)) std::cout << line << "\n";
    }
    return absl::OkStatus();
  }

 private:
  std::string filter_;
};

// The caller's own inference sessions (ListSessions lists no one else's).
class SessionsCommand : public Command {
 public:
  absl::Status Run(Invocation& in) override {
    ASSIGN_OR_RETURN(Client * client, in.Connect());
    ASSIGN_OR_RETURN(std::vector<v1::SessionInfo> sessions, client->ListSessions());
    v1::ListSessionsResponse r;
    for (const v1::SessionInfo& s : sessions) *r.add_sessions() = s;
    in.Print(r, [&] {
      if (sessions.empty()) std::cout << "no inference sessions of yours\n";
      for (const v1::SessionInfo& s : sessions) {
        std::cout << absl::StrFormat("%-36s %s  batch %d  length %d/%d  KV %s  expires in %s\n", s.session_id(),
                                     absl::StrJoin(s.block_ids(), ","), s.batch_size(), s.length(), s.max_length(),
                                     HumanBytesString(s.kv_bytes()), ShortDuration(s.expires_in_seconds()));
      }
    });
    return absl::OkStatus();
  }
};

class CloseSessionCommand : public Command {
 public:
  absl::Status Run(Invocation& in) override {
    ASSIGN_OR_RETURN(Client * client, in.Connect());
    for (const std::string& id : in.args()) {
      RETURN_IF_ERROR(client->CloseSession(id));
      std::cout << "closed " << id << "\n";
    }
    return absl::OkStatus();
  }
};

template <class C>
std::function<std::unique_ptr<Command>()> Make() {
  return [] { return std::make_unique<C>(); };
}

}  // namespace

std::vector<CommandSpec> BlockCommands() {
  return {
      {"info", "server version, backend, devices, memory and limits", "blockctl info",
       "Show the server: version, backend, devices and memory, limits, counts.", {0, 0, "info takes no arguments"},
       Make<InfoCommand>()},
      {"health", "grpc.health.v1 check (exit 0 when SERVING)", "blockctl health [--service=NAME]",
       "grpc.health.v1 Check. Prints SERVING / NOT_SERVING; exits 0 only when SERVING.",
       {0, 0, "health takes no arguments"}, Make<HealthCommand>()},
      {"create", "create a block (config flags or a config.json; --seed for random init)",
       "blockctl create BLOCK [--config=config.json] [--hidden_size=N ...] [--seed=N] [--layer=N] [--ttl=DURATION] "
       "[--frozen] [--lora_rank=R --lora_alpha=A [--lora_targets=q_proj,v_proj,...]]",
       "Create a block. Its config comes from a Hugging Face config.json and/or the flags (flags win).\n"
       "A config.json that import-hf refuses (another model_type, a non-SiLU MLP, a scaled RoPE, biases,\n"
       "sliding-window attention) is refused here too. With --seed the block is initialised at random and\n"
       "usable at once; without it, weights must be loaded (blockctl load) before Forward.",
       {1, 1, "create takes one BLOCK id"}, Make<CreateCommand>()},
      {"list", "list blocks (--idle=DURATION: those idle at least that long)", "blockctl list [--idle=DURATION]",
       "List the blocks on the server; with --idle only those no call has named for at least DURATION,\n"
       "with their idle time and lease.",
       {0, 0, "list takes no arguments"}, Make<ListCommand>()},
      {"get", "show one block", "blockctl get BLOCK", "Show one block.", {1, 1, "get takes one BLOCK id"},
       Make<GetCommand>()},
      {"delete", "delete blocks", "blockctl delete BLOCK...",
       "Delete blocks (and the activation handles that run through them).",
       {1, -1, "delete takes at least one BLOCK id"}, Make<DeleteCommand>()},
      {"gc", "delete blocks idle at least --idle=DURATION (--yes to do it)", "blockctl gc --idle=DURATION [--yes]",
       "Delete the blocks that no call has named for at least DURATION (BlockInfo.idle_seconds): what a\n"
       "client that died left behind. Without --yes it only lists them.",
       {0, 0, "gc takes no arguments"}, Make<GcCommand>()},
      {"save", "SaveCheckpoint under the server's --checkpoint_dir", "blockctl save [BLOCK...] [--name=NAME]",
       "SaveCheckpoint: write blocks (all when none named) under the server's --checkpoint_dir.", {0, -1, ""},
       Make<SaveCommand>()},
      {"restore", "RestoreCheckpoint", "blockctl restore [BLOCK...] [--name=NAME]",
       "RestoreCheckpoint: bring blocks (all in the checkpoint when none named) back, replacing blocks\n"
       "of the same ids.",
       {0, -1, ""}, Make<RestoreCommand>()},
      {"sessions", "list your inference sessions", "blockctl sessions",
       "ListSessions: the inference sessions of this identity (the token, or the host and --client_id),\n"
       "with their span, rows, tokens held of max_length, KV cache reserved and time to expiry.",
       {0, 0, "sessions takes no arguments"}, Make<SessionsCommand>()},
      {"close-session", "close inference sessions and free their KV cache", "blockctl close-session SESSION_ID...",
       "CloseSession: close sessions of this identity and return their KV cache reservation at once,\n"
       "instead of holding it until their TTL.",
       {1, -1, "close-session takes at least one SESSION_ID"}, Make<CloseSessionCommand>()},
      {"metrics", "print the Prometheus metrics endpoint", "blockctl metrics [--filter=TEXT]",
       "GET the Prometheus metrics of the server at --metrics (HOST:PORT or http://HOST:PORT/PATH).",
       {0, 0, "metrics takes no arguments"}, Make<MetricsCommand>()},
  };
}

}  // namespace blockd
