// blockctl's training subcommands beside forward --backward: step (AdamW), zero-grad, release (an
// activation handle that will get no Backward).
#include <iostream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "base/status_macros.h"
#include "client/blockctl.h"

namespace blockd {
namespace {

// BLOCK arguments, each of which may be a comma list (as forward takes a span).
std::vector<std::string> BlockIds(const std::vector<std::string>& args) {
  std::vector<std::string> ids;
  for (const std::string& a : args) {
    for (absl::string_view id : absl::StrSplit(a, ',', absl::SkipEmpty())) ids.emplace_back(id);
  }
  return ids;
}

class StepCommand : public Command {
 public:
  void AddFlags(FlagSet* f) override {
    f->Double("lr", &lr_, "learning rate");
    f->Double("beta1", &beta1_, "AdamW beta1");
    f->Double("beta2", &beta2_, "AdamW beta2");
    f->Double("eps", &eps_, "AdamW epsilon");
    f->Double("weight_decay", &weight_decay_, "decoupled weight decay (2-D matrices only)");
    f->Bool("decay_norm_weights", &decay_norm_weights_, "also decay the 1-D norm weights");
    f->Double("max_grad_norm", &max_grad_norm_, "> 0: clip by the global L2 norm over all the blocks named");
    f->String("group", &group_, "a replica group's step: average the gradients across the group first (run on "
                                "every member at once; BLOCK ids then optional)");
    f->Double("clip_coefficient", &clip_coefficient_,
              "in (0, 1]: scale the gradients by it instead of --max_grad_norm (computed over a model spread over "
              "daemons, see grad-norm)");
  }
  absl::Status Run(Invocation& in) override {
    const std::vector<std::string> ids = BlockIds(in.args());
    if (ids.empty() && group_.empty()) return Usage("step takes at least one BLOCK id, or --group");
    v1::StepRequest req;
    for (const std::string& id : ids) req.add_block_ids(id);
    // Every field is sent, so what ran is what --help shows (the flags' defaults are PyTorch's,
    // as the server's are).
    v1::AdamW* a = req.mutable_adamw();
    a->set_lr(lr_);
    a->set_beta1(beta1_);
    a->set_beta2(beta2_);
    a->set_eps(eps_);
    a->set_weight_decay(weight_decay_);
    a->set_decay_norm_weights(decay_norm_weights_);
    req.set_max_grad_norm(max_grad_norm_);
    req.set_group_id(group_);
    req.set_clip_coefficient(clip_coefficient_);
    ASSIGN_OR_RETURN(Client * client, in.Connect());
    ASSIGN_OR_RETURN(v1::StepResponse r, client->Step(req));
    in.Print(r, [&] {
      std::cout << absl::StrFormat("grad norm   %.6g%s\n", r.grad_norm(),
                                   r.clip_coefficient() > 0 && r.clip_coefficient() < 1
                                       ? (clip_coefficient_ > 0
                                              ? absl::StrFormat(" (gradients scaled by %.6g)", r.clip_coefficient())
                                              : absl::StrFormat(" (clipped to %g: gradients scaled by %.6g)",
                                                                max_grad_norm_, r.clip_coefficient()))
                                       : "");
      std::cout << "skipped     "
                << (r.skipped() ? "yes: the gradients are not finite, nothing changed (zero-grad and go on)" : "no")
                << "\n";
      for (const v1::BlockStep& s : r.steps()) std::cout << absl::StrFormat("step        %s %d\n", s.block_id(), s.step());
    });
    return absl::OkStatus();
  }

 private:
  double lr_ = 1e-3, beta1_ = 0.9, beta2_ = 0.999, eps_ = 1e-8, weight_decay_ = 0.01, max_grad_norm_ = 0;
  double clip_coefficient_ = 0;
  bool decay_norm_weights_ = false;
  std::string group_;
};

class ZeroGradCommand : public Command {
 public:
  absl::Status Run(Invocation& in) override {
    const std::vector<std::string> ids = BlockIds(in.args());
    if (ids.empty()) return Usage("zero-grad takes at least one BLOCK id");
    ASSIGN_OR_RETURN(Client * client, in.Connect());
    RETURN_IF_ERROR(client->ZeroGrad(ids));
    std::cout << "zeroed the gradients of " << absl::StrJoin(ids, ", ") << "\n";
    return absl::OkStatus();
  }
};

class ReleaseCommand : public Command {
 public:
  absl::Status Run(Invocation& in) override {
    ASSIGN_OR_RETURN(Client * client, in.Connect());
    for (const std::string& id : in.args()) {
      RETURN_IF_ERROR(client->ReleaseActivations(id));
      std::cout << "released " << id << "\n";
    }
    return absl::OkStatus();
  }
};

}  // namespace

std::vector<CommandSpec> TrainCommands() {
  return {
      {"step", "AdamW step of blocks (prints the grad norm and whether it was skipped)",
       "blockctl step BLOCK[,BLOCK...] [--lr=X] [--weight_decay=X] [--max_grad_norm=X] [--group=G] ...",
       "One AdamW step (torch.optim.AdamW semantics) of the named blocks with the gradients they have\n"
       "accumulated (forward --backward). --max_grad_norm clips by the global norm over all of them.\n"
       "Prints the global gradient norm before clipping and whether the step was skipped (non-finite\n"
       "gradients: nothing changes). A step clears the gradients it used (zero-grad clears them without one).\n"
       "--group=G steps replica group G: run it on every member at once; the gradients are averaged\n"
       "across the group first and every replica ends with the same weights. --clip_coefficient=C scales\n"
       "the gradients by C instead (a model spread over daemons: see grad-norm).",
       {0, -1, ""}, [] { return std::make_unique<StepCommand>(); }},
      {"zero-grad", "clear the accumulated gradients of blocks", "blockctl zero-grad BLOCK[,BLOCK...]",
       "ZeroGrad: clear the weight gradients the blocks have accumulated.",
       {1, -1, "zero-grad takes at least one BLOCK id"}, [] { return std::make_unique<ZeroGradCommand>(); }},
      {"release", "free activation handles (from forward --keep) without a backward",
       "blockctl release ACTIVATION_ID...",
       "ReleaseActivations: free the activations a Forward kept (forward --keep prints the id) when no\n"
       "Backward will come, instead of holding them until the server's activation_ttl.",
       {1, -1, "release takes at least one ACTIVATION_ID"}, [] { return std::make_unique<ReleaseCommand>(); }},
  };
}

}  // namespace blockd
