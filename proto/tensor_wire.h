// Forward and Backward messages with their tensor's bytes kept out of protobuf, for the daemon
// (server/service.cc) and the C++ client (client/client.cc) alike. A 34 MB activation parsed
// into a `bytes` field is copied once more than it needs to be (gRPC's slices into a string), and
// serialising one copies it again (the string into a slice); on the GPU host each such copy costs
// ~6 ms of a core and faults pages in. Here a received message's tensor bytes stay in gRPC's
// slices, to be gathered straight into where they are used (the daemon's pinned staging), and a
// message to send carries them as a slice of a buffer that already holds them.
//
// The wire format is protobuf's: every other client and server reads and writes these messages
// as plain ForwardRequest, ForwardResponse, BackwardRequest and BackwardResponse.
//
//   v1::ForwardRequest req;
//   WireBytes input;
//   RETURN_IF_ERROR(ParseWithTensorBytes(wire, v1::ForwardRequest::kInputFieldNumber, &req, &input));
//   // req.input() has dtype, shape, shared_memory; its data() is empty, its bytes are in `input`.
//   input.CopyTo(staging, 0, input.size());
//
//   grpc::ByteBuffer reply = SerializeWithTensorBytes(resp, v1::ForwardResponse::kOutputFieldNumber,
//                                                     output_meta, std::move(output_bytes));
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include <google/protobuf/message.h>
#include <grpcpp/support/byte_buffer.h>
#include <grpcpp/support/slice.h>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "blockd/v1/block_service.pb.h"

namespace blockd {

// A tensor's bytes as they arrived: pieces of the received message's slices, which this holds.
class WireBytes {
 public:
  size_t size() const { return size_; }
  // Whether the message set the field at all (an empty `data` on the wire counts).
  bool present() const { return present_; }
  // The bytes when they lie in one piece, else nullptr.
  const char* contiguous() const;
  // Copies n bytes starting `from` into dst (from + n <= size()), over a few threads when large.
  void CopyTo(void* dst, size_t from, size_t n) const;

 private:
  friend class TensorWireParser;
  std::vector<grpc::Slice> slices_;  // held: the pieces point into them
  std::vector<absl::string_view> pieces_;
  std::vector<size_t> starts_;  // each piece's offset into the tensor, for CopyTo's first piece
  size_t size_ = 0;
  bool present_ = false;
};

// Parses `wire` into *msg, except the `data` of the v1::Tensor in msg's field `tensor_field`,
// whose bytes go to *data instead (msg's data stays empty). Field for field what protobuf's
// ParseFromString gives (a tensor field sent twice merges, its last data wins).
// INVALID_ARGUMENT when the bytes do not parse as that message.
absl::Status ParseWithTensorBytes(const grpc::ByteBuffer& wire, int tensor_field, google::protobuf::Message* msg,
                                  WireBytes* data);

// `msg` (whose field `tensor_field` is unset) with `tensor` (whose data is empty) in that field
// and `data` as the tensor's bytes, which are not copied: the buffer holds the slice.
grpc::ByteBuffer SerializeWithTensorBytes(const google::protobuf::Message& msg, int tensor_field,
                                          const v1::Tensor& tensor, grpc::Slice data);

// A slice of `n` bytes, uninitialised, for SerializeWithTensorBytes; and one that owns `bytes`
// (moved in, not copied).
grpc::Slice UninitializedSlice(size_t n);
grpc::Slice SliceOwning(std::string bytes);
// The writable start of a slice made by UninitializedSlice.
inline char* MutableSliceData(const grpc::Slice& s) {
  return reinterpret_cast<char*>(const_cast<uint8_t*>(s.begin()));
}

}  // namespace blockd
