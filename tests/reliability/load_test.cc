// Load: N concurrent clients on loopback against the real `blockd`, each looping through the life
// of a block (create, load weights, forward + backward, step, forward, download, delete) plus
// reads (GetServerInfo, ListBlocks, GetBlock) and an occasional bad request, for a fixed time.
//
// Passes when: no call failed other than the bad requests (which must get INVALID_ARGUMENT), the
// daemon's resident memory (VmRSS from /proc) after warm-up stays flat to the end, and at the end
// the server holds no block, no activation handle and no reserved memory. Prints p50/p99/max
// latency per RPC and the memory figures as a Markdown table (LOAD.md records a long run).
//
//   load_test --blockd=build/server/blockd --clients=16 --seconds=300 --warmup_seconds=60
#include <algorithm>
#include <atomic>
#include <cinttypes>
#include <cstdio>
#include <fstream>
#include <map>
#include <mutex>
#include <thread>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "client/client.h"
#include "tests/reliability/daemon_process.h"

ABSL_FLAG(std::string, blockd, "", "path of the blockd executable");
ABSL_FLAG(int, clients, 16, "concurrent clients, each with its own channel");
ABSL_FLAG(int, seconds, 20, "how long the clients run");
ABSL_FLAG(int, warmup_seconds, 5, "memory is judged from the end of the warm-up to the end");
ABSL_FLAG(double, max_rss_growth, 0.10,
          "largest allowed growth of RSS after warm-up (mean of the last third of the samples against the first "
          "third), as a fraction");
ABSL_FLAG(std::string, report, "", "also write the Markdown report to this file");
ABSL_FLAG(std::string, workdir, "/tmp", "where the daemon's log goes");

namespace blockd {
namespace {

using Clock = std::chrono::steady_clock;

struct Recorder {
  std::map<std::string, std::vector<double>> ms;  // RPC -> latencies
  std::map<std::string, int64_t> unexpected;      // "RPC: CODE message" -> count
  int64_t expected_errors = 0;

  template <class Fn>
  auto Time(const std::string& rpc, Fn fn) {
    const auto t0 = Clock::now();
    auto r = fn();
    ms[rpc].push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
    return r;
  }
  void Check(const std::string& rpc, const absl::Status& s) {
    if (!s.ok()) ++unexpected[absl::StrCat(rpc, ": ", s.ToString().substr(0, 200))];
  }
};

v1::BlockConfig LoadConfig() {
  v1::BlockConfig c;
  c.set_hidden_size(64);
  c.set_num_attention_heads(4);
  c.set_num_kv_heads(2);
  c.set_head_dim(16);
  c.set_intermediate_size(128);
  c.set_rms_norm_eps(1e-6);
  c.set_rope_theta(10000);
  c.set_qk_norm(true);
  return c;
}

std::vector<float> Pseudo(size_t n, uint64_t seed, float scale, float shift) {
  std::vector<float> v(n);
  uint64_t s = seed * 0x9e3779b97f4a7c15ull + 1;
  for (float& x : v) {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    x = shift + scale * (static_cast<float>(s % 20001) / 10000.f - 1.f);
  }
  return v;
}

std::vector<TensorBytes> Weights(const v1::BlockConfig& c, uint64_t seed) {
  const int64_t d = c.hidden_size(), f = c.intermediate_size(), hd = c.head_dim();
  const int64_t q = c.num_attention_heads() * hd, kv = c.num_kv_heads() * hd;
  const std::vector<std::pair<std::string, std::vector<int64_t>>> params = {
      {"input_layernorm.weight", {d}},      {"self_attn.q_proj.weight", {q, d}}, {"self_attn.k_proj.weight", {kv, d}},
      {"self_attn.v_proj.weight", {kv, d}}, {"self_attn.o_proj.weight", {d, q}}, {"self_attn.q_norm.weight", {hd}},
      {"self_attn.k_norm.weight", {hd}},    {"post_attention_layernorm.weight", {d}},
      {"mlp.gate_proj.weight", {f, d}},     {"mlp.up_proj.weight", {f, d}},      {"mlp.down_proj.weight", {d, f}}};
  std::vector<TensorBytes> out;
  for (const auto& [name, shape] : params) {
    const size_t n = static_cast<size_t>(wire::NumElements(shape));
    const bool norm = shape.size() == 1;
    const std::vector<float> v = Pseudo(n, seed++, norm ? 0.1f : 0.1f, norm ? 1.f : 0.f);
    out.push_back({name, v1::DTYPE_FLOAT32, shape, wire::EncodeFloat32(v.data(), v.size(), v1::DTYPE_FLOAT32)});
  }
  return out;
}

void ClientLoop(const std::string& target, int index, absl::Time end, Recorder* rec, std::atomic<int64_t>* cycles) {
  ClientOptions o;
  o.target = target;
  o.timeout = absl::Seconds(60);
  o.client_id = absl::StrCat("load-", index);
  auto client_or = Client::Connect(o);
  if (!client_or.ok()) {
    rec->Check("Connect", client_or.status());
    return;
  }
  Client& c = **client_or;
  const v1::BlockConfig config = LoadConfig();
  const std::vector<TensorBytes> weights = Weights(config, 1000 + index);
  const v1::Tensor x = wire::MakeTensor(v1::DTYPE_FLOAT32, {2, 32, 64}, Pseudo(2 * 32 * 64, 7 + index, 1.f, 0.f));
  const v1::Tensor x_bf16 = wire::MakeTensor(v1::DTYPE_BFLOAT16, {2, 32, 64}, Pseudo(2 * 32 * 64, 9 + index, 1.f, 0.f));
  const v1::Tensor dy = wire::MakeTensor(v1::DTYPE_FLOAT32, {2, 32, 64}, Pseudo(2 * 32 * 64, 11 + index, 0.1f, 0.f));
  for (int64_t i = 0; absl::Now() < end; ++i) {
    const std::string id = absl::StrCat("load-", index, "-", i);
    v1::CreateBlockRequest create;
    create.set_block_id(id);
    *create.mutable_config() = config;
    create.set_max_seq_len(64);
    create.set_max_batch_size(2);
    rec->Check("CreateBlock", rec->Time("CreateBlock", [&] { return c.CreateBlock(create).status(); }));
    rec->Check("LoadWeights", rec->Time("LoadWeights", [&] { return c.LoadWeights(id, weights).status(); }));
    for (int m = 0; m < 2; ++m) {
      auto y = rec->Time("Forward(keep)", [&] { return c.Forward({id}, m == 0 ? x : x_bf16, true); });
      rec->Check("Forward(keep)", y.status());
      if (!y.ok()) continue;
      v1::Tensor g = dy;
      if (m == 1) g = wire::MakeTensor(v1::DTYPE_BFLOAT16, {2, 32, 64}, Pseudo(2 * 32 * 64, 13 + index, 0.1f, 0.f));
      rec->Check("Backward", rec->Time("Backward", [&] { return c.Backward(y->activation_id(), g).status(); }));
    }
    v1::StepRequest step;
    step.add_block_ids(id);
    step.set_max_grad_norm(1.0);
    rec->Check("Step", rec->Time("Step", [&] { return c.Step(step).status(); }));
    rec->Check("Forward", rec->Time("Forward", [&] { return c.Forward({id}, x, false).status(); }));
    if (i % 4 == 0) {
      // A bad request now and then: it must be refused without disturbing anyone.
      v1::Tensor bad = x;
      bad.set_shape(2, 65);
      const absl::Status s = rec->Time("Forward(bad)", [&] { return c.Forward({id}, bad, true).status(); });
      if (s.code() == absl::StatusCode::kInvalidArgument) {
        ++rec->expected_errors;
      } else {
        rec->Check("Forward(bad)", s.ok() ? absl::InternalError("a bad input was accepted") : s);
      }
      rec->Check("GetServerInfo", rec->Time("GetServerInfo", [&] { return c.GetServerInfo().status(); }));
      rec->Check("ListBlocks", rec->Time("ListBlocks", [&] { return c.ListBlocks().status(); }));
    }
    rec->Check("GetBlock", rec->Time("GetBlock", [&] { return c.GetBlock(id).status(); }));
    rec->Check("DownloadTensors", rec->Time("DownloadTensors", [&] {
      return c.DownloadTensors(id, i % 2 == 0 ? v1::TENSOR_KIND_WEIGHTS : v1::TENSOR_KIND_ADAM_V).status();
    }));
    rec->Check("DeleteBlock", rec->Time("DeleteBlock", [&] { return c.DeleteBlock(id).status(); }));
    ++*cycles;
  }
}

double Percentile(std::vector<double>& v, double p) {
  if (v.empty()) return 0;
  const size_t k = std::min(v.size() - 1, static_cast<size_t>(p * static_cast<double>(v.size())));
  std::nth_element(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(k), v.end());
  return v[k];
}

int Run() {
  const std::string binary = absl::GetFlag(FLAGS_blockd);
  const int clients = absl::GetFlag(FLAGS_clients);
  const int seconds = absl::GetFlag(FLAGS_seconds);
  const int warmup = absl::GetFlag(FLAGS_warmup_seconds);
  if (binary.empty() || clients < 1 || seconds <= warmup) {
    std::fprintf(stderr, "usage: load_test --blockd=PATH [--clients=16 --seconds=20 --warmup_seconds=5]\n");
    return 2;
  }
  const std::string log = absl::StrCat(absl::GetFlag(FLAGS_workdir), "/blockd-load-", getpid(), ".log");
  auto daemon = testing::DaemonProcess::Start(binary, {"--worker_threads=4"}, log);
  if (!daemon.ok()) {
    std::fprintf(stderr, "cannot start blockd: %s\n", daemon.status().ToString().c_str());
    return 1;
  }
  const int64_t rss_start = (*daemon)->RssBytes();
  const absl::Time start = absl::Now(), end = start + absl::Seconds(seconds);
  std::vector<Recorder> recs(static_cast<size_t>(clients));
  std::atomic<int64_t> cycles{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < clients; ++i) {
    threads.emplace_back(ClientLoop, (*daemon)->target(), i, end, &recs[static_cast<size_t>(i)], &cycles);
  }
  // RSS once a second; the warm-up figure is the one at warmup_seconds.
  std::vector<std::pair<double, int64_t>> rss;  // seconds since start, bytes
  int64_t rss_warm = -1;
  while (absl::Now() < end) {
    absl::SleepFor(absl::Seconds(1));
    const double t = absl::ToDoubleSeconds(absl::Now() - start);
    rss.emplace_back(t, (*daemon)->RssBytes());
    if (rss_warm < 0 && t >= warmup) rss_warm = rss.back().second;
  }
  for (std::thread& t : threads) t.join();
  const int64_t rss_end = (*daemon)->RssBytes();
  // "Flat": the mean of the last third of the samples after warm-up against the mean of the first
  // third (single samples swing by a few percent as allocator arenas come and go).
  std::vector<int64_t> after_warm;
  for (const auto& [t, b] : rss) {
    if (t >= warmup) after_warm.push_back(b);
  }
  const int64_t rss_max_after_warm = after_warm.empty() ? 0 : *std::max_element(after_warm.begin(), after_warm.end());
  auto mean = [](auto begin, auto end) {
    double sum = 0;
    for (auto it = begin; it != end; ++it) sum += static_cast<double>(*it);
    return end == begin ? 0.0 : sum / static_cast<double>(end - begin);
  };
  const size_t third = after_warm.size() / 3;
  const double rss_first_third = mean(after_warm.begin(), after_warm.begin() + static_cast<std::ptrdiff_t>(third));
  const double rss_last_third = mean(after_warm.end() - static_cast<std::ptrdiff_t>(third), after_warm.end());

  // Everything the clients made is gone: no blocks, no handles, no reserved memory.
  ClientOptions o;
  o.target = (*daemon)->target();
  auto checker = Client::Connect(o);
  std::vector<std::string> leftovers;
  if (checker.ok()) {
    auto info = (*checker)->GetServerInfo();
    if (!info.ok()) {
      leftovers.push_back(info.status().ToString());
    } else {
      if (info->blocks() != 0) leftovers.push_back(absl::StrCat(info->blocks(), " blocks"));
      if (info->activations_held() != 0) leftovers.push_back(absl::StrCat(info->activations_held(), " activation handles"));
      if (info->devices(0).memory_used_bytes() != 0) {
        leftovers.push_back(absl::StrCat(info->devices(0).memory_used_bytes(), " bytes reserved"));
      }
    }
  } else {
    leftovers.push_back(checker.status().ToString());
  }
  const bool alive = (*daemon)->running();
  const int exit_status = (*daemon)->Terminate();

  Recorder all;
  for (Recorder& r : recs) {
    for (auto& [rpc, v] : r.ms) all.ms[rpc].insert(all.ms[rpc].end(), v.begin(), v.end());
    for (auto& [what, n] : r.unexpected) all.unexpected[what] += n;
    all.expected_errors += r.expected_errors;
  }
  int64_t calls = 0, unexpected = 0;
  for (auto& [rpc, v] : all.ms) calls += static_cast<int64_t>(v.size());
  for (auto& [what, n] : all.unexpected) unexpected += n;
  const double growth = third > 0 ? (rss_last_third - rss_first_third) / rss_first_third : 1;

  std::string report = absl::StrFormat(
      "%d clients, %d s (warm-up %d s), %d block lifecycles, %d calls (%.0f/s), %d unexpected errors, %d bad "
      "requests refused as expected\n\n",
      clients, seconds, warmup, cycles.load(), calls, static_cast<double>(calls) / seconds, unexpected,
      all.expected_errors);
  absl::StrAppendFormat(&report,
                        "| blockd RSS | MiB |\n|---|---:|\n| at start (idle) | %.1f |\n| after warm-up (%d s) | %.1f |\n"
                        "| mean, first third after warm-up | %.1f |\n| mean, last third | %.1f |\n"
                        "| max after warm-up | %.1f |\n| at the end | %.1f |\n"
                        "| growth after warm-up (last third vs first third) | %+.1f%% |\n\n",
                        rss_start / 1048576.0, warmup, rss_warm / 1048576.0, rss_first_third / 1048576.0,
                        rss_last_third / 1048576.0, rss_max_after_warm / 1048576.0, rss_end / 1048576.0, 100 * growth);
  report += "| RPC | calls | p50 ms | p99 ms | max ms |\n|---|---:|---:|---:|---:|\n";
  for (auto& [rpc, v] : all.ms) {
    const double mx = v.empty() ? 0 : *std::max_element(v.begin(), v.end());
    const double p50 = Percentile(v, 0.50), p99 = Percentile(v, 0.99);
    absl::StrAppendFormat(&report, "| %s | %d | %.2f | %.2f | %.1f |\n", rpc, v.size(), p50, p99, mx);
  }
  report += "\nRSS samples (s: MiB):";
  for (size_t i = 0; i < rss.size(); i += std::max<size_t>(1, rss.size() / 20)) {
    absl::StrAppendFormat(&report, " %.0f: %.1f", rss[i].first, rss[i].second / 1048576.0);
  }
  report += "\n";
  std::fputs(report.c_str(), stdout);
  if (!absl::GetFlag(FLAGS_report).empty()) std::ofstream(absl::GetFlag(FLAGS_report)) << report;

  bool ok = true;
  for (const auto& [what, n] : all.unexpected) {
    std::printf("UNEXPECTED x%" PRId64 ": %s\n", n, what.c_str());
    ok = false;
  }
  if (!alive) {
    std::printf("FAIL: blockd died during the run:\n%s\n", (*daemon)->Log().c_str());
    ok = false;
  }
  if (!leftovers.empty()) {
    for (const std::string& l : leftovers) std::printf("FAIL: after the run the server still holds %s\n", l.c_str());
    ok = false;
  }
  if (growth > absl::GetFlag(FLAGS_max_rss_growth)) {
    std::printf("FAIL: RSS grew %.1f%% after warm-up (limit %.0f%%)\n", 100 * growth,
                100 * absl::GetFlag(FLAGS_max_rss_growth));
    ok = false;
  }
  if (cycles < clients) {
    std::printf("FAIL: only %" PRId64 " block lifecycles completed\n", cycles.load());
    ok = false;
  }
  if (exit_status != 0) {
    std::printf("FAIL: blockd exited with status %d after SIGTERM\n", exit_status);
    ok = false;
  }
  std::printf("%s\n", ok ? "PASS" : "FAIL");
  return ok ? 0 : 1;
}

}  // namespace
}  // namespace blockd

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  return blockd::Run();
}
