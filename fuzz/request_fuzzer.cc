// libFuzzer target: request validation of the Engine and the TensorAssembler, on a tiny CPU engine.
//
// Each input is a script of up to 24 operations decoded with FuzzedDataProvider: LoadWeights
// streams (chunks through a TensorAssembler, then Engine::LoadWeights), Forward, Backward,
// ReleaseActivations, ZeroGrad, Step, ReadTensors, CreateBlock, DeleteBlock and Export/Import, with
// names, dtypes, shapes, offsets, lengths, hyperparameters and data drawn from the input (so NaN,
// Inf, negative and overflowing values all come up). Besides the sanitizers' checks:
//   - every failure carries a documented code (never INTERNAL or UNKNOWN), and
//   - every failed call leaves the engine exactly as it was: each block's weights, gradients,
//     moments, step and flags, the activation handles and the memory in use.
#include <fuzzer/FuzzedDataProvider.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "engine/cpu/cpu_backend.h"
#include "engine/engine.h"
#include "engine/tensor_assembler.h"
#include "fuzz/fuzz_checks.h"

namespace blockd {
namespace {

using fuzz::Fail;

BlockConfig Tiny(bool qk_norm) { return fuzz::TinyConfig(8, qk_norm); }

// Everything a failed call must leave alone.
struct State {
  std::map<std::string, std::vector<std::string>> tensors;  // id -> bytes of weights, grads, m, v
  std::map<std::string, std::string> info;                  // id -> step, flags, missing weights
  int64_t activations = 0, memory = 0, blocks = 0;
  bool operator==(const State& o) const {
    return tensors == o.tensors && info == o.info && activations == o.activations && memory == o.memory &&
           blocks == o.blocks;
  }
};

State Snapshot(Engine& engine) {
  State s;
  for (const BlockInfo& b : engine.ListBlocks()) {
    std::string info = std::to_string(b.step) + (b.has_gradients ? " grad" : " nograd");
    for (const std::string& m : b.missing_weights) info += " " + m;
    s.info[b.spec.id] = info;
    for (TensorKind k : {TensorKind::kWeights, TensorKind::kGradients, TensorKind::kAdamM, TensorKind::kAdamV}) {
      auto t = engine.ReadTensors(b.spec.id, k, DType::kFloat32, {});
      if (!t.ok()) Fail("ReadTensors of an existing block failed: " + t.status().ToString());
      for (const NamedTensor& n : *t) s.tensors[b.spec.id].push_back(n.bytes);
    }
  }
  const EngineStats st = engine.Stats();
  s.activations = st.activations_held;
  s.memory = st.memory_used.at(0);
  s.blocks = st.blocks;
  return s;
}

void CheckCode(const absl::Status& s, const char* op) { fuzz::CheckCode(s, op, {absl::StatusCode::kUnimplemented}); }

class Script {
 public:
  Script(const uint8_t* data, size_t size) : in_(data, size) {
    EngineOptions o;
    o.memory_budget_bytes = 16 << 20;
    o.max_blocks = 4;
    o.max_activations_per_client = 3;
    o.max_span_blocks = 4;
    engine_ = std::make_unique<Engine>(MakeCpuBackend(), o);
    for (int i = 0; i < 2; ++i) {
      CreateBlockParams p;
      p.spec.id = ids_[i];
      p.spec.config = Tiny(i == 0);
      p.spec.max_batch_size = 2;
      p.spec.max_seq_len = 8;
      p.seed = 7 + i;
      if (!engine_->CreateBlock(p).ok()) Fail("cannot create the starting blocks");
    }
  }

  void Run() {
    for (int op = 0; op < 24 && in_.remaining_bytes() > 0; ++op) {
      const int which = in_.ConsumeIntegralInRange(0, 10);
      const State before = Snapshot(*engine_);
      absl::Status s;
      const char* name = "";
      switch (which) {
        case 0: case 1: name = "LoadWeights"; s = LoadWeights(); break;
        case 2: case 3: name = "Forward"; s = Forward(); break;
        case 4: name = "Backward"; s = Backward(); break;
        case 5: name = "Step"; s = Step(); break;
        case 6: name = "ZeroGrad"; s = engine_->ZeroGrad(Ids()); break;
        case 7: name = "ReleaseActivations"; s = engine_->ReleaseActivations(ActivationId(), Caller()); break;
        case 8: name = "ReadTensors"; s = Read(); break;
        case 9: name = "CreateBlock"; s = Create(); break;
        case 10: name = "ExportImport"; s = ExportImport(); break;
      }
      CheckCode(s, name);
      if (!s.ok() && !(Snapshot(*engine_) == before)) Fail(std::string("a failed ") + name + " changed the engine: " + s.ToString());
    }
  }

 private:
  std::string Id() {
    switch (in_.ConsumeIntegralInRange(0, 5)) {
      case 0: case 1: return ids_[0];
      case 2: case 3: return ids_[1];
      case 4: return "nope";
      default: return in_.ConsumeRandomLengthString(16);
    }
  }
  std::vector<std::string> Ids() {
    std::vector<std::string> ids(in_.ConsumeIntegralInRange(0, 5));
    for (std::string& id : ids) id = Id();
    return ids;
  }
  std::string ActivationId() {
    if (!handles_.empty() && in_.ConsumeBool()) return handles_[in_.ConsumeIntegralInRange<size_t>(0, handles_.size() - 1)];
    return in_.ConsumeRandomLengthString(40);
  }
  // Two identities, so handles are also used by the one that does not own them.
  std::string Caller() { return in_.ConsumeBool() ? "a" : "b"; }
  DType AnyDType() { return static_cast<DType>(in_.ConsumeIntegralInRange(0, 2)); }
  int64_t Dim(int64_t usual_max) {
    return in_.ConsumeIntegralInRange(0, 9) == 0 ? in_.ConsumeIntegral<int64_t>() : in_.ConsumeIntegralInRange<int64_t>(0, usual_max);
  }
  // Bytes for `n` elements of `dtype`, mostly of the right length, with values from the input
  // (NaN and Inf included), sometimes a length off by a little or a lot.
  std::string Bytes(int64_t n, DType dtype) {
    int64_t len = n * static_cast<int64_t>(DTypeSize(dtype));
    if (in_.ConsumeIntegralInRange(0, 7) == 0) len = in_.ConsumeIntegralInRange<int64_t>(0, 4096);
    if (len < 0 || len > (1 << 16)) len = 0;
    std::string b = in_.ConsumeBytesAsString(static_cast<size_t>(len));
    // Fill what the input ran out of with small finite values, so well-formed requests also run.
    while (static_cast<int64_t>(b.size()) < len) b.push_back(static_cast<char>(b.size() % 4 == 3 ? 0x3c : 0x11));
    return b;
  }
  TensorArg Arg(std::string* storage, int64_t hidden) {
    TensorArg a;
    a.dtype = AnyDType();
    const int rank = in_.ConsumeIntegralInRange(0, 9) == 0 ? in_.ConsumeIntegralInRange(0, 5) : 3;
    for (int i = 0; i < rank; ++i) a.shape.push_back(i == 2 && in_.ConsumeBool() ? hidden : Dim(i == 0 ? 3 : 9));
    int64_t n = 1;
    for (int64_t d : a.shape) n = (d < 0 || d > 64) ? 0 : n * d;
    *storage = Bytes(n, a.dtype);
    a.data = storage->data();
    a.size = storage->size();
    return a;
  }

  absl::Status LoadWeights() {
    const std::string id = Id();
    auto params = engine_->BlockParamsOf(id);
    if (!params.ok()) return params.status();
    TensorAssembler assembler(id, *params);
    const int chunks = in_.ConsumeIntegralInRange(1, 6);
    for (int c = 0; c < chunks; ++c) {
      const ParamSpec& p = (*params)[in_.ConsumeIntegralInRange<size_t>(0, params->size() - 1)];
      const std::string name = in_.ConsumeIntegralInRange(0, 9) == 0 ? in_.ConsumeRandomLengthString(32) : p.name;
      const DType dtype = AnyDType();
      std::vector<int64_t> shape = p.shape;
      if (in_.ConsumeIntegralInRange(0, 9) == 0) {
        shape.assign(in_.ConsumeIntegralInRange(0, 3), 0);
        for (int64_t& d : shape) d = Dim(64);
      }
      const int64_t total = p.numel() * static_cast<int64_t>(DTypeSize(dtype));
      int64_t offset = 0, len = total;
      switch (in_.ConsumeIntegralInRange(0, 3)) {
        case 0: break;  // whole
        case 1:         // a piece
          offset = in_.ConsumeIntegralInRange<int64_t>(0, total);
          len = in_.ConsumeIntegralInRange<int64_t>(0, total - offset);
          break;
        case 2:  // anything
          offset = in_.ConsumeIntegral<int64_t>();
          len = in_.ConsumeIntegralInRange<int64_t>(0, 4096);
          break;
        default:  // the rest after half
          offset = total / 2;
          len = total - offset;
      }
      std::string bytes = in_.ConsumeBytesAsString(static_cast<size_t>(len));
      while (static_cast<int64_t>(bytes.size()) < len) bytes.push_back(0x3f);  // finite filler
      absl::Status s = assembler.Add(name, dtype, shape, offset, bytes.data(), bytes.size());
      CheckCode(s, "TensorAssembler::Add");
      if (!s.ok()) return s;
    }
    auto tensors = assembler.Finish();
    if (!tensors.ok()) return tensors.status();
    return engine_->LoadWeights(id, *std::move(tensors)).status();
  }

  absl::Status Forward() {
    ForwardArgs args;
    args.block_ids = Ids();
    std::string storage;
    args.input = Arg(&storage, 8);
    args.keep_activations = in_.ConsumeBool();
    args.position_offset = in_.ConsumeBool() ? in_.ConsumeIntegral<int64_t>() : in_.ConsumeIntegralInRange<int64_t>(0, 64);
    args.client = Caller();
    std::string output;
    ForwardOutput out;
    out.output.data = &output;
    absl::Status s = engine_->Forward(args, &out);
    if (s.ok()) {
      int64_t n = 1;
      for (int64_t d : args.input.shape) n *= d;
      if (output.size() != static_cast<size_t>(n) * DTypeSize(args.input.dtype)) Fail("Forward output of the wrong size");
      if (args.keep_activations != !out.activation_id.empty()) Fail("Forward's activation id disagrees with keep");
      if (!out.activation_id.empty()) handles_.push_back(out.activation_id);
    }
    return s;
  }

  absl::Status Backward() {
    std::string storage;
    const TensorArg g = Arg(&storage, 8);
    std::string grad;
    TensorOut out;
    out.data = &grad;
    const std::string id = ActivationId();
    absl::Status s = engine_->Backward(id, Caller(), g, &out);
    if (s.ok() && grad.size() != g.size) Fail("grad_input of another size than grad_output");
    return s;
  }

  double Hyper(double lo, double hi) {
    switch (in_.ConsumeIntegralInRange(0, 7)) {
      case 0: return in_.ConsumeFloatingPoint<double>();  // anything, NaN and Inf included
      case 1: return std::nan("");
      default: return in_.ConsumeFloatingPointInRange(lo, hi);
    }
  }
  absl::Status Step() {
    AdamWHyper h;
    h.lr = Hyper(0, 0.1);
    h.beta1 = Hyper(0, 0.999);
    h.beta2 = Hyper(0, 0.9999);
    h.eps = Hyper(1e-12, 1e-3);
    h.weight_decay = Hyper(0, 0.5);
    h.decay_norm_weights = in_.ConsumeBool();
    const double max_norm = Hyper(0, 10);
    auto r = engine_->Step(Ids(), h, max_norm);
    return r.status();
  }

  absl::Status Read() {
    std::vector<std::string> names;
    for (int i = in_.ConsumeIntegralInRange(0, 3); i > 0; --i) {
      names.push_back(in_.ConsumeBool() ? "mlp.up_proj.weight" : in_.ConsumeRandomLengthString(24));
    }
    const TensorKind kind = static_cast<TensorKind>(in_.ConsumeIntegralInRange(0, 3));
    return engine_->ReadTensors(Id(), kind, AnyDType(), names).status();
  }

  absl::Status Create() {
    CreateBlockParams p;
    p.spec.id = in_.ConsumeBool() ? "c" + std::to_string(in_.ConsumeIntegralInRange(0, 3)) : Id();
    BlockConfig& c = p.spec.config;
    c.hidden_size = Dim(16);
    c.num_attention_heads = Dim(4);
    c.num_kv_heads = Dim(4);
    c.head_dim = Dim(8);
    c.intermediate_size = Dim(32);
    c.rms_norm_eps = Hyper(1e-8, 1e-3);
    c.rope_theta = Hyper(2, 1e6);
    c.qk_norm = in_.ConsumeBool();
    p.spec.layer_index = Dim(8);
    p.spec.max_seq_len = Dim(16);
    p.spec.max_batch_size = Dim(3);
    p.spec.device = in_.ConsumeIntegralInRange(0, 9) == 0 ? in_.ConsumeIntegral<int>() : 0;
    if (in_.ConsumeIntegralInRange(0, 7) == 0) p.precision = static_cast<Precision>(in_.ConsumeIntegralInRange(0, 2));
    if (in_.ConsumeBool()) p.seed = in_.ConsumeIntegral<uint64_t>();
    auto info = engine_->CreateBlock(p);
    if (info.ok() && in_.ConsumeBool()) {
      // And delete it again now and then (a successful delete must free its memory).
      const int64_t used = engine_->Stats().memory_used.at(0);
      if (!engine_->DeleteBlock(p.spec.id).ok()) Fail("cannot delete a block just created");
      if (engine_->Stats().memory_used.at(0) >= used) Fail("DeleteBlock freed no memory");
    }
    return info.status();
  }

  absl::Status ExportImport() {
    auto states = engine_->ExportBlocks(Ids());
    if (!states.ok()) return states.status();
    // Damage the export a little, sometimes, and import it back over the blocks.
    if (!states->empty() && in_.ConsumeBool()) {
      BlockState& st = (*states)[in_.ConsumeIntegralInRange<size_t>(0, states->size() - 1)];
      switch (in_.ConsumeIntegralInRange(0, 4)) {
        case 0: st.step = in_.ConsumeIntegral<int64_t>(); break;
        case 1: if (!st.weights.empty()) st.weights.back().bytes.resize(in_.ConsumeIntegralInRange(0, 64)); break;
        case 2: if (!st.adam_m.empty()) st.adam_m[0].shape.push_back(2); break;
        case 3: st.spec.config.head_dim = Dim(9); break;
        default: st.spec.id = in_.ConsumeRandomLengthString(8); break;
      }
    }
    return engine_->ImportBlocks(*states, /*replace=*/in_.ConsumeBool());
  }

  FuzzedDataProvider in_;
  std::unique_ptr<Engine> engine_;
  const std::string ids_[2] = {"b0", "b1"};
  std::vector<std::string> handles_;
};

}  // namespace
}  // namespace blockd

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  blockd::Script(data, size).Run();
  return 0;
}
