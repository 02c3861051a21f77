// Conversions between the wire types (blockd.v1 protos) and the engine's types, and the one place
// where an absl::Status becomes a grpc::Status.
//   RETURN_IF_ERROR(FromProto(request.config(), &config));
//   return ToGrpcStatus(engine.DeleteBlock(id).status());
#pragma once

#include <grpcpp/support/status.h>

#include "absl/status/statusor.h"
#include "blockd/v1/block_service.pb.h"
#include "engine/engine.h"
#include "proto/config_convert.h"  // BlockConfig and Precision <-> proto, shared with blockctl

namespace blockd {

grpc::Status ToGrpcStatus(const absl::Status& s);

void ToProto(const BlockInfo& info, absl::string_view backend, v1::BlockInfo* out);

// `what` names the field in the error ("input.dtype").
absl::StatusOr<TensorKind> FromProto(v1::TensorKind k);

// A view of a request tensor's bytes; INVALID_ARGUMENT for an unspecified dtype.
absl::StatusOr<TensorArg> TensorArgOf(const v1::Tensor& t, absl::string_view what);
AdamWHyper FromProto(const v1::AdamW& a);

}  // namespace blockd
