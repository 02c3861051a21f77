// Server reflection: grpc.reflection.v1 (what current grpcurl and grpcui ask first) and v1alpha
// both list BlockService and describe it from the same descriptors, without a token even when
// tokens are on (like health).
#include <grpcpp/channel.h>
#include <grpcpp/client_context.h>
#include <grpcpp/create_channel.h>
#include <grpcpp/impl/codegen/client_unary_call.h>
#include <grpcpp/impl/codegen/rpc_method.h>
#include <grpcpp/impl/codegen/sync_stream.h>
#include <grpcpp/security/credentials.h>

#include <algorithm>
#include <fstream>

#include <google/protobuf/descriptor.pb.h>
#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "grpc/reflection/v1/reflection.grpc.pb.h"
#include "tests/integration/harness.h"

namespace blockd::testing {
namespace {

namespace rv1 = grpc::reflection::v1;

// v1 and v1alpha messages are the same on the wire (same fields, same numbers), so one client
// speaks both by naming the method.
std::vector<rv1::ServerReflectionResponse> Ask(const std::shared_ptr<grpc::Channel>& channel, const std::string& version,
                                               const std::vector<rv1::ServerReflectionRequest>& requests) {
  const grpc::internal::RpcMethod method(
      absl::StrCat("/grpc.reflection.", version, ".ServerReflection/ServerReflectionInfo").c_str(),
      grpc::internal::RpcMethod::BIDI_STREAMING, channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  std::unique_ptr<grpc::ClientReaderWriter<rv1::ServerReflectionRequest, rv1::ServerReflectionResponse>> stream(
      grpc::internal::ClientReaderWriterFactory<rv1::ServerReflectionRequest, rv1::ServerReflectionResponse>::Create(
          channel.get(), method, &ctx));
  std::vector<rv1::ServerReflectionResponse> out;
  for (const rv1::ServerReflectionRequest& r : requests) {
    EXPECT_TRUE(stream->Write(r));
    rv1::ServerReflectionResponse resp;
    EXPECT_TRUE(stream->Read(&resp)) << version << ": no answer to " << r.ShortDebugString();
    out.push_back(resp);
  }
  stream->WritesDone();
  const grpc::Status s = stream->Finish();
  EXPECT_TRUE(s.ok()) << version << ": " << s.error_code() << " " << s.error_message();
  return out;
}

TEST(Reflection, V1AndV1AlphaListAndDescribeBlockServiceWithoutAToken) {
  const std::string dir = MakeTempDir("reflection");
  std::ofstream(dir + "/tokens") << "root admin root-token-0123456789abcdef\n";
  ServerOptions o = LoopbackOptions();
  o.token_file = dir + "/tokens";
  auto server = StartServer(o);
  ASSERT_NE(server, nullptr);
  auto channel = grpc::CreateChannel(TargetOf(*server), grpc::InsecureChannelCredentials());

  std::vector<rv1::ServerReflectionRequest> requests(3);
  requests[0].set_list_services("*");
  requests[1].set_file_containing_symbol("blockd.v1.BlockService");
  requests[2].set_file_containing_symbol("blockd.v1.NoSuchService");
  for (const char* version : {"v1", "v1alpha"}) {
    SCOPED_TRACE(version);
    const std::vector<rv1::ServerReflectionResponse> r = Ask(channel, version, requests);
    ASSERT_EQ(r.size(), 3u);
    std::vector<std::string> services;
    for (const auto& s : r[0].list_services_response().service()) services.push_back(s.name());
    EXPECT_NE(std::find(services.begin(), services.end(), "blockd.v1.BlockService"), services.end())
        << "list_services named: " << r[0].ShortDebugString();
    ASSERT_GE(r[1].file_descriptor_response().file_descriptor_proto_size(), 1) << r[1].ShortDebugString();
    google::protobuf::FileDescriptorProto file;
    ASSERT_TRUE(file.ParseFromString(r[1].file_descriptor_response().file_descriptor_proto(0)));
    EXPECT_EQ(file.name(), "blockd/v1/block_service.proto");
    ASSERT_GE(file.service_size(), 1);
    EXPECT_EQ(file.service(0).name(), "BlockService");
    bool has_forward = false;
    for (const auto& m : file.service(0).method()) has_forward = has_forward || m.name() == "Forward";
    EXPECT_TRUE(has_forward) << "BlockService as described has no Forward";
    EXPECT_EQ(r[2].error_response().error_code(), static_cast<int>(grpc::StatusCode::NOT_FOUND)) << r[2].ShortDebugString();
  }
}

}  // namespace
}  // namespace blockd::testing
