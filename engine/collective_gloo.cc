#include "engine/collective_gloo.h"

#include <unistd.h>

#include <chrono>
#include <map>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/mutex.h"
#include "base/echo.h"
#include "base/status_macros.h"
#include "engine/owned.h"
#include "engine/tcp_store.h"
#include "gloo/allreduce.h"
#include "gloo/barrier.h"
#include "gloo/broadcast.h"
#include "gloo/common/error.h"
#include "gloo/math.h"
#include "gloo/rendezvous/context.h"
#include "gloo/rendezvous/prefix_store.h"
#include "gloo/transport/tcp/device.h"

namespace blockd {
namespace {

constexpr absl::string_view kIdMagic = "blockd-gloo/1";

std::chrono::milliseconds Millis(absl::Duration d) {
  return std::chrono::milliseconds(std::max<int64_t>(1, absl::ToInt64Milliseconds(d)));
}

class GlooCollective final : public Collective {
 public:
  GlooCollective(std::shared_ptr<gloo::transport::Device> device, std::shared_ptr<gloo::rendezvous::Context> context,
                 absl::Duration timeout)
      : device_(std::move(device)), context_(std::move(context)), timeout_(Millis(timeout)) {}

  absl::string_view backend() const override { return "gloo"; }
  int rank() const override { return context_->rank; }
  int world_size() const override { return context_->size; }
  int64_t payload_bytes() const override { return payload_bytes_; }

  absl::Status AllReduceSum(float* data, size_t n) override { return AllReduce(data, n); }
  absl::Status AllReduceSum(double* data, size_t n) override { return AllReduce(data, n); }

  absl::Status Broadcast(void* data, size_t bytes, int root) override {
    return Run("broadcast", bytes, [&] {
      gloo::BroadcastOptions opts(context_);
      opts.setOutput(static_cast<uint8_t*>(data), bytes);
      opts.setRoot(root);
      opts.setTag(tag_++);
      opts.setTimeout(timeout_);
      gloo::broadcast(opts);
    });
  }

 private:
  template <class T>
  absl::Status AllReduce(T* data, size_t n) {
    return Run("all-reduce", n * sizeof(T), [&] {
      gloo::AllreduceOptions opts(context_);
      opts.setOutput(data, n);  // no input: in place
      opts.setReduceFunction(static_cast<void (*)(void*, const void*, const void*, size_t)>(&gloo::sum<T>));
      opts.setTag(tag_++);
      opts.setTimeout(timeout_);
      gloo::allreduce(opts);
    });
  }

  // Gloo reports a dead or stalled peer by throwing; the context is unusable after that.
  template <class Fn>
  absl::Status Run(const char* what, size_t bytes, Fn fn) {
    if (broken_) return absl::AbortedError(absl::StrCat("the group's Gloo context failed earlier: ", reason_));
    if (bytes == 0) return absl::OkStatus();
    try {
      fn();
    } catch (const std::exception& e) {
      broken_ = true;
      reason_ = e.what();
      return absl::AbortedError(absl::StrCat("Gloo ", what, " of ", bytes, " bytes failed (a member died, stalled ",
                                             "past the group's timeout of ", timeout_.count(), " ms, or left): ",
                                             e.what()));
    }
    payload_bytes_ += static_cast<int64_t>(bytes);
    return absl::OkStatus();
  }

  std::shared_ptr<gloo::transport::Device> device_;
  std::shared_ptr<gloo::rendezvous::Context> context_;
  std::chrono::milliseconds timeout_;
  uint32_t tag_ = 1;
  int64_t payload_bytes_ = 0;
  bool broken_ = false;
  std::string reason_;
};

class GlooProvider final : public CollectiveProvider {
 public:
  explicit GlooProvider(const GlooOptions& options)
      : stores_(std::string(kIdMagic), options.advertise_host, options.max_pending_ids) {}

  absl::string_view backend() const override { return "gloo"; }
  absl::StatusOr<std::string> NewId(absl::Duration ttl) override { return stores_.NewId(ttl); }
  void Sweep() override { stores_.Sweep(); }

  absl::StatusOr<std::unique_ptr<Collective>> Connect(const std::string& id, int rank, int world_size,
                                                      const std::string& terms, absl::Duration timeout,
                                                      int /*device: host memory*/) override {
    ASSIGN_OR_RETURN(StoreAddress p, ParseStoreId(id, kIdMagic, "Gloo"));
    const absl::Time deadline = absl::Now() + timeout;
    try {
      TcpStoreClient store(p.host, p.port, p.nonce, deadline);
      RETURN_IF_ERROR(ClaimRankAndAgree(store, rank, world_size, terms));
      gloo::transport::tcp::attr attr;
      attr.hostname = stores_.advertise_host();
      auto device = gloo::transport::tcp::CreateDevice(attr);
      auto context = std::make_shared<gloo::rendezvous::Context>(rank, world_size);
      context->setTimeout(Millis(deadline - absl::Now()));
      gloo::rendezvous::PrefixStore prefixed("gloo", store);
      context->connectFullMesh(prefixed, device);
      // Everyone has read every address once all pass the barrier: rank 0 may close the store.
      gloo::BarrierOptions barrier(context);
      barrier.setTimeout(Millis(deadline - absl::Now()));
      gloo::barrier(barrier);
      context->setTimeout(Millis(timeout));
      stores_.Connected(p.nonce);
      return std::unique_ptr<Collective>(new GlooCollective(std::move(device), std::move(context), timeout));
    } catch (const std::exception& e) {
      return absl::AbortedError(absl::StrCat("the group did not form within ", absl::FormatDuration(timeout),
                                             " (every member must call JoinGroup with the same collective id): ",
                                             e.what()));
    }
  }

  PendingStores stores_;
};

}  // namespace

std::unique_ptr<CollectiveProvider> MakeGlooProvider(const GlooOptions& options) {
  return std::make_unique<GlooProvider>(options);
}

}  // namespace blockd
