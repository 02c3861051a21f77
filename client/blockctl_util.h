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
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "client/client.h"

namespace blockd {

// A one-line progress bar on stderr, drawn only when stderr is a terminal (isatty), at most ten
// times a second. Done() finishes the line.
class ProgressBar {
 public:
  explicit ProgressBar(std::string label);
  ~ProgressBar();
  void Update(int64_t done, int64_t total);
  void Done();
  ProgressFn Callback() {
    return [this](int64_t done, int64_t total) { Update(done, total); };
  }

 private:
  void Draw(int64_t done, int64_t total);
  std::string label_;
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

// Tensors of a safetensors checkpoint: `path` is a .safetensors file or a sharded checkpoint's
// index json (`weight_map` name -> shard file). With a non-empty `prefix` only tensors named
// prefix* are taken and the prefix is stripped. NOT_FOUND when nothing matches.
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
