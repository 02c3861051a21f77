// libFuzzer target: the safetensors reader (SafetensorsFile::Parse) on arbitrary bytes.
//
// Besides the sanitizers' checks, every outcome must be one the reader documents: a refusal is
// INVALID_ARGUMENT, and an accepted file is self-consistent (each tensor's bytes lie inside the
// data buffer and match its shape and dtype) and survives a write/read round trip unchanged.
//
//   safetensors_fuzzer -dict=fuzz/safetensors.dict WORK_DIR fuzz/corpus/safetensors
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "base/safetensors.h"

namespace {

[[noreturn]] void Fail(const char* what) {
  std::fprintf(stderr, "safetensors_fuzzer: %s\n", what);
  std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using blockd::SafetensorsFile;
  auto file = SafetensorsFile::Parse(std::string(reinterpret_cast<const char*>(data), size));
  if (!file.ok()) {
    if (file.status().code() != absl::StatusCode::kInvalidArgument) Fail("a refusal that is not INVALID_ARGUMENT");
    if (file.status().message().rfind("safetensors: ", 0) != 0) Fail("a refusal that does not say safetensors");
    return 0;
  }
  std::vector<blockd::SafetensorsTensorRef> refs;
  uint64_t total = 0;
  for (const blockd::SafetensorsEntry& e : file->tensors()) {
    uint64_t numel = 1;
    for (int64_t d : e.shape) {
      if (d < 0) Fail("an accepted tensor with a negative dimension");
      numel *= static_cast<uint64_t>(d);
    }
    if (numel * blockd::DTypeSize(e.dtype) != e.size) Fail("an accepted tensor whose size disagrees with its shape");
    const absl::string_view bytes = file->data(e);  // ASan checks the bytes are inside the input
    if (bytes.size() != e.size) Fail("data() of the wrong size");
    volatile char sink = 0;
    for (char c : bytes) sink = sink ^ c;
    total += e.size;
    refs.push_back({e.name, e.dtype, e.shape, bytes});
    if (file->Find(e.name) != &e) Fail("Find does not return the tensor");
  }
  if (8 + total > size) Fail("accepted tensors larger than the file");

  auto again = blockd::SerializeSafetensors(refs, file->metadata());
  if (!again.ok()) Fail("an accepted file cannot be written back");
  auto reread = SafetensorsFile::Parse(*again);
  if (!reread.ok()) Fail("a written file cannot be read back");
  if (reread->tensors().size() != refs.size() || reread->metadata() != file->metadata()) Fail("round trip changed the file");
  for (const blockd::SafetensorsTensorRef& r : refs) {
    const blockd::SafetensorsEntry* e = reread->Find(r.name);
    if (e == nullptr || e->dtype != r.dtype || e->shape != r.shape || reread->data(*e) != r.bytes) {
      Fail("round trip changed a tensor");
    }
  }
  return 0;
}
