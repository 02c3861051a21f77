// Decode benchmark of inference sessions on the CUDA backend, in process (no gRPC): a span of 8
// Llama-3-8B-shaped bf16 blocks, a 512-token prompt (prefill) and 64 new tokens decoded one at a
// time, at batch 1 and 64; milliseconds per layer per decode step (the median step over the span,
// divided by the layers, each step as the Engine runs it: its input already on the device, page
// tables prepared on the host, then every block's InferStep, then a device synchronize), prefill
// tokens/s; and the paged decode attention kernel alone at 4k context and batch 1, 8 and 64: GB/s
// of the K/V it reads, and that as a share of the H200's 4.8 TB/s HBM bandwidth (issue 12's
// target: >= 70%).
//
//   bench_decode [--batches=1,64] [--attention_batches=1,8,64] [--layers=8] [--prompt=512] [--new=64]
//                [--shape=llama8b|llama70b] [--devices=1] [--frozen] [--written_layers=N] [--engine|--engine_debug]
//
// --engine: then the same decode at batch 1 through Engine::InferStep in process, as the daemon
// runs a session's step (bf16 bytes in and out on the host, the session's bookkeeping, the
// upload, the replayed graph, the download), beside the graph step above: what a step costs in
// the engine apart from gRPC. With --engine_debug the engine also logs each step's times (stderr).
//
// Issue 15's model larger than a GPU: --shape=llama70b --layers=80 --devices=2 --frozen spreads 80
// frozen bf16 Llama-3-70B-shaped blocks (hidden 8192, MLP 28672, 64/8 heads, ~137 GB) over the
// GPUs in order, the activation moving to the next GPU between spans; the floor printed is the
// time to read every block's weights once per step at 4.8 TB/s. --written_layers=N writes the random
// weights into the first N layers only (seeding 70B on the host is slow); the others keep zero
// weights, which pass their input on through the residuals and read as many bytes.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_split.h"
#include "base/status_macros.h"
#include "base/dtype.h"
#include "base/log.h"
#include "engine/cuda/cuda_backend.h"
#include "engine/engine.h"
#include "engine/init.h"
#include "engine/kv_cache.h"
#include "kernels/paged_attention.cuh"

namespace blockd {
namespace {

double Now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

bool Check(const absl::Status& s, const char* what) {
  if (!s.ok()) std::fprintf(stderr, "%s: %s\n", what, std::string(s.message()).c_str());
  return s.ok();
}

BlockConfig Llama3(bool big) {
  BlockConfig c;
  c.hidden_size = big ? 8192 : 4096;
  c.num_attention_heads = big ? 64 : 32;
  c.num_kv_heads = 8;
  c.head_dim = 128;
  c.intermediate_size = big ? 28672 : 14336;
  c.rms_norm_eps = 1e-5;
  c.rope_theta = 500000;
  return c;
}

// The paged attention kernel alone: `batch` rows of `context` cached positions, one new token,
// in `forced` splits (0: as paged_attention_splits picks).
void AttentionBandwidth(int64_t batch, int64_t context, int forced = 0) {
  using bf16 = __nv_bfloat16;
  const int heads = 32, kv_heads = 8, dh = 128;
  const int64_t kv_dim = kv_heads * dh, pages_per_row = context / kKvPageTokens;
  const int64_t pages = batch * pages_per_row, page_elems = 2 * kKvPageTokens * kv_dim;
  bf16 *chunk = nullptr, *q = nullptr, *o = nullptr;
  bf16** chunks = nullptr;
  int32_t* meta = nullptr;
  float* ws = nullptr;
  cudaMalloc(&chunk, pages * page_elems * 2);
  cudaMemset(chunk, 0, pages * page_elems * 2);
  cudaMalloc(&chunks, sizeof(bf16*));
  cudaMemcpy(chunks, &chunk, sizeof(bf16*), cudaMemcpyHostToDevice);
  std::vector<int32_t> h(batch + pages);
  for (int64_t r = 0; r < batch; ++r) h[r] = static_cast<int32_t>(context - 1);
  for (int64_t p = 0; p < pages; ++p) h[batch + p] = static_cast<int32_t>(p);
  cudaMalloc(&meta, h.size() * 4);
  cudaMemcpy(meta, h.data(), h.size() * 4, cudaMemcpyHostToDevice);
  cudaMalloc(&q, batch * heads * dh * 2);
  cudaMemset(q, 0, batch * heads * dh * 2);
  cudaMalloc(&o, batch * heads * dh * 2);
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  const int splits =
      forced > 0 ? forced : kernels::paged_attention_splits<bf16>(batch, 1, heads, kv_heads, dh, context, sms);
  cudaMalloc(&ws, std::max<int64_t>(1, kernels::paged_attention_workspace_floats(batch, 1, heads, dh, splits)) * 4);
  kernels::PagedKv<bf16> kv;
  kv.chunks = chunks;
  kv.chunk_pages = pages;
  kv.start = meta;
  kv.table = meta + batch;
  kv.table_width = pages_per_row;
  kv.kv_dim = kv_dim;
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  const int iters = 50;
  for (int i = 0; i < 5; ++i) {
    kernels::launch_paged_attention<bf16>(kv, q, heads * dh, o, heads * dh, batch, 1, heads, kv_heads, dh, context,
                                          splits, ws, nullptr);
  }
  cudaEventRecord(a);
  for (int i = 0; i < iters; ++i) {
    kernels::launch_paged_attention<bf16>(kv, q, heads * dh, o, heads * dh, batch, 1, heads, kv_heads, dh, context,
                                          splits, ws, nullptr);
  }
  cudaEventRecord(b);
  cudaEventSynchronize(b);
  float ms = 0;
  cudaEventElapsedTime(&ms, a, b);
  const double sec = ms / 1e3 / iters, bytes = double(batch) * context * kv_dim * 2 * 2;
  constexpr double kHbmBytesPerSecond = 4.8e12;  // H200 HBM3e, the datasheet figure
  std::printf("decode attention  batch %3lld  context %lld  splits %3d  %8.1f us  %7.1f GB/s  %5.1f%% of 4.8 TB/s  (%s)\n",
              static_cast<long long>(batch), static_cast<long long>(context), splits, sec * 1e6, bytes / sec / 1e9,
              100.0 * bytes / sec / kHbmBytesPerSecond, cudaGetErrorString(cudaGetLastError()));
  cudaFree(chunk);
  cudaFree(chunks);
  cudaFree(meta);
  cudaFree(q);
  cudaFree(o);
  cudaFree(ws);
}

// --engine: a session of `layers` seeded blocks in an Engine of its own, its prompt and then
// `fresh` single-token steps at batch 1 through Engine::InferStep with bf16 bytes in and out, as
// the daemon runs them (EngineOptions as blockd's defaults), each step timed from the call to its
// output bytes; beside `graph_step`, the same span's replayed graph step with its input already
// on the device.
int EngineDecode(const BlockConfig& c, int layers, int64_t prompt, int64_t fresh, bool frozen, double graph_step) {
  auto backend = MakeCudaBackend();
  if (!Check(backend.status(), "backend")) return 1;
  Engine engine(std::move(backend).value(), EngineOptions{});
  OpenSessionArgs open;
  open.client = "bench";
  open.batch_size = 1;
  open.max_length = prompt + fresh;
  for (int l = 0; l < layers; ++l) {
    CreateBlockParams p;
    p.spec.id = "engine" + std::to_string(l);
    p.spec.config = c;
    p.spec.max_seq_len = prompt + fresh;
    p.spec.max_batch_size = 1;
    p.spec.frozen = frozen;
    p.precision = Precision::kBF16;
    p.seed = 1234 + l;
    if (!Check(engine.CreateBlock(p).status(), "create")) return 1;
    open.block_ids.push_back(p.spec.id);
  }
  auto info = engine.OpenSession(open);
  if (!Check(info.status(), "open session")) return 1;
  const int64_t d = c.hidden_size;
  std::mt19937_64 rng(11);
  std::normal_distribution<float> dist;
  auto bytes_of = [&](int64_t n) {  // bf16 on the wire, as the clients send a step
    std::string b(static_cast<size_t>(n * d) * 2, '\0');
    auto* h = reinterpret_cast<uint16_t*>(b.data());
    for (int64_t i = 0; i < n * d; ++i) h[i] = Float32ToBFloat16(dist(rng));
    return b;
  };
  std::vector<std::string> inputs;
  for (int64_t i = 0; i < fresh; ++i) inputs.push_back(bytes_of(1));
  auto run = [&](const std::string& in, int64_t n, uint64_t step_id) -> bool {
    InferStepArgs a;
    a.session_id = info->session_id;
    a.client = "bench";
    a.hidden_states = TensorArg{DType::kBFloat16, {1, n, d}, in.data(), in.size()};
    a.step_id = step_id;
    std::string out;
    InferStepOutput o;
    o.output.data = &out;
    return Check(engine.InferStep(a, &o), "step") && out.size() == in.size();
  };
  if (!run(bytes_of(prompt), prompt, 1)) return 1;
  std::vector<double> times;
  for (int64_t i = 0; i < fresh; ++i) {
    const double t0 = Now();
    if (!run(inputs[static_cast<size_t>(i)], 1, static_cast<uint64_t>(i + 2))) return 1;
    times.push_back(Now() - t0);
  }
  std::sort(times.begin(), times.end());
  const double med = times[times.size() / 2];
  std::printf("engine decode (Engine::InferStep, bf16 bytes in and out)  batch 1  %d layers: median step %.3f ms, "
              "%.3f ms over the graph step (%.3f ms)\n",
              layers, med * 1e3, (med - graph_step) * 1e3, graph_step * 1e3);
  return 0;
}

int Main(int argc, char** argv) {
  std::vector<int64_t> batches = {1, 64}, attention_batches = {1, 8, 64};
  int layers = 8;
  int64_t prompt = 512, fresh = 64;
  int devices = 1, written = -1;
  bool big = false, frozen = false, engine_too = false, engine_debug = false;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--shape=llama70b") big = true;
    if (a == "--engine") engine_too = true;
    if (a == "--engine_debug") engine_too = engine_debug = true;
    if (a == "--frozen") frozen = true;
    if (a.rfind("--devices=", 0) == 0) devices = std::stoi(a.substr(10));
    if (a.rfind("--written_layers=", 0) == 0) written = std::stoi(a.substr(17));
    if (a.rfind("--batches=", 0) == 0) {
      batches.clear();
      for (auto s : absl::StrSplit(a.substr(10), ',', absl::SkipEmpty())) batches.push_back(std::stoll(std::string(s)));
    } else if (a.rfind("--attention_batches=", 0) == 0) {
      attention_batches.clear();
      for (auto s : absl::StrSplit(a.substr(20), ',', absl::SkipEmpty())) attention_batches.push_back(std::stoll(std::string(s)));
    } else if (a.rfind("--layers=", 0) == 0) {
      layers = std::stoi(a.substr(9));
    } else if (a.rfind("--prompt=", 0) == 0) {
      prompt = std::stoll(a.substr(9));
    } else if (a.rfind("--new=", 0) == 0) {
      fresh = std::stoll(a.substr(6));
    }
  }
  for (int64_t b : attention_batches) AttentionBandwidth(b, 4096);
  if (!attention_batches.empty()) {
    // Batch 1 at the decode tables' context (prompt 512 + 64): one split, the chosen split, tiles.
    for (int forced : {1, 0, 9}) AttentionBandwidth(1, 576, forced);
  }

  auto backend_or = MakeCudaBackend();
  if (!Check(backend_or.status(), "backend")) return 1;
  std::unique_ptr<Backend> backend = std::move(backend_or).value();
  const BlockConfig c = Llama3(big);
  if (written < 0) written = layers;
  auto device_of = [&](int l) { return l * devices / layers; };
  const int64_t max_batch = *std::max_element(batches.begin(), batches.end());
  std::vector<std::unique_ptr<Block>> blocks;
  const auto params = BlockParams(c);
  std::vector<std::vector<float>> w(params.size());
  for (size_t i = 0; i < params.size(); ++i) {  // one layer's weights, written into every layer
    w[i].resize(params[i].numel());
    InitParam(1234, params[i], w[i].data());
  }
  for (int l = 0; l < layers; ++l) {
    BlockSpec spec;
    spec.id = "decode" + std::to_string(l);
    spec.config = c;
    spec.max_seq_len = prompt + fresh;
    spec.max_batch_size = max_batch;
    spec.precision = Precision::kBF16;
    spec.device = device_of(l);
    spec.frozen = frozen;
    auto block = backend->CreateBlock(spec);
    if (!Check(block.status(), "create")) return 1;
    for (size_t i = 0; l < written && i < params.size(); ++i) {
      if (!Check((*block)->WriteTensor(TensorKind::kWeights, int(i), w[i].data()), "write")) return 1;
    }
    blocks.push_back(std::move(block).value());
  }
  const int64_t d = c.hidden_size;
  std::mt19937_64 rng(7);
  std::normal_distribution<float> dist;
  double last_graph_step = 0;  // batch 1's, for --engine
  for (int64_t batch : batches) {
    std::vector<std::unique_ptr<KvPageStore>> stores;
    for (auto& b : blocks) stores.push_back(std::move(b->NewKvPageStore()).value());
    auto cache_or = KvCache::Create(std::move(stores), batch, prompt + fresh, {});
    if (!Check(cache_or.status(), "cache")) return 1;
    KvCache cache = std::move(cache_or).value();
    int64_t length = 0;
    auto sync_devices = [&] {  // the span's work done on every GPU
      for (int dev = 0; dev < devices; ++dev) {
        cudaSetDevice(dev);
        cudaDeviceSynchronize();
      }
      cudaSetDevice(0);
    };
    // The step's input is made and uploaded before its clock starts, as hf_decode.py's is (a
    // server has the activation off the wire by then): the step times only the span's work.
    auto input = [&](int64_t n) -> std::unique_ptr<Activation> {
      std::vector<float> x(batch * n * d);
      for (float& v : x) v = dist(rng);
      auto act = backend->Upload(0, DType::kFloat32, x.data(), batch, n, d);
      if (!Check(act.status(), "upload")) return nullptr;
      cudaDeviceSynchronize();
      return std::move(act).value();
    };
    double enqueued = 0;  // the last step's host time until its last InferStep returned
    // A step as the Engine runs it: block by block, or with `graph` (a span on one GPU) one
    // upload of the tables and the span replayed as a captured CUDA graph (engine_sessions.cc).
    auto step = [&](std::unique_ptr<Activation> h, int64_t n, StepGraph* graph = nullptr) -> bool {
      if (h == nullptr) return false;
      const double t_host = Now();
      KvCache scratch = cache;
      if (!Check(scratch.PrepareWrite(cache, length, n), "prepare")) return false;
      int64_t width = 0;
      std::vector<int32_t> table;
      const int32_t* device_meta = nullptr;
      StepGraphKey key;
      if (graph != nullptr) {
        const std::vector<int32_t> meta = scratch.DeviceMeta(length, &width);
        table.assign(meta.begin() + batch, meta.end());
        auto uploaded = graph->StageMeta(meta);
        if (!Check(uploaded.status(), "tables")) return false;
        device_meta = *uploaded;
        key = scratch.GraphKey(length, n, width);
        for (auto& b : blocks) key.generation += b->launch_generation();
      } else {
        table = scratch.Table(&width);
      }
      const std::vector<int64_t> start(batch, length);
      auto launches = [&](const Activation& input) -> absl::StatusOr<std::unique_ptr<Activation>> {
        const Activation* in = &input;
        std::unique_ptr<Activation> y;
        for (int l = 0; l < layers; ++l) {
          if (in->device() != device_of(l)) {  // the next GPU's span
            ASSIGN_OR_RETURN(y, backend->ToDevice(*in, device_of(l)));
            in = y.get();
          }
          KvBlockView view = scratch.View(l, table, width);
          view.device_meta = device_meta;
          ASSIGN_OR_RETURN(std::unique_ptr<Activation> out, blocks[l]->InferStep(*in, start, view));
          y = std::move(out);
          in = y.get();
        }
        return y;
      };
      auto y = graph != nullptr ? graph->Run(key, *h, launches) : launches(*h);
      if (!Check(y.status(), "step")) return false;
      h = std::move(y).value();
      enqueued = Now() - t_host;
      sync_devices();
      cache = std::move(scratch);
      length += n;
      return true;
    };
    std::unique_ptr<Activation> x = input(prompt);
    double t0 = Now();
    if (!step(std::move(x), prompt)) return 1;
    const double prefill = Now() - t0;
    std::vector<double> times, host;
    for (int64_t i = 0; i < fresh; ++i) {
      x = input(1);
      t0 = Now();
      if (!step(std::move(x), 1)) return 1;
      times.push_back(Now() - t0);
      host.push_back(enqueued);
    }
    std::sort(times.begin(), times.end());
    std::sort(host.begin(), host.end());
    const double med = times[times.size() / 2];
    // The same decode again from the prompt on, replayed as a CUDA graph (one GPU).
    double graph_med = 0, graph_host = 0;
    StepGraph::Counts graph_counts;
    if (devices == 1) {
      auto graph = backend->NewStepGraph(0);
      if (!Check(graph.status(), "graph")) return 1;
      cache.Trim(prompt);
      length = prompt;
      std::vector<double> gtimes, ghost;
      for (int64_t i = 0; i < fresh; ++i) {
        x = input(1);
        t0 = Now();
        if (!step(std::move(x), 1, graph->get())) return 1;
        gtimes.push_back(Now() - t0);
        ghost.push_back(enqueued);
      }
      std::sort(gtimes.begin(), gtimes.end());
      std::sort(ghost.begin(), ghost.end());
      graph_med = gtimes[gtimes.size() / 2];
      graph_host = ghost[ghost.size() / 2];
      graph_counts = (*graph)->counts();
    }
    // Warm: the prompt again into an emptied cache (its pages stay reserved), then the same
    // tokens through the span's training forward (Forward, nothing saved), each the best of 3.
    double prefill_warm = 1e30, forward = 1e30;
    for (int rep = 0; rep < 3; ++rep) {
      cache.Trim(0);
      length = 0;
      x = input(prompt);
      t0 = Now();
      if (!step(std::move(x), prompt)) return 1;
      prefill_warm = std::min(prefill_warm, Now() - t0);
      std::unique_ptr<Activation> h = input(prompt);
      t0 = Now();
      for (int l = 0; l < layers && h != nullptr; ++l) {
        if (h->device() != device_of(l)) h = std::move(backend->ToDevice(*h, device_of(l))).value();
        auto y = blocks[l]->Forward(std::move(h), 0, nullptr);
        if (!Check(y.status(), "forward")) return 1;
        h = std::move(y).value();
      }
      sync_devices();
      forward = std::min(forward, Now() - t0);
    }
    std::printf("blockd decode  batch %3lld  %d layers  prompt %lld  new %lld: %.4f ms/layer/step (median step %.3f ms, "
                "%.0f tokens/s)  prefill %.1f ms (%.0f tokens/s, first call)\n",
                static_cast<long long>(batch), layers, static_cast<long long>(prompt), static_cast<long long>(fresh),
                med * 1e3 / layers, med * 1e3, batch / med, prefill * 1e3, batch * prompt / prefill);
    const double weight_bytes = 2.0 * static_cast<double>(ParameterCount(c)) * layers;
    std::printf("  %s, %d layers on %d GPU(s)%s: weights %.1f GB, read once per step at 4.8 TB/s: %.3f ms; the median "
                "step is %.2fx that floor\n",
                big ? "llama3-70b-shaped" : "llama3-8b-shaped", layers, devices, frozen ? " (frozen)" : "",
                weight_bytes / 1e9, weight_bytes / 4.8e12 * 1e3, med / (weight_bytes / 4.8e12));
    std::printf("  host: the step's launches enqueued in %.4f ms/layer (median), %.0f%% of the step: %s\n",
                host[host.size() / 2] * 1e3 / layers, 100 * host[host.size() / 2] / med,
                host[host.size() / 2] < 0.9 * med ? "the GPU, not the launches, bounds the step" : "launch-bound");
    if (graph_med > 0) {
      std::printf("  CUDA graph: %.4f ms/layer/step (median step %.3f ms, %.0f tokens/s), %.2fx the block-by-block "
                  "step; host %.4f ms/layer; of %lld steps %lld replayed, %lld captured, %lld block by block\n",
                  graph_med * 1e3 / layers, graph_med * 1e3, batch / graph_med, med / graph_med,
                  graph_host * 1e3 / layers, static_cast<long long>(fresh),
                  static_cast<long long>(graph_counts.replayed), static_cast<long long>(graph_counts.captured),
                  static_cast<long long>(graph_counts.eager));
    }
    std::printf("  prefill (warm) %.2f ms, %.0f tokens/s; the training forward of the same tokens %.2f ms, %.0f "
                "tokens/s: prefill at %.2fx its tokens/s\n",
                prefill_warm * 1e3, batch * prompt / prefill_warm, forward * 1e3, batch * prompt / forward,
                forward / prefill_warm);
    if (batch == 1) last_graph_step = graph_med > 0 ? graph_med : med;
  }
  if (engine_too) {
    blocks.clear();  // the engine's blocks take their place on the GPU
    backend.reset();
    if (engine_debug) SetLogLevel(LogLevel::kDebug);
    return EngineDecode(c, layers, prompt, fresh, frozen, last_graph_step);
  }
  return 0;
}

}  // namespace
}  // namespace blockd

int main(int argc, char** argv) { return blockd::Main(argc, argv); }
