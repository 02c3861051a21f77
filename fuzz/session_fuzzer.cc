// libFuzzer target: inference-session RPC sequences on a tiny CPU engine.
//
// Each input is a script of up to 32 operations decoded with FuzzedDataProvider: OpenSession,
// InferStep (dtype, shape, byte count, values, hypo_ids and step_id all drawn from the input, so
// NaN, negative, overflowing and mismatched values come up), TrimSession, ForkSession,
// CloseSession, ListSessions, DeleteBlock and CreateBlock of a span's block, and the TTL sweep,
// by two identities over a handful of session ids. Besides the sanitizers' checks:
//   - every failure carries a documented code (never INTERNAL or UNKNOWN);
//   - a failed call changes nothing: each identity's sessions (ids, lengths, reservations), the
//     memory in use and the KV pages alive are as they were;
//   - the engine agrees with a model of the script: each session's length after steps and trims,
//     a replayed step_id answers its step's bytes again, the reservations add up to the memory
//     the sessions hold, and once every session is closed no KV page is left alive.
#include <fuzzer/FuzzedDataProvider.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "engine/cpu/cpu_backend.h"
#include "engine/engine.h"
#include "fuzz/fuzz_checks.h"

namespace blockd {
namespace {

using fuzz::Fail;

constexpr int64_t kHidden = 8;
const char* const kBlocks[] = {"b0", "b1", "w"};  // w: another width
const char* const kClients[] = {"alice", "bob"};
const char* const kSessions[] = {"s0", "s1", "s2", "", "bad id", "s0"};

// A documented code; a step past max_length or a trim past the length is OUT_OF_RANGE.
void CheckCode(const absl::Status& s, const char* op) { fuzz::CheckCode(s, op, {absl::StatusCode::kOutOfRange}); }

// What a failed call must leave alone.
struct State {
  std::map<std::string, std::string> sessions;  // client/id -> length, rows, max_length, kv_bytes
  int64_t memory = 0, pages = 0, reserved = 0;
  bool operator==(const State& o) const {
    return sessions == o.sessions && memory == o.memory && pages == o.pages && reserved == o.reserved;
  }
};

class Script {
 public:
  Script(const uint8_t* data, size_t size) : in_(data, size) {
    EngineOptions o;
    o.memory_budget_bytes = 4 << 20;
    o.max_blocks = 4;
    o.max_sessions_per_client = 3;
    o.max_span_blocks = 4;
    engine_ = std::make_unique<Engine>(MakeCpuBackend(), o);
    for (const char* id : kBlocks) Create(id);
  }

  void Run() {
    for (int op = 0; op < 32 && in_.remaining_bytes() > 0; ++op) {
      const State before = Snapshot();
      absl::Status s;
      const char* name = "";
      switch (in_.ConsumeIntegralInRange(0, 9)) {
        case 0: name = "OpenSession"; s = Open(); break;
        case 1: case 2: case 3: name = "InferStep"; s = Step(); break;
        case 4: name = "TrimSession"; s = Trim(); break;
        case 5: name = "ForkSession"; s = Fork(); break;
        case 6: name = "CloseSession"; s = Close(); break;
        case 7: name = "ListSessions"; List(); break;
        case 8: name = "DeleteBlock/CreateBlock"; DeleteOrCreate(); break;
        case 9: name = "ExpireSessions"; engine_->ExpireSessions(); ForgetClosed(); break;
      }
      CheckCode(s, name);
      if (!s.ok() && !(Snapshot() == before)) Fail(std::string(name) + " failed (" + s.ToString() + ") but changed the sessions");
      CheckModel(name);
    }
    // Everything back: no page, no reservation left once every session is closed.
    for (const char* c : kClients) {
      for (const SessionInfo& i : engine_->ListSessions(c)) {
        if (!engine_->CloseSession(i.session_id, c).ok()) Fail("closing a listed session failed");
      }
    }
    const EngineStats st = engine_->Stats();
    if (st.kv_pages_in_use != 0 || st.kv_bytes_in_use != 0 || st.kv_reserved.at(0) != 0) {
      Fail("KV pages or reservations outlived every session");
    }
  }

 private:
  struct Model {
    int64_t length = 0;
    int64_t last_step_id = 0;
    std::string last_output;
  };

  void Create(const std::string& id) {
    CreateBlockParams p;
    p.spec.id = id;
    p.spec.config = fuzz::TinyConfig(id == "w" ? 2 * kHidden : kHidden, id == "b1");
    p.spec.max_batch_size = 3;
    p.spec.max_seq_len = 40;
    p.seed = 5;
    if (!engine_->CreateBlock(p).ok()) Fail("cannot create block " + id);
  }

  State Snapshot() {
    State s;
    for (const char* c : kClients) {
      for (const SessionInfo& i : engine_->ListSessions(c)) {
        s.sessions[std::string(c) + "/" + i.session_id] = std::to_string(i.length) + " " + std::to_string(i.batch_size) +
                                                          " " + std::to_string(i.max_length) + " " +
                                                          std::to_string(i.kv_bytes);
      }
    }
    const EngineStats st = engine_->Stats();
    s.memory = st.memory_used.at(0);
    s.pages = st.kv_pages_in_use;
    s.reserved = st.kv_reserved.at(0);
    return s;
  }

  // The engine's sessions are the model's, at the model's lengths; reservations add up.
  void CheckModel(const char* op) {
    int64_t kv = 0;
    size_t listed = 0;
    for (const char* c : kClients) {
      for (const SessionInfo& i : engine_->ListSessions(c)) {
        ++listed;
        kv += i.kv_bytes;
        auto it = model_.find(std::string(c) + "/" + i.session_id);
        if (it == model_.end()) Fail(std::string("after ") + op + ": session " + i.session_id + " is not in the model");
        if (it->second.length != i.length) {
          Fail(std::string("after ") + op + ": session " + i.session_id + " has length " + std::to_string(i.length) +
               ", the model " + std::to_string(it->second.length));
        }
      }
    }
    if (listed != model_.size()) Fail(std::string("after ") + op + ": the model holds sessions the engine lost");
    if (engine_->Stats().kv_reserved.at(0) != kv) Fail(std::string("after ") + op + ": reservations do not add up");
  }

  // Sessions the engine closed by itself (DeleteBlock, the TTL sweep) leave the model too.
  void ForgetClosed() {
    std::map<std::string, Model> alive;
    for (const char* c : kClients) {
      for (const SessionInfo& i : engine_->ListSessions(c)) {
        const std::string key = std::string(c) + "/" + i.session_id;
        alive[key] = model_[key];
      }
    }
    model_ = std::move(alive);
  }

  std::string Client() { return kClients[in_.ConsumeIntegralInRange(0, 1)]; }
  // A known id most of the time, else the engine's own ids (from the model) or garbage.
  std::string SessionId(const std::string& client) {
    const int pick = in_.ConsumeIntegralInRange(0, 7);
    if (pick < 6) return kSessions[pick];
    if (pick == 6) {
      for (const auto& [key, m] : model_) {
        if (key.rfind(client + "/", 0) == 0) return key.substr(client.size() + 1);
      }
    }
    return in_.ConsumeRandomLengthString(200);
  }

  absl::Status Open() {
    OpenSessionArgs a;
    a.client = Client();
    a.session_id = SessionId(a.client);
    const int n = in_.ConsumeIntegralInRange(0, 3);
    for (int i = 0; i < n; ++i) a.block_ids.push_back(in_.ConsumeBool() ? kBlocks[in_.ConsumeIntegralInRange(0, 2)] : "nope");
    a.batch_size = in_.ConsumeBool() ? in_.ConsumeIntegralInRange<int64_t>(1, 3) : in_.ConsumeIntegral<int32_t>();
    a.max_length = in_.ConsumeBool() ? in_.ConsumeIntegralInRange<int64_t>(1, 40) : in_.ConsumeIntegral<int32_t>();
    a.ttl = in_.ConsumeBool() ? absl::ZeroDuration() : absl::Milliseconds(in_.ConsumeIntegralInRange<int64_t>(-5, 50));
    auto info = engine_->OpenSession(a);
    if (info.ok()) {
      if (info->length != 0 || info->batch_size != a.batch_size) Fail("OpenSession answered a wrong SessionInfo");
      model_[a.client + "/" + info->session_id] = Model();
    }
    return info.status();
  }

  absl::Status Step() {
    InferStepArgs a;
    a.client = Client();
    a.session_id = SessionId(a.client);
    const DType dtype = static_cast<DType>(in_.ConsumeIntegralInRange(0, 2));
    const int64_t rows = in_.ConsumeBool() ? in_.ConsumeIntegralInRange<int64_t>(1, 3) : in_.ConsumeIntegral<int64_t>();
    const int64_t fresh = in_.ConsumeBool() ? in_.ConsumeIntegralInRange<int64_t>(0, 20) : in_.ConsumeIntegral<int64_t>();
    const int64_t hidden = in_.ConsumeBool() ? kHidden : in_.ConsumeIntegralInRange<int64_t>(-1, 2 * kHidden);
    a.hidden_states.dtype = dtype;
    a.hidden_states.shape = {rows, fresh, hidden};
    if (in_.ConsumeIntegralInRange(0, 15) == 0) a.hidden_states.shape.pop_back();
    // Mostly the right byte count for the shape (when it is small), else whatever comes.
    size_t len = in_.ConsumeIntegralInRange<size_t>(0, 4096);
    if (rows > 0 && rows <= 3 && fresh >= 0 && fresh <= 40 && hidden >= 0 && in_.ConsumeIntegralInRange(0, 7) != 0) {
      len = static_cast<size_t>(rows * fresh * hidden) * DTypeSize(dtype);
    }
    std::string bytes = in_.ConsumeBytesAsString(len);
    if (in_.ConsumeBool() && dtype == DType::kFloat32) {  // values in range, mostly: NaN only from the bytes
      for (size_t i = 0; i + 4 <= bytes.size(); i += 4) {
        const float v = static_cast<float>(static_cast<uint8_t>(bytes[i])) / 128.f - 1.f;
        std::memcpy(&bytes[i], &v, 4);
      }
    }
    a.hidden_states.data = bytes.data();
    a.hidden_states.size = bytes.size();
    const int nhypo = in_.ConsumeIntegralInRange(0, 4);
    if (nhypo > 0) {
      for (int i = 0; i < nhypo; ++i) a.hypo_ids.push_back(in_.ConsumeIntegralInRange<int32_t>(-1, 3));
    }
    a.step_id = in_.ConsumeIntegralInRange<int64_t>(0, 3);
    std::string out;
    InferStepOutput o;
    o.output.data = &out;
    const absl::Status s = engine_->InferStep(a, &o);
    if (!s.ok()) return s;
    auto it = model_.find(a.client + "/" + a.session_id);
    if (it == model_.end()) Fail("a step on a session the model does not know succeeded");
    Model& m = it->second;
    if (o.replayed) {
      if (a.step_id == 0 || a.step_id != m.last_step_id || out != m.last_output) Fail("a replay answered other bytes");
    } else {
      m.length += fresh;
      if (out.size() != static_cast<size_t>(rows * fresh * hidden) * DTypeSize(dtype)) Fail("a step's output has the wrong size");
      m.last_step_id = a.step_id;
      m.last_output = a.step_id != 0 ? out : std::string();
    }
    if (o.length != m.length) Fail("InferStep answered a length the model does not expect");
    return s;
  }

  absl::Status Trim() {
    const std::string client = Client(), id = SessionId(client);
    const int64_t length = in_.ConsumeBool() ? in_.ConsumeIntegralInRange<int64_t>(-1, 41) : in_.ConsumeIntegral<int64_t>();
    auto info = engine_->TrimSession(id, client, length);
    if (info.ok()) {
      Model& m = model_.at(client + "/" + id);
      m.length = length;
      m.last_step_id = 0;  // a trim forgets the last step
      m.last_output.clear();
    }
    return info.status();
  }

  absl::Status Fork() {
    const std::string client = Client(), id = SessionId(client), fork_id = SessionId(client);
    auto info = engine_->ForkSession(id, client, fork_id);
    if (info.ok()) {
      Model m = model_.at(client + "/" + id);
      m.last_step_id = 0;
      m.last_output.clear();
      model_[client + "/" + info->session_id] = m;
    }
    return info.status();
  }

  absl::Status Close() {
    const std::string client = Client(), id = SessionId(client);
    const absl::Status s = engine_->CloseSession(id, client);
    if (s.ok()) model_.erase(client + "/" + id);
    return s;
  }

  void List() {
    for (const char* c : kClients) {
      for (const SessionInfo& i : engine_->ListSessions(c)) {
        if (i.length < 0 || i.length > i.max_length) Fail("ListSessions shows a length outside 0..max_length");
      }
    }
  }

  void DeleteOrCreate() {
    const std::string id = kBlocks[in_.ConsumeIntegralInRange(0, 2)];
    if (!engine_->DeleteBlock(id).ok()) return;
    for (const char* c : kClients) {
      for (const SessionInfo& i : engine_->ListSessions(c)) {
        for (const std::string& b : i.block_ids) {
          if (b == id) Fail("DeleteBlock left session " + i.session_id + " through block " + id + " open");
        }
      }
    }
    ForgetClosed();
    if (in_.ConsumeBool()) Create(id);  // the same id again: not the sessions' old block
  }

  FuzzedDataProvider in_;
  std::unique_ptr<Engine> engine_;
  std::map<std::string, Model> model_;  // client/id -> what the engine should hold
};

}  // namespace
}  // namespace blockd

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  blockd::Script(data, size).Run();
  return 0;
}
