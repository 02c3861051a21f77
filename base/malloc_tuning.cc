#include "base/malloc_tuning.h"

#include <malloc.h>

#include <cstdlib>
#include <cstring>

namespace blockd {

bool TuneMallocForLargeBuffers() {
  const char* env = std::getenv("BLOCKD_MALLOC_TUNING");
  if (env != nullptr && std::strcmp(env, "0") == 0) return false;
  constexpr int kKeep = 1 << 30;  // bytes
  bool ok = mallopt(M_ARENA_MAX, 1) == 1;
  ok = mallopt(M_MMAP_THRESHOLD, kKeep) == 1 && ok;
  ok = mallopt(M_TRIM_THRESHOLD, kKeep) == 1 && ok;
  ok = mallopt(M_TOP_PAD, 64 << 20) == 1 && ok;
  return ok;
}

}  // namespace blockd
