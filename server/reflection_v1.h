// grpc.reflection.v1.ServerReflection, beside the v1alpha service that Debian's grpc++_reflection
// 1.51 registers. Newer grpcurl and grpcui ask v1 first; without it they print UNIMPLEMENTED
// before falling back (or not at all). Both answer from the same place: the generated descriptor
// pool, which holds every proto compiled into blockd.
//
//   std::unique_ptr<grpc::Service> v1 = MakeReflectionV1Service();
//   builder.RegisterService(v1.get());
#pragma once

#include <memory>

#include <grpcpp/impl/service_type.h>

namespace blockd {

std::unique_ptr<grpc::Service> MakeReflectionV1Service();

}  // namespace blockd
