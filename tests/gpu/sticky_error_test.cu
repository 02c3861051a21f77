// A sticky CUDA error (an illegal address) must turn into an INTERNAL status, mark the backend
// unhealthy (health NOT_SERVING), and never abort the process.
#include <gtest/gtest.h>

#include "engine/cuda/cuda_backend.h"
#include "tests/gpu/gpu_test_util.h"

namespace blockd::testing {
namespace {

__global__ void write_to_nowhere(float* p) { p[threadIdx.x] = 1.f; }

TEST(StickyErrorTest, IllegalAddressMarksBackendUnhealthy) {
  SKIP_WITHOUT_GPU();
  auto gpu = MakeCudaBackend();
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  EXPECT_TRUE((*gpu)->healthy());
  write_to_nowhere<<<1, 32>>>(reinterpret_cast<float*>(0x10));
  const float x[4] = {1, 2, 3, 4};
  auto a = (*gpu)->Upload(0, DType::kFloat32, x, 1, 1, 4);
  ASSERT_FALSE(a.ok());
  EXPECT_EQ(a.status().code(), absl::StatusCode::kInternal) << a.status();
  EXPECT_FALSE((*gpu)->healthy());
}

}  // namespace
}  // namespace blockd::testing
