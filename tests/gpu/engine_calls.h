// The Engine calls the GPU tests of whole blocks repeat: a Forward that keeps its activations, then
// the Backward of its handle, with float32 tensors in and out.
#pragma once

#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "engine/engine.h"

namespace blockd::testing {

// Forward(keep_activations) of x [batch, seq, width] through `ids`, then Backward of dy: the
// output's and the input gradient's float32 bytes into *out and *dx. A failure fails the test.
inline void ForwardBackward(Engine& e, const std::vector<std::string>& ids, const std::vector<float>& x,
                            const std::vector<float>& dy, const std::vector<int64_t>& shape, std::string* out,
                            std::string* dx) {
  ForwardArgs args;
  args.block_ids = ids;
  args.input = {DType::kFloat32, shape, x.data(), x.size() * 4};
  args.keep_activations = true;
  ForwardOutput fo;
  fo.output.data = out;
  absl::Status s = e.Forward(args, &fo);
  ASSERT_TRUE(s.ok()) << s;
  TensorOut gi;
  gi.data = dx;
  s = e.Backward(fo.activation_id, "", {DType::kFloat32, shape, dy.data(), dy.size() * 4}, &gi);
  ASSERT_TRUE(s.ok()) << s;
}

}  // namespace blockd::testing
