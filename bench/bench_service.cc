// Service benchmark: the training step of bench_engine's span through gRPC on loopback, with bf16
// activations on the wire, to set against the in-process engine (the share lost to transport).
//
//   bench_service --target=127.0.0.1:50051 [--blocks=8] [--shape=qwen] [--iters=10] [--depth=1,2]
//                 [--connections=1] [--transport=grpc|shm]
//
// A step is Forward(keep_activations) -> Backward -> Step over the span; with --depth=N the client
// keeps N micro-batches in flight at once (N threads, one Step after all N), so that one
// micro-batch's transfers overlap another's compute; --connections=N spreads the calls over N HTTP/2
// connections (ClientOptions::connections); --transport=shm sends activations through one
// shared-memory region per micro-batch in flight (same host, blockd --allow_shared_memory; the
// client's copy into the region is timed, as serialisation is on gRPC). Timing: warm-up steps first, then the median
// step time over --iters, inputs rotated among 3 random sets built before timing.
#include <algorithm>
#include <cstdio>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "bench/bench_check.h"
#include "client/client.h"
#include "client/shared_memory_region.h"
#include "client/tensor_bytes.h"
#include "base/malloc_tuning.h"

using blockd::bench::Check;
using blockd::bench::Now;

int main(int argc, char** argv) {
  // The client moves the same large messages as the daemon (BLOCKD_MALLOC_TUNING=0: glibc's defaults).
  const bool malloc_tuned = blockd::TuneMallocForLargeBuffers();
  std::string target = "127.0.0.1:50051", shape = "qwen";
  int blocks = 8, iters = 10, connections = 1;
  std::string transport = "grpc";
  std::vector<int> depths = {1, 2};
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a.rfind("--target=", 0) == 0) target = a.substr(9);
    if (a.rfind("--shape=", 0) == 0) shape = a.substr(8);
    if (a.rfind("--blocks=", 0) == 0) blocks = std::stoi(a.substr(9));
    if (a.rfind("--iters=", 0) == 0) iters = std::stoi(a.substr(8));
    if (a.rfind("--connections=", 0) == 0) connections = std::stoi(a.substr(14));
    if (a.rfind("--transport=", 0) == 0) transport = a.substr(12);
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
  for (int i = 1; i < argc; ++i) probe = probe || std::string(argv[i]) == "--transport_probe";
  blockd::ClientOptions o;
  o.target = target;
  o.timeout = absl::Seconds(300);
  o.connections = connections;
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
  step.mutable_adamw()->set_lr(1e-4);
  step.set_max_grad_norm(1.0);

  // --transport=shm: per micro-batch slot, the input (then the output, in place) at 0 and the
  // gradient (then grad_input, in place) after it.
  const int64_t tensor_bytes = static_cast<int64_t>(fwd[0].input().data().size());
  std::vector<std::unique_ptr<blockd::SharedMemoryRegion>> regions;
  if (transport == "shm") {
    const int most = *std::max_element(depths.begin(), depths.end());
    for (int m = 0; m < most; ++m) {
      regions.push_back(Check(blockd::SharedMemoryRegion::Create(client.get(), 2 * tensor_bytes), "register"));
    }
  } else if (transport != "grpc") {
    std::fprintf(stderr, "--transport=%s: expected grpc or shm\n", transport.c_str());
    return 2;
  }
  auto forward_backward = [&](int set, int m) {
    if (regions.empty()) {
      auto y = Check(client->Forward(fwd[set]), "forward");
      Check(client->Backward(y.activation_id(), grads[set]), "backward");
      return;
    }
    blockd::SharedMemoryRegion& r = *regions[m];
    const blockd::v1::Tensor& x = fwd[set].input();
    blockd::v1::ForwardRequest req;
    *req.mutable_block_ids() = fwd[set].block_ids();
    req.set_keep_activations(true);
    *req.mutable_input() = Check(r.Put(0, x.dtype(), {B, S, d}, x.data()), "put input");
    *req.mutable_output_shared_memory() = r.Ref(0, tensor_bytes);
    auto y = Check(client->Forward(req), "forward");
    blockd::v1::BackwardRequest bwd;
    bwd.set_activation_id(y.activation_id());
    *bwd.mutable_grad_output() = Check(r.Put(tensor_bytes, grads[set].dtype(), {B, S, d}, grads[set].data()), "put grad");
    *bwd.mutable_output_shared_memory() = r.Ref(tensor_bytes, tensor_bytes);
    Check(client->Backward(bwd), "backward");
  };

  std::printf("client malloc: %s; %d connection%s; transport %s\n",
              malloc_tuned ? "tuned for large buffers" : "glibc defaults", connections, connections == 1 ? "" : "s",
              transport.c_str());
  std::printf("%-28s %6s %10s %10s %12s %10s\n", "span over gRPC (bf16 wire)", "depth", "step ms", "fwd+bwd ms",
              "tokens/s", "MB/step");
  for (int depth : depths) {
    std::vector<double> steps, fb;
    for (int it = 0; it < iters + 2; ++it) {
      const double t0 = Now();
      std::vector<std::thread> workers;
      for (int m = 0; m < depth; ++m) {
        workers.emplace_back([&, m] {
          forward_backward((it * depth + m) % 3, m);
        });
      }
      for (std::thread& w : workers) w.join();
      const double t1 = Now();
      Check(client->Step(step), "step");
      const double t2 = Now();
      if (it >= 2) {
        steps.push_back(t2 - t0);
        fb.push_back(t1 - t0);
      }
    }
    std::sort(steps.begin(), steps.end());
    std::sort(fb.begin(), fb.end());
    const double st = steps[steps.size() / 2], f2 = fb[fb.size() / 2];
    const double mb = 4.0 * depth * B * S * d * 2 / 1e6;  // input, output, grad_output, grad_input in bf16
    std::printf("%-28s %6d %10.2f %10.2f %12.0f %10.0f\n", (std::to_string(blocks) + " blocks, " + shape).c_str(),
                depth, st * 1e3, f2 * 1e3, depth * B * S / st, mb);
    std::fflush(stdout);
  }
  regions.clear();  // unregistered before the blocks go
  for (const std::string& id : ids) Check(client->DeleteBlock(id), "delete");
  return 0;
}
