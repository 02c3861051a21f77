// blockctl's replica-group subcommands (ARCHITECTURE.md, "Replica groups and models across
// daemons"): collective-id on rank 0's daemon, join-group on every member at once (one blockctl
// per member, in parallel), leave-group, groups, grad-norm. `step --group` is in blockctl_train.cc.
//
//   ID=$(blockctl --target=d0:50051 collective-id)
//   blockctl --target=d0:50051 join-group dp b0,b1 --rank=0 --world_size=2 --collective_id=$ID &
//   blockctl --target=d1:50051 join-group dp b0,b1 --rank=1 --world_size=2 --collective_id=$ID
//
// The collective id is opaque bytes (NCCL's is binary): blockctl prints and takes it in base64,
// as the JSON form of GetCollectiveIdResponse does.
#include <cmath>
#include <iostream>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "base/status_macros.h"
#include "client/blockctl.h"

namespace blockd {
namespace {

std::vector<std::string> CommaIds(const std::vector<std::string>& args, size_t from) {
  std::vector<std::string> ids;
  for (size_t i = from; i < args.size(); ++i) {
    for (absl::string_view id : absl::StrSplit(args[i], ',', absl::SkipEmpty())) ids.emplace_back(id);
  }
  return ids;
}

void PrintGroup(const v1::GroupInfo& g) {
  std::cout << absl::StrFormat("group       %s\n", g.group_id())
            << absl::StrFormat("rank        %d of %d (%s)\n", g.rank(), g.world_size(), g.backend())
            << absl::StrFormat("blocks      %s\n", absl::StrJoin(g.block_ids(), ", "))
            << absl::StrFormat("state       %s%s\n", g.state(), g.failure().empty() ? "" : ": " + g.failure())
            << absl::StrFormat("steps       %d\n", g.steps())
            << absl::StrFormat("moved       %d bytes\n", g.collective_bytes())
            << absl::StrFormat("timeout     %d ms\n", g.timeout_ms());
}

class CollectiveIdCommand : public Command {
 public:
  void AddFlags(FlagSet* f) override {
    f->String("backend", &backend_, "\"\": the blocks' own (gloo for CPU daemons); \"gloo\"; \"nccl\"");
  }
  absl::Status Run(Invocation& in) override {
    ASSIGN_OR_RETURN(Client * client, in.Connect());
    ASSIGN_OR_RETURN(v1::GetCollectiveIdResponse r, client->GetCollectiveId(backend_));
    in.Print(r, [&] { std::cout << absl::Base64Escape(r.collective_id()) << "\n"; });
    return absl::OkStatus();
  }

 private:
  std::string backend_;
};

class JoinGroupCommand : public Command {
 public:
  void AddFlags(FlagSet* f) override {
    f->Int("rank", &rank_, "this member's rank, 0..world_size-1 (rank 0 asked for the collective id)");
    f->Int("world_size", &world_size_, "how many members the group has");
    f->String("collective_id", &collective_id_, "what collective-id printed on rank 0's daemon (base64)");
    f->Int("timeout_ms", &timeout_ms_, "joining, and every later collective of the group (0: 60000)");
  }
  absl::Status Run(Invocation& in) override {
    const std::vector<std::string> ids = CommaIds(in.args(), 1);
    if (ids.empty()) return Usage("join-group takes a GROUP id and at least one BLOCK id");
    if (!in.IsSet("world_size")) return Usage("join-group needs --world_size");
    if (!in.IsSet("rank")) return Usage("join-group needs --rank");
    std::string id;
    if (collective_id_.empty() || !absl::Base64Unescape(collective_id_, &id)) {
      return Usage("--collective_id: expected the base64 text that collective-id printed on rank 0's daemon");
    }
    v1::JoinGroupRequest req;
    req.set_group_id(in.arg(0));
    req.set_rank(static_cast<int32_t>(rank_));
    req.set_world_size(static_cast<int32_t>(world_size_));
    req.set_collective_id(id);
    for (const std::string& b : ids) req.add_block_ids(b);
    req.set_timeout_ms(timeout_ms_);
    // The server range-checks rank, world_size and timeout_ms (INVALID_ARGUMENT saying what it expects).
    if (req.rank() != rank_ || req.world_size() != world_size_) {
      return Usage("--rank and --world_size must fit in 32 bits");
    }
    ASSIGN_OR_RETURN(Client * client, in.Connect());
    ASSIGN_OR_RETURN(v1::GroupInfo g, client->JoinGroup(req));
    in.Print(g, [&] { PrintGroup(g); });
    return absl::OkStatus();
  }

 private:
  int64_t rank_ = 0, world_size_ = 0, timeout_ms_ = 0;
  std::string collective_id_;
};

class LeaveGroupCommand : public Command {
 public:
  absl::Status Run(Invocation& in) override {
    ASSIGN_OR_RETURN(Client * client, in.Connect());
    RETURN_IF_ERROR(client->LeaveGroup(in.arg(0)));
    std::cout << "left group " << in.arg(0) << "\n";
    return absl::OkStatus();
  }
};

class GroupsCommand : public Command {
 public:
  absl::Status Run(Invocation& in) override {
    ASSIGN_OR_RETURN(Client * client, in.Connect());
    if (!in.args().empty()) {
      ASSIGN_OR_RETURN(v1::GroupInfo g, client->GetGroup(in.arg(0)));
      in.Print(g, [&] { PrintGroup(g); });
      return absl::OkStatus();
    }
    ASSIGN_OR_RETURN(std::vector<v1::GroupInfo> groups, client->ListGroups());
    v1::ListGroupsResponse all;
    for (v1::GroupInfo& g : groups) *all.add_groups() = std::move(g);
    in.Print(all, [&] {
      if (all.groups().empty()) {
        std::cout << "no groups\n";
        return;
      }
      std::cout << absl::StrFormat("%-24s %-9s %-7s %-8s %-7s %s\n", "GROUP", "RANK", "BACKEND", "STATE", "STEPS",
                                   "BLOCKS");
      for (const v1::GroupInfo& g : all.groups()) {
        std::cout << absl::StrFormat("%-24s %-9s %-7s %-8s %-7d %s\n", g.group_id(),
                                     absl::StrCat(g.rank(), "/", g.world_size()), g.backend(), g.state(), g.steps(),
                                     absl::StrJoin(g.block_ids(), ","));
      }
    });
    return absl::OkStatus();
  }
};

class GradNormCommand : public Command {
 public:
  void AddFlags(FlagSet* f) override {
    f->String("group", &group_, "of this replica group's mean gradients (run on every member at once)");
  }
  absl::Status Run(Invocation& in) override {
    const std::vector<std::string> ids = CommaIds(in.args(), 0);
    if (ids.empty() && group_.empty()) return Usage("grad-norm takes BLOCK ids, or --group");
    ASSIGN_OR_RETURN(Client * client, in.Connect());
    ASSIGN_OR_RETURN(v1::GradNormResponse r, client->GradNorm(ids, group_));
    in.Print(r, [&] {
      std::cout << absl::StrFormat("sum of squares  %.17g\n", r.sum_of_squares())
                << absl::StrFormat("norm            %.6g\n", std::sqrt(r.sum_of_squares()))
                << "finite          " << (r.finite() ? "yes" : "no: a step would be skipped") << "\n";
    });
    return absl::OkStatus();
  }

 private:
  std::string group_;
};

}  // namespace

std::vector<CommandSpec> GroupCommands() {
  return {
      {"collective-id", "on rank 0's daemon: a collective id for join-group", "blockctl collective-id [--backend=gloo]",
       "GetCollectiveId: run on the daemon that will be rank 0 of a replica group; prints the id (base64)\n"
       "that every member then passes to join-group. Valid for 10 minutes or until its group formed.",
       {0, 0, "collective-id takes no arguments"}, [] { return std::make_unique<CollectiveIdCommand>(); }},
      {"join-group", "join a replica group (every member at once)",
       "blockctl join-group GROUP BLOCK[,BLOCK...] --rank=R --world_size=N --collective_id=ID [--timeout_ms=MS]",
       "JoinGroup: this daemon's blocks join replica group GROUP as rank R of N. Run it on every member at\n"
       "once (it returns when all joined, or fails after --timeout_ms); rank 0's weights and AdamW state\n"
       "are copied to the others. Then `step --group=GROUP` on every member averages their gradients.",
       {2, -1, "join-group takes a GROUP id and at least one BLOCK id"},
       [] { return std::make_unique<JoinGroupCommand>(); }},
      {"leave-group", "leave a replica group (the blocks stay)", "blockctl leave-group GROUP",
       "LeaveGroup: this daemon leaves GROUP; its blocks stay and may join another group.",
       {1, 1, "leave-group takes one GROUP id"}, [] { return std::make_unique<LeaveGroupCommand>(); }},
      {"groups", "list replica groups, or show one", "blockctl groups [GROUP]",
       "ListGroups, or GetGroup of GROUP: rank, world size, backend, state (joining, ready, failed and\n"
       "why), group steps done and bytes moved by its collectives.",
       {0, 1, "groups takes at most one GROUP id"}, [] { return std::make_unique<GroupsCommand>(); }},
      {"grad-norm", "sum of squares of blocks' (or a group's mean) gradients",
       "blockctl grad-norm BLOCK[,BLOCK...] | --group=GROUP",
       "GradNorm: the sum of squares of the blocks' gradients and whether all are finite; with --group,\n"
       "of the group's mean gradients (run on every member at once; the group step after reuses them).\n"
       "For a model spread over daemons: sum them, and step each with\n"
       "--clip_coefficient=min(1, max_norm / (sqrt(sum) + 1e-6)); skip everywhere if one is not finite.",
       {0, -1, ""}, [] { return std::make_unique<GradNormCommand>(); }},
  };
}

}  // namespace blockd
