// blockd.v1.BlockService on gRPC's callback API: each RPC is a short function that validates the
// request, runs the engine call on the worker pool, and finishes with the converted status.
// Admission (draining, expired deadlines, who the caller is and whether its role allows the RPC,
// the concurrency limits) and metrics are applied in one place, Call::Admit, for every RPC.
// Authentication itself happened earlier, on the request headers (server/credentials.h).
//
//   BlockServiceImpl service(&engine, metrics.get(), &pool, options);
//   builder.RegisterService(&service);
#pragma once

#include <atomic>
#include <memory>
#include <string>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

#include "blockd/v1/block_service.grpc.pb.h"
#include "engine/engine.h"
#include "server/auth.h"
#include "server/metrics.h"
#include "server/shared_memory.h"
#include "server/stream_watchdog.h"
#include "server/thread_pool.h"

namespace blockd {

struct ServiceOptions {
  std::string version;
  std::string backend_reason;
  std::string attention_backend, attention_reason;  // GetServerInfo's, from SelectBackend
  int64_t max_message_bytes = 256 << 20;
  int64_t max_concurrent_rpcs = 256;
  // Calls one identity may have in flight; 0: max(1, max_concurrent_rpcs / 4), so a client that
  // stalls its calls cannot take every slot. The last max(1, max_concurrent_rpcs / 8) slots are
  // kept for admin callers when roles are in force.
  int64_t max_concurrent_rpcs_per_client = 0;
  // LoadWeights/DownloadTensors streams that make no progress for this long, or run longer than
  // the second, are ended with DEADLINE_EXCEEDED (zero: off).
  absl::Duration stream_idle_timeout = absl::Seconds(60);
  absl::Duration stream_max_duration = absl::Minutes(30);
  // Callers are identified by their credential (a token's principal, a client certificate's CN).
  // False: by the peer's address and the advisory `blockd-client` metadata.
  bool identity_from_credentials = false;
  int64_t default_chunk_bytes = 1 << 20;
  int64_t max_chunk_bytes = 4 << 20;
  // Shared-memory tensors of same-host clients (--allow_shared_memory and its caps);
  // max_tensor_bytes is set from max_message_bytes.
  SharedMemoryOptions shared_memory;
};

class Checkpointer;

// Forward and Backward take and give raw messages (proto/tensor_wire.h): their activation bytes
// go between gRPC's slices and the engine's staging without passing through protobuf.
using BlockServiceBase = v1::BlockService::WithRawCallbackMethod_Forward<
    v1::BlockService::WithRawCallbackMethod_Backward<v1::BlockService::CallbackService>>;

class BlockServiceImpl final : public BlockServiceBase {
 public:
  BlockServiceImpl(Engine* engine, Metrics* metrics, ThreadPool* pool, const Authenticator* auth,
                   Checkpointer* checkpointer, ServiceOptions options);

  // New RPCs get UNAVAILABLE while draining; those in flight finish. Open Infer streams end with
  // UNAVAILABLE once the step they are running (if any) has been answered.
  void SetDraining() {
    draining_ = true;
    EndInferStreams();
  }
  int64_t inflight() const { return inflight_; }
  // The shared-memory regions (expired by the server's housekeeping; closed with the service).
  SharedMemoryRegistry& shared_memory() { return *shared_memory_; }

  grpc::ServerUnaryReactor* GetServerInfo(grpc::CallbackServerContext* ctx, const v1::GetServerInfoRequest* req,
                                          v1::GetServerInfoResponse* resp) override;
  grpc::ServerUnaryReactor* CreateBlock(grpc::CallbackServerContext* ctx, const v1::CreateBlockRequest* req,
                                        v1::BlockInfo* resp) override;
  grpc::ServerReadReactor<v1::TensorChunk>* LoadWeights(grpc::CallbackServerContext* ctx,
                                                         v1::LoadWeightsResponse* resp) override;
  grpc::ServerUnaryReactor* ListBlocks(grpc::CallbackServerContext* ctx, const v1::ListBlocksRequest* req,
                                       v1::ListBlocksResponse* resp) override;
  grpc::ServerUnaryReactor* GetBlock(grpc::CallbackServerContext* ctx, const v1::GetBlockRequest* req,
                                     v1::BlockInfo* resp) override;
  grpc::ServerUnaryReactor* DeleteBlock(grpc::CallbackServerContext* ctx, const v1::DeleteBlockRequest* req,
                                        v1::DeleteBlockResponse* resp) override;
  grpc::ServerUnaryReactor* Forward(grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* wire,
                                    grpc::ByteBuffer* reply) override;
  grpc::ServerUnaryReactor* Backward(grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* wire,
                                     grpc::ByteBuffer* reply) override;
  grpc::ServerUnaryReactor* ReleaseActivations(grpc::CallbackServerContext* ctx,
                                               const v1::ReleaseActivationsRequest* req,
                                               v1::ReleaseActivationsResponse* resp) override;
  grpc::ServerUnaryReactor* ZeroGrad(grpc::CallbackServerContext* ctx, const v1::ZeroGradRequest* req,
                                     v1::ZeroGradResponse* resp) override;
  grpc::ServerUnaryReactor* Step(grpc::CallbackServerContext* ctx, const v1::StepRequest* req,
                                 v1::StepResponse* resp) override;
  grpc::ServerWriteReactor<v1::TensorChunk>* DownloadTensors(grpc::CallbackServerContext* ctx,
                                                             const v1::DownloadTensorsRequest* req) override;
  grpc::ServerUnaryReactor* SaveCheckpoint(grpc::CallbackServerContext* ctx, const v1::SaveCheckpointRequest* req,
                                           v1::SaveCheckpointResponse* resp) override;
  grpc::ServerUnaryReactor* RestoreCheckpoint(grpc::CallbackServerContext* ctx,
                                              const v1::RestoreCheckpointRequest* req,
                                              v1::RestoreCheckpointResponse* resp) override;
  // Inference sessions (service_sessions.cc).
  grpc::ServerUnaryReactor* OpenSession(grpc::CallbackServerContext* ctx, const v1::OpenSessionRequest* req,
                                        v1::SessionInfo* resp) override;
  grpc::ServerUnaryReactor* InferStep(grpc::CallbackServerContext* ctx, const v1::InferStepRequest* req,
                                      v1::InferStepResponse* resp) override;
  grpc::ServerBidiReactor<v1::InferStepRequest, v1::InferStepResponse>* Infer(
      grpc::CallbackServerContext* ctx) override;
  grpc::ServerUnaryReactor* TrimSession(grpc::CallbackServerContext* ctx, const v1::TrimSessionRequest* req,
                                        v1::SessionInfo* resp) override;
  grpc::ServerUnaryReactor* ForkSession(grpc::CallbackServerContext* ctx, const v1::ForkSessionRequest* req,
                                        v1::SessionInfo* resp) override;
  grpc::ServerUnaryReactor* CloseSession(grpc::CallbackServerContext* ctx, const v1::CloseSessionRequest* req,
                                         v1::CloseSessionResponse* resp) override;
  grpc::ServerUnaryReactor* ListSessions(grpc::CallbackServerContext* ctx, const v1::ListSessionsRequest* req,
                                         v1::ListSessionsResponse* resp) override;
  // Replica groups (service_groups.cc).
  grpc::ServerUnaryReactor* GetCollectiveId(grpc::CallbackServerContext* ctx, const v1::GetCollectiveIdRequest* req,
                                            v1::GetCollectiveIdResponse* resp) override;
  grpc::ServerUnaryReactor* JoinGroup(grpc::CallbackServerContext* ctx, const v1::JoinGroupRequest* req,
                                      v1::GroupInfo* resp) override;
  grpc::ServerUnaryReactor* LeaveGroup(grpc::CallbackServerContext* ctx, const v1::LeaveGroupRequest* req,
                                       v1::LeaveGroupResponse* resp) override;
  grpc::ServerUnaryReactor* GetGroup(grpc::CallbackServerContext* ctx, const v1::GetGroupRequest* req,
                                     v1::GroupInfo* resp) override;
  grpc::ServerUnaryReactor* ListGroups(grpc::CallbackServerContext* ctx, const v1::ListGroupsRequest* req,
                                       v1::ListGroupsResponse* resp) override;
  grpc::ServerUnaryReactor* GradNorm(grpc::CallbackServerContext* ctx, const v1::GradNormRequest* req,
                                     v1::GradNormResponse* resp) override;
  // Shared-memory tensors (service_shared_memory.cc).
  grpc::ServerUnaryReactor* RegisterSharedMemory(grpc::CallbackServerContext* ctx,
                                                 const v1::RegisterSharedMemoryRequest* req,
                                                 v1::RegisterSharedMemoryResponse* resp) override;
  grpc::ServerUnaryReactor* UnregisterSharedMemory(grpc::CallbackServerContext* ctx,
                                                   const v1::UnregisterSharedMemoryRequest* req,
                                                   v1::UnregisterSharedMemoryResponse* resp) override;
  grpc::ServerUnaryReactor* ListSharedMemory(grpc::CallbackServerContext* ctx, const v1::ListSharedMemoryRequest* req,
                                             v1::ListSharedMemoryResponse* resp) override;

 private:
  class Call;
  class UnaryReactor;
  class LoadWeightsReactor;
  class DownloadReactor;
  class InferReactor;
  friend class Call;
  friend class UnaryReactor;
  friend class LoadWeightsReactor;
  friend class DownloadReactor;
  friend class InferReactor;
  // Ends every open Infer stream for draining (service_sessions.cc).
  void EndInferStreams();
  // One inference step from a request, shared by InferStep and the Infer stream.
  absl::Status RunInferStep(const v1::InferStepRequest& req, const std::string& client, v1::InferStepResponse* resp);
  void FillSharedMemoryInfo(v1::SharedMemoryInfo* out) const;

  enum class Work { kInline, kPool };
  // Admits the call (or finishes it with the reason), runs `fn` inline or on the pool, and
  // finishes the reactor with fn's status. The caller's role must include `needed`.
  // `fn` may take the UnaryReactor* to register what to undo if the reply never arrives, and to
  // learn who the caller is. The request and the reply are messages, or raw ones (grpc::ByteBuffer).
  template <class Req, class Resp, class Fn>
  grpc::ServerUnaryReactor* Unary(grpc::CallbackServerContext* ctx, const char* method, const Req& req,
                                  const Resp* resp, Work work, Role needed, Fn fn);
  // Who asks: the credential's principal when there is one; else the peer's address, with the
  // advisory `blockd-client` name after it ("ipv4:10.0.0.7/alice"), and every role.
  absl::StatusOr<Principal> Identify(grpc::CallbackServerContext* ctx) const;
  // Takes a concurrency slot for `who`, or says which limit is full.
  absl::Status TakeSlot(const Principal& who);
  void ReleaseSlot(const std::string& client);

  Engine* engine_;
  Metrics* metrics_;
  ThreadPool* pool_;
  const Authenticator* auth_;
  Checkpointer* checkpointer_;
  ServiceOptions options_;
  int64_t per_client_limit_ = 0;
  int64_t admin_reserve_ = 0;
  std::unique_ptr<StreamWatchdog> watchdog_;
  std::unique_ptr<SharedMemoryRegistry> shared_memory_;
  std::atomic<bool> draining_{false};
  std::atomic<int64_t> inflight_{0};
  absl::Mutex slots_mu_;
  int64_t admitted_ ABSL_GUARDED_BY(slots_mu_) = 0;
  absl::flat_hash_map<std::string, int64_t> per_client_ ABSL_GUARDED_BY(slots_mu_);
  absl::Mutex infer_mu_;  // taken before an InferReactor's own lock, never after
  absl::flat_hash_set<InferReactor*> infer_streams_ ABSL_GUARDED_BY(infer_mu_);
};

}  // namespace blockd
