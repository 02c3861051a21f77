// blockctl generate BLOCK_IDS --hf DIR --prompt-ids 1,2,3: greedy generation through an inference
// session. The embedding, final RMSNorm and LM head are read here from the Hugging Face checkpoint
// directory whose layers were imported (`blockctl import-hf DIR`); the decoder layers are the
// blocks BLOCK_IDS on the server, in order. The prompt is one InferStep (prefill), then each new
// token is one step on one Infer stream, as blockd.RemoteCausalLM.generate does in Python. The
// new token ids go to stdout as they come, space-separated on one line; the rate to stderr. The
// session is closed at the end, whatever happened.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <iostream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "base/block_config.h"
#include "base/status_macros.h"
#include "client/blockctl.h"
#include "client/blockctl_util.h"
#include "proto/hf_config.h"

namespace blockd {
namespace {

namespace fs = std::filesystem;

// The model's parts that stay with the client, in float32.
struct ClientSide {
  int64_t vocab = 0, hidden = 0;
  double eps = 1e-6;
  std::vector<float> embed, norm, head;  // [vocab, hidden], [hidden], [vocab, hidden]
};

absl::StatusOr<std::vector<float>> ReadFloat32(SafetensorsCheckpoint& ckpt, const std::string& name,
                                               const std::vector<int64_t>& shape) {
  ASSIGN_OR_RETURN(TensorBytes t, ckpt.Read(name, name));
  if (t.shape != shape) {
    return absl::InvalidArgumentError(absl::StrCat(ckpt.path(), ": ", name, " has shape ", absl::StrJoin(t.shape, ","),
                                                   ", config.json implies ", absl::StrJoin(shape, ",")));
  }
  return wire::DecodeToFloat32(t.dtype, t.data);
}

absl::StatusOr<ClientSide> ReadClientSide(const std::string& dir) {
  const std::string config_path = (fs::path(dir) / "config.json").string();
  std::error_code ec;
  if (!fs::is_regular_file(config_path, ec)) {
    return absl::NotFoundError(absl::StrCat(dir, ": no config.json (expected a Hugging Face checkpoint directory)"));
  }
  ASSIGN_OR_RETURN(nlohmann::json hf, ReadHfConfig(config_path));
  ASSIGN_OR_RETURN(const BlockConfig config, BlockConfigFromHf(hf));
  ClientSide m;
  m.hidden = config.hidden_size;
  m.eps = config.rms_norm_eps;
  if (!hf.contains("vocab_size") || !hf["vocab_size"].is_number_integer() || hf["vocab_size"].get<int64_t>() < 1) {
    return absl::InvalidArgumentError(absl::StrCat(config_path, ": expected an integer vocab_size >= 1"));
  }
  m.vocab = hf["vocab_size"].get<int64_t>();
  ASSIGN_OR_RETURN(SafetensorsCheckpoint ckpt, SafetensorsCheckpoint::Open(dir));
  ASSIGN_OR_RETURN(m.embed, ReadFloat32(ckpt, "model.embed_tokens.weight", {m.vocab, m.hidden}));
  ASSIGN_OR_RETURN(m.norm, ReadFloat32(ckpt, "model.norm.weight", {m.hidden}));
  if (ckpt.Contains("lm_head.weight")) {
    ASSIGN_OR_RETURN(m.head, ReadFloat32(ckpt, "lm_head.weight", {m.vocab, m.hidden}));
  } else if (hf.value("tie_word_embeddings", false)) {
    m.head = m.embed;
  } else {
    return absl::InvalidArgumentError(absl::StrCat(dir, ": no lm_head.weight and tie_word_embeddings is not set"));
  }
  return m;
}

// Greedy next token from the last layer's hidden state of one position: argmax of
// head · (rmsnorm(h) * norm), as Hugging Face's RMSNorm and LM head compute it in float32.
int64_t NextToken(const ClientSide& m, const float* h) {
  double sum_squares = 0;
  for (int64_t i = 0; i < m.hidden; ++i) sum_squares += double(h[i]) * h[i];
  const float inv = 1.0f / std::sqrt(static_cast<float>(sum_squares / m.hidden) + static_cast<float>(m.eps));
  std::vector<float> n(m.hidden);
  for (int64_t i = 0; i < m.hidden; ++i) n[i] = m.norm[i] * (h[i] * inv);
  int64_t best = 0;
  float best_logit = -INFINITY;
  for (int64_t v = 0; v < m.vocab; ++v) {
    const float* w = &m.head[v * m.hidden];
    float logit = 0;
    for (int64_t i = 0; i < m.hidden; ++i) logit += w[i] * n[i];
    if (logit > best_logit) best_logit = logit, best = v;
  }
  return best;
}

v1::Tensor Embed(const ClientSide& m, const std::vector<int64_t>& tokens) {
  std::vector<float> x;
  x.reserve(tokens.size() * m.hidden);
  for (int64_t t : tokens) x.insert(x.end(), m.embed.begin() + t * m.hidden, m.embed.begin() + (t + 1) * m.hidden);
  return wire::MakeTensor(v1::DTYPE_FLOAT32, {1, static_cast<int64_t>(tokens.size()), m.hidden}, x);
}

class GenerateCommand : public Command {
 public:
  void AddFlags(FlagSet* f) override {
    f->String("hf", &hf_dir_, "Hugging Face checkpoint dir: embedding, final norm and LM head (required)");
    f->String("prompt_ids", &prompt_text_, "the prompt's token ids, comma-separated (required)");
    f->Int("max_new_tokens", &max_new_tokens_, "tokens to generate");
    f->Int("eos_id", &eos_id_, "stop after this token (-1: none)");
  }

  absl::Status Run(Invocation& in) override {
    std::vector<std::string> ids;
    for (const std::string& p : in.args()) {
      for (absl::string_view id : absl::StrSplit(p, ',', absl::SkipEmpty())) ids.emplace_back(id);
    }
    if (ids.empty()) return Usage("generate takes at least one BLOCK id");
    if (hf_dir_.empty()) return Usage("--hf=DIR is required: the checkpoint the blocks were imported from");
    if (max_new_tokens_ < 1 || max_new_tokens_ > (1 << 30)) return Usage("--max-new-tokens must be in 1..2^30");
    std::vector<int64_t> prompt;
    for (absl::string_view part : absl::StrSplit(prompt_text_, ',', absl::SkipEmpty())) {
      int64_t t = 0;
      if (!absl::SimpleAtoi(absl::StripAsciiWhitespace(part), &t) || t < 0) {
        return Usage(absl::StrCat("--prompt-ids=", prompt_text_, ": expected token ids >= 0 such as 1,2,3"));
      }
      prompt.push_back(t);
    }
    if (prompt.empty()) return Usage("--prompt-ids is required: the prompt's token ids, such as 1,2,3");
    ASSIGN_OR_RETURN(const ClientSide model, ReadClientSide(hf_dir_));
    for (int64_t t : prompt) {
      if (t >= model.vocab) {
        return absl::InvalidArgumentError(
            absl::StrCat("--prompt-ids: token ", t, " is not below ", hf_dir_, "'s vocab_size ", model.vocab));
      }
    }

    ASSIGN_OR_RETURN(Client * client, in.Connect());
    v1::OpenSessionRequest open;
    for (const std::string& id : ids) open.add_block_ids(id);
    open.set_batch_size(1);
    open.set_max_length(static_cast<int32_t>(prompt.size() + max_new_tokens_ - 1));
    ASSIGN_OR_RETURN(const v1::SessionInfo session, client->OpenSession(open));
    const absl::Status generated = Generate(client, session.session_id(), model, prompt);
    const absl::Status closed = client->CloseSession(session.session_id());
    RETURN_IF_ERROR(generated);
    return closed;
  }

 private:
  absl::Status Generate(Client* client, const std::string& session_id, const ClientSide& model,
                        std::vector<int64_t> tokens) {
    CallOptions whole;
    whole.timeout = absl::InfiniteDuration();  // the stream lasts as long as the generation; each step is short
    ASSIGN_OR_RETURN(std::unique_ptr<Client::InferStream> stream, client->OpenInferStream(whole));
    const absl::Time start = absl::Now();
    int64_t produced = 0;
    for (int64_t step = 0; step < max_new_tokens_; ++step) {
      v1::InferStepRequest req;
      req.set_session_id(session_id);
      *req.mutable_hidden_states() = Embed(model, tokens);
      ASSIGN_OR_RETURN(v1::InferStepResponse resp, stream->Step(req));
      ASSIGN_OR_RETURN(std::vector<float> h, wire::TensorToFloat32(resp.hidden_states()));
      if (static_cast<int64_t>(h.size()) != static_cast<int64_t>(tokens.size()) * model.hidden) {
        return absl::InternalError(absl::StrCat("InferStep answered ", h.size(), " values for ", tokens.size(),
                                                " tokens of hidden size ", model.hidden));
      }
      const int64_t next = NextToken(model, h.data() + (tokens.size() - 1) * model.hidden);
      std::cout << (produced ? " " : "") << next << std::flush;
      ++produced;
      tokens = {next};
      if (next == eos_id_) break;
    }
    std::cout << "\n";
    RETURN_IF_ERROR(stream->Close());
    const double seconds = absl::ToDoubleSeconds(absl::Now() - start);
    std::cerr << absl::StrFormat("%d tokens in %.3f s (%.1f tokens/s, prefill included)\n", produced, seconds,
                                 produced / std::max(seconds, 1e-9));
    return absl::OkStatus();
  }

  std::string hf_dir_, prompt_text_;
  int64_t max_new_tokens_ = 16;
  int64_t eos_id_ = -1;
};

}  // namespace

CommandSpec GenerateCommandSpec() {
  return {"generate", "greedy generation through an inference session (embedding and head from --hf)",
          "blockctl generate BLOCK_IDS --hf=DIR --prompt-ids=1,2,3 [--max-new-tokens=N] [--eos-id=ID]",
          "Generate greedily from a model whose decoder layers are the blocks BLOCK_IDS (comma-separated or several\n"
          "arguments, in layer order), imported from the Hugging Face checkpoint DIR (`blockctl import-hf DIR`).\n"
          "The embedding, final RMSNorm and LM head are read from DIR's safetensors here. One inference session:\n"
          "the prompt is one step, then one step per new token on one Infer stream; the session is closed at\n"
          "the end. Prints the new token ids as they come, space-separated on one line; the rate to stderr.",
          {1, -1, "generate takes the BLOCK ids of the model's layers"},
          [] { return std::make_unique<GenerateCommand>(); }};
}

}  // namespace blockd
