// cuDNN's backend (graph) API, loaded at run time with dlopen so that blockd builds and runs on
// machines without cuDNN; plus an owning descriptor and a builder that keeps the first failure
// with the descriptor and attribute that caused it. Internal to cudnn_attention*.cc.
//
//   std::string why;
//   const cudnn::Api* api = cudnn::LoadApi(&why);   // nullptr: `why` says what was tried
//   cudnn::Builder b(api);
//   cudnn::Descriptor t = b.Make(CUDNN_BACKEND_TENSOR_DESCRIPTOR, "tensor Q");
//   b.Set(t, CUDNN_ATTR(CUDNN_ATTR_TENSOR_UNIQUE_ID), CUDNN_TYPE_INT64, 1, &uid);
//   b.Finalize(t);
//   if (!b.ok()) return b.error();
#pragma once

#include <cuda_runtime.h>
#include <cudnn_graph.h>

#include <cstdint>
#include <string>
#include <vector>

namespace blockd::kernels::cudnn {

// The entry points blockd uses, resolved by dlsym. All live in libcudnn_graph.so.9 (and are
// re-exported by the libcudnn.so.9 shim).
struct Api {
  decltype(&cudnnGetVersion) GetVersion = nullptr;
  decltype(&cudnnGetErrorString) GetErrorString = nullptr;
  decltype(&cudnnGetLastErrorString) GetLastErrorString = nullptr;
  decltype(&cudnnCreate) Create = nullptr;
  decltype(&cudnnDestroy) Destroy = nullptr;
  decltype(&cudnnSetStream) SetStream = nullptr;
  decltype(&cudnnBackendCreateDescriptor) CreateDescriptor = nullptr;
  decltype(&cudnnBackendDestroyDescriptor) DestroyDescriptor = nullptr;
  decltype(&cudnnBackendSetAttribute) SetAttribute = nullptr;
  decltype(&cudnnBackendGetAttribute) GetAttribute = nullptr;
  decltype(&cudnnBackendFinalize) Finalize = nullptr;
  decltype(&cudnnBackendExecute) Execute = nullptr;
  std::string path;    // the file that was loaded
  size_t version = 0;  // cudnnGetVersion(), e.g. 91900

  // "CUDNN_STATUS_BAD_PARAM (2000): <cuDNN's last error message>".
  std::string Describe(cudnnStatus_t status) const;
};

// Loads cuDNN once per process: $BLOCKD_CUDNN_PATH when set (a file, or a folder holding
// libcudnn_graph.so.9), else libcudnn_graph.so.9, else libcudnn.so.9 from the loader's path.
// Returns nullptr and the reason (each path tried and dlerror's answer) when it cannot.
const Api* LoadApi(std::string* why);

// Owns one backend descriptor.
class Descriptor {
 public:
  Descriptor() = default;
  Descriptor(const Api* api, cudnnBackendDescriptor_t d) : api_(api), d_(d) {}
  ~Descriptor() { Reset(); }
  Descriptor(Descriptor&& o) noexcept : api_(o.api_), d_(o.d_) { o.d_ = nullptr; }
  Descriptor& operator=(Descriptor&& o) noexcept {
    if (this != &o) {
      Reset();
      api_ = o.api_;
      d_ = o.d_;
      o.d_ = nullptr;
    }
    return *this;
  }
  Descriptor(const Descriptor&) = delete;
  Descriptor& operator=(const Descriptor&) = delete;

  cudnnBackendDescriptor_t get() const { return d_; }
  // For cudnnBackendGetAttribute, which fills descriptors in place.
  cudnnBackendDescriptor_t* address() { return &d_; }
  explicit operator bool() const { return d_ != nullptr; }
  void Reset() {
    if (d_ != nullptr && api_ != nullptr) api_->DestroyDescriptor(d_);
    d_ = nullptr;
  }

 private:
  const Api* api_ = nullptr;
  cudnnBackendDescriptor_t d_ = nullptr;
};

// Passes an attribute's enum and its name, so that a failure can say which attribute it was.
#define CUDNN_ATTR(name) name, #name

// Creates, sets and finalizes descriptors, stopping at the first failure and keeping a message
// that names the descriptor, the attribute (or step) and cuDNN's status and last error text.
// Calls after a failure do nothing, so graph building reads as a straight line.
class Builder {
 public:
  explicit Builder(const Api* api) : api_(api) {}

  Descriptor Make(cudnnBackendDescriptorType_t type, const std::string& what);
  void Set(Descriptor& d, cudnnBackendAttributeName_t attr, const char* attr_name, cudnnBackendAttributeType_t type,
           int64_t count, const void* values);
  void SetDesc(Descriptor& d, cudnnBackendAttributeName_t attr, const char* attr_name, const Descriptor& value);
  void Finalize(Descriptor& d);
  // cudnnBackendGetAttribute; `count` receives the number of elements cuDNN has.
  void Get(const Descriptor& d, cudnnBackendAttributeName_t attr, const char* attr_name,
           cudnnBackendAttributeType_t type, int64_t requested, int64_t* count, void* values);
  // Records a failure found outside cuDNN (e.g. no engine configuration finalized).
  void Fail(cudnnStatus_t status, const std::string& message);

  bool ok() const { return status_ == CUDNN_STATUS_SUCCESS; }
  cudnnStatus_t status() const { return status_; }
  const std::string& error() const { return error_; }
  const Api* api() const { return api_; }
  // The name Make gave a descriptor (for messages).
  std::string NameOf(const Descriptor& d) const;

 private:
  void Check(cudnnStatus_t s, const Descriptor* d, const std::string& step);

  const Api* api_;
  cudnnStatus_t status_ = CUDNN_STATUS_SUCCESS;
  std::string error_;
  // Descriptor names by handle; a graph has a few dozen descriptors, so a flat list will do.
  struct Named {
    cudnnBackendDescriptor_t d;
    std::string name;
  };
  std::vector<Named> names_;
};

// A finalized execution plan and the operation graph it was made for.
struct ExecutionPlan {
  Descriptor graph;
  Descriptor plan;
  int64_t workspace_bytes = 0;
  int64_t engine_index = -1;  // cuDNN's global engine index, -1 if it could not be read
};

// Finalizes an operation graph of `ops`, asks heuristics mode A for engine configurations, and
// keeps the first one whose execution plan finalizes. On failure the builder's error lists the
// status of each configuration tried (or why heuristics returned none).
void BuildExecutionPlan(Builder& b, cudnnHandle_t handle, const std::vector<cudnnBackendDescriptor_t>& ops,
                        ExecutionPlan* out);

}  // namespace blockd::kernels::cudnn
