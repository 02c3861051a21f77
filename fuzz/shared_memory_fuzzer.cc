// libFuzzer target: shared-memory regions and the tensors that name them, on a tiny CPU engine.
//
// Each input is a script of up to 32 operations decoded with FuzzedDataProvider, by two identities
// over three real POSIX shared-memory objects this process creates (and a few keys that are not
// blockd's or do not exist): RegisterSharedMemory (name, key, byte_size and offset drawn from the
// input, with INT64 extremes, negatives and sums that overflow), UnregisterSharedMemory,
// ListSharedMemory, the TTL sweep, the client shrinking or growing its object, direct reads and
// writes of slices, and Forward through TensorTransport exactly as the service runs it: the input
// inline or from a slice, the output inline or into a slice, with the Tensor's dtype (invalid enum
// values too), shape and slice offset/size all drawn from the input. Besides the sanitizers' checks:
//   - every failure carries a documented code (never INTERNAL or UNKNOWN);
//   - a failed call changes nothing: the regions each identity lists, and every byte of every object;
//   - a successful write changes only the bytes of its slice's window, never a byte outside it;
//   - the registry agrees with a model of the script (which regions each identity holds);
//   - a Forward whose output went to a slice wrote there the bytes an inline Forward answers.
#include <fcntl.h>
#include <fuzzer/FuzzedDataProvider.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <map>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/cpu/cpu_backend.h"
#include "engine/engine.h"
#include "fuzz/fuzz_checks.h"
#include "server/metrics.h"
#include "server/shared_memory.h"
#include "server/shared_memory_transport.h"

namespace blockd {
namespace {

using fuzz::Fail;

constexpr int64_t kHidden = 8;
constexpr int kObjects = 3;
constexpr int64_t kObjectBytes[kObjects] = {4096, 512, 64};
const char* const kClients[] = {"alice", "bob"};
const char* const kNames[] = {"r0", "r1", "r2", "", "bad/name", "r0"};

void CheckCode(const absl::Status& s, const char* op) { fuzz::CheckCode(s, op, {}); }

// The client's side: objects this process created, whose bytes the checks read back directly.
class Objects {
 public:
  Objects() {
    for (int i = 0; i < kObjects; ++i) {
      keys_[i] = absl::StrCat("/blockd-fuzz-", getpid(), "-", i);
      fds_[i] = shm_open(keys_[i].c_str(), O_RDWR | O_CREAT | O_TRUNC, 0600);
      if (fds_[i] < 0) Fail("cannot create shared-memory object " + keys_[i]);
    }
  }
  ~Objects() {
    for (int i = 0; i < kObjects; ++i) {
      close(fds_[i]);
      shm_unlink(keys_[i].c_str());
    }
  }
  // Every object back to its size, filled with a pattern that differs per object and byte.
  void Reset() {
    for (int i = 0; i < kObjects; ++i) {
      Resize(i, kObjectBytes[i]);
      std::string bytes(static_cast<size_t>(kObjectBytes[i]), 0);
      for (size_t b = 0; b < bytes.size(); ++b) bytes[b] = static_cast<char>(b * 7 + i * 31 + 1);
      if (pwrite(fds_[i], bytes.data(), bytes.size(), 0) != static_cast<ssize_t>(bytes.size())) Fail("pwrite");
    }
  }
  void Resize(int i, int64_t size) {
    if (ftruncate(fds_[i], size) != 0) Fail("ftruncate");
  }
  std::string Contents(int i) const {
    const off_t size = lseek(fds_[i], 0, SEEK_END);
    std::string out(static_cast<size_t>(size), 0);
    if (size > 0 && pread(fds_[i], out.data(), out.size(), 0) != size) Fail("pread");
    return out;
  }
  std::vector<std::string> All() const {
    std::vector<std::string> out;
    for (int i = 0; i < kObjects; ++i) out.push_back(Contents(i));
    return out;
  }
  const std::string& key(int i) const { return keys_[i]; }
  int Index(const std::string& key) const {
    for (int i = 0; i < kObjects; ++i) {
      if (keys_[i] == key) return i;
    }
    return -1;
  }

 private:
  std::string keys_[kObjects];
  int fds_[kObjects];
};

Objects* objects_alive = nullptr;

// Created on the first input, unlinked when libFuzzer exits (a crash leaves them in /dev/shm).
Objects& TheObjects() {
  if (objects_alive == nullptr) {
    objects_alive = new Objects();
    std::atexit([] { delete objects_alive; });
  }
  return *objects_alive;
}

Metrics& TheMetrics() {
  static Metrics* metrics = Metrics::Start("").value().release();
  return *metrics;
}

struct ModelRegion {
  int object = -1;
  int64_t byte_size = 0, offset = 0;
};

class Script {
 public:
  Script(const uint8_t* data, size_t size) : in_(data, size), objects_(TheObjects()) {
    objects_.Reset();
    SharedMemoryOptions o;
    o.allowed = in_.ConsumeIntegralInRange(0, 15) != 0;
    o.max_regions_per_client = 3;
    o.max_bytes_per_client = 6000;
    o.max_tensor_bytes = 2048;
    o.ttl = in_.ConsumeIntegralInRange(0, 7) == 0 ? absl::ZeroDuration() : absl::Hours(1);
    shm_ = std::make_unique<SharedMemoryRegistry>(o);
    EngineOptions e;
    e.memory_budget_bytes = 4 << 20;
    e.max_blocks = 2;
    engine_ = std::make_unique<Engine>(MakeCpuBackend(), e);
    CreateBlockParams p;
    p.spec.id = "b0";
    p.spec.config = fuzz::TinyConfig(kHidden, false);
    p.spec.max_batch_size = 4;
    p.spec.max_seq_len = 16;
    p.seed = 3;
    if (!engine_->CreateBlock(p).ok()) Fail("cannot create block b0");
  }

  void Run() {
    // A region each to start from (when shared memory is on), so that short scripts reach slices.
    if (shm_->options().allowed) {
      for (int i = 0; i < 2; ++i) {
        if (!shm_->Register(kClients[i], "r0", objects_.key(i), kObjectBytes[i], 0).ok()) Fail("cannot register r0");
        model_[std::string(kClients[i]) + "/r0"] = {i, kObjectBytes[i], 0};
      }
    }
    for (int op = 0; op < 32 && in_.remaining_bytes() > 0; ++op) {
      const std::map<std::string, std::string> regions_before = Listed();
      const std::vector<std::string> bytes_before = objects_.All();
      absl::Status s;
      const char* name = "";
      bool resized = false;
      Window written;
      switch (in_.ConsumeIntegralInRange(0, 11)) {
        case 0: case 1: name = "RegisterSharedMemory"; s = Register(); break;
        case 2: name = "UnregisterSharedMemory"; s = Unregister(); break;
        case 3: name = "Expire"; Expire(); break;
        case 4: name = "Resize"; Resize(); resized = true; break;
        case 5: name = "Read"; s = Read(); break;
        case 6: name = "Write"; s = Write(&written); break;
        case 7: name = "ReadAt"; s = ReadAt(); break;
        case 8: name = "WriteAt"; s = WriteAt(&written); break;
        default: name = "Forward"; s = Forward(&written); break;
      }
      CheckCode(s, name);
      if (!s.ok() && Listed() != regions_before) Fail(std::string(name) + " failed (" + s.ToString() + ") but changed the regions");
      if (!resized) CheckBytes(name, s, bytes_before, written);
      CheckModel(name);
    }
    for (const char* c : kClients) {
      for (const SharedMemoryRegionInfo& r : shm_->List(c)) {
        if (!shm_->Unregister(c, r.name).ok()) Fail("unregistering a listed region failed");
      }
    }
    if (shm_->regions() != 0 || shm_->registered_bytes() != 0) Fail("regions outlived their unregistering");
  }

 private:
  // The object bytes a successful call may have changed: [at, at + size) of one object.
  struct Window {
    int object = -1;
    int64_t at = 0, size = 0;
  };

  std::map<std::string, std::string> Listed() {
    std::map<std::string, std::string> out;
    for (const char* c : kClients) {
      for (const SharedMemoryRegionInfo& r : shm_->List(c)) {
        out[std::string(c) + "/" + r.name] = absl::StrCat(r.key, " ", r.byte_size, " ", r.offset);
      }
    }
    return out;
  }

  void CheckModel(const char* op) {
    std::map<std::string, std::string> expected;
    for (const auto& [k, m] : model_) expected[k] = absl::StrCat(objects_.key(m.object), " ", m.byte_size, " ", m.offset);
    if (Listed() != expected) Fail(std::string("after ") + op + ": the registry's regions differ from the model's");
  }

  // No byte outside a successful call's window changed; a failed call changed none.
  void CheckBytes(const char* op, const absl::Status& s, const std::vector<std::string>& before, const Window& w) {
    const std::vector<std::string> after = objects_.All();
    for (int i = 0; i < kObjects; ++i) {
      if (after[i].size() != before[i].size()) {
        // Only a write may regrow an object the client shrank, and only up to its window's end.
        if (!s.ok() || i != w.object || static_cast<int64_t>(after[i].size()) > w.at + w.size) {
          Fail(absl::StrCat(op, " changed the size of object ", i, " from ", before[i].size(), " to ", after[i].size()));
        }
      }
      for (size_t b = 0; b < after[i].size(); ++b) {
        const bool inside = s.ok() && i == w.object && static_cast<int64_t>(b) >= w.at &&
                            static_cast<int64_t>(b) < w.at + w.size;
        const char old = b < before[i].size() ? before[i][b] : 0;
        if (!inside && after[i][b] != old) {
          Fail(absl::StrCat(op, " (", s.ToString(), ") changed byte ", b, " of object ", i, " outside its window"));
        }
      }
    }
  }

  std::string Client() { return kClients[in_.ConsumeIntegralInRange(0, 1)]; }
  std::string Name() {
    const int pick = in_.ConsumeIntegralInRange(0, 6);
    return pick < 6 ? kNames[pick] : in_.ConsumeRandomLengthString(200);
  }
  // Mostly small and in range, sometimes the extremes and whatever comes.
  int64_t Number(int64_t typical) {
    switch (in_.ConsumeIntegralInRange(0, 7)) {
      case 0: return INT64_MAX;
      case 1: return INT64_MIN;
      case 2: return -in_.ConsumeIntegralInRange<int64_t>(1, 64);
      case 3: return in_.ConsumeIntegral<int64_t>();
      default: return in_.ConsumeIntegralInRange<int64_t>(0, typical);
    }
  }

  absl::Status Register() {
    const std::string client = Client(), name = Name();
    std::string key;
    int object = -1;
    switch (const int pick = in_.ConsumeIntegralInRange(0, 5)) {
      case 0: case 1: case 2: object = pick; key = objects_.key(pick); break;
      case 3: key = "/blockd-fuzz-never-created"; break;
      case 4: key = in_.PickValueInArray({"/etc/passwd", "/blockd/../x", "blockd-x", "/blockd", "/other-1", "/blockd-a/b"}); break;
      default: key = in_.ConsumeRandomLengthString(300); break;
    }
    const int64_t byte_size = Number(4096), offset = Number(512);
    auto info = shm_->Register(client, name, key, byte_size, offset);
    if (info.ok()) {
      if (object < 0) Fail("a region of an object the fuzzer did not create was registered: " + key);
      if (offset + byte_size > kObjectBytes[object] && offset + byte_size > Size(object)) {
        Fail("a region past its object's end was registered");
      }
      model_[client + "/" + name] = {object, byte_size, offset};
    }
    return info.status();
  }

  int64_t Size(int object) { return static_cast<int64_t>(objects_.Contents(object).size()); }

  absl::Status Unregister() {
    const std::string client = Client(), name = Name();
    const absl::Status s = shm_->Unregister(client, name);
    if (s.ok()) model_.erase(client + "/" + name);
    return s;
  }

  void Expire() {
    const int64_t n = shm_->Expire();
    if (shm_->options().ttl == absl::ZeroDuration()) {
      if (n != static_cast<int64_t>(model_.size())) Fail("a zero TTL sweep left regions registered");
      model_.clear();
    } else if (n != 0) {
      Fail("the sweep expired regions used within their TTL");
    }
  }

  void Resize() {
    const int i = in_.ConsumeIntegralInRange(0, kObjects - 1);
    objects_.Resize(i, in_.ConsumeIntegralInRange<int64_t>(0, 2 * kObjectBytes[i]));
  }

  SharedMemorySlice Slice(const std::string& client, int64_t typical) {
    SharedMemorySlice s;
    s.region = Name();
    auto it = model_.find(client + "/" + s.region);
    if (it != model_.end() && in_.ConsumeBool()) {  // mostly in range of a real region
      s.offset = in_.ConsumeIntegralInRange<int64_t>(0, it->second.byte_size);
      s.byte_size = in_.ConsumeIntegralInRange<int64_t>(0, it->second.byte_size - s.offset);
    } else {
      s.offset = Number(typical);
      s.byte_size = Number(typical);
    }
    return s;
  }

  // Where in its object a slice of the caller's region lies (after the registry accepted it).
  Window WindowOf(const std::string& client, const SharedMemorySlice& s, int64_t size) {
    const ModelRegion& m = model_.at(client + "/" + s.region);
    if (s.offset < 0 || s.byte_size < 0 || s.offset + s.byte_size > m.byte_size) {
      Fail("the registry accepted a slice outside its region");
    }
    return {m.object, m.offset + s.offset, size};
  }

  // The object's bytes in a window (an empty window may lie past the end of a shrunk object).
  std::string BytesAt(const Window& w) {
    if (w.size == 0) return "";
    const std::string all = objects_.Contents(w.object);
    if (w.at < 0 || w.at + w.size > static_cast<int64_t>(all.size())) Fail("a call succeeded on bytes past its object's end");
    return all.substr(static_cast<size_t>(w.at), static_cast<size_t>(w.size));
  }

  absl::Status Read() {
    const std::string client = Client();
    const SharedMemorySlice slice = Slice(client, 4096);
    std::string out;
    const absl::Status s = shm_->Read(client, slice, "read", &out);
    if (s.ok()) {
      const Window w = WindowOf(client, slice, slice.byte_size);
      if (out != BytesAt(w)) Fail("Read answered other bytes than the slice's");
    }
    return s;
  }

  absl::Status Write(Window* written) {
    const std::string client = Client();
    const SharedMemorySlice slice = Slice(client, 4096);
    const std::string bytes = in_.ConsumeRandomLengthString(4096);
    const absl::Status s = shm_->Write(client, slice, "write", bytes);
    if (s.ok()) {
      *written = WindowOf(client, slice, static_cast<int64_t>(bytes.size()));
      if (BytesAt(*written) != bytes) Fail("Write wrote other bytes");
    }
    return s;
  }

  // A piece of a slice, as the engine's staging reads it (TensorArg::read).
  absl::Status ReadAt() {
    const std::string client = Client();
    const SharedMemorySlice slice = Slice(client, 4096);
    const int64_t from = Number(2048);
    const size_t bytes = static_cast<size_t>(in_.ConsumeIntegralInRange<int64_t>(0, 4096));
    std::string out(bytes, '\0');
    const absl::Status s = shm_->ReadAt(client, slice, "read", from, out.data(), bytes);
    if (s.ok()) {
      Window w = WindowOf(client, slice, slice.byte_size);
      if (from < 0 || from + static_cast<int64_t>(bytes) > slice.byte_size) Fail("ReadAt read outside its slice");
      w.at += from;
      w.size = static_cast<int64_t>(bytes);
      if (out != BytesAt(w)) Fail("ReadAt answered other bytes than the piece's");
    }
    return s;
  }

  absl::Status WriteAt(Window* written) {
    const std::string client = Client();
    const SharedMemorySlice slice = Slice(client, 4096);
    const int64_t from = Number(2048);
    const std::string bytes = in_.ConsumeRandomLengthString(4096);
    const absl::Status s = shm_->WriteAt(client, slice, "write", from, bytes.data(), bytes.size());
    if (s.ok()) {
      if (from < 0 || from + static_cast<int64_t>(bytes.size()) > slice.byte_size) Fail("WriteAt wrote outside its slice");
      *written = WindowOf(client, slice, slice.byte_size);
      written->at += from;
      written->size = static_cast<int64_t>(bytes.size());
      if (BytesAt(*written) != bytes) Fail("WriteAt wrote other bytes");
    }
    return s;
  }

  // As BlockServiceImpl::Forward: TensorTransport in, the engine, TensorTransport out; the engine
  // moves a slice's bytes itself (direct, as Forward does) or the transport copies them.
  absl::Status Forward(Window* written) {
    const std::string client = Client();
    v1::ForwardRequest req;
    req.add_block_ids("b0");
    v1::Tensor* t = req.mutable_input();
    const int dtype = in_.ConsumeIntegralInRange(0, 7) == 0 ? in_.ConsumeIntegral<int32_t>()
                                                             : in_.ConsumeIntegralInRange(1, 2);  // FLOAT32, BFLOAT16
    t->set_dtype(static_cast<v1::DType>(dtype));
    const int64_t rows = in_.ConsumeIntegralInRange<int64_t>(0, 3), seq = in_.ConsumeIntegralInRange<int64_t>(0, 5);
    t->add_shape(rows);
    t->add_shape(seq);
    t->add_shape(in_.ConsumeBool() ? kHidden : Number(16));
    const int64_t need = rows * seq * kHidden * (dtype == 2 ? 2 : 4);
    if (in_.ConsumeBool()) {
      SharedMemorySlice s = Slice(client, 2048);
      if (in_.ConsumeBool()) s.byte_size = need;  // mostly the size the shape needs
      t->mutable_shared_memory()->set_region(s.region);
      t->mutable_shared_memory()->set_offset(s.offset);
      t->mutable_shared_memory()->set_byte_size(s.byte_size);
      if (in_.ConsumeIntegralInRange(0, 7) == 0) t->set_data("both");
    } else {
      t->set_data(Values(need));
    }
    if (in_.ConsumeBool()) {
      SharedMemorySlice s = Slice(client, 2048);
      if (in_.ConsumeBool()) s.byte_size = need;
      v1::SharedMemoryRef* ref = req.mutable_output_shared_memory();
      ref->set_region(s.region);
      ref->set_offset(s.offset);
      ref->set_byte_size(s.byte_size);
    }
    // The same request with the output inline, first: the slice may overwrite the input (in place).
    v1::ForwardRequest inline_req = req;
    inline_req.clear_output_shared_memory();
    v1::ForwardResponse inline_resp;
    const absl::Status inline_status = req.has_output_shared_memory() ? RunForward(client, inline_req, &inline_resp)
                                                                      : absl::OkStatus();
    v1::ForwardResponse resp;
    const absl::Status s = RunForward(client, req, &resp);
    if (!s.ok() || !req.has_output_shared_memory()) return s;
    if (!inline_status.ok()) Fail("Forward into a slice succeeded, inline it failed: " + inline_status.ToString());
    const v1::SharedMemoryRef& ref = req.output_shared_memory();
    *written = WindowOf(client, {ref.region(), ref.offset(), ref.byte_size()}, resp.output().shared_memory().byte_size());
    if (BytesAt(*written) != inline_resp.output().data()) Fail("Forward wrote other bytes into the slice than it answers inline");
    return s;
  }

  absl::Status RunForward(const std::string& client, const v1::ForwardRequest& req, v1::ForwardResponse* resp) {
    TensorTransport io(shm_.get(), &TheMetrics(), client, /*direct=*/in_.ConsumeBool());
    ForwardArgs args;
    args.block_ids = {"b0"};
    args.client = client;
    auto input = io.Input(req.input(), "input");
    if (!input.ok()) return input.status();
    args.input = *input;
    ForwardOutput out;
    if (absl::Status s = io.PrepareOutput(OutputRefOf(req), "output_shared_memory",
                                          static_cast<int64_t>(args.input.size), resp->mutable_output(), &out.output);
        !s.ok()) {
      return s;
    }
    if (absl::Status s = engine_->Forward(args, &out); !s.ok()) return s;
    return io.FinishOutput();
  }

  // Small finite values mostly (so Forward runs), else raw bytes (NaN, inf) of `n` bytes or any count.
  std::string Values(int64_t n) {
    if (in_.ConsumeIntegralInRange(0, 7) == 0) return in_.ConsumeRandomLengthString(2048);
    std::string out(static_cast<size_t>(n), 0);
    for (size_t i = 0; i < out.size(); ++i) out[i] = static_cast<char>(i % 2 == 1 ? 0x3f : in_.ConsumeIntegral<uint8_t>());
    return out;
  }

  FuzzedDataProvider in_;
  Objects& objects_;
  std::unique_ptr<SharedMemoryRegistry> shm_;
  std::unique_ptr<Engine> engine_;
  std::map<std::string, ModelRegion> model_;  // client/name -> what the registry should hold
};

}  // namespace
}  // namespace blockd

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  blockd::Script(data, size).Run();
  return 0;
}
