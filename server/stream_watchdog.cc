#include "server/stream_watchdog.h"

#include <utility>
#include <vector>

#include <grpc/grpc.h>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "base/log.h"

namespace blockd {

StreamWatchdog::StreamWatchdog(absl::Duration idle, absl::Duration total, absl::Duration period)
    : idle_(idle), total_(total), period_(period) {
  thread_ = std::thread([this] { Run(); });
}

StreamWatchdog::~StreamWatchdog() {
  stop_.Notify();
  thread_.join();
}

uint64_t StreamWatchdog::Add(grpc::ServerContextBase* ctx, std::string rpc) {
  const absl::Time now = absl::Now();
  absl::MutexLock lock(&mu_);
  const uint64_t id = next_id_++;
  Stream s;
  s.ctx = ctx;
  s.rpc = std::move(rpc);
  s.start = s.last_progress = now;
  streams_.emplace(id, std::move(s));
  return id;
}

void StreamWatchdog::Touch(uint64_t id) {
  const absl::Time now = absl::Now();
  absl::MutexLock lock(&mu_);
  auto it = streams_.find(id);
  if (it != streams_.end()) it->second.last_progress = now;
}

void StreamWatchdog::SetBusy(uint64_t id, bool busy) {
  const absl::Time now = absl::Now();
  absl::MutexLock lock(&mu_);
  auto it = streams_.find(id);
  if (it == streams_.end()) return;
  it->second.busy = busy;
  it->second.last_progress = now;
}

bool StreamWatchdog::Expired(uint64_t id, std::string* why) {
  absl::MutexLock lock(&mu_);
  auto it = streams_.find(id);
  if (it == streams_.end() || !it->second.expired) return false;
  if (why != nullptr) *why = it->second.why;
  return true;
}

void StreamWatchdog::Remove(uint64_t id) {
  absl::MutexLock lock(&mu_);
  streams_.erase(id);
}

int64_t StreamWatchdog::cancelled_total() const {
  absl::MutexLock lock(&mu_);
  return cancelled_;
}

void StreamWatchdog::Run() {
  while (!stop_.WaitForNotificationWithTimeout(period_)) {
    std::vector<std::pair<grpc_call*, std::string>> to_cancel;
    {
      absl::MutexLock lock(&mu_);
      const absl::Time now = absl::Now();
      for (auto& [id, s] : streams_) {
        // While busy the server itself works for the stream (a LoadWeights commit may be applying
        // the weights): ending it then could tell the client "failed" about a change that happened.
        if (s.expired || s.busy) continue;
        if (idle_ > absl::ZeroDuration() && now - s.last_progress > idle_) {
          s.why = absl::StrCat(s.rpc, " stream made no progress for ", absl::FormatDuration(idle_),
                               " (--stream_idle_timeout): the server ended it and freed what it held");
        } else if (total_ > absl::ZeroDuration() && now - s.start > total_) {
          s.why = absl::StrCat(s.rpc, " stream ran longer than ", absl::FormatDuration(total_),
                               " (--stream_max_duration): the server ended it and freed what it held");
        } else {
          continue;
        }
        s.expired = true;
        ++cancelled_;
        // The reference keeps the core call alive after the lock is dropped, even if the reactor
        // finishes and the library releases the call meanwhile.
        grpc_call* call = s.ctx->c_call();
        if (call == nullptr) continue;
        grpc_call_ref(call);
        to_cancel.emplace_back(call, s.why);
      }
    }
    for (auto& [call, why] : to_cancel) {
      BLOCKD_LOG(kWarning, why);
      grpc_call_cancel_with_status(call, GRPC_STATUS_DEADLINE_EXCEEDED, why.c_str(), nullptr);
      grpc_call_unref(call);
    }
  }
}

}  // namespace blockd
