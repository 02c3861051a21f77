// Frozen blocks on the CUDA backend: the weights only, in the compute dtype (bf16 matrices for
// BF16, no fp32 masters, gradients or moments), the same forward output and input gradient, bit for
// bit, as a trainable CUDA block of the same weights (both read bf16 copies rounded to nearest
// even), the 1-D parameters' gradients kept out of sight, Step refused, and weights read back
// exactly (bf16-rounded for BF16).
#include <cuda_runtime.h>

#include <cstring>

#include "base/dtype.h"
#include "engine/cuda/cuda_backend.h"
#include "engine/engine.h"
#include "tests/gpu/engine_calls.h"
#include "tests/gpu/gpu_test_util.h"

namespace blockd::testing {
namespace {

std::vector<float> Floats(const std::string& bytes) {
  std::vector<float> v(bytes.size() / 4);
  std::memcpy(v.data(), bytes.data(), bytes.size());
  return v;
}

TEST(CudaFrozenTest, WeightsOnlyAndTheSameForwardAndInputGradient) {
  SKIP_WITHOUT_GPU();
  for (Precision precision : {Precision::kFP32, Precision::kBF16}) {
    SCOPED_TRACE(std::string(PrecisionName(precision)));
    auto gpu = MakeCudaBackend();
    ASSERT_TRUE(gpu.ok()) << gpu.status();
    Engine e(std::move(gpu).value(), EngineOptions{});
    BlockConfig c;
    c.hidden_size = 128;
    c.num_attention_heads = 4;
    c.num_kv_heads = 2;
    c.head_dim = 32;
    c.intermediate_size = 256;
    c.qk_norm = true;
    c.attention_bias = true;
    for (bool frozen : {true, false}) {
      CreateBlockParams p;
      p.spec.id = frozen ? "frozen" : "trainable";
      p.spec.config = c;
      p.spec.frozen = frozen;
      p.precision = precision;
      p.seed = 5;
      auto info = e.CreateBlock(p);
      ASSERT_TRUE(info.ok()) << info.status();
    }
    int64_t matrices = 0, vectors = 0;
    for (const ParamSpec& p : BlockParams(c)) (p.is_matrix ? matrices : vectors) += p.numel();
    const int64_t frozen_bytes = e.GetBlock("frozen")->memory_bytes, trainable_bytes = e.GetBlock("trainable")->memory_bytes;
    // Weights in the compute dtype, fp32 1-D parameters and their gradient scratch; workspaces on top.
    const int64_t weights = precision == Precision::kBF16 ? 2 * (matrices + vectors) + 8 * vectors
                                                          : 4 * (matrices + vectors) + 4 * vectors;
    EXPECT_GE(frozen_bytes, weights);
    EXPECT_EQ(trainable_bytes - frozen_bytes,
              (precision == Precision::kBF16 ? 18 : 16) * (matrices + vectors) - weights);

    const int64_t batch = 2, seq = 37;
    const auto x = RandomNormal(batch * seq * c.hidden_size, 81);
    const auto dy = RandomNormal(batch * seq * c.hidden_size, 82);
    std::string out[2], dx[2];
    for (int i = 0; i < 2; ++i) {
      ASSERT_NO_FATAL_FAILURE(ForwardBackward(e, {i == 0 ? "frozen" : "trainable"}, x, dy,
                                              {batch, seq, c.hidden_size}, &out[i], &dx[i]));
    }
    EXPECT_TRUE(out[0] == out[1]) << "frozen and trainable forward outputs differ";
    EXPECT_TRUE(dx[0] == dx[1]) << "frozen and trainable input gradients differ";
    EXPECT_FALSE(e.GetBlock("frozen")->has_gradients);
    EXPECT_EQ(e.Step({"frozen"}, AdamWHyper{}, 0).status().code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_EQ(e.ReadTensors("frozen", TensorKind::kGradients, DType::kFloat32, {}).status().code(),
              absl::StatusCode::kFailedPrecondition);

    // Weights read back: exactly what was written, rounded to bf16 for a BF16 frozen block's matrices.
    auto wf = e.ReadTensors("frozen", TensorKind::kWeights, DType::kFloat32, {});
    auto wt = e.ReadTensors("trainable", TensorKind::kWeights, DType::kFloat32, {});
    ASSERT_TRUE(wf.ok() && wt.ok());
    const std::vector<ParamSpec> params = BlockParams(c);
    for (size_t i = 0; i < params.size(); ++i) {
      std::vector<float> want = Floats((*wt)[i].bytes);
      if (precision == Precision::kBF16 && params[i].is_matrix) {
        std::vector<uint16_t> b(want.size());
        ConvertFromFloat32(want.data(), want.size(), DType::kBFloat16, b.data());
        ConvertToFloat32(DType::kBFloat16, b.data(), b.size(), want.data());
      }
      EXPECT_TRUE(Floats((*wf)[i].bytes) == want) << "frozen weight " << params[i].name;
    }
  }
}

}  // namespace
}  // namespace blockd::testing
