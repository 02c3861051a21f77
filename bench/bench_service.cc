// Service benchmark: the training step of bench_engine's span through gRPC on loopback, with bf16
// activations on the wire, to set against the in-process engine (the share lost to transport).
//
//   bench_service --target=127.0.0.1:50051 [--blocks=8] [--shape=qwen] [--iters=10] [--depth=1,2]
//                 [--connections=1] [--transport=grpc|shm|shm_in_place|cuda_ipc|cuda_ipc_in_place|cuda_auto]
//                 [--micro_batches=N] [--trace] [--step_early_ms=X]
//
// A step is Forward(keep_activations) -> Backward -> Step over the span; with --depth=N the client
// keeps N micro-batches in flight at once (N threads, one Step after all N), so that one
// micro-batch's transfers overlap another's compute; --micro_batches=M (M >= N) makes a step M
// micro-batches (gradient accumulation), the N threads taking the next one as each finishes, so
// that one micro-batch's turnaround (its output back, its gradient over) overlaps the others'
// compute instead of all N turning around at once; --connections=N spreads the calls over N HTTP/2
// connections (ClientOptions::connections); --transport=shm sends activations through one
// shared-memory region per micro-batch in flight (same host, blockd --allow_shared_memory; the
// client's copy into the region is timed, as serialisation is on gRPC; shm_in_place: a client whose
// tensors are made in the region, as a loader writing there would, and the replies read there);
// --transport=cuda_ipc keeps the client's tensors on the daemon's GPU and sends them through one
// CUDA IPC region per micro-batch in flight (client/cuda_ipc_region.h; the copies into the region
// and the replies' copies out of it are timed); cuda_ipc_in_place is a client whose tensors are made
// in the region and read from it (input, gradient, output, grad_input side by side; only the event
// is recorded per call); cuda_auto is a client whose tensors live on the GPU calling through
// CudaActivations (client/cuda_activations.h), which picks CUDA IPC by itself. Timing: warm-up steps first, then the median
// step time over --iters, inputs rotated among 3 random sets built before timing.
//
// --step_early_ms=X, a bound, not a way to train: the Step goes X ms after the step's last Backward
// was sent, while the Backwards still run, instead of after their replies. The daemon queues its
// gradient norm behind them on the device, so this is what a Step queued behind the last Backward
// would save at the step's turn (the wire contract has no such call). Unsafe as a client's practice:
// a Backward that had not started when the Step arrived would add its gradient to the next step.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "bench/bench_check.h"
#include "client/client.h"
#include "client/shared_memory_region.h"
#include "client/tensor_bytes.h"
#include "base/malloc_tuning.h"
#ifdef BLOCKD_BENCH_CUDA_IPC
#include <cuda_runtime.h>

#include "client/cuda_activations.h"
#include "client/cuda_ipc_region.h"
#endif

using blockd::bench::Check;
using blockd::bench::Now;

namespace {

// --trace: when each call of a step began and ended, for the last step timed at each depth (ms
// from the step's start, by micro-batch): where a step's time goes beside the compute.
struct Trace {
  bool on = false;
  std::mutex mu;
  struct Span {
    double start, end;
    int micro_batch;
    const char* what;
  };
  std::vector<Span> spans;
  std::atomic<int> backwards_sent{0};  // this step's, for --step_early_ms

  // Runs f, noting its span.
  template <class F>
  auto operator()(int micro_batch, const char* what, F f) {
    const double start = Now();
    if (std::string_view(what) == "Backward") ++backwards_sent;
    auto out = f();
    if (on) {
      std::lock_guard<std::mutex> lock(mu);
      spans.push_back({start, Now(), micro_batch, what});
    }
    return out;
  }
  void Print(double t0) {
    std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) { return a.start < b.start; });
    for (const Span& sp : spans) {
      std::printf("  trace micro-batch %d %-14s %9.2f -> %9.2f ms (%.2f)\n", sp.micro_batch, sp.what,
                  (sp.start - t0) * 1e3, (sp.end - t0) * 1e3, (sp.end - sp.start) * 1e3);
    }
    spans.clear();
  }
};

}  // namespace

int main(int argc, char** argv) {
  // The client moves the same large messages as the daemon (BLOCKD_MALLOC_TUNING=0: glibc's defaults).
  const bool malloc_tuned = blockd::TuneMallocForLargeBuffers();
  std::string target = "127.0.0.1:50051", shape = "qwen";
  int blocks = 8, iters = 10, connections = 1;
  std::string transport = "grpc";
  double lr = 1e-4, max_grad_norm = 1.0;  // --lr=1e-3 --max_grad_norm=0: bench_engine's AdamW step
  std::vector<int> depths = {1, 2};
  int micro_batches = 0;  // per step; 0: the depth
  double step_early_ms = -1;  // < 0: the Step after every Backward's reply
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a.rfind("--target=", 0) == 0) target = a.substr(9);
    if (a.rfind("--shape=", 0) == 0) shape = a.substr(8);
    if (a.rfind("--blocks=", 0) == 0) blocks = std::stoi(a.substr(9));
    if (a.rfind("--iters=", 0) == 0) iters = std::stoi(a.substr(8));
    if (a.rfind("--connections=", 0) == 0) connections = std::stoi(a.substr(14));
    if (a.rfind("--transport=", 0) == 0) transport = a.substr(12);
    if (a.rfind("--lr=", 0) == 0) lr = std::stod(a.substr(5));
    if (a.rfind("--max_grad_norm=", 0) == 0) max_grad_norm = std::stod(a.substr(16));
    if (a.rfind("--micro_batches=", 0) == 0) micro_batches = std::stoi(a.substr(16));
    if (a.rfind("--step_early_ms=", 0) == 0) step_early_ms = std::stod(a.substr(16));
    if (a.rfind("--depth=", 0) == 0) {
      depths.clear();
      for (absl::string_view d : absl::StrSplit(a.substr(8), ',')) depths.push_back(std::stoi(std::string(d)));
    }
  }
  int64_t B = 8, S = 2048, d = 1024, H = 16, Hkv = 8, dh = 128, f = 3072;
  bool qk = true;
  if (shape == "llama") B = 1, S = 4096, d = 4096, H = 32, Hkv = 8, dh = 128, f = 14336, qk = false;
  if (shape == "tiny") B = 2, S = 64, d = 64, H = 4, Hkv = 2, dh = 16, f = 128;  // a smoke test on any backend
  const bool cpu = shape == "tiny";

  bool probe = false;
  Trace trace;
  for (int i = 1; i < argc; ++i) {
    probe = probe || std::string(argv[i]) == "--transport_probe";
    trace.on = trace.on || std::string(argv[i]) == "--trace";
  }
  blockd::ClientOptions o;
  o.target = target;
  o.timeout = absl::Seconds(300);
  o.connections = connections;
  if (transport == "cuda_auto") o.transport = blockd::Transport::kAuto;
  auto client = Check(blockd::Client::Connect(o), "connect");
  Check(client->WaitForConnected(absl::Seconds(30)), "wait for the server");
  if (probe) {
    // Transport alone: a Forward of B x S x d bf16 naming no existing block is received and parsed
    // in full, then refused (NOT_FOUND) without compute.
    blockd::v1::ForwardRequest req;
    req.add_block_ids("no-such-block");
    *req.mutable_input() = blockd::wire::MakeTensor(blockd::v1::DTYPE_BFLOAT16, {B, S, d},
                                                    std::vector<float>(B * S * d, 0.5f));
    std::vector<double> t;
    for (int it = 0; it < iters + 2; ++it) {
      const double t0 = Now();
      auto r = client->Forward(req);
      if (r.ok() || r.status().code() != absl::StatusCode::kNotFound) {
        std::fprintf(stderr, "probe: expected NOT_FOUND, got %s\n", r.status().ToString().c_str());
        return 1;
      }
      if (it >= 2) t.push_back(Now() - t0);
    }
    std::sort(t.begin(), t.end());
    const double mb = B * S * d * 2 / 1e6;
    std::printf("transport probe (client malloc %s): %.0f MB request in %.2f ms (%.2f GB/s)\n",
                malloc_tuned ? "tuned" : "defaults", mb, t[t.size() / 2] * 1e3,
                mb / 1e3 / t[t.size() / 2]);
    return 0;
  }
  std::vector<std::string> ids;
  for (int b = 0; b < blocks; ++b) {
    blockd::v1::CreateBlockRequest req;
    req.set_block_id("svc" + std::to_string(b));
    auto* c = req.mutable_config();
    c->set_hidden_size(d);
    c->set_num_attention_heads(H);
    c->set_num_kv_heads(Hkv);
    c->set_head_dim(dh);
    c->set_intermediate_size(f);
    c->set_rms_norm_eps(1e-6);
    c->set_rope_theta(1e6);
    c->set_qk_norm(qk);
    req.set_precision(cpu ? blockd::v1::PRECISION_FP32 : blockd::v1::PRECISION_BF16);
    req.set_max_seq_len(S);
    req.set_max_batch_size(B);
    req.set_seed(100 + b);
    Check(client->CreateBlock(req), "create");
    ids.push_back(req.block_id());
  }
  // Requests built once: the loop measures transport and compute, not the client's own encoding.
  std::mt19937 rng(3);
  std::normal_distribution<float> dist;
  std::vector<blockd::v1::ForwardRequest> fwd(3);
  std::vector<blockd::v1::Tensor> grads(3);
  for (int set = 0; set < 3; ++set) {
    std::vector<float> x(B * S * d), g(B * S * d);
    for (float& v : x) v = dist(rng);
    for (float& v : g) v = dist(rng);
    for (const std::string& id : ids) fwd[set].add_block_ids(id);
    *fwd[set].mutable_input() = blockd::wire::MakeTensor(blockd::v1::DTYPE_BFLOAT16, {B, S, d}, x);
    fwd[set].set_keep_activations(true);
    grads[set] = blockd::wire::MakeTensor(blockd::v1::DTYPE_BFLOAT16, {B, S, d}, g);
  }
  blockd::v1::StepRequest step;
  for (const std::string& id : ids) step.add_block_ids(id);
  step.mutable_adamw()->set_lr(lr);
  step.set_max_grad_norm(max_grad_norm);

  // --transport=shm: per micro-batch slot, the input (then the output, in place) at 0 and the
  // gradient (then grad_input, in place) after it. shm_in_place: the client made its tensors in
  // the region (input, gradient) once, as a loader writing there would; replies after them.
  const int64_t tensor_bytes = static_cast<int64_t>(fwd[0].input().data().size());
  const bool shm_in_place = transport == "shm_in_place";
  std::vector<std::unique_ptr<blockd::SharedMemoryRegion>> regions;
  if (transport == "shm" || shm_in_place) {
    const int most = *std::max_element(depths.begin(), depths.end());
    for (int m = 0; m < most; ++m) {
      regions.push_back(Check(blockd::SharedMemoryRegion::Create(client.get(), (shm_in_place ? 4 : 2) * tensor_bytes),
                              "register"));
      if (shm_in_place) {
        const int set = m % 3;
        Check(regions[m]->Put(0, fwd[set].input().dtype(), {B, S, d}, fwd[set].input().data()), "put input");
        Check(regions[m]->Put(tensor_bytes, grads[set].dtype(), {B, S, d}, grads[set].data()), "put grad");
      }
    }
  }
  const bool ipc_in_place = transport == "cuda_ipc_in_place", cuda_auto = transport == "cuda_auto";
  const bool on_device = transport == "cuda_ipc" || ipc_in_place || cuda_auto;  // the client's tensors on the GPU
  // A micro-batch whose tensors are where the client made them, as slices `ref(offset)` of its
  // region (either kind): input at 0 and gradient after it, read there; output and grad_input
  // written after them.
  auto forward_backward_in_place = [&](int set, int m, const auto& ref) {
    const blockd::v1::DType dtype = fwd[set].input().dtype();
    blockd::v1::ForwardRequest req;
    *req.mutable_block_ids() = fwd[set].block_ids();
    req.set_keep_activations(true);
    *req.mutable_input() = blockd::SliceTensor(dtype, {B, S, d}, ref(0));
    *req.mutable_output_shared_memory() = ref(2 * tensor_bytes);
    auto y = trace(m, "Forward", [&] { return Check(client->Forward(req), "forward"); });
    blockd::v1::BackwardRequest bwd;
    bwd.set_activation_id(y.activation_id());
    *bwd.mutable_grad_output() = blockd::SliceTensor(dtype, {B, S, d}, ref(tensor_bytes));
    *bwd.mutable_output_shared_memory() = ref(3 * tensor_bytes);
    trace(m, "Backward", [&] { return Check(client->Backward(bwd), "backward"); });
  };
#ifdef BLOCKD_BENCH_CUDA_IPC
  // --transport=cuda_ipc: the sets' inputs and gradients in this process's device memory; per
  // micro-batch slot a region (input, then output, at 0; gradient, then grad_input, after it), a
  // stream, and device memory the replies are copied to.
  struct CudaSlot {
    std::unique_ptr<blockd::CudaIpcRegion> region;
    cudaStream_t stream = nullptr;
    void* reply = nullptr;  // output, then grad_input
  };
  std::vector<void*> device_sets;  // input 0, grad 0, input 1, ...
  std::vector<CudaSlot> cuda_slots;
  std::unique_ptr<blockd::CudaActivations> calls;  // cuda_auto
  if (on_device) {
    auto cuda = [](cudaError_t e, const char* what) {
      if (e != cudaSuccess) {
        std::fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(e));
        std::exit(1);
      }
    };
    for (int set = 0; set < 3; ++set) {
      for (const std::string* bytes : {&fwd[set].input().data(), &grads[set].data()}) {
        void* p = nullptr;
        cuda(cudaMalloc(&p, bytes->size()), "cudaMalloc");
        cuda(cudaMemcpy(p, bytes->data(), bytes->size(), cudaMemcpyHostToDevice), "cudaMemcpy");
        device_sets.push_back(p);
      }
    }
    const int most = *std::max_element(depths.begin(), depths.end());
    for (int m = 0; m < most; ++m) {
      CudaSlot slot;
      if (!cuda_auto) {
        slot.region = Check(blockd::CudaIpcRegion::Create(client.get(), 0, (ipc_in_place ? 4 : 2) * tensor_bytes),
                            "register CUDA IPC");
      }
      cuda(cudaStreamCreateWithFlags(&slot.stream, cudaStreamNonBlocking), "cudaStreamCreate");
      if (ipc_in_place) {  // input and gradient once, in their places; output and grad_input after them
        char* at = static_cast<char*>(slot.region->data());
        cuda(cudaMemcpy(at, device_sets[2 * (m % 3)], tensor_bytes, cudaMemcpyDeviceToDevice), "cudaMemcpy");
        cuda(cudaMemcpy(at + tensor_bytes, device_sets[2 * (m % 3) + 1], tensor_bytes, cudaMemcpyDeviceToDevice),
             "cudaMemcpy");
      }
      cuda(cudaMalloc(&slot.reply, tensor_bytes), "cudaMalloc");
      cuda_slots.push_back(std::move(slot));
    }
    if (cuda_auto) calls = std::make_unique<blockd::CudaActivations>(client.get());
  }
  auto forward_backward_ipc = [&](int set, int m) {
    CudaSlot& slot = cuda_slots[m];
    if (cuda_auto) {  // the reply lands in slot.reply, in slot.stream's order
      blockd::v1::ForwardRequest req;
      *req.mutable_block_ids() = fwd[set].block_ids();
      req.set_keep_activations(true);
      req.mutable_input()->set_dtype(fwd[set].input().dtype());
      *req.mutable_input()->mutable_shape() = fwd[set].input().shape();
      auto y = trace(m, "Forward", [&] {
        return Check(calls->Forward(std::move(req), device_sets[2 * set], slot.reply, slot.stream), "forward");
      });
      blockd::v1::BackwardRequest bwd;
      bwd.set_activation_id(y.activation_id());
      bwd.mutable_grad_output()->set_dtype(grads[set].dtype());
      *bwd.mutable_grad_output()->mutable_shape() = grads[set].shape();
      trace(m, "Backward", [&] {
        return Check(calls->Backward(std::move(bwd), device_sets[2 * set + 1], slot.reply, slot.stream), "backward");
      });
      if (cudaStreamSynchronize(slot.stream) != cudaSuccess) Check(absl::InternalError("stream"), "sync");
      return;
    }
    blockd::CudaIpcRegion& r = *slot.region;
    if (ipc_in_place) {  // only the event is recorded
      Check(r.Record(slot.stream), "record");
      return forward_backward_in_place(set, m, [&](int64_t offset) { return r.Ref(offset, tensor_bytes); });
    }
    const blockd::v1::Tensor& x = fwd[set].input();
    blockd::v1::ForwardRequest req;
    *req.mutable_block_ids() = fwd[set].block_ids();
    req.set_keep_activations(true);
    *req.mutable_input() = Check(r.Put(0, x.dtype(), {B, S, d}, device_sets[2 * set], tensor_bytes, slot.stream), "put input");
    *req.mutable_output_shared_memory() = r.Ref(0, tensor_bytes);
    auto y = trace(m, "Forward", [&] { return Check(client->Forward(req), "forward"); });
    Check(r.Get(y.output(), slot.reply, tensor_bytes, slot.stream), "get output");
    blockd::v1::BackwardRequest bwd;
    bwd.set_activation_id(y.activation_id());
    *bwd.mutable_grad_output() =
        Check(r.Put(tensor_bytes, x.dtype(), {B, S, d}, device_sets[2 * set + 1], tensor_bytes, slot.stream), "put grad");
    *bwd.mutable_output_shared_memory() = r.Ref(tensor_bytes, tensor_bytes);
    auto dx = trace(m, "Backward", [&] { return Check(client->Backward(bwd), "backward"); });
    Check(r.Get(dx.grad_input(), slot.reply, tensor_bytes, slot.stream), "get grad_input");
    if (cudaStreamSynchronize(slot.stream) != cudaSuccess) Check(absl::InternalError("stream"), "sync");
  };
#else
  auto forward_backward_ipc = [](int, int) {};
  if (on_device) {
    std::fprintf(stderr, "--transport=%s: bench_service was built without the CUDA backend\n", transport.c_str());
    return 2;
  }
#endif
  if (transport != "grpc" && transport != "shm" && !shm_in_place && !on_device) {
    std::fprintf(stderr, "--transport=%s: expected grpc, shm, shm_in_place, cuda_ipc, cuda_ipc_in_place or cuda_auto\n",
                 transport.c_str());
    return 2;
  }
  auto forward_backward = [&](int set, int m) {
    if (on_device) return forward_backward_ipc(set, m);
    if (regions.empty()) {
      auto y = trace(m, "Forward", [&] { return Check(client->Forward(fwd[set]), "forward"); });
      trace(m, "Backward", [&] { return Check(client->Backward(y.activation_id(), grads[set]), "backward"); });
      return;
    }
    blockd::SharedMemoryRegion& r = *regions[m];
    if (shm_in_place) {
      return forward_backward_in_place(set, m, [&](int64_t offset) { return r.Ref(offset, tensor_bytes); });
    }
    const blockd::v1::Tensor& x = fwd[set].input();
    blockd::v1::ForwardRequest req;
    *req.mutable_block_ids() = fwd[set].block_ids();
    req.set_keep_activations(true);
    *req.mutable_input() = trace(m, "put input", [&] { return Check(r.Put(0, x.dtype(), {B, S, d}, x.data()), "put input"); });
    *req.mutable_output_shared_memory() = r.Ref(0, tensor_bytes);
    auto y = trace(m, "Forward", [&] { return Check(client->Forward(req), "forward"); });
    blockd::v1::BackwardRequest bwd;
    bwd.set_activation_id(y.activation_id());
    *bwd.mutable_grad_output() = trace(m, "put grad", [&] {
      return Check(r.Put(tensor_bytes, grads[set].dtype(), {B, S, d}, grads[set].data()), "put grad");
    });
    *bwd.mutable_output_shared_memory() = r.Ref(tensor_bytes, tensor_bytes);
    trace(m, "Backward", [&] { return Check(client->Backward(bwd), "backward"); });
  };

  std::printf("client malloc: %s; %s; transport %s\n", malloc_tuned ? "tuned for large buffers" : "glibc defaults",
              connections == 0 ? absl::StrCat("connections chosen by the client (at most ", blockd::kAutoConnections, ")").c_str()
                               : absl::StrCat(connections, connections == 1 ? " connection" : " connections").c_str(),
              transport.c_str());
  std::printf("%-28s %6s %10s %10s %12s %10s %14s\n", "span over gRPC (bf16 wire)", "depth", "step ms", "fwd+bwd ms",
              "tokens/s", "MB/step", "micro-batches");
  for (int depth : depths) {
    const int per_step = std::max(depth, micro_batches);
    std::vector<double> steps, fb;
    for (int it = 0; it < iters + 2; ++it) {
      const double t0 = Now();
      trace.backwards_sent = 0;
      std::vector<std::thread> workers;
      std::atomic<int> next{0};
      for (int m = 0; m < depth; ++m) {
        workers.emplace_back([&, m] {
          for (int k = next++; k < per_step; k = next++) forward_backward((it * per_step + k) % 3, m);
        });
      }
      if (step_early_ms >= 0) {  // the Step while the last Backwards run (see the top)
        while (trace.backwards_sent < per_step) std::this_thread::sleep_for(std::chrono::microseconds(50));
        std::this_thread::sleep_for(std::chrono::microseconds(static_cast<int64_t>(step_early_ms * 1e3)));
        trace(-1, "Step (early)", [&] { return Check(client->Step(step), "step"); });
      }
      for (std::thread& w : workers) w.join();
      const double t1 = Now();
      if (step_early_ms < 0) trace(-1, "Step", [&] { return Check(client->Step(step), "step"); });
      const double t2 = Now();
      if (it + 1 < iters + 2) {
        trace.spans.clear();
      } else if (trace.on) {
        trace.Print(t0);
      }
      if (it >= 2) {
        steps.push_back(t2 - t0);
        fb.push_back(t1 - t0);
      }
    }
    std::sort(steps.begin(), steps.end());
    std::sort(fb.begin(), fb.end());
    const double st = steps[steps.size() / 2], f2 = fb[fb.size() / 2];
    const double mb = 4.0 * per_step * B * S * d * 2 / 1e6;  // input, output, grad_output, grad_input in bf16
    std::printf("%-28s %6d %10.2f %10.2f %12.0f %10.0f %14d\n", (std::to_string(blocks) + " blocks, " + shape).c_str(),
                depth, st * 1e3, f2 * 1e3, per_step * B * S / st, mb, per_step);
    std::fflush(stdout);
  }
  regions.clear();  // unregistered before the blocks go
#ifdef BLOCKD_BENCH_CUDA_IPC
  for (CudaSlot& slot : cuda_slots) {
    slot.region.reset();
    cudaStreamDestroy(slot.stream);
    cudaFree(slot.reply);
  }
  calls.reset();
  for (void* p : device_sets) cudaFree(p);
#endif
  for (const std::string& id : ids) Check(client->DeleteBlock(id), "delete");
  return 0;
}
