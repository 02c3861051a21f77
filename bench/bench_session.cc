// Decode over gRPC with the C++ client (issue 12's target: a 32-block span at batch 1 over gRPC on
// loopback >= 85% of the same span in process), beside bench/session_grpc.py's Python client:
// creates --blocks frozen bf16 Llama-3-8B-shaped blocks (seeded), opens a session, prefills a
// --prompt-token random input, then decodes --new tokens one at a time on the Infer stream (bf16
// on the wire), each step timed from the request to the decoded response as a client sees it; the
// requests are built before timing. Prints the median step, ms per layer per step as bench_decode
// prints them and, with --in_process_ms (bench_decode's figure for the same span), the share. Then
// the fixed cost of a step: the same steps through a one-block session, and an empty unary call.
//
// --busy_wait decodes again through a client whose Infer stream busy-waits for its answers
// (ClientOptions::busy_wait_steps) and prints its median step beside the sleeping client's.
// --trace prints each decode step's send and answer times ("TRACE <step> <sent> <answered>", unix
// microseconds; "TRACE-BUSY" for the busy-waiting client's) for bench/device/step_times.py
// --client, which sets them beside the daemon's debug log to split the step's time over gRPC into
// its way there, the daemon and its way back.
//
//   bench_session --target=127.0.0.1:50051 [--blocks=32] [--prompt=512] [--new=64] [--in_process_ms=X]
//                 [--busy_wait] [--trace]
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "bench/bench_check.h"
#include "client/client.h"
#include "client/tensor_bytes.h"

using blockd::bench::Check;
using blockd::bench::Now;

int main(int argc, char** argv) {
  std::string target = "127.0.0.1:50051";
  int blocks = 32;
  int64_t prompt = 512, fresh = 64;
  double in_process_ms = 0;
  bool trace = false, busy_wait = false;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a.rfind("--target=", 0) == 0) target = a.substr(9);
    if (a.rfind("--blocks=", 0) == 0) blocks = std::stoi(a.substr(9));
    if (a.rfind("--prompt=", 0) == 0) prompt = std::stoll(a.substr(9));
    if (a.rfind("--new=", 0) == 0) fresh = std::stoll(a.substr(6));
    if (a.rfind("--in_process_ms=", 0) == 0) in_process_ms = std::stod(a.substr(16));
    if (a == "--trace") trace = true;
    if (a == "--busy_wait") busy_wait = true;
  }
  const int64_t d = 4096;
  blockd::ClientOptions o;
  o.target = target;
  o.timeout = absl::Seconds(600);
  auto client = Check(blockd::Client::Connect(o), "connect");
  Check(client->WaitForConnected(absl::Seconds(30)), "wait for the server");
  std::vector<std::string> ids;
  blockd::v1::OpenSessionRequest open;
  for (int b = 0; b < blocks; ++b) {
    blockd::v1::CreateBlockRequest req;
    req.set_block_id("cc-decode-" + std::to_string(b));
    auto* c = req.mutable_config();
    c->set_hidden_size(d);
    c->set_num_attention_heads(32);
    c->set_num_kv_heads(8);
    c->set_head_dim(128);
    c->set_intermediate_size(14336);
    c->set_rms_norm_eps(1e-5);
    c->set_rope_theta(500000);
    req.set_layer_index(b);
    req.set_precision(blockd::v1::PRECISION_BF16);
    req.set_frozen(true);
    req.set_max_seq_len(prompt + fresh);
    req.set_max_batch_size(1);
    req.set_seed(1234 + b);
    Check(client->CreateBlock(req), "create");
    ids.push_back(req.block_id());
    open.add_block_ids(req.block_id());
  }
  open.set_batch_size(1);
  open.set_max_length(static_cast<int32_t>(prompt + fresh));
  std::mt19937 rng(7);
  std::normal_distribution<float> dist;
  auto request = [&](int64_t n) {
    std::vector<float> x(static_cast<size_t>(n * d));
    for (float& v : x) v = dist(rng);
    blockd::v1::InferStepRequest req;
    *req.mutable_hidden_states() = blockd::wire::MakeTensor(blockd::v1::DTYPE_BFLOAT16, {1, n, d}, x);
    return req;
  };
  std::vector<blockd::v1::InferStepRequest> steps;
  for (int64_t i = 0; i < fresh; ++i) steps.push_back(request(1));
  const blockd::v1::InferStepRequest first = request(prompt);
  // One decode through a session of the span: the prompt, then the steps one token at a time; the
  // steps' times sorted, their sent and answered times (--trace) under `label`.
  double prefill = 0;
  auto decode = [&](blockd::Client& c, const char* label) {
    const std::string session = Check(c.OpenSession(open), "open session").session_id();
    auto stream = Check(c.OpenInferStream(), "open the Infer stream");
    blockd::v1::InferStepRequest req = first;
    req.set_session_id(session);
    double t0 = Now();
    Check(stream->Step(req), "prefill");
    if (prefill == 0) prefill = Now() - t0;
    std::vector<double> times;
    std::vector<std::pair<int64_t, int64_t>> sent_answered;  // unix microseconds
    for (blockd::v1::InferStepRequest step : steps) {
      step.set_session_id(session);
      const int64_t sent = absl::ToUnixMicros(absl::Now());
      t0 = Now();
      const blockd::v1::InferStepResponse out = Check(stream->Step(step), "decode step");
      sent_answered.emplace_back(sent, absl::ToUnixMicros(absl::Now()));
      std::vector<float> y = Check(blockd::wire::TensorToFloat32(out.hidden_states()), "decode the output");
      times.push_back(Now() - t0);
      if (!std::all_of(y.begin(), y.end(), [](float v) { return std::isfinite(v); })) {
        std::fprintf(stderr, "a decode step's output is not finite\n");
        std::exit(1);
      }
    }
    Check(stream->Close(), "close the stream");
    Check(c.CloseSession(session), "close session");
    for (size_t i = 0; trace && i < sent_answered.size(); ++i) {
      std::printf("%s %zu %lld %lld\n", label, i, static_cast<long long>(sent_answered[i].first),
                  static_cast<long long>(sent_answered[i].second));
    }
    std::sort(times.begin(), times.end());
    return times;
  };
  const std::vector<double> times = decode(*client, "TRACE");
  // The same decode again from a client whose Infer stream busy-waits for its answers.
  std::vector<double> busy_times;
  if (busy_wait) {
    blockd::ClientOptions b = o;
    b.busy_wait_steps = true;
    auto busy = Check(blockd::Client::Connect(b), "connect the busy-waiting client");
    busy_times = decode(*busy, "TRACE-BUSY");
  }

  // The fixed cost of a step (gRPC both ways, the daemon's upload, download and call handling):
  // the same decode steps through a session over one of the blocks, and a unary call that does
  // no work (GetServerInfo), each the median of their runs.
  blockd::v1::OpenSessionRequest one;
  one.add_block_ids(ids[0]);
  one.set_batch_size(1);
  one.set_max_length(static_cast<int32_t>(prompt + fresh));
  const std::string small = Check(client->OpenSession(one), "open the one-block session").session_id();
  auto one_stream = Check(client->OpenInferStream(), "open the Infer stream");
  blockd::v1::InferStepRequest one_first = first;
  one_first.set_session_id(small);
  double t0 = 0;
  Check(one_stream->Step(one_first), "one-block prefill");
  std::vector<double> one_times, info_times;
  for (blockd::v1::InferStepRequest req : steps) {
    req.set_session_id(small);
    t0 = Now();
    Check(one_stream->Step(req), "one-block decode step");
    one_times.push_back(Now() - t0);
  }
  Check(one_stream->Close(), "close the stream");
  Check(client->CloseSession(small), "close the one-block session");
  for (int i = 0; i < 200; ++i) {
    t0 = Now();
    Check(client->GetServerInfo(), "GetServerInfo");
    info_times.push_back(Now() - t0);
  }
  std::sort(one_times.begin(), one_times.end());
  std::sort(info_times.begin(), info_times.end());
  for (const std::string& id : ids) Check(client->DeleteBlock(id), "delete");
  const double med = times[times.size() / 2], per_layer = med * 1e3 / blocks;
  std::printf("grpc decode (C++ client)  batch   1  %d layers  prompt %lld  new %lld: %.4f ms/layer/step (median "
              "step %.3f ms, %.0f tokens/s)",
              blocks, static_cast<long long>(prompt), static_cast<long long>(fresh), per_layer, med * 1e3, 1 / med);
  if (in_process_ms > 0) std::printf(", %.1f%% of in process (%.4f)", 100 * in_process_ms / per_layer, in_process_ms);
  std::printf("  prefill %.1f ms (first call)\n", prefill * 1e3);
  if (!busy_times.empty()) {
    const double busy_med = busy_times[busy_times.size() / 2];
    std::printf("grpc decode (C++ client, busy-waiting)  batch   1  %d layers: median step %.3f ms (%.3f ms %s the "
                "sleeping client's)\n",
                blocks, busy_med * 1e3, std::fabs(med - busy_med) * 1e3, busy_med <= med ? "under" : "over");
  }
  std::printf("fixed cost per step: a one-block session's decode step %.3f ms (median of %zu), GetServerInfo %.3f "
              "ms (median of %zu)\n",
              one_times[one_times.size() / 2] * 1e3, one_times.size(), info_times[info_times.size() / 2] * 1e3,
              info_times.size());
  return 0;
}
