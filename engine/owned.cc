#include "engine/owned.h"

#include <fcntl.h>
#include <sys/random.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace blockd {
namespace internal {

bool FillRandom(unsigned char* buf, size_t n, RandomSource source) {
  size_t done = 0;
  while (done < n) {
    const ssize_t r = source(buf + done, n - done, 0);
    if (r > 0) {
      done += static_cast<size_t>(r);
    } else if (r == 0 || errno != EINTR) {
      return false;  // 0 bytes would repeat for ever: give up, as for an error
    }
  }
  return true;
}

}  // namespace internal

namespace {

// Fills `buf` from the kernel's CSPRNG. getrandom(2) blocks only until the pool is first seeded
// (early boot); /dev/urandom covers kernels or sandboxes without the syscall.
bool KernelRandomBytes(unsigned char* buf, size_t n) {
  if (internal::FillRandom(buf, n, getrandom)) return true;
  const int fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  size_t done = 0;
  while (done < n) {
    const ssize_t r = read(fd, buf + done, n - done);
    if (r > 0) {
      done += static_cast<size_t>(r);
    } else if (r == 0 || errno != EINTR) {
      break;
    }
  }
  close(fd);
  return done == n;
}

}  // namespace

absl::StatusOr<std::string> NewResourceId(absl::string_view prefix) {
  unsigned char bytes[16];
  if (!KernelRandomBytes(bytes, sizeof(bytes))) {
    return absl::InternalError("the kernel gave no random bytes for a new id (getrandom and /dev/urandom failed)");
  }
  std::string id(prefix);
  for (unsigned char b : bytes) absl::StrAppendFormat(&id, "%02x", b);
  return id;
}

}  // namespace blockd
