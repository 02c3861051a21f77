#include "server/backend_select.h"

#include "absl/strings/str_cat.h"
#include "engine/cpu/cpu_backend.h"
#ifdef BLOCKD_HAVE_CUDA
#include "engine/cuda/cuda_backend.h"
#endif

namespace blockd {

namespace {

// The CPU backend has one attention, its own; asking for cuDNN there is an error at start.
absl::StatusOr<BackendChoice> CpuChoice(std::string reason, const std::string& attention) {
  if (attention == "cudnn") {
    return absl::FailedPreconditionError(
        absl::StrCat("--attention=cudnn needs the CUDA backend, but ", reason));
  }
  BackendChoice choice;
  choice.backend = MakeCpuBackend();
  choice.reason = std::move(reason);
  choice.attention = {"native", "backend cpu: its own attention (--attention applies to the CUDA backend)"};
  return choice;
}

}  // namespace

absl::StatusOr<BackendChoice> SelectBackend(const std::string& which, const std::string& attention) {
  if (which != "auto" && which != "cpu" && which != "cuda") {
    return absl::InvalidArgumentError(absl::StrCat("--backend=", which, ", expected auto, cpu or cuda"));
  }
  if (attention != "auto" && attention != "cudnn" && attention != "native") {
    return absl::InvalidArgumentError(absl::StrCat("--attention=", attention, ", expected auto, cudnn or native"));
  }
  if (which == "cpu") return CpuChoice("--backend=cpu", attention);
#ifdef BLOCKD_HAVE_CUDA
  CudaBackendOptions options;
  options.attention = *ParseAttentionMode(attention);
  auto cuda = MakeCudaBackend(options);
  if (cuda.ok()) {
    BackendChoice choice;
    choice.backend = std::move(cuda).value();
    choice.reason = absl::StrCat("--backend=", which, ": CUDA device found");
    choice.attention = CudaAttentionSummary(*choice.backend);
    return choice;
  }
  // --attention=cudnn cannot be met on the CPU backend: say why the CUDA backend failed instead.
  if (attention == "cudnn") return cuda.status();
  const std::string why = std::string(cuda.status().message());
#else
  const std::string why = "this blockd was built without the CUDA backend (-DBLOCKD_CUDA=OFF or no nvcc)";
#endif
  if (which == "cuda") return absl::FailedPreconditionError(absl::StrCat("--backend=cuda: ", why));
  return CpuChoice(absl::StrCat("--backend=auto: no usable CUDA device (", why, "), using the CPU backend"),
                   attention);
}

}  // namespace blockd
