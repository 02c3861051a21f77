// Shared-memory tensors: the RegisterSharedMemory, UnregisterSharedMemory and ListSharedMemory
// RPCs of BlockServiceImpl, and TensorTransport, through which Forward, Backward and InferStep take
// their activation tensors inline or from a region. Regions belong to the caller's identity
// (reactor->client()), as activation handles and sessions do, and need the read role.
#include "server/shared_memory_transport.h"

#include "absl/strings/str_cat.h"
#include "base/parallel_copy.h"
#include "base/status_macros.h"
#include "server/convert.h"
#include "server/service_internal.h"

namespace blockd {
namespace {

SharedMemorySlice SliceOf(const v1::SharedMemoryRef& ref) { return {ref.region(), ref.offset(), ref.byte_size()}; }

void ToProto(const SharedMemoryRegionInfo& info, v1::SharedMemoryRegion* out) {
  out->set_name(info.name);
  out->set_key(info.key);
  out->set_byte_size(info.byte_size);
  out->set_offset(info.offset);
  out->set_idle_seconds(absl::ToDoubleSeconds(info.idle));
  out->set_expires_in_seconds(absl::ToDoubleSeconds(info.expires_in));
  out->set_cuda_ipc(info.cuda_ipc);
  out->set_device(info.device);
}

}  // namespace

absl::Status TensorTransport::CudaIpcAllowed(const SharedMemoryTarget& target, absl::string_view what) const {
  if (!target.cuda_ipc || direct_) return absl::OkStatus();
  return absl::FailedPreconditionError(absl::StrCat(
      what, " names a CUDA IPC region, which only Forward and Backward tensors may: use a POSIX region or inline bytes"));
}

absl::StatusOr<TensorArg> TensorTransport::Input(const v1::Tensor& t, absl::string_view what, const WireBytes* wire) {
  ASSIGN_OR_RETURN(TensorArg arg, TensorArgOf(t, what));
  const size_t inline_bytes = wire != nullptr ? wire->size() : t.data().size();
  if (!t.has_shared_memory()) {
    if (wire != nullptr) {
      arg.size = wire->size();
      arg.data = wire->contiguous();
      if (arg.data == nullptr) {
        arg.read = [wire](void* dst, size_t from, size_t n) {
          if (from > wire->size() || n > wire->size() - from) {
            return absl::InternalError(absl::StrCat("read of ", n, " bytes at ", from, " of a ", wire->size(), "-byte tensor"));
          }
          wire->CopyTo(dst, from, n);
          return absl::OkStatus();
        };
      }
    }
    metrics_->tensor_bytes_inline_in->Increment(static_cast<double>(arg.size));
    return arg;
  }
  if (inline_bytes != 0) {
    return absl::InvalidArgumentError(absl::StrCat(what, " carries both ", inline_bytes,
                                                   " bytes of data and a shared_memory reference: set one of them"));
  }
  const std::string field = absl::StrCat(what, ".shared_memory");
  if (shm_ == nullptr) return absl::FailedPreconditionError(absl::StrCat(field, ": shared-memory tensors are off"));
  const SharedMemorySlice slice = SliceOf(t.shared_memory());
  ASSIGN_OR_RETURN(const SharedMemoryTarget target, shm_->Open(client_, slice, field));
  RETURN_IF_ERROR(CudaIpcAllowed(target, field));
  arg.data = nullptr;
  arg.size = static_cast<size_t>(slice.byte_size);
  if (direct_ && target.dma != nullptr) {  // by DMA: CUDA IPC, or a pinned POSIX region
    in_peer_ = target.dma;
    arg.peer = in_peer_.get();
    arg.peer_offset = target.dma_offset;
  } else if (direct_) {
    // Read by the engine into its staging; an object that shrinks after Open's check reads short
    // there, and is refused as well.
    arg.read = [this, slice](void* dst, size_t from, size_t n) {
      return shm_->ReadAt(client_, slice, "shared_memory", static_cast<int64_t>(from), dst, n);
    };
  } else {
    RETURN_IF_ERROR(shm_->Read(client_, slice, field, &in_copy_));
    arg.data = in_copy_.data();
  }
  (target.cuda_ipc ? metrics_->tensor_bytes_ipc_in : metrics_->tensor_bytes_shm_in)
      ->Increment(static_cast<double>(arg.size));
  return arg;
}

absl::Status TensorTransport::PrepareOutput(const v1::SharedMemoryRef* ref, absl::string_view what, int64_t need,
                                            v1::Tensor* reply, TensorOut* out, bool wire_out) {
  reply_ = reply;
  out->data = reply->mutable_data();
  if (ref == nullptr && wire_out) {
    out_wire_ = true;
    out->data = nullptr;
    out->write = [this, need](const void* src, size_t from, size_t n) {
      if (out_slice_.size() == 0) out_slice_ = UninitializedSlice(static_cast<size_t>(need));
      if (from > out_slice_.size() || n > out_slice_.size() - from) {
        return absl::InternalError(absl::StrCat("the output's write of ", n, " bytes at ", from, " passes its ", need, " bytes"));
      }
      ParallelCopy(MutableSliceData(out_slice_) + from, src, n);
      out_written_ += static_cast<int64_t>(n);
      return absl::OkStatus();
    };
  }
  if (ref == nullptr) return absl::OkStatus();
  if (shm_ == nullptr) return absl::FailedPreconditionError(absl::StrCat(what, ": shared-memory tensors are off"));
  ASSIGN_OR_RETURN(const SharedMemoryTarget target, shm_->Open(client_, SliceOf(*ref), what));
  if (ref->byte_size() < need) {
    return absl::InvalidArgumentError(absl::StrCat(what, ".byte_size = ", ref->byte_size(), ", the output needs ", need,
                                                   " bytes (the input's shape and dtype)"));
  }
  RETURN_IF_ERROR(CudaIpcAllowed(target, what));
  out_ref_ = ref;
  out_what_ = std::string(what);
  out_bytes_ = need;
  out_ipc_ = target.cuda_ipc;
  if (direct_ && target.dma != nullptr) {  // by DMA: CUDA IPC, or a pinned POSIX region
    out_peer_ = target.dma;
    out->peer = out_peer_.get();
    out->peer_offset = target.dma_offset;
  } else if (direct_) {
    out->write = [this](const void* src, size_t from, size_t n) {
      out_written_ += static_cast<int64_t>(n);
      return shm_->WriteAt(client_, SliceOf(*out_ref_), out_what_, static_cast<int64_t>(from), src, n);
    };
  } else {
    out->data = &out_staging_;
  }
  return absl::OkStatus();
}

absl::Status TensorTransport::FinishOutput() {
  if (out_wire_ && out_written_ != static_cast<int64_t>(out_slice_.size())) {
    return absl::InternalError(absl::StrCat("the engine wrote ", out_written_, " of the output's ", out_slice_.size(), " bytes"));
  }
  if (out_ref_ == nullptr) {
    metrics_->tensor_bytes_inline_out->Increment(
        static_cast<double>(out_wire_ ? out_written_ : static_cast<int64_t>(reply_->data().size())));
    return absl::OkStatus();
  }
  int64_t written = out_bytes_;  // by DMA: the engine wrote all of it
  if (!direct_) {
    RETURN_IF_ERROR(shm_->Write(client_, SliceOf(*out_ref_), out_what_, out_staging_));
    written = static_cast<int64_t>(out_staging_.size());
  } else if (out_peer_ == nullptr) {
    written = out_written_;
  }
  (out_ipc_ ? metrics_->tensor_bytes_ipc_out : metrics_->tensor_bytes_shm_out)->Increment(static_cast<double>(written));
  v1::SharedMemoryRef* at = reply_->mutable_shared_memory();
  at->set_region(out_ref_->region());
  at->set_offset(out_ref_->offset());
  at->set_byte_size(written);
  return absl::OkStatus();
}

grpc::ServerUnaryReactor* BlockServiceImpl::RegisterSharedMemory(grpc::CallbackServerContext* ctx,
                                                                 const v1::RegisterSharedMemoryRequest* req,
                                                                 v1::RegisterSharedMemoryResponse* resp) {
  return Unary(ctx, "RegisterSharedMemory", *req, resp, Work::kPool, Role::kRead,
               [this, req, resp](UnaryReactor* reactor) -> absl::Status {
    if (!req->cuda_ipc_handle().empty() && !req->key().empty()) {
      return absl::InvalidArgumentError("key and cuda_ipc_handle are both set: a region is POSIX or CUDA IPC, set one");
    }
    ASSIGN_OR_RETURN(SharedMemoryRegionInfo info,
                     req->cuda_ipc_handle().empty()
                         ? shared_memory_->Register(reactor->client(), req->name(), req->key(), req->byte_size(),
                                                    req->offset())
                         : shared_memory_->RegisterCudaIpc(reactor->client(), req->name(), req->device(),
                                                           req->cuda_ipc_handle(), req->cuda_ipc_event_handle(),
                                                           req->byte_size(), req->offset()));
    ToProto(info, resp->mutable_region());
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* BlockServiceImpl::UnregisterSharedMemory(grpc::CallbackServerContext* ctx,
                                                                   const v1::UnregisterSharedMemoryRequest* req,
                                                                   v1::UnregisterSharedMemoryResponse* resp) {
  return Unary(ctx, "UnregisterSharedMemory", *req, resp, Work::kInline, Role::kRead,
               [this, req](UnaryReactor* reactor) { return shared_memory_->Unregister(reactor->client(), req->name()); });
}

grpc::ServerUnaryReactor* BlockServiceImpl::ListSharedMemory(grpc::CallbackServerContext* ctx,
                                                             const v1::ListSharedMemoryRequest* req,
                                                             v1::ListSharedMemoryResponse* resp) {
  return Unary(ctx, "ListSharedMemory", *req, resp, Work::kInline, Role::kRead,
               [this, resp](UnaryReactor* reactor) -> absl::Status {
    for (const SharedMemoryRegionInfo& info : shared_memory_->List(reactor->client())) {
      ToProto(info, resp->add_regions());
    }
    return absl::OkStatus();
  });
}

void BlockServiceImpl::FillSharedMemoryInfo(v1::SharedMemoryInfo* out) const {
  const SharedMemoryOptions& o = shared_memory_->options();
  out->set_allowed(o.allowed);
  out->set_max_regions_per_client(o.max_regions_per_client);
  out->set_max_bytes_per_client(o.max_bytes_per_client);
  out->set_ttl_seconds(absl::ToDoubleSeconds(o.ttl));
  out->set_max_tensor_bytes(o.max_tensor_bytes);
}

}  // namespace blockd
