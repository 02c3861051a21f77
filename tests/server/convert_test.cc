// server/convert: the one place an absl::Status becomes a grpc::Status, the wire enums <-> engine
// enums (and the refusal of values the wire may carry but the engine has no meaning for), request
// tensors as views, AdamW field presence, and BlockInfo on the wire. (BlockConfig's mapping is
// tested where it lives.)
#include "server/convert.h"

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"

namespace blockd {
namespace {

using absl::StatusCode;

::testing::AssertionResult IsInvalid(const absl::Status& s, const std::vector<std::string>& parts) {
  if (s.code() != StatusCode::kInvalidArgument) {
    return ::testing::AssertionFailure() << "got " << s << "; expected INVALID_ARGUMENT";
  }
  for (const std::string& p : parts) {
    if (s.message().find(p) == absl::string_view::npos) {
      return ::testing::AssertionFailure() << "got " << s << "; the message lacks \"" << p << "\"";
    }
  }
  return ::testing::AssertionSuccess();
}

TEST(Convert, EveryStatusCodeKeepsItsCodeAndMessage) {
  EXPECT_TRUE(ToGrpcStatus(absl::OkStatus()).ok());
  for (int code = 1; code <= 16; ++code) {
    const std::string message = absl::StrCat("block b", code, " says no");
    const grpc::Status g = ToGrpcStatus(absl::Status(static_cast<StatusCode>(code), message));
    EXPECT_EQ(static_cast<int>(g.error_code()), code) << absl::StatusCodeToString(static_cast<StatusCode>(code));
    EXPECT_EQ(g.error_message(), message);
  }
  // Spot checks against gRPC's own names, in case both enums ever moved together.
  EXPECT_EQ(ToGrpcStatus(absl::NotFoundError("x")).error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(ToGrpcStatus(absl::ResourceExhaustedError("x")).error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_EQ(ToGrpcStatus(absl::UnauthenticatedError("x")).error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(ToGrpcStatus(absl::FailedPreconditionError("x")).error_code(), grpc::StatusCode::FAILED_PRECONDITION);
}

TEST(Convert, DTypesRoundTripAndUnknownOnesNameTheField) {
  for (auto [wire, engine] : {std::pair{v1::DTYPE_FLOAT32, DType::kFloat32}, std::pair{v1::DTYPE_BFLOAT16, DType::kBFloat16},
                              std::pair{v1::DTYPE_FLOAT16, DType::kFloat16}}) {
    auto got = FromProto(wire, "input.dtype");
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(*got, engine) << v1::DType_Name(wire);
    EXPECT_EQ(ToProto(engine), wire);
  }
  EXPECT_TRUE(IsInvalid(FromProto(v1::DTYPE_UNSPECIFIED, "input.dtype").status(),
                        {"input.dtype is DTYPE_UNSPECIFIED", "expected DTYPE_FLOAT32, DTYPE_BFLOAT16 or DTYPE_FLOAT16"}));
  // A value from a newer client that this server's enum does not know.
  EXPECT_TRUE(IsInvalid(FromProto(static_cast<v1::DType>(77), "grad_output.dtype").status(),
                        {"grad_output.dtype is 77"}));
}

TEST(Convert, PrecisionsRoundTripAndUnspecifiedMeansTheBackendDefault) {
  auto unspecified = FromProto(v1::PRECISION_UNSPECIFIED);
  ASSERT_TRUE(unspecified.ok()) << unspecified.status();
  EXPECT_FALSE(unspecified->has_value());
  for (auto [wire, engine] : {std::pair{v1::PRECISION_FP32, Precision::kFP32}, std::pair{v1::PRECISION_TF32, Precision::kTF32},
                              std::pair{v1::PRECISION_BF16, Precision::kBF16}}) {
    auto got = FromProto(wire);
    ASSERT_TRUE(got.ok()) << got.status();
    ASSERT_TRUE(got->has_value()) << v1::Precision_Name(wire);
    EXPECT_EQ(**got, engine) << v1::Precision_Name(wire);
    EXPECT_EQ(ToProto(engine), wire);
  }
  EXPECT_TRUE(IsInvalid(FromProto(static_cast<v1::Precision>(42)).status(), {"precision = 42"}));
}

TEST(Convert, TensorKinds) {
  for (auto [wire, engine] : {std::pair{v1::TENSOR_KIND_WEIGHTS, TensorKind::kWeights},
                              std::pair{v1::TENSOR_KIND_GRADIENTS, TensorKind::kGradients},
                              std::pair{v1::TENSOR_KIND_ADAM_M, TensorKind::kAdamM},
                              std::pair{v1::TENSOR_KIND_ADAM_V, TensorKind::kAdamV}}) {
    auto got = FromProto(wire);
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(*got, engine) << v1::TensorKind_Name(wire);
  }
  EXPECT_TRUE(IsInvalid(FromProto(v1::TENSOR_KIND_UNSPECIFIED).status(), {"kind = 0", "TENSOR_KIND_WEIGHTS"}));
  EXPECT_TRUE(IsInvalid(FromProto(static_cast<v1::TensorKind>(9)).status(), {"kind = 9"}));
}

TEST(Convert, TensorArgIsAViewOfTheRequestBytes) {
  v1::Tensor t;
  t.set_dtype(v1::DTYPE_BFLOAT16);
  t.add_shape(2);
  t.add_shape(3);
  t.add_shape(4);
  t.set_data(std::string(2 * 3 * 4 * 2, '\x5a'));
  auto arg = TensorArgOf(t, "input");
  ASSERT_TRUE(arg.ok()) << arg.status();
  EXPECT_EQ(arg->dtype, DType::kBFloat16);
  EXPECT_EQ(arg->shape, (std::vector<int64_t>{2, 3, 4}));
  EXPECT_EQ(arg->data, static_cast<const void*>(t.data().data())) << "the bytes were copied";
  EXPECT_EQ(arg->size, t.data().size());
  // The shape and size are passed on as they came: the engine checks them against the block.
  t.set_data("abc");
  auto mismatched = TensorArgOf(t, "input");
  ASSERT_TRUE(mismatched.ok()) << mismatched.status();
  EXPECT_EQ(mismatched->size, 3u);
}

TEST(Convert, TensorArgRefusesBadDtypesAndDimensionsNamingTheField) {
  v1::Tensor t;
  t.add_shape(1);
  t.add_shape(2);
  EXPECT_TRUE(IsInvalid(TensorArgOf(t, "grad_output").status(), {"grad_output.dtype is DTYPE_UNSPECIFIED"}));
  t.set_dtype(v1::DTYPE_FLOAT32);
  t.add_shape(-3);
  EXPECT_TRUE(IsInvalid(TensorArgOf(t, "input").status(), {"input.shape has dimension -3", "expected 0..2^40"}));
  t.set_shape(2, (int64_t{1} << 40) + 1);
  EXPECT_TRUE(IsInvalid(TensorArgOf(t, "input").status(), {"input.shape has dimension 1099511627777"}));
  t.set_shape(2, int64_t{1} << 40);
  EXPECT_TRUE(TensorArgOf(t, "input").ok()) << "2^40 is the largest dimension allowed";
}

TEST(Convert, AdamWTakesOnlyTheFieldsThatAreSet) {
  const AdamWHyper defaults;
  AdamWHyper h = FromProto(v1::AdamW());
  EXPECT_EQ(h.lr, defaults.lr);
  EXPECT_EQ(h.beta1, defaults.beta1);
  EXPECT_EQ(h.beta2, defaults.beta2);
  EXPECT_EQ(h.eps, defaults.eps);
  EXPECT_EQ(h.weight_decay, defaults.weight_decay);
  EXPECT_FALSE(h.decay_norm_weights);

  v1::AdamW a;
  a.set_lr(3e-4);
  a.set_beta1(0.8);
  a.set_beta2(0.95);
  a.set_eps(1e-6);
  a.set_weight_decay(0);  // explicitly zero: no decay, not the default 0.01
  a.set_decay_norm_weights(true);
  h = FromProto(a);
  EXPECT_EQ(h.lr, 3e-4);
  EXPECT_EQ(h.beta1, 0.8);
  EXPECT_EQ(h.beta2, 0.95);
  EXPECT_EQ(h.eps, 1e-6);
  EXPECT_EQ(h.weight_decay, 0.0);
  EXPECT_TRUE(h.decay_norm_weights);

  v1::AdamW only_lr;
  only_lr.set_lr(0.5);
  h = FromProto(only_lr);
  EXPECT_EQ(h.lr, 0.5);
  EXPECT_EQ(h.weight_decay, defaults.weight_decay);
  EXPECT_EQ(h.beta2, defaults.beta2);
}

TEST(Convert, BlockInfoCarriesEveryField) {
  BlockInfo info;
  info.spec.id = "layers.7";
  info.spec.layer_index = 7;
  info.spec.max_seq_len = 2048;
  info.spec.max_batch_size = 3;
  info.spec.precision = Precision::kBF16;
  info.spec.device = 1;
  info.parameter_count = 123456;
  info.memory_bytes = 987654321;
  info.weights_loaded = false;
  info.missing_weights = {"mlp.up_proj.weight", "mlp.down_proj.weight"};
  info.has_gradients = true;
  info.step = 41;
  info.ttl = absl::Seconds(300);
  info.idle = absl::Milliseconds(12500);
  v1::BlockInfo out;
  ToProto(info, "cuda", &out);
  EXPECT_EQ(out.block_id(), "layers.7");
  EXPECT_EQ(out.layer_index(), 7);
  EXPECT_EQ(out.max_seq_len(), 2048);
  EXPECT_EQ(out.max_batch_size(), 3);
  EXPECT_EQ(out.precision(), v1::PRECISION_BF16);
  EXPECT_EQ(out.device(), 1);
  EXPECT_EQ(out.parameter_count(), 123456);
  EXPECT_EQ(out.memory_bytes(), 987654321);
  EXPECT_FALSE(out.weights_loaded());
  EXPECT_EQ(std::vector<std::string>(out.missing_weights().begin(), out.missing_weights().end()),
            info.missing_weights);
  EXPECT_TRUE(out.has_gradients());
  EXPECT_EQ(out.step(), 41);
  EXPECT_EQ(out.backend(), "cuda");
  EXPECT_EQ(out.ttl_seconds(), 300);
  EXPECT_DOUBLE_EQ(out.idle_seconds(), 12.5);
  EXPECT_TRUE(out.has_config());

  // No lease: both zero.
  info.ttl = absl::ZeroDuration();
  info.idle = absl::ZeroDuration();
  info.weights_loaded = true;
  info.missing_weights.clear();
  v1::BlockInfo plain;
  ToProto(info, "cpu", &plain);
  EXPECT_EQ(plain.ttl_seconds(), 0);
  EXPECT_EQ(plain.idle_seconds(), 0.0);
  EXPECT_TRUE(plain.weights_loaded());
  EXPECT_EQ(plain.missing_weights_size(), 0);
  // The engine API takes any duration; the wire says whole seconds, rounded up so that a lease never
  // reads as 0 (no lease).
  for (auto [ttl, seconds] : {std::pair{absl::Milliseconds(2500), 3}, std::pair{absl::Milliseconds(1), 1},
                              std::pair{absl::Seconds(7), 7}}) {
    info.ttl = ttl;
    ToProto(info, "cpu", &plain);
    EXPECT_EQ(plain.ttl_seconds(), seconds) << "ttl " << ttl;
  }
}

}  // namespace
}  // namespace blockd
