// LoRA on the CUDA backend: not built yet, so a block with `lora` is refused with UNIMPLEMENTED and
// a message that says so, before anything is reserved or created; the same spec without lora is
// created (the refusal is about LoRA, not the config).
#include <cuda_runtime.h>

#include "engine/cuda/cuda_backend.h"
#include "engine/engine.h"
#include "tests/gpu/gpu_test_util.h"

namespace blockd::testing {
namespace {

TEST(CudaLoraTest, RefusedClearlyUntilBuilt) {
  SKIP_WITHOUT_GPU();
  auto gpu = MakeCudaBackend();
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  Engine e(std::move(gpu).value(), EngineOptions{});
  CreateBlockParams p;
  p.spec.id = "lora";
  p.spec.config.hidden_size = 128;
  p.spec.config.num_attention_heads = 4;
  p.spec.config.num_kv_heads = 2;
  p.spec.config.head_dim = 32;
  p.spec.config.intermediate_size = 256;
  p.spec.frozen = true;
  p.spec.lora.rank = 8;
  p.spec.lora.alpha = 16;
  p.spec.lora.target_modules = {"q_proj", "v_proj"};
  p.precision = Precision::kBF16;
  p.seed = 1;
  auto refused = e.CreateBlock(p);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kUnimplemented) << refused.status();
  EXPECT_NE(refused.status().message().find("LoRA is not built for the CUDA backend yet"), absl::string_view::npos)
      << refused.status();
  EXPECT_TRUE(e.ListBlocks().empty());
  EXPECT_EQ(e.Stats().memory_used[0], 0);
  p.spec.lora = LoraConfig{};
  auto plain = e.CreateBlock(p);
  EXPECT_TRUE(plain.ok()) << plain.status();
}

}  // namespace
}  // namespace blockd::testing
