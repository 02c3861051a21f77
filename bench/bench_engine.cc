// In-process engine benchmark on the CUDA backend: forward, backward and AdamW step times of one
// block (and a span of 8), tokens/s, achieved TFLOP/s with the model FLOP count of issue 4, MFU
// against 790 TFLOP/s bf16, peak device memory and the blocks' own memory.
//
//   bench_engine [--shapes=qwen,llama,span8] [--precisions=bf16,fp32] [--iters=20] [--attention=native,cudnn]
//                [--pipeline=3 [--pipeline_traffic]]
//
// Issue 14's shapes: llama-lora16 (the Llama block frozen, LoRA rank 16 alpha 32 on all seven
// projections: its step is AdamW over the adapters), llama-lora16x32 (32 of them: the memory of a
// frozen 8B model with adapters), llama-rope (llama3 RoPE scaling, factor 8, beside plain llama).
// TFLOP/s and MFU always count the full block's 3 x forward FLOPs, so a LoRA row's figures read
// as the full fine-tune's rate at its speed.
//
// --attention: the attention kernels of bf16 blocks, one backend per entry (auto, cudnn, native;
// engine/cuda/attention_dispatch.h), so one run measures cuDNN's fused attention beside blockd's.
//
// FLOPs per sequence: fwd = 2 S d (H + 2 Hkv) dh + 2 S H dh d + 6 S d f + 2 S^2 H dh, bwd = 2 fwd.
// Timing: warm-up first, then per-iteration wall time around a device synchronize (the median of
// `iters`), inputs rotated among 3 random sets so caches do not flatter the result.
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <thread>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_split.h"
#include "engine/cuda/cuda_backend.h"
#include "engine/init.h"
#include "tests/gpu/gpu_test_util.h"

namespace blockd {
namespace {

constexpr double kPeakBf16 = 790e12;

struct Shape {
  Shape(std::string name, BlockConfig config, int64_t batch, int64_t seq, int span, bool frozen = false,
        LoraConfig lora = {})
      : name(std::move(name)), config(std::move(config)), batch(batch), seq(seq), span(span), frozen(frozen),
        lora(std::move(lora)) {}
  std::string name;
  BlockConfig config;
  int64_t batch, seq;
  int span;
  bool frozen;
  LoraConfig lora;
};

LoraConfig AllTargets(int32_t rank, double alpha) {
  LoraConfig l{rank, alpha, {}};
  for (const LoraTarget& t : kLoraTargets) l.target_modules.push_back(t.module);
  return l;
}

using testing::Config;

double FwdFlops(const BlockConfig& c, int64_t batch, int64_t seq) {
  const double S = seq, d = c.hidden_size, H = c.num_attention_heads, Hkv = c.num_kv_heads, dh = c.head_dim,
               f = c.intermediate_size;
  return batch * (2 * S * d * (H + 2 * Hkv) * dh + 2 * S * H * dh * d + 6 * S * d * f + 2 * S * S * H * dh);
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

bool Check(const absl::Status& s, const char* what) {
  if (!s.ok()) std::fprintf(stderr, "%s: %s\n", what, std::string(s.message()).c_str());
  return s.ok();
}

int Run(const std::vector<std::string>& shape_names, const std::vector<std::string>& precisions, int iters,
        int pipeline, bool pipeline_traffic, const std::string& attention) {
  CudaBackendOptions options;
  auto mode = ParseAttentionMode(attention);
  if (!Check(mode.status(), "attention")) return 1;
  options.attention = *mode;
  auto backend_or = MakeCudaBackend(options);
  if (!backend_or.ok()) {
    std::fprintf(stderr, "%s\n", std::string(backend_or.status().message()).c_str());
    return 1;
  }
  auto backend = std::move(backend_or).value();
  const AttentionInfo summary = CudaAttentionSummary(*backend);
  std::printf("--attention=%s: %s (%s)\n", attention.c_str(), summary.backend.c_str(), summary.reason.c_str());
  std::vector<Shape> shapes;
  for (const std::string& n : shape_names) {
    if (n == "qwen") shapes.push_back({"qwen3-0.6b-like 8x2048", Config(1024, 16, 8, 128, 3072, true), 8, 2048, 1});
    if (n == "llama") shapes.push_back({"llama3-8b-like 1x4096", Config(4096, 32, 8, 128, 14336, false), 1, 4096, 1});
    if (n == "span8") shapes.push_back({"span of 8 x qwen 8x2048", Config(1024, 16, 8, 128, 3072, true), 8, 2048, 8});
    const BlockConfig llama = Config(4096, 32, 8, 128, 14336, false);
    if (n == "llama-lora16") shapes.push_back({"llama3-8b lora16 1x4096", llama, 1, 4096, 1, true, AllTargets(16, 32)});
    if (n == "llama-lora16x32") {
      shapes.push_back({"32 x llama3-8b lora16", llama, 1, 4096, 32, true, AllTargets(16, 32)});
    }
    if (n == "llama-rope") {
      BlockConfig c = llama;
      c.rope_scaling = {"llama3", 8, 1, 4, 8192, 0, 0, 0};
      shapes.push_back({"llama3-8b rope llama3 1x4096", c, 1, 4096, 1});
    }
  }
  std::printf("%-26s %-5s %-6s %9s %9s %9s %10s %8s %6s %9s %10s\n", "shape", "prec", "attn", "fwd ms", "bwd ms",
              "step ms", "tok/s", "TFLOP/s", "MFU", "peak GiB", "blocks GiB");
  for (const Shape& sh : shapes) {
    for (const std::string& pn : precisions) {
      const Precision p = pn == "fp32" ? Precision::kFP32 : pn == "tf32" ? Precision::kTF32 : Precision::kBF16;
      cudaMemPool_t pool;
      cudaDeviceGetDefaultMemPool(&pool, 0);
      uint64_t zero = 0;
      cudaMemPoolSetAttribute(pool, cudaMemPoolAttrUsedMemHigh, &zero);
      CudaTransferPoolPeakBytes(*backend, 0, /*reset=*/true);
      std::vector<std::unique_ptr<Block>> blocks;
      size_t block_bytes = 0;
      std::vector<std::vector<float>> first;  // the first block's weights, for spans past 8
      for (int b = 0; b < sh.span; ++b) {
        BlockSpec spec;
        spec.id = "bench" + std::to_string(b);
        spec.config = sh.config;
        spec.max_seq_len = sh.seq;
        spec.max_batch_size = sh.batch;
        spec.precision = p;
        spec.frozen = sh.frozen;
        spec.lora = sh.lora;
        auto block = backend->CreateBlock(spec);
        if (!Check(block.status(), "create")) return 1;
        block_bytes += (*block)->memory_bytes();
        const auto params = BlockParams(sh.config, sh.lora);
        for (size_t i = 0; i < params.size(); ++i) {
          // Blocks past the 8th reuse the first's values: seeding 8B-sized blocks on the host is slow.
          std::vector<float> w;
          if (b < 8) {
            w.resize(params[i].numel());
            InitParam(1234 + b, params[i], w.data());
            if (b == 0 && sh.span > 8) first.push_back(w);
          }
          const float* values = b < 8 ? w.data() : first[i].data();
          if (!Check((*block)->WriteTensor(TensorKind::kWeights, int(i), values), "write")) return 1;
        }
        blocks.push_back(std::move(block).value());
      }
      const int64_t d = sh.config.hidden_size, n = sh.batch * sh.seq * d;
      std::vector<std::vector<float>> inputs;
      std::vector<std::unique_ptr<Activation>> grads;
      std::mt19937_64 rng(7);
      std::normal_distribution<float> dist;
      for (int set = 0; set < 3; ++set) {
        std::vector<float> x(n);
        for (float& v : x) v = dist(rng);
        auto g = backend->Upload(0, DType::kFloat32, x.data(), sh.batch, sh.seq, d);
        if (!g.ok()) return 1;
        grads.push_back(std::move(g).value());
        inputs.push_back(std::move(x));
      }
      // One micro-batch through the span: forward, keeping every block's activations; backward
      // from g; every block's AdamW. False when a call failed (Check said why).
      using Saved = std::vector<std::unique_ptr<SavedActivations>>;
      auto forward_span = [&](std::unique_ptr<Activation> y, Saved* saved) {
        saved->resize(sh.span);
        for (int b = 0; b < sh.span; ++b) {
          auto out = blocks[b]->Forward(std::move(y), 0, &(*saved)[b]);
          if (!Check(out.status(), "forward")) return false;
          y = std::move(out).value();
        }
        return true;
      };
      auto backward_span = [&](const Saved& saved, const Activation* g, bool accumulate) {
        std::unique_ptr<Activation> gx;
        for (int b = sh.span - 1; b >= 0; --b) {
          auto dx = blocks[b]->Backward(*saved[b], *g, accumulate);
          if (!Check(dx.status(), "backward")) return false;
          gx = std::move(dx).value();
          g = gx.get();
        }
        return true;
      };
      auto adamw_span = [&](int64_t step_number) {
        for (auto& blk : blocks) {
          if (!Check(blk->AdamWStep({AdamWHyper{}, step_number, 1.f}), "step")) return false;
        }
        return true;
      };
      std::vector<double> fwd, bwd, step;
      for (int it = 0; it < iters + 3; ++it) {
        Saved saved;
        // Forward takes its input (the first block keeps it for backward), so each iteration
        // uploads one, as the engine does, before the clock starts.
        auto x = backend->Upload(0, DType::kFloat32, inputs[it % 3].data(), sh.batch, sh.seq, d);
        if (!Check(x.status(), "upload")) return 1;
        cudaDeviceSynchronize();
        double t0 = Now();
        if (!forward_span(std::move(x).value(), &saved)) return 1;
        cudaDeviceSynchronize();
        double t1 = Now();
        if (!backward_span(saved, grads[it % 3].get(), it > 0)) return 1;
        cudaDeviceSynchronize();
        double t2 = Now();
        if (!adamw_span(it + 1)) return 1;
        cudaDeviceSynchronize();
        double t3 = Now();
        if (it >= 3) {
          fwd.push_back(t1 - t0);
          bwd.push_back(t2 - t1);
          step.push_back(t3 - t2);
        }
      }
      uint64_t peak = 0;
      cudaMemPoolGetAttribute(pool, cudaMemPoolAttrUsedMemHigh, &peak);
      // The inputs' device memory comes from the transfer pool.
      peak += static_cast<uint64_t>(std::max<int64_t>(0, CudaTransferPoolPeakBytes(*backend, 0, false)));
      const double f = Median(fwd), b = Median(bwd), s = Median(step);
      const double flops = 3 * FwdFlops(sh.config, sh.batch, sh.seq) * sh.span;
      const double tflops = flops / (f + b) / 1e12;
      const std::string attn = blocks.front()->attention().backend;
      std::printf("%-26s %-5s %-6s %9.3f %9.3f %9.3f %10.0f %8.1f %5.1f%% %9.2f %10.2f\n", sh.name.c_str(),
                  pn.c_str(), attn.c_str(), f * 1e3, b * 1e3, s * 1e3, sh.batch * sh.seq / (f + b), tflops,
                  100 * tflops * 1e12 / kPeakBf16, peak / double(1 << 30), block_bytes / double(1 << 30));
      std::fflush(stdout);
      // --pipeline=N: a training step as a client drives a span through the daemon, in process:
      // N micro-batches' forwards (kept) and backwards queued back to back, then every block's
      // AdamW, one device synchronize per step. Tokens/s of the whole step, its Step included.
      // --pipeline_traffic: the same again while a thread moves a bf16 activation up and down the
      // copy streams (Upload, then Download) every ~23 ms, as a daemon's 6 calls of a step do: what
      // the transfers' DMA and conversions take from the compute beside them.
      auto pipelined_step = [&](bool traffic) -> double {
        std::atomic<bool> stop{false};
        std::thread mover;
        if (traffic) {
          mover = std::thread([&] {
            const std::vector<uint16_t> wire(static_cast<size_t>(n), 0x3f80);  // bf16 1.0
            std::string out;
            while (!stop.load()) {
              auto a = backend->Upload(0, DType::kBFloat16, wire.data(), sh.batch, sh.seq, d);
              if (a.ok()) (void)backend->Download(**a, DType::kBFloat16, &out);
              std::this_thread::sleep_for(std::chrono::milliseconds(18));
            }
          });
        }
        std::vector<double> steps;
        bool ok = true;
        for (int it = 0; ok && it < iters + 2; ++it) {
          std::vector<std::unique_ptr<Activation>> xs;
          for (int m = 0; ok && m < pipeline; ++m) {
            auto x = backend->Upload(0, DType::kFloat32, inputs[m % 3].data(), sh.batch, sh.seq, d);
            ok = Check(x.status(), "upload");
            if (ok) xs.push_back(std::move(x).value());
          }
          cudaDeviceSynchronize();
          const double t0 = Now();
          std::vector<Saved> saved(pipeline);
          for (int m = 0; ok && m < pipeline; ++m) ok = forward_span(std::move(xs[m]), &saved[m]);
          for (int m = 0; ok && m < pipeline; ++m) {
            ok = backward_span(saved[m], grads[m % 3].get(), /*accumulate=*/m > 0);
            saved[m].clear();
          }
          ok = ok && adamw_span(it + 1);
          cudaDeviceSynchronize();
          if (it >= 2) steps.push_back(Now() - t0);
        }
        stop = true;
        if (mover.joinable()) mover.join();
        return ok ? Median(steps) : -1;
      };
      if (pipeline > 0 && sh.span > 1) {
        for (bool traffic : {false, true}) {
          if (traffic && !pipeline_traffic) break;
          const double st = pipelined_step(traffic);
          if (st < 0) return 1;
          std::printf("pipelined %s %s %s: %d micro-batches + step %.3f ms, %.0f tokens/s (fwd+bwd+step)%s\n",
                      sh.name.c_str(), pn.c_str(), attn.c_str(), pipeline, st * 1e3,
                      pipeline * sh.batch * sh.seq / st, traffic ? " with transfers" : "");
          std::fflush(stdout);
        }
      }
    }
  }
  return 0;
}

}  // namespace
}  // namespace blockd

int main(int argc, char** argv) {
  std::vector<std::string> shapes = {"qwen", "llama", "span8"}, precisions = {"bf16", "fp32"},
                           attention = {"native"};
  int iters = 20, pipeline = 0;
  bool pipeline_traffic = false;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a.rfind("--shapes=", 0) == 0) shapes = absl::StrSplit(a.substr(9), ',');
    if (a.rfind("--precisions=", 0) == 0) precisions = absl::StrSplit(a.substr(13), ',');
    if (a.rfind("--iters=", 0) == 0) iters = std::stoi(a.substr(8));
    if (a.rfind("--pipeline=", 0) == 0) pipeline = std::stoi(a.substr(11));
    if (a == "--pipeline_traffic") pipeline_traffic = true;
    if (a.rfind("--attention=", 0) == 0) attention = absl::StrSplit(a.substr(12), ',');
  }
  for (const std::string& mode : attention) {
    if (int rc = blockd::Run(shapes, precisions, iters, pipeline, pipeline_traffic, mode); rc != 0) return rc;
  }
  return 0;
}
