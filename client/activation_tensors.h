// The tensor each activation call carries (Forward's input, Backward's grad_output, InferStep's
// hidden states) and its reply's: what the client's transports move in and out of regions.
#pragma once

#include "blockd/v1/block_service.pb.h"

namespace blockd {

inline const v1::Tensor& TensorOf(const v1::ForwardRequest& r) { return r.input(); }
inline const v1::Tensor& TensorOf(const v1::BackwardRequest& r) { return r.grad_output(); }
inline const v1::Tensor& TensorOf(const v1::InferStepRequest& r) { return r.hidden_states(); }
inline v1::Tensor* MutableTensorOf(v1::ForwardRequest* r) { return r->mutable_input(); }
inline v1::Tensor* MutableTensorOf(v1::BackwardRequest* r) { return r->mutable_grad_output(); }
inline v1::Tensor* MutableTensorOf(v1::InferStepRequest* r) { return r->mutable_hidden_states(); }
inline v1::Tensor* MutableTensorOf(v1::ForwardResponse* r) { return r->mutable_output(); }
inline v1::Tensor* MutableTensorOf(v1::BackwardResponse* r) { return r->mutable_grad_input(); }
inline v1::Tensor* MutableTensorOf(v1::InferStepResponse* r) { return r->mutable_hidden_states(); }

}  // namespace blockd
