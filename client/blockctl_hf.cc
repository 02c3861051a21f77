// blockctl import-hf DIR: a Hugging Face Llama / Qwen2 / Qwen3 checkpoint directory into blockd,
// one block per decoder layer. client/python/blockd/hf.py (`python3 -m blockd import-hf`) is the
// same in Python, and the two behave alike: same checks, messages, block ids and flags.
//
// Everything is checked before the first block is created: config.json describes a model a blockd
// block computes (proto/hf_config.h's BlockConfigFromHf, which `blockctl create --config` and
// Python's BlockConfig.from_hf share: model_type llama/qwen2/qwen3, SiLU MLP, default/linear/
// llama3/yarn RoPE, q/k/v biases only as Qwen2 has them, full causal attention), and every chosen layer holds exactly the block's tensors in the shapes the config
// implies. Then, layer by layer: CreateBlock, and one LoadWeights stream with the tensors in their
// stored dtype (bf16 / fp16 / fp32; the server converts them exactly to its fp32 master weights).
// If anything fails after that, the blocks this run created are deleted again. The block ids go to
// stdout, one a line, in layer order.
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <map>
#include <optional>
#include <set>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "base/status_macros.h"
#include "client/blockctl.h"
#include "client/blockctl_util.h"
#include "base/block_config.h"
#include "proto/config_convert.h"
#include "proto/hf_config.h"

namespace blockd {
namespace {

namespace fs = std::filesystem;
// Buffers some older conversions saved that blocks recompute (RoPE inverse frequencies).
constexpr const char* kRecomputed = "self_attn.rotary_emb.inv_freq";

// {name, shape} of one block's tensors, in the server's order: the engine's own table.
std::vector<std::pair<std::string, std::vector<int64_t>>> ParamShapes(const BlockConfig& config) {
  std::vector<std::pair<std::string, std::vector<int64_t>>> p;
  for (const ParamSpec& spec : BlockParams(config)) p.emplace_back(spec.name, spec.shape);
  return p;
}

// The checkpoint directory's own name ("Qwen3-0.6B" for "/models/Qwen3-0.6B/").
std::string DirName(const std::string& dir) {
  std::error_code ec;
  fs::path p = fs::absolute(dir, ec).lexically_normal();
  if (!p.has_filename()) p = p.parent_path();  // ".../Qwen3/" -> ".../Qwen3"
  return p.filename().string();
}

// The checkpoint directory's name, made a valid block id prefix: "<name>/layer".
std::string DefaultPrefix(const std::string& dir) {
  std::string base = DirName(dir);
  for (char& ch : base) {
    if (!absl::ascii_isalnum(static_cast<unsigned char>(ch)) && ch != '.' && ch != '_' && ch != '-') ch = '_';
  }
  if (base.empty()) base = "model";
  return absl::StrCat(base.substr(0, 100), "/layer");
}

// --layers: "A:B" (half-open, either end may be left out) or "I,J,...". INVALID_ARGUMENT for a
// malformed text (a usage error), OUT_OF_RANGE for layers the checkpoint does not have.
absl::StatusOr<std::vector<int64_t>> ParseLayers(const std::string& text, int64_t n) {
  std::vector<int64_t> out;
  const absl::string_view t = absl::StripAsciiWhitespace(text);
  if (t.empty()) {
    for (int64_t i = 0; i < n; ++i) out.push_back(i);
    return out;
  }
  auto number = [&](absl::string_view s, int64_t* v) {
    if (!absl::SimpleAtoi(absl::StripAsciiWhitespace(s), v)) {
      return absl::InvalidArgumentError(
          absl::StrCat("--layers=", text, ": expected A:B (half-open) or a comma list such as 0,3,5"));
    }
    return absl::OkStatus();
  };
  auto check = [&](int64_t i) {
    if (i < 0 || i >= n) {
      return absl::OutOfRangeError(absl::StrCat("layer ", i, ": the checkpoint has layers 0..", n - 1));
    }
    return absl::OkStatus();
  };
  if (const size_t colon = t.find(':'); colon != absl::string_view::npos) {
    int64_t a = 0, b = n;
    const absl::string_view lo = absl::StripAsciiWhitespace(t.substr(0, colon));
    const absl::string_view hi = absl::StripAsciiWhitespace(t.substr(colon + 1));
    if (!lo.empty()) {
      if (absl::Status s = number(lo, &a); !s.ok()) return s;
    }
    if (!hi.empty()) {
      if (absl::Status s = number(hi, &b); !s.ok()) return s;
    }
    if (a >= b) return absl::InvalidArgumentError(absl::StrCat("--layers=", text, " selects no layers"));
    if (absl::Status s = check(a); !s.ok()) return s;
    if (absl::Status s = check(std::min(b - 1, std::max(a, n))); !s.ok()) return s;  // the first one past the end
    for (int64_t i = a; i < b; ++i) out.push_back(i);
    return out;
  }
  std::set<int64_t> seen;
  for (absl::string_view part : absl::StrSplit(t, ',')) {
    int64_t i = 0;
    if (absl::Status s = number(part, &i); !s.ok()) return s;
    if (!seen.insert(i).second) {
      return absl::InvalidArgumentError(absl::StrCat("--layers=", text, " names layer ", i, " twice"));
    }
    out.push_back(i);
  }
  for (int64_t i : out) {
    if (absl::Status s = check(i); !s.ok()) return s;
  }
  return out;
}

struct LayerPlan {
  int64_t layer = 0;
  std::string block_id;
  std::vector<std::string> names;  // block tensor names; the checkpoint's are "model.layers.N." + name
  int64_t bytes = 0;
};

// Checks one layer's tensors against the config (the checks of hf.py's layer_tensors): exactly
// the block's names, the shapes config.json implies. Maps the shards it needs.
absl::StatusOr<LayerPlan> PlanLayer(SafetensorsCheckpoint& ckpt, const std::set<std::string>& present, int64_t layer,
                                    const BlockConfig& config) {
  const std::string prefix = absl::StrCat("model.layers.", layer, ".");
  const auto expected = ParamShapes(config);
  std::set<std::string> expected_names;
  for (const auto& [name, shape] : expected) expected_names.insert(name);
  std::vector<std::string> extra;
  for (const std::string& name : present) {
    if (name != kRecomputed && expected_names.count(name) == 0) extra.push_back(name);
  }
  if (!extra.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("layer ", layer, " has tensors a blockd block cannot hold: ", absl::StrJoin(extra, ", ")));
  }
  std::vector<std::string> missing;
  for (const auto& [name, shape] : expected) {
    if (present.count(name) == 0) missing.push_back(prefix + name);
  }
  if (!missing.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("layer ", layer, " lacks ", absl::StrJoin(missing, ", ")));
  }
  LayerPlan plan;
  plan.layer = layer;
  for (const auto& [name, shape] : expected) {
    auto t = ckpt.Describe(prefix + name);
    if (!t.ok()) return t.status();
    if (t->shape != shape) {
      return absl::InvalidArgumentError(absl::StrCat(prefix, name, " has shape ", ShapeString(t->shape),
                                                     ", config.json implies ", ShapeString(shape)));
    }
    plan.names.push_back(name);
    plan.bytes += wire::NumElements(t->shape) * wire::DTypeBytes(t->dtype);
  }
  return plan;
}

class ImportHf : public Command {
 public:
  void AddFlags(FlagSet* f) override {
    f->String("layers", &layers_text_, "layers to import: A:B (half-open) or a comma list (default: all)");
    f->String("prefix", &prefix_, "block ids are PREFIX<layer> (default: \"<DIR name>/layer\")");
    f->Bool("replace", &replace_, "delete blocks that already hold the ids (else an existing id fails the import)");
    f->Bool("frozen", &frozen_, "create frozen blocks: weights only, no gradients or AdamW state");
    lora_.Add(f);
    f->String("precision", &precision_text_, "fp32, tf32 or bf16 (default: the backend's)");
    f->Int("device", &device_, "device index on the server");
    f->Int("max_seq_len", &max_seq_len_, "longest sequence (0: the server's default)");
    f->Int("max_batch_size", &max_batch_size_, "largest batch (0: the server's default)");
    f->Int("seed", &seed_, "CreateBlock seed (the loaded weights replace the random ones)");
    f->Bool("progress", &progress_, "progress bar on stderr (default: when stderr is a terminal)");
    f->Int("chunk_bytes", &chunk_bytes_, "bytes per LoadWeights chunk (the server allows up to its max_chunk_bytes)");
  }
  absl::Status Run(Invocation& in) override;

 private:
  std::string prefix_, layers_text_, precision_text_;
  int64_t device_ = 0, max_seq_len_ = 0, max_batch_size_ = 0, seed_ = 0, chunk_bytes_ = 1 << 20;
  bool replace_ = false, progress_ = false, frozen_ = false;
  LoraFlags lora_;
};

absl::Status ImportHf::Run(Invocation& in) {
  auto precision = ParsePrecisionName(precision_text_);
  if (!precision.ok()) return Usage(std::string(precision.status().message()));
  if (chunk_bytes_ < 1) return Usage("--chunk_bytes must be > 0");
  v1::CreateBlockRequest lora;  // only its lora field: the flags checked before anything is created
  RETURN_IF_ERROR(lora_.Apply(in, &lora));
  const std::string& dir = in.arg(0);

  // 1. Check everything before touching the server.
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) {
    return absl::NotFoundError(absl::StrCat(dir, ": not a directory (expected a Hugging Face checkpoint directory)"));
  }
  const std::string config_path = (fs::path(dir) / "config.json").string();
  if (!fs::is_regular_file(config_path, ec)) {
    return absl::NotFoundError(absl::StrCat(dir, ": no config.json (expected a Hugging Face checkpoint directory)"));
  }
  ASSIGN_OR_RETURN(SafetensorsCheckpoint ckpt, SafetensorsCheckpoint::Open(dir));
  ASSIGN_OR_RETURN(nlohmann::json hf, ReadHfConfig(config_path));
  ASSIGN_OR_RETURN(const BlockConfig config, BlockConfigFromHf(hf));
  ASSIGN_OR_RETURN(const int64_t num_layers, HfNumLayers(hf));
  auto layers = ParseLayers(layers_text_, num_layers);
  if (!layers.ok()) {
    if (layers.status().code() == absl::StatusCode::kInvalidArgument) return Usage(std::string(layers.status().message()));
    return layers.status();
  }
  const std::string prefix = in.IsSet("prefix") ? prefix_ : DefaultPrefix(dir);

  std::map<int64_t, std::set<std::string>> present;  // layer -> its tensor names, "model.layers.N." stripped
  for (const std::string& name : ckpt.names()) {
    absl::string_view rest = name;
    int64_t layer = 0;
    if (!absl::ConsumePrefix(&rest, "model.layers.")) continue;
    const size_t dot = rest.find('.');
    if (dot == absl::string_view::npos || !absl::SimpleAtoi(rest.substr(0, dot), &layer)) continue;
    present[layer].insert(std::string(rest.substr(dot + 1)));
  }
  std::vector<LayerPlan> plan;
  int64_t total_bytes = 0;
  for (int64_t layer : *layers) {
    ASSIGN_OR_RETURN(LayerPlan p, PlanLayer(ckpt, present[layer], layer, config));
    p.block_id = absl::StrCat(prefix, layer);
    total_bytes += p.bytes;
    plan.push_back(std::move(p));
  }

  // 2. Create and load, one block at a time; undo on failure.
  ASSIGN_OR_RETURN(Client * client, in.Connect(chunk_bytes_));
  const absl::Time start = absl::Now();
  std::vector<std::string> created;
  absl::Status failure;
  {
    ProgressBar bar(absl::StrCat("import ", DirName(dir)),
                    in.IsSet("progress") ? std::optional<bool>(progress_) : std::nullopt);
    int64_t done_before = 0;
    if (!plan.empty()) bar.SetSuffix(plan.front().block_id);
    bar.Update(0, total_bytes);
    for (const LayerPlan& p : plan) {
      bar.SetSuffix(p.block_id);
      if (replace_) {
        auto deleted = client->DeleteBlock(p.block_id);
        if (!deleted.ok() && deleted.status().code() != absl::StatusCode::kNotFound) {
          failure = deleted.status();
          break;
        }
      }
      v1::CreateBlockRequest req;
      req.set_block_id(p.block_id);
      *req.mutable_config() = ToProto(config);
      req.set_layer_index(p.layer);
      req.set_precision(*precision);
      req.set_device(static_cast<int32_t>(device_));
      req.set_max_seq_len(max_seq_len_);
      req.set_max_batch_size(max_batch_size_);
      req.set_frozen(frozen_);
      if (lora.has_lora()) *req.mutable_lora() = lora.lora();
      if (in.IsSet("seed")) req.set_seed(static_cast<uint64_t>(seed_));
      auto info = client->CreateBlock(req);
      if (!info.ok()) {
        failure = info.status();
        if (failure.code() == absl::StatusCode::kAlreadyExists) {
          failure = absl::AlreadyExistsError(absl::StrCat(failure.message(), " (import with --replace to overwrite it)"));
        }
        break;
      }
      created.push_back(p.block_id);
      // One stream per block (the block changes only when the whole stream was good), each tensor
      // in its stored dtype. Only this layer's tensors are in memory.
      std::vector<TensorBytes> tensors;
      const std::string layer_prefix = absl::StrCat("model.layers.", p.layer, ".");
      for (const std::string& name : p.names) {
        auto t = ckpt.Read(layer_prefix + name, name);
        if (!t.ok()) {
          failure = t.status();
          break;
        }
        tensors.push_back(*std::move(t));
      }
      if (!failure.ok()) break;
      auto loaded = client->LoadWeights(p.block_id, tensors, [&](int64_t done, int64_t) {
        bar.Update(done_before + done, total_bytes);
      });
      if (!loaded.ok()) {
        failure = loaded.status();
        break;
      }
      done_before += p.bytes;
      bar.Update(done_before, total_bytes);
    }
  }
  if (!failure.ok()) {
    for (const std::string& id : created) (void)client->DeleteBlock(id);
    return failure;
  }
  for (const LayerPlan& p : plan) std::cout << p.block_id << "\n";
  std::cout.flush();
  std::fprintf(stderr, "imported %zu layers (%s) of %s in %.3f s\n", plan.size(), HumanBytesString(total_bytes).c_str(),
               dir.c_str(), absl::ToDoubleSeconds(absl::Now() - start));
  return absl::OkStatus();
}

}  // namespace

CommandSpec ImportHfCommand() {
  return {"import-hf", "import a Hugging Face Llama/Qwen2/Qwen3 checkpoint dir: one block per layer",
          "blockctl import-hf DIR [--layers=A:B|I,J,...] [--prefix=ID] [--replace] [--precision=P] [--frozen] "
          "[--lora_rank=R --lora_alpha=A [--lora_targets=...]]",
          "Import a Hugging Face Llama / Qwen2 / Qwen3 checkpoint directory (config.json, *.safetensors shards\n"
          "and model.safetensors.index.json): one block per decoder layer, with the layer's config (qk_norm for\n"
          "qwen3, q/k/v biases for qwen2, rms_norm_eps, rope_theta and rope_scaling, head_dim) and its weights,\n"
          "sent in their stored dtype (bf16/fp16/fp32).\n"
          "Prints the block ids, PREFIX<layer>, one a line. Every layer is checked before any block is created;\n"
          "what blockd cannot compute (dynamic/longrope RoPE, MLP or o_proj biases, a non-SiLU MLP,\n"
          "sliding-window attention) is refused. If a later step fails, the blocks this run created are deleted. Embedding,\n"
          "final norm and LM head stay with the client. `python3 -m blockd import-hf` does the same.",
          {1, 1, "import-hf takes one checkpoint DIR"}, [] { return std::make_unique<ImportHf>(); }};
}

}  // namespace blockd
