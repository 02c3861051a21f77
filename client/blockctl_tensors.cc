// blockctl's subcommands that move tensors: load (safetensors -> LoadWeights), forward (a span on
// random or given input, with an optional backward), download (DownloadTensors -> safetensors).
#include <algorithm>
#include <cstdio>
#include <map>
#include <optional>
#include <iostream>
#include <random>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "base/block_config.h"
#include "client/blockctl.h"
#include "client/blockctl_util.h"

namespace blockd {
namespace {

absl::StatusOr<v1::DType> DTypeFlag(const std::string& text) {
  v1::DType t;
  if (!wire::ParseDType(text, &t)) {
    return absl::InvalidArgumentError(absl::StrCat("--dtype=", text, ": expected float32, bfloat16 or float16"));
  }
  return t;
}

absl::StatusOr<v1::TensorKind> KindFlag(const std::string& text) {
  const std::string k = absl::AsciiStrToLower(text);
  if (k == "weights") return v1::TENSOR_KIND_WEIGHTS;
  if (k == "gradients" || k == "grads") return v1::TENSOR_KIND_GRADIENTS;
  if (k == "adam_m" || k == "m") return v1::TENSOR_KIND_ADAM_M;
  if (k == "adam_v" || k == "v") return v1::TENSOR_KIND_ADAM_V;
  return absl::InvalidArgumentError(absl::StrCat("--kind=", text, ": expected weights, gradients, adam_m or adam_v"));
}

// Converts a tensor's bytes to `dtype` (through float32).
absl::Status ConvertTensor(TensorBytes* t, v1::DType dtype) {
  if (t->dtype == dtype) return absl::OkStatus();
  auto values = wire::DecodeToFloat32(t->dtype, t->data);
  if (!values.ok()) return values.status();
  t->data = wire::EncodeFloat32(values->data(), values->size(), dtype);
  t->dtype = dtype;
  return absl::OkStatus();
}

std::string Describe(const std::vector<int64_t>& shape, v1::DType dtype, const std::vector<float>& values) {
  return absl::StrCat(ShapeString(shape), " ", wire::DTypeName(dtype), " ", SummaryString(Summarize(values)));
}

}  // namespace

int CmdLoad(const std::vector<std::string>& args) {
  GlobalFlags g;
  int64_t layer = -1, chunk_bytes = 1 << 20;
  std::string prefix, dtype_text;
  FlagSet flags("blockctl load BLOCK FILE [--layer=N]",
                "LoadWeights from a safetensors FILE, a sharded checkpoint's *.safetensors.index.json, or a\n"
                "Hugging Face checkpoint directory (its index, else its *.safetensors files).\n"
                "The tensors must carry the names of one decoder layer (input_layernorm.weight,\n"
                "self_attn.q_proj.weight, ...); --layer N takes model.layers.N.* from a whole model and strips\n"
                "the prefix. Tensors go in their file dtype unless --dtype says otherwise.");
  flags.Int("layer", &layer, "take model.layers.N.* from a whole-model checkpoint");
  flags.String("prefix", &prefix, "take the tensors named PREFIX* and strip PREFIX (instead of --layer)");
  flags.String("dtype", &dtype_text, "convert to float32, bfloat16 or float16 before sending");
  flags.Int("chunk_bytes", &chunk_bytes, "bytes per stream chunk (the server allows up to its max_chunk_bytes)");
  std::vector<std::string> pos;
  if (int rc = ParseCommandLine(&flags, &g, args, &pos, "load"); rc >= 0) return rc;
  if (pos.size() != 2) return UsageError("load", "load takes a BLOCK id and a FILE");
  if (layer >= 0 && prefix.empty()) prefix = absl::StrCat("model.layers.", layer, ".");
  if (chunk_bytes < 1) return UsageError("load", "--chunk_bytes must be > 0");
  std::optional<v1::DType> dtype;
  if (!dtype_text.empty()) {
    auto d = DTypeFlag(dtype_text);
    if (!d.ok()) return UsageError("load", std::string(d.status().message()));
    dtype = *d;
  }
  auto ckpt = SafetensorsCheckpoint::Open(pos[1]);
  if (!ckpt.ok()) return Fail(ckpt.status());
  if (prefix.empty()) {
    const auto layer_tensor = std::find_if(ckpt->names().begin(), ckpt->names().end(), [](const std::string& name) {
      return absl::StartsWith(name, "model.layers.");
    });
    if (layer_tensor != ckpt->names().end()) {
      return UsageError("load", absl::StrCat(pos[1], " holds a whole model (", *layer_tensor,
                                             "): pick one layer with --layer=N"));
    }
  }
  auto tensors = ckpt->ReadPrefix(prefix);
  if (!tensors.ok()) return Fail(tensors.status());
  // Older Llama checkpoints carry the RoPE frequency table as a buffer; the block computes it.
  const size_t before = tensors->size();
  tensors->erase(std::remove_if(tensors->begin(), tensors->end(),
                                [](const TensorBytes& t) { return absl::EndsWith(t.name, "rotary_emb.inv_freq"); }),
                 tensors->end());
  if (tensors->size() != before) std::cout << "skipped " << before - tensors->size() << " rotary_emb.inv_freq buffer(s)\n";
  if (tensors->empty()) return Fail(absl::NotFoundError(absl::StrCat(pos[1], " holds no weights to load")));
  int64_t bytes = 0;
  for (TensorBytes& t : *tensors) {
    if (dtype.has_value()) {
      if (absl::Status s = ConvertTensor(&t, *dtype); !s.ok()) return Fail(s);
    }
    bytes += static_cast<int64_t>(t.data.size());
  }
  auto client = ConnectWith(g, chunk_bytes);
  if (!client.ok()) return Fail(client.status());
  const absl::Time start = absl::Now();
  absl::StatusOr<v1::LoadWeightsResponse> r;
  {
    ProgressBar bar(absl::StrCat("load ", pos[0]));
    r = (*client)->LoadWeights(pos[0], *tensors, bar.Callback());
  }
  if (!r.ok()) return Fail(r.status());
  std::cout << absl::StrFormat("loaded %d tensors (%s) into %s in %.3f s\n", r->loaded_size(), HumanBytesString(bytes),
                               r->block_id(), absl::ToDoubleSeconds(absl::Now() - start));
  return kExitOk;
}

int CmdForward(const std::vector<std::string>& args) {
  GlobalFlags g;
  int64_t batch = 1, seq = 16, seed = 0, position_offset = 0;
  std::string dtype_text = "float32", input_file, input_name, output_file;
  bool backward = false;
  FlagSet flags("blockctl forward BLOCK[,BLOCK...] [--batch=B --seq=S | --input=FILE]",
                "Forward through a span of blocks (in the order given) and summarise the output: shape, dtype,\n"
                "mean/std/min/max and the call's time. The input is random normal (--seed) unless --input\n"
                "names a safetensors file. --backward keeps the activations and runs Backward with a random\n"
                "grad_output, which accumulates weight gradients on the blocks.");
  flags.Int("batch", &batch, "batch size of the random input");
  flags.Int("seq", &seq, "sequence length of the random input");
  flags.Int("seed", &seed, "seed of the random input (and grad_output)");
  flags.String("dtype", &dtype_text, "wire dtype: float32, bfloat16 or float16");
  flags.String("input", &input_file, "safetensors file holding the input [batch, seq, hidden]");
  flags.String("input_name", &input_name, "tensor to use from --input (default: its only tensor)");
  flags.Int("position_offset", &position_offset, "RoPE position of the first token");
  flags.String("output", &output_file, "write the output (and grad_input) to this safetensors file");
  flags.Bool("backward", &backward, "also run Backward with a random grad_output");
  std::vector<std::string> pos;
  if (int rc = ParseCommandLine(&flags, &g, args, &pos, "forward"); rc >= 0) return rc;
  std::vector<std::string> ids;
  for (const std::string& p : pos) {
    for (absl::string_view id : absl::StrSplit(p, ',', absl::SkipEmpty())) ids.emplace_back(id);
  }
  if (ids.empty()) return UsageError("forward", "forward takes at least one BLOCK id");
  auto dtype = DTypeFlag(dtype_text);
  if (!dtype.ok()) return UsageError("forward", std::string(dtype.status().message()));
  auto client = ConnectWith(g);
  if (!client.ok()) return Fail(client.status());

  v1::ForwardRequest req;
  for (const std::string& id : ids) req.add_block_ids(id);
  req.set_keep_activations(backward);
  req.set_position_offset(position_offset);
  std::mt19937_64 rng(static_cast<uint64_t>(seed));
  std::normal_distribution<float> normal(0.f, 1.f);
  std::string input_from;
  if (!input_file.empty()) {
    auto t = ReadSafetensor(input_file, input_name);
    if (!t.ok()) return Fail(t.status());
    if (flags.IsSet("dtype")) {
      if (absl::Status s = ConvertTensor(&*t, *dtype); !s.ok()) return Fail(s);
    }
    req.mutable_input()->set_dtype(t->dtype);
    for (int64_t d : t->shape) req.mutable_input()->add_shape(d);
    req.mutable_input()->set_data(std::move(t->data));
    input_from = absl::StrCat("from ", input_file, ":", t->name);
  } else {
    if (batch < 1 || seq < 1) return UsageError("forward", "--batch and --seq must be >= 1");
    auto first = (*client)->GetBlock(ids[0]);
    if (!first.ok()) return Fail(first.status());
    const int64_t hidden = first->config().hidden_size();
    std::vector<float> x(static_cast<size_t>(batch * seq * hidden));
    for (float& v : x) v = normal(rng);
    *req.mutable_input() = wire::MakeTensor(*dtype, {batch, seq, hidden}, x);
    input_from = absl::StrCat("random normal, seed ", seed);
  }
  auto x = wire::TensorToFloat32(req.input());
  if (!x.ok()) return Fail(x.status());
  std::cout << "input       " << Describe(wire::ShapeOf(req.input()), req.input().dtype(), *x) << " (" << input_from
            << ")\n";

  absl::Time start = absl::Now();
  auto y = (*client)->Forward(req);
  const double forward_ms = absl::ToDoubleMilliseconds(absl::Now() - start);
  if (!y.ok()) return Fail(y.status());
  auto out = wire::TensorToFloat32(y->output());
  if (!out.ok()) return Fail(out.status());
  std::cout << "output      " << Describe(wire::ShapeOf(y->output()), y->output().dtype(), *out)
            << absl::StrFormat("  forward %.2f ms over %d blocks\n", forward_ms, ids.size());
  std::vector<TensorBytes> written = {
      {"output", y->output().dtype(), wire::ShapeOf(y->output()), y->output().data()}};

  if (backward) {
    std::vector<float> dy(out->size());
    for (float& v : dy) v = normal(rng);
    start = absl::Now();
    auto dx = (*client)->Backward(y->activation_id(), wire::MakeTensor(y->output().dtype(), wire::ShapeOf(y->output()), dy));
    const double backward_ms = absl::ToDoubleMilliseconds(absl::Now() - start);
    if (!dx.ok()) return Fail(dx.status());
    auto g_in = wire::TensorToFloat32(dx->grad_input());
    if (!g_in.ok()) return Fail(g_in.status());
    std::cout << "grad_input  " << Describe(wire::ShapeOf(dx->grad_input()), dx->grad_input().dtype(), *g_in)
              << absl::StrFormat("  backward %.2f ms\n", backward_ms);
    written.push_back({"grad_input", dx->grad_input().dtype(), wire::ShapeOf(dx->grad_input()), dx->grad_input().data()});
  }
  if (!output_file.empty()) {
    if (absl::Status s = WriteSafetensors(output_file, written, "", {{"blocks", absl::StrJoin(ids, ",")}}); !s.ok()) {
      return Fail(s);
    }
    std::cout << "wrote " << output_file << "\n";
  }
  return kExitOk;
}

int CmdDownload(const std::vector<std::string>& args) {
  GlobalFlags g;
  std::string output, kind_text = "weights", dtype_text = "float32", names, prefix;
  int64_t chunk_bytes = 0;
  FlagSet flags("blockctl download BLOCK [-o FILE] [--kind=weights|gradients|adam_m|adam_v] [--dtype=D]",
                "DownloadTensors of one block. With -o/--output the tensors go to a safetensors file (names\n"
                "prefixed with --prefix, e.g. model.layers.3.); without it each tensor is summarised.");
  flags.String("output", &output, "safetensors file to write");
  flags.String("o", &output, "same as --output");
  flags.String("kind", &kind_text, "weights, gradients, adam_m or adam_v");
  flags.String("dtype", &dtype_text, "float32, bfloat16 or float16");
  flags.String("names", &names, "comma-separated tensor names (default: all)");
  flags.String("prefix", &prefix, "prefix written before each name in the file");
  flags.Int("chunk_bytes", &chunk_bytes, "bytes per stream chunk asked of the server (0: its default)");
  std::vector<std::string> pos;
  if (int rc = ParseCommandLine(&flags, &g, args, &pos, "download"); rc >= 0) return rc;
  if (pos.size() != 1) return UsageError("download", "download takes one BLOCK id");
  auto kind = KindFlag(kind_text);
  if (!kind.ok()) return UsageError("download", std::string(kind.status().message()));
  auto dtype = DTypeFlag(dtype_text);
  if (!dtype.ok()) return UsageError("download", std::string(dtype.status().message()));
  v1::DownloadTensorsRequest req;
  req.set_block_id(pos[0]);
  req.set_kind(*kind);
  req.set_dtype(*dtype);
  req.set_chunk_bytes(chunk_bytes);
  for (absl::string_view n : absl::StrSplit(names, ',', absl::SkipEmpty())) req.add_names(std::string(n));
  auto client = ConnectWith(g);
  if (!client.ok()) return Fail(client.status());
  const absl::Time start = absl::Now();
  absl::StatusOr<std::vector<TensorBytes>> tensors;
  {
    ProgressBar bar(absl::StrCat("download ", pos[0]));
    tensors = (*client)->DownloadTensors(req, bar.Callback());
  }
  if (!tensors.ok()) return Fail(tensors.status());
  int64_t bytes = 0;
  for (const TensorBytes& t : *tensors) bytes += static_cast<int64_t>(t.data.size());
  if (output.empty()) {
    for (const TensorBytes& t : *tensors) {
      auto values = wire::DecodeToFloat32(t.dtype, t.data);
      if (!values.ok()) return Fail(values.status());
      std::cout << absl::StrFormat("%-34s %s\n", t.name, Describe(t.shape, t.dtype, *values));
    }
    return kExitOk;
  }
  const std::map<std::string, std::string> metadata = {
      {"format", "pt"}, {"block_id", pos[0]}, {"kind", absl::AsciiStrToLower(kind_text)}};
  if (absl::Status s = WriteSafetensors(output, *tensors, prefix, metadata); !s.ok()) return Fail(s);
  std::cout << absl::StrFormat("wrote %d tensors (%s) of %s to %s in %.3f s\n", tensors->size(), HumanBytesString(bytes),
                               pos[0], output, absl::ToDoubleSeconds(absl::Now() - start));
  return kExitOk;
}

}  // namespace blockd
