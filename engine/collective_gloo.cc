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

struct ParsedId {
  std::string host;
  int port = 0;
  std::string nonce;
};

absl::StatusOr<ParsedId> ParseId(const std::string& id) {
  const std::vector<std::string> parts = absl::StrSplit(id, ' ');
  ParsedId p;
  if (parts.size() != 4 || parts[0] != kIdMagic || parts[1].empty() || parts[1].size() > 253 ||
      !absl::SimpleAtoi(parts[2], &p.port) || p.port <= 0 || p.port > 65535 || parts[3].size() != 37) {
    return absl::InvalidArgumentError(absl::StrCat(
        "collective_id ", Echo(id), " is not a Gloo collective id (expected the bytes GetCollectiveId "
        "returned on rank 0's daemon: \"", kIdMagic, " HOST PORT NONCE\")"));
  }
  p.host = parts[1];
  p.nonce = parts[3];
  return p;
}

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
  explicit GlooProvider(const GlooOptions& options) : options_(options) {
    if (options_.advertise_host.empty()) {
      char name[256] = {0};
      if (::gethostname(name, sizeof(name) - 1) == 0) options_.advertise_host = name;
      if (options_.advertise_host.empty()) options_.advertise_host = "localhost";
    }
  }

  absl::string_view backend() const override { return "gloo"; }

  absl::StatusOr<std::string> NewId(absl::Duration ttl) override {
    Sweep();
    ASSIGN_OR_RETURN(std::string nonce, NewResourceId("gloo-"));
    {
      absl::MutexLock l(&mu_);
      if (static_cast<int64_t>(pending_.size()) >= options_.max_pending_ids) {
        return absl::ResourceExhaustedError(absl::StrCat(
            "this daemon already hosts ", pending_.size(), " collective ids whose groups have not connected (at most ",
            options_.max_pending_ids, "); join with them or wait for them to expire"));
      }
    }
    ASSIGN_OR_RETURN(std::unique_ptr<TcpStoreServer> server, TcpStoreServer::Start(nonce));
    const std::string id = absl::StrCat(kIdMagic, " ", options_.advertise_host, " ", server->port(), " ", nonce);
    absl::MutexLock l(&mu_);
    pending_[nonce] = Pending{std::move(server), absl::Now() + ttl};
    return id;
  }

  absl::StatusOr<std::unique_ptr<Collective>> Connect(const std::string& id, int rank, int world_size,
                                                      const std::string& terms, absl::Duration timeout) override {
    ASSIGN_OR_RETURN(ParsedId p, ParseId(id));
    const absl::Time deadline = absl::Now() + timeout;
    try {
      TcpStoreClient store(p.host, p.port, p.nonce, deadline);
      if (!store.add_if_absent(absl::StrCat("blockd/rank/", rank), std::vector<char>(terms.begin(), terms.end()))) {
        return absl::InvalidArgumentError(absl::StrCat(
            "rank ", rank, " of this collective id has already joined: each member joins once with its own rank, "
            "and a new group needs a new id from GetCollectiveId"));
      }
      std::string verdict = "ok";
      if (rank != 0) {
        const std::vector<char> theirs = store.get("blockd/rank/0");
        const std::string rank0(theirs.begin(), theirs.end());
        if (rank0 != terms) {
          verdict = absl::StrCat("rank ", rank, " joined with ", terms, "; rank 0 with ", rank0);
        }
      }
      store.set(absl::StrCat("blockd/verdict/", rank), std::vector<char>(verdict.begin(), verdict.end()));
      if (verdict != "ok") return absl::FailedPreconditionError(absl::StrCat("the members disagree: ", verdict));
      for (int r = 0; r < world_size; ++r) {
        const std::vector<char> v = store.get(absl::StrCat("blockd/verdict/", r));
        if (std::string(v.begin(), v.end()) != "ok") {
          return absl::FailedPreconditionError(
              absl::StrCat("the members disagree: ", std::string(v.begin(), v.end())));
        }
      }
      gloo::transport::tcp::attr attr;
      attr.hostname = options_.advertise_host;
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
      {
        absl::MutexLock l(&mu_);
        pending_.erase(p.nonce);  // only rank 0's daemon holds it
      }
      return std::unique_ptr<Collective>(new GlooCollective(std::move(device), std::move(context), timeout));
    } catch (const std::exception& e) {
      return absl::AbortedError(absl::StrCat("the group did not form within ", absl::FormatDuration(timeout),
                                             " (every member must call JoinGroup with the same collective id): ",
                                             e.what()));
    }
  }

  void Sweep() override {
    std::vector<std::unique_ptr<TcpStoreServer>> expired;
    {
      absl::MutexLock l(&mu_);
      const absl::Time now = absl::Now();
      for (auto it = pending_.begin(); it != pending_.end();) {
        if (it->second.expires <= now) {
          expired.push_back(std::move(it->second.server));
          it = pending_.erase(it);
        } else {
          ++it;
        }
      }
    }
    // The servers stop (joining their threads) here, outside the lock.
  }

 private:
  struct Pending {
    std::unique_ptr<TcpStoreServer> server;
    absl::Time expires;
  };
  GlooOptions options_;
  absl::Mutex mu_;
  std::map<std::string, Pending> pending_ ABSL_GUARDED_BY(mu_);
};

}  // namespace

std::unique_ptr<CollectiveProvider> MakeGlooProvider(const GlooOptions& options) {
  return std::make_unique<GlooProvider>(options);
}

}  // namespace blockd
