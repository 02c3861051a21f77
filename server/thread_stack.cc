// Raises small thread stack requests to 1 MiB, process-wide.
//
// cuBLASLt carries a ~94 KB static TLS segment, which glibc carves out of every thread's stack.
// Debian's prometheus-cpp starts civetweb threads with a 100 KB stack, so in a process that links
// cuBLAS those threads cannot be created and prometheus::Exposer throws "null context when
// constructing CivetServer". Defining pthread_attr_setstacksize in the executable interposes on
// the libc one for every library (the executable is linked with ENABLE_EXPORTS so the symbol is
// exported); requests below 1 MiB are raised, others pass through unchanged. Linked into every
// executable that may hold both cuBLAS and the metrics exposer (blockd, its tests, benchmarks).
#include <dlfcn.h>
#include <pthread.h>

#include <cstddef>

extern "C" int pthread_attr_setstacksize(pthread_attr_t* attr, size_t size) {
  using Fn = int (*)(pthread_attr_t*, size_t);
  static Fn real = reinterpret_cast<Fn>(dlsym(RTLD_NEXT, "pthread_attr_setstacksize"));
  constexpr size_t kMinStack = size_t{1} << 20;
  return real(attr, size < kMinStack ? kMinStack : size);
}
