// blockctl export-hf BLOCK_IDS -o DIR and export-peft BLOCK_IDS -o DIR: trained blocks back to a
// Hugging Face checkpoint or a PEFT adapter. client/python/blockd/hf_export.py (export_hf,
// export_peft, `python3 -m blockd export-hf`) is the same in Python, with the same checks, names,
// shard cuts and files; tests/client_python/hf_export_test.py holds the two to each other.
//
// export-hf: block k is layer FIRST+k (--first_layer), its tensors "model.layers.{FIRST+k}.<name>".
// Every block must exist, hold its weights and share one config, which maps to LlamaForCausalLM,
// Qwen2ForCausalLM (q/k/v biases) or Qwen3ForCausalLM (QK-norm); config.json carries it (rope_scaling,
// head_dim, rms_norm_eps, num_key_value_heads, torch_dtype...). With --base DIR (the checkpoint the
// blocks came from) its config.json is kept, torch_dtype set to the export's, and every tensor the
// blocks do not replace is copied as stored, so the result is a complete model; without it the
// index's metadata says the export holds the layers only. Weights are downloaded in fp32 and
// written in --dtype (default: bf16 for BF16 blocks, else fp32), in shards of at most
// --max_shard_bytes with model.safetensors.index.json written last. --merge folds LoRA adapters
// (self_attn.q_proj.lora_A.weight, ...) into the weights: W + alpha/rank · B A in fp32, then cast.
//
// export-peft: adapter_model.safetensors with PEFT's names
// (base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight) and adapter_config.json.
//
// The output directory must be new or empty unless --force. A failed export removes what it wrote.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <set>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"
#include "base/block_config.h"
#include "base/status_macros.h"
#include "client/blockctl.h"
#include "client/blockctl_util.h"
#include "google/protobuf/descriptor.h"
#include "google/protobuf/reflection.h"
#include "google/protobuf/text_format.h"
#include "nlohmann/json.hpp"
#include "proto/config_convert.h"
#include "proto/hf_config.h"

namespace blockd {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

constexpr const char* kIndex = "model.safetensors.index.json";
constexpr const char* kLoraTargets[] = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};

struct Lora {
  int64_t rank = 0;
  double alpha = 0;
  std::vector<std::string> targets;
  bool operator==(const Lora& o) const { return rank == o.rank && alpha == o.alpha && targets == o.targets; }
};

// BlockInfo.lora when this build's proto carries it (the LoRA work adds it) and the block has
// adapters. Read by reflection so that blockctl builds and runs on either side of that change.
std::optional<Lora> LoraOf(const v1::BlockInfo& info) {
  const auto* field = info.GetDescriptor()->FindFieldByName("lora");
  if (field == nullptr || field->type() != google::protobuf::FieldDescriptor::TYPE_MESSAGE) return std::nullopt;
  const auto* refl = info.GetReflection();
  if (!refl->HasField(info, field)) return std::nullopt;
  const google::protobuf::Message& m = refl->GetMessage(info, field);
  const auto* d = m.GetDescriptor();
  const auto* r = m.GetReflection();
  const auto* rank = d->FindFieldByName("rank");
  const auto* alpha = d->FindFieldByName("alpha");
  const auto* targets = d->FindFieldByName("target_modules");
  if (rank == nullptr || alpha == nullptr || targets == nullptr) return std::nullopt;
  Lora out;
  out.rank = rank->cpp_type() == google::protobuf::FieldDescriptor::CPPTYPE_INT32 ? r->GetInt32(m, rank)
                                                                                  : r->GetInt64(m, rank);
  out.alpha = alpha->cpp_type() == google::protobuf::FieldDescriptor::CPPTYPE_DOUBLE ? r->GetDouble(m, alpha)
                                                                                     : r->GetFloat(m, alpha);
  for (int i = 0; i < r->FieldSize(m, targets); ++i) out.targets.push_back(r->GetRepeatedString(m, targets, i));
  if (out.rank <= 0) return std::nullopt;
  return out;
}

std::string LoraText(const std::optional<Lora>& l) {
  if (!l) return "none";
  return absl::StrCat("rank ", l->rank, " alpha ", l->alpha, " on ", absl::StrJoin(l->targets, ","));
}

std::string ConfigText(const BlockConfig& c) { return ToProto(c).ShortDebugString(); }

// "hidden_size 48 vs 64; qk_norm false vs true": the fields where `x` differs from `y`.
std::string ConfigDiff(const BlockConfig& x, const BlockConfig& y) {
  const v1::BlockConfig a = ToProto(x), b = ToProto(y);
  std::vector<std::string> out;
  const auto* d = a.GetDescriptor();
  for (int i = 0; i < d->field_count(); ++i) {
    std::string va, vb;
    google::protobuf::TextFormat::PrintFieldValueToString(a, d->field(i), -1, &va);
    google::protobuf::TextFormat::PrintFieldValueToString(b, d->field(i), -1, &vb);
    if (va != vb) out.push_back(absl::StrCat(d->field(i)->name(), " ", va, " vs ", vb));
  }
  return absl::StrJoin(out, "; ");
}

struct Blocks {
  std::vector<v1::BlockInfo> infos;
  BlockConfig config;
};

// The blocks, each existing once with its weights, all of one config (hf_export.py's blocks_of).
absl::StatusOr<Blocks> BlocksOf(Client* client, const std::vector<std::string>& ids) {
  std::set<std::string> seen;
  for (const std::string& id : ids) {
    if (!seen.insert(id).second) {
      return absl::InvalidArgumentError(absl::StrCat("block ", id, " is named twice: each block is one layer"));
    }
  }
  Blocks b;
  for (const std::string& id : ids) {
    auto info = client->GetBlock(id);
    if (!info.ok()) {
      if (info.status().code() != absl::StatusCode::kNotFound) return info.status();
      return absl::NotFoundError(
          absl::StrCat(info.status().message(), " (export names existing blocks, in layer order)"));
    }
    b.infos.push_back(*std::move(info));
  }
  b.config = FromProto(b.infos[0].config());
  for (const v1::BlockInfo& info : b.infos) {
    const BlockConfig c = FromProto(info.config());
    if (!(c == b.config)) {
      return absl::InvalidArgumentError(absl::StrCat("block ", info.block_id(), " has another config than block ",
                                                     b.infos[0].block_id(), " (", ConfigDiff(c, b.config),
                                                     "): the layers of one model share one config"));
    }
    if (!(LoraOf(info) == LoraOf(b.infos[0]))) {
      return absl::InvalidArgumentError(absl::StrCat("block ", info.block_id(), " has LoRA ", LoraText(LoraOf(info)),
                                                     ", block ", b.infos[0].block_id(), " has ",
                                                     LoraText(LoraOf(b.infos[0])), ": export blocks with one adapter config"));
    }
  }
  for (const v1::BlockInfo& info : b.infos) {
    if (!info.weights_loaded()) {
      return absl::FailedPreconditionError(absl::StrCat("block ", info.block_id(), " lacks weights (",
                                                        absl::StrJoin(info.missing_weights(), ", "),
                                                        "): load them before exporting"));
    }
  }
  return b;
}

// --dtype, else the blocks' own: bf16 for BF16 blocks, fp32 for FP32/TF32 ones.
absl::StatusOr<v1::DType> ExportDType(const std::vector<v1::BlockInfo>& infos, const std::string& text) {
  if (!text.empty()) {
    if (text == "bf16" || text == "bfloat16") return v1::DTYPE_BFLOAT16;
    if (text == "fp32" || text == "float32") return v1::DTYPE_FLOAT32;
    return Usage(absl::StrCat("--dtype=", text, ": expected bf16 or fp32"));
  }
  std::set<v1::DType> own;
  std::vector<std::string> parts;
  for (const v1::BlockInfo& i : infos) {
    const bool bf16 = i.precision() == v1::PRECISION_BF16;
    own.insert(bf16 ? v1::DTYPE_BFLOAT16 : v1::DTYPE_FLOAT32);
    parts.push_back(absl::StrCat(i.block_id(), bf16 ? " bf16" : " fp32"));
  }
  if (own.size() > 1) {
    return absl::InvalidArgumentError(absl::StrCat("the blocks mix precisions (", absl::StrJoin(parts, ", "),
                                                   "): choose the export's with dtype=bf16|fp32 (--dtype)"));
  }
  return *own.begin();
}

// config.json of a model whose layers are blocks of `c` (hf_export.py's hf_config).
absl::StatusOr<json> HfConfigJson(const BlockConfig& c, int64_t num_layers, const std::string& torch_dtype,
                                  int64_t max_position_embeddings) {
  if (c.qk_norm && c.attention_bias) {
    return absl::InvalidArgumentError(
        "the blocks have both QK-norm and q/k/v biases: no Hugging Face Llama, Qwen2 or Qwen3 model has both");
  }
  const std::string model_type = c.qk_norm ? "qwen3" : c.attention_bias ? "qwen2" : "llama";
  const std::string arch = c.qk_norm ? "Qwen3ForCausalLM" : c.attention_bias ? "Qwen2ForCausalLM" : "LlamaForCausalLM";
  const RopeScaling& r = c.rope_scaling;
  json rope = nullptr;
  if (!r.is_default()) {
    rope = {{"rope_type", r.rope_type}, {"factor", r.factor}};
    if (r.rope_type == "llama3") {
      rope["low_freq_factor"] = r.low_freq_factor;
      rope["high_freq_factor"] = r.high_freq_factor;
      rope["original_max_position_embeddings"] = r.original_max_position_embeddings;
    } else if (r.rope_type == "yarn") {
      rope["original_max_position_embeddings"] = r.original_max_position_embeddings;
      rope["attention_factor"] = r.attention_factor;
      rope["beta_fast"] = r.beta_fast;
      rope["beta_slow"] = r.beta_slow;
    }
    if (r.rope_type == "llama3" || r.rope_type == "yarn") {
      // HF's yarn derives its factor from max_position_embeddings / original when both are set.
      max_position_embeddings = std::llround(r.factor * static_cast<double>(r.original_max_position_embeddings));
    }
  }
  json out = {{"architectures", json::array({arch})}, {"model_type", model_type}, {"hidden_size", c.hidden_size},
              {"intermediate_size", c.intermediate_size}, {"num_hidden_layers", num_layers},
              {"num_attention_heads", c.num_attention_heads}, {"num_key_value_heads", c.num_kv_heads},
              {"head_dim", c.head_dim}, {"hidden_act", "silu"}, {"rms_norm_eps", c.rms_norm_eps},
              {"rope_theta", c.rope_theta}, {"rope_scaling", rope},
              {"max_position_embeddings", max_position_embeddings}, {"tie_word_embeddings", false},
              {"torch_dtype", torch_dtype}};
  if (model_type != "qwen2") out["attention_bias"] = false;
  if (model_type == "llama") {
    out["mlp_bias"] = false;
  } else {
    out["use_sliding_window"] = false;
  }
  return out;
}

// A module's adapter: "self_attn.q_proj" -> {A [rank, in], B [out, rank]} as fp32 values.
struct Adapter {
  std::vector<int64_t> a_shape, b_shape;
  std::vector<float> a, b;
};

// "MODULE.lora_A.weight" or "MODULE.lora_B.weight": MODULE and the part ('A' or 'B').
// (Parsed by hand: GCC 12 warns inside std::regex under -O1 with the sanitizers, and CI builds -Werror.)
bool LoraNameParts(const std::string& name, std::string* module, char* part) {
  for (char p : {'A', 'B'}) {
    const std::string suffix = absl::StrCat(".lora_", std::string(1, p), ".weight");
    if (absl::EndsWith(name, suffix)) {
      *module = name.substr(0, name.size() - suffix.size());
      *part = p;
      return true;
    }
  }
  return false;
}

bool AllDigits(absl::string_view s) {
  return !s.empty() && std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; });
}

// The files an export writes: model.safetensors, its index, or model-NNNNN-of-NNNNN.safetensors.
bool IsExportFile(const std::string& f) {
  if (f == "model.safetensors" || f == "model.safetensors.index.json") return true;
  absl::string_view v(f);
  if (!absl::ConsumePrefix(&v, "model-") || !absl::ConsumeSuffix(&v, ".safetensors") || v.size() != 14) return false;
  return AllDigits(v.substr(0, 5)) && v.substr(5, 4) == "-of-" && AllDigits(v.substr(9, 5));
}

// Splits one block's fp32 download into base tensors (name -> values) and adapters.
absl::Status SplitLora(const std::vector<TensorBytes>& got, std::map<std::string, TensorBytes>* base,
                       std::map<std::string, Adapter>* lora) {
  std::map<std::string, std::string> parts;
  for (const TensorBytes& t : got) {
    std::string module;
    char part = 0;
    if (!LoraNameParts(t.name, &module, &part)) {
      (*base)[t.name] = t;
      continue;
    }
    ASSIGN_OR_RETURN(std::vector<float> v, wire::DecodeToFloat32(t.dtype, t.data));
    Adapter& ad = (*lora)[module];
    (part == 'A' ? ad.a : ad.b) = std::move(v);
    (part == 'A' ? ad.a_shape : ad.b_shape) = t.shape;
    parts[module] += part;
  }
  for (const auto& [module, p] : parts) {
    if (p.size() != 2) {
      return absl::InvalidArgumentError(
          absl::StrCat("adapter of ", module, " has lora_", p, " only: expected lora_A and lora_B"));
    }
  }
  return absl::OkStatus();
}

int TargetOrder(const std::string& module) {
  const std::string leaf = module.substr(module.rfind('.') + 1);
  for (int i = 0; i < 7; ++i) {
    if (leaf == kLoraTargets[i]) return i;
  }
  return 7;
}

// The adapters' rank, alpha and targets: BlockInfo.lora, else their shapes and names with --lora_alpha.
absl::StatusOr<Lora> LoraParams(const v1::BlockInfo& first, const std::vector<std::map<std::string, Adapter>>& all,
                                const double* alpha) {
  if (auto told = LoraOf(first)) return *told;
  std::set<int64_t> ranks;
  std::set<std::string> modules;
  for (const auto& lora : all) {
    for (const auto& [m, ad] : lora) {
      ranks.insert(ad.a_shape.empty() ? 0 : ad.a_shape[0]);
      modules.insert(m.substr(m.rfind('.') + 1));
    }
  }
  if (ranks.size() != 1) {
    return absl::InvalidArgumentError(absl::StrCat("the adapters have ranks ", absl::StrJoin(ranks, ", "),
                                                   ": expected one rank"));
  }
  if (alpha == nullptr) {
    return absl::InvalidArgumentError(
        "the blocks do not say their LoRA alpha (BlockInfo.lora): pass lora_alpha (--lora_alpha)");
  }
  Lora out{*ranks.begin(), *alpha, {modules.begin(), modules.end()}};
  std::stable_sort(out.targets.begin(), out.targets.end(),
                   [](const std::string& x, const std::string& y) { return TargetOrder(x) < TargetOrder(y); });
  return out;
}

// W + scale · (B A) in fp32, B A summed over the rank in order (PEFT's merge).
absl::Status MergeLora(const std::map<std::string, Adapter>& lora, double scale,
                       std::map<std::string, TensorBytes>* base) {
  for (const auto& [module, ad] : lora) {
    auto it = base->find(module + ".weight");
    const bool fits = it != base->end() && it->second.shape.size() == 2 && ad.a_shape.size() == 2 &&
                      ad.b_shape.size() == 2 && ad.b_shape[0] == it->second.shape[0] &&
                      ad.a_shape[1] == it->second.shape[1] && ad.a_shape[0] == ad.b_shape[1];
    if (!fits) {
      return absl::InvalidArgumentError(absl::StrCat("adapter of ", module, ": lora_A ", ShapeString(ad.a_shape),
                                                     ", lora_B ", ShapeString(ad.b_shape), " do not fit ", module,
                                                     ".weight"));
    }
    ASSIGN_OR_RETURN(std::vector<float> w, wire::DecodeToFloat32(it->second.dtype, it->second.data));
    const int64_t out = ad.b_shape[0], in = ad.a_shape[1], rank = ad.a_shape[0];
    const float s = static_cast<float>(scale);
    std::vector<float> row(in);
    for (int64_t o = 0; o < out; ++o) {
      std::fill(row.begin(), row.end(), 0.0f);
      for (int64_t r = 0; r < rank; ++r) {
        const float bv = ad.b[o * rank + r];
        const float* a = &ad.a[r * in];
        for (int64_t i = 0; i < in; ++i) row[i] += bv * a[i];
      }
      for (int64_t i = 0; i < in; ++i) w[o * in + i] += row[i] * s;
    }
    it->second.data = wire::EncodeFloat32(w.data(), w.size(), v1::DTYPE_FLOAT32);
  }
  return absl::OkStatus();
}

// Creates `dir` or checks it is empty; with force, writes into it (stale shards removed).
// Returns whether it created the directory.
absl::StatusOr<bool> PrepareDir(const std::string& dir, bool force) {
  std::error_code ec;
  if (fs::exists(dir, ec) && !fs::is_directory(dir, ec)) {
    return absl::AlreadyExistsError(absl::StrCat(dir, " exists and is not a directory"));
  }
  if (fs::is_directory(dir, ec)) {
    std::vector<fs::path> entries;
    for (const auto& e : fs::directory_iterator(dir, ec)) entries.push_back(e.path());
    if (!entries.empty() && !force) {
      return absl::AlreadyExistsError(absl::StrCat(dir, " exists and is not empty (", entries.size(),
                                                   " entries): expected a new or empty directory (force=True / "
                                                   "--force writes into it)"));
    }
    for (const fs::path& p : entries) {
      if (IsExportFile(p.filename().string())) fs::remove(p, ec);
    }
    return false;
  }
  if (!fs::create_directories(dir, ec)) {
    return absl::PermissionDeniedError(absl::StrCat(dir, ": cannot create the directory: ", ec.message()));
  }
  return true;
}

void Undo(const std::string& dir, const std::vector<std::string>& written, bool created) {
  std::error_code ec;
  for (const std::string& f : written) fs::remove(fs::path(dir) / f, ec);
  if (created) fs::remove(dir, ec);
}

absl::Status WriteJson(const std::string& path, const json& j) {
  std::ofstream f(path);
  f << j.dump(2) << "\n";
  f.close();
  if (!f) return absl::InternalError(absl::StrCat(path, ": write failed"));
  return absl::OkStatus();
}

// One tensor of the export: where it comes from and its size in the file.
struct Entry {
  std::string name;  // the model's name
  int64_t bytes = 0;
  int block = -1;          // >= 0: block position; its tensor `tensor`
  std::string tensor;      // block tensor name, or the base checkpoint's name
  std::pair<int, int64_t> group() const {  // embedding, layers by index, the rest (hf_export.py's _layer_key)
    absl::string_view rest(name);
    if (absl::ConsumePrefix(&rest, "model.layers.")) {
      const size_t dot = rest.find('.');
      if (dot != absl::string_view::npos && AllDigits(rest.substr(0, dot))) {
        return {1, std::stoll(std::string(rest.substr(0, dot)))};
      }
    }
    return {name.rfind("model.embed_tokens.", 0) == 0 ? 0 : 2, 0};
  }
};

class ExportHf : public Command {
 public:
  void AddFlags(FlagSet* f) override {
    f->String("o", &out_, "output directory (new or empty, else --force)");
    f->String("output", &out_, "same as -o");
    f->String("base", &base_, "the checkpoint the blocks came from: its config and other tensors are copied");
    f->String("dtype", &dtype_text_, "bf16 or fp32 (default: the blocks', bf16 for BF16 blocks)");
    f->Int("first_layer", &first_layer_, "layer index of the first block");
    f->Bool("merge", &merge_, "fold LoRA adapters into the weights (W + alpha/rank B A, fp32)");
    f->Double("lora_alpha", &lora_alpha_, "LoRA alpha when the blocks do not say it");
    f->Bool("force", &force_, "write into a non-empty directory");
    f->Int("max_shard_bytes", &max_shard_bytes_, "largest shard file (default 5 GB, as transformers)");
  }
  absl::Status Run(Invocation& in) override;

 private:
  std::string out_, base_, dtype_text_;
  int64_t first_layer_ = 0, max_shard_bytes_ = 5000000000LL;
  double lora_alpha_ = 0;
  bool merge_ = false, force_ = false;
};

absl::Status ExportHf::Run(Invocation& in) {
  if (out_.empty()) return Usage("export-hf needs -o DIR");
  if (first_layer_ < 0) return Usage(absl::StrCat("--first_layer=", first_layer_, ": expected >= 0"));
  if (max_shard_bytes_ <= 0) return Usage(absl::StrCat("--max_shard_bytes=", max_shard_bytes_, ": expected > 0"));
  if (!dtype_text_.empty()) RETURN_IF_ERROR(ExportDType({}, dtype_text_).status());  // a usage error, before dialing
  ASSIGN_OR_RETURN(Client * client, in.Connect());
  ASSIGN_OR_RETURN(Blocks b, BlocksOf(client, in.args()));
  ASSIGN_OR_RETURN(const v1::DType dtype, ExportDType(b.infos, dtype_text_));
  const std::string torch_dtype = dtype == v1::DTYPE_BFLOAT16 ? "bfloat16" : "float32";
  const int64_t n = static_cast<int64_t>(b.infos.size()), last = first_layer_ + n - 1;
  // (a pointer, not std::optional: GCC 12 warns maybe-uninitialized on an optional<double> here)
  const double* alpha = in.IsSet("lora_alpha") ? &lora_alpha_ : nullptr;

  std::vector<Entry> entries;
  const std::vector<ParamSpec> params = BlockParams(b.config);
  for (int k = 0; k < n; ++k) {
    for (const ParamSpec& p : params) {
      entries.push_back({absl::StrCat("model.layers.", first_layer_ + k, ".", p.name),
                         p.numel() * wire::DTypeBytes(dtype), k, p.name});
    }
  }
  std::optional<SafetensorsCheckpoint> ckpt;
  json config;
  if (!base_.empty()) {
    ASSIGN_OR_RETURN(ckpt, SafetensorsCheckpoint::Open(base_));
    const std::string config_path = (fs::path(base_) / "config.json").string();
    ASSIGN_OR_RETURN(json hf, ReadHfConfig(config_path));
    auto base_config = BlockConfigFromHf(hf);
    if (!base_config.ok()) return absl::InvalidArgumentError(absl::StrCat("base ", base_, ": ", base_config.status().message()));
    if (!(*base_config == b.config)) {
      return absl::InvalidArgumentError(absl::StrCat("base ", base_, " has layers of another config (",
                                                     ConfigText(*base_config), ") than the blocks (",
                                                     ConfigText(b.config), ")"));
    }
    ASSIGN_OR_RETURN(const int64_t base_layers, HfNumLayers(hf));
    if (last >= base_layers) {
      return absl::InvalidArgumentError(absl::StrCat("layers ", first_layer_, "..", last, " do not fit base ", base_,
                                                     ", which has layers 0..", base_layers - 1,
                                                     " (first_layer / --first_layer sets the first)"));
    }
    std::ifstream f(config_path);
    config = json::parse(f, nullptr, /*allow_exceptions=*/false);
    if (!config.is_object()) return absl::InvalidArgumentError(absl::StrCat(config_path, ": not a JSON object"));
    for (json* c : {&config, config.contains("text_config") ? &config["text_config"] : nullptr}) {
      if (c == nullptr || !c->is_object()) continue;
      (*c)["torch_dtype"] = torch_dtype;  // transformers 5 writes "dtype", older versions "torch_dtype"
      if (c->contains("dtype")) (*c)["dtype"] = torch_dtype;
    }
    std::vector<std::string> names = ckpt->names();
    std::sort(names.begin(), names.end());  // by name inside a layer and among the rest, as hf_export.py
    for (const std::string& name : names) {
      Entry e{name, 0, -1, name};
      const auto g = e.group();
      if (g.first == 1 && g.second >= first_layer_ && g.second <= last) continue;  // the blocks replace it
      ASSIGN_OR_RETURN(TensorBytes t, ckpt->Describe(name));
      e.bytes = wire::NumElements(t.shape) * wire::DTypeBytes(t.dtype);
      entries.push_back(std::move(e));
    }
  } else {
    int64_t max_seq = 0;
    for (const v1::BlockInfo& i : b.infos) max_seq = std::max<int64_t>(max_seq, i.max_seq_len());
    ASSIGN_OR_RETURN(config, HfConfigJson(b.config, last + 1, torch_dtype, max_seq > 0 ? max_seq : 4096));
  }
  std::stable_sort(entries.begin(), entries.end(), [](const Entry& x, const Entry& y) { return x.group() < y.group(); });
  std::vector<std::vector<const Entry*>> shards(1);
  int64_t size = 0, total = 0;
  for (const Entry& e : entries) {
    if (!shards.back().empty() && size + e.bytes > max_shard_bytes_) {
      shards.emplace_back();
      size = 0;
    }
    shards.back().push_back(&e);
    size += e.bytes;
    total += e.bytes;
  }

  ASSIGN_OR_RETURN(const bool created, PrepareDir(out_, force_));
  std::vector<std::string> written;
  absl::Status s = [&]() -> absl::Status {
    json weight_map = json::object();
    int cached = -1;
    std::map<std::string, TensorBytes> block;  // the block being written, fp32 (merged)
    for (size_t si = 0; si < shards.size(); ++si) {
      const std::string file = absl::StrFormat("model-%05d-of-%05d.safetensors", si + 1, shards.size());
      std::vector<TensorBytes> tensors;
      for (const Entry* e : shards[si]) {
        weight_map[e->name] = file;
        if (e->block < 0) {
          ASSIGN_OR_RETURN(TensorBytes t, ckpt->Read(e->tensor, e->name));
          tensors.push_back(std::move(t));
          continue;
        }
        if (e->block != cached) {
          const v1::BlockInfo& info = b.infos[e->block];
          ASSIGN_OR_RETURN(std::vector<TensorBytes> got,
                           client->DownloadTensors(info.block_id(), v1::TENSOR_KIND_WEIGHTS, v1::DTYPE_FLOAT32));
          std::map<std::string, Adapter> lora;
          block.clear();
          RETURN_IF_ERROR(SplitLora(got, &block, &lora));
          if (merge_) {
            if (lora.empty()) {
              return absl::FailedPreconditionError(
                  absl::StrCat("block ", info.block_id(), " has no LoRA adapters to merge"));
            }
            ASSIGN_OR_RETURN(Lora l, LoraParams(b.infos[0], {lora}, alpha));
            RETURN_IF_ERROR(MergeLora(lora, l.alpha / static_cast<double>(l.rank), &block));
          }
          cached = e->block;
        }
        auto it = block.find(e->tensor);
        if (it == block.end()) {
          return absl::DataLossError(absl::StrCat("block ", b.infos[e->block].block_id(), " sent no ", e->tensor));
        }
        TensorBytes t = it->second;
        t.name = e->name;
        if (dtype == v1::DTYPE_BFLOAT16) {
          ASSIGN_OR_RETURN(std::vector<float> v, wire::DecodeToFloat32(t.dtype, t.data));
          t.data = wire::EncodeFloat32(v.data(), v.size(), dtype);
          t.dtype = dtype;
        }
        tensors.push_back(std::move(t));
      }
      written.push_back(file);
      RETURN_IF_ERROR(WriteSafetensors((fs::path(out_) / file).string(), tensors, "", {{"format", "pt"}}));
    }
    std::vector<std::string> ids(in.args().begin(), in.args().end());
    json metadata = {
        {"total_size", total},
        {"blockd_export", ckpt ? "complete model: the blocks' layers and the base checkpoint's other tensors"
                               : "layers only: no embed_tokens, norm or lm_head (export with a base checkpoint, "
                                 "--base DIR, for a loadable model)"},
        {"blockd_layers", absl::StrCat(first_layer_, "..", last, " from blocks ", absl::StrJoin(ids, ", "))}};
    if (!merge_ && LoraOf(b.infos[0])) {
      metadata["blockd_adapters"] = "not merged: the base weights only (export-peft writes the adapters)";
    }
    written.push_back("config.json");
    RETURN_IF_ERROR(WriteJson((fs::path(out_) / "config.json").string(), config));
    written.push_back(kIndex);
    return WriteJson((fs::path(out_) / kIndex).string(), {{"metadata", metadata}, {"weight_map", weight_map}});
  }();
  if (!s.ok()) {
    Undo(out_, written, created);
    return s;
  }
  std::fprintf(stderr, "exported layers %lld..%lld to %s: %s\n", static_cast<long long>(first_layer_),
               static_cast<long long>(last), out_.c_str(),
               ckpt ? "a complete model" : "the layers only (no embedding, norm or head: pass --base)");
  return absl::OkStatus();
}

class ExportPeft : public Command {
 public:
  void AddFlags(FlagSet* f) override {
    f->String("o", &out_, "output directory (new or empty, else --force)");
    f->String("output", &out_, "same as -o");
    f->String("base_model", &base_model_, "adapter_config.json's base_model_name_or_path");
    f->String("dtype", &dtype_text_, "bf16 or fp32 (default fp32)");
    f->Int("first_layer", &first_layer_, "layer index of the first block");
    f->Double("lora_alpha", &lora_alpha_, "LoRA alpha when the blocks do not say it");
    f->Bool("force", &force_, "write into a non-empty directory");
  }
  absl::Status Run(Invocation& in) override;

 private:
  std::string out_, base_model_, dtype_text_ = "fp32";
  int64_t first_layer_ = 0;
  double lora_alpha_ = 0;
  bool force_ = false;
};

absl::Status ExportPeft::Run(Invocation& in) {
  if (out_.empty()) return Usage("export-peft needs -o DIR");
  if (first_layer_ < 0) return Usage(absl::StrCat("--first_layer=", first_layer_, ": expected >= 0"));
  RETURN_IF_ERROR(ExportDType({}, dtype_text_).status());  // a usage error, before dialing
  ASSIGN_OR_RETURN(Client * client, in.Connect());
  ASSIGN_OR_RETURN(Blocks b, BlocksOf(client, in.args()));
  ASSIGN_OR_RETURN(const v1::DType dtype, ExportDType(b.infos, dtype_text_));
  // (a pointer, not std::optional: GCC 12 warns maybe-uninitialized on an optional<double> here)
  const double* alpha = in.IsSet("lora_alpha") ? &lora_alpha_ : nullptr;
  std::map<std::string, std::vector<int64_t>> shapes;
  for (const ParamSpec& p : BlockParams(b.config)) shapes[p.name] = p.shape;

  std::vector<std::map<std::string, Adapter>> adapters;
  for (const v1::BlockInfo& info : b.infos) {
    ASSIGN_OR_RETURN(std::vector<TensorBytes> got,
                     client->DownloadTensors(info.block_id(), v1::TENSOR_KIND_WEIGHTS, v1::DTYPE_FLOAT32));
    std::map<std::string, TensorBytes> base;
    std::map<std::string, Adapter> lora;
    RETURN_IF_ERROR(SplitLora(got, &base, &lora));
    if (lora.empty()) {
      return absl::FailedPreconditionError(absl::StrCat("block ", info.block_id(),
                                                        " has no LoRA adapters (tensors named *.lora_A.weight): "
                                                        "create it with a lora config"));
    }
    for (const auto& [module, ad] : lora) {
      auto it = shapes.find(module + ".weight");
      const bool fits = it != shapes.end() && ad.a_shape.size() == 2 && ad.b_shape.size() == 2 &&
                        ad.a_shape[1] == it->second[1] && ad.b_shape[0] == it->second[0] &&
                        ad.a_shape[0] == ad.b_shape[1];
      if (!fits) {
        return absl::InvalidArgumentError(absl::StrCat("block ", info.block_id(), ": adapter of ", module,
                                                       " has lora_A ", ShapeString(ad.a_shape), ", lora_B ",
                                                       ShapeString(ad.b_shape), ", which do not fit ", module,
                                                       ".weight"));
      }
    }
    if (!adapters.empty()) {
      std::set<std::string> mine, first;
      for (const auto& [m, ad] : lora) mine.insert(m);
      for (const auto& [m, ad] : adapters[0]) first.insert(m);
      if (mine != first) {
        return absl::InvalidArgumentError(absl::StrCat("block ", info.block_id(), " adapts ", absl::StrJoin(mine, ","),
                                                       ", block ", b.infos[0].block_id(), " adapts ",
                                                       absl::StrJoin(first, ","), ": one adapter config for all layers"));
      }
    }
    adapters.push_back(std::move(lora));
  }
  ASSIGN_OR_RETURN(Lora l, LoraParams(b.infos[0], adapters, alpha));
  std::vector<TensorBytes> tensors;
  std::vector<int64_t> layers;
  for (size_t k = 0; k < adapters.size(); ++k) {
    const int64_t layer = first_layer_ + static_cast<int64_t>(k);
    layers.push_back(layer);
    std::vector<std::string> modules;
    for (const auto& [m, ad] : adapters[k]) modules.push_back(m);
    std::stable_sort(modules.begin(), modules.end(),
                     [](const std::string& x, const std::string& y) { return TargetOrder(x) < TargetOrder(y); });
    for (const std::string& m : modules) {
      const Adapter& ad = adapters[k].at(m);
      for (const char* part : {"A", "B"}) {
        const bool is_a = part[0] == 'A';
        const std::vector<float>& v = is_a ? ad.a : ad.b;
        tensors.push_back({absl::StrCat("base_model.model.model.layers.", layer, ".", m, ".lora_", part, ".weight"),
                           dtype, is_a ? ad.a_shape : ad.b_shape, wire::EncodeFloat32(v.data(), v.size(), dtype)});
      }
    }
  }
  const json config = {{"peft_type", "LORA"}, {"task_type", "CAUSAL_LM"}, {"r", l.rank}, {"lora_alpha", l.alpha},
                       {"target_modules", l.targets},
                       {"base_model_name_or_path", base_model_.empty() ? json(nullptr) : json(base_model_)},
                       {"bias", "none"}, {"fan_in_fan_out", false}, {"lora_dropout", 0.0}, {"inference_mode", true},
                       {"init_lora_weights", true}, {"use_rslora", false}, {"use_dora", false},
                       {"modules_to_save", nullptr}, {"layers_to_transform", layers}, {"layers_pattern", nullptr},
                       {"rank_pattern", json::object()}, {"alpha_pattern", json::object()}, {"revision", nullptr}};
  ASSIGN_OR_RETURN(const bool created, PrepareDir(out_, force_));
  std::vector<std::string> written = {"adapter_model.safetensors"};
  absl::Status s = WriteSafetensors((fs::path(out_) / written[0]).string(), tensors, "", {{"format", "pt"}});
  if (s.ok()) {
    written.push_back("adapter_config.json");
    s = WriteJson((fs::path(out_) / written[1]).string(), config);
  }
  if (!s.ok()) {
    Undo(out_, written, created);
    return s;
  }
  std::fprintf(stderr, "exported a rank-%lld adapter of %s to %s\n", static_cast<long long>(l.rank),
               absl::StrJoin(l.targets, ", ").c_str(), out_.c_str());
  return absl::OkStatus();
}

}  // namespace

std::vector<CommandSpec> ExportCommands() {
  return {
      {"export-hf", "write blocks as a Hugging Face checkpoint (config.json, safetensors shards, index)",
       "blockctl export-hf BLOCK_IDS... -o DIR [--base=CKPT] [--dtype=bf16|fp32] [--first_layer=N] [--merge] [--force]",
       "Write the blocks, in the order given, as the decoder layers FIRST.. of a Hugging Face Llama / Qwen2 /\n"
       "Qwen3 checkpoint: config.json, model-0000k-of-0000n.safetensors and model.safetensors.index.json,\n"
       "tensors named model.layers.{i}.<name>. The blocks must share one config. With --base (the checkpoint\n"
       "the blocks came from) its config and every tensor the blocks do not replace (embed_tokens, norm,\n"
       "lm_head, other layers) are copied, so transformers loads the result; without it the export holds the\n"
       "layers only (the index's metadata says so). dtype: the blocks' own (bf16 for BF16 blocks) unless\n"
       "--dtype. --merge folds LoRA adapters into the weights (W + alpha/rank B A in fp32). DIR must be new\n"
       "or empty unless --force. `python3 -m blockd export-hf` does the same.",
       {1, -1, "export-hf takes one or more BLOCK ids"}, [] { return std::make_unique<ExportHf>(); }},
      {"export-peft", "write the blocks' LoRA adapters as a PEFT adapter",
       "blockctl export-peft BLOCK_IDS... -o DIR [--base_model=NAME] [--first_layer=N] [--force]",
       "Write the blocks' LoRA adapters as a PEFT adapter: adapter_model.safetensors with PEFT's names\n"
       "(base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight, ...) and adapter_config.json\n"
       "(peft_type LORA, r, lora_alpha, target_modules, layers_to_transform, task_type CAUSAL_LM).\n"
       "`python3 -m blockd export-peft` does the same.",
       {1, -1, "export-peft takes one or more BLOCK ids"}, [] { return std::make_unique<ExportPeft>(); }},
  };
}

}  // namespace blockd
