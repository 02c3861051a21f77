// Whole blocks on the CUDA backend against the CPU backend (the oracle): forward, backward (the
// input gradient and every weight gradient, written then accumulated) and three AdamW steps, for
// small random configs and the Qwen3-0.6B layer at seq 2048 (AdamW given identical gradients, see
// below); spans through the Engine; device
// memory flat over 1000 cycles; allocation failures as RESOURCE_EXHAUSTED; sticky errors.
// Every bf16 case runs twice: with blockd's attention kernels and with cuDNN's fused attention
// (--attention=native / cudnn; the cuDNN variants skip, saying why, where cuDNN cannot load), under
// the same bounds: cuDNN's bf16 dq and dk stay well inside them (attention_dispatch.cc says why).
//
// Bounds: FP32 elementwise rtol 1e-5 (atol = rtol * rms). TF32 norm-wise 8 u_tf32 = 4e-3 and
// BF16 norm-wise 8 u_bf16 = 3.1e-2 for outputs and 6e-2 for gradients: each bf16 product rounds
// both operands (<= 2u each), the chain forward goes through ~4 such products before the output,
// and gradients through ~8.
#include <cuda_runtime.h>

#include <cmath>
#include <cstring>

#include "engine/cpu/cpu_backend.h"
#include "engine/cuda/cuda_backend.h"
#include "engine/engine.h"
#include "base/status_macros.h"
#include "tests/gpu/gpu_test_util.h"

namespace blockd::testing {
namespace {

struct Bounds {
  double out, grad;  // norm-wise, or elementwise rtol for FP32
  bool elementwise;
};

Bounds BoundsFor(Precision p) {
  switch (p) {
    case Precision::kFP32: return {1e-5, 1e-5, true};
    case Precision::kTF32: return {4e-3, 8e-3, false};
    case Precision::kBF16: return {3.1e-2, 6e-2, false};
  }
  return {};
}

struct BlockCase {
  std::string name;
  BlockConfig config;
  int64_t batch, seq, offset;
  Precision precision;
  AttentionMode attention = AttentionMode::kNative;
};

std::ostream& operator<<(std::ostream& os, const BlockCase& c) { return os << c.name; }

// Random weights shared by both blocks: matrices uniform in +-1/sqrt(in) (nn.Linear's range),
// norm weights around 1 so that their gradients matter.
std::vector<std::vector<float>> RandomWeights(const BlockConfig& c, uint64_t seed) {
  std::vector<std::vector<float>> w;
  std::mt19937_64 rng(seed);
  for (const ParamSpec& p : BlockParams(c)) {
    std::vector<float> t(p.numel());
    if (p.is_matrix) {
      std::uniform_real_distribution<float> u(-1.f / std::sqrt(float(p.shape[1])), 1.f / std::sqrt(float(p.shape[1])));
      for (float& x : t) x = u(rng);
    } else if (p.id == ParamId::kQBias || p.id == ParamId::kKBias || p.id == ParamId::kVBias) {
      std::normal_distribution<float> n(0.f, 0.5f);  // both signs, the size of the projections' outputs
      for (float& x : t) x = n(rng);
    } else {
      std::normal_distribution<float> n(1.f, 0.1f);
      for (float& x : t) x = n(rng);
    }
    w.push_back(std::move(t));
  }
  return w;
}

std::vector<float> ReadAll(Block& b, TensorKind kind, const ParamSpec& p, int index) {
  std::vector<float> v(p.numel());
  EXPECT_TRUE(b.ReadTensor(kind, index, v.data()).ok());
  return v;
}

std::vector<float> DownloadF32(Backend& be, const Activation& a) {
  std::string bytes;
  EXPECT_TRUE(be.Download(a, DType::kFloat32, &bytes).ok());
  EXPECT_EQ(bytes.size(), a.numel() * sizeof(float));
  std::vector<float> v(bytes.size() / sizeof(float));
  std::memcpy(v.data(), bytes.data(), v.size() * sizeof(float));
  return v;
}

class BlockParityTest : public ::testing::TestWithParam<BlockCase> {};

TEST_P(BlockParityTest, ForwardBackwardAndStepsMatchCpu) {
  SKIP_WITHOUT_GPU();
  const BlockCase& bc = GetParam();
  const Bounds bounds = BoundsFor(bc.precision);
  auto cpu = MakeCpuBackend();
  CudaBackendOptions options;
  options.attention = bc.attention;
  auto gpu_or = MakeCudaBackend(options);
  if (bc.attention == AttentionMode::kCudnn && absl::IsFailedPrecondition(gpu_or.status())) {
    GTEST_SKIP() << "cuDNN cannot be used here (set BLOCKD_CUDNN_PATH to libcudnn_graph.so.9): " << gpu_or.status();
  }
  ASSERT_TRUE(gpu_or.ok()) << gpu_or.status();
  auto gpu = std::move(gpu_or).value();
  BlockSpec spec;
  spec.id = "b";
  spec.config = bc.config;
  spec.max_seq_len = bc.seq;
  spec.max_batch_size = bc.batch;
  spec.precision = Precision::kFP32;
  auto cb = cpu->CreateBlock(spec);
  spec.precision = bc.precision;
  ASSERT_TRUE(gpu->Supports(spec).ok());
  auto gb = gpu->CreateBlock(spec);
  ASSERT_TRUE(cb.ok() && gb.ok()) << gb.status();
  Block& c = **cb;
  Block& g = **gb;
  // The variant must test what it names: --attention=cudnn fails CreateBlock rather than fall back.
  const bool cudnn = bc.attention == AttentionMode::kCudnn && bc.precision == Precision::kBF16;
  EXPECT_EQ(g.attention().backend, cudnn ? "cudnn" : "native") << g.attention().reason;
  const auto params = BlockParams(bc.config);
  const auto weights = RandomWeights(bc.config, 7);
  for (size_t i = 0; i < params.size(); ++i) {
    ASSERT_TRUE(c.WriteTensor(TensorKind::kWeights, int(i), weights[i].data()).ok());
    ASSERT_TRUE(g.WriteTensor(TensorKind::kWeights, int(i), weights[i].data()).ok());
  }
  const int64_t d = bc.config.hidden_size;
  const auto x = RandomNormal(bc.batch * bc.seq * d, 8);
  auto xc = cpu->Upload(0, DType::kFloat32, x.data(), bc.batch, bc.seq, d);
  auto xg = gpu->Upload(0, DType::kFloat32, x.data(), bc.batch, bc.seq, d);
  auto xg2 = gpu->Upload(0, DType::kFloat32, x.data(), bc.batch, bc.seq, d);  // Forward takes its input
  ASSERT_TRUE(xc.ok() && xg.ok() && xg2.ok()) << xg.status();
  std::unique_ptr<SavedActivations> sc, sg;
  auto yc = c.Forward(*std::move(xc), bc.offset, &sc);
  auto yg = g.Forward(*std::move(xg), bc.offset, &sg);
  ASSERT_TRUE(yc.ok() && yg.ok()) << yg.status();
  EXPECT_EQ(sg->bytes(), g.SavedBytes(bc.batch, bc.seq));
  Check("output", DownloadF32(*gpu, **yg), DownloadF32(*cpu, **yc), bounds.out, bounds.elementwise);
  // Forward without keeping activations computes the same.
  auto yg2 = g.Forward(*std::move(xg2), bc.offset, nullptr);
  ASSERT_TRUE(yg2.ok());
  EXPECT_EQ(DownloadF32(*gpu, **yg2), DownloadF32(*gpu, **yg));

  const auto dy = RandomNormal(bc.batch * bc.seq * d, 9);
  auto dyc = cpu->Upload(0, DType::kFloat32, dy.data(), bc.batch, bc.seq, d);
  auto dyg = gpu->Upload(0, DType::kFloat32, dy.data(), bc.batch, bc.seq, d);
  for (bool accumulate : {false, true}) {
    auto dxc = c.Backward(*sc, **dyc, accumulate);
    auto dxg = g.Backward(*sg, **dyg, accumulate);
    ASSERT_TRUE(dxc.ok() && dxg.ok()) << dxg.status();
    const std::string tag = accumulate ? " (accumulated)" : "";
    Check("grad_input" + tag, DownloadF32(*gpu, **dxg), DownloadF32(*cpu, **dxc), bounds.grad, bounds.elementwise);
    for (size_t i = 0; i < params.size(); ++i) {
      Check("grad " + params[i].name + tag, ReadAll(g, TensorKind::kGradients, params[i], int(i)),
            ReadAll(c, TensorKind::kGradients, params[i], int(i)), bounds.grad, bounds.elementwise);
    }
  }
  auto nc = c.GradSquaredNorm();
  auto ng = g.GradSquaredNorm();
  ASSERT_TRUE(nc.ok() && ng.ok());
  EXPECT_NEAR(std::sqrt(*ng), std::sqrt(*nc), (bounds.elementwise ? 1e-5 : bounds.grad) * std::sqrt(*nc));
  // Started first and read later (a Step queues every block's sum before its first read): the same sum.
  ASSERT_TRUE(g.StartGradSquaredNorm().ok());
  auto ng_started = g.GradSquaredNorm();
  ASSERT_TRUE(ng_started.ok()) << ng_started.status();
  EXPECT_EQ(*ng_started, *ng);

  // AdamW runs in fp32 in every precision. Adam divides by sqrt(v) ~ |g|, so an element whose
  // gradient is within rounding of zero gets an update of either sign; comparing updates made from
  // the two backends' own gradients would measure that, not the optimizer. So the GPU block gets
  // the CPU block's gradients, and three steps must then agree to fp32 rounding in every mode.
  for (size_t i = 0; i < params.size(); ++i) {
    const auto grad = ReadAll(c, TensorKind::kGradients, params[i], int(i));
    ASSERT_TRUE(g.WriteTensor(TensorKind::kGradients, int(i), grad.data()).ok());
  }
  // A sum started after the gradients changed reads the new ones (the CPU block's), not the last.
  ASSERT_TRUE(g.StartGradSquaredNorm().ok());
  auto ng_new = g.GradSquaredNorm();
  ASSERT_TRUE(ng_new.ok());
  EXPECT_NEAR(*ng_new, *nc, 1e-12 * *nc);
  AdamWHyper h;
  h.lr = 1e-3;
  h.weight_decay = 0.1;
  for (int64_t step = 1; step <= 3; ++step) {
    ASSERT_TRUE(c.AdamWStep({h, step, 0.5f}).ok());
    ASSERT_TRUE(g.AdamWStep({h, step, 0.5f}).ok());
  }
  for (size_t i = 0; i < params.size(); ++i) {
    // What the steps changed (weights barely move, so comparing them would prove little).
    std::vector<float> dw_c = ReadAll(c, TensorKind::kWeights, params[i], int(i));
    std::vector<float> dw_g = ReadAll(g, TensorKind::kWeights, params[i], int(i));
    for (size_t e = 0; e < dw_c.size(); ++e) {
      dw_c[e] -= weights[i][e];
      dw_g[e] -= weights[i][e];
    }
    ExpectClose("3-step update " + params[i].name, dw_g, ToDouble(dw_c), 1e-5);
    ExpectClose("adam_m " + params[i].name, ReadAll(g, TensorKind::kAdamM, params[i], int(i)),
                ToDouble(ReadAll(c, TensorKind::kAdamM, params[i], int(i))), 1e-5);
    ExpectClose("adam_v " + params[i].name, ReadAll(g, TensorKind::kAdamV, params[i], int(i)),
                ToDouble(ReadAll(c, TensorKind::kAdamV, params[i], int(i))), 1e-5);
  }
}

std::vector<BlockCase> Cases() {
  std::vector<BlockCase> cases;
  for (Precision p : {Precision::kFP32, Precision::kTF32, Precision::kBF16}) {
    const std::string pn(PrecisionName(p));
    cases.push_back({"tiny_qknorm_gqa2_" + pn, Config(64, 4, 2, 16, 96, true), 2, 9, 3, p});
    cases.push_back({"odd_noqk_gqa1_" + pn, Config(72, 3, 3, 24, 200, false), 3, 17, 0, p});
    cases.push_back({"gqa4_qknorm_" + pn, Config(128, 8, 2, 32, 256, true), 2, 70, 11, p});
    cases.push_back({"dh128_" + pn, Config(256, 4, 2, 128, 512, true), 1, 130, 0, p});
  }
  // Scaled RoPE (Llama 3.2's llama3 values; Qwen2.5's yarn) and Qwen2's q/k/v biases, at offsets
  // and lengths that reach the scaled bands.
  for (Precision p : {Precision::kFP32, Precision::kBF16}) {
    const std::string pn(PrecisionName(p));
    BlockConfig llama3 = Config(128, 4, 2, 32, 256, false);
    llama3.rope_theta = 500000;
    llama3.rope_scaling = {"llama3", 32.0, 1.0, 4.0, 8192, 0, 0, 0};
    cases.push_back({"llama3_rope_" + pn, llama3, 2, 40, 5000, p});
    BlockConfig yarn = Config(128, 4, 2, 32, 256, true);
    yarn.rope_scaling = {"yarn", 4.0, 0, 0, 32768, 0, 0, 0};
    cases.push_back({"yarn_rope_" + pn, yarn, 2, 33, 100, p});
    BlockConfig qwen2 = Config(128, 8, 2, 16, 256, false);
    qwen2.attention_bias = true;
    cases.push_back({"qwen2_bias_" + pn, qwen2, 3, 21, 7, p});
    BlockConfig both = Config(256, 4, 2, 64, 512, false);
    both.attention_bias = true;
    both.rope_scaling = {"yarn", 8.0, 0, 0, 4096, 1.3, 0, 0};
    cases.push_back({"qwen2_bias_yarn_dh64_" + pn, both, 1, 130, 0, p});
  }
  cases.push_back({"qwen3_0p6b_seq2048_fp32", Config(1024, 16, 8, 128, 3072, true), 1, 2048, 0, Precision::kFP32});
  cases.push_back({"qwen3_0p6b_seq2048_bf16", Config(1024, 16, 8, 128, 3072, true), 1, 2048, 0, Precision::kBF16});
  // The bf16 cases again on cuDNN's fused attention.
  const size_t n = cases.size();
  for (size_t i = 0; i < n; ++i) {
    if (cases[i].precision != Precision::kBF16) continue;
    BlockCase c = cases[i];
    c.name += "_cudnn";
    c.attention = AttentionMode::kCudnn;
    cases.push_back(c);
  }
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Configs, BlockParityTest, ::testing::ValuesIn(Cases()),
                         [](const auto& info) { return info.param.name; });

// The Engine on both backends: a span of three blocks (one repeated), Forward + Backward + Step.
TEST(CudaEngineTest, SpanMatchesCpuEngine) {
  SKIP_WITHOUT_GPU();
  auto gpu = MakeCudaBackend();
  ASSERT_TRUE(gpu.ok());
  Engine ce(MakeCpuBackend(), EngineOptions{});
  Engine ge(std::move(gpu).value(), EngineOptions{});
  const BlockConfig cfg = Config(96, 6, 2, 16, 160, true);
  for (Engine* e : {&ce, &ge}) {
    for (const char* id : {"a", "b"}) {
      CreateBlockParams p;
      p.spec.id = id;
      p.spec.config = cfg;
      p.precision = Precision::kFP32;
      p.seed = id[0];
      ASSERT_TRUE(e->CreateBlock(p).ok());
    }
  }
  const int64_t batch = 2, seq = 21;
  const auto x = RandomNormal(batch * seq * cfg.hidden_size, 71);
  const auto dy = RandomNormal(batch * seq * cfg.hidden_size, 72);
  std::vector<float> out[2], dx[2];
  std::vector<NamedTensor> grads[2], weights[2];
  double norms[2];
  int which = 0;
  for (Engine* e : {&ce, &ge}) {
    std::string y, gx;
    ForwardArgs args;
    args.block_ids = {"a", "b", "a"};
    args.input = {DType::kFloat32, {batch, seq, cfg.hidden_size}, x.data(), x.size() * 4};
    args.keep_activations = true;
    args.position_offset = 5;
    ForwardOutput fo;
    fo.output.data = &y;
    ASSERT_TRUE(e->Forward(args, &fo).ok());
    TensorOut gi;
    gi.data = &gx;
    ASSERT_TRUE(e->Backward(fo.activation_id, "", {DType::kFloat32, {batch, seq, cfg.hidden_size}, dy.data(), dy.size() * 4},
                            &gi)
                    .ok());
    out[which].resize(x.size());
    dx[which].resize(x.size());
    std::memcpy(out[which].data(), y.data(), y.size());
    std::memcpy(dx[which].data(), gx.data(), gx.size());
    auto gr = e->ReadTensors("a", TensorKind::kGradients, DType::kFloat32, {});
    ASSERT_TRUE(gr.ok());
    grads[which] = *gr;
    auto st = e->Step({"a", "b"}, AdamWHyper{}, 1.0);
    ASSERT_TRUE(st.ok()) << st.status();
    norms[which] = st->grad_norm;
    auto w = e->ReadTensors("b", TensorKind::kWeights, DType::kFloat32, {});
    ASSERT_TRUE(w.ok());
    weights[which] = *w;
    ++which;
  }
  ExpectClose("span output", out[1], ToDouble(out[0]), 1e-5);
  ExpectClose("span grad_input", dx[1], ToDouble(dx[0]), 1e-5);
  for (size_t i = 0; i < grads[0].size(); ++i) {
    std::vector<float> a(grads[0][i].bytes.size() / 4), b(a.size());
    std::memcpy(a.data(), grads[0][i].bytes.data(), grads[0][i].bytes.size());
    std::memcpy(b.data(), grads[1][i].bytes.data(), grads[1][i].bytes.size());
    ExpectClose("span grad a." + grads[0][i].name + " (two uses)", b, ToDouble(a), 1e-5);
  }
  EXPECT_NEAR(norms[1], norms[0], 1e-5 * norms[0]);
}

// UploadFrom and DownloadTo (a POSIX shared-memory slice's path: pread into the pinned staging,
// pwrite out of it) move a tensor of several staging pieces, the last one short, to bitwise the
// bytes Upload and Download move; pieces arrive in order and cover the tensor once; a read that
// fails mid-tensor fails the upload with its status, and the next transfer works.
TEST(CudaBackendTest, HostReadsAndWritesMoveTheSameBytesAPieceAtATime) {
  SKIP_WITHOUT_GPU();
  auto gpu_or = MakeCudaBackend();
  ASSERT_TRUE(gpu_or.ok()) << gpu_or.status();
  Backend& gpu = **gpu_or;
  const int64_t batch = 3, seq = 1000, d = 4000;  // 24 MB of bf16: pieces of 8 MiB, the last short
  const auto values = RandomNormal(batch * seq * d, 5);
  std::string wire(values.size() * 2, '\0');
  for (size_t i = 0; i < values.size(); ++i) {  // bf16: the float's top half
    uint32_t u;
    std::memcpy(&u, &values[i], 4);
    const uint16_t h = static_cast<uint16_t>(u >> 16);
    std::memcpy(&wire[2 * i], &h, 2);
  }
  auto plain = gpu.Upload(0, DType::kBFloat16, wire.data(), batch, seq, d);
  ASSERT_TRUE(plain.ok()) << plain.status();
  std::vector<std::pair<size_t, size_t>> reads;
  auto pieced = gpu.UploadFrom(0, DType::kBFloat16, [&](void* dst, size_t at, size_t n) {
    reads.emplace_back(at, n);
    std::memcpy(dst, wire.data() + at, n);
    return absl::OkStatus();
  }, batch, seq, d);
  ASSERT_TRUE(pieced.ok()) << pieced.status();
  ASSERT_GE(reads.size(), 3u);
  size_t next = 0;
  for (const auto& [at, n] : reads) {
    EXPECT_EQ(at, next);
    next += n;
  }
  EXPECT_EQ(next, wire.size());

  std::string a, b(wire.size(), '\0');
  ASSERT_TRUE(gpu.Download(**plain, DType::kBFloat16, &a).ok());
  EXPECT_EQ(a, wire);  // bf16 round trips exactly
  std::vector<std::pair<size_t, size_t>> writes;
  ASSERT_TRUE(gpu.DownloadTo(**pieced, DType::kBFloat16, [&](const void* src, size_t at, size_t n) {
    writes.emplace_back(at, n);
    std::memcpy(&b[at], src, n);
    return absl::OkStatus();
  }).ok());
  EXPECT_EQ(b, a);
  next = 0;
  for (const auto& [at, n] : writes) {
    EXPECT_EQ(at, next);
    next += n;
  }
  EXPECT_EQ(next, wire.size());
  EXPECT_EQ(writes.size(), reads.size());

  int calls = 0;
  auto failed = gpu.UploadFrom(0, DType::kBFloat16, [&](void* dst, size_t at, size_t n) {
    if (++calls == 2) return absl::FailedPreconditionError("the object was truncated");
    std::memcpy(dst, wire.data() + at, n);
    return absl::OkStatus();
  }, batch, seq, d);
  EXPECT_EQ(failed.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(calls, 2);
  const absl::Status write_failed = gpu.DownloadTo(**plain, DType::kBFloat16, [](const void*, size_t, size_t) {
    return absl::ResourceExhaustedError("tmpfs is full");
  });
  EXPECT_EQ(write_failed.code(), absl::StatusCode::kResourceExhausted);
  std::string again;
  ASSERT_TRUE(gpu.Download(**pieced, DType::kBFloat16, &again).ok());
  EXPECT_EQ(again, wire);
}

size_t PoolUsed() {
  cudaMemPool_t pool;
  cudaDeviceGetDefaultMemPool(&pool, 0);
  uint64_t used = 0;
  cudaMemPoolGetAttribute(pool, cudaMemPoolAttrUsedMemCurrent, &used);
  return used;
}

TEST(CudaEngineTest, ThousandCyclesLeaveDeviceMemoryFlat) {
  SKIP_WITHOUT_GPU();
  auto gpu = MakeCudaBackend();
  ASSERT_TRUE(gpu.ok());
  Engine e(std::move(gpu).value(), EngineOptions{});
  CreateBlockParams p;
  p.spec.id = "m";
  p.spec.config = Config(128, 4, 2, 32, 256, true);
  p.precision = Precision::kBF16;
  p.seed = 3;
  ASSERT_TRUE(e.CreateBlock(p).ok());
  const int64_t batch = 2, seq = 64, d = 128;
  const auto x = RandomNormal(batch * seq * d, 81);
  auto cycle = [&] {
    std::string y, gx;
    ForwardArgs args;
    args.block_ids = {"m"};
    args.input = {DType::kFloat32, {batch, seq, d}, x.data(), x.size() * 4};
    args.keep_activations = true;
    ForwardOutput fo;
    fo.output.data = &y;
    ASSERT_TRUE(e.Forward(args, &fo).ok());
    TensorOut gi;
    gi.data = &gx;
    ASSERT_TRUE(e.Backward(fo.activation_id, "", {DType::kFloat32, {batch, seq, d}, x.data(), x.size() * 4}, &gi).ok());
    auto st = e.Step({"m"}, AdamWHyper{}, 1.0);
    ASSERT_TRUE(st.ok());
  };
  for (int i = 0; i < 10; ++i) cycle();  // warm-up: the pool reaches its working size
  size_t free0 = 0, total = 0;
  cudaMemGetInfo(&free0, &total);
  const size_t used0 = PoolUsed();
  for (int i = 0; i < 1000; ++i) cycle();
  size_t free1 = 0;
  cudaMemGetInfo(&free1, &total);
  const size_t used1 = PoolUsed();
  std::printf("  device free before %zu after %zu; pool in use before %zu after %zu\n", free0, free1, used0, used1);
  EXPECT_EQ(free1, free0) << "the driver gave out memory during the 1000 cycles";
  EXPECT_EQ(used1, used0) << "pool memory in use grew over 1000 cycles";
  EXPECT_EQ(e.Stats().activations_held, 0);
}

TEST(CudaEngineTest, FailedAllocationIsResourceExhaustedAndServingContinues) {
  SKIP_WITHOUT_GPU();
  auto gpu = MakeCudaBackend();
  ASSERT_TRUE(gpu.ok());
  EngineOptions o;
  o.memory_budget_bytes = int64_t{1} << 50;  // let the allocation itself fail
  Engine e(std::move(gpu).value(), o);
  CreateBlockParams huge;
  huge.spec.id = "huge";
  huge.spec.config = Config(32768, 64, 8, 128, 262144, false);  // ~26G parameters, 0.4 TB
  auto r = e.CreateBlock(huge);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted) << r.status();
  EXPECT_TRUE(e.backend().healthy());
  CreateBlockParams small;
  small.spec.id = "small";
  small.spec.config = Config(64, 4, 2, 16, 96, true);
  small.seed = 1;
  auto ok = e.CreateBlock(small);
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_GT(ok->memory_bytes, 16 * ok->parameter_count);
  EXPECT_EQ(e.Stats().blocks, 1);
}

TEST(CudaEngineTest, BudgetIsEnforcedBeforeAllocating) {
  SKIP_WITHOUT_GPU();
  auto gpu = MakeCudaBackend();
  ASSERT_TRUE(gpu.ok());
  EngineOptions o;
  o.memory_budget_bytes = 8 << 20;
  Engine e(std::move(gpu).value(), o);
  CreateBlockParams p;
  p.spec.id = "big";
  p.spec.config = Config(1024, 16, 8, 128, 3072, true);  // 15.7M parameters: 250 MB
  auto r = e.CreateBlock(p);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(std::string(r.status().message()).find("memory budget"), std::string::npos) << r.status();
}

}  // namespace
}  // namespace blockd::testing

namespace blockd::testing {
namespace {

// A span whose blocks sit on two GPUs: the activation moves between devices (peer copies) and the
// result matches the CPU engine. Needs two GPUs; skipped with fewer.
TEST(CudaEngineTest, SpanAcrossTwoGpusMatchesCpu) {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n < 2) {
    cudaGetLastError();
    GTEST_SKIP() << "needs two GPUs (found " << n << ")";
  }
  auto gpu = MakeCudaBackend();
  ASSERT_TRUE(gpu.ok());
  Engine ce(MakeCpuBackend(), EngineOptions{});
  Engine ge(std::move(gpu).value(), EngineOptions{});
  const BlockConfig cfg = Config(128, 4, 2, 32, 256, true);
  for (int i = 0; i < 2; ++i) {
    CreateBlockParams p;
    p.spec.id = "d" + std::to_string(i);
    p.spec.config = cfg;
    p.precision = Precision::kFP32;
    p.seed = 10 + i;
    ASSERT_TRUE(ce.CreateBlock(p).ok());
    p.spec.device = i;
    auto info = ge.CreateBlock(p);
    ASSERT_TRUE(info.ok()) << info.status();
    EXPECT_EQ(info->spec.device, i);
  }
  const int64_t batch = 2, seq = 33;
  const auto x = RandomNormal(batch * seq * cfg.hidden_size, 91);
  const auto dy = RandomNormal(batch * seq * cfg.hidden_size, 92);
  std::vector<float> out[2], dx[2], grads[2];
  int which = 0;
  for (Engine* e : {&ce, &ge}) {
    std::string y, gx;
    ForwardArgs args;
    args.block_ids = {"d0", "d1", "d0"};
    args.input = {DType::kFloat32, {batch, seq, cfg.hidden_size}, x.data(), x.size() * 4};
    args.keep_activations = true;
    ForwardOutput fo;
    fo.output.data = &y;
    ASSERT_TRUE(e->Forward(args, &fo).ok());
    TensorOut gi;
    gi.data = &gx;
    ASSERT_TRUE(
        e->Backward(fo.activation_id, "", {DType::kFloat32, {batch, seq, cfg.hidden_size}, dy.data(), dy.size() * 4}, &gi)
            .ok());
    out[which].resize(x.size());
    dx[which].resize(x.size());
    std::memcpy(out[which].data(), y.data(), y.size());
    std::memcpy(dx[which].data(), gx.data(), gx.size());
    auto g = e->ReadTensors("d1", TensorKind::kGradients, DType::kFloat32, {"mlp.down_proj.weight"});
    ASSERT_TRUE(g.ok());
    grads[which].resize(g->at(0).bytes.size() / 4);
    std::memcpy(grads[which].data(), g->at(0).bytes.data(), g->at(0).bytes.size());
    ++which;
  }
  ExpectClose("two-GPU span output", out[1], ToDouble(out[0]), 1e-5);
  ExpectClose("two-GPU span grad_input", dx[1], ToDouble(dx[0]), 1e-5);
  ExpectClose("two-GPU span grad d1.mlp.down_proj.weight", grads[1], ToDouble(grads[0]), 1e-5);
}

}  // namespace
}  // namespace blockd::testing
