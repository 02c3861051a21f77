#include "server/backend_select.h"

#include "absl/strings/str_cat.h"
#include "engine/cpu/cpu_backend.h"
#ifdef BLOCKD_HAVE_CUDA
#include "engine/cuda/cuda_backend.h"
#endif

namespace blockd {

absl::StatusOr<BackendChoice> SelectBackend(const std::string& which) {
  if (which != "auto" && which != "cpu" && which != "cuda") {
    return absl::InvalidArgumentError(absl::StrCat("--backend=", which, ", expected auto, cpu or cuda"));
  }
  BackendChoice choice;
  if (which == "cpu") {
    choice.backend = MakeCpuBackend();
    choice.reason = "--backend=cpu";
    return choice;
  }
#ifdef BLOCKD_HAVE_CUDA
  auto cuda = MakeCudaBackend();
  if (cuda.ok()) {
    choice.backend = std::move(cuda).value();
    choice.reason = absl::StrCat("--backend=", which, ": CUDA device found");
    return choice;
  }
  const std::string why = std::string(cuda.status().message());
#else
  const std::string why = "this blockd was built without the CUDA backend (-DBLOCKD_CUDA=OFF or no nvcc)";
#endif
  if (which == "cuda") return absl::FailedPreconditionError(absl::StrCat("--backend=cuda: ", why));
  choice.backend = MakeCpuBackend();
  choice.reason = absl::StrCat("--backend=auto: no usable CUDA device (", why, "), using the CPU backend");
  return choice;
}

}  // namespace blockd
