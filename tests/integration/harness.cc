#include "tests/integration/harness.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <random>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "engine/cpu/cpu_backend.h"

namespace blockd::testing {

ServerOptions LoopbackOptions(bool with_metrics) {
  ServerOptions o;
  o.listen = "127.0.0.1:0";
  o.metrics_listen = with_metrics ? "127.0.0.1:0" : "";
  o.worker_threads = 4;
  o.housekeeping_period = absl::Milliseconds(200);
  o.shutdown_timeout = absl::Seconds(5);
  o.service.version = "integration-test";
  o.service.backend_reason = "the integration tests run on the CPU backend";
  o.engine.memory_budget_bytes = int64_t{1} << 30;
  return o;
}

std::unique_ptr<Server> StartServer(ServerOptions options) {
  auto s = Server::Start(std::move(options), MakeCpuBackend());
  if (!s.ok()) {
    ADD_FAILURE() << "Server::Start failed: " << s.status().ToString();
    return nullptr;
  }
  return *std::move(s);
}

std::string TargetOf(const Server& server) { return absl::StrCat("127.0.0.1:", server.port()); }

std::unique_ptr<Client> ConnectTo(const Server& server, ClientOptions base) {
  base.target = TargetOf(server);
  auto c = Client::Connect(std::move(base));
  if (!c.ok()) {
    ADD_FAILURE() << "Client::Connect failed: " << c.status().ToString();
    return nullptr;
  }
  return *std::move(c);
}

v1::BlockConfig TinyConfig(bool qk_norm, int64_t hidden) {
  v1::BlockConfig c;
  c.set_hidden_size(hidden);
  c.set_num_attention_heads(4);
  c.set_num_kv_heads(2);
  c.set_head_dim(hidden / 4);
  c.set_intermediate_size(2 * hidden);
  c.set_rms_norm_eps(1e-6);
  c.set_rope_theta(10000);
  c.set_qk_norm(qk_norm);
  return c;
}

v1::CreateBlockRequest CreateRequest(const std::string& id, const v1::BlockConfig& config,
                                     std::optional<uint64_t> seed, int64_t max_batch_size, int64_t max_seq_len) {
  v1::CreateBlockRequest r;
  r.set_block_id(id);
  *r.mutable_config() = config;
  if (seed.has_value()) r.set_seed(*seed);
  r.set_max_batch_size(max_batch_size);
  r.set_max_seq_len(max_seq_len);
  return r;
}

std::vector<ParamShape> ExpectedParams(const v1::BlockConfig& c) {
  const int64_t d = c.hidden_size(), f = c.intermediate_size();
  const int64_t q = c.num_attention_heads() * c.head_dim(), kv = c.num_kv_heads() * c.head_dim();
  std::vector<ParamShape> p = {{"input_layernorm.weight", {d}}};
  // Qwen2's biases follow their projections' weights (ARCHITECTURE.md's table).
  for (auto [part, rows] : {std::pair<const char*, int64_t>{"q", q}, {"k", kv}, {"v", kv}}) {
    p.push_back({absl::StrCat("self_attn.", part, "_proj.weight"), {rows, d}});
    if (c.attention_bias()) p.push_back({absl::StrCat("self_attn.", part, "_proj.bias"), {rows}});
  }
  p.push_back({"self_attn.o_proj.weight", {d, q}});
  if (c.qk_norm()) {
    p.push_back({"self_attn.q_norm.weight", {c.head_dim()}});
    p.push_back({"self_attn.k_norm.weight", {c.head_dim()}});
  }
  p.push_back({"post_attention_layernorm.weight", {d}});
  p.push_back({"mlp.gate_proj.weight", {f, d}});
  p.push_back({"mlp.up_proj.weight", {f, d}});
  p.push_back({"mlp.down_proj.weight", {d, f}});
  return p;
}

int64_t ExpectedParameterCount(const v1::BlockConfig& c) {
  int64_t n = 0;
  for (const ParamShape& p : ExpectedParams(c)) n += wire::NumElements(p.shape);
  return n;
}

std::vector<float> RandomNormal(size_t n, uint64_t seed, float scale) {
  std::mt19937_64 rng(seed * 0x9e3779b97f4a7c15ull + 12345);
  std::normal_distribution<float> normal(0.f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = normal(rng);
  return v;
}

v1::Tensor RandomTensor(std::vector<int64_t> shape, uint64_t seed, v1::DType dtype) {
  return wire::MakeTensor(dtype, shape, RandomNormal(static_cast<size_t>(wire::NumElements(shape)), seed));
}

v1::TensorChunk Chunk(const std::string& block, const TensorBytes& t, int64_t offset, int64_t size) {
  v1::TensorChunk c;
  c.set_block_id(block);
  c.set_name(t.name);
  c.set_dtype(t.dtype);
  for (int64_t d : t.shape) c.add_shape(d);
  c.set_offset(offset);
  c.set_data(t.data.substr(static_cast<size_t>(offset), static_cast<size_t>(size)));
  return c;
}

std::vector<TensorBytes> RandomWeights(const v1::BlockConfig& c, uint64_t seed, v1::DType dtype) {
  std::vector<TensorBytes> out;
  uint64_t k = 0;
  for (const ParamShape& p : ExpectedParams(c)) {
    const size_t n = static_cast<size_t>(wire::NumElements(p.shape));
    std::vector<float> v;
    if (p.shape.size() == 1) {
      v = RandomNormal(n, seed * 100 + k, 0.1f);
      for (float& x : v) x += 1.f;
    } else {
      v = RandomNormal(n, seed * 100 + k, 1.f / std::sqrt(static_cast<float>(p.shape[1])));
    }
    ++k;
    out.push_back({p.name, dtype, p.shape, wire::EncodeFloat32(v.data(), v.size(), dtype)});
  }
  return out;
}

Snapshot Download(Client& client, const std::string& block_id, v1::TensorKind kind, v1::DType dtype) {
  Snapshot out;
  auto tensors = client.DownloadTensors(block_id, kind, dtype);
  if (!tensors.ok()) {
    ADD_FAILURE() << "DownloadTensors(" << block_id << ", " << v1::TensorKind_Name(kind)
                  << ") failed: " << tensors.status().ToString();
    return out;
  }
  for (TensorBytes& t : *tensors) out[t.name] = std::move(t.data);
  return out;
}

BlockState StateOf(Client& client, const std::string& block_id) {
  BlockState s;
  s.weights = Download(client, block_id, v1::TENSOR_KIND_WEIGHTS);
  s.gradients = Download(client, block_id, v1::TENSOR_KIND_GRADIENTS);
  s.adam_m = Download(client, block_id, v1::TENSOR_KIND_ADAM_M);
  s.adam_v = Download(client, block_id, v1::TENSOR_KIND_ADAM_V);
  auto info = client.GetBlock(block_id);
  if (!info.ok()) {
    ADD_FAILURE() << "GetBlock(" << block_id << ") failed: " << info.status().ToString();
    return s;
  }
  s.step = info->step();
  s.has_gradients = info->has_gradients();
  return s;
}

std::string DiffSnapshots(const Snapshot& before, const Snapshot& after) {
  std::vector<std::string> diffs;
  for (const auto& [name, bytes] : before) {
    auto it = after.find(name);
    if (it == after.end()) {
      diffs.push_back(absl::StrCat(name, " is gone"));
      continue;
    }
    if (it->second == bytes) continue;
    if (it->second.size() != bytes.size()) {
      diffs.push_back(absl::StrCat(name, " changed size ", bytes.size(), " -> ", it->second.size()));
      continue;
    }
    size_t i = 0;
    while (i < bytes.size() && bytes[i] == it->second[i]) ++i;
    std::string detail;
    if (bytes.size() % 4 == 0) {
      const size_t e = i / 4;
      float a, b;
      std::memcpy(&a, bytes.data() + 4 * e, 4);
      std::memcpy(&b, it->second.data() + 4 * e, 4);
      detail = absl::StrCat(" (float32 element ", e, ": ", a, " -> ", b, ")");
    }
    diffs.push_back(absl::StrCat(name, " differs from byte ", i, detail));
  }
  for (const auto& [name, bytes] : after) {
    if (before.count(name) == 0) diffs.push_back(absl::StrCat(name, " appeared"));
  }
  return absl::StrJoin(diffs, "; ");
}

std::string DiffStates(const BlockState& before, const BlockState& after) {
  std::vector<std::string> diffs;
  auto add = [&](absl::string_view kind, const Snapshot& a, const Snapshot& b) {
    const std::string d = DiffSnapshots(a, b);
    if (!d.empty()) diffs.push_back(absl::StrCat(kind, ": ", d));
  };
  add("weights", before.weights, after.weights);
  add("gradients", before.gradients, after.gradients);
  add("adam_m", before.adam_m, after.adam_m);
  add("adam_v", before.adam_v, after.adam_v);
  if (before.step != after.step) diffs.push_back(absl::StrCat("step ", before.step, " -> ", after.step));
  if (before.has_gradients != after.has_gradients) {
    diffs.push_back(absl::StrCat("has_gradients ", before.has_gradients, " -> ", after.has_gradients));
  }
  return absl::StrJoin(diffs, "; ");
}

::testing::AssertionResult StatusIs(const absl::Status& s, absl::StatusCode code,
                                    const std::vector<std::string>& parts) {
  if (s.code() != code) {
    return ::testing::AssertionFailure() << "expected " << absl::StatusCodeToString(code) << ", got "
                                         << s.ToString();
  }
  for (const std::string& p : parts) {
    if (s.message().find(p) == absl::string_view::npos) {
      return ::testing::AssertionFailure() << absl::StatusCodeToString(code) << " message \"" << s.message()
                                           << "\" lacks \"" << p << "\"";
    }
  }
  return ::testing::AssertionSuccess();
}

v1::Tensor TrainStep(Client& client, const std::vector<std::string>& ids, const v1::Tensor& input,
                     uint64_t grad_seed) {
  auto y = client.Forward(ids, input, /*keep_activations=*/true);
  if (!y.ok()) {
    ADD_FAILURE() << "Forward failed: " << y.status().ToString();
    return {};
  }
  auto dx = client.Backward(y->activation_id(), RandomTensor(wire::ShapeOf(y->output()), grad_seed, input.dtype()));
  if (!dx.ok()) {
    ADD_FAILURE() << "Backward failed: " << dx.status().ToString();
    return {};
  }
  return dx->grad_input();
}

std::vector<float> Floats(const std::string& bytes) {
  std::vector<float> v(bytes.size() / 4);
  if (!v.empty()) std::memcpy(v.data(), bytes.data(), v.size() * 4);
  return v;
}

std::vector<float> Floats(const v1::Tensor& t) {
  auto v = wire::TensorToFloat32(t);
  if (!v.ok()) {
    ADD_FAILURE() << v.status().ToString();
    return {};
  }
  return *v;
}

std::string MakeTempDir(const std::string& tag) {
  const char* base = std::getenv("TMPDIR");
  std::string templ = absl::StrCat(base != nullptr && *base != '\0' ? base : "/tmp", "/blockd-", tag, "-XXXXXX");
  if (mkdtemp(templ.data()) == nullptr) {
    ADD_FAILURE() << "mkdtemp(" << templ << ") failed: " << std::strerror(errno);
    return "";
  }
  return templ;
}

double MetricValue(const std::string& body, const std::string& family, const std::vector<std::string>& labels) {
  for (absl::string_view line : absl::StrSplit(body, '\n')) {
    if (line.rfind(family + "{", 0) != 0 && line.rfind(family + " ", 0) != 0) continue;
    bool all = true;
    for (const std::string& l : labels) all = all && line.find(l) != absl::string_view::npos;
    if (!all) continue;
    double v;
    if (absl::SimpleAtod(line.substr(line.rfind(' ') + 1), &v)) return v;
  }
  return -1;
}

std::string HttpGetBody(int port, const std::string& path) {
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return "";
  timeval tv{5, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    close(fd);
    return "";
  }
  const std::string req = absl::StrCat("GET ", path, " HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
  if (send(fd, req.data(), req.size(), MSG_NOSIGNAL) != static_cast<ssize_t>(req.size())) {
    close(fd);
    return "";
  }
  std::string reply;
  char buf[8192];
  ssize_t n;
  while ((n = recv(fd, buf, sizeof buf, 0)) > 0) reply.append(buf, static_cast<size_t>(n));
  close(fd);
  const size_t body = reply.find("\r\n\r\n");
  if (reply.rfind("HTTP/1.", 0) != 0 || reply.find(" 200 ") == std::string::npos || body == std::string::npos) {
    return "";
  }
  return reply.substr(body + 4);
}

}  // namespace blockd::testing
