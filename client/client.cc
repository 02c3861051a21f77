#include "client/client.h"

#include <algorithm>
#include <chrono>
#include <fstream>
#include <map>
#include <sstream>

#include <grpcpp/channel.h>
#include <grpcpp/client_context.h>
#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>
#include <grpcpp/impl/codegen/client_unary_call.h>
#include <grpcpp/support/channel_arguments.h>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "base/block_config.h"  // ShapeString
#include "base/malloc_tuning.h"
#include "client/activation_tensors.h"
#include "proto/tensor_wire.h"
#include "grpc/health/v1/health.grpc.pb.h"

namespace blockd {
namespace {

absl::StatusOr<std::string> ReadPem(const std::string& path, absl::string_view what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", what, " ", path));
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::chrono::system_clock::time_point DeadlineAfter(absl::Duration d) {
  return std::chrono::system_clock::now() + std::chrono::microseconds(absl::ToInt64Microseconds(d));
}

// One unary call on a prepared context; the reply, or the server's code and message.
template <class Req, class Resp>
absl::StatusOr<Resp> Invoke(v1::BlockService::Stub* stub,
                            grpc::Status (v1::BlockService::Stub::*method)(grpc::ClientContext*, const Req&, Resp*),
                            grpc::ClientContext* ctx, const Req& request) {
  Resp response;
  grpc::Status s = (stub->*method)(ctx, request, &response);
  if (!s.ok()) return FromGrpcStatus(s);
  return response;
}

// "300.0 MiB", "256 MiB", "96.5 KiB": whole units print without a fraction (limits usually are).
std::string SizeText(int64_t bytes) {
  static constexpr const char* kUnits[] = {"bytes", "KiB", "MiB", "GiB"};
  int unit = 0;
  int64_t scale = 1;
  while (unit < 3 && bytes >= scale * 1024) {
    scale *= 1024;
    ++unit;
  }
  if (bytes % scale == 0) return absl::StrCat(bytes / scale, " ", kUnits[unit]);
  return absl::StrCat(absl::StrFormat("%.1f", static_cast<double>(bytes) / static_cast<double>(scale)), " ",
                      kUnits[unit]);
}

// gRPC refuses a message over a channel's limit with a bare "Sent message larger than max" (or,
// from the server, "Received message larger than max"), which says neither which limit nor what
// to do. A request over the client's own limit fails here before it is sent; one the server
// refuses for its size gets the same advice. The limit is ClientOptions.max_message_bytes, which
// should match the server's --max_message_bytes (both 256 MiB by default).
absl::Status CheckMessageSize(absl::string_view rpc, absl::string_view what, const v1::Tensor& t,
                              size_t request_bytes, int64_t limit) {
  if (static_cast<int64_t>(request_bytes) <= limit) return absl::OkStatus();
  return absl::ResourceExhaustedError(absl::StrCat(
      rpc, " ", what, " ", ShapeString(wire::ShapeOf(t)), " ", wire::DTypeName(t.dtype()), " is ",
      SizeText(static_cast<int64_t>(request_bytes)), ", over the ", SizeText(limit),
      " message limit (--max_message_bytes on the server / ClientOptions.max_message_bytes): split the batch"));
}

absl::Status ExplainServerSizeRefusal(absl::Status s, absl::string_view rpc, absl::string_view what,
                                      const v1::Tensor& t, size_t request_bytes) {
  if (s.code() != absl::StatusCode::kResourceExhausted ||
      !absl::StartsWith(s.message(), "Received message larger than max")) {
    return s;
  }
  return absl::ResourceExhaustedError(absl::StrCat(
      rpc, " ", what, " ", ShapeString(wire::ShapeOf(t)), " ", wire::DTypeName(t.dtype()), " is ",
      SizeText(static_cast<int64_t>(request_bytes)), ", over the server's message limit (", s.message(),
      "): split the batch, or raise --max_message_bytes on the server"));
}

// Validates one chunk of a DownloadTensors stream against the tensor it belongs to and places it.
class ChunkAssembler {
 public:
  explicit ChunkAssembler(std::string block_id) : block_id_(std::move(block_id)) {}

  absl::Status Add(const v1::TensorChunk& chunk) {
    if (!block_id_.empty() && chunk.block_id() != block_id_) {
      return Bad(absl::StrCat("a chunk of block \"", chunk.block_id(), "\" in the download of block ", block_id_));
    }
    if (chunk.name().empty()) return Bad("a chunk has no tensor name");
    const std::vector<int64_t> shape(chunk.shape().begin(), chunk.shape().end());
    auto [it, fresh] = index_.try_emplace(chunk.name(), tensors_.size());
    if (fresh) {
      const int64_t elem = wire::DTypeBytes(chunk.dtype());
      const int64_t n = wire::NumElements(shape);
      if (elem == 0) return Bad(absl::StrCat("tensor ", chunk.name(), " has dtype ", wire::DTypeName(chunk.dtype())));
      if (n < 0 || n > (int64_t{1} << 40)) {
        return Bad(absl::StrCat("tensor ", chunk.name(), " has shape ", ShapeString(shape)));
      }
      TensorBytes t{chunk.name(), chunk.dtype(), shape, std::string()};
      t.data.resize(static_cast<size_t>(n * elem));
      tensors_.push_back(std::move(t));
      covered_.emplace_back();
    }
    TensorBytes& t = tensors_[it->second];
    std::map<int64_t, int64_t>& covered = covered_[it->second];
    if (chunk.dtype() != t.dtype || shape != t.shape) {
      return Bad(absl::StrCat("tensor ", t.name, " chunk says ", wire::DTypeName(chunk.dtype()), " ",
                              ShapeString(shape), ", its first chunk said ", wire::DTypeName(t.dtype), " ",
                              ShapeString(t.shape)));
    }
    const int64_t total = static_cast<int64_t>(t.data.size());
    const int64_t offset = chunk.offset();
    const int64_t len = static_cast<int64_t>(chunk.data().size());
    if (offset < 0 || len > total || offset > total - len) {
      return Bad(absl::StrCat("tensor ", t.name, " chunk covers bytes [", offset, ", ", offset + len,
                              "), outside its ", total, " bytes"));
    }
    const int64_t end = offset + len;
    auto next = covered.lower_bound(offset);
    const bool overlaps_next = next != covered.end() && next->first < end;
    const bool overlaps_prev = next != covered.begin() && std::prev(next)->second > offset;
    if (len > 0 && (overlaps_next || overlaps_prev)) {
      return Bad(absl::StrCat("tensor ", t.name, " chunk [", offset, ", ", end, ") overlaps an earlier chunk"));
    }
    if (len > 0) covered.emplace(offset, end);
    std::copy(chunk.data().begin(), chunk.data().end(), t.data.begin() + offset);
    received_ += len;
    return absl::OkStatus();
  }

  int64_t received() const { return received_; }

  absl::StatusOr<std::vector<TensorBytes>> Finish(const std::vector<std::string>& wanted) {
    for (size_t i = 0; i < tensors_.size(); ++i) {
      int64_t got = 0;
      for (const auto& [start, end] : covered_[i]) got += end - start;
      if (got != static_cast<int64_t>(tensors_[i].data.size())) {
        return Bad(absl::StrCat("tensor ", tensors_[i].name, " is incomplete: ", got, " of ",
                                tensors_[i].data.size(), " bytes arrived"));
      }
    }
    for (const std::string& name : wanted) {
      if (index_.count(name) == 0) return Bad(absl::StrCat("tensor ", name, " was asked for but did not arrive"));
    }
    return std::move(tensors_);
  }

 private:
  static absl::Status Bad(absl::string_view what) {
    return absl::DataLossError(absl::StrCat("DownloadTensors: ", what));
  }

  std::string block_id_;
  std::map<std::string, size_t> index_;
  std::vector<TensorBytes> tensors_;
  std::vector<std::map<int64_t, int64_t>> covered_;  // per tensor: start -> end of byte ranges
  int64_t received_ = 0;
};

}  // namespace

struct Client::HealthStub {
  std::unique_ptr<grpc::health::v1::Health::Stub> stub;
};

absl::string_view HealthStatusName(HealthStatus s) {
  switch (s) {
    case HealthStatus::kServing: return "SERVING";
    case HealthStatus::kNotServing: return "NOT_SERVING";
    case HealthStatus::kServiceUnknown: return "SERVICE_UNKNOWN";
    case HealthStatus::kUnknown: break;
  }
  return "UNKNOWN";
}

absl::Status FromGrpcStatus(const grpc::Status& s) {
  if (s.ok()) return absl::OkStatus();
  // grpc::StatusCode and absl::StatusCode share their numbering (google.rpc.Code).
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
}

namespace {

// Which RPC an activation request is, and where its tensors are.
template <class Req>
struct WireRpc;
template <>
struct WireRpc<v1::ForwardRequest> {
  static constexpr const char* kRpc = "Forward";
  static constexpr const char* kWhat = "input";
  static constexpr int kIn = v1::ForwardRequest::kInputFieldNumber;
  static constexpr int kOut = v1::ForwardResponse::kOutputFieldNumber;
};
template <>
struct WireRpc<v1::BackwardRequest> {
  static constexpr const char* kRpc = "Backward";
  static constexpr const char* kWhat = "grad_output";
  static constexpr int kIn = v1::BackwardRequest::kGradOutputFieldNumber;
  static constexpr int kOut = v1::BackwardResponse::kGradInputFieldNumber;
};
template <>
struct WireRpc<v1::InferStepRequest> {
  static constexpr const char* kRpc = "InferStep";
  static constexpr const char* kWhat = "hidden_states";
  static constexpr int kIn = v1::InferStepRequest::kHiddenStatesFieldNumber;
  static constexpr int kOut = v1::InferStepResponse::kHiddenStatesFieldNumber;
};

}  // namespace

// The activation calls' methods, registered once with their channel.
struct Client::WireMethods {
  explicit WireMethods(const std::shared_ptr<grpc::Channel>& channel)
      : channel(channel.get()),
        forward("/blockd.v1.BlockService/Forward", grpc::internal::RpcMethod::NORMAL_RPC, channel),
        backward("/blockd.v1.BlockService/Backward", grpc::internal::RpcMethod::NORMAL_RPC, channel),
        infer_step("/blockd.v1.BlockService/InferStep", grpc::internal::RpcMethod::NORMAL_RPC, channel) {}
  const grpc::internal::RpcMethod& Of(const v1::ForwardRequest&) const { return forward; }
  const grpc::internal::RpcMethod& Of(const v1::BackwardRequest&) const { return backward; }
  const grpc::internal::RpcMethod& Of(const v1::InferStepRequest&) const { return infer_step; }

  grpc::Channel* channel;
  grpc::internal::RpcMethod forward, backward, infer_step;
};

void Client::WireMethodsDeleter::operator()(WireMethods* m) const { delete m; }

absl::StatusOr<std::unique_ptr<Client>> Client::Connect(ClientOptions options) {
  if (options.target.empty()) return absl::InvalidArgumentError("the client's target is empty");
  // Activations of tens of MB per call: large buffers reuse the heap (base/malloc_tuning.h), once
  // per process; BLOCKD_MALLOC_TUNING=0 leaves glibc's defaults.
  static const bool malloc_tuned = TuneMallocForLargeBuffers();
  (void)malloc_tuned;
  if (options.chunk_bytes < 1) {
    return absl::InvalidArgumentError(absl::StrCat("chunk_bytes = ", options.chunk_bytes, ", expected > 0"));
  }
  if (options.max_message_bytes < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_message_bytes = ", options.max_message_bytes, ", expected > 0"));
  }
  if (options.tls_cert_file.empty() != options.tls_key_file.empty()) {
    return absl::InvalidArgumentError("a TLS client certificate needs both its certificate and its key file");
  }
  const bool tls = options.tls || !options.tls_ca_file.empty() || !options.tls_cert_file.empty() ||
                   !options.tls_server_name.empty();
  std::shared_ptr<grpc::ChannelCredentials> creds;
  if (tls) {
    grpc::SslCredentialsOptions ssl;
    if (!options.tls_ca_file.empty()) {
      auto pem = ReadPem(options.tls_ca_file, "TLS CA file");
      if (!pem.ok()) return pem.status();
      ssl.pem_root_certs = *std::move(pem);
    }
    if (!options.tls_cert_file.empty()) {
      auto cert = ReadPem(options.tls_cert_file, "TLS client certificate");
      if (!cert.ok()) return cert.status();
      auto key = ReadPem(options.tls_key_file, "TLS client key");
      if (!key.ok()) return key.status();
      ssl.pem_cert_chain = *std::move(cert);
      ssl.pem_private_key = *std::move(key);
    }
    creds = grpc::SslCredentials(ssl);
  } else {
    creds = grpc::InsecureChannelCredentials();
  }
  grpc::ChannelArguments args;
  const int max_message = static_cast<int>(std::min<int64_t>(options.max_message_bytes, INT32_MAX));
  args.SetMaxReceiveMessageSize(max_message);
  args.SetMaxSendMessageSize(max_message);
  // Activations are tens of MB: large HTTP/2 frames and a deep per-stream window keep a large
  // message flowing instead of stopping for window updates every 64 KiB.
  args.SetInt(GRPC_ARG_HTTP2_MAX_FRAME_SIZE, (1 << 24) - 1);
  args.SetInt(GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES, 64 << 20);
  if (!options.tls_server_name.empty()) args.SetSslTargetNameOverride(options.tls_server_name);

  if (options.connections < 0 || options.connections > 64) {
    return absl::InvalidArgumentError(
        absl::StrCat("connections = ", options.connections, ", expected 1..64, or 0 for the client to choose"));
  }
  std::unique_ptr<Client> c(new Client());
  c->options_ = std::move(options);
  // Channels connect on their first call: those the calls in flight never need stay closed.
  const int connections = c->options_.connections == 0 ? kAutoConnections : c->options_.connections;
  c->in_flight_.reset(new std::atomic<int>[connections]);
  for (int i = 0; i < connections; ++i) {
    c->in_flight_[i] = 0;
    // Channels with equal arguments share one connection; a local subchannel pool gives each its own.
    grpc::ChannelArguments own = args;
    if (connections > 1) own.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
    c->channels_.push_back(grpc::CreateCustomChannel(c->options_.target, creds, own));
    c->stubs_.push_back(v1::BlockService::NewStub(c->channels_.back()));
    c->wire_methods_.emplace_back(new WireMethods(c->channels_.back()));
  }
  c->health_ = std::make_unique<HealthStub>();
  c->health_->stub = grpc::health::v1::Health::NewStub(c->channels_[0]);
  c->InitTransport();
  return c;
}

void Client::Prepare(grpc::ClientContext* ctx, const CallOptions& call) const {
  const absl::Duration timeout = call.timeout.value_or(options_.timeout);
  if (timeout != absl::InfiniteDuration()) ctx->set_deadline(DeadlineAfter(timeout));
  if (!options_.token.empty()) ctx->AddMetadata("authorization", absl::StrCat("Bearer ", options_.token));
  if (!options_.client_id.empty()) ctx->AddMetadata("blockd-client", options_.client_id);
}

size_t Client::NextConnection() {
  size_t best = 0;
  for (size_t i = 0; i < stubs_.size(); ++i) {
    const int n = in_flight_[i].load(std::memory_order_relaxed);
    if (n == 0) return i;
    if (n < in_flight_[best].load(std::memory_order_relaxed)) best = i;
  }
  return best;
}

v1::BlockService::Stub* Client::NextStub() { return stubs_[NextConnection()].get(); }

Client::~Client() = default;

absl::Status Client::WaitForConnected(absl::Duration timeout) {
  const auto deadline = DeadlineAfter(timeout);
  // Chosen by the client: the first connection; the others open as calls need them.
  const size_t wait_for = options_.connections == 0 ? 1 : channels_.size();
  for (size_t i = 0; i < wait_for; ++i) {
    if (!channels_[i]->WaitForConnected(deadline)) {
      return absl::UnavailableError(
          absl::StrCat("cannot connect to ", options_.target, " within ", absl::FormatDuration(timeout)));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<v1::GetServerInfoResponse> Client::GetServerInfo(const CallOptions& call) {
  grpc::ClientContext ctx;
  Prepare(&ctx, call);
  return Invoke(NextStub(), &v1::BlockService::Stub::GetServerInfo, &ctx, v1::GetServerInfoRequest());
}

absl::StatusOr<v1::BlockInfo> Client::CreateBlock(const v1::CreateBlockRequest& request, const CallOptions& call) {
  grpc::ClientContext ctx;
  Prepare(&ctx, call);
  return Invoke(NextStub(), &v1::BlockService::Stub::CreateBlock, &ctx, request);
}

absl::StatusOr<std::vector<v1::BlockInfo>> Client::ListBlocks(absl::Duration min_idle, const CallOptions& call) {
  v1::ListBlocksRequest request;
  request.set_min_idle_seconds(absl::ToDoubleSeconds(min_idle));
  grpc::ClientContext ctx;
  Prepare(&ctx, call);
  auto r = Invoke(NextStub(), &v1::BlockService::Stub::ListBlocks, &ctx, request);
  if (!r.ok()) return r.status();
  return std::vector<v1::BlockInfo>(r->blocks().begin(), r->blocks().end());
}

absl::StatusOr<v1::BlockInfo> Client::GetBlock(absl::string_view block_id, const CallOptions& call) {
  v1::GetBlockRequest request;
  request.set_block_id(std::string(block_id));
  grpc::ClientContext ctx;
  Prepare(&ctx, call);
  return Invoke(NextStub(), &v1::BlockService::Stub::GetBlock, &ctx, request);
}

absl::StatusOr<v1::DeleteBlockResponse> Client::DeleteBlock(absl::string_view block_id, const CallOptions& call) {
  v1::DeleteBlockRequest request;
  request.set_block_id(std::string(block_id));
  return DeleteBlock(request, call);
}

absl::StatusOr<v1::DeleteBlockResponse> Client::DeleteBlock(const v1::DeleteBlockRequest& request,
                                                            const CallOptions& call) {
  grpc::ClientContext ctx;
  Prepare(&ctx, call);
  return Invoke(NextStub(), &v1::BlockService::Stub::DeleteBlock, &ctx, request);
}


template <class Req, class Resp>
absl::StatusOr<Resp> Client::SendWire(Req request, const CallOptions& call) {
  using Rpc = WireRpc<Req>;
  const size_t bytes = request.ByteSizeLong();
  if (absl::Status s = CheckMessageSize(Rpc::kRpc, Rpc::kWhat, TensorOf(request), bytes, options_.max_message_bytes);
      !s.ok()) {
    return s;
  }
  v1::Tensor* in = MutableTensorOf(&request);
  grpc::Slice data = SliceOwning(std::move(*in->mutable_data()));
  in->clear_data();
  const v1::Tensor meta = std::move(*in);
  request.GetReflection()->ClearField(&request, Req::descriptor()->FindFieldByNumber(Rpc::kIn));
  const grpc::ByteBuffer wire = SerializeWithTensorBytes(request, Rpc::kIn, meta, std::move(data));

  grpc::ClientContext ctx;
  Prepare(&ctx, call);
  const size_t connection = NextConnection();
  const WireMethods& m = *wire_methods_[connection];
  grpc::ByteBuffer reply;
  in_flight_[connection].fetch_add(1, std::memory_order_relaxed);
  const grpc::Status s = grpc::internal::BlockingUnaryCall<grpc::ByteBuffer, grpc::ByteBuffer>(
      m.channel, m.Of(request), &ctx, wire, &reply);
  in_flight_[connection].fetch_sub(1, std::memory_order_relaxed);
  if (!s.ok()) return ExplainServerSizeRefusal(FromGrpcStatus(s), Rpc::kRpc, Rpc::kWhat, meta, bytes);
  Resp resp;
  WireBytes out;
  if (absl::Status parsed = ParseWithTensorBytes(reply, Rpc::kOut, &resp, &out); !parsed.ok()) {
    return absl::InternalError(absl::StrCat("the ", Rpc::kRpc, " reply ", parsed.message()));
  }
  if (out.present()) {
    std::string* bytes = MutableTensorOf(&resp)->mutable_data();
    bytes->resize(out.size());
    out.CopyTo(bytes->data(), 0, out.size());  // over a few threads (base/parallel_copy.h)
  }
  return resp;
}

absl::StatusOr<v1::ForwardResponse> Client::SendForward(v1::ForwardRequest request, const CallOptions& call) {
  return SendWire<v1::ForwardRequest, v1::ForwardResponse>(std::move(request), call);
}

absl::StatusOr<v1::BackwardResponse> Client::SendBackward(v1::BackwardRequest request, const CallOptions& call) {
  return SendWire<v1::BackwardRequest, v1::BackwardResponse>(std::move(request), call);
}

absl::StatusOr<v1::InferStepResponse> Client::SendInferStep(v1::InferStepRequest request, const CallOptions& call) {
  return SendWire<v1::InferStepRequest, v1::InferStepResponse>(std::move(request), call);
}

absl::Status Client::ReleaseActivations(absl::string_view activation_id, const CallOptions& call) {
  v1::ReleaseActivationsRequest request;
  request.set_activation_id(std::string(activation_id));
  grpc::ClientContext ctx;
  Prepare(&ctx, call);
  return Invoke(NextStub(), &v1::BlockService::Stub::ReleaseActivations, &ctx, request).status();
}

absl::Status Client::ZeroGrad(const std::vector<std::string>& block_ids, const CallOptions& call) {
  v1::ZeroGradRequest request;
  for (const std::string& id : block_ids) request.add_block_ids(id);
  grpc::ClientContext ctx;
  Prepare(&ctx, call);
  return Invoke(NextStub(), &v1::BlockService::Stub::ZeroGrad, &ctx, request).status();
}

absl::StatusOr<v1::StepResponse> Client::Step(const v1::StepRequest& request, const CallOptions& call) {
  grpc::ClientContext ctx;
  Prepare(&ctx, call);
  return Invoke(NextStub(), &v1::BlockService::Stub::Step, &ctx, request);
}

absl::StatusOr<v1::SaveCheckpointResponse> Client::SaveCheckpoint(const v1::SaveCheckpointRequest& request,
                                                                  const CallOptions& call) {
  grpc::ClientContext ctx;
  Prepare(&ctx, call);
  return Invoke(NextStub(), &v1::BlockService::Stub::SaveCheckpoint, &ctx, request);
}

absl::StatusOr<v1::RestoreCheckpointResponse> Client::RestoreCheckpoint(const v1::RestoreCheckpointRequest& request,
                                                                        const CallOptions& call) {
  grpc::ClientContext ctx;
  Prepare(&ctx, call);
  return Invoke(NextStub(), &v1::BlockService::Stub::RestoreCheckpoint, &ctx, request);
}

absl::StatusOr<v1::LoadWeightsResponse> Client::LoadWeightsChunks(const std::vector<v1::TensorChunk>& chunks,
                                                                  const CallOptions& call) {
  grpc::ClientContext ctx;
  Prepare(&ctx, call);
  v1::LoadWeightsResponse response;
  std::unique_ptr<grpc::ClientWriter<v1::TensorChunk>> writer = NextStub()->LoadWeights(&ctx, &response);
  for (const v1::TensorChunk& chunk : chunks) {
    if (!writer->Write(chunk)) break;  // the server ended the stream: Finish says why
  }
  writer->WritesDone();
  grpc::Status s = writer->Finish();
  if (!s.ok()) return FromGrpcStatus(s);
  return response;
}

absl::StatusOr<v1::LoadWeightsResponse> Client::LoadWeights(absl::string_view block_id,
                                                            const std::vector<TensorBytes>& tensors,
                                                            const ProgressFn& progress, const CallOptions& call) {
  int64_t total = 0;
  for (const TensorBytes& t : tensors) {
    const int64_t elem = wire::DTypeBytes(t.dtype);
    const int64_t n = wire::NumElements(t.shape);
    if (t.name.empty()) return absl::InvalidArgumentError("LoadWeights: a tensor has no name");
    if (elem == 0 || n < 0 || static_cast<int64_t>(t.data.size()) != n * elem) {
      return absl::InvalidArgumentError(absl::StrCat("LoadWeights: tensor ", t.name, " has ", t.data.size(),
                                                     " bytes, but shape ", ShapeString(t.shape), " of ",
                                                     wire::DTypeName(t.dtype), " needs ", n * elem));
    }
    total += static_cast<int64_t>(t.data.size());
  }
  grpc::ClientContext ctx;
  Prepare(&ctx, call);
  v1::LoadWeightsResponse response;
  std::unique_ptr<grpc::ClientWriter<v1::TensorChunk>> writer = NextStub()->LoadWeights(&ctx, &response);
  int64_t sent = 0;
  if (progress) progress(0, total);
  v1::TensorChunk chunk;
  bool open = true;
  for (const TensorBytes& t : tensors) {
    const int64_t size = static_cast<int64_t>(t.data.size());
    // An empty tensor still goes as one (empty) chunk, so the server sees its name.
    for (int64_t offset = 0; open && (offset < size || (size == 0 && offset == 0));) {
      const int64_t n = std::min(options_.chunk_bytes, size - offset);
      chunk.Clear();
      chunk.set_block_id(std::string(block_id));
      chunk.set_name(t.name);
      chunk.set_dtype(t.dtype);
      for (int64_t d : t.shape) chunk.add_shape(d);
      chunk.set_offset(offset);
      chunk.set_data(t.data.data() + offset, static_cast<size_t>(n));
      open = writer->Write(chunk);
      sent += n;
      if (open && progress) progress(sent, total);
      if (n == 0) break;
      offset += n;
    }
    if (!open) break;  // the server ended the stream: Finish says why
  }
  writer->WritesDone();
  grpc::Status s = writer->Finish();
  if (!s.ok()) return FromGrpcStatus(s);
  return response;
}

absl::StatusOr<std::vector<TensorBytes>> Client::DownloadTensors(const v1::DownloadTensorsRequest& request,
                                                                 const ProgressFn& progress, const CallOptions& call) {
  int64_t total = -1;
  if (progress && request.names().empty()) {
    // The total is known from the block's parameter count; without it the bar just counts.
    auto info = GetBlock(request.block_id(), call);
    const int64_t elem = wire::DTypeBytes(request.dtype() == v1::DTYPE_UNSPECIFIED ? v1::DTYPE_FLOAT32 : request.dtype());
    if (info.ok() && elem > 0) total = info->parameter_count() * elem;
  }
  grpc::ClientContext ctx;
  Prepare(&ctx, call);
  std::unique_ptr<grpc::ClientReader<v1::TensorChunk>> reader = NextStub()->DownloadTensors(&ctx, request);
  ChunkAssembler assembler(request.block_id());
  v1::TensorChunk chunk;
  absl::Status bad;
  if (progress) progress(0, total);
  while (reader->Read(&chunk)) {
    bad = assembler.Add(chunk);
    if (!bad.ok()) {
      ctx.TryCancel();
      break;
    }
    if (progress) progress(assembler.received(), total);
  }
  grpc::Status s = reader->Finish();
  if (!bad.ok()) return bad;
  if (!s.ok()) return FromGrpcStatus(s);
  return assembler.Finish(std::vector<std::string>(request.names().begin(), request.names().end()));
}

absl::StatusOr<std::vector<TensorBytes>> Client::DownloadTensors(absl::string_view block_id, v1::TensorKind kind,
                                                                 v1::DType dtype, const CallOptions& call) {
  v1::DownloadTensorsRequest request;
  request.set_block_id(std::string(block_id));
  request.set_kind(kind);
  request.set_dtype(dtype);
  return DownloadTensors(request, nullptr, call);
}

absl::StatusOr<HealthStatus> Client::Health(absl::string_view service, const CallOptions& call) {
  grpc::ClientContext ctx;
  Prepare(&ctx, call);
  grpc::health::v1::HealthCheckRequest request;
  request.set_service(std::string(service));
  grpc::health::v1::HealthCheckResponse response;
  grpc::Status s = health_->stub->Check(&ctx, request, &response);
  if (!s.ok()) return FromGrpcStatus(s);
  switch (response.status()) {
    case grpc::health::v1::HealthCheckResponse::SERVING: return HealthStatus::kServing;
    case grpc::health::v1::HealthCheckResponse::NOT_SERVING: return HealthStatus::kNotServing;
    case grpc::health::v1::HealthCheckResponse::SERVICE_UNKNOWN: return HealthStatus::kServiceUnknown;
    default: return HealthStatus::kUnknown;
  }
}

absl::StatusOr<v1::SessionInfo> Client::OpenSession(const v1::OpenSessionRequest& request, const CallOptions& call) {
  grpc::ClientContext ctx;
  Prepare(&ctx, call);
  return Invoke(NextStub(), &v1::BlockService::Stub::OpenSession, &ctx, request);
}

absl::StatusOr<v1::RegisterSharedMemoryResponse> Client::RegisterSharedMemory(
    const v1::RegisterSharedMemoryRequest& request, const CallOptions& call) {
  grpc::ClientContext ctx;
  Prepare(&ctx, call);
  return Invoke(NextStub(), &v1::BlockService::Stub::RegisterSharedMemory, &ctx, request);
}

absl::Status Client::UnregisterSharedMemory(absl::string_view name, const CallOptions& call) {
  v1::UnregisterSharedMemoryRequest request;
  request.set_name(std::string(name));
  grpc::ClientContext ctx;
  Prepare(&ctx, call);
  return Invoke(NextStub(), &v1::BlockService::Stub::UnregisterSharedMemory, &ctx, request).status();
}

absl::StatusOr<std::vector<v1::SharedMemoryRegion>> Client::ListSharedMemory(const CallOptions& call) {
  grpc::ClientContext ctx;
  Prepare(&ctx, call);
  auto r = Invoke(NextStub(), &v1::BlockService::Stub::ListSharedMemory, &ctx, v1::ListSharedMemoryRequest());
  if (!r.ok()) return r.status();
  return std::vector<v1::SharedMemoryRegion>(r->regions().begin(), r->regions().end());
}

absl::StatusOr<v1::SessionInfo> Client::TrimSession(absl::string_view session_id, int32_t length,
                                                    const CallOptions& call) {
  v1::TrimSessionRequest request;
  request.set_session_id(std::string(session_id));
  request.set_length(length);
  grpc::ClientContext ctx;
  Prepare(&ctx, call);
  return Invoke(NextStub(), &v1::BlockService::Stub::TrimSession, &ctx, request);
}

absl::StatusOr<v1::SessionInfo> Client::ForkSession(absl::string_view session_id, absl::string_view new_session_id,
                                                    const CallOptions& call) {
  v1::ForkSessionRequest request;
  request.set_session_id(std::string(session_id));
  request.set_new_session_id(std::string(new_session_id));
  grpc::ClientContext ctx;
  Prepare(&ctx, call);
  return Invoke(NextStub(), &v1::BlockService::Stub::ForkSession, &ctx, request);
}

absl::Status Client::CloseSession(absl::string_view session_id, const CallOptions& call) {
  v1::CloseSessionRequest request;
  request.set_session_id(std::string(session_id));
  grpc::ClientContext ctx;
  Prepare(&ctx, call);
  return Invoke(NextStub(), &v1::BlockService::Stub::CloseSession, &ctx, request).status();
}

absl::StatusOr<std::vector<v1::SessionInfo>> Client::ListSessions(const CallOptions& call) {
  grpc::ClientContext ctx;
  Prepare(&ctx, call);
  auto r = Invoke(NextStub(), &v1::BlockService::Stub::ListSessions, &ctx, v1::ListSessionsRequest());
  if (!r.ok()) return r.status();
  return std::vector<v1::SessionInfo>(r->sessions().begin(), r->sessions().end());
}

absl::StatusOr<v1::GetCollectiveIdResponse> Client::GetCollectiveId(absl::string_view backend,
                                                                    const CallOptions& call) {
  v1::GetCollectiveIdRequest request;
  request.set_backend(std::string(backend));
  grpc::ClientContext ctx;
  Prepare(&ctx, call);
  return Invoke(NextStub(), &v1::BlockService::Stub::GetCollectiveId, &ctx, request);
}

absl::StatusOr<v1::GroupInfo> Client::JoinGroup(const v1::JoinGroupRequest& request, const CallOptions& call) {
  grpc::ClientContext ctx;
  Prepare(&ctx, call);
  return Invoke(NextStub(), &v1::BlockService::Stub::JoinGroup, &ctx, request);
}

absl::Status Client::LeaveGroup(absl::string_view group_id, const CallOptions& call) {
  v1::LeaveGroupRequest request;
  request.set_group_id(std::string(group_id));
  grpc::ClientContext ctx;
  Prepare(&ctx, call);
  return Invoke(NextStub(), &v1::BlockService::Stub::LeaveGroup, &ctx, request).status();
}

absl::StatusOr<v1::GroupInfo> Client::GetGroup(absl::string_view group_id, const CallOptions& call) {
  v1::GetGroupRequest request;
  request.set_group_id(std::string(group_id));
  grpc::ClientContext ctx;
  Prepare(&ctx, call);
  return Invoke(NextStub(), &v1::BlockService::Stub::GetGroup, &ctx, request);
}

absl::StatusOr<std::vector<v1::GroupInfo>> Client::ListGroups(const CallOptions& call) {
  grpc::ClientContext ctx;
  Prepare(&ctx, call);
  auto r = Invoke(NextStub(), &v1::BlockService::Stub::ListGroups, &ctx, v1::ListGroupsRequest());
  if (!r.ok()) return r.status();
  return std::vector<v1::GroupInfo>(r->groups().begin(), r->groups().end());
}

absl::StatusOr<v1::GradNormResponse> Client::GradNorm(const std::vector<std::string>& block_ids,
                                                      absl::string_view group_id, const CallOptions& call) {
  v1::GradNormRequest request;
  for (const std::string& id : block_ids) request.add_block_ids(id);
  request.set_group_id(std::string(group_id));
  grpc::ClientContext ctx;
  Prepare(&ctx, call);
  return Invoke(NextStub(), &v1::BlockService::Stub::GradNorm, &ctx, request);
}

}  // namespace blockd
