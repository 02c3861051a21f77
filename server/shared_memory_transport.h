// One call's activation tensor in and out, inline (bytes in the message) or through a
// shared-memory region slice (server/shared_memory.h): what Forward, Backward and InferStep share.
// With `direct` (Forward, Backward) the engine moves a slice's bytes itself: a CUDA IPC slice, and
// a POSIX slice whose region the registry pinned (a CUDA daemon), as peer memory (TensorArg::peer,
// TensorOut::peer) read and written by DMA; another POSIX slice through TensorArg::read and
// TensorOut::write, which pread and pwrite the region straight into and out of the backend's
// pinned staging. Without it a POSIX slice is copied here and a CUDA
// IPC slice is refused (InferStep batches steps through host buffers).
//
//   TensorTransport io(shared_memory_.get(), metrics_, reactor->client(), /*direct=*/true);
//   ASSIGN_OR_RETURN(args.input, io.Input(req->input(), "input"));
//   RETURN_IF_ERROR(io.PrepareOutput(OutputRefOf(*req), "output_shared_memory", need, resp->mutable_output(), &out.output));
//   RETURN_IF_ERROR(engine_->Forward(args, &out));
//   RETURN_IF_ERROR(io.FinishOutput());  // writes the region, or counts the inline bytes
//
// Every check that can refuse the call (the region, its bounds, an output slice large enough for
// an output of the input's size, an object not truncated) runs in Input and PrepareOutput, before
// the engine changes anything. Past them, only an object truncated meanwhile (its read comes up
// short, before the engine changes anything) and a kernel that cannot write the object (tmpfs out
// of memory, after) fail the call.
#pragma once

#include <string>

#include <grpcpp/support/slice.h>

#include "absl/status/statusor.h"
#include "blockd/v1/block_service.pb.h"
#include "engine/engine.h"
#include "proto/tensor_wire.h"
#include "server/metrics.h"
#include "server/shared_memory.h"

namespace blockd {

class TensorTransport {
 public:
  // `shm` may be null (no registry): every reference is then refused as shared memory being off.
  TensorTransport(SharedMemoryRegistry* shm, Metrics* metrics, std::string client, bool direct = false)
      : shm_(shm), metrics_(metrics), client_(std::move(client)), direct_(direct) {}
  // The engine's TensorArg::read and TensorOut::write point into this.
  TensorTransport(const TensorTransport&) = delete;
  TensorTransport& operator=(const TensorTransport&) = delete;

  // The request tensor: a view of its inline bytes, its POSIX region slice (read by the engine when
  // direct, else a copy), or its CUDA IPC slice as peer memory. With `wire` (a raw request's
  // tensor bytes, proto/tensor_wire.h; it outlives the call), the inline bytes are there: the
  // engine gathers them from gRPC's slices into its staging.
  absl::StatusOr<TensorArg> Input(const v1::Tensor& t, absl::string_view what, const WireBytes* wire = nullptr);
  // Where the engine writes the output (sets out->data, or out->peer). With `ref` set (the
  // request's output_shared_memory), checks the slice can take `need` bytes (the output has the
  // input's shape and dtype) and stages the output for FinishOutput (a POSIX slice) or routes it
  // to the device memory (a CUDA IPC slice) or, when direct, to the engine's own pwrite of a POSIX
  // slice; else the reply tensor's own bytes, or with `wire_out` a slice for a raw reply
  // (TakeWireOutput), written by the engine straight out of its staging.
  absl::Status PrepareOutput(const v1::SharedMemoryRef* ref, absl::string_view what, int64_t need, v1::Tensor* reply,
                             TensorOut* out, bool wire_out = false);
  absl::Status FinishOutput();
  // With wire_out and no region: the output's bytes, after FinishOutput.
  grpc::Slice TakeWireOutput() { return std::move(out_slice_); }
  bool output_in_shared_memory() const { return out_ref_ != nullptr; }

 private:
  absl::Status CudaIpcAllowed(const SharedMemoryTarget& target, absl::string_view what) const;

  SharedMemoryRegistry* shm_;
  Metrics* metrics_;
  std::string client_;
  bool direct_;
  std::string in_copy_;
  std::shared_ptr<PeerMemory> in_peer_, out_peer_;  // held for the call: an Unregister meanwhile waits
  std::string out_staging_;
  const v1::SharedMemoryRef* out_ref_ = nullptr;
  std::string out_what_;
  int64_t out_bytes_ = 0;
  int64_t out_written_ = 0;  // by the engine's pwrite (direct), or into out_slice_
  grpc::Slice out_slice_;    // wire_out: made at the engine's first write
  bool out_ipc_ = false;     // the output slice is CUDA IPC memory
  bool out_wire_ = false;
  v1::Tensor* reply_ = nullptr;
};

// The request's output slice when it names one, else null.
template <class Request>
const v1::SharedMemoryRef* OutputRefOf(const Request& req) {
  return req.has_output_shared_memory() ? &req.output_shared_memory() : nullptr;
}

}  // namespace blockd
