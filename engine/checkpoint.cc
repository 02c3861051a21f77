#include "engine/checkpoint.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <tuple>

#include <openssl/evp.h>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "base/echo.h"
#include "base/log.h"
#include "base/safetensors.h"
#include "base/status_macros.h"
#include "nlohmann/json.hpp"

namespace blockd {

std::string Sha256Hex(absl::string_view data) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  EVP_Digest(data.data(), data.size(), md, &len, EVP_sha256(), nullptr);
  std::string hex;
  for (unsigned int i = 0; i < len; ++i) absl::StrAppendFormat(&hex, "%02x", md[i]);
  return hex;
}

namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

constexpr char kFormat[] = "blockd-checkpoint-v1";
constexpr char kManifestSumKey[] = "manifest_sha256";
// true for a checkpoint saved without a name (every_steps, or SaveCheckpoint with no name): only
// those rotate. Manifests from before the field: automatic iff the name is a generated one.
constexpr char kAutomaticKey[] = "automatic";

std::string AutomaticName(int64_t sequence) { return absl::StrFormat("ckpt-%08d", sequence); }

bool LooksAutomatic(const std::string& name) {
  return name.size() == 13 && name.rfind("ckpt-", 0) == 0 &&
         std::all_of(name.begin() + 5, name.end(), [](char c) { return c >= '0' && c <= '9'; });
}

// SHA-256 of the manifest without its own checksum field, in nlohmann's canonical compact form
// (object keys sorted), so it can be recomputed from the parsed file.
std::string ManifestSum(const json& manifest_without_sum) { return Sha256Hex(manifest_without_sum.dump()); }

absl::Status Errno(absl::string_view what, const std::string& path) {
  return absl::InternalError(absl::StrCat(what, " ", path, ": ", std::strerror(errno)));
}

absl::Status WriteFileSynced(const std::string& path, absl::string_view bytes) {
  const int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return Errno("cannot create", path);
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t w = write(fd, bytes.data() + done, bytes.size() - done);
    if (w < 0 && errno == EINTR) continue;
    if (w < 0) {
      absl::Status s = Errno("cannot write", path);
      close(fd);
      return s;
    }
    done += static_cast<size_t>(w);
  }
  if (fsync(fd) != 0) {
    absl::Status s = Errno("cannot fsync", path);
    close(fd);
    return s;
  }
  if (close(fd) != 0) return Errno("cannot close", path);
  return absl::OkStatus();
}

absl::Status SyncDir(const std::string& path) {
  const int fd = open(path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return Errno("cannot open directory", path);
  const int r = fsync(fd);
  close(fd);
  if (r != 0) return Errno("cannot fsync directory", path);
  return absl::OkStatus();
}

absl::StatusOr<std::string> ReadWholeFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", path));
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

absl::Status ValidateName(const std::string& name) {
  const bool ok = !name.empty() && name.size() <= 128 && name[0] != '.' && name != "LATEST" &&
                  std::all_of(name.begin(), name.end(), [](char c) {
                    return std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' || c == '-';
                  });
  if (!ok) {
    return absl::InvalidArgumentError(absl::StrCat("checkpoint name \"", Echo(name),
                                                   "\" is not valid: expected 1-128 characters of [A-Za-z0-9._-], "
                                                   "not starting with '.'"));
  }
  return absl::OkStatus();
}

std::string PrecisionString(Precision p) { return std::string(PrecisionName(p)); }

absl::StatusOr<Precision> ParsePrecision(const std::string& s) {
  for (Precision p : {Precision::kFP32, Precision::kTF32, Precision::kBF16}) {
    if (PrecisionName(p) == s) return p;
  }
  return absl::DataLossError(absl::StrCat("unknown precision \"", s, "\""));
}

json SpecJson(const BlockState& st) {
  const BlockConfig& c = st.spec.config;
  json j = {{"block_id", st.spec.id},
            {"layer_index", st.spec.layer_index},
            {"max_seq_len", st.spec.max_seq_len},
            {"max_batch_size", st.spec.max_batch_size},
            {"precision", PrecisionString(st.spec.precision)},
            {"device", st.spec.device},
            {"step", st.step},
            {"config",
             {{"hidden_size", c.hidden_size},
              {"num_attention_heads", c.num_attention_heads},
              {"num_kv_heads", c.num_kv_heads},
              {"head_dim", c.head_dim},
              {"intermediate_size", c.intermediate_size},
              {"rms_norm_eps", c.rms_norm_eps},
              {"rope_theta", c.rope_theta},
              {"qk_norm", c.qk_norm}}}};
  // Written only when set, so manifests of plain blocks stay as before and older ones still read.
  if (st.spec.frozen) j["frozen"] = true;
  if (st.spec.lora.rank > 0) {
    j["lora"] = {{"rank", st.spec.lora.rank}, {"alpha", st.spec.lora.alpha},
                 {"target_modules", st.spec.lora.target_modules}};
  }
  if (c.attention_bias) j["config"]["attention_bias"] = true;
  if (!c.rope_scaling.is_default()) {
    const RopeScaling& r = c.rope_scaling;
    j["config"]["rope_scaling"] = {{"rope_type", r.rope_type},
                                   {"factor", r.factor},
                                   {"low_freq_factor", r.low_freq_factor},
                                   {"high_freq_factor", r.high_freq_factor},
                                   {"original_max_position_embeddings", r.original_max_position_embeddings},
                                   {"attention_factor", r.attention_factor},
                                   {"beta_fast", r.beta_fast},
                                   {"beta_slow", r.beta_slow}};
  }
  j["missing_weights"] = st.missing_weights;
  if (st.last_adamw) {
    const AdamWHyper& a = *st.last_adamw;
    j["adamw"] = {{"lr", a.lr},         {"beta1", a.beta1},
                  {"beta2", a.beta2},   {"eps", a.eps},
                  {"weight_decay", a.weight_decay}, {"decay_norm_weights", a.decay_norm_weights}};
  } else {
    j["adamw"] = nullptr;
  }
  return j;
}

// Fills everything of `st` except the tensors from one manifest entry; DATA_LOSS when malformed.
absl::Status SpecFromJson(const json& j, BlockState* st) {
  try {
    st->spec.id = j.at("block_id").get<std::string>();
    st->spec.layer_index = j.at("layer_index").get<int64_t>();
    st->spec.max_seq_len = j.at("max_seq_len").get<int64_t>();
    st->spec.max_batch_size = j.at("max_batch_size").get<int64_t>();
    ASSIGN_OR_RETURN(st->spec.precision, ParsePrecision(j.at("precision").get<std::string>()));
    st->spec.device = j.at("device").get<int>();
    st->step = j.at("step").get<int64_t>();
    st->spec.frozen = j.value("frozen", false);
    if (j.contains("lora")) {
      const json& l = j.at("lora");
      st->spec.lora.rank = l.at("rank").get<int32_t>();
      st->spec.lora.alpha = l.at("alpha").get<double>();
      st->spec.lora.target_modules = l.at("target_modules").get<std::vector<std::string>>();
    }
    const json& c = j.at("config");
    st->spec.config.hidden_size = c.at("hidden_size").get<int64_t>();
    st->spec.config.num_attention_heads = c.at("num_attention_heads").get<int64_t>();
    st->spec.config.num_kv_heads = c.at("num_kv_heads").get<int64_t>();
    st->spec.config.head_dim = c.at("head_dim").get<int64_t>();
    st->spec.config.intermediate_size = c.at("intermediate_size").get<int64_t>();
    st->spec.config.rms_norm_eps = c.at("rms_norm_eps").get<double>();
    st->spec.config.rope_theta = c.at("rope_theta").get<double>();
    st->spec.config.qk_norm = c.at("qk_norm").get<bool>();
    st->spec.config.attention_bias = c.value("attention_bias", false);
    if (c.contains("rope_scaling")) {
      const json& r = c.at("rope_scaling");
      RopeScaling& rs = st->spec.config.rope_scaling;
      rs.rope_type = r.at("rope_type").get<std::string>();
      rs.factor = r.at("factor").get<double>();
      rs.low_freq_factor = r.at("low_freq_factor").get<double>();
      rs.high_freq_factor = r.at("high_freq_factor").get<double>();
      rs.original_max_position_embeddings = r.at("original_max_position_embeddings").get<int64_t>();
      rs.attention_factor = r.at("attention_factor").get<double>();
      rs.beta_fast = r.at("beta_fast").get<double>();
      rs.beta_slow = r.at("beta_slow").get<double>();
    }
    if (j.contains("missing_weights")) st->missing_weights = j.at("missing_weights").get<std::vector<std::string>>();
    const json& a = j.at("adamw");
    if (!a.is_null()) {
      AdamWHyper h;
      h.lr = a.at("lr").get<double>();
      h.beta1 = a.at("beta1").get<double>();
      h.beta2 = a.at("beta2").get<double>();
      h.eps = a.at("eps").get<double>();
      h.weight_decay = a.at("weight_decay").get<double>();
      h.decay_norm_weights = a.at("decay_norm_weights").get<bool>();
      st->last_adamw = h;
    }
  } catch (const json::exception& e) {
    return absl::DataLossError(absl::StrCat("manifest entry is malformed: ", e.what()));
  }
  return absl::OkStatus();
}

class FileCheckpointer : public Checkpointer {
 public:
  FileCheckpointer(Engine* engine, std::string dir, int64_t every_steps, int keep)
      : engine_(engine), dir_(std::move(dir)), every_steps_(every_steps), keep_(keep) {}

  absl::Status Init() {
    std::error_code ec;
    fs::create_directories(dir_, ec);
    if (ec) return absl::PermissionDeniedError(absl::StrCat("cannot create --checkpoint_dir ", dir_, ": ", ec.message()));
    // Leftovers of writes a crash interrupted are never complete checkpoints.
    for (const auto& entry : fs::directory_iterator(dir_, ec)) {
      const std::string base = entry.path().filename().string();
      if (base.rfind(".tmp-", 0) == 0 || base == ".LATEST.tmp") {
        BLOCKD_LOG(kInfo, "removing an interrupted checkpoint write ", entry.path().string());
        fs::remove_all(entry.path(), ec);
      }
    }
    absl::MutexLock lock(&mu_);
    for (const CommittedCheckpoint& c : Committed()) next_sequence_ = std::max(next_sequence_, c.sequence + 1);
    return absl::OkStatus();
  }

  absl::StatusOr<CheckpointResult> Save(const std::vector<std::string>& block_ids, const std::string& name) override {
    absl::MutexLock lock(&mu_);
    return SaveLocked(block_ids, name);
  }

  absl::StatusOr<CheckpointResult> Restore(const std::string& name, const std::vector<std::string>& block_ids) override {
    absl::MutexLock lock(&mu_);
    std::string chosen = name;
    bool from_latest = false;
    if (chosen.empty()) {
      auto latest = ReadWholeFile(dir_ + "/LATEST");
      if (latest.ok()) {
        chosen = std::string(absl::StripAsciiWhitespace(*latest));
        from_latest = true;
        // LATEST is only ever written after its checkpoint is complete, so a LATEST that names
        // nothing usable is damage, never "no checkpoint yet" (which would start training afresh).
        if (!ValidateName(chosen).ok()) {
          return absl::DataLossError(absl::StrCat(dir_, "/LATEST is corrupt: it holds \"", Echo(chosen),
                                                  "\", not a checkpoint name"));
        }
      } else {
        auto committed = Committed();
        if (committed.empty()) return absl::NotFoundError(absl::StrCat("no checkpoint in ", dir_));
        chosen = committed.back().name;
      }
    }
    RETURN_IF_ERROR(ValidateName(chosen));
    const std::string path = dir_ + "/" + chosen;
    if (!fs::is_directory(path)) {
      if (from_latest) {
        return absl::DataLossError(absl::StrCat(dir_, "/LATEST names checkpoint ", chosen, ", but ", path,
                                                " does not exist"));
      }
      return absl::NotFoundError(absl::StrCat("no checkpoint ", chosen, " in ", dir_));
    }
    ASSIGN_OR_RETURN(std::vector<BlockState> states, Load(path, block_ids));
    RETURN_IF_ERROR(engine_->ImportBlocks(states, /*replace=*/true));
    CheckpointResult r;
    r.path = path;
    for (const BlockState& st : states) r.block_ids.push_back(st.spec.id);
    return r;
  }

  void AfterStep(const std::vector<std::string>& block_ids) override {
    if (every_steps_ <= 0) return;
    absl::MutexLock lock(&mu_);
    if (++steps_since_save_ < every_steps_) return;
    steps_since_save_ = 0;
    auto r = SaveLocked({}, "");
    if (r.ok()) {
      BLOCKD_LOG(kInfo, "automatic checkpoint ", r->path, " (", r->block_ids.size(), " blocks)");
    } else {
      BLOCKD_LOG(kError, "automatic checkpoint failed: ", r.status().ToString());
    }
  }

 private:
  absl::StatusOr<CheckpointResult> SaveLocked(const std::vector<std::string>& requested, const std::string& given)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    const std::vector<std::string> ids = requested.empty() ? engine_->BlockIds() : requested;
    if (ids.empty()) return absl::FailedPreconditionError("there are no blocks to checkpoint");
    const bool automatic = given.empty();
    if (automatic) {
      // A user may have taken a generated name for a checkpoint of their own: pass over it.
      while (fs::exists(dir_ + "/" + AutomaticName(next_sequence_))) ++next_sequence_;
    }
    const int64_t sequence = next_sequence_;
    const std::string name = automatic ? AutomaticName(sequence) : given;
    RETURN_IF_ERROR(ValidateName(name));
    const std::string final_path = dir_ + "/" + name;
    if (fs::exists(final_path)) return absl::AlreadyExistsError(absl::StrCat("checkpoint ", final_path, " exists"));
    ASSIGN_OR_RETURN(std::vector<BlockState> states, engine_->ExportBlocks(ids));

    const std::string tmp = absl::StrFormat("%s/.tmp-%s-%016x", dir_, name, std::random_device()());
    if (mkdir(tmp.c_str(), 0755) != 0) return Errno("cannot create", tmp);
    auto cleanup = [&] {
      std::error_code ec;
      fs::remove_all(tmp, ec);
    };
    json manifest = {{"format", kFormat}, {"sequence", sequence}, {kAutomaticKey, automatic}, {"blocks", json::array()}};
    int64_t total = 0;
    for (size_t i = 0; i < states.size(); ++i) {
      const BlockState& st = states[i];
      std::vector<SafetensorsTensorRef> refs;
      for (auto [prefix, tensors] : {std::pair{"weights/", &st.weights}, std::pair{"adam_m/", &st.adam_m},
                                     std::pair{"adam_v/", &st.adam_v}}) {
        for (const NamedTensor& t : *tensors) refs.push_back({absl::StrCat(prefix, t.name), t.dtype, t.shape, t.bytes});
      }
      auto bytes = SerializeSafetensors(refs, {{"block_id", st.spec.id}, {"format", kFormat}});
      if (!bytes.ok()) {
        cleanup();
        return bytes.status();
      }
      const std::string file = absl::StrFormat("block-%04d.safetensors", i);
      absl::Status w = WriteFileSynced(tmp + "/" + file, *bytes);
      if (!w.ok()) {
        cleanup();
        return w;
      }
      json entry = SpecJson(st);
      entry["file"] = file;
      entry["bytes"] = bytes->size();
      entry["sha256"] = Sha256Hex(*bytes);
      manifest["blocks"].push_back(entry);
      total += static_cast<int64_t>(bytes->size());
    }
    manifest[kManifestSumKey] = ManifestSum(manifest);
    absl::Status s = WriteFileSynced(tmp + "/manifest.json", manifest.dump(2));
    if (s.ok()) s = SyncDir(tmp);
    if (s.ok() && rename(tmp.c_str(), final_path.c_str()) != 0) s = Errno("cannot rename into", final_path);
    if (!s.ok()) {
      cleanup();
      return s;
    }
    RETURN_IF_ERROR(SyncDir(dir_));
    ++next_sequence_;
    // Point LATEST at it, again by rename.
    const std::string latest_tmp = dir_ + "/.LATEST.tmp";
    RETURN_IF_ERROR(WriteFileSynced(latest_tmp, name + "\n"));
    if (rename(latest_tmp.c_str(), (dir_ + "/LATEST").c_str()) != 0) return Errno("cannot rename into", dir_ + "/LATEST");
    RETURN_IF_ERROR(SyncDir(dir_));
    if (automatic) Prune(name);
    CheckpointResult r;
    r.path = final_path;
    r.block_ids = ids;
    r.bytes = total;
    return r;
  }

  struct CommittedCheckpoint {
    int64_t sequence;
    std::string name;
    bool automatic;
    bool operator<(const CommittedCheckpoint& o) const {
      return std::tie(sequence, name) < std::tie(o.sequence, o.name);
    }
  };

  // Committed checkpoints (a directory with a manifest), oldest first.
  std::vector<CommittedCheckpoint> Committed() const {
    std::vector<CommittedCheckpoint> out;
    std::error_code ec;
    for (const auto& entry : fs::directory_iterator(dir_, ec)) {
      const std::string base = entry.path().filename().string();
      if (!entry.is_directory() || base.empty() || base[0] == '.') continue;
      auto text = ReadWholeFile(entry.path().string() + "/manifest.json");
      if (!text.ok()) continue;
      json m = json::parse(*text, nullptr, /*allow_exceptions=*/false);
      if (m.is_discarded() || !m.is_object() || !m.contains("sequence") || !m["sequence"].is_number_integer()) continue;
      const bool automatic = m.contains(kAutomaticKey) && m[kAutomaticKey].is_boolean()
                                 ? m[kAutomaticKey].get<bool>()
                                 : LooksAutomatic(base);
      out.push_back({m["sequence"].get<int64_t>(), base, automatic});
    }
    std::sort(out.begin(), out.end());
    return out;
  }

  // Keeps the newest keep_ automatic checkpoints (the one just saved among them). Checkpoints the
  // user named are theirs to delete: a `good` one must outlive any number of later saves.
  void Prune(const std::string& newest) {
    std::vector<std::string> automatic;
    for (const CommittedCheckpoint& c : Committed()) {
      if (c.automatic) automatic.push_back(c.name);
    }
    const int64_t excess = static_cast<int64_t>(automatic.size()) - keep_;
    for (int64_t i = 0; i < excess; ++i) {
      if (automatic[i] == newest) continue;
      std::error_code ec;
      fs::remove_all(dir_ + "/" + automatic[i], ec);
    }
  }

  absl::StatusOr<std::vector<BlockState>> Load(const std::string& path, const std::vector<std::string>& wanted) {
    auto text = ReadWholeFile(path + "/manifest.json");
    if (!text.ok()) {
      return absl::DataLossError(absl::StrCat("checkpoint ", path, " is incomplete: it has no manifest.json"));
    }
    json m = json::parse(*text, nullptr, /*allow_exceptions=*/false);
    if (m.is_discarded() || !m.is_object() || m.value("format", "") != kFormat || !m.contains("blocks") ||
        !m["blocks"].is_array()) {
      return absl::DataLossError(absl::StrCat("checkpoint ", path, ": manifest.json is not a ", kFormat, " manifest"));
    }
    // The manifest carries the checksums of the block files; its own protects the specs, steps and
    // AdamW settings, which a flipped digit would otherwise change silently.
    if (!m.contains(kManifestSumKey) || !m[kManifestSumKey].is_string()) {
      return absl::DataLossError(absl::StrCat("checkpoint ", path, ": manifest.json has no ", kManifestSumKey));
    }
    const std::string recorded = m[kManifestSumKey].get<std::string>();
    m.erase(kManifestSumKey);
    if (ManifestSum(m) != recorded) {
      return absl::DataLossError(
          absl::StrCat("checkpoint ", path, ": manifest.json does not match its ", kManifestSumKey, " (corrupt)"));
    }
    std::vector<BlockState> states;
    std::vector<bool> found(wanted.size(), false);
    for (const json& entry : m["blocks"]) {
      BlockState st;
      absl::Status s = SpecFromJson(entry, &st);
      if (!s.ok()) return absl::DataLossError(absl::StrCat("checkpoint ", path, ": ", s.message()));
      auto w = std::find(wanted.begin(), wanted.end(), st.spec.id);
      if (!wanted.empty() && w == wanted.end()) continue;
      if (w != wanted.end()) found[w - wanted.begin()] = true;
      const std::string file = entry.value("file", "");
      if (file.empty() || file.find('/') != std::string::npos || file[0] == '.') {
        return absl::DataLossError(absl::StrCat("checkpoint ", path, ": block ", st.spec.id, " names no valid file"));
      }
      auto bytes = ReadWholeFile(path + "/" + file);
      if (!bytes.ok()) return absl::DataLossError(absl::StrCat("checkpoint ", path, ": ", file, " is missing"));
      if (static_cast<int64_t>(bytes->size()) != entry.value("bytes", int64_t{-1}) ||
          Sha256Hex(*bytes) != entry.value("sha256", "")) {
        return absl::DataLossError(absl::StrCat("checkpoint ", path, ": ", file, " (block ", st.spec.id,
                                                ") does not match its size and sha256 in the manifest"));
      }
      auto f = SafetensorsFile::Parse(std::move(*bytes));
      if (!f.ok()) return absl::DataLossError(absl::StrCat("checkpoint ", path, ": ", file, ": ", f.status().message()));
      for (const ParamSpec& p : BlockParams(st.spec.config, st.spec.lora)) {
        for (auto [prefix, dst] : {std::pair{"weights/", &st.weights}, std::pair{"adam_m/", &st.adam_m},
                                   std::pair{"adam_v/", &st.adam_v}}) {
          if (dst != &st.weights && !TrainsParam(st.spec, p)) continue;  // a frozen block keeps no moments
          const SafetensorsEntry* e = f->Find(absl::StrCat(prefix, p.name));
          if (e == nullptr) {
            return absl::DataLossError(absl::StrCat("checkpoint ", path, ": ", file, " lacks ", prefix, p.name));
          }
          dst->push_back({p.name, e->shape, e->dtype, std::string(f->data(*e))});
        }
      }
      states.push_back(std::move(st));
    }
    for (size_t i = 0; i < wanted.size(); ++i) {
      if (!found[i]) return absl::NotFoundError(absl::StrCat("checkpoint ", path, " has no block ", Echo(wanted[i])));
    }
    return states;
  }

  Engine* engine_;
  std::string dir_;
  int64_t every_steps_;
  int keep_;
  absl::Mutex mu_;
  int64_t next_sequence_ ABSL_GUARDED_BY(mu_) = 1;
  int64_t steps_since_save_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Checkpointer>> MakeFileCheckpointer(Engine* engine, const std::string& dir,
                                                                   int64_t every_steps, int keep) {
  if (dir.empty()) return absl::InvalidArgumentError("--checkpoint_dir is empty");
  if (keep < 1) {
    return absl::InvalidArgumentError(absl::StrCat("--checkpoint_keep = ", keep,
                                                   ", expected >= 1 (the newest automatic checkpoint is always kept)"));
  }
  auto c = std::make_unique<FileCheckpointer>(engine, dir, every_steps, keep);
  RETURN_IF_ERROR(c->Init());
  return std::unique_ptr<Checkpointer>(std::move(c));
}

}  // namespace blockd
