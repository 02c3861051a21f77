// The replica-group RPCs of BlockServiceImpl: GetCollectiveId, JoinGroup, LeaveGroup, GetGroup,
// ListGroups, GradNorm (Step with a group_id is in service.cc). Groups belong to the caller's
// identity (reactor->client()), as sessions do. GetCollectiveId and JoinGroup need the admin role:
// the first opens a port for the rendezvous, the second overwrites the blocks' weights with rank
// 0's, as LoadWeights does. JoinGroup waits up to its timeout_ms on a pool thread, never on a
// gRPC thread.
#include "absl/strings/str_cat.h"
#include "server/convert.h"
#include "server/service_internal.h"

namespace blockd {
namespace {

// How long a collective id stays valid for its group to connect.
constexpr absl::Duration kCollectiveIdTtl = absl::Minutes(10);

void ToProto(const GroupInfo& info, v1::GroupInfo* out) {
  out->set_group_id(info.group_id);
  out->set_rank(info.rank);
  out->set_world_size(info.world_size);
  out->set_backend(info.backend);
  for (const std::string& id : info.block_ids) out->add_block_ids(id);
  out->set_timeout_ms(absl::ToInt64Milliseconds(info.timeout));
  out->set_state(info.state);
  out->set_failure(info.failure);
  out->set_steps(info.steps);
  out->set_collective_bytes(info.payload_bytes);
}

}  // namespace

grpc::ServerUnaryReactor* BlockServiceImpl::GetCollectiveId(grpc::CallbackServerContext* ctx,
                                                            const v1::GetCollectiveIdRequest* req,
                                                            v1::GetCollectiveIdResponse* resp) {
  return Unary(ctx, "GetCollectiveId", *req, resp, Work::kPool, Role::kAdmin, [this, req, resp]() -> absl::Status {
    ASSIGN_OR_RETURN(auto id, engine_->GetCollectiveId(req->backend(), kCollectiveIdTtl));
    resp->set_collective_id(id.first);
    resp->set_backend(id.second);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* BlockServiceImpl::JoinGroup(grpc::CallbackServerContext* ctx,
                                                      const v1::JoinGroupRequest* req, v1::GroupInfo* resp) {
  return Unary(ctx, "JoinGroup", *req, resp, Work::kPool, Role::kAdmin,
               [this, req, resp](UnaryReactor* reactor) -> absl::Status {
    if (req->timeout_ms() < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("timeout_ms = ", req->timeout_ms(), ", expected >= 0 (0: 60000)"));
    }
    JoinGroupArgs args;
    args.group_id = req->group_id();
    args.rank = req->rank();
    args.world_size = req->world_size();
    args.collective_id = req->collective_id();
    args.block_ids.assign(req->block_ids().begin(), req->block_ids().end());
    args.timeout = absl::Milliseconds(std::min<int64_t>(req->timeout_ms(), int64_t{1} << 40));
    args.client = reactor->client();
    CollectiveUse use;
    absl::StatusOr<GroupInfo> info = engine_->JoinGroup(args, &use);
    metrics_->GroupCollectives("JoinGroup", use);
    RETURN_IF_ERROR(info.status());
    ToProto(*info, resp);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* BlockServiceImpl::LeaveGroup(grpc::CallbackServerContext* ctx,
                                                       const v1::LeaveGroupRequest* req,
                                                       v1::LeaveGroupResponse* resp) {
  return Unary(ctx, "LeaveGroup", *req, resp, Work::kPool, Role::kTrain,
               [this, req](UnaryReactor* reactor) { return engine_->LeaveGroup(req->group_id(), reactor->client()); });
}

grpc::ServerUnaryReactor* BlockServiceImpl::GetGroup(grpc::CallbackServerContext* ctx, const v1::GetGroupRequest* req,
                                                     v1::GroupInfo* resp) {
  return Unary(ctx, "GetGroup", *req, resp, Work::kInline, Role::kRead,
               [this, req, resp](UnaryReactor* reactor) -> absl::Status {
    ASSIGN_OR_RETURN(GroupInfo info, engine_->GetGroup(req->group_id(), reactor->client()));
    ToProto(info, resp);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* BlockServiceImpl::ListGroups(grpc::CallbackServerContext* ctx,
                                                       const v1::ListGroupsRequest* req,
                                                       v1::ListGroupsResponse* resp) {
  return Unary(ctx, "ListGroups", *req, resp, Work::kInline, Role::kRead,
               [this, resp](UnaryReactor* reactor) -> absl::Status {
    for (const GroupInfo& info : engine_->ListGroups(reactor->client())) ToProto(info, resp->add_groups());
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* BlockServiceImpl::GradNorm(grpc::CallbackServerContext* ctx, const v1::GradNormRequest* req,
                                                     v1::GradNormResponse* resp) {
  return Unary(ctx, "GradNorm", *req, resp, Work::kPool, Role::kTrain,
               [this, req, resp](UnaryReactor* reactor) -> absl::Status {
    const std::vector<std::string> ids(req->block_ids().begin(), req->block_ids().end());
    absl::StatusOr<GradNormResult> r = engine_->GradNorm(ids, req->group_id(), reactor->client());
    if (!req->group_id().empty()) {
      metrics_->GroupCollectives("GradNorm", r.ok() ? r->collectives : CollectiveUse{});
    }
    RETURN_IF_ERROR(r.status());
    resp->set_sum_of_squares(r->sum_of_squares);
    resp->set_finite(r->finite);
    return absl::OkStatus();
  });
}

}  // namespace blockd
