// blockctl's subcommands that move tensors: load (safetensors -> LoadWeights), forward (a span on
// random or given input, with an optional backward or a kept activation handle), download
// (DownloadTensors -> safetensors, which `load` takes back as it is).
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
#include "base/block_config.h"  // ShapeString
#include "base/status_macros.h"
#include "client/blockctl.h"
#include "client/blockctl_util.h"

namespace blockd {
namespace {

absl::StatusOr<v1::DType> DTypeFlag(const std::string& text) {
  v1::DType t;
  if (!wire::ParseDType(text, &t)) return Usage(absl::StrCat("--dtype=", text, ": expected float32, bfloat16 or float16"));
  return t;
}

absl::StatusOr<v1::TensorKind> KindFlag(const std::string& text) {
  const std::string k = absl::AsciiStrToLower(text);
  if (k == "weights") return v1::TENSOR_KIND_WEIGHTS;
  if (k == "gradients" || k == "grads") return v1::TENSOR_KIND_GRADIENTS;
  if (k == "adam_m" || k == "m") return v1::TENSOR_KIND_ADAM_M;
  if (k == "adam_v" || k == "v") return v1::TENSOR_KIND_ADAM_V;
  return Usage(absl::StrCat("--kind=", text, ": expected weights, gradients, adam_m or adam_v"));
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


class LoadCommand : public Command {
 public:
  void AddFlags(FlagSet* f) override {
    f->Int("layer", &layer_, "take model.layers.N.* from a whole-model checkpoint");
    f->String("prefix", &prefix_, "take the tensors named PREFIX* and strip PREFIX (instead of --layer)");
    f->String("dtype", &dtype_text_, "convert to float32, bfloat16 or float16 before sending");
    f->Int("chunk_bytes", &chunk_bytes_, "bytes per stream chunk (the server allows up to its max_chunk_bytes)");
  }
  absl::Status Run(Invocation& in) override {
    const std::string& block = in.arg(0);
    const std::string& file = in.arg(1);
    if (layer_ >= 0 && prefix_.empty()) prefix_ = absl::StrCat("model.layers.", layer_, ".");
    if (chunk_bytes_ < 1) return Usage("--chunk_bytes must be > 0");
    std::optional<v1::DType> dtype;
    if (!dtype_text_.empty()) {
      ASSIGN_OR_RETURN(dtype, DTypeFlag(dtype_text_));
    }
    ASSIGN_OR_RETURN(SafetensorsCheckpoint ckpt, SafetensorsCheckpoint::Open(file));
    if (prefix_.empty()) {
      const auto layer_tensor = std::find_if(ckpt.names().begin(), ckpt.names().end(), [](const std::string& name) {
        return absl::StartsWith(name, "model.layers.");
      });
      if (layer_tensor != ckpt.names().end()) {
        return Usage(absl::StrCat(file, " holds a whole model (", *layer_tensor, "): pick one layer with --layer=N"));
      }
    }
    ASSIGN_OR_RETURN(std::vector<TensorBytes> tensors, ckpt.ReadPrefix(prefix_));
    // Older Llama checkpoints carry the RoPE frequency table as a buffer; the block computes it.
    const size_t before = tensors.size();
    tensors.erase(std::remove_if(tensors.begin(), tensors.end(),
                                 [](const TensorBytes& t) { return absl::EndsWith(t.name, "rotary_emb.inv_freq"); }),
                  tensors.end());
    if (tensors.size() != before) std::cout << "skipped " << before - tensors.size() << " rotary_emb.inv_freq buffer(s)\n";
    if (tensors.empty()) return absl::NotFoundError(absl::StrCat(file, " holds no weights to load"));
    int64_t bytes = 0;
    for (TensorBytes& t : tensors) {
      if (dtype.has_value()) RETURN_IF_ERROR(ConvertTensor(&t, *dtype));
      bytes += static_cast<int64_t>(t.data.size());
    }
    ASSIGN_OR_RETURN(Client * client, in.Connect(chunk_bytes_));
    const absl::Time start = absl::Now();
    absl::StatusOr<v1::LoadWeightsResponse> r;
    {
      ProgressBar bar(absl::StrCat("load ", block));
      r = client->LoadWeights(block, tensors, bar.Callback());
    }
    if (!r.ok()) return r.status();
    std::cout << absl::StrFormat("loaded %d tensors (%s) into %s in %.3f s\n", r->loaded_size(), HumanBytesString(bytes),
                                 r->block_id(), absl::ToDoubleSeconds(absl::Now() - start));
    return absl::OkStatus();
  }

 private:
  int64_t layer_ = -1, chunk_bytes_ = 1 << 20;
  std::string prefix_, dtype_text_;
};

class ForwardCommand : public Command {
 public:
  void AddFlags(FlagSet* f) override {
    f->Int("batch", &batch_, "batch size of the random input");
    f->Int("seq", &seq_, "sequence length of the random input");
    f->Int("seed", &seed_, "seed of the random input (and grad_output)");
    f->String("dtype", &dtype_text_, "wire dtype: float32, bfloat16 or float16");
    f->String("input", &input_file_, "safetensors file holding the input [batch, seq, hidden]");
    f->String("input_name", &input_name_, "tensor to use from --input (default: its only tensor)");
    f->Int("position_offset", &position_offset_, "RoPE position of the first token");
    f->String("output", &output_file_, "write the output (and grad_input) to this safetensors file");
    f->Bool("backward", &backward_, "also run Backward with a random grad_output");
    f->Bool("keep", &keep_, "keep the activations and print the handle (free it with `blockctl release ID`)");
  }

  absl::Status Run(Invocation& in) override {
    std::vector<std::string> ids;
    for (const std::string& p : in.args()) {
      for (absl::string_view id : absl::StrSplit(p, ',', absl::SkipEmpty())) ids.emplace_back(id);
    }
    if (ids.empty()) return Usage("forward takes at least one BLOCK id");
    if (keep_ && backward_) return Usage("--keep and --backward: Backward frees the handle, so keep one or the other");
    ASSIGN_OR_RETURN(v1::DType dtype, DTypeFlag(dtype_text_));
    if (input_file_.empty() && (batch_ < 1 || seq_ < 1)) return Usage("--batch and --seq must be >= 1");
    ASSIGN_OR_RETURN(Client * client, in.Connect());

    v1::ForwardRequest req;
    for (const std::string& id : ids) req.add_block_ids(id);
    req.set_keep_activations(backward_ || keep_);
    req.set_position_offset(position_offset_);
    std::mt19937_64 rng(static_cast<uint64_t>(seed_));
    std::normal_distribution<float> normal(0.f, 1.f);
    std::string input_from;
    if (!input_file_.empty()) {
      ASSIGN_OR_RETURN(TensorBytes t, ReadSafetensor(input_file_, input_name_));
      if (in.IsSet("dtype")) RETURN_IF_ERROR(ConvertTensor(&t, dtype));
      req.mutable_input()->set_dtype(t.dtype);
      for (int64_t d : t.shape) req.mutable_input()->add_shape(d);
      req.mutable_input()->set_data(std::move(t.data));
      input_from = absl::StrCat("from ", input_file_, ":", t.name);
    } else {
      ASSIGN_OR_RETURN(v1::BlockInfo first, client->GetBlock(ids[0]));
      const int64_t hidden = first.config().hidden_size();
      std::vector<float> x(static_cast<size_t>(batch_ * seq_ * hidden));
      for (float& v : x) v = normal(rng);
      *req.mutable_input() = wire::MakeTensor(dtype, {batch_, seq_, hidden}, x);
      input_from = absl::StrCat("random normal, seed ", seed_);
    }
    ASSIGN_OR_RETURN(std::vector<float> x, wire::TensorToFloat32(req.input()));
    std::cout << "input       " << Describe(wire::ShapeOf(req.input()), req.input().dtype(), x) << " (" << input_from
              << ")\n";

    absl::Time start = absl::Now();
    ASSIGN_OR_RETURN(v1::ForwardResponse y, client->Forward(req));
    const double forward_ms = absl::ToDoubleMilliseconds(absl::Now() - start);
    ASSIGN_OR_RETURN(std::vector<float> out, wire::TensorToFloat32(y.output()));
    std::cout << "output      " << Describe(wire::ShapeOf(y.output()), y.output().dtype(), out)
              << absl::StrFormat("  forward %.2f ms over %d blocks\n", forward_ms, ids.size());
    if (keep_) {
      std::cout << "activation  " << y.activation_id()
                << " (held until `blockctl release` or the server's activation_ttl)\n";
    }
    std::vector<TensorBytes> written = {{"output", y.output().dtype(), wire::ShapeOf(y.output()), y.output().data()}};

    if (backward_) {
      std::vector<float> dy(out.size());
      for (float& v : dy) v = normal(rng);
      start = absl::Now();
      ASSIGN_OR_RETURN(v1::BackwardResponse dx,
                       client->Backward(y.activation_id(), wire::MakeTensor(y.output().dtype(), wire::ShapeOf(y.output()), dy)));
      const double backward_ms = absl::ToDoubleMilliseconds(absl::Now() - start);
      ASSIGN_OR_RETURN(std::vector<float> g_in, wire::TensorToFloat32(dx.grad_input()));
      std::cout << "grad_input  " << Describe(wire::ShapeOf(dx.grad_input()), dx.grad_input().dtype(), g_in)
                << absl::StrFormat("  backward %.2f ms\n", backward_ms);
      written.push_back({"grad_input", dx.grad_input().dtype(), wire::ShapeOf(dx.grad_input()), dx.grad_input().data()});
    }
    if (!output_file_.empty()) {
      RETURN_IF_ERROR(WriteSafetensors(output_file_, written, "", {{"blocks", absl::StrJoin(ids, ",")}}));
      std::cout << "wrote " << output_file_ << "\n";
    }
    return absl::OkStatus();
  }

 private:
  int64_t batch_ = 1, seq_ = 16, seed_ = 0, position_offset_ = 0;
  std::string dtype_text_ = "float32", input_file_, input_name_, output_file_;
  bool backward_ = false, keep_ = false;
};

class DownloadCommand : public Command {
 public:
  void AddFlags(FlagSet* f) override {
    f->String("output", &output_, "safetensors file to write");
    f->String("o", &output_, "same as --output");
    f->String("kind", &kind_text_, "weights, gradients, adam_m or adam_v");
    f->String("dtype", &dtype_text_, "float32, bfloat16 or float16");
    f->String("names", &names_, "comma-separated tensor names (default: all)");
    f->String("prefix", &prefix_, "prefix written before each name in the file (load it back with the same --prefix)");
    f->Int("chunk_bytes", &chunk_bytes_, "bytes per stream chunk asked of the server (0: its default)");
  }
  absl::Status Run(Invocation& in) override {
    const std::string& block = in.arg(0);
    ASSIGN_OR_RETURN(v1::TensorKind kind, KindFlag(kind_text_));
    ASSIGN_OR_RETURN(v1::DType dtype, DTypeFlag(dtype_text_));
    v1::DownloadTensorsRequest req;
    req.set_block_id(block);
    req.set_kind(kind);
    req.set_dtype(dtype);
    req.set_chunk_bytes(chunk_bytes_);
    for (absl::string_view n : absl::StrSplit(names_, ',', absl::SkipEmpty())) req.add_names(std::string(n));
    ASSIGN_OR_RETURN(Client * client, in.Connect());
    const absl::Time start = absl::Now();
    absl::StatusOr<std::vector<TensorBytes>> tensors;
    {
      ProgressBar bar(absl::StrCat("download ", block));
      tensors = client->DownloadTensors(req, bar.Callback());
    }
    if (!tensors.ok()) return tensors.status();
    int64_t bytes = 0;
    for (const TensorBytes& t : *tensors) bytes += static_cast<int64_t>(t.data.size());
    if (output_.empty()) {
      for (const TensorBytes& t : *tensors) {
        ASSIGN_OR_RETURN(std::vector<float> values, wire::DecodeToFloat32(t.dtype, t.data));
        std::cout << absl::StrFormat("%-34s %s\n", t.name, Describe(t.shape, t.dtype, values));
      }
      return absl::OkStatus();
    }
    const std::map<std::string, std::string> metadata = {
        {"format", "pt"}, {"block_id", block}, {"kind", absl::AsciiStrToLower(kind_text_)}};
    RETURN_IF_ERROR(WriteSafetensors(output_, *tensors, prefix_, metadata));
    std::cout << absl::StrFormat("wrote %d tensors (%s) of %s to %s in %.3f s\n", tensors->size(),
                                 HumanBytesString(bytes), block, output_, absl::ToDoubleSeconds(absl::Now() - start));
    return absl::OkStatus();
  }

 private:
  std::string output_, kind_text_ = "weights", dtype_text_ = "float32", names_, prefix_;
  int64_t chunk_bytes_ = 0;
};

}  // namespace

std::vector<CommandSpec> TensorCommands() {
  return {
      {"load", "load a block's weights from safetensors (--layer N takes model.layers.N.*)",
       "blockctl load BLOCK FILE [--layer=N | --prefix=PREFIX]",
       "LoadWeights from a safetensors FILE, a sharded checkpoint's *.safetensors.index.json, or a\n"
       "Hugging Face checkpoint directory (its index, else its *.safetensors files).\n"
       "The tensors must carry the names of one decoder layer (input_layernorm.weight,\n"
       "self_attn.q_proj.weight, ...), as `blockctl download -o FILE` writes them; --layer N takes\n"
       "model.layers.N.* from a whole model and strips the prefix (a file from `download --prefix=P`\n"
       "loads with --prefix=P). Tensors go in their file dtype unless --dtype says otherwise.",
       {2, 2, "load takes a BLOCK id and a FILE"}, [] { return std::make_unique<LoadCommand>(); }},
      {"forward", "run a span on random or given input and summarise the output",
       "blockctl forward BLOCK[,BLOCK...] [--batch=B --seq=S | --input=FILE] [--backward | --keep]",
       "Forward through a span of blocks (in the order given) and summarise the output: shape, dtype,\n"
       "mean/std/min/max and the call's time. The input is random normal (--seed) unless --input\n"
       "names a safetensors file. --backward keeps the activations and runs Backward with a random\n"
       "grad_output, which accumulates weight gradients on the blocks; --keep keeps them and prints\n"
       "the handle instead.",
       {0, -1, ""}, [] { return std::make_unique<ForwardCommand>(); }},
      {"download", "download weights, gradients or AdamW moments to safetensors",
       "blockctl download BLOCK [-o FILE] [--kind=weights|gradients|adam_m|adam_v] [--dtype=D]",
       "DownloadTensors of one block. With -o/--output the tensors go to a safetensors file under the\n"
       "block's own names, which `blockctl load BLOCK FILE` takes back as it is (with --prefix, e.g.\n"
       "model.layers.3., load it with the same --prefix or --layer=3); without -o each tensor is summarised.",
       {1, 1, "download takes one BLOCK id"}, [] { return std::make_unique<DownloadCommand>(); }},
  };
}

}  // namespace blockd
