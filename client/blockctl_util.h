// blockctl's helpers that are not about one subcommand: a progress bar for streams, value
// summaries of tensors, reading a block's tensors out of safetensors checkpoints (one file, a
// sharded checkpoint through its index json, one layer of a whole model), writing them back, and
// a minimal HTTP/1.0 GET for the metrics endpoint.
//
//   ASSIGN_OR_RETURN(std::vector<TensorBytes> t, ReadCheckpointTensors("model.safetensors.index.json", "model.layers.3."));
//   ProgressBar bar("load b0");  // draws on stderr only when it is a terminal
//   client->LoadWeights("b0", t, bar.Callback());
//   ASSIGN_OR_RETURN(std::string body, HttpGet("localhost:9464", absl::Seconds(5)));
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "client/client.h"
#include "base/safetensors.h"

namespace blockd {

// A one-line progress bar on stderr, drawn only when stderr is a terminal (isatty) unless
// `enabled` says otherwise, at most ten times a second. Done() finishes the line.
class ProgressBar {
 public:
  explicit ProgressBar(std::string label, std::optional<bool> enabled = std::nullopt);
  ~ProgressBar();
  void Update(int64_t done, int64_t total);
  // Text drawn after the numbers (what is moving now, e.g. a block id).
  void SetSuffix(std::string suffix);
  void Done();
  ProgressFn Callback() {
    return [this](int64_t done, int64_t total) { Update(done, total); };
  }

 private:
  void Draw(int64_t done, int64_t total);
  std::string label_, suffix_;
  bool enabled_;
  bool drawn_ = false;
  absl::Time start_, last_;
  int64_t done_ = 0, total_ = -1;
};

struct ValueSummary {
  int64_t count = 0;
  int64_t non_finite = 0;
  double mean = 0, std = 0, min = 0, max = 0;  // over the finite values
};
ValueSummary Summarize(const std::vector<float>& values);
// "mean=0.0012 std=0.998 min=-3.1 max=3.4" (and "non-finite=N" when any).
std::string SummaryString(const ValueSummary& s);

std::string HumanBytesString(int64_t bytes);  // "1.50 MiB"

// A safetensors checkpoint opened for reading: one .safetensors file, a sharded checkpoint's index
// json (its "weight_map" names each tensor's shard, a file beside the index), or a Hugging Face
// checkpoint directory (its model.safetensors.index.json, else every *.safetensors in it, in name
// order). Opening checks the index (every shard a plain file name that exists) or, without one,
// that no tensor is in two files; shards are memory-mapped when first needed, and Read copies one
// tensor out, so a whole model is never in memory at once.
//
//   ASSIGN_OR_RETURN(SafetensorsCheckpoint ckpt, SafetensorsCheckpoint::Open("/models/Qwen3-0.6B"));
//   ASSIGN_OR_RETURN(TensorBytes w, ckpt.Read("model.layers.3.mlp.up_proj.weight", "mlp.up_proj.weight"));
class SafetensorsCheckpoint {
 public:
  static absl::StatusOr<SafetensorsCheckpoint> Open(const std::string& path);

  const std::string& path() const { return path_; }
  // Every tensor name: the index's, in its order, or each file's in turn.
  const std::vector<std::string>& names() const { return names_; }
  bool Contains(const std::string& name) const { return where_.count(name) > 0; }
  // A tensor's name, dtype and shape with `data` left empty (this maps its shard). NOT_FOUND for
  // a name the checkpoint lacks; INVALID_ARGUMENT when the index puts it in a shard that lacks it.
  absl::StatusOr<TensorBytes> Describe(const std::string& name);
  // The whole tensor (bytes copied out of the mapping), named `as`.
  absl::StatusOr<TensorBytes> Read(const std::string& name, std::string as);
  // Every tensor named prefix* (all with an empty prefix), the prefix stripped. NOT_FOUND when none.
  absl::StatusOr<std::vector<TensorBytes>> ReadPrefix(const std::string& prefix);

 private:
  absl::StatusOr<const SafetensorsEntry*> Find(const std::string& name, const SafetensorsFile** file);

  std::string path_;
  std::string dir_;                                // shard file names are relative to it
  std::vector<std::string> names_;
  std::map<std::string, std::string> where_;       // tensor name -> shard file name
  std::map<std::string, SafetensorsFile> files_;  // shard file name -> the mapped file, once opened
};

// Tensors of a safetensors checkpoint (a file, an index json or a directory, as
// SafetensorsCheckpoint::Open takes). With a non-empty `prefix` only tensors named prefix* are
// taken and the prefix is stripped. NOT_FOUND when nothing matches.
absl::StatusOr<std::vector<TensorBytes>> ReadCheckpointTensors(const std::string& path, const std::string& prefix);
// One tensor of a safetensors file: `name`, or the only tensor when `name` is empty.
absl::StatusOr<TensorBytes> ReadSafetensor(const std::string& path, const std::string& name);
// Writes `tensors` (names prefixed with `prefix`) with string metadata.
absl::Status WriteSafetensors(const std::string& path, const std::vector<TensorBytes>& tensors,
                              const std::string& prefix, const std::map<std::string, std::string>& metadata);

// GET http://HOST:PORT/PATH over HTTP/1.0 and return the body. `url` is "host:port",
// "host:port/path" or "http://host:port/path" (path defaults to /metrics). UNAVAILABLE when it
// cannot connect, and the status line when the reply is not 200.
absl::StatusOr<std::string> HttpGet(const std::string& url, absl::Duration timeout);

}  // namespace blockd
