// One call's activation tensor in and out, inline (bytes in the message) or through a
// shared-memory region slice (server/shared_memory.h): what Forward, Backward and InferStep share.
// With `cuda_ipc` (Forward, Backward) a slice of a CUDA IPC region goes to the engine as peer
// memory (TensorArg::peer, TensorOut::peer), which the backend reads and writes device to device;
// without it such a slice is refused (InferStep batches steps through host buffers).
//
//   TensorTransport io(shared_memory_.get(), metrics_, reactor->client(), /*cuda_ipc=*/true);
//   ASSIGN_OR_RETURN(args.input, io.Input(req->input(), "input"));
//   RETURN_IF_ERROR(io.PrepareOutput(OutputRefOf(*req), "output_shared_memory", need, resp->mutable_output(), &out.output));
//   RETURN_IF_ERROR(engine_->Forward(args, &out));
//   RETURN_IF_ERROR(io.FinishOutput());  // writes the region, or counts the inline bytes
//
// Every check that can refuse the call (the region, its bounds, an output slice large enough for
// an output of the input's size, an object not truncated) runs in Input and PrepareOutput, before
// the engine changes anything. FinishOutput fails only if the kernel cannot write the object
// (tmpfs out of memory).
#pragma once

#include <string>

#include "absl/status/statusor.h"
#include "blockd/v1/block_service.pb.h"
#include "engine/engine.h"
#include "server/metrics.h"
#include "server/shared_memory.h"

namespace blockd {

class TensorTransport {
 public:
  // `shm` may be null (no registry): every reference is then refused as shared memory being off.
  TensorTransport(SharedMemoryRegistry* shm, Metrics* metrics, std::string client, bool cuda_ipc = false)
      : shm_(shm), metrics_(metrics), client_(std::move(client)), cuda_ipc_(cuda_ipc) {}

  // The request tensor: a view of its inline bytes, a copy of its POSIX region slice, or its CUDA
  // IPC slice as peer memory.
  absl::StatusOr<TensorArg> Input(const v1::Tensor& t, absl::string_view what);
  // Where the engine writes the output (sets out->data, or out->peer). With `ref` set (the
  // request's output_shared_memory), checks the slice can take `need` bytes (the output has the
  // input's shape and dtype) and stages the output for FinishOutput (a POSIX slice) or routes it
  // to the device memory (a CUDA IPC slice); else the reply tensor's own bytes.
  absl::Status PrepareOutput(const v1::SharedMemoryRef* ref, absl::string_view what, int64_t need, v1::Tensor* reply,
                             TensorOut* out);
  absl::Status FinishOutput();
  bool output_in_shared_memory() const { return out_ref_ != nullptr; }

 private:
  absl::Status CudaIpcAllowed(const PeerMemory* peer, absl::string_view what) const;

  SharedMemoryRegistry* shm_;
  Metrics* metrics_;
  std::string client_;
  bool cuda_ipc_;
  std::string in_copy_;
  std::shared_ptr<PeerMemory> in_peer_, out_peer_;  // held for the call: an Unregister meanwhile waits
  std::string out_staging_;
  const v1::SharedMemoryRef* out_ref_ = nullptr;
  std::string out_what_;
  int64_t out_bytes_ = 0;
  v1::Tensor* reply_ = nullptr;
};

// The request's output slice when it names one, else null.
template <class Request>
const v1::SharedMemoryRef* OutputRefOf(const Request& req) {
  return req.has_output_shared_memory() ? &req.output_shared_memory() : nullptr;
}

}  // namespace blockd
