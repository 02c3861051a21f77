// blockd.v1.BlockService on gRPC's callback API: each RPC is a short function that validates the
// request, runs the engine call on the worker pool, and finishes with the converted status.
// Admission (draining, the concurrent-RPC limit, expired deadlines, auth) is decided in one place,
// Admit(), for every RPC, against the Access the RPC declares; Call records every RPC's metrics.
//
//   BlockServiceImpl service(&engine, metrics.get(), &pool, options);
//   builder.RegisterService(&service);
#pragma once

#include <atomic>
#include <memory>
#include <string>

#include "blockd/v1/block_service.grpc.pb.h"
#include "engine/engine.h"
#include "server/auth.h"
#include "server/metrics.h"
#include "server/thread_pool.h"

namespace blockd {

struct ServiceOptions {
  std::string version;
  std::string backend_reason;
  std::string attention_backend, attention_reason;  // GetServerInfo's, from SelectBackend
  int64_t max_message_bytes = 256 << 20;
  int64_t max_concurrent_rpcs = 256;
  int64_t default_chunk_bytes = 1 << 20;
  int64_t max_chunk_bytes = 4 << 20;
};

// What an RPC asks of its caller's credentials. Each RPC names one value where it is defined
// (service.cc), and Admit() alone maps it onto the Authenticator: finer roles (read/train/admin)
// become new values here and a new branch there, without touching the RPCs.
enum class Access {
  kUser,   // any valid token: compute on blocks, read them
  kAdmin,  // an admin token when an admin token file is set: create, load, delete, checkpoints
};

class Checkpointer;

class BlockServiceImpl final : public v1::BlockService::CallbackService {
 public:
  BlockServiceImpl(Engine* engine, Metrics* metrics, ThreadPool* pool, const Authenticator* auth,
                   Checkpointer* checkpointer, ServiceOptions options);

  // New RPCs get UNAVAILABLE while draining; those in flight finish.
  void SetDraining() { draining_ = true; }
  int64_t inflight() const { return inflight_; }

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
  grpc::ServerUnaryReactor* Forward(grpc::CallbackServerContext* ctx, const v1::ForwardRequest* req,
                                    v1::ForwardResponse* resp) override;
  grpc::ServerUnaryReactor* Backward(grpc::CallbackServerContext* ctx, const v1::BackwardRequest* req,
                                     v1::BackwardResponse* resp) override;
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

 private:
  class Call;
  class UnaryReactor;
  class LoadWeightsReactor;
  class DownloadReactor;
  friend class Call;
  friend class UnaryReactor;
  friend class LoadWeightsReactor;
  friend class DownloadReactor;

  enum class Work { kInline, kPool };
  // Admits the call (or finishes it with the reason), runs `fn` inline or on the pool, and
  // finishes the reactor with fn's status. `fn` may take the UnaryReactor* to register what to
  // undo if the reply never arrives.
  template <class Fn>
  grpc::ServerUnaryReactor* Unary(grpc::CallbackServerContext* ctx, const char* method,
                                  const google::protobuf::Message& req, const google::protobuf::Message* resp,
                                  Work work, Access access, Fn fn);
  // The admission decision shared by unary and streaming RPCs.
  absl::Status Admit(grpc::CallbackServerContext* ctx, Access access);
  // Who asks: the auth identity, else the `blockd-client` metadata, else the peer's address.
  std::string ClientOf(grpc::CallbackServerContext* ctx) const;

  Engine* engine_;
  Metrics* metrics_;
  ThreadPool* pool_;
  const Authenticator* auth_;
  Checkpointer* checkpointer_;
  ServiceOptions options_;
  std::atomic<bool> draining_{false};
  std::atomic<int64_t> inflight_{0};
};

}  // namespace blockd
