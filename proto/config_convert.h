// The one mapping between the wire's types (blockd.v1.BlockConfig, Precision, DType) and base's
// BlockConfig / Precision / DType, and the precision names on command lines. The server
// (server/convert.cc) and blockctl both use it, so a field added to the config is mapped in one place.
//
//   BlockConfig c = FromProto(request.config());
//   ASSIGN_OR_RETURN(std::optional<Precision> p, FromProto(request.precision()));
//   ASSIGN_OR_RETURN(v1::Precision wire, ParsePrecisionName("bf16"));
#pragma once

#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "base/block_config.h"
#include "base/dtype.h"
#include "blockd/v1/block_service.pb.h"

namespace blockd {

BlockConfig FromProto(const v1::BlockConfig& c);
void ToProto(const BlockConfig& c, v1::BlockConfig* out);
v1::BlockConfig ToProto(const BlockConfig& c);
LoraConfig FromProto(const v1::LoraConfig& l);
void ToProto(const LoraConfig& l, v1::LoraConfig* out);

// PRECISION_UNSPECIFIED is "the backend's default" (nullopt); a number outside the enum is
// INVALID_ARGUMENT.
absl::StatusOr<std::optional<Precision>> FromProto(v1::Precision p);
v1::Precision ToProto(Precision p);

// "fp32", "tf32", "bf16" (any case; "float32" and "bfloat16" too); "" or "default" for
// PRECISION_UNSPECIFIED. INVALID_ARGUMENT names the text and the accepted names.
absl::StatusOr<v1::Precision> ParsePrecisionName(absl::string_view text);
// "fp32", "tf32", "bf16", or "default" for PRECISION_UNSPECIFIED.
std::string PrecisionName(v1::Precision p);

// DTYPE_FLOAT32/BFLOAT16/FLOAT16; anything else is INVALID_ARGUMENT naming `what` and the value.
absl::StatusOr<DType> FromProto(v1::DType t, absl::string_view what);
v1::DType ToProto(DType t);

}  // namespace blockd
