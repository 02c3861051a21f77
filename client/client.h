// blockd::Client: a typed C++ client for blockd.v1.BlockService (and grpc.health.v1).
//
// Every RPC of the wire contract is one method returning absl::Status / absl::StatusOr; a failed
// call carries the server's gRPC code and message unchanged (codes share google.rpc.Code
// numbering). The options cover what a deployment needs: a deadline for every call (overridable
// per call), the largest message, a bearer token, TLS with an optional client certificate (mTLS),
// and a `blockd-client` id that the server uses for per-client limits. LoadWeights takes whole
// tensors and cuts them into chunks on the stream; DownloadTensors puts the chunks back together
// into whole tensors and checks that every byte came exactly once. The client does not depend on
// the engine or the server.
//
//   ClientOptions o;
//   o.target = "localhost:50051";
//   o.token = "s3cret-token-of-16+chars";
//   ASSIGN_OR_RETURN(std::unique_ptr<Client> c, Client::Connect(o));
//   v1::CreateBlockRequest create;
//   create.set_block_id("b0");
//   *create.mutable_config() = config;
//   create.set_seed(7);
//   ASSIGN_OR_RETURN(v1::BlockInfo info, c->CreateBlock(create));
//   ASSIGN_OR_RETURN(v1::ForwardResponse y, c->Forward({"b0"}, wire::MakeTensor(v1::DTYPE_FLOAT32, {1, 8, 64}, x),
//                                                      /*keep_activations=*/true));
//   ASSIGN_OR_RETURN(v1::BackwardResponse dx, c->Backward(y.activation_id(), grad));
//   ASSIGN_OR_RETURN(std::vector<TensorBytes> w, c->DownloadTensors("b0", v1::TENSOR_KIND_WEIGHTS));
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "blockd/v1/block_service.grpc.pb.h"
#include "client/tensor_bytes.h"

namespace grpc {
class Channel;
class ClientContext;
class Status;
}  // namespace grpc

namespace blockd {

// How Forward, Backward and InferStep carry their tensors (ClientOptions::transport).
enum class Transport {
  kGrpc,          // inside the messages
  kAuto,          // through shared memory when the daemon is on this host and allows it, else inside
  kSharedMemory,  // through shared memory, or the call fails saying why not
};

struct ClientOptions {
  std::string target = "localhost:50051";
  // Deadline of every call, counted from its start; absl::InfiniteDuration() for none.
  absl::Duration timeout = absl::Seconds(60);
  // Largest message sent or received (the server has its own limit).
  int64_t max_message_bytes = 256 << 20;
  // Sent as `authorization: Bearer <token>` when not empty.
  std::string token = {};
  // Sent as `blockd-client` metadata when not empty: the server's per-client accounting uses it.
  std::string client_id = {};
  // TLS: on when `tls` is set or any of the files below is given.
  bool tls = false;
  std::string tls_ca_file = {};    // PEM roots to verify the server with; empty: the system's roots
  std::string tls_cert_file = {};  // PEM client certificate chain (mutual TLS), with tls_key_file
  std::string tls_key_file = {};
  std::string tls_server_name = {};  // check the server's certificate against this name, not the target's host
  // LoadWeights chunk size in bytes (the server refuses chunks above its max_chunk_bytes, 4 MiB by default).
  int64_t chunk_bytes = 1 << 20;
  // HTTP/2 connections the calls are spread over (1..64), or 0: chosen by the client, one per
  // activation call in flight up to kAutoConnections. One connection moves one large message at a
  // time each way (~2.4 GB/s on the H200 host's loopback); a client with several Forward/Backward
  // calls of tens of MB in flight gets them through in parallel with a connection per call. A
  // call takes the first connection with nothing in flight (else the least busy), so a
  // connection is opened only when that many calls are in flight at once.
  int connections = 0;
  // kAuto / kSharedMemory: a Forward, Backward or InferStep whose tensor carries its bytes inline
  // (and names no region of its own) travels through one of this client's shared-memory regions
  // (client/shared_memory_region.h) instead, and its reply comes back inline, as if it had
  // travelled in the messages. One region per call in flight, at most 8, reused; kAuto falls back
  // to the messages for good when the daemon is on another host or refuses shared memory.
  Transport transport = Transport::kGrpc;
  // InferStream::Step waits for its answer on a busy core, polling the stream's completion queue,
  // instead of sleeping in the kernel: the answer is taken as it lands, without the thread's
  // wake-up (50-100 us on the H200 host, a VM), at the cost of a core while each step runs. For
  // a decode loop whose step is a few milliseconds and whose client has a core to spare. A step
  // polls for at most a second, then sleeps; opening and closing the stream always sleep.
  bool busy_wait_steps = false;
};

// ClientOptions::connections = 0: at most this many, opened as calls in flight need them.
inline constexpr int kAutoConnections = 8;

// Per-call overrides.
struct CallOptions {
  std::optional<absl::Duration> timeout = {};  // unset: ClientOptions::timeout
};

// Called as bytes move on a stream: bytes done so far and the total (-1 when not known).
using ProgressFn = std::function<void(int64_t done_bytes, int64_t total_bytes)>;

enum class HealthStatus { kUnknown, kServing, kNotServing, kServiceUnknown };
absl::string_view HealthStatusName(HealthStatus s);  // "SERVING", "NOT_SERVING", ...

// grpc::Status -> absl::Status with the same code and message.
absl::Status FromGrpcStatus(const grpc::Status& s);

class Client {
 public:
  // Builds the channel (it connects lazily, on the first call). Fails only on bad options, such
  // as TLS files that cannot be read. The first Connect of a process applies
  // TuneMallocForLargeBuffers (base/malloc_tuning.h: with glibc's defaults each activation-sized
  // buffer is a fresh mmap faulted in page by page); BLOCKD_MALLOC_TUNING=0 leaves the defaults.
  static absl::StatusOr<std::unique_ptr<Client>> Connect(ClientOptions options);
  ~Client();
  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;

  const ClientOptions& options() const { return options_; }
  // Waits until the channel is connected or `timeout` passes (UNAVAILABLE then).
  absl::Status WaitForConnected(absl::Duration timeout);

  absl::StatusOr<v1::GetServerInfoResponse> GetServerInfo(const CallOptions& call = {});
  // `request.ttl_seconds` > 0 gives the block a lease: the server deletes it once no call has named
  // it for that long (any call naming it renews the lease; GetBlock is the cheapest keep-alive).
  absl::StatusOr<v1::BlockInfo> CreateBlock(const v1::CreateBlockRequest& request, const CallOptions& call = {});
  // Sends `tensors` (whole, of block `block_id`) in chunks of options().chunk_bytes on one stream.
  // INVALID_ARGUMENT before sending anything when a tensor's bytes do not match its dtype and shape.
  absl::StatusOr<v1::LoadWeightsResponse> LoadWeights(absl::string_view block_id,
                                                      const std::vector<TensorBytes>& tensors,
                                                      const ProgressFn& progress = nullptr,
                                                      const CallOptions& call = {});
  // Sends these chunks exactly as they are, in order (tools and tests that shape the stream).
  absl::StatusOr<v1::LoadWeightsResponse> LoadWeightsChunks(const std::vector<v1::TensorChunk>& chunks,
                                                            const CallOptions& call = {});
  // Every block, or with `min_idle` > 0 only those no call has named for at least that long
  // (BlockInfo.idle_seconds); a negative `min_idle` is the server's INVALID_ARGUMENT. Listing does
  // not renew any lease.
  absl::StatusOr<std::vector<v1::BlockInfo>> ListBlocks(absl::Duration min_idle = absl::ZeroDuration(),
                                                        const CallOptions& call = {});
  absl::StatusOr<v1::BlockInfo> GetBlock(absl::string_view block_id, const CallOptions& call = {});
  absl::StatusOr<v1::DeleteBlockResponse> DeleteBlock(absl::string_view block_id, const CallOptions& call = {});
  // With `request.only_if_idle_seconds` > 0 the server deletes the block only if no call has named
  // it for that long, judged atomically with the delete (FAILED_PRECONDITION otherwise).
  absl::StatusOr<v1::DeleteBlockResponse> DeleteBlock(const v1::DeleteBlockRequest& request,
                                                      const CallOptions& call = {});
  // The const& forms copy the request once when its tensor goes through shared memory; the &&
  // forms move it.
  absl::StatusOr<v1::ForwardResponse> Forward(const v1::ForwardRequest& request, const CallOptions& call = {});
  absl::StatusOr<v1::ForwardResponse> Forward(v1::ForwardRequest&& request, const CallOptions& call = {});
  absl::StatusOr<v1::ForwardResponse> Forward(const std::vector<std::string>& block_ids, v1::Tensor input,
                                              bool keep_activations, int64_t position_offset = 0,
                                              const CallOptions& call = {});
  absl::StatusOr<v1::BackwardResponse> Backward(absl::string_view activation_id, v1::Tensor grad_output,
                                                const CallOptions& call = {});
  absl::StatusOr<v1::BackwardResponse> Backward(const v1::BackwardRequest& request, const CallOptions& call = {});
  absl::StatusOr<v1::BackwardResponse> Backward(v1::BackwardRequest&& request, const CallOptions& call = {});
  absl::Status ReleaseActivations(absl::string_view activation_id, const CallOptions& call = {});
  absl::Status ZeroGrad(const std::vector<std::string>& block_ids, const CallOptions& call = {});
  absl::StatusOr<v1::StepResponse> Step(const v1::StepRequest& request, const CallOptions& call = {});
  // Whole tensors, in the order the server sent them. DATA_LOSS when the chunks disagree with
  // each other, leave a hole, overlap, or miss a requested name.
  absl::StatusOr<std::vector<TensorBytes>> DownloadTensors(const v1::DownloadTensorsRequest& request,
                                                           const ProgressFn& progress = nullptr,
                                                           const CallOptions& call = {});
  absl::StatusOr<std::vector<TensorBytes>> DownloadTensors(absl::string_view block_id, v1::TensorKind kind,
                                                           v1::DType dtype = v1::DTYPE_FLOAT32,
                                                           const CallOptions& call = {});
  absl::StatusOr<v1::SaveCheckpointResponse> SaveCheckpoint(const v1::SaveCheckpointRequest& request,
                                                            const CallOptions& call = {});
  absl::StatusOr<v1::RestoreCheckpointResponse> RestoreCheckpoint(const v1::RestoreCheckpointRequest& request,
                                                                  const CallOptions& call = {});
  // Inference sessions: owned by this client's identity; ARCHITECTURE.md, "Inference sessions".
  absl::StatusOr<v1::SessionInfo> OpenSession(const v1::OpenSessionRequest& request, const CallOptions& call = {});
  absl::StatusOr<v1::InferStepResponse> InferStep(const v1::InferStepRequest& request, const CallOptions& call = {});
  absl::StatusOr<v1::SessionInfo> TrimSession(absl::string_view session_id, int32_t length,
                                              const CallOptions& call = {});
  absl::StatusOr<v1::SessionInfo> ForkSession(absl::string_view session_id, absl::string_view new_session_id,
                                              const CallOptions& call = {});
  absl::Status CloseSession(absl::string_view session_id, const CallOptions& call = {});
  absl::StatusOr<std::vector<v1::SessionInfo>> ListSessions(const CallOptions& call = {});
  // Replica groups (ARCHITECTURE.md, "Replica groups"): GetCollectiveId on rank 0's daemon, then
  // JoinGroup on every member at once (it returns when all joined, or fails after timeout_ms).
  absl::StatusOr<v1::GetCollectiveIdResponse> GetCollectiveId(absl::string_view backend = "",
                                                              const CallOptions& call = {});
  absl::StatusOr<v1::GroupInfo> JoinGroup(const v1::JoinGroupRequest& request, const CallOptions& call = {});
  absl::Status LeaveGroup(absl::string_view group_id, const CallOptions& call = {});
  absl::StatusOr<v1::GroupInfo> GetGroup(absl::string_view group_id, const CallOptions& call = {});
  absl::StatusOr<std::vector<v1::GroupInfo>> ListGroups(const CallOptions& call = {});
  absl::StatusOr<v1::GradNormResponse> GradNorm(const std::vector<std::string>& block_ids,
                                                absl::string_view group_id = "", const CallOptions& call = {});
  // Shared-memory regions of this identity (same host, --allow_shared_memory); see
  // client/shared_memory_region.h for the class that creates, maps and registers one.
  absl::StatusOr<v1::RegisterSharedMemoryResponse> RegisterSharedMemory(const v1::RegisterSharedMemoryRequest& request,
                                                                        const CallOptions& call = {});
  absl::Status UnregisterSharedMemory(absl::string_view name, const CallOptions& call = {});
  absl::StatusOr<std::vector<v1::SharedMemoryRegion>> ListSharedMemory(const CallOptions& call = {});
  // The Infer stream: one step per Step() call, in order, on one HTTP/2 stream (no per-token call
  // setup). `call.timeout` bounds the whole stream. The first failed step ends the stream.
  class InferStream {
   public:
    ~InferStream();
    absl::StatusOr<v1::InferStepResponse> Step(const v1::InferStepRequest& request);
    // Ends the stream; its final status (OK, or why the server ended it).
    absl::Status Close();

   private:
    friend class Client;
    InferStream() = default;
    // Takes the stream's completions until the operations `ops` (bits of Op) have all come,
    // polling for them when `busy` (a step of a busy_wait_steps stream), else sleeping; true when
    // all of them succeeded.
    bool Await(unsigned ops, bool busy);
    // Declared in the order they must outlive each other: the queue is shut down and drained
    // (Close) after the call is finished, and destroyed last.
    grpc::CompletionQueue cq_;
    std::unique_ptr<grpc::ClientContext> ctx_;
    std::unique_ptr<grpc::ClientAsyncReaderWriter<v1::InferStepRequest, v1::InferStepResponse>> stream_;
    bool busy_wait_ = false;
    unsigned came_ = 0, failed_ = 0;  // completions taken and not yet awaited, and which of them failed
    bool done_ = false;
    absl::Status final_;
  };
  absl::StatusOr<std::unique_ptr<InferStream>> OpenInferStream(const CallOptions& call = {});

  // grpc.health.v1.Health/Check of `service` ("" is the whole server, "blockd.v1.BlockService" the service).
  absl::StatusOr<HealthStatus> Health(absl::string_view service = "", const CallOptions& call = {});

 private:
  Client() = default;
  // Deadline and metadata of one call.
  void Prepare(grpc::ClientContext* ctx, const CallOptions& call) const;

  // The stub of the next connection, round robin.
  v1::BlockService::Stub* NextStub();
  // The connection for the next call: the first with no call in flight, else the least busy.
  size_t NextConnection();
  // The activation calls as sent (the public ones choose the transport first): raw messages
  // (proto/tensor_wire.h) whose tensor bytes are moved into the request, not copied, and
  // gathered from the reply's slices once.
  template <class Req, class Resp>
  absl::StatusOr<Resp> SendWire(Req request, const CallOptions& call);
  absl::StatusOr<v1::ForwardResponse> SendForward(v1::ForwardRequest request, const CallOptions& call);
  absl::StatusOr<v1::BackwardResponse> SendBackward(v1::BackwardRequest request, const CallOptions& call);
  absl::StatusOr<v1::InferStepResponse> SendInferStep(v1::InferStepRequest request, const CallOptions& call);
  // How the activation calls travel (client_activations.cc): a request sent by `send`, through
  // the client's shared-memory regions when options_.transport says so and its tensor is inline.
  template <class Req, class Resp>
  using Send = absl::StatusOr<Resp> (Client::*)(Req, const CallOptions&);
  template <class Req>
  bool WantsSharedMemory(const Req& request) const;
  // A caller's request: copied once, its tensor's bytes over a few threads (where serialising it
  // copied them on one core).
  template <class Req, class Resp>
  absl::StatusOr<Resp> Route(const Req& request, const CallOptions& call, Send<Req, Resp> send);
  // A request the client built itself (moved, never copied).
  template <class Req, class Resp>
  absl::StatusOr<Resp> RouteOwned(Req request, const CallOptions& call, Send<Req, Resp> send);
  // `request` with its tensor's bytes moved through a region of the pool; the reply's tensor
  // inline. Inline when kAuto finds no shared memory.
  template <class Req, class Resp>
  absl::StatusOr<Resp> ThroughSharedMemory(Req request, const CallOptions& call, Send<Req, Resp> send);
  void InitTransport();  // by Connect

  ClientOptions options_;
  std::vector<std::shared_ptr<grpc::Channel>> channels_;
  std::vector<std::unique_ptr<v1::BlockService::Stub>> stubs_;
  struct WireMethods;  // the activation calls' methods of each channel, for raw messages
  struct WireMethodsDeleter {
    void operator()(WireMethods* m) const;
  };
  std::vector<std::unique_ptr<WireMethods, WireMethodsDeleter>> wire_methods_;
  std::unique_ptr<std::atomic<int>[]> in_flight_;  // activation calls in flight, per connection
  struct HealthStub;
  std::unique_ptr<HealthStub> health_;
  // Shared-memory regions for options_.transport; last, so its regions unregister through the
  // channels while they still exist.
  class RegionPool;
  struct RegionPoolDeleter {  // defined beside RegionPool (client_activations.cc)
    void operator()(RegionPool* pool) const;
  };
  std::unique_ptr<RegionPool, RegionPoolDeleter> regions_;
};

}  // namespace blockd
