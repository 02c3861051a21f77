// Run-time loading of cuDNN's graph library and the descriptor builder (see cudnn_api.h).
#include "kernels/cudnn_api.h"

#include <dlfcn.h>

#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <sys/stat.h>

namespace blockd::kernels::cudnn {
namespace {

template <class F>
bool Resolve(void* lib, const char* name, F* out, std::string* missing) {
  *out = reinterpret_cast<F>(dlsym(lib, name));
  if (*out == nullptr) *missing += std::string(missing->empty() ? "" : ", ") + name;
  return *out != nullptr;
}

bool IsDirectory(const std::string& path) {
  struct stat st;
  return stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

// Opens the first loadable candidate and resolves the entry points; on failure `why` lists
// every attempt.
bool Load(Api* api, std::string* why) {
  std::vector<std::string> candidates;
  if (const char* env = std::getenv("BLOCKD_CUDNN_PATH"); env != nullptr && *env != '\0') {
    std::string p = env;
    candidates.push_back(IsDirectory(p) ? p + "/libcudnn_graph.so.9" : p);
  }
  candidates.push_back("libcudnn_graph.so.9");
  candidates.push_back("libcudnn.so.9");
  std::string tried;
  for (const std::string& path : candidates) {
    // RTLD_LOCAL: cuDNN's symbols stay out of the global namespace; cuDNN finds its engine
    // libraries (libcudnn_engines_*.so.9, libcudnn_heuristic.so.9) beside itself on its own.
    void* lib = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (lib == nullptr) {
      const char* e = dlerror();
      tried += "\n  " + path + ": " + (e != nullptr ? e : "dlopen failed");
      continue;
    }
    std::string missing;
    bool all = true;
    all &= Resolve(lib, "cudnnGetVersion", &api->GetVersion, &missing);
    all &= Resolve(lib, "cudnnGetErrorString", &api->GetErrorString, &missing);
    all &= Resolve(lib, "cudnnGetLastErrorString", &api->GetLastErrorString, &missing);
    all &= Resolve(lib, "cudnnCreate", &api->Create, &missing);
    all &= Resolve(lib, "cudnnDestroy", &api->Destroy, &missing);
    all &= Resolve(lib, "cudnnSetStream", &api->SetStream, &missing);
    all &= Resolve(lib, "cudnnBackendCreateDescriptor", &api->CreateDescriptor, &missing);
    all &= Resolve(lib, "cudnnBackendDestroyDescriptor", &api->DestroyDescriptor, &missing);
    all &= Resolve(lib, "cudnnBackendSetAttribute", &api->SetAttribute, &missing);
    all &= Resolve(lib, "cudnnBackendGetAttribute", &api->GetAttribute, &missing);
    all &= Resolve(lib, "cudnnBackendFinalize", &api->Finalize, &missing);
    all &= Resolve(lib, "cudnnBackendExecute", &api->Execute, &missing);
    if (!all) {
      tried += "\n  " + path + ": loaded, but lacks " + missing;
      dlclose(lib);
      continue;
    }
    api->version = api->GetVersion();
    // The causal SDPA pattern (GEN_INDEX masks, fused flash engines with GQA) needs cuDNN 9.
    if (api->version < 90000) {
      tried += "\n  " + path + ": cuDNN " + std::to_string(api->version) + " is older than 9.0";
      dlclose(lib);
      continue;
    }
    char resolved[4096] = {0};
    // dlinfo would need _GNU_SOURCE's link_map; dladdr of a resolved symbol names the file.
    Dl_info info;
    if (dladdr(reinterpret_cast<void*>(api->Create), &info) != 0 && info.dli_fname != nullptr) {
      std::snprintf(resolved, sizeof(resolved), "%s", info.dli_fname);
    }
    api->path = resolved[0] != '\0' ? resolved : path;
    return true;
  }
  *why = "cuDNN could not be loaded (set BLOCKD_CUDNN_PATH to libcudnn_graph.so.9 or its folder):" + tried;
  return false;
}

}  // namespace

std::string Api::Describe(cudnnStatus_t status) const {
  char last[1024] = {0};
  if (GetLastErrorString != nullptr) GetLastErrorString(last, sizeof(last));
  std::string s = GetErrorString != nullptr ? GetErrorString(status) : "cudnnStatus";
  s += " (" + std::to_string(static_cast<int>(status)) + ")";
  if (last[0] != '\0') s += ": " + std::string(last);
  return s;
}

const Api* LoadApi(std::string* why) {
  static Api api;
  static std::string load_error;
  static bool loaded = false;
  static std::once_flag once;
  std::call_once(once, [] { loaded = Load(&api, &load_error); });
  if (!loaded) {
    if (why != nullptr) *why = load_error;
    return nullptr;
  }
  return &api;
}

Descriptor Builder::Make(cudnnBackendDescriptorType_t type, const std::string& what) {
  if (!ok()) return Descriptor();
  cudnnBackendDescriptor_t d = nullptr;
  const cudnnStatus_t s = api_->CreateDescriptor(type, &d);
  if (s != CUDNN_STATUS_SUCCESS) {
    Check(s, nullptr, "cudnnBackendCreateDescriptor(" + what + ", type " + std::to_string(int(type)) + ")");
    return Descriptor();
  }
  names_.push_back({d, what});
  return Descriptor(api_, d);
}

void Builder::Set(Descriptor& d, cudnnBackendAttributeName_t attr, const char* attr_name,
                  cudnnBackendAttributeType_t type, int64_t count, const void* values) {
  if (!ok()) return;
  Check(api_->SetAttribute(d.get(), attr, type, count, values), &d, std::string("set ") + attr_name);
}

void Builder::SetDesc(Descriptor& d, cudnnBackendAttributeName_t attr, const char* attr_name,
                      const Descriptor& value) {
  if (!ok()) return;
  cudnnBackendDescriptor_t v = value.get();
  Check(api_->SetAttribute(d.get(), attr, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &v), &d,
        std::string("set ") + attr_name + " = " + NameOf(value));
}

void Builder::Finalize(Descriptor& d) {
  if (!ok()) return;
  Check(api_->Finalize(d.get()), &d, "cudnnBackendFinalize");
}

void Builder::Get(const Descriptor& d, cudnnBackendAttributeName_t attr, const char* attr_name,
                  cudnnBackendAttributeType_t type, int64_t requested, int64_t* count, void* values) {
  if (!ok()) return;
  Check(api_->GetAttribute(d.get(), attr, type, requested, count, values), &d, std::string("get ") + attr_name);
}

void Builder::Fail(cudnnStatus_t status, const std::string& message) {
  if (!ok()) return;
  status_ = status == CUDNN_STATUS_SUCCESS ? CUDNN_STATUS_INTERNAL_ERROR : status;
  error_ = message;
}

std::string Builder::NameOf(const Descriptor& d) const {
  for (const Named& n : names_) {
    if (n.d == d.get()) return n.name;
  }
  return d ? "(unnamed descriptor)" : "(null descriptor)";
}

void Builder::Check(cudnnStatus_t s, const Descriptor* d, const std::string& step) {
  if (s == CUDNN_STATUS_SUCCESS) return;
  status_ = s;
  error_ = (d != nullptr ? NameOf(*d) + ": " : std::string()) + step + " failed: " + api_->Describe(s);
}

void BuildExecutionPlan(Builder& b, cudnnHandle_t handle, const std::vector<cudnnBackendDescriptor_t>& ops,
                        ExecutionPlan* out) {
  const Api* api = b.api();
  out->graph = b.Make(CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR, "operation graph");
  // The handle attributes are marked deprecated in 9.x but still accepted; cudnn-frontend sets them too.
  b.Set(out->graph, CUDNN_ATTR(CUDNN_ATTR_OPERATIONGRAPH_HANDLE), CUDNN_TYPE_HANDLE, 1, &handle);
  b.Set(out->graph, CUDNN_ATTR(CUDNN_ATTR_OPERATIONGRAPH_OPS), CUDNN_TYPE_BACKEND_DESCRIPTOR,
        static_cast<int64_t>(ops.size()), ops.data());
  b.Finalize(out->graph);

  Descriptor heur = b.Make(CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR, "engine heuristics");
  b.SetDesc(heur, CUDNN_ATTR(CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH), out->graph);
  const cudnnBackendHeurMode_t mode = CUDNN_HEUR_MODE_A;
  b.Set(heur, CUDNN_ATTR(CUDNN_ATTR_ENGINEHEUR_MODE), CUDNN_TYPE_HEUR_MODE, 1, &mode);
  b.Finalize(heur);
  int64_t available = 0;
  b.Get(heur, CUDNN_ATTR(CUDNN_ATTR_ENGINEHEUR_RESULTS), CUDNN_TYPE_BACKEND_DESCRIPTOR, 0, &available, nullptr);
  if (!b.ok()) return;
  if (available <= 0) {
    b.Fail(CUDNN_STATUS_NOT_SUPPORTED,
           "engine heuristics (mode A) returned no engine configuration for this graph: " +
               api->Describe(CUDNN_STATUS_NOT_SUPPORTED));
    return;
  }
  // cudnnBackendGetAttribute fills engine-config descriptors that the caller has created.
  std::vector<Descriptor> configs;
  std::vector<cudnnBackendDescriptor_t> raw;
  for (int64_t i = 0; i < available; ++i) {
    configs.push_back(b.Make(CUDNN_BACKEND_ENGINECFG_DESCRIPTOR, "engine config " + std::to_string(i)));
    raw.push_back(configs.back().get());
  }
  int64_t got = 0;
  b.Get(heur, CUDNN_ATTR(CUDNN_ATTR_ENGINEHEUR_RESULTS), CUDNN_TYPE_BACKEND_DESCRIPTOR, available, &got, raw.data());
  if (!b.ok()) return;

  // Not every configuration heuristics list finalizes for every shape; try them in order, as
  // cudnn-frontend does, and keep each refusal for the message.
  std::string refusals;
  for (int64_t i = 0; i < got; ++i) {
    cudnnBackendDescriptor_t p = nullptr;
    cudnnStatus_t s = api->CreateDescriptor(CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR, &p);
    if (s != CUDNN_STATUS_SUCCESS) {
      b.Fail(s, "cudnnBackendCreateDescriptor(execution plan) failed: " + api->Describe(s));
      return;
    }
    Descriptor plan(api, p);
    cudnnBackendDescriptor_t cfg = raw[i];
    s = api->SetAttribute(p, CUDNN_ATTR_EXECUTION_PLAN_HANDLE, CUDNN_TYPE_HANDLE, 1, &handle);
    if (s == CUDNN_STATUS_SUCCESS) {
      s = api->SetAttribute(p, CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &cfg);
    }
    if (s == CUDNN_STATUS_SUCCESS) s = api->Finalize(p);
    // The engine's global index, for diagnostics only.
    int64_t engine_index = -1;
    cudnnBackendDescriptor_t engine = nullptr;
    if (api->CreateDescriptor(CUDNN_BACKEND_ENGINE_DESCRIPTOR, &engine) == CUDNN_STATUS_SUCCESS) {
      Descriptor owned(api, engine);
      int64_t n = 0;
      if (api->GetAttribute(cfg, CUDNN_ATTR_ENGINECFG_ENGINE, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &n, &engine) ==
          CUDNN_STATUS_SUCCESS) {
        api->GetAttribute(engine, CUDNN_ATTR_ENGINE_GLOBAL_INDEX, CUDNN_TYPE_INT64, 1, &n, &engine_index);
      }
    }
    if (s != CUDNN_STATUS_SUCCESS) {
      refusals += "\n  engine config " + std::to_string(i) + " (engine " + std::to_string(engine_index) +
                  "): execution plan " + api->Describe(s);
      continue;
    }
    int64_t n = 0;
    s = api->GetAttribute(p, CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE, CUDNN_TYPE_INT64, 1, &n, &out->workspace_bytes);
    if (s != CUDNN_STATUS_SUCCESS) {
      b.Fail(s, "get CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE failed: " + api->Describe(s));
      return;
    }
    out->plan = std::move(plan);
    out->engine_index = engine_index;
    return;
  }
  b.Fail(CUDNN_STATUS_NOT_SUPPORTED, "no engine configuration of " + std::to_string(got) +
                                         " from heuristics mode A finalized:" + refusals);
}

}  // namespace blockd::kernels::cudnn
