// Ends streaming calls that stall. A LoadWeights whose client stops sending, or a DownloadTensors
// whose client stops reading, otherwise holds its concurrency slot and its buffers until the
// client cancels, which a hostile or wedged client never does. The watchdog cancels a stream that
// made no progress for `idle` or ran longer than `total`, with DEADLINE_EXCEEDED and a message
// that says which limit it hit; the reactor's pending read or write then fails and it frees what
// it holds.
//
// A cancel from outside the stream's own callbacks must not race with the reactor deleting itself:
// Remove() takes the same lock as the scan, and the scan holds a reference on the core call while
// it cancels, outside the lock (the cancel may run the reactor's callbacks inline).
//
//   StreamWatchdog dog(absl::Seconds(60), absl::Minutes(30));
//   uint64_t id = dog.Add(ctx, "LoadWeights");   // in the reactor's constructor
//   dog.Touch(id);                                 // on every chunk read or written
//   if (dog.Expired(id)) ...                       // in OnReadDone(false)/OnWriteDone(false)
//   dog.Remove(id);                                // in OnDone, before `delete this`
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <thread>

#include <grpcpp/server_context.h>

#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"

namespace blockd {

class StreamWatchdog {
 public:
  // Zero `idle` or `total`: that limit is off.
  StreamWatchdog(absl::Duration idle, absl::Duration total, absl::Duration period = absl::Milliseconds(250));
  ~StreamWatchdog();
  StreamWatchdog(const StreamWatchdog&) = delete;
  StreamWatchdog& operator=(const StreamWatchdog&) = delete;

  uint64_t Add(grpc::ServerContextBase* ctx, std::string rpc);
  void Touch(uint64_t id);
  // While busy, the server itself is working for the stream (reading a tensor, committing the
  // weights): neither limit ends it then.
  void SetBusy(uint64_t id, bool busy);
  // Whether the watchdog cancelled this stream (and why, for the call's status).
  bool Expired(uint64_t id, std::string* why = nullptr);
  void Remove(uint64_t id);
  int64_t cancelled_total() const;

 private:
  struct Stream {
    grpc::ServerContextBase* ctx = nullptr;
    std::string rpc;
    absl::Time start, last_progress;
    bool busy = false;
    bool expired = false;
    std::string why;
  };
  void Run();

  const absl::Duration idle_, total_, period_;
  mutable absl::Mutex mu_;
  std::map<uint64_t, Stream> streams_ ABSL_GUARDED_BY(mu_);
  uint64_t next_id_ ABSL_GUARDED_BY(mu_) = 1;
  int64_t cancelled_ ABSL_GUARDED_BY(mu_) = 0;
  absl::Notification stop_;
  std::thread thread_;
};

}  // namespace blockd
