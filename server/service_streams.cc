// The streaming RPCs of BlockServiceImpl: LoadWeights (client stream) and DownloadTensors (server
// stream). Both are watched by the StreamWatchdog: a stream that stalls is ended with
// DEADLINE_EXCEEDED and frees what it holds.
#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "base/echo.h"
#include "server/convert.h"
#include "server/service_internal.h"

namespace blockd {

// LoadWeights: chunks are validated and staged as they arrive; the block changes only when the
// whole stream was good.
class BlockServiceImpl::LoadWeightsReactor : public grpc::ServerReadReactor<v1::TensorChunk> {
 public:
  LoadWeightsReactor(BlockServiceImpl* service, grpc::CallbackServerContext* ctx, v1::LoadWeightsResponse* resp)
      : service_(service), ctx_(ctx), resp_(resp), call_(service, "LoadWeights") {
    absl::Status admitted = call_.Admit(ctx, Role::kAdmin);
    if (!admitted.ok()) {
      Finish(call_.Finish(ToGrpcStatus(admitted)));
      return;
    }
    watch_ = service_->watchdog_->Add(ctx, "LoadWeights");
    StartRead(&chunk_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {
      std::string why;
      if (service_->watchdog_->Expired(watch_, &why)) {
        assembler_.reset();  // the staged tensors go now, not when gRPC gets to OnDone
        service_->metrics_->streams_expired->Increment();
        Finish(call_.Finish(grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED, why)));
        return;
      }
      if (ctx_->IsCancelled()) {
        Finish(call_.Finish(grpc::Status(grpc::StatusCode::CANCELLED, "the client cancelled the stream")));
        return;
      }
      // ok=false is also how a read ends when gRPC itself failed the stream, e.g. for a message
      // over the size limit, and IsCancelled() may not say so yet: committing then would apply
      // the chunks before the bad one while the client hears RESOURCE_EXHAUSTED. gRPC cancels the
      // call before it completes the read, so an operation started now fails on a failed stream
      // and succeeds only on a clean end of the stream: send the initial metadata as that probe.
      StartSendInitialMetadata();
      return;
    }
    service_->watchdog_->Touch(watch_);
    service_->metrics_->bytes_received->Increment(static_cast<double>(chunk_.ByteSizeLong()));
    auto take = [this] { return Take(); };
    absl::Status s = Guarded(take);
    if (!s.ok()) {
      Finish(call_.Finish(ToGrpcStatus(s)));
      return;
    }
    StartRead(&chunk_);
  }

  void OnSendInitialMetadataDone(bool ok) override {
    if (!ok) {
      Finish(call_.Finish(grpc::Status(grpc::StatusCode::CANCELLED, "the stream failed before it ended cleanly")));
      return;
    }
    // Committing a large block takes a while and is the server's own work, not a stall.
    service_->watchdog_->SetBusy(watch_, true);
    service_->pool_->Submit([this] {
      auto commit = [this] { return Commit(); };
      Finish(call_.Finish(ToGrpcStatus(Guarded(commit))));
    });
  }

  void OnDone() override {
    if (watch_ != 0) service_->watchdog_->Remove(watch_);
    delete this;
  }

 private:
  absl::Status Take() {
    if (chunk_.block_id().empty()) {
      return absl::InvalidArgumentError(absl::StrCat("chunk of tensor \"", Echo(chunk_.name()), "\" has no block_id"));
    }
    if (assembler_ == nullptr) {
      ASSIGN_OR_RETURN(std::vector<ParamSpec> params, service_->engine_->BlockParamsOf(chunk_.block_id()));
      block_id_ = chunk_.block_id();
      last_renewal_ = absl::Now();  // BlockParamsOf renewed the lease
      assembler_ = std::make_unique<TensorAssembler>(block_id_, std::move(params));
    } else if (chunk_.block_id() != block_id_) {
      return absl::InvalidArgumentError(absl::StrCat("chunk for block ", Echo(chunk_.block_id()), " in a LoadWeights stream for block ",
                                                     block_id_, ": one stream loads one block"));
    }
    // A stream may outlast the block's lease: renew it as chunks arrive, at most once a second
    // (a lookup per chunk would take the registry lock for nothing). A block gone meanwhile ends
    // the stream now rather than at the commit.
    const absl::Time now = absl::Now();
    if (now - last_renewal_ >= absl::Seconds(1)) {
      RETURN_IF_ERROR(service_->engine_->RenewLease(block_id_));
      last_renewal_ = now;
    }
    if (static_cast<int64_t>(chunk_.data().size()) > service_->options_.max_chunk_bytes) {
      return absl::InvalidArgumentError(absl::StrCat("chunk of ", chunk_.data().size(), " bytes exceeds the ",
                                                     service_->options_.max_chunk_bytes, "-byte chunk limit"));
    }
    ASSIGN_OR_RETURN(DType dtype, FromProto(chunk_.dtype(), absl::StrCat("tensor ", Echo(chunk_.name()), " dtype")));
    const std::vector<int64_t> shape(chunk_.shape().begin(), chunk_.shape().end());
    return assembler_->Add(chunk_.name(), dtype, shape, chunk_.offset(), chunk_.data().data(), chunk_.data().size());
  }

  absl::Status Commit() {
    if (assembler_ == nullptr) return absl::InvalidArgumentError("LoadWeights stream carried no chunks");
    ASSIGN_OR_RETURN(std::vector<AssembledTensor> tensors, assembler_->Finish());
    ASSIGN_OR_RETURN(std::vector<std::string> loaded, service_->engine_->LoadWeights(block_id_, std::move(tensors)));
    resp_->set_block_id(block_id_);
    for (const std::string& name : loaded) resp_->add_loaded(name);
    return absl::OkStatus();
  }

  BlockServiceImpl* service_;
  grpc::CallbackServerContext* ctx_;
  v1::LoadWeightsResponse* resp_;
  Call call_;
  uint64_t watch_ = 0;
  v1::TensorChunk chunk_;
  std::string block_id_;
  absl::Time last_renewal_;
  std::unique_ptr<TensorAssembler> assembler_;
};

grpc::ServerReadReactor<v1::TensorChunk>* BlockServiceImpl::LoadWeights(grpc::CallbackServerContext* ctx,
                                                                         v1::LoadWeightsResponse* resp) {
  return new LoadWeightsReactor(this, ctx, resp);
}

// DownloadTensors: one tensor at a time is read from the block (on the pool) and written chunk by
// chunk, so a stream holds one tensor, never a copy of the whole block: a client that reads one
// chunk and stalls holds at most its largest tensor until the watchdog ends the stream. Each tensor
// is read under the block's lock; a change between two of them (LoadWeights, Backward, ZeroGrad,
// Step, the block deleted and created again or restored) would mix two versions, so every read
// first checks, under that lock, that the tensors of the requested kind are still at the version
// seen at the start (engine/tensors_version.h), and the stream checks once more at its end: a
// change ends it with ABORTED, saying what changed, before another tensor is sent.
class BlockServiceImpl::DownloadReactor : public grpc::ServerWriteReactor<v1::TensorChunk> {
 public:
  DownloadReactor(BlockServiceImpl* service, grpc::CallbackServerContext* ctx, const v1::DownloadTensorsRequest* req)
      : service_(service), req_(req), call_(service, "DownloadTensors") {
    service_->metrics_->bytes_received->Increment(static_cast<double>(req->ByteSizeLong()));
    // Weights are for readers; gradients and AdamW moments are training state.
    const Role needed = req->kind() == v1::TENSOR_KIND_WEIGHTS ? Role::kRead : Role::kTrain;
    absl::Status admitted = call_.Admit(ctx, needed);
    if (!admitted.ok()) {
      Finish(call_.Finish(ToGrpcStatus(admitted)));
      return;
    }
    watch_ = service_->watchdog_->Add(ctx, "DownloadTensors");
    service_->watchdog_->SetBusy(watch_, true);
    service_->pool_->Submit([this] {
      auto start = [this] { return Start(); };
      absl::Status s = Guarded(start);
      if (!s.ok()) {
        Finish(call_.Finish(ToGrpcStatus(s)));
        return;
      }
      ReadNextTensor();
    });
  }

  void OnWriteDone(bool ok) override {
    if (!ok) {
      std::string why;
      tensor_ = NamedTensor();
      if (service_->watchdog_->Expired(watch_, &why)) {
        service_->metrics_->streams_expired->Increment();
        Finish(call_.Finish(grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED, why)));
      } else {
        Finish(call_.Finish(grpc::Status(grpc::StatusCode::CANCELLED, "the client went away")));
      }
      return;
    }
    service_->watchdog_->Touch(watch_);
    if (offset_ < tensor_.bytes.size()) {
      WriteNext();
      return;
    }
    tensor_ = NamedTensor();  // freed before the next one is read
    service_->watchdog_->SetBusy(watch_, true);
    service_->pool_->Submit([this] { ReadNextTensor(); });
  }

  void OnDone() override {
    if (watch_ != 0) service_->watchdog_->Remove(watch_);
    delete this;
  }

 private:
  // Validates the request and lists the tensors to send; nothing is read yet.
  absl::Status Start() {
    ASSIGN_OR_RETURN(kind_, FromProto(req_->kind()));
    if (req_->dtype() != v1::DTYPE_UNSPECIFIED) {
      ASSIGN_OR_RETURN(dtype_, FromProto(req_->dtype(), "dtype"));
    }
    chunk_bytes_ = req_->chunk_bytes() == 0 ? service_->options_.default_chunk_bytes : req_->chunk_bytes();
    if (chunk_bytes_ < 1024 || chunk_bytes_ > service_->options_.max_chunk_bytes) {
      return absl::InvalidArgumentError(absl::StrCat("chunk_bytes = ", chunk_bytes_, ", expected 1024..",
                                                     service_->options_.max_chunk_bytes, " (0: the default)"));
    }
    block_id_ = req_->block_id();
    ASSIGN_OR_RETURN(version_, service_->engine_->TensorsVersionOf(block_id_, kind_));
    // Checks the names (and that a frozen block has tensors of this kind) before anything is sent.
    ASSIGN_OR_RETURN(names_, service_->engine_->TensorNames(
                                 block_id_, kind_, std::vector<std::string>(req_->names().begin(), req_->names().end())));
    return absl::OkStatus();
  }

  // On the pool: reads the next tensor and starts writing it, or finishes the stream.
  void ReadNextTensor() {
    auto read = [this]() -> absl::Status {
      if (next_ < names_.size()) {
        ASSIGN_OR_RETURN(std::vector<NamedTensor> t,
                         service_->engine_->ReadTensors(block_id_, kind_, dtype_, {names_[next_]}, &version_));
        tensor_ = std::move(t.at(0));
        offset_ = 0;
        ++next_;
        return absl::OkStatus();
      }
      return service_->engine_->CheckTensorsVersion(block_id_, kind_, version_);
    };
    const bool last = next_ >= names_.size();
    absl::Status s = Guarded(read);
    if (!s.ok() || last) {
      Finish(call_.Finish(ToGrpcStatus(s)));
      return;
    }
    service_->watchdog_->SetBusy(watch_, false);
    WriteNext();
  }

  void WriteNext() {
    const size_t n = std::min<size_t>(static_cast<size_t>(chunk_bytes_), tensor_.bytes.size() - offset_);
    chunk_.Clear();
    chunk_.set_block_id(block_id_);
    chunk_.set_name(tensor_.name);
    chunk_.set_dtype(ToProto(tensor_.dtype));
    for (int64_t d : tensor_.shape) chunk_.add_shape(d);
    chunk_.set_offset(static_cast<int64_t>(offset_));
    chunk_.set_data(tensor_.bytes.data() + offset_, n);
    offset_ += n;
    service_->metrics_->bytes_sent->Increment(static_cast<double>(chunk_.ByteSizeLong()));
    StartWrite(&chunk_);
  }

  BlockServiceImpl* service_;
  const v1::DownloadTensorsRequest* req_;  // gRPC keeps it until OnDone
  Call call_;
  uint64_t watch_ = 0;
  TensorKind kind_ = TensorKind::kWeights;
  DType dtype_ = DType::kFloat32;
  int64_t chunk_bytes_ = 0;
  std::string block_id_;
  TensorsVersion version_;  // what the first read saw; every later read must see the same
  std::vector<std::string> names_;
  size_t next_ = 0;
  NamedTensor tensor_;  // the one being written
  size_t offset_ = 0;
  v1::TensorChunk chunk_;
};

grpc::ServerWriteReactor<v1::TensorChunk>* BlockServiceImpl::DownloadTensors(grpc::CallbackServerContext* ctx,
                                                                             const v1::DownloadTensorsRequest* req) {
  return new DownloadReactor(this, ctx, req);
}

}  // namespace blockd
