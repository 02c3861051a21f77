#include "server/reflection_v1.h"

#include <set>
#include <string>
#include <vector>

#include <google/protobuf/descriptor.h>
#include <google/protobuf/descriptor.pb.h>

#include "grpc/reflection/v1/reflection.grpc.pb.h"

namespace blockd {
namespace {

namespace rv1 = grpc::reflection::v1;
using google::protobuf::Descriptor;
using google::protobuf::DescriptorPool;
using google::protobuf::FieldDescriptor;
using google::protobuf::FileDescriptor;

// What `list_services` names: the services this daemon registers.
const char* const kServices[] = {"blockd.v1.BlockService", "grpc.health.v1.Health",
                                 "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"};

// One reflection stream: requests are answered in order. Files already sent on this stream are
// not sent again (as gRPC's own implementation does), so a client walking the imports gets each
// file once.
class ReflectionStream final : public grpc::ServerBidiReactor<rv1::ServerReflectionRequest, rv1::ServerReflectionResponse> {
 public:
  ReflectionStream() { StartRead(&request_); }

  void OnReadDone(bool ok) override {
    if (!ok) {
      Finish(grpc::Status::OK);  // the client closed its side: the conversation is over
      return;
    }
    Answer();
    StartWrite(&response_);
  }
  void OnWriteDone(bool ok) override {
    if (!ok) {
      Finish(grpc::Status(grpc::StatusCode::CANCELLED, "the client went away"));
      return;
    }
    StartRead(&request_);
  }
  void OnDone() override { delete this; }

 private:
  void Error(grpc::StatusCode code, const std::string& message) {
    rv1::ErrorResponse* e = response_.mutable_error_response();
    e->set_error_code(static_cast<int32_t>(code));
    e->set_error_message(message);
  }

  // The file and its imports, each once per stream.
  void AddFile(const FileDescriptor* file) {
    if (file == nullptr || !sent_.insert(file->name()).second) return;
    google::protobuf::FileDescriptorProto proto;
    file->CopyTo(&proto);
    response_.mutable_file_descriptor_response()->add_file_descriptor_proto(proto.SerializeAsString());
    for (int i = 0; i < file->dependency_count(); ++i) AddFile(file->dependency(i));
  }

  void SendFile(const FileDescriptor* file, const std::string& what) {
    if (file == nullptr) return Error(grpc::StatusCode::NOT_FOUND, what + " not found");
    response_.mutable_file_descriptor_response();  // set the oneof even when every file was sent already
    AddFile(file);
  }

  void Answer() {
    const DescriptorPool* pool = DescriptorPool::generated_pool();
    response_.Clear();
    response_.set_valid_host(request_.host());
    *response_.mutable_original_request() = request_;
    switch (request_.message_request_case()) {
      case rv1::ServerReflectionRequest::kFileByFilename:
        return SendFile(pool->FindFileByName(request_.file_by_filename()), "file " + request_.file_by_filename());
      case rv1::ServerReflectionRequest::kFileContainingSymbol:
        return SendFile(pool->FindFileContainingSymbol(request_.file_containing_symbol()),
                        "symbol " + request_.file_containing_symbol());
      case rv1::ServerReflectionRequest::kFileContainingExtension: {
        const rv1::ExtensionRequest& r = request_.file_containing_extension();
        const Descriptor* type = pool->FindMessageTypeByName(r.containing_type());
        const FieldDescriptor* ext = type == nullptr ? nullptr : pool->FindExtensionByNumber(type, r.extension_number());
        return SendFile(ext == nullptr ? nullptr : ext->file(),
                        "extension " + std::to_string(r.extension_number()) + " of " + r.containing_type());
      }
      case rv1::ServerReflectionRequest::kAllExtensionNumbersOfType: {
        const Descriptor* type = pool->FindMessageTypeByName(request_.all_extension_numbers_of_type());
        if (type == nullptr) return Error(grpc::StatusCode::NOT_FOUND, "type " + request_.all_extension_numbers_of_type() + " not found");
        std::vector<const FieldDescriptor*> exts;
        pool->FindAllExtensions(type, &exts);
        rv1::ExtensionNumberResponse* out = response_.mutable_all_extension_numbers_response();
        out->set_base_type_name(type->full_name());
        for (const FieldDescriptor* f : exts) out->add_extension_number(f->number());
        return;
      }
      case rv1::ServerReflectionRequest::kListServices:
        for (const char* name : kServices) response_.mutable_list_services_response()->add_service()->set_name(name);
        return;
      case rv1::ServerReflectionRequest::MESSAGE_REQUEST_NOT_SET:
        return Error(grpc::StatusCode::INVALID_ARGUMENT, "the request names no question (message_request is not set)");
    }
  }

  rv1::ServerReflectionRequest request_;
  rv1::ServerReflectionResponse response_;
  std::set<std::string> sent_;
};

class ReflectionV1 final : public rv1::ServerReflection::CallbackService {
  grpc::ServerBidiReactor<rv1::ServerReflectionRequest, rv1::ServerReflectionResponse>* ServerReflectionInfo(
      grpc::CallbackServerContext*) override {
    return new ReflectionStream();
  }
};

}  // namespace

std::unique_ptr<grpc::Service> MakeReflectionV1Service() { return std::make_unique<ReflectionV1>(); }

}  // namespace blockd
