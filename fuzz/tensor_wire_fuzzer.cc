// proto/tensor_wire.h against protobuf's own parser on hostile bytes: the first byte picks how the
// rest is cut into slices (gRPC's slices fall anywhere); the rest is parsed as a ForwardRequest and
// as a BackwardRequest. Both parsers must accept or refuse alike; when they accept, the messages
// must be equal field for field and the tensor's bytes equal, whichever range is gathered. Any
// disagreement, and any read outside the slices (ASan), is a finding.
#include <google/protobuf/stubs/logging.h>
#include <google/protobuf/util/message_differencer.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "fuzz/fuzz_checks.h"
#include "proto/tensor_wire.h"

namespace {

grpc::ByteBuffer Cut(const std::string& bytes, uint8_t pattern) {
  std::vector<grpc::Slice> slices;
  const size_t every = 1 + pattern % 29;
  for (size_t at = 0; at < bytes.size(); at += every + (pattern & 0x20 ? at % 7 : 0)) {
    slices.emplace_back(bytes.data() + at, std::min(bytes.size() - at, every + (pattern & 0x20 ? at % 7 : 0)));
  }
  if (pattern & 0x40) slices.emplace_back();  // an empty slice at the end
  return grpc::ByteBuffer(slices.data(), slices.size());
}

template <class Req>
void Compare(const std::string& bytes, const grpc::ByteBuffer& wire, int field, const blockd::v1::Tensor& (Req::*tensor)() const,
             blockd::v1::Tensor* (Req::*mutable_tensor)(), bool (Req::*has_tensor)() const) {
  Req want;
  const bool want_ok = want.ParseFromString(bytes);
  Req got;
  blockd::WireBytes data;
  const absl::Status s = blockd::ParseWithTensorBytes(wire, field, &got, &data);
  if (s.ok() != want_ok) blockd::fuzz::Fail("tensor_wire and protobuf disagree on whether the bytes parse: " + s.ToString());
  if (!want_ok) {
    if (s.code() != absl::StatusCode::kInvalidArgument) blockd::fuzz::Fail("a refusal that is not INVALID_ARGUMENT");
    return;
  }
  const std::string want_data = (want.*tensor)().data();
  if ((want.*has_tensor)()) (want.*mutable_tensor)()->clear_data();
  if (!google::protobuf::util::MessageDifferencer::Equals(got, want)) blockd::fuzz::Fail("the messages differ");
  if (data.size() != want_data.size()) blockd::fuzz::Fail("the tensor's size differs");
  std::string all(data.size(), '\0');
  data.CopyTo(all.data(), 0, all.size());
  if (all != want_data) blockd::fuzz::Fail("the tensor's bytes differ");
  if (all.size() > 2) {
    std::string mid(all.size() / 2, '\0');
    data.CopyTo(mid.data(), all.size() / 3, mid.size());
    if (mid != want_data.substr(all.size() / 3, mid.size())) blockd::fuzz::Fail("a gathered range differs");
  }
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  google::protobuf::SetLogHandler(nullptr);  // protobuf's complaints about invalid UTF-8
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const std::string bytes(reinterpret_cast<const char*>(data) + 1, size - 1);
  const grpc::ByteBuffer wire = Cut(bytes, data[0]);
  using blockd::v1::BackwardRequest;
  using blockd::v1::ForwardRequest;
  Compare<ForwardRequest>(bytes, wire, ForwardRequest::kInputFieldNumber, &ForwardRequest::input,
                          &ForwardRequest::mutable_input, &ForwardRequest::has_input);
  Compare<BackwardRequest>(bytes, wire, BackwardRequest::kGradOutputFieldNumber, &BackwardRequest::grad_output,
                           &BackwardRequest::mutable_grad_output, &BackwardRequest::has_grad_output);
  return 0;
}
