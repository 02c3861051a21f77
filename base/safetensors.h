// Hugging Face safetensors files: a strict reader (memory-mapped) and a writer.
//
// Layout: an 8-byte little-endian header length N, N bytes of JSON
//   {"__metadata__": {"k": "v"}, "name": {"dtype": "BF16", "shape": [4, 8], "data_offsets": [0, 64]}, ...}
// then the data buffer. The reader rejects, with a message naming the problem: short files, a
// header that is not a JSON object or is larger than the file, duplicate names, unknown dtypes,
// negative or overflowing shapes, offsets that disagree with the shape, overlap, holes, or bytes
// left over after the last tensor. dtypes F32, BF16 and F16 are read; others are refused.
//
//   ASSIGN_OR_RETURN(SafetensorsFile f, SafetensorsFile::Open("model.safetensors"));
//   for (const SafetensorsEntry& t : f.tensors()) use(t.name, t.dtype, t.shape, f.data(t));
//   RETURN_IF_ERROR(WriteSafetensorsFile("out.safetensors", {{"w", DType::kFloat32, {2, 2}, bytes}}, {}));
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include "absl/strings/string_view.h"
#include <vector>

#include "absl/status/statusor.h"
#include "base/dtype.h"

namespace blockd {

struct SafetensorsEntry {
  std::string name;
  DType dtype = DType::kFloat32;
  std::vector<int64_t> shape;
  uint64_t offset = 0;  // into the data buffer
  uint64_t size = 0;    // bytes
};

class SafetensorsFile {
 public:
  // Parses a whole file held in memory (kept alive by the returned object).
  static absl::StatusOr<SafetensorsFile> Parse(std::string bytes);
  // Memory-maps and parses the file at `path`.
  static absl::StatusOr<SafetensorsFile> Open(const std::string& path);

  const std::vector<SafetensorsEntry>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const SafetensorsEntry* Find(absl::string_view name) const;
  absl::string_view data(const SafetensorsEntry& e) const {
    return absl::string_view(buffer_.data() + e.offset, static_cast<size_t>(e.size));
  }

 private:
  static absl::StatusOr<SafetensorsFile> FromView(std::shared_ptr<const void> owner, absl::string_view whole);

  std::shared_ptr<const void> owner_;  // keeps the mapping or string alive
  absl::string_view buffer_;            // the data buffer after the header
  std::vector<SafetensorsEntry> tensors_;
  std::map<std::string, std::string> metadata_;
};

struct SafetensorsTensorRef {
  std::string name;
  DType dtype = DType::kFloat32;
  std::vector<int64_t> shape;
  absl::string_view bytes;
};

// The file's bytes: header (padded to 8 bytes with spaces) then tensors in the given order.
absl::StatusOr<std::string> SerializeSafetensors(const std::vector<SafetensorsTensorRef>& tensors,
                                                 const std::map<std::string, std::string>& metadata);
// Writes the file and fsyncs it (not its directory).
absl::Status WriteSafetensorsFile(const std::string& path, const std::vector<SafetensorsTensorRef>& tensors,
                                  const std::map<std::string, std::string>& metadata);

absl::string_view SafetensorsDTypeName(DType t);  // "F32", "BF16", "F16"

}  // namespace blockd
